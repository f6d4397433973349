//! # The f32 reference forward pass of GPT-OSS
//!
//! A direct, readable transcription of the forward pass in `shared/spec/model.md` §2 (and of
//! OpenAI's `gpt_oss/torch/model.py`), computed entirely in f32 from the *exactly* decoded stored
//! weights (NF4 code × absmax, MXFP4, bf16, … with no intermediate bf16 rounding). It is the
//! numerical yardstick for every accelerated backend, and the engine's CPU backend.
//!
//! Weights are never materialized: each matmul decodes one weight row (or one column range of a
//! fused stack) at a time into a thread-local buffer ([`linear`]), so a 20b checkpoint runs in the
//! memory of its mapped files plus activations. Work is spread over threads with rayon.
//!
//! Pieces, in the order of a decoder layer:
//! - [`linear`]: `y = x @ W.T + b` over any stored [`Matrix`](gptoss_formats::Matrix);
//! - [`rope`]: YaRN RoPE tables (untruncated correction range, concentration on cos and sin);
//! - [`attention`]: GQA with sinks and the sliding window;
//! - [`kv_cache`]: per-layer K/V, ring buffers for sliding layers;
//! - [`moe`]: router top-k, clamped SwiGLU, experts;
//! - [`model`]: [`ReferenceModel`], which puts them together.

pub mod attention;
pub mod kv_cache;
pub mod linear;
pub mod model;
pub mod moe;
pub mod rope;
pub mod sharded;
#[doc(hidden)]
pub mod testing;

pub use kv_cache::KvCache;
pub use model::{ReferenceModel, SeqInput};
pub use rope::Rope;

/// Why a reference forward call was refused. Checked before anything (the KV cache included) is
/// modified, so a failed call leaves the caches as they were.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// A token id is not below `vocab_size`.
    #[error(
        "token id {token} (at index {index}) is out of range: the vocabulary has {vocab_size} tokens"
    )]
    TokenOutOfRange {
        index: usize,
        token: u32,
        vocab_size: usize,
    },
    /// A position is not below `max_position_embeddings`.
    #[error(
        "position {position} (at index {index}) is beyond the model's context: max_position_embeddings is {max}"
    )]
    PositionOutOfRange {
        index: usize,
        position: usize,
        max: usize,
    },
    /// Inputs whose lengths or shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A KV cache that was built for another model configuration.
    #[error("KV cache mismatch: {0}")]
    Cache(String),
    /// A layer or expert index beyond the model.
    #[error("index out of range: {0}")]
    Index(String),
}

/// Result alias of the reference module.
pub type Result<T, E = ReferenceError> = std::result::Result<T, E>;

/// `rmsnorm(x, w) = x / sqrt(mean(x²) + eps) * w` over each row of `x` (`[T, w.len()]`), in f32
/// like transformers (the mean of squares is summed in f64 to stay order-independent).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = (xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64) as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = wv * (xv * inv);
        }
    }
    out
}
