//! Engine sizing from serving options (vLLM-style flags): context length, sequences, tokens per
//! step, and the KV-cache memory budget that the block pools are carved from.

use gptoss_engine::engine::EngineConfig;
use gptoss_engine::kv_blocks::{DEFAULT_BLOCK_SIZE, KvLayout};
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
    /// Bytes available to the KV cache (for a GPU: `gpu_memory_utilization × total − weights −
    /// activations`; for the CPU backend: `--kv-cache-space`).
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
    let chunk = opts
        .max_prefill_chunk
        .min(opts.max_num_batched_tokens)
        .max(1);
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

/// The KV-cache budget on a GPU, vLLM's rule: `utilization × total − weights − reserve` (the
/// reserve covers activations and workspace, measured by a profiling forward pass). Fails when
/// nothing is left.
pub fn gpu_kv_budget(
    total_bytes: u64,
    utilization: f64,
    weights_bytes: u64,
    reserve_bytes: u64,
) -> Result<u64, String> {
    if utilization.is_nan() || utilization <= 0.0 || utilization > 1.0 {
        return Err(format!(
            "--gpu-memory-utilization must be in (0, 1], got {utilization}"
        ));
    }
    let usable = (total_bytes as f64 * utilization) as u64;
    usable
        .checked_sub(weights_bytes + reserve_bytes)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            format!(
                "no GPU memory left for the KV cache: {:.2} GiB usable ({utilization} of {:.2} GiB), \
                 {:.2} GiB of weights, {:.2} GiB reserved for activations; raise \
                 --gpu-memory-utilization or use a smaller model",
                usable as f64 / (1u64 << 30) as f64,
                total_bytes as f64 / (1u64 << 30) as f64,
                weights_bytes as f64 / (1u64 << 30) as f64,
                reserve_bytes as f64 / (1u64 << 30) as f64,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        let g = 1u64 << 30;
        assert_eq!(gpu_kv_budget(80 * g, 0.5, 13 * g, g).unwrap(), 26 * g);
        assert!(gpu_kv_budget(80 * g, 0.1, 13 * g, g).is_err());
        assert!(gpu_kv_budget(80 * g, 1.5, 13 * g, g).is_err());
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
}
