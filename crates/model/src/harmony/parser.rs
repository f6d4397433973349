//! Streaming parser for Harmony completions (the semantics of `openai-harmony`'s
//! `StreamableParser`, non-strict: malformed output never fails, it degrades to text).

use super::{Message, Role};
use crate::tokenizer::{self, StreamDecoder, Tokenizer};

/// Past this many header tokens without `<|message|>`, the "header" is taken to be text the model
/// wrote without a header. Real headers (`<|channel|>commentary to=functions.NAME <|constrain|>json`)
/// are a dozen tokens or so.
const MAX_HEADER_TOKENS: usize = 64;

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// `<|return|>`: the final answer is complete.
    Return,
    /// `<|call|>`: the last message is a tool call waiting for its result.
    Call,
}

/// What a token changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParserEvent {
    /// A message header is complete (`<|message|>` seen); content follows.
    MessageStart {
        /// The author (normally the assistant).
        role: Role,
        /// `analysis`, `commentary`, `final`, or `None` if the header named none.
        channel: Option<String>,
        /// `functions.NAME` for a tool call.
        recipient: Option<String>,
        /// e.g. `<|constrain|>json` or `json`.
        content_type: Option<String>,
    },
    /// New text of the current message (whole UTF-8 characters only).
    ContentDelta {
        /// The current message's channel.
        channel: Option<String>,
        /// The current message's recipient.
        recipient: Option<String>,
        /// The text.
        text: String,
    },
    /// The current message is complete.
    MessageEnd {
        /// The message (also appended to [`StreamingParser::messages`]).
        message: Message,
    },
    /// A stop token: the assistant's turn is over.
    Stop {
        /// Which stop token.
        reason: StopReason,
    },
}

#[derive(Debug, Clone)]
struct Header {
    role: Role,
    channel: Option<String>,
    recipient: Option<String>,
    content_type: Option<String>,
}

#[derive(Debug, Clone)]
enum State {
    /// Between messages: waiting for `<|start|>`.
    ExpectStart,
    /// Inside a header; `role` is known when the prompt already wrote it.
    Header {
        role: Option<Role>,
        tokens: Vec<u32>,
    },
    /// Inside content.
    Content {
        header: Header,
        content: String,
        decoder: StreamDecoder,
    },
}

/// Parses generated tokens one at a time into [`ParserEvent`]s and [`Message`]s.
///
/// Accepts the recipient before or after `<|channel|>` and the content type with or without
/// `<|constrain|>`; `<|end|>` followed by `<|start|>assistant…` continues with a new message;
/// `<|return|>` and `<|call|>` end the turn. Malformed output does not fail: text outside any
/// header becomes `final` content, stray special tokens are skipped, unknown ids become U+FFFD.
#[derive(Debug, Clone)]
pub struct StreamingParser {
    tokenizer: Tokenizer,
    state: State,
    messages: Vec<Message>,
    stop_reason: Option<StopReason>,
}

impl StreamingParser {
    /// A parser for a stream of whole messages (`<|start|>role…`).
    pub fn new(tokenizer: &Tokenizer) -> Self {
        StreamingParser {
            tokenizer: tokenizer.clone(),
            state: State::ExpectStart,
            messages: Vec::new(),
            stop_reason: None,
        }
    }

    /// A parser for the completion of a prompt that ended with `<|start|>` and `role` (normally
    /// [`Role::Assistant`]): it starts inside that message's header.
    pub fn new_for_completion(tokenizer: &Tokenizer, role: Role) -> Self {
        StreamingParser {
            state: State::Header {
                role: Some(role),
                tokens: Vec::new(),
            },
            ..Self::new(tokenizer)
        }
    }

    /// Feeds one token; returns what it changed (often one `ContentDelta`, often nothing).
    pub fn push(&mut self, token: u32) -> Vec<ParserEvent> {
        let mut events = Vec::new();
        self.step(token, &mut events);
        events
    }

