//! An MXFP4 encoder, used by `synth` and `convert` to write OpenAI-format expert weights.
//!
//! Layout written (the same as the decoder in [`super::mxfp4`] reads): for a row-major
//! `[rows, cols]` matrix, one E8M0 scale per 32 consecutive elements of a row and 16 bytes of
//! nibbles, element `2j` in the low nibble. The scale is the smallest power of two that makes the
//! block's largest magnitude fit E2M1's maximum of 6; each value is rounded to the nearest E2M1
//! value (ties to the even code). Not meant to be bit-identical to any other encoder.

use super::mxfp4::{FP4_VALUES, MXFP4_BLOCK};

/// Nearest E2M1 code (0..=7 magnitude, sign in bit 3) for `x` already divided by the scale.
fn encode_e2m1(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    let m = x.abs();
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for (code, v) in FP4_VALUES[..8].iter().enumerate() {
        let err = (m - v).abs();
        // Strictly smaller error wins; on a tie the even code (smaller mantissa bit) stays.
        if err < best_err || (err == best_err && code % 2 == 0 && best % 2 == 1) {
            best_err = err;
            best = code as u8;
        }
    }
    best | sign
}

/// Encodes a row-major `[rows, cols]` f32 matrix (`cols` a multiple of 32) as MXFP4
/// `(blocks [rows * cols / 2], scales [rows * cols / 32])`.
pub fn quantize_mxfp4(values: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(values.len(), rows * cols, "values must be rows * cols");
    assert_eq!(cols % MXFP4_BLOCK, 0, "cols must be a multiple of 32");
    let nblk = rows * cols / MXFP4_BLOCK;
    let mut blocks = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; nblk];
    for b in 0..nblk {
        let v = &values[b * MXFP4_BLOCK..(b + 1) * MXFP4_BLOCK];
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        // smallest e with amax / 2^e <= 6, clamped to the E8M0 range
        let e = if amax > 0.0 { (amax / 6.0).log2().ceil() as i32 } else { -127 };
        let e = e.clamp(-127, 127);
        scales[b] = (e + 127) as u8;
        let inv = (2f64).powi(-e) as f32;
        for j in 0..16 {
            let lo = encode_e2m1(v[2 * j] * inv);
            let hi = encode_e2m1(v[2 * j + 1] * inv);
            blocks[b * 16 + j] = lo | (hi << 4);
        }
    }
    (blocks, scales)
}

#[cfg(test)]
mod tests {
    use super::super::mxfp4::Mxfp4Matrix;
    use super::*;

    #[test]
    fn round_trips_representable_values_exactly() {
        let vals: Vec<f32> = (0..64).map(|i| FP4_VALUES[i % 16] * 0.25).collect();
        let (b, s) = quantize_mxfp4(&vals, 1, 64);
        let back = Mxfp4Matrix::new(&b, &s, 1, 64).unwrap().to_f32();
        assert_eq!(back, vals);
    }

    #[test]
    fn error_is_bounded_by_half_a_step() {
        let vals: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let (b, s) = quantize_mxfp4(&vals, 3, 32);
        let back = Mxfp4Matrix::new(&b, &s, 3, 32).unwrap().to_f32();
        for blk in 0..3 {
            let amax = vals[blk * 32..blk * 32 + 32].iter().fold(0f32, |m, x| m.max(x.abs()));
            for i in blk * 32..blk * 32 + 32 {
                // the scale 2^e is below amax/3 (e = ceil(log2(amax/6))) and E2M1's largest gap
                // is 2 steps of it, so the rounding error is at most one scale: amax/3
                assert!((back[i] - vals[i]).abs() <= amax / 3.0 + 1e-6, "{} vs {}", back[i], vals[i]);
            }
        }
    }
}
