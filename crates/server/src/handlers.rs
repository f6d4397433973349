//! Route handlers: chat completions, completions, models, health, metrics; helpers shared with
//! [`crate::responses`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use gptoss_engine::request::{Delta, OutputMode, Request, RequestEvent, TokenKind, TokenLogprob};
use gptoss_engine::sampling::SamplingParams;
use gptoss_model::harmony::{Conversation, Role};
use gptoss_model::tokenizer::{self, Tokenizer};
use serde_json::{Map, Value, json};

use crate::AppState;
use crate::api_types::*;
use crate::errors::{ApiError, parse_json};
use crate::harmony_bridge::{self, ToolChoice};
use crate::sse::{self, CancelGuard, StreamConverter, Submitted, TokioSink};

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `prefix` followed by 24 random hex digits.
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}

/// The body, or the right error (413 when over the limit).
pub fn body_bytes(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    match body {
        Ok(b) => Ok(b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::too_large(state.max_body_bytes))
        }
        Err(e) => Err(ApiError::invalid(
            format!("Could not read the request body: {e}"),
            None,
            None,
        )),
    }
}

/// The body of a request to serve: the right error when it is over the limit or the server is
/// draining.
pub fn request_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    let body = body_bytes(state, body)?;
    check_accepting(state)?;
    Ok(body)
}

/// The served name to report, after checking the requested one.
pub fn check_model(state: &AppState, model: Option<&str>) -> Result<String, ApiError> {
    match model {
        None | Some("") => Ok(state.model_names[0].clone()),
        Some(m) if state.model_names.iter().any(|n| n == m) => Ok(m.to_string()),
        Some(m) => Err(ApiError::model_not_found(m)),
    }
}

/// Fails while the server is draining.
pub fn check_accepting(state: &AppState) -> Result<(), ApiError> {
    if state.shutting_down.load(Ordering::SeqCst) || !state.engine.is_running() {
        Err(ApiError::unavailable("The server is shutting down."))
    } else {
        Ok(())
    }
}

/// Sampling parameters from request fields, validated (OpenAI's messages and ranges).
#[allow(clippy::too_many_arguments)]
pub fn sampling_params(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<i64>,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let top_k = match top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                format!(
                    "Invalid 'top_k': integer below minimum value. Expected a value >= 0 (or -1 to disable), but got {k} instead."
                ),
                Some("top_k"),
                Some("integer_below_min_value"),
            ));
        }
    };
    let p = SamplingParams {
        temperature: temperature.unwrap_or(d.temperature),
        top_k,
        top_p: top_p.unwrap_or(d.top_p),
        min_p: min_p.unwrap_or(d.min_p),
        presence_penalty: presence_penalty.unwrap_or(0.0),
        frequency_penalty: frequency_penalty.unwrap_or(0.0),
        repetition_penalty,
        seed: seed.map(|s| s as u64),
        logprobs,
    };
    p.validate()?;
    Ok(p)
}

/// Resolves the completion budget against the context: `requested` must be ≥ 1 and fit.
pub fn resolve_max_tokens(
    requested: Option<i64>,
    param: &str,
    prompt_param: &str,
    prompt_len: usize,
    max_model_len: usize,
    default: Option<usize>,
) -> Result<usize, ApiError> {
    if let Some(m) = requested
        && m < 1
    {
        return Err(ApiError::invalid(
            format!(
                "Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {m} instead."
            ),
            Some(param),
            Some("integer_below_min_value"),
        ));
    }
    // How the messages mention the prompt.
    let what = if prompt_param == "messages" {
        "messages"
    } else {
        "prompt"
    };
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your {what} resulted in {prompt_len} tokens. Please reduce the length of the {what}."
            ),
            Some(prompt_param),
            Some("context_length_exceeded"),
        ));
    }
    let room = max_model_len - prompt_len;
    match requested {
        Some(m) if m as u64 > room as u64 => Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_len} in the {what}, {m} in the completion). Please reduce the length of the {what} or completion.",
                prompt_len as u64 + m as u64,
            ),
            Some(param),
            Some("context_length_exceeded"),
        )),
        Some(m) => Ok(m as usize),
        None => Ok(default.map_or(room, |d| d.min(room))),
    }
}

