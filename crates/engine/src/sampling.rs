//! Token sampling: request parameters, their validation, and a per-sequence
//! [`Sampler`] that turns one step's logits into the next token.
//!
//! # Pipeline
//!
//! For every step [`Sampler::sample`] applies, in this order (the order of
//! vLLM's classic sampler):
//!
//! 1. **Sanitising**: `NaN` logits become `-inf` (never sampled), `+inf`
//!    logits become `f32::MAX` (so they dominate without producing `NaN`s).
//! 2. **Penalties** (on a scratch copy, never on the caller's slice):
//!    the optional multiplicative `repetition_penalty` (HF/vLLM semantics,
//!    over prompt *and* generated tokens), then OpenAI's additive penalties
//!    over *generated* tokens only:
//!    `logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)`.
//! 3. **Temperature**: `temperature == 0` (anything below
//!    [`GREEDY_TEMPERATURE_EPS`]) is greedy: the arg-max of the penalised
//!    logits, ties going to the lowest token id (except that a raw `+inf`
//!    beats a finite `f32::MAX`); no randomness is consumed. Without
//!    penalties this is exactly [`greedy_token`](crate::backend::greedy_token),
//!    which lets the engine take a backend's on-device arg-max instead
//!    ([`Sampler::wants_only_argmax`], [`Sampler::accept_greedy`]).
//!    Otherwise probabilities are `softmax(logit / temperature)`.
//! 4. **top-k**: keep the `k` most likely tokens.
//! 5. **top-p** (nucleus): of what is left, keep the most likely tokens while
//!    the mass *before* each one is `< top_p` (so at least one is kept).
//! 6. **min-p**: drop tokens whose probability is below `min_p` times the
//!    most likely token's.
//! 7. **Draw** from the renormalised survivors with the sequence's RNG.
//!
//! Ties in probability are always broken by token id, and the survivors are
//! drawn from in token-id order, so a fixed `seed` reproduces the same tokens
//! given the same logits (independently of the standard library's selection
//! algorithms).
//!
//! # Logprobs
//!
//! The returned log-probabilities follow vLLM's default `logprobs_mode`
//! (`raw_logprobs`): they are `log_softmax` of the **model's raw logits**,
//! before penalties, temperature and any top-k/top-p/min-p filtering. They
//! therefore describe the model, not the (possibly truncated) distribution
//! the token was drawn from. [`LogprobsMode::Penalized`] selects the
//! distribution after penalties but before temperature instead.
//!
//! # Cost
//!
//! Working buffers are kept in the [`Sampler`] and reused, so a step does not
//! allocate (except the `top_logprobs` vector when logprobs are requested).
//! Everything is linear in the vocabulary, with no full sort:
//!
//! * the hot loops (max, `exp`, sums) are branch-free with independent lanes
//!   so that they vectorise (`exp` is an in-house polynomial, accurate to a
//!   couple of ulps);
//! * the draw sums blocks of weights, then scans a single block;
//! * top-k (and the top-N logprobs) use a bounded heap fed by a pass that
//!   skips whole blocks that cannot enter it (`select_nth_unstable` for very
//!   large `k`), and sort only the `k` survivors;
//! * top-p without top-k finds the nucleus from a histogram of the
//!   probabilities and sorts only the boundary bucket (with top-k it walks
//!   the sorted survivors);
//! * min-p is a threshold on the logits.
//!
//! On the 201 088-token GPT-OSS vocabulary this is a few hundred
//! microseconds per step on one CPU core
//! (`cargo test --release -p gptoss-engine --test sampling -- --ignored
//! --nocapture` prints timings).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Display;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize};

/// Largest number of top log-probabilities a request may ask for per token
/// (OpenAI's `top_logprobs` limit).
pub const MAX_LOGPROBS: usize = 20;

/// Temperatures below this value are treated as greedy decoding (as vLLM
/// does), which also avoids overflow when dividing by tiny temperatures.
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// Largest `k` for which top-k selection uses a bounded heap rather than
/// `select_nth_unstable`.
const HEAP_MAX_K: usize = 2048;

/// Block length for blocked summation and drawing.
const BLOCK: usize = 1024;

/// Independent accumulators in the vectorisable reductions.
const LANES: usize = 8;

