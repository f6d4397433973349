//! bitsandbytes 4-bit weights (NF4 / FP4) as stored by `Linear4bit` (spec checkpoints.md §2).
//!
//! Data layout of one quantized tensor `X.weight` (n = prod(shape) elements, blocks of 64):
//!
//! | key                                   | dtype / length       | content                          |
//! |---------------------------------------|----------------------|----------------------------------|
//! | `X.weight`                            | u8, ceil(n/2)        | element 2b = high nibble of byte b, 2b+1 = low nibble |
//! | `X.weight.absmax`                     | u8 [nblk] (nested) or f32 [nblk] | per-64-block scale      |
//! | `X.weight.quant_map`                  | f32 [16]             | the 4-bit code (NF4 or bnb FP4)   |
//! | `X.weight.nested_absmax`              | f32 [ceil(nblk/256)] | scale of each 256 absmax codes    |
//! | `X.weight.nested_quant_map`           | f32 [256]            | dynamic 8-bit code                |
//! | `X.weight.quant_state.bitsandbytes__nf4` | u8 JSON           | quant_type, blocksize, shape, nested_offset |
//!
//! Decoding (bit-exact with bitsandbytes): `scale[k] = (ncode[qa[k]] * nabs[k/256]) + offset` as
//! two separately rounded f32 operations (never an FMA), then `w[i] = code[nib(i)] * scale[i/64]`.

use serde::Deserialize;

use super::f32_at;

/// Which 4-bit code a tensor uses; decoding reads the stored `quant_map` either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bnb4Kind {
    Nf4,
    Fp4,
}

impl Bnb4Kind {
    /// The suffix of the quant-state key: `bitsandbytes__nf4` or `bitsandbytes__fp4`.
    pub fn state_suffix(self) -> &'static str {
        match self {
            Bnb4Kind::Nf4 => "quant_state.bitsandbytes__nf4",
            Bnb4Kind::Fp4 => "quant_state.bitsandbytes__fp4",
        }
    }
}

/// The parsed `quant_state.bitsandbytes__*` JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuantStateJson {
    pub quant_type: String,
    pub blocksize: usize,
    #[serde(default)]
    pub dtype: Option<String>,
    pub shape: Vec<usize>,
    #[serde(default)]
    pub nested_blocksize: Option<usize>,
    #[serde(default)]
    pub nested_dtype: Option<String>,
    #[serde(default)]
    pub nested_offset: Option<f64>,
}

impl QuantStateJson {
    /// Parses the JSON bytes; the error is a message for the caller to put in context.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| format!("quant-state JSON is not UTF-8: {e}"))?;
        let s: QuantStateJson = serde_json::from_str(text.trim_end_matches('\0'))
            .map_err(|e| format!("malformed quant-state JSON: {e}"))?;
        if s.quant_type != "nf4" && s.quant_type != "fp4" {
            return Err(format!(
                "quant-state JSON has quant_type \"{}\", expected \"nf4\" or \"fp4\"",
                s.quant_type
            ));
        }
        if s.blocksize == 0 {
            return Err("quant-state JSON has blocksize 0".into());
        }
        if s.shape.is_empty() {
            return Err("quant-state JSON has an empty shape".into());
        }
        // `numel` multiplies the dims: refuse shapes whose element count does not fit in usize
        // (found by the quant_state fuzz target).
        if s.shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d))
            .is_none()
        {
            return Err(format!(
                "quant-state JSON shape {:?} has more elements than can be addressed",
                s.shape
            ));
        }
        if s.nested_blocksize == Some(0) {
            return Err("quant-state JSON has nested_blocksize 0".into());
        }
        Ok(s)
    }

    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of 4-bit blocks (absmax entries).
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }
}

/// Where the per-block scales of a 4-bit tensor come from.
#[derive(Debug, Clone, Copy)]
pub enum Absmax<'a> {
    /// `compress_statistics=False`: one little-endian f32 per block.
    F32(&'a [u8]),
    /// Double quantization: 8-bit codes into `nested_code`, scaled per `nested_blocksize` codes
    /// by `nested_absmax` (f32 LE bytes), plus `offset`.
    Nested {
        codes: &'a [u8],
        nested_absmax: &'a [u8],
        nested_code: &'a [u8],
        nested_blocksize: usize,
        offset: f32,
    },
}

/// A validated view of one bitsandbytes 4-bit tensor in mapped memory.
#[derive(Debug, Clone, Copy)]
pub struct Bnb4Tensor<'a> {
    pub kind: Bnb4Kind,
    /// Packed nibbles, two elements per byte, high nibble first.
    pub packed: &'a [u8],
    /// The 16-entry code (`quant_map`), f32 LE bytes.
    pub code: &'a [u8],
    pub absmax: Absmax<'a>,
    /// Elements per block (64 for every known checkpoint).
    pub blocksize: usize,
    /// Logical element count (`prod(shape)`).
    pub numel: usize,
}

