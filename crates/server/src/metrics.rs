//! `GET /metrics`: Prometheus text exposition of the engine's counters and the server's request
//! counts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use gptoss_engine::engine::{EngineStats, Histogram};
use gptoss_engine::kv_blocks::Pool;

use crate::AppState;

/// Requests served, by route and status code.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl ServerMetrics {
    /// Counts a finished request.
    pub fn record(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// Requests counted for `route` with `status`.
    pub fn count(&self, route: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .expect("metrics lock")
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }
}

/// Middleware counting every response by route and status.
pub async fn track(
    State(state): State<std::sync::Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    state.metrics.record(&route, resp.status().as_u16());
    resp
}

fn histogram(out: &mut String, name: &str, help: &str, model: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut acc = 0;
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        acc += c;
        let _ = writeln!(
            out,
            "{name}_bucket{{model_name=\"{model}\",le=\"{b}\"}} {acc}"
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{model_name=\"{model}\",le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "{name}_sum{{model_name=\"{model}\"}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{model_name=\"{model}\"}} {}", h.count);
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, lines: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in lines {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// Renders the metrics.
pub fn render(model: &str, s: &EngineStats, server: &ServerMetrics) -> String {
    let mut out = String::new();
    let m = format!("model_name=\"{model}\"");
    let one = |v: f64| vec![(m.clone(), v)];
    let requests: Vec<(String, f64)> = server
        .requests
        .lock()
        .expect("metrics lock")
        .iter()
        .map(|((route, status), n)| {
            (
                format!("{m},route=\"{route}\",status=\"{status}\""),
                *n as f64,
            )
        })
        .collect();
    metric(
        &mut out,
        "gptoss_http_requests_total",
        "counter",
        "HTTP requests by route and status.",
        &requests,
    );
    metric(
        &mut out,
        "gptoss_requests_total",
        "counter",
        "Generation requests accepted by the engine.",
        &one(s.requests_total as f64),
    );
    metric(
        &mut out,
        "gptoss_request_outcomes_total",
        "counter",
        "Generation requests by outcome.",
        &[
            (
                format!("{m},outcome=\"finished\""),
                s.requests_finished as f64,
            ),
            (
                format!("{m},outcome=\"cancelled\""),
                s.requests_cancelled as f64,
            ),
            (format!("{m},outcome=\"failed\""), s.requests_failed as f64),
        ],
    );
    metric(
        &mut out,
        "gptoss_prompt_tokens_total",
        "counter",
        "Prompt tokens of accepted requests.",
        &one(s.prompt_tokens_total as f64),
    );
    metric(
        &mut out,
        "gptoss_generation_tokens_total",
        "counter",
        "Generated tokens.",
        &one(s.generation_tokens_total as f64),
    );
    metric(
        &mut out,
        "gptoss_num_requests_waiting",
        "gauge",
        "Sequences waiting for admission.",
        &one(s.waiting as f64),
    );
    metric(
        &mut out,
        "gptoss_num_requests_running",
        "gauge",
        "Sequences running.",
        &one(s.running as f64),
    );
    metric(
        &mut out,
        "gptoss_num_requests_in_flight",
        "gauge",
        "Requests in the engine.",
        &one(s.requests_in_flight as f64),
    );
    metric(
        &mut out,
        "gptoss_num_preemptions_total",
        "counter",
        "Sequences preempted for lack of KV blocks.",
        &one(s.preemptions_total as f64),
    );
    metric(
        &mut out,
        "gptoss_engine_steps_total",
        "counter",
        "Engine iterations that ran a batch.",
        &one(s.steps_total as f64),
    );
    let per_pool = |f: &dyn Fn(Pool) -> usize| -> Vec<(String, f64)> {
        Pool::ALL
            .iter()
            .map(|&p| (format!("{m},pool=\"{}\"", p.as_str()), f(p) as f64))
            .collect()
    };
    metric(
        &mut out,
        "gptoss_kv_blocks_used",
        "gauge",
        "KV-cache blocks in use, per pool.",
        &per_pool(&|p| s.kv.used(p)),
    );
    metric(
        &mut out,
        "gptoss_kv_blocks_free",
        "gauge",
        "Free KV-cache blocks, per pool.",
        &per_pool(&|p| s.kv.free(p)),
    );
    metric(
        &mut out,
        "gptoss_kv_blocks_total",
        "gauge",
        "KV-cache blocks, per pool.",
        &per_pool(&|p| s.kv.total(p)),
    );
    let usage = if s.kv.full_total > 0 {
        s.kv.full_used as f64 / s.kv.full_total as f64
    } else {
        0.0
    };
    metric(
        &mut out,
        "gptoss_kv_cache_usage_perc",
        "gauge",
        "Fraction of full-attention KV blocks in use.",
        &one(usage),
    );
    histogram(
        &mut out,
        "gptoss_time_to_first_token_seconds",
        "Time from arrival to the first generated token.",
        model,
        &s.time_to_first_token,
    );
    histogram(
        &mut out,
        "gptoss_inter_token_latency_seconds",
        "Time between consecutive tokens of a completion.",
        model,
        &s.inter_token_latency,
    );
    out
}

/// Reads one sample (`name{labels} value`) from Prometheus text: the first line whose name is
/// `name` and whose labels contain every `label="value"` pair given. For tests and tools.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let (n, rest) = head.split_once('{').unwrap_or((head, "}"));
        if n != name {
            return None;
        }
        let ok = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if ok { value.parse().ok() } else { None }
    })
}
