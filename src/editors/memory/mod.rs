//! Memory editors: what they learn sits beside the model as an overlay (GRACE's codebook,
//! CaliNet's calibration neurons), so the base weights stay bit-identical and an edit is taken
//! back by removing what it added.

mod calinet;
pub mod codebook;
mod grace;

pub use calinet::{CaliNet, CaliNetParams, CaliNetReport, CalibrationFfn};
pub use codebook::Codebook;
pub use grace::{Grace, GraceParams, GraceReport};
