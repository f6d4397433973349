//! `gptoss serve [MODEL]`: the OpenAI-compatible HTTP server (flags in vLLM's style).
//!
//! With no MODEL it serves the bundled demo model (tiny, random weights, nonsense output).
//! Binds 127.0.0.1 by default; `--api-key` (or `$GPTOSS_API_KEY`) requires
//! `Authorization: Bearer KEY` on `/v1/*`. SIGINT/SIGTERM shut down gracefully: no new
//! connections, requests in flight get `--shutdown-timeout` seconds to finish, then are ended.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use gptoss_engine::backend::{Backend, LogitsWanted, SeqId, SeqStep, StepBatch};
use gptoss_formats::hub;
use gptoss_server::EngineOptions;
use gptoss_server::config::gpu_kv_budget;
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
    /// Longest sequence (prompt + completion) in tokens; on CUDA also the backend's context.
    /// Default: the model's context (CUDA: the backend's default of 32768), lowered to what the
    /// KV cache holds (4096 for the demo model).
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
    /// Fraction of the GPU's memory this server may use (CUDA): the KV cache gets
    /// `utilization × total` minus what is in use once the model is loaded, minus reserves for
    /// growing caches; startup fails if that cannot hold one sequence of --max-model-len tokens.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV-cache memory in GiB for the CPU backend (a GPU's cache is sized by
    /// --gpu-memory-utilization).
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
    /// Element type of the KV cache on the GPU: auto (= bf16), bf16, f16 (closer to the f32
    /// reference; not yet validated on a GPU) or f32 (CUDA; the CPU reference keeps f32).
    #[arg(long, value_name = "DTYPE")]
    pub kv_cache_dtype: Option<gptoss_cuda::KvDtype>,
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
    let mut backend = open_backend(
        &dir,
        a.device,
        BackendOptions {
            max_context: a.max_model_len,
            enforce_eager: a.enforce_eager,
            tensor_parallel_size: a.tensor_parallel_size,
            kv_cache_dtype: a.kv_cache_dtype,
        },
    )?;
    if a.enforce_eager && backend.name() != "cuda" {
        eprintln!(
            "note: --enforce-eager has no effect on the {} backend",
            backend.name()
        );
    }
    let cpu_engine = EngineOptions {
        // The demo model writes nonsense until a length limit: keep its context short.
        max_model_len: a.max_model_len.or(is_demo.then_some(DEMO_MAX_MODEL_LEN)),
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        max_prefill_chunk: a.max_prefill_chunk,
        block_size: a.block_size,
        // CPU: the budget is --kv-cache-space and the reference keeps K/V in f32.
        kv_budget_bytes: (a.kv_cache_space * (1u64 << 30) as f64) as u64,
        kv_dtype_bytes: 4,
    };
    // A GPU backend: the budget comes from --gpu-memory-utilization and the device's memory.
    let engine = match backend.device_memory()? {
        Some(mem) => gpu_engine_options(
            backend.as_mut(),
            mem.max_context,
            a.gpu_memory_utilization,
            &cpu_engine,
        )?,
        None => cpu_engine,
    };
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
        engine,
    };
    serve_blocking(backend, &dir, opts)?;
    Ok(ExitCode::SUCCESS)
}

/// The sequence of the warm-up step (released before serving starts).
const WARMUP_SEQ: SeqId = SeqId::MAX;

