//! # gptoss-model
//!
//! What GPT-OSS *is*, independent of any accelerator:
//! - [`tokenizer`]: o200k_harmony from `tokenizer.json` or the embedded vocabulary;
//! - [`harmony`]: rendering conversations and parsing completions in the Harmony format.

pub mod harmony;
pub mod reference;
pub mod tokenizer;
