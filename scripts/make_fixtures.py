#!/usr/bin/env python3
"""Generate the golden fixtures under fixtures/ (see fixtures/README.md).

CPU only and deterministic: fixed seeds, torch single-threaded, so re-running reproduces the same
bytes (with the pinned versions of scripts/requirements-fixtures.txt).

    python scripts/make_fixtures.py [--out fixtures]

What it writes:
  tiny-bf16/, tiny-mxfp4/, tiny-unsloth-nf4/, tiny-fused-nf4/   complete HF-style model dirs of
      ONE random GPT-OSS model (real YaRN, head_dim 64, window 4) in four checkpoint layouts;
  reference/<dir>.safetensors   transformers' f32 forward on exactly the stored weights, decoded;
  reference/bnb_codec.safetensors, bnb_dequant.safetensors, mxfp4_decode.safetensors,
  reference/torch_mean.safetensors   codec golden vectors.

The quantized formats are produced by the libraries themselves (bitsandbytes quantize_4bit for
NF4/FP4); only the MXFP4 encoder is ours (round to nearest, ties to even code, see mxfp4_encode).
"""

import argparse
import copy
import json
import math
import os
import sys

import numpy as np
import torch

torch.set_num_threads(1)  # determinism, and bnb's offset = torch mean depends on the thread count

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

# --------------------------------------------------------------------------------------------
# Model definition
# --------------------------------------------------------------------------------------------

H = 128  # hidden
I = 128  # expert intermediate
E = 8  # experts
L = 3  # layers
NH = 4  # q heads
NKV = 2  # kv heads
HD = 64  # head dim
V = 1024  # vocab

CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 1023,
    "pad_token_id": 1022,
    "experts_per_token": 4,
    "head_dim": HD,
    "hidden_act": "silu",
    "hidden_size": H,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": I,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "max_position_embeddings": 131072,
    "num_attention_heads": NH,
    "num_experts_per_tok": 4,
    "num_hidden_layers": L,
    "num_key_value_heads": NKV,
    "num_local_experts": E,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 4,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": V,
}

# Weight scales, chosen so that every GPT-OSS feature changes the numbers (diagnostics below).
SCALES = {
    "embed": 1.0,
    "qk_w": 0.16,
    "qk_b": 0.3,
    "v_w": 1.0 / math.sqrt(H),
    "v_b": 0.1,
    "o_w": 1.0 / math.sqrt(NH * HD),
    "o_b": 0.1,
    "sinks": 1.0,
    "router_w": 2.5 / math.sqrt(H),
    "router_b": 0.5,
    "gate_up_w": 6.0 / math.sqrt(H),
    "gate_up_b": 1.0,
    "down_w": 0.012,
    "down_b": 0.1,
    "lm_head": 0.25,
}

# Unsloth-dynamic-style dense leftovers in tiny-unsloth-nf4.
UNSLOTH_DENSE = [
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.0.mlp.experts.down_projs.3",
]


