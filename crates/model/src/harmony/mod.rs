//! The Harmony chat format of GPT-OSS: rendering conversations into prompt tokens and parsing the
//! model's output tokens back into messages.
//!
//! Semantics follow OpenAI's `openai-harmony` crate (0.0.8, `src/encoding.rs`), which is not a
//! dependency: rendering is string building plus the [`Tokenizer`], parsing is token matching.
//!
//! ```text
//! message = <|start|> header <|message|> content ( <|end|> | <|return|> | <|call|> )
//! header  = role [" to=" recipient] [<|channel|> channel [" to=" recipient]] [" " content-type]
//! ```
//!
//! - [`HarmonyEncoding::render_conversation_for_completion`] renders the prompt, ending with
//!   `<|start|>assistant`; sampling then stops on [`stop_tokens_for_assistant`].
//! - [`StreamingParser`] turns the sampled tokens into [`ParserEvent`]s and [`Message`]s.

mod parser;
mod render;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::tokenizer::{self, Tokenizer, TokenizerError};

pub use parser::{ParserEvent, StopReason, StreamingParser};
pub use render::{RenderOptions, json_schema_to_typescript};

/// The model identity line of the default system message.
pub const DEFAULT_MODEL_IDENTITY: &str =
    "You are ChatGPT, a large language model trained by OpenAI.";
/// The knowledge cutoff of the default system message.
pub const DEFAULT_KNOWLEDGE_CUTOFF: &str = "2024-06";
/// The `content_type` of a JSON tool call: `<|constrain|>` (a special token when rendered)
/// followed by `json`.
pub const CONSTRAIN_JSON: &str = "<|constrain|>json";
/// The namespace of function tools (`functions.NAME` recipients).
pub const FUNCTIONS_NAMESPACE: &str = "functions";

/// Tokens that end a whole assistant turn: `<|return|>` (final answer) and `<|call|>` (tool
/// call). `<|end|>` only closes an intermediate message, so it is not one of them.
pub fn stop_tokens_for_assistant() -> [u32; 2] {
    [tokenizer::RETURN, tokenizer::CALL]
}

/// All message terminators: `<|return|>`, `<|end|>` and `<|call|>` (harmony's `stop_tokens()`).
pub fn stop_tokens() -> [u32; 3] {
    [tokenizer::RETURN, tokenizer::END, tokenizer::CALL]
}

/// Why rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum HarmonyError {
    /// The tokenizer could not encode some text.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A tool message must name its tool (`functions.NAME`).
    #[error("a tool message needs a tool name as its author")]
    ToolWithoutName,
}

/// Who wrote a message. A tool is named by the tool itself (e.g. `functions.get_weather`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// The system message (model identity, dates, reasoning effort, channels).
    System,
    /// The developer message (what other formats call the system prompt, and function tools).
    Developer,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// The output of a tool, authored by the tool's name (e.g. `functions.get_weather`).
    Tool(String),
}

impl Role {
    /// The role as written in a header: `system`, ..., or the tool's name.
    pub fn as_str(&self) -> &str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool(name) => name,
        }
    }

    /// Parses a header's role word; anything that is not one of the four roles is a tool name.
    pub fn parse(s: &str) -> Role {
        match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => Role::Tool(other.to_string()),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Role::parse(&String::deserialize(d)?))
    }
}

/// One message of a conversation.
///
/// System and developer messages with structured content live in [`Conversation::system`] and
/// [`Conversation::developer`]; a `Message` with those roles renders its `content` verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The author.
    pub role: Role,
    /// Whom the message is for: `functions.NAME` for a tool call, `assistant` for a tool result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// `analysis`, `commentary` or `final` (assistant and tool messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The content type of a tool call, e.g. [`CONSTRAIN_JSON`] or `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with only a role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            recipient: None,
            channel: None,
            content_type: None,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content)
    }

    /// An assistant message on `channel` (`analysis`, `commentary` or `final`).
    pub fn assistant(channel: impl Into<String>, content: impl Into<String>) -> Message {
        Message::new(Role::Assistant, content).with_channel(channel)
    }

    /// An assistant call of function tool `name` with JSON `arguments`, as the model writes it:
    /// recipient `functions.NAME`, channel `commentary`, content type `<|constrain|>json`.
    pub fn function_call(name: &str, arguments: impl Into<String>) -> Message {
        Message::new(Role::Assistant, arguments)
            .with_recipient(format!("{FUNCTIONS_NAMESPACE}.{name}"))
            .with_channel("commentary")
            .with_content_type(CONSTRAIN_JSON)
    }

    /// The result of function tool `name`, sent back to the model:
    /// `<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>…<|end|>`.
    pub fn function_result(name: &str, output: impl Into<String>) -> Message {
        Message::new(Role::Tool(format!("{FUNCTIONS_NAMESPACE}.{name}")), output)
            .with_recipient("assistant")
            .with_channel("commentary")
    }

    /// Sets the channel.
    pub fn with_channel(mut self, channel: impl Into<String>) -> Message {
        self.channel = Some(channel.into());
        self
    }

    /// Sets the recipient.
    pub fn with_recipient(mut self, recipient: impl Into<String>) -> Message {
        self.recipient = Some(recipient.into());
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Message {
        self.content_type = Some(content_type.into());
        self
    }

    /// For an assistant call of a function tool, the function's name (`functions.NAME` → NAME).
    pub fn function_name(&self) -> Option<&str> {
        if self.role != Role::Assistant {
            return None;
        }
        self.recipient
            .as_deref()?
            .strip_prefix(FUNCTIONS_NAMESPACE)?
            .strip_prefix('.')
    }
}

