//! `gptoss bench [MODEL] --prompt-len 512,4096 --gen-len 128 --batch 1,8,32 [--device cuda|cpu|auto]
//! [--json]`: prefill and greedy decode throughput, for one sequence and for N sequences decoding
//! together; on CUDA also GPU memory, bytes read per decoded token, the measured read bandwidth
//! of the GPU and batch-1 decode's fraction of that roofline.
//!
//! MODEL is a directory or Hugging Face id (omitted: the bundled demo model). `--device` is `cuda`
//! (the default: GPU 0), `cuda:N` or a bare ordinal `N` (GPU N), `cpu` (the reference backend) or
//! `auto`; the CUDA backend's context is sized from the longest prompt + `--gen-len`.
//!
//! For every prompt length P (`--prompt-len`, comma-separated; long prompts such as
//! `4096,16384,32768` are fed through `Backend::forward` in pieces of at most the backend's
//! `max_batch_tokens`) and every
//! batch size N (`--batch`, comma-separated), in that order, with the sequences released
//! between runs:
//! - **prefill**: N sequences of P random tokens (sequence `s` of length P always gets the same
//!   tokens, whatever N is; SeqIds `0..N`) are prefilled one after the other, one
//!   [`Backend::forward`] per sequence (per piece) with [`LogitsWanted::LastGreedy`]; the N
//!   prefills are timed together: `prefill_tok_s = N × P / time`;
//! - **decode**: one untimed warm-up step (it captures the CUDA graph), then `--gen-len` timed
//!   steps, each ONE [`Backend::forward`] carrying all N sequences' next token (one [`SeqStep`]
//!   of one token per sequence at `start_pos` = its length, [`LogitsWanted::LastGreedy`]: the
//!   backend returns each sequence's greedy token, as the engine asks for greedy requests; a GPU
//!   backend picks it on the device and copies back only the ids). `decode_tok_s = N × gen_len /
//!   time` (aggregate), `per_seq_tok_s = gen_len / time`, `ms_per_step = time / gen_len`, and
//!   `speedup_vs_batch1 = decode_tok_s / decode_tok_s(N = 1, same P)` when `--batch` lists 1.
//!
//! On CUDA, batch 1 keeps its own path (unless `--batch1-via-forward`): `prefill_greedy` /
//! `decode_greedy` take the argmax on the device and copy back only the token id, and the run also
//! reports the device time of a step (`time_step`), the bytes read per token and the roofline
//! fraction (and per-kernel times with `--profile`). Batches N > 1 go through
//! [`Backend::forward`] (host-side batch assembly and validation per step), so their speed-up over
//! that batch-1 path is a lower bound; `--batch1-via-forward` measures batch 1 the same way as the
//! batches (like with like, as `serve` runs it). The roofline of a batch (weights of the union of
//! the experts the N tokens route to, plus each sequence's KV) is not computed: its columns show
//! `-`. On the CPU reference backend the GPU-only figures (read bandwidth, GPU memory, roofline,
//! `--profile`) are skipped with a note. Prefilling N × P tokens dominates the run time of large
//! batches of long prompts: measure long-prompt prefill at `--batch 1`, batched decode at the
//! prompt lengths of interest.
//!
//! The table has one row per `batches` entry; its first column, the batch size, is left-aligned
//! so that rows start with a number.
//!
//! `--json` prints one object:
//! ```text
//! { "model": str, "backend": "cuda" | "cpu-reference" | …, "device": "cuda" | "cpu", "load_s": f64,
//!   // GPU only, null on the CPU:
//!   "gpu": str, "compute_capability": "9.0", "sm_count": n, "weights_gb": f64,
//!   "peak_gpu_memory_gb": f64, "read_bandwidth_gb_s": f64,
//!   "weight_bytes_per_token": {"attention_and_router", "experts", "lm_head", "embed_row", "total"},
//!   "cuda_graph": bool,
//!   "batch_sizes": [N, …], "gen_len": n,
//!   // CUDA batch-1 path only ([] otherwise), one per prompt length:
//!   "runs": [{"prompt_len", "gen_len", "prefill_s", "prefill_tok_s", "decode_tok_s",
//!             "decode_ms_per_token", "decode_device_ms_per_token", "bytes_per_token",
//!             "kv_bytes_per_token", "roofline_tok_s", "roofline_fraction",
//!             "roofline_fraction_device", "kernel_ms": [{"kernel", "ms"}]}],
//!   // every (prompt length, batch size), prompt-major, batch sizes in --batch order:
//!   "batches": [{"batch": N, "prompt_len": P, "gen_len": n,
//!                "path": "forward" | "cuda-greedy",
//!                "prefill_s", "prefill_tok_s", "decode_s", "decode_tok_s", "per_seq_tok_s",
//!                "ms_per_step", "speedup_vs_batch1": f64 | null,
//!                "tokens": [[u32]]   // only with the hidden --print-tokens flag
//!              }] }
//! ```
//! `tokens[s]` are the greedy tokens of sequence `s`: the one after its prompt, the warm-up
//! step's, then one per timed step (`gen_len + 2` in all).

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use gptoss_cuda::{CudaBackend, CudaOptions};
use gptoss_engine::backend::{Backend, LogitsWanted, SeqId, SeqStep, StepBatch};
use gptoss_formats::GptOssConfig;
use serde_json::{Value, json};

