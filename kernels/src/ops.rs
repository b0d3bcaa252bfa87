//! Activation ops (implementation pending).
