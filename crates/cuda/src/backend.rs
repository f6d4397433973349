//! [`CudaBackend`]: the [`Backend`] on an NVIDIA GPU.
//!
//! One forward call runs, per sequence, its tokens in chunks of [`MAXT`] through:
//! `k_embed`, then per layer `k_qkv` (RMSNorm + q/k/v + RoPE + KV append) → `k_attn` →
//! `k_linear` (o_proj + residual) → `k_linear` (RMSNorm + router + top-k) → `k_moe_gu`
//! (selected experts' gate_up + SwiGLU) → `k_moe_dn` (down + weighted sum + residual), and, for
//! the rows whose logits are wanted, `k_linear` (final RMSNorm + lm_head + greedy argmax).
//! Batch-1 decode steps replay a CUDA graph of that sequence (all per-step values — token,
//! position, KV pointers — are read by the kernels from a device-side [`StepParams`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use gptoss_engine::backend::{
    Backend, BackendError, Logits, LogitsWanted, SeqId, StepBatch, validate_batch,
};
use gptoss_formats::{Checkpoint, GptOssConfig, ModelWeights};

use crate::driver::{DevBuf, DeviceInfo, Event, Gpu, Graph, Timer};
use crate::kernels::{
    Dims, F_ARGMAX, F_NORM, F_RESID, F_TOPK, F_WRITE_NORMED, K_BF16, Kernels, LinearExtra, MAXT,
    PART, RP_MAXB, RP_MAXE, SMAX, SmemPlan, StepParams,
};
use crate::upload::{DeviceModel, RING_EXTRA, ReadBytes};

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
    /// Keep the KV cache in f32 instead of bf16 (twice the cache memory and attention reads;
    /// bit-for-bit the reference's attention inputs).
    pub kv_f32: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            max_context: 32768,
            enforce_eager: false,
            max_batch_tokens: 65536,
            kv_f32: false,
        }
    }
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

