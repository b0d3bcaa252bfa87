//! Weights as they sit in host memory (usually a view into a memory-mapped file).

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Range;

use purehw_kernels::quant::{IntRow, dequantize_int_row, dequantize_row, dot_int_row, dot_row};

use crate::Format;

/// What holds weight bytes (a file's memory map, a `Vec`), and, where it can, says which of them
/// stay in memory. Both calls are hints about residency only: the bytes stay readable and equal
/// whatever is asked (a released page of a file's map is read again on the next touch). Owners
/// that are not maps keep the defaults, which do nothing.
pub trait ByteOwner: AsRef<[u8]> + Send + Sync {
    /// Bring `range` (of [`as_ref`](AsRef::as_ref)) into memory ahead of its use. May block
    /// while it reads: a caller that must not wait calls it from another thread.
    fn prefetch(&self, _range: Range<usize>) {}

    /// `range` is not needed for now: the memory behind it may be given back.
    fn release(&self, _range: Range<usize>) {}
}

impl ByteOwner for Vec<u8> {}

/// An owner known only by its bytes (no say over residency).
pub struct PlainBytes(pub Arc<dyn AsRef<[u8]> + Send + Sync>);

impl AsRef<[u8]> for PlainBytes {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl ByteOwner for PlainBytes {}

/// Bytes owned elsewhere (an mmap, a `Vec`), kept alive by reference counting.
#[derive(Clone)]
pub struct HostBytes {
    owner: Arc<dyn ByteOwner>,
    range: Range<usize>,
    mapped: bool,
}

impl HostBytes {
    /// `range` of `owner`, or `None` when it does not lie inside.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        Self::from_owner(Arc::new(PlainBytes(owner)), range, false)
    }

    /// As [`new`](Self::new) for an owner that is a memory map of a whole file: its start is
    /// page-aligned and the pages around any range of it are mapped, so a device that shares
    /// memory with the host may import them in place instead of copying.
    pub fn new_mapped(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        Self::from_owner(Arc::new(PlainBytes(owner)), range, true)
    }

    /// `range` of an owner that may manage its residency ([`prefetch`](Self::prefetch),
    /// [`release`](Self::release)); `mapped` as for [`new_mapped`](Self::new_mapped). `None` when
    /// the range does not lie inside.
    pub fn from_owner(owner: Arc<dyn ByteOwner>, range: Range<usize>, mapped: bool) -> Option<Self> {
        let len = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(HostBytes { owner, range, mapped })
    }

    /// Owned bytes (small tensors converted at load time, tests).
    pub fn from_vec(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        HostBytes { owner: Arc::new(v), range, mapped: false }
    }

    /// Whether the owner is a file's memory map (see [`new_mapped`](Self::new_mapped)).
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// All of the owner's bytes (the whole file for a mapped owner) and where this range lies in
    /// them.
    pub fn owner(&self) -> (&[u8], Range<usize>) {
        ((*self.owner).as_ref(), self.range.clone())
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Ask the owner to bring these bytes into memory (see [`ByteOwner::prefetch`]).
    pub fn prefetch(&self) {
        self.owner.prefetch(self.range.clone());
    }

    /// Tell the owner these bytes are not needed for now (see [`ByteOwner::release`]).
    pub fn release(&self) {
        self.owner.release(self.range.clone());
    }

    /// One range covering `self` and `other` when both are of the same owner and at most `gap`
    /// bytes apart (e.g. a file's alignment padding), so residency calls can cover both at once.
    pub fn merged(&self, other: &HostBytes, gap: usize) -> Option<HostBytes> {
        if !Arc::ptr_eq(&self.owner, &other.owner) {
            return None;
        }
        let (a, b) = if self.range.start <= other.range.start { (self, other) } else { (other, self) };
        (b.range.start <= a.range.end.saturating_add(gap)).then(|| HostBytes {
            owner: self.owner.clone(),
            range: a.range.start..a.range.end.max(b.range.end),
            mapped: self.mapped,
        })
    }
}

impl core::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HostBytes({:?})", self.range)
    }
}

/// The parts of a weight stored apart from its codes ([`Format::Int`]): one scale per (row,
/// group) and, when asymmetric, the zero points (layouts: `purehw_kernels::quant::PackedInt`).
#[derive(Clone, Debug, Default)]
pub struct WeightParts {
    pub scales: Option<HostBytes>,
    pub zeros: Option<HostBytes>,
}

