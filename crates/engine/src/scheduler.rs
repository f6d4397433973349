//! Iteration-level (continuous) batching with chunked prefill, paged-KV admission control and
//! preemption by recompute.
//!
//! The [`Scheduler`] is pure bookkeeping — no threads, no backend — so that its policy can be
//! tested step by step. Every engine iteration:
//!
//! 1. [`Scheduler::schedule`] builds one [`StepBatch`] under a token budget
//!    (`max_num_batched_tokens`):
//!    - first one token for every running sequence that is **decoding** (oldest first), so running
//!      decodes are never stalled by prompts;
//!    - then the next **prefill chunk** (at most `max_prefill_chunk` tokens) of running sequences
//!      whose prompt is not fully in the cache yet;
//!    - then, first come first served, **waiting** sequences are admitted while there is token
//!      budget, fewer than `max_num_seqs` are running, and the free blocks can hold the whole
//!      prompt (plus one block per running sequence of head room, so that admitting does not
//!      immediately force a preemption);
//!    - every step first reserves its KV blocks ([`KvBlockManager::allocate_step`]). When a
//!      running sequence cannot get its blocks, the **newest** running sequence is preempted: its
//!      blocks are freed, the engine releases its backend cache, and it goes back to the *front*
//!      of the waiting queue with all its tokens (prompt and generated so far) to be recomputed
//!      later. If the newest is the sequence itself, it is the one preempted. A sequence alone
//!      always fits ([`KvCacheConfig::check_fits`](crate::kv_blocks::KvCacheConfig::check_fits)),
//!      so the oldest sequence always makes progress.
//! 2. The engine runs the batch, then calls [`Scheduler::step_done`] for the steps that ran
//!    (their tokens are now in the cache), and [`Scheduler::append_token`] for each sampled token.
//! 3. [`Scheduler::remove`] drops a finished or cancelled sequence and frees its blocks at once.

use std::collections::{HashMap, VecDeque};

use crate::backend::{LogitsWanted, SeqId, SeqStep, StepBatch};
use crate::kv_blocks::{KvBlockManager, KvUsage, Pool};

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running (holding a cache) at once.
    pub max_num_seqs: usize,
    /// Most tokens fed by one step (all sequences together).
    pub max_num_batched_tokens: usize,
    /// Most prompt tokens one sequence feeds per step (chunked prefill).
    pub max_prefill_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_prefill_chunk: 512,
        }
    }
}

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued; holds no blocks and no backend cache.
    Waiting,
    /// Admitted; holds blocks and (after its first step) a backend cache.
    Running,
}

#[derive(Debug, Clone)]
struct SchedSeq {
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// Tokens already in the backend cache.
    computed: usize,
    status: SeqStatus,
    /// Times this sequence was preempted.
    preemptions: usize,
}

/// What one iteration runs.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// The steps to feed the backend.
    pub batch: StepBatch,
    /// For each step: whether it reaches the end of the sequence's tokens, so its logits give
    /// the next token (a partial prefill chunk's logits are ignored).
    pub samples: Vec<bool>,
    /// Sequences preempted while scheduling: the engine must release their backend caches.
    pub preempted: Vec<SeqId>,
}

impl Schedule {
    /// Whether nothing runs.
    pub fn is_empty(&self) -> bool {
        self.batch.steps.is_empty()
    }
}

/// Continuous-batching scheduler over a [`KvBlockManager`].
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvBlockManager,
    seqs: HashMap<SeqId, SchedSeq>,
    waiting: VecDeque<SeqId>,
    /// Admission order, oldest first.
    running: Vec<SeqId>,
    preemptions_total: u64,
}

impl Scheduler {
    /// A scheduler with empty queues.
    pub fn new(cfg: SchedulerConfig, kv: KvBlockManager) -> Self {
        Scheduler {
            cfg: SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs.max(1),
                max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
                max_prefill_chunk: cfg.max_prefill_chunk.max(1),
            },
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions_total: 0,
        }
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The block manager.
    pub fn kv(&self) -> &KvBlockManager {
        &self.kv
    }

    /// Block usage.
    pub fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    /// Sequences waiting for admission.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether no sequence is known.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Preemptions so far.
    pub fn preemptions_total(&self) -> u64 {
        self.preemptions_total
    }

    /// Status of `seq`, if known.
    pub fn status(&self, seq: SeqId) -> Option<SeqStatus> {
        self.seqs.get(&seq).map(|s| s.status)
    }

