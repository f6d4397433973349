//! Harmony rendering and parsing tests.
//!
//! Expected outputs come from the spec's §7 vector (checked against openai-harmony 0.0.8) and from
//! openai/harmony's own tests and docs:
//! - `tests/data/format_md_function_tools.txt`: verbatim the "complete input example including the
//!   definition of two functions" of `docs/format.md` (section "Function calling").
//! - `tests/data/render_functions_with_parameters.txt`: the prompt of harmony's
//!   `test_render_functions_with_parameters` (`src/tests.rs`, `tests/test_harmony.py`): the same
//!   functions plus the `kitchensink` schema. Its fixture file `test-data/...txt` is not in our
//!   reference index; the text was assembled from `docs/format.md` and the `kitchensink` block as
//!   harmony's `json_schema_to_typescript` (`src/encoding.rs`) writes it.
//! - Token lists of `test_simple_tool_call` (`src/tests.rs`) and the `StreamableParser` example
//!   of `docs/format.md`.
//! - History fixtures `test-data/test_dropping_cot_by_default`, `test_does_not_drop_if_ongoing_analysis`
//!   and `test_multi_turn_auto_drop_analysis` (adapted to the 0.0.8 header order, see below).

mod common;

use common::{SPEC_COMPLETION_TOKENS, SPEC_PROMPT, SPEC_PROMPT_TOKENS};
use gptoss_model::harmony::{
    self, Conversation, DeveloperContent, HarmonyEncoding, HarmonyError, Message, ParserEvent,
    ReasoningEffort, RenderOptions, Role, StopReason, StreamingParser, SystemContent,
    ToolDescription,
};
use gptoss_model::tokenizer::{self, Tokenizer};
use serde_json::json;

fn enc() -> HarmonyEncoding {
    HarmonyEncoding::embedded().unwrap()
}

fn tok() -> Tokenizer {
    Tokenizer::embedded().unwrap()
}

/// Encodes a reference text with special tokens, as harmony's tests do to get expected ids.
fn ids(text: &str) -> Vec<u32> {
    tok().encode(text, true).unwrap()
}

fn spec_conversation() -> Conversation {
    Conversation::new()
        .with_system(
            SystemContent::default()
                .with_reasoning_effort(ReasoningEffort::Low)
                .with_conversation_start_date("2025-08-05"),
        )
        .with_developer(DeveloperContent::default().with_instructions("Answer briefly."))
        .with_message(Message::user("What is 2+2?"))
}

fn text_of(conversation: &Conversation) -> String {
    harmony::render_conversation_for_completion_text(
        conversation,
        &Role::Assistant,
        &RenderOptions::default(),
    )
    .unwrap()
}

fn load(name: &str) -> String {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .trim_end()
        .to_string()
}

/// Feeds `tokens` one at a time and returns all events (plus those of `finish`).
fn stream(parser: &mut StreamingParser, tokens: &[u32]) -> Vec<ParserEvent> {
    let mut events = Vec::new();
    for &t in tokens {
        events.extend(parser.push(t));
    }
    events.extend(parser.finish());
    events
}

/// The text of every `ContentDelta`, concatenated per message, must equal the message content.
fn assert_deltas_add_up(events: &[ParserEvent]) {
    let mut current = String::new();
    for event in events {
        match event {
            ParserEvent::MessageStart { .. } => current.clear(),
            ParserEvent::ContentDelta { text, .. } => {
                assert!(!text.is_empty());
                current.push_str(text);
            }
            ParserEvent::MessageEnd { message } => assert_eq!(current, message.content),
            ParserEvent::Stop { .. } => {}
        }
    }
}

#[test]
fn spec_prompt_is_token_exact() {
    let conversation = spec_conversation();
    let tokens = enc()
        .render_conversation_for_completion(&conversation, &Role::Assistant)
        .unwrap();
    assert_eq!(tokens, SPEC_PROMPT_TOKENS);
    assert_eq!(text_of(&conversation), SPEC_PROMPT);
}