/// Per-request sampling parameters, with OpenAI's names, defaults and ranges.
///
/// `Default` is OpenAI's default: `temperature = 1`, every filter and penalty
/// off, no seed, no logprobs. Deserialisation fills missing fields from the
/// defaults; call [`SamplingParams::validate`] on anything that came from a
/// client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, `0..=2`. `0` means greedy decoding (arg-max).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens. `None` or `Some(0)` disables it.
    /// A value larger than the vocabulary is a no-op. When deserialising,
    /// `-1` (vLLM's "disabled") and `null` also mean disabled.
    #[serde(deserialize_with = "deserialize_top_k")]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass, in `(0, 1]`. `1` disables it.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, `0..=1`.
    /// `0` disables it.
    pub min_p: f32,
    /// Additive penalty for tokens already generated at least once, `-2..=2`.
    pub presence_penalty: f32,
    /// Additive penalty per occurrence of a token already generated, `-2..=2`.
    pub frequency_penalty: f32,
    /// Multiplicative repetition penalty (HF/vLLM semantics) in `(0, 2]`,
    /// applied to tokens seen in the prompt or in the output: positive
    /// logits are divided by it, negative ones multiplied. `None` or `1`
    /// disables it. Not part of OpenAI's API.
    pub repetition_penalty: Option<f32>,
    /// RNG seed. The same seed with the same logits yields the same tokens;
    /// `None` seeds from the operating system's entropy.
    pub seed: Option<u64>,
    /// Number of most likely tokens (with their log-probabilities) to return
    /// with each sampled token, `0..=20`. `None` returns none.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: None,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Parameters for greedy decoding (`temperature = 0`), everything else
    /// at its default.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field against its allowed range.
    ///
    /// The error names the offending field and the range, worded like
    /// OpenAI's API errors, e.g. `Invalid 'temperature': decimal above
    /// maximum value. Expected a value <= 2, but got 2.5 instead.`
    /// Fields are checked in declaration order; the first violation wins.
    pub fn validate(&self) -> Result<(), SamplingError> {
        check_decimal("temperature", self.temperature, Lower::Inclusive(0.0), 2.0)?;
        check_decimal("top_p", self.top_p, Lower::Exclusive(0.0), 1.0)?;
        check_decimal("min_p", self.min_p, Lower::Inclusive(0.0), 1.0)?;
        check_decimal(
            "presence_penalty",
            self.presence_penalty,
            Lower::Inclusive(-2.0),
            2.0,
        )?;
        check_decimal(
            "frequency_penalty",
            self.frequency_penalty,
            Lower::Inclusive(-2.0),
            2.0,
        )?;
        if let Some(rp) = self.repetition_penalty {
            check_decimal("repetition_penalty", rp, Lower::Exclusive(0.0), 2.0)?;
        }
        // `top_k` is unsigned, so `>= 0` holds by construction.
        if let Some(n) = self.logprobs
            && n > MAX_LOGPROBS
        {
            return Err(SamplingError::InvalidParameter {
                param: "logprobs",
                code: "integer_above_max_value",
                message: format!(
                    "Invalid 'logprobs': integer above maximum value. \
                     Expected a value <= {MAX_LOGPROBS}, but got {n} instead."
                ),
            });
        }
        Ok(())
    }

    /// Whether these parameters select greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS
    }
}

/// Lower bound of a decimal range.
#[derive(Clone, Copy)]
enum Lower {
    /// `value >= bound`.
    Inclusive(f32),
    /// `value > bound`.
    Exclusive(f32),
}

/// Checks `min <(=) value <= max`, producing OpenAI-style messages.
fn check_decimal(
    param: &'static str,
    value: f32,
    min: Lower,
    max: f32,
) -> Result<(), SamplingError> {
    if value.is_nan() {
        return Err(SamplingError::InvalidParameter {
            param,
            code: "invalid_value",
            message: format!("Invalid '{param}': expected a number, but got NaN instead."),
        });
    }
    let (ok, op, bound) = match min {
        Lower::Inclusive(b) => (value >= b, ">=", b),
        Lower::Exclusive(b) => (value > b, ">", b),
    };
    if !ok {
        return Err(below_min(param, op, bound, value));
    }
    if value > max {
        return Err(SamplingError::InvalidParameter {
            param,
            code: "decimal_above_max_value",
            message: format!(
                "Invalid '{param}': decimal above maximum value. \
                 Expected a value <= {max}, but got {value} instead."
            ),
        });
    }
    Ok(())
}

/// The "below minimum" error for `param`.
fn below_min(
    param: &'static str,
    op: &str,
    bound: impl Display,
    value: impl Display,
) -> SamplingError {
    SamplingError::InvalidParameter {
        param,
        code: "decimal_below_min_value",
        message: format!(
            "Invalid '{param}': decimal below minimum value. \
             Expected a value {op} {bound}, but got {value} instead."
        ),
    }
}

/// Accepts `null`, `-1` and `0` as "disabled", positive integers as `k`.
fn deserialize_top_k<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match Option::<i64>::deserialize(d)? {
        None | Some(-1) | Some(0) => Ok(None),
        Some(k) if k > 0 => Ok(Some(usize::try_from(k).unwrap_or(usize::MAX))),
        Some(k) => Err(serde::de::Error::custom(format!(
            "Invalid 'top_k': integer below minimum value. \
             Expected a value >= 0 (or -1 to disable), but got {k} instead."
        ))),
    }
}

/// Errors from parameter validation and from sampling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A request parameter is out of range. `param` is the field name,
    /// `code` an OpenAI-style error code (`decimal_above_max_value`, ...),
    /// `message` the full human-readable message.
    #[error("{message}")]
    InvalidParameter {
        /// The offending field, e.g. `"temperature"`.
        param: &'static str,
        /// Machine-readable reason, OpenAI style.
        code: &'static str,
        /// Human-readable message naming the field and the allowed range.
        message: String,
    },
    /// `sample` was given an empty logits slice.
    #[error("cannot sample from an empty logits vector")]
    EmptyLogits,
    /// Every logit was `NaN` or `-inf`: there is no distribution to sample.
    #[error("all {vocab} logits are NaN or -inf; the model produced no usable distribution")]
    NoFiniteLogits {
        /// Length of the logits slice.
        vocab: usize,
    },
}

