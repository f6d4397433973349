//! OpenAI chat messages and tools → a Harmony [`Conversation`] (and the forced completion prefix
//! for `tool_choice`).
//!
//! - System message: [`SystemContent`] defaults with the request's reasoning effort and today's
//!   date; its function-tools line appears when tools are declared.
//! - Developer message: the text of every `system` and `developer` message (joined by blank
//!   lines) as instructions, plus the function tools.
//! - `user` → user message; `assistant` → an `analysis` message for `reasoning_content`, a
//!   `final` message for `content`, one `commentary` call per tool call; `tool` → the function's
//!   result, addressed to the assistant (its name found from `tool_call_id`).

use std::collections::HashMap;
use std::str::FromStr;

use gptoss_model::harmony::{
    Conversation, DeveloperContent, Message, ReasoningEffort, SystemContent, ToolDescription,
};
use gptoss_model::tokenizer::{self, Tokenizer};
use serde_json::Value;

use crate::api_types::{ChatMessage, ContentPart, MessageContent, ToolDef};
use crate::errors::ApiError;

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No tools: they are not shown to the model.
    None,
    /// The model decides.
    Auto,
    /// The model must call some tool (forced tool-call header).
    Required,
    /// The model must call this function.
    Function(String),
}

/// Parses `tool_choice` (`None` when absent: `auto` with tools, `none` without).
pub fn parse_tool_choice(
    v: Option<&Value>,
    tools: &[ToolDescription],
) -> Result<ToolChoice, ApiError> {
    let choice = match v {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::param(
                    "tool_choice",
                    format!(
                        "Invalid 'tool_choice': '{other}'. Expected 'none', 'auto', 'required' or a function."
                    ),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => ToolChoice::Function(name.to_string()),
                _ => {
                    return Err(ApiError::param(
                        "tool_choice",
                        "Invalid 'tool_choice': expected {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                    ));
                }
            }
        }
        Some(_) => {
            return Err(ApiError::param(
                "tool_choice",
                "Invalid 'tool_choice': expected a string or an object.",
            ));
        }
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Function(_) if tools.is_empty() => Err(ApiError::param(
            "tool_choice",
            "'tool_choice' requires 'tools' to be set.",
        )),
        ToolChoice::Function(name) if !tools.iter().any(|t| &t.name == name) => {
            Err(ApiError::param(
                "tool_choice",
                format!("Invalid 'tool_choice': no function named '{name}' in 'tools'."),
            ))
        }
        _ => Ok(choice),
    }
}

/// Checks a function name: 1-64 of `[A-Za-z0-9_-]`.
fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks a JSON schema of function parameters: an object whose `type` (if any) is `object`,
/// with an object `properties` and a string-array `required`.
pub fn check_parameters_schema(schema: &Value, param: &str) -> Result<(), ApiError> {
    let bad = |msg: String| {
        Err(ApiError::invalid(
            msg,
            Some(param),
            Some("invalid_function_parameters"),
        ))
    };
    let Some(obj) = schema.as_object() else {
        return bad(format!(
            "Invalid schema for function parameters: '{param}' must be a JSON object."
        ));
    };
    if let Some(t) = obj.get("type")
        && t != "object"
    {
        return bad(format!(
            "Invalid schema for function parameters: schema must be a JSON Schema of 'type: \"object\"', got 'type: {t}'."
        ));
    }
    if let Some(p) = obj.get("properties")
        && !p.is_object()
    {
        return bad(format!(
            "Invalid schema for function parameters: '{param}.properties' must be an object."
        ));
    }
    if let Some(r) = obj.get("required")
        && !r.as_array().is_some_and(|a| a.iter().all(Value::is_string))
    {
        return bad(format!(
            "Invalid schema for function parameters: '{param}.required' must be an array of strings."
        ));
    }
    Ok(())
}

/// Validates chat `tools` and converts them.
pub fn convert_tools(tools: &[ToolDef]) -> Result<Vec<ToolDescription>, ApiError> {
    let mut out: Vec<ToolDescription> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::param(
                &format!("tools[{i}].type"),
                format!(
                    "Invalid value: '{}'. Supported values are: 'function'.",
                    t.kind
                ),
            ));
        }
        out.push(function_tool(
            &t.function.name,
            t.function.description.as_deref(),
            t.function.parameters.as_ref(),
            &format!("tools[{i}].function"),
        )?);
        if out[..out.len() - 1]
            .iter()
            .any(|x| x.name == t.function.name)
        {
            return Err(ApiError::param(
                &format!("tools[{i}].function.name"),
                format!("Duplicate function name '{}'.", t.function.name),
            ));
        }
    }
    Ok(out)
}

