//! OpenAI MXFP4 expert weights (spec checkpoints.md §3.3).
//!
//! Data layout for one expert's matrix with logical shape `[rows = out, cols = in]`:
//! `blocks[r, g, j]` (u8, `[rows, cols/32, 16]`) holds elements `32g + 2j` (low nibble) and
//! `32g + 2j + 1` (high nibble) of row `r`; `scales[r, g]` (u8, `[rows, cols/32]`) is an E8M0
//! exponent: the block's values are `FP4[nibble] * 2^(scale - 127)`.

/// FP4 E2M1 values by nibble (bit 3 = sign).
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Elements per MXFP4 scale block.
pub const MXFP4_BLOCK: usize = 32;

/// `2^(s - 127)` as f32, exact for every byte: subnormal exponents included, 255 → 2^128 = inf
/// (neither reference special-cases it).
#[inline]
pub fn e8m0_to_f32(s: u8) -> f32 {
    // ldexp in f64 keeps 2^-127 (an f32 subnormal) exact before the final conversion.
    (2f64).powi(s as i32 - 127) as f32
}

/// A view of one MXFP4 matrix (one expert), row-major `[rows, cols]`.
#[derive(Debug, Clone, Copy)]
pub struct Mxfp4Matrix<'a> {
    pub blocks: &'a [u8],
    pub scales: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Mxfp4Matrix<'a> {
    /// Checks the byte counts against the shape.
    pub fn new(
        blocks: &'a [u8],
        scales: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(MXFP4_BLOCK) {
            return Err(format!(
                "MXFP4 needs the input dim to be a multiple of 32, found {cols}"
            ));
        }
        if blocks.len() != rows * cols / 2 {
            return Err(format!(
                "MXFP4 blocks have {} bytes, expected {rows}*{cols}/2 = {}",
                blocks.len(),
                rows * cols / 2
            ));
        }
        if scales.len() != rows * cols / MXFP4_BLOCK {
            return Err(format!(
                "MXFP4 scales have {} bytes, expected {rows}*{cols}/32 = {}",
                scales.len(),
                rows * cols / MXFP4_BLOCK
            ));
        }
        Ok(Mxfp4Matrix {
            blocks,
            scales,
            rows,
            cols,
        })
    }

    /// Decodes row-major elements `[start, start + dst.len())` into `dst` (exact).
    pub fn decode_into(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        assert!(
            end <= self.rows * self.cols,
            "decode range beyond the matrix"
        );
        for (o, i) in dst.iter_mut().zip(start..end) {
            let byte = self.blocks[i / 2];
            let nib = if i % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            *o = FP4_VALUES[nib as usize] * e8m0_to_f32(self.scales[i / MXFP4_BLOCK]);
        }
    }

    /// The whole matrix decoded to f32, `[rows, cols]` row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.decode_into(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_low_nibble_first_with_e8m0_scale() {
        // one row of 32: byte 0 = 0x21 -> elements 0.5 (nib 1), 1.0 (nib 2); scale 128 -> x2
        let mut blocks = [0u8; 16];
        blocks[0] = 0x21;
        blocks[15] = 0xF8; // element 30 = -0.0 (nib 8), element 31 = -6 (nib 15)
        let scales = [128u8];
        let m = Mxfp4Matrix::new(&blocks, &scales, 1, 32).unwrap();
        let w = m.to_f32();
        assert_eq!(w[0], 1.0);
        assert_eq!(w[1], 2.0);
        assert_eq!(w[2], 0.0);
        assert_eq!(w[31], -12.0);
        assert!(w[30] == 0.0 && w[30].is_sign_negative());
    }

    #[test]
    fn e8m0_is_exact_across_the_range() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert!(e8m0_to_f32(255).is_infinite());
    }
}