    /// Tokens of `seq` (prompt and generated).
    pub fn tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice())
    }

    /// Tokens of `seq` in the backend cache.
    pub fn computed(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.computed)
    }

    /// How often `seq` was preempted.
    pub fn preemptions(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.preemptions)
    }

    /// Queues a new sequence with its prompt (at least one token).
    pub fn add(&mut self, seq: SeqId, prompt: Vec<u32>) {
        assert!(!prompt.is_empty(), "a sequence needs at least one token");
        assert!(!self.seqs.contains_key(&seq), "sequence {seq} added twice");
        self.seqs.insert(
            seq,
            SchedSeq {
                tokens: prompt,
                computed: 0,
                status: SeqStatus::Waiting,
                preemptions: 0,
            },
        );
        self.waiting.push_back(seq);
    }

    /// Records a sampled token of `seq` (fed by its next step).
    pub fn append_token(&mut self, seq: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.tokens.push(token);
        }
    }

    /// Forgets `seq` and frees its blocks. Returns whether it may hold a backend cache (the
    /// engine must then release it).
    pub fn remove(&mut self, seq: SeqId) -> bool {
        let Some(s) = self.seqs.remove(&seq) else {
            return false;
        };
        self.kv.free(seq);
        match s.status {
            SeqStatus::Waiting => {
                self.waiting.retain(|&x| x != seq);
                false
            }
            SeqStatus::Running => {
                self.running.retain(|&x| x != seq);
                true
            }
        }
    }

    /// The steps of `batch` ran: their tokens are in the cache.
    pub fn step_done(&mut self, step: &SeqStep) {
        if let Some(s) = self.seqs.get_mut(&step.seq) {
            debug_assert_eq!(s.computed, step.start_pos);
            s.computed = step.start_pos + step.tokens.len();
            self.kv.finish_step(step.seq, s.computed);
        }
    }

    /// Preempts `seq`: frees its blocks and puts it at the front of the waiting queue.
    fn preempt(&mut self, seq: SeqId, out: &mut Schedule) {
        let s = self.seqs.get_mut(&seq).expect("running sequence");
        s.computed = 0;
        s.status = SeqStatus::Waiting;
        s.preemptions += 1;
        self.kv.free(seq);
        self.running.retain(|&x| x != seq);
        self.waiting.push_front(seq);
        self.preemptions_total += 1;
        out.preempted.push(seq);
        // Drop a step already scheduled for it in this iteration.
        if let Some(i) = out.batch.steps.iter().position(|st| st.seq == seq) {
            out.batch.steps.remove(i);
            out.samples.remove(i);
        }
    }

    /// Reserves blocks for `seq` to feed `n` tokens, preempting the newest running sequences as
    /// needed. Returns false if `seq` itself had to be preempted.
    fn reserve(&mut self, seq: SeqId, n: usize, out: &mut Schedule) -> bool {
        let start = self.seqs[&seq].computed;
        loop {
            if self.kv.allocate_step(seq, start, start + n).is_ok() {
                return true;
            }
            let victim = *self.running.last().expect("seq is running");
            self.preempt(victim, out);
            if victim == seq {
                return false;
            }
        }
    }

    fn push_step(&mut self, seq: SeqId, n: usize, out: &mut Schedule) {
        let s = &self.seqs[&seq];
        let end = s.computed + n;
        out.batch.steps.push(SeqStep {
            seq,
            tokens: s.tokens[s.computed..end].to_vec(),
            start_pos: s.computed,
            want_logits: LogitsWanted::Last,
        });
        out.samples.push(end == s.tokens.len());
    }

    /// Builds the next iteration's batch (see the module documentation for the policy).
    pub fn schedule(&mut self) -> Schedule {
        let mut out = Schedule::default();
        let used = |out: &Schedule| out.batch.num_tokens();
        let budget = self.cfg.max_num_batched_tokens;

        // 1. Decodes of running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && used(&out) < budget {
            let seq = self.running[i];
            let s = &self.seqs[&seq];
            if s.tokens.len() - s.computed == 1 && self.reserve(seq, 1, &mut out) {
                self.push_step(seq, 1, &mut out);
            }
            // `reserve` may have removed sequences at the end (never before `i`).
            if self.running.get(i) == Some(&seq) {
                i += 1;
            }
        }

        // 2. Prefill chunks of running sequences.
        let mut i = 0;
        while i < self.running.len() && used(&out) < budget {
            let seq = self.running[i];
            let s = &self.seqs[&seq];
            let pending = s.tokens.len() - s.computed;
            if pending > 1 && !out.batch.steps.iter().any(|st| st.seq == seq) {
                let n = pending
                    .min(self.cfg.max_prefill_chunk)
                    .min(budget - used(&out));
                if self.reserve(seq, n, &mut out) {
                    self.push_step(seq, n, &mut out);
                }
            }
            if self.running.get(i) == Some(&seq) {
                i += 1;
            }
        }

        // 3. Admit waiting sequences, first come first served. Not in an iteration that had to
        // preempt: memory is short, let the running ones finish first.
        while out.preempted.is_empty()
            && used(&out) < budget
            && self.running.len() < self.cfg.max_num_seqs
        {
            let Some(&seq) = self.waiting.front() else {
                break;
            };
            let len = self.seqs[&seq].tokens.len();
            let n = len.min(self.cfg.max_prefill_chunk).min(budget - used(&out));
            // The whole sequence (plus its next token) must fit, keeping one block of head room
            // per running sequence so that their decodes can grow. (A sequence alone always
            // fits; sliding blocks are checked by `allocate_step`.)
            let layout = *self.kv.layout();
            if layout.has(Pool::Full) && !self.running.is_empty() {
                let need = layout.full_blocks_for(len + 1) + self.running.len();
                if need > self.kv.free_blocks().full {
                    break;
                }
            }
            if self.kv.allocate_step(seq, 0, n).is_err() {
                break;
            }
            self.waiting.pop_front();
            self.seqs.get_mut(&seq).expect("waiting sequence").status = SeqStatus::Running;
            self.running.push(seq);
            self.push_step(seq, n, &mut out);
        }
        out
    }

    /// Checks the block manager's invariants and that every running sequence, and only those,
    /// holds blocks.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        for &seq in &self.waiting {
            if self.kv.block_table(seq).is_some() {
                return Err(format!("waiting sequence {seq} holds blocks"));
            }
        }
        if self.kv.num_seqs() > self.running.len() {
            return Err(format!(
                "{} sequences hold blocks but {} are running",
                self.kv.num_seqs(),
                self.running.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_blocks::KvCacheConfig;
    use crate::kv_blocks::tests::layout;

    fn sched(full: usize, budget: usize, chunk: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 8,
                max_num_batched_tokens: budget,
                max_prefill_chunk: chunk,
            },
            KvBlockManager::new(KvCacheConfig::with_blocks(layout(), full, 100)),
        )
    }

    fn run(s: &mut Scheduler, sch: &Schedule) {
        for (st, &sample) in sch.batch.steps.iter().zip(&sch.samples) {
            s.step_done(st);
            if sample {
                s.append_token(st.seq, 7);
            }
        }
        s.check_invariants().unwrap();
    }

    #[test]
    fn chunked_prefill_does_not_stall_decodes() {
        let mut s = sched(100, 10, 6);
        s.add(1, vec![1; 3]);
        let a = s.schedule();
        assert_eq!(a.batch.steps.len(), 1);
        run(&mut s, &a);
        s.add(2, vec![1; 20]);
        for _ in 0..4 {
            let b = s.schedule();
            // Seq 1 decodes every step; seq 2 gets a chunk of at most 6 tokens.
            assert_eq!(b.batch.steps[0].seq, 1);
            assert_eq!(b.batch.steps[0].tokens.len(), 1);
            assert!(b.batch.steps.len() < 2 || b.batch.steps[1].tokens.len() <= 6);
            run(&mut s, &b);
        }
        assert_eq!(s.computed(2), Some(20));
    }

    #[test]
    fn preempts_newest_when_blocks_run_out() {
        // 6 full blocks of 4 tokens.
        let mut s = sched(6, 64, 64);
        s.add(1, vec![1; 7]);
        s.add(2, vec![1; 7]);
        let a = s.schedule();
        assert_eq!(a.batch.steps.len(), 2);
        run(&mut s, &a);
        let mut preempted = false;
        for _ in 0..12 {
            let b = s.schedule();
            if b.preempted.contains(&2) {
                preempted = true;
            }
            assert!(!b.preempted.contains(&1));
            run(&mut s, &b);
        }
        assert!(preempted);
        assert!(s.preemptions(2) >= 1);
        s.remove(1);
        s.remove(2);
        assert_eq!(s.kv_usage().total_used(), 0);
    }
}