/// Checks `n`.
pub fn resolve_n(state: &AppState, n: Option<i64>) -> Result<usize, ApiError> {
    let max = state.engine.info().config.scheduler.max_num_seqs.min(128) as i64;
    match n.unwrap_or(1) {
        n if n < 1 => Err(ApiError::invalid(
            format!(
                "Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead."
            ),
            Some("n"),
            Some("integer_below_min_value"),
        )),
        n if n > max => Err(ApiError::invalid(
            format!(
                "Invalid 'n': integer above maximum value. Expected a value <= {max}, but got {n} instead."
            ),
            Some("n"),
            Some("integer_above_max_value"),
        )),
        n => Ok(n as usize),
    }
}

/// Submits engine requests (one per prompt) feeding one channel.
pub fn submit(state: &AppState, requests: Vec<Request>) -> Result<Submitted, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let prompts = requests.len();
    // Cancels whatever was submitted if a later prompt is refused.
    let mut guard = CancelGuard::new(state.engine.clone(), Vec::new());
    for (index, r) in requests.into_iter().enumerate() {
        let sink = TokioSink {
            tx: tx.clone(),
            index,
        };
        let id = state.engine.submit(r, Box::new(sink))?;
        guard.push(id);
    }
    Ok(Submitted { rx, guard, prompts })
}

/// Runs CPU-bound work (tokenising) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))
}

/// The prompt of `conv` for the assistant's reply and the prefix `choice` forces, rendered off
/// the async workers; a conversation that does not render is blamed on `param`.
pub async fn render_prompt(
    state: &Arc<AppState>,
    conv: Conversation,
    choice: ToolChoice,
    param: &'static str,
) -> Result<(Vec<u32>, Vec<u32>), ApiError> {
    let st = Arc::clone(state);
    blocking(move || -> Result<_, ApiError> {
        let prompt = st
            .encoding
            .render_conversation_for_completion(&conv, &Role::Assistant)
            .map_err(|e| {
                ApiError::invalid(
                    format!("Could not render the conversation: {e}"),
                    Some(param),
                    None,
                )
            })?;
        let forced = harmony_bridge::forced_prefix(st.encoding.tokenizer(), &choice)?;
        Ok((prompt, forced))
    })
    .await?
}

/// The text of a token for logprobs, and its bytes.
pub fn token_text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    match tok.token_bytes(id) {
        Some(b) => (String::from_utf8_lossy(b).into_owned(), b.to_vec()),
        None => (
            tokenizer::special_token_name(id).unwrap_or_default(),
            Vec::new(),
        ),
    }
}

fn logprob_entry(tok: &Tokenizer, id: u32, lp: &TokenLogprob) -> TokenLogprobOut {
    let (token, bytes) = token_text(tok, id);
    TokenLogprobOut {
        token,
        logprob: lp.logprob,
        bytes,
        top_logprobs: lp
            .top
            .iter()
            .map(|&(t, l)| {
                let (token, bytes) = token_text(tok, t);
                TopLogprob {
                    token,
                    logprob: l,
                    bytes,
                }
            })
            .collect(),
    }
}

