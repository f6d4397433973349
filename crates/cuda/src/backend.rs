//! [`CudaBackend`]: the [`Backend`] on an NVIDIA GPU.
//!
//! One forward call runs, per sequence, its tokens in chunks of [`MAXT`] through:
//! `k_embed`, then per layer `k_qkv` (RMSNorm + q/k/v + RoPE + KV append) → `k_attn` →
//! `k_linear` (o_proj + residual) → `k_linear` (RMSNorm + router + top-k) → `k_moe_gu`
//! (selected experts' gate_up + SwiGLU) → `k_moe_dn` (down + weighted sum + residual), and, for
//! the rows whose logits are wanted, `k_linear` (final RMSNorm + lm_head + greedy argmax).
//! Decode tokens of up to MAXT sequences run together as one chunk (the dense weights are read
//! once for all of them); batch-1 decode steps replay a captured CUDA graph (all per-step values
//! — tokens, positions, KV pointers of each token's sequence — are read by the kernels from a
//! device-side [`StepParams`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use gptoss_engine::backend::{
    Backend, BackendError, DeviceMemory, Logits, LogitsWanted, SeqId, StepBatch, validate_batch,
};
use gptoss_formats::{Checkpoint, GptOssConfig, ModelWeights};

use crate::driver::{DevBuf, DeviceInfo, Event, Gpu, Graph, Timer};
use crate::kernels::{
    Dims, F_ARGMAX, F_NORM, F_RESID, F_TOPK, F_WRITE_NORMED, K_BF16, Kernels, KvDtype, LinearExtra,
    MAX_SEGS, MAXT, PART, RP_MAXB, RP_MAXE, SMAX, SmemPlan, StepParams,
};
use crate::upload::{DeviceModel, RING_EXTRA, ReadBytes};
use crate::wide::{Wide, WideSeg};

/// Options of [`CudaBackend::open`].
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Longest sequence (prompt + generated) supported; sizes the RoPE tables. Capped at the
    /// model's `max_position_embeddings`.
    pub max_context: usize,
    /// Run batch-1 decode steps launch by launch instead of replaying a CUDA graph.
    pub enforce_eager: bool,
    /// The most tokens one batch may feed.
    pub max_batch_tokens: usize,
    /// Element type of the KV cache (bf16 by default; f16 is 8x closer to the f32 reference; f32
    /// doubles the cache memory and attention reads but gives bit-for-bit the reference's
    /// attention inputs).
    pub kv_dtype: KvDtype,
    /// Most tokens of one wide (tensor-core) launch: prompts longer than MAXT run in chunks of
    /// this many tokens, and more than MAXT decode tokens run together (up to 64 sequences).
    /// 0 (or <= MAXT) turns the wide path off: everything runs MAXT tokens at a time through
    /// the decode kernels.
    pub wide_tokens: usize,
}

/// Default [`CudaOptions::wide_tokens`]: large enough that each expert of the 20b gets ~256
/// tokens of a chunk on average (top-4 of 32), so its weights are read once per 256 tokens and
/// the 128-token GEMM tiles apply; small enough for ~0.45 GB of scratch on the 20b.
pub const DEFAULT_WIDE_TOKENS: usize = 2048;

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            max_context: 32768,
            enforce_eager: false,
            max_batch_tokens: 65536,
            kv_dtype: KvDtype::default(),
            wide_tokens: DEFAULT_WIDE_TOKENS,
        }
    }
}

/// What one step of a batch returns: its logits rows, or (for [`LogitsWanted::LastGreedy`]) its
/// greedy token.
#[derive(Debug, Clone, Default)]
struct StepOut {
    logits: Vec<f32>,
    greedy: Option<u32>,
}

fn failed(e: String) -> BackendError {
    BackendError::Failed(e)
}

/// Device scratch buffers for one chunk of up to MAXT tokens.
pub(crate) struct Scratch {
    pub(crate) x: DevBuf,
    pub(crate) q: DevBuf,
    pub(crate) attn: DevBuf,
    pub(crate) h: DevBuf,
    pub(crate) rlog: DevBuf,
    pub(crate) sel: DevBuf,
    pub(crate) wsel: DevBuf,
    pub(crate) act: DevBuf,
    pub(crate) logits: DevBuf,
    pub(crate) idx: DevBuf,
    pub(crate) red_val: DevBuf,
    pub(crate) red_idx: DevBuf,
    pub(crate) part: DevBuf,
    /// Partial router logits of `k_oproj_router` (`[RP_MAXE + 1][RP_MAXB]`).
    pub(crate) rpart: DevBuf,
    pub(crate) counters: DevBuf,
    pub(crate) sp: DevBuf,
}

impl Scratch {
    fn new(gpu: &Gpu, d: &Dims) -> Result<Scratch, String> {
        let f = |n: usize| gpu.alloc_zeroed(n * 4);
        let red = gpu.info.sm_count * 8 * MAXT;
        Ok(Scratch {
            x: f(MAXT * d.h)?,
            q: f(MAXT * d.q_dim)?,
            attn: f(MAXT * d.q_dim)?,
            h: f(MAXT * d.h)?,
            rlog: f(MAXT * d.e)?,
            sel: f(MAXT * d.k)?,
            wsel: f(MAXT * d.k)?,
            act: f(MAXT * d.k * d.inter)?,
            logits: f(MAXT * d.vocab)?,
            idx: f(MAXT)?,
            red_val: f(red)?,
            red_idx: f(red)?,
            part: f(MAXT * d.nh * SMAX * PART)?,
            rpart: f((RP_MAXE + 1) * RP_MAXB)?,
            counters: f(MAXT * d.nkv + 8)?,
            sp: gpu.alloc_zeroed(std::mem::size_of::<StepParams>())?,
        })
    }
}

/// Full-attention caches grow in steps of this many positions (see [`grown_capacity`]).
pub const KV_GROW_POSITIONS: usize = 256;

/// What the driver may round a device allocation up to: large allocations are backed by 2 MiB
/// pages.
pub const ALLOC_GRANULE_BYTES: u64 = 2 << 20;

/// Device memory a server keeps free besides the KV cache once a warm-up step has run (which
/// loads every kernel, sizes their local memory and captures the decode graph): room for driver
/// bookkeeping that grows with the number of allocations, a graph re-instantiation, and
/// fragmentation.
pub const HEADROOM_BYTES: u64 = 256 << 20;

