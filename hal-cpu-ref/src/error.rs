//! The backend's error type. Variants carry only `Copy` data so that reporting an error never
//! allocates (a failing `submit` stays allocation-free too).

use purehw_hal::{ErrorKind, Format};

use crate::{BufId, WeightId};

/// Everything [`CpuRef`](crate::CpuRef) can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CpuRefError {
    /// Host memory ran out while allocating `elems` f32 elements.
    #[error("out of memory allocating {elems} f32 elements")]
    OutOfMemory { elems: usize },
    /// A weight format this backend does not implement.
    #[error("unsupported weight format {0:?}")]
    UnsupportedFormat(Format),
    /// An op this backend does not implement.
    #[error("unsupported op")]
    UnsupportedOp,
    /// A buffer handle this backend never handed out.
    #[error("unknown buffer {0:?}")]
    UnknownBuffer(BufId),
    /// A weight handle this backend never handed out.
    #[error("unknown weight {0:?}")]
    UnknownWeight(WeightId),
    /// A view plus its length runs past the end of its buffer (or overflows).
    #[error("{what}: elements {start}..{end} of {buf:?} are out of range (buffer has {len} elements)")]
    OutOfRange { what: &'static str, buf: BufId, start: usize, end: usize, len: usize },
    /// Two regions of one op overlap in a way hal does not allow (only exact in-place is allowed).
    #[error("{what}: regions overlap in {buf:?} (only exact in-place aliasing is allowed, where the op allows it)")]
    Overlap { what: &'static str, buf: BufId },
    /// A token id past the embedding table.
    #[error("token id {token} at step row {row} is out of range for an embedding table of {rows} rows")]
    TokenOutOfRange { token: u32, row: usize, rows: usize },
    /// A weight whose byte length disagrees with its shape and format.
    #[error("weight {rows}x{cols} {format:?} does not match its {bytes} bytes")]
    BadWeight { format: Format, rows: usize, cols: usize, bytes: usize },
    /// Shapes or parameters an op cannot run with.
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: &'static str },
}

impl purehw_hal::Error for CpuRefError {
    fn kind(&self) -> ErrorKind {
        match self {
            CpuRefError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            CpuRefError::UnsupportedFormat(_) | CpuRefError::UnsupportedOp => ErrorKind::Unsupported,
            _ => ErrorKind::Other,
        }
    }
}

/// An [`CpuRefError::Invalid`].
pub fn invalid(op: &'static str, msg: &'static str) -> CpuRefError {
    CpuRefError::Invalid { op, msg }
}