/// How much the model should think before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    /// `Reasoning: low`.
    Low,
    /// `Reasoning: medium` (harmony's default).
    #[default]
    Medium,
    /// `Reasoning: high`.
    High,
}

impl ReasoningEffort {
    /// `low`, `medium` or `high`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

impl fmt::Display for ReasoningEffort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReasoningEffort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(ReasoningEffort::Low),
            "medium" => Ok(ReasoningEffort::Medium),
            "high" => Ok(ReasoningEffort::High),
            other => Err(format!(
                "unknown reasoning effort {other:?} (expected low, medium or high)"
            )),
        }
    }
}

/// The content of the system message. [`Default`] is harmony's `SystemContent::default()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemContent {
    /// First line; [`DEFAULT_MODEL_IDENTITY`] by default. OpenAI advises against changing it
    /// (use the developer message for a persona).
    pub model_identity: Option<String>,
    /// `Knowledge cutoff: …`; [`DEFAULT_KNOWLEDGE_CUTOFF`] by default.
    pub knowledge_cutoff: Option<String>,
    /// `Current date: YYYY-MM-DD`; omitted when `None`.
    pub conversation_start_date: Option<String>,
    /// `Reasoning: …`; medium by default.
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Valid channels; `analysis`, `commentary`, `final` by default. Empty omits the line.
    pub channels: Vec<String>,
    /// Appends "Channel must be included for every message." (default true).
    pub channel_required: bool,
    /// Adds "Calls to these tools must go to the commentary channel: 'functions'.". Rendering a
    /// [`Conversation`] whose developer content has tools turns it on by itself.
    pub has_function_tools: bool,
}

impl Default for SystemContent {
    fn default() -> Self {
        SystemContent {
            model_identity: Some(DEFAULT_MODEL_IDENTITY.to_string()),
            knowledge_cutoff: Some(DEFAULT_KNOWLEDGE_CUTOFF.to_string()),
            conversation_start_date: None,
            reasoning_effort: Some(ReasoningEffort::Medium),
            channels: ["analysis", "commentary", "final"]
                .map(String::from)
                .to_vec(),
            channel_required: true,
            has_function_tools: false,
        }
    }
}

impl SystemContent {
    /// Sets the reasoning effort.
    pub fn with_reasoning_effort(mut self, effort: ReasoningEffort) -> Self {
        self.reasoning_effort = Some(effort);
        self
    }

    /// Sets the current date (`YYYY-MM-DD`).
    pub fn with_conversation_start_date(mut self, date: impl Into<String>) -> Self {
        self.conversation_start_date = Some(date.into());
        self
    }

    /// Sets the knowledge cutoff.
    pub fn with_knowledge_cutoff(mut self, cutoff: impl Into<String>) -> Self {
        self.knowledge_cutoff = Some(cutoff.into());
        self
    }

    /// Sets the model identity line.
    pub fn with_model_identity(mut self, identity: impl Into<String>) -> Self {
        self.model_identity = Some(identity.into());
        self
    }
}

/// A function tool the model may call, declared in the developer message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolDescription {
    /// The function's name (called as `functions.NAME`).
    pub name: String,
    /// What it does; each line becomes a `//` comment.
    pub description: String,
    /// JSON schema of the arguments; `None` (or JSON `null`) renders `() => any`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

impl ToolDescription {
    /// A tool description.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        parameters: Option<serde_json::Value>,
    ) -> Self {
        ToolDescription {
            name: name.into(),
            description: description.into(),
            parameters,
        }
    }
}

/// The content of the developer message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeveloperContent {
    /// `# Instructions` section (the "system prompt").
    pub instructions: Option<String>,
    /// Function tools, rendered as `namespace functions { … }`.
    #[serde(default)]
    pub tools: Vec<ToolDescription>,
}

impl DeveloperContent {
    /// Sets the instructions.
    pub fn with_instructions(mut self, instructions: impl Into<String>) -> Self {
        self.instructions = Some(instructions.into());
        self
    }

    /// Sets the function tools.
    pub fn with_function_tools(mut self, tools: Vec<ToolDescription>) -> Self {
        self.tools = tools;
        self
    }
}

