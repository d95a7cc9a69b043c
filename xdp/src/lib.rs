//! xlb's I/O crate: everything that touches the kernel.
//!
//! - `bpf/` (C): the XDP steering program; [`bpf`] loads it and keeps its maps in step.
//! - [`decap`]: the DSR backend decapsulator (`bpf/decap.bpf.c`, the `xlb-decap` binary).
//! - [`sys`]: the only module with `unsafe` (AF_XDP rings and UMEM, rlimits, aya Pod).
//! - [`netlink`]: interfaces, routes and neighbours from the kernel; asks the kernel to
//!   resolve a neighbour.
//! - [`testing`]: helpers for the privileged tests (here and lbd's).
//! - [`worker`]: the per-queue worker threads (pinned), the hand-off rings between them.
//!
//! `lbd` (the daemon, in `control/lbd`) drives this crate; nothing here knows the control
//! plane.

pub mod abi;
pub mod bpf;
pub mod decap;
pub mod netlink;
pub mod sys;
pub mod testing;
pub mod worker;
