//! The one internal representation every checkpoint layout maps to, and the layout probe.
//!
//! Whatever the files look like (Unsloth per-expert Linear4bit, fused bf16, fused bnb stacks,
//! OpenAI MXFP4), the model sees per layer: norms, `q/k/v/o` [`Linear`]s, sinks, a router and, per
//! expert, `gate_up` (logical `[2I, H]`, rows alternating gate/up) and `down` (logical `[H, I]`).
//! Each [`Matrix`] borrows the mapped bytes and carries what is needed to decode them; nothing is
//! decoded or copied here. Every shape is checked against the config and every problem is reported
//! with the tensor's name and file (spec checkpoints.md §1.4-§1.5).

use std::cell::RefCell;
use std::collections::BTreeSet;

use crate::checkpoint::{Checkpoint, DType, TensorRef};
use crate::codec::bnb4::{Absmax, Bnb4Kind, Bnb4Tensor, QuantStateJson};
use crate::codec::mxfp4::Mxfp4Matrix;
use crate::config::GptOssConfig;
use crate::error::{FormatError, Result};

/// How the experts of a checkpoint are stored (decided from tensor names, never from file names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Unsloth: one `Linear` (NF4/FP4 or dense) per expert, `experts.gate_up_projs.{e}`.
    UnslothSplit,
    /// transformers: dense `experts.gate_up_proj` `[E, H, 2I]`, computed as `x @ W`.
    FusedDense,
    /// transformers v5 + bnb: the whole `[E, H, 2I]` stack quantized flat.
    FusedBnb,
    /// OpenAI: `experts.gate_up_proj_blocks` / `_scales`.
    Mxfp4,
}

impl Layout {
    /// A short name used by `inspect` and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Layout::UnslothSplit => "unsloth-split",
            Layout::FusedDense => "fused-dense",
            Layout::FusedBnb => "fused-bnb",
            Layout::Mxfp4 => "mxfp4",
        }
    }
}

/// Order of a matrix's elements in storage, relative to its logical `[rows = out, cols = in]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// Element `(r, c)` at `r * cols + c` (nn.Linear weights, MXFP4, Unsloth experts).
    OutIn,
    /// Element `(r, c)` at `c * rows + r` (transformers' fused expert stacks, `x @ W`).
    InOut,
}

/// The stored bytes of a matrix and how to decode them.
#[derive(Debug, Clone, Copy)]
pub enum MatrixData<'a> {
    /// Plain floats; `bytes` covers exactly this matrix.
    Dense { dtype: DType, bytes: &'a [u8] },
    /// A bitsandbytes 4-bit tensor; this matrix is its elements from `elem_offset` on (non-zero
    /// for one expert of a fused stack, whose blocks and nested blocks are shared).
    Bnb4 {
        tensor: Bnb4Tensor<'a>,
        elem_offset: usize,
    },
    /// One expert's MXFP4 blocks and scales.
    Mxfp4(Mxfp4Matrix<'a>),
}

/// A logical weight matrix `[rows = out, cols = in]` of a Linear, borrowed from the checkpoint.
#[derive(Debug, Clone)]
pub struct Matrix<'a> {
    /// The tensor it comes from (for reports and errors).
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub orientation: Orientation,
    pub data: MatrixData<'a>,
}

