//! Layout detection and per-tensor mapping on the committed fixtures (made by bitsandbytes and
//! transformers, see fixtures/README.md).

use std::path::PathBuf;

use gptoss_formats::Checkpoint;
use gptoss_formats::inspect::InspectReport;
use gptoss_formats::weights::{Layout, probe};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

#[test]
fn each_fixture_is_detected_and_fully_mapped() {
    for (dir, layout) in [
        ("tiny-bf16", Layout::FusedDense),
        ("tiny-mxfp4", Layout::Mxfp4),
        ("tiny-unsloth-nf4", Layout::UnslothSplit),
        ("tiny-fused-nf4", Layout::FusedBnb),
    ] {
        let ckpt = Checkpoint::open(&fixture(dir)).unwrap();
        let r = probe(&ckpt);
        assert!(r.problems.is_empty(), "{dir}: {:?}", r.problems);
        assert!(r.unused.is_empty(), "{dir}: unused tensors {:?}", r.unused);
        let w = r.weights.unwrap();
        assert_eq!(w.layout, layout, "{dir}");
        for l in &w.layers {
            assert_eq!(l.experts.len(), 8);
            for e in &l.experts {
                assert_eq!((e.gate_up.weight.rows, e.gate_up.weight.cols), (256, 128));
                assert_eq!((e.down.weight.rows, e.down.weight.cols), (128, 128));
            }
        }
        assert!(InspectReport::build(&ckpt).ok());
    }
}

#[test]
fn unsloth_dynamic_quant_is_decided_per_tensor() {
    let ckpt = Checkpoint::open(&fixture("tiny-unsloth-nf4")).unwrap();
    let w = probe(&ckpt).weights.unwrap();
    // dense-left modules, as Unsloth's dynamic quants leave them
    assert_eq!(w.layers[1].q.weight.kind(), "BF16");
    assert_eq!(w.layers[1].o.weight.kind(), "BF16");
    assert_eq!(w.layers[0].experts[3].down.weight.kind(), "BF16");
    // everything else quantized with double quantization
    assert_eq!(w.layers[1].k.weight.kind(), "NF4+dq");
    assert_eq!(w.layers[0].q.weight.kind(), "NF4+dq");
    assert_eq!(w.layers[0].experts[2].down.weight.kind(), "NF4+dq");
    assert_eq!(w.layers[2].experts[7].gate_up.weight.kind(), "NF4+dq");
    assert_eq!(w.layers[0].router.weight.kind(), "BF16");
    assert_eq!(w.lm_head.kind(), "BF16");
    // companions spread over two shards are found through the index
    assert_eq!(ckpt.shard_paths().count(), 2);
}

#[test]
fn fused_bnb_stacks_with_and_without_double_quant() {
    let ckpt = Checkpoint::open(&fixture("tiny-fused-nf4")).unwrap();
    let w = probe(&ckpt).weights.unwrap();
    assert_eq!(w.layers[0].experts[0].gate_up.weight.kind(), "NF4");
    assert_eq!(w.layers[1].experts[0].gate_up.weight.kind(), "NF4+dq");
    assert_eq!(w.layers[2].experts[5].down.weight.kind(), "NF4");
    // the per-expert views of one stack are disjoint slices of the same flat tensor and agree
    // with the same model's bf16 weights to within one NF4 step
    let bf16 = Checkpoint::open(&fixture("tiny-bf16")).unwrap();
    let wb = probe(&bf16).weights.unwrap();
    let (q, d) = (
        w.layers[1].experts[6].gate_up.weight.to_f32(),
        wb.layers[1].experts[6].gate_up.weight.to_f32(),
    );
    let max = d.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = q
        .iter()
        .zip(&d)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err < 0.2 * max,
        "NF4 stack vs bf16: max err {err}, max |w| {max}"
    );
}