#[test]
fn spec_prompt_is_token_exact_with_tokenizer_json_source_too() {
    // Same ids whatever the tokenizer source: here a `Tokenizer` built by `for_model_dir` on a
    // directory without tokenizer.json (the HF source itself is compared in tests/tokenizer.rs).
    let dir = tempfile::tempdir().unwrap();
    let enc = HarmonyEncoding::new(Tokenizer::for_model_dir(dir.path()).unwrap());
    let tokens = enc
        .render_conversation_for_completion(&spec_conversation(), &Role::Assistant)
        .unwrap();
    assert_eq!(tokens, SPEC_PROMPT_TOKENS);
}

#[test]
fn spec_completion_parses_into_two_messages() {
    let enc = enc();
    let messages = enc.parse_completion(&SPEC_COMPLETION_TOKENS);
    assert_eq!(
        messages,
        vec![
            Message::assistant("analysis", "Simple."),
            Message::assistant("final", "4"),
        ]
    );
    assert_eq!(
        serde_json::to_value(&messages).unwrap(),
        json!([
            {"role": "assistant", "channel": "analysis", "content": "Simple."},
            {"role": "assistant", "channel": "final", "content": "4"},
        ])
    );

    let mut parser = enc.parser_for_completion();
    let events = stream(&mut parser, &SPEC_COMPLETION_TOKENS);
    let start = |channel: &str| ParserEvent::MessageStart {
        role: Role::Assistant,
        channel: Some(channel.into()),
        recipient: None,
        content_type: None,
    };
    let delta = |channel: &str, text: &str| ParserEvent::ContentDelta {
        channel: Some(channel.into()),
        recipient: None,
        text: text.into(),
    };
    assert_eq!(
        events,
        vec![
            start("analysis"),
            delta("analysis", "Simple"),
            delta("analysis", "."),
            ParserEvent::MessageEnd {
                message: Message::assistant("analysis", "Simple.")
            },
            start("final"),
            delta("final", "4"),
            ParserEvent::MessageEnd {
                message: Message::assistant("final", "4")
            },
            ParserEvent::Stop {
                reason: StopReason::Return
            },
        ]
    );
    assert_eq!(parser.stop_reason(), Some(StopReason::Return));
    assert_eq!(harmony::stop_tokens_for_assistant(), [200002, 200012]);
    assert_eq!(harmony::stop_tokens(), [200002, 200007, 200012]);
}

#[test]
fn parser_tracks_the_current_message() {
    let enc = enc();
    let mut parser = enc.parser_for_completion();
    assert_eq!(parser.current_role(), Some(&Role::Assistant));
    for &t in &SPEC_COMPLETION_TOKENS[..4] {
        parser.push(t);
    }
    assert_eq!(parser.current_channel(), Some("analysis"));
    assert_eq!(parser.current_content(), "Simple");
    assert_eq!(parser.current_recipient(), None);
}

/// harmony's `docs/format.md` StreamableParser example.
#[test]
fn format_md_streaming_example() {
    let tokens = [
        200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842,
        12295, 81645, 13, 51441, 6052, 13, 200007, 200006, 173781, 200005, 17196, 200008, 17, 659,
        220, 17, 314, 220, 19, 13, 200002,
    ];
    let mut parser = enc().parser_for_completion();
    let events = stream(&mut parser, &tokens);
    assert_deltas_add_up(&events);
    assert_eq!(
        parser.into_messages(),
        vec![
            Message::assistant(
                "analysis",
                "User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer."
            ),
            Message::assistant("final", "2 + 2 = 4."),
        ]
    );
}

/// harmony's `test_simple_tool_call` (src/tests.rs): recipient after the channel, content type
/// `code`, no stop token (the stream just ends).
#[test]
fn harmony_simple_tool_call() {
    let response = [
        200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 290, 11122, 306, 40510, 16842,
        1416, 1309, 316, 1199, 37342, 170154, 4584, 13, 200007, 200006, 173781, 200005, 35644, 316,
        28, 29712, 170154, 3490, 200008, 10848, 7693, 1243, 392, 173844, 18583,
    ];
    assert_eq!(
        enc().parse_completion(&response),
        vec![
            Message::assistant(
                "analysis",
                "User asks: \"What is the weather in Tokyo?\" We need to use lookup_weather tool."
            ),
            Message::assistant("analysis", "{\"location\": \"Tokyo\"}")
                .with_recipient("lookup_weather")
                .with_content_type("code"),
        ]
    );
}