use crate::generation::{BackendOptions, Device, open_backend, resolve_model_or_demo};

/// Where `bench` runs: `--device cuda` (GPU 0), `cuda:N`, a bare ordinal `N` (as before `cpu`
/// and `auto` existed), `cpu` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchDevice {
    /// The f32 CPU reference backend.
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
    /// GPU 0 when it answers, otherwise the CPU (with a note).
    Auto,
}

/// Parses `--device`.
fn parse_device(s: &str) -> Result<BenchDevice, String> {
    let bad = || format!("expected cuda, cuda:N, N (a GPU ordinal), cpu or auto, not {s:?}");
    match s {
        "cpu" => Ok(BenchDevice::Cpu),
        "cuda" | "gpu" => Ok(BenchDevice::Cuda(0)),
        "auto" => Ok(BenchDevice::Auto),
        _ => s
            .strip_prefix("cuda:")
            .unwrap_or(s)
            .parse()
            .map(BenchDevice::Cuda)
            .map_err(|_| bad()),
    }
}

/// Flags of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory or Hugging Face id; omit for the bundled demo model.
    pub model: Option<String>,
    /// Prompt lengths to measure (comma-separated), e.g. 512,4096,16384,32768.
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub prompt_len: Vec<usize>,
    /// Tokens generated (greedily) per sequence in the timed decode, after one warm-up step.
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Sequences decoding together (comma-separated sizes, each measured in turn), e.g. 1,8,32.
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "1"
    )]
    pub batch: Vec<usize>,
    /// Where to run: cuda (GPU 0), cuda:N or N (GPU ordinal N), cpu (the reference backend), or
    /// auto (the GPU if one answers, else the CPU).
    #[arg(long, value_name = "DEVICE", default_value = "cuda", value_parser = parse_device)]
    pub device: BenchDevice,
    /// Launch decode kernels one by one instead of replaying a CUDA graph.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Size of the buffer of the read-bandwidth test, in GiB (CUDA).
    #[arg(long, default_value_t = 4.0)]
    pub bw_gib: f64,
    /// Also time each kernel of a batch-1 decode step (CUDA: device events, eager launches).
    #[arg(long)]
    pub profile: bool,
    /// On CUDA, measure batch 1 through `Backend::forward` like the batches N > 1, instead of
    /// the direct device-argmax path with the roofline columns.
    #[arg(long)]
    pub batch1_via_forward: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Add each sequence's greedy tokens to the JSON entries (for tests).
    #[arg(long, hide = true)]
    pub print_tokens: bool,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The random prompt of sequence `s` of length `len`: the same for every batch size, so a
