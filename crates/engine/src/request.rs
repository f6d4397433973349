//! What a client asks the engine for ([`Request`]) and what it gets back ([`RequestEvent`]),
//! plus the per-sequence output processing that turns sampled tokens into text deltas: plain
//! detokenised text ([`OutputMode::Text`]) or Harmony messages split into reasoning, content and
//! tool calls ([`OutputMode::Harmony`]), with stop tokens and stop strings.

use gptoss_model::harmony::{self, ParserEvent, StreamingParser};
use gptoss_model::tokenizer::{StreamDecoder, Tokenizer};

use crate::sampling::SamplingParams;
use crate::stop::{StopMatcher, StopReason};

/// Identifies a request (unique per engine).
pub type RequestId = u64;

/// How generated tokens become text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// Detokenised text ([`Delta::Text`]); stop strings match the whole text.
    #[default]
    Text,
    /// A Harmony assistant turn: the analysis channel becomes [`Delta::Reasoning`], the final
    /// channel (and commentary without a recipient) [`Delta::Content`], calls of `functions.NAME`
    /// [`Delta::ToolCallStart`] + [`Delta::ToolCallArguments`]. Stop strings match the content
    /// only.
    Harmony,
}

/// A generation request: one prompt, `n` independent completions of it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Sampling parameters. With a `seed`, completion `i` uses `seed + i`.
    pub sampling: SamplingParams,
    /// Most tokens generated per completion (at least one). Generation also stops at the
    /// engine's `max_model_len`.
    pub max_tokens: usize,
    /// Number of completions (sequences sharing the prompt).
    pub n: usize,
    /// Token ids that end a completion (the token counts as generated but produces no text).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a completion; neither they nor anything after them is returned.
    pub stop: Vec<String>,
    /// Text or Harmony output.
    pub output: OutputMode,
    /// Tokens appended to the prompt that the output parser also sees as the beginning of the
    /// completion, e.g. a forced tool-call header. They count as prompt tokens.
    pub forced_prefix: Vec<u32>,
    /// In [`OutputMode::Text`], leave special tokens out of the text (default true).
    pub skip_special_tokens: bool,
}

impl Request {
    /// A request for `prompt` with OpenAI's default sampling, 16 tokens, one completion, no stop
    /// conditions, text output.
    pub fn new(prompt: Vec<u32>) -> Self {
        Request {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens: 16,
            n: 1,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            output: OutputMode::Text,
            forced_prefix: Vec::new(),
            skip_special_tokens: true,
        }
    }

    /// A Harmony chat request: stops on `<|return|>` and `<|call|>`.
    pub fn chat(prompt: Vec<u32>) -> Self {
        Request {
            stop_token_ids: harmony::stop_tokens_for_assistant().to_vec(),
            output: OutputMode::Harmony,
            ..Request::new(prompt)
        }
    }

    /// Prompt tokens as fed to the model (prompt then forced prefix).
    pub fn full_prompt_len(&self) -> usize {
        self.prompt.len() + self.forced_prefix.len()
    }
}

/// A piece of output text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Plain text ([`OutputMode::Text`]).
    Text(String),
    /// Chain of thought (Harmony `analysis` channel).
    Reasoning(String),
    /// The answer (Harmony `final` channel).
    Content(String),
    /// A function tool call begins.
    ToolCallStart {
        /// Index of the call within the completion (0, 1, ...).
        index: usize,
        /// A unique call id (`call_…`).
        id: String,
        /// The function's name.
        name: String,
    },
    /// More of a tool call's JSON arguments.
    ToolCallArguments {
        /// Index of the call.
        index: usize,
        /// The text.
        arguments: String,
    },
}

/// What a generated token was part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Text of a [`OutputMode::Text`] completion.
    Text,
    /// Harmony final-channel content.
    Content,
    /// Harmony reasoning.
    Reasoning,
    /// Harmony tool-call arguments.
    ToolCall,
    /// Harmony structure (headers, special tokens) or a stop token.
    Control,
}

/// The log-probability of a sampled token and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the sampled token.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The turn ended with a tool call (`<|call|>`).
    ToolCalls,
}

