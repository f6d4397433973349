//! GPU memory tests of the CUDA backend: the KV cache's allocations against the engine's block
//! accounting, and issue 4's "20b with `--max-model-len 131072` fits in 24 GB".
//!
//! Without a usable GPU each test prints a notice and passes (CI has none), as in `gpu.rs`; on a
//! GPU machine run the release test binary (`--test-threads=1`). The 20b test also needs
//! `GPTOSS_TEST_MODEL_20B=/dir`: a 20b-shaped checkpoint there is used, and one is synthesized
//! there first (random weights, Unsloth NF4, ~13.5 GB, ~25 s) when the directory holds none.
//!
//! - `growth_keeps_the_cache_and_stays_within_one_step` (fixture model): a sequence grown step by
//!   step (each growth copies the cache into a larger allocation) decodes exactly like one whose
//!   cache was reserved up front, and its allocation follows the documented rule;
//! - `twenty_b_at_131072_positions_fits_in_24_gib`: a 20b with `max_context` 131072 and one
//!   sequence whose cache is grown to all 131072 positions (`reserve_sequence`, instead of a
//!   prefill that long) leaves at most 24 GiB of device memory in use, and the sequence holds no
//!   more than the engine's block accounting counts for it plus the slack the KV budget reserves.

use std::path::{Path, PathBuf};

use gptoss_cuda::backend::{ALLOC_GRANULE_BYTES, KV_GROW_POSITIONS};
use gptoss_cuda::{CudaBackend, CudaOptions};
use gptoss_engine::backend::{
    Backend, BackendError, DeviceMemory, LogitsWanted, SeqStep, StepBatch,
};
use gptoss_engine::kv_blocks::{DEFAULT_BLOCK_SIZE, KvLayout, Pool};
use gptoss_formats::synth::{Preset, SynthLayout, synth};
use gptoss_formats::writer::WriteOptions;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

fn gpu_or_skip(test: &str) -> bool {
    if gptoss_cuda::gpu_available() {
        true
    } else {
        println!("NOTICE: no usable CUDA GPU; skipping {test}");
        false
    }
}

/// `$GPTOSS_FIXTURES/tiny-unsloth-nf4`, else `./fixtures/…` (the repository root, where the GPU
/// machine runs the test binary), else the source tree's.
fn tiny_fixture() -> PathBuf {
    let root = match std::env::var("GPTOSS_FIXTURES") {
        Ok(d) => PathBuf::from(d),
        Err(_) if Path::new("fixtures").is_dir() => PathBuf::from("fixtures"),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    };
    root.join("tiny-unsloth-nf4")
}

/// Feeds `tokens` to `seq` from `start` and returns the last row's logits.
fn feed(be: &mut CudaBackend, seq: u64, tokens: &[u32], start: usize) -> Vec<f32> {
    let batch = StepBatch {
        steps: vec![SeqStep {
            seq,
            tokens: tokens.to_vec(),
            start_pos: start,
            want_logits: LogitsWanted::Last,
        }],
    };
    be.forward(&batch).unwrap().last(0).to_vec()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Greedy-decodes `n` tokens of `seq`, fed from position `pos` on, after `logits` (the row of
/// position `pos - 1`); returns them and the last row.
fn decode(
    be: &mut CudaBackend,
    seq: u64,
    mut logits: Vec<f32>,
    mut pos: usize,
    n: usize,
) -> (Vec<u32>, Vec<f32>) {
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits);
        out.push(t);
        logits = feed(be, seq, &[t], pos);
        pos += 1;
    }
    (out, logits)
}

/// Bytes of one position in every layer of `pool` (K and V).
fn pos_bytes(layout: &KvLayout, pool: Pool) -> usize {
    layout.block_bytes(pool) as usize / layout.block_size
}

/// What the backend's cache of a sequence with `cap` full-attention positions holds, by the
/// allocation rule its `DeviceMemory` describes.
fn cache_bytes(layout: &KvLayout, mem: &DeviceMemory, cap: usize) -> usize {
    cap * pos_bytes(layout, Pool::Full)
        + mem.kv_sliding_positions * pos_bytes(layout, Pool::Sliding)
}

