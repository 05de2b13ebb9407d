//! kedit: knowledge editing for GPT-2 and LLaMA language models on candle.

// Library code returns errors; a panic is a bug (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod analysis;
pub mod cli;
pub mod data;
pub mod editors;
pub mod error;
pub mod eval;
pub mod files;
pub mod model;
pub mod report;
pub mod run;

pub use error::{Error, Result};
