//! Random-weight checkpoints of the real on-disk formats (`gptoss synth`).
//!
//! Real weights cannot be downloaded where this project is built and tested, so full-size
//! performance is measured on synthetic checkpoints with exactly the real names, dtypes, shapes,
//! config and index. Values are uniform random at the scale of trained weights (std ≈ 0.02), so
//! the numbers that flow are realistic in magnitude; the text the model writes is noise.
//! Generation is deterministic for a seed (each tensor chunk has its own seed), parallel, and
//! streamed to disk a few tensor groups at a time.

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

use crate::checkpoint::DType;
use crate::codec::{mxfp4_quantize, quantize};
use crate::config::GptOssConfig;
use crate::error::{FormatError, Result};
use crate::writer::{
    OwnedTensor, ShardNaming, TensorGroup, WriteOptions, WriteSummary, write_checkpoint,
};

/// Model sizes `synth` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// gpt-oss-20b: 24 layers, 32 experts.
    Gpt20b,
    /// gpt-oss-120b: 36 layers, 128 experts.
    Gpt120b,
    /// A tiny model with the real vocabulary (the bundled demo model): 2 layers, 4 experts.
    Tiny,
    /// The smallest valid model (vocab 512, 2 layers, 4 experts), for tests.
    Micro,
}

/// On-disk layouts `synth` (and `convert`) can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthLayout {
    /// Unsloth split layout: NF4 (double quant) experts, bf16 attention/router/embeddings/lm_head
    /// (as Unsloth's dynamic quants leave them), f32 norms.
    UnslothNf4,
    /// OpenAI's MXFP4 experts, everything else bf16.
    Mxfp4,
    /// transformers' fused bf16 layout.
    Bf16,
}

impl SynthLayout {
    /// Parses the CLI names `unsloth-nf4`, `mxfp4`, `bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "unsloth-nf4" => Some(SynthLayout::UnslothNf4),
            "mxfp4" => Some(SynthLayout::Mxfp4),
            "bf16" | "fused-bf16" => Some(SynthLayout::Bf16),
            _ => None,
        }
    }
}

/// The `config.json` text of a preset (real values for 20b/120b, from spec checkpoints.md §3.1).
pub fn preset_config(preset: Preset) -> serde_json::Value {
    let (layers, experts, hidden, inter, heads, kv, head_dim, vocab, topk) = match preset {
        Preset::Gpt20b => (24, 32, 2880, 2880, 64, 8, 64, 201088, 4),
        Preset::Gpt120b => (36, 128, 2880, 2880, 64, 8, 64, 201088, 4),
        Preset::Tiny => (2, 4, 64, 64, 4, 2, 16, 201088, 2),
        Preset::Micro => (2, 4, 64, 64, 4, 2, 16, 512, 2),
    };
    let layer_types: Vec<&str> = (0..layers)
        .map(|i| {
            if i % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    serde_json::json!({
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": true,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": topk,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_types": layer_types,
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": heads,
        "num_experts_per_tok": topk,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "num_local_experts": experts,
        "output_router_logits": false,
        "pad_token_id": 199999,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": vocab
    })
}

/// The `quantization_config` block written for a layout (spec checkpoints.md §1.7, §3.1).
pub fn quantization_config(layout: SynthLayout) -> Option<serde_json::Value> {
    match layout {
        SynthLayout::UnslothNf4 => Some(serde_json::json!({
            "_load_in_4bit": true, "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": true,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": ["lm_head", "multi_modal_projector", "merger", "modality_projection", "router", "self_attn"],
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true, "load_in_8bit": false,
            "quant_method": "bitsandbytes"
        })),
        SynthLayout::Mxfp4 => Some(serde_json::json!({
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
            "quant_method": "mxfp4"
        })),
        SynthLayout::Bf16 => None,
    }
}

/// Deterministic uniform values in `[-a, a]` (std `a/√3`), generated in parallel chunks that
/// each have their own seed, so the result does not depend on the thread count.
pub fn random_uniform(seed: u64, name: &str, n: usize, a: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let base = seed ^ fnv1a(name.as_bytes());
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = SmallRng::seed_from_u64(
                base.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            );
            for v in chunk {
                *v = (rng.random::<f32>() * 2.0 - 1.0) * a;
            }
        });
    out
}

