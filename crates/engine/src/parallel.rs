//! [`ShardedCpuBackend`]: the CPU reference split over `N` rank threads with tensor and expert
//! parallelism ([`gptoss_model::reference::sharded`]), talking through an in-process
//! [`LocalCommunicator`]. It computes the same logits as [`CpuBackend`](crate::cpu::CpuBackend)
//! (up to f32 summation order) and is how the sharding logic is tested without GPUs; a CUDA
//! backend runs the same plan with one GPU per rank and an NCCL [`Communicator`].
//!
//! Each rank thread owns an `Arc<Checkpoint>`, its communicator and the KV caches of its kv heads
//! for every live sequence. The backend checks each batch (the same contract as `CpuBackend`:
//! empty steps, duplicates, size, `start_pos` equal to the tokens held) before broadcasting it, so
//! a refused batch reaches no rank; the ranks' own checks (token ids, positions) are identical on
//! every rank and made before any cache change or collective, so a batch is all-or-nothing on all
//! ranks. Rank 0's logits are returned (every rank holds the same full logits after the final
//! all-gather).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

pub use gptoss_model::reference::sharded::{
    Communicator, LocalCommunicator, ShardError, ShardPlan, ShardedReference,
};

use gptoss_formats::{Checkpoint, GptOssConfig, ModelWeights};
use gptoss_model::reference::{KvCache, ReferenceError, SeqInput};

use crate::backend::{
    Backend, BackendError, Logits, LogitsWanted, SeqId, StepBatch, validate_batch,
};
use crate::cpu::DEFAULT_MAX_BATCH_TOKENS;

enum Command {
    Forward(Arc<StepBatch>),
    Release(SeqId),
}

/// A rank's answer to a forward: rank 0 sends the logits, the others `None`.
type Reply = (usize, Result<Option<Logits>, BackendError>);

/// The CPU reference backend over `world` rank threads (`name()` = `"cpu-tp{world}"`).
#[derive(Debug)]
pub struct ShardedCpuBackend {
    ckpt: Arc<Checkpoint>,
    name: String,
    world: usize,
    commands: Vec<Sender<Command>>,
    replies: Receiver<Reply>,
    workers: Vec<JoinHandle<()>>,
    /// Tokens held per live sequence (identical on every rank).
    lengths: HashMap<SeqId, usize>,
    max_batch_tokens: usize,
    /// Set once a rank thread died: the group cannot continue.
    broken: Option<String>,
}

impl ShardedCpuBackend {
    /// Opens the checkpoint in `dir` and splits it over `world` rank threads.
    pub fn open(dir: &Path, world: usize) -> Result<Self, BackendError> {
        let ckpt = Checkpoint::open(dir).map_err(|e| BackendError::Failed(e.to_string()))?;
        Self::new(Arc::new(ckpt), world)
    }

    /// Splits an opened checkpoint over `world` rank threads. Fails if the weights do not map or
    /// the model cannot be split that way ([`ShardPlan::validate`]: `world` must divide
    /// `num_key_value_heads`).
    pub fn new(ckpt: Arc<Checkpoint>, world: usize) -> Result<Self, BackendError> {
        ShardPlan::validate(ckpt.config(), world)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        ModelWeights::new(&ckpt).map_err(|e| BackendError::Failed(e.to_string()))?;
        let (reply_tx, replies) = channel();
        let mut commands = Vec::with_capacity(world);
        let mut workers = Vec::with_capacity(world);
        for comm in LocalCommunicator::group(world) {
            let (tx, rx) = channel();
            let rank = comm.rank();
            let (ckpt, reply_tx) = (Arc::clone(&ckpt), reply_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("cpu-tp-rank{rank}"))
                .spawn(move || rank_worker(ckpt, comm, rx, reply_tx))
                .map_err(|e| BackendError::Failed(format!("spawning rank {rank}: {e}")))?;
            commands.push(tx);
            workers.push(handle);
        }
        Ok(ShardedCpuBackend {
            ckpt,
            name: format!("cpu-tp{world}"),
            world,
            commands,
            replies,
            workers,
            lengths: HashMap::new(),
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            broken: None,
        })
    }

