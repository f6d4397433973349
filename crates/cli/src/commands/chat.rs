//! `gptoss chat [MODEL]`: an interactive multi-turn chat in the terminal.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use gptoss_model::harmony::{Conversation, HarmonyEncoding, Message, Role, SystemContent};
use gptoss_model::tokenizer::Tokenizer;

use super::generate::{TerminalSink, parse_effort, use_color};
use crate::generation::{
    BackendOptions, Device, SamplingArgs, open_backend, resolve_model_or_demo, run_sequence,
};

/// Flags of `chat`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory or Hugging Face id; omit to use the bundled demo model.
    pub model: Option<String>,
    /// Reasoning effort: low, medium or high.
    #[arg(long, default_value = "medium")]
    pub reasoning_effort: String,
    /// Do not show the reasoning channel.
    #[arg(long)]
    pub hide_reasoning: bool,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Runs the read–generate loop until end of input or `/exit`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dir = resolve_model_or_demo(a.model.as_deref())?;
    let params = a.sampling.params()?;
    let mut effort = parse_effort(&a.reasoning_effort)?;
    let tokenizer = Tokenizer::for_model_dir(&dir)?;
    let harmony = HarmonyEncoding::new(tokenizer.clone());
    let mut backend = open_backend(&dir, a.device, BackendOptions::default())?;
    let mut sink = TerminalSink {
        hide_reasoning: a.hide_reasoning,
        color: use_color(),
    };
    let mut history: Vec<Message> = Vec::new();
    eprintln!(
        "chat with {} — /exit quits, /reset clears the history, /reasoning on|off, /effort low|medium|high",
        dir.display()
    );
    let stdin = std::io::stdin();
    loop {
        print!("\n> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                eprintln!("(history cleared)");
                continue;
            }
            "/reasoning on" => {
                sink.hide_reasoning = false;
                continue;
            }
            "/reasoning off" => {
                sink.hide_reasoning = true;
                continue;
            }
            _ if line.starts_with("/effort ") => {
                match parse_effort(line.trim_start_matches("/effort ").trim()) {
                    Ok(e) => effort = e,
                    Err(e) => eprintln!("{e}"),
                }
                continue;
            }
            _ => {}
        }
        history.push(Message::user(line));
        let conv = Conversation {
            system: Some(SystemContent::default().with_reasoning_effort(effort)),
            developer: None,
            messages: history.clone(),
        };
        let prompt = harmony.render_conversation_for_completion(&conv, &Role::Assistant)?;
        let stats = run_sequence(
            backend.as_mut(),
            &tokenizer,
            &prompt,
            a.max_tokens,
            params.clone(),
            &a.sampling.stop,
            true,
            |p| sink.write(p),
        )?;
        // Keep the turn in history (the renderer drops its reasoning once a final answer exists).
        history.extend(harmony.parse_completion(&stats.tokens));
        eprintln!(
            "\n[{} tokens, {:.2} tok/s]",
            stats.generated_tokens,
            stats.decode_tps()
        );
    }
    Ok(ExitCode::SUCCESS)
}
