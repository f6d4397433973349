//! The embedded kernel images, the device-side descriptor structs (mirrors of
//! `kernels/common.cuh`), and one typed launch function per kernel.
//!
//! # Why ahead-of-time fatbins (and not NVRTC)
//! The kernels are compiled by `scripts/build_kernels.sh` with a pinned nvcc (PyPI 13.0.88, usable
//! on a machine without a GPU) into fatbins holding SASS for sm_80, sm_86, sm_89 and sm_90 plus
//! compute_80 PTX for newer GPUs, committed under `kernels/bin/` and embedded with
//! `include_bytes!`. Compared with NVRTC this needs no `libnvrtc` (nor CUDA headers) on the user's
//! machine, costs no compile time at start-up, and lets compile errors, register counts and
//! spills be seen where the code is written. The price is a build step after editing a `.cu`
//! file; a unit test ([`tests::kernel_sources_match_fatbins`]) compares the SHA-256 of the sources
//! with the hashes recorded when the fatbins were built, so a stale fatbin fails CI.

use std::ffi::c_void;

use crate::driver::{DevBuf, Func, Gpu, Module, Stream, launch, launch_threads};

pub static GEMV_FATBIN: &[u8] = include_bytes!("../kernels/bin/gemv.fatbin");
pub static ATTENTION_FATBIN: &[u8] = include_bytes!("../kernels/bin/attention.fatbin");
pub static BANDWIDTH_FATBIN: &[u8] = include_bytes!("../kernels/bin/bandwidth.fatbin");
pub static MOE_MMA_FATBIN: &[u8] = include_bytes!("../kernels/bin/moe_mma.fatbin");
pub static FLASH_ATTN_FATBIN: &[u8] = include_bytes!("../kernels/bin/flash_attn.fatbin");
pub static MOE_GEMM_FATBIN: &[u8] = include_bytes!("../kernels/bin/moe_gemm.fatbin");
pub static WIDE_FATBIN: &[u8] = include_bytes!("../kernels/bin/wide.fatbin");
pub static QGEMM_FATBIN: &[u8] = include_bytes!("../kernels/bin/qgemm.fatbin");

/// The kernel sources, for the freshness check.
pub const KERNEL_SOURCES: [(&str, &str); 9] = [
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("gemv.cu", include_str!("../kernels/gemv.cu")),
    ("attention.cu", include_str!("../kernels/attention.cu")),
    ("bandwidth.cu", include_str!("../kernels/bandwidth.cu")),
    ("moe_mma.cu", include_str!("../kernels/moe_mma.cu")),
    ("flash_attn.cu", include_str!("../kernels/flash_attn.cu")),
    ("moe_gemm.cu", include_str!("../kernels/moe_gemm.cu")),
    ("wide.cu", include_str!("../kernels/wide.cu")),
    ("qgemm.cu", include_str!("../kernels/qgemm.cu")),
];
/// `sha256sum` of the sources when the fatbins were built.
pub const KERNEL_SOURCES_SHA256: &str = include_str!("../kernels/SOURCES.sha256");

/// Tokens per launch (prefill is run in chunks of this many tokens).
pub const MAXT: usize = 4;
/// Most experts per token the kernels handle.
pub const MAXK: usize = 4;
/// Most layers a [`StepParams`] can address.
pub const MAX_LAYERS: usize = 64;
/// Head dimension the attention kernels are written for.
pub const HEAD_DIM: usize = 64;
/// Most query heads per KV head (warps of the attention block).
pub const MAX_GROUP: usize = 8;
/// Largest number of KV splits of the attention kernel.
pub const SMAX: usize = 32;
/// Floats per attention partial (max, sum, o[64]).
pub const PART: usize = 66;
/// Most blocks of `k_oproj_router` (the stride of its partials).
pub const RP_MAXB: usize = 384;
/// Most experts `k_oproj_router` handles.
pub const RP_MAXE: usize = 128;
/// Shared memory of the moe_mma.cu kernels: the 64 KB 4-bit table, whose holes hold everything
/// else (see moe_mma.cu).
pub const MMA_SMEM: usize = 65536;
/// Default column splits (warps per 16-row tile) of `k_moe_gu_mma` (1, 2, 4 or 8) and
/// `k_moe_dn_mma` (K * splits <= 8 warps: blocks of at most 256 threads).
pub const MMA_KS_GU: usize = 2;
pub const MMA_KS_DN: usize = 2;
/// Rows per tile of `k_moe_gu1` / `k_moe_dn1`.
pub const RT_GU: usize = 8;
pub const RT_DN: usize = 4;
/// Most column segments (warps per row) of `k_moe_gu1`, and most warps of a `k_moe_dn1` block.
pub const GU1_MAX_SEG: usize = 6;
pub const DN1_MAX_WARPS: usize = 12;

