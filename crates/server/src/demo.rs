//! The bundled demo model: a tiny random-weight GPT-OSS (`Preset::Tiny`, seed 0, real
//! vocabulary, 2 layers) synthesised into the user's cache on first use
//! ([`gptoss_formats::synth::demo_model_dir`]: `$GPTOSS_CACHE`, `$XDG_CACHE_HOME/gptoss` or
//! `~/.cache/gptoss`, folder `demo-tiny-v1`, written to a temporary folder and renamed). It
//! exercises the whole serving path but produces nonsense.

use std::path::PathBuf;

use anyhow::Context;

/// Served name of the demo model.
pub const DEMO_MODEL_NAME: &str = "gptoss-demo-tiny";

/// What the server says about the demo model.
pub const DEMO_NOTICE: &str = "no MODEL given: serving the bundled demo model, a TINY RANDOM-WEIGHT \
GPT-OSS (2 layers, hidden size 64, real tokenizer). It exercises the whole server but its replies \
are NONSENSE. Pass a checkpoint directory or Hugging Face id to serve a real model.";

/// The demo model's folder, synthesised on first use.
pub fn ensure_demo_model() -> anyhow::Result<PathBuf> {
    gptoss_formats::synth::demo_model_dir().context("preparing the bundled demo model")
}
