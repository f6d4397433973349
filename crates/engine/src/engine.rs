//! The serving engine: one thread that owns the [`Backend`], runs the [`Scheduler`] loop and
//! streams [`RequestEvent`]s back to whoever submitted each request.
//!
//! ```text
//!  clients (any thread)                       engine thread
//!  EngineHandle::submit ──Command::Add──▶  ┌──────────────────────────────────────┐
//!  EngineHandle::cancel ──Command::Cancel─▶ │ drain commands; drop closed sinks     │
//!                                           │ Scheduler::schedule → StepBatch       │
//!  EventSink ◀──RequestEvent──────────────  │ Backend::forward → logits / greedy ids│
//!   (one per request; a closed sink         │ Sampler + OutputProcessor per sequence│
//!    cancels the request)                   │ finished → release cache, free blocks │
//!                                           └──────────────────────────────────────┘
//! ```
//!
//! # Logits flow and the greedy fast path
//!
//! The scheduler asks for [`LogitsWanted::Last`] on every step: the logits row of the step's last
//! token (`vocab_size` f32, 201 088 for GPT-OSS), which the sequence's [`Sampler`] turns into
//! the next token. A partial prefill chunk's row is ignored (`Schedule::samples` is false).
//!
//! Many requests only ever need the arg-max of that row: temperature 0, no logprobs, no
//! penalties ([`Sampler::wants_only_argmax`]). For those, the engine rewrites the step to
//! [`LogitsWanted::LastGreedy`] before calling the backend; the backend returns no row but
//! the greedy token ([`Logits::greedy`], chosen by [`greedy_token`](crate::backend::greedy_token),
//! the same rule as the greedy [`Sampler::sample`]), and the engine records it with
//! [`Sampler::accept_greedy`]. The tokens are exactly those of the slow path. Why: a GPU
//! backend then picks the token on the device and copies back 4 bytes instead of an 800 KB row
//! per sequence (for a 32-sequence decode step, that copy was about 5 ms of 28 ms), and the
//! engine skips the host-side pass over the row. A `LastGreedy` step without a greedy token
//! (no logit above `-inf`) fails its request like a sampling error; the other sequences of the
//! batch carry on. Everything after the choice of the token (streaming, stop conditions, end
//! of the sequence) is shared by both paths.
//!
//! New requests join the running batch between iterations (continuous batching); long prompts
//! are fed in chunks; KV blocks gate admission and trigger preemption (see [`crate::scheduler`]).
//! The engine is deterministic given its inputs: a sequence's tokens depend only on its prompt,
//! its sampling parameters (and seed) and the backend's logits, never on which other sequences
//! share its batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gptoss_formats::GptOssConfig;
use gptoss_model::tokenizer::Tokenizer;

use crate::backend::{Backend, BackendError, Logits, LogitsWanted, SeqId, StepBatch};
use crate::kv_blocks::{KvBlockManager, KvCacheConfig, KvUsage};
use crate::request::{
    FinishReason, OutputProcessor, Request, RequestEvent, RequestId, TokenLogprob, Usage,
};
use crate::sampling::{Sampler, SamplingError};
use crate::scheduler::{Scheduler, SchedulerConfig};

/// Engine limits and KV capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Longest sequence (prompt + generated) in tokens.
    pub max_model_len: usize,
    /// Scheduler limits (running sequences, tokens per step, prefill chunk).
    pub scheduler: SchedulerConfig,
    /// Block pools.
    pub kv: KvCacheConfig,
}

/// Why the engine refused to start or refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A request parameter is invalid.
    #[error("{message}")]
    InvalidRequest {
        /// The offending parameter.
        param: &'static str,
        /// Human-readable message.
        message: String,
    },
    /// The engine configuration is inconsistent.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The engine thread is gone (shut down or crashed).
    #[error("the engine is not running")]
    NotRunning,
}

impl From<SamplingError> for EngineError {
    fn from(e: SamplingError) -> Self {
        match e {
            SamplingError::InvalidParameter { param, message, .. } => {
                EngineError::InvalidRequest { param, message }
            }
            other => EngineError::InvalidRequest {
                param: "sampling",
                message: other.to_string(),
            },
        }
    }
}

/// Where a request's events go. `send` returns false once nobody listens (the request is then
/// cancelled); `is_closed` lets the engine notice a departed client before it has anything to
/// send.
pub trait EventSink: Send {
    /// Delivers an event; false if the receiver is gone.
    fn send(&mut self, event: RequestEvent) -> bool;
    /// Whether the receiver is gone.
    fn is_closed(&self) -> bool {
        false
    }
}

