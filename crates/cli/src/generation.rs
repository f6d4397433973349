//! The single-sequence driver behind `generate`, `chat` and `logits`: opens a backend, prefills a
//! prompt, samples token by token and streams text (Harmony-parsed or raw) to a sink.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use gptoss_engine::backend::{Backend, LogitsWanted, SeqStep, StepBatch};
use gptoss_engine::cpu::CpuBackend;
use gptoss_engine::sampling::{Sampler, SamplingParams};
use gptoss_engine::stop::StopMatcher;
use gptoss_formats::{hub, synth};
use gptoss_model::harmony::{ParserEvent, Role, StreamingParser};
use gptoss_model::tokenizer::Tokenizer;

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The f32 CPU reference backend.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
    /// CUDA when a usable GPU is present, otherwise the CPU (with a notice).
    Auto,
}

/// Resolves MODEL (directory or Hugging Face id); with none, the bundled demo model, said plainly.
pub fn resolve_model_or_demo(model: Option<&str>) -> anyhow::Result<PathBuf> {
    match model {
        Some(m) => Ok(hub::resolve_model(m)?),
        None => {
            let dir = synth::demo_model_dir().context("preparing the bundled demo model")?;
            eprintln!(
                "note: no MODEL given: using the bundled demo model ({}), a tiny GPT-OSS with random weights and the real tokenizer. It writes nonsense; pass a model directory or Hugging Face id for real output.",
                dir.display()
            );
            Ok(dir)
        }
    }
}

/// Backend settings that come from the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackendOptions {
    /// Longest sequence to support (sizes the CUDA RoPE tables); `None` = the backend's default.
    pub max_context: Option<usize>,
    /// Run CUDA decode steps launch by launch instead of replaying a CUDA graph.
    pub enforce_eager: bool,
    /// Shards for tensor/expert parallelism (`-tp N`); 0 or 1 = one device.
    pub tensor_parallel_size: usize,
    /// Element type of the CUDA KV cache (`--kv-cache-dtype`); `None` = the backend's default.
    pub kv_cache_dtype: Option<gptoss_cuda::KvDtype>,
}

/// Opens the backend for `device`: `cuda` fails clearly without a usable GPU; `auto` takes the
/// GPU when one answers and otherwise says why it runs on the CPU.
pub fn open_backend(
    dir: &Path,
    device: Device,
    opts: BackendOptions,
) -> anyhow::Result<Box<dyn Backend>> {
    if opts.tensor_parallel_size > 1 {
        return match device {
            Device::Cpu => Ok(Box::new(gptoss_engine::parallel::ShardedCpuBackend::open(
                dir,
                opts.tensor_parallel_size,
            )?)),
            _ => bail!(
                "--tensor-parallel-size {} is implemented on the CPU backend only so far (--device cpu); the NCCL multi-GPU backend is not built yet",
                opts.tensor_parallel_size
            ),
        };
    }
    let cuda = || -> anyhow::Result<Box<dyn Backend>> {
        let mut o = gptoss_cuda::CudaOptions {
            enforce_eager: opts.enforce_eager,
            ..Default::default()
        };
        if let Some(n) = opts.max_context {
            o.max_context = n;
        }
        if let Some(kv) = opts.kv_cache_dtype {
            o.kv_dtype = kv;
        }
        Ok(Box::new(gptoss_cuda::CudaBackend::open(dir, o)?))
    };
    match device {
        Device::Cpu => Ok(Box::new(CpuBackend::open(dir)?)),
        Device::Cuda => cuda(),
        Device::Auto => match gptoss_cuda::driver::probe(0) {
            Ok(()) => cuda(),
            Err(why) => {
                eprintln!(
                    "note: --device auto: {why}; running on the CPU reference backend (slow)"
                );
                Ok(Box::new(CpuBackend::open(dir)?))
            }
        },
    }
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Minimum probability relative to the most likely token.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalty for tokens already generated.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Penalty per occurrence of a generated token.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The validated parameters.
    pub fn params(&self) -> anyhow::Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: (self.top_k > 0).then_some(self.top_k),
            min_p: self.min_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        };
        p.validate()?;
        Ok(p)
    }
}

/// What the driver reports as it goes.
pub enum Piece<'a> {
    /// Text of a Harmony message on `channel` (None = raw text).
    Text {
        channel: Option<&'a str>,
        text: &'a str,
    },
    /// A Harmony message started (its header was parsed).
    MessageStart {
        channel: Option<&'a str>,
        recipient: Option<&'a str>,
    },
    /// Header text (role, channel, recipient) as the model writes it, before it parses.
    Header { text: &'a str },
}