/// Which distribution the returned log-probabilities describe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogprobsMode {
    /// `log_softmax` of the raw model logits, before penalties, temperature
    /// and filtering (vLLM's default `raw_logprobs`).
    #[default]
    Raw,
    /// `log_softmax` of the logits after penalties, before temperature and
    /// filtering.
    Penalized,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The token id.
    pub id: u32,
    /// Its log-probability (see [`LogprobsMode`]); `-inf` if it had none.
    pub logprob: f32,
    /// The `logprobs` most likely tokens with their log-probabilities, most
    /// likely first (ties by lower id); empty unless requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-sequence sampling state: the parameters, the RNG, the counts of
/// generated tokens (for penalties) and reusable scratch buffers.
///
/// ```
/// use gptoss_engine::sampling::{Sampler, SamplingParams};
/// let params = SamplingParams { temperature: 0.7, seed: Some(1), ..Default::default() };
/// let mut sampler = Sampler::new(params).unwrap();
/// let tok = sampler.sample(&[0.1, 2.0, -1.0]).unwrap();
/// assert!(tok.id < 3);
/// ```
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    logprobs_mode: LogprobsMode,
    rng: Xoshiro256PlusPlus,
    /// Occurrences of each generated token.
    counts: HashMap<u32, u32>,
    /// Number of tokens accepted so far.
    generated: usize,
    /// Sorted, de-duplicated prompt tokens (for `repetition_penalty`).
    prompt_tokens: Vec<u32>,
    /// Penalised logits of the current step.
    scratch: Vec<f32>,
    /// Candidate token ids.
    idx: Vec<u32>,
    /// Unnormalised probabilities (per token id, or parallel to `idx`).
    weights: Vec<f32>,
    /// Block sums of `weights`.
    blocks: Vec<f64>,
    /// Bounded min-heap for top-k selection.
    heap: BinaryHeap<Reverse<Cand>>,
}

