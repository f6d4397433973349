//! Exact codecs for the quantized formats GPT-OSS checkpoints use.
//!
//! - [`bnb4`]: bitsandbytes 4-bit (NF4 / FP4), with and without double quantization, bit-exact
//!   with `bitsandbytes.functional.dequantize_4bit` (spec checkpoints.md §2);
//! - [`mxfp4`]: OpenAI's MXFP4 (E2M1 values, E8M0 scales per 32), exact with transformers'
//!   `convert_moe_packed_tensors` (spec checkpoints.md §3);
//! - [`quantize`]: the bitsandbytes NF4 quantizer with double quantization, byte-identical with
//!   `quantize_4bit(blocksize=64, quant_type="nf4", compress_statistics=True)`;
//! - [`mxfp4_quantize`]: an MXFP4 encoder used by `synth` to write OpenAI-format checkpoints.

pub mod bnb4;
pub mod mxfp4;
pub mod mxfp4_quantize;
pub mod quantize;

/// Reads little-endian f32 number `i` from raw bytes. Mapped safetensors data carries no
/// alignment guarantee, so f32 arrays are read byte-wise rather than cast.
#[inline(always)]
pub fn f32_at(bytes: &[u8], i: usize) -> f32 {
    let b = &bytes[4 * i..4 * i + 4];
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
