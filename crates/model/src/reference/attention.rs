//! Scaled dot-product attention with GQA, learned sinks and the sliding window (spec §2.2).
//!
//! Indices here are *sequence indices* (slots of the KV cache: 0 for the first token ever
//! appended), which is what transformers' causal and sliding masks compare; RoPE positions only
//! rotate q and k. For a sequence decoded from position 0 the two coincide.

use std::ops::Range;

/// Keys visible to the query at sequence index `t`: causal (`j <= t`) and, for a sliding layer
/// with window `w`, `t - j < w` — exactly `w` keys including the query's own (pitfall 4:
/// not `w + 1`, not `w - 1`).
pub fn visible_keys(t: usize, window: Option<usize>) -> Range<usize> {
    let start = match window {
        Some(w) => (t + 1).saturating_sub(w),
        None => 0,
    };
    start..t + 1
}

/// One query head over the keys `keys` (sequence indices), with the head's sink logit.
///
/// `s_j = q·k_j · scale`; the sink `S` is a raw logit (not scaled) that joins the max and the
/// softmax denominator but has no value vector (pitfall 6):
/// `out = Σ_j exp(s_j - m) v_j / (Σ_j exp(s_j - m) + exp(S - m))`, `m = max(max_j s_j, S)`.
pub fn attend<'k>(
    q: &[f32],
    keys: Range<usize>,
    key: impl Fn(usize) -> &'k [f32],
    value: impl Fn(usize) -> &'k [f32],
    sink: f32,
    scale: f32,
    out: &mut [f32],
) {
    let scores: Vec<f32> = keys
        .clone()
        .map(|j| super::linear::dot(q, key(j)) * scale)
        .collect();
    let m = scores.iter().copied().fold(sink, f32::max);
    let mut denom = (sink - m).exp();
    out.fill(0.0);
    for (j, &s) in keys.zip(&scores) {
        let p = (s - m).exp();
        denom += p;
        for (o, &v) in out.iter_mut().zip(value(j)) {
            *o += p * v;
        }
    }
    let inv = 1.0 / denom;
    for o in out.iter_mut() {
        *o *= inv;
    }
}
