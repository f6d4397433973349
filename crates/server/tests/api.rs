//! End-to-end API tests over real HTTP on 127.0.0.1: chat (plain and streamed), completions,
//! responses, reasoning split, tool-call round trip, stop sequences, n > 1, usage, models,
//! health, metrics, API keys.

mod common;

use common::*;
use gptoss_model::harmony::{HarmonyEncoding, Role};
use gptoss_server::testing::harmony_tokens;
use serde_json::{Value, json};

fn chat_text(events: &[SseEvent]) -> (String, String, Vec<Value>, Option<String>, Option<Value>) {
    // (content, reasoning, tool_call deltas, finish_reason, usage) of choice 0
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut tools = Vec::new();
    let mut finish = None;
    let mut usage = None;
    for e in events {
        if e.data == "[DONE]" {
            continue;
        }
        let v = e.json();
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            if c["index"] != 0 {
                continue;
            }
            let d = &c["delta"];
            if let Some(s) = d["content"].as_str() {
                content.push_str(s);
            }
            if let Some(s) = d["reasoning_content"].as_str() {
                reasoning.push_str(s);
            }
            if let Some(t) = d["tool_calls"].as_array() {
                tools.extend(t.iter().cloned());
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (content, reasoning, tools, finish, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_plain_and_streamed_agree_on_the_cpu_backend() {
    let s = cpu_server(Opts::default()).await;
    let messages = json!([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"}
    ]);
    let body =
        json!({"model": "test-model", "messages": messages, "temperature": 0, "max_tokens": 10});
    let (status, v) = post(&s.url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "test-model");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(["stop", "length"].contains(&finish), "{finish}");
    let usage = &v["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=10).contains(&completion));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    // The prompt is the Harmony rendering of the conversation.
    let conv = gptoss_server::harmony_bridge::chat_conversation(
        &serde_json::from_value::<Vec<gptoss_server::api_types::ChatMessage>>(messages.clone())
            .unwrap(),
        Vec::new(),
        None,
    )
    .unwrap();
    let prompt = HarmonyEncoding::new(tokenizer())
        .render_conversation_for_completion(&conv, &Role::Assistant)
        .unwrap();
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap(),
        prompt.len() as u64
    );

    // Streaming: same greedy text, role chunk first, usage chunk last, then [DONE].
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (status, events) = post_stream(&s.url, "/v1/chat/completions", &sbody).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let first = events[0].json();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last = events[events.len() - 2].json();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], v["usage"]);
    let (content, reasoning, _, sfinish, _) = chat_text(&events);
    assert_eq!(content, choice["message"]["content"].as_str().unwrap_or(""));
    assert_eq!(
        reasoning,
        choice["message"]["reasoning_content"]
            .as_str()
            .unwrap_or("")
    );
    assert_eq!(sfinish.as_deref(), Some(finish));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_text_tokens_logprobs_n_and_stop() {
    let s = cpu_server(Opts::default()).await;
    let body = json!({"model": "test-model", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "logprobs": 2});
    let (status, v) = post(&s.url, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let c = &v["choices"][0];
    let text = c["text"].as_str().unwrap().to_string();
    let lp = &c["logprobs"];
    // Usage counts exactly the tokens produced: one logprob entry per generated token.
    let n_tokens = lp["tokens"].as_array().unwrap().len() as u64;
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap(), n_tokens);
    assert_eq!(
        lp["token_logprobs"].as_array().unwrap().len() as u64,
        n_tokens
    );
    assert!(lp["top_logprobs"][0].as_object().unwrap().len() <= 2);
    let prompt_ids = tokenizer().encode_ordinary("Once upon a time").unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        prompt_ids.len() as u64
    );

    // Token-id prompt: same greedy text.
    let (_, v2) = post(
        &s.url,
        "/v1/completions",
        &json!({"prompt": prompt_ids, "temperature": 0, "max_tokens": 12}),
    )
    .await;
    assert_eq!(v2["choices"][0]["text"], text.as_str());

    // Streaming: same text, finish reason, usage.
    let (status, events) = post_stream(
        &s.url,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(status, 200);
    let mut stext = String::new();
    let mut sfinish = None;
    let mut susage = None;
    for e in &events {
        if e.data == "[DONE]" {
            continue;
        }
        let j = e.json();
        if j["usage"].is_object() {
            susage = Some(j["usage"].clone());
        }
        for c in j["choices"].as_array().unwrap() {
            stext.push_str(c["text"].as_str().unwrap());
            if let Some(f) = c["finish_reason"].as_str() {
                sfinish = Some(f.to_string());
            }
        }
    }
    assert_eq!(stext, text);
    assert_eq!(sfinish.as_deref(), c["finish_reason"].as_str());
    assert_eq!(susage.unwrap(), v["usage"]);

    // Stop sequence: a piece of the greedy text.
    let chars: Vec<char> = text.chars().collect();
    if chars.len() > 4 {
        let stop: String = chars[2..4].iter().collect();
        let (_, v3) = post(
            &s.url,
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "temperature": 0, "max_tokens": 12, "stop": [stop]}),
        )
        .await;
        let cut = text.find(&stop).unwrap();
        assert_eq!(v3["choices"][0]["text"], &text[..cut]);
        assert_eq!(v3["choices"][0]["finish_reason"], "stop");
    }

    // Two prompts, n = 2 with a seed: four choices, indexed prompt-major; usage adds up.
    let (status, v4) = post(
        &s.url,
        "/v1/completions",
        &json!({"prompt": ["Hello", "Bonjour le monde"], "n": 2, "seed": 7, "temperature": 1.0, "max_tokens": 5, "logprobs": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v4}");
    let choices = v4["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let mut total = 0;
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        total += c["logprobs"]["tokens"].as_array().unwrap().len() as u64;
    }
    assert_eq!(v4["usage"]["completion_tokens"].as_u64().unwrap(), total);
    let p1 = tokenizer().encode_ordinary("Hello").unwrap().len();
    let p2 = tokenizer()
        .encode_ordinary("Bonjour le monde")
        .unwrap()
        .len();
    assert_eq!(
        v4["usage"]["prompt_tokens"].as_u64().unwrap(),
        (p1 + p2) as u64
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_n_choices_with_seed_are_reproducible() {
    let s = cpu_server(Opts::default()).await;
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "n": 3, "seed": 11, "max_tokens": 6, "logprobs": true, "top_logprobs": 2});
    let (status, a) = post(&s.url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = post(&s.url, "/v1/chat/completions", &body).await;
    let ca = a["choices"].as_array().unwrap();
    assert_eq!(ca.len(), 3);
    for (i, c) in ca.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(c["logprobs"]["content"].is_array());
    }
    // Same seed → same choices.
    assert_eq!(a["choices"], b["choices"]);
    assert!(a["usage"]["completion_tokens"].as_u64().unwrap() <= 18);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_split_stop_strings_and_usage_with_a_scripted_model() {
    let s = scripted_server(Opts::default()).await;
    let body = json!({"model": "alias", "messages": [{"role": "user", "content": "Say hello"}], "reasoning_effort": "high"});
    let (status, v) = post(&s.url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "alias");
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Let me think.");
    assert_eq!(m["content"], "Hello there! END of answer.");
    assert!(m.get("tool_calls").is_none());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let script = harmony_tokens(&tokenizer(), &script_for(""));
    assert_eq!(v["usage"]["completion_tokens"], script.len());

    // Streamed: reasoning and content deltas add up to the same.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (_, events) = post_stream(&s.url, "/v1/chat/completions", &sb).await;
    let (content, reasoning, tools, finish, usage) = chat_text(&events);
    assert_eq!(reasoning, "Let me think.");
    assert_eq!(content, "Hello there! END of answer.");
    assert!(tools.is_empty());
    assert_eq!(finish.as_deref(), Some("stop"));
    assert!(usage.is_none(), "no usage chunk unless asked");

    // A stop sequence cuts the content (not the reasoning).
    let mut b2 = body.clone();
    b2["stop"] = json!(["END", "think"]);
    let (_, v2) = post(&s.url, "/v1/chat/completions", &b2).await;
    assert_eq!(v2["choices"][0]["message"]["content"], "Hello there! ");
    assert_eq!(
        v2["choices"][0]["message"]["reasoning_content"],
        "Let me think."
    );
    assert_eq!(v2["choices"][0]["finish_reason"], "stop");
    assert!(v2["usage"]["completion_tokens"].as_u64().unwrap() < script.len() as u64);

    // max_tokens cuts with finish_reason length; usage = max_tokens.
    let mut b3 = body.clone();
    b3["max_completion_tokens"] = json!(5);
    let (_, v3) = post(&s.url, "/v1/chat/completions", &b3).await;
    assert_eq!(v3["choices"][0]["finish_reason"], "length");
    assert_eq!(v3["usage"]["completion_tokens"], 5);
    s.stop().await;
}

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_call_round_trip() {
    let s = scripted_server(Opts::default()).await;
    let user = json!({"role": "user", "content": "Weather in Paris?"});
    let (status, v) = post(
        &s.url,
        "/v1/chat/completions",
        &json!({"messages": [user], "tools": weather_tools(), "tool_choice": "auto"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let m = &choice["message"];
    assert!(m["content"].is_null(), "{m}");
    assert_eq!(m["reasoning_content"], "Need the weather.");
    let call = &m["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));

    // Streamed: the same call in deltas (id + name first, then argument pieces).
    let (_, events) = post_stream(
        &s.url,
        "/v1/chat/completions",
        &json!({"messages": [user], "tools": weather_tools(), "stream": true}),
    )
    .await;
    let (content, reasoning, deltas, finish, _) = chat_text(&events);
    assert_eq!(content, "");
    assert_eq!(reasoning, "Need the weather.");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert_eq!(deltas[0]["type"], "function");
    assert!(deltas[0]["id"].is_string());
    let streamed_args: String = deltas
        .iter()
        .map(|d| d["function"]["arguments"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        streamed_args,
        call["function"]["arguments"].as_str().unwrap()
    );
    assert!(deltas.iter().all(|d| d["index"] == 0));

    // Send the call and its result back: the model answers.
    let history = json!([
        user,
        {"role": "assistant", "content": null, "reasoning_content": "Need the weather.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"sky\": \"sunny\"}"}
    ]);
    let (status, v2) = post(
        &s.url,
        "/v1/chat/completions",
        &json!({"messages": history, "tools": weather_tools()}),
    )
    .await;
    assert_eq!(status, 200, "{v2}");
    assert_eq!(v2["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v2["choices"][0]["message"]["content"],
        "It is sunny in Paris."
    );
    assert_eq!(
        v2["choices"][0]["message"]["reasoning_content"],
        "The tool says sunny."
    );

    // A named tool_choice forces the call header.
    let (_, v3) = post(
        &s.url,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "FORCE it"}], "tools": weather_tools(),
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    )
    .await;
    let call = &v3["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{v3}");
    assert_eq!(call["function"]["arguments"], "{\"city\": \"Rome\"}");
    assert_eq!(v3["choices"][0]["finish_reason"], "tool_calls");

    // tool_choice none: tools are not shown, so the model just answers.
    let (_, v4) = post(
        &s.url,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "tools": weather_tools(), "tool_choice": "none"}),
    )
    .await;
    assert_eq!(v4["choices"][0]["finish_reason"], "stop", "{v4}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_text_tools_and_streaming() {
    let s = scripted_server(Opts::default()).await;
    let (status, v) = post(
        &s.url,
        "/v1/responses",
        &json!({"model": "test-model", "input": "Say hello", "instructions": "Be nice.", "reasoning": {"effort": "low"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    let out = v["output"].as_array().unwrap();
    assert_eq!(out[0]["type"], "reasoning");
    assert_eq!(out[0]["content"][0]["text"], "Let me think.");
    assert_eq!(out[1]["type"], "message");
    assert_eq!(out[1]["content"][0]["type"], "output_text");
    assert_eq!(out[1]["content"][0]["text"], "Hello there! END of answer.");
    let script = harmony_tokens(&tokenizer(), &script_for(""));
    assert_eq!(v["usage"]["output_tokens"], script.len());
    assert!(
        v["usage"]["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Tool call, then its output in the next request.
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather.",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let (_, v2) = post(
        &s.url,
        "/v1/responses",
        &json!({"input": "Weather in Paris?", "tools": tools}),
    )
    .await;
    let call = v2["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("{v2}"))
        .clone();
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], "{\"city\": \"Paris\"}");
    let input = json!([
        {"role": "user", "content": "Weather in Paris?"},
        call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    ]);
    let (status, v3) = post(
        &s.url,
        "/v1/responses",
        &json!({"input": input, "tools": tools}),
    )
    .await;
    assert_eq!(status, 200, "{v3}");
    let msg = v3["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "message")
        .unwrap()
        .clone();
    assert_eq!(msg["content"][0]["text"], "It is sunny in Paris.");

    // Streaming events.
    let (status, events) = post_stream(
        &s.url,
        "/v1/responses",
        &json!({"input": "Say hello", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let kinds: Vec<String> = events
        .iter()
        .map(|e| e.event.clone().unwrap_or_default())
        .collect();
    assert_eq!(kinds[0], "response.created");
    assert_eq!(kinds.last().unwrap(), "response.completed");
    for k in [
        "response.output_item.added",
        "response.reasoning_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_item.done",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing in {kinds:?}");
    }
    let text: String = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("response.output_text.delta"))
        .map(|e| e.json()["delta"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "Hello there! END of answer.");
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e.json()["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_api_key() {
    let s = scripted_server(Opts {
        api_key: Some("sekret".into()),
        ..Opts::default()
    })
    .await;
    // /health and /metrics need no key.
    let (status, _) = get(&s.url, "/health").await;
    assert_eq!(status, 200);
    let r = client()
        .get(format!("{}/v1/models", s.url))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "test-model");
    assert_eq!(v["data"][1]["id"], "alias");
    assert_eq!(v["data"][0]["max_model_len"], 1024);

    let r = client()
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("sekret")
        .json(&json!({"messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (status, text) = get(&s.url, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "gptoss_requests_total",
        "gptoss_prompt_tokens_total",
        "gptoss_generation_tokens_total",
        "gptoss_num_requests_waiting",
        "gptoss_num_requests_running",
        "gptoss_kv_blocks_used",
        "gptoss_kv_blocks_free",
        "gptoss_time_to_first_token_seconds_bucket",
        "gptoss_inter_token_latency_seconds_count",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let gen_tokens =
        gptoss_server::metrics::sample(&text, "gptoss_generation_tokens_total", &[]).unwrap();
    let script = harmony_tokens(&tokenizer(), &script_for(""));
    assert_eq!(gen_tokens as usize, script.len());
    assert_eq!(
        gptoss_server::metrics::sample(&text, "gptoss_requests_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        gptoss_server::metrics::sample(&text, "gptoss_time_to_first_token_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        gptoss_server::metrics::sample(
            &text,
            "gptoss_http_requests_total",
            &[("route", "/v1/chat/completions"), ("status", "200")]
        ),
        Some(1.0)
    );
    assert!(
        gptoss_server::metrics::sample(&text, "gptoss_kv_blocks_free", &[("pool", "full")])
            .unwrap()
            > 0.0
    );
    s.stop().await;
}
