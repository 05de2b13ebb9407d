//! The library's error type. Messages name what was expected and what was found, so the CLI can
//! print them as one line.

use std::path::PathBuf;

use crate::model::{Site, WeightId};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Candle(candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model or tokenizer file that exists but cannot be used.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{what} is not supported: {why}")]
    Unsupported { what: String, why: String },
    #[error("model has no weight {0}")]
    UnknownWeight(WeightId),
    #[error("site {0} was not captured in this forward pass")]
    MissingCapture(Site),
    #[error("{0}")]
    Invalid(String),
}

impl From<candle_core::Error> for Error {
    /// Drops the backtrace candle attaches when `RUST_BACKTRACE` is set: errors are one line.
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => Error::from(*inner),
            other => Error::Candle(other),
        }
    }
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