def make_base_weights(seed=20250806):
    """The one random model, fused transformers layout, every tensor BF16."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std + mean).to(torch.bfloat16)

    def norm_w(n):
        return (0.6 + 0.8 * torch.rand(n, generator=g, dtype=torch.float32)).to(torch.bfloat16)

    s = SCALES
    w = {"model.embed_tokens.weight": randn(V, H, std=s["embed"])}
    for li in range(L):
        p = f"model.layers.{li}."
        w[p + "input_layernorm.weight"] = norm_w(H)
        w[p + "post_attention_layernorm.weight"] = norm_w(H)
        w[p + "self_attn.q_proj.weight"] = randn(NH * HD, H, std=s["qk_w"])
        w[p + "self_attn.q_proj.bias"] = randn(NH * HD, std=s["qk_b"])
        w[p + "self_attn.k_proj.weight"] = randn(NKV * HD, H, std=s["qk_w"])
        w[p + "self_attn.k_proj.bias"] = randn(NKV * HD, std=s["qk_b"])
        w[p + "self_attn.v_proj.weight"] = randn(NKV * HD, H, std=s["v_w"])
        w[p + "self_attn.v_proj.bias"] = randn(NKV * HD, std=s["v_b"])
        w[p + "self_attn.o_proj.weight"] = randn(H, NH * HD, std=s["o_w"])
        w[p + "self_attn.o_proj.bias"] = randn(H, std=s["o_b"])
        w[p + "self_attn.sinks"] = randn(NH, std=s["sinks"])
        w[p + "mlp.router.weight"] = randn(E, H, std=s["router_w"])
        w[p + "mlp.router.bias"] = randn(E, std=s["router_b"])
        w[p + "mlp.experts.gate_up_proj"] = randn(E, H, 2 * I, std=s["gate_up_w"])
        w[p + "mlp.experts.gate_up_proj_bias"] = randn(E, 2 * I, std=s["gate_up_b"])
        w[p + "mlp.experts.down_proj"] = randn(E, I, H, std=s["down_w"])
        w[p + "mlp.experts.down_proj_bias"] = randn(E, H, std=s["down_b"])
    w["model.norm.weight"] = norm_w(H)
    w["lm_head.weight"] = randn(V, H, std=s["lm_head"])
    return w


# --------------------------------------------------------------------------------------------
# MXFP4 encoder (ours): shared E8M0 scale = smallest power of two with max|x| <= 6 * 2^e,
# elements rounded to the nearest E2M1 value, ties to the even code; sign bit iff x < 0.
# The Rust encoder (crates/formats/src/codec/mxfp4_quantize.rs) implements the same rule.
# --------------------------------------------------------------------------------------------

FP4_MAG = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_MID = (FP4_MAG[:-1] + FP4_MAG[1:]) / 2  # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5


def mxfp4_encode(w):
    """w: float array [..., rows, cols] (cols % 32 == 0) -> (blocks [..., rows, cols/32, 16] u8,
    scales [..., rows, cols/32] u8)."""
    w = np.asarray(w, dtype=np.float64)
    *lead, cols = w.shape
    g = w.reshape(*lead, cols // 32, 32)
    amax = np.abs(g).max(axis=-1)
    # e = floor(log2(amax)) - 2, bumped once if amax > 6 * 2^e (exact: frexp and powers of two)
    m, ex = np.frexp(np.where(amax > 0, amax, 1.0))  # amax = m * 2^ex, m in [0.5, 1)
    e = ex - 1 - 2
    e = np.where(amax > 6.0 * np.ldexp(1.0, e), e + 1, e)
    e = np.clip(e, -127, 127)
    e = np.where(amax > 0, e, -127)
    scales = (e + 127).astype(np.uint8)
    y = np.abs(g) / np.ldexp(1.0, e)[..., None]  # exact: a power-of-two scaling
    c = np.searchsorted(FP4_MID, y, side="left")  # number of midpoints strictly below y
    tie = (c < len(FP4_MID)) & (y == FP4_MID[np.minimum(c, len(FP4_MID) - 1)])
    c = np.where(tie & (c % 2 == 1), c + 1, c)  # on a midpoint take the even code
    codes = c.astype(np.uint8) | np.where(g < 0, 8, 0).astype(np.uint8)
    codes = codes.reshape(*lead, cols // 32, 16, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)
    return blocks, scales


# --------------------------------------------------------------------------------------------
# bitsandbytes helpers
# --------------------------------------------------------------------------------------------


def bnb_quantize(t, quant_type="nf4", nested=True, blocksize=64):
    """quantize_4bit + as_dict(packed=True): exactly the Linear4bit state-dict keys (suffixes)."""
    packed, qs = bnbF.quantize_4bit(
        t, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, quant_storage=torch.uint8
    )
    d = {"": packed}
    for k, v in qs.as_dict(packed=True).items():
        d[k] = v
    return d


def bnb_dequant_stored(tensors, prefix, backend="native"):
    """bnb's float32 dequantization of a stored 4-bit tensor (QuantState rebuilt from the stored
    companions, output dtype forced to float32), reshaped to the JSON shape.

    It is computed twice: by `dequantize_4bit` (on CPU: bnb's native kernel) and by bnb's
    pure-torch reference backend (`backends/default/ops.py`), which must agree. They do not when
    the last dim is even but not a multiple of the blocksize: bnb 0.50.2's native CPU kernel
    indexes the absmax per row with `n // blocksize` blocks per row, which is wrong once blocks
    straddle rows (never the case for GPT-OSS: every dim is a multiple of 64). For such a tensor
    pass backend="default" to get the correct (flat-block, CUDA-equivalent) values."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    comp = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    qs = bnbF.QuantState.from_dict(comp, device=torch.device("cpu"))
    qs = copy.copy(qs)
    qs.dtype = torch.float32
    native = bnbF.dequantize_4bit(tensors[prefix], qs).reshape(qs.shape).contiguous()
    assert native.dtype == torch.float32
    absmax = qs.absmax
    if qs.nested:
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    default = _dequantize_4bit_compute(
        tensors[prefix].reshape(-1), absmax, _get_4bit_code(qs.quant_type, torch.device("cpu")), qs.blocksize,
        qs.shape, torch.float32,
    ).reshape(qs.shape)
    straddles = qs.shape[-1] % qs.blocksize != 0 and qs.shape[-1] % 2 == 0
    if backend == "native":
        assert not straddles, f"{prefix}: bnb's native CPU dequant is wrong for shape {tuple(qs.shape)}"
        assert torch.equal(native, default), f"{prefix}: native and default dequant differ"
        return native
    assert straddles and not torch.equal(native, default)
    return default.contiguous()


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def write_config(d, extra=None):
    cfg = copy.deepcopy(CONFIG)
    if extra:
        cfg.update(extra)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def nbytes(t):
    return t.numel() * t.element_size()


def write_sharded(d, tensors, shard_of, names):
    """shard_of: tensor name -> shard index; names: list of file names. Writes the index."""
    os.makedirs(d, exist_ok=True)
    groups = {i: {} for i in range(len(names))}
    for k, v in tensors.items():
        groups[shard_of(k)][k] = v.contiguous()
    for i, fname in enumerate(names):
        save_file(groups[i], os.path.join(d, fname), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(nbytes(v) for v in tensors.values())},
        "weight_map": {k: names[shard_of(k)] for k in sorted(tensors)},
    }
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def bnb_skip_config(skip):
    return {
        "quantization_config": {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }
    }


