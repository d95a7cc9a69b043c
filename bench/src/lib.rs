//! xlb's measurements. Figures are reported, never asserted (DEVELOPERS.md): each run
//! measures its baselines (nftables, the machine's XDP ceiling, a bare AF_XDP forwarder)
//! in the same run and reports ratios to them.
//!
//! - [`progs`]: the generator, sink and reference XDP programs (bench/bpf).
//! - [`cost`]: the engine's per-packet work, for callgrind, and its Maglev/memory costs.
//! - [`harness`]: the scenarios, driven across the namespaces of bench/netns.sh.
//! - [`report`]: JSON, docs/benchmarks.md and the PNG plots.

pub mod cost;
pub mod harness;
pub mod progs;
pub mod report;
pub mod stats;
