//! Engine and scheduler behaviour over the CPU backend with the tiny random-weight model, and
//! over small fake backends: continuous batching determinism, chunked prefill, preemption by
//! recompute, cancellation, stop conditions, `n > 1`, Harmony output, failure isolation, the
//! greedy fast path (`LogitsWanted::LastGreedy`).

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gptoss_engine::backend::{
    Backend, BackendError, Logits, LogitsWanted, SeqId, SeqStep, StepBatch, check_start_positions,
};
use gptoss_engine::cpu::CpuBackend;
use gptoss_engine::engine::{Engine, EngineConfig, EngineHandle};
use gptoss_engine::kv_blocks::{KvCacheConfig, KvLayout};
use gptoss_engine::request::{Delta, FinishReason, Request, RequestEvent, TokenKind};
use gptoss_engine::sampling::{Sampler, SamplingParams};
use gptoss_engine::scheduler::SchedulerConfig;
use gptoss_engine::stop::StopReason;
use gptoss_formats::GptOssConfig;
use gptoss_formats::synth::{Preset, SynthLayout, synth_config_json, tiny_model_in};
use gptoss_model::tokenizer::Tokenizer;

/// The tiny model, synthesised once under the cargo target's test scratch folder and reused by
/// later runs (written to a temporary folder and renamed, so parallel binaries are safe).
fn tiny_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tiny_model_in(Path::new(env!("CARGO_TARGET_TMPDIR")), "tiny-nf4-seed0-v1").unwrap()
    })
}

fn tokenizer() -> Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::embedded().unwrap()).clone()
}

fn tiny_config() -> GptOssConfig {
    let text =
        serde_json::to_string(&synth_config_json(Preset::Tiny, SynthLayout::UnslothNf4)).unwrap();
    GptOssConfig::from_json_str(&text).unwrap()
}

fn engine_config(cfg: &GptOssConfig, full_blocks: usize, sched: SchedulerConfig) -> EngineConfig {
    let layout = KvLayout::from_config(cfg, 16, 4);
    EngineConfig {
        max_model_len: (full_blocks * 16).min(512),
        scheduler: sched,
        kv: KvCacheConfig::with_blocks(layout, full_blocks, 64 * 10 + 64),
    }
}

fn cpu_engine(full_blocks: usize, sched: SchedulerConfig) -> Engine {
    let backend = CpuBackend::open(tiny_dir()).unwrap();
    let cfg = engine_config(&tiny_config(), full_blocks, sched);
    Engine::start(Box::new(backend), tokenizer(), cfg).unwrap()
}

fn sched(max_num_seqs: usize, budget: usize, chunk: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: budget,
        max_prefill_chunk: chunk,
    }
}

/// What one completion produced.
#[derive(Debug, Default, Clone, PartialEq)]
struct Completion {
    tokens: Vec<u32>,
    text: String,
    reasoning: String,
    tool_args: String,
    tool_names: Vec<String>,
    finish: Option<FinishReason>,
    stop: Option<StopReason>,
    completion_tokens: usize,
}

/// Collects every event of a request: completions by choice, and the usage.
/// `bad` ends with the poisoned backend's error; each of `good` completes with tokens 10..=17.
fn expect_poisoned_error_and_good_tokens(
    bad: &Receiver<RequestEvent>,
    good: &[Receiver<RequestEvent>],
) {
    match bad.recv_timeout(Duration::from_secs(10)).unwrap() {
        RequestEvent::Error { message } => assert!(message.contains("poisoned"), "{message}"),
        other => panic!("{other:?}"),
    }
    for rx in good {
        let (c, _) = collect(rx, 1);
        assert_eq!(c[0].tokens, [10, 11, 12, 13, 14, 15, 16, 17]);
    }
}

