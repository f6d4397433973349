//! Every kind of broken checkpoint gives an error naming the file and tensor, never a panic.

use std::path::{Path, PathBuf};

use gptoss_formats::synth::{Preset, SynthLayout, synth};
use gptoss_formats::writer::WriteOptions;
use gptoss_formats::{Checkpoint, ModelWeights};

/// A fresh micro checkpoint in `layout`, sharded so that an index exists.
fn fresh(layout: SynthLayout) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let opts = WriteOptions {
        max_shard_bytes: 60_000,
        ..WriteOptions::default()
    };
    synth(Preset::Micro, layout, 1, &dir, opts).unwrap();
    (tmp, dir)
}

/// The error of opening and mapping `dir`, as text.
fn load_error(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Err(e) => e.to_string(),
        Ok(c) => match ModelWeights::new(&c) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        },
    }
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap()
}

/// The shard file holding `tensor`.
fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    dir.join(index(dir)["weight_map"][tensor].as_str().unwrap())
}

/// Rewrites a shard's header JSON with `f`, keeping the data.
fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Replaces a tensor's data bytes in place (same length).
fn edit_data(path: &Path, tensor: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[tensor]["data_offsets"];
    let (s, e) = (
        8 + n + off[0].as_u64().unwrap() as usize,
        8 + n + off[1].as_u64().unwrap() as usize,
    );
    let mut data = bytes[s..e].to_vec();
    f(&mut data);
    assert_eq!(data.len(), e - s, "edit_data must keep the length");
    let mut out = bytes.clone();
    out[s..e].copy_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error should mention {p:?}: {err}");
    }
}

const GU: &str = "model.layers.1.mlp.experts.gate_up_projs.2.weight";

#[test]
fn truncated_shard() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let shard = shard_of(&dir, GU);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_error(&dir);
    assert_mentions(
        &err,
        &[shard.file_name().unwrap().to_str().unwrap(), "truncated"],
    );
}

#[test]
fn tensor_missing_from_its_shard() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let shard = shard_of(&dir, GU);
    edit_header(&shard, |h| {
        // drop the tensor's entry; shift nothing (data stays, just unreferenced bytes -> the
        // crate's validation sees a gap); so instead rename it, which keeps offsets valid.
        let v = h.remove(GU).unwrap();
        h.insert(format!("{GU}_renamed"), v);
    });
    let err = load_error(&dir);
    assert_mentions(&err, &[GU, "missing from that shard"]);
}

#[test]
fn index_names_a_missing_file() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let shard = shard_of(&dir, GU);
    std::fs::remove_file(&shard).unwrap();
    let err = load_error(&dir);
    assert_mentions(
        &err,
        &[
            "model.safetensors.index.json",
            shard.file_name().unwrap().to_str().unwrap(),
            "does not exist",
        ],
    );
}

#[test]
fn wrong_shape_for_the_config() {
    let (_t, dir) = fresh(SynthLayout::Bf16);
    // claim a hidden size the tensors do not have
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_attention_heads"] = serde_json::json!(8);
    cfg["num_key_value_heads"] = serde_json::json!(4);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_error(&dir);
    assert_mentions(&err, &["q_proj.weight", "expected [128, 64]", "[64, 64]"]);
}

#[test]
fn transposed_expert_is_reported_not_guessed() {
    let (_t, dir) = fresh(SynthLayout::Bf16);
    let name = "model.layers.0.mlp.experts.gate_up_proj";
    edit_header(&shard_of(&dir, name), |h| {
        h.get_mut(name).unwrap()["shape"] = serde_json::json!([4, 128, 64]);
    });
    let err = load_error(&dir);
    assert_mentions(&err, &[name, "expected [4, 64, 128]", "transposed"]);
}

#[test]
fn malformed_quant_state_json() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let key = format!("{GU}.quant_state.bitsandbytes__nf4");
    edit_data(&shard_of(&dir, &key), &key, |d| d[0] = b'[');
    let err = load_error(&dir);
    assert_mentions(&err, &[&key, "malformed quant-state JSON"]);
}

