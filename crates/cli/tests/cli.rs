//! The `gptoss` binary end to end: exit codes, JSON output, and logits against transformers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn gptoss() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gptoss"))
}

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn read_f32(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Runs `gptoss logits` on a model directory; the logits (row-major [T, vocab]) or the stderr.
fn run_logits(model: &Path, tokens: &str, extra: &[&str], out: &Path) -> Result<Vec<f32>, String> {
    let res = gptoss()
        .arg("logits")
        .arg(model)
        .args(["--tokens", tokens, "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    if !res.status.success() {
        return Err(String::from_utf8_lossy(&res.stderr).into_owned());
    }
    let bytes = std::fs::read(out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    Ok(read_f32(&st, "logits"))
}

fn demo_env(cmd: &mut Command, cache: &Path) {
    cmd.env("GPTOSS_CACHE", cache).env("NO_COLOR", "1");
}

/// max |a - b| / max |b|.
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max_ref = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max_ref
}

#[test]
fn inspect_reports_layout_as_json_and_fails_on_broken_checkpoints() {
    let out = gptoss()
        .args(["inspect", "--json"])
        .arg(repo("fixtures/tiny-unsloth-nf4"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["layout"], "unsloth-split");
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);

    let tmp = tempfile::tempdir().unwrap();
    let out = gptoss().arg("inspect").arg(tmp.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no config.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = gptoss()
        .args(["inspect", "nobody/no-such-model"])
        .env("HF_HOME", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("hf download nobody/no-such-model"),
        "{err}"
    );
}

#[test]
fn logits_match_transformers_for_every_layout() {
    let tmp = tempfile::tempdir().unwrap();
    for layout in [
        "tiny-bf16",
        "tiny-mxfp4",
        "tiny-unsloth-nf4",
        "tiny-fused-nf4",
    ] {
        let refs =
            std::fs::read(repo(&format!("fixtures/reference/{layout}.safetensors"))).unwrap();
        let refs = safetensors::SafeTensors::deserialize(&refs).unwrap();
        let tokens: Vec<String> = refs
            .tensor("tokens_2")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()).to_string())
            .collect();
        let out_file = tmp.path().join(format!("{layout}.safetensors"));
        let got = run_logits(
            &repo(&format!("fixtures/{layout}")),
            &tokens.join(","),
            &[],
            &out_file,
        )
        .unwrap_or_else(|e| panic!("{layout}: {e}"));
        assert_eq!(got.len(), tokens.len() * 1024);
        let rel = max_rel(&got, &read_f32(&refs, "logits_2"));
        assert!(rel <= 1e-4, "{layout}: relative error {rel}");
    }
}

#[test]
fn generate_on_the_demo_model_is_deterministic_for_a_seed() {
    let cache = tempfile::tempdir().unwrap();
    let run = |seed: &str| {
        let mut cmd = gptoss();
        demo_env(&mut cmd, cache.path());
        let out = cmd
            .args([
                "generate",
                "--prompt",
                "What is 2+2?",
                "--max-tokens",
                "12",
                "--device",
                "cpu",
                "--json",
                "--seed",
                seed,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("bundled demo model"));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (a, b, c) = (run("5"), run("5"), run("6"));
    assert_eq!(a["tokens"], b["tokens"]);
    assert_ne!(a["tokens"], c["tokens"]);
    assert_eq!(
        a["generated_tokens"].as_u64().unwrap() as usize,
        a["tokens"].as_array().unwrap().len()
    );
    // the Harmony prompt: system + user, rendered (63 tokens with the default system message)
    assert!(a["prompt_tokens"].as_u64().unwrap() > 30);
}

#[test]
fn generate_rejects_bad_flags_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = gptoss();
    demo_env(&mut cmd, cache.path());
    let out = cmd
        .args([
            "generate",
            "--prompt",
            "x",
            "--temperature",
            "3",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("temperature"),
        "{err}"
    );
}

#[test]
fn chat_runs_turns_from_stdin_until_exit() {
    use std::io::Write;
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = gptoss();
    demo_env(&mut cmd, cache.path());
    let mut child = cmd
        .args([
            "chat",
            "--max-tokens",
            "8",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--reasoning-effort",
            "low",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello\n/effort high\nsecond turn\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("tokens,").count(),
        2,
        "two replies expected: {err}"
    );
}

#[test]
fn logits_with_two_shards_match_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo("fixtures/tiny-unsloth-nf4");
    let run = |tp: &str| {
        let out = tmp.path().join(format!("tp{tp}.safetensors"));
        run_logits(&model, "5,17,300,4,4,9,1000,2", &["--tp", tp], &out)
            .unwrap_or_else(|e| panic!("tp {tp}: {e}"))
    };
    let rel = max_rel(&run("2"), &run("1"));
    assert!(rel <= 1e-5, "tp 2 vs 1: relative error {rel}");
    // 3 shards cannot split 2 kv heads: a clear error, not a panic
    let err = run_logits(
        &model,
        "1,2",
        &["--tp", "3"],
        &tmp.path().join("tp3.safetensors"),
    )
    .unwrap_err();
    assert!(err.contains("num_key_value_heads"), "{err}");
}