impl Matrix<'_> {
    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Decodes stored elements `[start, start + dst.len())` (in storage order) to f32, exactly.
    pub fn decode_stored(&self, start: usize, dst: &mut [f32]) {
        match &self.data {
            MatrixData::Dense { dtype, bytes } => decode_dense(*dtype, bytes, start, dst),
            MatrixData::Bnb4 {
                tensor,
                elem_offset,
            } => tensor.decode_into(elem_offset + start, dst),
            MatrixData::Mxfp4(m) => m.decode_into(start, dst),
        }
    }

    /// Decodes logical row `r` (length `cols`) into `dst`.
    pub fn decode_row(&self, r: usize, dst: &mut [f32]) {
        match self.orientation {
            Orientation::OutIn => self.decode_stored(r * self.cols, dst),
            Orientation::InOut => {
                let mut one = [0f32];
                for (c, d) in dst.iter_mut().enumerate() {
                    self.decode_stored(c * self.rows + r, &mut one);
                    *d = one[0];
                }
            }
        }
    }

    /// The whole matrix as f32, logical `[rows, cols]` row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut stored = vec![0f32; self.numel()];
        self.decode_stored(0, &mut stored);
        match self.orientation {
            Orientation::OutIn => stored,
            Orientation::InOut => {
                let mut out = vec![0f32; self.numel()];
                for c in 0..self.cols {
                    for r in 0..self.rows {
                        out[r * self.cols + c] = stored[c * self.rows + r];
                    }
                }
                out
            }
        }
    }

    /// A short description of the storage: "BF16", "NF4+dq", "FP4", "MXFP4", ….
    pub fn kind(&self) -> String {
        match &self.data {
            MatrixData::Dense { dtype, .. } => dtype.to_string(),
            MatrixData::Bnb4 { tensor, .. } => {
                let t = match tensor.kind {
                    Bnb4Kind::Nf4 => "NF4",
                    Bnb4Kind::Fp4 => "FP4",
                };
                match tensor.absmax {
                    Absmax::Nested { .. } => format!("{t}+dq"),
                    Absmax::F32(_) => t.to_string(),
                }
            }
            MatrixData::Mxfp4(_) => "MXFP4".into(),
        }
    }

    /// Bytes this matrix occupies in storage, quantization metadata included (shared metadata of
    /// a fused stack is apportioned per element).
    pub fn storage_bytes(&self) -> usize {
        match &self.data {
            MatrixData::Dense { bytes, .. } => bytes.len(),
            MatrixData::Bnb4 { tensor, .. } => {
                let meta = match tensor.absmax {
                    Absmax::F32(a) => a.len(),
                    Absmax::Nested {
                        codes,
                        nested_absmax,
                        ..
                    } => codes.len() + nested_absmax.len(),
                };
                let per_elem = (tensor.packed.len() + meta) as f64 / tensor.numel as f64;
                (per_elem * self.numel() as f64).round() as usize
            }
            MatrixData::Mxfp4(m) => m.blocks.len() + m.scales.len(),
        }
    }
}

/// Decodes `dst.len()` dense elements starting at element `start`.
pub fn decode_dense(dtype: DType, bytes: &[u8], start: usize, dst: &mut [f32]) {
    match dtype {
        DType::BF16 => {
            for (i, d) in dst.iter_mut().enumerate() {
                let o = 2 * (start + i);
                *d = f32::from_bits((u16::from_le_bytes([bytes[o], bytes[o + 1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (i, d) in dst.iter_mut().enumerate() {
                let o = 2 * (start + i);
                *d = half::f16::from_le_bytes([bytes[o], bytes[o + 1]]).to_f32();
            }
        }
        DType::F32 => {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = crate::codec::f32_at(bytes, start + i);
            }
        }
        other => panic!("decode_dense called on {other}; the probe only admits float dtypes"),
    }
}

/// A dense 1-D float tensor (bias, norm weight, sinks).
#[derive(Debug, Clone)]
pub struct Vector<'a> {
    pub name: String,
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub len: usize,
}

impl Vector<'_> {
    /// The values as f32 (exact).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len];
        decode_dense(self.dtype, self.bytes, 0, &mut out);
        out
    }
}

/// `y = x @ W.T + b`.
#[derive(Debug, Clone)]
pub struct Linear<'a> {
    pub weight: Matrix<'a>,
    pub bias: Option<Vector<'a>>,
}

/// One expert of a MoE layer.
#[derive(Debug, Clone)]
pub struct Expert<'a> {
    /// Logical `[2I, H]`: even rows gate, odd rows up (and the same for the bias).
    pub gate_up: Linear<'a>,
    /// Logical `[H, I]`.
    pub down: Linear<'a>,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights<'a> {
    pub input_norm: Vector<'a>,
    pub q: Linear<'a>,
    pub k: Linear<'a>,
    pub v: Linear<'a>,
    pub o: Linear<'a>,
    /// One learned logit per query head.
    pub sinks: Vector<'a>,
    pub post_norm: Vector<'a>,
    /// Logical `[E, H]` with bias.
    pub router: Linear<'a>,
    pub experts: Vec<Expert<'a>>,
    /// The expert storage layout found for this layer.
    pub layout: Layout,
}

/// The whole model's weights as views into a [`Checkpoint`].
#[derive(Debug, Clone)]
pub struct ModelWeights<'a> {
    pub config: &'a GptOssConfig,
    pub layout: Layout,
    /// Logical `[vocab, H]`; row `t` is token `t`'s embedding.
    pub embed: Matrix<'a>,
    pub layers: Vec<LayerWeights<'a>>,
    pub norm: Vector<'a>,
    /// Logical `[vocab, H]`.
    pub lm_head: Matrix<'a>,
}

