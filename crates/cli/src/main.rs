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

/// Keeps freed large allocations in the process instead of returning them to the kernel.
///
/// Every decode step hands the engine one logits row per sequence (0.8 MB each for the 20b's
/// 201k-token vocabulary: 26 MB for 32 sequences). glibc serves such blocks with fresh `mmap`s
/// (or trims the heap after they are freed), so every step touched ~6,000 new pages: measured on
/// the H100 machine, the page faults cost 15 ms of a 45 ms 32-sequence step. Raising the mmap and
/// trim thresholds lets the same memory be reused from step to step.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
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
