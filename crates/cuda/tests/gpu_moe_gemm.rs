//! GPU tests of the grouped expert GEMM (kernels/moe_gemm.cu, src/moe_gemm.rs). Without a usable
//! GPU each test prints a notice and passes; on a GPU machine run
//! `cargo test --release -p gptoss-cuda --test gpu_moe_gemm -- --nocapture --test-threads=1`.
//!
//! - route: the sorted pairs and tiles vs a CPU stable sort (exact), T = 1 .. 4096;
//! - gate_up (SwiGLU) + down + combine at the 20b shapes (H = I = 2880) with mixed expert kinds
//!   (NF4 nested, NF4 f32 absmax, MXFP4, bf16), both tile widths, vs an f32 CPU reference from the
//!   exactly decoded weights and the bf16 inputs (each stage fed the GPU's own input);
//! - qgemm.cu (pipelined, dequantization in registers): NF4 experts with f16 activations and
//!   MXFP4 with bf16, every width, vs the same f32 reference with tighter bounds;
//! - dense mode (one matrix, residual add) for every kind;
//! - timings: prefill T = 4096 (TFLOP/s), batched decode T = 32 (GB/s of weights), both kernel
//!   families.
//!
//! Fresh random data each run (the seed is printed); outputs are poisoned with 0xFF bytes (NaN)
//! first, so an element the kernel forgets fails the check.

use gptoss_cuda::driver::{DevBuf, Gpu, Timer};
use gptoss_cuda::kernels::{K_BF16, K_F16, K_F32, K_MXFP4, K_NF4F, K_NF4N, QMat};
use gptoss_cuda::moe_gemm::{
    GEMM_F32, GEMM_F32_ADD, GEMM_SWIGLU, GemmArgs, MoeGemm, QElem, TileN, Tiles, moe_tile_bound,
};
use gptoss_formats::Matrix;
use gptoss_formats::checkpoint::DType;
use gptoss_formats::codec::bnb4::{Absmax, Bnb4Kind, Bnb4Tensor};
use gptoss_formats::codec::mxfp4::Mxfp4Matrix;
use gptoss_formats::weights::{MatrixData, Orientation};

const ALPHA: f32 = 1.702;
const LIMIT: f32 = 7.0;
const TOL: f32 = 1e-2;

fn gpu_or_skip(test: &str) -> Option<Gpu> {
    if !gptoss_cuda::gpu_available() {
        println!("NOTICE: no usable CUDA GPU; skipping {test}");
        return None;
    }
    let gpu = Gpu::open(0).expect("opening GPU 0");
    gpu.bind().expect("binding the context");
    Some(gpu)
}

// ------------------------------------------------------------------------------------------
// Random numbers (fresh seed each run, printed).
// ------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn fresh(what: &str) -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        println!("{what}: random seed {seed}");
        Rng(seed)
    }
    fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
    /// Uniform in [-a, a).
    fn f(&mut self, a: f32) -> f32 {
        ((self.u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    }
    fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.f(a)).collect()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

fn bf16_to_f32(v: &[u16]) -> Vec<f32> {
    v.iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect()
}

/// max |got - want| / max |want| (NaN or a length mismatch gives infinity).
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    let mut num = 0f32;
    let mut den = 0f32;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f32::INFINITY;
        }
        num = num.max((g - w).abs());
        den = den.max(w.abs());
    }
    num / den.max(1e-30)
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    check_tol(what, got, want, TOL);
}

fn check_tol(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let e = rel_err(got, want);
    println!("  {what}: max rel err {e:.3e}");
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// The values as `elem` bits (f16 or bf16, round to nearest even).
fn elem_bits(elem: QElem, v: &[f32]) -> Vec<u16> {
    match elem {
        QElem::F16 => v
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect(),
        QElem::Bf16 => bf16_bits(v),
    }
}

fn elem_to_f32(elem: QElem, v: &[u16]) -> Vec<f32> {
    match elem {
        QElem::F16 => v
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect(),
        QElem::Bf16 => bf16_to_f32(v),
    }
}

// ------------------------------------------------------------------------------------------
// Device helpers.
// ------------------------------------------------------------------------------------------

fn upload<T: Copy>(gpu: &Gpu, v: &[T]) -> DevBuf {
    let b = gpu.alloc(std::mem::size_of_val(v)).unwrap();
    gpu.upload(b.ptr, v).unwrap();
    b
}

fn poison(gpu: &Gpu, b: &DevBuf) {
    gpu.upload(b.ptr, &vec![0xFFu8; b.bytes]).unwrap();
}

fn download<T: Copy + Default>(gpu: &Gpu, b: u64, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    gpu.download(&mut v, b).unwrap();
    v
}

// ------------------------------------------------------------------------------------------
// Random weight matrices: device QMat + the exactly decoded f32 values.
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Bf16,
    F16,
    F32,
    Nf4N,
    Nf4F,
    Mxfp4,
}

