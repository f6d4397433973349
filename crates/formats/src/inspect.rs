//! `gptoss inspect`: what a checkpoint holds and whether it will load, from the headers alone.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::weights::{Matrix, probe};

/// A summary of a checkpoint, printable as text or JSON.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub dir: String,
    pub model: String,
    pub layout: Option<String>,
    pub config: ConfigSummary,
    pub shards: usize,
    pub tensors: usize,
    /// Bytes of all tensor data in the files.
    pub file_bytes: u64,
    /// Bytes the weights take on a GPU when uploaded as stored (packed, no dequantization).
    pub gpu_weight_bytes: u64,
    /// bf16 K+V bytes per token of context (full-attention layers).
    pub kv_bytes_per_token: u64,
    /// bf16 K+V bytes per sequence for the sliding-window layers (fixed, window-sized).
    pub kv_bytes_sliding_per_sequence: u64,
    /// Groups of tensors by role and storage, e.g. "experts.gate_up" → "NF4+dq [5760, 2880]" × 768.
    pub groups: Vec<TensorGroupSummary>,
    pub problems: Vec<String>,
    pub unused_tensors: Vec<String>,
}

/// The architecture values that matter to a user.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    pub layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub experts: usize,
    pub experts_per_token: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub sliding_window: usize,
    pub max_position_embeddings: usize,
    pub quant_method: Option<String>,
}

/// One line of the tensor table.
#[derive(Debug, Clone, Serialize)]
pub struct TensorGroupSummary {
    pub role: String,
    pub storage: String,
    pub shape: Vec<usize>,
    pub count: usize,
    pub bytes: u64,
}

impl InspectReport {
    /// Builds the report; never fails once the checkpoint is open (problems are listed).
    pub fn build(ckpt: &Checkpoint) -> Self {
        let c = ckpt.config();
        let report = probe(ckpt);
        let mut groups: BTreeMap<(String, String, Vec<usize>), (usize, u64)> = BTreeMap::new();
        let mut add = |role: &str, m: &Matrix<'_>| {
            let e = groups
                .entry((role.to_string(), m.kind(), vec![m.rows, m.cols]))
                .or_default();
            e.0 += 1;
            e.1 += m.storage_bytes() as u64;
        };
        if let Some(w) = &report.weights {
            add("embed_tokens", &w.embed);
            add("lm_head", &w.lm_head);
            for l in &w.layers {
                add("attn.q_proj", &l.q.weight);
                add("attn.k_proj", &l.k.weight);
                add("attn.v_proj", &l.v.weight);
                add("attn.o_proj", &l.o.weight);
                add("router", &l.router.weight);
                for e in &l.experts {
                    add("experts.gate_up", &e.gate_up.weight);
                    add("experts.down", &e.down.weight);
                }
            }
        }
        let unused: u64 = report
            .unused
            .iter()
            .filter_map(|n| ckpt.get(n))
            .map(|t| t.bytes.len() as u64)
            .sum();
        InspectReport {
            dir: ckpt.dir().display().to_string(),
            model: c.size_name(),
            layout: report.layout.map(|l| l.name().to_string()),
            config: ConfigSummary {
                layers: c.num_hidden_layers,
                hidden_size: c.hidden_size,
                intermediate_size: c.intermediate_size,
                experts: c.num_local_experts,
                experts_per_token: c.num_experts_per_tok,
                attention_heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                vocab_size: c.vocab_size,
                sliding_window: c.sliding_window,
                max_position_embeddings: c.max_position_embeddings,
                quant_method: c
                    .quantization_config
                    .as_ref()
                    .and_then(|q| q.get("quant_method"))
                    .and_then(|m| m.as_str())
                    .map(String::from),
            },
            shards: ckpt.shard_paths().count(),
            tensors: ckpt.names().count(),
            file_bytes: ckpt.total_bytes(),
            gpu_weight_bytes: ckpt.total_bytes() - unused,
            kv_bytes_per_token: c.kv_bytes_per_token_full() as u64,
            kv_bytes_sliding_per_sequence: c.kv_bytes_sliding_window() as u64,
            groups: groups
                .into_iter()
                .map(
                    |((role, storage, shape), (count, bytes))| TensorGroupSummary {
                        role,
                        storage,
                        shape,
                        count,
                        bytes,
                    },
                )
                .collect(),
            problems: report.problems.iter().map(|p| p.to_string()).collect(),
            unused_tensors: report.unused,
        }
    }

    /// Whether the checkpoint maps without problems.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The human-readable form.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let gb = |b: u64| b as f64 / 1e9;
        let c = &self.config;
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.dir);
        let _ = writeln!(
            s,
            "  model      {}  (layout: {})",
            self.model,
            self.layout.as_deref().unwrap_or("unknown")
        );
        let _ = writeln!(
            s,
            "  config     {} layers, hidden {}, {} experts (top-{}), {} q / {} kv heads × {}, vocab {}, window {}, context {}",
            c.layers,
            c.hidden_size,
            c.experts,
            c.experts_per_token,
            c.attention_heads,
            c.kv_heads,
            c.head_dim,
            c.vocab_size,
            c.sliding_window,
            c.max_position_embeddings
        );
        let _ = writeln!(
            s,
            "  files      {} shard(s), {} tensors, {:.3} GB",
            self.shards,
            self.tensors,
            gb(self.file_bytes)
        );
        let _ = writeln!(
            s,
            "  GPU memory {:.3} GB of weights (kept packed)",
            gb(self.gpu_weight_bytes)
        );
        let _ = writeln!(
            s,
            "  KV cache   {:.1} KiB per token (full layers, bf16) + {:.2} MiB per sequence (sliding windows)",
            self.kv_bytes_per_token as f64 / 1024.0,
            self.kv_bytes_sliding_per_sequence as f64 / (1 << 20) as f64
        );
        if !self.groups.is_empty() {
            let _ = writeln!(s, "  tensors");
            for g in &self.groups {
                let _ = writeln!(
                    s,
                    "    {:<16} {:>5} × {:<7} {:<14} {:>10.3} GB",
                    g.role,
                    g.count,
                    g.storage,
                    format!("{:?}", g.shape),
                    gb(g.bytes)
                );
            }
        }
        if !self.unused_tensors.is_empty() {
            let _ = writeln!(
                s,
                "  unused     {} tensor(s), e.g. {}",
                self.unused_tensors.len(),
                self.unused_tensors[0]
            );
        }
        if self.problems.is_empty() {
            let _ = writeln!(s, "  problems   none");
        } else {
            let _ = writeln!(s, "  problems   {}", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(s, "    - {p}");
            }
        }
        s
    }
}
