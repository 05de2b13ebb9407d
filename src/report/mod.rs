//! What a run leaves behind: per-case JSON lines with their run record ([`jsonl`]), the
//! summary over cases ([`summary`]), shards merged back into one run ([`merge`]) and a
//! self-contained HTML page of it all ([`html`]).

pub mod html;
pub mod jsonl;
pub mod merge;
pub mod summary;
