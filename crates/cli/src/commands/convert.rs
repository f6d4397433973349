//! `gptoss convert SRC --to unsloth-nf4|fused-bf16 --out DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use gptoss_formats::convert::{ConvertTarget, convert};
use gptoss_formats::{Checkpoint, hub};

/// Flags of `convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source model directory or Hugging Face id.
    pub src: String,
    /// Target layout: unsloth-nf4 or fused-bf16.
    #[arg(long)]
    pub to: String,
    /// Output directory (must not already hold a checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// Largest shard size in GB.
    #[arg(long, default_value_t = 5.0)]
    pub max_shard_gb: f64,
}

/// Converts with a progress bar.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let Some(target) = ConvertTarget::parse(&a.to) else {
        bail!(
            "unknown target \"{}\": expected unsloth-nf4 or fused-bf16",
            a.to
        );
    };
    let src = Checkpoint::open(&hub::resolve_model(&a.src)?)?;
    let bar = super::bytes_bar(src.total_bytes(), "convert");
    let opts = super::write_options(&bar, a.max_shard_gb);
    let start = std::time::Instant::now();
    let summary = convert(&src, target, &a.out, opts)?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} tensors, {:.2} GB) in {:.1} s",
        a.out.display(),
        summary.tensors,
        summary.bytes as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