#[allow(clippy::excessive_precision)]
const NF4: [f32; 16] = [
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

struct Mat {
    q: QMat,
    /// Decoded weights `[rows][cols]` (empty when not asked for).
    host: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// Bytes one pass over the matrix reads (weights + scales).
    bytes: usize,
    _bufs: Vec<DevBuf>,
}

#[allow(clippy::too_many_arguments)]
fn make_mat(
    gpu: &Gpu,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    kind: Kind,
    amp: f32,
    bias: bool,
    decode: bool,
) -> Mat {
    let n = rows * cols;
    let mut bufs: Vec<DevBuf> = Vec::new();
    let mut q = QMat {
        rows: rows as i32,
        cols: cols as i32,
        nbs_shift: 8,
        ..QMat::default()
    };
    let dense = |gpu: &Gpu, dtype: DType, bytes: Vec<u8>, decode: bool| {
        let host = if decode {
            let m = Matrix {
                name: "w".into(),
                rows,
                cols,
                orientation: Orientation::OutIn,
                data: MatrixData::Dense {
                    dtype,
                    bytes: &bytes,
                },
            };
            m.to_f32()
        } else {
            Vec::new()
        };
        (upload(gpu, &bytes), host, bytes.len())
    };
    let (host, nbytes) = match kind {
        Kind::Bf16 | Kind::F16 | Kind::F32 => {
            let v = rng.vec(n, amp);
            let (dtype, bytes, k) = match kind {
                Kind::Bf16 => (
                    DType::BF16,
                    v.iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                        .collect::<Vec<u8>>(),
                    K_BF16,
                ),
                Kind::F16 => (
                    DType::F16,
                    v.iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                    K_F16,
                ),
                _ => (DType::F32, f32_bytes(&v), K_F32),
            };
            let (b, host, nb) = dense(gpu, dtype, bytes, decode);
            q.kind = k;
            q.w = b.ptr;
            bufs.push(b);
            (host, nb)
        }
        Kind::Nf4N | Kind::Nf4F => {
            let nblk = n / 64;
            let packed = rng.bytes(n / 2);
            let code = f32_bytes(&NF4);
            let (scales, nabs, ncode, offset) = if kind == Kind::Nf4N {
                let codes = rng.bytes(nblk);
                let nabs: Vec<f32> = (0..nblk.div_ceil(256))
                    .map(|_| amp * (0.6 + 0.4 * rng.f(1.0).abs()))
                    .collect();
                let ncode: Vec<f32> = (0..256).map(|i| (i as f32 - 127.0) / 128.0).collect();
                (codes, f32_bytes(&nabs), f32_bytes(&ncode), amp * 1.2)
            } else {
                let s: Vec<f32> = (0..nblk).map(|_| amp * (0.5 + rng.f(1.0).abs())).collect();
                (f32_bytes(&s), Vec::new(), Vec::new(), 0.0)
            };
            let host = if decode {
                let absmax = if kind == Kind::Nf4N {
                    Absmax::Nested {
                        codes: &scales,
                        nested_absmax: &nabs,
                        nested_code: &ncode,
                        nested_blocksize: 256,
                        offset,
                    }
                } else {
                    Absmax::F32(&scales)
                };
                let m = Matrix {
                    name: "w".into(),
                    rows,
                    cols,
                    orientation: Orientation::OutIn,
                    data: MatrixData::Bnb4 {
                        tensor: Bnb4Tensor {
                            kind: Bnb4Kind::Nf4,
                            packed: &packed,
                            code: &code,
                            absmax,
                            blocksize: 64,
                            numel: n,
                        },
                        elem_offset: 0,
                    },
                };
                m.to_f32()
            } else {
                Vec::new()
            };
            q.kind = if kind == Kind::Nf4N { K_NF4N } else { K_NF4F };
            q.offset = offset;
            let nb = packed.len() + scales.len();
            let (bw, bs, bc) = (
                upload(gpu, &packed),
                upload(gpu, &scales),
                upload(gpu, &code),
            );
            q.w = bw.ptr;
            q.s = bs.ptr;
            q.code = bc.ptr;
            bufs.extend([bw, bs, bc]);
            if kind == Kind::Nf4N {
                let (ba, bn) = (upload(gpu, &nabs), upload(gpu, &ncode));
                q.nabs = ba.ptr;
                q.ncode = bn.ptr;
                bufs.extend([ba, bn]);
            }
            (host, nb)
        }
        Kind::Mxfp4 => {
            let blocks = rng.bytes(n / 2);
            let base = 127 + amp.log2().round() as i32 - 2;
            let scales: Vec<u8> = (0..n / 32)
                .map(|_| (base + (rng.u64() % 3) as i32) as u8)
                .collect();
            let host = if decode {
                let m = Matrix {
                    name: "w".into(),
                    rows,
                    cols,
                    orientation: Orientation::OutIn,
                    data: MatrixData::Mxfp4(
                        Mxfp4Matrix::new(&blocks, &scales, rows, cols).unwrap(),
                    ),
                };
                m.to_f32()
            } else {
                Vec::new()
            };
            q.kind = K_MXFP4;
            let nb = blocks.len() + scales.len();
            let (bw, bs) = (upload(gpu, &blocks), upload(gpu, &scales));
            q.w = bw.ptr;
            q.s = bs.ptr;
            bufs.extend([bw, bs]);
            (host, nb)
        }
    };
    let bias = bias.then(|| rng.vec(rows, 0.1));
    if let Some(b) = &bias {
        let bb = upload(gpu, b);
        q.bias = bb.ptr;
        bufs.push(bb);
    }
    Mat {
        q,
        host,
        bias,
        bytes: nbytes,
        _bufs: bufs,
    }
}

// ------------------------------------------------------------------------------------------
// CPU reference.
// ------------------------------------------------------------------------------------------

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[a.len() / 8 * 8..]
        .iter()
        .zip(&b[b.len() / 8 * 8..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get())
}

/// out[r][row] = W_{expert(r)}[row] · input(r) + bias (f32, `rows` per output row), computed in
/// parallel over the output rows; rows sharing an expert are done in groups of 16 so each
/// weight row is read once per group.
fn ref_gemm<'a>(
    mats: &[&Mat],
    expert_of: &[usize],
    input: &(dyn Fn(usize) -> &'a [f32] + Sync),
    rows: usize,
) -> Vec<f32> {
    let n = expert_of.len();
    let mut out = vec![0f32; n * rows];
    let per = n.div_ceil(threads()).max(1);
    std::thread::scope(|sc| {
        for (ci, chunk) in out.chunks_mut(per * rows).enumerate() {
            sc.spawn(move || {
                let r_begin = ci * per;
                let r_end = r_begin + chunk.len() / rows;
                let mut r = r_begin;
                while r < r_end {
                    let e = expert_of[r];
                    let mut g_end = r + 1;
                    while g_end < r_end && g_end - r < 16 && expert_of[g_end] == e {
                        g_end += 1;
                    }
                    let m = mats[e];
                    let cols = m.q.cols as usize;
                    let xs: Vec<&[f32]> = (r..g_end).map(input).collect();
                    for row in 0..rows {
                        let w = &m.host[row * cols..(row + 1) * cols];
                        let b = m.bias.as_ref().map_or(0.0, |b| b[row]);
                        for (j, x) in xs.iter().enumerate() {
                            chunk[(r + j - r_begin) * rows + row] = dot(w, x) + b;
                        }
                    }
                    r = g_end;
                }
            });
        }
    });
    out
}

fn swiglu(g: f32, u: f32) -> f32 {
    let g = g.min(LIMIT);
    let u = u.clamp(-LIMIT, LIMIT);
    (u + 1.0) * g / (1.0 + (-ALPHA * g).exp())
}

/// Routing on the CPU: the stable sort of pairs by expert, and the tiles.
struct CpuRoute {
    pair_tok: Vec<i32>,
    pair_of: Vec<i32>,
    expert_of: Vec<usize>,
    tiles: Vec<[i32; 4]>,
}

fn cpu_route(sel: &[i32], k: usize, e: usize, bn: usize) -> CpuRoute {
    let mut order: Vec<usize> = (0..sel.len()).collect();
    order.sort_by_key(|&p| sel[p]); // stable
    let mut pair_of = vec![0i32; sel.len()];
    for (r, &p) in order.iter().enumerate() {
        pair_of[p] = r as i32;
    }
    let mut tiles = Vec::new();
    let mut off = 0;
    for ex in 0..e {
        let cnt = sel.iter().filter(|&&s| s as usize == ex).count();
        let mut j = 0;
        while j < cnt {
            tiles.push([ex as i32, (off + j) as i32, bn.min(cnt - j) as i32, 0]);
            j += bn;
        }
        off += cnt;
    }
    CpuRoute {
        pair_tok: order.iter().map(|&p| (p / k) as i32).collect(),
        pair_of,
        expert_of: order.iter().map(|&p| sel[p] as usize).collect(),
        tiles,
    }
}

/// Top-k of e distinct experts per token.
fn random_sel(rng: &mut Rng, t: usize, k: usize, e: usize) -> Vec<i32> {
    let mut sel = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut chosen: Vec<i32> = Vec::new();
        while chosen.len() < k {
            let x = rng.below(e) as i32;
            if !chosen.contains(&x) {
                chosen.push(x);
            }
        }
        sel.extend(chosen);
    }
    sel
}