/// Collects every event of a non-streaming request. Returns per prompt: the events in order and
/// the usage.
pub async fn collect_all(
    mut sub: Submitted,
) -> Result<Vec<(Vec<RequestEvent>, UsageInfo)>, ApiError> {
    let mut out: Vec<(Vec<RequestEvent>, Option<UsageInfo>)> =
        (0..sub.prompts).map(|_| (Vec::new(), None)).collect();
    let mut remaining = sub.prompts;
    while remaining > 0 {
        match sub.rx.recv().await {
            Some((i, RequestEvent::Done { usage })) => {
                out[i].1 = Some(usage.into());
                remaining -= 1;
            }
            Some((_, RequestEvent::Error { message })) => {
                sub.guard.disarm();
                return Err(if message.contains("shutting down") {
                    ApiError::unavailable(message)
                } else {
                    ApiError::internal(message)
                });
            }
            Some((i, ev)) => out[i].0.push(ev),
            None => return Err(ApiError::unavailable("The server is shutting down.")),
        }
    }
    sub.guard.disarm();
    Ok(out
        .into_iter()
        .map(|(e, u)| (e, u.expect("done")))
        .collect())
}

// ---- chat ---------------------------------------------------------------------------------

/// A prepared chat request.
struct ChatPlan {
    request: Request,
    model: String,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

async fn plan_chat(state: &Arc<AppState>, body: Bytes) -> Result<ChatPlan, ApiError> {
    let req: ChatCompletionRequest = parse_json(&body)?;
    let model = check_model(state, req.model.as_deref())?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "'messages' must contain at least one message.",
            Some("messages"),
            Some("empty_array"),
        ));
    }
    let logprobs = req.logprobs.unwrap_or(false);
    let top = match req.top_logprobs {
        None => 0,
        Some(k) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid(
                format!(
                    "Invalid 'top_logprobs': expected a value between 0 and 20, but got {k} instead."
                ),
                Some("top_logprobs"),
                Some("invalid_value"),
            ));
        }
        Some(_) if !logprobs => {
            return Err(ApiError::invalid(
                "'top_logprobs' requires 'logprobs' to be true.",
                Some("top_logprobs"),
                Some("invalid_value"),
            ));
        }
        Some(k) => k as usize,
    };
    let sampling = sampling_params(
        req.temperature,
        req.top_p,
        req.top_k,
        req.min_p,
        req.presence_penalty,
        req.frequency_penalty,
        req.repetition_penalty,
        req.seed,
        logprobs.then_some(top),
    )?;
    let n = resolve_n(state, req.n)?;
    let tools = harmony_bridge::convert_tools(req.tools.as_deref().unwrap_or_default())?;
    let choice = harmony_bridge::parse_tool_choice(req.tool_choice.as_ref(), &tools)?;
    let effort = harmony_bridge::parse_effort(req.reasoning_effort.as_deref(), "reasoning_effort")?;
    let shown_tools = if choice == ToolChoice::None {
        Vec::new()
    } else {
        tools
    };
    let conv = harmony_bridge::chat_conversation(&req.messages, shown_tools, effort)?;
    let (prompt, forced) = render_prompt(state, conv, choice, "messages").await?;
    let max_model_len = state.engine.info().config.max_model_len;
    let (param, requested) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = resolve_max_tokens(
        requested,
        param,
        "messages",
        prompt.len() + forced.len(),
        max_model_len,
        None,
    )?;
    let mut request = Request::chat(prompt);
    request.forced_prefix = forced;
    request.sampling = sampling;
    request.max_tokens = max_tokens;
    request.n = n;
    request.stop = req.stop.map(StringOrList::into_vec).unwrap_or_default();
    Ok(ChatPlan {
        request,
        model,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let state = &state;
    let body = request_body(state, body)?;
    let plan = plan_chat(state, body).await?;
    let n = plan.request.n;
    let sub = submit(state, vec![plan.request])?;
    let id = random_id("chatcmpl-");
    let created = now_unix();
    let tok = state.encoding.tokenizer().clone();
    if plan.stream {
        let conv = ChatStream {
            head: ChunkHead {
                id,
                object: "chat.completion.chunk",
                created,
                model: plan.model,
                include_usage: plan.include_usage,
            },
            logprobs: plan.logprobs,
            tok,
            pending_logprobs: vec![Vec::new(); n],
        };
        let initial = (0..n)
            .map(|i| conv.chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})))
            .collect();
        return Ok(sse::sse_response(sub, conv, initial));
    }
    let mut results = collect_all(sub).await?;
    let (events, usage) = results.pop().expect("one prompt");
    let mut acc: Vec<ChatAcc> = (0..n).map(|_| ChatAcc::default()).collect();
    for ev in events {
        match ev {
            RequestEvent::Token {
                choice,
                token,
                kind,
                logprob,
                deltas,
            } => {
                let a = &mut acc[choice];
                a.apply(deltas);
                if plan.logprobs
                    && kind == TokenKind::Content
                    && let Some(lp) = logprob
                {
                    a.logprobs.push(logprob_entry(&tok, token, &lp));
                }
            }
            RequestEvent::Finished {
                choice,
                reason,
                deltas,
                ..
            } => {
                acc[choice].apply(deltas);
                acc[choice].finish = Some(reason.as_str());
            }
            _ => {}
        }
    }
    let choices = acc
        .into_iter()
        .enumerate()
        .map(|(index, a)| ChatChoice {
            index,
            message: ResponseMessage {
                role: "assistant",
                content: if a.content.is_empty() && !a.tool_calls.is_empty() {
                    None
                } else {
                    Some(a.content)
                },
                reasoning_content: (!a.reasoning.is_empty()).then_some(a.reasoning),
                tool_calls: a.tool_calls,
            },
            logprobs: plan.logprobs.then_some(ChoiceLogprobs {
                content: a.logprobs,
            }),
            finish_reason: a.finish,
        })
        .collect();
    Ok(axum::Json(ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model: plan.model,
        choices,
        usage,
        system_fingerprint: None,
    })
    .into_response())
}