impl Sampler {
    /// Validates `params` and creates a sampler. The RNG is seeded from
    /// `params.seed`, or from OS entropy when it is `None`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => Xoshiro256PlusPlus::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        Ok(Self {
            params,
            logprobs_mode: LogprobsMode::default(),
            rng,
            counts: HashMap::new(),
            generated: 0,
            prompt_tokens: Vec::new(),
            scratch: Vec::new(),
            idx: Vec::new(),
            weights: Vec::new(),
            blocks: Vec::new(),
            heap: BinaryHeap::new(),
        })
    }

    /// Records the prompt's tokens, which `repetition_penalty` penalises
    /// too. (Presence and frequency penalties only ever look at generated
    /// tokens, as in OpenAI's API.)
    pub fn with_prompt_tokens(mut self, prompt: &[u32]) -> Self {
        self.prompt_tokens = prompt.to_vec();
        self.prompt_tokens.sort_unstable();
        self.prompt_tokens.dedup();
        self
    }

    /// Chooses which distribution log-probabilities describe.
    pub fn with_logprobs_mode(mut self, mode: LogprobsMode) -> Self {
        self.logprobs_mode = mode;
        self
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Number of tokens generated (accepted) so far.
    pub fn num_generated(&self) -> usize {
        self.generated
    }

    /// How many times `id` has been generated so far.
    pub fn count(&self, id: u32) -> u32 {
        self.counts.get(&id).copied().unwrap_or(0)
    }

    /// Records `id` as generated, for the penalties.
    ///
    /// [`Sampler::sample`] already does this for the token it returns; call
    /// `accept` only for tokens appended without sampling (forced tokens,
    /// accepted speculative drafts, ...).
    pub fn accept(&mut self, id: u32) {
        *self.counts.entry(id).or_insert(0) += 1;
        self.generated += 1;
    }

    /// Whether this sampler's choice depends on nothing but the arg-max of the
    /// raw logits: greedy decoding, no logprobs (not even `Some(0)`: the
    /// engine then still reports the sampled token's logprob), and no
    /// repetition, frequency or presence penalty. The engine then asks the
    /// backend for [`LogitsWanted::LastGreedy`](crate::backend::LogitsWanted)
    /// (the greedy token, no logits row) and records the token with
    /// [`Sampler::accept_greedy`].
    pub fn wants_only_argmax(&self) -> bool {
        let p = &self.params;
        p.is_greedy()
            && p.logprobs.is_none()
            && p.repetition_penalty.is_none_or(|rp| rp == 1.0)
            && p.frequency_penalty == 0.0
            && p.presence_penalty == 0.0
    }

    /// Records `id`, the greedy token a backend picked from the raw logits
    /// ([`greedy_token`](crate::backend::greedy_token)), as generated, and
    /// returns it: what [`Sampler::sample`] would have returned for that row
    /// when [`Sampler::wants_only_argmax`] holds, except that the
    /// log-probability is not computed (`logprob` is `NaN`; it is only ever
    /// reported when logprobs were asked for, which excludes this path) and
    /// `top_logprobs` is empty.
    pub fn accept_greedy(&mut self, id: u32) -> SampledToken {
        self.accept(id);
        SampledToken {
            id,
            logprob: f32::NAN,
            top_logprobs: Vec::new(),
        }
    }

    /// Samples the next token from one step's `logits` (one entry per
    /// vocabulary id) and records it as generated.
    ///
    /// `NaN` logits are never chosen and `+inf` ones dominate. Fails only if
    /// `logits` is empty or holds no finite-or-`+inf` value; nothing is
    /// recorded then.
    pub fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, SamplingError> {
        let n = logits.len();
        if n == 0 {
            return Err(SamplingError::EmptyLogits);
        }
        assert!(
            u32::try_from(n).is_ok(),
            "vocabulary of {n} entries does not fit u32 ids"
        );

        self.scratch.clear();
        self.scratch.extend(logits.iter().map(|&x| sanitize(x)));
        self.apply_penalties();

        let max = max_sanitized(&self.scratch);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoFiniteLogits { vocab: n });
        }

        let id = if self.params.is_greedy() {
            // First (lowest) id holding the maximum; at `f32::MAX` (where `+inf` logits landed),
            // a raw `+inf` beats a finite `f32::MAX`, so that the pick agrees with
            // [`greedy_token`](crate::backend::greedy_token), the rule backends use for
            // `LogitsWanted::LastGreedy`.
            let first = self.scratch.iter().position(|&x| x == max).unwrap_or(0);
            let inf = if max == f32::MAX {
                (first..n).find(|&i| self.scratch[i] == max && logits[i] == f32::INFINITY)
            } else {
                None
            };
            inf.unwrap_or(first) as u32
        } else {
            self.draw(max)
        };

        let src: &[f32] = match self.logprobs_mode {
            LogprobsMode::Raw => logits,
            LogprobsMode::Penalized => &self.scratch,
        };
        let lse = log_sum_exp(src, &mut self.weights, &mut self.blocks);
        let logprob = sanitize(src[id as usize]) - lse;
        let top_logprobs = match self.params.logprobs {
            Some(k) if k > 0 => {
                select_top(src, k, &mut self.heap, &mut self.idx);
                self.idx
                    .iter()
                    .map(|&i| (i, sanitize(src[i as usize]) - lse))
                    .collect()
            }
            _ => Vec::new(),
        };

        self.accept(id);
        Ok(SampledToken {
            id,
            logprob,
            top_logprobs,
        })
    }

    /// Applies repetition, frequency and presence penalties to `scratch`.
    fn apply_penalties(&mut self) {
        let n = self.scratch.len();
        let scratch = &mut self.scratch;
        if let Some(rp) = self.params.repetition_penalty
            && rp != 1.0
        {
            let mut penalize = |t: u32| {
                if let Some(x) = scratch.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / rp } else { *x * rp };
                    *x = sanitize(*x);
                }
            };
            for &t in &self.prompt_tokens {
                penalize(t);
            }
            for &t in self.counts.keys() {
                if self.prompt_tokens.binary_search(&t).is_err() {
                    penalize(t);
                }
            }
        }
        let (fp, pp) = (self.params.frequency_penalty, self.params.presence_penalty);
        if fp != 0.0 || pp != 0.0 {
            for (&t, &c) in &self.counts {
                if (t as usize) < n && c > 0 {
                    let x = &mut scratch[t as usize];
                    *x = sanitize(*x - (fp * c as f32 + pp));
                }
            }
        }
    }

    /// Draws a token at temperature > 0 from the filtered distribution.
    /// `max` is the largest (finite) penalised logit.
    fn draw(&mut self, max: f32) -> u32 {
        let p = &self.params;
        let n = self.scratch.len();
        let inv_t = 1.0 / p.temperature;
        // p_i / p_max = exp((l_i - max) / T) >= min_p
        let ln_min_p = if p.min_p > 0.0 {
            p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let top_k = p.top_k.filter(|&k| k > 0 && k < n);
        let top_p = (p.top_p < 1.0).then_some(p.top_p as f64);
        let s = &self.scratch;
        // Unnormalised probability relative to the most likely token (<= 1).
        let weight = |i: u32| exp_nonpositive((s[i as usize] - max) * inv_t);
        let u = uniform(&mut self.rng);

        if let Some(k) = top_k {
            // Candidate path: the `k` most likely tokens, most likely first.
            let cands = &mut self.idx;
            select_top(s, k, &mut self.heap, cands);
            if let Some(top_p) = top_p {
                let total: f64 = cands.iter().map(|&i| weight(i) as f64).sum();
                truncate_to_nucleus(cands, weight, top_p * total);
            }
            if ln_min_p > f32::NEG_INFINITY {
                cands.retain(|&i| (s[i as usize] - max) * inv_t >= ln_min_p);
            }
            // Draw in token-id order, so that the result depends only on
            // the surviving set.
            cands.sort_unstable();
            self.weights.clear();
            self.weights.extend(cands.iter().map(|&i| weight(i)));
            return cands[draw_index(&self.weights, u, &mut self.blocks)];
        }

        // Dense path: weights for the whole vocabulary, with the tokens cut
        // by top-p and min-p zeroed, drawn from in token-id order.
        self.weights.clear();
        let Some(top_p) = top_p else {
            self.weights.extend(s.iter().map(|&x| {
                let z = (x - max) * inv_t;
                if z >= ln_min_p {
                    exp_nonpositive(z)
                } else {
                    0.0
                }
            }));
            return draw_index(&self.weights, u, &mut self.blocks) as u32;
        };
        self.weights
            .extend(s.iter().map(|&x| exp_nonpositive((x - max) * inv_t)));
        let total = block_sums(&self.weights, &mut self.blocks);
        let nucleus = Nucleus {
            s,
            w: &self.weights,
            max,
            inv_t,
        };
        let c = nucleus.cutoff(top_p * total, &mut self.blocks, &mut self.idx);
        // Keep tokens at least as likely as the cutoff (ties by id) and above
        // the min-p threshold; branch-free to vectorise.
        for (i, (w, &x)) in self.weights.iter_mut().zip(s).enumerate() {
            let cut = (x < c.value) | ((x == c.value) & (i as u32 > c.id));
            let below_min_p = (x - max) * inv_t < ln_min_p;
            *w = if cut | below_min_p { 0.0 } else { *w };
        }
        draw_index(&self.weights, u, &mut self.blocks) as u32
    }
}