/// A stable 64-bit hash of a name (FNV-1a), to derive per-tensor seeds.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Uniform half-width for a given standard deviation.
fn half_width(std: f32) -> f32 {
    std * 3f32.sqrt()
}

/// The tensors of a bitsandbytes NF4 (double-quant) `Linear4bit` weight `prefix` made from
/// logical `[rows, cols]` values that are exact in bf16 (as a bf16 checkpoint quantized by
/// Unsloth would be).
pub fn nf4_linear_tensors(
    prefix: &str,
    values: &[f32],
    rows: usize,
    cols: usize,
) -> Vec<OwnedTensor> {
    let q = quantize::quantize_nf4(values, &[rows, cols], quantize::InputDType::BF16, true);
    q.tensors(prefix)
        .into_iter()
        .map(|t| OwnedTensor::new(t.name, t.dtype, t.shape, t.data))
        .collect()
}

/// The six tensor names a quantized `Linear4bit` weight `prefix` is stored as.
pub fn nf4_names(prefix: &str) -> Vec<String> {
    [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    ]
    .iter()
    .map(|s| format!("{prefix}{s}"))
    .collect()
}

/// Rounds values to bf16 precision in place (so they are exactly what a bf16 checkpoint holds).
pub fn round_to_bf16(values: &mut [f32]) {
    values
        .par_iter_mut()
        .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
}

struct Plan {
    seed: u64,
    cfg: Arc<GptOssConfig>,
    layout: SynthLayout,
    groups: Vec<TensorGroup<'static>>,
}

impl Plan {
    fn dense(&mut self, name: String, shape: Vec<usize>, dtype: DType, a: f32, center: f32) {
        let n: usize = shape.iter().product();
        let seed = self.seed;
        self.groups.push(TensorGroup::new(
            vec![name.clone()],
            (n * dtype.size()) as u64,
            move || {
                let mut v = random_uniform(seed, &name, n, a);
                if center != 0.0 {
                    v.par_iter_mut().for_each(|x| *x += center);
                }
                Ok(vec![match dtype {
                    DType::F32 => OwnedTensor::f32(name, shape, &v),
                    _ => OwnedTensor::bf16(name, shape, &v),
                }])
            },
        ));
    }

    fn nf4(&mut self, prefix: String, rows: usize, cols: usize) {
        let seed = self.seed;
        let n = rows * cols;
        let names = nf4_names(&prefix);
        let approx = (n / 2 + n / 64 + n / 64 / 256 * 4 + 1300) as u64;
        self.groups.push(TensorGroup::new(names, approx, move || {
            let mut v = random_uniform(seed, &prefix, n, half_width(0.02));
            round_to_bf16(&mut v);
            Ok(nf4_linear_tensors(&prefix, &v, rows, cols))
        }));
    }

    fn mxfp4_stack(&mut self, base: String, experts: usize, rows: usize, cols: usize) {
        let seed = self.seed;
        let g = cols / 32;
        let names = vec![format!("{base}_blocks"), format!("{base}_scales")];
        let approx = (experts * rows * (cols / 2 + g)) as u64;
        self.groups.push(TensorGroup::new(names, approx, move || {
            let per: Vec<(Vec<u8>, Vec<u8>)> = (0..experts)
                .into_par_iter()
                .map(|e| {
                    let v = random_uniform(
                        seed,
                        &format!("{base}[{e}]"),
                        rows * cols,
                        half_width(0.02),
                    );
                    mxfp4_quantize::quantize_mxfp4(&v, rows, cols)
                })
                .collect();
            let (mut blocks, mut scales) = (Vec::new(), Vec::new());
            for (b, s) in per {
                blocks.extend_from_slice(&b);
                scales.extend_from_slice(&s);
            }
            Ok(vec![
                OwnedTensor::new(
                    format!("{base}_blocks"),
                    DType::U8,
                    vec![experts, rows, g, 16],
                    blocks,
                ),
                OwnedTensor::new(
                    format!("{base}_scales"),
                    DType::U8,
                    vec![experts, rows, g],
                    scales,
                ),
            ])
        }));
    }

