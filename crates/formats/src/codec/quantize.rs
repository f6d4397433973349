//! A bitsandbytes-compatible 4-bit quantizer (NF4 / FP4, optional double quantization).
//!
//! # Why
//!
//! `synth` writes Unsloth-style checkpoints, and the golden tests compare our files with files
//! written by bitsandbytes itself. Both only work if our bytes are *identical* to
//! `bitsandbytes.functional.quantize_4bit(A, blocksize=64, quant_type="nf4",
//! compress_statistics=True)` followed by `QuantState.as_dict(packed=True)` (bnb 0.50.2, CPU).
//! Every arithmetic step below therefore reproduces what actually runs on CPU, with the same f32
//! roundings in the same order; none of it is "a good NF4 quantizer", it is *that* quantizer.
//!
//! # What runs on CPU in bnb 0.50.2 (checked empirically against the installed wheel)
//!
//! 1. **4-bit level** (`backends/default/ops.py::quantize_4bit`, pure torch; there is no CPU
//!    kernel for it). The input is upcast with `A.reshape(-1).float()`, so a bf16/f16 input is
//!    handled in f32 exactly like the same values given as f32: the absmax is the f32 maximum of
//!    `|x|` (exact), and the input dtype only shows up as `"dtype"` in the JSON. For each full
//!    block: `r = 1 / max(absmax, 1e-38f32)` (a correctly rounded f32 reciprocal), then
//!    `s = clamp(x * r, -1, 1)` (multiplication by the reciprocal, *not* a division). The last,
//!    partial block (when `n % blocksize != 0`) uses a true division `x / max(absmax, 1e-38)`
//!    instead. The code index is `torch.bucketize(s, midpoints)` with `right=False`, i.e. the
//!    number of midpoints strictly below `s`: **a value exactly on a midpoint takes the lower
//!    code**. Midpoints are `(c[i] + c[i+1]) / 2` in f32 over the *sorted* code; for FP4 the
//!    sorted index is mapped back through `argsort(code)` (see [`FP4_SORT_ORDER`]). The stored
//!    absmax is the unclamped block maximum (an all-zero block stores 0 and codes of value 0),
//!    except for the partial last block, which stores the clamped one (`1e-38f32` if all zero).
//!    Element `2b` goes to the high nibble of byte `b`; an odd count is padded with a 0.0 value.
//! 2. **Double quantization** (`functional.py::quantize_4bit`, `compress_statistics` branch):
//!    `offset = absmax.mean()` in f32 — torch's CPU `sum` (a cascade summation over 8-lane
//!    vectors, see [`torch_sum_f32`]) divided by the count — then `absmax - offset` in f32, then
//!    `quantize_blockwise(..., blocksize=256)` with the signed dynamic 8-bit map. That call goes to
//!    bnb's native CPU kernel, which does **not** search the code directly: it maps the
//!    normalised value `v = clamp(d * (1/am), -1, 1)` to an index into a 65536-entry lookup
//!    table, `u16(((v + 1) * 0.5) * 65535 + 0.5)` (f32 steps, truncation), and the table entry
//!    `i` holds the number of code midpoints `0.5 * (c[j] + c[j+1])` strictly below
//!    `-1 + (2 * i) / 65535`. The nested absmax is the f32 `max |d|` of each 256-block; an
//!    all-zero block stores 0 and codes 0.
//! 3. **Serialization** (`QuantState.as_dict(packed=True)`, `Linear4bit._save_to_state_dict`):
//!    keys `weight`, `weight.absmax`, `weight.quant_map`, [`weight.nested_absmax`,
//!    `weight.nested_quant_map`], `weight.quant_state.bitsandbytes__<type>`; the last is
//!    `json.dumps` of `{quant_type, blocksize, dtype, shape, [nested_blocksize, nested_dtype,
//!    nested_offset]}` with Python's float repr for the offset ([`python_float_repr`]).
//!
//! # Data layout of the result
//!
//! See [`super::bnb4`] for the tensor table; [`Bnb4Quantized::tensors`] produces exactly those
//! tensors (names, dtypes, shapes, bytes).
//!
//! # Thread-count caveat
//!
//! torch splits a reduction of 32768 or more elements across its threads, which changes the
//! summation order of the mean, hence the offset's last bits and everything derived from it.
//! Below 32768 blocks (2 Mi elements at blocksize 64) the result does not depend on threads;
//! above, set [`Bnb4Options::torch_threads`] to the `torch.get_num_threads()` of the run you
//! want to match (the default 1 matches `torch.set_num_threads(1)`). The 8-lane vector width is
//! what torch uses on x86-64 for every CPU capability (checked: default, AVX2, AVX-512).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::bnb4::Bnb4Kind;
use crate::checkpoint::DType;