    /// Sets the per-batch token limit.
    pub fn with_max_batch_tokens(mut self, max: usize) -> Self {
        self.max_batch_tokens = max;
        self
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Tokens held for `seq`, if it is live.
    pub fn cached_len(&self, seq: SeqId) -> Option<usize> {
        self.lengths.get(&seq).copied()
    }

    /// Number of live sequences.
    pub fn num_sequences(&self) -> usize {
        self.lengths.len()
    }

    fn fail(&mut self, why: String) -> BackendError {
        let why = self.broken.get_or_insert(why).clone();
        BackendError::Failed(format!("tensor-parallel CPU backend: {why}"))
    }
}

impl Backend for ShardedCpuBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &GptOssConfig {
        self.ckpt.config()
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError> {
        if let Some(why) = &self.broken {
            return Err(BackendError::Failed(format!(
                "tensor-parallel CPU backend: {why}"
            )));
        }
        validate_batch(batch, self.max_batch_tokens)?;
        for s in &batch.steps {
            let cached = self.cached_len(s.seq).unwrap_or(0);
            if s.start_pos != cached {
                return Err(BackendError::PositionMismatch {
                    seq: s.seq,
                    start_pos: s.start_pos,
                    cached,
                });
            }
        }
        let vocab = self.config().vocab_size;
        if batch.steps.is_empty() {
            return Ok(Logits::new(vocab, Vec::new()));
        }
        let shared = Arc::new(batch.clone());
        for tx in &self.commands {
            if tx.send(Command::Forward(Arc::clone(&shared))).is_err() {
                return Err(self.fail("a rank thread has stopped".into()));
            }
        }
        let mut results: Vec<Option<Result<Option<Logits>, BackendError>>> =
            (0..self.world).map(|_| None).collect();
        for _ in 0..self.world {
            match self.replies.recv() {
                Ok((rank, r)) => results[rank] = Some(r),
                Err(_) => return Err(self.fail("a rank thread panicked".into())),
            }
        }
        let results: Vec<_> = results.into_iter().map(Option::unwrap).collect();
        // Every rank validates the same batch the same way: they succeed or fail together.
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            if results.iter().any(Result::is_ok) {
                return Err(self.fail(format!("ranks disagree on a batch: {e}")));
            }
            return Err(e.clone());
        }
        for s in &batch.steps {
            *self.lengths.entry(s.seq).or_insert(0) += s.tokens.len();
        }
        let mut results = results.into_iter();
        match results.next() {
            Some(Ok(Some(logits))) => Ok(logits),
            _ => Err(self.fail("rank 0 returned no logits".into())),
        }
    }

    fn release(&mut self, seq: SeqId) {
        self.lengths.remove(&seq);
        for tx in &self.commands {
            let _ = tx.send(Command::Release(seq));
        }
    }

    fn max_batch_tokens(&self) -> usize {
        self.max_batch_tokens
    }
}

impl Drop for ShardedCpuBackend {
    fn drop(&mut self) {
        // Closing the command channels ends the rank loops.
        self.commands.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
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

/// One rank: runs every command it receives until the backend closes the channel.
fn rank_worker(
    ckpt: Arc<Checkpoint>,
    comm: LocalCommunicator,
    commands: Receiver<Command>,
    replies: Sender<Reply>,
) {
    let rank = comm.rank();
    let mut caches: HashMap<SeqId, KvCache> = HashMap::new();
    while let Ok(cmd) = commands.recv() {
        match cmd {
            Command::Release(seq) => {
                caches.remove(&seq);
            }
            Command::Forward(batch) => {
                let r = rank_forward(&ckpt, &comm, &mut caches, &batch);
                let r = r.map(|l| (rank == 0).then_some(l));
                if replies.send((rank, r)).is_err() {
                    return;
                }
            }
        }
    }
}

/// This rank's part of one batch (collective: every rank runs it on the same batch).
fn rank_forward(
    ckpt: &Checkpoint,
    comm: &LocalCommunicator,
    caches: &mut HashMap<SeqId, KvCache>,
    batch: &StepBatch,
) -> Result<Logits, BackendError> {
    let weights = ModelWeights::new(ckpt).map_err(|e| BackendError::Failed(e.to_string()))?;
    let model =
        ShardedReference::new(weights, comm).map_err(|e| BackendError::Failed(e.to_string()))?;
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
        .map(|c| c.unwrap_or_else(|| model.new_cache()))
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
        model.forward_batch(&mut inputs)
    };
    let hidden = match result {
        Ok(h) => h,
        Err(e) => {
            for ((s, cache), existed) in batch.steps.iter().zip(work).zip(existed) {
                if existed {
                    caches.insert(s.seq, cache);
                }
            }
            return Err(reference_error(e));
        }
    };
    for (s, cache) in batch.steps.iter().zip(work) {
        caches.insert(s.seq, cache);
    }
    // Only the wanted rows go through the final norm and the (vocab-parallel) lm_head.
    let h = model.config().hidden_size;
    let mut rows = Vec::new();
    let mut counts = Vec::with_capacity(batch.steps.len());
    let mut start = 0;
    for s in &batch.steps {
        let n = s.tokens.len();
        let (first, count) = match s.want_logits {
            LogitsWanted::All => (start, n),
            LogitsWanted::Last => (start + n - 1, 1),
        };
        rows.extend_from_slice(&hidden[first * h..(first + count) * h]);
        counts.push(count);
        start += n;
    }
    let logits = model.logits_for(&rows);
    let vocab = model.config().vocab_size;
    let mut steps = Vec::with_capacity(counts.len());
    let mut r = 0;
    for c in counts {
        steps.push(logits[r * vocab..(r + c) * vocab].to_vec());
        r += c;
    }
    Ok(Logits::new(vocab, steps))
}