#[derive(Default)]
struct ChatAcc {
    content: String,
    reasoning: String,
    tool_calls: Vec<ToolCallOut>,
    logprobs: Vec<TokenLogprobOut>,
    finish: Option<&'static str>,
}

impl ChatAcc {
    fn apply(&mut self, deltas: Vec<Delta>) {
        for d in deltas {
            match d {
                Delta::Text(s) | Delta::Content(s) => self.content.push_str(&s),
                Delta::Reasoning(s) => self.reasoning.push_str(&s),
                Delta::ToolCallStart { id, name, .. } => self.tool_calls.push(ToolCallOut {
                    id,
                    kind: "function",
                    function: FunctionCall {
                        name,
                        arguments: String::new(),
                    },
                }),
                Delta::ToolCallArguments { index, arguments } => {
                    if let Some(c) = self.tool_calls.get_mut(index) {
                        c.function.arguments.push_str(&arguments);
                    }
                }
            }
        }
    }
}

/// What every streamed chunk of a chat completion or a completion repeats.
struct ChunkHead {
    id: String,
    /// `chat.completion.chunk` or `text_completion`.
    object: &'static str,
    created: u64,
    model: String,
    /// Every chunk has a `usage` (null but on the last one).
    include_usage: bool,
}

impl ChunkHead {
    /// The `data:` frame of a chunk of `choices` (and `usage`).
    fn frame(&self, choices: Vec<Value>, usage: Option<UsageInfo>) -> axum::body::Bytes {
        let mut v = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = serde_json::to_value(usage).expect("usage");
        }
        sse::data_frame(&v)
    }

    /// The end of a stream that completed: a last chunk with the usage (if asked for), `[DONE]`.
    fn finish(&self, usage: UsageInfo, out: &mut Vec<axum::body::Bytes>) {
        if self.include_usage {
            out.push(self.frame(Vec::new(), Some(usage)));
        }
        out.push(sse::done_frame());
    }
}

struct ChatStream {
    head: ChunkHead,
    logprobs: bool,
    tok: Tokenizer,
    /// Logprobs of content tokens not yet sent (their text may be held back).
    pending_logprobs: Vec<Vec<TokenLogprobOut>>,
}

impl ChatStream {
    fn chunk(&self, choice: Value) -> axum::body::Bytes {
        self.head.frame(vec![choice], None)
    }