impl<'a> ModelWeights<'a> {
    /// Maps a checkpoint; fails on the first problem (use [`probe`] to list them all).
    pub fn new(ckpt: &'a Checkpoint) -> Result<Self> {
        let report = probe(ckpt);
        match (report.weights, report.problems.into_iter().next()) {
            (Some(w), None) => Ok(w),
            (_, Some(e)) => Err(e),
            (None, None) => unreachable!("probe returns weights or a problem"),
        }
    }
}

/// What [`probe`] found: the weights if everything mapped, every problem otherwise, and the
/// tensors nothing used.
#[derive(Debug)]
pub struct ProbeReport<'a> {
    pub weights: Option<ModelWeights<'a>>,
    pub layout: Option<Layout>,
    pub problems: Vec<FormatError>,
    pub unused: Vec<String>,
}

/// Detects the layout from tensor names and maps every tensor, collecting all problems.
pub fn probe(ckpt: &Checkpoint) -> ProbeReport<'_> {
    ckpt.advise(crate::checkpoint::Access::Sparse);
    prefetch_quant_states(ckpt);
    ckpt.advise(crate::checkpoint::Access::Normal);
    let m = Mapper {
        ckpt,
        cfg: ckpt.config(),
        problems: RefCell::new(Vec::new()),
        used: RefCell::new(BTreeSet::new()),
    };
    let layout = detect_layout(ckpt);
    let weights = match layout {
        Ok(layout) => m.model(layout),
        Err(e) => {
            m.problems.borrow_mut().push(e);
            None
        }
    };
    let used = m.used.into_inner();
    let unused = ckpt
        .names()
        .filter(|n| !used.contains(*n))
        .map(String::from)
        .collect();
    let mut problems = m.problems.into_inner();
    if weights.is_none() && problems.is_empty() {
        problems.push(FormatError::Invalid(
            "the weights could not be mapped".into(),
        ));
    }
    ProbeReport {
        weights: if problems.is_empty() { weights } else { None },
        layout: layout_of(ckpt),
        problems,
        unused,
    }
}

/// Reads every quant-state JSON in parallel before the (sequential) probe parses them. They are
/// small but scattered through the shards: on a cold page cache, reading 1,536 of them one fault
/// at a time (each fault reading around the page) took 5.6 s for 20b; in parallel, with
/// read-around off, the faults are small and overlap.
fn prefetch_quant_states(ckpt: &Checkpoint) {
    // I/O-bound: more threads than cores keeps more reads in flight.
    const THREADS: usize = 32;
    let states: Vec<&[u8]> = ckpt
        .tensors()
        .filter(|t| t.name.contains(".quant_state.bitsandbytes__"))
        .map(|t| t.bytes)
        .collect();
    if states.len() < 64 {
        return;
    }
    std::thread::scope(|s| {
        for part in states.chunks(states.len().div_ceil(THREADS)) {
            s.spawn(move || {
                let touched: u64 = part
                    .iter()
                    .map(|b| b.iter().step_by(4096).map(|x| *x as u64).sum::<u64>())
                    .sum();
                std::hint::black_box(touched);
            });
        }
    });
}

fn layout_of(ckpt: &Checkpoint) -> Option<Layout> {
    detect_layout(ckpt).ok()
}

/// Decides the expert layout from the names of layer 0 (spec checkpoints.md §1.5).
pub fn detect_layout(ckpt: &Checkpoint) -> Result<Layout> {
    detect_layer_layout(ckpt, 0)
}