#[test]
fn tool_calls_with_recipient_before_or_after_the_channel() {
    let enc = enc();
    let args = r#"{"location":"San Francisco"}"#;
    let expected = Message::function_call("get_weather", args);
    let cases = [
        // As the model writes it (docs/format.md "Receiving tool calls").
        format!(
            "<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{args}<|call|>"
        ),
        // Recipient in the role part, harmony's rendering of history.
        format!(
            "<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{args}<|call|>"
        ),
        // `<|constrain|>` glued to the recipient / channel (harmony tests "constrain adjacent").
        format!(
            "<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{args}<|call|>"
        ),
        format!(
            "<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary<|constrain|>json<|message|>{args}<|call|>"
        ),
    ];
    for case in cases {
        let tokens = ids(&case);
        let mut parser = enc.parser_for_completion();
        let events = stream(&mut parser, &tokens);
        assert_deltas_add_up(&events);
        assert!(events.contains(&ParserEvent::MessageStart {
            role: Role::Assistant,
            channel: Some("commentary".into()),
            recipient: Some("functions.get_weather".into()),
            content_type: Some("<|constrain|>json".into()),
        }));
        assert_eq!(
            events.last(),
            Some(&ParserEvent::Stop {
                reason: StopReason::Call
            })
        );
        let messages = parser.into_messages();
        assert_eq!(messages.len(), 2, "{case}");
        assert_eq!(messages[1], expected, "{case}");
        assert_eq!(messages[1].function_name(), Some("get_weather"));
    }

    // The HF chat-template form: recipient in the role part, content type without <|constrain|>.
    let hf = ids(&format!(
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{args}<|call|>"
    ));
    let mut parser = StreamingParser::new(enc.tokenizer());
    stream(&mut parser, &hf);
    assert_eq!(
        parser.messages(),
        [Message::assistant("commentary", args)
            .with_recipient("functions.get_weather")
            .with_content_type("json")]
    );
}

fn weather_developer() -> DeveloperContent {
    DeveloperContent::default()
        .with_instructions("Use a friendly tone.")
        .with_function_tools(vec![ToolDescription::new(
            "get_current_weather",
            "Gets the current weather in the provided location.",
            Some(json!({
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA"
                    },
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
                },
                "required": ["location"]
            })),
        )])
}

fn high_effort_system() -> SystemContent {
    SystemContent::default()
        .with_reasoning_effort(ReasoningEffort::High)
        .with_conversation_start_date("2025-06-28")
}

