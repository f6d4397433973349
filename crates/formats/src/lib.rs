//! # gptoss-formats
//!
//! Checkpoint I/O for GPT-OSS, and nothing else: no model math, no GPU.
//!
//! - [`config`]: the typed `config.json`;
//! - [`checkpoint`]: memory-mapped safetensors shards (single file or index), zero copy;
//! - [`codec`]: exact NF4 / FP4 / MXFP4 decoders and the bitsandbytes NF4 quantizer;
//! - [`weights`]: the one internal representation every layout maps to (per layer, per expert
//!   views into the mapped bytes), with the layout probe that checks each shape;
//! - [`hub`]: model ids resolved from the local Hugging Face cache.
//!
//! Spec: `shared/spec/checkpoints.md`.

pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod convert;
pub mod error;
pub mod hub;
pub mod inspect;
pub mod synth;
pub mod weights;
pub mod writer;

pub use checkpoint::{Checkpoint, DType, TensorRef};
pub use config::GptOssConfig;
pub use error::{FormatError, Result};
pub use weights::{Layout, Linear, Matrix, ModelWeights, Vector};