/// Route buffers on the device.
struct DevRoute {
    sel: DevBuf,
    pair_tok: DevBuf,
    pair_of: DevBuf,
    tiles: DevBuf,
    ntiles: DevBuf,
    max_tiles: usize,
}

fn dev_route(gpu: &Gpu, k: &MoeGemm, sel: &[i32], kk: usize, e: usize, bn: usize) -> DevRoute {
    let p = sel.len();
    let max_tiles = moe_tile_bound(p, e, bn);
    let r = DevRoute {
        sel: upload(gpu, sel),
        pair_tok: gpu.alloc(p * 4).unwrap(),
        pair_of: gpu.alloc(p * 4).unwrap(),
        tiles: gpu.alloc(max_tiles * 16).unwrap(),
        ntiles: gpu.alloc(4).unwrap(),
        max_tiles,
    };
    for b in [&r.pair_tok, &r.pair_of, &r.tiles, &r.ntiles] {
        poison(gpu, b);
    }
    k.route(
        &gpu.stream,
        r.sel.ptr,
        p / kk,
        kk,
        e,
        bn,
        r.pair_tok.ptr,
        r.pair_of.ptr,
        r.tiles.ptr,
        r.ntiles.ptr,
    )
    .unwrap();
    r
}

// ------------------------------------------------------------------------------------------
// Tests.
// ------------------------------------------------------------------------------------------