/// Why a weight's bytes do not fit its format and shape.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WeightError {
    /// The format's parameters are not a layout kernels defines.
    #[error("format {0:?} is not a valid layout")]
    InvalidFormat(Format),
    /// The columns are not a whole number of the format's blocks (or groups).
    #[error("{cols} columns are not a whole number of {format:?} blocks of {block}")]
    Columns { format: Format, cols: usize, block: usize },
    /// A part has the wrong number of bytes.
    #[error("{part}: {found} bytes, expected {expected}")]
    Size { part: &'static str, expected: usize, found: usize },
    /// A part the format needs is missing.
    #[error("{0} missing")]
    Missing(&'static str),
    /// A part the format does not have is given.
    #[error("unexpected {0} for this format")]
    Unexpected(&'static str),
    /// The sizes overflow.
    #[error("size overflows")]
    Overflow,
}

/// A part's bytes, empty when absent.
fn part(b: &Option<HostBytes>) -> &[u8] {
    b.as_ref().map_or(&[], HostBytes::as_slice)
}

/// A weight matrix `[rows, cols]` in `format`, row-major; a vector is `rows == 1`.
#[derive(Clone, Debug)]
pub struct HostWeight {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    /// Exactly `rows * format.bytes_for(cols)` bytes (the codes, for [`Format::Int`]).
    pub data: HostBytes,
    /// Scales and zero points of [`Format::Int`]; empty for every other format.
    pub parts: WeightParts,
}

impl HostWeight {
    /// Checks the byte length against the shape; `None` if they disagree.
    pub fn new(format: Format, rows: usize, cols: usize, data: HostBytes) -> Option<Self> {
        let w = HostWeight { format, rows, cols, data, parts: WeightParts::default() };
        w.is_consistent().then_some(w)
    }

    /// A weight with parts (a [`Format::Int`] weight's scales and zero points), every part's
    /// size checked against the shape.
    pub fn with_parts(
        format: Format,
        rows: usize,
        cols: usize,
        data: HostBytes,
        parts: WeightParts,
    ) -> Result<Self, WeightError> {
        let w = HostWeight { format, rows, cols, data, parts };
        w.check().map(|()| w)
    }

    /// The weight's byte parts in order: codes (or the whole data), scales, zero points; `None`
    /// where absent.
    pub fn byte_parts(&self) -> [Option<&HostBytes>; 3] {
        [Some(&self.data), self.parts.scales.as_ref(), self.parts.zeros.as_ref()]
    }

    /// Bytes of every part together.
    pub fn total_bytes(&self) -> usize {
        self.byte_parts().into_iter().flatten().map(HostBytes::len).sum()
    }

    /// Whether every part is exactly the size the format and shape imply (what
    /// [`new`](Self::new) checks; the fields are public, so a weight built directly may not be).
    pub fn is_consistent(&self) -> bool {
        self.check().is_ok()
    }

    /// [`is_consistent`](Self::is_consistent), saying which part is wrong.
    pub fn check(&self) -> Result<(), WeightError> {
        let size = |part, expected: Option<usize>, found: usize| match expected {
            None => Err(WeightError::Overflow),
            Some(e) if e != found => Err(WeightError::Size { part, expected: e, found }),
            Some(_) => Ok(()),
        };
        let f = self.format;
        if let Format::Int(p) = f
            && !p.is_valid()
        {
            return Err(WeightError::InvalidFormat(f));
        }
        let Some(row) = f.bytes_for(self.cols) else {
            return Err(WeightError::Columns { format: f, cols: self.cols, block: f.block_elems() });
        };
        size("codes", row.checked_mul(self.rows), self.data.len())?;
        let WeightParts { scales, zeros } = &self.parts;
        match f {
            Format::Int(p) => {
                let scales = scales.as_ref().ok_or(WeightError::Missing("scales"))?;
                size("scales", p.scale_bytes(self.rows, self.cols), scales.len())?;
                match (p.symmetric, zeros) {
                    (true, None) => Ok(()),
                    (true, Some(_)) => Err(WeightError::Unexpected("zero points")),
                    (false, None) => Err(WeightError::Missing("zero points")),
                    (false, Some(z)) => size("zero points", p.zero_bytes(self.rows, self.cols), z.len()),
                }
            }
            _ if scales.is_some() => Err(WeightError::Unexpected("scales")),
            _ if zeros.is_some() => Err(WeightError::Unexpected("zero points")),
            _ => Ok(()),
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.format.bytes_for(self.cols).unwrap_or(0)
    }

    /// The stored bytes of row `r`, for `r < rows` of a weight that
    /// [`is_consistent`](Self::is_consistent); panics when the row lies past `data`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data.as_slice()[r * n..(r + 1) * n]
    }

    /// Row `r` of a [`Format::Int`] weight with its scales and zero points, for `r < rows` of a
    /// consistent weight (panics past the end, as [`row`](Self::row)).
    pub fn int_row(&self, r: usize) -> IntRow<'_> {
        let sb = match self.format {
            Format::Int(p) => p.scale_bytes(1, self.cols).unwrap_or(0),
            _ => 0,
        };
        IntRow {
            codes: self.row(r),
            scales: &part(&self.parts.scales)[r * sb..(r + 1) * sb],
            zeros: part(&self.parts.zeros),
            row: r,
        }
    }

    /// Row `r` dequantized into `out` (`cols` long), whatever the format: the kernels'
    /// definition. Same preconditions as [`row`](Self::row).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self.format {
            Format::Int(p) => dequantize_int_row(p, self.int_row(r), out),
            f => dequantize_row(f, self.row(r), out),
        }
    }

    /// `Σ w[r, i]·x[i]`, bit-identical to `dot_f32` of [`dequantize_row`](Self::dequantize_row).
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        match self.format {
            Format::Int(p) => dot_int_row(p, self.int_row(r), x),
            f => dot_row(f, self.row(r), x),
        }
    }
}