impl EventSink for mpsc::Sender<RequestEvent> {
    fn send(&mut self, event: RequestEvent) -> bool {
        mpsc::Sender::send(self, event).is_ok()
    }
}

/// A latency histogram with fixed bucket bounds (seconds), Prometheus style.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets (the `+Inf` bucket is implicit).
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more entry than `bounds` (`+Inf`).
    pub counts: Vec<u64>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Default buckets for token latencies: 1 ms .. 60 s.
    pub fn latency() -> Self {
        let bounds = vec![
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0,
        ];
        Histogram {
            counts: vec![0; bounds.len() + 1],
            bounds,
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    /// The `q`-quantile estimated from the buckets (upper bound of the bucket it falls in).
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= target {
                return self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        f64::INFINITY
    }
}

/// A snapshot of the engine's counters and gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStats {
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Sequences running.
    pub running: usize,
    /// Requests in the engine (waiting or running).
    pub requests_in_flight: usize,
    /// KV blocks used / total per pool.
    pub kv: KvUsage,
    /// Requests accepted.
    pub requests_total: u64,
    /// Requests that finished normally.
    pub requests_finished: u64,
    /// Requests cancelled (client gone, explicit cancel, shutdown).
    pub requests_cancelled: u64,
    /// Requests that failed in the backend.
    pub requests_failed: u64,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens_total: u64,
    /// Generated tokens.
    pub generation_tokens_total: u64,
    /// Preemptions.
    pub preemptions_total: u64,
    /// Engine iterations that ran a batch.
    pub steps_total: u64,
    /// Time from arrival to a request's first generated token.
    pub time_to_first_token: Histogram,
    /// Time between consecutive tokens of a completion.
    pub inter_token_latency: Histogram,
}

impl EngineStats {
    fn new(kv: KvUsage) -> Self {
        EngineStats {
            waiting: 0,
            running: 0,
            requests_in_flight: 0,
            kv,
            requests_total: 0,
            requests_finished: 0,
            requests_cancelled: 0,
            requests_failed: 0,
            prompt_tokens_total: 0,
            generation_tokens_total: 0,
            preemptions_total: 0,
            steps_total: 0,
            time_to_first_token: Histogram::latency(),
            inter_token_latency: Histogram::latency(),
        }
    }
}

/// Facts about the loaded model and the engine limits.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The model configuration.
    pub model: GptOssConfig,
    /// The backend's name.
    pub backend: String,
    /// The engine configuration.
    pub config: EngineConfig,
}

enum Command {
    Add {
        id: RequestId,
        request: Box<Request>,
        sink: Box<dyn EventSink>,
        arrival: Instant,
    },
    Cancel(RequestId),
    AbortAll(String),
    Shutdown,
}

struct Shared {
    stats: Mutex<EngineStats>,
    running: AtomicBool,
}

/// A cheap, clonable handle to submit and cancel requests.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
    info: Arc<EngineInfo>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("backend", &self.info.backend)
            .finish()
    }
}

impl EngineHandle {
    /// The model and limits.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Checks a request against the engine's limits (also done by [`EngineHandle::submit`]).
    pub fn validate(&self, req: &Request) -> Result<(), EngineError> {
        let max_len = self.info.config.max_model_len;
        let vocab = self.info.model.vocab_size;
        let invalid = |param, message: String| Err(EngineError::InvalidRequest { param, message });
        if req.prompt.is_empty() {
            return invalid("prompt", "the prompt is empty".into());
        }
        if let Some(&t) = req
            .prompt
            .iter()
            .chain(&req.forced_prefix)
            .find(|&&t| t as usize >= vocab)
        {
            return invalid(
                "prompt",
                format!("token id {t} is out of range (vocabulary size {vocab})"),
            );
        }
        let plen = req.full_prompt_len();
        if plen >= max_len {
            return invalid(
                "messages",
                format!(
                    "This model's maximum context length is {max_len} tokens. However, your \
                     prompt has {plen} tokens, which leaves no room for a completion."
                ),
            );
        }
        if req.max_tokens == 0 {
            return invalid("max_tokens", "max_tokens must be at least 1".into());
        }
        if req.n == 0 {
            return invalid("n", "n must be at least 1".into());
        }
        if req.n > self.info.config.scheduler.max_num_seqs {
            return invalid(
                "n",
                format!(
                    "n = {} is more than the engine runs at once (max_num_seqs = {})",
                    req.n, self.info.config.scheduler.max_num_seqs
                ),
            );
        }
        req.sampling.validate()?;
        Ok(())
    }

