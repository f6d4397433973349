//! # gptoss-engine
//!
//! The backend-independent core: sampling and stop conditions.

pub mod sampling;
pub mod stop;
