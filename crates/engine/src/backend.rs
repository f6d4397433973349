//! The one seam between the serving core and the hardware: [`Backend`].
//!
//! A backend owns the weights and one KV cache per live sequence. The scheduler hands it a
//! [`StepBatch`] — for each sequence, the next tokens to feed (a whole prompt chunk for prefill,
//! one token for decode) and the position of the first one — and gets back logits for the rows it
//! asked for. Sequences are identified by [`SeqId`]; a backend creates a sequence's cache on the
//! first step that starts at position 0 and frees it on [`Backend::release`].
//!
//! The contract every backend (CPU reference, CUDA) implements identically:
//! - `start_pos` must equal the number of tokens the backend already holds for that sequence,
//!   otherwise the step is refused ([`BackendError::PositionMismatch`]): positions are never
//!   guessed, so a scheduler bug cannot silently corrupt a cache;
//! - a batch is all-or-nothing: on error no cache has changed;
//! - logits rows follow the steps' order; within a step, `All` returns one row per token,
//!   `Last` only the row of the last token, `LastGreedy` no row but the greedy token of the last
//!   row ([`Logits::greedy`]).

use gptoss_formats::GptOssConfig;

/// Identifies a sequence across steps.
pub type SeqId = u64;

/// Which logits rows a step wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only the last token's row (generation).
    Last,
    /// One row per token of the step (scoring, prompt logprobs, tests).
    All,
    /// Only the greedy token of the last row ([`greedy_token`]'s rule), no logits: a GPU
    /// backend picks it on the device and copies back 4 bytes instead of a vocabulary row. For
    /// requests whose sampling needs nothing but the arg-max (temperature 0, no penalties, no
    /// logprobs).
    LastGreedy,
}

/// The greedy token of a logits row: the lowest id holding the largest value, where NaN never
/// wins and `+inf` beats every finite value (the engine sampler's rule). `None` when no entry is
/// above `-inf` (no token can be chosen).
pub fn greedy_token(row: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v > f32::NEG_INFINITY && best.is_none_or(|(_, b)| v > b) {
            best = Some((i as u32, v));
        }
    }
    best.map(|(i, _)| i)
}

/// The next tokens of one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    pub seq: SeqId,
    /// At least one token.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`: must equal the length the backend already holds for `seq`.
    pub start_pos: usize,
    pub want_logits: LogitsWanted,
}

/// One forward call: at most one step per sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    pub steps: Vec<SeqStep>,
}

impl StepBatch {
    /// Total number of tokens fed by the batch.
    pub fn num_tokens(&self) -> usize {
        self.steps.iter().map(|s| s.tokens.len()).sum()
    }
}

/// Logits of a [`StepBatch`], per step, as rows of `vocab_size` f32 (none for a
/// [`LogitsWanted::LastGreedy`] step, which has its greedy token instead).
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    vocab_size: usize,
    steps: Vec<Vec<f32>>,
    /// Per step: the greedy token of a `LastGreedy` step (`None` for other steps, and for a
    /// `LastGreedy` row without any value above `-inf`).
    greedy: Vec<Option<u32>>,
}

impl Logits {
    /// Builds the result from per-step row blocks (each a multiple of `vocab_size` long).
    pub fn new(vocab_size: usize, steps: Vec<Vec<f32>>) -> Self {
        let greedy = vec![None; steps.len()];
        Self::with_greedy(vocab_size, steps, greedy)
    }

    /// Like [`Logits::new`], with the greedy tokens of the `LastGreedy` steps (one entry per
    /// step; `None` elsewhere).
    pub fn with_greedy(vocab_size: usize, steps: Vec<Vec<f32>>, greedy: Vec<Option<u32>>) -> Self {
        assert!(
            steps.iter().all(|s| s.len().is_multiple_of(vocab_size)),
            "logits rows are vocab_size wide"
        );
        assert_eq!(steps.len(), greedy.len(), "one greedy entry per step");
        Logits {
            vocab_size,
            steps,
            greedy,
        }
    }

    /// The greedy token of step `i` when it was a [`LogitsWanted::LastGreedy`] step (`None`
    /// for other steps, or when no logit was above `-inf`).
    pub fn greedy(&self, i: usize) -> Option<u32> {
        self.greedy[i]
    }

    /// Width of a row.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Number of steps.
    pub fn num_steps(&self) -> usize {
        self.steps.len()
    }

    /// All rows of step `i`, concatenated (`[rows, vocab]`).
    pub fn step(&self, i: usize) -> &[f32] {
        &self.steps[i]
    }

    /// The rows of step `i`.
    pub fn rows(&self, i: usize) -> impl ExactSizeIterator<Item = &[f32]> {
        self.steps[i].chunks_exact(self.vocab_size)
    }

    /// The last row of step `i` (its last token's logits).
    pub fn last(&self, i: usize) -> &[f32] {
        let s = &self.steps[i];
        &s[s.len() - self.vocab_size..]
    }

    /// The per-step blocks.
    pub fn into_steps(self) -> Vec<Vec<f32>> {
        self.steps
    }

    /// The per-step blocks and greedy tokens.
    pub fn into_parts(self) -> (Vec<Vec<f32>>, Vec<Option<u32>>) {
        (self.steps, self.greedy)
    }
}

