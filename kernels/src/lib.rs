//! Scalar math for every op the engine runs, written once.
//!
//! Each function is the *definition* of its op: `hal-cpu-ref` calls these plainly, and SIMD or
//! shader versions are twins tested against them. Kernels take their output first.
//! No allocation happens here; callers hand in every buffer.
#![no_std]

#[cfg(any(test, feature = "alloc"))]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod ops;
pub mod quant;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use quant::Format;
