//! Request and response bodies of the OpenAI-compatible API (the subset this server implements;
//! unknown request fields are ignored, as vLLM does).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `string` or `[string]` (the `stop` parameter).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StringOrList {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Text content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": …}`).
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (also `input_text` / `output_text`); other types are refused.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// A function called by the assistant (in a request's history or a response).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON string.
    #[serde(default)]
    pub arguments: String,
}

/// An assistant tool call in the history.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallIn {
    /// Call id.
    #[serde(default)]
    pub id: Option<String>,
    /// `function`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The call.
    pub function: FunctionCall,
}

/// A chat message (any role; fields are checked per role).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (may be null for an assistant message with tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional author name (ignored) or, for `tool`, the function's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Assistant tool calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// For `tool`: the call answered.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Assistant chain of thought (vLLM's field).
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// Alias of `reasoning_content`.
    #[serde(default)]
    pub reasoning: Option<String>,
}

/// A function tool definition.
#[derive(Debug, Clone, Deserialize)]
pub struct FunctionDef {
    /// Name: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of the arguments (an object schema).
    #[serde(default)]
    pub parameters: Option<Value>,
    /// Accepted and ignored.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// A tool of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolDef {
    /// Must be `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// Served model name.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Function tools.
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": …}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Accepted and ignored.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `low`, `medium` or `high`.
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    /// Deprecated name of `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Most tokens to generate (reasoning included).
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0..=2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass, (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k (vLLM extension).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StringOrList>,
    /// RNG seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// -2..=2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// -2..=2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty (vLLM extension).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Number of choices.
    #[serde(default)]
    pub n: Option<i64>,
    /// Stream with server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Return log-probabilities of the content tokens.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token, 0..=20 (needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Accepted and ignored.
    #[serde(default)]
    pub user: Option<String>,
}

/// `prompt` of a completion request.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// Several texts.
    Texts(Vec<String>),
    /// Several token lists.
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Served model name.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt(s).
    pub prompt: PromptInput,
    /// Most tokens to generate (default 16).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k (vLLM extension).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StringOrList>,
    /// RNG seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty (vLLM extension).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Choices per prompt.
    #[serde(default)]
    pub n: Option<i64>,
    /// Stream.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of top log-probabilities per token, 0..=20.
    #[serde(default)]
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the text.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Unsupported unless empty.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Accepted and ignored.
    #[serde(default)]
    pub user: Option<String>,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageInfo {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl std::ops::AddAssign for UsageInfo {
    /// Counts over several prompts.
    fn add_assign(&mut self, u: UsageInfo) {
        self.prompt_tokens += u.prompt_tokens;
        self.completion_tokens += u.completion_tokens;
        self.total_tokens += u.total_tokens;
    }
}

impl From<gptoss_engine::request::Usage> for UsageInfo {
    fn from(u: gptoss_engine::request::Usage) -> Self {
        UsageInfo {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// An assistant tool call in a response.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    /// Call id.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The call.
    pub function: FunctionCall,
}

/// The assistant message of a chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The final answer (null when only tool calls were made).
    pub content: Option<String>,
    /// The chain of thought (analysis channel), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Tool calls, if any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// One alternative token with its log-probability.
#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
}

/// Log-probability of one generated token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprobOut {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
    /// The most likely alternatives.
    pub top_logprobs: Vec<TopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceLogprobs {
    /// One entry per content token.
    pub content: Vec<TokenLogprobOut>,
}

/// A chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Index.
    pub index: usize,
    /// The message.
    pub message: ResponseMessage,
    /// Log-probabilities, when requested.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: Option<&'static str>,
}

/// A chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix time.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: UsageInfo,
    /// Always null.
    pub system_fingerprint: Option<String>,
}

/// `logprobs` of a completion choice (legacy format).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Alternatives per token.
    pub top_logprobs: Vec<serde_json::Map<String, Value>>,
    /// Character offsets of the tokens in the text.
    pub text_offset: Vec<usize>,
}

/// A completion choice.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Index.
    pub index: usize,
    /// Text.
    pub text: String,
    /// Log-probabilities, when requested.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
}

/// A completion.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix time.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: UsageInfo,
    /// Always null.
    pub system_fingerprint: Option<String>,
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// Served name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix time the server started.
    pub created: u64,
    /// `gptoss-rs`.
    pub owned_by: &'static str,
    /// Context length.
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// Models.
    pub data: Vec<ModelCard>,
}
