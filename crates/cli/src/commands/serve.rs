//! `gptoss serve [MODEL]`: the OpenAI-compatible HTTP server (flags in vLLM's style).
//!
//! With no MODEL it serves the bundled demo model (tiny, random weights, nonsense output).
//! Binds 127.0.0.1 by default; `--api-key` (or `$GPTOSS_API_KEY`) requires
//! `Authorization: Bearer KEY` on `/v1/*`. SIGINT/SIGTERM shut down gracefully: no new
//! connections, requests in flight get `--shutdown-timeout` seconds to finish, then are ended.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use gptoss_formats::hub;
use gptoss_server::EngineOptions;
use gptoss_server::demo::{DEMO_MODEL_NAME, DEMO_NOTICE, ensure_demo_model};
use gptoss_server::launch::{ServeOptions, serve_blocking};

use crate::generation::{BackendOptions, Device, open_backend};

/// Default context of the demo model.
const DEMO_MAX_MODEL_LEN: usize = 4096;

/// Flags of `serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory or Hugging Face id (from the local HF cache). Omit it to serve the
    /// bundled tiny demo model (random weights: nonsense output).
    pub model: Option<String>,
    /// Address to bind (localhost only by default; 0.0.0.0 exposes the server).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Longest sequence (prompt + completion) in tokens. Default: the model's context, lowered
    /// to what the KV cache holds (4096 for the demo model).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences processed at once.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens fed to the model per step (prefill chunks and decodes together).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Largest chunk of one prompt per step (chunked prefill).
    #[arg(long, default_value_t = 512)]
    pub max_prefill_chunk: usize,
    /// Fraction of GPU memory for weights, activations and KV cache (CUDA).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV-cache memory in GiB for the CPU backend.
    #[arg(long, default_value_t = 4.0)]
    pub kv_cache_space: f64,
    /// Token positions per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Require `Authorization: Bearer KEY` (default: $GPTOSS_API_KEY, if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Names the model is served as (default: MODEL as given, or gptoss-demo-tiny).
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Disable CUDA graphs (CUDA; accepted and ignored on the CPU).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Split the model over N shards (attention heads, experts and vocabulary; vLLM's flag).
    /// CPU backend only so far.
    #[arg(
        long = "tensor-parallel-size",
        short = 't',
        visible_alias = "tp",
        default_value_t = 1
    )]
    pub tensor_parallel_size: usize,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 16)]
    pub max_body_mb: usize,
    /// Seconds requests in flight may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// Runs the server until SIGINT/SIGTERM.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let g = a.gpu_memory_utilization;
    if g.is_nan() || g <= 0.0 || g > 1.0 {
        bail!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            a.gpu_memory_utilization
        );
    }
    if a.kv_cache_space.is_nan() || a.kv_cache_space <= 0.0 {
        bail!(
            "--kv-cache-space must be positive, got {}",
            a.kv_cache_space
        );
    }
    let (dir, names) = match &a.model {
        Some(m) => (
            hub::resolve_model(m).with_context(|| format!("cannot find model {m:?}"))?,
            vec![m.clone()],
        ),
        None => {
            eprintln!("note: {DEMO_NOTICE}");
            (ensure_demo_model()?, vec![DEMO_MODEL_NAME.to_string()])
        }
    };
    let is_demo = a.model.is_none();
    let backend = open_backend(
        &dir,
        a.device,
        BackendOptions {
            max_context: a.max_model_len,
            enforce_eager: a.enforce_eager,
            tensor_parallel_size: a.tensor_parallel_size,
        },
    )?;
    if a.enforce_eager && backend.name() != "cuda" {
        eprintln!(
            "note: --enforce-eager has no effect on the {} backend",
            backend.name()
        );
    }
    let opts = ServeOptions {
        host: a.host,
        port: a.port,
        model_names: if a.served_model_name.is_empty() {
            names
        } else {
            a.served_model_name
        },
        api_key: a
            .api_key
            .or_else(|| std::env::var("GPTOSS_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_mb.max(1) << 20,
        shutdown_timeout: Duration::from_secs(a.shutdown_timeout),
        engine: EngineOptions {
            // The demo model writes nonsense until a length limit: keep its context short.
            max_model_len: a.max_model_len.or(is_demo.then_some(DEMO_MAX_MODEL_LEN)),
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            max_prefill_chunk: a.max_prefill_chunk,
            block_size: a.block_size,
            // CPU: the budget is --kv-cache-space and the reference keeps K/V in f32. (The CUDA
            // backend will derive it from --gpu-memory-utilization and use bf16.)
            kv_budget_bytes: (a.kv_cache_space * (1u64 << 30) as f64) as u64,
            kv_dtype_bytes: 4,
        },
    };
    serve_blocking(backend, &dir, opts)?;
    Ok(ExitCode::SUCCESS)
}