fn collect(
    rx: &Receiver<RequestEvent>,
    n: usize,
) -> (Vec<Completion>, gptoss_engine::request::Usage) {
    let mut out = vec![Completion::default(); n];
    let add = |c: &mut Completion, deltas: Vec<Delta>| {
        for d in deltas {
            match d {
                Delta::Text(s) | Delta::Content(s) => c.text.push_str(&s),
                Delta::Reasoning(s) => c.reasoning.push_str(&s),
                Delta::ToolCallStart { name, .. } => c.tool_names.push(name),
                Delta::ToolCallArguments { arguments, .. } => c.tool_args.push_str(&arguments),
            }
        }
    };
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).expect("event") {
            RequestEvent::Token {
                choice,
                token,
                deltas,
                ..
            } => {
                out[choice].tokens.push(token);
                add(&mut out[choice], deltas);
            }
            RequestEvent::Finished {
                choice,
                reason,
                stop,
                deltas,
                completion_tokens,
            } => {
                add(&mut out[choice], deltas);
                out[choice].finish = Some(reason);
                out[choice].stop = stop;
                out[choice].completion_tokens = completion_tokens;
            }
            RequestEvent::Done { usage } => return (out, usage),
            RequestEvent::Error { message } => panic!("request failed: {message}"),
        }
    }
}

fn wait_idle(h: &EngineHandle) {
    let t0 = Instant::now();
    loop {
        let s = h.stats();
        if s.requests_in_flight == 0 && s.kv.total_used() == 0 && s.running == 0 && s.waiting == 0 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "engine never went idle: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    let mut r = Request::new(prompt);
    r.sampling = SamplingParams::greedy();
    r.max_tokens = max_tokens;
    r
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| {
            (seed
                .wrapping_mul(7919)
                .wrapping_add(i.wrapping_mul(104_729)))
                % 199_000
        })
        .collect()
}

#[test]
fn greedy_is_identical_alone_and_among_sixteen_others() {
    let engine = cpu_engine(4096, sched(32, 64, 16));
    let h = engine.handle();
    // A prompt longer than a prefill chunk.
    let target = greedy(prompt(1, 40), 24);

    let t0 = Instant::now();
    let (_, rx) = h.submit_channel(target.clone()).unwrap();
    let (alone, usage) = collect(&rx, 1);
    let alone_time = t0.elapsed();
    assert_eq!(alone[0].tokens.len(), 24);
    assert_eq!(usage.completion_tokens, 24);
    assert_eq!(usage.prompt_tokens, 40);
    wait_idle(&h);

    // Again, with 16 others joining and leaving at different steps: 8 before it (different
    // prompt lengths, some sampled), 8 more while it runs, each with its own max_tokens.
    let t1 = Instant::now();
    let mut others = Vec::new();
    for i in 0..8u32 {
        let mut r = greedy(prompt(100 + i, 5 + 9 * i as usize), 3 + 4 * i as usize);
        if i % 2 == 1 {
            r.sampling = SamplingParams {
                temperature: 0.9,
                seed: Some(i as u64),
                ..Default::default()
            };
        }
        others.push(h.submit_channel(r).unwrap().1);
    }
    let (_, rx) = h.submit_channel(target.clone()).unwrap();
    // Join the rest after the target has produced some tokens, one by one.
    let mut mixed = Vec::new();
    let mut late = 0u32;
    let mut first_deltas = Vec::new();
    while late < 8 {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            RequestEvent::Token { token, .. } => {
                mixed.push(token);
                if mixed.len() % 2 == 0 {
                    let r = greedy(
                        prompt(200 + late, 3 + 13 * late as usize),
                        2 + 3 * late as usize,
                    );
                    others.push(h.submit_channel(r).unwrap().1);
                    late += 1;
                }
            }
            other => first_deltas.push(other),
        }
    }
    let (rest, _) = collect(&rx, 1);
    mixed.extend(rest[0].tokens.iter());
    assert_eq!(mixed, alone[0].tokens, "greedy tokens changed when batched");
    for rx in &others {
        let (c, _) = collect(rx, 1);
        assert!(!c[0].tokens.is_empty());
    }
    let mixed_time = t1.elapsed();
    wait_idle(&h);
    let s = h.stats();
    assert_eq!(s.requests_finished, 18);
    eprintln!(
        "alone: {alone_time:?}; with 16 others: {mixed_time:?}; steps {}; ttft p50 {:.3}s",
        s.steps_total,
        s.time_to_first_token.quantile(0.5)
    );
}

