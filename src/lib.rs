//! kedit: knowledge editing for GPT-2 and LLaMA language models on candle.

pub mod analysis;
pub mod cli;
pub mod data;
pub mod editors;
pub mod error;
pub mod eval;
pub mod model;

pub use error::{Error, Result};