    fn build(mut self) -> Vec<TensorGroup<'static>> {
        let c = self.cfg.clone();
        let (h, i, e, v) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_local_experts,
            c.vocab_size,
        );
        let w = half_width(0.02);
        let norm_dtype = if self.layout == SynthLayout::UnslothNf4 {
            DType::F32
        } else {
            DType::BF16
        };
        self.dense(
            "model.embed_tokens.weight".into(),
            vec![v, h],
            DType::BF16,
            w,
            0.0,
        );
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            self.dense(
                format!("{p}.input_layernorm.weight"),
                vec![h],
                norm_dtype,
                0.2,
                1.0,
            );
            self.dense(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                norm_dtype,
                0.2,
                1.0,
            );
            for (name, rows, cols) in [
                ("q_proj", c.q_dim(), h),
                ("k_proj", c.kv_dim(), h),
                ("v_proj", c.kv_dim(), h),
                ("o_proj", h, c.q_dim()),
            ] {
                self.dense(
                    format!("{p}.self_attn.{name}.weight"),
                    vec![rows, cols],
                    DType::BF16,
                    w,
                    0.0,
                );
                self.dense(
                    format!("{p}.self_attn.{name}.bias"),
                    vec![rows],
                    DType::BF16,
                    w,
                    0.0,
                );
            }
            self.dense(
                format!("{p}.self_attn.sinks"),
                vec![c.num_attention_heads],
                DType::BF16,
                1.0,
                0.0,
            );
            let router = if self.layout == SynthLayout::UnslothNf4 {
                "router.linear"
            } else {
                "router"
            };
            self.dense(
                format!("{p}.mlp.{router}.weight"),
                vec![e, h],
                DType::BF16,
                w,
                0.0,
            );
            self.dense(
                format!("{p}.mlp.{router}.bias"),
                vec![e],
                DType::BF16,
                w,
                0.0,
            );
            let x = format!("{p}.mlp.experts");
            match self.layout {
                SynthLayout::UnslothNf4 => {
                    for ex in 0..e {
                        self.nf4(format!("{x}.gate_up_projs.{ex}.weight"), 2 * i, h);
                        self.dense(
                            format!("{x}.gate_up_projs.{ex}.bias"),
                            vec![2 * i],
                            DType::BF16,
                            w,
                            0.0,
                        );
                        self.nf4(format!("{x}.down_projs.{ex}.weight"), h, i);
                        self.dense(
                            format!("{x}.down_projs.{ex}.bias"),
                            vec![h],
                            DType::BF16,
                            w,
                            0.0,
                        );
                    }
                }
                SynthLayout::Mxfp4 => {
                    self.mxfp4_stack(format!("{x}.gate_up_proj"), e, 2 * i, h);
                    self.dense(
                        format!("{x}.gate_up_proj_bias"),
                        vec![e, 2 * i],
                        DType::BF16,
                        w,
                        0.0,
                    );
                    self.mxfp4_stack(format!("{x}.down_proj"), e, h, i);
                    self.dense(
                        format!("{x}.down_proj_bias"),
                        vec![e, h],
                        DType::BF16,
                        w,
                        0.0,
                    );
                }
                SynthLayout::Bf16 => {
                    self.dense(
                        format!("{x}.gate_up_proj"),
                        vec![e, h, 2 * i],
                        DType::BF16,
                        w,
                        0.0,
                    );
                    self.dense(
                        format!("{x}.gate_up_proj_bias"),
                        vec![e, 2 * i],
                        DType::BF16,
                        w,
                        0.0,
                    );
                    self.dense(format!("{x}.down_proj"), vec![e, i, h], DType::BF16, w, 0.0);
                    self.dense(
                        format!("{x}.down_proj_bias"),
                        vec![e, h],
                        DType::BF16,
                        w,
                        0.0,
                    );
                }
            }
        }
        self.dense("model.norm.weight".into(), vec![h], norm_dtype, 0.2, 1.0);
        self.dense("lm_head.weight".into(), vec![v, h], DType::BF16, w, 0.0);
        self.groups
    }
}