/// Capacity (positions) of a sequence's full-attention cache that must hold `need` positions,
/// given its current capacity `cap` (0 for a new sequence) and the backend's `max_context`.
///
/// The rule: `min(round_up(need, KV_GROW_POSITIONS), max_context)` — additive steps, not doubling.
/// The engine's block manager counts `ceil(len / block_size)` blocks per sequence and sizes its
/// pools from the KV budget, so every position allocated beyond that count is memory the budget
/// does not know about. Doubling (the old rule) let a sequence hold up to twice its accounted
/// blocks; with additive steps it holds fewer than `KV_GROW_POSITIONS` extra positions, a fixed
/// per-sequence slack the budget reserves ([`DeviceMemory::kv_grow_positions`]). The price is
/// copies: growing copies the sequence's whole cache, once per `KV_GROW_POSITIONS` tokens instead
/// of once per doubling. That is cheap next to the attention itself, which reads the whole cache
/// once per decoded token: one copy (read + write) every 256 tokens adds under 1 % to the
/// attention's memory traffic (and a long prompt grows once per forward call, not per chunk).
pub fn grown_capacity(cap: usize, need: usize, max_context: usize) -> usize {
    if need <= cap {
        return cap;
    }
    need.div_ceil(KV_GROW_POSITIONS)
        .saturating_mul(KV_GROW_POSITIONS)
        .min(max_context)
        .max(need)
}

/// Where one layer's K or V of a sequence starts (inside a [`SeqCache`] allocation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvView {
    pub(crate) ptr: u64,
}

impl KvView {
    /// The address `off` bytes in.
    pub(crate) fn at(&self, off: usize) -> u64 {
        self.ptr + off as u64
    }
}

/// Per full-attention layer: its index, where its K and where its V start.
type FullViews = Vec<(usize, KvView, KvView)>;

/// The KV cache of one sequence: per layer, K and V of `[slots, kv_dim]` (elements of
/// [`CudaOptions::kv_dtype`]); `slots` is `cap` for full-attention layers and
/// `sliding_window + RING_EXTRA` (a ring) for sliding ones.
///
/// Two device allocations per sequence (so that per-allocation rounding costs at most two
/// granules): one holds K then V of every full-attention layer (`[2][full layers][cap][kv_dim]`,
/// replaced by a larger one when the sequence grows), the other K then V of every sliding layer
/// (`[2][sliding layers][ring][kv_dim]`, fixed size).
pub(crate) struct SeqCache {
    pub(crate) len: usize,
    /// Slots of the full-attention layers.
    pub(crate) cap: usize,
    /// Per layer, its K and V.
    pub(crate) k: Vec<KvView>,
    pub(crate) v: Vec<KvView>,
    full: Option<DevBuf>,
    sliding: Option<DevBuf>,
}

/// Timings and counts of the last load.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub seconds: f64,
    pub weight_bytes: usize,
}

/// The CUDA backend. See the module documentation.
pub struct CudaBackend {
    pub(crate) cfg: GptOssConfig,
    pub(crate) dims: Dims,
    pub(crate) plan: SmemPlan,
    opts: CudaOptions,
    seqs: HashMap<SeqId, SeqCache>,
    /// The captured batch-1 decode step, see `run_chunk`.
    graph: Option<Graph>,
    load: LoadReport,
    pub(crate) scratch: Scratch,
    pub(crate) model: DeviceModel,
    /// Single-token steps run o_proj + router + top-k as one kernel (`k_oproj_router`).
    pub(crate) fused_router: bool,
    /// Single-token steps run the experts with `k_moe_gu1` / `k_moe_dn1`.
    pub(crate) moe1: bool,
    /// Single-token steps run the experts on the tensor cores (`k_moe_gu_mma` /
    /// `k_moe_dn_mma`; `scratch.act` then holds bf16 hi/lo pairs, see moe_mma.cu) in the layers
    /// whose experts they handle (see [`Self::moe_mma_at`]).
    pub(crate) moe_mma: bool,
    pub(crate) k: Kernels,
    /// The tensor-core path for launches of more than MAXT tokens (None: `wide_tokens` 0).
    pub(crate) wide: Option<Wide>,
    // Dropped last: the context must outlive every buffer.
    pub(crate) gpu: Gpu,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        let _ = self.gpu.sync();
        self.graph = None;
        self.seqs.clear();
    }
}

impl CudaBackend {
    /// Opens the checkpoint in `dir` and uploads it to GPU `opts.device`. Fails with a clear
    /// error (never a panic) without a usable GPU, on GPUs older than sm_80, and for shapes the
    /// kernels do not handle.
    pub fn open(dir: &Path, opts: CudaOptions) -> Result<Self, BackendError> {
        crate::driver::probe(opts.device).map_err(failed)?;
        let ckpt = Arc::new(Checkpoint::open(dir).map_err(|e| failed(e.to_string()))?);
        let w = ModelWeights::new(&ckpt).map_err(|e| failed(e.to_string()))?;
        Self::from_weights(&w, opts)
    }

