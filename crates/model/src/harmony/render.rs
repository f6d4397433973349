//! Rendering conversations into Harmony tokens (port of `openai-harmony`'s `Render` impls and
//! `json_schema_to_typescript`, `src/encoding.rs`).
//!
//! A message is first laid out as [`Piece`]s: special tokens and text runs. Each text run is
//! encoded on its own with special tokens disabled, exactly like harmony's `render_text_into`.
//! That granularity matters for token-exactness (encoding `"assistant"` and `" to=functions.f"`
//! separately is what the model saw in training), and encoding text with specials disabled is
//! what keeps a user typing `<|start|>` from forging a message boundary.

use serde_json::Value;

use super::{Conversation, DeveloperContent, HarmonyError, Message, Role, SystemContent};
use crate::tokenizer::{self, Tokenizer};

/// Options for rendering a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderOptions {
    /// Drop `analysis` messages (chain of thought) that a later `final` message follows: once a
    /// turn has ended in a final answer its reasoning is not shown to the model again. Reasoning
    /// of the turn in progress (e.g. between tool calls) has no later `final`, so it stays.
    /// Default `true`.
    pub auto_drop_analysis: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            auto_drop_analysis: true,
        }
    }
}

/// A unit of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A special token id.
    Special(u32),
    /// Text, encoded on its own with special tokens disabled.
    Text(String),
}

fn text(pieces: &mut Vec<Piece>, s: impl Into<String>) {
    pieces.push(Piece::Text(s.into()));
}

/// The pieces of a whole conversation (system, developer, then the kept messages).
pub(crate) fn conversation_pieces(
    conversation: &Conversation,
    options: &RenderOptions,
) -> Result<Vec<Piece>, HarmonyError> {
    let mut pieces = Vec::new();
    let has_function_tools = conversation
        .developer
        .as_ref()
        .is_some_and(|d| !d.tools.is_empty());
    if let Some(system) = &conversation.system {
        let body = system_text(system, has_function_tools || system.has_function_tools);
        structured_message(&mut pieces, "system", body);
    }
    if let Some(developer) = &conversation.developer {
        structured_message(&mut pieces, "developer", developer_text(developer));
    }
    let messages = &conversation.messages;
    // Index of the last `final` message: analysis before it belongs to finished turns.
    let last_final = messages
        .iter()
        .rposition(|m| m.channel.as_deref() == Some("final"));
    for (i, message) in messages.iter().enumerate() {
        let dropped = options.auto_drop_analysis
            && message.channel.as_deref() == Some("analysis")
            && last_final.is_some_and(|f| i < f);
        if !dropped {
            message_pieces(&mut pieces, message)?;
        }
    }
    Ok(pieces)
}

/// `<|start|>{role}` that opens the turn the model is asked to write.
pub(crate) fn completion_start_pieces(
    pieces: &mut Vec<Piece>,
    next_role: &Role,
) -> Result<(), HarmonyError> {
    if matches!(next_role, Role::Tool(name) if name.is_empty()) {
        return Err(HarmonyError::ToolWithoutName);
    }
    pieces.push(Piece::Special(tokenizer::START));
    text(pieces, next_role.as_str());
    Ok(())
}

fn structured_message(pieces: &mut Vec<Piece>, role: &str, body: String) {
    pieces.push(Piece::Special(tokenizer::START));
    text(pieces, role);
    pieces.push(Piece::Special(tokenizer::MESSAGE));
    text(pieces, body);
    pieces.push(Piece::Special(tokenizer::END));
}

/// `<|start|>{role}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>{content}`
/// then `<|call|>` for an assistant message with a recipient (a tool call), else `<|end|>`
/// (which is also how a `<|return|>`-terminated final answer is stored in history).
pub(crate) fn message_pieces(
    pieces: &mut Vec<Piece>,
    message: &Message,
) -> Result<(), HarmonyError> {
    if matches!(&message.role, Role::Tool(name) if name.is_empty()) {
        return Err(HarmonyError::ToolWithoutName);
    }
    pieces.push(Piece::Special(tokenizer::START));
    text(pieces, message.role.as_str());
    if let Some(recipient) = &message.recipient
        && recipient != "all"
    {
        text(pieces, format!(" to={recipient}"));
    }
    if let Some(channel) = &message.channel {
        pieces.push(Piece::Special(tokenizer::CHANNEL));
        text(pieces, channel.as_str());
    }
    if let Some(content_type) = &message.content_type {
        // `<|constrain|>` is written as a special token even though it arrives in a string.
        match content_type.strip_prefix("<|constrain|>") {
            Some(rest) => {
                text(pieces, " ");
                pieces.push(Piece::Special(tokenizer::CONSTRAIN));
                if !rest.is_empty() {
                    text(pieces, rest);
                }
            }
            None => text(pieces, format!(" {content_type}")),
        }
    }
    pieces.push(Piece::Special(tokenizer::MESSAGE));
    text(pieces, message.content.as_str());
    let end = if message.role == Role::Assistant && message.recipient.is_some() {
        tokenizer::CALL
    } else {
        tokenizer::END
    };
    pieces.push(Piece::Special(end));
    Ok(())
}

