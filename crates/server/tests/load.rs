//! Load, disconnects and shutdown: 64 concurrent streaming clients with random cancellations on
//! the CPU backend; clients leaving mid-stream (streaming and not); graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Reads an SSE response until `[DONE]` or until `stop_after` chunks (then drops it).
/// Returns (chunks, saw DONE, time to the first chunk carrying generated text, error event).
async fn read_stream(
    resp: reqwest::Response,
    stop_after: Option<usize>,
    t0: Instant,
) -> (usize, bool, Option<Duration>, Option<String>) {
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut chunks = 0;
    let mut first_text = None;
    let mut error = None;
    while let Some(item) = stream.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(e) => return (chunks, false, first_text, Some(e.to_string())),
        };
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let Some(data) = block.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return (chunks, true, first_text, error);
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if v.get("error").is_some() {
                error = Some(v.to_string());
            }
            chunks += 1;
            let has_text = v["choices"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["text"].as_str().is_some_and(|t| !t.is_empty())
                        || c["delta"]["content"]
                            .as_str()
                            .is_some_and(|t| !t.is_empty())
                        || c["delta"]["reasoning_content"].is_string()
                })
            });
            if has_text && first_text.is_none() {
                first_text = Some(t0.elapsed());
            }
            if stop_after.is_some_and(|n| chunks >= n) {
                return (chunks, false, first_text, error);
            }
        }
    }
    (chunks, false, first_text, error)
}

/// Sends a streamed chat completion of `body` and reads the stream ([`read_stream`]).
async fn chat_stream(
    url: &str,
    body: Value,
    stop_after: Option<usize>,
) -> (usize, bool, Option<Duration>, Option<String>) {
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    read_stream(r, stop_after, Instant::now()).await
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_streaming_clients_with_random_cancellations() {
    const CLIENTS: usize = 64;
    let s = cpu_server(Opts::default()).await;
    let url = s.url.clone();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    // A fixed pseudo-random plan: ~1 in 4 clients leaves early, either while queued/prefilling
    // (after the first chunk) or mid-generation (after a random delay).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..CLIENTS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let cancel = match x % 8 {
            0 => Some((1usize, Duration::ZERO)),
            1 => Some((usize::MAX, Duration::from_millis(300 + (x >> 8) % 3000))),
            _ => None,
        };
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let chat = i % 2 == 1;
            let (path, body) = if chat {
                (
                    "/v1/chat/completions",
                    json!({"messages": [{"role": "user", "content": format!("Client {i} says hi")}],
                           "max_tokens": 6, "stream": true, "temperature": 0.8, "seed": i}),
                )
            } else {
                (
                    "/v1/completions",
                    json!({"prompt": format!("Client {i}: once upon a time"),
                           "max_tokens": 6, "stream": true, "temperature": 0}),
                )
            };
            let start = Instant::now();
            let resp = client()
                .post(format!("{url}{path}"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            match cancel {
                Some((after, delay)) if delay.is_zero() => {
                    let r = read_stream(resp, Some(after), start).await;
                    (i, chat, true, r)
                }
                Some((_, delay)) => {
                    let r = tokio::time::timeout(delay, read_stream(resp, None, start)).await;
                    match r {
                        Ok(r) => (i, chat, false, r), // finished before the client left
                        Err(_) => (i, chat, true, (0, false, None, None)),
                    }
                }
                None => (i, chat, false, read_stream(resp, None, start).await),
            }
        }));
    }
    let mut completed = 0;
    let mut cancelled = 0;
    let mut ttft = Vec::new();
    for t in tasks {
        let (i, chat, left, (chunks, done, first, error)) =
            tokio::time::timeout(Duration::from_secs(150), t)
                .await
                .expect("client timed out")
                .unwrap();
        if left {
            cancelled += 1;
            continue;
        }
        assert!(error.is_none(), "client {i}: {error:?}");
        assert!(done, "client {i} did not get [DONE] ({chunks} chunks)");
        completed += 1;
        // Completions stream text from the first token on; chat may open with header tokens
        // that carry no text, so client-side TTFT is taken on completions.
        if !chat && let Some(f) = first {
            ttft.push(f.as_secs_f64());
        }
    }
    let elapsed = t0.elapsed();
    assert_eq!(completed + cancelled, CLIENTS);
    assert!(completed >= CLIENTS / 2, "{completed} completed");
    // Afterwards every block is back.
    wait_blocks_free(&url).await;
    let finished = metric(
        &url,
        "gptoss_request_outcomes_total",
        &[("outcome", "finished")],
    )
    .await;
    let gone = metric(
        &url,
        "gptoss_request_outcomes_total",
        &[("outcome", "cancelled")],
    )
    .await;
    let failed = metric(
        &url,
        "gptoss_request_outcomes_total",
        &[("outcome", "failed")],
    )
    .await;
    assert_eq!(failed, 0.0);
    assert_eq!(finished + gone, CLIENTS as f64);
    assert!(finished >= completed as f64);
    let (_, text) = get(&url, "/metrics").await;
    let sample = |q: f64| -> f64 {
        // Server-side TTFT quantile from the histogram buckets (upper bounds).
        let count =
            gptoss_server::metrics::sample(&text, "gptoss_time_to_first_token_seconds_count", &[])
                .unwrap();
        let target = (q * count).ceil();
        text.lines()
            .filter(|l| l.starts_with("gptoss_time_to_first_token_seconds_bucket"))
            .find_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
                (v >= target).then(|| le.parse().unwrap_or(f64::INFINITY))
            })
            .unwrap()
    };
    ttft.sort_by(f64::total_cmp);
    eprintln!(
        "load: {CLIENTS} clients ({completed} completed, {cancelled} cancelled) in {:.2}s = {:.2} req/s; \
         client TTFT (first text) p50 {:.3}s p99 {:.3}s over {} completions clients; server TTFT p50 <= {}s p99 <= {}s",
        elapsed.as_secs_f64(),
        CLIENTS as f64 / elapsed.as_secs_f64(),
        percentile(&ttft, 0.5),
        percentile(&ttft, 0.99),
        ttft.len(),
        sample(0.5),
        sample(0.99),
    );
    assert!(elapsed < Duration::from_secs(150));
    // Still serving.
    let (st, _) = post(
        &url,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200);
    s.stop().await;
}