/// sequence decoded in a batch can be compared with itself decoded alone.
fn prompt_tokens(len: usize, s: usize, vocab: u64) -> Vec<u32> {
    let mut rng = 0x2545_F491_4F6C_DD1Du64
        ^ (len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (s as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    if rng == 0 {
        rng = 1;
    }
    (0..len)
        .map(|_| (xorshift(&mut rng) % vocab) as u32)
        .collect()
}

/// Checks the flags before anything is loaded.
fn validate(a: &Args) -> anyhow::Result<()> {
    if a.gen_len == 0 {
        bail!("--gen-len must be at least 1");
    }
    if a.prompt_len.is_empty() || a.prompt_len.contains(&0) {
        bail!(
            "--prompt-len: every prompt length must be at least 1 (got {:?})",
            a.prompt_len
        );
    }
    if a.batch.is_empty() || a.batch.contains(&0) {
        bail!(
            "--batch: every batch size must be at least 1 (got {:?})",
            a.batch
        );
    }
    for (i, n) in a.batch.iter().enumerate() {
        if a.batch[..i].contains(n) {
            bail!("--batch lists {n} twice");
        }
    }
    for (i, p) in a.prompt_len.iter().enumerate() {
        if a.prompt_len[..i].contains(p) {
            bail!("--prompt-len lists {p} twice");
        }
    }
    if a.bw_gib.is_nan() || a.bw_gib <= 0.0 {
        bail!("--bw-gib must be positive, got {}", a.bw_gib);
    }
    Ok(())
}

/// The opened backend: the concrete CUDA backend (for its GPU-only measurements) or any other.
enum Opened {
    Cuda(Box<CudaBackend>),
    Host(Box<dyn Backend>),
}

impl Opened {
    fn backend(&mut self) -> &mut dyn Backend {
        match self {
            Opened::Cuda(b) => b.as_mut(),
            Opened::Host(b) => b.as_mut(),
        }
    }
}

/// Opens the model where `--device` says; `max_context` sizes the CUDA backend.
fn open(dir: &Path, a: &Args, max_context: usize) -> anyhow::Result<Opened> {
    let cuda = |ordinal: usize| -> anyhow::Result<Opened> {
        let opts = CudaOptions {
            device: ordinal,
            max_context,
            enforce_eager: a.enforce_eager,
            ..CudaOptions::default()
        };
        let mut be = CudaBackend::open(dir, opts).context("opening the model on the GPU")?;
        // First launches load cuBLAS's kernels and allocate its workspace: not part of a run.
        be.warm_up().context("warm-up on the GPU")?;
        Ok(Opened::Cuda(Box::new(be)))
    };
    let cpu = || -> anyhow::Result<Opened> {
        Ok(Opened::Host(open_backend(
            dir,
            Device::Cpu,
            BackendOptions::default(),
        )?))
    };
    match a.device {
        BenchDevice::Cuda(n) => cuda(n),
        BenchDevice::Cpu => cpu(),
        BenchDevice::Auto => match gptoss_cuda::driver::probe(0) {
            Ok(()) => cuda(0),
            Err(why) => {
                eprintln!(
                    "note: --device auto: {why}; running on the CPU reference backend (slow)"
                );
                cpu()
            }
        },
    }
}

/// Timings (and greedy tokens) of one batch run.
struct BatchRun {
    prefill_s: f64,
    decode_s: f64,
    tokens: Vec<Vec<u32>>,
}

/// Prefills sequences `0..n` with their prompts of length `p` and decodes them together (see the
/// module doc). The sequences are left in the backend: the caller releases them.
fn measure_batch(
    be: &mut dyn Backend,
    n: usize,
    p: usize,
    gen_len: usize,
) -> anyhow::Result<BatchRun> {
    let vocab = be.config().vocab_size as u64;
    let piece = be.max_batch_tokens().max(1);
    let prompts: Vec<Vec<u32>> = (0..n).map(|s| prompt_tokens(p, s, vocab)).collect();
    let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(n);
    let t = Instant::now();
    for (s, prompt) in prompts.iter().enumerate() {
        let mut last = None;
        for (k, chunk) in prompt.chunks(piece).enumerate() {
            let step = SeqStep {
                seq: s as SeqId,
                tokens: chunk.to_vec(),
                start_pos: k * piece,
                want_logits: LogitsWanted::LastGreedy,
            };
            let logits = be
                .forward(&StepBatch { steps: vec![step] })
                .with_context(|| format!("prefilling sequence {s} ({p} tokens)"))?;
            last = logits.greedy(0);
        }
        tokens.push(vec![last.context("empty prompt")?]);
    }
    let prefill_s = t.elapsed().as_secs_f64();
    let mut len = p;
    let mut step = |be: &mut dyn Backend, tokens: &mut Vec<Vec<u32>>| -> anyhow::Result<()> {
        let batch = StepBatch {
            steps: tokens
                .iter()
                .enumerate()
                .map(|(s, t)| SeqStep {
                    seq: s as SeqId,
                    tokens: vec![*t.last().expect("one token per sequence")],
                    start_pos: len,
                    want_logits: LogitsWanted::LastGreedy,
                })
                .collect(),
        };
        let logits = be
            .forward(&batch)
            .with_context(|| format!("decoding {n} sequences at position {len}"))?;
        for (s, t) in tokens.iter_mut().enumerate() {
            t.push(
                logits
                    .greedy(s)
                    .with_context(|| format!("sequence {s}: no logit above -inf"))?,
            );
        }
        len += 1;
        Ok(())
    };
    step(be, &mut tokens)?; // warm-up, not timed
    let t = Instant::now();
    for _ in 0..gen_len {
        step(be, &mut tokens)?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    Ok(BatchRun {
        prefill_s,
        decode_s,
        tokens,
    })
}

/// A `batches` entry of the JSON report.
fn batch_entry(
    n: usize,
    p: usize,
    gen_len: usize,
    path: &str,
    r: &BatchRun,
    tokens: bool,
) -> Value {
    let mut e = json!({
        "batch": n,
        "prompt_len": p,
        "gen_len": gen_len,
        "path": path,
        "prefill_s": r.prefill_s,
        "prefill_tok_s": (n * p) as f64 / r.prefill_s,
        "decode_s": r.decode_s,
        "decode_tok_s": (n * gen_len) as f64 / r.decode_s,
        "per_seq_tok_s": gen_len as f64 / r.decode_s,
        "ms_per_step": 1e3 * r.decode_s / gen_len as f64,
        "speedup_vs_batch1": Value::Null,
    });
    if tokens {
        e["tokens"] = json!(r.tokens);
    }
    e
}

/// The CUDA batch-1 path: device argmax, device step time, bytes and roofline (and `--profile`).
/// Returns the legacy `runs` entry and the greedy tokens' run.
fn measure_cuda_batch1(
    be: &mut CudaBackend,
    seq: SeqId,
    p: usize,
    a: &Args,
    bw: f64,
) -> anyhow::Result<(Value, BatchRun)> {
    let prompt = prompt_tokens(p, 0, be.config().vocab_size as u64);
    let t = Instant::now();
    let mut tok = be.prefill_greedy(seq, &prompt)?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut tokens = vec![tok];
    // Warm-up decode step (captures the CUDA graph), not timed.
    tok = be.decode_greedy(seq, tok)?;
    tokens.push(tok);
    let t = Instant::now();
    for _ in 0..a.gen_len {
        tok = be.decode_greedy(seq, tok)?;
        tokens.push(tok);
    }
    let decode_s = t.elapsed().as_secs_f64();
    let ctx_mid = p + 1 + a.gen_len / 2;
    let device_ms = be.time_step(seq, 1, 20)?;
    let profile = if a.profile {
        be.profile_decode(seq, 5)?
    } else {
        Vec::new()
    };
    let bytes = be.read_bytes().total() + be.kv_read_bytes(ctx_mid);
    let tok_s = a.gen_len as f64 / decode_s;
    let run = json!({
        "prompt_len": p,
        "gen_len": a.gen_len,
        "prefill_s": prefill_s,
        "prefill_tok_s": p as f64 / prefill_s,
        "decode_tok_s": tok_s,
        "decode_ms_per_token": 1e3 / tok_s,
        "decode_device_ms_per_token": device_ms,
        "bytes_per_token": bytes,
        "kv_bytes_per_token": be.kv_read_bytes(ctx_mid),
        "roofline_tok_s": bw / bytes as f64,
        "roofline_fraction": tok_s * bytes as f64 / bw,
        "roofline_fraction_device": (1e3 / device_ms) * bytes as f64 / bw,
        "kernel_ms": profile.iter().map(|(n, ms)| json!({"kernel": n, "ms": ms})).collect::<Vec<_>>(),
    });
    Ok((
        run,
        BatchRun {
            prefill_s,
            decode_s,
            tokens: vec![tokens],
        },
    ))
}

/// What the GPU measured before the runs.
struct GpuInfo {
    report: serde_json::Map<String, Value>,
    bw: f64,
    total: usize,
}

/// Runs the benchmark.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    validate(&a)?;
    let dir = resolve_model_or_demo(a.model.as_deref())?;
    let cfg = GptOssConfig::from_file(&dir.join("config.json"))?;
    let longest_prompt = a.prompt_len.iter().max().copied().unwrap_or(0);
    // prompt + warm-up step + gen_len steps (+ the device-timed step of the batch-1 path)
    let needed = longest_prompt + a.gen_len + 2;
    if needed > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {longest_prompt} with --gen-len {} needs {needed} positions, more than the model's context of {}",
            a.gen_len,
            cfg.max_position_embeddings
        );
    }
    let max_context = (needed + 6).max(4096).min(cfg.max_position_embeddings);
    let t0 = Instant::now();
    let mut opened = open(&dir, &a, max_context)?;
    let load_s = t0.elapsed().as_secs_f64();
    let name = opened.backend().name().to_string();

    let mut gpu = None;
    let mut peak_used = 0usize;
    if let Opened::Cuda(be) = &mut opened {
        let dev = be.device().clone();
        let (free0, total) = be.memory()?;
        let bw = be.read_bandwidth(
            ((a.bw_gib * (1u64 << 30) as f64) as usize).min(free0 / 2),
            10,
        )?;
        peak_used = total - free0;
        let rb = be.read_bytes().clone();
        let mut report = serde_json::Map::new();
        report.insert("gpu".into(), json!(dev.name));
        report.insert(
            "compute_capability".into(),
            json!(format!(
                "{}.{}",
                dev.compute_capability.0, dev.compute_capability.1
            )),
        );
        report.insert("sm_count".into(), json!(dev.sm_count));
        report.insert(
            "weights_gb".into(),
            json!(be.load_report().weight_bytes as f64 / 1e9),
        );
        report.insert("read_bandwidth_gb_s".into(), json!(bw / 1e9));
        report.insert(
            "weight_bytes_per_token".into(),
            json!({
                "attention_and_router": rb.attention_and_router,
                "experts": rb.experts,
                "lm_head": rb.lm_head,
                "embed_row": rb.embed_row,
                "total": rb.total(),
            }),
        );
        report.insert("cuda_graph".into(), json!(!a.enforce_eager));
        gpu = Some(GpuInfo { report, bw, total });
    } else {
        eprintln!(
            "note: {name} backend: read bandwidth, GPU memory, bytes per token and the roofline{} are GPU-only: not measured",
            if a.profile { " (and --profile)" } else { "" }
        );
    }

    let mut runs = Vec::new();
    let mut batches = Vec::new();
    for (i, &p) in a.prompt_len.iter().enumerate() {
        for &n in &a.batch {
            let entry = match &mut opened {
                Opened::Cuda(be) if n == 1 && !a.batch1_via_forward => {
                    let seq = 1000 + i as SeqId;
                    let bw = gpu.as_ref().map_or(1.0, |g| g.bw);
                    let res = measure_cuda_batch1(be, seq, p, &a, bw);
                    if let (Ok((free, _)), Some(g)) = (be.memory(), &gpu) {
                        peak_used = peak_used.max(g.total - free);
                    }
                    be.release(seq);
                    let (run, r) = res.with_context(|| format!("batch 1, prompt {p}"))?;
                    runs.push(run);
                    batch_entry(n, p, a.gen_len, "cuda-greedy", &r, a.print_tokens)
                }
                opened => {
                    let res = measure_batch(opened.backend(), n, p, a.gen_len);
                    if let (Opened::Cuda(be), Some(g)) = (&*opened, &gpu)
                        && let Ok((free, _)) = be.memory()
                    {
                        peak_used = peak_used.max(g.total - free);
                    }
                    for s in 0..n {
                        opened.backend().release(s as SeqId);
                    }
                    let r = res.with_context(|| format!("batch {n}, prompt {p}"))?;
                    batch_entry(n, p, a.gen_len, "forward", &r, a.print_tokens)
                }
            };
            batches.push(entry);
        }
    }
    // Speed-up over batch 1 at the same prompt length.
    let base: Vec<(u64, f64)> = batches
        .iter()
        .filter(|e| e["batch"] == 1)
        .filter_map(|e| Some((e["prompt_len"].as_u64()?, e["decode_tok_s"].as_f64()?)))
        .collect();
    for e in &mut batches {
        let p = e["prompt_len"].as_u64();
        if let (Some((_, b1)), Some(tok_s)) = (
            base.iter().find(|(bp, _)| Some(*bp) == p),
            e["decode_tok_s"].as_f64(),
        ) {
            e["speedup_vs_batch1"] = json!(tok_s / b1);
        }
    }

    let mut report = serde_json::Map::new();
    report.insert("model".into(), json!(dir.display().to_string()));
    report.insert("backend".into(), json!(name));
    report.insert(
        "device".into(),
        json!(if gpu.is_some() { "cuda" } else { "cpu" }),
    );
    report.insert("load_s".into(), json!(load_s));
    for k in [
        "gpu",
        "compute_capability",
        "sm_count",
        "weights_gb",
        "peak_gpu_memory_gb",
        "read_bandwidth_gb_s",
        "weight_bytes_per_token",
        "cuda_graph",
    ] {
        let v = match (&gpu, k) {
            (Some(_), "peak_gpu_memory_gb") => json!(peak_used as f64 / 1e9),
            (Some(g), k) => g.report.get(k).cloned().unwrap_or(Value::Null),
            (None, _) => Value::Null,
        };
        report.insert(k.into(), v);
    }
    report.insert("batch_sizes".into(), json!(a.batch));
    report.insert("gen_len".into(), json!(a.gen_len));
    report.insert("runs".into(), json!(runs));
    report.insert("batches".into(), json!(batches));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&Value::Object(report))?);
        return Ok(ExitCode::SUCCESS);
    }
    print_table(&report, &name, load_s, peak_used, &runs, &batches);
    Ok(ExitCode::SUCCESS)
}