    /// Submits a request; its events go to `sink`. Returns its id (for [`EngineHandle::cancel`]).
    pub fn submit(
        &self,
        request: Request,
        sink: Box<dyn EventSink>,
    ) -> Result<RequestId, EngineError> {
        self.validate(&request)?;
        if !self.shared.running.load(Ordering::SeqCst) {
            return Err(EngineError::NotRunning);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Command::Add {
                id,
                request: Box::new(request),
                sink,
                arrival: Instant::now(),
            })
            .map_err(|_| EngineError::NotRunning)?;
        Ok(id)
    }

    /// Submits and returns a receiver of the events.
    pub fn submit_channel(
        &self,
        request: Request,
    ) -> Result<(RequestId, mpsc::Receiver<RequestEvent>), EngineError> {
        let (tx, rx) = mpsc::channel();
        let id = self.submit(request, Box::new(tx))?;
        Ok((id, rx))
    }

    /// Cancels a request: no more events; its blocks and caches are freed at once. Unknown or
    /// finished ids are ignored.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    /// Ends every request in flight with an [`RequestEvent::Error`] carrying `message`.
    pub fn abort_all(&self, message: impl Into<String>) {
        let _ = self.tx.send(Command::AbortAll(message.into()));
    }

    /// Whether the engine thread is running.
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().expect("stats lock").clone()
    }
}

/// The engine: its thread and a handle.
pub struct Engine {
    handle: EngineHandle,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("handle", &self.handle)
            .finish()
    }
}

impl Engine {
    /// Starts the engine thread over `backend`. Fails when the configuration cannot serve one
    /// sequence of `max_model_len` tokens.
    pub fn start(
        backend: Box<dyn Backend>,
        tokenizer: Tokenizer,
        mut config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let model = backend.config().clone();
        config.scheduler.max_num_batched_tokens = config
            .scheduler
            .max_num_batched_tokens
            .min(backend.max_batch_tokens())
            .max(1);
        config.scheduler.max_prefill_chunk = config
            .scheduler
            .max_prefill_chunk
            .min(config.scheduler.max_num_batched_tokens)
            .max(1);
        if config.max_model_len < 2 {
            return Err(EngineError::Config(
                "max_model_len must be at least 2".into(),
            ));
        }
        config
            .kv
            .check_fits(config.max_model_len, config.scheduler.max_prefill_chunk)
            .map_err(EngineError::Config)?;
        let info = Arc::new(EngineInfo {
            model,
            backend: backend.name().to_string(),
            config,
        });
        let kv = KvBlockManager::new(config.kv);
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats::new(kv.usage())),
            running: AtomicBool::new(true),
        });
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(config.scheduler, kv);
        let mut worker = Worker {
            backend,
            tokenizer,
            scheduler,
            rx,
            shared: Arc::clone(&shared),
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            max_model_len: config.max_model_len,
            stats_delta: StatsDelta::default(),
        };
        let thread = std::thread::Builder::new()
            .name("gptoss-engine".into())
            .spawn(move || {
                worker.run();
                worker.shared.running.store(false, Ordering::SeqCst);
            })
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            handle: EngineHandle {
                tx,
                shared,
                next_id: Arc::new(AtomicU64::new(1)),
                info,
            },
            thread: Some(thread),
        })
    }

    /// A handle for submitting requests.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Stops the engine: requests in flight end with an error event; waits for the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.handle.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.handle.shared.running.store(false, Ordering::SeqCst);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

struct ReqState {
    sink: Box<dyn EventSink>,
    seqs: Vec<SeqId>,
    unfinished: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    arrival: Instant,
    first_token: bool,
}

struct SeqState {
    request: RequestId,
    choice: usize,
    sampler: Sampler,
    output: OutputProcessor,
    generated: usize,
    max_tokens: usize,
    last_token_at: Option<Instant>,
}

