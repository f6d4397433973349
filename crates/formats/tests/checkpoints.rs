//! Writing, mapping, converting and rejecting checkpoints (no fixtures needed: everything is
//! synthesized into temporary directories).

use std::path::{Path, PathBuf};

use gptoss_formats::convert::{ConvertTarget, convert};
use gptoss_formats::inspect::InspectReport;
use gptoss_formats::synth::{Preset, SynthLayout, synth};
use gptoss_formats::weights::{Layout, probe};
use gptoss_formats::writer::WriteOptions;
use gptoss_formats::{Checkpoint, ModelWeights};

fn micro(layout: SynthLayout, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{layout:?}"));
    synth(Preset::Micro, layout, 7, &out, WriteOptions::default()).unwrap();
    out
}

fn small_shards() -> WriteOptions {
    WriteOptions {
        max_shard_bytes: 200_000,
        ..WriteOptions::default()
    }
}

#[test]
fn every_synth_layout_maps_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    for (layout, expect) in [
        (SynthLayout::UnslothNf4, Layout::UnslothSplit),
        (SynthLayout::Mxfp4, Layout::Mxfp4),
        (SynthLayout::Bf16, Layout::FusedDense),
    ] {
        let dir = micro(layout, tmp.path());
        let ckpt = Checkpoint::open(&dir).unwrap();
        let report = probe(&ckpt);
        assert!(
            report.problems.is_empty(),
            "{layout:?}: {:?}",
            report.problems
        );
        assert!(
            report.unused.is_empty(),
            "{layout:?}: unused {:?}",
            report.unused
        );
        let w = report.weights.unwrap();
        assert_eq!(w.layout, expect);
        assert_eq!(w.layers.len(), 2);
        assert_eq!(w.layers[0].experts.len(), 4);
        let gu = &w.layers[1].experts[3].gate_up.weight;
        assert_eq!((gu.rows, gu.cols), (128, 64));
        let x = gu.to_f32();
        assert!(x.iter().all(|v| v.is_finite()) && x.iter().any(|v| *v != 0.0));
        let text = InspectReport::build(&ckpt).to_text();
        assert!(text.contains("problems   none"), "{text}");
    }
}

#[test]
fn synth_is_deterministic_and_shards_with_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    synth(
        Preset::Micro,
        SynthLayout::UnslothNf4,
        3,
        &a,
        small_shards(),
    )
    .unwrap();
    synth(
        Preset::Micro,
        SynthLayout::UnslothNf4,
        3,
        &b,
        small_shards(),
    )
    .unwrap();
    let shards: Vec<_> = std::fs::read_dir(&a)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(a.join("model.safetensors.index.json").exists());
    assert!(shards.len() > 3, "{shards:?}");
    for s in shards {
        assert_eq!(
            std::fs::read(a.join(&s)).unwrap(),
            std::fs::read(b.join(&s)).unwrap(),
            "{s:?} differs"
        );
    }
    // no temporary files left behind
    assert!(
        std::fs::read_dir(&a).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial"))
    );
    let ckpt = Checkpoint::open(&a).unwrap();
    ModelWeights::new(&ckpt).unwrap();
}

#[test]
fn convert_round_trips_between_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    // bf16 -> fused-bf16 is exact
    let src_dir = micro(SynthLayout::Bf16, tmp.path());
    let src = Checkpoint::open(&src_dir).unwrap();
    let out = tmp.path().join("fused");
    convert(
        &src,
        ConvertTarget::FusedBf16,
        &out,
        WriteOptions::default(),
    )
    .unwrap();
    let dst = Checkpoint::open(&out).unwrap();
    let (ws, wd) = (
        ModelWeights::new(&src).unwrap(),
        ModelWeights::new(&dst).unwrap(),
    );
    assert_eq!(
        ws.layers[1].experts[2].down.weight.to_f32(),
        wd.layers[1].experts[2].down.weight.to_f32()
    );
    assert_eq!(
        ws.layers[0].q.weight.to_f32(),
        wd.layers[0].q.weight.to_f32()
    );

    // mxfp4 -> unsloth-nf4: NF4 error within one 4-bit step of each block's absmax
    let src_dir = micro(SynthLayout::Mxfp4, tmp.path());
    let src = Checkpoint::open(&src_dir).unwrap();
    let out = tmp.path().join("nf4");
    convert(
        &src,
        ConvertTarget::UnslothNf4,
        &out,
        WriteOptions::default(),
    )
    .unwrap();
    let dst = Checkpoint::open(&out).unwrap();
    let (ws, wd) = (
        ModelWeights::new(&src).unwrap(),
        ModelWeights::new(&dst).unwrap(),
    );
    assert_eq!(wd.layout, Layout::UnslothSplit);
    let (a, b) = (
        ws.layers[0].experts[1].gate_up.weight.to_f32(),
        wd.layers[0].experts[1].gate_up.weight.to_f32(),
    );
    for (blk_a, blk_b) in a.chunks(64).zip(b.chunks(64)) {
        let amax = blk_a.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in blk_a.iter().zip(blk_b) {
            assert!(
                (x - y).abs() <= amax * 0.17 + 1e-7,
                "{x} vs {y} (block absmax {amax})"
            );
        }
    }
    // and back to fused bf16
    let out2 = tmp.path().join("nf4-to-bf16");
    convert(
        &dst,
        ConvertTarget::FusedBf16,
        &out2,
        WriteOptions::default(),
    )
    .unwrap();
    let back = Checkpoint::open(&out2).unwrap();
    let wb = ModelWeights::new(&back).unwrap();
    assert_eq!(wb.layout, Layout::FusedDense);
    let c = wb.layers[0].experts[1].gate_up.weight.to_f32();
    for (x, y) in b.iter().zip(&c) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
    }
}

#[test]
fn refuses_to_overwrite_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = micro(SynthLayout::Bf16, tmp.path());
    let err = synth(
        Preset::Micro,
        SynthLayout::Bf16,
        7,
        &dir,
        WriteOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("already holds a checkpoint"),
        "{err}"
    );
}
