//! xlb's I/O crate: everything that touches the kernel.
//!
//! - `bpf/` (C): the XDP steering program; [`bpf`] loads it and keeps its maps in step.
//! - [`decap`]: the DSR backend decapsulator (`bpf/decap.bpf.c`, the `xlb-decap` binary).
//! - [`sys`]: the only module with `unsafe` (AF_XDP rings and UMEM, rlimits, aya Pod).
//! - [`netlink`]: interfaces, routes and neighbours from the kernel; asks the kernel to
//!   resolve a neighbour.
//! - [`worker`]: the per-queue worker threads (pinned), the hand-off rings between them.
//! - [`daemon`]: `lbd`'s state and its control-request handler.

pub mod abi;
pub mod bpf;
pub mod daemon;
pub mod decap;
pub mod netlink;
pub mod sys;
pub mod worker;