/// Validates one function tool.
pub fn function_tool(
    name: &str,
    description: Option<&str>,
    parameters: Option<&Value>,
    param: &str,
) -> Result<ToolDescription, ApiError> {
    if !valid_function_name(name) {
        return Err(ApiError::param(
            &format!("{param}.name"),
            format!(
                "Invalid function name '{name}': it must be 1-64 characters of a-z, A-Z, 0-9, '_' and '-'."
            ),
        ));
    }
    let parameters = match parameters {
        None | Some(Value::Null) => None,
        Some(p) => {
            check_parameters_schema(p, &format!("{param}.parameters"))?;
            Some(p.clone())
        }
    };
    Ok(ToolDescription::new(
        name,
        description.unwrap_or(""),
        parameters,
    ))
}

/// The text of message content.
pub fn content_text(content: &MessageContent, param: &str) -> Result<String, ApiError> {
    match content {
        MessageContent::Text(s) => Ok(s.clone()),
        MessageContent::Parts(parts) => {
            let mut out = String::new();
            for (j, ContentPart { kind, text }) in parts.iter().enumerate() {
                match (kind.as_str(), text) {
                    ("text" | "input_text" | "output_text", Some(t)) => out.push_str(t),
                    ("text" | "input_text" | "output_text", None) => {
                        return Err(ApiError::param(
                            &format!("{param}[{j}].text"),
                            "A text content part needs 'text'.",
                        ));
                    }
                    (other, _) => {
                        return Err(ApiError::param(
                            &format!("{param}[{j}].type"),
                            format!(
                                "Content parts of type '{other}' are not supported by this model (text only)."
                            ),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Parses `reasoning_effort` (`minimal` counts as `low`).
pub fn parse_effort(v: Option<&str>, param: &str) -> Result<Option<ReasoningEffort>, ApiError> {
    match v {
        None => Ok(None),
        Some("minimal") => Ok(Some(ReasoningEffort::Low)),
        Some(s) => ReasoningEffort::from_str(s).map(Some).map_err(|_| {
            ApiError::param(
                param,
                format!(
                    "Invalid '{param}': '{s}'. Supported values are: 'low', 'medium' and 'high'."
                ),
            )
        }),
    }
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    civil_date((secs / 86_400) as i64)
}

/// The proleptic Gregorian date of a day number since 1970-01-01 (H. Hinnant's algorithm).
pub fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The system content for a request.
pub fn system_content(effort: Option<ReasoningEffort>, has_tools: bool) -> SystemContent {
    let mut s = SystemContent::default().with_conversation_start_date(today());
    if let Some(e) = effort {
        s = s.with_reasoning_effort(e);
    }
    s.has_function_tools = has_tools;
    s
}

/// Builds the Harmony conversation of a chat request.
pub fn chat_conversation(
    messages: &[ChatMessage],
    tools: Vec<ToolDescription>,
    effort: Option<ReasoningEffort>,
) -> Result<Conversation, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "'messages' must contain at least one message.",
            Some("messages"),
            Some("empty_array"),
        ));
    }
    let mut instructions: Vec<String> = Vec::new();
    let mut out: Vec<Message> = Vec::new();
    let mut call_names: HashMap<String, String> = HashMap::new();
    let mut last_call: Option<String> = None;
    for (i, m) in messages.iter().enumerate() {
        let p = format!("messages[{i}]");
        let text = |required: bool| -> Result<Option<String>, ApiError> {
            match &m.content {
                Some(c) => content_text(c, &format!("{p}.content")).map(Some),
                None if required => Err(ApiError::invalid(
                    format!("Missing 'content' in {p} ({} message).", m.role),
                    Some(&format!("{p}.content")),
                    Some("missing_required_parameter"),
                )),
                None => Ok(None),
            }
        };
        match m.role.as_str() {
            "system" | "developer" => {
                let t = text(true)?.unwrap_or_default();
                if !t.is_empty() {
                    instructions.push(t);
                }
            }
            "user" => out.push(Message::user(text(true)?.unwrap_or_default())),
            "assistant" => {
                let reasoning = m.reasoning_content.as_ref().or(m.reasoning.as_ref());
                if let Some(r) = reasoning
                    && !r.is_empty()
                {
                    out.push(Message::assistant("analysis", r.clone()));
                }
                let calls = m.tool_calls.as_deref().unwrap_or_default();
                if let Some(c) = text(calls.is_empty() && reasoning.is_none())?
                    && !c.is_empty()
                {
                    // Text next to tool calls is a preamble (commentary); alone, the answer.
                    let channel = if calls.is_empty() {
                        "final"
                    } else {
                        "commentary"
                    };
                    out.push(Message::assistant(channel, c));
                }
                for (j, c) in calls.iter().enumerate() {
                    if c.kind.as_deref().is_some_and(|k| k != "function") {
                        return Err(ApiError::param(
                            &format!("{p}.tool_calls[{j}].type"),
                            "Only 'function' tool calls are supported.",
                        ));
                    }
                    if !valid_function_name(&c.function.name) {
                        return Err(ApiError::param(
                            &format!("{p}.tool_calls[{j}].function.name"),
                            format!("Invalid function name '{}'.", c.function.name),
                        ));
                    }
                    if let Some(id) = &c.id {
                        call_names.insert(id.clone(), c.function.name.clone());
                    }
                    last_call = Some(c.function.name.clone());
                    out.push(Message::function_call(
                        &c.function.name,
                        c.function.arguments.clone(),
                    ));
                }
            }
            "tool" => {
                let name = m
                    .tool_call_id
                    .as_ref()
                    .and_then(|id| call_names.get(id).cloned())
                    .or_else(|| m.name.clone())
                    .or_else(|| last_call.clone())
                    .ok_or_else(|| {
                        ApiError::param(
                            &format!("{p}.tool_call_id"),
                            format!("{p} is a tool result, but no assistant tool call with this 'tool_call_id' precedes it."),
                        )
                    })?;
                out.push(Message::function_result(
                    &name,
                    text(true)?.unwrap_or_default(),
                ));
            }
            other => {
                return Err(ApiError::param(
                    &format!("{p}.role"),
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'."
                    ),
                ));
            }
        }
    }
    let has_tools = !tools.is_empty();
    let mut developer = DeveloperContent::default().with_function_tools(tools);
    if !instructions.is_empty() {
        developer = developer.with_instructions(instructions.join("\n\n"));
    }
    let mut conv = Conversation::new().with_system(system_content(effort, has_tools));
    if developer.instructions.is_some() || has_tools {
        conv = conv.with_developer(developer);
    }
    conv.messages = out;
    Ok(conv)
}

/// Tokens that force the start of the completion for `tool_choice` `required` (a call of some
/// function) or a named function.
pub fn forced_prefix(tok: &Tokenizer, choice: &ToolChoice) -> Result<Vec<u32>, ApiError> {
    let enc = |s: &str| {
        tok.encode_ordinary(s)
            .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))
    };
    Ok(match choice {
        ToolChoice::Required => {
            let mut v = vec![tokenizer::CHANNEL];
            v.extend(enc("commentary to=functions.")?);
            v
        }
        ToolChoice::Function(name) => {
            let mut v = vec![tokenizer::CHANNEL];
            v.extend(enc(&format!("commentary to=functions.{name} "))?);
            v.push(tokenizer::CONSTRAIN);
            v.extend(enc("json")?);
            v.push(tokenizer::MESSAGE);
            v
        }
        ToolChoice::None | ToolChoice::Auto => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_305), "2025-08-05");
        assert_eq!(civil_date(11_016), "2000-02-29");
    }

    #[test]
    fn schema_checks() {
        assert!(check_parameters_schema(&serde_json::json!({"type": "object"}), "p").is_ok());
        assert!(check_parameters_schema(&serde_json::json!({"type": "string"}), "p").is_err());
        assert!(check_parameters_schema(&serde_json::json!([1]), "p").is_err());
        assert!(check_parameters_schema(&serde_json::json!({"properties": 3}), "p").is_err());
        assert!(check_parameters_schema(&serde_json::json!({"required": [1]}), "p").is_err());
    }
}
