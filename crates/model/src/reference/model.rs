//! [`ReferenceModel`]: the GPT-OSS forward pass over borrowed checkpoint weights.
//!
//! ```text
//! x = embed[ids]
//! for each layer:  x += o_proj(attention(rope(q(h)), rope(k(h)), v(h)))   h = rmsnorm(x)
//!                  x += moe(rmsnorm(x))
//! logits = lm_head(rmsnorm(x))
//! ```
//!
//! Several sequences can go through one call ([`ReferenceModel::forward_batch`]): their tokens
//! are stacked so that every weight is decoded once per call, and only attention looks at each
//! sequence (and its own [`KvCache`]) separately.

use std::ops::Range;

use gptoss_formats::config::SWIGLU_ALPHA;
use gptoss_formats::weights::LayerWeights;
use gptoss_formats::{GptOssConfig, ModelWeights, Vector};
use rayon::prelude::*;

use super::attention::{Segment, attend_segments};
use super::kv_cache::KvCache;
use super::linear::{linear, matmul};
use super::moe::{route, swiglu};
use super::rope::Rope;
use super::{ReferenceError, Result, rmsnorm};

/// The f32 reference model: weight views plus the RoPE table. Cheap to build (nothing is
/// decoded up front), `Send + Sync`, and stateless: per-sequence state lives in [`KvCache`].
#[derive(Debug, Clone)]
pub struct ReferenceModel<'a> {
    weights: ModelWeights<'a>,
    rope: Rope,
}

/// One sequence's part of a batched forward: its new tokens, their RoPE positions, and its cache
/// (the tokens attend to everything the cache holds, then are appended to it).
#[derive(Debug)]
pub struct SeqInput<'s> {
    pub tokens: &'s [u32],
    pub positions: &'s [usize],
    pub cache: &'s mut KvCache,
}

/// The sequences of a batch stacked for one pass: their tokens and positions end to end, and
/// which rows belong to which cache.
pub(super) struct Stacked<'c> {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub segs: Vec<Segment<'c>>,
}

impl<'a> ReferenceModel<'a> {
    /// Wraps mapped weights (see [`ModelWeights::new`]); computes only the RoPE table.
    pub fn new(weights: ModelWeights<'a>) -> Self {
        let rope = Rope::from_config(weights.config);
        ReferenceModel { weights, rope }
    }