#[test]
fn route_matches_cpu_sort() {
    let Some(gpu) = gpu_or_skip("route_matches_cpu_sort") else {
        return;
    };
    let kern = MoeGemm::load(&gpu).unwrap();
    let mut rng = Rng::fresh("route");
    let (kk, e) = (4, 32);
    for t in [1usize, 7, 64, 1000, 4096] {
        for bn in [64usize, 16] {
            let sel = random_sel(&mut rng, t, kk, e);
            let want = cpu_route(&sel, kk, e, bn);
            let r = dev_route(&gpu, &kern, &sel, kk, e, bn);
            let nt: Vec<i32> = download(&gpu, r.ntiles.ptr, 1);
            let pair_tok: Vec<i32> = download(&gpu, r.pair_tok.ptr, t * kk);
            let pair_of: Vec<i32> = download(&gpu, r.pair_of.ptr, t * kk);
            assert_eq!(
                nt[0] as usize,
                want.tiles.len(),
                "T={t} BN={bn}: tile count"
            );
            assert!(want.tiles.len() <= r.max_tiles);
            let tiles: Vec<[i32; 4]> = download(&gpu, r.tiles.ptr, want.tiles.len());
            assert_eq!(pair_tok, want.pair_tok, "T={t} BN={bn}: pair_tok");
            assert_eq!(pair_of, want.pair_of, "T={t} BN={bn}: pair_of");
            assert_eq!(tiles, want.tiles, "T={t} BN={bn}: tiles");
            println!("  route T={t} BN={bn}: {} tiles, exact", want.tiles.len());
        }
    }
    // Timing of the largest case.
    let sel = random_sel(&mut rng, 4096, kk, e);
    let r = dev_route(&gpu, &kern, &sel, kk, e, 64);
    let timer = Timer::new().unwrap();
    let iters = 20;
    timer.start(&gpu.stream).unwrap();
    for _ in 0..iters {
        kern.route(
            &gpu.stream,
            r.sel.ptr,
            4096,
            kk,
            e,
            64,
            r.pair_tok.ptr,
            r.pair_of.ptr,
            r.tiles.ptr,
            r.ntiles.ptr,
        )
        .unwrap();
    }
    let ms = timer.stop_ms(&gpu.stream).unwrap() / iters as f32;
    println!("  route T=4096 K=4 E=32: {:.1} us", ms * 1e3);
}