    /// Uploads already mapped weights (the checkpoint may be dropped afterwards).
    pub fn from_weights(w: &ModelWeights<'_>, opts: CudaOptions) -> Result<Self, BackendError> {
        let start = Instant::now();
        let cfg = w.config.clone();
        crate::upload::check_config(&cfg).map_err(failed)?;
        let gpu = Gpu::open(opts.device).map_err(failed)?;
        let dims = Dims {
            h: cfg.hidden_size,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            q_dim: cfg.q_dim(),
            kv_dim: cfg.kv_dim(),
            e: cfg.num_local_experts,
            k: cfg.num_experts_per_tok,
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            layers: cfg.num_hidden_layers,
            eps: cfg.rms_norm_eps as f32,
            alpha: gptoss_formats::config::SWIGLU_ALPHA,
            limit: cfg.swiglu_limit as f32,
            kv: opts.kv_dtype,
        };
        let plan = SmemPlan::new(dims.h, dims.q_dim, dims.inter, dims.k);
        let k = Kernels::load(&gpu, &plan).map_err(failed)?;
        let max_context = opts.max_context.min(cfg.max_position_embeddings).max(1);
        let model = DeviceModel::upload(&gpu, w, max_context).map_err(failed)?;
        let scratch = Scratch::new(&gpu, &dims).map_err(failed)?;
        let wide = if opts.wide_tokens > MAXT {
            Some(Wide::new(&gpu, &dims, opts.wide_tokens).map_err(failed)?)
        } else {
            None
        };
        gpu.sync().map_err(failed)?;
        // GPTOSS_CUDA_V5=1 (or GPTOSS_CUDA_NO_FUSED_ROUTER=1) runs the v5 kernels instead, for
        // A/B measurements in one binary. GPTOSS_CUDA_MOE1=1 opts in to k_moe_gu1 / k_moe_dn1,
        // which are correct but measured slower than k_moe_gu / k_moe_dn (bench/CUDA.md, v6).
        let env = |n: &str| std::env::var(n).is_ok_and(|v| !v.is_empty() && v != "0");
        let v5 = env("GPTOSS_CUDA_V5");
        let fused_router = !v5
            && !env("GPTOSS_CUDA_NO_FUSED_ROUTER")
            && dims.e <= RP_MAXE
            && dims.k <= dims.e
            && model.layers.iter().all(|l| {
                l.router.kind == K_BF16
                    && l.router.cols as usize == dims.h
                    && l.router.rows as usize == dims.e
                    && l.o.rows as usize == dims.h
            });
        let moe1 =
            !v5 && env("GPTOSS_CUDA_MOE1") && model.experts_4bit && Kernels::moe1_supported(&dims);
        // GPTOSS_CUDA_MOE_MMA=1 opts in to the tensor-core expert kernels (bnb 4-bit experts):
        // correct to ~5e-6 but measured no faster than the GEMV ones at batch 1 (bench/CUDA.md, v7).
        let moe_mma = !v5 && !moe1 && env("GPTOSS_CUDA_MOE_MMA") && k.moe_mma_supported(&dims);
        let load = LoadReport {
            seconds: start.elapsed().as_secs_f64(),
            weight_bytes: model.weight_bytes,
        };
        Ok(CudaBackend {
            cfg,
            dims,
            plan,
            opts,
            seqs: HashMap::new(),
            graph: None,
            load,
            scratch,
            model,
            fused_router,
            moe1,
            moe_mma,
            k,
            wide,
            gpu,
        })
    }

    /// The GPU in use.
    pub fn device(&self) -> &DeviceInfo {
        &self.gpu.info
    }

    /// Load time and bytes of weights on the GPU.
    pub fn load_report(&self) -> &LoadReport {
        &self.load
    }

    /// Weight bytes a decoded token reads.
    pub fn read_bytes(&self) -> &ReadBytes {
        &self.model.read
    }

    /// KV-cache bytes a decoded token at context `ctx` reads (bf16 K and V).
    pub fn kv_read_bytes(&self, ctx: usize) -> u64 {
        let per_pos = (2 * self.dims.kv_dim * self.dims.kv_elem()) as u64;
        (0..self.dims.layers)
            .map(|l| {
                let n = if self.cfg.is_sliding(l) {
                    ctx.min(self.cfg.sliding_window)
                } else {
                    ctx
                };
                n as u64 * per_pos
            })
            .sum()
    }

    /// (free, total) device memory now.
    pub fn memory(&self) -> Result<(usize, usize), BackendError> {
        self.gpu.bind().map_err(failed)?;
        self.gpu.mem_info().map_err(failed)
    }

