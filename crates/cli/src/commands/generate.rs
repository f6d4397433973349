//! `gptoss generate [MODEL] --prompt TEXT [--raw] [--max-tokens N] [sampling flags]`.

use std::io::Write;
use std::process::ExitCode;

use gptoss_model::harmony::{
    Conversation, HarmonyEncoding, Message, ReasoningEffort, Role, SystemContent,
};
use gptoss_model::tokenizer::Tokenizer;

use crate::generation::{
    BackendOptions, Device, Piece, SamplingArgs, open_backend, resolve_model_or_demo, run_sequence,
};

/// Flags of `generate`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory or Hugging Face id; omit to use the bundled demo model.
    pub model: Option<String>,
    /// The user message (or, with --raw, the raw prompt text).
    #[arg(long, short)]
    pub prompt: String,
    /// Feed the prompt as raw text (special tokens allowed) instead of a Harmony chat.
    #[arg(long)]
    pub raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Reasoning effort written into the system message.
    #[arg(long, default_value = "medium")]
    pub reasoning_effort: String,
    /// Developer instructions.
    #[arg(long)]
    pub instructions: Option<String>,
    /// Do not print the analysis (reasoning) channel.
    #[arg(long)]
    pub hide_reasoning: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Print a JSON summary (tokens, text per channel, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Parses `low|medium|high`.
pub fn parse_effort(s: &str) -> anyhow::Result<ReasoningEffort> {
    match s {
        "low" => Ok(ReasoningEffort::Low),
        "medium" => Ok(ReasoningEffort::Medium),
        "high" => Ok(ReasoningEffort::High),
        other => anyhow::bail!("--reasoning-effort must be low, medium or high, not \"{other}\""),
    }
}

/// Prints Harmony pieces: the analysis channel dimmed (or hidden), the final channel plainly.
pub struct TerminalSink {
    pub hide_reasoning: bool,
    pub color: bool,
}

impl TerminalSink {
    /// Writes one piece to stdout.
    pub fn write(&self, piece: Piece<'_>) {
        let mut out = std::io::stdout().lock();
        match piece {
            Piece::MessageStart { channel, recipient } => {
                let label = match (channel, recipient) {
                    (_, Some(r)) => format!("\n[tool call → {r}] "),
                    (Some("analysis"), _) if self.hide_reasoning => String::new(),
                    (Some("analysis"), _) => "\n[reasoning] ".into(),
                    (Some("final"), _) => "\n[answer] ".into(),
                    (Some(c), _) => format!("\n[{c}] "),
                    (None, _) => String::new(),
                };
                let _ = write!(out, "{label}");
            }
            Piece::Header { text } => {
                if self.color {
                    let _ = write!(out, "\x1b[2;3m{text}\x1b[0m");
                } else {
                    let _ = write!(out, "{text}");
                }
            }
            Piece::Text { channel, text } => {
                if channel == Some("analysis") {
                    if !self.hide_reasoning {
                        if self.color {
                            let _ = write!(out, "\x1b[2m{text}\x1b[0m");
                        } else {
                            let _ = write!(out, "{text}");
                        }
                    }
                } else {
                    let _ = write!(out, "{text}");
                }
            }
        }
        let _ = out.flush();
    }
}

/// Runs the command.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dir = resolve_model_or_demo(a.model.as_deref())?;
    let params = a.sampling.params()?;
    let effort = parse_effort(&a.reasoning_effort)?;
    let tokenizer = Tokenizer::for_model_dir(&dir)?;
    let prompt = if a.raw {
        tokenizer.encode(&a.prompt, true)?
    } else {
        let mut conv =
            Conversation::new().with_system(SystemContent::default().with_reasoning_effort(effort));
        if let Some(i) = &a.instructions {
            conv = conv.with_developer(
                gptoss_model::harmony::DeveloperContent::default().with_instructions(i.clone()),
            );
        }
        conv.push(Message::user(a.prompt.clone()));
        HarmonyEncoding::new(tokenizer.clone())
            .render_conversation_for_completion(&conv, &Role::Assistant)?
    };
    let mut backend = open_backend(&dir, a.device, BackendOptions::default())?;
    let sink = TerminalSink {
        hide_reasoning: a.hide_reasoning,
        color: use_color(),
    };
    let mut texts: std::collections::BTreeMap<String, String> = Default::default();
    let stats = run_sequence(
        backend.as_mut(),
        &tokenizer,
        &prompt,
        a.max_tokens,
        params,
        &a.sampling.stop,
        !a.raw,
        |p| {
            if a.json {
                if let Piece::Text { channel, text } = p {
                    texts
                        .entry(channel.unwrap_or("text").to_string())
                        .or_default()
                        .push_str(text);
                }
            } else {
                sink.write(p)
            }
        },
    )?;
    if a.json {
        let v = serde_json::json!({
            "backend": backend.name(),
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "finish_reason": stats.finish_reason,
            "prefill_tokens_per_second": stats.prefill_tps(),
            "decode_tokens_per_second": stats.decode_tps(),
            "text": texts,
            "tokens": stats.tokens,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated ({}), prefill {:.1} tok/s, decode {:.2} tok/s on {}]",
            stats.prompt_tokens,
            stats.generated_tokens,
            stats.finish_reason,
            stats.prefill_tps(),
            stats.decode_tps(),
            backend.name()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Colour only for a terminal, and never with `NO_COLOR` set.
pub fn use_color() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