#[test]
fn preemption_recomputes_identically_and_frees_everything() {
    // Reference outputs: all at once with plenty of blocks (batching does not change greedy
    // tokens, see above), so no preemption.
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| prompt(300 + i, 20 + 7 * i as usize))
        .collect();
    let reference: Vec<Vec<u32>> = {
        let engine = cpu_engine(4096, sched(8, 256, 256));
        let h = engine.handle();
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| h.submit_channel(greedy(p.clone(), 30)).unwrap().1)
            .collect();
        let out = rxs
            .iter()
            .map(|rx| collect(rx, 1).0[0].tokens.clone())
            .collect();
        assert_eq!(h.stats().preemptions_total, 0);
        out
    };
    // Now all at once with only 16 full blocks (256 tokens) for 6 sequences growing to 50-85
    // tokens: admission control queues some and decodes run out of blocks, forcing
    // preemptions.
    let engine = cpu_engine(16, sched(8, 64, 32));
    let h = engine.handle();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| h.submit_channel(greedy(p.clone(), 30)).unwrap().1)
        .collect();
    for (rx, want) in rxs.iter().zip(&reference) {
        let (c, usage) = collect(rx, 1);
        assert_eq!(&c[0].tokens, want);
        assert_eq!(usage.completion_tokens, 30);
    }
    wait_idle(&h);
    let s = h.stats();
    assert!(s.preemptions_total > 0, "expected preemptions: {s:?}");
    assert_eq!(s.kv.total_used(), 0);
}

#[test]
fn cancellation_and_departed_clients_free_blocks_at_once() {
    let engine = cpu_engine(4096, sched(16, 64, 16));
    let h = engine.handle();
    let (id, rx) = h.submit_channel(greedy(prompt(7, 30), 400)).unwrap();
    // Wait until it generates, then cancel.
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        RequestEvent::Token { .. }
    ));
    assert!(h.stats().kv.total_used() > 0);
    h.cancel(id);
    wait_idle(&h);
    // A client that drops its receiver: noticed at its next token.
    let (_, rx) = h.submit_channel(greedy(prompt(8, 30), 400)).unwrap();
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        RequestEvent::Token { .. }
    ));
    drop(rx);
    wait_idle(&h);
    let s = h.stats();
    assert_eq!(s.requests_cancelled, 2);
    assert_eq!(s.kv.total_used(), 0);
    // The engine still serves.
    let (_, rx) = h.submit_channel(greedy(prompt(9, 5), 3)).unwrap();
    assert_eq!(collect(&rx, 1).0[0].tokens.len(), 3);
}

#[test]
fn n_completions_share_a_prompt_and_follow_their_seeds() {
    let engine = cpu_engine(4096, sched(16, 128, 64));
    let h = engine.handle();
    let p = prompt(11, 12);
    let mut r = Request::new(p.clone());
    r.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(42),
        logprobs: Some(3),
        ..Default::default()
    };
    r.max_tokens = 8;
    r.n = 3;
    let (_, rx) = h.submit_channel(r.clone()).unwrap();
    let (choices, usage) = collect(&rx, 3);
    assert_eq!(
        usage.completion_tokens,
        choices.iter().map(|c| c.tokens.len()).sum::<usize>()
    );
    assert_eq!(usage.prompt_tokens, 12);
    for (i, c) in choices.iter().enumerate() {
        let mut one = r.clone();
        one.n = 1;
        one.sampling.seed = Some(42 + i as u64);
        let (_, rx) = h.submit_channel(one).unwrap();
        let (alone, _) = collect(&rx, 1);
        assert_eq!(alone[0].tokens, c.tokens, "choice {i}");
        assert_eq!(c.completion_tokens, c.tokens.len());
    }
}