#[test]
fn growth_keeps_the_cache_and_stays_within_one_step() {
    if !gpu_or_skip("growth_keeps_the_cache_and_stays_within_one_step") {
        return;
    }
    let dir = tiny_fixture();
    let mut be = CudaBackend::open(
        &dir,
        CudaOptions {
            max_context: 4096,
            ..CudaOptions::default()
        },
    )
    .unwrap();
    let mem = be
        .device_memory()
        .unwrap()
        .expect("a GPU backend reports its memory");
    assert_eq!(mem.kv_grow_positions, KV_GROW_POSITIONS);
    assert_eq!(mem.alloc_granule_bytes, ALLOC_GRANULE_BYTES);
    assert_eq!(mem.max_context, 4096);
    let layout = KvLayout::from_config(be.config(), DEFAULT_BLOCK_SIZE, mem.kv_dtype_bytes);
    let vocab = be.config().vocab_size as u64;
    let prompt: Vec<u32> = (0..300u64)
        .map(|i| (i.wrapping_mul(2654435761) % vocab) as u32)
        .collect();

    // Sequence 1 grows as it goes: 100 tokens (256 positions), 200 (256), 300 (512: a copy).
    let mut caps = Vec::new();
    let mut logits = Vec::new();
    for (i, part) in prompt.chunks(100).enumerate() {
        logits = feed(&mut be, 1, part, i * 100);
        caps.push(be.sequence_bytes(1).unwrap());
    }
    let expect: Vec<usize> = [256, 256, 512]
        .iter()
        .map(|&cap| cache_bytes(&layout, &mem, cap))
        .collect();
    println!("sequence bytes after 100/200/300 tokens: {caps:?} (expected {expect:?})");
    assert_eq!(caps, expect);
    // Decode across the next growth (512 -> 768 at position 512).
    let (grown, _) = decode(&mut be, 1, logits, 300, 240);
    assert_eq!(
        be.sequence_bytes(1).unwrap(),
        cache_bytes(&layout, &mem, 768)
    );
    // At most one step beyond what the block accounting counts for 540 positions.
    let counted = layout.full_blocks_for(540) * layout.block_size;
    assert!(768 - counted < KV_GROW_POSITIONS);

    // Sequence 2 reserves the whole context first: no growth, same results.
    be.reserve_sequence(2, 4096).unwrap();
    assert_eq!(be.cached_len(2), Some(0));
    assert_eq!(
        be.sequence_bytes(2).unwrap(),
        cache_bytes(&layout, &mem, 4096)
    );
    let mut logits2 = Vec::new();
    for (i, part) in prompt.chunks(100).enumerate() {
        logits2 = feed(&mut be, 2, part, i * 100);
    }
    let (reserved, _) = decode(&mut be, 2, logits2, 300, 240);
    assert_eq!(grown, reserved, "a grown cache decodes like a reserved one");

    // Bad input is refused, not a panic.
    match be.reserve_sequence(3, 4097) {
        Err(BackendError::InvalidInput(m)) => assert!(m.contains("max_context"), "{m}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(be.cached_len(3), None);
    be.release(1);
    be.release(2);
}

/// The 20b checkpoint of `$GPTOSS_TEST_MODEL_20B`, synthesized there when missing.
fn model_20b() -> Option<PathBuf> {
    let Ok(dir) = std::env::var("GPTOSS_TEST_MODEL_20B") else {
        println!("NOTICE: GPTOSS_TEST_MODEL_20B not set; skipping the 20b memory test");
        return None;
    };
    let dir = PathBuf::from(dir);
    if !dir.join("config.json").exists() {
        println!(
            "synthesizing a 20b-shaped checkpoint (unsloth-nf4) in {}",
            dir.display()
        );
        let t = std::time::Instant::now();
        synth(
            Preset::Gpt20b,
            SynthLayout::UnslothNf4,
            0,
            &dir,
            WriteOptions::default(),
        )
        .unwrap();
        println!("synthesized in {:.1} s", t.elapsed().as_secs_f64());
    }
    Some(dir)
}

#[test]
fn twenty_b_at_131072_positions_fits_in_24_gib() {
    if !gpu_or_skip("twenty_b_at_131072_positions_fits_in_24_gib") {
        return;
    }
    let Some(dir) = model_20b() else {
        return;
    };
    const CONTEXT: usize = 131072;
    let mut be = CudaBackend::open(
        &dir,
        CudaOptions {
            max_context: CONTEXT,
            ..CudaOptions::default()
        },
    )
    .unwrap();
    assert_eq!(be.max_context(), CONTEXT);
    let used = |be: &CudaBackend| {
        let m = be.device_memory().unwrap().unwrap();
        (m.used_bytes, m.total_bytes)
    };
    let (loaded, total) = used(&be);
    println!(
        "{}: {:.2} GiB total; {:.2} GB of weights; {:.2} GiB in use after loading",
        be.device().name,
        total as f64 / GIB,
        be.load_report().weight_bytes as f64 / 1e9,
        loaded as f64 / GIB
    );

    // A short sequence through both kernel paths and the decode graph (what serve's warm-up
    // does), then the same sequence grown to the whole context.
    let prompt = [200006u32, 17360, 200008, 3575, 553, 261, 10297, 200007];
    let logits = feed(&mut be, 1, &prompt, 0);
    let n = prompt.len();
    let (before, logits) = decode(&mut be, 1, logits, n, 4);
    let (warm, _) = used(&be);
    let small = be.sequence_bytes(1).unwrap();
    let t = std::time::Instant::now();
    be.reserve_sequence(1, CONTEXT).unwrap();
    let grow_ms = t.elapsed().as_secs_f64() * 1e3;
    let (full, _) = used(&be);
    let seq = be.sequence_bytes(1).unwrap();
    println!(
        "after a warm-up sequence: {:.2} GiB in use; growing it to {CONTEXT} positions took \
         {grow_ms:.0} ms: sequence {:.1} MiB -> {:.1} MiB, in use {:.2} GiB (+{:.1} MiB)",
        warm as f64 / GIB,
        small as f64 / MIB,
        seq as f64 / MIB,
        full as f64 / GIB,
        (full as f64 - warm as f64) / MIB,
    );

    // The grown cache still holds the sequence: decoding on gives what a fresh sequence gives.
    let (after, _) = decode(&mut be, 1, logits, n + 4, 3);
    let logits = feed(&mut be, 2, &prompt, 0);
    let (fresh, logits) = decode(&mut be, 2, logits, n, 4);
    assert_eq!(before, fresh, "same prompt, same greedy tokens");
    let (fresh_after, _) = decode(&mut be, 2, logits, n + 4, 3);
    assert_eq!(after, fresh_after, "the grown cache kept its contents");
    be.release(2);

    // Against the engine's accounting (bf16, blocks of 16): one sequence of 131072 tokens counts
    // ceil(131072 / 16) full blocks and 9 sliding ones; the backend may hold one growth step and
    // an allocation granule per allocation more (what gpu_kv_budget reserves per sequence).
    let mem = be.device_memory().unwrap().unwrap();
    let layout = KvLayout::from_config(be.config(), DEFAULT_BLOCK_SIZE, mem.kv_dtype_bytes);
    let counted = layout.full_blocks_for(CONTEXT) as u64 * layout.block_bytes(Pool::Full)
        + layout.sliding_blocks_per_seq() as u64 * layout.block_bytes(Pool::Sliding);
    let slack = mem.kv_grow_positions as u64 * pos_bytes(&layout, Pool::Full) as u64
        + mem.kv_allocs_per_seq as u64 * mem.alloc_granule_bytes;
    println!(
        "sequence of {CONTEXT}: holds {:.1} MiB, the block accounting counts {:.1} MiB (+ up to \
         {:.1} MiB slack)",
        seq as f64 / MIB,
        counted as f64 / MIB,
        slack as f64 / MIB
    );
    assert!(seq as u64 <= counted + slack);
    // The driver's view agrees: growing took what the sequence's allocation grew by, give or
    // take the allocation granules and some driver bookkeeping.
    let grew = (seq - small) as f64;
    let delta = full as f64 - warm as f64;
    assert!(
        delta
            <= grew + (mem.kv_allocs_per_seq as u64 * mem.alloc_granule_bytes) as f64 + 16.0 * MIB,
        "in use grew by {:.1} MiB for {:.1} MiB of cache",
        delta / MIB,
        grew / MIB
    );

    let limit = 24u64 << 30;
    println!(
        "device memory in use with one {CONTEXT}-position sequence: {:.2} GiB (limit 24 GiB; \
         {:.2} GiB left)",
        full as f64 / GIB,
        (limit as f64 - full as f64) / GIB
    );
    assert!(
        full <= limit,
        "{:.2} GiB in use with one {CONTEXT}-position sequence: more than 24 GiB",
        full as f64 / GIB
    );
    be.release(1);
}
