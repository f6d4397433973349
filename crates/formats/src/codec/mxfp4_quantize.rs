//! An MXFP4 encoder, used by `synth` to write OpenAI-format (`*_blocks` / `*_scales`) experts.
//!
//! Output layout (spec checkpoints.md §3.3, decodable by [`super::mxfp4::Mxfp4Matrix`]): for a
//! matrix `[rows, cols]` (a Linear's `[out, in]`), `blocks` is `[rows, cols/32, 16]` bytes where
//! byte `j` of group `g` holds element `32g + 2j` in its **low** nibble and `32g + 2j + 1` in its
//! high nibble, and `scales` is `[rows, cols/32]` E8M0 bytes (`2^(s - 127)`).
//!
//! Rule (the same as `scripts/make_fixtures.py::mxfp4_encode`, so both produce identical bytes):
//!
//! - shared exponent `e` of a 32-group: the smallest power of two with `max|x| <= 6 * 2^e`
//!   (nothing saturates), clamped to `-127..=127`; an all-zero group gets `e = -127` (scale byte
//!   0);
//! - each element: `y = |x| / 2^e` (exact) rounded to the nearest E2M1 magnitude
//!   `{0, 0.5, 1, 1.5, 2, 3, 4, 6}`, **ties to the even code** (0.25 → 0, 0.75 → 1, 1.25 → 1,
//!   1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4); sign bit set iff `x < 0`.
//!
//! This is not claimed to be the encoder OpenAI used; any MXFP4 bytes decode the same way.
//! Inputs must be finite.

use rayon::prelude::*;

use super::mxfp4::MXFP4_BLOCK;

/// Midpoints between consecutive E2M1 magnitudes.
const FP4_MID: [f64; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];

