//! Bad input → OpenAI-style errors with the right status, one test per case. The scripted
//! backend keeps these fast; every case also checks the server still serves afterwards where
//! that matters.

mod common;

use common::*;
use serde_json::{Value, json};

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "test-model", "messages": [{"role": "user", "content": "Hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn chat_error(body: Value, status: u16, param: Option<&str>) -> Value {
    let s = scripted_server(Opts {
        max_model_len: 256,
        ..Opts::default()
    })
    .await;
    let (st, v) = post(&s.url, "/v1/chat/completions", &body).await;
    assert_error(st, &v, status, param);
    // Still serving.
    let (ok, _) = post(&s.url, "/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(ok, 200);
    s.stop().await;
    v
}

#[tokio::test]
async fn malformed_json() {
    let s = scripted_server(Opts::default()).await;
    let (st, v) = post_raw(&s.url, "/v1/chat/completions", "{\"messages\": [").await;
    assert_error(st, &v, 400, None);
    assert_eq!(v["error"]["code"], "invalid_json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (st, v) = post_raw(&s.url, "/v1/chat/completions", "[1, 2]").await;
    assert_error(st, &v, 400, None);
    s.stop().await;
}

#[tokio::test]
async fn wrong_types() {
    let v = chat_error(
        chat(json!({"temperature": "hot"})),
        400,
        Some("temperature"),
    )
    .await;
    assert_eq!(v["error"]["code"], "invalid_type");
    chat_error(json!({"messages": "hello"}), 400, Some("messages")).await;
    chat_error(chat(json!({"max_tokens": 1.5})), 400, Some("max_tokens")).await;
}

#[tokio::test]
async fn missing_messages_field() {
    let v = chat_error(json!({"model": "test-model"}), 400, Some("messages")).await;
    assert_eq!(v["error"]["code"], "missing_required_parameter");
}

#[tokio::test]
async fn unknown_model_is_404() {
    let v = chat_error(chat(json!({"model": "gpt-5"})), 404, Some("model")).await;
    assert_eq!(v["error"]["code"], "model_not_found");
    let s = scripted_server(Opts::default()).await;
    let (st, v) = post(
        &s.url,
        "/v1/completions",
        &json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_error(st, &v, 404, Some("model"));
    let (st, v) = post(
        &s.url,
        "/v1/responses",
        &json!({"model": "nope", "input": "x"}),
    )
    .await;
    assert_error(st, &v, 404, Some("model"));
    s.stop().await;
}

#[tokio::test]
async fn empty_messages() {
    chat_error(chat(json!({"messages": []})), 400, Some("messages")).await;
}

#[tokio::test]
async fn prompt_longer_than_max_model_len() {
    let long = "hello ".repeat(400);
    let v = chat_error(
        chat(json!({"messages": [{"role": "user", "content": long}]})),
        400,
        Some("messages"),
    )
    .await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("256"));
}

#[tokio::test]
async fn max_tokens_not_positive() {
    chat_error(chat(json!({"max_tokens": 0})), 400, Some("max_tokens")).await;
    chat_error(
        chat(json!({"max_completion_tokens": -3})),
        400,
        Some("max_completion_tokens"),
    )
    .await;
    let s = scripted_server(Opts::default()).await;
    let (st, v) = post(
        &s.url,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 0}),
    )
    .await;
    assert_error(st, &v, 400, Some("max_tokens"));
    s.stop().await;
}

#[tokio::test]
async fn max_tokens_beyond_the_context() {
    let v = chat_error(chat(json!({"max_tokens": 10_000})), 400, Some("max_tokens")).await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn temperature_out_of_range() {
    let v = chat_error(chat(json!({"temperature": 2.5})), 400, Some("temperature")).await;
    assert_eq!(v["error"]["code"], "decimal_above_max_value");
    chat_error(chat(json!({"temperature": -0.1})), 400, Some("temperature")).await;
}

#[tokio::test]
async fn top_p_out_of_range() {
    chat_error(chat(json!({"top_p": 0.0})), 400, Some("top_p")).await;
    chat_error(chat(json!({"top_p": 1.5})), 400, Some("top_p")).await;
}

#[tokio::test]
async fn other_sampling_parameters_out_of_range() {
    chat_error(
        chat(json!({"presence_penalty": 3})),
        400,
        Some("presence_penalty"),
    )
    .await;
    chat_error(
        chat(json!({"frequency_penalty": -2.5})),
        400,
        Some("frequency_penalty"),
    )
    .await;
    chat_error(chat(json!({"n": 0})), 400, Some("n")).await;
    chat_error(
        chat(json!({"logprobs": true, "top_logprobs": 21})),
        400,
        Some("top_logprobs"),
    )
    .await;
    chat_error(
        chat(json!({"reasoning_effort": "extreme"})),
        400,
        Some("reasoning_effort"),
    )
    .await;
}

#[tokio::test]
async fn oversized_body_is_413() {
    let s = scripted_server(Opts {
        max_body_bytes: 64 << 10,
        ..Opts::default()
    })
    .await;
    let big = "x".repeat(100 << 10);
    let body = serde_json::to_vec(&chat(
        json!({"messages": [{"role": "user", "content": big}]}),
    ))
    .unwrap();
    let (st, v) = post_raw(&s.url, "/v1/chat/completions", body).await;
    assert_error(st, &v, 413, None);
    assert_eq!(v["error"]["code"], "request_too_large");
    s.stop().await;
}

#[tokio::test]
async fn invalid_tool_schema() {
    let tool = |params: Value| json!([{"type": "function", "function": {"name": "f", "parameters": params}}]);
    chat_error(
        chat(json!({"tools": tool(json!({"type": "string"}))})),
        400,
        Some("tools[0].function.parameters"),
    )
    .await;
    chat_error(
        chat(json!({"tools": tool(json!({"type": "object", "properties": []}))})),
        400,
        Some("tools[0].function.parameters"),
    )
    .await;
    chat_error(
        chat(json!({"tools": [{"type": "function", "function": {"name": "bad name!"}}]})),
        400,
        Some("tools[0].function.name"),
    )
    .await;
    chat_error(
        chat(json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]})),
        400,
        Some("tools[0].type"),
    )
    .await;
    chat_error(
        chat(json!({"tools": tool(json!({"type": "object"})), "tool_choice": {"type": "function", "function": {"name": "g"}}})),
        400,
        Some("tool_choice"),
    )
    .await;
}

