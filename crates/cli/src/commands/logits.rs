//! `gptoss logits MODEL --tokens 1,2,3 --out FILE.safetensors [--device cpu]`: the logits of every
//! position, for comparison with reference implementations.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gptoss_engine::backend::{LogitsWanted, SeqStep, StepBatch};

use crate::generation::{BackendOptions, Device, open_backend, resolve_model_or_demo};

/// Flags of `logits`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory or Hugging Face id; omit for the bundled demo model.
    pub model: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// Output safetensors file; holds one F32 tensor `logits` of shape [T, vocab].
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Split the model over N shards (tensor/expert parallel; CPU backend only so far).
    #[arg(
        long = "tensor-parallel-size",
        short = 't',
        visible_alias = "tp",
        default_value_t = 1
    )]
    pub tensor_parallel_size: usize,
}

/// Runs one forward over the tokens and writes the logits.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dir = resolve_model_or_demo(a.model.as_deref())?;
    let mut backend = open_backend(
        &dir,
        a.device,
        BackendOptions {
            tensor_parallel_size: a.tensor_parallel_size,
            ..BackendOptions::default()
        },
    )?;
    let vocab = backend.config().vocab_size;
    let step = SeqStep {
        seq: 0,
        tokens: a.tokens.clone(),
        start_pos: 0,
        want_logits: LogitsWanted::All,
    };
    let logits = backend.forward(&StepBatch { steps: vec![step] })?;
    let rows = logits.step(0);
    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![a.tokens.len(), vocab],
        &bytes,
    )?;
    safetensors::serialize_to_file([("logits", view)], None, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote logits [{}, {vocab}] to {}",
        a.tokens.len(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
