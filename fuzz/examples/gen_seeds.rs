//! Writes the seed corpus under `fuzz/corpus/<target>/seed-*` (run from `fuzz/`:
//! `cargo run --example gen_seeds`). Deterministic: rerunning rewrites identical files.

#[path = "../fuzz_targets/nano.rs"]
mod nano;

use std::path::Path;

use gptoss_formats::checkpoint::{Checkpoint, DType};
use gptoss_formats::codec::quantize::{InputDType, quantize_nf4};
use gptoss_formats::synth::{nf4_linear_tensors, random_uniform, round_to_bf16};
use gptoss_formats::weights::probe;
use gptoss_formats::writer::OwnedTensor;

/// A safetensors file: header JSON (tensors in the given order, padded with spaces to a multiple
/// of 8 bytes, as the `safetensors` crate writes it) then the data.
fn safetensors(tensors: &[OwnedTensor], metadata: Option<serde_json::Value>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m);
    }
    let mut data = Vec::new();
    for t in tensors {
        let s = data.len();
        data.extend_from_slice(&t.data);
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.to_string(), "shape": t.shape, "data_offsets": [s, data.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    out
}

fn values(name: &str, n: usize) -> Vec<f32> {
    let mut v = random_uniform(0, name, n, 0.035);
    round_to_bf16(&mut v);
    v
}

fn bf16(name: &str, shape: Vec<usize>) -> OwnedTensor {
    let v = values(name, shape.iter().product());
    OwnedTensor::bf16(name, shape, &v)
}

fn norm(name: &str, n: usize, dtype: DType) -> OwnedTensor {
    let v: Vec<f32> = values(name, n).iter().map(|x| 1.0 + x).collect();
    match dtype {
        DType::F32 => OwnedTensor::f32(name, vec![n], &v),
        _ => OwnedTensor::bf16(name, vec![n], &v),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Experts {
    /// Unsloth: one NF4 (double quant) `Linear4bit` per expert, `router.linear`.
    UnslothNf4,
    /// transformers: `[E, H, 2I]` bf16 stacks.
    FusedBf16,
    /// transformers v5 + bnb: the `[E, H, 2I]` stacks NF4-quantized flat.
    FusedNf4,
}

/// Every tensor of the nano model in one of the layouts.
fn nano_model(experts: Experts) -> Vec<OwnedTensor> {
    use nano::*;
    let (h, i, e, v) = (HIDDEN, INTER, EXPERTS, VOCAB);
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let norm_dtype = if experts == Experts::UnslothNf4 {
        DType::F32
    } else {
        DType::BF16
    };
    let mut t = vec![bf16("model.embed_tokens.weight", vec![v, h])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        t.push(norm(&format!("{p}.input_layernorm.weight"), h, norm_dtype));
        t.push(norm(
            &format!("{p}.post_attention_layernorm.weight"),
            h,
            norm_dtype,
        ));
        for (name, rows, cols) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            t.push(bf16(
                &format!("{p}.self_attn.{name}.weight"),
                vec![rows, cols],
            ));
            t.push(bf16(&format!("{p}.self_attn.{name}.bias"), vec![rows]));
        }
        t.push(bf16(&format!("{p}.self_attn.sinks"), vec![HEADS]));
        let router = if experts == Experts::UnslothNf4 {
            "router.linear"
        } else {
            "router"
        };
        t.push(bf16(&format!("{p}.mlp.{router}.weight"), vec![e, h]));
        t.push(bf16(&format!("{p}.mlp.{router}.bias"), vec![e]));
        let x = format!("{p}.mlp.experts");
        match experts {
            Experts::UnslothNf4 => {
                for ex in 0..e {
                    for (proj, rows, cols) in [("gate_up_projs", 2 * i, h), ("down_projs", h, i)] {
                        let name = format!("{x}.{proj}.{ex}.weight");
                        t.extend(nf4_linear_tensors(
                            &name,
                            &values(&name, rows * cols),
                            rows,
                            cols,
                        ));
                        t.push(bf16(&format!("{x}.{proj}.{ex}.bias"), vec![rows]));
                    }
                }
            }
            Experts::FusedBf16 | Experts::FusedNf4 => {
                for (proj, rows, cols) in [("gate_up_proj", 2 * i, h), ("down_proj", h, i)] {
                    let name = format!("{x}.{proj}");
                    let shape = vec![e, cols, rows];
                    if experts == Experts::FusedBf16 {
                        t.push(bf16(&name, shape));
                    } else {
                        let q = quantize_nf4(
                            &values(&name, e * rows * cols),
                            &shape,
                            InputDType::BF16,
                            true,
                        );
                        t.extend(
                            q.tensors(&name)
                                .into_iter()
                                .map(|q| OwnedTensor::new(q.name, q.dtype, q.shape, q.data)),
                        );
                    }
                    t.push(bf16(&format!("{x}.{proj}_bias"), vec![e, rows]));
                }
            }
        }
    }
    t.push(norm("model.norm.weight", h, norm_dtype));
    t.push(bf16("lm_head.weight", vec![v, h]));
    t
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
    println!("{:>6} bytes  {}", bytes.len(), dir.join(name).display());
}

/// Checks that a nano model file opens and maps completely (what `checkpoint_dir` fuzzes).
fn check_nano(bytes: &[u8]) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), nano::config_json()).unwrap();
    std::fs::write(d.path().join("model.safetensors"), bytes).unwrap();
    let ckpt = Checkpoint::open(d.path()).expect("nano seed opens");
    let report = probe(&ckpt);
    assert!(
        report.problems.is_empty(),
        "nano seed does not map: {:?}",
        report.problems
    );
    assert!(
        report.unused.is_empty(),
        "nano seed has unused tensors: {:?}",
        report.unused
    );
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");

    // safetensors_header: two tensors; metadata plus an empty tensor; the whole nano model.
    let st = corpus.join("safetensors_header");
    let two = [
        OwnedTensor::bf16("a.weight", vec![2, 3], &[1.0, -2.0, 0.5, 0.25, 3.0, -0.125]),
        OwnedTensor::new("b.absmax", DType::U8, vec![4], vec![0, 1, 254, 255]),
    ];
    write(
        &st,
        "seed-two-tensors.safetensors",
        &safetensors(&two, None),
    );
    let meta = [
        OwnedTensor::new("empty", DType::F32, vec![0, 4], vec![]),
        OwnedTensor::f32("x", vec![1], &[42.0]),
    ];
    write(
        &st,
        "seed-metadata-empty.safetensors",
        &safetensors(&meta, Some(serde_json::json!({"format": "pt"}))),
    );

    // checkpoint_dir: complete nano models in three expert layouts.
    let cd = corpus.join("checkpoint_dir");
    for (experts, name) in [
        (Experts::UnslothNf4, "seed-nano-unsloth-nf4.safetensors"),
        (Experts::FusedBf16, "seed-nano-fused-bf16.safetensors"),
        (Experts::FusedNf4, "seed-nano-fused-nf4.safetensors"),
    ] {
        let bytes = safetensors(
            &nano_model(experts),
            Some(serde_json::json!({"format": "pt"})),
        );
        check_nano(&bytes);
        write(&cd, name, &bytes);
        if experts == Experts::UnslothNf4 {
            write(&st, name, &bytes);
        }
    }

    // quant_state: real bnb JSON (nested / plain, nf4 / fp4, ragged last block); one with
    // control bytes after the 0xFF separator (plain f32 absmax, a decode range in the middle).
    let qs = corpus.join("quant_state");
    let brief = br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 192], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1302083283662796}"#;
    write(&qs, "seed-nf4-nested.json", brief);
    let real = quantize_nf4(&values("q", 16 * 8), &[16, 8], InputDType::BF16, true).state_json();
    write(&qs, "seed-nf4-nested-16x8.json", real.as_bytes());
    write(
        &qs,
        "seed-fp4-plain-ragged.json",
        br#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float16", "shape": [3, 45]}"#,
    );
    write(&qs, "seed-nf4-odd-numel.json", br#"{"quant_type": "nf4", "blocksize": 32, "dtype": "float32", "shape": [7, 9], "nested_blocksize": 2, "nested_dtype": "float32", "nested_offset": -0.5}"#);
    let mut ctl = brief.to_vec();
    ctl.push(0xFF);
    // flags (bit 0: plain absmax), four exact lengths, then start (u64 LE) and len (u16 LE).
    ctl.extend_from_slice(&[1, 0, 0, 0, 0]);
    ctl.extend_from_slice(&100u64.to_le_bytes());
    ctl.extend_from_slice(&300u16.to_le_bytes());
    ctl.extend_from_slice(b"\x12\x34\x56\x78\x9a\xbc\xde\xf0");
    write(&qs, "seed-nf4-plain-ctl.bin", &ctl);
}