#[tokio::test]
async fn invalid_messages() {
    chat_error(
        chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
        400,
        Some("messages[0].role"),
    )
    .await;
    chat_error(
        chat(json!({"messages": [{"role": "user"}]})),
        400,
        Some("messages[0].content"),
    )
    .await;
    chat_error(
        chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})),
        400,
        Some("messages[0].content[0].type"),
    )
    .await;
    chat_error(
        chat(json!({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "42"}]})),
        400,
        Some("messages[0].tool_call_id"),
    )
    .await;
}

#[tokio::test]
async fn missing_or_invalid_api_key_is_401() {
    let s = scripted_server(Opts {
        api_key: Some("right-key".into()),
        ..Opts::default()
    })
    .await;
    let body = chat(json!({}));
    let (st, v) = post(&s.url, "/v1/chat/completions", &body).await;
    assert_error(st, &v, 401, None);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = client()
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("wrong-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_error(401, &v, 401, None);
    let r = client()
        .get(format!("{}/v1/models", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("right-key")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn unknown_route_and_bad_completion_prompts() {
    let s = scripted_server(Opts::default()).await;
    let (st, body) = get(&s.url, "/v1/nothing-here").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_error(st, &v, 404, None);
    let (st, v) = post(&s.url, "/v1/completions", &json!({"prompt": ""})).await;
    assert_error(st, &v, 400, Some("prompt"));
    let (st, v) = post(&s.url, "/v1/completions", &json!({"prompt": [300000]})).await;
    assert_error(st, &v, 400, Some("prompt"));
    let (st, v) = post(&s.url, "/v1/completions", &json!({"prompt": {"a": 1}})).await;
    assert_error(st, &v, 400, Some("prompt"));
    let (st, v) = post(
        &s.url,
        "/v1/responses",
        &json!({"input": "x", "previous_response_id": "resp_1"}),
    )
    .await;
    assert_error(st, &v, 400, Some("previous_response_id"));
    s.stop().await;
}

#[tokio::test]
async fn streaming_errors_are_plain_json_before_the_stream() {
    // Validation happens before any event is sent: a streaming request with a bad parameter gets
    // an ordinary JSON error, not an event stream.
    let s = scripted_server(Opts::default()).await;
    let r = client()
        .post(format!("{}/v1/chat/completions", s.url))
        .json(&chat(json!({"stream": true, "temperature": 9})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    s.stop().await;
}
