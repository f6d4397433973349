//! `gptoss convert`: rewrite any supported checkpoint in another layout.
//!
//! - to `unsloth-nf4`: the Unsloth split layout, experts quantized to NF4 with double
//!   quantization by our bitsandbytes-exact quantizer from their bf16 values (what Unsloth does to
//!   a bf16 model); attention stays as the source has it (NF4 stays NF4, dense becomes bf16);
//! - to `fused-bf16`: transformers' fused layout, everything decoded to bf16 (NF4 products are
//!   rounded to bf16 as bitsandbytes does), for tools that need plain weights.

use std::path::Path;

use rayon::prelude::*;

use crate::checkpoint::{Checkpoint, DType};
use crate::error::{FormatError, Result};
use crate::synth::{
    SynthLayout, nf4_linear_tensors, nf4_names, quantization_config, round_to_bf16,
};
use crate::weights::{Linear, Matrix, MatrixData, ModelWeights, Vector};
use crate::writer::{OwnedTensor, TensorGroup, WriteOptions, WriteSummary, write_checkpoint};

/// Layouts `convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertTarget {
    UnslothNf4,
    FusedBf16,
}

impl ConvertTarget {
    /// Parses `unsloth-nf4` / `fused-bf16`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "unsloth-nf4" => Some(ConvertTarget::UnslothNf4),
            "fused-bf16" | "bf16" => Some(ConvertTarget::FusedBf16),
            _ => None,
        }
    }
}

fn is_quantized(m: &Matrix<'_>) -> bool {
    !matches!(m.data, MatrixData::Dense { .. })
}

fn vector_group<'a>(name: String, v: &Vector<'a>, dtype: DType) -> TensorGroup<'a> {
    let v = v.clone();
    TensorGroup::new(vec![name.clone()], (v.len * 4) as u64, move || {
        let x = v.to_f32();
        Ok(vec![match dtype {
            DType::F32 => OwnedTensor::f32(name, vec![x.len()], &x),
            _ => OwnedTensor::bf16(name, vec![x.len()], &x),
        }])
    })
}

/// A weight written as bf16 (`nf4 = false`) or as NF4 from its bf16-rounded values.
fn matrix_group<'a>(name: String, m: &Matrix<'a>, nf4: bool) -> TensorGroup<'a> {
    let m = m.clone();
    let approx = if nf4 { m.numel() / 2 } else { m.numel() * 2 } as u64;
    let names = if nf4 {
        nf4_names(&name)
    } else {
        vec![name.clone()]
    };
    TensorGroup::new(names, approx, move || {
        let mut x = m.to_f32();
        if nf4 {
            round_to_bf16(&mut x);
            Ok(nf4_linear_tensors(&name, &x, m.rows, m.cols))
        } else {
            Ok(vec![OwnedTensor::bf16(name, vec![m.rows, m.cols], &x)])
        }
    })
}

fn linear_groups<'a>(prefix: &str, l: &Linear<'a>, nf4: bool, out: &mut Vec<TensorGroup<'a>>) {
    out.push(matrix_group(format!("{prefix}.weight"), &l.weight, nf4));
    if let Some(b) = &l.bias {
        out.push(vector_group(format!("{prefix}.bias"), b, DType::BF16));
    }
}

/// A fused `[E, in, out]` bf16 stack from per-expert logical `[out, in]` matrices.
fn fused_stack_group<'a>(name: String, ms: Vec<Matrix<'a>>) -> TensorGroup<'a> {
    let (e, rows, cols) = (ms.len(), ms[0].rows, ms[0].cols);
    TensorGroup::new(
        vec![name.clone()],
        (e * rows * cols * 2) as u64,
        move || {
            let per: Vec<Vec<f32>> = ms
                .par_iter()
                .map(|m| {
                    let x = m.to_f32();
                    let mut t = vec![0f32; rows * cols];
                    for r in 0..rows {
                        for c in 0..cols {
                            t[c * rows + r] = x[r * cols + c];
                        }
                    }
                    t
                })
                .collect();
            Ok(vec![OwnedTensor::bf16(
                name,
                vec![e, cols, rows],
                &per.concat(),
            )])
        },
    )
}

fn stacked_vector_group<'a>(name: String, vs: Vec<Vector<'a>>) -> TensorGroup<'a> {
    let (e, n) = (vs.len(), vs[0].len);
    TensorGroup::new(vec![name.clone()], (e * n * 2) as u64, move || {
        let all: Vec<f32> = vs.iter().flat_map(|v| v.to_f32()).collect();
        Ok(vec![OwnedTensor::bf16(name, vec![e, n], &all)])
    })
}

