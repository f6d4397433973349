//! The wide path: launches of more than [`MAXT`](crate::kernels::MAXT) tokens — prefill chunks
//! of up to [`WideScratch::cap`] tokens and the decode tokens of up to [`MAX_SEGS`] sequences —
//! on the tensor cores.
//!
//! Per layer: RMSNorm (bf16 out) → q/k/v GEMMs (cuBLAS for bf16 weights, else the 4-bit GEMM in
//! dense mode) → bias + RoPE → flash attention (sinks, window, GQA; the launch's own K/V read
//! from a side buffer) → K/V stored into the caches → o_proj GEMM → residual add, o bias and
//! post-norm → router + top-k → tokens sorted by expert → gate_up GEMM with SwiGLU → down GEMM
//! → weighted combine into the residual. Every weight stays packed; the tensor cores take bf16
//! with f32 accumulation; the residual stream stays f32.
//!
//! Activations into the attention projections are *split*: the bf16 value and the bf16 of its
//! rounding remainder, stacked as `2t` rows of one GEMM whose two products are summed by the
//! next kernel. That keeps ~16 significant bits where a plain bf16 input keeps 8: on the
//! fixtures (CPU emulation of each rounding) bf16 inputs to q/k/v alone move the logits by a
//! median 1.2e-2 per row and to o_proj 5e-3, more than all other roundings together. It costs
//! twice the (small) q/k/v/o tensor-core work; the weights are read once either way. The
//! experts keep plain bf16 inputs (their GEMMs are most of the FLOPs).
//!
//! The launch description lives on the device (token ids, positions, per-sequence
//! [`SegDev`]s), uploaded once per launch.

use std::mem::{offset_of, size_of};

use crate::backend::{CudaBackend, SeqCache};
use crate::blas::Blas;
use crate::driver::{DevBuf, Event, Func, Gpu, Module, PinnedBuf, Stream, launch_threads};
use crate::flash::FlashAttn;
use crate::kernels::{Dims, K_BF16, LayerDev, MAX_SEGS, MAXT, QMat, SegDev, WIDE_FATBIN};
use crate::moe_gemm::{
    GEMM_F32, GEMM_SWIGLU, GemmArgs, MoeGemm, QElem, TileN, Tiles, moe_tile_bound,
};

/// Builds the argument pointer array of a launch from local variables.
macro_rules! args {
    ($($a:ident),* $(,)?) => {
        [$( &$a as *const _ as *mut std::ffi::c_void ),*]
    };
}

/// Fewest logits rows for which the wide path's lm_head uses a cuBLAS GEMM.
pub const LM_GEMM_MIN_ROWS: usize = 5;

/// Most logits rows one lm_head GEMM of the wide path computes (the size of its logits buffer).
pub const WIDE_LM_ROWS: usize = MAX_SEGS;

/// The glue kernels of wide.cu.
pub(crate) struct WideKernels {
    _module: Module,
    embed: Func,
    rmsnorm: Func,
    rope: Func,
    kv_store: Func,
    router: Func,
    argmax: Func,
}

impl WideKernels {
    pub(crate) fn load(gpu: &Gpu) -> Result<WideKernels, String> {
        let m = gpu.load_module(WIDE_FATBIN)?;
        Ok(WideKernels {
            embed: m.function("k_embed_w")?,
            rmsnorm: m.function("k_rmsnorm_w")?,
            rope: m.function("k_rope_w")?,
            kv_store: m.function("k_kv_store")?,
            router: m.function("k_router_w")?,
            argmax: m.function("k_argmax_rows")?,
            _module: m,
        })
    }

    pub(crate) fn embed(
        &self,
        s: &Stream,
        m: &QMat,
        tok: u64,
        x: u64,
        h: usize,
        t: usize,
    ) -> Result<(), String> {
        let (m, h) = (*m, h as i32);
        let mut a = args!(m, tok, x, h);
        launch_threads(self.embed, (t as u32, 1, 1), 256, 0, s, &mut a)
    }