pub const K_BF16: i32 = 0;
pub const K_F16: i32 = 1;
pub const K_F32: i32 = 2;
pub const K_NF4N: i32 = 3;
pub const K_NF4F: i32 = 4;
pub const K_MXFP4: i32 = 5;

pub const F_RESID: i32 = 1;
pub const F_ARGMAX: i32 = 2;
pub const F_TOPK: i32 = 4;
pub const F_WRITE_NORMED: i32 = 8;
pub const F_NORM: i32 = 16;

/// One weight matrix on the device (`struct QMat` in common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QMat {
    pub w: u64,
    pub s: u64,
    pub nabs: u64,
    pub code: u64,
    pub ncode: u64,
    pub bias: u64,
    pub kind: i32,
    pub rows: i32,
    pub cols: i32,
    pub offset: f32,
    pub nbs_shift: i32,
    pub pad: i32,
}

/// One decoder layer on the device (`struct LayerDev`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LayerDev {
    pub q: QMat,
    pub k: QMat,
    pub v: QMat,
    pub o: QMat,
    pub router: QMat,
    pub gu: u64,
    pub dn: u64,
    pub in_norm: u64,
    pub post_norm: u64,
    pub sinks: u64,
    pub window: i32,
    pub ring: i32,
}

/// Per-launch parameters read by the kernels from device memory (`struct StepParams`): up to
/// [`MAXT`] tokens, each with its id, position and its sequence's K/V cache base per layer (one
/// sequence's prefill chunk, or the decode tokens of several sequences).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepParams {
    pub t: i32,
    pub pad: i32,
    pub tok: [i32; MAXT],
    pub pos: [i32; MAXT],
    pub kc: [[u64; MAX_LAYERS]; MAXT],
    pub vc: [[u64; MAX_LAYERS]; MAXT],
}

impl Default for StepParams {
    fn default() -> Self {
        StepParams {
            t: 0,
            pad: 0,
            tok: [0; MAXT],
            pos: [0; MAXT],
            kc: [[0; MAX_LAYERS]; MAXT],
            vc: [[0; MAX_LAYERS]; MAXT],
        }
    }
}

/// Most sequences in one wide launch (`MAX_SEGS` in common.cuh).
pub const MAX_SEGS: usize = 64;

/// One sequence's part of a wide launch (`struct SegDev` in common.cuh): its `nq` tokens are
/// launch rows `q0..q0 + nq` at positions `pos0..pos0 + nq`; its cache (per layer K/V base
/// pointers) holds the positions before `pos0`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegDev {
    pub q0: i32,
    pub nq: i32,
    pub pos0: i32,
    pub pad: i32,
    pub kc: [u64; MAX_LAYERS],
    pub vc: [u64; MAX_LAYERS],
}

impl Default for SegDev {
    fn default() -> Self {
        SegDev {
            q0: 0,
            nq: 0,
            pos0: 0,
            pad: 0,
            kc: [0; MAX_LAYERS],
            vc: [0; MAX_LAYERS],
        }
    }
}

const _: () = assert!(std::mem::size_of::<SegDev>() == 1040);
const _: () = assert!(std::mem::size_of::<QMat>() == 72);
const _: () = assert!(std::mem::size_of::<LayerDev>() == 408);
const _: () = assert!(std::mem::size_of::<StepParams>() == 4136);

/// Floats of the padded shared-memory layout of an `n`-vector (see common.cuh).
pub fn padded_len(n: usize) -> usize {
    n / 32 * 36
}

/// Builds the argument pointer array of a launch from local variables.
macro_rules! args {
    ($($a:ident),* $(,)?) => {
        [$( &$a as *const _ as *mut c_void ),*]
    };
}

