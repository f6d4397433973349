//! Rotary position embedding with YaRN scaling, exactly as spec model.md §4.
//!
//! Three details decide whether logits match transformers / OpenAI:
//! 1. the YaRN correction range is **not** truncated (`low = 8.0928…`, `high = 17.398…`, not 8 and
//!    18), whatever `truncate` says or omits in `config.json` (pitfall 1);
//! 2. the concentration `0.1 · ln(factor) + 1` multiplies **both** cos and sin, and both q and k
//!    are rotated with them, so q·k carries its square (pitfall 2);
//! 3. the rotation is rotate-half on `[0, d/2)` / `[d/2, d)`, not interleaved pairs (pitfall 3).

use gptoss_formats::GptOssConfig;

/// The YaRN RoPE parameters of a model and its inverse-frequency table.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// `head_dim`.
    pub dim: usize,
    /// `inv[i]`, `i < dim / 2`: computed in f64 and rounded once to f32.
    pub inv_freq: Vec<f32>,
    /// The YaRN attention factor ("mscale") applied to cos and sin.
    pub concentration: f32,
    /// Start of the ramp (untruncated).
    pub low: f64,
    /// End of the ramp (untruncated).
    pub high: f64,
}

impl Rope {
    /// The tables of `config` (`head_dim`, `rope_theta`, `rope_scaling`).
    pub fn from_config(config: &GptOssConfig) -> Self {
        let s = &config.rope_scaling;
        Self::yarn(
            config.head_dim,
            config.rope_theta,
            s.factor,
            s.original_max_position_embeddings as f64,
            s.beta_fast,
            s.beta_slow,
        )
    }

    /// YaRN with an untruncated correction range (transformers `_compute_yarn_parameters` with
    /// `truncate = false`, OpenAI `_compute_concentration_and_inv_freq`).
    pub fn yarn(
        dim: usize,
        base: f64,
        factor: f64,
        original_max: f64,
        beta_fast: f64,
        beta_slow: f64,
    ) -> Self {
        let d = dim as f64;
        // The dimension index whose wavelength completes `r` rotations over the original context.
        let corr =
            |r: f64| d * (original_max / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
        let low = corr(beta_fast);
        let high = corr(beta_slow);
        let half = dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let pf = base.powf(2.0 * i as f64 / d);
                // transformers guards a zero-width ramp the same way (`max == min` → +0.001).
                let span = if high == low { 0.001 } else { high - low };
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                ((1.0 / (factor * pf)) * ramp + (1.0 / pf) * (1.0 - ramp)) as f32
            })
            .collect();
        let concentration = if factor > 1.0 {
            0.1 * factor.ln() + 1.0
        } else {
            1.0
        };
        Rope {
            dim,
            inv_freq,
            concentration: concentration as f32,
            low,
            high,
        }
    }

    /// `(cos, sin)` at `pos`, each `dim / 2` values, already multiplied by the concentration.
    /// The angle is the f32 product `pos · inv[i]`, as transformers forms it.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let c = self.concentration as f64;
        self.inv_freq
            .iter()
            .map(|&f| {
                let angle = ((pos as f32) * f) as f64;
                ((angle.cos() * c) as f32, (angle.sin() * c) as f32)
            })
            .unzip()
    }

    /// Rotates every `dim`-wide head vector of `x` (one token's heads, concatenated) in place.
    pub fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.dim / 2;
        for head in x.chunks_exact_mut(self.dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }

    /// Rotates `x` (`[T, heads · dim]`) with the tables of `positions[t]` for row `t`.
    pub fn apply_rows(&self, x: &mut [f32], positions: &[usize]) {
        let width = x.len() / positions.len().max(1);
        for (row, &p) in x.chunks_exact_mut(width).zip(positions) {
            let (cos, sin) = self.cos_sin(p);
            self.apply(row, &cos, &sin);
        }
    }
}
