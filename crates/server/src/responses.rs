//! `POST /v1/responses` (basic): text input or input items (messages, function calls and their
//! outputs, reasoning), `instructions`, function tools, `reasoning.effort`, `max_output_tokens`,
//! streaming with the Responses API's semantic events. Stateless: `previous_response_id` is
//! refused (nothing is stored).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use gptoss_engine::request::{Delta, FinishReason, Request, RequestEvent, TokenKind, Usage};
use gptoss_model::harmony::{Conversation, DeveloperContent, Message, ToolDescription};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::errors::{ApiError, parse_json};
use crate::handlers::{
    check_model, collect_all, now_unix, random_id, render_prompt, request_body, resolve_max_tokens,
    sampling_params, submit,
};
use crate::harmony_bridge::{self, ToolChoice};
use crate::sse::{self, StreamConverter};

/// `reasoning` of a Responses request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReasoningOptions {
    /// `low`, `medium` or `high`.
    #[serde(default)]
    pub effort: Option<String>,
}

/// A function tool of a Responses request (flat form).
#[derive(Debug, Clone, Deserialize)]
pub struct ResponsesTool {
    /// Must be `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Function name.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of the arguments.
    #[serde(default)]
    pub parameters: Option<Value>,
    /// Ignored.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `POST /v1/responses`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponsesRequest {
    /// Served model name.
    #[serde(default)]
    pub model: Option<String>,
    /// A string or a list of input items.
    pub input: Value,
    /// Developer instructions.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Function tools.
    #[serde(default)]
    pub tools: Option<Vec<ResponsesTool>>,
    /// `none`, `auto`, `required` or `{"type": "function", "name": …}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Reasoning options.
    #[serde(default)]
    pub reasoning: Option<ReasoningOptions>,
    /// Most output tokens.
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    /// Temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Stream events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Refused (this server stores nothing).
    #[serde(default)]
    pub previous_response_id: Option<String>,
}

fn item_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text" | "reasoning_text", Some(t)) => {
                        out.push_str(t)
                    }
                    _ => {
                        return Err(ApiError::param(
                            &format!("{param}[{j}]"),
                            format!("Unsupported content part of type '{kind}' (text only)."),
                        ));
                    }
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::param(
            param,
            "Expected a string or a list of content parts.",
        )),
    }
}

