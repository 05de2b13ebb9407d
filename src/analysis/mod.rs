//! Analyses of where a model keeps a fact.

pub mod svg;
pub mod trace;
