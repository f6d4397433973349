//! [`CpuBackend`]: the [`Backend`] on top of the f32 reference forward
//! ([`gptoss_model::reference`]): exact, multi-threaded, slow. It is the yardstick the CUDA
//! backend is checked against and a fallback that needs nothing but the checkpoint.
//!
//! Ownership: the backend owns the memory-mapped [`Checkpoint`] through an `Arc`, and the weight
//! views ([`ModelWeights`], which borrow the checkpoint) are rebuilt at the start of every
//! [`forward`](Backend::forward) call. That avoids a self-referential struct without any `unsafe`;
//! rebuilding is only a walk over the tensor names (no weight is read or decoded), negligible
//! next to a CPU forward pass.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use gptoss_formats::{Checkpoint, GptOssConfig, ModelWeights};
use gptoss_model::reference::{KvCache, ReferenceError, ReferenceModel, SeqInput};

use crate::backend::{
    Backend, BackendError, Logits, LogitsWanted, SeqId, StepBatch, check_start_positions,
    greedy_token, validate_batch,
};

/// Default limit on the tokens of one batch.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 8192;

/// The CPU reference backend: one [`KvCache`] per live sequence.
#[derive(Debug)]
pub struct CpuBackend {
    ckpt: Arc<Checkpoint>,
    caches: HashMap<SeqId, KvCache>,
    max_batch_tokens: usize,
}

impl CpuBackend {
    /// Opens the checkpoint in `dir` and checks that every weight maps.
    pub fn open(dir: &Path) -> Result<Self, BackendError> {
        let ckpt = Checkpoint::open(dir).map_err(|e| BackendError::Failed(e.to_string()))?;
        Self::new(Arc::new(ckpt))
    }

    /// A backend over an already opened checkpoint (checks that every weight maps).
    pub fn new(ckpt: Arc<Checkpoint>) -> Result<Self, BackendError> {
        ModelWeights::new(&ckpt).map_err(|e| BackendError::Failed(e.to_string()))?;
        Ok(CpuBackend {
            ckpt,
            caches: HashMap::new(),
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
        })
    }

    /// Sets the per-batch token limit.
    pub fn with_max_batch_tokens(mut self, max: usize) -> Self {
        self.max_batch_tokens = max;
        self
    }

    /// Tokens held for `seq`, if it is live.
    pub fn cached_len(&self, seq: SeqId) -> Option<usize> {
        self.caches.get(&seq).map(KvCache::len)
    }

    /// Number of live sequences.
    pub fn num_sequences(&self) -> usize {
        self.caches.len()
    }
}

