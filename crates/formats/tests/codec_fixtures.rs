//! Golden tests of the codecs against the fixtures written by `scripts/make_fixtures.py`
//! (bitsandbytes 0.50.2, transformers 5.23.0, torch 2.15.0 on CPU; see fixtures/README.md).
//!
//! No torch at test time: the fixture files are read with the `safetensors` crate. Every
//! comparison is on f32 *bits* (or raw bytes): these codecs are exact, not approximate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gptoss_formats::DType;
use gptoss_formats::codec::bnb4::{Absmax, Bnb4Kind, Bnb4Tensor, QuantStateJson};
use gptoss_formats::codec::mxfp4::Mxfp4Matrix;
use gptoss_formats::codec::mxfp4_quantize::quantize_mxfp4;
use gptoss_formats::codec::quantize::{
    Bnb4Options, InputDType, dynamic_map, fp4_code, nf4_code, quantize_4bit, quantize_nf4,
    torch_sum_f32,
};
use safetensors::{Dtype, SafeTensors};

// ---------------------------------------------------------------------------------------------
// Fixture access
// ---------------------------------------------------------------------------------------------

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// One stored tensor, owned.
#[derive(Debug, Clone)]
struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl T {
    fn f32s(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            d => panic!("not a float tensor: {d:?}"),
        }
    }

    fn i64s(&self) -> Vec<i64> {
        assert_eq!(self.dtype, Dtype::I64);
        self.data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn u64s(&self) -> Vec<u64> {
        assert_eq!(self.dtype, Dtype::U64);
        self.data
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

type Tensors = BTreeMap<String, T>;

fn load_file(path: &Path) -> Tensors {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("bad safetensors {}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            (
                name,
                T {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect()
}

/// All tensors of a model directory: through `model.safetensors.index.json` when present
/// (checking that every tensor sits in the shard the index names), else `model.safetensors`.
fn load_dir(name: &str) -> Tensors {
    let dir = fixtures().join(name);
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return load_file(&dir.join("model.safetensors"));
    }
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let map = idx["weight_map"].as_object().unwrap();
    let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    let mut all = Tensors::new();
    for shard in shards {
        for (k, v) in load_file(&dir.join(shard)) {
            assert_eq!(
                map[&k].as_str().unwrap(),
                shard,
                "{name}: {k} is not where the index says"
            );
            all.insert(k, v);
        }
    }
    assert_eq!(all.len(), map.len(), "{name}: index and shards disagree");
    all
}

fn load_ref(file: &str) -> Tensors {
    load_file(&fixtures().join("reference").join(file))
}

fn dtype_of(d: DType) -> Dtype {
    match d {
        DType::U8 => Dtype::U8,
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first at {}: got {:e}, want {:e}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn f32_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Row-major transpose of the `[rows, cols]` matrix starting at `m`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes
// ---------------------------------------------------------------------------------------------

/// Builds our decoder's view of the bnb tensor `prefix` (`….weight`) from its stored companions,
/// the way a loader does: kind from the state key, everything else from the JSON.
fn bnb_view<'a>(ts: &'a Tensors, prefix: &str) -> (Bnb4Tensor<'a>, QuantStateJson) {
    let (kind, state_t) = [Bnb4Kind::Nf4, Bnb4Kind::Fp4]
        .into_iter()
        .find_map(|k| {
            ts.get(&format!("{prefix}.{}", k.state_suffix()))
                .map(|t| (k, t))
        })
        .unwrap_or_else(|| panic!("{prefix}: no quant state"));
    let state = QuantStateJson::parse(&state_t.data).unwrap();
    let get = |s: &str| {
        ts.get(&format!("{prefix}.{s}"))
            .unwrap_or_else(|| panic!("{prefix}.{s} missing"))
    };
    let absmax = if ts.contains_key(&format!("{prefix}.nested_absmax")) {
        let codes = get("absmax");
        assert_eq!(codes.dtype, Dtype::U8);
        Absmax::Nested {
            codes: &codes.data,
            nested_absmax: &get("nested_absmax").data,
            nested_code: &get("nested_quant_map").data,
            nested_blocksize: state.nested_blocksize.unwrap(),
            offset: state.nested_offset.unwrap() as f32,
        }
    } else {
        let a = get("absmax");
        assert_eq!(a.dtype, Dtype::F32);
        Absmax::F32(&a.data)
    };
    let packed = &ts[prefix];
    assert_eq!(packed.dtype, Dtype::U8);
    let view = Bnb4Tensor::new(kind, &state, &packed.data, &get("quant_map").data, absmax)
        .unwrap_or_else(|e| panic!("{prefix}: {e}"));
    (view, state)
}

/// Compares what our quantizer writes for `prefix` with the stored tensors: names, dtypes,
/// shapes and bytes, the JSON included.
fn assert_same_bnb_tensors(
    what: &str,
    ours: &[gptoss_formats::codec::quantize::QuantTensor],
    stored: &Tensors,
) {
    let expected: Vec<&String> = stored
        .keys()
        .filter(|k| *k == &ours[0].name || k.starts_with(&format!("{}.", ours[0].name)))
        .collect();
    assert_eq!(
        ours.len(),
        expected.len(),
        "{what}: we write {:?}, bnb wrote {expected:?}",
        ours.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    for t in ours {
        let s = stored
            .get(&t.name)
            .unwrap_or_else(|| panic!("{what}: bnb has no {}", t.name));
        assert_eq!(dtype_of(t.dtype), s.dtype, "{what}: dtype of {}", t.name);
        assert_eq!(t.shape, s.shape, "{what}: shape of {}", t.name);
        if t.data != s.data {
            let first = t.data.iter().zip(&s.data).position(|(a, b)| a != b);
            let msg = if t.name.contains("quant_state") {
                format!(
                    "\n ours: {}\n bnb:  {}",
                    String::from_utf8_lossy(&t.data),
                    String::from_utf8_lossy(&s.data)
                )
            } else {
                String::new()
            };
            panic!(
                "{what}: bytes of {} differ ({} vs {} bytes, first difference at {first:?}){msg}",
                t.name,
                t.data.len(),
                s.data.len()
            );
        }
    }
}

/// Case names of bnb_codec.safetensors (`<case>.input`).
fn codec_cases(ts: &Tensors) -> Vec<String> {
    let cases: Vec<String> = ts
        .keys()
        .filter_map(|k| k.strip_suffix(".input").map(str::to_string))
        .collect();
    assert!(
        cases.len() >= 6,
        "expected at least 6 bnb codec cases, found {cases:?}"
    );
    cases
}

#[test]
fn bnb_codec_cases_decode_bit_exactly() {
    let ts = load_ref("bnb_codec.safetensors");
    for case in codec_cases(&ts) {
        let (view, state) = bnb_view(&ts, &format!("{case}.weight"));
        let want = &ts[&format!("{case}.dequant")];
        assert_eq!(want.shape, state.shape, "{case}: dequant shape");
        assert_bits_eq(&case, &view.to_f32(), &want.f32s());
        // a decode that starts mid-block and mid-byte agrees too
        let mut part = vec![0f32; view.numel.min(200) - 3];
        view.decode_into(3, &mut part);
        assert_bits_eq(
            &format!("{case} [3..]"),
            &part,
            &want.f32s()[3..3 + part.len()],
        );
    }
}

#[test]
fn bnb_codec_cases_quantize_byte_identically() {
    let ts = load_ref("bnb_codec.safetensors");
    for case in codec_cases(&ts) {
        let input = &ts[&format!("{case}.input")];
        let prefix = format!("{case}.weight");
        let (_, state) = bnb_view(&ts, &prefix);
        let opts = Bnb4Options {
            kind: if state.quant_type == "nf4" {
                Bnb4Kind::Nf4
            } else {
                Bnb4Kind::Fp4
            },
            blocksize: state.blocksize,
            input_dtype: match input.dtype {
                Dtype::BF16 => InputDType::BF16,
                Dtype::F32 => InputDType::F32,
                d => panic!("{case}: input dtype {d:?}"),
            },
            nested: state.nested_offset.is_some(),
            torch_threads: 1,
        };
        assert_eq!(input.shape, state.shape);
        let q = quantize_4bit(&input.f32s(), &input.shape, &opts);
        assert_same_bnb_tensors(&case, &q.tensors(&prefix), &ts);
        // and our own dequantization equals bnb's
        assert_bits_eq(
            &format!("{case} dequantize"),
            &q.dequantize(),
            &ts[&format!("{case}.dequant")].f32s(),
        );
    }
}

#[test]
fn code_tables_equal_the_stored_maps() {
    let ts = load_ref("bnb_codec.safetensors");
    assert_bits_eq(
        "nf4 code",
        &nf4_code(),
        &ts["nf4_nested_bf16.weight.quant_map"].f32s(),
    );
    assert_bits_eq(
        "fp4 code",
        &fp4_code(),
        &ts["fp4_plain_f32.weight.quant_map"].f32s(),
    );
    assert_bits_eq(
        "dynamic map",
        &dynamic_map(),
        &ts["nf4_nested_bf16.weight.nested_quant_map"].f32s(),
    );
}

/// Every bnb-quantized tensor of the two NF4 model directories decodes bit-exactly like bnb's
/// `dequantize_4bit(..., float32)` (FNV-1a-64 digest of the f32 bytes for all of them, full
/// values for a few).
#[test]
fn bnb_model_tensors_decode_bit_exactly() {
    let reference = load_ref("bnb_dequant.safetensors");
    let mut checked = BTreeMap::<String, usize>::new();
    for dir in ["tiny-unsloth-nf4", "tiny-fused-nf4"] {
        let ts = load_dir(dir);
        let prefixes: Vec<String> = ts
            .keys()
            .filter_map(|k| {
                k.strip_suffix(".quant_state.bitsandbytes__nf4")
                    .map(str::to_string)
            })
            .collect();
        for prefix in &prefixes {
            let key = format!("{dir}/{prefix}");
            let (view, state) = bnb_view(&ts, prefix);
            let shape: Vec<usize> = reference[&format!("{key}.shape")]
                .i64s()
                .iter()
                .map(|&d| d as usize)
                .collect();
            assert_eq!(shape, state.shape, "{key}: JSON shape");
            let dec = view.to_f32();
            let digest = reference[&format!("{key}.fnv1a64")].u64s()[0];
            if let Some(full) = reference.get(&key) {
                assert_bits_eq(&key, &dec, &full.f32s());
            }
            assert_eq!(
                fnv1a64(&f32_le(&dec)),
                digest,
                "{key}: decode differs from bnb's"
            );
            *checked.entry(dir.to_string()).or_default() += 1;
        }
    }
    // every reference entry was visited
    let n_ref = reference.keys().filter(|k| k.ends_with(".fnv1a64")).count();
    assert_eq!(checked.values().sum::<usize>(), n_ref, "{checked:?}");
    assert_eq!(checked["tiny-unsloth-nf4"], 57);
    assert_eq!(checked["tiny-fused-nf4"], 6);
}

/// Our quantizer, fed the BF16 weights of tiny-bf16, writes exactly the bytes bitsandbytes wrote
/// into tiny-unsloth-nf4 (per-expert Linears, nested) and tiny-fused-nf4 (whole stacks, nested in
/// layer 1, plain F32 absmax in layers 0 and 2).
#[test]
fn rust_quantizer_reproduces_the_nf4_model_dirs() {
    let base = load_dir("tiny-bf16");
    let unsloth = load_dir("tiny-unsloth-nf4");
    let mut n = 0;
    for prefix in unsloth
        .keys()
        .filter_map(|k| k.strip_suffix(".quant_state.bitsandbytes__nf4"))
    {
        let (values, shape) = if prefix.contains(".self_attn.") {
            let t = &base[prefix];
            (t.f32s(), t.shape.clone())
        } else {
            // model.layers.L.mlp.experts.{gate_up,down}_projs.E.weight = fused[E].T
            let parts: Vec<&str> = prefix.split('.').collect();
            let e: usize = parts[6].parse().unwrap();
            let fused_name = format!(
                "{}.{}",
                parts[..5].join("."),
                parts[5].trim_end_matches('s')
            );
            let t = &base[&fused_name];
            let (rows, cols) = (t.shape[1], t.shape[2]);
            let all = t.f32s();
            let m = &all[e * rows * cols..(e + 1) * rows * cols];
            (transpose(m, rows, cols), vec![cols, rows])
        };
        let q = quantize_nf4(&values, &shape, InputDType::BF16, true);
        assert_same_bnb_tensors(prefix, &q.tensors(prefix), &unsloth);
        n += 1;
    }
    assert_eq!(n, 57);

    let fused = load_dir("tiny-fused-nf4");
    for layer in 0..3 {
        for proj in ["gate_up_proj", "down_proj"] {
            let prefix = format!("model.layers.{layer}.mlp.experts.{proj}");
            let t = &base[&prefix];
            let opts = Bnb4Options {
                nested: layer == 1,
                ..Bnb4Options::nf4(InputDType::BF16)
            };
            let q = quantize_4bit(&t.f32s(), &t.shape, &opts);
            assert_same_bnb_tensors(&prefix, &q.tensors(&prefix), &fused);
        }
    }
}

/// The offset is torch's f32 mean: our emulation of torch's CPU sum (cascade over 8-lane
/// vectors, two-pass across threads from 32768 elements on) is bit-exact for every length and
/// thread count in the fixture.
#[test]
fn torch_sum_emulation_is_bit_exact() {
    let ts = load_ref("torch_mean.safetensors");
    let x = ts["x"].f32s();
    let mut n_cases = 0;
    for (k, v) in &ts {
        let Some(rest) = k.strip_prefix("sum_n") else {
            continue;
        };
        let (n, t) = rest.split_once("_t").unwrap();
        let (n, t): (usize, usize) = (n.parse().unwrap(), t.parse().unwrap());
        let got = torch_sum_f32(&x[..n], t);
        let want = v.f32s()[0];
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "sum of {n} with {t} threads: {got} vs {want}"
        );
        n_cases += 1;
    }
    assert!(n_cases >= 20);
}

// ---------------------------------------------------------------------------------------------
// MXFP4
// ---------------------------------------------------------------------------------------------

#[test]
fn mxfp4_decodes_like_transformers() {
    let ts = load_ref("mxfp4_decode.safetensors");
    let blocks = &ts["blocks"];
    let scales = &ts["scales"];
    let (e, rows, g) = (blocks.shape[0], blocks.shape[1], blocks.shape[2]);
    let cols = g * 32;
    assert_eq!(ts["decoded_out_in"].shape, vec![e, rows, cols]);
    assert_eq!(ts["decoded"].shape, vec![e, cols, rows]);
    let want = ts["decoded_out_in"].f32s();
    let want_t = ts["decoded"].f32s();
    let per_b = rows * cols / 2;
    let per_s = rows * cols / 32;
    for ex in 0..e {
        let m = Mxfp4Matrix::new(
            &blocks.data[ex * per_b..(ex + 1) * per_b],
            &scales.data[ex * per_s..(ex + 1) * per_s],
            rows,
            cols,
        )
        .unwrap();
        let got = m.to_f32();
        let w = &want[ex * rows * cols..(ex + 1) * rows * cols];
        assert_bits_eq(&format!("expert {ex}"), &got, w);
        // transformers' own [E, in, out] orientation
        let wt = &want_t[ex * rows * cols..(ex + 1) * rows * cols];
        assert_bits_eq(
            &format!("expert {ex} [in, out]"),
            &transpose(&got, rows, cols),
            wt,
        );
    }
}

/// The Rust encoder and the fixture script implement the same rule: quantizing tiny-bf16's
/// experts reproduces tiny-mxfp4's blocks and scales byte for byte.
#[test]
fn mxfp4_encoder_reproduces_the_fixture() {
    let base = load_dir("tiny-bf16");
    let mx = load_dir("tiny-mxfp4");
    for layer in 0..3 {
        for proj in ["gate_up_proj", "down_proj"] {
            let name = format!("model.layers.{layer}.mlp.experts.{proj}");
            let t = &base[&name];
            let (e, inp, out) = (t.shape[0], t.shape[1], t.shape[2]);
            let all = t.f32s();
            let mut blocks = Vec::new();
            let mut scales = Vec::new();
            for ex in 0..e {
                let w = transpose(&all[ex * inp * out..(ex + 1) * inp * out], inp, out);
                let (b, s) = quantize_mxfp4(&w, out, inp);
                blocks.extend(b);
                scales.extend(s);
            }
            let sb = &mx[&format!("{name}_blocks")];
            let ss = &mx[&format!("{name}_scales")];
            assert_eq!(sb.shape, vec![e, out, inp / 32, 16]);
            assert_eq!(ss.shape, vec![e, out, inp / 32]);
            assert!(blocks == sb.data, "{name}: blocks differ");
            assert!(scales == ss.data, "{name}: scales differ");
        }
    }
}