/// The shared exponent of one group (see the module docs).
#[inline]
fn group_exponent(amax: f64) -> i32 {
    if amax == 0.0 {
        return -127;
    }
    // amax comes from an f32, so it is a normal f64: floor(log2) is the unbiased exponent.
    let floor_log2 = ((amax.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let mut e = floor_log2 - 2; // amax / 2^e in [4, 8)
    if amax > 6.0 * 2f64.powi(e) {
        e += 1;
    }
    e.clamp(-127, 127)
}

/// The 4-bit code of `x` under shared exponent `e` (round to nearest, ties to even code).
#[inline]
fn encode_elem(x: f32, inv_scale: f64) -> u8 {
    let y = (x as f64).abs() * inv_scale;
    let mut c = FP4_MID.iter().filter(|&&m| m < y).count();
    if c < FP4_MID.len() && y == FP4_MID[c] && c % 2 == 1 {
        c += 1;
    }
    c as u8 | if x < 0.0 { 8 } else { 0 }
}

/// Encodes one row of `cols` values into `cols/2` block bytes and `cols/32` scale bytes.
fn encode_row(row: &[f32], blocks: &mut [u8], scales: &mut [u8]) {
    for ((grp, blk), sc) in row
        .chunks_exact(MXFP4_BLOCK)
        .zip(blocks.chunks_exact_mut(MXFP4_BLOCK / 2))
        .zip(scales.iter_mut())
    {
        let amax = grp.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        let e = group_exponent(amax);
        *sc = (e + 127) as u8;
        let inv = 2f64.powi(-e); // exact; 1/2^e as a power of two
        for (b, pair) in blk.iter_mut().zip(grp.chunks_exact(2)) {
            *b = encode_elem(pair[0], inv) | (encode_elem(pair[1], inv) << 4);
        }
    }
}

/// Quantizes a row-major `[rows, cols]` f32 matrix (`cols % 32 == 0`) to MXFP4:
/// returns `(blocks, scales)` with `rows * cols / 2` and `rows * cols / 32` bytes, in the layout
/// of the module docs (reshape to `[rows, cols/32, 16]` and `[rows, cols/32]`). Rows are
/// encoded in parallel.
pub fn quantize_mxfp4(values: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(
        values.len(),
        rows * cols,
        "values do not match [{rows}, {cols}]"
    );
    assert!(
        cols.is_multiple_of(MXFP4_BLOCK),
        "MXFP4 needs cols to be a multiple of 32, got {cols}"
    );
    let mut blocks = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * cols / MXFP4_BLOCK];
    if rows == 0 || cols == 0 {
        return (blocks, scales);
    }
    blocks
        .par_chunks_mut(cols / 2)
        .zip(scales.par_chunks_mut(cols / MXFP4_BLOCK))
        .zip(values.par_chunks(cols))
        .for_each(|((b, s), row)| encode_row(row, b, s));
    (blocks, scales)
}

#[cfg(test)]
mod tests {
    use super::super::mxfp4::{FP4_VALUES, Mxfp4Matrix};
    use super::*;

    fn decode(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
        Mxfp4Matrix::new(blocks, scales, rows, cols)
            .unwrap()
            .to_f32()
    }

    #[test]
    fn representable_values_round_trip_exactly() {
        // every group spans the full grid, max = 6 * 2^k, so the chosen exponent is k
        let rows = 3;
        let cols = 64;
        let mut vals = vec![0f32; rows * cols];
        for (i, v) in vals.iter_mut().enumerate() {
            let k = (i / 32) as i32 - 2;
            let code = if i % 32 == 0 { 7 } else { i % 16 };
            *v = FP4_VALUES[code] * 2f32.powi(k);
        }
        let (b, s) = quantize_mxfp4(&vals, rows, cols);
        let d = decode(&b, &s, rows, cols);
        for (x, y) in vals.iter().zip(&d) {
            assert_eq!(x, y);
        }
    }

    #[test]
    fn random_values_round_to_nearest() {
        let rows = 16;
        let cols = 96;
        let mut state = 0x1234_5678_9abc_def0u64;
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                ((u - 0.5) * 2f64.powi((i % 7) as i32 * 3 - 9)) as f32
            })
            .collect();
        let (b, s) = quantize_mxfp4(&vals, rows, cols);
        let d = decode(&b, &s, rows, cols);
        for (g, (xs, ys)) in vals.chunks(32).zip(d.chunks(32)).enumerate() {
            let scale = 2f64.powi(s[g] as i32 - 127);
            let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            assert!(amax <= 6.0 * scale && amax > 3.0 * scale, "exponent choice");
            for (&x, &y) in xs.iter().zip(ys) {
                // the decoded value is a nearest grid point
                let err = (x as f64 - y as f64).abs();
                let best = FP4_VALUES
                    .iter()
                    .map(|&v| (x as f64 - v as f64 * scale).abs())
                    .fold(f64::INFINITY, f64::min);
                assert_eq!(err, best, "x = {x}, decoded {y}");
            }
        }
    }

    #[test]
    fn ties_go_to_the_even_code_and_zero_groups_are_zero() {
        // max 6 -> exponent 0, so y = |x|
        let mut vals = [0f32; 64];
        let ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -0.0];
        vals[..ties.len()].copy_from_slice(&ties);
        let (b, s) = quantize_mxfp4(&vals, 1, 64);
        assert_eq!(s, vec![127, 0]);
        let d = decode(&b, &s, 1, 64);
        assert_eq!(
            &d[..10],
            &[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, 0.0]
        );
        assert_eq!(b[4] >> 4, 0, "-0.0 encodes as +0");
        assert!(b[16..].iter().all(|&x| x == 0));
    }

    #[test]
    fn low_nibble_first() {
        let mut vals = [0f32; 32];
        vals[0] = 0.5;
        vals[1] = -6.0;
        let (b, s) = quantize_mxfp4(&vals, 1, 32);
        assert_eq!(s[0], 127);
        assert_eq!(b[0], 0x01 | (0x0F << 4));
    }
}
