//! The "nano" GPT-OSS config shared by the `checkpoint_dir` target and `examples/gen_seeds.rs`:
//! the Micro preset's Unsloth NF4 config shrunk to 1 layer, 1 expert, hidden 8, vocab 4, so a
//! complete, valid checkpoint (every tensor of the Unsloth split layout) is a ~7 KB seed.

#![allow(dead_code)]

use gptoss_formats::synth::{Preset, SynthLayout, synth_config_json};

pub const LAYERS: usize = 1;
pub const EXPERTS: usize = 1;
pub const HIDDEN: usize = 8;
pub const INTER: usize = 8;
pub const HEADS: usize = 1;
pub const KV_HEADS: usize = 1;
pub const HEAD_DIM: usize = 2;
pub const VOCAB: usize = 4;

/// `config.json` of the nano model (pretty-printed, as `synth` writes configs).
pub fn config_json() -> String {
    let mut cfg = synth_config_json(Preset::Micro, SynthLayout::UnslothNf4);
    cfg["num_hidden_layers"] = LAYERS.into();
    cfg["layer_types"] = serde_json::json!(["sliding_attention"]);
    cfg["num_local_experts"] = EXPERTS.into();
    cfg["num_experts_per_tok"] = 1.into();
    cfg["experts_per_token"] = 1.into();
    cfg["hidden_size"] = HIDDEN.into();
    cfg["intermediate_size"] = INTER.into();
    cfg["num_attention_heads"] = HEADS.into();
    cfg["num_key_value_heads"] = KV_HEADS.into();
    cfg["head_dim"] = HEAD_DIM.into();
    cfg["vocab_size"] = VOCAB.into();
    serde_json::to_string_pretty(&cfg).expect("config JSON")
}