    fn delta_chunks(
        &mut self,
        choice: usize,
        deltas: Vec<Delta>,
        out: &mut Vec<axum::body::Bytes>,
    ) {
        for d in deltas {
            let delta = match d {
                Delta::Text(s) | Delta::Content(s) => json!({"content": s}),
                Delta::Reasoning(s) => json!({"reasoning_content": s}),
                Delta::ToolCallStart { index, id, name } => json!({"tool_calls": [{
                    "index": index, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}
                }]}),
                Delta::ToolCallArguments { index, arguments } => json!({"tool_calls": [{
                    "index": index, "function": {"arguments": arguments}
                }]}),
            };
            let is_content = delta.get("content").is_some();
            let logprobs = if self.logprobs && is_content {
                let lp = std::mem::take(&mut self.pending_logprobs[choice]);
                json!({"content": lp})
            } else {
                Value::Null
            };
            out.push(self.chunk(json!({"index": choice, "delta": delta, "logprobs": logprobs, "finish_reason": null})));
        }
    }
}

impl StreamConverter for ChatStream {
    fn on_event(
        &mut self,
        _index: usize,
        event: RequestEvent,
        out: &mut Vec<axum::body::Bytes>,
    ) -> bool {
        match event {
            RequestEvent::Token {
                choice,
                token,
                kind,
                logprob,
                deltas,
            } => {
                if self.logprobs
                    && kind == TokenKind::Content
                    && let Some(lp) = logprob
                {
                    let e = logprob_entry(&self.tok, token, &lp);
                    self.pending_logprobs[choice].push(e);
                }
                self.delta_chunks(choice, deltas, out);
                false
            }
            RequestEvent::Finished {
                choice,
                reason,
                deltas,
                ..
            } => {
                self.delta_chunks(choice, deltas, out);
                let logprobs = if self.logprobs {
                    json!({"content": std::mem::take(&mut self.pending_logprobs[choice])})
                } else {
                    Value::Null
                };
                out.push(self.chunk(json!({"index": choice, "delta": {}, "logprobs": logprobs, "finish_reason": reason.as_str()})));
                false
            }
            RequestEvent::Done { usage } => {
                self.head.finish(usage.into(), out);
                true
            }
            RequestEvent::Error { message } => {
                sse::error_frames(ApiError::internal(message), out);
                true
            }
        }
    }

    fn on_abort(&mut self, out: &mut Vec<axum::body::Bytes>) {
        sse::error_frames(ApiError::unavailable("The server is shutting down."), out);
    }
}

// ---- completions --------------------------------------------------------------------------