/// Timing and counts of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub finish_reason: String,
    pub tokens: Vec<u32>,
}

impl GenStats {
    /// Decode tokens per second (tokens after the first over the decode time).
    pub fn decode_tps(&self) -> f64 {
        if self.decode_seconds > 0.0 && self.generated_tokens > 1 {
            (self.generated_tokens - 1) as f64 / self.decode_seconds
        } else {
            0.0
        }
    }

    /// Prefill tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        if self.prefill_seconds > 0.0 {
            self.prompt_tokens as f64 / self.prefill_seconds
        } else {
            0.0
        }
    }
}

/// Runs one sequence: prefill `prompt`, then sample up to `max_tokens`. With `harmony`, output is
/// parsed into channels and stops on `<|return|>` / `<|call|>`; otherwise it is raw text.
#[allow(clippy::too_many_arguments)]
pub fn run_sequence(
    backend: &mut dyn Backend,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    stop_strings: &[String],
    harmony: bool,
    mut sink: impl FnMut(Piece<'_>),
) -> anyhow::Result<GenStats> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let ctx = backend.config().max_position_embeddings;
    if prompt.len() >= ctx {
        bail!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt.len()
        );
    }
    let max_tokens = max_tokens.min(ctx - prompt.len());
    let seq = 1;
    let mut sampler = Sampler::new(params)?.with_prompt_tokens(prompt);
    let stop_ids: Vec<u32> = if harmony {
        gptoss_model::harmony::stop_tokens_for_assistant().to_vec()
    } else {
        Vec::new()
    };
    let mut stops = StopMatcher::new(stop_ids, stop_strings.iter().cloned());
    let mut parser =
        harmony.then(|| StreamingParser::new_for_completion(tokenizer, Role::Assistant));
    let mut detok = tokenizer.stream_decoder();

    let t0 = Instant::now();
    let mut step = SeqStep {
        seq,
        tokens: prompt.to_vec(),
        start_pos: 0,
        want_logits: LogitsWanted::Last,
    };
    let mut logits = backend.forward(&StepBatch {
        steps: vec![step.clone()],
    })?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = Vec::new();
    let mut finish = "length".to_string();
    let mut pos = prompt.len();
    while generated.len() < max_tokens {
        let tok = sampler.sample(logits.last(0))?;
        sampler.accept(tok.id);
        generated.push(tok.id);
        let mut stopped = false;
        if let Some(p) = parser.as_mut() {
            let events = p.push(tok.id);
            if events.is_empty() && !tokenizer.is_special(tok.id) {
                sink(Piece::Header {
                    text: &tokenizer.decode(&[tok.id]),
                });
            }
            for ev in events {
                match ev {
                    ParserEvent::MessageStart {
                        channel, recipient, ..
                    } => sink(Piece::MessageStart {
                        channel: channel.as_deref(),
                        recipient: recipient.as_deref(),
                    }),
                    ParserEvent::ContentDelta { channel, text, .. } => {
                        let r = stops.push(&text);
                        if !r.emit.is_empty() {
                            sink(Piece::Text {
                                channel: channel.as_deref(),
                                text: &r.emit,
                            });
                        }
                        stopped |= r.stopped.is_some();
                    }
                    ParserEvent::Stop { .. } => stopped = true,
                    ParserEvent::MessageEnd { .. } => {}
                }
            }
        } else {
            let delta = detok.push(tok.id);
            let r = stops.push_token(tok.id, &delta);
            if !r.emit.is_empty() {
                sink(Piece::Text {
                    channel: None,
                    text: &r.emit,
                });
            }
            stopped = r.stopped.is_some();
        }
        if stopped {
            finish = "stop".into();
            break;
        }
        if generated.len() == max_tokens {
            break;
        }
        step = SeqStep {
            seq,
            tokens: vec![tok.id],
            start_pos: pos,
            want_logits: LogitsWanted::Last,
        };
        pos += 1;
        logits = backend.forward(&StepBatch {
            steps: vec![step.clone()],
        })?;
    }
    if finish != "stop" {
        let rest = stops.finish();
        if !rest.is_empty() {
            sink(Piece::Text {
                channel: parser.as_ref().and_then(|p| p.current_channel()),
                text: &rest,
            });
        }
    }
    backend.release(seq);
    Ok(GenStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated.len(),
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
        finish_reason: finish,
        tokens: generated,
    })
}
