//! `y[T, out] = x[T, in] @ W.T (+ b)` over a stored [`Matrix`], decoding weights on the fly.
//!
//! The weights are never materialized: every worker decodes one stretch of stored elements at a
//! time into its own buffer and uses it for all `T` token rows before moving on, so each weight
//! is decoded exactly once per call and memory stays at `O(T · out)` plus one row per thread.
//!
//! - `OutIn` storage (nn.Linear, MXFP4, Unsloth experts): row `r` of `W` is contiguous; workers
//!   take chunks of output rows, decode each row once and dot it with the `T` inputs.
//! - `InOut` storage (transformers' fused expert stacks, computed as `x @ W`): input row `c` of
//!   the stack holds every output; workers take chunks of output columns, decode the range of
//!   each input row and accumulate `x[t, c] · W[c, r0..r1]` (an axpy).

use gptoss_formats::weights::Orientation;
use gptoss_formats::{Linear, Matrix};
use rayon::prelude::*;

/// Dot product in f32 with eight independent partial sums (fixed order, so deterministic).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `x @ W.T + b` for a [`Linear`] (its bias, if any, decoded exactly).
pub fn linear(x: &[f32], t: usize, lin: &Linear<'_>) -> Vec<f32> {
    let bias = lin.bias.as_ref().map(|b| b.to_f32());
    matmul(x, t, &lin.weight, bias.as_deref())
}

/// `y[T, rows] = x[T, cols] @ W.T (+ b)` where `W` is the logical `[rows = out, cols = in]`
/// matrix, whatever its storage order and encoding.
pub fn matmul(x: &[f32], t: usize, w: &Matrix<'_>, bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(
        x.len(),
        t * w.cols,
        "{}: input is not [{t}, {}]",
        w.name,
        w.cols
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), w.rows, "{}: bias length", w.name);
    }
    if t == 0 {
        return Vec::new();
    }
    match w.orientation {
        Orientation::OutIn => matmul_out_in(x, t, w, bias),
        Orientation::InOut => matmul_in_out(x, t, w, bias),
    }
}

/// Enough chunks to keep every thread busy, each still large enough to amortize scheduling.
fn chunk_len(n: usize, min: usize) -> usize {
    let parts = rayon::current_num_threads() * 8;
    n.div_ceil(parts).max(min).min(n.max(1))
}

fn matmul_out_in(x: &[f32], t: usize, w: &Matrix<'_>, bias: Option<&[f32]>) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    let rpc = chunk_len(rows, 4);
    // Computed transposed ([out, T]) so each worker owns a contiguous output block.
    let mut yt = vec![0f32; rows * t];
    yt.par_chunks_mut(rpc * t).enumerate().for_each_init(
        || vec![0f32; cols],
        |row, (ci, block)| {
            for (k, y) in block.chunks_exact_mut(t).enumerate() {
                let r = ci * rpc + k;
                w.decode_stored(r * cols, row);
                let b = bias.map_or(0.0, |b| b[r]);
                for (ti, yv) in y.iter_mut().enumerate() {
                    *yv = dot(&x[ti * cols..(ti + 1) * cols], row) + b;
                }
            }
        },
    );
    let mut y = vec![0f32; t * rows];
    for r in 0..rows {
        for ti in 0..t {
            y[ti * rows + r] = yt[r * t + ti];
        }
    }
    y
}

fn matmul_in_out(x: &[f32], t: usize, w: &Matrix<'_>, bias: Option<&[f32]>) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    let width = chunk_len(rows, 64);
    let n_chunks = rows.div_ceil(width);
    // Each worker: output columns r0..r1 for all T tokens, accumulated over the `cols` inputs.
    let parts: Vec<Vec<f32>> = (0..n_chunks)
        .into_par_iter()
        .map_init(
            || vec![0f32; width],
            |buf, ci| {
                let r0 = ci * width;
                let wd = width.min(rows - r0);
                let buf = &mut buf[..wd];
                let mut acc = vec![0f32; t * wd];
                for c in 0..cols {
                    w.decode_stored(c * rows + r0, buf);
                    for ti in 0..t {
                        let xv = x[ti * cols + c];
                        for (a, &wv) in acc[ti * wd..(ti + 1) * wd].iter_mut().zip(buf.iter()) {
                            *a += xv * wv;
                        }
                    }
                }
                acc
            },
        )
        .collect();
    let mut y = vec![0f32; t * rows];
    for (ci, acc) in parts.iter().enumerate() {
        let r0 = ci * width;
        let wd = acc.len() / t;
        for ti in 0..t {
            for k in 0..wd {
                y[ti * rows + r0 + k] = acc[ti * wd + k] + bias.map_or(0.0, |b| b[r0 + k]);
            }
        }
    }
    y
}