fn detect_layer_layout(ckpt: &Checkpoint, layer: usize) -> Result<Layout> {
    let p = format!("model.layers.{layer}.mlp.experts.");
    if ckpt.contains(&format!("{p}gate_up_projs.0.weight"))
        || ckpt.contains(&format!("{p}down_projs.0.weight"))
    {
        return Ok(Layout::UnslothSplit);
    }
    if ckpt.contains(&format!("{p}gate_up_proj_blocks")) {
        return Ok(Layout::Mxfp4);
    }
    if let Some(t) = ckpt.get(&format!("{p}gate_up_proj")) {
        if t.dtype.is_float() {
            return Ok(Layout::FusedDense);
        }
        let has_state = [Bnb4Kind::Nf4, Bnb4Kind::Fp4]
            .iter()
            .any(|k| ckpt.contains(&format!("{p}gate_up_proj.{}", k.state_suffix())));
        if t.dtype == DType::U8 && ckpt.contains(&format!("{p}gate_up_proj.absmax")) && has_state {
            return Ok(Layout::FusedBnb);
        }
        return Err(t.error(format!(
            "fused expert stack stored as {} without bitsandbytes quant state (no .absmax / .quant_state.bitsandbytes__nf4): the quantization parameters are lost and the weights cannot be recovered; re-save the model with its quant state",
            t.dtype
        )));
    }
    Err(ckpt.missing(
        &format!("{p}gate_up_projs.0.weight"),
        "found no expert tensors in any known layout: expected Unsloth `experts.gate_up_projs.{e}.weight`, transformers `experts.gate_up_proj`, or OpenAI `experts.gate_up_proj_blocks`",
    ))
}

struct Mapper<'a> {
    ckpt: &'a Checkpoint,
    cfg: &'a GptOssConfig,
    problems: RefCell<Vec<FormatError>>,
    used: RefCell<BTreeSet<String>>,
}

/// Whether `found` is `expected` with its last two dimensions swapped.
fn is_transposed(found: &[usize], expected: &[usize]) -> bool {
    let n = expected.len();
    if n < 2 || found.len() != n || found == expected {
        return false;
    }
    let mut swapped = expected.to_vec();
    swapped.swap(n - 2, n - 1);
    found == swapped.as_slice()
}

fn shape_str(s: &[usize]) -> String {
    format!("{s:?}")
}

impl<'a> Mapper<'a> {
    fn report(&self, e: FormatError) {
        self.problems.borrow_mut().push(e);
    }