/// The human-readable report.
fn print_table(
    report: &serde_json::Map<String, Value>,
    name: &str,
    load_s: f64,
    peak_used: usize,
    runs: &[Value],
    batches: &[Value],
) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    if let Some(gpu) = report["gpu"].as_str() {
        let cc = report["compute_capability"].as_str().unwrap_or("");
        println!(
            "{gpu} (sm_{}, {} SMs): weights {:.2} GB loaded in {load_s:.2} s; peak GPU memory {:.2} GB; read bandwidth {:.0} GB/s",
            cc.replace('.', ""),
            report["sm_count"],
            f(&report["weights_gb"]),
            peak_used as f64 / 1e9,
            f(&report["read_bandwidth_gb_s"])
        );
        let rb = &report["weight_bytes_per_token"];
        println!(
            "weight bytes per decoded token: {:.3} GB (attention+router {:.3}, experts {:.3}, lm_head {:.3})",
            f(&rb["total"]) / 1e9,
            f(&rb["attention_and_router"]) / 1e9,
            f(&rb["experts"]) / 1e9,
            f(&rb["lm_head"]) / 1e9
        );
    } else {
        println!("{name}: model loaded in {load_s:.2} s");
    }
    println!(
        "{:<5} {:>7} {:>12} {:>11} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "batch",
        "prompt",
        "prefill t/s",
        "decode t/s",
        "seq t/s",
        "ms/step",
        "dev ms/tok",
        "GB/tok",
        "roofline",
        "fraction",
        "speed-up"
    );
    for e in batches {
        let run = (e["path"] == "cuda-greedy")
            .then(|| runs.iter().find(|r| r["prompt_len"] == e["prompt_len"]))
            .flatten();
        let extra = match run {
            Some(r) => format!(
                "{:>10.3} {:>10.3} {:>9.0} {:>8.1}%",
                f(&r["decode_device_ms_per_token"]),
                f(&r["bytes_per_token"]) / 1e9,
                f(&r["roofline_tok_s"]),
                100.0 * f(&r["roofline_fraction"])
            ),
            None => format!("{:>10} {:>10} {:>9} {:>9}", "-", "-", "-", "-"),
        };
        let speedup = match e["speedup_vs_batch1"].as_f64() {
            Some(s) => format!("{s:.2}x"),
            None => "-".into(),
        };
        println!(
            "{:<5} {:>7} {:>12.0} {:>11.1} {:>9.1} {:>9.3} {extra} {speedup:>8}",
            e["batch"].as_u64().unwrap_or(0),
            e["prompt_len"].as_u64().unwrap_or(0),
            f(&e["prefill_tok_s"]),
            f(&e["decode_tok_s"]),
            f(&e["per_seq_tok_s"]),
            f(&e["ms_per_step"]),
        );
        if let Some(k) = run
            .and_then(|r| r["kernel_ms"].as_array())
            .filter(|k| !k.is_empty())
        {
            for e in k {
                println!(
                    "          {:<32} {:>8.3} ms",
                    e["kernel"].as_str().unwrap_or(""),
                    f(&e["ms"])
                );
            }
        }
    }
}
