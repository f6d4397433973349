//! Engine sizing from serving options (vLLM-style flags): context length, sequences, tokens per
//! step, and the KV-cache memory budget that the block pools are carved from.

use gptoss_engine::backend::DeviceMemory;
use gptoss_engine::engine::EngineConfig;
use gptoss_engine::kv_blocks::{DEFAULT_BLOCK_SIZE, KvLayout, Pool};
use gptoss_engine::scheduler::SchedulerConfig;
use gptoss_formats::GptOssConfig;

/// Serving options that size the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// `--max-model-len`; `None` = the model's context, lowered to what the KV budget holds.
    pub max_model_len: Option<usize>,
    /// `--max-num-seqs`.
    pub max_num_seqs: usize,
    /// `--max-num-batched-tokens`: tokens per engine step.
    pub max_num_batched_tokens: usize,
    /// Largest prefill chunk per sequence per step.
    pub max_prefill_chunk: usize,
    /// Token positions per KV block.
    pub block_size: usize,
    /// Bytes available to the KV cache (for a GPU: [`gpu_kv_budget`], `gpu_memory_utilization ×
    /// total − memory in use after loading − reserves`; for the CPU backend: `--kv-cache-space`).
    pub kv_budget_bytes: u64,
    /// Bytes per cached element (2 for a bf16 cache, 4 for the f32 CPU reference).
    pub kv_dtype_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_model_len: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_prefill_chunk: 512,
            block_size: DEFAULT_BLOCK_SIZE,
            kv_budget_bytes: 4 << 30,
            kv_dtype_bytes: 4,
        }
    }
}