/// The NF4 code as written in `bitsandbytes.functional.get_4bit_type("nf4")` (f64 literals,
/// rounded to f32 by `torch.tensor`, then divided by the max |value| = 1.0).
const NF4_LITERALS: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bnb's FP4 code before normalisation (`get_4bit_type("fp4")`); divided by 12 in f32. Note
/// that entry 8 is `+0.0`: the Python source writes `-0`, an *integer*, which is plain zero.
const FP4_LITERALS: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// `torch.argsort(fp4_code)` as torch returns it: the nibble of each sorted position. The two
/// zeros (nibbles 0 and 8) are equal; torch orders them 0, 8, so a scaled value in `(-0.0026, 0]`
/// gets nibble 0 and one in `(0, 0.0026]` gets nibble 8 (both decode to 0).
pub const FP4_SORT_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// Elements per nested (second-level) block; fixed by `quantize_4bit`.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Size of bnb's CPU lookup table for 8-bit blockwise quantization.
const LUT_SIZE: usize = 65536;

/// torch's reduction grain: reductions at least this long are split across threads.
const TORCH_GRAIN_SIZE: usize = 32768;

/// `Vectorized<float>::size()` as used by torch's CPU sum kernel on x86-64.
const TORCH_SUM_LANES: usize = 8;

/// The 16-entry NF4 code (`weight.quant_map` of an NF4 tensor), bit-identical with bnb's.
pub fn nf4_code() -> [f32; 16] {
    NF4_LITERALS.map(|v| v as f32)
}

/// The 16-entry bnb FP4 code (`weight.quant_map` of an FP4 tensor), bit-identical with bnb's.
pub fn fp4_code() -> [f32; 16] {
    FP4_LITERALS.map(|v| v / 12.0)
}

/// The 4-bit code of `kind`.
pub fn code_4bit(kind: Bnb4Kind) -> [f32; 16] {
    match kind {
        Bnb4Kind::Nf4 => nf4_code(),
        Bnb4Kind::Fp4 => fp4_code(),
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU: the first half counts up from
/// `start`, the second half down from `end`, each as one fused multiply-add (torch's compiled
/// kernel contracts `start + step * idx`).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`,
/// the code of the nested absmax (`weight.nested_quant_map`), bit-identical with bnb's.
///
/// For exponent level `i` in 0..7 it takes the midpoints of `linspace(0.1, 1, 2^i + 1)` (f32),
/// scales them by `f32(10^(i-6))` in f32, with both signs; adds 0 and 1; sorts.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let n = (1usize << i) + 1;
        let b = torch_linspace_f32(0.1, 1.0, n);
        // Python computes 10 ** (i - 6) as a double (or the int 1); torch casts it to f32.
        let scale = 10f64.powi(i - 6) as f32;
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| m * scale));
        data.extend(means.iter().map(|&m| m * -scale));
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// bnb's CPU lookup table for the dynamic map: entry `i` = number of code midpoints strictly
/// below `-1 + 2i/65535` (all f32).
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map();
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = vec![0u8; LUT_SIZE];
        let mut idx = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while idx < mid.len() && mid[idx] < val {
                idx += 1;
            }
            *slot = idx as u8;
        }
        lut
    })
}

// ---------------------------------------------------------------------------------------------
// torch's CPU float sum (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum), for the offset.
// ---------------------------------------------------------------------------------------------

/// An accumulator of torch's cascade sum: a scalar, or one 8-lane vector.
trait SumAcc: Copy {
    const ZERO: Self;
    fn add(self, o: Self) -> Self;
}

impl SumAcc for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
}