    fn step(&mut self, token: u32, events: &mut Vec<ParserEvent>) {
        let state = std::mem::replace(&mut self.state, State::ExpectStart);
        self.state = match state {
            State::ExpectStart => match token {
                tokenizer::START => State::Header {
                    role: None,
                    tokens: Vec::new(),
                },
                tokenizer::RETURN | tokenizer::CALL => {
                    self.stop(token, events);
                    State::ExpectStart
                }
                // Text or a header token without `<|start|>`: the model skipped it; parse what
                // follows as a header of unknown role (text alone ends up as content).
                tokenizer::CHANNEL | tokenizer::CONSTRAIN | tokenizer::MESSAGE => {
                    self.state = State::Header {
                        role: None,
                        tokens: Vec::new(),
                    };
                    return self.step(token, events);
                }
                t if self.tokenizer.is_special(t) => State::ExpectStart,
                t => State::Header {
                    role: None,
                    tokens: vec![t],
                },
            },
            State::Header { role, mut tokens } => match token {
                tokenizer::MESSAGE => {
                    let text = self.decode_header(&tokens);
                    let header = parse_header(&text, role);
                    events.push(message_start(&header));
                    State::Content {
                        header,
                        content: String::new(),
                        decoder: self.tokenizer.stream_decoder(),
                    }
                }
                // A new message before this header finished: keep what was said as text.
                tokenizer::START => {
                    self.headerless_message(role, &tokens, events);
                    State::Header {
                        role: None,
                        tokens: Vec::new(),
                    }
                }
                tokenizer::END | tokenizer::RETURN | tokenizer::CALL => {
                    self.headerless_message(role, &tokens, events);
                    if token != tokenizer::END {
                        self.stop(token, events);
                    }
                    State::ExpectStart
                }
                t => {
                    tokens.push(t);
                    if tokens.len() <= MAX_HEADER_TOKENS {
                        State::Header { role, tokens }
                    } else {
                        // Not a header after all: stream it as content from here on.
                        // More text follows: keep trailing whitespace.
                        let (header, content) = self.start_headerless(role, &tokens, false, events);
                        State::Content {
                            header,
                            content,
                            decoder: self.tokenizer.stream_decoder(),
                        }
                    }
                }
            },
            State::Content {
                header,
                mut content,
                mut decoder,
            } => match token {
                tokenizer::END | tokenizer::RETURN | tokenizer::CALL | tokenizer::START => {
                    self.end_message(header, content, &mut decoder, events);
                    match token {
                        tokenizer::START => State::Header {
                            role: None,
                            tokens: Vec::new(),
                        },
                        tokenizer::END => State::ExpectStart,
                        _ => {
                            self.stop(token, events);
                            State::ExpectStart
                        }
                    }
                }
                // Other special tokens have no meaning inside content: skip them.
                t if self.tokenizer.is_special(t) => State::Content {
                    header,
                    content,
                    decoder,
                },
                t => {
                    let text = decoder.push(t);
                    if !text.is_empty() {
                        content.push_str(&text);
                        events.push(ParserEvent::ContentDelta {
                            channel: header.channel.clone(),
                            recipient: header.recipient.clone(),
                            text,
                        });
                    }
                    State::Content {
                        header,
                        content,
                        decoder,
                    }
                }
            },
        };
    }

    /// Ends the stream (e.g. the token budget ran out): completes a message in progress, with any
    /// incomplete character as U+FFFD, and returns the events that produced.
    pub fn finish(&mut self) -> Vec<ParserEvent> {
        let mut events = Vec::new();
        match std::mem::replace(&mut self.state, State::ExpectStart) {
            State::ExpectStart => {}
            State::Header { role, tokens } => self.headerless_message(role, &tokens, &mut events),
            State::Content {
                header,
                content,
                mut decoder,
            } => self.end_message(header, content, &mut decoder, &mut events),
        }
        events
    }