#[test]
fn stop_strings_stop_tokens_and_length() {
    let engine = cpu_engine(4096, sched(16, 128, 64));
    let h = engine.handle();
    let tok = tokenizer();
    // Find what the model says greedily, then stop on a piece of it.
    let (_, rx) = h.submit_channel(greedy(prompt(21, 10), 12)).unwrap();
    let (base, _) = collect(&rx, 1);
    assert_eq!(base[0].finish, Some(FinishReason::Length));
    let text = &base[0].text;
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "{text:?}");
    let stop: String = chars[3..6].iter().collect();
    let mut r = greedy(prompt(21, 10), 12);
    r.stop = vec![stop.clone()];
    let (_, rx) = h.submit_channel(r).unwrap();
    let (c, usage) = collect(&rx, 1);
    assert_eq!(c[0].finish, Some(FinishReason::Stop));
    assert_eq!(c[0].stop, Some(StopReason::String(stop.clone())));
    let cut = text.find(&stop).unwrap();
    assert_eq!(c[0].text, text[..cut]);
    assert_eq!(usage.completion_tokens, c[0].tokens.len());
    assert!(c[0].tokens.len() < 12);

    // A stop token: the third generated token.
    let third = base[0].tokens[2];
    let mut r = greedy(prompt(21, 10), 12);
    r.stop_token_ids = vec![third];
    let (_, rx) = h.submit_channel(r).unwrap();
    let (c, _) = collect(&rx, 1);
    let first = base[0].tokens.iter().position(|&t| t == third).unwrap();
    assert_eq!(c[0].tokens.len(), first + 1);
    assert_eq!(c[0].stop, Some(StopReason::Token(third)));
    assert_eq!(c[0].text, tok.decode(&base[0].tokens[..first]));

    // Context length: prompt 500 of max_model_len 512 → at most 12 tokens.
    let (_, rx) = h.submit_channel(greedy(prompt(22, 500), 100)).unwrap();
    let (c, _) = collect(&rx, 1);
    assert_eq!(c[0].tokens.len(), 12);
    assert_eq!(c[0].finish, Some(FinishReason::Length));

    // Bad requests are refused up front.
    assert!(h.submit_channel(greedy(prompt(23, 512), 1)).is_err());
    assert!(h.submit_channel(greedy(Vec::new(), 1)).is_err());
    assert!(h.submit_channel(greedy(vec![300_000], 1)).is_err());
    assert!(h.submit_channel(greedy(vec![1], 0)).is_err());
    let mut r = greedy(vec![1], 1);
    r.sampling.temperature = 3.0;
    assert!(h.submit_channel(r).is_err());
}

/// A prompt token that makes [`Scripted`] panic.
const PANIC_TOKEN: u32 = 4242;

/// A prompt token after which [`Scripted`] has no usable logit: rows of `-inf`, and no greedy
/// token for `LastGreedy` steps.
const NO_ARGMAX_TOKEN: u32 = 4343;

// ---- Fake backends ----------------------------------------------------------------------------

/// A backend that emits a fixed continuation after the prompt (the scripted tokens, then
/// `<|return|>` forever), checks the position contract, and fails any step containing
/// `poison`.
struct Scripted {
    cfg: GptOssConfig,
    script: Vec<u32>,
    prompt_len: usize,
    seqs: std::collections::HashMap<SeqId, usize>,
    /// Sequences that were fed [`NO_ARGMAX_TOKEN`].
    no_argmax: std::collections::HashSet<SeqId>,
    poison: u32,
    live: Arc<Mutex<usize>>,
}

