//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod serve;
pub mod synth;

use std::time::Duration;

use gptoss_formats::writer::WriteOptions;
use indicatif::{ProgressBar, ProgressStyle};

/// A byte-count progress bar on stderr (hidden when stderr is not a terminal).
pub fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Checkpoint writer options: shards of at most `max_shard_gb` GB, progress shown on `bar`.
pub fn write_options(bar: &ProgressBar, max_shard_gb: f64) -> WriteOptions {
    let bar = bar.clone();
    WriteOptions {
        max_shard_bytes: (max_shard_gb * 1e9) as u64,
        progress: Some(Box::new(move |n| bar.set_position(n))),
        ..WriteOptions::default()
    }
}
