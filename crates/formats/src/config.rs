//! The typed GPT-OSS configuration, read from a checkpoint's `config.json`.
//!
//! Every architecture value is taken from the file; nothing is assumed from the model's size. The
//! few facts that are not in `config.json` (the SwiGLU alpha, YaRN's `truncate = false`) are
//! constants of the architecture and documented where they are defined (spec: model.md §1, §4).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};

/// Whether a layer attends to all earlier tokens or to a sliding window of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    SlidingAttention,
    FullAttention,
}

/// YaRN RoPE scaling parameters (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub rope_type: String,
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    #[serde(default = "default_beta_fast")]
    pub beta_fast: f64,
    #[serde(default = "default_beta_slow")]
    pub beta_slow: f64,
    /// Recorded as found. GPT-OSS is always computed with `truncate = false` whatever this says
    /// (spec model.md §4: transformers defaults a missing field to `true`, which is wrong here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

fn default_beta_fast() -> f64 {
    32.0
}
fn default_beta_slow() -> f64 {
    1.0
}

/// The architecture of a GPT-OSS model (20b, 120b or a small test model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptOssConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_local_experts: usize,
    /// Experts per token (transformers' name); OpenAI's configs also carry `experts_per_token`,
    /// used when this one is absent.
    #[serde(default)]
    pub num_experts_per_tok: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts_per_token: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub sliding_window: usize,
    #[serde(default)]
    pub layer_types: Vec<LayerType>,
    pub swiglu_limit: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub initial_context_length: Option<usize>,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
    /// The quantization block as written by transformers (bitsandbytes or mxfp4), kept verbatim:
    /// decoding never depends on it (per-tensor detection, spec checkpoints.md §1.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

fn default_max_pos() -> usize {
    131072
}
fn default_true() -> bool {
    true
}

/// The constant `alpha` of GPT-OSS's clamped SwiGLU. It is not in `config.json`; transformers and
/// OpenAI's reference both hard-code 1.702 (spec model.md §2.4).
pub const SWIGLU_ALPHA: f32 = 1.702;

