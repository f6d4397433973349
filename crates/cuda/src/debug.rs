//! Kernel-by-kernel access to one decoder layer, for the GPU tests: every intermediate result
//! is copied back so each kernel can be checked against the CPU reference on its own inputs.

use gptoss_engine::backend::BackendError;

use crate::backend::CudaBackend;
use crate::kernels::{KvDtype, LayerDev, MAXT};
use crate::upload::RING_EXTRA;

/// Every intermediate of one layer for `T` tokens.
#[derive(Debug, Clone, Default)]
pub struct LayerTrace {
    /// Rotated queries `[T, q_dim]`.
    pub q: Vec<f32>,
    /// The new tokens' rotated keys and values as stored in the cache (bf16 → f32), `[T, kv_dim]`.
    pub k_new: Vec<f32>,
    pub v_new: Vec<f32>,
    /// Attention output before o_proj `[T, q_dim]`.
    pub attn: Vec<f32>,
    /// Residual stream after the attention block `[T, H]`.
    pub x_attn: Vec<f32>,
    /// `rmsnorm(x_attn, post_norm)` `[T, H]`.
    pub h: Vec<f32>,
    pub router_logits: Vec<f32>,
    /// Selected experts and routing weights `[T, k]`.
    pub sel: Vec<i32>,
    pub wsel: Vec<f32>,
    /// SwiGLU activations `[T * k, I]`.
    pub act: Vec<f32>,
    /// Layer output `[T, H]`.
    pub x_out: Vec<f32>,
}

/// `v` as the 16-bit cache stores it (bits), and back.
fn kv_bits(kv: KvDtype, v: f32) -> u16 {
    match kv {
        KvDtype::F16 => half::f16::from_f32(kv.round(v)).to_bits(),
        _ => half::bf16::from_f32(v).to_bits(),
    }
}
fn kv_from_bits(kv: KvDtype, b: u16) -> f32 {
    match kv {
        KvDtype::F16 => half::f16::from_bits(b).to_f32(),
        _ => half::bf16::from_bits(b).to_f32(),
    }
}