impl<'a> Bnb4Tensor<'a> {
    /// Checks every length against the JSON (spec checkpoints.md §5.6); the error names the
    /// companion tensor that is inconsistent.
    pub fn new(
        kind: Bnb4Kind,
        state: &QuantStateJson,
        packed: &'a [u8],
        code: &'a [u8],
        absmax: Absmax<'a>,
    ) -> Result<Self, String> {
        let n = state.numel();
        let nblk = state.num_blocks();
        if packed.len() != n.div_ceil(2) {
            return Err(format!(
                "packed weight has {} bytes, expected ceil({n}/2) = {} for shape {:?}",
                packed.len(),
                n.div_ceil(2),
                state.shape
            ));
        }
        if code.len() != 16 * 4 {
            return Err(format!(
                "quant_map has {} bytes, expected 16 f32 values (64 bytes)",
                code.len()
            ));
        }
        match absmax {
            Absmax::F32(a) => {
                if a.len() != nblk * 4 {
                    return Err(format!(
                        "absmax has {} bytes, expected {nblk} f32 values ({} bytes) for {n} elements in blocks of {}",
                        a.len(),
                        nblk * 4,
                        state.blocksize
                    ));
                }
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_code,
                nested_blocksize,
                ..
            } => {
                if nested_blocksize == 0 {
                    return Err("nested_blocksize is 0".into());
                }
                if codes.len() != nblk {
                    return Err(format!(
                        "absmax has {} entries, expected ceil({n}/{}) = {nblk}",
                        codes.len(),
                        state.blocksize
                    ));
                }
                let nn = nblk.div_ceil(nested_blocksize);
                if nested_absmax.len() != nn * 4 {
                    return Err(format!(
                        "nested_absmax has {} f32 values, expected ceil({nblk}/{nested_blocksize}) = {nn}",
                        nested_absmax.len() / 4
                    ));
                }
                if nested_code.len() != 256 * 4 {
                    return Err(format!(
                        "nested_quant_map has {} f32 values, expected 256",
                        nested_code.len() / 4
                    ));
                }
            }
        }
        Ok(Bnb4Tensor {
            kind,
            packed,
            code,
            absmax,
            blocksize: state.blocksize,
            numel: n,
        })
    }

    /// The f32 scale of block `k`, rounded exactly as bitsandbytes does.
    #[inline]
    pub fn block_scale(&self, k: usize) -> f32 {
        match self.absmax {
            Absmax::F32(a) => f32_at(a, k),
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_code,
                nested_blocksize,
                offset,
            } => {
                // Two roundings, multiply then add (bnb: dequantize_blockwise, then += offset).
                // Rust never contracts `a * b + c` into an FMA, so this is exact.
                let t = f32_at(nested_code, codes[k] as usize)
                    * f32_at(nested_absmax, k / nested_blocksize);
                t + offset
            }
        }
    }

    /// All block scales as f32 (what a GPU backend may precompute).
    pub fn block_scales(&self) -> Vec<f32> {
        (0..self.numel.div_ceil(self.blocksize))
            .map(|k| self.block_scale(k))
            .collect()
    }

    /// Decodes elements `[start, start + dst.len())` of the flattened tensor into `dst`
    /// (`code[nib] * scale` as one f32 product, the value bitsandbytes computes before rounding
    /// to its output dtype).
    pub fn decode_into(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        assert!(
            end <= self.numel,
            "decode range {start}..{end} beyond {} elements",
            self.numel
        );
        let mut code = [0f32; 16];
        for (i, c) in code.iter_mut().enumerate() {
            *c = f32_at(self.code, i);
        }
        let bs = self.blocksize;
        let mut i = start;
        let mut out = dst.iter_mut();
        while i < end {
            let blk = i / bs;
            let scale = self.block_scale(blk);
            let blk_end = ((blk + 1) * bs).min(end);
            while i < blk_end {
                let byte = self.packed[i / 2];
                let nib = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0F
                };
                *out.next().unwrap() = code[nib as usize] * scale;
                i += 1;
            }
        }
    }

    /// The whole tensor decoded to f32, in stored (flattened) order.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel];
        self.decode_into(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_shapes_that_overflow() {
        // fuzz finding: the product of the dims overflowed usize and panicked in `numel`
        let json = br#"{"quant_type":"nf4","blocksize":64,"shape":[4294967296,4294967296]}"#;
        let err = QuantStateJson::parse(json).unwrap_err();
        assert!(err.contains("more elements than can be addressed"), "{err}");
    }

    #[test]
    fn rejects_zero_nested_blocksize_without_panicking() {
        let state = QuantStateJson::parse(br#"{"quant_type":"nf4","blocksize":64,"shape":[1,64]}"#)
            .unwrap();
        let code = [0u8; 64];
        let nested_code = [0u8; 1024];
        let absmax = Absmax::Nested {
            codes: &[0u8],
            nested_absmax: &[0u8; 4],
            nested_code: &nested_code,
            nested_blocksize: 0,
            offset: 0.0,
        };
        let packed = [0u8; 32];
        let err = Bnb4Tensor::new(Bnb4Kind::Nf4, &state, &packed, &code, absmax).unwrap_err();
        assert!(err.contains("nested_blocksize"), "{err}");
    }
}
