//! Test support: tiny random GPT-OSS checkpoints (dense F32, Unsloth-split or fused layout), so
//! the reference and the CPU backend can be exercised without downloading anything, the
//! repository's fixtures and the error measure results are compared with.

use std::path::{Path, PathBuf};

/// The repository's `fixtures/` folder (tiny checkpoints of every layout and reference outputs,
/// made by `scripts/make_fixtures.py`).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// `max|got - want| / max|want|`.
pub fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()))
        / scale
}

/// Expert layout of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyLayout {
    /// `experts.gate_up_projs.{e}` Linears (`[out, in]`).
    Split,
    /// transformers' fused `experts.gate_up_proj` `[E, in, out]` stacks.
    Fused,
}

/// The config of the synthetic model: 3 layers (sliding, full, sliding), window 4, YaRN as in
/// the real models, small widths.
pub fn tiny_config_json() -> String {
    r#"{
  "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
  "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 3,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "num_local_experts": 6, "num_experts_per_tok": 3, "vocab_size": 97,
  "rms_norm_eps": 1e-05, "rope_theta": 150000,
  "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                   "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false},
  "sliding_window": 4,
  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
  "swiglu_limit": 7.0, "max_position_embeddings": 131072, "attention_bias": true,
  "tie_word_embeddings": false
}"#
    .to_string()
}

struct Rng(u64);

impl Rng {
    /// Uniform in [-1, 1) (splitmix64).
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn fill(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

/// Random F32 tensors in insertion order.
struct Tensors {
    rng: Rng,
    list: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Tensors {
    /// Uniform in `offset ± scale`.
    fn rand(&mut self, name: impl Into<String>, shape: &[usize], scale: f32, offset: f32) {
        let values = self.rng.fill(shape.iter().product(), scale, offset);
        self.push(name, shape, values);
    }

    fn push(&mut self, name: impl Into<String>, shape: &[usize], values: Vec<f32>) {
        self.list.push((name.into(), shape.to_vec(), values));
    }
}

/// Writes `config.json` and `model.safetensors` of a random tiny model into `dir`.
pub fn write_tiny_checkpoint(dir: &Path, layout: TinyLayout, seed: u64) -> std::io::Result<()> {
    let cfg = gptoss_formats::GptOssConfig::from_json_str(&tiny_config_json())
        .expect("valid tiny config");
    let (h, i, e) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_local_experts,
    );
    let (qd, kvd, v) = (cfg.q_dim(), cfg.kv_dim(), cfg.vocab_size);
    let mut t = Tensors {
        rng: Rng(seed),
        list: Vec::new(),
    };
    t.rand("model.embed_tokens.weight", &[v, h], 1.0, 0.0);
    t.rand("lm_head.weight", &[v, h], 0.3, 0.0);
    t.rand("model.norm.weight", &[h], 0.2, 1.0);
    let ws = 1.5 / (h as f32).sqrt();
    // Large enough that the SwiGLU clamps at ±7 are reached.
    let es = 8.0 / (h as f32).sqrt();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.rand(format!("{p}.input_layernorm.weight"), &[h], 0.2, 1.0);
        t.rand(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.2,
            1.0,
        );
        for (n, rows, cols) in [
            ("q_proj", qd, h),
            ("k_proj", kvd, h),
            ("v_proj", kvd, h),
            ("o_proj", h, qd),
        ] {
            t.rand(format!("{p}.self_attn.{n}.weight"), &[rows, cols], ws, 0.0);
            t.rand(format!("{p}.self_attn.{n}.bias"), &[rows], 0.1, 0.0);
        }
        t.rand(
            format!("{p}.self_attn.sinks"),
            &[cfg.num_attention_heads],
            1.0,
            0.0,
        );
        t.rand(format!("{p}.mlp.router.weight"), &[e, h], ws, 0.0);
        t.rand(format!("{p}.mlp.router.bias"), &[e], 0.2, 0.0);
        // Per expert [out, in] (Split); Fused stores the same values transposed and stacked, so
        // both layouts of one seed are the same model.
        let experts: Vec<_> = (0..e)
            .map(|_| {
                let gu = t.rng.fill(2 * i * h, es, 0.0);
                let gub = t.rng.fill(2 * i, 0.5, 0.0);
                let dn = t.rng.fill(h * i, ws, 0.0);
                let dnb = t.rng.fill(h, 0.1, 0.0);
                (gu, gub, dn, dnb)
            })
            .collect();
        let q = format!("{p}.mlp.experts");
        match layout {
            TinyLayout::Split => {
                for (x, (gu, gub, dn, dnb)) in experts.into_iter().enumerate() {
                    t.push(format!("{q}.gate_up_projs.{x}.weight"), &[2 * i, h], gu);
                    t.push(format!("{q}.gate_up_projs.{x}.bias"), &[2 * i], gub);
                    t.push(format!("{q}.down_projs.{x}.weight"), &[h, i], dn);
                    t.push(format!("{q}.down_projs.{x}.bias"), &[h], dnb);
                }
            }
            TinyLayout::Fused => {
                let (mut gu_s, mut gub_s, mut dn_s, mut dnb_s) = (vec![], vec![], vec![], vec![]);
                for (gu, gub, dn, dnb) in experts {
                    gu_s.extend(transpose(&gu, 2 * i, h));
                    gub_s.extend(gub);
                    dn_s.extend(transpose(&dn, h, i));
                    dnb_s.extend(dnb);
                }
                t.push(format!("{q}.gate_up_proj"), &[e, h, 2 * i], gu_s);
                t.push(format!("{q}.gate_up_proj_bias"), &[e, 2 * i], gub_s);
                t.push(format!("{q}.down_proj"), &[e, i, h], dn_s);
                t.push(format!("{q}.down_proj_bias"), &[e, h], dnb_s);
            }
        }
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), tiny_config_json())?;
    std::fs::write(dir.join("model.safetensors"), safetensors_f32(&t.list))
}

/// Serializes F32 tensors in the safetensors format.
fn safetensors_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        for x in values {
            data.extend_from_slice(&x.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    out
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}