impl SumAcc for [f32; TORCH_SUM_LANES] {
    const ZERO: Self = [0.0; TORCH_SUM_LANES];
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        std::array::from_fn(|k| self[k] + o[k])
    }
}

/// `utils::CeilLog2`: 1 for x <= 2, else ceil(log2 x).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// `multi_row_sum<acc, 4>`: sums `size` rows of 4 accumulators with 4 cascade levels.
/// (Index loops on purpose: the structure mirrors torch's source line by line.)
#[allow(clippy::needless_range_loop)]
fn multi_row_sum<T: SumAcc>(elems: &[T], size: usize) -> [T; 4] {
    const LEVELS: usize = 4;
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[T::ZERO; 4]; LEVELS];
    let row = |i: usize| &elems[4 * i..4 * i + 4];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            let r = row(i);
            for k in 0..4 {
                acc[0][k] = acc[0][k].add(r[k]);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..4 {
                acc[j][k] = acc[j][k].add(acc[j - 1][k]);
                acc[j - 1][k] = T::ZERO;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        let r = row(i);
        for k in 0..4 {
            acc[0][k] = acc[0][k].add(r[k]);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..4 {
            acc[0][k] = acc[0][k].add(acc[j][k]);
        }
    }
    acc[0]
}

/// `row_sum`: the row seen as `[-1, 4]` (4-way ILP), leftovers into partial 0, then 1, 2, 3.
fn row_sum<T: SumAcc>(elems: &[T]) -> T {
    let size_ilp = elems.len() / 4;
    let mut p = multi_row_sum(elems, size_ilp);
    for &e in &elems[size_ilp * 4..] {
        p[0] = p[0].add(e);
    }
    p[0].add(p[1]).add(p[2]).add(p[3])
}

/// One serial chunk: `vectorized_inner_sum` (8-lane vectors, then the scalar tail, then the
/// lanes in order) or, below 8 elements, the scalar `row_sum`.
fn chunk_sum(x: &[f32]) -> f32 {
    if x.len() >= TORCH_SUM_LANES {
        let nvec = x.len() / TORCH_SUM_LANES;
        let vecs: Vec<[f32; TORCH_SUM_LANES]> = x[..nvec * TORCH_SUM_LANES]
            .chunks_exact(TORCH_SUM_LANES)
            .map(|c| c.try_into().unwrap())
            .collect();
        let vacc = row_sum(&vecs);
        let mut acc = 0f32;
        for &v in &x[nvec * TORCH_SUM_LANES..] {
            acc += v;
        }
        for v in vacc {
            acc += v;
        }
        acc
    } else {
        row_sum(x)
    }
}

/// `torch.sum` of a contiguous 1-D f32 tensor on x86-64 CPU, bit-exact, for a torch run with
/// `threads` threads (`torch.get_num_threads()`): below 32768 elements (or with one thread)
/// one cascade sum; otherwise torch's two-pass reduction — `min(threads, ceil(n/32768))` equal
/// chunks of `ceil(n/nt)`, one partial per thread slot, then the cascade sum of the `threads`
/// slots.
pub fn torch_sum_f32(x: &[f32], threads: usize) -> f32 {
    let n = x.len();
    let threads = threads.max(1);
    if n < TORCH_GRAIN_SIZE || threads == 1 {
        return 0.0 + chunk_sum(x);
    }
    let nt = threads.min(n.div_ceil(TORCH_GRAIN_SIZE));
    let cs = n.div_ceil(nt);
    let mut buf = vec![0f32; threads];
    for (t, slot) in buf.iter_mut().enumerate().take(nt) {
        let b = t * cs;
        if b < n {
            *slot = 0.0 + chunk_sum(&x[b..n.min(b + cs)]);
        }
    }
    0.0 + chunk_sum(&buf)
}

/// `tensor.mean()` of a contiguous 1-D f32 tensor on CPU: `sum / n` in f32.
pub fn torch_mean_f32(x: &[f32], threads: usize) -> f32 {
    torch_sum_f32(x, threads) / x.len() as f32
}

// ---------------------------------------------------------------------------------------------
// The quantizer
// ---------------------------------------------------------------------------------------------

/// The dtype of the tensor handed to `quantize_4bit`. The quantized bytes do not depend on it
/// (bnb upcasts to f32 first); it is recorded as `"dtype"` in the quant-state JSON, which is the
/// dtype bnb dequantizes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputDType {
    F32,
    BF16,
    F16,
}