#[derive(Default)]
struct StatsDelta {
    requests_total: u64,
    requests_finished: u64,
    requests_cancelled: u64,
    requests_failed: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
    steps: u64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

struct Worker {
    backend: Box<dyn Backend>,
    tokenizer: Tokenizer,
    scheduler: Scheduler,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    requests: HashMap<RequestId, ReqState>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: SeqId,
    max_model_len: usize,
    stats_delta: StatsDelta,
}

/// How a request leaves the engine.
enum End {
    Cancelled,
    Failed(String),
}

/// What the backend returned for one step of a batch.
enum StepOut {
    /// The logits rows the step asked for (`Last`: one row; `All`: one per token).
    Rows(Vec<f32>),
    /// A `LastGreedy` step: the greedy token of its last row (`None`: no logit above `-inf`).
    Greedy(Option<u32>),
}

impl StepOut {
    /// Splits a batch's logits by step, according to what each step of `batch` asked for. A
    /// `LastGreedy` step that came back with a row and no greedy token (a backend that served
    /// it like `Last`) is sampled from its row, which picks the same token.
    fn split(batch: &StepBatch, logits: Logits) -> Vec<StepOut> {
        let (rows, greedy) = logits.into_parts();
        batch
            .steps
            .iter()
            .zip(rows.into_iter().zip(greedy))
            .map(|(step, (rows, greedy))| match step.want_logits {
                LogitsWanted::LastGreedy if greedy.is_some() || rows.is_empty() => {
                    StepOut::Greedy(greedy)
                }
                LogitsWanted::LastGreedy | LogitsWanted::Last | LogitsWanted::All => {
                    StepOut::Rows(rows)
                }
            })
            .collect()
    }
}

/// How the next token of a sequence is chosen.
enum Pick<'a> {
    /// Sample the sequence's last logits row.
    Row(&'a [f32]),
    /// Take the backend's greedy token.
    Greedy(Option<u32>),
}

impl Worker {
    fn run(&mut self) {
        loop {
            // Block only when there is nothing to do.
            if self.scheduler.is_idle() {
                self.publish_stats();
                match self.rx.recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.abort_all("the engine is shutting down");
                        return;
                    }
                }
            }
            // Clients that went away.
            let gone: Vec<RequestId> = self
                .requests
                .iter()
                .filter(|(_, r)| r.sink.is_closed())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                self.end_request(id, End::Cancelled);
            }
            self.iteration();
            self.publish_stats();
        }
    }

    /// Handles a command; false to stop the loop.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add {
                id,
                request,
                sink,
                arrival,
            } => self.add(id, *request, sink, arrival),
            Command::Cancel(id) => self.end_request(id, End::Cancelled),
            Command::AbortAll(message) => self.abort_all(&message),
            Command::Shutdown => {
                self.abort_all("the server is shutting down");
                return false;
            }
        }
        true
    }

    fn abort_all(&mut self, message: &str) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.end_request(id, End::Failed(message.to_string()));
        }
        self.publish_stats();
    }

    fn add(&mut self, id: RequestId, req: Request, mut sink: Box<dyn EventSink>, arrival: Instant) {
        let mut prompt = req.prompt.clone();
        prompt.extend_from_slice(&req.forced_prefix);
        let room = self.max_model_len.saturating_sub(prompt.len());
        let max_tokens = req.max_tokens.min(room);
        let mut seqs = Vec::with_capacity(req.n);
        let mut states = Vec::with_capacity(req.n);
        for choice in 0..req.n {
            let mut params = req.sampling.clone();
            if let Some(seed) = params.seed {
                params.seed = Some(seed.wrapping_add(choice as u64));
            }
            let sampler = match Sampler::new(params) {
                Ok(s) => s.with_prompt_tokens(&prompt),
                Err(e) => {
                    sink.send(RequestEvent::Error {
                        message: e.to_string(),
                    });
                    return;
                }
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            seqs.push(seq);
            states.push(SeqState {
                request: id,
                choice,
                sampler,
                output: OutputProcessor::new(&req, &self.tokenizer),
                generated: 0,
                max_tokens,
                last_token_at: None,
            });
        }
        for (seq, st) in seqs.iter().zip(states) {
            self.scheduler.add(*seq, prompt.clone());
            self.seqs.insert(*seq, st);
        }
        self.stats_delta.requests_total += 1;
        self.stats_delta.prompt_tokens += prompt.len() as u64;
        self.requests.insert(
            id,
            ReqState {
                sink,
                unfinished: seqs.len(),
                seqs,
                prompt_tokens: prompt.len(),
                completion_tokens: 0,
                arrival,
                first_token: false,
            },
        );
    }

    /// Removes a sequence from the scheduler and the backend.
    fn drop_seq(&mut self, seq: SeqId) {
        if self.scheduler.remove(seq) {
            self.backend.release(seq);
        }
        self.seqs.remove(&seq);
    }

    fn end_request(&mut self, id: RequestId, how: End) {
        let Some(mut r) = self.requests.remove(&id) else {
            return;
        };
        for &seq in &r.seqs {
            if self.scheduler.remove(seq) {
                self.backend.release(seq);
            }
            self.seqs.remove(&seq);
        }
        match how {
            End::Cancelled => self.stats_delta.requests_cancelled += 1,
            End::Failed(message) => {
                self.stats_delta.requests_failed += 1;
                r.sink.send(RequestEvent::Error { message });
            }
        }
    }

    /// Runs the batch; on failure, runs each step alone to find the culprit(s), which fail. A
    /// panicking backend fails every request of the batch (their caches are released, since
    /// the backend may have been interrupted half-way) but does not take the engine down.
    /// Returns one entry per step: `None` for a step that failed.
    fn forward(&mut self, batch: &StepBatch) -> Vec<Option<StepOut>> {
        match self.guarded_forward(batch) {
            Ok(l) => StepOut::split(batch, l).into_iter().map(Some).collect(),
            Err((e, true)) => {
                for st in &batch.steps {
                    self.fail_seq(st.seq, &e);
                }
                (0..batch.steps.len()).map(|_| None).collect()
            }
            Err((e, false)) if batch.steps.len() == 1 => {
                self.fail_seq(batch.steps[0].seq, &e);
                vec![None]
            }
            Err(_) => batch
                .steps
                .iter()
                .map(|st| {
                    let one = StepBatch {
                        steps: vec![st.clone()],
                    };
                    match self.guarded_forward(&one) {
                        Ok(l) => StepOut::split(&one, l).pop(),
                        Err((e, _)) => {
                            self.fail_seq(st.seq, &e);
                            None
                        }
                    }
                })
                .collect(),
        }
    }

    /// `Backend::forward`, with a panic turned into an error (flagged `true`).
    fn guarded_forward(&mut self, batch: &StepBatch) -> Result<Logits, (BackendError, bool)> {
        let backend = &mut self.backend;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.forward(batch))) {
            Ok(r) => r.map_err(|e| (e, false)),
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err((
                    BackendError::Failed(format!("the backend panicked: {msg}")),
                    true,
                ))
            }
        }
    }

    fn fail_seq(&mut self, seq: SeqId, e: &BackendError) {
        if let Some(st) = self.seqs.get(&seq) {
            let id = st.request;
            self.end_request(id, End::Failed(format!("generation failed: {e}")));
        }
    }

    fn iteration(&mut self) {
        let mut sched = self.scheduler.schedule();
        for &p in &sched.preempted {
            self.backend.release(p);
        }
        if sched.is_empty() {
            if !self.scheduler.is_idle() {
                // Nothing schedulable (cannot happen with a valid configuration); do not spin.
                std::thread::sleep(Duration::from_millis(1));
            }
            return;
        }
        // The greedy fast path: a step whose token only needs the arg-max asks for it instead
        // of a logits row (see the module docs).
        for (step, &sample) in sched.batch.steps.iter_mut().zip(&sched.samples) {
            if sample
                && step.want_logits == LogitsWanted::Last
                && self
                    .seqs
                    .get(&step.seq)
                    .is_some_and(|st| st.sampler.wants_only_argmax())
            {
                step.want_logits = LogitsWanted::LastGreedy;
            }
        }
        self.stats_delta.steps += 1;
        let results = self.forward(&sched.batch);
        let now = Instant::now();
        let vocab = self.backend.config().vocab_size;
        for ((step, &sample), out) in sched.batch.steps.iter().zip(&sched.samples).zip(results) {
            let Some(out) = out else { continue };
            if !self.seqs.contains_key(&step.seq) {
                continue; // its request failed during this iteration
            }
            self.scheduler.step_done(step);
            if !sample {
                continue;
            }
            let pick = match &out {
                // The last row (none if the backend returned less than a row: `sample` fails).
                StepOut::Rows(rows) => Pick::Row(
                    rows.get(rows.len().saturating_sub(vocab)..)
                        .filter(|r| r.len() == vocab)
                        .unwrap_or_default(),
                ),
                StepOut::Greedy(id) => Pick::Greedy(*id),
            };
            self.sample(step.seq, pick, now);
        }
    }

    /// Chooses the next token of `seq` (samples its logits row, or takes the backend's greedy
    /// token), then streams it and handles the end of the sequence. A sampling error (no usable
    /// logit) fails the request.
    fn sample(&mut self, seq: SeqId, pick: Pick<'_>, now: Instant) {
        let vocab = self.backend.config().vocab_size;
        let Some(st) = self.seqs.get_mut(&seq) else {
            return;
        };
        let tok = match pick {
            Pick::Row(row) => st.sampler.sample(row).map_err(|e| e.to_string()),
            Pick::Greedy(Some(id)) if (id as usize) < vocab => Ok(st.sampler.accept_greedy(id)),
            Pick::Greedy(Some(id)) => Err(format!(
                "the backend's greedy token {id} is outside the vocabulary of {vocab}"
            )),
            Pick::Greedy(None) => Err(SamplingError::NoFiniteLogits { vocab }.to_string()),
        };
        let tok = match tok {
            Ok(t) => t,
            Err(e) => {
                let id = st.request;
                self.end_request(id, End::Failed(format!("sampling failed: {e}")));
                return;
            }
        };
        st.generated += 1;
        let choice = st.choice;
        let request = st.request;
        if let Some(prev) = st.last_token_at {
            self.stats_delta
                .itl
                .push(now.duration_since(prev).as_secs_f64());
        }
        st.last_token_at = Some(now);
        let processed = st.output.push(tok.id);
        let logprob = st.sampler.params().logprobs.map(|_| TokenLogprob {
            logprob: tok.logprob,
            top: tok.top_logprobs.clone(),
        });
        let total_len = self.scheduler.tokens(seq).map_or(0, <[u32]>::len) + 1;
        let mut finish = processed.finish.clone();
        if finish.is_none() && (st.generated >= st.max_tokens || total_len >= self.max_model_len) {
            finish = Some((FinishReason::Length, None));
        }
        let generated = st.generated;
        let mut final_deltas = Vec::new();
        if let Some((FinishReason::Length, _)) = finish {
            final_deltas = st.output.finish();
        }
        self.stats_delta.generation_tokens += 1;
        let Some(r) = self.requests.get_mut(&request) else {
            return;
        };
        r.completion_tokens += 1;
        if !r.first_token {
            r.first_token = true;
            self.stats_delta
                .ttft
                .push(now.duration_since(r.arrival).as_secs_f64());
        }
        let mut alive = r.sink.send(RequestEvent::Token {
            choice,
            token: tok.id,
            kind: processed.kind,
            logprob,
            deltas: processed.deltas,
        });
        match finish {
            None => self.scheduler.append_token(seq, tok.id),
            Some((reason, stop)) => {
                alive &= r.sink.send(RequestEvent::Finished {
                    choice,
                    reason,
                    stop,
                    deltas: final_deltas,
                    completion_tokens: generated,
                });
                r.unfinished -= 1;
                let done = r.unfinished == 0;
                self.drop_seq(seq);
                if done {
                    let mut r = self.requests.remove(&request).expect("request");
                    let usage = Usage {
                        prompt_tokens: r.prompt_tokens,
                        completion_tokens: r.completion_tokens,
                    };
                    self.stats_delta.requests_finished += 1;
                    // Counters first: whoever sees `Done` sees its request counted and its
                    // blocks freed.
                    self.publish_stats();
                    r.sink.send(RequestEvent::Done { usage });
                    return;
                }
            }
        }
        if !alive {
            self.end_request(request, End::Cancelled);
        }
    }

    fn publish_stats(&mut self) {
        let d = std::mem::take(&mut self.stats_delta);
        let mut s = self.shared.stats.lock().expect("stats lock");
        s.waiting = self.scheduler.num_waiting();
        s.running = self.scheduler.num_running();
        s.requests_in_flight = self.requests.len();
        s.kv = self.scheduler.kv_usage();
        s.preemptions_total = self.scheduler.preemptions_total();
        s.requests_total += d.requests_total;
        s.requests_finished += d.requests_finished;
        s.requests_cancelled += d.requests_cancelled;
        s.requests_failed += d.requests_failed;
        s.prompt_tokens_total += d.prompt_tokens;
        s.generation_tokens_total += d.generation_tokens;
        s.steps_total += d.steps;
        for v in d.ttft {
            s.time_to_first_token.observe(v);
        }
        for v in d.itl {
            s.inter_token_latency.observe(v);
        }
    }
}