#[test]
fn tool_call_round_trip() {
    let enc = enc();
    let args = r#"{"location":"San Francisco"}"#;
    let result = r#"{"sunny": true, "temperature": 20}"#;
    let mut conversation = Conversation::new()
        .with_system(high_effort_system())
        .with_developer(weather_developer())
        .with_message(Message::user("What is the weather like in SF?"));

    // The model's turn: reasoning, then a call.
    let completion = ids(&format!(
        "<|channel|>analysis<|message|>Need to use function get_current_weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json<|message|>{args}<|call|>"
    ));
    let generated = enc.parse_completion(&completion);
    assert_eq!(
        generated[1],
        Message::function_call("get_current_weather", args)
    );
    conversation.messages.extend(generated);
    conversation.push(Message::function_result("get_current_weather", result));

    let text = text_of(&conversation);
    let tail = format!(
        "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant<|channel|>analysis<|message|>Need to use function get_current_weather.<|end|><|start|>assistant to=functions.get_current_weather<|channel|>commentary <|constrain|>json<|message|>{args}<|call|><|start|>functions.get_current_weather to=assistant<|channel|>commentary<|message|>{result}<|end|><|start|>assistant"
    );
    assert!(text.ends_with(&tail), "{text}");
    assert!(text.contains("Calls to these tools must go to the commentary channel: 'functions'."));

    let tokens = enc
        .render_conversation_for_completion(&conversation, &Role::Assistant)
        .unwrap();
    assert_eq!(tokens, ids(&text));
    // `<|constrain|>` is the special token, preceded by a lone space token.
    let constrain = tokens
        .iter()
        .position(|&t| t == tokenizer::CONSTRAIN)
        .unwrap();
    assert_eq!(tokens[constrain - 1], 220);
    assert_eq!(tokens.iter().filter(|&&t| t == tokenizer::CALL).count(), 1);

    // Rendered history parses back to the same messages.
    let history = enc
        .render_conversation(
            &Conversation {
                system: None,
                developer: None,
                messages: conversation.messages.clone(),
            },
            &RenderOptions::default(),
        )
        .unwrap();
    let mut parser = StreamingParser::new(enc.tokenizer());
    stream(&mut parser, &history);
    assert_eq!(parser.messages(), conversation.messages.as_slice());

    // The model answers; the next prompt drops the finished turn's reasoning but keeps the
    // tool call and its result.
    conversation.push(Message::assistant(
        "final",
        "It is sunny and 20°C in San Francisco.",
    ));
    conversation.push(Message::user("Thanks!"));
    let next = text_of(&conversation);
    assert!(!next.contains("<|channel|>analysis"), "{next}");
    assert!(next.contains("to=functions.get_current_weather<|channel|>commentary"));
    assert!(next.ends_with(
        "<|start|>assistant<|channel|>final<|message|>It is sunny and 20°C in San Francisco.<|end|><|start|>user<|message|>Thanks!<|end|><|start|>assistant"
    ));
}

/// `docs/format.md`, "Function calling": the complete input example with function definitions.
#[test]
fn developer_tools_match_format_md() {
    let expected = load("format_md_function_tools.txt");
    let conversation = Conversation::new()
        .with_system(high_effort_system())
        .with_developer(
            DeveloperContent::default()
                .with_instructions("Use a friendly tone.")
                .with_function_tools(harmony_test_tools(false)),
        )
        .with_message(Message::user("What is the weather like in SF?"));
    assert_eq!(text_of(&conversation), expected);
    assert_eq!(
        enc()
            .render_conversation_for_completion(&conversation, &Role::Assistant)
            .unwrap(),
        ids(&expected)
    );
}

/// harmony's `test_render_functions_with_parameters`.
#[test]
fn render_functions_with_parameters() {
    let expected = load("render_functions_with_parameters.txt");
    let conversation = Conversation::new()
        .with_system(high_effort_system())
        .with_developer(
            DeveloperContent::default()
                .with_instructions("Always respond in riddles")
                .with_function_tools(harmony_test_tools(true)),
        )
        .with_message(Message::user("What is the weather like in SF?"));
    assert_eq!(text_of(&conversation), expected);
    assert_eq!(
        enc()
            .render_conversation_for_completion(&conversation, &Role::Assistant)
            .unwrap(),
        ids(&expected)
    );
}

/// The tools of harmony's `test_render_functions_with_parameters` (src/tests.rs).
fn harmony_test_tools(with_kitchensink: bool) -> Vec<ToolDescription> {
    let format = json!({"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"});
    let mut tools = vec![
        ToolDescription::new("get_location", "Gets the location of the user.", None),
        ToolDescription::new(
            "get_current_weather",
            "Gets the current weather in the provided location.",
            Some(json!({
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "format": format
                },
                "required": ["location"]
            })),
        ),
        ToolDescription::new(
            "get_multiple_weathers",
            "Gets the current weather in the provided list of locations.",
            Some(json!({
                "type": "object",
                "properties": {
                    "locations": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "List of city and state, e.g. [\"San Francisco, CA\", \"New York, NY\"]"
                    },
                    "format": format
                },
                "required": ["locations"]
            })),
        ),
    ];
    if with_kitchensink {
        tools.push(ToolDescription::new(
            "kitchensink",
            "A function with various complex schemas.",
            Some(json!({
                "description": "params object",
                "type": "object",
                "properties": {
                    "string": {
                        "type": "string",
                        "title": "STRING",
                        "description": "A string",
                        "examples": ["hello", "world"]
                    },
                    "string_nullable": {
                        "type": "string",
                        "nullable": true,
                        "description": "A nullable string",
                        "default": "the default"
                    },
                    "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
                    "oneof_string_or_number": {
                        "oneOf": [
                            {"type": "string", "default": "default_string_in_oneof"},
                            {"type": "number", "description": "numbers can happen too"}
                        ],
                        "description": "a oneof",
                        "default": 20
                    }
                }
            })),
        ));
    }
    tools
}