    /// RMSNorm of `t` rows of `x` (rows `rows[i]` when `rows != 0`), after adding the split
    /// product `add` (f32 `[2t][h]`: row `i` + row `t + i`) and `bias` into x when they are not
    /// 0; the normed rows to `ob` as `out` says, and as f32 to `of` when `of != 0`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm(
        &self,
        s: &Stream,
        x: u64,
        add: u64,
        bias: u64,
        w: u64,
        eps: f32,
        h: usize,
        t: usize,
        rows: u64,
        ob: u64,
        of: u64,
        out: NormOut,
    ) -> Result<(), String> {
        let (h, omode) = (h as i32, out as i32);
        let mut a = args!(x, add, bias, w, eps, h, rows, ob, of, omode);
        launch_threads(self.rmsnorm, (t as u32, 1, 1), 256, 0, s, &mut a)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope(
        &self,
        s: &Stream,
        qkv: u64,
        biases: [u64; 3],
        pos: u64,
        cos: u64,
        sin: u64,
        q: u64,
        kn: u64,
        vn: u64,
        d: &Dims,
        t: usize,
        split: bool,
    ) -> Result<(), String> {
        let [bq, bk, bv] = biases;
        let (nh, nkv, kvmode, split) = (d.nh as i32, d.nkv as i32, d.kv.mode(), split as i32);
        let mut a = args!(
            qkv, bq, bk, bv, pos, cos, sin, q, kn, vn, nh, nkv, kvmode, split
        );
        launch_threads(self.rope, (t as u32, 1, 1), 256, 0, s, &mut a)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn kv_store(
        &self,
        s: &Stream,
        segs: u64,
        nseg: usize,
        max_nq: usize,
        layer: usize,
        kn: u64,
        vn: u64,
        d: &Dims,
        ring: usize,
    ) -> Result<(), String> {
        let (layer, kvd, ring, elem) = (
            layer as i32,
            d.kv_dim as i32,
            ring as i32,
            d.kv_elem() as i32,
        );
        let mut a = args!(segs, layer, kn, vn, kvd, ring, elem);
        launch_threads(
            self.kv_store,
            (max_nq as u32, nseg as u32, 1),
            128,
            0,
            s,
            &mut a,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn router(
        &self,
        s: &Stream,
        m: &QMat,
        hf: u64,
        d: &Dims,
        t: usize,
        sel: u64,
        wsel: u64,
    ) -> Result<(), String> {
        let (m, h, e, k) = (*m, d.h as i32, d.e as i32, d.k as i32);
        let mut a = args!(m, hf, h, e, k, sel, wsel);
        launch_threads(self.router, (t as u32, 1, 1), 256, 0, s, &mut a)
    }
}

impl WideKernels {
    /// Greedy token of each of `rows` logits rows (`[rows][vocab]` f32 at `logits`) into `idx`
    /// (i32 `[rows]`, -1 where no value is above -inf).
    pub(crate) fn argmax(
        &self,
        s: &Stream,
        logits: u64,
        vocab: usize,
        rows: usize,
        idx: u64,
    ) -> Result<(), String> {
        let vocab = vocab as i32;
        let mut a = args!(logits, vocab, idx);
        launch_threads(self.argmax, (rows as u32, 1, 1), 1024, 0, s, &mut a)
    }
}

/// Device buffers of one wide launch of at most `cap` tokens (allocated once, at load, so the
/// KV budget of `serve` sees them).
pub(crate) struct WideScratch {
    /// Most tokens per launch.
    pub(crate) cap: usize,
    pub(crate) tok: DevBuf,
    pub(crate) pos: DevBuf,
    pub(crate) segs: DevBuf,
    /// lm_head rows of a launch (i32 launch-row indices).
    pub(crate) rows: DevBuf,
    /// Residual stream f32 [cap][H].
    pub(crate) x: DevBuf,
    /// Normed activations bf16 [2 cap][H] (GEMM input): rows `0..t` the bf16 values, rows
    /// `t..2t` their rounding remainders (see the module docs).
    pub(crate) xb: DevBuf,
    /// Normed activations f32 [cap][H] (router input).
    pub(crate) hf: DevBuf,
    /// q/k/v GEMM output f32 [2 cap][qd + 2 kvd] (hi and lo products); reused for the o_proj
    /// output [2 cap][H].
    pub(crate) qkv: DevBuf,
    /// Rotated q f32 [cap][qd].
    pub(crate) q: DevBuf,
    /// Fresh K and V [cap][kvd] in the cache's element type.
    pub(crate) kn: DevBuf,
    pub(crate) vn: DevBuf,
    /// Attention output bf16 [2 cap][qd] (hi rows, then lo rows).
    pub(crate) attn: DevBuf,
    pub(crate) sel: DevBuf,
    pub(crate) wsel: DevBuf,
    pub(crate) pair_tok: DevBuf,
    pub(crate) pair_of: DevBuf,
    pub(crate) tiles: DevBuf,
    pub(crate) ntiles: DevBuf,
    /// SwiGLU output bf16 [cap * K][I] (sorted pairs).
    pub(crate) act: DevBuf,
    /// Down-projection output f32 [cap * K][H] (sorted pairs).
    pub(crate) y: DevBuf,
    /// lm_head output f32 [WIDE_LM_ROWS][vocab].
    pub(crate) logits: DevBuf,
    /// Greedy token of each `logits` row, i32 [WIDE_LM_ROWS].
    pub(crate) idx: DevBuf,
    /// Pinned host staging of `logits` (see [`PinnedBuf`]).
    pub(crate) logits_host: PinnedBuf,
}

impl WideScratch {
    pub(crate) fn new(gpu: &Gpu, d: &Dims, cap: usize) -> Result<WideScratch, String> {
        let a = |n: usize| gpu.alloc_zeroed(n.max(16));
        let pairs = cap * d.k;
        let kv_elem = 4; // room for an f32 cache
        Ok(WideScratch {
            cap,
            tok: a(cap * 4)?,
            pos: a(cap * 4)?,
            segs: a(MAX_SEGS * size_of::<SegDev>())?,
            rows: a(cap * 4)?,
            x: a(cap * d.h * 4)?,
            xb: a(2 * cap * d.h * 2)?,
            hf: a(cap * d.h * 4)?,
            qkv: a(2 * cap * (d.q_dim + 2 * d.kv_dim).max(d.h) * 4)?,
            q: a(cap * d.q_dim * 4)?,
            kn: a(cap * d.kv_dim * kv_elem)?,
            vn: a(cap * d.kv_dim * kv_elem)?,
            attn: a(2 * cap * d.q_dim * 2)?,
            sel: a(pairs * 4)?,
            wsel: a(pairs * 4)?,
            pair_tok: a(pairs * 4)?,
            pair_of: a(pairs * 4)?,
            tiles: a((pairs / 16 + d.e + 1) * 16)?,
            ntiles: a(16)?,
            act: a(pairs * d.inter * 2)?,
            y: a(pairs * d.h * 4)?,
            logits: a(WIDE_LM_ROWS * d.vocab * 4)?,
            idx: a(WIDE_LM_ROWS * 4)?,
            logits_host: gpu.alloc_pinned(WIDE_LM_ROWS * d.vocab * 4)?,
        })
    }
}

/// Device address of field `off` of layer `l`'s [`LayerDev`] in the device table at `base`.
pub(crate) fn layer_field(base: u64, l: usize, off: usize) -> u64 {
    base + (l * size_of::<LayerDev>() + off) as u64
}

/// Offsets of the projections' [`QMat`]s inside a [`LayerDev`].
pub(crate) const OFF_Q: usize = offset_of!(LayerDev, q);
pub(crate) const OFF_K: usize = offset_of!(LayerDev, k);
pub(crate) const OFF_V: usize = offset_of!(LayerDev, v);
pub(crate) const OFF_O: usize = offset_of!(LayerDev, o);

/// The experts' token-tile width for `pairs` (token, expert) pairs over `experts` experts: 16
/// when an expert gets few tokens (batched decode), 128 from 128 tokens per expert on average,
/// else 64. `GPTOSS_CUDA_TILES=small,large` (e.g. `n16,n64`) overrides the choice below / from
/// 32 tokens per expert, for tuning.
pub(crate) fn expert_tiles(pairs: usize, experts: usize) -> TileN {
    let small = pairs < 32 * experts;
    if let Ok(v) = std::env::var("GPTOSS_CUDA_TILES") {
        let mut it = v.split(',').map(TileN::parse);
        if let (Some(Some(a)), Some(Some(b))) = (it.next(), it.next()) {
            return if small { a } else { b };
        }
    }
    if small {
        TileN::N16
    } else if pairs >= 128 * experts {
        TileN::N128
    } else {
        TileN::N64
    }
}

/// Whether a dense projection goes to cuBLAS (bf16 weights and a handle) or to the 4-bit GEMM.
pub(crate) fn use_blas(blas: &Option<Blas>, m: &QMat) -> bool {
    blas.is_some() && m.kind == K_BF16
}

/// Rows of the attention ring (0 = linear) and the window of layer `l`.
pub(crate) fn attn_geometry(l: &LayerDev) -> (usize, usize) {
    (l.ring.max(0) as usize, l.window.max(0) as usize)
}

/// How `k_rmsnorm_w` stores the normed rows (its `omode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NormOut {
    /// bf16 rows.
    Bf16 = 0,
    /// bf16 rows `0..t` and their rounding remainders in rows `t..2t` (a split activation).
    Bf16Split = 1,
    /// f16 rows (the input of qgemm.cu's NF4 experts).
    F16 = 2,
}

/// Everything the wide path needs, loaded next to the decode kernels.
pub(crate) struct Wide {
    pub(crate) k: WideKernels,
    pub(crate) flash: FlashAttn,
    pub(crate) moe: MoeGemm,
    pub(crate) scratch: WideScratch,
    /// Dropped before the stream (declared before `CudaBackend::gpu`).
    pub(crate) blas: Option<Blas>,
    /// Which expert launches go through qgemm.cu (where the layer qualifies).
    pub(crate) qgemm: QgemmUse,
}

/// Which expert GEMM launches of the wide path use qgemm.cu's pipelined kernels.
///
/// Measured on the H100 (bench/CUDA.md, session 6): for 16-token tiles (batched decode,
/// memory-bound) qgemm.cu reads the weights 6-12 % faster than moe_gemm.cu's `k_gemm_q_n16`;
/// for prefill tiles its register dequantization is latency-bound and 13-20 % slower than
/// `k_gemm_q_n128`, so prefill stays on moe_gemm.cu by default. `GPTOSS_CUDA_QGEMM` = `0`
/// (never), `decode` (default) or `all` (every width: f16 NF4 experts in prefill too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QgemmUse {
    Never,
    Decode,
    All,
}

impl QgemmUse {
    fn from_env() -> QgemmUse {
        match std::env::var("GPTOSS_CUDA_QGEMM").as_deref() {
            Ok("0") => QgemmUse::Never,
            Ok("all") => QgemmUse::All,
            _ => QgemmUse::Decode,
        }
    }

    fn applies(self, tn: TileN) -> bool {
        match self {
            QgemmUse::Never => false,
            QgemmUse::Decode => tn == TileN::N16,
            QgemmUse::All => true,
        }
    }
}

impl Wide {
    pub(crate) fn new(gpu: &Gpu, d: &Dims, cap: usize) -> Result<Wide, String> {
        Ok(Wide {
            k: WideKernels::load(gpu)?,
            flash: FlashAttn::load(gpu)?,
            moe: MoeGemm::load(gpu)?,
            scratch: WideScratch::new(gpu, d, cap)?,
            blas: Blas::open(&gpu.stream)?,
            qgemm: QgemmUse::from_env(),
        })
    }
}

/// Per-phase device times of wide launches, printed to stderr when `GPTOSS_CUDA_WIDE_PROFILE`
/// is set (a diagnostic: events between the phases of one launch).
struct WideProfile {
    marks: Option<Vec<(&'static str, Event)>>,
}

impl WideProfile {
    fn new() -> Result<WideProfile, String> {
        let on = std::env::var("GPTOSS_CUDA_WIDE_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
        Ok(WideProfile {
            marks: on.then(Vec::new),
        })
    }

    fn mark(&mut self, s: &Stream, name: &'static str) -> Result<(), String> {
        if let Some(m) = &mut self.marks {
            let e = Event::new()?;
            e.record(s)?;
            m.push((name, e));
        }
        Ok(())
    }

    fn report(&self, t: usize) -> Result<(), String> {
        let Some(marks) = &self.marks else {
            return Ok(());
        };
        let mut total: Vec<(&str, f64)> = Vec::new();
        for w in marks.windows(2) {
            let ms = w[0].1.ms_to(&w[1].1)? as f64;
            match total.iter_mut().find(|(n, _)| *n == w[0].0) {
                Some(e) => e.1 += ms,
                None => total.push((w[0].0, ms)),
            }
        }
        let all: f64 = total.iter().map(|e| e.1).sum();
        let parts: Vec<String> = total.iter().map(|(n, ms)| format!("{n} {ms:.3}")).collect();
        eprintln!("wide launch T={t}: {all:.3} ms = {}", parts.join(", "));
        Ok(())
    }
}

/// Receives each block of computed logits rows: `(backend, logits, idx, rows)`, the device
/// addresses of `rows` f32 logits rows and of their greedy tokens (i32, -1 when no logit is
/// above -inf).
pub(crate) type LmSink<'s> = dyn FnMut(&CudaBackend, u64, u64, usize) -> Result<(), String> + 's;

/// One sequence of a wide launch: its cache, its new tokens, the position of the first.
pub(crate) type WideSeg<'a> = (&'a SeqCache, &'a [u32], usize);

impl CudaBackend {
    /// Copies `dst.len()` f32 logits from the device at `src` (through the wide path's pinned
    /// buffer when it has one and they fit).
    pub(crate) fn download_logits(&self, dst: &mut [f32], src: u64) -> Result<(), String> {
        match &self.wide {
            Some(w) if dst.len() * 4 <= w.scratch.logits_host.bytes => {
                self.gpu.download_via(dst, src, &w.scratch.logits_host)
            }
            _ => self.gpu.download(dst, src),
        }
    }

    /// Copies `rows.len()` rows of logits from the device at `src` into `rows` (each resized to
    /// the vocabulary): one copy into the pinned buffer, then one host copy per row.
    pub(crate) fn download_logit_rows(
        &self,
        rows: &mut [Vec<f32>],
        src: u64,
    ) -> Result<(), String> {
        let vocab = self.dims.vocab;
        let pin = match &self.wide {
            Some(w) if rows.len() * vocab * 4 <= w.scratch.logits_host.bytes => {
                &w.scratch.logits_host
            }
            _ => {
                for (i, r) in rows.iter_mut().enumerate() {
                    r.resize(vocab, 0.0);
                    self.gpu.download(r, src + (i * vocab * 4) as u64)?;
                }
                return Ok(());
            }
        };
        let staged = self
            .gpu
            .download_pinned::<f32>(src, rows.len() * vocab, pin)?;
        for (r, s) in rows.iter_mut().zip(staged.chunks(vocab)) {
            r.clear();
            r.extend_from_slice(s);
        }
        Ok(())
    }

    /// Runs one wide launch: the tokens of `segs` (at most `cap` in all, at most [`MAX_SEGS`]
    /// sequences; caches already grown to hold them), then lm_head for the launch rows `lm`
    /// (ascending), handing each computed block of logits rows to `sink(backend, logits, idx,
    /// rows)` in order (device pointers of the f32 rows and of their i32 greedy tokens). A block of at most MAXT consecutive rows goes through the decode
    /// path's `k_linear` (f32 activations, greedy argmax into `scratch.idx`), larger ones through
    /// a bf16 GEMM in blocks of [`WIDE_LM_ROWS`].
    pub(crate) fn run_wide(
        &self,
        segs: &[WideSeg<'_>],
        lm: &[usize],
        sink: &mut LmSink<'_>,
    ) -> Result<(), String> {
        let w = self.wide.as_ref().ok_or("the wide path is not loaded")?;
        let (s, d, m, ws) = (&self.gpu.stream, &self.dims, &self.model, &w.scratch);
        // The launch description.
        let mut tok = Vec::new();
        let mut pos = Vec::new();
        let mut devs = Vec::with_capacity(segs.len());
        for &(c, tokens, pos0) in segs {
            let mut sd = SegDev {
                q0: tok.len() as i32,
                nq: tokens.len() as i32,
                pos0: pos0 as i32,
                ..SegDev::default()
            };
            for l in 0..d.layers {
                sd.kc[l] = c.k[l].ptr;
                sd.vc[l] = c.v[l].ptr;
            }
            devs.push(sd);
            tok.extend(tokens.iter().map(|&t| t as i32));
            pos.extend((0..tokens.len()).map(|i| (pos0 + i) as i32));
        }
        let t = tok.len();
        if t == 0 || t > ws.cap || segs.len() > MAX_SEGS {
            return Err(format!(
                "a wide launch takes 1..={} tokens of at most {MAX_SEGS} sequences, got {t} tokens of {}",
                ws.cap,
                segs.len()
            ));
        }
        let max_nq = segs.iter().map(|s| s.1.len()).max().unwrap_or(0);
        self.gpu.upload_async(ws.tok.ptr, &tok)?;
        self.gpu.upload_async(ws.pos.ptr, &pos)?;
        self.gpu.upload_async(ws.segs.ptr, &devs)?;
        let nseg = segs.len();
        let (qd, kvd) = (d.q_dim, d.kv_dim);
        let ldqkv = qd + 2 * kvd;
        let mut prof = WideProfile::new()?;
        prof.mark(s, "embed")?;
        w.k.embed(s, &m.embed, ws.tok.ptr, ws.x.ptr, d.h, t)?;
        let tn = expert_tiles(t * d.k, d.e);
        for l in 0..d.layers {
            let lh = &m.layers[l];
            let ld = m.layer_dev.ptr;
            // The experts' kernel family: qgemm.cu where it applies (its element type is that of
            // the experts' input and SwiGLU output), else moe_gemm.cu (bf16).
            let qelem = m.experts_qelem[l].filter(|_| w.qgemm.applies(tn));
            let expert_gemm = |g: &GemmArgs| match qelem {
                Some(e) => w.moe.qgemm(s, tn, e, g),
                None => w.moe.gemm(s, tn, g),
            };
            prof.mark(s, "norm + q/k/v")?;
            // Hi rows 0..t and lo rows t..2t of the normed input, multiplied in one GEMM.
            w.k.rmsnorm(
                s,
                ws.x.ptr,
                0,
                0,
                lh.in_norm,
                d.eps,
                d.h,
                t,
                0,
                ws.xb.ptr,
                0,
                NormOut::Bf16Split,
            )?;
            let mut biases = [0u64; 3];
            for (i, (qm, off, col)) in [
                (&lh.q, OFF_Q, 0),
                (&lh.k, OFF_K, qd),
                (&lh.v, OFF_V, qd + kvd),
            ]
            .into_iter()
            .enumerate()
            {
                let out = ws.qkv.ptr + (col * 4) as u64;
                if self.split_gemm(
                    w,
                    qm,
                    layer_field(ld, l, off),
                    ws.xb.ptr,
                    d.h,
                    t,
                    out,
                    ldqkv,
                )? {
                    biases[i] = qm.bias;
                }
            }
            prof.mark(s, "rope")?;
            w.k.rope(
                s, ws.qkv.ptr, biases, ws.pos.ptr, m.cos.ptr, m.sin.ptr, ws.q.ptr, ws.kn.ptr,
                ws.vn.ptr, d, t, true,
            )?;
            let (ring, window) = attn_geometry(lh);
            prof.mark(s, "flash attention")?;
            w.flash.launch(
                s,
                ws.segs.ptr,
                nseg,
                max_nq,
                l,
                ws.q.ptr,
                ws.kn.ptr,
                ws.vn.ptr,
                lh.sinks,
                window,
                ring,
                ws.attn.ptr,
                ws.attn.ptr + (t * qd * 2) as u64,
                d.nh,
                d.nkv,
                d.kv.mode(),
            )?;
            prof.mark(s, "kv store")?;
            w.k.kv_store(
                s,
                ws.segs.ptr,
                nseg,
                max_nq,
                l,
                ws.kn.ptr,
                ws.vn.ptr,
                d,
                ring,
            )?;
            prof.mark(s, "o_proj + norm + router")?;
            // o_proj of the hi and lo attention rows into the (free again) qkv buffer; the
            // post-norm kernel adds both and the bias into the residual.
            let o_bias = if self.split_gemm(
                w,
                &lh.o,
                layer_field(ld, l, OFF_O),
                ws.attn.ptr,
                qd,
                t,
                ws.qkv.ptr,
                d.h,
            )? {
                lh.o.bias
            } else {
                0
            };
            w.k.rmsnorm(
                s,
                ws.x.ptr,
                ws.qkv.ptr,
                o_bias,
                lh.post_norm,
                d.eps,
                d.h,
                t,
                0,
                ws.xb.ptr,
                ws.hf.ptr,
                if qelem == Some(QElem::F16) {
                    NormOut::F16
                } else {
                    NormOut::Bf16
                },
            )?;
            w.k.router(s, &lh.router, ws.hf.ptr, d, t, ws.sel.ptr, ws.wsel.ptr)?;
            prof.mark(s, "moe route")?;
            w.moe.route(
                s,
                ws.sel.ptr,
                t,
                d.k,
                d.e,
                tn.bn(),
                ws.pair_tok.ptr,
                ws.pair_of.ptr,
                ws.tiles.ptr,
                ws.ntiles.ptr,
            )?;
            let tiles = Tiles::Moe {
                tiles: ws.tiles.ptr,
                ntiles: ws.ntiles.ptr,
                max_tiles: moe_tile_bound(t * d.k, d.e, tn.bn()),
            };
            let gu = GemmArgs {
                mats: lh.gu,
                rows: 2 * d.inter,
                cols: d.h,
                tiles,
                x: ws.xb.ptr,
                ldx: d.h,
                gather: ws.pair_tok.ptr,
                mode: GEMM_SWIGLU,
                out: ws.act.ptr,
                ldo: d.inter,
                alpha: d.alpha,
                limit: d.limit,
            };
            prof.mark(s, "moe gate_up")?;
            expert_gemm(&gu)?;
            let dn = GemmArgs {
                mats: lh.dn,
                rows: d.h,
                cols: d.inter,
                x: ws.act.ptr,
                ldx: d.inter,
                gather: 0,
                mode: GEMM_F32,
                out: ws.y.ptr,
                ldo: d.h,
                ..gu
            };
            prof.mark(s, "moe down")?;
            expert_gemm(&dn)?;
            prof.mark(s, "moe combine")?;
            w.moe.combine(
                s,
                ws.x.ptr,
                ws.y.ptr,
                ws.pair_of.ptr,
                ws.wsel.ptr,
                t,
                d.k,
                d.h,
            )?;
        }
        prof.mark(s, "lm_head")?;
        self.wide_lm_head(lm, sink)?;
        prof.mark(s, "end")?;
        if prof.marks.is_some() {
            self.gpu.sync()?;
        }
        prof.report(t)
    }

    /// `out[r] = W · xb[r]` (f32, row stride `ldo`) for the `2t` rows of a split activation
    /// (`x`: bf16 `[2t][cols]`, hi rows then lo rows) through cuBLAS for bf16 weights, else
    /// the 4-bit GEMM in dense mode (bias on the hi rows only). Returns whether the caller
    /// still has to add the bias (cuBLAS does not).
    #[allow(clippy::too_many_arguments)]
    fn split_gemm(
        &self,
        w: &Wide,
        qm: &QMat,
        mat_dev: u64,
        x: u64,
        cols: usize,
        t: usize,
        out: u64,
        ldo: usize,
    ) -> Result<bool, String> {
        let rows = qm.rows as usize;
        if use_blas(&w.blas, qm) {
            let b = w.blas.as_ref().expect("checked");
            b.gemm_bf16(qm.w, rows, cols, x, cols, 2 * t, out, ldo, 0.0)?;
            return Ok(true);
        }
        let g = GemmArgs {
            mats: mat_dev,
            rows,
            cols,
            tiles: Tiles::Dense {
                t: 2 * t,
                bias_rows: t,
            },
            x,
            ldx: cols,
            gather: 0,
            mode: GEMM_F32,
            out,
            ldo,
            alpha: self.dims.alpha,
            limit: self.dims.limit,
        };
        let tn = if 2 * t < 64 { TileN::N16 } else { TileN::N64 };
        w.moe.gemm(&self.gpu.stream, tn, &g)?;
        Ok(false)
    }

    /// lm_head of the launch rows `lm` of the wide residual stream (see [`Self::run_wide`]).
    fn wide_lm_head(&self, lm: &[usize], sink: &mut LmSink<'_>) -> Result<(), String> {
        let w = self.wide.as_ref().ok_or("the wide path is not loaded")?;
        let (s, d, m, ws) = (&self.gpu.stream, &self.dims, &self.model, &w.scratch);
        let consecutive = lm.windows(2).all(|p| p[1] == p[0] + 1);
        // cuBLAS for many rows; the decode path's lm_head kernel (4 rows per pass over the
        // 1.2 GB matrix) for a few (GPTOSS_CUDA_LM_GEMM_MIN overrides the crossover, for tuning).
        let min_rows = std::env::var("GPTOSS_CUDA_LM_GEMM_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(LM_GEMM_MIN_ROWS);
        let gemm = lm.len() >= min_rows && w.blas.is_some() && m.lm_head.kind == K_BF16;
        if !gemm {
            // The decode path's lm_head (+ argmax) on blocks of consecutive rows.
            let mut i = 0;
            while i < lm.len() {
                let mut n = 1;
                while consecutive && i + n < lm.len() && n < MAXT {
                    n += 1;
                }
                self.lm_head_rows(ws.x.ptr + (lm[i] * d.h * 4) as u64, n)?;
                sink(self, self.scratch.logits.ptr, self.scratch.idx.ptr, n)?;
                i += n;
            }
            return Ok(());
        }
        let b = w.blas.as_ref().expect("checked");
        for group in lm.chunks(WIDE_LM_ROWS) {
            let rows: Vec<i32> = group.iter().map(|&r| r as i32).collect();
            self.gpu.upload_async(ws.rows.ptr, &rows)?;
            w.k.rmsnorm(
                s,
                ws.x.ptr,
                0,
                0,
                m.norm,
                d.eps,
                d.h,
                rows.len(),
                ws.rows.ptr,
                ws.xb.ptr,
                0,
                NormOut::Bf16,
            )?;
            b.gemm_bf16(
                m.lm_head.w,
                d.vocab,
                d.h,
                ws.xb.ptr,
                d.h,
                rows.len(),
                ws.logits.ptr,
                d.vocab,
                0.0,
            )?;
            w.k.argmax(s, ws.logits.ptr, d.vocab, rows.len(), ws.idx.ptr)?;
            sink(self, ws.logits.ptr, ws.idx.ptr, rows.len())?;
        }
        Ok(())
    }
}
