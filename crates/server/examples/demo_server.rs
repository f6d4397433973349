//! Serves a checkpoint (or the bundled tiny demo model) on the CPU backend, for trying the API
//! without the `gptoss` CLI: `cargo run -p gptoss-server --example demo_server -- [--port N]
//! [--api-key KEY] [MODEL_DIR]`. `gptoss serve` is the real front end.

use std::path::PathBuf;
use std::time::Duration;

use gptoss_engine::cpu::CpuBackend;
use gptoss_server::EngineOptions;
use gptoss_server::demo::{DEMO_MODEL_NAME, DEMO_NOTICE, ensure_demo_model};
use gptoss_server::launch::{ServeOptions, serve_blocking};

fn main() -> anyhow::Result<()> {
    let mut port = 8000u16;
    let mut api_key = None;
    let mut model: Option<PathBuf> = None;
    let mut max_model_len = Some(4096);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().expect("--port N").parse()?,
            "--api-key" => api_key = args.next(),
            "--max-model-len" => {
                max_model_len = Some(args.next().expect("--max-model-len N").parse()?)
            }
            other => model = Some(PathBuf::from(other)),
        }
    }
    let (dir, name) = match model {
        Some(d) => {
            let name = d.display().to_string();
            (d, name)
        }
        None => {
            eprintln!("note: {DEMO_NOTICE}");
            (ensure_demo_model()?, DEMO_MODEL_NAME.to_string())
        }
    };
    let backend = CpuBackend::open(&dir)?;
    serve_blocking(
        Box::new(backend),
        &dir,
        ServeOptions {
            host: "127.0.0.1".into(),
            port,
            model_names: vec![name],
            api_key,
            max_body_bytes: 16 << 20,
            shutdown_timeout: Duration::from_secs(10),
            engine: EngineOptions {
                max_model_len,
                kv_budget_bytes: 1 << 30,
                ..EngineOptions::default()
            },
        },
    )
}