/// The full `config.json` for a preset and layout.
pub fn synth_config_json(preset: Preset, layout: SynthLayout) -> serde_json::Value {
    let mut cfg = preset_config(preset);
    if let Some(q) = quantization_config(layout) {
        cfg["quantization_config"] = q;
    }
    cfg
}

/// Writes a random-weight checkpoint of `preset` in `layout` to `out`.
pub fn synth(
    preset: Preset,
    layout: SynthLayout,
    seed: u64,
    out: &std::path::Path,
    mut opts: WriteOptions,
) -> Result<WriteSummary> {
    let cfg_json = synth_config_json(preset, layout);
    let text = serde_json::to_string_pretty(&cfg_json).expect("json");
    let cfg = GptOssConfig::from_json_str(&text).map_err(FormatError::Invalid)?;
    if layout == SynthLayout::Mxfp4 {
        opts.naming = ShardNaming::ZeroBased;
        opts.force_index = true;
    }
    let plan = Plan {
        seed,
        cfg: Arc::new(cfg),
        layout,
        groups: Vec::new(),
    };
    write_checkpoint(out, &text, plan.build(), opts)
}

/// Estimated bytes of a synthetic checkpoint (for progress bars).
pub fn estimated_bytes(preset: Preset, layout: SynthLayout) -> u64 {
    let cfg = GptOssConfig::from_json_str(&synth_config_json(preset, layout).to_string())
        .expect("preset config is valid");
    let plan = Plan {
        seed: 0,
        cfg: Arc::new(cfg),
        layout,
        groups: Vec::new(),
    };
    plan.build().iter().map(|g| g.approx_bytes).sum()
}

/// Version of the bundled demo model; bump when its recipe changes so caches are rebuilt.
pub const DEMO_MODEL_VERSION: &str = "demo-tiny-v1";

/// The bundled demo model: a tiny random-weight GPT-OSS (real 201,088-token vocabulary, 2 layers)
/// in the Unsloth NF4 layout, synthesized with seed 0 into `$GPTOSS_CACHE`, else
/// `$XDG_CACHE_HOME/gptoss`, else `~/.cache/gptoss` on first use ([`tiny_model_in`]).
/// It produces nonsense: it exists so the commands work on a fresh machine.
pub fn demo_model_dir() -> Result<std::path::PathBuf> {
    use std::path::PathBuf;
    let base = std::env::var_os("GPTOSS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("gptoss")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("gptoss"))
        })
        .ok_or_else(|| {
            FormatError::NotFound(
                "no cache directory for the demo model: set GPTOSS_CACHE or HOME".into(),
            )
        })?;
    tiny_model_in(&base, DEMO_MODEL_VERSION)
}

/// The demo model's recipe ([`Preset::Tiny`], Unsloth NF4, seed 0) in `base/name`: synthesized
/// there on first use (about 50 MB, well under a second), reused once `config.json` exists.
/// Written to a temporary directory and renamed, so concurrent first uses (processes, test
/// binaries) are safe.
pub fn tiny_model_in(base: &std::path::Path, name: &str) -> Result<std::path::PathBuf> {
    let dir = base.join(name);
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(base).map_err(|e| FormatError::io(base, e))?;
    let tmp = base.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    synth(
        Preset::Tiny,
        SynthLayout::UnslothNf4,
        0,
        &tmp,
        WriteOptions::default(),
    )?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // another process finished first: use theirs
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(FormatError::io(&dir, e)),
    }
}