/// A conversation: optional system and developer content (rendered first, in that order), then
/// the messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The system message; `None` renders none.
    #[serde(default)]
    pub system: Option<SystemContent>,
    /// The developer message; `None` renders none.
    #[serde(default)]
    pub developer: Option<DeveloperContent>,
    /// User, assistant and tool messages, in order.
    #[serde(default)]
    pub messages: Vec<Message>,
}

impl Conversation {
    /// An empty conversation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the system content.
    pub fn with_system(mut self, system: SystemContent) -> Self {
        self.system = Some(system);
        self
    }

    /// Sets the developer content.
    pub fn with_developer(mut self, developer: DeveloperContent) -> Self {
        self.developer = Some(developer);
        self
    }

    /// Appends a message.
    pub fn with_message(mut self, message: Message) -> Self {
        self.messages.push(message);
        self
    }

    /// Appends a message.
    pub fn push(&mut self, message: Message) {
        self.messages.push(message);
    }
}

/// Renders conversations to tokens and creates parsers, with one [`Tokenizer`].
#[derive(Debug, Clone)]
pub struct HarmonyEncoding {
    tokenizer: Tokenizer,
}

impl HarmonyEncoding {
    /// Uses `tokenizer` (either source: they give identical ids).
    pub fn new(tokenizer: Tokenizer) -> Self {
        HarmonyEncoding { tokenizer }
    }

    /// With the embedded o200k_harmony tokenizer.
    pub fn embedded() -> Result<Self, TokenizerError> {
        Ok(Self::new(Tokenizer::embedded()?))
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The prompt for the model's next turn: the conversation (history rules applied, see
    /// [`RenderOptions`]) followed by `<|start|>` and `next_role` (normally
    /// [`Role::Assistant`]).
    pub fn render_conversation_for_completion(
        &self,
        conversation: &Conversation,
        next_role: &Role,
    ) -> Result<Vec<u32>, HarmonyError> {
        self.render_conversation_for_completion_with(
            conversation,
            next_role,
            &RenderOptions::default(),
        )
    }

    /// [`Self::render_conversation_for_completion`] with explicit options.
    pub fn render_conversation_for_completion_with(
        &self,
        conversation: &Conversation,
        next_role: &Role,
        options: &RenderOptions,
    ) -> Result<Vec<u32>, HarmonyError> {
        let mut pieces = render::conversation_pieces(conversation, options)?;
        render::completion_start_pieces(&mut pieces, next_role)?;
        render::pieces_to_tokens(&self.tokenizer, &pieces)
    }

    /// The conversation alone, without a trailing `<|start|>`.
    pub fn render_conversation(
        &self,
        conversation: &Conversation,
        options: &RenderOptions,
    ) -> Result<Vec<u32>, HarmonyError> {
        let pieces = render::conversation_pieces(conversation, options)?;
        render::pieces_to_tokens(&self.tokenizer, &pieces)
    }

    /// One message, `<|start|>…<|end|>` (or `…<|call|>` for an assistant tool call).
    pub fn render_message(&self, message: &Message) -> Result<Vec<u32>, HarmonyError> {
        let mut pieces = Vec::new();
        render::message_pieces(&mut pieces, message)?;
        render::pieces_to_tokens(&self.tokenizer, &pieces)
    }

    /// A parser for the completion of a prompt that ended with `<|start|>assistant`.
    pub fn parser_for_completion(&self) -> StreamingParser {
        StreamingParser::new_for_completion(&self.tokenizer, Role::Assistant)
    }

    /// Parses a whole completion (after `<|start|>assistant`) into messages.
    pub fn parse_completion(&self, tokens: &[u32]) -> Vec<Message> {
        let mut parser = self.parser_for_completion();
        for &token in tokens {
            parser.push(token);
        }
        parser.finish();
        parser.into_messages()
    }
}

/// The prompt of [`HarmonyEncoding::render_conversation_for_completion`] as text, special tokens
/// spelled out (`<|start|>…`). For logs and tests: encoding this text with special tokens
/// allowed is *not* a safe way to build the prompt (user text could contain `<|start|>`).
pub fn render_conversation_for_completion_text(
    conversation: &Conversation,
    next_role: &Role,
    options: &RenderOptions,
) -> Result<String, HarmonyError> {
    let mut pieces = render::conversation_pieces(conversation, options)?;
    render::completion_start_pieces(&mut pieces, next_role)?;
    Ok(render::pieces_to_text(&pieces))
}

/// The messages of a conversation as text (see [`render_conversation_for_completion_text`]).
pub fn render_conversation_text(
    conversation: &Conversation,
    options: &RenderOptions,
) -> Result<String, HarmonyError> {
    let pieces = render::conversation_pieces(conversation, options)?;
    Ok(render::pieces_to_text(&pieces))
}