    /// Tokens held for `seq`.
    pub fn cached_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|c| c.len)
    }

    /// Positions the backend can hold per sequence.
    pub fn max_context(&self) -> usize {
        self.model.max_context
    }

    /// Positions each sliding-window layer keeps per sequence (its ring).
    fn ring_slots(&self) -> usize {
        self.cfg.sliding_window + RING_EXTRA
    }

    /// The full-attention layers' K/V allocation for `cap` positions (`None` without such
    /// layers) and, per full layer, where its K and V start.
    fn alloc_full(&self, cap: usize) -> Result<(Option<DevBuf>, FullViews), String> {
        let slot = self.dims.kv_dim * self.dims.kv_elem();
        let full: Vec<usize> = (0..self.dims.layers)
            .filter(|&l| !self.cfg.is_sliding(l))
            .collect();
        if full.is_empty() {
            return Ok((None, Vec::new()));
        }
        let buf = self.gpu.alloc_zeroed(2 * full.len() * cap * slot)?;
        let views = full
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let k = KvView {
                    ptr: buf.at(i * cap * slot),
                };
                let v = KvView {
                    ptr: buf.at((full.len() + i) * cap * slot),
                };
                (l, k, v)
            })
            .collect();
        Ok((Some(buf), views))
    }

    /// An empty cache whose full-attention layers hold `cap` positions.
    pub(crate) fn new_cache(&self, cap: usize) -> Result<SeqCache, String> {
        let slot = self.dims.kv_dim * self.dims.kv_elem();
        let ring = self.ring_slots();
        let n = self.dims.layers;
        let mut k = vec![KvView { ptr: 0 }; n];
        let mut v = vec![KvView { ptr: 0 }; n];
        let (full, views) = self.alloc_full(cap)?;
        for (l, kv, vv) in views {
            (k[l], v[l]) = (kv, vv);
        }
        let sliding: Vec<usize> = (0..n).filter(|&l| self.cfg.is_sliding(l)).collect();
        let sliding_buf = if sliding.is_empty() {
            None
        } else {
            let buf = self.gpu.alloc_zeroed(2 * sliding.len() * ring * slot)?;
            for (i, &l) in sliding.iter().enumerate() {
                k[l] = KvView {
                    ptr: buf.at(i * ring * slot),
                };
                v[l] = KvView {
                    ptr: buf.at((sliding.len() + i) * ring * slot),
                };
            }
            Some(buf)
        };
        Ok(SeqCache {
            len: 0,
            cap,
            k,
            v,
            full,
            sliding: sliding_buf,
        })
    }

    /// Grows the full-attention layers of `c` to hold `need` positions ([`grown_capacity`]): a
    /// new allocation, the `len` cached positions of every layer copied into it, then the old
    /// one freed — so for the length of the copy the sequence holds both (the KV budget reserves
    /// room for that copy of the longest sequence). On error `c` is unchanged.
    fn grow(&self, c: &mut SeqCache, need: usize) -> Result<(), String> {
        if need <= c.cap {
            return Ok(());
        }
        let cap = grown_capacity(c.cap, need, self.model.max_context);
        let bytes = c.len * self.dims.kv_dim * self.dims.kv_elem();
        let (full, views) = self.alloc_full(cap)?;
        if bytes > 0 {
            for &(l, k, v) in &views {
                self.gpu.copy_d2d(k.ptr, c.k[l].ptr, bytes)?;
                self.gpu.copy_d2d(v.ptr, c.v[l].ptr, bytes)?;
            }
        }
        self.gpu.sync()?;
        for (l, k, v) in views {
            (c.k[l], c.v[l]) = (k, v);
        }
        // Frees the old allocation (the copies are done).
        c.full = full;
        c.cap = cap;
        Ok(())
    }

    /// Creates `seq` if needed (empty) and grows its cache to hold `positions` positions without
    /// feeding anything, so memory tests can allocate a full-length sequence without a prefill
    /// of that length. Later steps continue at the sequence's cached length as usual.
    #[doc(hidden)]
    pub fn reserve_sequence(&mut self, seq: SeqId, positions: usize) -> Result<(), BackendError> {
        if positions > self.model.max_context {
            return Err(BackendError::InvalidInput(format!(
                "cannot reserve {positions} positions: beyond this backend's max_context of {} (CudaOptions::max_context)",
                self.model.max_context
            )));
        }
        self.gpu.bind().map_err(failed)?;
        let mut c = match self.seqs.remove(&seq) {
            Some(c) => c,
            None => self
                .new_cache(grown_capacity(0, positions.max(1), self.model.max_context))
                .map_err(failed)?,
        };
        let res = self.grow(&mut c, positions);
        self.seqs.insert(seq, c);
        res.map_err(failed)
    }

    /// Device bytes the cache of `seq` holds (both allocations, before driver rounding).
    #[doc(hidden)]
    pub fn sequence_bytes(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|c| {
            c.full.as_ref().map_or(0, |b| b.bytes) + c.sliding.as_ref().map_or(0, |b| b.bytes)
        })
    }

    /// StepParams of `tokens` of one sequence at positions `pos0..`.
    pub(crate) fn params(&self, c: &SeqCache, tokens: &[u32], pos0: usize) -> StepParams {
        let rows: Vec<(&SeqCache, u32, usize)> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (c, t, pos0 + i))
            .collect();
        self.params_of(&rows)
    }

    /// StepParams of up to MAXT (cache, token, position) rows, each token of its own sequence.
    pub(crate) fn params_of(&self, rows: &[(&SeqCache, u32, usize)]) -> StepParams {
        let mut sp = StepParams {
            t: rows.len() as i32,
            ..StepParams::default()
        };
        for (i, &(c, tok, pos)) in rows.iter().enumerate() {
            sp.tok[i] = tok as i32;
            sp.pos[i] = pos as i32;
            for l in 0..self.dims.layers {
                sp.kc[i][l] = c.k[l].ptr;
                sp.vc[i][l] = c.v[l].ptr;
            }
        }
        sp
    }

    pub(crate) fn nt_index(t: usize) -> (usize, usize) {
        if t == 1 { (1, 0) } else { (MAXT, 1) }
    }

    /// Queues the layers (and, for `lm = Some((first, count))`, the final norm + lm_head +
    /// argmax of those rows) for a chunk of `t` tokens whose StepParams are on the device.
    fn record(&self, t: usize, lm: Option<(usize, usize)>) -> Result<(), String> {
        self.record_marked(t, lm, &mut |_| Ok(()))
    }

    /// [`record`](Self::record), calling `mark(kernel)` before each launch (for profiling).
    fn record_marked(
        &self,
        t: usize,
        lm: Option<(usize, usize)>,
        mark: &mut dyn FnMut(&'static str) -> Result<(), String>,
    ) -> Result<(), String> {
        let (k, s, d, sc, m) = (
            &self.k,
            &self.gpu.stream,
            &self.dims,
            &self.scratch,
            &self.model,
        );
        let (nt, i) = Self::nt_index(t);
        let sp = sc.sp.ptr;
        mark("k_embed")?;
        k.embed(s, &m.embed, sp, sc.x.ptr, d.h, t)?;
        let attn_counters = sc.counters.ptr;
        let lin_counter = sc.counters.at(MAXT * d.nkv * 4);
        for l in 0..d.layers {
            let ld = m
                .layer_dev
                .at(l * std::mem::size_of::<crate::kernels::LayerDev>());
            mark("k_qkv (rmsnorm+q/k/v+rope)")?;
            k.qkv(
                s,
                nt,
                self.plan.qkv[i],
                ld,
                sp,
                l,
                sc.x.ptr,
                d,
                sc.q.ptr,
                m.cos.ptr,
                m.sin.ptr,
            )?;
            mark("k_attn")?;
            k.attn(
                s,
                ld,
                sp,
                l,
                sc.q.ptr,
                sc.attn.ptr,
                sc.part.ptr,
                attn_counters,
                d,
                t,
            )?;
            self.record_oproj_router(t, l, lin_counter, mark)?;
            self.record_moe(t, l, mark)?;
        }
        if let Some((first, count)) = lm {
            mark("k_linear lm_head+argmax")?;
            self.lm_head_rows(sc.x.at(first * d.h * 4), count)?;
        }
        mark("end")?;
        Ok(())
    }

    /// Final RMSNorm + lm_head + greedy argmax of `count` (<= MAXT) consecutive f32 rows of
    /// the residual stream at `x` into `scratch.logits` / `scratch.idx`.
    pub(crate) fn lm_head_rows(&self, x: u64, count: usize) -> Result<(), String> {
        let (k, s, d, sc, m) = (
            &self.k,
            &self.gpu.stream,
            &self.dims,
            &self.scratch,
            &self.model,
        );
        let (nt, i) = Self::nt_index(count);
        let extra = LinearExtra {
            idx_out: sc.idx.ptr,
            red_val: sc.red_val.ptr,
            red_idx: sc.red_idx.ptr,
            counter: sc.counters.at((MAXT * d.nkv + 1) * 4),
            ..LinearExtra::default()
        };
        k.linear(
            s,
            nt,
            self.plan.linear_h[i],
            &m.lm_head,
            x,
            d.h,
            count,
            m.norm,
            d.eps,
            sc.logits.ptr,
            d.vocab,
            F_NORM | F_ARGMAX,
            &extra,
        )
    }

    /// The experts of layer `l`: gate_up + SwiGLU, then down + weighted sum + residual
    /// (`k_moe_gu1` / `k_moe_dn1` for single tokens when [`Self::moe1`], else `k_moe_gu` /
    /// `k_moe_dn`).
    pub(crate) fn record_moe(
        &self,
        t: usize,
        l: usize,
        mark: &mut dyn FnMut(&'static str) -> Result<(), String>,
    ) -> Result<(), String> {
        let (k, s, d, sc, m) = (
            &self.k,
            &self.gpu.stream,
            &self.dims,
            &self.scratch,
            &self.model,
        );
        let ld = m
            .layer_dev
            .at(l * std::mem::size_of::<crate::kernels::LayerDev>());
        if t == 1 && self.moe_mma_at(l) {
            mark("k_moe_gu_mma")?;
            k.moe_gu_mma(
                s,
                self.plan.moe_gu_mma,
                ld,
                sc.h.ptr,
                d,
                sc.sel.ptr,
                sc.act.ptr,
            )?;
            mark("k_moe_dn_mma")?;
            return k.moe_dn_mma(
                s,
                self.plan.moe_dn_mma,
                ld,
                sc.act.ptr,
                d,
                sc.sel.ptr,
                sc.wsel.ptr,
                sc.x.ptr,
            );
        }
        if t == 1 && self.moe1 {
            mark("k_moe_gu1")?;
            k.moe_gu1(s, ld, sc.h.ptr, d, sc.sel.ptr, sc.act.ptr)?;
            mark("k_moe_dn1")?;
            return k.moe_dn1(s, ld, sc.act.ptr, d, sc.sel.ptr, sc.wsel.ptr, sc.x.ptr);
        }
        let sp = sc.sp.ptr;
        mark("k_moe_gu")?;
        k.moe_gu(
            s,
            self.plan.moe_gu,
            ld,
            sp,
            sc.h.ptr,
            d,
            t,
            sc.sel.ptr,
            sc.act.ptr,
        )?;
        mark("k_moe_dn")?;
        k.moe_dn(
            s,
            self.plan.moe_dn,
            ld,
            sp,
            sc.act.ptr,
            d,
            t,
            sc.sel.ptr,
            sc.wsel.ptr,
            sc.x.ptr,
        )
    }

    /// Which expert kernels a step of `t` tokens runs in layer `l` (for test reports).
    #[doc(hidden)]
    pub fn expert_kernels(&self, l: usize, t: usize) -> &'static str {
        if t == 1 && self.moe_mma_at(l) {
            "k_moe_gu_mma/k_moe_dn_mma"
        } else if t == 1 && self.moe1 {
            "k_moe_gu1/k_moe_dn1"
        } else {
            "k_moe_gu/k_moe_dn"
        }
    }

    /// Whether single-token steps of layer `l` run the tensor-core expert kernels.
    pub(crate) fn moe_mma_at(&self, l: usize) -> bool {
        self.moe_mma && self.model.experts_bnb_one_code[l]
    }

    /// o_proj + residual, then RMSNorm + router + top-k of layer `l` (x, h, router logits,
    /// sel, wsel): one `k_oproj_router` for single tokens when [`Self::fused_router`], else two
    /// `k_linear` launches (chunks of several tokens, routers `k_oproj_router` does not handle).
    pub(crate) fn record_oproj_router(
        &self,
        t: usize,
        l: usize,
        lin_counter: u64,
        mark: &mut dyn FnMut(&'static str) -> Result<(), String>,
    ) -> Result<(), String> {
        let (k, s, d, sc, m) = (
            &self.k,
            &self.gpu.stream,
            &self.dims,
            &self.scratch,
            &self.model,
        );
        let (nt, i) = Self::nt_index(t);
        let lh = &m.layers[l];
        if t == 1 && self.fused_router {
            let ld = m
                .layer_dev
                .at(l * std::mem::size_of::<crate::kernels::LayerDev>());
            mark("k_oproj_router (o_proj+rmsnorm+router+top-k)")?;
            return k.oproj_router(
                s,
                self.plan.linear_q[0],
                ld,
                sc.attn.ptr,
                sc.x.ptr,
                d,
                sc.h.ptr,
                sc.rlog.ptr,
                sc.rpart.ptr,
                lin_counter,
                sc.sel.ptr,
                sc.wsel.ptr,
            );
        }
        {
            let none = LinearExtra::default();
            mark("k_linear o_proj")?;
            k.linear(
                s,
                nt,
                self.plan.linear_q[i],
                &lh.o,
                sc.attn.ptr,
                d.q_dim,
                t,
                0,
                d.eps,
                sc.x.ptr,
                d.h,
                F_RESID,
                &none,
            )?;
            let router = LinearExtra {
                aux: sc.h.ptr,
                counter: lin_counter,
                topk: d.k as i32,
                sel: sc.sel.ptr,
                wsel: sc.wsel.ptr,
                ..LinearExtra::default()
            };
            mark("k_linear router+top-k")?;
            k.linear(
                s,
                nt,
                self.plan.linear_h[i],
                &lh.router,
                sc.x.ptr,
                d.h,
                t,
                lh.post_norm,
                d.eps,
                sc.rlog.ptr,
                d.e,
                F_NORM | F_WRITE_NORMED | F_TOPK,
                &router,
            )?;
        }
        Ok(())
    }

    /// Runs the tokens described by `sp` (<= MAXT; uploaded here); computes lm_head rows `lm` if
    /// asked. A single-token step (batch-1 decode) replays a captured CUDA graph (unless
    /// `enforce_eager`): the kernels read every per-step value from the device-side StepParams.
    /// Multi-token launch sequences run eagerly: a graph of the 4-token decode of 4 sequences
    /// measured slower than its eager launches (11.4 vs 8.4 ms per step on the H100, cause not
    /// found yet; bench/CUDA.md).
    fn run_chunk(&mut self, sp: &StepParams, lm: Option<(usize, usize)>) -> Result<(), String> {
        let t = sp.t as usize;
        self.gpu
            .upload_async(self.scratch.sp.ptr, std::slice::from_ref(sp))?;
        if t == 1 && lm == Some((0, 1)) && !self.opts.enforce_eager {
            if self.graph.is_none() {
                self.graph = Some(Graph::capture(&self.gpu.stream, || self.record(1, lm))?);
            }
            self.graph
                .as_ref()
                .expect("captured")
                .launch(&self.gpu.stream)
        } else {
            self.record(t, lm)
        }
    }

    /// One decode token for each of up to [`Self::decode_group`] sequences (validated), run as
    /// one launch sequence (more than MAXT: a wide launch): the weights are read once for all of
    /// them. Returns each one's logits row, or for a [`LogitsWanted::LastGreedy`] row only its
    /// greedy token (picked on the device; 4 bytes copied instead of a vocabulary row).
    fn decode_together(
        &mut self,
        rows: &[(SeqId, u32, usize)],
        want: &[LogitsWanted],
    ) -> Result<Vec<StepOut>, String> {
        let mut caches = Vec::with_capacity(rows.len());
        for &(seq, _, pos) in rows {
            let c = match self.seqs.remove(&seq) {
                Some(c) => Ok(c),
                None => self.new_cache(grown_capacity(0, pos + 1, self.model.max_context)),
            };
            caches.push(c);
        }
        let res = (|| {
            let mut cs = Vec::with_capacity(rows.len());
            for c in &mut caches {
                match c {
                    Ok(c) => cs.push(c),
                    Err(e) => return Err(e.clone()),
                }
            }
            for (c, &(_, _, pos)) in cs.iter_mut().zip(rows) {
                self.grow(c, pos + 1)?;
            }
            let mut out: Vec<StepOut> = vec![StepOut::default(); rows.len()];
            let mut done = 0;
            let mut sink = |b: &Self, logits: u64, idx: u64, n: usize| {
                b.collect_rows(&mut out[done..done + n], &want[done..done + n], logits, idx)?;
                done += n;
                Ok(())
            };
            if rows.len() > MAXT {
                let toks: Vec<[u32; 1]> = rows.iter().map(|r| [r.1]).collect();
                let segs: Vec<WideSeg<'_>> = cs
                    .iter()
                    .zip(rows)
                    .zip(&toks)
                    .map(|((c, &(_, _, pos)), tk)| (&**c, &tk[..], pos))
                    .collect();
                let lm: Vec<usize> = (0..rows.len()).collect();
                self.run_wide(&segs, &lm, &mut sink)?;
            } else {
                let params: Vec<(&SeqCache, u32, usize)> = cs
                    .iter()
                    .zip(rows)
                    .map(|(c, &(_, tok, pos))| (&**c, tok, pos))
                    .collect();
                let sp = self.params_of(&params);
                self.run_chunk(&sp, Some((0, rows.len())))?;
                sink(
                    self,
                    self.scratch.logits.ptr,
                    self.scratch.idx.ptr,
                    rows.len(),
                )?;
            }
            Ok(out)
        })();
        for (c, &(seq, _, pos)) in caches.into_iter().zip(rows) {
            if let Ok(mut c) = c {
                if res.is_ok() {
                    c.len = pos + 1;
                }
                self.seqs.insert(seq, c);
            }
        }
        res
    }

    /// Copies a block of computed rows to the host: the greedy token of each `LastGreedy` row
    /// (from `idx`), the logits row of every other one (from `logits`; through the pinned
    /// buffer when every row of the block wants its logits).
    fn collect_rows(
        &self,
        out: &mut [StepOut],
        want: &[LogitsWanted],
        logits: u64,
        idx: u64,
    ) -> Result<(), String> {
        let vocab = self.dims.vocab;
        if want.contains(&LogitsWanted::LastGreedy) {
            let mut ids = vec![0i32; out.len()];
            self.gpu.download(&mut ids, idx)?;
            for (i, (o, w)) in out.iter_mut().zip(want).enumerate() {
                if *w == LogitsWanted::LastGreedy {
                    o.greedy = u32::try_from(ids[i]).ok();
                } else {
                    o.logits.resize(vocab, 0.0);
                    self.gpu
                        .download(&mut o.logits, logits + (i * vocab * 4) as u64)?;
                }
            }
            return Ok(());
        }
        let mut rows: Vec<Vec<f32>> = out
            .iter_mut()
            .map(|o| std::mem::take(&mut o.logits))
            .collect();
        self.download_logit_rows(&mut rows, logits)?;
        for (o, r) in out.iter_mut().zip(rows) {
            o.logits = r;
        }
        Ok(())
    }

    /// Feeds `tokens` to `seq` from `start_pos` (already validated); for each block of wanted
    /// logits rows, `sink(backend, logits, idx, count)` is called after it ran (device pointers
    /// of the f32 rows and their i32 greedy tokens).
    fn feed(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        start_pos: usize,
        want: LogitsWanted,
        mut sink: impl FnMut(&Self, u64, u64, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut c = match self.seqs.remove(&seq) {
            Some(c) => c,
            None => self.new_cache(grown_capacity(
                0,
                start_pos + tokens.len(),
                self.model.max_context,
            ))?,
        };
        let res = (|| {
            self.grow(&mut c, start_pos + tokens.len())?;
            let n = tokens.len();
            // Prompts longer than MAXT run in wide launches of up to `wide_cap` tokens.
            let step = if n > MAXT {
                self.wide_cap().max(MAXT)
            } else {
                MAXT
            };
            for (ci, chunk) in tokens.chunks(step).enumerate() {
                let first_tok = ci * step;
                let lm = match want {
                    LogitsWanted::All => Some((0, chunk.len())),
                    LogitsWanted::Last | LogitsWanted::LastGreedy
                        if first_tok + chunk.len() == n =>
                    {
                        Some((chunk.len() - 1, 1))
                    }
                    LogitsWanted::Last | LogitsWanted::LastGreedy => None,
                };
                if chunk.len() > MAXT {
                    let rows: Vec<usize> =
                        lm.map(|(f, k)| (f..f + k).collect()).unwrap_or_default();
                    self.run_wide(
                        &[(&c, chunk, start_pos + first_tok)],
                        &rows,
                        &mut |b, p, ix, k| sink(b, p, ix, k),
                    )?;
                } else {
                    let sp = self.params(&c, chunk, start_pos + first_tok);
                    self.run_chunk(&sp, lm)?;
                    if let Some((_, count)) = lm {
                        sink(self, self.scratch.logits.ptr, self.scratch.idx.ptr, count)?;
                    }
                }
            }
            Ok(())
        })();
        if res.is_ok() {
            c.len = start_pos + tokens.len();
        }
        self.seqs.insert(seq, c);
        res
    }

    /// Most tokens of one wide launch (0 without the wide path).
    pub(crate) fn wide_cap(&self) -> usize {
        self.wide.as_ref().map_or(0, |w| w.scratch.cap)
    }

    /// Most decode tokens (sequences) run as one launch sequence.
    pub(crate) fn decode_group(&self) -> usize {
        if self.wide.is_some() {
            MAX_SEGS.min(self.wide_cap())
        } else {
            MAXT
        }
    }

    fn check_step(&self, seq: SeqId, tokens: &[u32], start_pos: usize) -> Result<(), BackendError> {
        let cached = self.cached_len(seq).unwrap_or(0);
        if start_pos != cached {
            return Err(BackendError::PositionMismatch {
                seq,
                start_pos,
                cached,
            });
        }
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= self.dims.vocab)
        {
            return Err(BackendError::InvalidInput(format!(
                "token id {t} (at index {i}) is out of range: the vocabulary has {} tokens",
                self.dims.vocab
            )));
        }
        if start_pos + tokens.len() > self.model.max_context {
            return Err(BackendError::InvalidInput(format!(
                "sequence {seq} would reach {} positions, beyond this backend's max_context of {} (CudaOptions::max_context)",
                start_pos + tokens.len(),
                self.model.max_context
            )));
        }
        Ok(())
    }

    /// Feeds a prompt (or any tokens) and returns the greedy next token after the last one;
    /// only the token id is copied back.
    pub fn prefill_greedy(&mut self, seq: SeqId, tokens: &[u32]) -> Result<u32, BackendError> {
        self.gpu.bind().map_err(failed)?;
        if tokens.is_empty() {
            return Err(BackendError::EmptyStep(seq));
        }
        let start = self.cached_len(seq).unwrap_or(0);
        self.check_step(seq, tokens, start)?;
        let mut out = None;
        self.feed(
            seq,
            tokens,
            start,
            LogitsWanted::LastGreedy,
            |b, _, idx, _| {
                let mut id = [0i32; 1];
                b.gpu.download(&mut id, idx)?;
                out = u32::try_from(id[0]).ok();
                Ok(())
            },
        )
        .map_err(failed)?;
        out.ok_or_else(|| {
            failed(format!(
                "sequence {seq}: no logit above -inf (no greedy token)"
            ))
        })
    }

    /// Runs a short prompt (a wide launch when the wide path is on) and a decode step on a
    /// scratch sequence, then releases it: loads cuBLAS's kernels, allocates its workspace and
    /// captures the decode graph, so that timings and memory figures taken afterwards exclude
    /// first-use costs.
    pub fn warm_up(&mut self) -> Result<(), BackendError> {
        const SEQ: SeqId = SeqId::MAX - 1;
        let n = (MAXT + 12)
            .min(self.model.max_context.saturating_sub(1))
            .max(1);
        let res = self.prefill_greedy(SEQ, &vec![0; n]).and_then(|t| {
            if n < self.model.max_context {
                self.decode_greedy(SEQ, t).map(|_| ())
            } else {
                Ok(())
            }
        });
        self.release(SEQ);
        res
    }

    /// One batch-1 decode step (CUDA graph unless `enforce_eager`): feeds `token` and returns
    /// the greedy next token.
    pub fn decode_greedy(&mut self, seq: SeqId, token: u32) -> Result<u32, BackendError> {
        self.prefill_greedy(seq, &[token])
    }

    /// Measures the device's read bandwidth (bytes/s) over a buffer of `bytes` (median of
    /// `reps` timed passes after a warm-up).
    pub fn read_bandwidth(&mut self, bytes: usize, reps: usize) -> Result<f64, BackendError> {
        self.gpu.bind().map_err(failed)?;
        let run = || -> Result<f64, String> {
            let buf = self.gpu.alloc_zeroed(bytes / 16 * 16)?;
            let blocks = self.k.sm_count() * 8;
            let out = self.gpu.alloc_zeroed(blocks * 4)?;
            let timer = Timer::new()?;
            self.k.read_bw(&self.gpu.stream, &buf, &out, blocks)?;
            let mut times = Vec::new();
            for _ in 0..reps.max(1) {
                timer.start(&self.gpu.stream)?;
                self.k.read_bw(&self.gpu.stream, &buf, &out, blocks)?;
                times.push(timer.stop_ms(&self.gpu.stream)? as f64);
            }
            times.sort_by(f64::total_cmp);
            Ok(buf.bytes as f64 / (times[times.len() / 2] * 1e-3))
        };
        run().map_err(failed)
    }

    /// Device time (ms) of one forward of `t` tokens at the current length of `seq`, repeated
    /// `reps` times without advancing the cache (the same K/V slots are rewritten): the median.
    /// For decode (`t = 1`) the graph is timed unless `enforce_eager`.
    pub fn time_step(&mut self, seq: SeqId, t: usize, reps: usize) -> Result<f64, BackendError> {
        self.gpu.bind().map_err(failed)?;
        let mut c = self
            .seqs
            .remove(&seq)
            .ok_or_else(|| BackendError::InvalidInput(format!("unknown sequence {seq}")))?;
        let res = (|| -> Result<f64, String> {
            if c.len + t > self.model.max_context {
                return Err("beyond max_context".into());
            }
            let need = c.len + t;
            self.grow(&mut c, need)?;
            let tokens = vec![0u32; t.min(MAXT)];
            let timer = Timer::new()?;
            let lm = Some((tokens.len() - 1, 1));
            let sp = self.params(&c, &tokens, c.len);
            self.run_chunk(&sp, lm)?;
            let mut times = Vec::new();
            for _ in 0..reps.max(1) {
                timer.start(&self.gpu.stream)?;
                self.run_chunk(&sp, lm)?;
                times.push(timer.stop_ms(&self.gpu.stream)? as f64);
            }
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2])
        })();
        self.seqs.insert(seq, c);
        res.map_err(failed)
    }
}