impl InputDType {
    /// `str(torch.dtype).strip("torch.")` as bnb writes it.
    pub fn json_name(self) -> &'static str {
        match self {
            InputDType::F32 => "float32",
            InputDType::BF16 => "bfloat16",
            InputDType::F16 => "float16",
        }
    }
}

/// Everything `quantize_4bit` is parameterised by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bnb4Options {
    pub kind: Bnb4Kind,
    /// Elements per absmax block: 32, 64 (the default, and every known checkpoint), 128, …, 4096.
    pub blocksize: usize,
    pub input_dtype: InputDType,
    /// `compress_statistics`: quantize the absmax a second time (u8 codes + nested f32 scales).
    pub nested: bool,
    /// The torch thread count whose mean to reproduce; only matters from 32768 blocks on
    /// (module docs).
    pub torch_threads: usize,
}

impl Bnb4Options {
    /// NF4, blocksize 64, double quantization: what Unsloth/transformers use.
    pub fn nf4(input_dtype: InputDType) -> Self {
        Bnb4Options {
            kind: Bnb4Kind::Nf4,
            blocksize: 64,
            input_dtype,
            nested: true,
            torch_threads: 1,
        }
    }
}

/// The per-block scales of a quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum AbsmaxOut {
    /// `compress_statistics=False`: one f32 per block (`weight.absmax`, F32).
    F32(Vec<f32>),
    /// Double quantization: `codes` (`weight.absmax`, U8) index the dynamic map, scaled by
    /// `nested_absmax[k / 256]`, plus `offset` (JSON `nested_offset`).
    Nested {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
    },
}

/// One tensor to write into a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantTensor {
    /// Full key: the prefix (`….weight`) plus the bnb suffix.
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

/// A tensor quantized exactly as `bitsandbytes.functional.quantize_4bit` does.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4Quantized {
    pub kind: Bnb4Kind,
    /// Two elements per byte, element `2b` in the high nibble; `ceil(n/2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: AbsmaxOut,
    /// The 4-bit code (`quant_map`).
    pub code: [f32; 16],
    /// The dynamic 8-bit code (`nested_quant_map`); `Some` iff nested.
    pub nested_code: Option<[f32; 256]>,
    /// The logical shape (JSON `shape`).
    pub shape: Vec<usize>,
    pub blocksize: usize,
    pub input_dtype: InputDType,
}

/// The 15 midpoints of the sorted code, `(c[i] + c[i+1]) / 2` in f32.
fn sorted_midpoints(kind: Bnb4Kind) -> [f32; 15] {
    let code = code_4bit(kind);
    let sorted: [f32; 16] = match kind {
        Bnb4Kind::Nf4 => code,
        Bnb4Kind::Fp4 => FP4_SORT_ORDER.map(|i| code[i as usize]),
    };
    std::array::from_fn(|i| (sorted[i] + sorted[i + 1]) / 2.0)
}

/// Sorted-code index → stored nibble.
fn nibble_map(kind: Bnb4Kind) -> [u8; 16] {
    match kind {
        Bnb4Kind::Nf4 => std::array::from_fn(|i| i as u8),
        Bnb4Kind::Fp4 => FP4_SORT_ORDER,
    }
}

/// `torch.bucketize(s, mid, right=False)`: the number of midpoints strictly below `s`
/// (branch-free so that the compiler can vectorise the element loop).
#[inline(always)]
fn bucket(s: f32, mid: &[f32; 15]) -> u8 {
    let mut q = 0u8;
    for &m in mid {
        q += (m < s) as u8;
    }
    q
}

/// The f32 maximum of |x| over a block (exact; NaN inputs are not supported).
#[inline(always)]
fn block_absmax(block: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = block.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            lanes[k] = lanes[k].max(c[k].abs());
        }
    }
    let mut m = lanes.iter().fold(0f32, |a, &b| a.max(b));
    for &x in chunks.remainder() {
        m = m.max(x.abs());
    }
    m
}

