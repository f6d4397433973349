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

/// Runs `gptoss bench` on the tiny fixture on the CPU: the JSON report, or the exit code and
/// stderr.
fn run_bench(extra: &[&str]) -> Result<serde_json::Value, (Option<i32>, String)> {
    let out = gptoss()
        .arg("bench")
        .arg(repo("fixtures/tiny-unsloth-nf4"))
        .args(["--device", "cpu"])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    if !out.status.success() {
        return Err((out.status.code(), err));
    }
    if !extra.contains(&"--json") {
        return Ok(serde_json::Value::String(
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ));
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn bench_on_the_cpu_measures_batches_and_batching_keeps_greedy_tokens() {
    let v = run_bench(&[
        "--batch",
        "1,3",
        "--prompt-len",
        "16,9",
        "--gen-len",
        "4",
        "--json",
        "--print-tokens",
    ])
    .unwrap_or_else(|(_, e)| panic!("{e}"));
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["backend"], "cpu-reference");
    assert_eq!(v["batch_sizes"], serde_json::json!([1, 3]));
    assert!(v["gpu"].is_null() && v["read_bandwidth_gb_s"].is_null());
    assert_eq!(v["runs"], serde_json::json!([]));
    let b = v["batches"].as_array().unwrap();
    // prompt-major, batch sizes in --batch order
    let order: Vec<(u64, u64)> = b
        .iter()
        .map(|e| {
            (
                e["prompt_len"].as_u64().unwrap(),
                e["batch"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(order, [(16, 1), (16, 3), (9, 1), (9, 3)]);
    for e in b {
        let n = e["batch"].as_u64().unwrap() as usize;
        assert_eq!(e["path"], "forward");
        assert_eq!(e["gen_len"], 4);
        for k in [
            "prefill_s",
            "prefill_tok_s",
            "decode_s",
            "decode_tok_s",
            "per_seq_tok_s",
            "ms_per_step",
            "speedup_vs_batch1",
        ] {
            let x = e[k].as_f64().unwrap_or_else(|| panic!("{k}: {e}"));
            assert!(x.is_finite() && x > 0.0, "{k} = {x}");
        }
        let (agg, per_seq) = (
            e["decode_tok_s"].as_f64().unwrap(),
            e["per_seq_tok_s"].as_f64().unwrap(),
        );
        assert!((agg - n as f64 * per_seq).abs() <= 1e-9 * agg, "{e}");
        if n == 1 {
            assert_eq!(e["speedup_vs_batch1"], 1.0);
        }
        // one row of greedy tokens per sequence: after the prompt, the warm-up step, 4 timed steps
        let tokens = e["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), n);
        assert!(tokens.iter().all(|t| t.as_array().unwrap().len() == 6));
    }
    for (alone, batched) in [(&b[0], &b[1]), (&b[2], &b[3])] {
        // sequence 0 has the same prompt alone and in the batch of 3: the same greedy tokens
        assert_eq!(
            alone["tokens"][0], batched["tokens"][0],
            "greedy tokens changed when batched"
        );
        // the three sequences have different prompts
        assert_ne!(batched["tokens"][0], batched["tokens"][1]);
    }

    // The table: a header and one row per (prompt, batch), GPU-only columns as "-".
    let text = run_bench(&["--batch", "2", "--prompt-len", "5", "--gen-len", "2"])
        .unwrap_or_else(|(_, e)| panic!("{e}"));
    let text = text.as_str().unwrap();
    assert!(
        text.contains("speed-up") && text.contains("ms/step"),
        "{text}"
    );
    let row = text.lines().find(|l| l.starts_with("2 ")).unwrap();
    assert!(row.contains(" - "), "{row}");
}

#[test]
fn bench_rejects_bad_flags_clearly() {
    for (args, want) in [
        (&["--batch", "0"][..], "--batch"),
        (&["--batch", "1,,3"][..], "--batch"),
        (&["--batch", ""][..], "--batch"),
        (&["--batch", "2,2"][..], "--batch"),
        (&["--gen-len", "0"][..], "--gen-len"),
        (&["--prompt-len", "8,0"][..], "--prompt-len"),
        (&["--prompt-len", "200000"][..], "context"),
        (&["--device", "tpu"][..], "--device"),
    ] {
        match run_bench(args) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err((code, err)) => {
                assert!(code.is_some_and(|c| c != 0), "{args:?}: {code:?}");
                assert!(err.contains(want), "{args:?}: {err}");
            }
        }
    }
}