impl GptOssConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
        Self::from_json_str(&text).map_err(|problem| FormatError::Config {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// Parses and validates a config from JSON text; the error is a message without the path.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("gpt_oss") => {}
            Some(other) => {
                return Err(format!(
                    "not a GPT-OSS config: model_type is \"{other}\", expected \"gpt_oss\""
                ));
            }
            None => {
                return Err(
                    "not a GPT-OSS config: no \"model_type\" field (expected \"gpt_oss\")".into(),
                );
            }
        }
        let mut cfg: GptOssConfig =
            serde_json::from_value(value).map_err(|e| format!("invalid GPT-OSS config: {e}"))?;
        if cfg.num_experts_per_tok == 0 {
            cfg.num_experts_per_tok = cfg.experts_per_token.unwrap_or(0);
        }
        if cfg.layer_types.is_empty() {
            // transformers' default: even layers slide, odd layers attend fully (model.md §1).
            cfg.layer_types = (0..cfg.num_hidden_layers)
                .map(|i| {
                    if i % 2 == 0 {
                        LayerType::SlidingAttention
                    } else {
                        LayerType::FullAttention
                    }
                })
                .collect();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_local_experts", self.num_local_experts),
            (
                "num_experts_per_tok (or experts_per_token)",
                self.num_experts_per_tok,
            ),
            ("vocab_size", self.vocab_size),
            ("sliding_window", self.sliding_window),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("field \"{name}\" must be positive, found 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim must be even for RoPE, found {}",
                self.head_dim
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(format!(
                "num_experts_per_tok ({}) exceeds num_local_experts ({})",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(format!(
                "layer_types has {} entries, expected num_hidden_layers = {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.rope_scaling.rope_type != "yarn" {
            return Err(format!(
                "rope_scaling.rope_type is \"{}\", expected \"yarn\"",
                self.rope_scaling.rope_type
            ));
        }
        if self.tie_word_embeddings {
            return Err("tie_word_embeddings is true; GPT-OSS has a separate lm_head".into());
        }
        Ok(())
    }

    /// Width of the concatenated query heads (4096 for the real models).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads (512 for the real models).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Whether layer `layer` uses the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.layer_types[layer] == LayerType::SlidingAttention
    }

    /// Number of layers that attend to the full context.
    pub fn num_full_layers(&self) -> usize {
        self.layer_types
            .iter()
            .filter(|t| **t == LayerType::FullAttention)
            .count()
    }

    /// Bytes of bf16 K and V per token for the full-attention layers (the part of the KV cache
    /// that grows with context; sliding layers hold at most `sliding_window` tokens).
    pub fn kv_bytes_per_token_full(&self) -> usize {
        self.num_full_layers() * 2 * self.kv_dim() * 2
    }

    /// Bytes of bf16 K and V for the sliding layers' windows, per sequence.
    pub fn kv_bytes_sliding_window(&self) -> usize {
        (self.num_hidden_layers - self.num_full_layers())
            * 2
            * self.kv_dim()
            * 2
            * self.sliding_window
    }

    /// A short human name: "gpt-oss-20b", "gpt-oss-120b" or "gpt-oss (custom: …)".
    pub fn size_name(&self) -> String {
        match (
            self.num_hidden_layers,
            self.num_local_experts,
            self.hidden_size,
        ) {
            (24, 32, 2880) => "gpt-oss-20b".into(),
            (36, 128, 2880) => "gpt-oss-120b".into(),
            (l, e, h) => format!("gpt-oss (custom: {l} layers, {e} experts, hidden {h})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const CONFIG_20B: &str = r#"{
      "architectures": ["GptOssForCausalLM"], "attention_bias": true, "attention_dropout": 0.0,
      "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
      "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
      "intermediate_size": 2880,
      "layer_types": ["sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention",
        "sliding_attention","full_attention","sliding_attention","full_attention"],
      "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
      "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
      "num_local_experts": 32, "output_router_logits": false, "pad_token_id": 199999,
      "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
        "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
      "rms_norm_eps": 1e-05,
      "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": false},
      "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
      "swiglu_limit": 7.0, "tie_word_embeddings": false, "transformers_version": "4.55.0.dev0",
      "use_cache": true, "vocab_size": 201088
    }"#;

    #[test]
    fn parses_the_openai_20b_config() {
        let cfg = GptOssConfig::from_json_str(CONFIG_20B).unwrap();
        assert_eq!(cfg.size_name(), "gpt-oss-20b");
        assert_eq!(cfg.q_dim(), 4096);
        assert_eq!(cfg.kv_dim(), 512);
        assert!(cfg.is_sliding(0) && !cfg.is_sliding(1));
        assert_eq!(cfg.num_full_layers(), 12);
        assert_eq!(cfg.num_experts_per_tok, 4);
        assert_eq!(cfg.rope_scaling.truncate, Some(false));
        // 12 full layers * (K + V) * 512 * 2 bytes
        assert_eq!(cfg.kv_bytes_per_token_full(), 12 * 2 * 512 * 2);
    }

    #[test]
    fn rejects_other_models_with_a_clear_message() {
        let err = GptOssConfig::from_json_str(r#"{"model_type": "llama"}"#).unwrap_err();
        assert!(
            err.contains("not a GPT-OSS config") && err.contains("llama"),
            "{err}"
        );
        let err = GptOssConfig::from_json_str("{").unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
        let broken = CONFIG_20B.replace("\"hidden_size\": 2880,", "");
        let err = GptOssConfig::from_json_str(&broken).unwrap_err();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn default_layer_types_alternate() {
        let no_types = CONFIG_20B.replace("\"layer_types\"", "\"unused_layer_types\"");
        let cfg = GptOssConfig::from_json_str(&no_types).unwrap();
        assert!(cfg.is_sliding(22) && !cfg.is_sliding(23));
    }
}
