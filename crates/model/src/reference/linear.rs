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
//!
//! Both work on any row and column range of the matrix ([`MatrixSlice`]), as the sharded forward
//! needs; [`matmul`] is the whole matrix.

use std::ops::Range;

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
    MatrixSlice::new(w, 0..w.rows, 0..w.cols).matmul(x, t, bias)
}

/// A row and column range of a stored [`Matrix`] (logical `[rows = out, cols = in]`), decoded on
/// the fly like [`matmul`] does for whole matrices (the sharded forward multiplies by a rank's
/// rows or columns). Rows are offsets into `decode_stored` for `OutIn` storage; columns are
/// ranges within each row.
#[derive(Debug, Clone)]
pub struct MatrixSlice<'m, 'a> {
    pub matrix: &'m Matrix<'a>,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

impl<'m, 'a> MatrixSlice<'m, 'a> {
    /// Rows `rows` and columns `cols` of `matrix` (panics if out of bounds).
    pub fn new(matrix: &'m Matrix<'a>, rows: Range<usize>, cols: Range<usize>) -> Self {
        assert!(
            rows.start <= rows.end && rows.end <= matrix.rows,
            "{}: rows {rows:?} of {}",
            matrix.name,
            matrix.rows
        );
        assert!(
            cols.start <= cols.end && cols.end <= matrix.cols,
            "{}: columns {cols:?} of {}",
            matrix.name,
            matrix.cols
        );
        MatrixSlice { matrix, rows, cols }
    }

    /// Rows `rows`, every column.
    pub fn rows(matrix: &'m Matrix<'a>, rows: Range<usize>) -> Self {
        Self::new(matrix, rows, 0..matrix.cols)
    }

    /// Columns `cols`, every row.
    pub fn cols(matrix: &'m Matrix<'a>, cols: Range<usize>) -> Self {
        Self::new(matrix, 0..matrix.rows, cols)
    }

    /// Number of rows of the slice.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// Number of columns of the slice.
    pub fn num_cols(&self) -> usize {
        self.cols.len()
    }

    /// Decodes row `r` of the slice (row `rows.start + r` of the matrix, its `cols`) into `dst`.
    pub fn decode_row(&self, r: usize, dst: &mut [f32]) {
        assert!(r < self.num_rows() && dst.len() == self.num_cols());
        let m = self.matrix;
        let row = self.rows.start + r;
        match m.orientation {
            Orientation::OutIn => m.decode_stored(row * m.cols + self.cols.start, dst),
            Orientation::InOut => {
                let mut one = [0f32];
                for (k, d) in dst.iter_mut().enumerate() {
                    m.decode_stored((self.cols.start + k) * m.rows + row, &mut one);
                    *d = one[0];
                }
            }
        }
    }

    /// `y[T, num_rows] = x[T, num_cols] @ S.T (+ b)`, `b` of `num_rows` values.
    pub fn matmul(&self, x: &[f32], t: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (nr, nc) = (self.num_rows(), self.num_cols());
        assert_eq!(
            x.len(),
            t * nc,
            "{}: input is not [{t}, {nc}]",
            self.matrix.name
        );
        if let Some(b) = bias {
            assert_eq!(b.len(), nr, "{}: bias length", self.matrix.name);
        }
        if t == 0 || nr == 0 {
            return vec![0f32; t * nr];
        }
        match self.matrix.orientation {
            Orientation::OutIn => self.matmul_out_in(x, t, bias),
            Orientation::InOut => self.matmul_in_out(x, t, bias),
        }
    }

    fn matmul_out_in(&self, x: &[f32], t: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (rows, cols) = (self.num_rows(), self.num_cols());
        let rpc = chunk_len(rows, 4);
        // Computed transposed ([out, T]) so each worker owns a contiguous output block.
        let mut yt = vec![0f32; rows * t];
        yt.par_chunks_mut(rpc * t).enumerate().for_each_init(
            || vec![0f32; cols],
            |row, (ci, block)| {
                for (k, y) in block.chunks_exact_mut(t).enumerate() {
                    let r = ci * rpc + k;
                    self.decode_row(r, row);
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

    fn matmul_in_out(&self, x: &[f32], t: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (rows, cols) = (self.num_rows(), self.num_cols());
        let m = self.matrix;
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
                        let stored_row = self.cols.start + c;
                        m.decode_stored(stored_row * m.rows + self.rows.start + r0, buf);
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
}

/// Enough chunks to keep every thread busy, each still large enough to amortize scheduling.
fn chunk_len(n: usize, min: usize) -> usize {
    let parts = rayon::current_num_threads() * 8;
    n.div_ceil(parts).max(min).min(n.max(1))
}