/// Quantizes one full-or-partial block to sorted-code indices written into `q`.
#[inline(always)]
fn quantize_block(block: &[f32], partial: bool, mid: &[f32; 15], q: &mut [u8]) -> f32 {
    let am = block_absmax(block);
    let clamped = am.max(1e-38);
    if partial {
        // The remainder block divides (`A_flat[full:] / am`) and stores the *clamped* absmax.
        for (d, &x) in q.iter_mut().zip(block) {
            *d = bucket((x / clamped).clamp(-1.0, 1.0), mid);
        }
        clamped
    } else {
        let r = 1.0 / clamped;
        for (d, &x) in q.iter_mut().zip(block) {
            *d = bucket((x * r).clamp(-1.0, 1.0), mid);
        }
        am
    }
}

/// Blocks per parallel work item (64 Ki elements at blocksize 64).
const BLOCKS_PER_TASK: usize = 1024;

/// The first (4-bit) level: packed nibbles and the f32 absmax per block.
fn quantize_level1(values: &[f32], blocksize: usize, kind: Bnb4Kind) -> (Vec<u8>, Vec<f32>) {
    assert!(
        blocksize >= 2 && blocksize.is_multiple_of(2),
        "blocksize must be even"
    );
    let n = values.len();
    let nblk = n.div_ceil(blocksize);
    let full = n / blocksize;
    let mid = sorted_midpoints(kind);
    let nib = nibble_map(kind);
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; nblk];

    let task_elems = BLOCKS_PER_TASK * blocksize;
    let full_elems = full * blocksize;
    let pack = |q: &[u8], out: &mut [u8]| {
        for (o, pair) in out.iter_mut().zip(q.chunks(2)) {
            let hi = nib[pair[0] as usize];
            // odd n: the pad value 0.0 goes through the same bucketing
            let lo = nib[*pair.get(1).unwrap_or(&bucket(0.0, &mid)) as usize];
            *o = (hi << 4) | lo;
        }
    };

    // Full blocks, in parallel (blocksize is even, so tasks start on byte boundaries).
    packed[..full_elems / 2]
        .par_chunks_mut(task_elems / 2)
        .zip(absmax[..full].par_chunks_mut(BLOCKS_PER_TASK))
        .zip(values[..full_elems].par_chunks(task_elems))
        .for_each(|((pk, am), vals)| {
            let mut q = vec![0u8; blocksize];
            for ((block, a), out) in vals
                .chunks_exact(blocksize)
                .zip(am.iter_mut())
                .zip(pk.chunks_exact_mut(blocksize / 2))
            {
                *a = quantize_block(block, false, &mid, &mut q);
                pack(&q, out);
            }
        });

    // The partial last block.
    if full < nblk {
        let block = &values[full_elems..];
        let mut q = vec![0u8; block.len()];
        absmax[full] = quantize_block(block, true, &mid, &mut q);
        pack(&q, &mut packed[full_elems / 2..]);
    }
    (packed, absmax)
}

