//! # gptoss-cuda: the GPT-OSS forward pass on NVIDIA GPUs
//!
//! [`CudaBackend`] implements the engine's [`Backend`](gptoss_engine::backend::Backend) on one
//! GPU of compute capability 8.0 or newer (Ampere and later; the kernels use only sm_80
//! features). Weights stay in their checkpoint encoding on the GPU — Unsloth/bitsandbytes NF4
//! (packed nibbles + u8 absmax + nested absmax), OpenAI MXFP4 (blocks + E8M0 scales), dense
//! bf16 — and the kernels compute with them directly (see `kernels/*.cu` for every layout).
//!
//! The CUDA driver is loaded at run time (cudarc with dynamic loading): the crate builds and its
//! tests pass on machines without CUDA, and [`CudaBackend::open`] returns an error instead of
//! panicking when there is no usable GPU.
//!
//! Kernels are compiled ahead of time into fatbins (see [`kernels`] for why), by
//! `scripts/build_kernels.sh`.

pub mod backend;
mod blas;
#[doc(hidden)]
pub mod debug;
pub mod driver;
pub mod flash;
pub mod kernels;
pub mod moe_gemm;
#[cfg(test)]
mod sha256;
pub mod upload;
mod wide;

pub use backend::{CudaBackend, CudaOptions, LoadReport};
pub use driver::DeviceInfo;
pub use kernels::KvDtype;
pub use upload::ReadBytes;

/// Whether a CUDA driver with at least one GPU can be used here (never panics).
pub fn gpu_available() -> bool {
    driver::probe(0).is_ok()
}