/// The loaded kernels and their launch geometry for one model shape.
pub struct Kernels {
    _modules: Vec<Module>,
    embed: Func,
    linear1: Func,
    linear4: Func,
    qkv1: Func,
    qkv4: Func,
    moe_gu: Func,
    moe_dn: Func,
    moe_gu1: Func,
    moe_gu1_rt4: Func,
    moe_dn1: Func,
    moe_dn1_rt2: Func,
    oproj_router: Func,
    moe_gu_mma: Func,
    moe_dn_mma: Func,
    /// Column splits (warps per 16-row tile) of `k_moe_gu_mma` / `k_moe_dn_mma`
    /// (`GPTOSS_CUDA_MMA_KS=gu,dn` overrides the defaults, for tuning).
    pub mma_ks: (usize, usize),
    /// Rows per tile of the decode MoE kernels in use (4 and 4; `GPTOSS_CUDA_GU1=rt8`,
    /// `GPTOSS_CUDA_DN1=rt2` pick the other builds).
    pub rt_gu: usize,
    pub rt_dn: usize,
    attn: Func,
    read_bw: Func,
    sm_count: usize,
}

/// Dynamic shared memory of each kernel for a model shape.
#[derive(Debug, Clone, Copy)]
pub struct SmemPlan {
    pub linear_h: [usize; 2],
    pub linear_q: [usize; 2],
    pub qkv: [usize; 2],
    pub moe_gu: usize,
    pub moe_dn: usize,
    pub moe_gu_mma: usize,
    pub moe_dn_mma: usize,
}

impl SmemPlan {
    pub fn new(h: usize, q_dim: usize, inter: usize, k: usize) -> SmemPlan {
        let lin = |cols: usize, nt: usize| nt * padded_len(cols) * 4 + 2048 + 256;
        SmemPlan {
            linear_h: [lin(h, 1), lin(h, MAXT)],
            linear_q: [lin(q_dim, 1), lin(q_dim, MAXT)],
            qkv: [
                padded_len(h) * 4 + 3 * 2048,
                MAXT * padded_len(h) * 4 + 3 * 2048,
            ],
            moe_gu: padded_len(h) * 4 + 2048,
            moe_dn: k * padded_len(inter) * 4 + k * 2048,
            moe_gu_mma: MMA_SMEM,
            moe_dn_mma: MMA_SMEM,
        }
    }

