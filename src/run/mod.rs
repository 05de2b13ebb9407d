//! The loops that drive editors and metrics: the single, batch and sequential evaluation
//! protocols, KnowEdit's Sanitation protocol, and the training loop of the trained editors. They
//! sit above both: editors never score themselves and metrics never import editors.

pub mod protocols;
pub mod sanitation;
pub mod sequential_checkpoint;
pub mod shard;
pub mod train;

pub use protocols::{run_cases, EvalPoint, Observer, Protocol, RunEnd, RunOptions};
pub use sequential_checkpoint::Checkpointing;