/// bnb's native CPU `quantize_blockwise` with the dynamic map: (codes, absmax per block).
fn quantize_blockwise_dynamic(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut codes = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    codes
        .par_chunks_mut(blocksize)
        .zip(absmax.par_iter_mut())
        .zip(x.par_chunks(blocksize))
        .for_each(|((out, am), block)| {
            let m = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
            *am = m;
            if m == 0.0 {
                out.fill(0);
                return;
            }
            let inv = 1.0f32 / m;
            for (o, &v) in out.iter_mut().zip(block) {
                let v = (v * inv).clamp(-1.0, 1.0);
                let t = (v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5;
                *o = lut[t as u16 as usize];
            }
        });
    (codes, absmax)
}

/// Quantizes `values` (the tensor flattened row-major; for a bf16/f16 input pass the values
/// upcast to f32, which is exact) as `quantize_4bit(A, blocksize, quant_type,
/// compress_statistics)` does on CPU. `shape` is the logical shape written into the JSON; its
/// product must equal `values.len()`.
pub fn quantize_4bit(values: &[f32], shape: &[usize], opts: &Bnb4Options) -> Bnb4Quantized {
    assert_eq!(
        shape.iter().product::<usize>(),
        values.len(),
        "shape {shape:?} does not match {} values",
        values.len()
    );
    assert!(!values.is_empty(), "cannot quantize an empty tensor");
    let (packed, absmax) = quantize_level1(values, opts.blocksize, opts.kind);
    let (absmax, nested_code) = if opts.nested {
        let offset = torch_mean_f32(&absmax, opts.torch_threads);
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (codes, nested_absmax) = quantize_blockwise_dynamic(&centered, NESTED_BLOCKSIZE);
        (
            AbsmaxOut::Nested {
                codes,
                nested_absmax,
                offset,
            },
            Some(dynamic_map()),
        )
    } else {
        (AbsmaxOut::F32(absmax), None)
    };
    Bnb4Quantized {
        kind: opts.kind,
        packed,
        absmax,
        code: code_4bit(opts.kind),
        nested_code,
        shape: shape.to_vec(),
        blocksize: opts.blocksize,
        input_dtype: opts.input_dtype,
    }
}

/// NF4 with blocksize 64: `quantize_4bit(A, blocksize=64, quant_type="nf4",
/// compress_statistics=nested)`, torch single-threaded (module docs).
pub fn quantize_nf4(
    values: &[f32],
    shape: &[usize],
    input_dtype: InputDType,
    nested: bool,
) -> Bnb4Quantized {
    let opts = Bnb4Options {
        nested,
        ..Bnb4Options::nf4(input_dtype)
    };
    quantize_4bit(values, shape, &opts)
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digit string that reads back
/// as `x`, choosing the closest such string (an exact tie goes to the even digit, as David Gay's
/// `dtoa` does), in positional notation when the decimal exponent is in `-4 ..= 15`, else
/// `d.ddde±XX`; a positional integer value gets `.0`.
///
/// Rust's shortest `{:e}` is not enough: for 1.38455963134765625 it prints ...563 where Python
/// prints ...562 (both 17 digits, equally close). Rust's fixed-precision formatting is exact
/// with ties to even, so the first precision that round-trips gives Python's digits.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let (sign, ax) = if x < 0.0 { ("-", -x) } else { ("", x) };
    let (digits, exp) = (0..17)
        .find_map(|p| shortest_candidate(ax, p))
        .expect("17 significant digits always round-trip");
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let nd = digits.len() as i32;
    if !(-4..16).contains(&exp) {
        let m = if nd > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.to_string()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{m}e{esign}{:02}", exp.abs());
    }
    let decpt = exp + 1; // digits before the decimal point
    if decpt <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= nd {
        format!("{sign}{digits}{}.0", "0".repeat((decpt - nd) as usize))
    } else {
        let (a, b) = digits.split_at(decpt as usize);
        format!("{sign}{a}.{b}")
    }
}

/// Parses `d.ddd` × 10^`exp` (digits without the point).
fn parse_sci(digits: &str, exp: i32) -> f64 {
    format!("{}.{}e{exp}", &digits[..1], &digits[1..])
        .parse()
        .unwrap()
}

/// The `p + 1`-significant-digit decimal Python's repr would print for `ax > 0`, if one reads
/// back as `ax`: the correctly rounded one, or — only possible at a power of two, whose
/// rounding interval is wider above than below — its neighbour on the other side of `ax`.
fn shortest_candidate(ax: f64, p: usize) -> Option<(String, i32)> {
    let s = format!("{ax:.p$e}");
    let (mant, exp) = s.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let v = parse_sci(&digits, exp);
    if v == ax {
        return Some((digits, exp));
    }
    // the neighbour one unit in the last digit towards and beyond ax
    let mut d: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
    let mut e = exp;
    if v < ax {
        let mut i = d.len();
        loop {
            i -= 1;
            if d[i] == 9 {
                d[i] = 0;
                if i == 0 {
                    d.insert(0, 1);
                    d.pop();
                    e += 1;
                    break;
                }
            } else {
                d[i] += 1;
                break;
            }
        }
    } else {
        let mut i = d.len();
        loop {
            i -= 1;
            if d[i] == 0 {
                d[i] = 9;
            } else {
                d[i] -= 1;
                break;
            }
        }
        if d[0] == 0 {
            d.remove(0);
            d.push(9);
            e -= 1;
        }
    }
    let n: String = d.iter().map(|b| (b + b'0') as char).collect();
    (parse_sci(&n, e) == ax).then_some((n, e))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Bnb4Quantized {
    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The bytes of `weight.quant_state.bitsandbytes__<type>`: bnb's `json.dumps` of the
    /// non-tensor part of `QuantState.as_dict()`, byte for byte.
    pub fn state_json(&self) -> String {
        let quant_type = match self.kind {
            Bnb4Kind::Nf4 => "nf4",
            Bnb4Kind::Fp4 => "fp4",
        };
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{quant_type}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.blocksize,
            self.input_dtype.json_name(),
            shape.join(", ")
        );
        if let AbsmaxOut::Nested { offset, .. } = &self.absmax {
            s += &format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            );
        }
        s.push('}');
        s
    }

    /// The key suffix of the JSON tensor: `quant_state.bitsandbytes__nf4` / `__fp4`.
    pub fn state_suffix(&self) -> &'static str {
        self.kind.state_suffix()
    }

    /// The tensors `Linear4bit._save_to_state_dict` writes for this weight, in its order:
    /// `prefix` (packed, U8 `[ceil(n/2), 1]`), `prefix.absmax` (U8 nested / F32 plain),
    /// `prefix.quant_map` (F32 [16]), then if nested `prefix.nested_absmax` (F32) and
    /// `prefix.nested_quant_map` (F32 [256]), and `prefix.quant_state.bitsandbytes__<type>`
    /// (U8 JSON). `prefix` is the weight key, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub fn tensors(&self, prefix: &str) -> Vec<QuantTensor> {
        let t = |suffix: &str, dtype, shape: Vec<usize>, data: Vec<u8>| QuantTensor {
            name: if suffix.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{suffix}")
            },
            dtype,
            shape,
            data,
        };
        let mut out = vec![t(
            "",
            DType::U8,
            vec![self.packed.len(), 1],
            self.packed.clone(),
        )];
        match &self.absmax {
            AbsmaxOut::F32(a) => out.push(t("absmax", DType::F32, vec![a.len()], f32_bytes(a))),
            AbsmaxOut::Nested { codes, .. } => {
                out.push(t("absmax", DType::U8, vec![codes.len()], codes.clone()))
            }
        }
        out.push(t("quant_map", DType::F32, vec![16], f32_bytes(&self.code)));
        if let (AbsmaxOut::Nested { nested_absmax, .. }, Some(nc)) =
            (&self.absmax, &self.nested_code)
        {
            out.push(t(
                "nested_absmax",
                DType::F32,
                vec![nested_absmax.len()],
                f32_bytes(nested_absmax),
            ));
            out.push(t("nested_quant_map", DType::F32, vec![256], f32_bytes(nc)));
        }
        let json = self.state_json().into_bytes();
        out.push(t(self.state_suffix(), DType::U8, vec![json.len()], json));
        out
    }

    /// The f32 scale of every block, rounded as bnb's dequantizer does (multiply, then add the
    /// offset: two roundings).
    pub fn block_scales(&self) -> Vec<f32> {
        match &self.absmax {
            AbsmaxOut::F32(a) => a.clone(),
            AbsmaxOut::Nested {
                codes,
                nested_absmax,
                offset,
            } => {
                let nc = self.nested_code.as_ref().expect("nested code");
                codes
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| nc[c as usize] * nested_absmax[k / NESTED_BLOCKSIZE] + offset)
                    .collect()
            }
        }
    }

    /// Dequantizes to f32 (`code[nibble] * scale`, as `dequantize_4bit(..., float32)`).
    pub fn dequantize(&self) -> Vec<f32> {
        let scales = self.block_scales();
        (0..self.numel())
            .map(|i| {
                let b = self.packed[i / 2];
                let nib = if i % 2 == 0 { b >> 4 } else { b & 0x0F };
                self.code[nib as usize] * scales[i / self.blocksize]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_bnb_spot_values() {
        let nf4 = nf4_code();
        assert_eq!(nf4[0], -1.0);
        assert_eq!(nf4[7], 0.0);
        assert_eq!(nf4[15], 1.0);
        assert_eq!(nf4[8], 0.079_580_3_f32);
        let fp4 = fp4_code();
        assert_eq!(fp4[1], 0.0052083334885537624_f64 as f32);
        assert_eq!(fp4[3], 1.0);
        assert_eq!(fp4[11], -1.0);
        assert!(fp4[8] == 0.0 && fp4[8].is_sign_positive());
        let d = dynamic_map();
        assert_eq!(d[0], -0.992968738079071_f64 as f32);
        assert_eq!(d[1], -0.9789062738418579_f64 as f32);
        assert_eq!(d[2], -0.96484375);
        assert_eq!(d[3], -0.9507812261581421_f64 as f32);
        assert_eq!(d[127], 0.0);
        assert_eq!(d[255], 1.0);
        assert!(d.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn python_repr_formats() {
        assert_eq!(python_float_repr(0.1302083283662796), "0.1302083283662796");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(2.0), "2.0");
        assert_eq!(python_float_repr(-2.5), "-2.5");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123456789012345.0), "123456789012345.0");
        assert_eq!(python_float_repr(1234567890123456.0), "1234567890123456.0");
        assert_eq!(python_float_repr(0.0), "0.0");
        assert_eq!(python_float_repr(2.629688024520874), "2.629688024520874");
        // an exact tie at 17 digits: Python (and this) round half to even
        assert_eq!(python_float_repr(1.38455963134765625), "1.3845596313476562");
        assert_eq!(python_float_repr(1e22), "1e+22");
        assert_eq!(python_float_repr(5e-324), "5e-324");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(100.0), "100.0");
        // a power of two: the closest 16-digit decimal falls outside the narrow lower half of
        // the rounding interval, the one above is inside
        assert_eq!(
            python_float_repr(-(2f64.powi(-140))),
            "-7.174648137343064e-43"
        );
    }

    #[test]
    fn torch_sum_small_cases() {
        assert_eq!(torch_sum_f32(&[1.0, 2.0, 3.0], 1), 6.0);
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_sum_f32(&x, 1), 499500.0);
        assert_eq!(ceil_log2(1), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(4), 2);
        assert_eq!(ceil_log2(5), 3);
    }

    #[test]
    fn roundtrip_is_close_and_layout_is_consistent() {
        let vals: Vec<f32> = (0..64 * 300 + 10)
            .map(|i| (i as f32 * 0.37).sin() * 0.05)
            .collect();
        let n = vals.len();
        for nested in [false, true] {
            let q = quantize_nf4(&vals, &[n], InputDType::BF16, nested);
            assert_eq!(q.packed.len(), n.div_ceil(2));
            let d = q.dequantize();
            let max_err = vals
                .iter()
                .zip(&d)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max_err < 0.01, "max error {max_err}");
            let t = q.tensors("w.weight");
            assert_eq!(t[0].name, "w.weight");
            assert_eq!(
                t.last().unwrap().name,
                "w.weight.quant_state.bitsandbytes__nf4"
            );
            assert_eq!(t.len(), if nested { 6 } else { 4 });
        }
    }

    #[test]
    fn ties_take_the_lower_code_and_zero_blocks_are_zero() {
        let mid = sorted_midpoints(Bnb4Kind::Nf4);
        let mut vals = vec![0f32; 128];
        vals[0] = 1.0; // absmax 1 -> scaled values are the values
        vals[1] = mid[9]; // exactly on the midpoint between codes 9 and 10
        vals[2] = -1.0;
        let q = quantize_nf4(&vals, &[2, 64], InputDType::F32, false);
        assert_eq!(q.packed[0], 0xF9);
        assert_eq!(q.packed[1] >> 4, 0);
        // second block all zero: absmax 0, nibble 7 (the code 0.0)
        assert!(q.packed[32..].iter().all(|&b| b == 0x77));
        match &q.absmax {
            AbsmaxOut::F32(a) => assert_eq!(a, &vec![1.0, 0.0]),
            _ => unreachable!(),
        }
    }
}