/// Orders token ids by descending value of `s`, ties by ascending id.
#[inline]
fn desc(s: &[f32], a: u32, b: u32) -> Ordering {
    s[b as usize].total_cmp(&s[a as usize]).then(a.cmp(&b))
}

/// Top-p over the whole vocabulary without sorting it: tokens are bucketed
/// by `z = (max - logit) / T` (so `w = exp(-z)`), the bucket where the
/// cumulative mass reaches the target is found from the histogram, and only
/// that bucket's tokens are sorted.
struct Nucleus<'a> {
    /// Penalised logits.
    s: &'a [f32],
    /// `exp((s - max) / T)` per token.
    w: &'a [f32],
    max: f32,
    inv_t: f32,
}

impl Nucleus<'_> {
    /// Number of buckets over `z` in `[0, Z_MAX)`.
    const BUCKETS: usize = 4096;
    /// Beyond this `z`, `exp(-z)` is 0 in `f32` anyway.
    const Z_MAX: f32 = 88.0;

    /// Bucket of token `i`: more likely tokens are in lower buckets, and
    /// equal logits share a bucket.
    #[inline]
    fn bucket(&self, i: usize) -> usize {
        let z = (self.max - self.s[i]) * self.inv_t;
        ((z * (Self::BUCKETS as f32 / Self::Z_MAX)) as usize).min(Self::BUCKETS - 1)
    }

    /// The least likely token of the nucleus for mass `target`: the
    /// nucleus is every token whose strictly-more-likely mass (ties by id)
    /// is `< target`, i.e. every token at least as likely as the cutoff.
    /// `hist` and `members` are scratch.
    fn cutoff(&self, target: f64, hist: &mut Vec<f64>, members: &mut Vec<u32>) -> Cand {
        hist.clear();
        hist.resize(Self::BUCKETS, 0.0);
        for (i, &w) in self.w.iter().enumerate() {
            if w > 0.0 {
                hist[self.bucket(i)] += w as f64;
            }
        }
        // The boundary bucket: mass before it < target, through it >= target
        // (or the last non-empty bucket if rounding never gets there).
        let mut before = 0.0f64;
        let mut boundary = 0;
        for (b, &m) in hist.iter().enumerate() {
            if m > 0.0 {
                boundary = b;
                if before + m >= target {
                    break;
                }
                before += m;
            }
        }
        members.clear();
        members.extend(
            (0..self.w.len())
                .filter(|&i| self.w[i] > 0.0 && self.bucket(i) == boundary)
                .map(|i| i as u32),
        );
        members.sort_unstable_by(|&a, &b| desc(self.s, a, b));
        // The boundary's first member is always kept (mass before < target).
        let Some(&first) = members.first() else {
            // Unreachable (the boundary bucket has mass); keep everything.
            return Cand {
                value: f32::NEG_INFINITY,
                id: u32::MAX,
            };
        };
        let mut cum = before;
        let mut last = first;
        for &i in members.iter() {
            if cum >= target {
                break;
            }
            last = i;
            cum += self.w[i as usize] as f64;
        }
        Cand {
            value: self.s[last as usize],
            id: last,
        }
    }
}

/// Keeps the shortest prefix of `cands` (sorted most likely first) whose
/// mass reaches `target`: token `j` stays iff the mass before it is
/// `< target`.
fn truncate_to_nucleus(cands: &mut Vec<u32>, weight: impl Fn(u32) -> f32, target: f64) {
    let mut cum = 0.0f64;
    for j in 0..cands.len() {
        if cum >= target && j > 0 {
            cands.truncate(j);
            return;
        }
        cum += weight(cands[j]) as f64;
    }
}

/// A candidate for top-k selection: greater means more likely (higher
/// value; on equal values, lower id).
#[derive(Debug, Clone, Copy)]
struct Cand {
    value: f32,
    id: u32,
}

impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.value
            .total_cmp(&other.value)
            .then(other.id.cmp(&self.id))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Cand {}

/// Writes to `out` the ids of the `k` largest sanitised values of `values`
/// (all of them if `k >= len`), most likely first, ties by lower id.
///
/// Small `k` uses a bounded min-heap fed by one pass that skips whole
/// blocks whose maximum cannot enter the heap (a vectorisable test), so
/// it costs little more than a `max`; large `k` uses `select_nth_unstable`.
fn select_top(values: &[f32], k: usize, heap: &mut BinaryHeap<Reverse<Cand>>, out: &mut Vec<u32>) {
    const SKIP_BLOCK: usize = 64;
    let n = values.len();
    let k = k.min(n);
    let cand = |id: u32| Cand {
        value: sanitize(values[id as usize]),
        id,
    };
    out.clear();
    if k == 0 {
        return;
    }
    if k <= HEAP_MAX_K {
        heap.clear();
        // Once the heap is full, only values >= `threshold` can enter.
        let mut threshold = f32::NEG_INFINITY;
        for (b, block) in values.chunks(SKIP_BLOCK).enumerate() {
            if heap.len() == k && raw_max(block) < threshold {
                continue;
            }
            for id in (b * SKIP_BLOCK) as u32..(b * SKIP_BLOCK + block.len()) as u32 {
                let c = cand(id);
                if heap.len() < k {
                    heap.push(Reverse(c));
                } else if c.value >= threshold
                    && let Some(mut worst) = heap.peek_mut()
                    && c > worst.0
                {
                    *worst = Reverse(c);
                } else {
                    continue;
                }
                if heap.len() == k {
                    threshold = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.value);
                }
            }
        }
        out.extend(heap.drain().map(|Reverse(c)| c.id));
    } else {
        out.extend(0..n as u32);
        if k < n {
            out.select_nth_unstable_by(k - 1, |&a, &b| cand(b).cmp(&cand(a)));
            out.truncate(k);
        }
    }
    out.sort_unstable_by_key(|&id| Reverse(cand(id)));
}