    pub fn max(&self) -> usize {
        [
            self.linear_h[1],
            self.linear_q[1],
            self.qkv[1],
            self.moe_gu,
            self.moe_dn,
            self.moe_gu_mma,
            self.moe_dn_mma,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }
}

impl Kernels {
    /// Loads the three images and raises the shared-memory limit of each kernel to what `plan`
    /// needs (an error if the GPU has less).
    pub fn load(gpu: &Gpu, plan: &SmemPlan) -> Result<Kernels, String> {
        if plan.max() > gpu.info.max_smem_optin {
            return Err(format!(
                "the kernels need {} bytes of shared memory per block, {} allows {}",
                plan.max(),
                gpu.info.name,
                gpu.info.max_smem_optin
            ));
        }
        let gemv = gpu.load_module(GEMV_FATBIN)?;
        let attn = gpu.load_module(ATTENTION_FATBIN)?;
        let bw = gpu.load_module(BANDWIDTH_FATBIN)?;
        let mma = gpu.load_module(MOE_MMA_FATBIN)?;
        let mma_ks = std::env::var("GPTOSS_CUDA_MMA_KS")
            .ok()
            .and_then(|v| {
                let (a, b) = v.split_once(',')?;
                Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
            })
            .filter(|&(a, b): &(usize, usize)| [1, 2, 4, 8].contains(&a) && (1..=2).contains(&b))
            .unwrap_or((MMA_KS_GU, MMA_KS_DN));
        let k = Kernels {
            embed: gemv.function("k_embed")?,
            linear1: gemv.function("k_linear_1")?,
            linear4: gemv.function("k_linear_4")?,
            qkv1: gemv.function("k_qkv_1")?,
            qkv4: gemv.function("k_qkv_4")?,
            moe_gu: gemv.function("k_moe_gu")?,
            moe_dn: gemv.function("k_moe_dn")?,
            moe_gu1: gemv.function("k_moe_gu1")?,
            moe_gu1_rt4: gemv.function("k_moe_gu1_rt4")?,
            moe_dn1: gemv.function("k_moe_dn1")?,
            moe_dn1_rt2: gemv.function("k_moe_dn1_rt2")?,
            oproj_router: gemv.function("k_oproj_router")?,
            moe_gu_mma: mma.function("k_moe_gu_mma")?,
            moe_dn_mma: mma.function("k_moe_dn_mma")?,
            mma_ks,
            rt_gu: if std::env::var("GPTOSS_CUDA_GU1").is_ok_and(|v| v == "rt8") {
                RT_GU
            } else {
                4
            },
            rt_dn: if std::env::var("GPTOSS_CUDA_DN1").is_ok_and(|v| v == "rt2") {
                2
            } else {
                RT_DN
            },
            attn: attn.function("k_attn")?,
            read_bw: bw.function("k_read_bw")?,
            _modules: vec![gemv, attn, bw, mma],
            sm_count: gpu.info.sm_count,
        };
        let lin_max = plan.linear_h[1].max(plan.linear_q[1]);
        for (f, s) in [
            (k.linear1, lin_max),
            (k.linear4, lin_max),
            (k.qkv1, plan.qkv[0]),
            (k.qkv4, plan.qkv[1]),
            (k.moe_gu, plan.moe_gu),
            (k.moe_dn, plan.moe_dn),
            (k.oproj_router, plan.linear_q[0]),
            (k.moe_gu_mma, plan.moe_gu_mma),
            (k.moe_dn_mma, plan.moe_dn_mma),
        ] {
            f.set_max_dynamic_smem(s)?;
        }
        Ok(k)
    }

    /// Grid size for `units` warp units (8 per block) of `f` with `smem`: no more blocks than
    /// can be resident at once, divided among `jobs` (grid.y).
    fn grid_x(&self, f: Func, smem: usize, units: usize, jobs: usize) -> Result<u32, String> {
        let resident = self.sm_count * f.occupancy(smem)?;
        let want = units.div_ceil(8).max(1);
        Ok(want.min((resident / jobs.max(1)).max(1)) as u32)
    }

    pub fn embed(
        &self,
        s: &Stream,
        m: &QMat,
        sp: u64,
        x: u64,
        h: usize,
        t: usize,
    ) -> Result<(), String> {
        let (m, h) = (*m, h as i32);
        let mut a = args!(m, sp, x, h);
        launch(self.embed, (t as u32, 1, 1), 0, s, &mut a)
    }

    /// Grid of `linear` for a matrix (the red_val/red_idx scratch needs one entry per block).
    pub fn linear_grid(&self, m: &QMat, nt: usize, smem: usize) -> Result<u32, String> {
        self.grid_x(self.linear_fn(m, nt), smem, m.rows as usize, 1)
    }

    /// The `k_linear` variant for `nt` tokens.
    fn linear_fn(&self, _m: &QMat, nt: usize) -> Func {
        if nt == 1 { self.linear1 } else { self.linear4 }
    }

    /// `out[t] (+)= m @ x'[t] + b` (see gemv.cu `k_linear_*`). `nt` selects the 1- or
    /// MAXT-token variant; `t` <= nt tokens are computed.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        s: &Stream,
        nt: usize,
        smem: usize,
        m: &QMat,
        x: u64,
        ld_in: usize,
        t: usize,
        norm_w: u64,
        eps: f32,
        out: u64,
        ld_out: usize,
        flags: i32,
        extra: &LinearExtra,
    ) -> Result<(), String> {
        let f = self.linear_fn(m, nt);
        let grid = self.grid_x(f, smem, m.rows as usize, 1)?;
        let (m, ld_in, t, ld_out) = (*m, ld_in as i32, t as i32, ld_out as i32);
        let LinearExtra {
            aux,
            idx_out,
            red_val,
            red_idx,
            counter,
            topk,
            sel,
            wsel,
        } = *extra;
        let mut a = args!(
            m, x, ld_in, t, norm_w, eps, out, ld_out, flags, aux, idx_out, red_val, red_idx,
            counter, topk, sel, wsel
        );
        launch(f, (grid, 1, 1), smem, s, &mut a)
    }