/// One MoE layer's GEMMs at the 20b shapes, mixed expert kinds, both tile widths.
#[test]
fn moe_gemm_matches_reference() {
    let Some(gpu) = gpu_or_skip("moe_gemm_matches_reference") else {
        return;
    };
    let kern = MoeGemm::load(&gpu).unwrap();
    let mut rng = Rng::fresh("moe gemm");
    let (h, inter, e, kk) = (2880usize, 2880usize, 8usize, 4usize);
    let kinds = [
        Kind::Nf4N,
        Kind::Nf4N,
        Kind::Nf4F,
        Kind::Nf4N,
        Kind::Nf4N,
        Kind::Mxfp4,
        Kind::Nf4N,
        Kind::Bf16,
    ];
    let t0 = std::time::Instant::now();
    let gu: Vec<Mat> = (0..e)
        .map(|i| make_mat(&gpu, &mut rng, 2 * inter, h, kinds[i], 0.02, i != 3, true))
        .collect();
    let dn: Vec<Mat> = (0..e)
        .map(|i| make_mat(&gpu, &mut rng, h, inter, kinds[i], 0.02, i != 4, true))
        .collect();
    println!("  weights built in {:.1} s", t0.elapsed().as_secs_f32());
    let gu_tab = upload(&gpu, &gu.iter().map(|m| m.q).collect::<Vec<_>>());
    let dn_tab = upload(&gpu, &dn.iter().map(|m| m.q).collect::<Vec<_>>());
    let gu_refs: Vec<&Mat> = gu.iter().collect();
    let dn_refs: Vec<&Mat> = dn.iter().collect();
    for t in [7usize, 64, 1000] {
        let p = t * kk;
        let sel = random_sel(&mut rng, t, kk, e);
        let wsel: Vec<f32> = (0..p).map(|_| rng.f(1.0).abs()).collect();
        let x_bits = bf16_bits(&rng.vec(t * h, 2.0));
        let x = bf16_to_f32(&x_bits);
        let resid = rng.vec(t * h, 1.0);
        let want = cpu_route(&sel, kk, e, 64);
        let x_dev = upload(&gpu, &x_bits);
        let wsel_dev = upload(&gpu, &wsel);
        let act64 = gpu.alloc(p * inter * 2).unwrap();
        let y64 = gpu.alloc(p * h * 4).unwrap();
        let act16 = gpu.alloc(p * inter * 2).unwrap();
        let y16 = gpu.alloc(p * h * 4).unwrap();
        let xr = upload(&gpu, &resid);
        for b in [&act64, &y64, &act16, &y16] {
            poison(&gpu, b);
        }
        let r64 = dev_route(&gpu, &kern, &sel, kk, e, 64);
        let r16 = dev_route(&gpu, &kern, &sel, kk, e, 16);
        let gemm = |tn: TileN,
                    r: &DevRoute,
                    mats: u64,
                    rows: usize,
                    cols: usize,
                    x: u64,
                    ldx: usize,
                    gather: u64,
                    mode: i32,
                    out: u64,
                    ldo: usize| {
            kern.gemm(
                &gpu.stream,
                tn,
                &GemmArgs {
                    mats,
                    rows,
                    cols,
                    tiles: Tiles::Moe {
                        tiles: r.tiles.ptr,
                        ntiles: r.ntiles.ptr,
                        max_tiles: r.max_tiles,
                    },
                    x,
                    ldx,
                    gather,
                    mode,
                    out,
                    ldo,
                    alpha: ALPHA,
                    limit: LIMIT,
                },
            )
            .unwrap();
        };
        // gate_up: both widths from the same inputs.
        gemm(
            TileN::N64,
            &r64,
            gu_tab.ptr,
            2 * inter,
            h,
            x_dev.ptr,
            h,
            r64.pair_tok.ptr,
            GEMM_SWIGLU,
            act64.ptr,
            inter,
        );
        gemm(
            TileN::N16,
            &r16,
            gu_tab.ptr,
            2 * inter,
            h,
            x_dev.ptr,
            h,
            r16.pair_tok.ptr,
            GEMM_SWIGLU,
            act16.ptr,
            inter,
        );
        // down: both widths from the n64 activations.
        gemm(
            TileN::N64,
            &r64,
            dn_tab.ptr,
            h,
            inter,
            act64.ptr,
            inter,
            0,
            GEMM_F32,
            y64.ptr,
            h,
        );
        gemm(
            TileN::N16,
            &r16,
            dn_tab.ptr,
            h,
            inter,
            act64.ptr,
            inter,
            0,
            GEMM_F32,
            y16.ptr,
            h,
        );
        kern.combine(
            &gpu.stream,
            xr.ptr,
            y64.ptr,
            r64.pair_of.ptr,
            wsel_dev.ptr,
            t,
            kk,
            h,
        )
        .unwrap();
        gpu.sync().unwrap();
        let a64 = bf16_to_f32(&download::<u16>(&gpu, act64.ptr, p * inter));
        let a16 = bf16_to_f32(&download::<u16>(&gpu, act16.ptr, p * inter));
        let yg64: Vec<f32> = download(&gpu, y64.ptr, p * h);
        let yg16: Vec<f32> = download(&gpu, y16.ptr, p * h);
        let xg: Vec<f32> = download(&gpu, xr.ptr, t * h);
        // The other tile variants, each with its own route, into poisoned buffers (gate_up
        // from x, down from the n64 activations: the same inputs as above).
        let others: Vec<(TileN, Vec<f32>, Vec<f32>)> = [TileN::N128]
            .into_iter()
            .map(|tn| {
                let r = dev_route(&gpu, &kern, &sel, kk, e, tn.bn());
                for b in [&act16, &y16] {
                    poison(&gpu, b);
                }
                gemm(
                    tn,
                    &r,
                    gu_tab.ptr,
                    2 * inter,
                    h,
                    x_dev.ptr,
                    h,
                    r.pair_tok.ptr,
                    GEMM_SWIGLU,
                    act16.ptr,
                    inter,
                );
                gemm(
                    tn, &r, dn_tab.ptr, h, inter, act64.ptr, inter, 0, GEMM_F32, y16.ptr, h,
                );
                gpu.sync().unwrap();
                let a = bf16_to_f32(&download::<u16>(&gpu, act16.ptr, p * inter));
                (tn, a, download(&gpu, y16.ptr, p * h))
            })
            .collect();

        let t1 = std::time::Instant::now();
        let pt = &want.pair_tok;
        let gu_out = ref_gemm(
            &gu_refs,
            &want.expert_of,
            &|r| &x[pt[r] as usize * h..(pt[r] as usize + 1) * h],
            2 * inter,
        );
        let act_ref: Vec<f32> = gu_out
            .chunks_exact(2)
            .map(|gu| swiglu(gu[0], gu[1]))
            .collect();
        let y_ref = ref_gemm(
            &dn_refs,
            &want.expert_of,
            &|r| &a64[r * inter..(r + 1) * inter],
            h,
        );
        let mut x_ref = resid.clone();
        for tt in 0..t {
            for k in 0..kk {
                let w = wsel[tt * kk + k];
                let r = want.pair_of[tt * kk + k] as usize;
                for c in 0..h {
                    x_ref[tt * h + c] += w * yg64[r * h + c];
                }
            }
        }
        println!(
            "T={t} ({p} pairs; reference {:.1} s)",
            t1.elapsed().as_secs_f32()
        );
        check(&format!("T={t} n64 gate_up+swiglu"), &a64, &act_ref);
        check(&format!("T={t} n16 gate_up+swiglu"), &a16, &act_ref);
        check(&format!("T={t} n64 down"), &yg64, &y_ref);
        check(&format!("T={t} n16 down"), &yg16, &y_ref);
        check(&format!("T={t} combine"), &xg, &x_ref);
        for (tn, a, y) in &others {
            check(&format!("T={t} {tn:?} gate_up+swiglu"), a, &act_ref);
            check(&format!("T={t} {tn:?} down"), y, &y_ref);
        }
    }
}