impl Backend for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn config(&self) -> &GptOssConfig {
        &self.cfg
    }
    fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError> {
        check_start_positions(batch, |seq| self.seqs.get(&seq).copied().unwrap_or(0))?;
        for s in &batch.steps {
            if s.tokens.contains(&self.poison) {
                return Err(BackendError::InvalidInput("poisoned".into()));
            }
            if s.tokens.contains(&PANIC_TOKEN) {
                panic!("scripted backend told to panic");
            }
        }
        let vocab = self.cfg.vocab_size;
        let mut rows = Vec::new();
        let mut greedy = Vec::new();
        for s in &batch.steps {
            let len = s.start_pos + s.tokens.len();
            self.seqs.insert(s.seq, len);
            if s.tokens.contains(&NO_ARGMAX_TOKEN) {
                self.no_argmax.insert(s.seq);
            }
            let k = len - self.prompt_len.min(len);
            let next = self.script.get(k).copied().unwrap_or(200_002);
            let usable = !self.no_argmax.contains(&s.seq);
            if s.want_logits == LogitsWanted::LastGreedy {
                rows.push(Vec::new());
                greedy.push(usable.then_some(next));
            } else {
                let mut row = vec![if usable { 0.0 } else { f32::NEG_INFINITY }; vocab];
                if usable {
                    row[next as usize] = 30.0;
                }
                rows.push(row);
                greedy.push(None);
            }
        }
        *self.live.lock().unwrap() = self.seqs.len();
        Ok(Logits::with_greedy(vocab, rows, greedy))
    }
    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
        self.no_argmax.remove(&seq);
        *self.live.lock().unwrap() = self.seqs.len();
    }
    fn max_batch_tokens(&self) -> usize {
        4096
    }
}

fn scripted_engine(
    script: Vec<u32>,
    prompt_len: usize,
    poison: u32,
) -> (Engine, Arc<Mutex<usize>>) {
    let (engine, live, _) = recorded_scripted_engine(script, prompt_len, poison);
    (engine, live)
}

/// [`scripted_engine`], recording the steps its backend ran.
fn recorded_scripted_engine(
    script: Vec<u32>,
    prompt_len: usize,
    poison: u32,
) -> (Engine, Arc<Mutex<usize>>, Seen) {
    let live = Arc::new(Mutex::new(0));
    let cfg = tiny_config();
    let backend = Scripted {
        cfg: cfg.clone(),
        script,
        prompt_len,
        seqs: Default::default(),
        no_argmax: Default::default(),
        poison,
        live: Arc::clone(&live),
    };
    let seen = Seen::default();
    let backend = Recording::new(Box::new(backend), &seen);
    let ec = engine_config(&cfg, 1024, sched(16, 256, 64));
    (
        Engine::start(Box::new(backend), tokenizer(), ec).unwrap(),
        live,
        seen,
    )
}

/// A step a backend ran: the first prompt token of its sequence (which tells the tests'
/// requests apart), what it wanted, and the sequence's length after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeenStep {
    first: u32,
    want: LogitsWanted,
    end: usize,
}

type Seen = Arc<Mutex<Vec<SeenStep>>>;

/// Wraps a backend and records the steps of every batch it ran successfully.
struct Recording {
    inner: Box<dyn Backend>,
    first: std::collections::HashMap<SeqId, u32>,
    seen: Seen,
}

impl Recording {
    fn new(inner: Box<dyn Backend>, seen: &Seen) -> Self {
        Recording {
            inner,
            first: Default::default(),
            seen: Arc::clone(seen),
        }
    }

    /// The steps seen for the sequences whose prompt starts with `first`.
    fn steps_of(seen: &Seen, first: u32) -> Vec<SeenStep> {
        let seen = seen.lock().unwrap();
        seen.iter().copied().filter(|s| s.first == first).collect()
    }
}

impl Backend for Recording {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn config(&self) -> &GptOssConfig {
        self.inner.config()
    }
    fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError> {
        let out = self.inner.forward(batch)?;
        let mut seen = self.seen.lock().unwrap();
        for s in &batch.steps {
            if s.start_pos == 0 {
                self.first.insert(s.seq, s.tokens[0]);
            }
            seen.push(SeenStep {
                first: self.first[&s.seq],
                want: s.want_logits,
                end: s.start_pos + s.tokens.len(),
            });
        }
        Ok(out)
    }
    fn release(&mut self, seq: SeqId) {
        self.first.remove(&seq);
        self.inner.release(seq)
    }
    fn max_batch_tokens(&self) -> usize {
        self.inner.max_batch_tokens()
    }
}

