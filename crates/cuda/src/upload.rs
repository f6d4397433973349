//! Uploading a [`ModelWeights`] to the GPU as stored (no dequantization).
//!
//! Every matrix keeps its checkpoint encoding: NF4 packed bytes + u8 absmax codes + f32 nested
//! absmax + the two code tables + offset, or f32 absmax without double quantization; MXFP4 blocks and
//! E8M0 scales; dense bf16/f16/f32 bytes. Biases, norms and sinks (a few KB per layer) are
//! converted to f32. Each layer's tensors (attention, router, and all its experts) are laid out
//! in one device buffer (an "arena", every piece 256-byte aligned), and the experts' descriptors
//! form per-layer device tables `gu[E]` / `dn[E]` so that one launch covers the selected experts.
//!
//! Fused transformers layouts (`Orientation::InOut`) are the one exception: their experts are
//! decoded and transposed at load into dense `[out, in]` matrices (allowed for those variants
//! only), losslessly: bf16 stays bf16, a fused bnb 4-bit stack becomes f32 (4x its NF4 size: fine
//! for small models; convert big ones with `gptoss convert --to unsloth-nf4`).

use gptoss_formats::checkpoint::DType;
use gptoss_formats::codec::bnb4::Absmax;
use gptoss_formats::weights::{MatrixData, Orientation};
use gptoss_formats::{Linear, Matrix, ModelWeights, Vector};
use gptoss_model::reference::Rope;

use crate::driver::{DevBuf, Gpu};
use crate::kernels::{
    HEAD_DIM, K_BF16, K_F16, K_F32, K_MXFP4, K_NF4F, K_NF4N, LayerDev, MAX_GROUP, MAX_LAYERS, MAXK,
    QMat,
};
use crate::moe_gemm::QElem;

/// Extra ring slots of a sliding layer beyond the window: a prefill chunk writes its keys before
/// its queries read, so the ring must not overwrite keys still visible to the chunk's first query.
pub const RING_EXTRA: usize = 8;

enum Piece<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Piece<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Borrowed(b) => b,
            Piece::Owned(v) => v,
        }
    }
}

/// Pieces laid out in one device buffer.
#[derive(Default)]
struct Arena<'a> {
    pieces: Vec<(usize, Piece<'a>)>,
    size: usize,
}

impl<'a> Arena<'a> {
    fn add(&mut self, p: Piece<'a>) -> usize {
        let off = self.size.next_multiple_of(256);
        self.size = off + p.bytes().len();
        self.pieces.push((off, p));
        off
    }

    fn upload(self, gpu: &Gpu) -> Result<DevBuf, String> {
        let buf = gpu.alloc(self.size)?;
        for (off, p) in &self.pieces {
            gpu.upload(buf.at(*off), p.bytes())?;
        }
        Ok(buf)
    }
}

/// A [`QMat`] whose pointers are still offsets into an arena.
#[derive(Debug, Clone, Copy, Default)]
struct HostMat {
    m: QMat,
    w: usize,
    s: Option<usize>,
    nabs: Option<usize>,
    code: Option<usize>,
    ncode: Option<usize>,
    bias: Option<usize>,
    /// Bytes one full pass over the matrix reads (weights + scales).
    read_bytes: usize,
}

