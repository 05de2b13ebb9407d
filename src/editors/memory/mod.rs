//! Memory editors: what they learn sits beside the model as an overlay (GRACE's codebook), so
//! the base weights stay bit-identical and an edit is taken back by removing its entries.

pub mod codebook;
mod grace;

pub use codebook::Codebook;
pub use grace::{Grace, GraceParams, GraceReport};
