//! bitsandbytes 4-bit quant state: `QuantStateJson::parse` on fuzzed JSON, then, when it parses,
//! `Bnb4Tensor::new` with fuzzer-chosen buffer lengths and, when that validates, `decode_into`,
//! `block_scale`, `block_scales` and `to_f32`. Nothing may panic for a state `parse` accepted and
//! buffers `new` accepted (decode ranges stay within `numel`, the documented contract).
//!
//! Input: `JSON bytes [0xFF control bytes]`. 0xFF never occurs in UTF-8, so it cleanly splits the
//! JSON from the control bytes that pick the buffer lengths, the absmax kind, the decode range
//! and the blocks to scale. Missing control bytes read as 0, which means "the lengths the JSON
//! implies, double quantization iff the JSON has `nested_blocksize`", i.e. the valid tensor, so
//! a seed that is just a quant-state JSON decodes.

#![no_main]

use arbitrary::Unstructured;
use gptoss_formats::codec::bnb4::{Absmax, Bnb4Kind, Bnb4Tensor, QuantStateJson};
use libfuzzer_sys::fuzz_target;

#[path = "known.rs"]
mod known;

/// Largest buffer the harness allocates (keeps every execution fast and small).
const MAX_BYTES: usize = 1 << 20;
/// Most elements decoded per execution.
const MAX_DECODE: usize = 1 << 14;

/// A buffer length: usually the valid one, sometimes off by a little, sometimes anything.
fn pick_len(u: &mut Unstructured<'_>, valid: Option<usize>) -> usize {
    let sel: u8 = u.arbitrary().unwrap_or(0);
    let raw = |u: &mut Unstructured<'_>| u.arbitrary::<u16>().unwrap_or(0) as usize;
    match (sel, valid) {
        (0..200, Some(v)) if v <= MAX_BYTES => v,
        (200..240, Some(v)) if v <= MAX_BYTES => {
            v.saturating_add_signed(sel as isize - 220).min(MAX_BYTES)
        }
        _ => raw(u),
    }
}

fuzz_target!(|data: &[u8]| {
    let (json, ctl) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(state) = QuantStateJson::parse(json) else {
        return;
    };
    // What parse guarantees.
    assert!(state.quant_type == "nf4" || state.quant_type == "fp4");
    assert!(state.blocksize > 0 && !state.shape.is_empty() && state.nested_blocksize != Some(0));

    let mut u = Unstructured::new(ctl);
    let flags: u8 = u.arbitrary().unwrap_or(0);
    let kind = if state.quant_type == "fp4" {
        Bnb4Kind::Fp4
    } else {
        Bnb4Kind::Nf4
    };
    // The element and block counts computed without overflow (None: they do not fit a usize).
    let numel = state
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d));
    let nblk = numel.map(|n| n.div_ceil(state.blocksize));
    // Like the loader: double quantization when the JSON describes it (flag bit 0 flips it off).
    let nested = match state.nested_blocksize {
        Some(nbs) if flags & 1 == 0 => Some((nbs, state.nested_offset.unwrap_or(0.0) as f32)),
        _ => None,
    };

    let packed_len = pick_len(&mut u, numel.map(|n| n.div_ceil(2)));
    let code_len = pick_len(&mut u, Some(64));
    let (absmax_len, nabs_len, ncode_len) = match nested {
        Some((nbs, _)) => (
            pick_len(&mut u, nblk),
            pick_len(&mut u, nblk.and_then(|k| k.div_ceil(nbs).checked_mul(4))),
            pick_len(&mut u, Some(1024)),
        ),
        None => (pick_len(&mut u, nblk.and_then(|k| k.checked_mul(4))), 0, 0),
    };

    // Contents: the remaining control bytes, repeated (any byte pattern is a valid code/scale).
    let fill: Vec<u8> = u.peek_bytes(u.len()).unwrap_or(&[]).to_vec();
    let buf = |len: usize, salt: u8| -> Vec<u8> {
        (0..len)
            .map(|i| {
                if fill.is_empty() {
                    (i as u8).wrapping_mul(31) ^ salt
                } else {
                    fill[i % fill.len()] ^ salt
                }
            })
            .collect()
    };
    let packed = buf(packed_len, 0);
    let code = buf(code_len, 1);
    let absmax_bytes = buf(absmax_len, 2);
    let nabs = buf(nabs_len, 3);
    let ncode = buf(ncode_len, 4);
    let absmax = match nested {
        Some((nested_blocksize, offset)) => Absmax::Nested {
            codes: &absmax_bytes,
            nested_absmax: &nabs,
            nested_code: &ncode,
            nested_blocksize,
            offset,
        },
        None => Absmax::F32(&absmax_bytes),
    };

    if known::skip_known() && known::shape_product_overflows(&state) {
        return;
    }
    let Ok(t) = Bnb4Tensor::new(kind, &state, &packed, &code, absmax) else {
        return;
    };
    // `new` accepted: the shape's product must have been representable, and the view is
    // consistent with it.
    let n = numel.expect("Bnb4Tensor::new accepted a shape whose element count overflows usize");
    assert_eq!(t.numel, n);
    assert_eq!(t.blocksize, state.blocksize);
    let nblk = n.div_ceil(t.blocksize);

    // A decode range inside [0, numel).
    let start = (u.arbitrary::<u64>().unwrap_or(0) as usize) % (n + 1);
    let len = (u.arbitrary::<u16>().unwrap_or(u16::MAX) as usize)
        .min(n - start)
        .min(MAX_DECODE);
    let mut dst = vec![0f32; len];
    t.decode_into(start, &mut dst);
    if nblk > 0 {
        for k in [
            0,
            nblk - 1,
            start / t.blocksize,
            (start + len.saturating_sub(1)) / t.blocksize,
        ] {
            std::hint::black_box(t.block_scale(k.min(nblk - 1)));
        }
        for _ in 0..4 {
            let k = (u.arbitrary::<u64>().unwrap_or(0) as usize) % nblk;
            std::hint::black_box(t.block_scale(k));
        }
    }
    if n <= MAX_DECODE {
        let all = t.to_f32();
        assert_eq!(all.len(), n);
        // decode_into of a sub-range agrees with the whole decode (bit for bit, NaNs included).
        for (i, v) in dst.iter().enumerate() {
            assert_eq!(
                v.to_bits(),
                all[start + i].to_bits(),
                "element {}",
                start + i
            );
        }
        assert_eq!(t.block_scales().len(), nblk);
    }
});