pub(crate) fn pieces_to_tokens(
    tokenizer: &Tokenizer,
    pieces: &[Piece],
) -> Result<Vec<u32>, HarmonyError> {
    let mut out = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Special(id) => out.push(*id),
            Piece::Text(s) => out.extend(tokenizer.encode_ordinary(s)?),
        }
    }
    Ok(out)
}

pub(crate) fn pieces_to_text(pieces: &[Piece]) -> String {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Special(id) => {
                out.push_str(&tokenizer::special_token_name(*id).unwrap_or_default())
            }
            Piece::Text(s) => out.push_str(s),
        }
    }
    out
}

/// The system message text: identity / cutoff / date, reasoning, channels; sections joined by a
/// blank line.
pub(crate) fn system_text(system: &SystemContent, has_function_tools: bool) -> String {
    let mut sections = Vec::new();
    let mut top = Vec::new();
    if let Some(identity) = &system.model_identity {
        top.push(identity.clone());
    }
    if let Some(cutoff) = &system.knowledge_cutoff {
        top.push(format!("Knowledge cutoff: {cutoff}"));
    }
    if let Some(date) = &system.conversation_start_date {
        top.push(format!("Current date: {date}"));
    }
    if !top.is_empty() {
        sections.push(top.join("\n"));
    }
    if let Some(effort) = system.reasoning_effort {
        sections.push(format!("Reasoning: {effort}"));
    }
    if !system.channels.is_empty() {
        let mut channels = format!("# Valid channels: {}.", system.channels.join(", "));
        if system.channel_required {
            channels.push_str(" Channel must be included for every message.");
        }
        if has_function_tools {
            channels
                .push_str("\nCalls to these tools must go to the commentary channel: 'functions'.");
        }
        sections.push(channels);
    }
    sections.join("\n\n")
}

/// The developer message text: `# Instructions`, then the function tools.
pub(crate) fn developer_text(developer: &DeveloperContent) -> String {
    let mut sections = Vec::new();
    if let Some(instructions) = &developer.instructions {
        sections.push("# Instructions".to_string());
        sections.push(instructions.clone());
    }
    if !developer.tools.is_empty() {
        let mut content = vec![
            format!("## {}\n", super::FUNCTIONS_NAMESPACE),
            format!("namespace {} {{\n", super::FUNCTIONS_NAMESPACE),
        ];
        for tool in &developer.tools {
            for line in tool.description.lines() {
                content.push(format!("// {line}"));
            }
            match tool.parameters.as_ref().filter(|p| !p.is_null()) {
                Some(parameters) => content.push(format!(
                    "type {} = (_: {}) => any;\n",
                    tool.name,
                    json_schema_to_typescript(parameters, "")
                )),
                None => content.push(format!("type {} = () => any;\n", tool.name)),
            }
        }
        content.push(format!("}} // namespace {}", super::FUNCTIONS_NAMESPACE));
        sections.push(["# Tools".to_string(), content.join("\n")].join("\n\n"));
    }
    sections.join("\n\n")
}

fn is_enum(schema: &Value) -> bool {
    schema
        .get("enum")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

fn is_nullable(schema: &Value) -> bool {
    schema
        .get("nullable")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn str_field<'a>(schema: &'a Value, key: &str) -> Option<&'a str> {
    schema.get(key).and_then(Value::as_str)
}

/// `default: …` as harmony writes it: strings quoted, except for enums whose values already are
/// quoted in the type.
fn default_comment(schema: &Value, default: &Value) -> String {
    match default.as_str() {
        Some(s) if !is_enum(schema) => format!("default: \"{s}\""),
        Some(s) => format!("default: {s}"),
        None => format!("default: {default}"),
    }
}