    /// The completed messages so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// The completed messages.
    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }

    /// The last stop token seen, if any.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason
    }

    /// The channel of the message being written, once its header is complete.
    pub fn current_channel(&self) -> Option<&str> {
        match &self.state {
            State::Content { header, .. } => header.channel.as_deref(),
            _ => None,
        }
    }

    /// The recipient of the message being written, once its header is complete.
    pub fn current_recipient(&self) -> Option<&str> {
        match &self.state {
            State::Content { header, .. } => header.recipient.as_deref(),
            _ => None,
        }
    }

    /// The author of the message being written, if known yet.
    pub fn current_role(&self) -> Option<&Role> {
        match &self.state {
            State::Content { header, .. } => Some(&header.role),
            State::Header { role, .. } => role.as_ref(),
            State::ExpectStart => None,
        }
    }

    /// The text of the message being written so far.
    pub fn current_content(&self) -> &str {
        match &self.state {
            State::Content { content, .. } => content,
            _ => "",
        }
    }

    fn stop(&mut self, token: u32, events: &mut Vec<ParserEvent>) {
        let reason = if token == tokenizer::CALL {
            StopReason::Call
        } else {
            StopReason::Return
        };
        self.stop_reason = Some(reason);
        events.push(ParserEvent::Stop { reason });
    }

    fn end_message(
        &mut self,
        header: Header,
        mut content: String,
        decoder: &mut StreamDecoder,
        events: &mut Vec<ParserEvent>,
    ) {
        let rest = decoder.flush();
        if !rest.is_empty() {
            content.push_str(&rest);
            events.push(ParserEvent::ContentDelta {
                channel: header.channel.clone(),
                recipient: header.recipient.clone(),
                text: rest,
            });
        }
        let message = Message {
            role: header.role,
            recipient: header.recipient,
            channel: header.channel,
            content_type: header.content_type,
            content,
        };
        self.messages.push(message.clone());
        events.push(ParserEvent::MessageEnd { message });
    }

    /// A header that never reached `<|message|>`: whatever it holds besides a role and channel is
    /// the content (harmony's non-strict mode does the same).
    fn headerless_message(
        &mut self,
        role: Option<Role>,
        tokens: &[u32],
        events: &mut Vec<ParserEvent>,
    ) {
        if tokens.is_empty() {
            return;
        }
        let (header, content) = self.start_headerless(role, tokens, true, events);
        let mut decoder = self.tokenizer.stream_decoder();
        self.end_message(header, content, &mut decoder, events);
    }

    /// Starts a message from header tokens that are not followed by `<|message|>`: the header
    /// and the content found in them ([`parse_headerless`]; `complete` when no text follows),
    /// announced at once.
    fn start_headerless(
        &self,
        role: Option<Role>,
        tokens: &[u32],
        complete: bool,
        events: &mut Vec<ParserEvent>,
    ) -> (Header, String) {
        let text = self.decode_header(tokens);
        let (header, content) = parse_headerless(&text, role, complete);
        events.push(message_start(&header));
        if !content.is_empty() {
            events.push(ParserEvent::ContentDelta {
                channel: header.channel.clone(),
                recipient: header.recipient.clone(),
                text: content.clone(),
            });
        }
        (header, content)
    }

    /// Header tokens as text, special tokens spelled out (`<|channel|>`), lossily.
    fn decode_header(&self, tokens: &[u32]) -> String {
        self.tokenizer.decode(tokens)
    }
}

const CHANNEL_MARKER: &str = "<|channel|>";
const CONSTRAIN_MARKER: &str = "<|constrain|>";

/// Removes `<|channel|>NAME` from a header, returning the name (up to whitespace or `<`).
fn take_channel(header: &str) -> (Option<String>, String) {
    let Some(idx) = header.find(CHANNEL_MARKER) else {
        return (None, header.to_string());
    };
    let after = &header[idx + CHANNEL_MARKER.len()..];
    let end = after
        .find(|c: char| c.is_whitespace() || c == '<')
        .unwrap_or(after.len());
    let channel = (end > 0).then(|| after[..end].to_string());
    (channel, format!("{}{}", &header[..idx], &after[end..]))
}

/// Parses `role [to=R] [<|channel|>C [to=R]] [content-type]` (harmony's
/// `parse_header_from_string`). `role` is the role the prompt already wrote, if any.
fn parse_header(text: &str, role: Option<Role>) -> Header {
    let (channel, rest) = take_channel(text);
    // "to=foo<|constrain|>json" has no space before the marker: make the type a separate word.
    let rest = rest.replace(CONSTRAIN_MARKER, &format!(" {CONSTRAIN_MARKER}"));
    let mut parts: Vec<&str> = rest.split_ascii_whitespace().collect();
    let role = match role {
        Some(role) => {
            if parts.first() == Some(&role.as_str()) {
                parts.remove(0);
            }
            role
        }
        None => match parts.first() {
            Some(first) if !first.starts_with("to=") && !first.starts_with(CONSTRAIN_MARKER) => {
                Role::parse(parts.remove(0))
            }
            _ => Role::Assistant,
        },
    };
    let mut recipient = None;
    let mut content_type = None;
    let n = parts.len();
    if let Some(last) = parts.pop() {
        if let Some(r) = last.strip_prefix("to=") {
            recipient = Some(r.to_string());
        } else if n == 1 && !last.starts_with(CONSTRAIN_MARKER) {
            // A single bare word is a recipient (harmony).
            recipient = Some(last.to_string());
        } else {
            content_type = Some(last.to_string());
            if let Some(r) = parts.pop() {
                recipient = Some(r.strip_prefix("to=").unwrap_or(r).to_string());
            }
        }
    }
    // Anything left over is ignored: a header is metadata, never content.
    Header {
        role,
        channel,
        recipient,
        content_type,
    }
}

