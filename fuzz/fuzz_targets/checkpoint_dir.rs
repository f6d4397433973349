//! Fuzzed bytes as `model.safetensors` next to a valid nano `config.json` (see `nano.rs`):
//! `Checkpoint::open` then `weights::probe`; when the probe maps every weight, every matrix and
//! vector is decoded to f32. Errors are fine, panics are not.
//!
//! One temp directory is reused for all executions (the file is rewritten each time), so an
//! execution costs a write, an mmap and the probe.

#![no_main]

#[path = "known.rs"]
mod known;
#[path = "nano.rs"]
mod nano;

use std::sync::OnceLock;

use gptoss_formats::checkpoint::Checkpoint;
use gptoss_formats::codec::bnb4::QuantStateJson;
use gptoss_formats::weights::{Matrix, Vector, probe};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix("gptoss-fuzz-ckpt")
            .tempdir()
            .expect("temp dir");
        std::fs::write(d.path().join("config.json"), nano::config_json()).expect("config.json");
        d
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    std::fs::write(dir.join("model.safetensors"), data).expect("write model.safetensors");
    let Ok(ckpt) = Checkpoint::open(dir) else {
        return;
    };
    for t in ckpt.tensors() {
        assert_eq!(t.bytes.len(), t.numel() * t.dtype.size(), "{}", t.name);
    }
    if known::skip_known()
        && ckpt.tensors().any(|t| {
            t.name.contains(".quant_state.bitsandbytes__")
                && QuantStateJson::parse(t.bytes).is_ok_and(|s| known::shape_product_overflows(&s))
        })
    {
        return;
    }
    let report = probe(&ckpt);
    let Some(w) = report.weights else {
        assert!(
            !report.problems.is_empty(),
            "probe mapped nothing and reported no problem"
        );
        return;
    };
    // Everything mapped: decode all of it (tiny for the nano config).
    let mut vectors: Vec<&Vector<'_>> = vec![&w.norm];
    let mut matrices: Vec<&Matrix<'_>> = vec![&w.embed, &w.lm_head];
    for l in &w.layers {
        vectors.extend([&l.input_norm, &l.post_norm, &l.sinks]);
        let experts = l.experts.iter().flat_map(|e| [&e.gate_up, &e.down]);
        for lin in [&l.q, &l.k, &l.v, &l.o, &l.router]
            .into_iter()
            .chain(experts)
        {
            matrices.push(&lin.weight);
            vectors.extend(lin.bias.as_ref());
        }
    }
    let mut sink = 0f32;
    for v in vectors {
        let x = v.to_f32();
        assert_eq!(x.len(), v.len, "{}", v.name);
        sink += x.iter().sum::<f32>();
    }
    for m in matrices {
        let x = m.to_f32();
        assert_eq!(x.len(), m.rows * m.cols, "{}", m.name);
        let mut row = vec![0f32; m.cols];
        m.decode_row(m.rows - 1, &mut row);
        sink += x.iter().sum::<f32>() + row.iter().sum::<f32>();
    }
    std::hint::black_box(sink);
});
