//! # gptoss-engine
//!
//! The backend-independent core: sampling and stop conditions.

pub mod backend;
pub mod cpu;
pub mod sampling;
pub mod stop;
