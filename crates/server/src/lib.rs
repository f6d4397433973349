//! # gptoss-server
//!
//! An OpenAI-compatible HTTP server over the gptoss engine (axum + Tokio):
//!
//! | route | |
//! |---|---|
//! | `POST /v1/chat/completions` | Harmony chat: reasoning as `reasoning_content`, tool calls, SSE streaming |
//! | `POST /v1/completions` | raw prompts (text or token ids) |
//! | `POST /v1/responses` | Responses API (basic: text, function tools, streaming events) |
//! | `GET /v1/models` | the served model names |
//! | `GET /health` | 200 while serving, 503 while shutting down |
//! | `GET /metrics` | Prometheus text |
//!
//! Threads: the Tokio runtime serves HTTP; one engine thread ([`gptoss_engine::engine`]) owns
//! the backend and batches every request; the two meet through per-request channels
//! ([`sse`]). Errors follow OpenAI's shape ([`errors`]); `--api-key` is checked by [`auth`].

pub mod api_types;
pub mod auth;
pub mod config;
pub mod demo;
pub mod errors;
pub mod handlers;
pub mod harmony_bridge;
pub mod launch;
pub mod metrics;
pub mod responses;
pub mod sse;
pub mod testing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use gptoss_engine::engine::EngineHandle;
use gptoss_model::harmony::HarmonyEncoding;
use tokio::net::TcpListener;

pub use config::{EngineOptions, plan_engine};

/// Default request-body limit (bytes).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

/// Everything the handlers share.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// Renders conversations and holds the tokenizer.
    pub encoding: HarmonyEncoding,
    /// Names the model answers to; the first is reported by default.
    pub model_names: Vec<String>,
    /// Required bearer key, if any.
    pub api_key: Option<String>,
    /// Request-body limit.
    pub max_body_bytes: usize,
    /// Request counters.
    pub metrics: metrics::ServerMetrics,
    /// Unix time the server started.
    pub created: u64,
    /// Set once shutdown began: new requests get 503.
    pub shutting_down: AtomicBool,
}

impl AppState {
    /// State over a running engine.
    pub fn new(engine: EngineHandle, encoding: HarmonyEncoding, model_names: Vec<String>) -> Self {
        assert!(!model_names.is_empty(), "at least one served model name");
        AppState {
            engine,
            encoding,
            model_names,
            api_key: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            metrics: metrics::ServerMetrics::default(),
            created: handlers::now_unix(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Requires `Authorization: Bearer KEY` on `/v1/*`.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key.filter(|k| !k.is_empty());
        self
    }

    /// Sets the request-body limit.
    pub fn with_max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/models", get(handlers::models))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::fallback)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then shuts down gracefully: stops accepting connections,
/// answers 503 to new requests on open connections, lets requests in flight finish for up to
/// `grace`, then ends the rest (streams get an error event and `[DONE]`) and returns once every
/// connection is closed.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(Arc::clone(&state));
    let st = Arc::clone(&state);
    let signal = async move {
        shutdown.await;
        st.shutting_down.store(true, Ordering::SeqCst);
        let st2 = Arc::clone(&st);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            st2.engine.abort_all("The server is shutting down.");
        });
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A server running on a Tokio task (tests, embedding).
pub struct RunningServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state.
    pub state: Arc<AppState>,
    trigger: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Binds `addr` (e.g. `127.0.0.1:0` for a random port) and serves.
    pub async fn start(state: Arc<AppState>, addr: &str, grace: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            Arc::clone(&state),
            async move {
                let _ = rx.await;
            },
            grace,
        ));
        Ok(RunningServer {
            addr,
            state,
            trigger: Some(tx),
            task,
        })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Begins a graceful shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.trigger.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down gracefully and waits for the server to stop.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.begin_shutdown();
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}
