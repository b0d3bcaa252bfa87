//! The hardware abstraction: one small trait a backend implements.
//!
//! Shaped like wgpu-hal / embedded-hal: associated types for the backend's objects, an
//! [`ErrorType`] whose errors report a coarse [`ErrorKind`], [`Backend::supports`] so `core` can
//! route an op elsewhere, and ops as data ([`Op`]) submitted a whole step at a time
//! ([`Backend::submit`]) so a backend may fuse and need not sync between ops.
//!
//! Buffers and weights are small `Copy` handles; an op names regions of buffers by
//! [`View`] (handle + element offset). Per-token host data of a step (token ids, positions,
//! sequence spans) travels once in [`Step`], so the op list itself has no lifetime and can be
//! rebuilt into the same `Vec` every step without allocating.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod check;
mod op;
#[cfg(feature = "alloc")]
mod weight;

pub use op::*;
pub use purehw_kernels::Format;
/// The parameters of [`Format::Int`].
pub use purehw_kernels::quant::{Codes, PackedInt, ScaleType};
#[cfg(feature = "alloc")]
pub use weight::*;

/// What went wrong, coarsely, so generic code can react (retry, fall back, give up).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Device or host memory ran out.
    OutOfMemory,
    /// The device was lost or reset; its state is gone.
    DeviceLost,
    /// The backend cannot run this op or format.
    Unsupported,
    /// The device did not answer in time.
    Timeout,
    /// Anything else.
    Other,
}

/// A backend error: rich for humans (`Display`), coarse for code (`kind`).
pub trait Error: core::fmt::Debug + core::fmt::Display {
    fn kind(&self) -> ErrorKind;
}

/// The backend's error type.
pub trait ErrorType {
    type Error: Error + Send + Sync + 'static;
}

/// A compute backend. `core` drives every model through this trait only.
#[cfg(feature = "alloc")]
pub trait Backend: ErrorType {
    /// A device buffer of `f32` elements.
    type Buffer: Copy + core::fmt::Debug;
    /// A weight tensor as the backend keeps it (a view of host memory, or a device copy).
    type Weight: Copy + core::fmt::Debug;

    /// Short name, e.g. `"cpu-ref"`.
    fn name(&self) -> &str;

    /// Whether [`submit`](Backend::submit) can run this kind of op.
    fn supports(&self, op: OpKind) -> bool;

    /// A zeroed buffer of `len` f32 elements.
    fn alloc(&mut self, len: usize) -> Result<Self::Buffer, Self::Error>;

    /// Make a weight tensor available to ops. The host bytes stay alive while the backend holds them.
    fn load_weight(&mut self, w: &HostWeight) -> Result<Self::Weight, Self::Error>;

    /// Copy host data into `dst[0..src.len()]`.
    fn write(&mut self, dst: View<Self::Buffer>, src: &[f32]) -> Result<(), Self::Error>;

    /// Copy `src[0..dst.len()]` to the host. Waits for submitted work that writes it.
    fn read(&mut self, src: View<Self::Buffer>, dst: &mut [f32]) -> Result<(), Self::Error>;

    /// Run a whole step's ops in order. Must not allocate in steady state.
    fn submit(&mut self, step: &Step<'_>, ops: &[Op<Self::Buffer, Self::Weight>]) -> Result<(), Self::Error>;

    /// Run a step, then copy each `reads[i].0` region into `reads[i].1` (its length): one round
    /// trip where the backend can make it one (a GPU: one command buffer, one wait).
    fn submit_read(
        &mut self,
        step: &Step<'_>,
        ops: &[Op<Self::Buffer, Self::Weight>],
        reads: &mut [(View<Self::Buffer>, &mut [f32])],
    ) -> Result<(), Self::Error> {
        self.submit(step, ops)?;
        for (v, dst) in reads.iter_mut() {
            self.read(*v, dst)?;
        }
        Ok(())
    }

    /// Submit a step to run after everything submitted so far and return without waiting, so
    /// the host prepares the next step while this one runs (greedy decoding, whose next token
    /// the device feeds itself through [`Op::EmbedIds`]). `reads` (a view and a length each) are
    /// copied out when the step finishes and handed over by [`wait_ahead`](Backend::wait_ahead),
    /// oldest first. At most two steps are ahead at once; every other call waits for them first.
    /// `Ok(false)`: the backend does not run ahead (nothing was submitted; use
    /// [`submit_read`](Backend::submit_read)), the default.
    fn submit_ahead(
        &mut self,
        _step: &Step<'_>,
        _ops: &[Op<Self::Buffer, Self::Weight>],
        _reads: &[(View<Self::Buffer>, usize)],
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }

    /// Wait for the oldest step of [`submit_ahead`](Backend::submit_ahead) and copy its reads
    /// into `dst` (in order, each as long as asked). Only called after a `submit_ahead` that
    /// returned `true`.
    fn wait_ahead(&mut self, _dst: &mut [&mut [f32]]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Whether `submit` reads weights from their host bytes in place (the CPU backends; a device
    /// that shares memory with the host and imports the mapped file), so that releasing and
    /// prefetching those bytes bounds what the backend holds. A backend that copies weights into
    /// memory of its own (a discrete GPU) answers `false`: a weight budget would not bound it.
    fn weights_in_place(&self) -> bool {
        true
    }

    /// For a backend that copies weights ([`weights_in_place`](Backend::weights_in_place)
    /// `false`): hold streamed layers in `slots` buffers of its own, each room for `slot_bytes`
    /// of one layer's weight parts (codes, scales, zero points) plus whatever alignment the
    /// backend adds. `Ok(false)`: the backend cannot (the default).
    fn stream_slots(&mut self, _slots: usize, _slot_bytes: usize) -> Result<bool, Self::Error> {
        Ok(false)
    }

    /// Make a streamed layer's weight available to ops from slot `slot` (of
    /// [`stream_slots`](Backend::stream_slots)) without copying it yet: the copy is
    /// [`fill_slot`](Backend::fill_slot)'s, before each submission of `layer`.
    fn load_streamed(&mut self, w: &HostWeight, _layer: usize, _slot: usize) -> Result<Self::Weight, Self::Error> {
        self.load_weight(w)
    }

    /// Copy `layer`'s streamed weights into their slot, after every submitted op has finished
    /// with that slot's previous layer. Nothing to do for a layer that is not streamed.
    fn fill_slot(&mut self, _layer: usize) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Wait until every submitted op is done (before the host releases bytes those ops read).
    fn finish(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// What the backend can tell about its device (memory, time of the last step), for metrics.
    fn stats(&self) -> Stats {
        Stats::default()
    }
}

/// A backend's view of its device, for metrics. `None` where the backend does not know.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Device name (e.g. the GPU's).
    pub device: Option<alloc::string::String>,
    /// Bytes of device memory the backend holds (weights, caches, activations).
    pub memory_used: Option<u64>,
    /// Bytes of device memory there are.
    pub memory_budget: Option<u64>,
    /// Device time of the last step, in seconds (timestamp queries).
    pub last_step_seconds: Option<f64>,
    /// Device seconds of all steps timed so far, and how many (a run of steps ahead, whose
    /// times come back after the last is submitted, is timed by the difference).
    pub steps_seconds: Option<(f64, u64)>,
    /// Bytes copied into streaming slots so far ([`Backend::fill_slot`]), and the seconds
    /// those copies took (host→device through staging).
    pub streamed: Option<(u64, f64)>,
}
