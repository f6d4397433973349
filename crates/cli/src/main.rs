//! `gptoss`: the command-line front end. Subcommands only parse flags and call the crates.

mod commands;
mod generation;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Run OpenAI's GPT-OSS models (Unsloth bnb-4bit, MXFP4 or bf16 checkpoints).
#[derive(Parser)]
#[command(name = "gptoss", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a checkpoint holds and whether it loads (reads headers only).
    Inspect(commands::inspect::Args),
    /// Write a random-weight checkpoint of the real on-disk format.
    Synth(commands::synth::Args),
    /// Rewrite a checkpoint in another layout.
    Convert(commands::convert::Args),
    /// Generate a reply to a prompt (Harmony chat, or raw text with --raw), streamed.
    Generate(commands::generate::Args),
    /// Interactive multi-turn chat in the terminal.
    Chat(commands::chat::Args),
    /// Write the logits of a token sequence to a safetensors file.
    Logits(commands::logits::Args),
    /// Measure prefill and decode throughput, one sequence or N together (on a GPU: against the
    /// memory-bandwidth roofline).
    Bench(commands::bench::Args),
    /// Serve an OpenAI-compatible HTTP API (chat, completions, responses) with continuous batching.
    Serve(commands::serve::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Chat(a) => commands::chat::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
