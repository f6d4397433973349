//! # gptoss-engine
//!
//! The backend-independent core: sampling and stop conditions.

pub mod backend;
pub mod cpu;
pub mod engine;
pub mod kv_blocks;
pub mod parallel;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod stop;