    fn take(&self, name: &str) -> Option<TensorRef<'a>> {
        match self.ckpt.get(name) {
            Some(t) => {
                self.used.borrow_mut().insert(name.to_string());
                Some(t)
            }
            None => {
                self.report(self.ckpt.missing(name, ""));
                None
            }
        }
    }

    fn check_shape(&self, t: &TensorRef<'_>, expected: &[usize]) -> bool {
        if t.shape == expected {
            return true;
        }
        let hint = if is_transposed(t.shape, expected) {
            " (transposed? the layout probe does not guess: fix the checkpoint or its converter)"
        } else {
            ""
        };
        self.report(t.error(format!(
            "shape {} does not match the config: expected {}{hint}",
            shape_str(t.shape),
            shape_str(expected)
        )));
        false
    }

    fn check_float(&self, t: &TensorRef<'_>) -> bool {
        if t.dtype.is_float() {
            return true;
        }
        self.report(t.error(format!(
            "dtype {} where a float tensor (BF16/F16/F32) is expected",
            t.dtype
        )));
        false
    }

    fn vector(&self, name: &str, len: usize) -> Option<Vector<'a>> {
        let t = self.take(name)?;
        (self.check_float(&t) & self.check_shape(&t, &[len])).then(|| Vector {
            name: name.to_string(),
            dtype: t.dtype,
            bytes: t.bytes,
            len,
        })
    }

    /// A `[rows, cols]` weight `name` that may be dense or bnb 4-bit (decided per tensor).
    fn linear_weight(&self, name: &str, rows: usize, cols: usize) -> Option<Matrix<'a>> {
        let t = self.take(name)?;
        if let Some((tensor, shape)) = self.bnb4(&t)? {
            if shape != [rows, cols] {
                self.check_json_shape(&t, &shape, &[rows, cols]);
                return None;
            }
            return Some(Matrix {
                name: name.to_string(),
                rows,
                cols,
                orientation: Orientation::OutIn,
                data: MatrixData::Bnb4 {
                    tensor,
                    elem_offset: 0,
                },
            });
        }
        (self.check_float(&t) & self.check_shape(&t, &[rows, cols])).then(|| Matrix {
            name: name.to_string(),
            rows,
            cols,
            orientation: Orientation::OutIn,
            data: MatrixData::Dense {
                dtype: t.dtype,
                bytes: t.bytes,
            },
        })
    }

    fn check_json_shape(&self, t: &TensorRef<'_>, found: &[usize], expected: &[usize]) {
        let hint = if is_transposed(found, expected) {
            " (transposed?)"
        } else {
            ""
        };
        self.report(t.error(format!(
            "quant-state shape {} does not match the config: expected {}{hint}",
            shape_str(found),
            shape_str(expected)
        )));
    }

    fn linear(&self, prefix: &str, rows: usize, cols: usize, bias: bool) -> Option<Linear<'a>> {
        let weight = self.linear_weight(&format!("{prefix}.weight"), rows, cols);
        let bias = match bias {
            true => Some(self.vector(&format!("{prefix}.bias"), rows)?),
            false => None,
        };
        Some(Linear {
            weight: weight?,
            bias,
        })
    }

    /// If `t` has a bitsandbytes quant state, the validated 4-bit view and its JSON shape.
    /// Outer `None` = a problem was reported; `Some(None)` = `t` is not bnb-quantized.
    #[allow(clippy::type_complexity)]
    fn bnb4(&self, t: &TensorRef<'a>) -> Option<Option<(Bnb4Tensor<'a>, Vec<usize>)>> {
        let name = t.name;
        let (kind, state_t) = match [Bnb4Kind::Nf4, Bnb4Kind::Fp4].into_iter().find_map(|k| {
            self.ckpt
                .get(&format!("{name}.{}", k.state_suffix()))
                .map(|s| (k, s))
        }) {
            Some(x) => x,
            None => {
                if t.dtype == DType::U8 && self.ckpt.contains(&format!("{name}.absmax")) {
                    self.report(t.error(
                        "has .absmax but no .quant_state.bitsandbytes__nf4/__fp4 JSON: cannot know the shape or quant type",
                    ));
                    return None;
                }
                return Some(None);
            }
        };
        self.used.borrow_mut().insert(state_t.name.to_string());
        let state = match QuantStateJson::parse(state_t.bytes) {
            Ok(s) => s,
            Err(e) => {
                self.report(state_t.error(e));
                return None;
            }
        };
        let expected_kind = if kind == Bnb4Kind::Nf4 { "nf4" } else { "fp4" };
        if state.quant_type != expected_kind {
            self.report(state_t.error(format!(
                "JSON says quant_type \"{}\" but the key says {expected_kind}",
                state.quant_type
            )));
            return None;
        }
        let code = self.take(&format!("{name}.quant_map"))?;
        let absmax_t = self.take(&format!("{name}.absmax"))?;
        let absmax = if self.ckpt.contains(&format!("{name}.nested_absmax")) {
            let nested_absmax = self.take(&format!("{name}.nested_absmax"))?;
            let nested_code = self.take(&format!("{name}.nested_quant_map"))?;
            let (Some(nbs), Some(offset)) = (state.nested_blocksize, state.nested_offset) else {
                self.report(state_t.error(
                    "nested_absmax is present but the JSON lacks nested_blocksize or nested_offset",
                ));
                return None;
            };
            for (tt, want) in [
                (&absmax_t, DType::U8),
                (&nested_absmax, DType::F32),
                (&nested_code, DType::F32),
            ] {
                if tt.dtype != want {
                    self.report(tt.error(format!(
                        "dtype {} where {want} is expected for double quantization",
                        tt.dtype
                    )));
                    return None;
                }
            }
            Absmax::Nested {
                codes: absmax_t.bytes,
                nested_absmax: nested_absmax.bytes,
                nested_code: nested_code.bytes,
                nested_blocksize: nbs,
                offset: offset as f32,
            }
        } else {
            if absmax_t.dtype != DType::F32 {
                self.report(absmax_t.error(format!(
                    "dtype {} without nested_absmax: expected F32 block scales (or add the double-quant tensors)",
                    absmax_t.dtype
                )));
                return None;
            }
            Absmax::F32(absmax_t.bytes)
        };
        if code.dtype != DType::F32 {
            self.report(code.error(format!("dtype {} where F32 is expected", code.dtype)));
            return None;
        }
        // quant_storage may be any dtype: the packed weight's raw bytes are always read as u8.
        match Bnb4Tensor::new(kind, &state, t.bytes, code.bytes, absmax) {
            Ok(q) => Some(Some((q, state.shape.clone()))),
            Err(e) => {
                self.report(t.error(e));
                None
            }
        }
    }

    fn model(&self, layout: Layout) -> Option<ModelWeights<'a>> {
        let c = self.cfg;
        let embed = self.linear_weight("model.embed_tokens.weight", c.vocab_size, c.hidden_size);
        let layers: Vec<Option<LayerWeights<'a>>> =
            (0..c.num_hidden_layers).map(|l| self.layer(l)).collect();
        let norm = self.vector("model.norm.weight", c.hidden_size);
        let lm_head = self.linear_weight("lm_head.weight", c.vocab_size, c.hidden_size);
        let layers: Option<Vec<_>> = layers.into_iter().collect();
        Some(ModelWeights {
            config: c,
            layout,
            embed: embed?,
            layers: layers?,
            norm: norm?,
            lm_head: lm_head?,
        })
    }

    fn layer(&self, l: usize) -> Option<LayerWeights<'a>> {
        let c = self.cfg;
        let (h, q, kv) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let p = format!("model.layers.{l}");
        let b = c.attention_bias;
        let layout = match detect_layer_layout(self.ckpt, l) {
            Ok(x) => Some(x),
            Err(e) => {
                self.report(e);
                None
            }
        };
        let input_norm = self.vector(&format!("{p}.input_layernorm.weight"), h);
        let lq = self.linear(&format!("{p}.self_attn.q_proj"), q, h, b);
        let lk = self.linear(&format!("{p}.self_attn.k_proj"), kv, h, b);
        let lv = self.linear(&format!("{p}.self_attn.v_proj"), kv, h, b);
        let lo = self.linear(&format!("{p}.self_attn.o_proj"), h, q, b);
        let sinks = self.vector(&format!("{p}.self_attn.sinks"), c.num_attention_heads);
        let post_norm = self.vector(&format!("{p}.post_attention_layernorm.weight"), h);
        let router_prefix = if self.ckpt.contains(&format!("{p}.mlp.router.linear.weight")) {
            format!("{p}.mlp.router.linear")
        } else {
            format!("{p}.mlp.router")
        };
        let router = self.linear(&router_prefix, c.num_local_experts, h, true);
        let experts = match layout? {
            Layout::UnslothSplit => self.split_experts(&p),
            Layout::FusedDense | Layout::FusedBnb => self.stacked_experts(&p, Mapper::fused_stack),
            Layout::Mxfp4 => self.stacked_experts(&p, Mapper::mxfp4_stack),
        };
        Some(LayerWeights {
            input_norm: input_norm?,
            q: lq?,
            k: lk?,
            v: lv?,
            o: lo?,
            sinks: sinks?,
            post_norm: post_norm?,
            router: router?,
            experts: experts?,
            layout: layout?,
        })
    }

    fn split_experts(&self, p: &str) -> Option<Vec<Expert<'a>>> {
        let c = self.cfg;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let experts: Vec<Option<Expert<'a>>> = (0..c.num_local_experts)
            .map(|e| {
                let gate_up = self.linear(
                    &format!("{p}.mlp.experts.gate_up_projs.{e}"),
                    2 * i,
                    h,
                    true,
                );
                let down = self.linear(&format!("{p}.mlp.experts.down_projs.{e}"), h, i, true);
                Some(Expert {
                    gate_up: gate_up?,
                    down: down?,
                })
            })
            .collect();
        experts.into_iter().collect()
    }

    /// Per-expert slices of a fused `[E, in, out]` stack (dense or bnb-quantized flat).
    fn fused_stack(&self, name: &str, rows: usize, cols: usize) -> Option<Vec<Matrix<'a>>> {
        let e_count = self.cfg.num_local_experts;
        let t = self.take(name)?;
        let expected = [e_count, cols, rows];
        let per = rows * cols;
        // Expert e's matrix over `data(e)`.
        let experts = |data: &dyn Fn(usize) -> MatrixData<'a>| {
            (0..e_count)
                .map(|e| Matrix {
                    name: format!("{name}[{e}]"),
                    rows,
                    cols,
                    orientation: Orientation::InOut,
                    data: data(e),
                })
                .collect()
        };
        if let Some((tensor, shape)) = self.bnb4(&t)? {
            if shape != expected {
                self.check_json_shape(&t, &shape, &expected);
                return None;
            }
            return Some(experts(&|e| MatrixData::Bnb4 {
                tensor,
                elem_offset: e * per,
            }));
        }
        if !(self.check_float(&t) & self.check_shape(&t, &expected)) {
            return None;
        }
        let sz = t.dtype.size() * per;
        Some(experts(&|e| MatrixData::Dense {
            dtype: t.dtype,
            bytes: &t.bytes[e * sz..(e + 1) * sz],
        }))
    }

    /// Per-expert slices of a `[E, n]` bias.
    fn stacked_bias(&self, name: &str, n: usize) -> Option<Vec<Vector<'a>>> {
        let e_count = self.cfg.num_local_experts;
        let t = self.take(name)?;
        if !(self.check_float(&t) & self.check_shape(&t, &[e_count, n])) {
            return None;
        }
        let sz = t.dtype.size() * n;
        Some(
            (0..e_count)
                .map(|e| Vector {
                    name: format!("{name}[{e}]"),
                    dtype: t.dtype,
                    bytes: &t.bytes[e * sz..(e + 1) * sz],
                    len: n,
                })
                .collect(),
        )
    }

    /// Experts stored as stacks (`gate_up_proj…`, `down_proj…` with `[E, n]` biases), read
    /// through `stack` (dense/bnb fused, or MXFP4 blocks and scales).
    fn stacked_experts(&self, p: &str, stack: StackReader<'a>) -> Option<Vec<Expert<'a>>> {
        let c = self.cfg;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let gu = stack(self, &format!("{p}.mlp.experts.gate_up_proj"), 2 * i, h);
        let gub = self.stacked_bias(&format!("{p}.mlp.experts.gate_up_proj_bias"), 2 * i);
        let dn = stack(self, &format!("{p}.mlp.experts.down_proj"), h, i);
        let dnb = self.stacked_bias(&format!("{p}.mlp.experts.down_proj_bias"), h);
        Some(zip_experts(gu?, gub?, dn?, dnb?))
    }

    fn mxfp4_stack(&self, base: &str, rows: usize, cols: usize) -> Option<Vec<Matrix<'a>>> {
        let e_count = self.cfg.num_local_experts;
        let blocks = self.take(&format!("{base}_blocks"))?;
        let scales = self.take(&format!("{base}_scales"))?;
        let g = cols / crate::codec::mxfp4::MXFP4_BLOCK;
        let mut ok = self.check_shape(&blocks, &[e_count, rows, g, 16])
            & self.check_shape(&scales, &[e_count, rows, g]);
        for t in [&blocks, &scales] {
            if t.dtype != DType::U8 {
                self.report(t.error(format!("dtype {} where U8 is expected for MXFP4", t.dtype)));
                ok = false;
            }
        }
        if !ok || !cols.is_multiple_of(crate::codec::mxfp4::MXFP4_BLOCK) {
            return None;
        }
        let (bsz, ssz) = (rows * cols / 2, rows * g);
        let mut out = Vec::with_capacity(e_count);
        for e in 0..e_count {
            match Mxfp4Matrix::new(
                &blocks.bytes[e * bsz..(e + 1) * bsz],
                &scales.bytes[e * ssz..(e + 1) * ssz],
                rows,
                cols,
            ) {
                Ok(m) => out.push(Matrix {
                    name: format!("{base}_blocks[{e}]"),
                    rows,
                    cols,
                    orientation: Orientation::OutIn,
                    data: MatrixData::Mxfp4(m),
                }),
                Err(msg) => {
                    self.report(blocks.error(msg));
                    return None;
                }
            }
        }
        Some(out)
    }
}

/// Reads one expert stack into per-expert matrices (`name`, logical rows, cols).
type StackReader<'a> = fn(&Mapper<'a>, &str, usize, usize) -> Option<Vec<Matrix<'a>>>;

fn zip_experts<'a>(
    gu: Vec<Matrix<'a>>,
    gub: Vec<Vector<'a>>,
    dn: Vec<Matrix<'a>>,
    dnb: Vec<Vector<'a>>,
) -> Vec<Expert<'a>> {
    gu.into_iter()
        .zip(gub)
        .zip(dn.into_iter().zip(dnb))
        .map(|((g, gb), (d, db))| Expert {
            gate_up: Linear {
                weight: g,
                bias: Some(gb),
            },
            down: Linear {
                weight: d,
                bias: Some(db),
            },
        })
        .collect()
}
