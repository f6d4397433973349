//! `gptoss synth --preset 20b|120b|tiny --layout unsloth-nf4|mxfp4|bf16 --out DIR [--seed N]`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use gptoss_formats::synth::{self, Preset, SynthLayout};

/// Flags of `synth`.
#[derive(clap::Args)]
pub struct Args {
    /// Model size: 20b, 120b or tiny (the demo size: real vocabulary, 2 small layers).
    #[arg(long)]
    pub preset: String,
    /// On-disk layout: unsloth-nf4, mxfp4 or bf16.
    #[arg(long, default_value = "unsloth-nf4")]
    pub layout: String,
    /// Output directory (must not already hold a checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// Random seed; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest shard size in GB.
    #[arg(long, default_value_t = 5.0)]
    pub max_shard_gb: f64,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

/// Parses a preset name.
pub fn parse_preset(s: &str) -> anyhow::Result<Preset> {
    Ok(match s {
        "20b" | "gpt-oss-20b" => Preset::Gpt20b,
        "120b" | "gpt-oss-120b" => Preset::Gpt120b,
        "tiny" => Preset::Tiny,
        other => bail!("unknown preset \"{other}\": expected 20b, 120b or tiny"),
    })
}

/// Writes the checkpoint with a progress bar.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let preset = parse_preset(&a.preset)?;
    let Some(layout) = SynthLayout::parse(&a.layout) else {
        bail!(
            "unknown layout \"{}\": expected unsloth-nf4, mxfp4 or bf16",
            a.layout
        );
    };
    let bar = super::bytes_bar(synth::estimated_bytes(preset, layout), "synth");
    let opts = super::write_options(&bar, a.max_shard_gb);
    let start = std::time::Instant::now();
    let summary = synth::synth(preset, layout, a.seed, &a.out, opts)?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        v["seconds"] = serde_json::json!(secs);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} tensors, {:.2} GB in {} shard(s)) in {secs:.1} s",
            a.out.display(),
            summary.tensors,
            summary.bytes as f64 / 1e9,
            summary.shards.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