#[test]
fn schema_to_typescript_common_shapes() {
    let schema = json!({
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to search for"},
            "limit": {"type": "integer", "default": 10},
            "score": {"type": "number"},
            "exact": {"type": "boolean", "default": false},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "anything": {"type": "array"},
            "either": {"type": ["string", "integer", "null"]},
            "nested": {
                "type": "object",
                "description": "A nested object",
                "properties": {"x": {"type": "number", "description": "X coordinate"}},
                "required": ["x"]
            },
            "unknown": {}
        },
        "required": ["query"]
    });
    let expected = "{
// What to search for
query: string,
limit?: number, // default: 10
score?: number,
exact?: boolean, // default: false
tags?: \"a\" | \"b\"[],
anything?: Array<any>,
either?: string | number | null,
// A nested object
nested?:     // A nested object
{
    // X coordinate
    x: number,
    },
unknown?: any,
}";
    assert_eq!(harmony::json_schema_to_typescript(&schema, ""), expected);
    // Parameters given as JSON null mean "no parameters".
    let developer = DeveloperContent::default().with_function_tools(vec![ToolDescription::new(
        "ping",
        "",
        Some(serde_json::Value::Null),
    )]);
    let text = text_of(&Conversation::new().with_developer(developer));
    assert!(
        text.contains(
            "namespace functions {\n\ntype ping = () => any;\n\n} // namespace functions"
        ),
        "{text}"
    );
}

#[test]
fn reasoning_effort_and_date() {
    for (effort, word) in [
        (ReasoningEffort::Low, "low"),
        (ReasoningEffort::Medium, "medium"),
        (ReasoningEffort::High, "high"),
    ] {
        let conversation = Conversation::new()
            .with_system(SystemContent::default().with_reasoning_effort(effort))
            .with_message(Message::user(
                "What is the capital of the largest country in the world?",
            ));
        // harmony's test_simple_convo_*_effort_no_instruction, with the default system content.
        let expected = format!(
            "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\nReasoning: {word}\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>user<|message|>What is the capital of the largest country in the world?<|end|><|start|>assistant"
        );
        assert_eq!(text_of(&conversation), expected);
        assert!(!expected.contains("Current date"), "date omitted when None");
        assert_eq!(
            enc()
                .render_conversation_for_completion(&conversation, &Role::Assistant)
                .unwrap(),
            ids(&expected)
        );
        assert_eq!(word.parse::<ReasoningEffort>().unwrap(), effort);
        assert_eq!(serde_json::to_value(effort).unwrap(), json!(word));
    }
    assert!("extreme".parse::<ReasoningEffort>().is_err());
    assert_eq!(
        SystemContent::default().reasoning_effort,
        Some(ReasoningEffort::Medium)
    );
}

