//! `gptoss inspect MODEL [--json]`.

use std::process::ExitCode;

use gptoss_formats::inspect::InspectReport;
use gptoss_formats::{Checkpoint, hub};

/// Flags of `inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory or a Hugging Face model id from the local cache.
    pub model: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints the report; exits 1 when the checkpoint has problems.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dir = hub::resolve_model(&a.model)?;
    let start = std::time::Instant::now();
    let ckpt = Checkpoint::open(&dir)?;
    let report = InspectReport::build(&ckpt);
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["inspect_seconds"] = serde_json::json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", report.to_text());
        println!("  (read in {secs:.3} s)");
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