/// The event announcing a message with `header`.
fn message_start(header: &Header) -> ParserEvent {
    ParserEvent::MessageStart {
        role: header.role.clone(),
        channel: header.channel.clone(),
        recipient: header.recipient.clone(),
        content_type: header.content_type.clone(),
    }
}

/// A "header" that is really text: role word and channel, if present, are taken out, the rest is
/// content. Without a channel the text is taken to be the final answer. `complete`: the text is
/// the whole message, so trailing whitespace goes too.
fn parse_headerless(text: &str, role: Option<Role>, complete: bool) -> (Header, String) {
    let (channel, rest) = take_channel(text);
    let mut rest = if complete {
        rest.trim()
    } else {
        rest.trim_start()
    };
    let role = match role {
        Some(role) => role,
        None => {
            let first = rest.split_ascii_whitespace().next().unwrap_or("");
            match first {
                "system" | "developer" | "user" | "assistant" => {
                    rest = rest[first.len()..].trim_start();
                    Role::parse(first)
                }
                _ => Role::Assistant,
            }
        }
    };
    let header = Header {
        role,
        channel: channel.or_else(|| Some("final".to_string())),
        recipient: None,
        content_type: None,
    };
    (header, rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(
        text: &str,
        role: Option<Role>,
    ) -> (Role, Option<String>, Option<String>, Option<String>) {
        let h = parse_header(text, role);
        (h.role, h.channel, h.recipient, h.content_type)
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn headers() {
        let a = Some(Role::Assistant);
        assert_eq!(
            header("<|channel|>final", a.clone()),
            (Role::Assistant, s("final"), None, None)
        );
        assert_eq!(
            header(
                "<|channel|>commentary to=functions.get_weather <|constrain|>json",
                a.clone()
            ),
            (
                Role::Assistant,
                s("commentary"),
                s("functions.get_weather"),
                s("<|constrain|>json")
            )
        );
        assert_eq!(
            header(
                " to=functions.get_weather<|channel|>commentary json",
                a.clone()
            ),
            (
                Role::Assistant,
                s("commentary"),
                s("functions.get_weather"),
                s("json")
            )
        );
        assert_eq!(
            header(
                "assistant to=functions.f<|channel|>commentary<|constrain|>json",
                None
            ),
            (
                Role::Assistant,
                s("commentary"),
                s("functions.f"),
                s("<|constrain|>json")
            )
        );
        assert_eq!(
            header(
                "<|channel|>commentary to=functions.f<|constrain|>json",
                a.clone()
            ),
            (
                Role::Assistant,
                s("commentary"),
                s("functions.f"),
                s("<|constrain|>json")
            )
        );
        assert_eq!(
            header("functions.lookup to=assistant<|channel|>commentary", None),
            (
                Role::Tool("functions.lookup".into()),
                s("commentary"),
                s("assistant"),
                None
            )
        );
        // harmony's test_simple_tool_call: recipient without `functions.`, type `code`.
        assert_eq!(
            header("<|channel|>analysis to=lookup_weather code", a.clone()),
            (
                Role::Assistant,
                s("analysis"),
                s("lookup_weather"),
                s("code")
            )
        );
        // The role repeated after the prompt's `<|start|>assistant`.
        assert_eq!(
            header("assistant<|channel|>final", a),
            (Role::Assistant, s("final"), None, None)
        );
        assert_eq!(header("", None), (Role::Assistant, None, None, None));
        assert_eq!(
            header("<|channel|>", None),
            (Role::Assistant, None, None, None)
        );
    }

    #[test]
    fn headerless() {
        let (h, content) =
            parse_headerless("<|channel|>commentary Hello", Some(Role::Assistant), true);
        assert_eq!(
            (h.channel.as_deref(), content.as_str()),
            (Some("commentary"), "Hello")
        );
        let (h, content) = parse_headerless("Just text, no header", None, true);
        assert_eq!(h.role, Role::Assistant);
        assert_eq!(
            (h.channel.as_deref(), content.as_str()),
            (Some("final"), "Just text, no header")
        );
        let (h, content) = parse_headerless("user hi", None, true);
        assert_eq!((h.role, content.as_str()), (Role::User, "hi"));
    }
}
