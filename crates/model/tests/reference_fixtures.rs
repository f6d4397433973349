//! The reference forward against transformers 5.23 `GptOssForCausalLM` (fp32, eager) run on the
//! exactly decoded weights of each tiny fixture checkpoint (`fixtures/`, made by
//! `scripts/make_fixtures.py`): single expert, whole MoE block, decoder layers 0 and 1, and the
//! full model (sequences of 3, 11 and 19 tokens against a window of 4, and positions from 5000),
//! for every storage layout. Tolerance: max|Δ| / max|ref| ≤ 1e-4.

use gptoss_formats::{Checkpoint, ModelWeights};
use gptoss_model::reference::ReferenceModel;
use gptoss_model::reference::testing::{fixtures_dir, max_rel};
use safetensors::{Dtype, SafeTensors};

const TOL: f64 = 1e-4;

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load(name: &str) -> Self {
        let path = fixtures_dir()
            .join("reference")
            .join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Reference { bytes }
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn i64(&self, name: &str) -> Vec<i64> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn tokens(&self, i: usize) -> Vec<u32> {
        self.i64(&format!("tokens_{i}"))
            .into_iter()
            .map(|t| t as u32)
            .collect()
    }
}

fn check(layout: &str, what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    let err = max_rel(got, want);
    eprintln!("{layout:18} {what:28} max rel {err:.2e}");
    assert!(
        err <= tol,
        "{layout}: {what}: max|Δ|/max|ref| = {err:e} > {tol:e}"
    );
    err
}

fn run_layout(name: &str) {
    let ckpt = Checkpoint::open(&fixtures_dir().join(name)).unwrap();
    let model = ReferenceModel::new(ModelWeights::new(&ckpt).unwrap());
    let r = Reference::load(name);
    let h = model.config().hidden_size;
    let vocab = model.config().vocab_size;

    // Level 1: single experts and the MoE block (router + experts, applied to the input as is).
    let x = r.f32("expert_input");
    for e in [0, 3] {
        let got = model.expert_forward(0, e, &x).unwrap();
        check(
            name,
            &format!("expert L0 E{e}"),
            &got,
            &r.f32(&format!("expert_out_L0_E{e}")),
            TOL,
        );
    }
    check(
        name,
        "moe L0",
        &model.moe_forward(0, &x).unwrap(),
        &r.f32("moe_out_L0"),
        TOL,
    );

    // Level 2: decoder layers 0 (sliding) and 1 (full) on 11 rows at positions 0..10.
    let x = r.f32("block_input");
    let t = x.len() / h;
    let positions: Vec<usize> = (0..t).collect();
    for l in [0, 1] {
        let got = model
            .layer_forward(l, &x, &positions, &mut model.new_cache())
            .unwrap();
        check(
            name,
            &format!("layer {l}"),
            &got,
            &r.f32(&format!("block_out_{l}")),
            TOL,
        );
    }

    // Level 3: the full model.
    for i in 0..4 {
        let tokens = r.tokens(i);
        let positions: Vec<usize> = if i == 3 {
            r.i64("positions_3")
                .into_iter()
                .map(|p| p as usize)
                .collect()
        } else {
            (0..tokens.len()).collect()
        };
        let got = model
            .forward(&tokens, &positions, &mut model.new_cache())
            .unwrap();
        let want = r.f32(&format!("logits_{i}"));
        check(
            name,
            &format!("logits_{i} (T={}, from {})", tokens.len(), positions[0]),
            &got,
            &want,
            TOL,
        );

        // Incremental decoding (prefill of 2, then one token at a time) = one full forward.
        let mut cache = model.new_cache();
        let mut inc = model
            .forward(&tokens[..2], &positions[..2], &mut cache)
            .unwrap();
        for j in 2..tokens.len() {
            inc.extend(
                model
                    .forward(&tokens[j..j + 1], &positions[j..j + 1], &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(inc.len(), tokens.len() * vocab);
        check(
            name,
            &format!("logits_{i} incremental vs full"),
            &inc,
            &got,
            1e-5,
        );
    }
}

#[test]
fn tiny_bf16_matches_transformers() {
    run_layout("tiny-bf16");
}

#[test]
fn tiny_mxfp4_matches_transformers() {
    run_layout("tiny-mxfp4");
}

#[test]
fn tiny_unsloth_nf4_matches_transformers() {
    run_layout("tiny-unsloth-nf4");
}

#[test]
fn tiny_fused_nf4_matches_transformers() {
    run_layout("tiny-fused-nf4");
}
