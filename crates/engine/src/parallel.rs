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
//! all-gather); a [`LogitsWanted::LastGreedy`](crate::backend::LogitsWanted::LastGreedy) step gets
//! the greedy token of its gathered last row instead of the row, as in `CpuBackend`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

pub use gptoss_model::reference::sharded::{
    Communicator, LocalCommunicator, ShardError, ShardPlan, ShardedReference,
};

use gptoss_formats::{Checkpoint, GptOssConfig, ModelWeights};
use gptoss_model::reference::KvCache;

use crate::backend::{
    Backend, BackendError, Logits, SeqId, StepBatch, check_start_positions, validate_batch,
};
use crate::cpu::{DEFAULT_MAX_BATCH_TOKENS, forward_cached, wanted_logits};

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
        check_start_positions(batch, |seq| self.cached_len(seq).unwrap_or(0))?;
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
    let hidden = forward_cached(
        batch,
        caches,
        || model.new_cache(),
        |seqs| model.forward_batch(seqs),
    )?;
    // Only the wanted rows go through the final norm and the (vocab-parallel) lm_head.
    Ok(wanted_logits(batch, &hidden, model.config(), |rows| {
        model.logits_for(rows)
    }))
}