/// Engine options for a GPU backend: `base` with the KV budget, element size and context length
/// of [`gpu_kv_budget`], measured after a warm-up step (like vLLM's profiling run: it loads every
/// kernel, lets the driver size their local memory and captures the decode graph, so the memory
/// in use afterwards is what serving needs besides the KV cache). `max_context` is the most
/// positions the backend holds per sequence. Prints the budget.
fn gpu_engine_options(
    backend: &mut dyn Backend,
    max_context: usize,
    utilization: f64,
    base: &EngineOptions,
) -> anyhow::Result<EngineOptions> {
    let step = |tokens: Vec<u32>, start_pos: usize| StepBatch {
        steps: vec![SeqStep {
            seq: WARMUP_SEQ,
            tokens,
            start_pos,
            want_logits: LogitsWanted::Last,
        }],
    };
    // A 16-token prefill (the CUDA backend's wide path: tensor-core kernels and cuBLAS, whose
    // workspace is allocated on first use) and a one-token decode step (the decode kernels and
    // the graph); less where the context is shorter.
    let prefill = max_context.saturating_sub(1).clamp(1, 16);
    let mut warm = backend.forward(&step(vec![0; prefill], 0));
    if warm.is_ok() && prefill < max_context {
        warm = backend.forward(&step(vec![0], prefill));
    }
    backend.release(WARMUP_SEQ);
    warm.context("warm-up step on the GPU")?;
    let mem = backend
        .device_memory()?
        .context("the backend stopped reporting its device memory")?;
    let (budget, notices) =
        gpu_kv_budget(backend.config(), &mem, utilization, base).map_err(anyhow::Error::msg)?;
    for n in notices {
        eprintln!("note: {n}");
    }
    for line in budget.summary() {
        eprintln!("{line}");
    }
    Ok(budget.engine_options(base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gptoss_engine::backend::{BackendError, DeviceMemory, Logits};
    use gptoss_engine::cpu::CpuBackend;
    use gptoss_formats::GptOssConfig;

    /// The CPU backend dressed up as a GPU with the given memory figures.
    struct FakeGpu {
        inner: CpuBackend,
        mem: DeviceMemory,
        fed: usize,
    }

    impl Backend for FakeGpu {
        fn name(&self) -> &str {
            "fake-gpu"
        }
        fn config(&self) -> &GptOssConfig {
            self.inner.config()
        }
        fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError> {
            self.fed += batch.num_tokens();
            self.inner.forward(batch)
        }
        fn release(&mut self, seq: SeqId) {
            self.inner.release(seq)
        }
        fn max_batch_tokens(&self) -> usize {
            self.inner.max_batch_tokens()
        }
        fn device_memory(&self) -> Result<Option<DeviceMemory>, BackendError> {
            Ok(Some(self.mem))
        }
    }

    #[test]
    fn gpu_backends_size_the_cache_from_gpu_memory_utilization() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = gptoss_formats::synth::tiny_model_in(tmp.path(), "tiny").unwrap();
        let mib = 1u64 << 20;
        let mut gpu = FakeGpu {
            inner: CpuBackend::open(&dir).unwrap(),
            mem: DeviceMemory {
                total_bytes: 1024 * mib,
                used_bytes: 400 * mib,
                kv_dtype_bytes: 2,
                max_context: 8192,
                kv_grow_positions: 256,
                kv_sliding_positions: 136,
                kv_allocs_per_seq: 2,
                alloc_granule_bytes: 2 * mib,
                headroom_bytes: 64 * mib,
            },
            fed: 0,
        };
        let base = EngineOptions {
            max_model_len: Some(4096),
            ..EngineOptions::default()
        };
        let opts = gpu_engine_options(&mut gpu, 8192, 0.9, &base).unwrap();
        // The warm-up ran (a short prefill and a decode step) and left no sequence behind.
        assert_eq!(gpu.fed, 17);
        assert!(gpu.inner.cached_len(WARMUP_SEQ).is_none());
        assert_eq!(opts.max_model_len, Some(4096));
        assert_eq!(opts.kv_dtype_bytes, 2);
        assert!(opts.kv_budget_bytes > 0 && opts.kv_budget_bytes < 1024 * mib - 400 * mib);
        assert_eq!(opts.max_num_seqs, base.max_num_seqs);
        // Less than what is in use: a clear error naming the flag.
        let e = gpu_engine_options(&mut gpu, 8192, 0.3, &base).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("already in use"), "{msg}");
        assert!(msg.contains("--gpu-memory-utilization"), "{msg}");
        // A context of two positions: the warm-up fits in it.
        gpu.fed = 0;
        let short = EngineOptions {
            max_model_len: Some(2),
            ..base
        };
        let opts = gpu_engine_options(&mut gpu, 2, 0.9, &short).unwrap();
        assert_eq!(gpu.fed, 2);
        assert_eq!(opts.max_model_len, Some(2));
    }
}
