//! What a run leaves behind: per-case JSON lines with their run record ([`jsonl`]) and the
//! summary over cases ([`summary`]).

pub mod jsonl;
pub mod summary;