# --------------------------------------------------------------------------------------------
# The four model directories. Each builder returns (stored tensors, f32 fused weights for the
# reference forward, list of bnb-quantized weight prefixes).
# --------------------------------------------------------------------------------------------


def build_bf16(base, out):
    d = os.path.join(out, "tiny-bf16")
    os.makedirs(d, exist_ok=True)
    write_config(d)
    save_file({k: v.contiguous() for k, v in base.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return {k: v.float() for k, v in base.items()}, []


def build_mxfp4(base, out):
    d = os.path.join(out, "tiny-mxfp4")
    stored = {}
    ref = {}
    for k, v in base.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            # [E, in, out] -> OpenAI [E, out, in] blocks along in
            w_oi = v.float().transpose(1, 2).numpy()
            blocks, scales = mxfp4_encode(w_oi)
            stored[k + "_blocks"] = torch.from_numpy(blocks)
            stored[k + "_scales"] = torch.from_numpy(scales)
            dec = convert_moe_packed_tensors(stored[k + "_blocks"], stored[k + "_scales"], dtype=torch.float32)
            ref[k] = dec.contiguous()  # [E, in, out], what GptOssExperts holds
        else:
            stored[k] = v
            ref[k] = v.float()
    names = ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"]

    def shard_of(k):
        return 0 if k.startswith("model.layers.") else 1

    write_sharded(d, stored, shard_of, names)
    write_config(
        d,
        {
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            }
        },
    )
    return ref, []


def build_unsloth_nf4(base, out):
    d = os.path.join(out, "tiny-unsloth-nf4")
    stored = {}
    ref = {}
    qprefixes = []

    def put_linear(name, w_oi):
        """w_oi: BF16 [out, in]; NF4 unless listed dense."""
        if name in UNSLOTH_DENSE:
            stored[name + ".weight"] = w_oi.contiguous()
            return w_oi.float()
        q = bnb_quantize(w_oi.contiguous(), "nf4", nested=True)
        for suf, t in q.items():
            stored[name + ".weight" + ("." + suf if suf else "")] = t
        qprefixes.append(name + ".weight")
        return bnb_dequant_stored(stored, name + ".weight")

    for k, v in base.items():
        if k.endswith("_layernorm.weight") or k == "model.norm.weight":
            stored[k] = v.float()  # F32 norms (transformers keeps them in fp32)
            ref[k] = v.float()
        elif ".self_attn." in k and k.endswith("_proj.weight"):
            ref[k] = put_linear(k[: -len(".weight")], v)
        elif k.endswith("mlp.router.weight") or k.endswith("mlp.router.bias"):
            stored[k.replace("mlp.router.", "mlp.router.linear.")] = v
            ref[k] = v.float()
        elif k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            ref[k] = torch.stack([put_linear(f"{p}gate_up_projs.{e}", v[e].t()).t() for e in range(E)])
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            ref[k] = torch.stack([put_linear(f"{p}down_projs.{e}", v[e].t()).t() for e in range(E)])
        elif k.endswith("mlp.experts.gate_up_proj_bias"):
            p = k[: -len("gate_up_proj_bias")]
            for e in range(E):
                stored[f"{p}gate_up_projs.{e}.bias"] = v[e].contiguous()
            ref[k] = v.float()
        elif k.endswith("mlp.experts.down_proj_bias"):
            p = k[: -len("down_proj_bias")]
            for e in range(E):
                stored[f"{p}down_projs.{e}.bias"] = v[e].contiguous()
            ref[k] = v.float()
        else:  # embed, lm_head, sinks, attention biases
            stored[k] = v
            ref[k] = v.float()

    # Shard 1: embeddings, layer 0, and layer 1's k_proj packed weight alone (its companions go
    # to shard 2), so that a loader has to resolve every companion through the index.
    split = "model.layers.1.self_attn.k_proj.weight"

    def shard_of(k):
        if k == split or k.startswith("model.embed_tokens.") or k.startswith("model.layers.0."):
            return 0
        return 1

    write_sharded(d, stored, shard_of, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    write_config(d, bnb_skip_config(["lm_head", "router"] + UNSLOTH_DENSE))
    return ref, qprefixes


def build_fused_nf4(base, out):
    d = os.path.join(out, "tiny-fused-nf4")
    os.makedirs(d, exist_ok=True)
    stored = {}
    ref = {}
    qprefixes = []
    for k, v in base.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            layer = int(k.split(".")[2])
            q = bnb_quantize(v.contiguous(), "nf4", nested=(layer == 1))
            for suf, t in q.items():
                stored[k + ("." + suf if suf else "")] = t
            qprefixes.append(k)
            ref[k] = bnb_dequant_stored(stored, k)
        else:
            stored[k] = v
            ref[k] = v.float()
    save_file({k: t.contiguous() for k, t in stored.items()}, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    write_config(d, bnb_skip_config(["lm_head", "router", "self_attn"]))
    return ref, qprefixes


# --------------------------------------------------------------------------------------------
# Reference forward (transformers, f32, eager)
# --------------------------------------------------------------------------------------------


def hf_config(**over):
    cfg = copy.deepcopy(CONFIG)
    cfg.update(over)
    c = GptOssConfig(**cfg)
    c._attn_implementation = "eager"
    c._experts_implementation = "eager"
    return c


def build_model(ref_weights, **over):
    torch.manual_seed(0)
    m = GptOssForCausalLM(hf_config(**over)).float().eval()
    missing, unexpected = m.load_state_dict({k: v.float() for k, v in ref_weights.items()}, strict=True)
    assert not missing and not unexpected
    assert m.config._attn_implementation == "eager", m.config._attn_implementation
    assert m.config._experts_implementation == "eager", m.config._experts_implementation
    return m


class Inputs:
    def __init__(self, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.tokens = [torch.randint(0, V, (t,), generator=g, dtype=torch.int64) for t in (3, 11, 19, 9)]
        self.positions_3 = torch.arange(5000, 5009, dtype=torch.int64)
        self.block_input = torch.randn(11, H, generator=g, dtype=torch.float32)
        self.expert_input = torch.randn(5, H, generator=g, dtype=torch.float32)


@torch.no_grad()
def layer_outputs(model, x):
    """Decoder layers 0 and 1 applied to x [T, H] at positions 0..T-1, computed twice: by a
    pre-hook that substitutes the layer input inside a full-model run (the model's own mask and
    RoPE machinery), and by calling the layer directly; both must agree bit for bit."""
    outs = {}
    T = x.shape[0]
    for li in (0, 1):
        layer = model.model.layers[li]
        cap = {}
        h1 = layer.register_forward_pre_hook(lambda mod, args, kw: ((x[None].clone(),) + args[1:], kw), with_kwargs=True)
        h2 = layer.register_forward_hook(lambda mod, args, out: cap.__setitem__("y", out))
        model.model(inputs_embeds=torch.zeros(1, T, H), use_cache=False)
        h1.remove()
        h2.remove()
        hooked = cap["y"][0] if isinstance(cap["y"], tuple) else cap["y"]
        # direct call
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        pos = torch.arange(T)[None]
        emb = x[None]
        kw = dict(config=model.config, inputs_embeds=emb, attention_mask=None, past_key_values=None)
        mask = (create_sliding_window_causal_mask if li % 2 == 0 else create_causal_mask)(**kw)
        pe = model.model.rotary_emb(emb, pos)
        direct = layer(emb, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        direct = direct[0] if isinstance(direct, tuple) else direct
        assert torch.equal(hooked[0], direct[0]), f"layer {li}: hook and direct call differ"
        outs[li] = direct[0].contiguous()
    return outs


@torch.no_grad()
def expert_outputs(model, x):
    ex = model.model.layers[0].mlp.experts
    out = {}
    for e in (0, 3):
        gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        act = ex._apply_gate(gu)
        out[f"expert_out_L0_E{e}"] = (act @ ex.down_proj[e] + ex.down_proj_bias[e]).contiguous()
    moe, _ = model.model.layers[0].mlp(x[None])
    out["moe_out_L0"] = moe[0].contiguous()
    return out


@torch.no_grad()
def reference(model, inp):
    r = {}
    for i, toks in enumerate(inp.tokens):
        r[f"tokens_{i}"] = toks
        kw = {}
        if i == 3:
            r["positions_3"] = inp.positions_3
            kw["position_ids"] = inp.positions_3[None]
        r[f"logits_{i}"] = model(input_ids=toks[None], use_cache=False, **kw).logits[0].float().contiguous()
    r["block_input"] = inp.block_input
    lo = layer_outputs(model, inp.block_input)
    r["block_out_0"] = lo[0]
    r["block_out_1"] = lo[1]
    r["expert_input"] = inp.expert_input
    r.update(expert_outputs(model, inp.expert_input))
    return r


# --------------------------------------------------------------------------------------------
# Diagnostics: every GPT-OSS feature must matter numerically
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def diagnostics(ref_w, inp):
    lines = []

    def say(s):
        print(s)
        lines.append(s)

    m = build_model(ref_w)
    toks = inp.tokens[2][None]
    base = m(input_ids=toks, use_cache=False, output_hidden_states=True)
    lg = base.logits[0]

    # (a) clamp: gate/up pre-activations of the routed (token, expert) pairs, every layer
    cap = []
    hooks = []
    for li, layer in enumerate(m.model.layers):
        def pre(mod, args, li=li):
            cap.append((li, args[0].reshape(-1, H)))
        hooks.append(layer.mlp.register_forward_pre_hook(pre))
    m(input_ids=toks, use_cache=False)
    for h in hooks:
        h.remove()
    tot_g = tot_u = over_g = over_u = n = 0
    all_over = 0
    all_n = 0
    for li, h in cap:
        mlp = m.model.layers[li].mlp
        logits_r = h @ mlp.router.weight.T + mlp.router.bias
        idx = logits_r.topk(4, dim=-1).indices
        ex = mlp.experts
        for t in range(h.shape[0]):
            for e in idx[t].tolist():
                gu = h[t] @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
                g, u = gu[0::2], gu[1::2]
                over_g += int((g > 7).sum())
                over_u += int((u.abs() > 7).sum())
                n += g.numel()
        gu_all = torch.einsum("th,ehk->etk", h, ex.gate_up_proj) + ex.gate_up_proj_bias[:, None, :]
        all_over += int((gu_all.abs() > 7).sum())
        all_n += gu_all.numel()
    say(f"(a) clamp: routed pairs: gate > 7: {over_g / n:.1%}, |up| > 7: {over_u / n:.1%}; all experts |gate_up| > 7: {all_over / all_n:.1%}")
    m_noclamp = build_model(ref_w, swiglu_limit=1e9)
    d = (m_noclamp(input_ids=toks, use_cache=False).logits[0] - lg).abs().max().item()
    say(f"    max |dlogit| without the clamp: {d:.3f} (logit std {lg.std().item():.3f})")

    # (b) sinks
    w2 = dict(ref_w)
    for li in range(L):
        w2[f"model.layers.{li}.self_attn.sinks"] = torch.full((NH,), -1e4)
    m_nosink = build_model(w2)
    d = (m_nosink(input_ids=toks, use_cache=False).logits[0] - lg).abs().max().item()
    sinks = torch.cat([ref_w[f"model.layers.{li}.self_attn.sinks"] for li in range(L)])
    say(f"(b) sinks {[round(x, 2) for x in sinks.tolist()]}; max |dlogit| without sinks: {d:.3f}")

    # (c) sliding window
    m_full = build_model(ref_w, sliding_window=4096)
    lf = m_full(input_ids=toks, use_cache=False).logits[0]
    d = (lf - lg).abs()
    say(
        f"(c) window 4 vs full attention on T=19: max |dlogit| {d.max().item():.3f}; rows t<4 identical: "
        f"{bool(d[:4].max() == 0)}; rows t>=4 changed: {bool((d[4:].amax(-1) > 1e-3).all())}"
    )
    # attention logit spread (layer 0, post-RoPE) via the attention-weight output
    att = m(input_ids=toks, use_cache=False, output_attentions=True).attentions
    ent = []
    for a in att:
        p = a[0]  # [heads, T, T]
        ent.append(float((p.max(-1).values).mean()))
    say(f"    mean max attention prob per layer: {[round(x, 3) for x in ent]}")

    # (d) router
    h = cap[0][1]
    mlp = m.model.layers[0].mlp
    r = h @ mlp.router.weight.T + mlp.router.bias
    top = r.topk(5, dim=-1).values
    say(
        f"(d) router logits std {r.std().item():.2f}; mean gap 4th-5th {float((top[:, 3] - top[:, 4]).mean()):.2f}; "
        f"mean top-4 weights {[round(x, 3) for x in torch.softmax(top[:, :4], -1).mean(0).tolist()]}"
    )
    m_top8 = build_model(ref_w, num_experts_per_tok=8, experts_per_token=8)
    d = (m_top8(input_ids=toks, use_cache=False).logits[0] - lg).abs().max().item()
    sel = [set(r[t].topk(4).indices.tolist()) for t in range(r.shape[0])]
    say(f"    distinct expert sets over 19 tokens (layer 0): {len({tuple(sorted(s)) for s in sel})}; max |dlogit| top-8 vs top-4: {d:.3f}")

    # (e) hidden states
    rms = [float(hs[0].pow(2).mean().sqrt()) for hs in base.hidden_states]
    say(f"(e) hidden-state rms after embed/layers: {[round(x, 2) for x in rms]}; finite: {bool(torch.isfinite(lg).all())}; logits std {lg.std().item():.2f}")

    # YaRN at large positions
    pos = inp.positions_3
    t3 = inp.tokens[3][None]
    l_far = m(input_ids=t3, position_ids=pos[None], use_cache=False).logits[0]
    l_near = m(input_ids=t3, use_cache=False).logits[0]
    say(f"    positions 5000.. vs 0..: max |dlogit| {float((l_far - l_near).abs().max()):.3f}")
    say("    (RoPE is shift-invariant: positions 5000.. differ from 0.. only by f32 angle rounding)")
    inv = m.model.rotary_emb.inv_freq
    say(f"    YaRN inv_freq[16..18] {inv[16:19].tolist()} attention_scaling {m.model.rotary_emb.attention_scaling}")
    for label, rs in [
        ("truncate=True (low/high floored/ceiled to 8/18)", {"truncate": True}),
        ("no YaRN concentration (attention_factor 1)", {"attention_factor": 1.0}),
        ("plain RoPE (no YaRN)", {"rope_type": "default"}),
    ]:
        rope = dict(CONFIG["rope_scaling"], **rs)
        if rope["rope_type"] == "default":
            rope = {"rope_type": "default"}
        mv = build_model(ref_w, rope_scaling=rope)
        assert mv.model.rotary_emb.rope_type == rope["rope_type"]
        d = float((mv(input_ids=toks, use_cache=False).logits[0] - lg).abs().max())
        say(f"    pitfall {label}: max |dlogit| on T=19: {d:.4f}")
    return lines


# --------------------------------------------------------------------------------------------
# Codec golden vectors
# --------------------------------------------------------------------------------------------


def codec_cases():
    g = torch.Generator().manual_seed(99)
    cases = {}
    cases["nf4_nested_bf16"] = ((torch.randn(300, 128, generator=g) * 0.02).to(torch.bfloat16), "nf4", True)
    cases["nf4_nested_f32"] = (torch.randn(64, 192, generator=g) * 0.05, "nf4", True)
    cases["nf4_plain_bf16"] = ((torch.randn(128, 64, generator=g) * 0.03).to(torch.bfloat16), "nf4", False)
    cases["fp4_nested_bf16"] = ((torch.randn(192, 128, generator=g) * 0.04).to(torch.bfloat16), "fp4", True)
    cases["fp4_plain_f32"] = (torch.randn(32, 64, generator=g), "fp4", False)
    # edge cases: zero blocks, exact ties on the NF4 midpoints, values at +-absmax, subnormals
    code = bnbF.get_4bit_type("nf4", device="cpu")
    mid = (code[:-1] + code[1:]) / 2
    rows = []
    for blk in range(40):
        kind = blk % 5
        if kind == 0:
            b = torch.zeros(64)
        elif kind in (1, 2):
            amax = 2.0 ** (blk % 7 - 3) * (1 if kind == 1 else -1)
            b = torch.empty(64)
            b[0] = amax
            b[1] = -amax
            b[2:17] = mid * abs(amax)  # x * (1/absmax) lands exactly on the midpoints
            b[17:32] = -mid * abs(amax)
            b[32:] = torch.randn(32, generator=g).clamp(-1, 1) * abs(amax)
        elif kind == 3:
            b = torch.randn(64, generator=g) * 1e-3
            b[5] = 0.0
        else:
            b = torch.randn(64, generator=g) * 1e-39  # subnormal block
        rows.append(b)
    cases["nf4_nested_edge"] = (torch.stack(rows).float(), "nf4", True)
    # odd element count: a partial last block (divided, not multiplied) and a padded nibble
    cases["nf4_nested_odd"] = (torch.randn(5, 77, generator=g) * 0.1, "nf4", True)
    # blocks straddle rows (last dim 96): `.dequant` from bnb's pure-torch backend, because
    # bnb 0.50.2's native CPU dequantize_4bit is wrong for this shape (see bnb_dequant_stored)
    cases["nf4_nested_rowstraddle"] = ((torch.randn(48, 96, generator=g) * 0.02).to(torch.bfloat16), "nf4", True)
    out = {}
    for name, (x, qt, nested) in cases.items():
        q = bnb_quantize(x, qt, nested)
        out[f"{name}.input"] = x.contiguous()
        for suf, t in q.items():
            out[f"{name}.weight" + ("." + suf if suf else "")] = t.contiguous()
        out[f"{name}.dequant"] = bnb_dequant_stored(
            {f"w{('.' + s) if s else ''}": t for s, t in q.items()},
            "w",
            backend="default" if name.endswith("rowstraddle") else "native",
        )
    return out


def torch_mean_cases():
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(40000, generator=g) * 0.05 + 0.01) * (1 + 1000 * (torch.rand(40000, generator=g) < 0.01).float())
    out = {"x": x}
    for n in (5, 8, 100, 4096, 32767, 40000):
        for t in (1, 2, 3, 16):
            torch.set_num_threads(t)
            out[f"sum_n{n}_t{t}"] = x[:n].sum().reshape(1)
    torch.set_num_threads(1)
    return out


def mxfp4_case():
    g = np.random.default_rng(11)
    blocks = g.integers(0, 256, size=(2, 6, 3, 16), dtype=np.uint8)
    scales = np.array([0, 1, 2, 5, 20, 60, 100, 115, 120, 125, 126, 127, 128, 129, 130, 135, 140, 200, 240, 254], np.uint8)
    scales = g.choice(scales, size=(2, 6, 3)).astype(np.uint8)
    dec = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    return {
        "blocks": torch.from_numpy(blocks),
        "scales": torch.from_numpy(scales),
        "decoded": dec.contiguous(),
        "decoded_out_in": dec.transpose(1, 2).contiguous(),
    }


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
    ap.add_argument("--no-diagnostics", action="store_true")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "reference"), exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"safetensors {safetensors.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")

    base = make_base_weights()
    inp = Inputs()

    if not args.no_diagnostics:
        diag = diagnostics({k: v.float() for k, v in base.items()}, inp)
        with open(os.path.join(out, "reference", "diagnostics.txt"), "w") as f:
            f.write("\n".join(diag) + "\n")

    dequant = {}
    for name, builder in [
        ("tiny-bf16", build_bf16),
        ("tiny-mxfp4", build_mxfp4),
        ("tiny-unsloth-nf4", build_unsloth_nf4),
        ("tiny-fused-nf4", build_fused_nf4),
    ]:
        ref_w, qprefixes = builder(base, out)
        model = build_model(ref_w)
        r = reference(model, inp)
        save_file(r, os.path.join(out, "reference", f"{name}.safetensors"), metadata={"model_dir": name})
        if qprefixes:
            for p in qprefixes:
                dq = ref_w_dequant(name, p, ref_w, out)
                dequant[f"{name}/{p}"] = dq
        print(f"{name}: logits_2[0,:4] = {r['logits_2'][0, :4].tolist()}; {len(qprefixes)} bnb tensors")

    # bnb_dequant: a few full tensors, and an FNV-1a-64 digest of every one (fixture size budget)
    full_keep = {
        "tiny-unsloth-nf4/model.layers.0.mlp.experts.gate_up_projs.0.weight",
        "tiny-unsloth-nf4/model.layers.1.self_attn.k_proj.weight",
    }
    dq_out = {}
    for k, v in sorted(dequant.items()):
        b = v.contiguous().numpy().astype("<f4").tobytes()
        dq_out[k + ".fnv1a64"] = torch.tensor([fnv1a64(b)], dtype=torch.uint64)
        dq_out[k + ".shape"] = torch.tensor(list(v.shape), dtype=torch.int64)
        if k in full_keep:
            dq_out[k] = v.contiguous()
    save_file(dq_out, os.path.join(out, "reference", "bnb_dequant.safetensors"))
    save_file(codec_cases(), os.path.join(out, "reference", "bnb_codec.safetensors"))
    save_file(mxfp4_case(), os.path.join(out, "reference", "mxfp4_decode.safetensors"))
    save_file(torch_mean_cases(), os.path.join(out, "reference", "torch_mean.safetensors"))

    total = 0
    for root, _, files in os.walk(out):
        for f in sorted(files):
            p = os.path.join(root, f)
            total += os.path.getsize(p)
            print(f"  {os.path.relpath(p, out):70s} {os.path.getsize(p):>9d}")
    print(f"total {total} bytes")


def ref_w_dequant(name, prefix, ref_w, out):
    """bnb's f32 dequantization of one stored tensor, read back from the written files."""
    d = os.path.join(out, name)
    tensors = {}
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    for f in files:
        for k, v in load_file(os.path.join(d, f)).items():
            if k == prefix or k.startswith(prefix + "."):
                tensors[k] = v
    return bnb_dequant_stored(tensors, prefix)


if __name__ == "__main__":
    main()