/// Stop tokens of a raw completion: `<|endoftext|>`, `<|return|>`, `<|call|>`.
pub const COMPLETION_STOP_TOKENS: [u32; 3] =
    [tokenizer::ENDOFTEXT, tokenizer::RETURN, tokenizer::CALL];

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let state = &state;
    let body = request_body(state, body)?;
    let req: CompletionRequest = parse_json(&body)?;
    let model = check_model(state, req.model.as_deref())?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::param("suffix", "'suffix' is not supported."));
    }
    let top = match req.logprobs {
        None => None,
        Some(k) if (0..=20).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                format!(
                    "Invalid 'logprobs': expected a value between 0 and 20, but got {k} instead."
                ),
                Some("logprobs"),
                Some("invalid_value"),
            ));
        }
    };
    let sampling = sampling_params(
        req.temperature,
        req.top_p,
        req.top_k,
        req.min_p,
        req.presence_penalty,
        req.frequency_penalty,
        req.repetition_penalty,
        req.seed,
        top,
    )?;
    let n = resolve_n(state, req.n)?;
    let vocab = state.engine.info().model.vocab_size;
    let st = Arc::clone(state);
    let prompt_input = req.prompt.clone();
    let prompts: Vec<Vec<u32>> = blocking(move || -> Result<Vec<Vec<u32>>, ApiError> {
        let tok = st.encoding.tokenizer();
        let enc = |s: &str| {
            tok.encode_ordinary(s).map_err(|e| {
                ApiError::param("prompt", format!("Could not tokenize the prompt: {e}"))
            })
        };
        Ok(match prompt_input {
            PromptInput::Text(s) => vec![enc(&s)?],
            PromptInput::Texts(v) => v.iter().map(|s| enc(s)).collect::<Result<_, _>>()?,
            PromptInput::Tokens(t) => vec![t],
            PromptInput::TokenLists(v) => v,
        })
    })
    .await??;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid(
            "The prompt is empty.",
            Some("prompt"),
            Some("invalid_value"),
        ));
    }
    if let Some(&t) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::param(
            "prompt",
            format!("Token id {t} is out of vocabulary (size {vocab})."),
        ));
    }
    let max_model_len = state.engine.info().config.max_model_len;
    let stop = req.stop.map(StringOrList::into_vec).unwrap_or_default();
    let mut requests = Vec::with_capacity(prompts.len());
    let echo = req.echo.unwrap_or(false);
    let tok = state.encoding.tokenizer().clone();
    let echoes: Vec<String> = prompts
        .iter()
        .map(|p| if echo { tok.decode(p) } else { String::new() })
        .collect();
    for p in prompts {
        let max_tokens = resolve_max_tokens(
            req.max_tokens,
            "max_tokens",
            "prompt",
            p.len(),
            max_model_len,
            Some(16),
        )?;
        let mut r = Request::new(p);
        r.sampling = sampling.clone();
        r.max_tokens = max_tokens;
        r.n = n;
        r.stop = stop.clone();
        r.stop_token_ids = COMPLETION_STOP_TOKENS.to_vec();
        r.output = OutputMode::Text;
        requests.push(r);
    }
    let num_prompts = requests.len();
    let sub = submit(state, requests)?;
    let id = random_id("cmpl-");
    let created = now_unix();
    if req.stream.unwrap_or(false) {
        let conv = CompletionStream {
            head: ChunkHead {
                id,
                object: "text_completion",
                created,
                model,
                include_usage: req
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            },
            n,
            logprobs: top.is_some(),
            tok,
            remaining: num_prompts,
            usage: UsageInfo::default(),
            offsets: vec![0; num_prompts * n],
        };
        let mut initial = Vec::new();
        if echo {
            for (p, e) in echoes.iter().enumerate() {
                for i in 0..n {
                    initial.push(conv.chunk(json!({"index": p * n + i, "text": e, "logprobs": null, "finish_reason": null})));
                }
            }
        }
        return Ok(sse::sse_response(sub, conv, initial));
    }
    let results = collect_all(sub).await?;
    let mut choices = Vec::new();
    let mut usage = UsageInfo::default();
    for (p, (events, u)) in results.into_iter().enumerate() {
        usage += u;
        let mut texts: Vec<String> = vec![echoes[p].clone(); n];
        let mut lps: Vec<CompletionLogprobs> = vec![CompletionLogprobs::default(); n];
        let mut finish = vec![None; n];
        for ev in events {
            match ev {
                RequestEvent::Token {
                    choice,
                    token,
                    logprob,
                    deltas,
                    ..
                } => {
                    if let Some(lp) = logprob {
                        push_completion_logprob(
                            &tok,
                            &mut lps[choice],
                            texts[choice].len(),
                            token,
                            &lp,
                        );
                    }
                    texts[choice].push_str(&delta_text(deltas));
                }
                RequestEvent::Finished {
                    choice,
                    reason,
                    deltas,
                    ..
                } => {
                    texts[choice].push_str(&delta_text(deltas));
                    finish[choice] = Some(reason.as_str());
                }
                _ => {}
            }
        }
        for (i, ((text, lp), fin)) in texts.into_iter().zip(lps).zip(finish).enumerate() {
            choices.push(CompletionChoice {
                index: p * n + i,
                text,
                logprobs: top.is_some().then_some(lp),
                finish_reason: fin,
            });
        }
    }
    Ok(axum::Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices,
        usage,
        system_fingerprint: None,
    })
    .into_response())
}

