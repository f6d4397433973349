//! Shared helpers of the server tests: servers on 127.0.0.1 (random port) over the CPU backend
//! with the tiny random model or over the scripted backend, and small HTTP/SSE clients.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gptoss_engine::backend::Backend;
use gptoss_engine::cpu::CpuBackend;
use gptoss_engine::engine::Engine;
use gptoss_formats::synth::tiny_model_in;
use gptoss_model::harmony::HarmonyEncoding;
use gptoss_model::tokenizer::Tokenizer;
use gptoss_server::testing::{ScriptedBackend, harmony_tokens};
use gptoss_server::{AppState, EngineOptions, RunningServer, plan_engine};
use serde_json::Value;

/// The tiny model, synthesised once under the cargo target's test scratch folder and reused by
/// later runs (written to a temporary folder and renamed, so parallel binaries are safe).
pub fn tiny_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tiny_model_in(Path::new(env!("CARGO_TARGET_TMPDIR")), "tiny-nf4-seed0-v1").unwrap()
    })
}

pub fn tokenizer() -> Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::embedded().unwrap()).clone()
}

/// A server and the engine behind it (dropping it stops both).
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub engine: Option<Engine>,
    pub url: String,
}

impl TestServer {
    pub fn state(&self) -> &Arc<AppState> {
        &self.server.as_ref().unwrap().state
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.unwrap();
        }
        if let Some(e) = self.engine.take() {
            tokio::task::spawn_blocking(move || e.shutdown())
                .await
                .unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.begin_shutdown();
        }
        if let Some(e) = self.engine.take() {
            // Join off the async workers.
            std::thread::spawn(move || e.shutdown());
        }
    }
}

/// Server options for tests.
pub struct Opts {
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub grace: Duration,
    pub kv_budget_bytes: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            max_model_len: 1024,
            max_num_seqs: 64,
            api_key: None,
            max_body_bytes: 1 << 20,
            grace: Duration::from_secs(5),
            kv_budget_bytes: 64 << 20,
        }
    }
}

pub async fn start(backend: Box<dyn Backend>, opts: Opts) -> TestServer {
    let (cfg, _) = plan_engine(
        backend.config(),
        &EngineOptions {
            max_model_len: Some(opts.max_model_len),
            max_num_seqs: opts.max_num_seqs,
            max_num_batched_tokens: 4096,
            max_prefill_chunk: 1024,
            kv_budget_bytes: opts.kv_budget_bytes,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let engine = Engine::start(backend, tokenizer(), cfg).unwrap();
    let state = AppState::new(
        engine.handle(),
        HarmonyEncoding::new(tokenizer()),
        vec!["test-model".into(), "alias".into()],
    )
    .with_api_key(opts.api_key)
    .with_max_body_bytes(opts.max_body_bytes);
    let server = RunningServer::start(Arc::new(state), "127.0.0.1:0", opts.grace)
        .await
        .unwrap();
    TestServer {
        url: server.url(),
        server: Some(server),
        engine: Some(engine),
    }
}

/// A server over the CPU backend with the tiny random-weight model.
pub async fn cpu_server(opts: Opts) -> TestServer {
    let backend = CpuBackend::open(tiny_dir()).unwrap();
    start(Box::new(backend), opts).await
}

/// The scripted answers: a tool result in the prompt → final answer; the word FORCE → a tool
/// call forced by `tool_choice` (the script starts with the forced header); tools declared → a
/// tool call; otherwise reasoning then an answer.
pub fn script_for(prompt_text: &str) -> String {
    if prompt_text.contains("LONG") {
        format!(
            "<|channel|>final<|message|>{}<|return|>",
            "word ".repeat(600)
        )
    } else if prompt_text.contains("functions.get_weather to=assistant") {
        "<|channel|>analysis<|message|>The tool says sunny.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>".into()
    } else if prompt_text.contains("FORCE") {
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Rome\"}<|call|>".into()
    } else if prompt_text.contains("get_weather") {
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>".into()
    } else {
        "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>Hello there! END of answer.<|return|>".into()
    }
}

pub fn scripted_backend(delay: Duration) -> ScriptedBackend {
    let tok = tokenizer();
    ScriptedBackend::new(Arc::new(move |prompt: &[u32]| {
        let text = tok.decode(prompt);
        harmony_tokens(&tok, &script_for(&text))
    }))
    .with_step_delay(delay)
}

pub async fn scripted_server(opts: Opts) -> TestServer {
    start(Box::new(scripted_backend(Duration::ZERO)), opts).await
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// The status and the JSON body (the text as a JSON string if it is not JSON).
async fn status_and_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// POSTs JSON; returns the status and the JSON body.
pub async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    status_and_json(r).await
}

/// POSTs raw bytes as JSON; returns the status and body.
pub async fn post_raw(url: &str, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = client()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    status_and_json(r).await
}

pub async fn get(url: &str, path: &str) -> (u16, String) {
    let r = client().get(format!("{url}{path}")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

pub fn parse_sse(text: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        if block.trim().is_empty() {
            continue;
        }
        let mut ev = SseEvent {
            event: None,
            data: String::new(),
        };
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                ev.event = Some(e.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                ev.data.push_str(d);
            }
        }
        out.push(ev);
    }
    out
}

/// POSTs and reads a whole SSE stream.
pub async fn post_stream(url: &str, path: &str, body: &Value) -> (u16, Vec<SseEvent>) {
    let r = client()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    if status == 200 {
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    }
    (status, parse_sse(&text))
}

/// Reads one metric from `/metrics`.
pub async fn metric(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = get(url, "/metrics").await;
    gptoss_server::metrics::sample(&text, name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
}

/// Waits until every KV block is free (per /metrics).
pub async fn wait_blocks_free(url: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let full = metric(url, "gptoss_kv_blocks_used", &[("pool", "full")]).await;
        let sliding = metric(url, "gptoss_kv_blocks_used", &[("pool", "sliding")]).await;
        let running = metric(url, "gptoss_num_requests_running", &[]).await;
        if full == 0.0 && sliding == 0.0 && running == 0.0 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "blocks never freed: full {full}, sliding {sliding}, running {running}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks an OpenAI error body and returns it.
pub fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}