    /// q/k/v of layer `layer` with RMSNorm and RoPE, k/v into the cache (gemv.cu `k_qkv_*`).
    #[allow(clippy::too_many_arguments)]
    pub fn qkv(
        &self,
        s: &Stream,
        nt: usize,
        smem: usize,
        layer_dev: u64,
        sp: u64,
        layer: usize,
        x: u64,
        dims: &Dims,
        qout: u64,
        cos: u64,
        sin: u64,
    ) -> Result<(), String> {
        let f = if nt == 1 { self.qkv1 } else { self.qkv4 };
        let units = dims.nh * 32 + 2 * dims.nkv * 32;
        let grid = self.grid_x(f, smem, units, 1)?;
        let (layer, h, nh, nkv, eps) = (
            layer as i32,
            dims.h as i32,
            dims.nh as i32,
            dims.nkv as i32,
            dims.eps,
        );
        let kvmode = dims.kv.mode();
        let mut a = args!(
            layer_dev, sp, layer, x, h, nh, nkv, eps, qout, cos, sin, kvmode
        );
        launch(f, (grid, 1, 1), smem, s, &mut a)
    }

    /// Attention of layer `layer` for `t` queries (attention.cu `k_attn`).
    #[allow(clippy::too_many_arguments)]
    pub fn attn(
        &self,
        s: &Stream,
        layer_dev: u64,
        sp: u64,
        layer: usize,
        q: u64,
        out: u64,
        part: u64,
        counters: u64,
        dims: &Dims,
        t: usize,
    ) -> Result<(), String> {
        let (layer, nh, nkv, smax) = (layer as i32, dims.nh as i32, dims.nkv as i32, SMAX as i32);
        let kvmode = dims.kv.mode();
        let mut a = args!(
            layer_dev, sp, layer, q, out, part, counters, nh, nkv, smax, kvmode
        );
        launch(
            self.attn,
            (dims.nkv as u32, SMAX as u32, t as u32),
            0,
            s,
            &mut a,
        )
    }