fn slow_server_opts() -> Opts {
    Opts {
        grace: Duration::from_secs(10),
        ..Opts::default()
    }
}

async fn slow_scripted(opts: Opts) -> TestServer {
    start(Box::new(scripted_backend(Duration::from_millis(10))), opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_frees_blocks_and_others_continue() {
    let s = slow_scripted(slow_server_opts()).await;
    let url = s.url.clone();
    // A bystander that must finish normally.
    let bystander = tokio::spawn({
        let url = url.clone();
        async move {
            chat_stream(
                &url,
                json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}),
                None,
            )
            .await
        }
    });
    let (chunks, done, _, _) = chat_stream(
        &url,
        json!({"messages": [{"role": "user", "content": "LONG please"}], "stream": true}),
        Some(10),
    )
    .await;
    assert_eq!(chunks, 10);
    assert!(!done);
    // The stream is dropped: the engine cancels it and frees its blocks long before the 600
    // words it would still generate.
    let t = Instant::now();
    wait_blocks_free(&url).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let (_, done, _, err) = bystander.await.unwrap();
    assert!(done && err.is_none());
    assert_eq!(
        metric(
            &url,
            "gptoss_request_outcomes_total",
            &[("outcome", "cancelled")]
        )
        .await,
        1.0
    );

    // A non-streaming client that gives up (timeout) is cancelled too.
    let r = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "LONG again"}]}))
        .send()
        .await;
    assert!(r.is_err());
    let t = Instant::now();
    wait_blocks_free(&url).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        metric(
            &url,
            "gptoss_request_outcomes_total",
            &[("outcome", "cancelled")]
        )
        .await,
        2.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let mut s = slow_scripted(slow_server_opts()).await;
    let url = s.url.clone();
    let inflight = tokio::spawn({
        let url = url.clone();
        async move {
            chat_stream(
                &url,
                json!({"messages": [{"role": "user", "content": "LONG"}],
                       "max_tokens": 60, "stream": true}),
                None,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let server = s.server.take().unwrap();
    let state = std::sync::Arc::clone(&server.state);
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        state
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    // New connections are refused.
    assert!(
        client()
            .get(format!("{url}/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_err()
    );
    // The request in flight completes normally, then the server stops.
    let (_, done, _, err) = inflight.await.unwrap();
    assert!(done, "in-flight request cut off");
    assert!(err.is_none(), "{err:?}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_expiry_ends_long_streams_cleanly() {
    let mut s = slow_scripted(Opts {
        grace: Duration::from_millis(200),
        ..Opts::default()
    })
    .await;
    let url = s.url.clone();
    let inflight = tokio::spawn({
        let url = url.clone();
        async move {
            chat_stream(
                &url,
                json!({"messages": [{"role": "user", "content": "LONG"}], "stream": true}),
                None,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let server = s.server.take().unwrap();
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    // The stream ended with an error event and [DONE], not a broken connection.
    let (_, done, _, err) = inflight.await.unwrap();
    assert!(done);
    assert!(err.unwrap().contains("shutting down"));
    s.stop().await;
}
