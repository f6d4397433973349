//! Running a server process: engine + Tokio runtime + graceful shutdown on SIGINT/SIGTERM. Used
//! by `gptoss serve` and the `demo_server` example.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gptoss_engine::backend::Backend;
use gptoss_engine::engine::Engine;
use gptoss_model::harmony::HarmonyEncoding;
use gptoss_model::tokenizer::Tokenizer;

use crate::{AppState, EngineOptions, plan_engine};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind.
    pub host: String,
    /// Port (0 = any free port).
    pub port: u16,
    /// Served model names (at least one).
    pub model_names: Vec<String>,
    /// Required bearer key.
    pub api_key: Option<String>,
    /// Request-body limit in bytes.
    pub max_body_bytes: usize,
    /// Time requests in flight get to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Engine sizing.
    pub engine: EngineOptions,
}

/// Serves `backend` (whose checkpoint, for the tokenizer, is in `model_dir`) until SIGINT or
/// SIGTERM, then shuts down gracefully. Prints where it listens to stderr.
pub fn serve_blocking(
    backend: Box<dyn Backend>,
    model_dir: &Path,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let (config, notices) =
        plan_engine(backend.config(), &opts.engine).map_err(anyhow::Error::msg)?;
    for n in notices {
        eprintln!("note: {n}");
    }
    let tokenizer = Tokenizer::for_model_dir(model_dir).context("loading the tokenizer")?;
    let backend_name = backend.name().to_string();
    let engine = Engine::start(backend, tokenizer.clone(), config)?;
    let state = AppState::new(
        engine.handle(),
        HarmonyEncoding::new(tokenizer),
        opts.model_names.clone(),
    )
    .with_api_key(opts.api_key.clone())
    .with_max_body_bytes(opts.max_body_bytes.max(1024));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4)))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let addr = format!("{}:{}", opts.host, opts.port);
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let kv = config.kv;
        eprintln!(
            "serving {} ({}) on http://{local}/v1 - backend {backend_name}, max model len {}, \
             max {} sequences, KV blocks {} full + {} sliding of {} tokens ({:.1} MiB){}",
            opts.model_names.join(", "),
            model_dir.display(),
            config.max_model_len,
            config.scheduler.max_num_seqs,
            kv.num_full_blocks,
            kv.num_sliding_blocks,
            kv.layout.block_size,
            kv.total_bytes() as f64 / (1 << 20) as f64,
            if opts.api_key.is_some() {
                "; API key required"
            } else {
                ""
            },
        );
        crate::serve(
            listener,
            Arc::new(state),
            async {
                crate::shutdown_signal().await;
                eprintln!("shutting down: finishing requests in flight (signal again to force)");
                tokio::spawn(async {
                    crate::shutdown_signal().await;
                    eprintln!("forced exit");
                    std::process::exit(130);
                });
            },
            opts.shutdown_timeout,
        )
        .await
        .context("server error")
    });
    engine.shutdown();
    runtime.shutdown_background();
    result?;
    eprintln!("server stopped");
    Ok(())
}