    /// Expert gate_up + SwiGLU for the `t * k` selected (token, expert) pairs.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gu(
        &self,
        s: &Stream,
        smem: usize,
        layer_dev: u64,
        sp: u64,
        h_buf: u64,
        dims: &Dims,
        t: usize,
        sel: u64,
        act: u64,
    ) -> Result<(), String> {
        let jobs = t * dims.k;
        let grid = self.grid_x(self.moe_gu, smem, dims.inter, jobs)?;
        let (h, i, k, alpha, limit) = (
            dims.h as i32,
            dims.inter as i32,
            dims.k as i32,
            dims.alpha,
            dims.limit,
        );
        let mut a = args!(layer_dev, sp, h_buf, h, i, k, sel, act, alpha, limit);
        launch(self.moe_gu, (grid, jobs as u32, 1), smem, s, &mut a)
    }

    /// Expert down projections, weighted sum and residual add.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_dn(
        &self,
        s: &Stream,
        smem: usize,
        layer_dev: u64,
        sp: u64,
        act: u64,
        dims: &Dims,
        t: usize,
        sel: u64,
        wsel: u64,
        x: u64,
    ) -> Result<(), String> {
        // Warp units: (row pair, expert) = H/2 * K.
        let grid = self.grid_x(self.moe_dn, smem, dims.h / 2 * dims.k, t)?;
        let (h, i, k) = (dims.h as i32, dims.inter as i32, dims.k as i32);
        let mut a = args!(layer_dev, sp, act, h, i, k, sel, wsel, x);
        launch(self.moe_dn, (grid, t as u32, 1), smem, s, &mut a)
    }

    /// Column segments (warps per row) of the decode MoE kernels for rows of `cols` 4-bit
    /// elements: 16-byte chunks of 32 elements, at most 32 per segment.
    pub fn segments(cols: usize) -> usize {
        (cols / 32).div_ceil(32).max(1)
    }

    /// Decode (T = 1) gate_up + SwiGLU of the `dims.k` selected experts (gemv.cu `k_moe_gu1`;
    /// every expert matrix 4-bit, see [`Kernels::moe1_supported`]).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gu1(
        &self,
        s: &Stream,
        layer_dev: u64,
        h_buf: u64,
        dims: &Dims,
        sel: u64,
        act: u64,
    ) -> Result<(), String> {
        let f = if self.rt_gu == RT_GU {
            self.moe_gu1
        } else {
            self.moe_gu1_rt4
        };
        let seg = Self::segments(dims.h);
        let groups = (GU1_MAX_SEG / seg).max(1);
        let threads = (groups * seg * 32) as u32;
        let tiles = dims.k * (2 * dims.inter / self.rt_gu);
        let resident = self.sm_count * f.occupancy_of(threads, 0)?;
        let grid = tiles.div_ceil(groups).min(resident).max(1) as u32;
        let (h, i, k, segs, alpha, limit) = (
            dims.h as i32,
            dims.inter as i32,
            dims.k as i32,
            seg as i32,
            dims.alpha,
            dims.limit,
        );
        let mut a = args!(layer_dev, h_buf, h, i, k, segs, sel, act, alpha, limit);
        launch_threads(f, (grid, 1, 1), threads, 0, s, &mut a)
    }

    /// Decode (T = 1) down projections + weighted sum + residual (gemv.cu `k_moe_dn1`).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_dn1(
        &self,
        s: &Stream,
        layer_dev: u64,
        act: u64,
        dims: &Dims,
        sel: u64,
        wsel: u64,
        x: u64,
    ) -> Result<(), String> {
        let seg = Self::segments(dims.inter);
        let threads = (dims.k * seg * 32) as u32;
        let f = if self.rt_dn == RT_DN {
            self.moe_dn1
        } else {
            self.moe_dn1_rt2
        };
        let tiles = dims.h / self.rt_dn;
        let resident = self.sm_count * f.occupancy_of(threads, 0)?;
        let grid = tiles.min(resident).max(1) as u32;
        let (h, i, k, segs) = (dims.h as i32, dims.inter as i32, dims.k as i32, seg as i32);
        let mut a = args!(layer_dev, act, h, i, k, segs, sel, wsel, x);
        launch_threads(f, (grid, 1, 1), threads, 0, s, &mut a)
    }

    /// Whether `k_moe_gu1` / `k_moe_dn1` handle this shape (the expert kinds are checked by
    /// the caller: 4-bit only).
    pub fn moe1_supported(dims: &Dims) -> bool {
        Self::segments(dims.h) <= GU1_MAX_SEG
            && dims.k * Self::segments(dims.inter) <= DN1_MAX_WARPS
            && (2 * dims.inter).is_multiple_of(RT_GU)
            && dims.h.is_multiple_of(RT_DN)
    }

    /// Whether `k_moe_gu_mma` / `k_moe_dn_mma` handle this shape (the caller checks that every
    /// expert matrix is bnb 4-bit with one shared code): 16-row tiles, whole 64-blocks, at most
    /// 8 warps per down block.
    pub fn moe_mma_supported(&self, dims: &Dims) -> bool {
        dims.h.is_multiple_of(64)
            && dims.h <= 16 * 256
            && 16 + 2 * dims.h / 64 <= 256
            && dims.inter.is_multiple_of(64)
            && (1..=MAXK).contains(&dims.k)
            && dims.k * self.mma_ks.1 <= 8
    }

    /// Decode (T = 1) gate_up + SwiGLU of the `dims.k` selected experts on the tensor cores
    /// (moe_mma.cu `k_moe_gu_mma`); writes `act_hl` = u16 `[k][2][inter]` (bf16 hi, lo).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_gu_mma(
        &self,
        s: &Stream,
        smem: usize,
        layer_dev: u64,
        h_buf: u64,
        dims: &Dims,
        sel: u64,
        act_hl: u64,
    ) -> Result<(), String> {
        let ks = self.mma_ks.0;
        let tiles_per_block = 8 / ks;
        let units = dims.k * (2 * dims.inter / 16).div_ceil(tiles_per_block);
        let resident = self.sm_count * self.moe_gu_mma.occupancy_of(256, smem)?;
        let grid = units.min(resident).max(1) as u32;
        let (h, i, k, ks, alpha, limit) = (
            dims.h as i32,
            dims.inter as i32,
            dims.k as i32,
            ks as i32,
            dims.alpha,
            dims.limit,
        );
        let mut a = args!(layer_dev, h_buf, h, i, k, ks, sel, act_hl, alpha, limit);
        launch_threads(self.moe_gu_mma, (grid, 1, 1), 256, smem, s, &mut a)
    }

    /// Decode (T = 1) down projections + weighted sum + residual on the tensor cores
    /// (moe_mma.cu `k_moe_dn_mma`), reading `act_hl` from [`Self::moe_gu_mma`].
    #[allow(clippy::too_many_arguments)]
    pub fn moe_dn_mma(
        &self,
        s: &Stream,
        smem: usize,
        layer_dev: u64,
        act_hl: u64,
        dims: &Dims,
        sel: u64,
        wsel: u64,
        x: u64,
    ) -> Result<(), String> {
        let ks = self.mma_ks.1;
        let threads = (dims.k * ks * 32) as u32;
        let tiles = dims.h / 16;
        let resident = self.sm_count * self.moe_dn_mma.occupancy_of(threads, smem)?;
        let grid = tiles.min(resident).max(1) as u32;
        let (h, i, k, ks) = (dims.h as i32, dims.inter as i32, dims.k as i32, ks as i32);
        let mut a = args!(layer_dev, act_hl, h, i, k, ks, sel, wsel, x);
        launch_threads(self.moe_dn_mma, (grid, 1, 1), threads, smem, s, &mut a)
    }

    /// Decode (T = 1) o_proj + residual fused with RMSNorm + router + top-k (gemv.cu
    /// `k_oproj_router`; bf16 router of at most [`RP_MAXE`] experts). `smem` = the plan's
    /// `linear_q[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn oproj_router(
        &self,
        s: &Stream,
        smem: usize,
        layer_dev: u64,
        attn: u64,
        x: u64,
        dims: &Dims,
        h_buf: u64,
        logits: u64,
        rpart: u64,
        counter: u64,
        sel: u64,
        wsel: u64,
    ) -> Result<(), String> {
        let resident = self.sm_count * self.oproj_router.occupancy(smem)?;
        let grid = dims.h.div_ceil(8).min(resident).clamp(1, RP_MAXB) as u32;
        let (h, qd, eps, e, topk) = (
            dims.h as i32,
            dims.q_dim as i32,
            dims.eps,
            dims.e as i32,
            dims.k as i32,
        );
        let mut a = args!(
            layer_dev, attn, x, h, qd, eps, h_buf, logits, rpart, counter, e, topk, sel, wsel
        );
        launch(self.oproj_router, (grid, 1, 1), smem, s, &mut a)
    }

    /// Reads `buf` once (`n16` 16-byte words) with `blocks` blocks.
    pub fn read_bw(
        &self,
        s: &Stream,
        buf: &DevBuf,
        out: &DevBuf,
        blocks: usize,
    ) -> Result<(), String> {
        let (src, n16, o) = (buf.ptr, (buf.bytes / 16) as u64, out.ptr);
        let mut a = args!(src, n16, o);
        launch(self.read_bw, (blocks as u32, 1, 1), 0, s, &mut a)
    }

    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
}

