//! The mixture-of-experts block pieces: routing and the clamped SwiGLU (spec §2.3-§2.5).

/// The top-`k` experts of one token and their weights.
///
/// The `k` largest **raw** router logits are selected (descending; on a tie the lower index
/// first), then the softmax is taken over those `k` logits only (pitfall 9: a softmax over all
/// experts, un-renormalized, is wrong).
pub fn route(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(k);
    let m = idx
        .iter()
        .map(|&e| logits[e])
        .fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = idx.iter().map(|&e| (logits[e] - m).exp()).collect();
    let sum: f32 = exps.iter().sum();
    idx.into_iter()
        .zip(exps)
        .map(|(e, x)| (e, x / sum))
        .collect()
}

/// GPT-OSS's clamped SwiGLU on one token's gate_up output (`[2I]`, gate at even, up at odd
/// indices — pitfall 8) into `out` (`[I]`):
/// `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`, `out = (u + 1) · g · σ(alpha · g)`
/// (pitfall 7: gate clamped from above only, up on both sides, the `+1` on up).
pub fn swiglu(gate_up: &[f32], alpha: f32, limit: f32, out: &mut [f32]) {
    debug_assert_eq!(gate_up.len(), 2 * out.len());
    for (o, pair) in out.iter_mut().zip(gate_up.chunks_exact(2)) {
        let g = pair[0].min(limit);
        let u = pair[1].clamp(-limit, limit);
        let glu = g / (1.0 + (-alpha * g).exp());
        *o = (u + 1.0) * glu;
    }
}