/// Index into `w` drawn with probability proportional to `w` (at least one
/// entry must be positive), using `u` in `[0, 1)`.
///
/// Sums blocks of `w` first (vectorisable), then scans only the block where
/// `u` falls.
fn draw_index(w: &[f32], u: f64, blocks: &mut Vec<f64>) -> usize {
    let total = block_sums(w, blocks);
    let target = u * total;
    let mut acc = 0.0f64;
    let mut last = 0;
    for (b, &sum) in blocks.iter().enumerate() {
        if sum > 0.0 {
            last = b;
            if acc + sum > target {
                return scan_block(w, b, target - acc);
            }
            acc += sum;
        }
    }
    // Rounding left `target` at the very top: the last token with mass.
    scan_block(w, last, f64::INFINITY)
}

/// Within block `b` of `w`, the first index where the running sum exceeds
/// `target`, or the block's last positive entry.
fn scan_block(w: &[f32], b: usize, target: f64) -> usize {
    let start = b * BLOCK;
    let mut acc = 0.0f64;
    let mut last = start;
    for (j, &x) in w[start..(start + BLOCK).min(w.len())].iter().enumerate() {
        if x > 0.0 {
            acc += x as f64;
            last = start + j;
            if acc > target {
                return last;
            }
        }
    }
    last
}

/// Fills `blocks` with the sums of consecutive `BLOCK`-sized chunks of `w`
/// and returns their total.
fn block_sums(w: &[f32], blocks: &mut Vec<f64>) -> f64 {
    blocks.clear();
    blocks.extend(w.chunks(BLOCK).map(sum_lanes));
    blocks.iter().sum()
}

/// Sum of a short slice with 8 independent `f32` accumulators (which the
/// compiler vectorises), combined in `f64`.
#[inline]
fn sum_lanes(xs: &[f32]) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + rest.iter().map(|&x| x as f64).sum::<f64>()
}

/// `NaN -> -inf`, `+inf -> f32::MAX`, `-0.0 -> 0.0` (so that the total
/// order used for ties agrees with `==`), everything else unchanged.
#[inline]
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX
    } else {
        // IEEE: -0.0 + 0.0 == +0.0; every other value is unchanged.
        x + 0.0
    }
}

/// Largest value of `xs`, ignoring `NaN`s (`-inf` if there is none); 8
/// independent lanes let the compiler vectorise it.
#[inline]
fn raw_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Largest sanitised value of `xs` (`-inf` if none).
fn max_sanitized(xs: &[f32]) -> f32 {
    sanitize(raw_max(xs))
}

/// `log(sum(exp(x)))` over the sanitised values of `xs`; `buf` and
/// `blocks` are scratch.
fn log_sum_exp(xs: &[f32], buf: &mut Vec<f32>, blocks: &mut Vec<f64>) -> f32 {
    let max = max_sanitized(xs);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    // `exp_nonpositive` maps NaN and -inf to 0 and clamps +inf - max to 1,
    // so no sanitising is needed. (Writing the terms out and summing them
    // afterwards is faster than a fused reduction.)
    buf.clear();
    buf.extend(xs.iter().map(|&x| exp_nonpositive(x - max)));
    max + block_sums(buf, blocks).ln() as f32
}

/// `exp(x)` for `x <= 0`, within a couple of ulps; branch-free so that
/// loops over it vectorise. `-inf`, `NaN` and anything below the normal
/// range (`x < -87.3`) give exactly 0; positive inputs are clamped to 0
/// (giving 1).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa
    // bits; subtracting it again gives that integer as a float.
    const ROUND: f32 = 12_582_912.0;
    let in_range = x >= -87.3; // false for NaN
    let xc = if !in_range || x > 0.0 { 0.0 } else { x };
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND; // round(x / ln 2), in [-126, 0]
    let r = xc - n * LN2_HI - n * LN2_LO; // |r| <= ln2 / 2
    // Taylor series of exp(r) to degree 6: relative error < 2e-7.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n built from the exponent bits: (n + 127) << 23.
    let exp_bits = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    let res = p * f32::from_bits(exp_bits);
    if in_range { res } else { 0.0 }
}

