//! The bundled demo model: a tiny random-weight GPT-OSS (`Preset::Tiny`, seed 0, real
//! vocabulary, 2 layers) synthesised into the user's cache on first use. It exercises the whole
//! serving path but produces nonsense.

use std::path::{Path, PathBuf};

use anyhow::Context;
use gptoss_formats::synth::{Preset, SynthLayout, synth};
use gptoss_formats::writer::WriteOptions;

/// Served name of the demo model.
pub const DEMO_MODEL_NAME: &str = "gptoss-demo-tiny";

/// Cache folder name (bump the version when the demo model changes).
pub const DEMO_DIR_NAME: &str = "demo-tiny-v1";

/// What the server says about the demo model.
pub const DEMO_NOTICE: &str = "no MODEL given: serving the bundled demo model, a TINY RANDOM-WEIGHT \
GPT-OSS (2 layers, hidden size 64). It exercises the whole server but its replies are NONSENSE. \
Pass a checkpoint directory or Hugging Face id to serve a real model.";

/// `$XDG_CACHE_HOME/gptoss` or `~/.cache/gptoss`.
pub fn cache_root() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("gptoss"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .context("neither XDG_CACHE_HOME nor HOME is set: cannot place the demo model")?;
    Ok(PathBuf::from(home).join(".cache").join("gptoss"))
}

/// The demo model's folder under `root`, synthesised if missing. Writing goes to a temporary
/// sibling renamed into place, so a crash or a concurrent server never leaves half a model.
/// Returns the folder and whether it was created now.
pub fn ensure_demo_model_in(root: &Path) -> anyhow::Result<(PathBuf, bool)> {
    let dir = root.join(DEMO_DIR_NAME);
    if dir.join("config.json").is_file() {
        return Ok((dir, false));
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let tmp = root.join(format!(
        ".{DEMO_DIR_NAME}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    synth(
        Preset::Tiny,
        SynthLayout::UnslothNf4,
        0,
        &tmp,
        WriteOptions::default(),
    )
    .with_context(|| format!("cannot write the demo model to {}", tmp.display()))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok((dir, true)),
        Err(_) if dir.join("config.json").is_file() => {
            // Another process won the race.
            let _ = std::fs::remove_dir_all(&tmp);
            Ok((dir, false))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e).with_context(|| format!("cannot move the demo model into {}", dir.display()))
        }
    }
}

/// [`ensure_demo_model_in`] the user's cache.
pub fn ensure_demo_model() -> anyhow::Result<(PathBuf, bool)> {
    ensure_demo_model_in(&cache_root()?)
}
