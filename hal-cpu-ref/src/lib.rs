//! The reference backend (implementation pending).