/// qgemm.cu (pipelined, dequantization in registers) at the 20b shapes, every tile width and
/// both element types: NF4 experts (nested and f32 absmax mixed) with f16 activations, MXFP4
/// experts with bf16 ones, vs the f32 reference from the exactly decoded weights and the inputs
/// as the kernel got them. Tolerances: NF4's f16 weights are within ~2^-11 of code x absmax and
/// the SwiGLU output is rounded to f16 (bf16 for MXFP4, whose weights are exact).
#[test]
fn qgemm_matches_reference() {
    let Some(gpu) = gpu_or_skip("qgemm_matches_reference") else {
        return;
    };
    let kern = MoeGemm::load(&gpu).unwrap();
    let mut rng = Rng::fresh("qgemm");
    let (h, inter, e, kk) = (2880usize, 2880usize, 8usize, 4usize);
    for (elem, kinds, tol_act, tol_y) in [
        (
            QElem::F16,
            [
                Kind::Nf4N,
                Kind::Nf4F,
                Kind::Nf4N,
                Kind::Nf4N,
                Kind::Nf4F,
                Kind::Nf4N,
                Kind::Nf4N,
                Kind::Nf4N,
            ],
            2e-3f32,
            2e-3f32,
        ),
        (QElem::Bf16, [Kind::Mxfp4; 8], 5e-3, 1e-4),
    ] {
        let gu: Vec<Mat> = (0..e)
            .map(|i| make_mat(&gpu, &mut rng, 2 * inter, h, kinds[i], 0.02, i != 3, true))
            .collect();
        let dn: Vec<Mat> = (0..e)
            .map(|i| make_mat(&gpu, &mut rng, h, inter, kinds[i], 0.02, i != 4, true))
            .collect();
        let gu_tab = upload(&gpu, &gu.iter().map(|m| m.q).collect::<Vec<_>>());
        let dn_tab = upload(&gpu, &dn.iter().map(|m| m.q).collect::<Vec<_>>());
        let gu_refs: Vec<&Mat> = gu.iter().collect();
        let dn_refs: Vec<&Mat> = dn.iter().collect();
        for t in [7usize, 64, 1000] {
            let p = t * kk;
            let sel = random_sel(&mut rng, t, kk, e);
            let x_bits = elem_bits(elem, &rng.vec(t * h, 2.0));
            let x = elem_to_f32(elem, &x_bits);
            let want = cpu_route(&sel, kk, e, 64);
            let x_dev = upload(&gpu, &x_bits);
            let act = gpu.alloc(p * inter * 2).unwrap();
            let y = gpu.alloc(p * h * 4).unwrap();
            // Down's input: the activations of the first (n128) gate_up, in sorted order (the
            // same order for every width: the route is stable).
            let mut act0: Option<Vec<u16>> = None;
            let mut results = Vec::new();
            for tn in TileN::ALL {
                let r = dev_route(&gpu, &kern, &sel, kk, e, tn.bn());
                let tiles = Tiles::Moe {
                    tiles: r.tiles.ptr,
                    ntiles: r.ntiles.ptr,
                    max_tiles: r.max_tiles,
                };
                poison(&gpu, &act);
                poison(&gpu, &y);
                let gu_args = GemmArgs {
                    mats: gu_tab.ptr,
                    rows: 2 * inter,
                    cols: h,
                    tiles,
                    x: x_dev.ptr,
                    ldx: h,
                    gather: r.pair_tok.ptr,
                    mode: GEMM_SWIGLU,
                    out: act.ptr,
                    ldo: inter,
                    alpha: ALPHA,
                    limit: LIMIT,
                };
                kern.qgemm(&gpu.stream, tn, elem, &gu_args).unwrap();
                gpu.sync().unwrap();
                let a_bits: Vec<u16> = download(&gpu, act.ptr, p * inter);
                let a_in = act0.get_or_insert_with(|| a_bits.clone());
                let a_in_dev = upload(&gpu, a_in);
                let dn_args = GemmArgs {
                    mats: dn_tab.ptr,
                    rows: h,
                    cols: inter,
                    x: a_in_dev.ptr,
                    ldx: inter,
                    gather: 0,
                    mode: GEMM_F32,
                    out: y.ptr,
                    ldo: h,
                    ..gu_args
                };
                kern.qgemm(&gpu.stream, tn, elem, &dn_args).unwrap();
                gpu.sync().unwrap();
                let yv: Vec<f32> = download(&gpu, y.ptr, p * h);
                results.push((tn, elem_to_f32(elem, &a_bits), yv));
            }
            let pt = &want.pair_tok;
            let gu_out = ref_gemm(
                &gu_refs,
                &want.expert_of,
                &|r| &x[pt[r] as usize * h..(pt[r] as usize + 1) * h],
                2 * inter,
            );
            let act_ref: Vec<f32> = gu_out
                .chunks_exact(2)
                .map(|gu| swiglu(gu[0], gu[1]))
                .collect();
            let a_in = elem_to_f32(elem, act0.as_ref().expect("ran"));
            let y_ref = ref_gemm(
                &dn_refs,
                &want.expert_of,
                &|r| &a_in[r * inter..(r + 1) * inter],
                h,
            );
            println!("{elem:?} T={t} ({p} pairs)");
            for (tn, a, yv) in &results {
                check_tol(
                    &format!("{elem:?} T={t} {tn:?} gate_up+swiglu"),
                    a,
                    &act_ref,
                    tol_act,
                );
                check_tol(&format!("{elem:?} T={t} {tn:?} down"), yv, &y_ref, tol_y);
            }
        }
    }
}