fn push_completion_logprob(
    tok: &Tokenizer,
    lps: &mut CompletionLogprobs,
    offset: usize,
    token: u32,
    lp: &TokenLogprob,
) {
    let (text, _) = token_text(tok, token);
    lps.tokens.push(text);
    lps.token_logprobs.push(lp.logprob);
    lps.text_offset.push(offset);
    let mut top = Map::new();
    for &(t, l) in &lp.top {
        top.insert(token_text(tok, t).0, json!(l));
    }
    lps.top_logprobs.push(top);
}

/// The text of a raw completion's deltas.
fn delta_text(deltas: Vec<Delta>) -> String {
    deltas
        .into_iter()
        .filter_map(|d| {
            if let Delta::Text(s) = d {
                Some(s)
            } else {
                None
            }
        })
        .collect()
}

struct CompletionStream {
    head: ChunkHead,
    n: usize,
    logprobs: bool,
    tok: Tokenizer,
    remaining: usize,
    usage: UsageInfo,
    offsets: Vec<usize>,
}

impl CompletionStream {
    fn chunk(&self, choice: Value) -> axum::body::Bytes {
        self.head.frame(vec![choice], None)
    }
}

impl StreamConverter for CompletionStream {
    fn on_event(
        &mut self,
        index: usize,
        event: RequestEvent,
        out: &mut Vec<axum::body::Bytes>,
    ) -> bool {
        match event {
            RequestEvent::Token {
                choice,
                token,
                logprob,
                deltas,
                ..
            } => {
                let idx = index * self.n + choice;
                let text = delta_text(deltas);
                let lp = match (self.logprobs, logprob) {
                    (true, Some(lp)) => {
                        let mut l = CompletionLogprobs::default();
                        push_completion_logprob(&self.tok, &mut l, self.offsets[idx], token, &lp);
                        serde_json::to_value(l).expect("logprobs")
                    }
                    _ => Value::Null,
                };
                if !text.is_empty() || !lp.is_null() {
                    self.offsets[idx] += text.len();
                    out.push(self.chunk(
                        json!({"index": idx, "text": text, "logprobs": lp, "finish_reason": null}),
                    ));
                }
                false
            }
            RequestEvent::Finished {
                choice,
                reason,
                deltas,
                ..
            } => {
                let idx = index * self.n + choice;
                let text = delta_text(deltas);
                out.push(self.chunk(json!({"index": idx, "text": text, "logprobs": null, "finish_reason": reason.as_str()})));
                false
            }
            RequestEvent::Done { usage } => {
                self.usage += usage.into();
                self.remaining -= 1;
                if self.remaining > 0 {
                    return false;
                }
                self.head.finish(self.usage, out);
                true
            }
            RequestEvent::Error { message } => {
                sse::error_frames(ApiError::internal(message), out);
                true
            }
        }
    }

    fn on_abort(&mut self, out: &mut Vec<axum::body::Bytes>) {
        sse::error_frames(ApiError::unavailable("The server is shutting down."), out);
    }
}

// ---- models, health, metrics, fallback ------------------------------------------------------

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let max_model_len = state.engine.info().config.max_model_len;
    axum::Json(ModelList {
        object: "list",
        data: state
            .model_names
            .iter()
            .map(|n| ModelCard {
                id: n.clone(),
                object: "model",
                created: state.created,
                owned_by: "gptoss-rs",
                max_model_len,
            })
            .collect(),
    })
    .into_response()
}

/// `GET /health`: 200 while serving, 503 while shutting down or if the engine stopped.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match check_accepting(&state) {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = crate::metrics::render(&state.model_names[0], &state.engine.stats(), &state.metrics);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Unknown routes.
pub async fn fallback(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}