impl FinishReason {
    /// OpenAI's name: `stop`, `length`, `tool_calls`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (including any forced prefix).
    pub prompt_tokens: usize,
    /// Generated tokens over all completions (stop tokens included).
    pub completion_tokens: usize,
}

/// What the engine reports about a request, in order. Per completion: `Token`s then one
/// `Finished`; after every completion finished, one `Done`. `Error` ends the request instead.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestEvent {
    /// A token was generated.
    Token {
        /// Completion index (`0..n`).
        choice: usize,
        /// The token id.
        token: u32,
        /// What the token belongs to.
        kind: TokenKind,
        /// Its log-probability, when `sampling.logprobs` is set.
        logprob: Option<TokenLogprob>,
        /// Text it released (possibly none: held back by a stop-string prefix, a partial UTF-8
        /// character or a Harmony header).
        deltas: Vec<Delta>,
    },
    /// A completion ended.
    Finished {
        /// Completion index.
        choice: usize,
        /// Why.
        reason: FinishReason,
        /// The stop token or string that ended it, if any.
        stop: Option<StopReason>,
        /// The last text (withheld text released at the end).
        deltas: Vec<Delta>,
        /// Tokens this completion generated.
        completion_tokens: usize,
    },
    /// Every completion has finished.
    Done {
        /// Token counts.
        usage: Usage,
    },
    /// The request failed; nothing more follows.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// What kind of Harmony message the parser is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    None,
    Content,
    Reasoning,
    Tool(usize),
}

/// Result of one token through an [`OutputProcessor`].
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// What the token was part of.
    pub kind: TokenKind,
    /// Text released.
    pub deltas: Vec<Delta>,
    /// Set when the completion must end.
    pub finish: Option<(FinishReason, Option<StopReason>)>,
}

/// Turns one completion's tokens into [`Delta`]s and detects stop conditions.
#[derive(Debug)]
pub struct OutputProcessor {
    mode: OutputMode,
    tokenizer: Tokenizer,
    matcher: StopMatcher,
    decoder: StreamDecoder,
    parser: Option<StreamingParser>,
    msg: Msg,
    tool_calls: usize,
    skip_special: bool,
    finished: bool,
    /// Deltas from the forced prefix, not yet reported.
    initial: Vec<Delta>,
}

/// A fresh tool-call id: `call_` and 24 random alphanumerics.
pub fn new_call_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut s = String::from("call_");
    for _ in 0..24 {
        let i = (rand::random::<u32>() as usize) % ALPHABET.len();
        s.push(ALPHABET[i] as char);
    }
    s
}

impl OutputProcessor {
    /// A processor for one completion of `req`.
    pub fn new(req: &Request, tokenizer: &Tokenizer) -> Self {
        let mut p = OutputProcessor {
            mode: req.output,
            tokenizer: tokenizer.clone(),
            matcher: StopMatcher::new(req.stop_token_ids.iter().copied(), req.stop.iter().cloned()),
            decoder: tokenizer.stream_decoder(),
            parser: match req.output {
                OutputMode::Harmony => Some(StreamingParser::new_for_completion(
                    tokenizer,
                    harmony::Role::Assistant,
                )),
                OutputMode::Text => None,
            },
            msg: Msg::None,
            tool_calls: 0,
            skip_special: req.skip_special_tokens,
            finished: false,
            initial: Vec::new(),
        };
        // The forced prefix is part of the completion's structure (e.g. a tool call's header):
        // what it starts is reported with the first generated token.
        if let Some(parser) = &mut p.parser {
            for &t in &req.forced_prefix {
                let events = parser.push(t);
                let _ = p_apply(
                    &mut p.msg,
                    &mut p.tool_calls,
                    &mut p.matcher,
                    events,
                    &mut p.initial,
                );
            }
        }
        p
    }

    /// Number of tool calls so far.
    pub fn tool_calls(&self) -> usize {
        self.tool_calls
    }