/// Uniform `f64` in `[0, 1)` from the top 53 bits of one `u64` draw.
#[inline]
fn uniform(rng: &mut Xoshiro256PlusPlus) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_maps_non_finite() {
        assert_eq!(sanitize(f32::NAN), f32::NEG_INFINITY);
        assert_eq!(sanitize(f32::INFINITY), f32::MAX);
        assert_eq!(sanitize(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(sanitize(1.5), 1.5);
        assert!(sanitize(-0.0).is_sign_positive());
    }

    #[test]
    fn max_handles_non_finite_and_remainders() {
        assert_eq!(max_sanitized(&[1.0, 3.0, 3.0, 2.0]), 3.0);
        assert_eq!(max_sanitized(&[f32::NAN; 11]), f32::NEG_INFINITY);
        let mut xs = vec![0.0f32; 19];
        xs[18] = 5.0;
        xs[3] = f32::NAN;
        assert_eq!(max_sanitized(&xs), 5.0);
        xs[9] = f32::INFINITY;
        assert_eq!(max_sanitized(&xs), f32::MAX);
    }

    #[test]
    fn exp_nonpositive_is_accurate() {
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
        assert_eq!(exp_nonpositive(f32::INFINITY), 1.0);
        assert_eq!(exp_nonpositive(3.0), 1.0);
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 5e-7,
                "exp({x}) = {got}, want {want}"
            );
            x -= 0.0137;
        }
    }

    #[test]
    fn select_top_orders_and_breaks_ties_by_id() {
        let v = [1.0f32, 5.0, 3.0, 5.0, f32::NEG_INFINITY, 3.0];
        let mut heap = BinaryHeap::new();
        let mut out = Vec::new();
        for k in [1, 3, 4, 6, 10] {
            select_top(&v, k, &mut heap, &mut out);
            assert_eq!(out, [1, 3, 2, 5, 0, 4][..k.min(6)], "k = {k}");
        }
        // The select_nth path agrees with the heap path.
        let big: Vec<f32> = (0..10_000).map(|i| ((i * 7919) % 1000) as f32).collect();
        select_top(&big, 3000, &mut heap, &mut out);
        let mut want: Vec<u32> = (0..10_000).collect();
        want.sort_by(|&a, &b| desc(&big, a, b));
        assert_eq!(out, want[..3000]);
        select_top(&big, 100, &mut heap, &mut out);
        assert_eq!(out, want[..100]);
    }

    /// Reference nucleus: full sort, keep while the mass before is < p.
    fn reference_nucleus(s: &[f32], t: f32, top_p: f64) -> Vec<u32> {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = s.iter().map(|&x| (((x - max) / t) as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<u32> = (0..s.len() as u32).collect();
        order.sort_by(|&a, &b| desc(s, a, b));
        let mut cum = 0.0;
        let mut keep = Vec::new();
        for i in order {
            if cum >= top_p * total && !keep.is_empty() {
                break;
            }
            cum += w[i as usize];
            keep.push(i);
        }
        keep.sort_unstable();
        keep
    }

    #[test]
    fn histogram_nucleus_matches_a_full_sort() {
        let mut state = 0x1234_5678_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let cases: Vec<(Vec<f32>, f32, f64)> = vec![
            ((0..3000).map(|_| next() * 16.0 - 8.0).collect(), 1.0, 0.9),
            ((0..3000).map(|_| next() * 16.0 - 8.0).collect(), 0.3, 0.5),
            ((0..3000).map(|_| next() * 40.0).collect(), 1.7, 0.99),
            // Peaked: one token dominates.
            (
                (0..3000)
                    .map(|i| if i == 1234 { 20.0 } else { next() })
                    .collect(),
                1.0,
                0.9,
            ),
            // Heavy ties: only 5 distinct values.
            (
                (0..3000).map(|_| (next() * 5.0).floor()).collect(),
                1.0,
                0.37,
            ),
            // All equal.
            (vec![0.5; 3000], 1.0, 0.25),
        ];
        for (k, (s, t, top_p)) in cases.into_iter().enumerate() {
            let max = max_sanitized(&s);
            let inv_t = 1.0 / t;
            let w: Vec<f32> = s
                .iter()
                .map(|&x| exp_nonpositive((x - max) * inv_t))
                .collect();
            let total = block_sums(&w, &mut Vec::new());
            let nucleus = Nucleus {
                s: &s,
                w: &w,
                max,
                inv_t,
            };
            let c = nucleus.cutoff(top_p * total, &mut Vec::new(), &mut Vec::new());
            let got: Vec<u32> = (0..s.len() as u32)
                .filter(|&i| {
                    Cand {
                        value: s[i as usize],
                        id: i,
                    } >= c
                })
                .collect();
            assert_eq!(got, reference_nucleus(&s, t, top_p), "case {k}");
        }
    }

    #[test]
    fn draw_index_follows_weights() {
        let mut blocks = Vec::new();
        let mut w = vec![0.0f32; 3000];
        w[5] = 1.0;
        w[2500] = 3.0;
        assert_eq!(draw_index(&w, 0.0, &mut blocks), 5);
        assert_eq!(draw_index(&w, 0.2499, &mut blocks), 5);
        assert_eq!(draw_index(&w, 0.2501, &mut blocks), 2500);
        assert_eq!(draw_index(&w, 0.999_999_9, &mut blocks), 2500);
    }

    #[test]
    fn log_sum_exp_matches_naive() {
        let xs = [0.5f32, -1.0, 2.0];
        let naive = xs.iter().map(|x| x.exp()).sum::<f32>().ln();
        let (mut buf, mut blocks) = (Vec::new(), Vec::new());
        assert!((log_sum_exp(&xs, &mut buf, &mut blocks) - naive).abs() < 1e-6);
        let lse = log_sum_exp(&[f32::NAN, 0.0, f32::NEG_INFINITY], &mut buf, &mut blocks);
        assert!(lse.abs() < 1e-7);
        let big: Vec<f32> = (0..5000).map(|i| (i % 13) as f32 * 0.3).collect();
        let naive: f64 = big.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&big, &mut buf, &mut blocks) as f64 - naive).abs() < 1e-5);
    }

    #[test]
    fn uniform_is_in_unit_interval() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for _ in 0..1000 {
            let u = uniform(&mut rng);
            assert!((0.0..1.0).contains(&u));
        }
    }

    /// Rows of awkward values: NaN, ±inf, `f32::MAX`, ±0, heavy ties, and rows with nothing
    /// above `-inf`.
    fn awkward_rows() -> Vec<Vec<f32>> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            0.0,
            -0.0,
            1.0,
        ];
        let mut rows: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN],
            vec![f32::NEG_INFINITY; 5],
            vec![f32::NAN, f32::NEG_INFINITY, f32::NAN],
            vec![0.0; 7],
            vec![-0.0, 0.0],
            vec![f32::MAX, f32::INFINITY, f32::MAX, f32::INFINITY],
            vec![f32::NEG_INFINITY, f32::NAN, -f32::MAX],
        ];
        for i in 0..2000 {
            let len = 1 + (next() % 40) as usize;
            // Mostly few distinct values (ties), sometimes specials, sometimes wide floats.
            let row = (0..len)
                .map(|_| {
                    let r = next();
                    match r % 10 {
                        0 | 1 => specials[(r >> 8) as usize % specials.len()],
                        2..=5 => ((r >> 8) % 4) as f32 - 1.5,
                        _ => ((r >> 11) as f64 / (1u64 << 53) as f64 * 40.0 - 20.0) as f32,
                    }
                })
                .collect();
            rows.push(row);
            if i % 50 == 0 {
                // No usable value at all.
                rows.push(
                    (0..len)
                        .map(|j| {
                            if j % 2 == 0 {
                                f32::NAN
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect(),
                );
            }
        }
        rows
    }

    #[test]
    fn greedy_sampling_picks_the_greedy_token_of_the_row() {
        use crate::backend::greedy_token;
        let mut checked = (0, 0);
        for (k, row) in awkward_rows().iter().enumerate() {
            let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
            assert!(sampler.wants_only_argmax());
            match (greedy_token(row), sampler.sample(row)) {
                (Some(id), Ok(t)) => {
                    assert_eq!(t.id, id, "row {k}: {row:?}");
                    checked.0 += 1;
                }
                (None, Err(_)) => checked.1 += 1,
                (g, r) => panic!("row {k} {row:?}: greedy_token {g:?}, sample {r:?}"),
            }
        }
        assert!(checked.0 > 1000 && checked.1 > 10, "{checked:?}");
    }

    #[test]
    fn accept_greedy_records_the_token_like_sample() {
        let row = [0.5f32, 3.0, -1.0, 3.0];
        let mut sampled = Sampler::new(SamplingParams::greedy()).unwrap();
        let mut accepted = sampled.clone();
        let a = sampled.sample(&row).unwrap();
        let b = accepted.accept_greedy(1);
        assert_eq!((a.id, b.id), (1, 1));
        assert!(b.logprob.is_nan());
        assert!(b.top_logprobs.is_empty());
        for s in [&sampled, &accepted] {
            assert_eq!(s.num_generated(), 1);
            assert_eq!(s.count(1), 1);
        }
    }

    #[test]
    fn only_plain_greedy_parameters_want_only_the_argmax() {
        let yes = |p: SamplingParams| Sampler::new(p).unwrap().wants_only_argmax();
        let g = SamplingParams::greedy;
        assert!(yes(g()));
        // Filters and seeds change nothing at temperature 0; a neutral repetition penalty is off.
        assert!(yes(SamplingParams {
            top_k: Some(5),
            top_p: 0.5,
            min_p: 0.2,
            seed: Some(3),
            repetition_penalty: Some(1.0),
            ..g()
        }));
        let disqualifying = [
            ("temperature", SamplingParams::default()),
            (
                "temperature 0.5",
                SamplingParams {
                    temperature: 0.5,
                    ..g()
                },
            ),
            (
                "logprobs 0",
                SamplingParams {
                    logprobs: Some(0),
                    ..g()
                },
            ),
            (
                "logprobs 3",
                SamplingParams {
                    logprobs: Some(3),
                    ..g()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: Some(1.2),
                    ..g()
                },
            ),
            (
                "frequency_penalty",
                SamplingParams {
                    frequency_penalty: 0.5,
                    ..g()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: -0.5,
                    ..g()
                },
            ),
        ];
        for (what, p) in disqualifying {
            assert!(!yes(p), "{what}");
        }
    }

    #[test]
    fn top_p_on_equal_logits_keeps_the_lowest_ids() {
        // Equal logits all land in one histogram bucket: ties go by id, so
        // the nucleus is the lowest half of the ids.
        let n = 10_000;
        let params = SamplingParams {
            top_p: 0.5,
            seed: Some(9),
            ..Default::default()
        };
        let mut s = Sampler::new(params).unwrap();
        for _ in 0..200 {
            let id = s.sample(&vec![0.0; n]).unwrap().id;
            assert!((id as usize) < n / 2 + 1, "{id} outside the nucleus");
        }
    }
}
