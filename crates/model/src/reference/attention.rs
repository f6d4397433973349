//! Scaled dot-product attention with GQA, learned sinks and the sliding window (spec §2.2).
//!
//! Indices here are *sequence indices* (slots of the KV cache: 0 for the first token ever
//! appended), which is what transformers' causal and sliding masks compare; RoPE positions only
//! rotate q and k. For a sequence decoded from position 0 the two coincide.

use std::ops::Range;

use rayon::prelude::*;

use super::kv_cache::KvCache;

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

/// Rows `start..start + len` of a stacked batch belong to one sequence with this cache.
#[derive(Debug)]
pub(crate) struct Segment<'c> {
    pub start: usize,
    pub len: usize,
    pub cache: &'c mut KvCache,
}

/// Attention of layer `l` for the stacked new rows of every segment: each row attends to its own
/// sequence's cache plus that sequence's new rows up to itself, then the new K/V are appended to
/// each segment's cache.
///
/// `q` is `[T, heads·hd]`, `k` and `v` `[T, (heads / group)·hd]` (q and k rotated already);
/// `sinks` holds one logit per query head, and query head `hq` reads kv head `hq / group` (GQA).
/// Returns the heads' outputs, `[T, heads·hd]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_segments(
    l: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: &[f32],
    hd: usize,
    group: usize,
    segs: &mut [Segment<'_>],
) -> Vec<f32> {
    let nh = sinks.len();
    let (qd, kvd) = (nh * hd, nh / group * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut o = vec![0f32; q.len()];
    for seg in segs.iter_mut() {
        let lc = seg.cache.layer_mut(l);
        let len0 = lc.len();
        let window = lc.window();
        let (k_new, v_new) = (&k[seg.start * kvd..], &v[seg.start * kvd..]);
        let lc_ref = &*lc;
        // One task per (new token i, query head hq); GQA: head hq reads kv head hq / group.
        o[seg.start * qd..(seg.start + seg.len) * qd]
            .par_chunks_mut(hd)
            .enumerate()
            .for_each(|(n, out)| {
                let (i, hq) = (n / nh, n % nh);
                let g = hq / group;
                let head = g * hd..(g + 1) * hd;
                let key = |j: usize| kv_row(j, len0, |j| lc_ref.key(j), k_new, kvd, &head);
                let value = |j: usize| kv_row(j, len0, |j| lc_ref.value(j), v_new, kvd, &head);
                let qi = &q[(seg.start + i) * qd + hq * hd..][..hd];
                attend(
                    qi,
                    visible_keys(len0 + i, window),
                    key,
                    value,
                    sinks[hq],
                    scale,
                    out,
                );
            });
        for i in 0..seg.len {
            let r = (seg.start + i) * kvd;
            lc.push(&k[r..r + kvd], &v[r..r + kvd]);
        }
    }
    o
}

/// Head `head` of the K (or V) row at sequence index `j`: from the cache below `len0`, from the
/// new rows above.
fn kv_row<'r>(
    j: usize,
    len0: usize,
    cached: impl Fn(usize) -> &'r [f32],
    new: &'r [f32],
    kvd: usize,
    head: &Range<usize>,
) -> &'r [f32] {
    if j < len0 {
        &cached(j)[head.clone()]
    } else {
        &new[(j - len0) * kvd..][head.clone()]
    }
}