    /// Feeds a sampled token.
    pub fn push(&mut self, token: u32) -> Processed {
        if self.finished {
            return Processed {
                kind: TokenKind::Control,
                deltas: Vec::new(),
                finish: None,
            };
        }
        let is_stop = self.matcher.is_stop_token(token);
        let special = self.tokenizer.is_special(token);
        let mut deltas = std::mem::take(&mut self.initial);
        let mut finish = None;
        let kind;
        match self.mode {
            OutputMode::Text => {
                kind = if is_stop || special {
                    TokenKind::Control
                } else {
                    TokenKind::Text
                };
                let text = if is_stop || (special && self.skip_special) {
                    String::new()
                } else {
                    self.decoder.push(token)
                };
                let r = if is_stop {
                    let mut r = self.matcher.push_token(token, "");
                    // Held-back bytes of a partial character come out before the stop.
                    let rest = self.decoder.flush();
                    if !rest.is_empty() {
                        r.emit.push_str(&rest);
                    }
                    r
                } else {
                    self.matcher.push(&text)
                };
                if !r.emit.is_empty() {
                    deltas.push(Delta::Text(r.emit));
                }
                if let Some(reason) = r.stopped {
                    finish = Some((FinishReason::Stop, Some(reason)));
                }
            }
            OutputMode::Harmony => {
                kind = if special || is_stop {
                    TokenKind::Control
                } else {
                    match self.msg {
                        Msg::None => TokenKind::Control,
                        Msg::Content => TokenKind::Content,
                        Msg::Reasoning => TokenKind::Reasoning,
                        Msg::Tool(_) => TokenKind::ToolCall,
                    }
                };
                let parser = self.parser.as_mut().expect("harmony parser");
                let events = parser.push(token);
                finish = p_apply(
                    &mut self.msg,
                    &mut self.tool_calls,
                    &mut self.matcher,
                    events,
                    &mut deltas,
                );
                if finish.is_none() && is_stop {
                    // A stop token the parser does not treat as one (e.g. `<|endoftext|>`).
                    let r = self.matcher.push_token(token, "");
                    if !r.emit.is_empty() {
                        deltas.push(Delta::Content(r.emit));
                    }
                    finish = Some((FinishReason::Stop, Some(StopReason::Token(token))));
                } else if let Some((_, Some(StopReason::Token(_)))) = &finish {
                    let rest = self.matcher.finish();
                    if !rest.is_empty() {
                        deltas.push(Delta::Content(rest));
                    }
                }
            }
        }
        if finish.is_some() {
            self.finished = true;
        }
        Processed {
            kind,
            deltas,
            finish,
        }
    }

    /// Ends the completion for another reason (length, cancellation): releases withheld text.
    pub fn finish(&mut self) -> Vec<Delta> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        let mut deltas = std::mem::take(&mut self.initial);
        match self.mode {
            OutputMode::Text => {
                let mut rest = self.matcher.push(&self.decoder.flush()).emit;
                rest.push_str(&self.matcher.finish());
                if !rest.is_empty() {
                    deltas.push(Delta::Text(rest));
                }
            }
            OutputMode::Harmony => {
                let events = self.parser.as_mut().expect("harmony parser").finish();
                let _ = p_apply(
                    &mut self.msg,
                    &mut self.tool_calls,
                    &mut self.matcher,
                    events,
                    &mut deltas,
                );
                let rest = self.matcher.finish();
                if !rest.is_empty() {
                    deltas.push(Delta::Content(rest));
                }
            }
        }
        deltas
    }
}