/// The engine configuration for `model` under `opts`, and notices for the operator (e.g. the
/// context length was lowered to fit the budget).
pub fn plan_engine(
    model: &GptOssConfig,
    opts: &EngineOptions,
) -> Result<(EngineConfig, Vec<String>), String> {
    let mut notices = Vec::new();
    if opts.max_num_seqs == 0 {
        return Err("--max-num-seqs must be at least 1".into());
    }
    let layout = KvLayout::from_config(model, opts.block_size.max(1), opts.kv_dtype_bytes);
    let model_max = model.max_position_embeddings.max(2);
    let chunk = prefill_chunk(opts);
    let scheduler = SchedulerConfig {
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens.max(1),
        max_prefill_chunk: chunk,
    };
    let max_model_len = match opts.max_model_len {
        Some(n) if n > model_max => {
            return Err(format!(
                "--max-model-len {n} is longer than the model's context ({model_max} tokens)"
            ));
        }
        Some(n) if n < 2 => return Err("--max-model-len must be at least 2".into()),
        Some(n) => n,
        None => {
            // The longest context one sequence could use given the budget.
            let probe = layout
                .plan(opts.kv_budget_bytes, opts.max_num_seqs, 2, chunk)
                .map_err(|e| format!("the KV cache does not fit: {e}"))?;
            let fits = probe.max_tokens_per_seq();
            if fits < model_max {
                let n = (fits / layout.block_size * layout.block_size).max(2);
                notices.push(format!(
                    "the KV-cache budget holds {fits} tokens: serving a context of {n} tokens \
                     instead of the model's {model_max} (set --max-model-len, or give the cache \
                     more memory)"
                ));
                n
            } else {
                model_max
            }
        }
    };
    let kv = layout.plan(
        opts.kv_budget_bytes,
        opts.max_num_seqs,
        max_model_len,
        chunk,
    )?;
    Ok((
        EngineConfig {
            max_model_len,
            scheduler,
            kv,
        },
        notices,
    ))
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// The KV-cache budget of a GPU backend and how it was derived (bytes unless said otherwise).
/// Built by [`gpu_kv_budget`].
#[derive(Debug, Clone, PartialEq)]
pub struct GpuKvBudget {
    /// `--gpu-memory-utilization`.
    pub utilization: f64,
    /// Device memory in total.
    pub total_bytes: u64,
    /// `utilization × total`: what this server may have in use on the device.
    pub usable_bytes: u64,
    /// In use after loading the model and a warm-up step: weights, scratch buffers, driver
    /// context, kernels' local memory, the decode graph (and other processes' memory).
    pub in_use_bytes: u64,
    /// The backend's headroom for what it may still allocate outside the KV cache.
    pub headroom_bytes: u64,
    /// Room to grow the longest sequence: its old full-attention allocation, held while it is
    /// copied into the larger one.
    pub grow_reserve_bytes: u64,
    /// What `max_num_seqs` sequences may hold beyond the blocks the engine counts for them
    /// (the last, partly used growth step, sliding rings larger than their blocks, allocation
    /// rounding).
    pub slack_bytes: u64,
    /// What the engine's block pools get: usable − in use − headroom − growth reserve − slack.
    pub kv_budget_bytes: u64,
    /// Bytes per cached element (2 for bf16).
    pub kv_dtype_bytes: usize,
    /// The context length served (`--max-model-len`, or the longest the budget and the backend
    /// allow).
    pub max_model_len: usize,
    /// Sequences in flight at most (`--max-num-seqs`), for which the slack is reserved.
    pub max_num_seqs: usize,
    /// Tokens the full-attention pool holds (what is left after the sliding pool's share).
    pub max_tokens: usize,
    /// Sequences of `max_model_len` tokens the pools hold at once.
    pub max_len_seqs: usize,
}

impl GpuKvBudget {
    /// `base` with this budget's context length, KV budget and element size.
    pub fn engine_options(&self, base: &EngineOptions) -> EngineOptions {
        EngineOptions {
            max_model_len: Some(self.max_model_len),
            kv_budget_bytes: self.kv_budget_bytes,
            kv_dtype_bytes: self.kv_dtype_bytes,
            ..base.clone()
        }
    }

    /// Lines for the operator: the budget in GiB, how it was derived, and what it holds.
    pub fn summary(&self) -> Vec<String> {
        vec![
            format!(
                "KV cache: {:.2} GiB = {} x {:.2} GiB GPU - {:.2} GiB in use after loading \
                 (weights, scratch, context) - {:.2} GiB headroom - {:.2} GiB growth reserve - \
                 {:.2} GiB allocation slack for {} sequences ({} KV cache)",
                gib(self.kv_budget_bytes),
                self.utilization,
                gib(self.total_bytes),
                gib(self.in_use_bytes),
                gib(self.headroom_bytes),
                gib(self.grow_reserve_bytes),
                gib(self.slack_bytes),
                self.max_num_seqs,
                if self.kv_dtype_bytes == 2 {
                    "bf16"
                } else {
                    "f32"
                },
            ),
            format!(
                "KV cache holds {} tokens: {} sequence(s) of --max-model-len {} at once",
                self.max_tokens, self.max_len_seqs, self.max_model_len
            ),
        ]
    }
}

/// The KV-cache budget on a GPU, vLLM's rule: what the server may use
/// (`utilization × total`) minus what is in use once the model is loaded and a warm-up step ran
/// (`mem.used_bytes`), minus reserves that keep the block accounting honest about the backend's
/// real allocations (see [`DeviceMemory`] for the rules they follow):
///
/// - `headroom`: the backend's [`DeviceMemory::headroom_bytes`];
/// - growth reserve: a sequence growing its full-attention cache briefly holds its old
///   allocation too; growths run one at a time and a sequence never exceeds `max_model_len`, so
///   `round_up(max_model_len, kv_grow_positions)` positions of the full layers plus one
///   allocation granule cover it;
/// - slack, per sequence in flight (`max_num_seqs`): one growth step of the full layers (a
///   sequence holds at most that many positions beyond its counted blocks), the positions of its
///   sliding rings beyond the sliding blocks counted per sequence, and one allocation granule
///   per device allocation.
///
/// Resolves the context length: `opts.max_model_len`, else the longest the backend holds
/// (`mem.max_context`, at most the model's), lowered with a notice to what the budget holds.
/// Fails with a message that names the numbers and what to change when the budget is negative
/// or cannot hold one sequence of `--max-model-len` tokens.
pub fn gpu_kv_budget(
    model: &GptOssConfig,
    mem: &DeviceMemory,
    utilization: f64,
    opts: &EngineOptions,
) -> Result<(GpuKvBudget, Vec<String>), String> {
    if utilization.is_nan() || utilization <= 0.0 || utilization > 1.0 {
        return Err(format!(
            "--gpu-memory-utilization must be in (0, 1], got {utilization}"
        ));
    }
    if opts.max_num_seqs == 0 {
        return Err("--max-num-seqs must be at least 1".into());
    }
    let mut notices = Vec::new();
    let layout = KvLayout::from_config(model, opts.block_size.max(1), mem.kv_dtype_bytes);
    let bs = layout.block_size;
    let chunk = prefill_chunk(opts);
    let model_max = model.max_position_embeddings.max(2);
    let wanted = match opts.max_model_len {
        Some(n) if n > model_max => {
            return Err(format!(
                "--max-model-len {n} is longer than the model's context ({model_max} tokens)"
            ));
        }
        Some(n) if n < 2 => return Err("--max-model-len must be at least 2".into()),
        Some(n) if n > mem.max_context => {
            return Err(format!(
                "--max-model-len {n} is longer than the backend was opened for ({} positions)",
                mem.max_context
            ));
        }
        Some(n) => n,
        None => mem.max_context.min(model_max).max(2),
    };
    let full_pos = (layout.full_layers * 2 * layout.kv_dim * layout.dtype_bytes) as u64;
    let sliding_pos = (layout.sliding_layers * 2 * layout.kv_dim * layout.dtype_bytes) as u64;
    let step = mem.kv_grow_positions.max(1) as u64;
    let granule = mem.alloc_granule_bytes;
    let grow_reserve = if layout.full_layers > 0 {
        (wanted as u64).div_ceil(step) * step * full_pos + granule
    } else {
        0
    };
    let sliding_counted = (layout.sliding_blocks_per_seq() * bs) as u64;
    let sliding_excess = if layout.sliding_layers > 0 {
        (mem.kv_sliding_positions as u64).saturating_sub(sliding_counted) * sliding_pos
    } else {
        0
    };
    let per_seq_slack = step * full_pos + sliding_excess + mem.kv_allocs_per_seq as u64 * granule;
    let slack = opts.max_num_seqs as u64 * per_seq_slack;
    let total = mem.total_bytes;
    let usable = (total as f64 * utilization) as u64;
    let reserved = mem.headroom_bytes + grow_reserve + slack;
    // KV bytes one sequence of `n` tokens needs (with the sliding pool of max_num_seqs).
    let one_seq = |n: usize| -> u64 {
        let sliding_blocks = if layout.has(Pool::Sliding) {
            opts.max_num_seqs * layout.sliding_blocks_per_seq() + chunk.div_ceil(bs) + 1
        } else {
            0
        };
        sliding_blocks as u64 * layout.block_bytes(Pool::Sliding)
            + layout.full_blocks_for(n) as u64 * layout.block_bytes(Pool::Full)
    };
    let explain = || {
        format!(
            "{:.2} GiB usable (--gpu-memory-utilization {utilization} x {:.2} GiB), {:.2} GiB in \
             use after loading the model, {:.2} GiB reserved (headroom {:.2}, growth copy of a \
             {wanted}-token sequence {:.2}, allocation slack of {} sequences {:.2})",
            gib(usable),
            gib(total),
            gib(mem.used_bytes),
            gib(reserved),
            gib(mem.headroom_bytes),
            gib(grow_reserve),
            opts.max_num_seqs,
            gib(slack),
        )
    };
    // The smallest utilization at which one sequence of `n` tokens fits.
    let needed_utilization =
        |n: usize| (mem.used_bytes + reserved + one_seq(n)) as f64 / total.max(1) as f64;
    let advice = |n: usize| {
        let u = needed_utilization(n);
        if u <= 1.0 {
            format!(
                "raise --gpu-memory-utilization to at least {:.3}",
                (u * 1000.0).ceil() / 1000.0
            )
        } else {
            "this GPU is too small for it even at --gpu-memory-utilization 1".to_string()
        }
    };
    if usable <= mem.used_bytes {
        return Err(format!(
            "--gpu-memory-utilization {utilization} allows {:.2} GiB of this {:.2} GiB GPU, but \
             {:.2} GiB are already in use after loading the model (weights, scratch buffers, CUDA \
             context, and any other process on the GPU); {}",
            gib(usable),
            gib(total),
            gib(mem.used_bytes),
            advice(wanted)
        ));
    }
    if usable <= mem.used_bytes + reserved {
        return Err(format!(
            "no GPU memory is left for the KV cache: {}; lower --max-model-len / --max-num-seqs \
             (smaller reserves) or {}",
            explain(),
            advice(wanted)
        ));
    }
    let budget = usable - mem.used_bytes - reserved;
    let probe = layout
        .plan(budget, opts.max_num_seqs, 2, chunk)
        .map_err(|e| format!("the KV cache does not fit: {e}; or {}", advice(wanted)))?;
    let fits = probe.max_tokens_per_seq();
    let max_model_len = if fits >= wanted {
        wanted
    } else if opts.max_model_len.is_some() {
        // vLLM's check: one sequence of the full context must fit.
        return Err(format!(
            "--max-model-len {wanted} needs {:.2} GiB of KV cache (one {wanted}-token sequence, \
             with the sliding-window blocks of {} sequences), but only {:.2} GiB ({fits} tokens) \
             is left for the KV cache: {}; lower --max-model-len (to at most {}) or {}",
            gib(one_seq(wanted)),
            opts.max_num_seqs,
            gib(budget),
            explain(),
            fits / bs * bs,
            advice(wanted),
        ));
    } else {
        let n = fits / bs * bs;
        if n < 2 {
            return Err(format!(
                "no room for even a short sequence in the KV cache: {}; {}",
                explain(),
                advice(bs.max(2))
            ));
        }
        notices.push(format!(
            "the KV cache holds {fits} tokens: serving a context of {n} tokens instead of \
             {wanted} (set --max-model-len, or raise --gpu-memory-utilization)"
        ));
        n
    };
    let kv = layout.plan(budget, opts.max_num_seqs, max_model_len, chunk)?;
    let max_len_seqs = match layout.full_blocks_for(max_model_len) {
        0 => opts.max_num_seqs,
        per_seq => kv.num_full_blocks / per_seq,
    };
    Ok((
        GpuKvBudget {
            utilization,
            total_bytes: total,
            usable_bytes: usable,
            in_use_bytes: mem.used_bytes,
            headroom_bytes: mem.headroom_bytes,
            grow_reserve_bytes: grow_reserve,
            slack_bytes: slack,
            kv_budget_bytes: budget,
            kv_dtype_bytes: mem.kv_dtype_bytes,
            max_model_len,
            max_num_seqs: opts.max_num_seqs,
            max_tokens: kv.max_tokens_per_seq(),
            max_len_seqs,
        },
        notices,
    ))
}

/// The largest prefill chunk per sequence per step.
fn prefill_chunk(opts: &EngineOptions) -> usize {
    opts.max_prefill_chunk
        .min(opts.max_num_batched_tokens)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        let model = crate::testing::tiny_config();
        let (cfg, notices) = plan_engine(
            &model,
            &EngineOptions {
                kv_budget_bytes: 8 << 20,
                ..EngineOptions::default()
            },
        )
        .unwrap();
        // 8 MiB cannot hold the model's 131072 tokens: the context is lowered, with a notice.
        assert!(cfg.max_model_len < model.max_position_embeddings);
        assert_eq!(notices.len(), 1);
        assert!(
            cfg.kv
                .check_fits(cfg.max_model_len, cfg.scheduler.max_prefill_chunk)
                .is_ok()
        );
        assert!(cfg.kv.total_bytes() <= 8 << 20);
        let too_long = EngineOptions {
            max_model_len: Some(1 << 20),
            ..EngineOptions::default()
        };
        assert!(plan_engine(&model, &too_long).is_err());
    }

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn model_20b() -> GptOssConfig {
        use gptoss_formats::synth::{Preset, SynthLayout, synth_config_json};
        let text = synth_config_json(Preset::Gpt20b, SynthLayout::UnslothNf4).to_string();
        GptOssConfig::from_json_str(&text).unwrap()
    }

    /// A 24 GiB card with 13 GiB in use after loading, and the CUDA backend's rules.
    fn card_24g() -> DeviceMemory {
        DeviceMemory {
            total_bytes: 24 * GIB,
            used_bytes: 13 * GIB,
            kv_dtype_bytes: 2,
            max_context: 131072,
            kv_grow_positions: 256,
            kv_sliding_positions: 128 + 8,
            kv_allocs_per_seq: 2,
            alloc_granule_bytes: 2 * MIB,
            headroom_bytes: 256 * MIB,
        }
    }

    fn opts(max_model_len: Option<usize>) -> EngineOptions {
        EngineOptions {
            max_model_len,
            ..EngineOptions::default()
        }
    }

    #[test]
    fn gpu_budget_numbers() {
        let model = model_20b();
        let (b, notices) = gpu_kv_budget(&model, &card_24g(), 1.0, &opts(Some(131072))).unwrap();
        assert!(notices.is_empty());
        // 12 full layers x K and V x 512 x bf16 = 24 KiB per position.
        // Growth reserve: 131072 positions x 24 KiB + one 2 MiB granule.
        assert_eq!(b.grow_reserve_bytes, 3 * GIB + 2 * MIB);
        // Slack per sequence: one 256-position step (6 MiB) + 2 granules; the 136-slot rings
        // fit in the 9 sliding blocks of 16 counted per sequence. 64 sequences.
        assert_eq!(b.slack_bytes, 64 * 10 * MIB);
        assert_eq!(b.headroom_bytes, 256 * MIB);
        // 24 - 13 GiB - 256 MiB - (3 GiB + 2 MiB) - 640 MiB.
        assert_eq!(b.kv_budget_bytes, 8 * GIB - 898 * MIB);
        assert_eq!(b.kv_dtype_bytes, 2);
        assert_eq!(b.max_model_len, 131072);
        // Sliding pool: 64 x 9 + 512/16 + 1 = 609 blocks of 384 KiB; the rest in full blocks of
        // 384 KiB (16 positions x 24 KiB): 18841 blocks.
        assert_eq!(b.max_tokens, 18841 * 16);
        assert_eq!(b.max_len_seqs, 2);
        // The engine sized from it fits in the budget and serves the full context.
        let (cfg, _) = plan_engine(&model, &b.engine_options(&opts(None))).unwrap();
        assert_eq!(cfg.max_model_len, 131072);
        assert!(cfg.kv.total_bytes() <= b.kv_budget_bytes);
        assert_eq!(cfg.kv.num_full_blocks, 18841);
        let summary = b.summary().join("\n");
        assert!(summary.contains("KV cache: 7.12 GiB"), "{summary}");
        assert!(
            summary.contains("2 sequence(s) of --max-model-len 131072"),
            "{summary}"
        );

        // Block size 1: the rings hold 136 positions but only 129 are counted; the difference
        // (7 positions x 24 KiB of the sliding layers) joins the per-sequence slack.
        let small = EngineOptions {
            block_size: 1,
            ..opts(Some(131072))
        };
        let (b1, _) = gpu_kv_budget(&model, &card_24g(), 1.0, &small).unwrap();
        assert_eq!(b1.slack_bytes, 64 * (10 * MIB + 7 * 24 * 1024));
        // An f32 cache doubles the per-position bytes.
        let f32_card = DeviceMemory {
            kv_dtype_bytes: 4,
            ..card_24g()
        };
        let (b4, _) = gpu_kv_budget(&model, &f32_card, 1.0, &opts(Some(65536))).unwrap();
        assert_eq!(b4.grow_reserve_bytes, 3 * GIB + 2 * MIB);
        assert_eq!(b4.kv_dtype_bytes, 4);
    }

    #[test]
    fn gpu_budget_errors_name_the_numbers_and_the_fix() {
        let model = model_20b();
        let card = card_24g();
        // 0.8 x 24 GiB leaves about 2.3 GiB for the cache; one 131072-token sequence needs 3.
        let e = gpu_kv_budget(&model, &card, 0.8, &opts(Some(131072))).unwrap_err();
        assert!(e.contains("--max-model-len 131072 needs 3.22 GiB"), "{e}");
        assert!(e.contains("lower --max-model-len (to at most"), "{e}");
        assert!(
            e.contains("raise --gpu-memory-utilization to at least 0.838"),
            "{e}"
        );
        // Both suggested fixes work.
        let at = |e: &str, pat: &str| -> String {
            let i = e.find(pat).unwrap() + pat.len();
            e[i..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect()
        };
        let u: f64 = at(&e, "to at least ").parse().unwrap();
        let (b, _) = gpu_kv_budget(&model, &card, u, &opts(Some(131072))).unwrap();
        assert!(b.max_len_seqs >= 1);
        let n: usize = at(&e, "(to at most ").parse().unwrap();
        let (b, _) = gpu_kv_budget(&model, &card, 0.8, &opts(Some(n))).unwrap();
        assert_eq!(b.max_model_len, n);
        assert!(b.max_len_seqs >= 1);

        // Less than what is already in use.
        let e = gpu_kv_budget(&model, &card, 0.5, &opts(Some(8192))).unwrap_err();
        assert!(e.contains("allows 12.00 GiB"), "{e}");
        assert!(e.contains("13.00 GiB are already in use"), "{e}");
        assert!(
            e.contains("raise --gpu-memory-utilization to at least"),
            "{e}"
        );
        // More than in use, less than the reserves.
        let e = gpu_kv_budget(&model, &card, 0.56, &opts(Some(131072))).unwrap_err();
        assert!(e.contains("no GPU memory is left for the KV cache"), "{e}");
        // A card too small at any utilization.
        let tiny = DeviceMemory {
            total_bytes: 14 * GIB,
            ..card
        };
        let e = gpu_kv_budget(&model, &tiny, 1.0, &opts(Some(131072))).unwrap_err();
        assert!(e.contains("this GPU is too small"), "{e}");
        // Bad flags.
        for u in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(gpu_kv_budget(&model, &card, u, &opts(None)).is_err());
        }
        assert!(gpu_kv_budget(&model, &card, 0.9, &opts(Some(1 << 20))).is_err());
        assert!(gpu_kv_budget(&model, &card, 0.9, &opts(Some(1))).is_err());
        let short = DeviceMemory {
            max_context: 8192,
            ..card
        };
        let e = gpu_kv_budget(&model, &short, 0.9, &opts(Some(16384))).unwrap_err();
        assert!(e.contains("backend was opened for (8192 positions)"), "{e}");
    }

    #[test]
    fn gpu_budget_default_context() {
        let model = model_20b();
        // Without --max-model-len: the backend's context when it fits...
        let (b, notices) = gpu_kv_budget(&model, &card_24g(), 1.0, &opts(None)).unwrap();
        assert_eq!(b.max_model_len, 131072);
        assert!(notices.is_empty());
        // ...else lowered to what fits, with a notice.
        let (b, notices) = gpu_kv_budget(&model, &card_24g(), 0.8, &opts(None)).unwrap();
        assert!(b.max_model_len < 131072 && b.max_model_len % 16 == 0);
        assert_eq!(b.max_len_seqs, 1);
        assert_eq!(notices.len(), 1, "{notices:?}");
        let (cfg, _) = plan_engine(&model, &b.engine_options(&opts(None))).unwrap();
        assert_eq!(cfg.max_model_len, b.max_model_len);
    }
}