/// The scratch pointers of `k_linear` (0 where unused).
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearExtra {
    pub aux: u64,
    pub idx_out: u64,
    pub red_val: u64,
    pub red_idx: u64,
    pub counter: u64,
    pub topk: i32,
    pub sel: u64,
    pub wsel: u64,
}

/// Model dimensions the launches need.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub h: usize,
    pub nh: usize,
    pub nkv: usize,
    pub q_dim: usize,
    pub kv_dim: usize,
    pub e: usize,
    pub k: usize,
    pub inter: usize,
    pub vocab: usize,
    pub layers: usize,
    pub eps: f32,
    pub alpha: f32,
    pub limit: f32,
    /// Element type of the KV cache.
    pub kv: KvDtype,
}

impl Dims {
    /// Bytes of one KV-cache element.
    pub fn kv_elem(&self) -> usize {
        self.kv.bytes()
    }
}

/// Element type of the KV cache (the `kvmode` of `k_qkv` / `k_attn`, common.cuh `KV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// f16 (llama.cpp's default): 11 significant bits, 8x closer to the f32 reference than bf16;
    /// values beyond +-65504 saturate. Not yet run on a GPU (written in a session whose device
    /// time was spent): opt-in until `tests/gpu.rs` has passed with it.
    F16,
    /// bf16 (the default; the model's own activation type): 8 significant bits, f32's range.
    #[default]
    Bf16,
    /// f32: bit-for-bit the reference's attention inputs, twice the memory and reads.
    F32,
}