/// Builds the conversation of a Responses request.
fn conversation(
    req: &ResponsesRequest,
    tools: Vec<ToolDescription>,
) -> Result<Conversation, ApiError> {
    let effort = harmony_bridge::parse_effort(
        req.reasoning.as_ref().and_then(|r| r.effort.as_deref()),
        "reasoning.effort",
    )?;
    let mut instructions: Vec<String> = req
        .instructions
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    let mut messages = Vec::new();
    let mut call_names: HashMap<String, String> = HashMap::new();
    match &req.input {
        Value::String(s) => messages.push(Message::user(s.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("input[{i}]");
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                let field = |name: &str| -> Result<String, ApiError> {
                    item.get(name)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            ApiError::param(
                                &format!("{p}.{name}"),
                                format!("Missing '{name}' in {p}."),
                            )
                        })
                };
                match kind {
                    "message" => {
                        let role = field("role")?;
                        let text = item_text(
                            item.get("content").unwrap_or(&Value::Null),
                            &format!("{p}.content"),
                        )?;
                        match role.as_str() {
                            "user" => messages.push(Message::user(text)),
                            "assistant" => messages.push(Message::assistant("final", text)),
                            "system" | "developer" => instructions.push(text),
                            other => {
                                return Err(ApiError::param(
                                    &format!("{p}.role"),
                                    format!("Invalid role '{other}'."),
                                ));
                            }
                        }
                    }
                    "reasoning" => {
                        let text = item_text(
                            item.get("content").unwrap_or(&Value::Null),
                            &format!("{p}.content"),
                        )?;
                        if !text.is_empty() {
                            messages.push(Message::assistant("analysis", text));
                        }
                    }
                    "function_call" => {
                        let name = field("name")?;
                        let args = item
                            .get("arguments")
                            .and_then(Value::as_str)
                            .unwrap_or("{}")
                            .to_string();
                        if let Some(id) = item.get("call_id").and_then(Value::as_str) {
                            call_names.insert(id.to_string(), name.clone());
                        }
                        messages.push(Message::function_call(&name, args));
                    }
                    "function_call_output" => {
                        let id = field("call_id")?;
                        let name = call_names.get(&id).cloned().ok_or_else(|| {
                            ApiError::param(
                                &format!("{p}.call_id"),
                                format!(
                                    "No function call with call_id '{id}' precedes this output."
                                ),
                            )
                        })?;
                        let output = match item.get("output") {
                            Some(Value::String(s)) => s.clone(),
                            Some(other) => other.to_string(),
                            None => String::new(),
                        };
                        messages.push(Message::function_result(&name, output));
                    }
                    other => {
                        return Err(ApiError::param(
                            &format!("{p}.type"),
                            format!("Unsupported input item type '{other}'."),
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(ApiError::param(
                "input",
                "'input' must be a string or a list of items.",
            ));
        }
    }
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "'input' is empty.",
            Some("input"),
            Some("empty_array"),
        ));
    }
    let has_tools = !tools.is_empty();
    let mut developer = DeveloperContent::default().with_function_tools(tools);
    if !instructions.is_empty() {
        developer = developer.with_instructions(instructions.join("\n\n"));
    }
    let mut conv =
        Conversation::new().with_system(harmony_bridge::system_content(effort, has_tools));
    if developer.instructions.is_some() || has_tools {
        conv = conv.with_developer(developer);
    }
    conv.messages = messages;
    Ok(conv)
}

/// `POST /v1/responses`.
pub async fn responses(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let state = &state;
    let body = request_body(state, body)?;
    let req: ResponsesRequest = parse_json(&body)?;
    let model = check_model(state, req.model.as_deref())?;
    if req.previous_response_id.is_some() {
        return Err(ApiError::param(
            "previous_response_id",
            "This server does not store responses: send the whole conversation in 'input'.",
        ));
    }
    let mut tools = Vec::new();
    for (i, t) in req.tools.iter().flatten().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::param(
                &format!("tools[{i}].type"),
                format!("Unsupported tool type '{}' (only 'function').", t.kind),
            ));
        }
        tools.push(harmony_bridge::function_tool(
            t.name.as_deref().unwrap_or(""),
            t.description.as_deref(),
            t.parameters.as_ref(),
            &format!("tools[{i}]"),
        )?);
    }
    let choice = harmony_bridge::parse_tool_choice(req.tool_choice.as_ref(), &tools)?;
    let sampling = sampling_params(
        req.temperature,
        req.top_p,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )?;
    let tools_json: Vec<Value> = req
        .tools
        .iter()
        .flatten()
        .map(|t| json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict.unwrap_or(false)}))
        .collect();
    let shown = if choice == ToolChoice::None {
        Vec::new()
    } else {
        tools
    };
    let conv = conversation(&req, shown)?;
    let (prompt, forced) = render_prompt(state, conv, choice, "input").await?;
    let max_model_len = state.engine.info().config.max_model_len;
    let max_tokens = resolve_max_tokens(
        req.max_output_tokens,
        "max_output_tokens",
        "input",
        prompt.len() + forced.len(),
        max_model_len,
        None,
    )?;
    let mut request = Request::chat(prompt);
    request.forced_prefix = forced;
    request.sampling = sampling.clone();
    request.max_tokens = max_tokens;
    let sub = submit(state, vec![request])?;
    let mut b = Builder {
        id: random_id("resp_"),
        created: now_unix(),
        model,
        items: Vec::new(),
        open: None,
        seq: 0,
        reasoning_tokens: 0,
        echo: json!({
            "instructions": req.instructions,
            "tools": tools_json,
            "tool_choice": req.tool_choice.clone().unwrap_or(json!("auto")),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_output_tokens": req.max_output_tokens,
            "reasoning": {"effort": req.reasoning.as_ref().and_then(|r| r.effort.clone()), "summary": null},
        }),
    };
    if req.stream.unwrap_or(false) {
        let mut initial = Vec::new();
        let r = b.response("in_progress", None, None);
        b.emit(&mut initial, "response.created", json!({"response": r}));
        b.emit(&mut initial, "response.in_progress", json!({"response": r}));
        return Ok(sse::sse_response(
            sub,
            ResponsesStream { b, finish: None },
            initial,
        ));
    }
    let mut results = collect_all(sub).await?;
    let (events, usage) = results.pop().expect("one prompt");
    let mut sink = Vec::new();
    let mut finish = None;
    for ev in events {
        match ev {
            RequestEvent::Token { kind, deltas, .. } => b.token(kind, deltas, &mut sink),
            RequestEvent::Finished { reason, deltas, .. } => {
                b.deltas(deltas, &mut sink);
                finish = Some(reason);
            }
            _ => {}
        }
    }
    b.close(&mut sink);
    let usage = Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    };
    let status = if finish == Some(FinishReason::Length) {
        "incomplete"
    } else {
        "completed"
    };
    Ok(axum::Json(b.response(status, Some(usage), finish)).into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemKind {
    Reasoning,
    Message,
    Call,
}

struct Item {
    kind: ItemKind,
    id: String,
    text: String,
    call_id: String,
    name: String,
}

impl Item {
    fn json(&self, status: &str) -> Value {
        match self.kind {
            ItemKind::Reasoning => json!({
                "type": "reasoning", "id": self.id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": self.text}],
            }),
            ItemKind::Message => json!({
                "type": "message", "id": self.id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}],
            }),
            ItemKind::Call => json!({
                "type": "function_call", "id": self.id, "call_id": self.call_id,
                "name": self.name, "arguments": self.text, "status": status,
            }),
        }
    }
}