fn reference_error(e: ReferenceError) -> BackendError {
    match e {
        ReferenceError::TokenOutOfRange { .. }
        | ReferenceError::PositionOutOfRange { .. }
        | ReferenceError::Shape(_) => BackendError::InvalidInput(e.to_string()),
        ReferenceError::Cache(_) | ReferenceError::Index(_) => BackendError::Failed(e.to_string()),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu-reference"
    }

    fn config(&self) -> &GptOssConfig {
        self.ckpt.config()
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError> {
        validate_batch(batch, self.max_batch_tokens)?;
        check_start_positions(batch, |seq| self.cached_len(seq).unwrap_or(0))?;
        let ckpt = Arc::clone(&self.ckpt);
        let model = ReferenceModel::new(
            ModelWeights::new(&ckpt).map_err(|e| BackendError::Failed(e.to_string()))?,
        );
        let hidden = forward_cached(
            batch,
            &mut self.caches,
            || model.new_cache(),
            |seqs| model.forward_batch(seqs),
        )?;
        Ok(wanted_logits(batch, &hidden, model.config(), |rows| {
            model.logits_for(rows)
        }))
    }

    fn release(&mut self, seq: SeqId) {
        self.caches.remove(&seq);
    }

    fn max_batch_tokens(&self) -> usize {
        self.max_batch_tokens
    }
}

/// Runs `forward_batch` (a reference forward, whole or one rank's shard) on the steps of `batch`
/// with the caches of their sequences in `caches`, a new one (`new_cache`) for a sequence not
/// held yet; returns the final hidden states. All or nothing: on error every cache is as before
/// and no sequence is added.
pub(crate) fn forward_cached(
    batch: &StepBatch,
    caches: &mut HashMap<SeqId, KvCache>,
    new_cache: impl Fn() -> KvCache,
    forward_batch: impl FnOnce(&mut [SeqInput<'_>]) -> Result<Vec<f32>, ReferenceError>,
) -> Result<Vec<f32>, BackendError> {
    let positions: Vec<Vec<usize>> = batch
        .steps
        .iter()
        .map(|s| (s.start_pos..s.start_pos + s.tokens.len()).collect())
        .collect();
    // Take the caches out for the call (new sequences get an empty one); all go back after.
    let taken: Vec<Option<KvCache>> = batch.steps.iter().map(|s| caches.remove(&s.seq)).collect();
    let existed: Vec<bool> = taken.iter().map(Option::is_some).collect();
    let mut work: Vec<KvCache> = taken
        .into_iter()
        .map(|c| c.unwrap_or_else(&new_cache))
        .collect();
    let result = {
        let mut inputs: Vec<SeqInput<'_>> = batch
            .steps
            .iter()
            .zip(&positions)
            .zip(work.iter_mut())
            .map(|((s, p), cache)| SeqInput {
                tokens: &s.tokens,
                positions: p,
                cache,
            })
            .collect();
        forward_batch(&mut inputs)
    };
    match result {
        Ok(hidden) => {
            for (s, cache) in batch.steps.iter().zip(work) {
                caches.insert(s.seq, cache);
            }
            Ok(hidden)
        }
        Err(e) => {
            // Nothing was modified: restore the sequences that existed before the call.
            for ((s, cache), existed) in batch.steps.iter().zip(work).zip(existed) {
                if existed {
                    caches.insert(s.seq, cache);
                }
            }
            Err(reference_error(e))
        }
    }
}

/// The logits `batch` wants from the final hidden states `hidden` (`[tokens, hidden]`, in step
/// order): only the wanted rows go through `logits_for` (the final norm and lm_head). A
/// [`LogitsWanted::LastGreedy`] step computes its last row like `Last`, but returns no row: only
/// [`greedy_token`] of it (the host-side counterpart of a GPU backend's on-device arg-max).
pub(crate) fn wanted_logits(
    batch: &StepBatch,
    hidden: &[f32],
    config: &GptOssConfig,
    logits_for: impl FnOnce(&[f32]) -> Vec<f32>,
) -> Logits {
    let h = config.hidden_size;
    let mut rows = Vec::new();
    let mut counts = Vec::with_capacity(batch.steps.len());
    let mut start = 0;
    for s in &batch.steps {
        let n = s.tokens.len();
        let (first, count) = match s.want_logits {
            LogitsWanted::All => (start, n),
            LogitsWanted::Last | LogitsWanted::LastGreedy => (start + n - 1, 1),
        };
        rows.extend_from_slice(&hidden[first * h..(first + count) * h]);
        counts.push(count);
        start += n;
    }
    let logits = logits_for(&rows);
    let vocab = config.vocab_size;
    let mut steps = Vec::with_capacity(counts.len());
    let mut greedy = Vec::with_capacity(counts.len());
    let mut r = 0;
    for (s, c) in batch.steps.iter().zip(counts) {
        let block = &logits[r * vocab..(r + c) * vocab];
        if s.want_logits == LogitsWanted::LastGreedy {
            steps.push(Vec::new());
            greedy.push(greedy_token(block));
        } else {
            steps.push(block.to_vec());
            greedy.push(None);
        }
        r += c;
    }
    Logits::with_greedy(vocab, steps, greedy)
}