/// The greedy tokens of `prompt` the way the engine chose them before the fast path: the last
/// logits row of each step, sampled by a greedy [`Sampler`].
fn greedy_reference(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut b = CpuBackend::open(tiny_dir()).unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy())
        .unwrap()
        .with_prompt_tokens(prompt);
    let (mut feed, mut pos, mut out) = (prompt.to_vec(), 0, Vec::new());
    while out.len() < n {
        let step = SeqStep {
            seq: 0,
            tokens: feed.clone(),
            start_pos: pos,
            want_logits: LogitsWanted::Last,
        };
        let logits = b.forward(&StepBatch { steps: vec![step] }).unwrap();
        let t = sampler.sample(logits.last(0)).unwrap().id;
        pos += feed.len();
        feed = vec![t];
        out.push(t);
    }
    out
}

#[test]
fn greedy_requests_take_the_argmax_path_with_unchanged_tokens() {
    let seen = Seen::default();
    let backend = Recording::new(Box::new(CpuBackend::open(tiny_dir()).unwrap()), &seen);
    let cfg = engine_config(&tiny_config(), 4096, sched(8, 64, 16));
    let engine = Engine::start(Box::new(backend), tokenizer(), cfg).unwrap();
    let h = engine.handle();
    let (plen, max_tokens) = (40, 12);
    // Plain greedy, greedy with a neutral repetition penalty (fast path); greedy with logprobs,
    // greedy with each penalty (full rows).
    let fast = [greedy(prompt(31, plen), max_tokens), {
        let mut r = greedy(prompt(32, plen), max_tokens);
        r.sampling.repetition_penalty = Some(1.0);
        r
    }];
    let mut slow = Vec::new();
    for (k, edit) in [
        |p: &mut SamplingParams| p.logprobs = Some(0),
        |p: &mut SamplingParams| p.logprobs = Some(2),
        |p: &mut SamplingParams| p.repetition_penalty = Some(1.3),
        |p: &mut SamplingParams| p.frequency_penalty = 0.5,
        |p: &mut SamplingParams| p.presence_penalty = 0.5,
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = greedy(prompt(33 + k as u32, plen), max_tokens);
        edit(&mut r.sampling);
        slow.push(r);
    }
    let rxs: Vec<_> = fast
        .iter()
        .chain(&slow)
        .map(|r| h.submit_channel(r.clone()).unwrap().1)
        .collect();
    let done: Vec<_> = rxs.iter().map(|rx| collect(rx, 1).0.remove(0)).collect();
    let check_tokens = |r: &Request, c: &Completion| {
        let want = greedy_reference(&r.prompt, max_tokens);
        assert_eq!(c.tokens[..], want[..c.tokens.len()], "{:?}", r.sampling);
        if c.finish == Some(FinishReason::Length) {
            assert_eq!(c.tokens.len(), max_tokens);
        }
    };
    for (r, c) in fast.iter().zip(&done) {
        check_tokens(r, c);
        let steps = Recording::steps_of(&seen, r.prompt[0]);
        // Every step that gives a token asks for the greedy token only; partial prefill chunks
        // (whose logits are ignored) keep `Last`.
        for s in &steps {
            let want = if s.end >= plen {
                LogitsWanted::LastGreedy
            } else {
                LogitsWanted::Last
            };
            assert_eq!(s.want, want, "{s:?} of {:?}", r.sampling);
        }
        let greedy_steps = steps
            .iter()
            .filter(|s| s.want == LogitsWanted::LastGreedy)
            .count();
        assert_eq!(greedy_steps, c.tokens.len());
    }
    for (k, (r, c)) in slow.iter().zip(&done[fast.len()..]).enumerate() {
        if k < 2 {
            // Logprobs do not change greedy tokens.
            check_tokens(r, c);
        }
        let steps = Recording::steps_of(&seen, r.prompt[0]);
        assert!(steps.len() >= c.tokens.len());
        for s in &steps {
            assert_eq!(s.want, LogitsWanted::Last, "{s:?} of {:?}", r.sampling);
        }
    }
    wait_idle(&h);
}