impl KvDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    /// The kernels' `kvmode` code.
    pub fn mode(self) -> i32 {
        match self {
            KvDtype::Bf16 => 0,
            KvDtype::F32 => 1,
            KvDtype::F16 => 2,
        }
    }

    /// Rounds `v` to this type and back (what the cache stores; f16 saturating like the kernel).
    pub fn round(self, v: f32) -> f32 {
        match self {
            KvDtype::F32 => v,
            KvDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            KvDtype::F16 => half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_f32(),
        }
    }

    /// The name users write (`--kv-cache-dtype`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::F32 => "f32",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(KvDtype::default()),
            "f16" | "fp16" | "float16" | "half" => Ok(KvDtype::F16),
            "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            "f32" | "fp32" | "float32" => Ok(KvDtype::F32),
            other => Err(format!(
                "unknown KV cache dtype {other:?}: expected auto, f16, bf16 or f32"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_dtype_names_and_rounding() {
        assert_eq!("auto".parse::<KvDtype>(), Ok(KvDtype::Bf16));
        assert_eq!("fp16".parse::<KvDtype>(), Ok(KvDtype::F16));
        assert_eq!("BF16".parse::<KvDtype>(), Ok(KvDtype::Bf16));
        assert_eq!("fp32".parse::<KvDtype>(), Ok(KvDtype::F32));
        let err = "fp8".parse::<KvDtype>().unwrap_err();
        assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
        // f16 keeps 11 significant bits, bf16 8; f16 saturates instead of overflowing.
        let x = 1.0 + 1.0 / 1024.0;
        assert_eq!(KvDtype::F16.round(x), x);
        assert_eq!(KvDtype::Bf16.round(x), 1.0);
        assert_eq!(KvDtype::F16.round(1e6), 65504.0);
        assert_eq!(KvDtype::F16.round(-1e6), -65504.0);
        assert!(KvDtype::F16.round(f32::NAN).is_nan());
        assert_eq!(KvDtype::F32.round(1e6), 1e6);
        assert_eq!(
            [KvDtype::F16, KvDtype::Bf16, KvDtype::F32].map(|k| (k.bytes(), k.mode())),
            [(2, 2), (2, 0), (4, 1)]
        );
    }

    #[test]
    fn kernel_sources_match_fatbins() {
        let recorded: Vec<(&str, &str)> = KERNEL_SOURCES_SHA256
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut it = l.split_whitespace();
                (
                    it.next().unwrap(),
                    it.next().unwrap().trim_start_matches('*'),
                )
            })
            .collect();
        assert_eq!(
            recorded.len(),
            KERNEL_SOURCES.len(),
            "SOURCES.sha256 lists every kernel source"
        );
        for (name, text) in KERNEL_SOURCES {
            let want = recorded.iter().find(|(_, n)| *n == name).map(|(h, _)| *h);
            let got = crate::sha256::hex(text.as_bytes());
            assert_eq!(
                Some(got.as_str()),
                want,
                "kernels/{name} changed since the fatbins were built: run scripts/build_kernels.sh and commit kernels/bin"
            );
        }
    }

    #[test]
    fn fatbins_are_embedded() {
        for img in [GEMV_FATBIN, ATTENTION_FATBIN, BANDWIDTH_FATBIN] {
            // Fatbin magic 0xBA55ED50, little-endian.
            assert_eq!(&img[..4], &[0x50, 0xED, 0x55, 0xBA]);
        }
    }

    #[test]
    fn padded_layout_matches_the_kernels() {
        assert_eq!(padded_len(2880), 3240);
        assert_eq!(padded_len(4096) % 4, 0);
    }
}