    /// The model configuration.
    pub fn config(&self) -> &'a GptOssConfig {
        self.weights.config
    }

    /// The weight views.
    pub fn weights(&self) -> &ModelWeights<'a> {
        &self.weights
    }

    /// The RoPE parameters and inverse frequencies.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// A new empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config())
    }

    /// Logits `[T, vocab]` of `tokens` at `positions`, attending over `cache` and the new tokens,
    /// which are then appended to `cache`.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[usize],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        let hidden = self.forward_batch(&mut [SeqInput {
            tokens,
            positions,
            cache,
        }])?;
        Ok(self.logits_for(&hidden))
    }

    /// The final hidden states (before the final norm), `[ΣT, hidden]`, of several sequences in
    /// one pass, rows in the order of `seqs`. Everything is validated before any cache changes.
    pub fn forward_batch(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<f32>> {
        let cfg = self.config();
        let mut batch = self.stack(seqs, |c| c.check(cfg).map_err(ReferenceError::Cache))?;
        let mut x = self.embed(&batch.tokens)?;
        for l in 0..cfg.num_hidden_layers {
            x = self.layer(l, x, &batch.positions, &mut batch.segs);
        }
        Ok(x)
    }

    /// Checks every sequence of a batch (as many positions as tokens, its cache with
    /// `check_cache`, every position within the context), then stacks them. Nothing is modified.
    pub(super) fn stack<'c>(
        &self,
        seqs: &'c mut [SeqInput<'_>],
        check_cache: impl Fn(&KvCache) -> Result<()>,
    ) -> Result<Stacked<'c>> {
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        for s in seqs.iter() {
            if s.tokens.len() != s.positions.len() {
                return Err(ReferenceError::Shape(format!(
                    "{} tokens but {} positions",
                    s.tokens.len(),
                    s.positions.len()
                )));
            }
            check_cache(s.cache)?;
            tokens.extend_from_slice(s.tokens);
            positions.extend_from_slice(s.positions);
        }
        self.check_positions(&positions)?;
        let mut start = 0;
        let segs = seqs
            .iter_mut()
            .map(|s| {
                let seg = Segment {
                    start,
                    len: s.tokens.len(),
                    cache: &mut *s.cache,
                };
                start += seg.len;
                seg
            })
            .collect();
        Ok(Stacked {
            tokens,
            positions,
            segs,
        })
    }

    /// Embedding rows of `tokens` (`[T, hidden]`; no scaling, pitfall 12).
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (h, vocab) = (self.config().hidden_size, self.config().vocab_size);
        if let Some((index, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= vocab)
        {
            return Err(ReferenceError::TokenOutOfRange {
                index,
                token,
                vocab_size: vocab,
            });
        }
        let mut x = vec![0f32; tokens.len() * h];
        x.par_chunks_mut(h)
            .zip(tokens.par_iter())
            .for_each(|(row, &t)| self.weights.embed.decode_row(t as usize, row));
        Ok(x)
    }

    /// Final norm and lm_head on hidden states `[n, hidden]` → logits `[n, vocab]` (no bias, no
    /// softcap, untied: pitfall 12).
    pub fn logits_for(&self, hidden: &[f32]) -> Vec<f32> {
        let h = self.config().hidden_size;
        let x = self.norm(hidden, &self.weights.norm);
        matmul(&x, hidden.len() / h, &self.weights.lm_head, None)
    }

    /// `rmsnorm(x, w)` with the model's epsilon.
    pub(super) fn norm(&self, x: &[f32], w: &Vector<'_>) -> Vec<f32> {
        rmsnorm(x, &w.to_f32(), self.config().rms_norm_eps as f32)
    }

    /// Decoder layer `l` on `hidden` (`[T, H]`) at `positions`, attending over `cache` (whose
    /// layer `l` receives the new K/V): attention block then MoE block, both with residuals.
    pub fn layer_forward(
        &self,
        l: usize,
        hidden: &[f32],
        positions: &[usize],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        self.check_layer(l)?;
        let h = self.config().hidden_size;
        if hidden.len() != positions.len() * h {
            return Err(ReferenceError::Shape(format!(
                "hidden has {} values, expected {} positions × {h}",
                hidden.len(),
                positions.len()
            )));
        }
        self.check_positions(positions)?;
        cache.check(self.config()).map_err(ReferenceError::Cache)?;
        let seg = Segment {
            start: 0,
            len: positions.len(),
            cache,
        };
        Ok(self.layer(l, hidden.to_vec(), positions, &mut [seg]))
    }

    /// The MoE output of layer `l` (without residual) for already-normed inputs `h` (`[T, H]`):
    /// `Σ_top-k w_e · expert_e(h)`.
    pub fn moe_forward(&self, l: usize, h: &[f32]) -> Result<Vec<f32>> {
        self.check_layer(l)?;
        self.check_rows(h)?;
        Ok(self.moe(&self.weights.layers[l], h))
    }

    /// A single expert of layer `l` on `x` (`[T, H]`): `swiglu(x @ Wgu.T + bgu) @ Wd.T + bd`,
    /// without the routing weight.
    pub fn expert_forward(&self, l: usize, e: usize, x: &[f32]) -> Result<Vec<f32>> {
        self.check_layer(l)?;
        if e >= self.config().num_local_experts {
            return Err(ReferenceError::Index(format!(
                "expert {e}: the model has {} experts per layer",
                self.config().num_local_experts
            )));
        }
        self.check_rows(x)?;
        Ok(self.expert(&self.weights.layers[l], e, x))
    }

    fn check_layer(&self, l: usize) -> Result<()> {
        let n = self.config().num_hidden_layers;
        if l >= n {
            return Err(ReferenceError::Index(format!(
                "layer {l}: the model has {n} layers"
            )));
        }
        Ok(())
    }

    fn check_rows(&self, x: &[f32]) -> Result<()> {
        let h = self.config().hidden_size;
        if !x.len().is_multiple_of(h) {
            return Err(ReferenceError::Shape(format!(
                "{} values are not rows of {h}",
                x.len()
            )));
        }
        Ok(())
    }

    fn check_positions(&self, positions: &[usize]) -> Result<()> {
        let max = self.config().max_position_embeddings;
        match positions.iter().enumerate().find(|(_, p)| **p >= max) {
            Some((index, &position)) => Err(ReferenceError::PositionOutOfRange {
                index,
                position,
                max,
            }),
            None => Ok(()),
        }
    }

    /// One decoder layer over the stacked rows of all segments.
    fn layer(
        &self,
        l: usize,
        mut x: Vec<f32>,
        positions: &[usize],
        segs: &mut [Segment<'_>],
    ) -> Vec<f32> {
        let w = &self.weights.layers[l];
        let attn = self.attention(l, w, &self.norm(&x, &w.input_norm), positions, segs);
        add_assign(&mut x, &attn);
        let mlp = self.moe(w, &self.norm(&x, &w.post_norm));
        add_assign(&mut x, &mlp);
        x
    }

    /// The attention block (without residual): q/k/v, RoPE, per-sequence attention over the
    /// cache plus the new tokens, o_proj. Appends the new K/V to each segment's cache.
    fn attention(
        &self,
        l: usize,
        w: &LayerWeights<'_>,
        h: &[f32],
        positions: &[usize],
        segs: &mut [Segment<'_>],
    ) -> Vec<f32> {
        let cfg = self.config();
        let group = cfg.num_attention_heads / cfg.num_key_value_heads;
        let t = positions.len();
        let mut q = linear(h, t, &w.q);
        let mut k = linear(h, t, &w.k);
        let v = linear(h, t, &w.v);
        self.rope.apply_rows(&mut q, positions);
        self.rope.apply_rows(&mut k, positions);
        let sinks = w.sinks.to_f32();
        let o = attend_segments(l, &q, &k, &v, &sinks, cfg.head_dim, group, segs);
        linear(&o, t, &w.o)
    }

    /// The MoE block (without residual) on normed inputs `h` (`[T, H]`): route every token, then
    /// run each selected expert once on the tokens routed to it and add its weighted output.
    fn moe(&self, w: &LayerWeights<'_>, h: &[f32]) -> Vec<f32> {
        self.moe_part(w, h, 0..self.config().num_local_experts)
    }

    /// The share of the MoE block of the experts in `experts` (all of them for the whole block,
    /// a rank's block when sharded): every token is routed over all experts, but only the
    /// (token, expert) pairs with the expert in `experts` are computed and weighted.
    pub(super) fn moe_part(
        &self,
        w: &LayerWeights<'_>,
        h: &[f32],
        experts: Range<usize>,
    ) -> Vec<f32> {
        let cfg = self.config();
        let hs = cfg.hidden_size;
        let t = h.len() / hs;
        let router = linear(h, t, &w.router);
        let e_count = cfg.num_local_experts;
        // tokens[k] = (token, routing weight) for every token that selected expert start + k.
        let mut tokens: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts.len()];
        for (ti, logits) in router.chunks_exact(e_count).enumerate() {
            for (e, we) in route(logits, cfg.num_experts_per_tok) {
                if experts.contains(&e) {
                    tokens[e - experts.start].push((ti, we));
                }
            }
        }
        let mut y = vec![0f32; h.len()];
        for (k, routed) in tokens.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let xe: Vec<f32> = routed
                .iter()
                .flat_map(|&(ti, _)| h[ti * hs..(ti + 1) * hs].iter().copied())
                .collect();
            let ye = self.expert(w, experts.start + k, &xe);
            // Down bias inside the weighting (pitfall 10): y += w_e · (act @ Wd.T + bd).
            for (&(ti, we), row) in routed.iter().zip(ye.chunks_exact(hs)) {
                for (yv, &v) in y[ti * hs..(ti + 1) * hs].iter_mut().zip(row) {
                    *yv += we * v;
                }
            }
        }
        y
    }

    /// Expert `e` on `x` (`[n, H]`), unweighted.
    fn expert(&self, w: &LayerWeights<'_>, e: usize, x: &[f32]) -> Vec<f32> {
        let cfg = self.config();
        let ex = &w.experts[e];
        let n = x.len() / cfg.hidden_size;
        let i_size = cfg.intermediate_size;
        let gu = linear(x, n, &ex.gate_up);
        let mut act = vec![0f32; n * i_size];
        for (a, g) in act
            .chunks_exact_mut(i_size)
            .zip(gu.chunks_exact(2 * i_size))
        {
            swiglu(g, SWIGLU_ALPHA, cfg.swiglu_limit as f32, a);
        }
        linear(&act, n, &ex.down)
    }
}

/// `x += y`, elementwise.
pub(super) fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
