//! `gptoss bench MODEL --prompt-len 512,4096 --gen-len 128 --batch 1 [--json]`: CUDA prefill and
//! greedy decode throughput, GPU memory, bytes read per decoded token, the measured read
//! bandwidth of the GPU and decode's fraction of that roofline.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use gptoss_cuda::{CudaBackend, CudaOptions};
use gptoss_engine::backend::Backend;

/// Flags of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    pub model: PathBuf,
    /// Prompt lengths to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub prompt_len: Vec<usize>,
    /// Tokens generated (greedily) after each prompt.
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Sequences decoded together (only 1 for now).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Launch decode kernels one by one instead of replaying a CUDA graph.
    #[arg(long)]
    pub enforce_eager: bool,
    /// Size of the buffer of the read-bandwidth test, in GiB.
    #[arg(long, default_value_t = 4.0)]
    pub bw_gib: f64,
    /// Also time each kernel of a decode step (device events, eager launches).
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Runs the benchmark.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.batch != 1 {
        bail!("only --batch 1 is implemented by the CUDA backend so far");
    }
    if a.gen_len == 0 || a.prompt_len.is_empty() || a.prompt_len.contains(&0) {
        bail!("--gen-len and every --prompt-len must be at least 1");
    }
    let longest = a.prompt_len.iter().max().copied().unwrap_or(0) + a.gen_len + 8;
    let opts = CudaOptions {
        device: a.device,
        max_context: longest.max(4096),
        enforce_eager: a.enforce_eager,
        ..CudaOptions::default()
    };
    let t0 = Instant::now();
    let mut be = CudaBackend::open(&a.model, opts).context("opening the model on the GPU")?;
    let load_s = t0.elapsed().as_secs_f64();
    let dev = be.device().clone();
    let weight_bytes = be.load_report().weight_bytes;
    let (free0, total) = be.memory()?;
    let bw = be.read_bandwidth(
        ((a.bw_gib * (1u64 << 30) as f64) as usize).min(free0 / 2),
        10,
    )?;
    let vocab = be.config().vocab_size as u64;
    let mut peak_used = total - free0;
    let mut runs = Vec::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for (i, &p) in a.prompt_len.iter().enumerate() {
        let seq = 1000 + i as u64;
        let prompt: Vec<u32> = (0..p)
            .map(|_| (xorshift(&mut rng) % vocab) as u32)
            .collect();
        let t = Instant::now();
        let mut tok = be.prefill_greedy(seq, &prompt)?;
        let prefill_s = t.elapsed().as_secs_f64();
        // Warm-up decode step (captures the CUDA graph), not timed.
        tok = be.decode_greedy(seq, tok)?;
        let t = Instant::now();
        for _ in 0..a.gen_len {
            tok = be.decode_greedy(seq, tok)?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        let ctx_mid = p + 1 + a.gen_len / 2;
        let device_ms = be.time_step(seq, 1, 20)?;
        let profile = if a.profile {
            be.profile_decode(seq, 5)?
        } else {
            Vec::new()
        };
        let (free, _) = be.memory()?;
        peak_used = peak_used.max(total - free);
        be.release(seq);
        let bytes = be.read_bytes().total() + be.kv_read_bytes(ctx_mid);
        let tok_s = a.gen_len as f64 / decode_s;
        runs.push(serde_json::json!({
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
            "kernel_ms": profile.iter().map(|(n, ms)| serde_json::json!({"kernel": n, "ms": ms})).collect::<Vec<_>>(),
        }));
    }
    let rb = be.read_bytes().clone();
    let report = serde_json::json!({
        "model": a.model.display().to_string(),
        "gpu": dev.name,
        "compute_capability": format!("{}.{}", dev.compute_capability.0, dev.compute_capability.1),
        "sm_count": dev.sm_count,
        "load_s": load_s,
        "weights_gb": weight_bytes as f64 / 1e9,
        "peak_gpu_memory_gb": peak_used as f64 / 1e9,
        "read_bandwidth_gb_s": bw / 1e9,
        "weight_bytes_per_token": {
            "attention_and_router": rb.attention_and_router,
            "experts": rb.experts,
            "lm_head": rb.lm_head,
            "embed_row": rb.embed_row,
            "total": rb.total(),
        },
        "cuda_graph": !a.enforce_eager,
        "batch": a.batch,
        "runs": runs,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} (sm_{}{}, {} SMs): weights {:.2} GB loaded in {:.2} s; peak GPU memory {:.2} GB; read bandwidth {:.0} GB/s",
        dev.name,
        dev.compute_capability.0,
        dev.compute_capability.1,
        dev.sm_count,
        weight_bytes as f64 / 1e9,
        load_s,
        peak_used as f64 / 1e9,
        bw / 1e9
    );
    println!(
        "weight bytes per decoded token: {:.3} GB (attention+router {:.3}, experts {:.3}, lm_head {:.3})",
        rb.total() as f64 / 1e9,
        rb.attention_and_router as f64 / 1e9,
        rb.experts as f64 / 1e9,
        rb.lm_head as f64 / 1e9
    );
    println!(
        "{:>7} {:>12} {:>11} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "prompt",
        "prefill t/s",
        "decode t/s",
        "ms/tok",
        "dev ms/tok",
        "GB/tok",
        "roofline",
        "fraction"
    );
    for r in &runs {
        println!(
            "{:>7} {:>12.0} {:>11.1} {:>9.3} {:>10.3} {:>10.3} {:>9.0} {:>8.1}%",
            r["prompt_len"],
            r["prefill_tok_s"].as_f64().unwrap_or(0.0),
            r["decode_tok_s"].as_f64().unwrap_or(0.0),
            r["decode_ms_per_token"].as_f64().unwrap_or(0.0),
            r["decode_device_ms_per_token"].as_f64().unwrap_or(0.0),
            r["bytes_per_token"].as_f64().unwrap_or(0.0) / 1e9,
            r["roofline_tok_s"].as_f64().unwrap_or(0.0),
            100.0 * r["roofline_fraction"].as_f64().unwrap_or(0.0)
        );
        if let Some(k) = r["kernel_ms"].as_array().filter(|k| !k.is_empty()) {
            for e in k {
                println!(
                    "          {:<32} {:>8.3} ms",
                    e["kernel"].as_str().unwrap_or(""),
                    e["ms"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
