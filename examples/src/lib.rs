//! Minimal programs that embed purehw; see `examples/`:
//!
//! * `generate` — load a model and stream tokens through the public API.
//! * `custom_backend` — plug in your own [`purehw_hal::Backend`] (here: one that wraps
//!   `hal-cpu-ref` and counts the ops it runs).