impl CudaBackend {
    /// Runs layer `l` on `x` (`[T, H]`, T <= MAXT) at positions `pos0..`, over a fresh cache
    /// whose positions `0..pos0` of layer `l` hold `k_prefix` / `v_prefix` (`[pos0, kv_dim]`,
    /// rounded to the cache's element type), kernel by kernel.
    #[doc(hidden)]
    pub fn debug_layer(
        &mut self,
        l: usize,
        x: &[f32],
        pos0: usize,
        k_prefix: &[f32],
        v_prefix: &[f32],
    ) -> Result<LayerTrace, BackendError> {
        let f = BackendError::Failed;
        self.gpu.bind().map_err(f)?;
        let d = self.dims;
        let t = x.len() / d.h;
        if t == 0 || t > MAXT || x.len() != t * d.h || l >= d.layers {
            return Err(BackendError::InvalidInput(format!(
                "debug_layer: {} values for layer {l}",
                x.len()
            )));
        }
        if k_prefix.len() != pos0 * d.kv_dim
            || v_prefix.len() != pos0 * d.kv_dim
            || pos0 + t > self.max_context()
        {
            return Err(BackendError::InvalidInput(
                "debug_layer: prefix shape".into(),
            ));
        }
        let run = || -> Result<LayerTrace, String> {
            let cap = (pos0 + t).next_power_of_two().max(1024);
            let c = self.new_cache(cap)?;
            let sliding = self.cfg.is_sliding(l);
            let ring = self.cfg.sliding_window + RING_EXTRA;
            let slot = |j: usize| if sliding { j % ring } else { j };
            let slots = if sliding { ring } else { cap };
            for (prefix, buf) in [(k_prefix, &c.k[l]), (v_prefix, &c.v[l])] {
                let mut host = vec![0f32; slots * d.kv_dim];
                for j in 0..pos0 {
                    if sliding && j + ring < pos0 {
                        continue;
                    }
                    let s = slot(j);
                    host[s * d.kv_dim..(s + 1) * d.kv_dim]
                        .copy_from_slice(&prefix[j * d.kv_dim..(j + 1) * d.kv_dim]);
                }
                if d.kv == KvDtype::F32 {
                    self.gpu.upload(buf.ptr, &host)?;
                } else {
                    let bits: Vec<u16> = host.iter().map(|&v| kv_bits(d.kv, v)).collect();
                    self.gpu.upload(buf.ptr, &bits)?;
                }
            }
            let sp = self.params(&c, &vec![0u32; t], pos0);
            self.gpu
                .upload(self.scratch.sp.ptr, std::slice::from_ref(&sp))?;
            self.gpu.upload(self.scratch.x.ptr, x)?;
            let (k, s, sc, m) = (&self.k, &self.gpu.stream, &self.scratch, &self.model);
            let (nt, i) = Self::nt_index(t);
            let ld = m.layer_dev.at(l * std::mem::size_of::<LayerDev>());
            let get = |ptr: u64, n: usize| -> Result<Vec<f32>, String> {
                let mut v = vec![0f32; n];
                self.gpu.download(&mut v, ptr)?;
                Ok(v)
            };
            let mut tr = LayerTrace::default();
            k.qkv(
                s,
                nt,
                self.plan.qkv[i],
                ld,
                sc.sp.ptr,
                l,
                sc.x.ptr,
                &d,
                sc.q.ptr,
                m.cos.ptr,
                m.sin.ptr,
            )?;
            tr.q = get(sc.q.ptr, t * d.q_dim)?;
            for ti in 0..t {
                for (buf, out) in [(&c.k[l], &mut tr.k_new), (&c.v[l], &mut tr.v_new)] {
                    let at = buf.at(slot(pos0 + ti) * d.kv_dim * d.kv_elem());
                    if d.kv == KvDtype::F32 {
                        let mut v = vec![0f32; d.kv_dim];
                        self.gpu.download(&mut v, at)?;
                        out.extend(v);
                    } else {
                        let mut bits = vec![0u16; d.kv_dim];
                        self.gpu.download(&mut bits, at)?;
                        out.extend(bits.iter().map(|&b| kv_from_bits(d.kv, b)));
                    }
                }
            }
            k.attn(
                s,
                ld,
                sc.sp.ptr,
                l,
                sc.q.ptr,
                sc.attn.ptr,
                sc.part.ptr,
                sc.counters.ptr,
                &d,
                t,
            )?;
            tr.attn = get(sc.attn.ptr, t * d.q_dim)?;
            // The decode path's kernels for T = 1 (fused o_proj + router, tensor-core experts), the
            // chunk path's otherwise: the router does not change x, so x after both is x_attn.
            self.record_oproj_router(t, l, sc.counters.at(MAXT * d.nkv * 4), &mut |_| Ok(()))?;
            tr.x_attn = get(sc.x.ptr, t * d.h)?;
            tr.router_logits = get(sc.rlog.ptr, t * d.e)?;
            tr.h = get(sc.h.ptr, t * d.h)?;
            tr.wsel = get(sc.wsel.ptr, t * d.k)?;
            tr.sel = vec![0i32; t * d.k];
            self.gpu.download(&mut tr.sel, sc.sel.ptr)?;
            // act is read back between the experts' two kernels (at the mark of the second).
            let mut act = Vec::new();
            let hi_lo = t == 1 && self.moe_mma_at(l);
            self.record_moe(t, l, &mut |name| {
                if name.starts_with("k_moe_dn") {
                    act = if hi_lo {
                        // u16 [k][2][inter]: bf16 hi and lo halves of each activation.
                        let mut bits = vec![0u16; 2 * d.k * d.inter];
                        self.gpu.download(&mut bits, sc.act.ptr)?;
                        let bf = |b: u16| half::bf16::from_bits(b).to_f32();
                        (0..d.k * d.inter)
                            .map(|j| {
                                let (e, i) = (j / d.inter, j % d.inter);
                                let row = &bits[2 * e * d.inter..];
                                bf(row[i]) + bf(row[d.inter + i])
                            })
                            .collect()
                    } else {
                        get(sc.act.ptr, t * d.k * d.inter)?
                    };
                }
                Ok(())
            })?;
            tr.act = act;
            tr.x_out = get(sc.x.ptr, t * d.h)?;
            self.gpu.sync()?;
            Ok(tr)
        };
        run().map_err(f)
    }
}