/// The KV cache of one sequence: per layer, K and V of `[slots, kv_dim]` (bf16, or f32 with
/// [`CudaOptions::kv_f32`]).
pub(crate) struct SeqCache {
    pub(crate) len: usize,
    /// Slots of the full-attention layers.
    pub(crate) cap: usize,
    pub(crate) k: Vec<DevBuf>,
    pub(crate) v: Vec<DevBuf>,
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
    graph: Option<Graph>,
    load: LoadReport,
    pub(crate) scratch: Scratch,
    pub(crate) model: DeviceModel,
    /// Single-token steps run o_proj + router + top-k as one kernel (`k_oproj_router`).
    pub(crate) fused_router: bool,
    /// Single-token steps run the experts with `k_moe_gu1` / `k_moe_dn1`.
    pub(crate) moe1: bool,
    pub(crate) k: Kernels,
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
            kv_f32: opts.kv_f32,
        };
        let plan = SmemPlan::new(dims.h, dims.q_dim, dims.inter, dims.k);
        let k = Kernels::load(&gpu, &plan).map_err(failed)?;
        let max_context = opts.max_context.min(cfg.max_position_embeddings).max(1);
        let model = DeviceModel::upload(&gpu, w, max_context).map_err(failed)?;
        let scratch = Scratch::new(&gpu, &dims).map_err(failed)?;
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
            k,
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

    pub(crate) fn new_cache(&self, cap: usize) -> Result<SeqCache, String> {
        let slot = self.dims.kv_dim * self.dims.kv_elem();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for l in 0..self.dims.layers {
            let slots = if self.cfg.is_sliding(l) {
                self.cfg.sliding_window + RING_EXTRA
            } else {
                cap
            };
            k.push(self.gpu.alloc_zeroed(slots * slot)?);
            v.push(self.gpu.alloc_zeroed(slots * slot)?);
        }
        Ok(SeqCache { len: 0, cap, k, v })
    }

    /// Grows the full-attention layers of `c` to hold `need` positions.
    fn grow(&self, c: &mut SeqCache, need: usize) -> Result<(), String> {
        if need <= c.cap {
            return Ok(());
        }
        let cap = need
            .next_power_of_two()
            .max(1024)
            .min(self.model.max_context.next_power_of_two());
        let slot = self.dims.kv_dim * self.dims.kv_elem();
        let mut old = Vec::new();
        for l in 0..self.dims.layers {
            if self.cfg.is_sliding(l) {
                continue;
            }
            for bufs in [&mut c.k, &mut c.v] {
                let nb = self.gpu.alloc_zeroed(cap * slot)?;
                self.gpu.copy_d2d(nb.ptr, bufs[l].ptr, c.len * slot)?;
                old.push(std::mem::replace(&mut bufs[l], nb));
            }
        }
        self.gpu.sync()?;
        drop(old);
        c.cap = cap;
        Ok(())
    }

    pub(crate) fn params(&self, c: &SeqCache, tokens: &[u32], pos0: usize) -> StepParams {
        let mut sp = StepParams {
            t: tokens.len() as i32,
            pos0: pos0 as i32,
            ..StepParams::default()
        };
        for (d, &t) in sp.tok.iter_mut().zip(tokens) {
            *d = t as i32;
        }
        for l in 0..self.dims.layers {
            sp.kc[l] = c.k[l].ptr;
            sp.vc[l] = c.v[l].ptr;
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
            let (nt, i) = Self::nt_index(count);
            let extra = LinearExtra {
                idx_out: sc.idx.ptr,
                red_val: sc.red_val.ptr,
                red_idx: sc.red_idx.ptr,
                counter: sc.counters.at((MAXT * d.nkv + 1) * 4),
                ..LinearExtra::default()
            };
            mark("k_linear lm_head+argmax")?;
            k.linear(
                s,
                nt,
                self.plan.linear_h[i],
                &m.lm_head,
                sc.x.at(first * d.h * 4),
                d.h,
                count,
                m.norm,
                d.eps,
                sc.logits.ptr,
                d.vocab,
                F_NORM | F_ARGMAX,
                &extra,
            )?;
        }
        mark("end")?;
        Ok(())
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

    /// Runs `tokens` (<= MAXT) of a sequence at `pos0`; computes lm_head rows `lm` if asked.
    fn run_chunk(
        &mut self,
        c: &SeqCache,
        tokens: &[u32],
        pos0: usize,
        lm: Option<(usize, usize)>,
    ) -> Result<(), String> {
        let sp = self.params(c, tokens, pos0);
        self.gpu
            .upload_async(self.scratch.sp.ptr, std::slice::from_ref(&sp))?;
        if tokens.len() == 1 && lm == Some((0, 1)) && !self.opts.enforce_eager {
            if self.graph.is_none() {
                let g = Graph::capture(&self.gpu.stream, || self.record(1, lm))?;
                self.graph = Some(g);
            }
            self.graph
                .as_ref()
                .expect("captured")
                .launch(&self.gpu.stream)
        } else {
            self.record(tokens.len(), lm)
        }
    }

    /// Feeds `tokens` to `seq` from `start_pos` (already validated); for each chunk with wanted
    /// rows, `sink(first, count)` is called after the chunk ran.
    fn feed(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        start_pos: usize,
        want: LogitsWanted,
        mut sink: impl FnMut(&Self, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut c = match self.seqs.remove(&seq) {
            Some(c) => c,
            None => self.new_cache(1024.min(self.model.max_context.next_power_of_two()))?,
        };
        let res = (|| {
            self.grow(&mut c, start_pos + tokens.len())?;
            let n = tokens.len();
            for (ci, chunk) in tokens.chunks(MAXT).enumerate() {
                let first_tok = ci * MAXT;
                let lm = match want {
                    LogitsWanted::All => Some((0, chunk.len())),
                    LogitsWanted::Last if first_tok + chunk.len() == n => {
                        Some((chunk.len() - 1, 1))
                    }
                    LogitsWanted::Last => None,
                };
                self.run_chunk(&c, chunk, start_pos + first_tok, lm)?;
                if let Some((_, count)) = lm {
                    sink(self, count)?;
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
        let mut out = 0u32;
        self.feed(seq, tokens, start, LogitsWanted::Last, |b, _| {
            let mut idx = [0i32; 1];
            b.gpu.download(&mut idx, b.scratch.idx.ptr)?;
            out = idx[0] as u32;
            Ok(())
        })
        .map_err(failed)?;
        Ok(out)
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
            self.run_chunk(&c, &tokens, c.len, lm)?;
            let mut times = Vec::new();
            for _ in 0..reps.max(1) {
                timer.start(&self.gpu.stream)?;
                self.run_chunk(&c, &tokens, c.len, lm)?;
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
        let mut steps = Vec::with_capacity(batch.steps.len());
        for s in &batch.steps {
            let mut rows: Vec<f32> = Vec::new();
            self.feed(s.seq, &s.tokens, s.start_pos, s.want_logits, |b, count| {
                let start = rows.len();
                rows.resize(start + count * vocab, 0.0);
                b.gpu.download(&mut rows[start..], b.scratch.logits.ptr)
            })
            .map_err(failed)?;
            steps.push(rows);
        }
        Ok(Logits::new(vocab, steps))
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
}
