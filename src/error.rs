//! The library's error type. Messages name what was expected and what was found, so the CLI can
//! print them as one line.

use std::path::PathBuf;

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
    /// A weight the model does not hold, by its display name (`layers.5.mlp.down`).
    #[error("model has no weight {0}")]
    UnknownWeight(String),
    /// A hook site the forward pass was not asked to capture, by its display name.
    #[error("site {0} was not captured in this forward pass")]
    MissingCapture(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<candle_core::Error> for Error {
    /// Drops every backtrace candle attaches when `RUST_BACKTRACE` is set, however deep inside
    /// its context and path wrappers: a user sees one line, never a stack.
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(without_backtraces(e))
    }
}

fn without_backtraces(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } => without_backtraces(*inner),
        C::Context { inner, context } => {
            C::Msg(format!("{context}: {}", without_backtraces(*inner)))
        }
        C::WithPath { inner, path } => C::WithPath {
            inner: Box::new(without_backtraces(*inner)),
            path,
        },
        other => other,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_lose_their_backtraces_at_any_depth() {
        let bt = |inner: candle_core::Error| candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let nested = bt(candle_core::Error::Context {
            inner: Box::new(bt(candle_core::Error::Msg("unexpected end of file".into()))),
            context: Box::new("reading tensor"),
        });
        let message = Error::from(nested).to_string();
        assert_eq!(message, "reading tensor: unexpected end of file");
    }
}
