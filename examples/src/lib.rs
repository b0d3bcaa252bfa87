//! See `examples/` (implementation pending).