impl HostMat {
    fn resolve(&self, base: u64) -> QMat {
        let p = |o: Option<usize>| o.map_or(0, |o| base + o as u64);
        QMat {
            w: base + self.w as u64,
            s: p(self.s),
            nabs: p(self.nabs),
            code: p(self.code),
            ncode: p(self.ncode),
            bias: p(self.bias),
            ..self.m
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vector_piece(v: &Vector<'_>) -> Piece<'static> {
    Piece::Owned(f32_bytes(&v.to_f32()))
}

fn add_matrix<'a>(
    a: &mut Arena<'a>,
    m: &Matrix<'a>,
    bias: Option<&Vector<'a>>,
) -> Result<HostMat, String> {
    let (rows, cols) = (m.rows, m.cols);
    let err = |what: String| format!("{}: {what}", m.name);
    if cols % 32 != 0 {
        return Err(err(format!("input width {cols} is not a multiple of 32")));
    }
    let mut h = HostMat {
        m: QMat {
            rows: rows as i32,
            cols: cols as i32,
            ..QMat::default()
        },
        ..HostMat::default()
    };
    if m.orientation == Orientation::InOut {
        // Fused transformers stacks: decode + transpose to a dense [out, in] matrix at load,
        // losslessly: bf16/f16 sources stay bf16/f16, 4-bit sources become f32.
        let values = m.to_f32();
        let (kind, bytes): (i32, Vec<u8>) = match &m.data {
            MatrixData::Dense {
                dtype: DType::BF16, ..
            } => (
                K_BF16,
                values
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            MatrixData::Dense {
                dtype: DType::F16, ..
            } => (
                K_F16,
                values
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            _ => (K_F32, f32_bytes(&values)),
        };
        h.m.kind = kind;
        h.read_bytes = bytes.len();
        h.w = a.add(Piece::Owned(bytes));
    } else {
        match &m.data {
            MatrixData::Dense { dtype, bytes } => {
                h.m.kind = match dtype {
                    DType::BF16 => K_BF16,
                    DType::F16 => K_F16,
                    DType::F32 => K_F32,
                    other => return Err(err(format!("dense dtype {other} is not supported"))),
                };
                h.read_bytes = bytes.len();
                h.w = a.add(Piece::Borrowed(bytes));
            }
            MatrixData::Bnb4 {
                tensor,
                elem_offset,
            } => {
                if *elem_offset != 0 || tensor.numel != rows * cols {
                    return Err(err("a bnb 4-bit matrix must be a whole tensor".into()));
                }
                if tensor.blocksize != 64 || cols % 64 != 0 {
                    return Err(err(format!(
                        "bnb 4-bit blocks of {} over rows of {cols}: the CUDA kernels need 64-element blocks within rows",
                        tensor.blocksize
                    )));
                }
                h.w = a.add(Piece::Borrowed(tensor.packed));
                h.code = Some(a.add(Piece::Borrowed(tensor.code)));
                h.read_bytes = tensor.packed.len();
                match tensor.absmax {
                    Absmax::F32(s) => {
                        h.m.kind = K_NF4F;
                        h.s = Some(a.add(Piece::Borrowed(s)));
                        h.read_bytes += s.len();
                    }
                    Absmax::Nested {
                        codes,
                        nested_absmax,
                        nested_code,
                        nested_blocksize,
                        offset,
                    } => {
                        if !nested_blocksize.is_power_of_two() {
                            return Err(err(format!(
                                "nested blocksize {nested_blocksize} is not a power of two"
                            )));
                        }
                        h.m.kind = K_NF4N;
                        h.m.offset = offset;
                        h.m.nbs_shift = nested_blocksize.trailing_zeros() as i32;
                        h.s = Some(a.add(Piece::Borrowed(codes)));
                        h.nabs = Some(a.add(Piece::Borrowed(nested_absmax)));
                        h.ncode = Some(a.add(Piece::Borrowed(nested_code)));
                        h.read_bytes += codes.len() + nested_absmax.len();
                    }
                }
            }
            MatrixData::Mxfp4(mm) => {
                h.m.kind = K_MXFP4;
                h.w = a.add(Piece::Borrowed(mm.blocks));
                h.s = Some(a.add(Piece::Borrowed(mm.scales)));
                h.read_bytes = mm.blocks.len() + mm.scales.len();
            }
        }
    }
    if let Some(b) = bias {
        h.bias = Some(a.add(vector_piece(b)));
    }
    Ok(h)
}

fn add_linear<'a>(a: &mut Arena<'a>, l: &Linear<'a>) -> Result<HostMat, String> {
    add_matrix(a, &l.weight, l.bias.as_ref())
}

/// How many bytes of weights a decoded token reads (for the roofline).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadBytes {
    /// q, k, v, o and router of every layer.
    pub attention_and_router: u64,
    /// Average bytes of one expert (gate_up + down) per layer, times experts per token, summed
    /// over layers.
    pub experts: u64,
    pub lm_head: u64,
    /// One embedding row.
    pub embed_row: u64,
}

impl ReadBytes {
    pub fn total(&self) -> u64 {
        self.attention_and_router + self.experts + self.lm_head + self.embed_row
    }
}

/// The model on the GPU.
pub struct DeviceModel {
    pub layers: Vec<LayerDev>,
    /// `LayerDev[num_layers]` on the device.
    pub layer_dev: DevBuf,
    pub embed: QMat,
    pub lm_head: QMat,
    pub norm: u64,
    pub cos: DevBuf,
    pub sin: DevBuf,
    /// Bytes of weights on the GPU.
    pub weight_bytes: usize,
    pub read: ReadBytes,
    /// Positions the RoPE tables cover.
    pub max_context: usize,
    /// Every expert matrix of every layer is 4-bit (NF4 or MXFP4): the decode MoE kernels
    /// `k_moe_gu1` / `k_moe_dn1` apply.
    pub experts_4bit: bool,
    /// Per layer: every expert matrix is bitsandbytes 4-bit (`K_NF4N` / `K_NF4F`) with one and
    /// the same 16-entry code, so the tensor-core kernels `k_moe_gu_mma` / `k_moe_dn_mma` (which
    /// build their bf16 table once per block from one expert's code) apply.
    pub experts_bnb_one_code: Vec<bool>,
    /// Per layer: the [`QElem`] of qgemm.cu's pipelined expert kernels when every expert matrix
    /// of the layer is 4-bit of one family and, for f16 (NF4), the expert inputs provably fit
    /// f16 ([`f16_inputs_fit`]); `None`: the layer's experts run through moe_gemm.cu.
    pub experts_qelem: Vec<Option<QElem>>,
    _buffers: Vec<DevBuf>,
}

/// Whether a layer's expert inputs fit f16: the gate_up input is the post-attention RMSNorm
/// output, `|y_c| = |w_c| |x_c| / rms(x) <= sqrt(H) max|w|`, and the down input a clamped SwiGLU
/// output, `|y| <= limit (limit + 1)`. Half of f16's largest value leaves room for the rounding.
pub fn f16_inputs_fit(post_norm: &[f32], hidden: usize, swiglu_limit: f64) -> bool {
    const F16_ROOM: f64 = 65504.0 / 2.0;
    let max_w = post_norm
        .iter()
        .fold(0f64, |m, &v| m.max(f64::from(v).abs()));
    max_w * (hidden as f64).sqrt() <= F16_ROOM
        && swiglu_limit.is_finite()
        && swiglu_limit * (swiglu_limit + 1.0) <= F16_ROOM
}

/// Checks the shapes the kernels are written for.
pub fn check_config(cfg: &gptoss_formats::GptOssConfig) -> Result<(), String> {
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut problems = Vec::new();
    if cfg.head_dim != HEAD_DIM {
        problems.push(format!(
            "head_dim {} (the kernels need {HEAD_DIM})",
            cfg.head_dim
        ));
    }
    if nkv == 0 || nh % nkv != 0 || nh / nkv > MAX_GROUP {
        problems.push(format!(
            "{nh} query heads over {nkv} KV heads (at most {MAX_GROUP} per group)"
        ));
    }
    if cfg.num_experts_per_tok > MAXK || cfg.num_experts_per_tok == 0 {
        problems.push(format!(
            "{} experts per token (at most {MAXK})",
            cfg.num_experts_per_tok
        ));
    }
    if cfg.num_experts_per_tok > cfg.num_local_experts {
        problems.push("more experts per token than experts".into());
    }
    for (what, n) in [
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
    ] {
        if n % 64 != 0 {
            problems.push(format!("{what} {n} is not a multiple of 64"));
        }
    }
    if cfg.num_hidden_layers > MAX_LAYERS {
        problems.push(format!(
            "{} layers (at most {MAX_LAYERS})",
            cfg.num_hidden_layers
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "model shape not supported by the CUDA kernels: {}",
            problems.join("; ")
        ))
    }
}

impl DeviceModel {
    /// Uploads `w`; RoPE tables cover positions `0..max_context`.
    pub fn upload(
        gpu: &Gpu,
        w: &ModelWeights<'_>,
        max_context: usize,
    ) -> Result<DeviceModel, String> {
        let cfg = w.config;
        check_config(cfg)?;
        let mut buffers = Vec::new();
        let mut weight_bytes = 0usize;
        let mut read = ReadBytes::default();

        let mut ga = Arena::default();
        let embed = add_matrix(&mut ga, &w.embed, None)?;
        let lm_head = add_matrix(&mut ga, &w.lm_head, None)?;
        let norm = ga.add(vector_piece(&w.norm));
        weight_bytes += ga.size;
        let gbuf = ga.upload(gpu)?;
        let (embed_q, lm_q, norm_p) = (
            embed.resolve(gbuf.ptr),
            lm_head.resolve(gbuf.ptr),
            gbuf.at(norm),
        );
        read.lm_head = lm_head.read_bytes as u64;
        read.embed_row = (embed.read_bytes / w.embed.rows.max(1)) as u64;
        buffers.push(gbuf);

        let mut layers = Vec::with_capacity(w.layers.len());
        let mut experts_4bit = true;
        let mut experts_bnb_one_code = Vec::with_capacity(w.layers.len());
        let mut experts_qelem = Vec::with_capacity(w.layers.len());
        for (l, lw) in w.layers.iter().enumerate() {
            let mut one_code = true;
            let mut first_code: Option<&[u8]> = None;
            for ex in &lw.experts {
                for m in [&ex.gate_up.weight, &ex.down.weight] {
                    match &m.data {
                        MatrixData::Bnb4 { tensor, .. } => {
                            one_code &= *first_code.get_or_insert(tensor.code) == tensor.code
                        }
                        _ => one_code = false,
                    }
                }
            }
            let mut a = Arena::default();
            let q = add_linear(&mut a, &lw.q)?;
            let k = add_linear(&mut a, &lw.k)?;
            let v = add_linear(&mut a, &lw.v)?;
            let o = add_linear(&mut a, &lw.o)?;
            let router = add_linear(&mut a, &lw.router)?;
            let in_norm = a.add(vector_piece(&lw.input_norm));
            let post_norm = a.add(vector_piece(&lw.post_norm));
            let sinks = a.add(vector_piece(&lw.sinks));
            let mut gu = Vec::with_capacity(lw.experts.len());
            let mut dn = Vec::with_capacity(lw.experts.len());
            for ex in &lw.experts {
                gu.push(add_linear(&mut a, &ex.gate_up)?);
                dn.push(add_linear(&mut a, &ex.down)?);
            }
            one_code &= gu
                .iter()
                .chain(&dn)
                .all(|m| matches!(m.m.kind, K_NF4N | K_NF4F));
            experts_bnb_one_code.push(one_code);
            let qelem = QElem::common(gu.iter().chain(&dn).map(|m| m.m.kind)).filter(|&e| {
                e != QElem::F16
                    || f16_inputs_fit(&lw.post_norm.to_f32(), cfg.hidden_size, cfg.swiglu_limit)
            });
            experts_qelem.push(qelem);
            experts_4bit &= gu
                .iter()
                .chain(&dn)
                .all(|m| matches!(m.m.kind, K_NF4N | K_NF4F | K_MXFP4));
            read.attention_and_router += [&q, &k, &v, &o, &router]
                .iter()
                .map(|m| m.read_bytes as u64)
                .sum::<u64>();
            let ex_bytes: u64 = gu.iter().chain(&dn).map(|m| m.read_bytes as u64).sum();
            read.experts +=
                ex_bytes * cfg.num_experts_per_tok as u64 / lw.experts.len().max(1) as u64;
            weight_bytes += a.size;
            let buf = a.upload(gpu).map_err(|e| format!("layer {l}: {e}"))?;
            let base = buf.ptr;
            let table = |ms: &[HostMat]| -> Result<DevBuf, String> {
                let qs: Vec<QMat> = ms.iter().map(|m| m.resolve(base)).collect();
                let t = gpu.alloc(qs.len() * std::mem::size_of::<QMat>())?;
                gpu.upload(t.ptr, &qs)?;
                Ok(t)
            };
            let gu_t = table(&gu)?;
            let dn_t = table(&dn)?;
            let sliding = cfg.is_sliding(l);
            layers.push(LayerDev {
                q: q.resolve(base),
                k: k.resolve(base),
                v: v.resolve(base),
                o: o.resolve(base),
                router: router.resolve(base),
                gu: gu_t.ptr,
                dn: dn_t.ptr,
                in_norm: buf.at(in_norm),
                post_norm: buf.at(post_norm),
                sinks: buf.at(sinks),
                window: if sliding {
                    cfg.sliding_window as i32
                } else {
                    0
                },
                ring: if sliding {
                    (cfg.sliding_window + RING_EXTRA) as i32
                } else {
                    0
                },
            });
            buffers.extend([buf, gu_t, dn_t]);
        }
        let layer_dev = gpu.alloc(layers.len() * std::mem::size_of::<LayerDev>())?;
        gpu.upload(layer_dev.ptr, &layers)?;

        // RoPE: exactly the reference's f32 cos/sin (YaRN, concentration included).
        let rope = Rope::from_config(cfg);
        let half = cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(max_context * half);
        let mut sin = Vec::with_capacity(max_context * half);
        for p in 0..max_context {
            let (c, s) = rope.cos_sin(p);
            cos.extend_from_slice(&c);
            sin.extend_from_slice(&s);
        }
        let cos_b = gpu.alloc(cos.len() * 4)?;
        gpu.upload(cos_b.ptr, &cos)?;
        let sin_b = gpu.alloc(sin.len() * 4)?;
        gpu.upload(sin_b.ptr, &sin)?;
        Ok(DeviceModel {
            layers,
            layer_dev,
            embed: embed_q,
            lm_head: lm_q,
            norm: norm_p,
            cos: cos_b,
            sin: sin_b,
            weight_bytes,
            read,
            max_context,
            experts_4bit,
            experts_bnb_one_code,
            experts_qelem,
            _buffers: buffers,
        })
    }
}
