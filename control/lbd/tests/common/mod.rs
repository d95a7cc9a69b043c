//! Helpers shared by the privileged tests.
#![allow(dead_code)]

pub use xdp::testing::privileged;

pub mod topo;
