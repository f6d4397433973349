//! Resolving `MODEL` arguments: a directory, or a Hugging Face model id looked up in the local
//! Hugging Face cache (the layout `huggingface-cli download` writes). Nothing is downloaded.

use std::path::{Path, PathBuf};

use crate::error::{FormatError, Result};

/// The hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("huggingface").join("hub"));
    }
    std::env::var_os("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("huggingface")
            .join("hub")
    })
}

/// Resolves `model` to a directory: an existing path is used as is; `org/name` is looked up in
/// `cache` as `models--org--name/snapshots/<revision>` (the revision `refs/main` names, else the
/// only or newest snapshot).
pub fn resolve_model_in(model: &str, cache: Option<&Path>) -> Result<PathBuf> {
    let as_path = Path::new(model);
    if as_path.exists() {
        return Ok(as_path.to_path_buf());
    }
    let looks_like_id = model.split('/').count() == 2
        && !model.starts_with('.')
        && !model.starts_with('/')
        && model.split('/').all(|p| !p.is_empty());
    if !looks_like_id {
        return Err(FormatError::NotFound(format!(
            "{model}: no such directory (give a model directory or a Hugging Face id like unsloth/gpt-oss-20b-unsloth-bnb-4bit)"
        )));
    }
    let download_hint = format!(
        "download it first with `hf download {model}` (or `huggingface-cli download {model}`), or pass the model directory"
    );
    let Some(cache) = cache else {
        return Err(FormatError::NotFound(format!(
            "{model}: not a directory, and no Hugging Face cache location is known (set HF_HOME); {download_hint}"
        )));
    };
    let repo = cache.join(format!("models--{}", model.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        return Err(FormatError::NotFound(format!(
            "{model}: not found in the Hugging Face cache {}; {download_hint}",
            cache.display()
        )));
    }
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map_err(|e| FormatError::io(&snapshots, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p).ok_or_else(|| {
        FormatError::NotFound(format!(
            "{model}: the cache entry {} has no snapshot; {download_hint}",
            repo.display()
        ))
    })
}

/// [`resolve_model_in`] with the cache from the environment.
pub fn resolve_model(model: &str) -> Result<PathBuf> {
    resolve_model_in(model, hub_cache_dir().as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_ids_through_refs_main() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp
            .path()
            .join("models--unsloth--gpt-oss-20b-unsloth-bnb-4bit");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old999")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let dir =
            resolve_model_in("unsloth/gpt-oss-20b-unsloth-bnb-4bit", Some(tmp.path())).unwrap();
        assert!(dir.ends_with("snapshots/abc123"));
    }

    #[test]
    fn missing_id_says_how_to_download() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_model_in("openai/gpt-oss-20b", Some(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hf download openai/gpt-oss-20b"), "{err}");
        let err = resolve_model_in("./nope", Some(tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such directory"), "{err}");
    }
}