impl CudaBackend {
    /// Per-kernel device time (ms, summed over layers) of one eager batch-1 decode step at the
    /// current length of `seq` (the cache is not advanced), averaged over `reps` runs.
    pub fn profile_decode(
        &mut self,
        seq: SeqId,
        reps: usize,
    ) -> Result<Vec<(String, f64)>, BackendError> {
        self.gpu.bind().map_err(failed)?;
        let c = self
            .seqs
            .remove(&seq)
            .ok_or_else(|| BackendError::InvalidInput(format!("unknown sequence {seq}")))?;
        let res = (|| -> Result<Vec<(String, f64)>, String> {
            let sp = self.params(&c, &[0], c.len);
            self.gpu
                .upload_async(self.scratch.sp.ptr, std::slice::from_ref(&sp))?;
            let mut totals: Vec<(String, f64)> = Vec::new();
            for _ in 0..reps.max(1) {
                let mut marks: Vec<(&'static str, Event)> = Vec::new();
                let stream = &self.gpu.stream;
                self.record_marked(1, Some((0, 1)), &mut |name| {
                    let e = Event::new()?;
                    e.record(stream)?;
                    marks.push((name, e));
                    Ok(())
                })?;
                self.gpu.sync()?;
                for w in marks.windows(2) {
                    let ms = w[0].1.ms_to(&w[1].1)? as f64 / reps.max(1) as f64;
                    match totals.iter_mut().find(|(n, _)| n == w[0].0) {
                        Some(t) => t.1 += ms,
                        None => totals.push((w[0].0.to_string(), ms)),
                    }
                }
            }
            Ok(totals)
        })();
        self.seqs.insert(seq, c);
        res.map_err(failed)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn config(&self) -> &GptOssConfig {
        &self.cfg
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<Logits, BackendError> {
        validate_batch(batch, self.opts.max_batch_tokens)?;
        for s in &batch.steps {
            self.check_step(s.seq, &s.tokens, s.start_pos)?;
        }
        self.gpu.bind().map_err(failed)?;
        let vocab = self.dims.vocab;
        let mut steps: Vec<StepOut> = vec![StepOut::default(); batch.steps.len()];
        // Single-token steps (decode) run `decode_group` sequences at a time, so the weights are
        // read once per group; the rest (prefill, chunked prefill) and a lone decode step one by
        // one.
        let decode: Vec<usize> = (0..batch.steps.len())
            .filter(|&i| batch.steps[i].tokens.len() == 1)
            .collect();
        let mut done = vec![false; batch.steps.len()];
        for group in decode.chunks(self.decode_group()).filter(|g| g.len() > 1) {
            let rows: Vec<(SeqId, u32, usize)> = group
                .iter()
                .map(|&i| {
                    let s = &batch.steps[i];
                    (s.seq, s.tokens[0], s.start_pos)
                })
                .collect();
            let want: Vec<LogitsWanted> =
                group.iter().map(|&i| batch.steps[i].want_logits).collect();
            let out = self.decode_together(&rows, &want).map_err(failed)?;
            for (&i, o) in group.iter().zip(out) {
                steps[i] = o;
                done[i] = true;
            }
        }
        for (i, s) in batch.steps.iter().enumerate().filter(|(i, _)| !done[*i]) {
            let mut o = StepOut::default();
            self.feed(
                s.seq,
                &s.tokens,
                s.start_pos,
                s.want_logits,
                |b, ptr, idx, count| {
                    if s.want_logits == LogitsWanted::LastGreedy {
                        let mut id = [0i32; 1];
                        b.gpu.download(&mut id, idx + (4 * (count - 1)) as u64)?;
                        o.greedy = u32::try_from(id[0]).ok();
                        return Ok(());
                    }
                    let start = o.logits.len();
                    o.logits.resize(start + count * vocab, 0.0);
                    b.download_logits(&mut o.logits[start..], ptr)
                },
            )
            .map_err(failed)?;
            steps[i] = o;
        }
        let (rows, greedy) = steps.into_iter().map(|o| (o.logits, o.greedy)).unzip();
        Ok(Logits::with_greedy(vocab, rows, greedy))
    }

    fn release(&mut self, seq: SeqId) {
        if self.seqs.contains_key(&seq) {
            let _ = self.gpu.bind();
            let _ = self.gpu.sync();
            self.seqs.remove(&seq);
        }
    }

    fn max_batch_tokens(&self) -> usize {
        self.opts.max_batch_tokens
    }

    fn device_memory(&self) -> Result<Option<DeviceMemory>, BackendError> {
        let (free, total) = self.memory()?;
        Ok(Some(DeviceMemory {
            total_bytes: total as u64,
            used_bytes: total.saturating_sub(free) as u64,
            kv_dtype_bytes: self.dims.kv_elem(),
            max_context: self.model.max_context,
            kv_grow_positions: KV_GROW_POSITIONS,
            kv_sliding_positions: self.ring_slots(),
            // SeqCache: one allocation for the full-attention layers, one for the sliding ones.
            kv_allocs_per_seq: 2,
            alloc_granule_bytes: ALLOC_GRANULE_BYTES,
            headroom_bytes: HEADROOM_BYTES,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_additive_and_capped() {
        // New sequences get the first step (or what they need, rounded up to a step).
        assert_eq!(grown_capacity(0, 1, 131072), 256);
        assert_eq!(grown_capacity(0, 300, 131072), 512);
        // No growth while it fits.
        assert_eq!(grown_capacity(512, 512, 131072), 512);
        // One step at a time, never doubling.
        assert_eq!(grown_capacity(4096, 4097, 131072), 4352);
        // Capped at max_context (which need never exceeds), even off a step boundary.
        assert_eq!(grown_capacity(130816, 131072, 131072), 131072);
        assert_eq!(grown_capacity(0, 5000, 5000), 5000);
        assert_eq!(grown_capacity(4864, 4999, 5000), 5000);
        // The slack over what a sequence needs stays under one step.
        for need in 1..3000 {
            let cap = grown_capacity(0, need, 131072);
            assert!(cap >= need && cap - need < KV_GROW_POSITIONS);
        }
    }
}
