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
//!    logits, ties going to the lowest token id; no randomness is consumed.
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
//! Greedy sampling is a linear scan; top-k uses `select_nth_unstable` (linear)
//! and sorts only the `k` survivors; top-p sorts progressively larger
//! prefixes of the most likely tokens, only sorting the whole vocabulary when
//! the nucleus really is that large; min-p is a linear filter.

use std::collections::HashMap;
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

/// First prefix of the most likely tokens that top-p sorts before deciding
/// whether it needs to look further (grows ×8 each round).
const TOP_P_FIRST_CHUNK: usize = 1024;

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
fn check_decimal(param: &'static str, value: f32, min: Lower, max: f32) -> Result<(), SamplingError> {
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
fn below_min(param: &'static str, op: &str, bound: impl Display, value: impl Display) -> SamplingError {
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
    /// Unnormalised probabilities, parallel to `idx`.
    weights: Vec<f64>,
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

    /// Samples the next token from one step's `logits` (one entry per
    /// vocabulary id) and records it as generated.
    ///
    /// `NaN` logits are never chosen and `+inf` ones dominate. Fails only if
    /// `logits` is empty or holds no finite-or-`+inf` value.
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

        let (max_id, max) = argmax(&self.scratch);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::NoFiniteLogits { vocab: n });
        }

        let id = if self.params.is_greedy() {
            max_id
        } else {
            self.draw(max)
        };

        let src: &[f32] = match self.logprobs_mode {
            LogprobsMode::Raw => logits,
            LogprobsMode::Penalized => &self.scratch,
        };
        let lse = log_sum_exp(src);
        let logprob = sanitize(src[id as usize]) - lse;
        let top_logprobs = match self.params.logprobs {
            Some(k) if k > 0 => top_logprobs(src, lse, k, &mut self.idx),
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
        let inv_t = 1.0 / p.temperature;
        let s = &self.scratch;
        let idx = &mut self.idx;
        // Unnormalised probability relative to the most likely token (<= 1).
        let weight = |i: u32| (((s[i as usize] - max) * inv_t).exp()) as f64;
        // Most likely first, ties by lower id.
        let desc = |a: &u32, b: &u32| s[*b as usize].total_cmp(&s[*a as usize]).then(a.cmp(b));

        idx.clear();
        idx.extend((0..s.len() as u32).filter(|&i| s[i as usize] > f32::NEG_INFINITY));
        let mut reordered = false;

        if let Some(k) = p.top_k
            && k > 0
            && k < idx.len()
        {
            idx.select_nth_unstable_by(k - 1, desc);
            idx.truncate(k);
            reordered = true;
        }

        if p.top_p < 1.0 {
            let total: f64 = idx.iter().map(|&i| weight(i)).sum();
            let target = p.top_p as f64 * total;
            let mut chunk = TOP_P_FIRST_CHUNK.min(idx.len());
            'grow: loop {
                if chunk < idx.len() {
                    idx.select_nth_unstable_by(chunk - 1, desc);
                }
                idx[..chunk].sort_unstable_by(desc);
                let mut cum = 0.0f64;
                for j in 0..chunk {
                    if cum >= target {
                        idx.truncate(j.max(1));
                        break 'grow;
                    }
                    cum += weight(idx[j]);
                }
                if chunk == idx.len() {
                    break;
                }
                chunk = chunk.saturating_mul(8).min(idx.len());
            }
            reordered = true;
        }

        if p.min_p > 0.0 {
            // p_i / p_max = exp((l_i - max) / T) >= min_p
            let ln_min_p = p.min_p.ln();
            idx.retain(|&i| (s[i as usize] - max) * inv_t >= ln_min_p);
        }

        if reordered {
            idx.sort_unstable();
        }

        self.weights.clear();
        self.weights.extend(idx.iter().map(|&i| weight(i)));
        let total: f64 = self.weights.iter().sum();
        let u = uniform(&mut self.rng) * total;
        let mut acc = 0.0f64;
        let mut last = idx[0];
        for (&i, &w) in idx.iter().zip(&self.weights) {
            if w > 0.0 {
                acc += w;
                last = i;
                if acc > u {
                    return i;
                }
            }
        }
        // Rounding left `u` at the very top: take the last token with mass.
        last
    }
}

/// `NaN -> -inf`, `+inf -> f32::MAX`, everything else unchanged.
#[inline]
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX
    } else {
        x
    }
}

/// Index and value of the largest element, the lowest index on ties.
fn argmax(xs: &[f32]) -> (u32, f32) {
    let mut best = (0u32, xs[0]);
    for (i, &x) in xs.iter().enumerate().skip(1) {
        if x > best.1 {
            best = (i as u32, x);
        }
    }
    best
}

/// `log(sum(exp(x)))` over the sanitised values of `xs`.
fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs.iter().map(|&x| sanitize(x)).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let sum: f64 = xs.iter().map(|&x| (sanitize(x) - max).exp() as f64).sum();
    max + sum.ln() as f32
}

/// The `k` largest entries of `src` (sanitised), as `(id, value - lse)`,
/// most likely first, ties by lower id. `idx` is a scratch buffer.
fn top_logprobs(src: &[f32], lse: f32, k: usize, idx: &mut Vec<u32>) -> Vec<(u32, f32)> {
    let k = k.min(src.len());
    let desc = |a: &u32, b: &u32| {
        sanitize(src[*b as usize])
            .total_cmp(&sanitize(src[*a as usize]))
            .then(a.cmp(b))
    };
    idx.clear();
    idx.extend(0..src.len() as u32);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, desc);
        idx.truncate(k);
    }
    idx.sort_unstable_by(desc);
    idx.iter().map(|&i| (i, sanitize(src[i as usize]) - lse)).collect()
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
    }

    #[test]
    fn argmax_prefers_lowest_id_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), (1, 3.0));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]).0, 0);
    }

    #[test]
    fn log_sum_exp_matches_naive() {
        let xs = [0.5f32, -1.0, 2.0];
        let naive = xs.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((log_sum_exp(&xs) - naive).abs() < 1e-6);
        assert!((log_sum_exp(&[f32::NAN, 0.0]) - 0.0).abs() < 1e-7);
    }

    #[test]
    fn uniform_is_in_unit_interval() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for _ in 0..1000 {
            let u = uniform(&mut rng);
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn top_p_nucleus_spans_several_chunks() {
        // Equal logits: the nucleus is the lowest ids, and it is far larger
        // than the first sorted chunk.
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