/// Why a backend refused or failed a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// A step's `start_pos` is not the length the backend holds for the sequence.
    #[error(
        "sequence {seq}: step starts at position {start_pos}, but {cached} tokens are cached (a new sequence starts at 0)"
    )]
    PositionMismatch {
        seq: SeqId,
        start_pos: usize,
        cached: usize,
    },
    /// A sequence appears twice in one batch.
    #[error("sequence {0} appears more than once in the batch")]
    DuplicateSeq(SeqId),
    /// A step without tokens.
    #[error("sequence {0}: a step needs at least one token")]
    EmptyStep(SeqId),
    /// The batch feeds more tokens than [`Backend::max_batch_tokens`].
    #[error("the batch has {tokens} tokens, more than this backend's limit of {max}")]
    BatchTooLarge { tokens: usize, max: usize },
    /// The input is invalid for the model (token id beyond the vocabulary, position beyond the
    /// context, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The backend could not load or run the model.
    #[error("backend failure: {0}")]
    Failed(String),
}

/// The memory of a GPU backend's device and the rules its KV cache is allocated by: what a
/// server needs to size the cache from `--gpu-memory-utilization` (vLLM's rule; see
/// `gptoss_server::config::gpu_kv_budget`, which turns these figures into a budget).
///
/// The rules let the budget stay honest about how the backend's allocations relate to the block
/// accounting ([`crate::kv_blocks`]), which counts `ceil(len / block_size)` full-attention blocks
/// and a bounded number of sliding-window blocks per sequence:
/// - the full-attention layers of a sequence of `len` positions hold
///   `min(round_up(len, kv_grow_positions), max_context)` positions, so at most
///   `kv_grow_positions` more than counted;
/// - each sliding-window layer holds `kv_sliding_positions` positions per sequence;
/// - a sequence's cache is `kv_allocs_per_seq` device allocations, each of which the driver may
///   round up to `alloc_granule_bytes`;
/// - growing a sequence's full-attention cache allocates the new size before the old allocation
///   is freed (its contents are copied over), so while it grows the sequence briefly holds both;
///   growths run one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Device memory in total, in bytes.
    pub total_bytes: u64,
    /// Device memory in use now (total − free), by this process — weights, scratch buffers,
    /// driver context, and whatever a warm-up step allocated — and by any other process.
    pub used_bytes: u64,
    /// Bytes per cached K/V element (2 for a bf16 cache, 4 for f32).
    pub kv_dtype_bytes: usize,
    /// The most positions one sequence may hold.
    pub max_context: usize,
    /// Full-attention caches grow in steps of this many positions.
    pub kv_grow_positions: usize,
    /// Positions each sliding-window layer holds per sequence.
    pub kv_sliding_positions: usize,
    /// Device allocations that make up one sequence's cache.
    pub kv_allocs_per_seq: usize,
    /// What the driver may round each allocation up to, in bytes.
    pub alloc_granule_bytes: u64,
    /// Bytes to keep free for what the backend may still allocate outside the KV cache after a
    /// warm-up step (driver bookkeeping, a re-instantiated graph, fragmentation).
    pub headroom_bytes: u64,
}

/// A device that runs the GPT-OSS forward pass for batches of sequences.
pub trait Backend: Send {
    /// A short name for logs (`"cpu-reference"`, `"cuda"`).
    fn name(&self) -> &str;

    /// The model configuration.
    fn config(&self) -> &GptOssConfig;

    /// Feeds every step's tokens, extends each sequence's cache, and returns the wanted logits.
    fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError>;

    /// Frees the cache of `seq` (no-op for an unknown sequence). A later step for `seq` must
    /// start at 0 again.
    fn release(&mut self, seq: SeqId);

    /// The most tokens one [`StepBatch`] may feed.
    fn max_batch_tokens(&self) -> usize;

    /// The device memory and KV allocation rules of a GPU backend, measured now (call it after a
    /// warm-up step, with no sequence held, to see what serving needs besides the KV cache).
    /// `Ok(None)` (the default) for backends whose cache lives in host memory: they are sized by
    /// other means (`--kv-cache-space`).
    fn device_memory(&self) -> Result<Option<DeviceMemory>, BackendError> {
        Ok(None)
    }
}

/// Checks what every backend must refuse regardless of the hardware: empty steps, duplicate
/// sequences and oversized batches.
pub fn validate_batch(batch: &StepBatch, max_batch_tokens: usize) -> Result<(), BackendError> {
    let mut seen = std::collections::HashSet::new();
    for s in &batch.steps {
        if s.tokens.is_empty() {
            return Err(BackendError::EmptyStep(s.seq));
        }
        if !seen.insert(s.seq) {
            return Err(BackendError::DuplicateSeq(s.seq));
        }
    }
    let tokens = batch.num_tokens();
    if tokens > max_batch_tokens {
        return Err(BackendError::BatchTooLarge {
            tokens,
            max: max_batch_tokens,
        });
    }
    Ok(())
}

/// Checks that every step starts where its sequence stands: `start_pos` must equal `cached(seq)`,
/// the tokens the backend holds for the sequence (0 for one it does not hold).
pub fn check_start_positions(
    batch: &StepBatch,
    cached: impl Fn(SeqId) -> usize,
) -> Result<(), BackendError> {
    for s in &batch.steps {
        let cached = cached(s.seq);
        if s.start_pos != cached {
            return Err(BackendError::PositionMismatch {
                seq: s.seq,
                start_pos: s.start_pos,
                cached,
            });
        }
    }
    Ok(())
}