/// Builds output items from deltas and, when streaming, the semantic events.
struct Builder {
    id: String,
    created: u64,
    model: String,
    items: Vec<Item>,
    open: Option<usize>,
    seq: u64,
    reasoning_tokens: usize,
    echo: Value,
}

type Frames = Vec<axum::body::Bytes>;

impl Builder {
    fn emit(&mut self, out: &mut Frames, kind: &str, mut v: Value) {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push(sse::event_frame(kind, &v));
    }

    fn open(&mut self, kind: ItemKind, out: &mut Frames, call: Option<(String, String)>) {
        self.close(out);
        let (call_id, name) = call.unwrap_or_default();
        let prefix = match kind {
            ItemKind::Reasoning => "rs_",
            ItemKind::Message => "msg_",
            ItemKind::Call => "fc_",
        };
        let item = Item {
            kind,
            id: random_id(prefix),
            text: String::new(),
            call_id,
            name,
        };
        let idx = self.items.len();
        let mut added = item.json("in_progress");
        if kind != ItemKind::Call {
            added["content"] = json!([]);
        }
        let item_id = item.id.clone();
        self.items.push(item);
        self.open = Some(idx);
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": idx, "item": added}),
        );
        if kind == ItemKind::Message {
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": idx, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            );
        }
    }

    fn close(&mut self, out: &mut Frames) {
        let Some(idx) = self.open.take() else { return };
        let (kind, id, text) = {
            let it = &self.items[idx];
            (it.kind, it.id.clone(), it.text.clone())
        };
        match kind {
            ItemKind::Reasoning => self.emit(
                out,
                "response.reasoning_text.done",
                json!({"item_id": id, "output_index": idx, "content_index": 0, "text": text}),
            ),
            ItemKind::Message => {
                self.emit(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": idx, "content_index": 0, "text": text, "logprobs": []}),
                );
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": idx, "content_index": 0,
                           "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}),
                );
            }
            ItemKind::Call => {
                let name = self.items[idx].name.clone();
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": idx, "arguments": text, "name": name}),
                );
            }
        }
        let item = self.items[idx].json("completed");
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": idx, "item": item}),
        );
    }

    fn append(&mut self, kind: ItemKind, text: String, out: &mut Frames) {
        if self.open.is_none_or(|i| self.items[i].kind != kind) {
            self.open(kind, out, None);
        }
        let idx = self.open.expect("open item");
        let id = self.items[idx].id.clone();
        self.items[idx].text.push_str(&text);
        match kind {
            ItemKind::Reasoning => self.emit(
                out,
                "response.reasoning_text.delta",
                json!({"item_id": id, "output_index": idx, "content_index": 0, "delta": text}),
            ),
            ItemKind::Message => self.emit(
                out,
                "response.output_text.delta",
                json!({"item_id": id, "output_index": idx, "content_index": 0, "delta": text, "logprobs": []}),
            ),
            ItemKind::Call => self.emit(
                out,
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": idx, "delta": text}),
            ),
        }
    }

    fn delta(&mut self, d: Delta, out: &mut Frames) {
        match d {
            Delta::Reasoning(s) => self.append(ItemKind::Reasoning, s, out),
            Delta::Content(s) | Delta::Text(s) => self.append(ItemKind::Message, s, out),
            Delta::ToolCallStart { id, name, .. } => {
                self.open(ItemKind::Call, out, Some((id, name)))
            }
            Delta::ToolCallArguments { arguments, .. } => {
                self.append(ItemKind::Call, arguments, out)
            }
        }
    }

    fn deltas(&mut self, deltas: Vec<Delta>, out: &mut Frames) {
        for d in deltas {
            self.delta(d, out);
        }
    }

    /// A generated token's deltas (a reasoning token is counted).
    fn token(&mut self, kind: TokenKind, deltas: Vec<Delta>, out: &mut Frames) {
        if kind == TokenKind::Reasoning {
            self.reasoning_tokens += 1;
        }
        self.deltas(deltas, out);
    }

    fn response(&self, status: &str, usage: Option<Usage>, finish: Option<FinishReason>) -> Value {
        let output: Vec<Value> = if status == "in_progress" {
            Vec::new()
        } else {
            self.items.iter().map(|i| i.json("completed")).collect()
        };
        let mut v = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "error": null,
            "incomplete_details": if finish == Some(FinishReason::Length) { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": {},
            "store": false,
            "usage": usage.map(|u| json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            })),
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), self.echo.as_object()) {
            for (k, val) in e {
                o.insert(k.clone(), val.clone());
            }
        }
        v
    }
}

