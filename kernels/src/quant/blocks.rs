//! Block layouts and their scalar math (implementation pending).
#![allow(missing_docs)]
use super::Format;

#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ4_0 { pub d: [u8; 2], pub qs: [u8; 16] }
#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ4_1 { pub d: [u8; 2], pub m: [u8; 2], pub qs: [u8; 16] }
#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ5_0 { pub d: [u8; 2], pub qh: [u8; 4], pub qs: [u8; 16] }
#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ5_1 { pub d: [u8; 2], pub m: [u8; 2], pub qh: [u8; 4], pub qs: [u8; 16] }
#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ8_0 { pub d: [u8; 2], pub qs: [i8; 32] }
#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ4K { pub d: [u8; 2], pub dmin: [u8; 2], pub scales: [u8; 12], pub qs: [u8; 128] }
#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ5K { pub d: [u8; 2], pub dmin: [u8; 2], pub scales: [u8; 12], pub qh: [u8; 32], pub qs: [u8; 128] }
#[derive(Copy, Clone)] #[repr(C)] pub struct BlockQ6K { pub ql: [u8; 128], pub qh: [u8; 64], pub scales: [i8; 16], pub d: [u8; 2] }

pub(super) fn dequantize_row(_fmt: Format, _row: &[u8], _out: &mut [f32]) { unimplemented!() }
pub(super) fn dot_row(_fmt: Format, _row: &[u8], _x: &[f32]) -> f32 { unimplemented!() }