/// Dense mode: one matrix over T = 100 rows with a residual add, every kind; the bias only on
/// the first 63 rows (`bias_rows`: the rows past it are the lo parts of split activations).
#[test]
fn dense_gemm_f32_add() {
    let Some(gpu) = gpu_or_skip("dense_gemm_f32_add") else {
        return;
    };
    let kern = MoeGemm::load(&gpu).unwrap();
    let mut rng = Rng::fresh("dense gemm");
    let (t, rows, cols) = (100usize, 2880usize, 4096usize);
    let x_bits = bf16_bits(&rng.vec(t * cols, 1.0));
    let x = bf16_to_f32(&x_bits);
    let x_dev = upload(&gpu, &x_bits);
    for kind in [
        Kind::Nf4N,
        Kind::Nf4F,
        Kind::Mxfp4,
        Kind::Bf16,
        Kind::F16,
        Kind::F32,
    ] {
        let m = make_mat(&gpu, &mut rng, rows, cols, kind, 0.02, true, true);
        let mat_dev = upload(&gpu, &[m.q]);
        let resid = rng.vec(t * rows, 1.0);
        let expert_of = vec![0usize; t];
        let bias_rows = 63;
        let mut prod = ref_gemm(&[&m], &expert_of, &|r| &x[r * cols..(r + 1) * cols], rows);
        let bias = m.bias.as_ref().expect("made with a bias");
        for row in prod.chunks_mut(rows).skip(bias_rows) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v -= b;
            }
        }
        let want: Vec<f32> = resid.iter().zip(&prod).map(|(a, b)| a + b).collect();
        for tn in [TileN::N64, TileN::N16] {
            let out = upload(&gpu, &resid);
            kern.gemm(
                &gpu.stream,
                tn,
                &GemmArgs {
                    mats: mat_dev.ptr,
                    rows,
                    cols,
                    tiles: Tiles::Dense { t, bias_rows },
                    x: x_dev.ptr,
                    ldx: cols,
                    gather: 0,
                    mode: GEMM_F32_ADD,
                    out: out.ptr,
                    ldo: rows,
                    alpha: 0.0,
                    limit: 0.0,
                },
            )
            .unwrap();
            let got: Vec<f32> = download(&gpu, out.ptr, t * rows);
            check(&format!("dense {kind:?} {tn:?} T={t}"), &got, &want);
        }
    }
}