struct ResponsesStream {
    b: Builder,
    finish: Option<FinishReason>,
}

impl StreamConverter for ResponsesStream {
    fn on_event(&mut self, _index: usize, event: RequestEvent, out: &mut Frames) -> bool {
        match event {
            RequestEvent::Token { kind, deltas, .. } => {
                self.b.token(kind, deltas, out);
                false
            }
            RequestEvent::Finished { reason, deltas, .. } => {
                self.b.deltas(deltas, out);
                self.b.close(out);
                self.finish = Some(reason);
                false
            }
            RequestEvent::Done { usage } => {
                let (status, kind) = if self.finish == Some(FinishReason::Length) {
                    ("incomplete", "response.incomplete")
                } else {
                    ("completed", "response.completed")
                };
                let r = self.b.response(status, Some(usage), self.finish);
                self.b.emit(out, kind, json!({"response": r}));
                true
            }
            RequestEvent::Error { message } => {
                let r = self.b.response("failed", None, None);
                self.b.emit(
                    out,
                    "error",
                    json!({"code": "server_error", "message": message, "param": null}),
                );
                self.b.emit(out, "response.failed", json!({"response": r}));
                true
            }
        }
    }

    fn on_abort(&mut self, out: &mut Frames) {
        let r = self.b.response("failed", None, None);
        self.b.emit(out, "response.failed", json!({"response": r}));
    }
}
