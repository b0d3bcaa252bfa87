//! The engine's error type. Every message names the file (or the argument) and the problem.

use alloc::string::String;
use purehw_hal::ErrorKind;

/// Result with [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// What went wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file is malformed or does not describe a model we can run.
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
    /// A file could not be read.
    #[cfg(feature = "std")]
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The backend failed.
    #[error("backend {backend}: {msg} ({kind:?})")]
    Backend { backend: String, kind: ErrorKind, msg: String },
    /// A weight budget cannot hold what every step needs (`needs`, each part named).
    #[error(
        "memory budget of {budget} bytes is too small: this model needs at least {} bytes \
         (shared weights {} + KV cache {} + activations {} + two decoder layers of {} each)",
        needs.least(), needs.shared, needs.kv_cache, needs.buffers, needs.layer
    )]
    Budget { budget: usize, needs: crate::stream::Needs },
    /// A caller's argument is out of range (prompt longer than the context, unknown token id, …).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A format error for `file`.
    pub fn format(file: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format { file: file.into(), msg: msg.into() }
    }

    /// Wrap a backend error.
    pub fn backend<E: purehw_hal::Error>(backend: &str, e: E) -> Self {
        use alloc::string::ToString;
        Error::Backend { backend: backend.into(), kind: e.kind(), msg: e.to_string() }
    }
}
