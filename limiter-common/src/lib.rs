//! Types and pure logic shared by the XDP program and user space.
//!
//! `no_std` so the kernel side can use it; the `user` feature adds `aya::Pod` impls.
#![no_std]

pub mod layout;
pub mod lease;
pub mod prefix;
pub mod rate;

pub use layout::*;