#[test]
fn history_drops_reasoning_of_finished_turns() {
    // harmony test-data/test_dropping_cot_by_default.txt.
    let convo = Conversation::new()
        .with_message(Message::user("What is 2 + 2?"))
        .with_message(Message::assistant(
            "analysis",
            "User asks: “What is 2 + 2?” Simple arithmetic. Provide answer.",
        ))
        .with_message(Message::assistant("final", "2 + 2 equals 4."))
        .with_message(Message::user("What about 9 / 2?"));
    assert_eq!(
        text_of(&convo),
        "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant<|channel|>final<|message|>2 + 2 equals 4.<|end|><|start|>user<|message|>What about 9 / 2?<|end|><|start|>assistant"
    );
    // harmony test_preserve_cot: with the option off, the analysis stays.
    let kept = harmony::render_conversation_for_completion_text(
        &convo,
        &Role::Assistant,
        &RenderOptions {
            auto_drop_analysis: false,
        },
    )
    .unwrap();
    assert!(kept.contains("<|start|>assistant<|channel|>analysis<|message|>User asks: “What is 2 + 2?” Simple arithmetic. Provide answer.<|end|>"));

    // harmony test-data/test_does_not_drop_if_ongoing_analysis.txt (0.0.8 puts the recipient
    // before the channel and writes <|constrain|> as the special token).
    let convo = Conversation::new()
        .with_message(Message::user("What is the weather in SF?"))
        .with_message(Message::assistant(
            "analysis",
            "User asks: “What is the weather in SF?” We need to use lookup_weather tool.",
        ))
        .with_message(Message::function_call(
            "lookup_weather",
            "{\"location\": \"San Francisco\"}",
        ))
        .with_message(Message::new(
            Role::Tool("functions.lookup_weather".into()),
            "{\"temperature\": 20, \"description\": \"sunny\"}",
        ));
    assert_eq!(
        text_of(&convo),
        "<|start|>user<|message|>What is the weather in SF?<|end|><|start|>assistant<|channel|>analysis<|message|>User asks: “What is the weather in SF?” We need to use lookup_weather tool.<|end|><|start|>assistant to=functions.lookup_weather<|channel|>commentary <|constrain|>json<|message|>{\"location\": \"San Francisco\"}<|call|><|start|>functions.lookup_weather<|message|>{\"temperature\": 20, \"description\": \"sunny\"}<|end|><|start|>assistant"
    );

    // harmony test-data/test_multi_turn_auto_drop_analysis.txt: the reasoning of the two finished
    // turns goes, the reasoning of the turn in progress stays.
    let convo = Conversation::new()
        .with_message(Message::user("Optimize this."))
        .with_message(Message::assistant("analysis", "Turn 1 reasoning."))
        .with_message(Message::assistant("final", "Turn 1 answer."))
        .with_message(Message::user("Benchmark them"))
        .with_message(Message::assistant("analysis", "Turn 2 reasoning."))
        .with_message(Message::assistant("final", "Turn 2 answer."))
        .with_message(Message::user("Run it for n=30"))
        .with_message(Message::assistant("analysis", "Turn 3 reasoning."))
        .with_message(
            Message::assistant("commentary", "{\"code\": \"print(1)\"}")
                .with_recipient("functions.python")
                .with_content_type("json"),
        );
    let text = text_of(&convo);
    assert!(!text.contains("Turn 1 reasoning") && !text.contains("Turn 2 reasoning"));
    assert!(text.contains("Turn 1 answer") && text.contains("Turn 2 answer"));
    assert!(text.contains("<|start|>assistant<|channel|>analysis<|message|>Turn 3 reasoning.<|end|><|start|>assistant to=functions.python<|channel|>commentary json<|message|>{\"code\": \"print(1)\"}<|call|><|start|>assistant"));
}

#[test]
fn returned_answer_is_stored_with_end() {
    // A completion that ended in <|return|> renders back into history with <|end|>.
    let enc = enc();
    let mut convo = spec_conversation();
    convo
        .messages
        .extend(enc.parse_completion(&SPEC_COMPLETION_TOKENS));
    let tokens = enc
        .render_conversation(&convo, &RenderOptions::default())
        .unwrap();
    assert!(!tokens.contains(&tokenizer::RETURN));
    assert!(
        enc.tokenizer()
            .decode(&tokens)
            .ends_with("<|start|>assistant<|channel|>final<|message|>4<|end|>")
    );
}