/// The gate_up (or down) biases of every expert; GPT-OSS experts always have them.
fn expert_biases<'a>(
    experts: &[crate::weights::Expert<'a>],
    gate_up: bool,
) -> Result<Vec<Vector<'a>>> {
    experts
        .iter()
        .map(|e| {
            let l = if gate_up { &e.gate_up } else { &e.down };
            l.bias.clone().ok_or_else(|| {
                FormatError::Invalid(format!("{}: expert without a bias", l.weight.name))
            })
        })
        .collect()
}

/// Converts `src` into `target` layout under `out`.
pub fn convert(
    src: &Checkpoint,
    target: ConvertTarget,
    out: &Path,
    opts: WriteOptions,
) -> Result<WriteSummary> {
    let w = ModelWeights::new(src)?;
    let config_path = src.dir().join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| FormatError::io(&config_path, e))?;
    let mut cfg_json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| FormatError::Config {
            path: config_path.clone(),
            problem: e.to_string(),
        })?;
    let obj = cfg_json
        .as_object_mut()
        .ok_or_else(|| FormatError::Config {
            path: config_path.clone(),
            problem: "not a JSON object".into(),
        })?;
    obj.remove("quantization_config");
    let attn_nf4 =
        target == ConvertTarget::UnslothNf4 && w.layers.iter().any(|l| is_quantized(&l.q.weight));
    if target == ConvertTarget::UnslothNf4 {
        let mut q = quantization_config(SynthLayout::UnslothNf4).expect("bnb config");
        if attn_nf4 {
            q["llm_int8_skip_modules"] = serde_json::json!([
                "lm_head",
                "multi_modal_projector",
                "merger",
                "modality_projection",
                "router"
            ]);
        }
        obj.insert("quantization_config".into(), q);
    }

    let mut g: Vec<TensorGroup<'_>> = Vec::new();
    let norm_dtype = if target == ConvertTarget::UnslothNf4 {
        DType::F32
    } else {
        DType::BF16
    };
    g.push(matrix_group(
        "model.embed_tokens.weight".into(),
        &w.embed,
        false,
    ));
    for (l, lw) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        g.push(vector_group(
            format!("{p}.input_layernorm.weight"),
            &lw.input_norm,
            norm_dtype,
        ));
        g.push(vector_group(
            format!("{p}.post_attention_layernorm.weight"),
            &lw.post_norm,
            norm_dtype,
        ));
        for (name, lin) in [
            ("q_proj", &lw.q),
            ("k_proj", &lw.k),
            ("v_proj", &lw.v),
            ("o_proj", &lw.o),
        ] {
            let nf4 = attn_nf4 && is_quantized(&lin.weight);
            linear_groups(&format!("{p}.self_attn.{name}"), lin, nf4, &mut g);
        }
        g.push(vector_group(
            format!("{p}.self_attn.sinks"),
            &lw.sinks,
            DType::BF16,
        ));
        let x = format!("{p}.mlp.experts");
        match target {
            ConvertTarget::UnslothNf4 => {
                linear_groups(&format!("{p}.mlp.router.linear"), &lw.router, false, &mut g);
                for (e, ex) in lw.experts.iter().enumerate() {
                    linear_groups(&format!("{x}.gate_up_projs.{e}"), &ex.gate_up, true, &mut g);
                    linear_groups(&format!("{x}.down_projs.{e}"), &ex.down, true, &mut g);
                }
            }
            ConvertTarget::FusedBf16 => {
                linear_groups(&format!("{p}.mlp.router"), &lw.router, false, &mut g);
                g.push(fused_stack_group(
                    format!("{x}.gate_up_proj"),
                    lw.experts
                        .iter()
                        .map(|e| e.gate_up.weight.clone())
                        .collect(),
                ));
                g.push(stacked_vector_group(
                    format!("{x}.gate_up_proj_bias"),
                    expert_biases(&lw.experts, true)?,
                ));
                g.push(fused_stack_group(
                    format!("{x}.down_proj"),
                    lw.experts.iter().map(|e| e.down.weight.clone()).collect(),
                ));
                g.push(stacked_vector_group(
                    format!("{x}.down_proj_bias"),
                    expert_biases(&lw.experts, false)?,
                ));
            }
        }
    }
    g.push(vector_group(
        "model.norm.weight".into(),
        &w.norm,
        norm_dtype,
    ));
    g.push(matrix_group("lm_head.weight".into(), &w.lm_head, false));
    let text = serde_json::to_string_pretty(&cfg_json).expect("json");
    write_checkpoint(out, &text, g, opts)
}