/// Prefill (T = 4096, n64) and batched decode (T = 32, n16) timings on 32 NF4 experts.
#[test]
fn moe_gemm_timing() {
    let Some(gpu) = gpu_or_skip("moe_gemm_timing") else {
        return;
    };
    let kern = MoeGemm::load(&gpu).unwrap();
    let mut rng = Rng::fresh("moe gemm timing");
    let (h, inter, e, kk) = (2880usize, 2880usize, 32usize, 4usize);
    let gu: Vec<Mat> = (0..e)
        .map(|_| make_mat(&gpu, &mut rng, 2 * inter, h, Kind::Nf4N, 0.02, true, false))
        .collect();
    let dn: Vec<Mat> = (0..e)
        .map(|_| make_mat(&gpu, &mut rng, h, inter, Kind::Nf4N, 0.02, true, false))
        .collect();
    let gu_tab = upload(&gpu, &gu.iter().map(|m| m.q).collect::<Vec<_>>());
    let dn_tab = upload(&gpu, &dn.iter().map(|m| m.q).collect::<Vec<_>>());
    let timer = Timer::new().unwrap();
    for (t, tn) in [
        (4096usize, TileN::N128),
        (4096, TileN::N64),
        (2048, TileN::N128),
        (1024, TileN::N128),
        (1024, TileN::N64),
        (32, TileN::N16),
        (32, TileN::N64),
        (128, TileN::N16),
    ] {
        let p = t * kk;
        let sel = random_sel(&mut rng, t, kk, e);
        let x_dev = upload(&gpu, &bf16_bits(&rng.vec(t * h, 2.0)));
        let act = gpu.alloc(p * inter * 2).unwrap();
        let y = gpu.alloc(p * h * 4).unwrap();
        let r = dev_route(&gpu, &kern, &sel, kk, e, tn.bn());
        let args =
            |mats: u64, rows: usize, x: u64, gather: u64, mode: i32, out: u64, ldo: usize| {
                GemmArgs {
                    mats,
                    rows,
                    cols: h,
                    tiles: Tiles::Moe {
                        tiles: r.tiles.ptr,
                        ntiles: r.ntiles.ptr,
                        max_tiles: r.max_tiles,
                    },
                    x,
                    ldx: h,
                    gather,
                    mode,
                    out,
                    ldo,
                    alpha: ALPHA,
                    limit: LIMIT,
                }
            };
        let a_gu = args(
            gu_tab.ptr,
            2 * inter,
            x_dev.ptr,
            r.pair_tok.ptr,
            GEMM_SWIGLU,
            act.ptr,
            inter,
        );
        let a_dn = args(dn_tab.ptr, h, act.ptr, 0, GEMM_F32, y.ptr, h);
        let iters = if t >= 1024 { 5 } else { 50 };
        let time = |a: &GemmArgs| {
            kern.gemm(&gpu.stream, tn, a).unwrap(); // warm-up
            timer.start(&gpu.stream).unwrap();
            for _ in 0..iters {
                kern.gemm(&gpu.stream, tn, a).unwrap();
            }
            timer.stop_ms(&gpu.stream).unwrap() / iters as f32
        };
        let ms_gu = time(&a_gu);
        let ms_dn = time(&a_dn);
        // The same through qgemm.cu (f16 activations: NF4 experts).
        let x16 = upload(
            &gpu,
            &elem_bits(
                QElem::F16,
                &bf16_to_f32(&download::<u16>(&gpu, x_dev.ptr, t * h)),
            ),
        );
        let q_gu = GemmArgs { x: x16.ptr, ..a_gu };
        let qtime = |a: &GemmArgs| {
            kern.qgemm(&gpu.stream, tn, QElem::F16, a).unwrap(); // warm-up
            timer.start(&gpu.stream).unwrap();
            for _ in 0..iters {
                kern.qgemm(&gpu.stream, tn, QElem::F16, a).unwrap();
            }
            timer.stop_ms(&gpu.stream).unwrap() / iters as f32
        };
        let qms_gu = qtime(&q_gu);
        let qms_dn = qtime(&a_dn);
        let flop_gu = 2.0 * (2 * inter * h) as f64 * p as f64;
        let flop_dn = 2.0 * (h * inter) as f64 * p as f64;
        let mut used = vec![false; e];
        for &s in &sel {
            used[s as usize] = true;
        }
        let bytes_gu: usize = (0..e).filter(|&i| used[i]).map(|i| gu[i].bytes).sum();
        let bytes_dn: usize = (0..e).filter(|&i| used[i]).map(|i| dn[i].bytes).sum();
        println!(
            "T={t} {tn:?} ({p} pairs, {} experts used): gate_up {ms_gu:.3} ms ({:.1} TFLOP/s, {:.0} GB/s of weights), down {ms_dn:.3} ms ({:.1} TFLOP/s, {:.0} GB/s); both {:.1} TFLOP/s",
            used.iter().filter(|&&u| u).count(),
            flop_gu / ms_gu as f64 / 1e9,
            bytes_gu as f64 / ms_gu as f64 / 1e6,
            flop_dn / ms_dn as f64 / 1e9,
            bytes_dn as f64 / ms_dn as f64 / 1e6,
            (flop_gu + flop_dn) / (ms_gu + ms_dn) as f64 / 1e9,
        );
        println!(
            "T={t} {tn:?} qgemm: gate_up {qms_gu:.3} ms ({:.1} TFLOP/s, {:.0} GB/s), down {qms_dn:.3} ms ({:.1} TFLOP/s, {:.0} GB/s); both {:.1} TFLOP/s",
            flop_gu / qms_gu as f64 / 1e9,
            bytes_gu as f64 / qms_gu as f64 / 1e6,
            flop_dn / qms_dn as f64 / 1e9,
            bytes_dn as f64 / qms_dn as f64 / 1e6,
            (flop_gu + flop_dn) / (qms_gu + qms_dn) as f64 / 1e9,
        );
    }
}