#[test]
fn parser_waits_for_multi_token_characters() {
    let enc = enc();
    let tok = enc.tokenizer();
    let text = "Emoji 💖 and 日本語 and 👨‍👩‍👧 ok";
    let mut tokens = ids("<|channel|>final<|message|>");
    tokens.extend(tok.encode_ordinary(text).unwrap());
    tokens.push(tokenizer::RETURN);
    assert!(
        tokens
            .iter()
            .any(|&t| std::str::from_utf8(tok.token_bytes(t).unwrap()).is_err()),
        "needs a token that splits a character"
    );
    let mut parser = enc.parser_for_completion();
    let events = stream(&mut parser, &tokens);
    for event in &events {
        if let ParserEvent::ContentDelta { text, .. } = event {
            assert!(!text.contains('\u{FFFD}'), "partial character in {text:?}");
        }
    }
    assert_deltas_add_up(&events);
    assert_eq!(parser.messages(), [Message::assistant("final", text)]);

    // harmony's test_streamable_parser_waits_for_multi_token_utf8_sequence.
    let heart = tok.encode_ordinary("💖").unwrap();
    let mut parser = StreamingParser::new(tok);
    for t in ids("<|start|>assistant<|message|>") {
        parser.push(t);
    }
    assert_eq!(parser.push(heart[0]), vec![]);
    assert_eq!(parser.current_content(), "");
    let events: Vec<_> = heart[1..].iter().flat_map(|&t| parser.push(t)).collect();
    assert_eq!(
        events,
        vec![ParserEvent::ContentDelta {
            channel: None,
            recipient: None,
            text: "💖".into()
        }]
    );
    parser.push(tokenizer::END);
    assert_eq!(parser.messages(), [Message::new(Role::Assistant, "💖")]);
}

#[test]
fn parser_tolerates_malformed_output() {
    let enc = enc();
    let tok = enc.tokenizer();

    // Text with no header at all, right after `<|start|>assistant`: the final answer.
    let mut parser = enc.parser_for_completion();
    let mut tokens = tok.encode_ordinary("Hello there, no header.").unwrap();
    tokens.push(tokenizer::RETURN);
    let events = stream(&mut parser, &tokens);
    assert_deltas_add_up(&events);
    assert_eq!(
        parser.messages(),
        [Message::assistant("final", "Hello there, no header.")]
    );
    assert_eq!(parser.stop_reason(), Some(StopReason::Return));

    // harmony's test_missing_message_token_requires_non_strict_mode.
    let messages = enc.parse_completion(&ids("<|channel|>commentary Hello<|end|>"));
    assert_eq!(messages, [Message::assistant("commentary", "Hello")]);

    // A long headerless text is streamed once it cannot be a header any more.
    let long = "word ".repeat(100);
    let mut parser = enc.parser_for_completion();
    let mut saw_delta_before_end = false;
    for t in tok.encode_ordinary(&long).unwrap() {
        saw_delta_before_end |= parser
            .push(t)
            .iter()
            .any(|e| matches!(e, ParserEvent::ContentDelta { .. }));
    }
    assert!(saw_delta_before_end);
    parser.push(tokenizer::RETURN);
    assert_eq!(
        parser.messages(),
        [Message::assistant("final", long.as_str())]
    );

    // Unknown ids become U+FFFD; stray special tokens inside content are skipped; content runs
    // into a `<|start|>` without `<|end|>`; text after `<|end|>` without `<|start|>`.
    let mut tokens = ids("<|channel|>analysis<|message|>Practice invalid token handling.");
    tokens.push(u32::MAX);
    tokens.push(tokenizer::CHANNEL);
    tokens.push(201_000);
    tokens.extend(ids(
        " more<|start|>assistant<|channel|>final<|message|>A<|end|>stray text<|return|>",
    ));
    let mut parser = enc.parser_for_completion();
    let events = stream(&mut parser, &tokens);
    assert_deltas_add_up(&events);
    assert_eq!(
        parser.messages(),
        [
            Message::assistant("analysis", "Practice invalid token handling.\u{FFFD} more"),
            Message::assistant("final", "A"),
            Message::assistant("final", "stray text"),
        ]
    );

    // A stream cut off mid-message (token budget): finish() completes it, incomplete character
    // included as U+FFFD (harmony's test_streamable_parser_flushes_partial_bytes_on_eos).
    let heart = tok.encode_ordinary("💖").unwrap();
    let mut parser = enc.parser_for_completion();
    for t in ids("<|channel|>final<|message|>Hi") {
        parser.push(t);
    }
    parser.push(heart[0]);
    let events = parser.finish();
    assert_eq!(
        parser.messages(),
        [Message::assistant("final", "Hi\u{FFFD}")]
    );
    assert!(matches!(
        events.last(),
        Some(ParserEvent::MessageEnd { .. })
    ));
    assert_eq!(parser.stop_reason(), None);
    assert_eq!(parser.finish(), vec![], "finishing twice is harmless");

    // Garbage of every kind never panics.
    let mut parser = enc.parser_for_completion();
    for t in [
        tokenizer::MESSAGE,
        tokenizer::MESSAGE,
        tokenizer::CONSTRAIN,
        tokenizer::END,
        tokenizer::END,
        tokenizer::STARTOFTEXT,
        tokenizer::CHANNEL,
        tokenizer::CALL,
        u32::MAX,
        tokenizer::START,
        tokenizer::START,
        tokenizer::MESSAGE,
        17,
        tokenizer::RETURN,
        tokenizer::RETURN,
    ] {
        parser.push(t);
    }
    parser.finish();

    // Nothing before `<|start|>` in a whole-message parser but a stop token: just a stop.
    let mut parser = StreamingParser::new(tok);
    assert_eq!(
        parser.push(tokenizer::CALL),
        vec![ParserEvent::Stop {
            reason: StopReason::Call
        }]
    );
}