/// A JSON schema as the TypeScript-like type harmony shows the model, `indent` prefixing the
/// lines of nested objects. Port of `HarmonyEncoding::json_schema_to_typescript`: objects with
/// `// description` comments above properties, `?` on optional ones and `// default: …` after
/// them; string enums as unions of literals; `integer` as `number`; arrays as `T[]`; `oneOf` as
/// a multi-line union; `nullable` as `| null`; anything else as `any`.
///
/// Object properties come out in the schema's order (serde_json's `preserve_order`), as in
/// harmony.
pub fn json_schema_to_typescript(schema: &Value, indent: &str) -> String {
    if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
        let mut out = String::new();
        for variant in variants {
            out.push_str(&format!("\n{indent} | "));
            let mut ty = json_schema_to_typescript(variant, &format!("{indent}   "));
            if is_nullable(variant) && !ty.contains("null") {
                ty.push_str(" | null");
            }
            out.push_str(&ty);
            let mut comments = Vec::new();
            if let Some(desc) = str_field(variant, "description") {
                comments.push(desc.to_string());
            }
            if let Some(default) = variant.get("default") {
                // Unlike the property-level case, harmony writes enum string defaults quoted here.
                match default.as_str() {
                    Some(s) if !is_enum(variant) => comments.push(format!("default: \"{s}\"")),
                    _ => comments.push(format!("default: {default}")),
                }
            }
            if !comments.is_empty() {
                out.push_str(&format!(" // {}", comments.join(" ")));
            }
        }
        return out;
    }
    if let Some(types) = schema.get("type").and_then(Value::as_array) {
        let names: Vec<&str> = types
            .iter()
            .filter_map(Value::as_str)
            .map(|t| if t == "integer" { "number" } else { t })
            .collect();
        if !names.is_empty() {
            return names.join(" | ");
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => object_to_typescript(schema, indent),
        Some("string") => {
            let literals: Vec<String> = schema
                .get("enum")
                .and_then(Value::as_array)
                .map(|values| {
                    values
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|s| format!("\"{s}\""))
                        .collect()
                })
                .unwrap_or_default();
            if literals.is_empty() {
                "string".to_string()
            } else {
                literals.join(" | ")
            }
        }
        Some("number") | Some("integer") => "number".to_string(),
        Some("boolean") => "boolean".to_string(),
        Some("array") => match schema.get("items") {
            Some(items) => format!("{}[]", json_schema_to_typescript(items, indent)),
            None => "Array<any>".to_string(),
        },
        _ => "any".to_string(),
    }
}

fn object_to_typescript(schema: &Value, indent: &str) -> String {
    let mut out = String::new();
    if let Some(desc) = str_field(schema, "description") {
        out.push_str(&format!("{indent}// {desc}\n"));
    }
    out.push_str("{\n");
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (key, prop) in properties {
            let optional = if required.contains(&key.as_str()) {
                ""
            } else {
                "?"
            };
            if let Some(title) = str_field(prop, "title") {
                out.push_str(&format!("{indent}// {title}\n{indent}//\n"));
            }
            let one_of = prop.get("oneOf");
            if one_of.is_none()
                && let Some(desc) = str_field(prop, "description")
            {
                out.push_str(&format!("{indent}// {desc}\n"));
            }
            if let Some(examples) = prop.get("examples").and_then(Value::as_array)
                && !examples.is_empty()
            {
                out.push_str(&format!("{indent}// Examples:\n"));
                for example in examples.iter().filter_map(Value::as_str) {
                    out.push_str(&format!("{indent}// - \"{example}\"\n"));
                }
            }
            if let Some(variants) = one_of.and_then(Value::as_array) {
                one_of_property(&mut out, prop, variants, key, optional, indent);
                continue;
            }
            let mut ty = json_schema_to_typescript(prop, &format!("{indent}    "));
            if is_nullable(prop) && !ty.contains("null") {
                ty.push_str(" | null");
            }
            out.push_str(&format!("{indent}{key}{optional}: {ty},"));
            if one_of.is_none()
                && let Some(default) = prop.get("default")
            {
                out.push_str(&format!(" // {}", default_comment(prop, default)));
            }
            out.push('\n');
        }
    }
    out.push_str(&format!("{indent}}}"));
    out
}

/// A property whose type is a `oneOf`: comments above, then one `| variant` line per variant.
fn one_of_property(
    out: &mut String,
    prop: &Value,
    variants: &[Value],
    key: &str,
    optional: &str,
    indent: &str,
) {
    let property_desc = str_field(prop, "description");
    // Harmony does not repeat a description that the first variant carries too.
    let first_desc = variants.first().and_then(|v| str_field(v, "description"));
    let mut desc_above = false;
    if let Some(desc) = property_desc
        && first_desc != Some(desc)
    {
        out.push_str(&format!("{indent}// {desc}\n"));
        desc_above = true;
    }
    if let Some(default) = prop.get("default") {
        out.push_str(&format!("{indent}// {}\n", default_comment(prop, default)));
    }
    out.push_str(&format!("{indent}{key}{optional}:\n"));
    for (i, variant) in variants.iter().enumerate() {
        out.push_str(&format!("{indent} | "));
        let mut ty = json_schema_to_typescript(variant, &format!("{indent}   "));
        if is_nullable(variant) && !ty.contains("null") {
            ty.push_str(" | null");
        }
        out.push_str(&ty);
        let mut comments = Vec::new();
        if !(i == 0 && desc_above)
            && let Some(desc) = str_field(variant, "description")
            && Some(desc) != property_desc
        {
            comments.push(desc.to_string());
        }
        if let Some(default) = variant.get("default") {
            comments.push(default_comment(variant, default));
        }
        if !comments.is_empty() {
            out.push_str(&format!(" // {}", comments.join(" ")));
        }
        out.push('\n');
    }
    out.push_str(&format!("{indent},\n"));
}