#[test]
fn missing_quant_state_json() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let key = format!("{GU}.quant_state.bitsandbytes__nf4");
    edit_header(&shard_of(&dir, &key), |h| {
        let v = h.remove(&key).unwrap();
        h.insert("unrelated.padding".into(), v);
    });
    // keep the index consistent with the edit
    let ipath = dir.join("model.safetensors.index.json");
    let mut idx = index(&dir);
    let file = idx["weight_map"][&key].clone();
    idx["weight_map"].as_object_mut().unwrap().remove(&key);
    idx["weight_map"]["unrelated.padding"] = file;
    std::fs::write(&ipath, idx.to_string()).unwrap();
    let err = load_error(&dir);
    assert_mentions(&err, &[GU, "no .quant_state.bitsandbytes__nf4"]);
}

#[test]
fn inconsistent_absmax_length() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let key = format!("{GU}.absmax");
    edit_header(&shard_of(&dir, &key), |h| {
        // claim one element less: the crate's offset check would fail first unless the data
        // range shrinks too, so shrink the range and shape together (a tensor of the wrong length)
        let t = h.get_mut(&key).unwrap();
        let n = t["shape"][0].as_u64().unwrap();
        t["shape"] = serde_json::json!([n - 8]);
        let s = t["data_offsets"][0].as_u64().unwrap();
        t["data_offsets"] = serde_json::json!([s, s + n - 8]);
        // give the 8 freed bytes to a new dummy tensor so the file stays contiguous
        h.insert(
            "zz.pad".into(),
            serde_json::json!({"dtype": "U8", "shape": [8], "data_offsets": [s + n - 8, s + n]}),
        );
    });
    let ipath = dir.join("model.safetensors.index.json");
    let mut idx = index(&dir);
    idx["weight_map"]["zz.pad"] = idx["weight_map"][&key].clone();
    std::fs::write(&ipath, idx.to_string()).unwrap();
    let err = load_error(&dir);
    assert_mentions(&err, &[GU, "absmax has", "expected"]);
}

#[test]
fn header_larger_than_the_file() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let shard = shard_of(&dir, GU);
    let mut bytes = std::fs::read(&shard).unwrap();
    let claimed = bytes.len() as u64 * 4;
    bytes[..8].copy_from_slice(&claimed.to_le_bytes());
    std::fs::write(&shard, bytes).unwrap();
    let err = load_error(&dir);
    assert_mentions(
        &err,
        &[
            shard.file_name().unwrap().to_str().unwrap(),
            "header claims",
        ],
    );
}

#[test]
fn unknown_dtype() {
    let (_t, dir) = fresh(SynthLayout::UnslothNf4);
    let shard = shard_of(&dir, GU);
    edit_header(&shard, |h| {
        h.get_mut(GU).unwrap()["dtype"] = serde_json::json!("Q7");
    });
    let err = load_error(&dir);
    assert_mentions(&err, &[shard.file_name().unwrap().to_str().unwrap(), "Q7"]);
}

#[test]
fn empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_error(tmp.path());
    assert_mentions(&err, &["no config.json"]);
    std::fs::write(
        tmp.path().join("config.json"),
        gptoss_formats::synth::synth_config_json(Preset::Micro, SynthLayout::Bf16).to_string(),
    )
    .unwrap();
    let err = load_error(tmp.path());
    assert_mentions(&err, &["no weights found", "model.safetensors"]);
}

#[test]
fn not_a_gpt_oss_config() {
    let (_t, dir) = fresh(SynthLayout::Bf16);
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 4096}"#,
    )
    .unwrap();
    let err = load_error(&dir);
    assert_mentions(&err, &["config.json", "not a GPT-OSS config", "llama"]);
}

#[test]
fn fused_u8_stack_without_quant_state_is_rejected() {
    let (_t, dir) = fresh(SynthLayout::Bf16);
    let name = "model.layers.0.mlp.experts.gate_up_proj";
    edit_header(&shard_of(&dir, name), |h| {
        let t = h.get_mut(name).unwrap();
        t["dtype"] = serde_json::json!("U8");
        t["shape"] = serde_json::json!([4 * 64 * 128 * 2]);
    });
    let err = load_error(&dir);
    assert_mentions(&err, &[name, "cannot be recovered"]);
}