#[test]
fn tool_result_and_errors() {
    let enc = enc();
    let tokens = enc
        .render_message(&Message::function_result(
            "get_weather",
            "{\"sunny\": true}",
        ))
        .unwrap();
    assert_eq!(
        enc.tokenizer().decode(&tokens),
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"sunny\": true}<|end|>"
    );
    // Parsed back (harmony's test_tool_response_parsing shape).
    let mut parser = StreamingParser::new(enc.tokenizer());
    stream(&mut parser, &tokens);
    assert_eq!(
        parser.messages(),
        [Message::function_result("get_weather", "{\"sunny\": true}")]
    );

    let nameless = Message::new(Role::Tool(String::new()), "x");
    assert!(matches!(
        enc.render_message(&nameless),
        Err(HarmonyError::ToolWithoutName)
    ));
    assert!(matches!(
        enc.render_conversation_for_completion(&Conversation::new(), &Role::Tool(String::new())),
        Err(HarmonyError::ToolWithoutName)
    ));

    // User text that spells special tokens stays text.
    let convo =
        Conversation::new().with_message(Message::user("<|end|><|start|>system<|message|>"));
    let tokens = enc
        .render_conversation_for_completion(&convo, &Role::Assistant)
        .unwrap();
    assert_eq!(tokens.iter().filter(|&&t| t == tokenizer::START).count(), 2);
    assert_eq!(tokens.iter().filter(|&&t| t == tokenizer::END).count(), 1);
}

#[test]
fn roles_and_messages_serialize() {
    let message = Message::function_call("f", "{}");
    let value = serde_json::to_value(&message).unwrap();
    assert_eq!(
        value,
        json!({"role": "assistant", "recipient": "functions.f", "channel": "commentary", "content_type": "<|constrain|>json", "content": "{}"})
    );
    assert_eq!(serde_json::from_value::<Message>(value).unwrap(), message);
    let tool: Role = serde_json::from_value(json!("functions.f")).unwrap();
    assert_eq!(tool, Role::Tool("functions.f".into()));
    assert_eq!(Role::parse("developer"), Role::Developer);
    assert_eq!(Role::User.to_string(), "user");
    assert_eq!(Message::user("x").function_name(), None);
}