/// Applies Harmony parser events: routes text by message kind, runs content through the stop
/// matcher. Returns a finish when the turn ended or a stop string matched.
fn p_apply(
    msg: &mut Msg,
    tool_calls: &mut usize,
    matcher: &mut StopMatcher,
    events: Vec<ParserEvent>,
    deltas: &mut Vec<Delta>,
) -> Option<(FinishReason, Option<StopReason>)> {
    for ev in events {
        match ev {
            ParserEvent::MessageStart {
                channel, recipient, ..
            } => {
                let function = recipient
                    .as_deref()
                    .and_then(|r| r.strip_prefix(harmony::FUNCTIONS_NAMESPACE))
                    .and_then(|r| r.strip_prefix('.'));
                *msg = if let Some(name) = function {
                    let index = *tool_calls;
                    *tool_calls += 1;
                    deltas.push(Delta::ToolCallStart {
                        index,
                        id: new_call_id(),
                        name: name.to_string(),
                    });
                    Msg::Tool(index)
                } else if channel.as_deref() == Some("analysis") || recipient.is_some() {
                    Msg::Reasoning
                } else {
                    Msg::Content
                };
            }
            ParserEvent::ContentDelta { text, .. } => match *msg {
                Msg::Content | Msg::None => {
                    let r = matcher.push(&text);
                    if !r.emit.is_empty() {
                        deltas.push(Delta::Content(r.emit));
                    }
                    if let Some(reason) = r.stopped {
                        return Some((FinishReason::Stop, Some(reason)));
                    }
                }
                Msg::Reasoning => deltas.push(Delta::Reasoning(text)),
                Msg::Tool(index) => deltas.push(Delta::ToolCallArguments {
                    index,
                    arguments: text,
                }),
            },
            ParserEvent::MessageEnd { .. } => *msg = Msg::None,
            ParserEvent::Stop { reason } => {
                let token = match reason {
                    harmony::StopReason::Return => gptoss_model::tokenizer::RETURN,
                    harmony::StopReason::Call => gptoss_model::tokenizer::CALL,
                };
                let why = if reason == harmony::StopReason::Call && *tool_calls > 0 {
                    FinishReason::ToolCalls
                } else {
                    FinishReason::Stop
                };
                return Some((why, Some(StopReason::Token(token))));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::embedded().unwrap()
    }

    fn feed(
        p: &mut OutputProcessor,
        ids: &[u32],
    ) -> (Vec<Delta>, Option<(FinishReason, Option<StopReason>)>) {
        let mut all = Vec::new();
        for &t in ids {
            let r = p.push(t);
            all.extend(r.deltas);
            if r.finish.is_some() {
                return (all, r.finish);
            }
        }
        all.extend(p.finish());
        (all, None)
    }

    #[test]
    fn harmony_split_and_tool_call() {
        let t = tok();
        let req = Request::chat(vec![1]);
        let mut p = OutputProcessor::new(&req, &t);
        // Spec §7 completion.
        let ids = [
            200005, 35644, 200008, 17958, 13, 200007, 200006, 173781, 200005, 17196, 200008, 19,
            200002,
        ];
        let (d, fin) = feed(&mut p, &ids);
        assert_eq!(
            d,
            vec![
                Delta::Reasoning("Simple".into()),
                Delta::Reasoning(".".into()),
                Delta::Content("4".into())
            ]
        );
        assert_eq!(
            fin,
            Some((FinishReason::Stop, Some(StopReason::Token(200002))))
        );

        let mut p = OutputProcessor::new(&req, &t);
        let mut ids = vec![200005];
        ids.extend(
            t.encode_ordinary("commentary to=functions.get_weather ")
                .unwrap(),
        );
        ids.push(200003);
        ids.extend(t.encode_ordinary("json").unwrap());
        ids.push(200008);
        ids.extend(t.encode_ordinary("{\"city\":\"Paris\"}").unwrap());
        ids.push(200012);
        let (d, fin) = feed(&mut p, &ids);
        assert!(
            matches!(&d[0], Delta::ToolCallStart { index: 0, name, .. } if name == "get_weather")
        );
        let args: String = d[1..]
            .iter()
            .map(|x| match x {
                Delta::ToolCallArguments { arguments, .. } => arguments.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(args, "{\"city\":\"Paris\"}");
        assert_eq!(fin.unwrap().0, FinishReason::ToolCalls);
    }

    #[test]
    fn text_stop_string() {
        let t = tok();
        let mut req = Request::new(vec![1]);
        req.stop = vec!["world".into()];
        let mut p = OutputProcessor::new(&req, &t);
        let ids = t.encode_ordinary("hello world and more").unwrap();
        let (d, fin) = feed(&mut p, &ids);
        let text: String = d
            .iter()
            .map(|x| match x {
                Delta::Text(s) => s.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(text, "hello ");
        assert_eq!(
            fin,
            Some((FinishReason::Stop, Some(StopReason::String("world".into()))))
        );
    }
}