#[test]
fn a_greedy_step_without_a_token_fails_only_its_request() {
    let (engine, live, seen) =
        recorded_scripted_engine(vec![10, 11, 12, 13, 14, 15, 16, 17], 3, 999);
    let h = engine.handle();
    let submit = |prompt: Vec<u32>| h.submit_channel(greedy(prompt, 8)).unwrap().1;
    let good: Vec<_> = (0..3).map(|_| submit(vec![1, 2, 3])).collect();
    // No usable logit: fails at its first token, like a sampling error.
    let no_token = submit(vec![NO_ARGMAX_TOKEN, 2, 3]);
    // A backend error: the batch is retried step by step, `LastGreedy` steps included.
    let poisoned = submit(vec![5, 999, 3]);
    match no_token.recv_timeout(Duration::from_secs(10)).unwrap() {
        RequestEvent::Error { message } => assert!(
            message.contains("sampling failed") && message.contains("NaN or -inf"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    expect_poisoned_error_and_good_tokens(&poisoned, &good);
    wait_idle(&h);
    assert_eq!(*live.lock().unwrap(), 0);
    assert_eq!(h.stats().requests_failed, 2);
    let asked = |first| -> Vec<LogitsWanted> {
        Recording::steps_of(&seen, first)
            .iter()
            .map(|s| s.want)
            .collect()
    };
    assert_eq!(asked(NO_ARGMAX_TOKEN), [LogitsWanted::LastGreedy]);
    assert_eq!(asked(1), [LogitsWanted::LastGreedy; 3 * 8]);
}

fn harmony_tokens(text_pieces: &[&str]) -> Vec<u32> {
    // Pieces starting with "<|" are special tokens, the rest ordinary text.
    let tok = tokenizer();
    let mut out = Vec::new();
    for p in text_pieces {
        if p.starts_with("<|") {
            out.push(tok.token_to_id(p).unwrap());
        } else {
            out.extend(tok.encode_ordinary(p).unwrap());
        }
    }
    out
}

#[test]
fn harmony_output_splits_reasoning_content_and_tool_calls() {
    let script = harmony_tokens(&[
        "<|channel|>",
        "analysis",
        "<|message|>",
        "Think first.",
        "<|end|>",
        "<|start|>",
        "assistant",
        "<|channel|>",
        "final",
        "<|message|>",
        "The answer is 4. STOP here",
        "<|return|>",
    ]);
    let (engine, live) = scripted_engine(script.clone(), 5, u32::MAX);
    let h = engine.handle();
    let mut r = Request::chat(vec![1, 2, 3, 4, 5]);
    r.sampling = SamplingParams::greedy();
    r.max_tokens = 100;
    r.sampling.logprobs = Some(0);
    let (_, rx) = h.submit_channel(r.clone()).unwrap();
    let mut kinds = Vec::new();
    let mut events = Vec::new();
    loop {
        let ev = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        if let RequestEvent::Token { kind, logprob, .. } = &ev {
            kinds.push(*kind);
            assert!(logprob.is_some());
        }
        let done = matches!(ev, RequestEvent::Done { .. });
        events.push(ev);
        if done {
            break;
        }
    }
    assert!(kinds.contains(&TokenKind::Reasoning));
    assert!(kinds.contains(&TokenKind::Content));
    assert!(kinds.contains(&TokenKind::Control));
    let (tx, rx2) = std::sync::mpsc::channel();
    for e in events {
        tx.send(e).unwrap();
    }
    let (c, usage) = collect(&rx2, 1);
    assert_eq!(c[0].reasoning, "Think first.");
    assert_eq!(c[0].text, "The answer is 4. STOP here");
    assert_eq!(c[0].finish, Some(FinishReason::Stop));
    assert_eq!(usage.completion_tokens, script.len());

    // Stop strings apply to the content only ("first" is in the reasoning).
    r.stop = vec!["first".into(), " STOP".into()];
    let (_, rx) = h.submit_channel(r).unwrap();
    let (c, _) = collect(&rx, 1);
    assert_eq!(c[0].reasoning, "Think first.");
    assert_eq!(c[0].text, "The answer is 4.");
    assert_eq!(c[0].stop, Some(StopReason::String(" STOP".into())));
    wait_idle(&h);
    assert_eq!(*live.lock().unwrap(), 0, "backend caches released");

    // A tool call.
    let script = harmony_tokens(&[
        "<|channel|>",
        "commentary to=functions.get_weather ",
        "<|constrain|>",
        "json",
        "<|message|>",
        "{\"city\": \"Paris\"}",
        "<|call|>",
    ]);
    let (engine, _) = scripted_engine(script, 3, u32::MAX);
    let mut r = Request::chat(vec![1, 2, 3]);
    r.max_tokens = 100;
    let (_, rx) = engine.handle().submit_channel(r).unwrap();
    let (c, _) = collect(&rx, 1);
    assert_eq!(c[0].tool_names, ["get_weather"]);
    assert_eq!(c[0].tool_args, "{\"city\": \"Paris\"}");
    assert_eq!(c[0].finish, Some(FinishReason::ToolCalls));
    assert_eq!(c[0].text, "");
}

#[test]
fn a_failing_sequence_does_not_disturb_the_others() {
    let (engine, live) = scripted_engine(vec![10, 11, 12, 13, 14, 15, 16, 17], 3, 999);
    let h = engine.handle();
    let mut good = Vec::new();
    for _ in 0..4 {
        let mut r = Request::new(vec![1, 2, 3]);
        r.max_tokens = 8;
        good.push(h.submit_channel(r).unwrap().1);
    }
    let mut bad = Request::new(vec![1, 999, 3]);
    bad.max_tokens = 8;
    let (_, bad_rx) = h.submit_channel(bad).unwrap();
    expect_poisoned_error_and_good_tokens(&bad_rx, &good);
    wait_idle(&h);
    assert_eq!(*live.lock().unwrap(), 0);
    assert_eq!(h.stats().requests_failed, 1);
}

#[test]
fn shutdown_ends_requests_in_flight() {
    let (engine, _) = scripted_engine(vec![10; 10_000], 3, u32::MAX);
    let h = engine.handle();
    let mut r = Request::new(vec![1, 2, 3]);
    r.max_tokens = 400;
    let (_, rx) = h.submit_channel(r).unwrap();
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        RequestEvent::Token { .. }
    ));
    engine.shutdown();
    let last = rx.iter().last();
    assert!(matches!(last, Some(RequestEvent::Error { .. })), "{last:?}");
    assert!(!h.is_running());
    assert!(h.submit_channel(Request::new(vec![1])).is_err());
}

#[test]
fn a_panicking_backend_fails_its_batch_but_the_engine_keeps_serving() {
    let (engine, live) = scripted_engine(vec![10, 11, 12], 3, u32::MAX);
    let h = engine.handle();
    let mut r = Request::new(vec![1, PANIC_TOKEN, 3]);
    r.max_tokens = 3;
    let (_, rx) = h.submit_channel(r).unwrap();
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        RequestEvent::Error { message } => assert!(message.contains("panicked"), "{message}"),
        other => panic!("{other:?}"),
    }
    wait_idle(&h);
    assert!(h.is_running());
    let mut r = Request::new(vec![1, 2, 3]);
    r.max_tokens = 3;
    let (_, rx) = h.submit_channel(r).unwrap();
    assert_eq!(collect(&rx, 1).0[0].tokens, [10, 11, 12]);
    wait_idle(&h);
    assert_eq!(*live.lock().unwrap(), 0);
}
