//! xlb's pure load-balancing core.
//!
//! Everything here is deterministic and sans-IO (after quinn-proto): wire views over byte
//! slices, RFC 1624 checksums, Maglev, the flow table, the service model and the SNAT
//! pipeline. No syscalls, no clock (callers pass `now`), no threads, no `unsafe`, and no
//! allocation per packet. The `xdp` crate feeds it frames from AF_XDP rings; tests feed
//! it byte fixtures.
#![forbid(unsafe_code)]

pub mod counters;
pub mod explain;
pub mod fixtures;
pub mod flow;
pub mod fuzzing;
pub mod hash;
pub mod maglev;
pub mod masq_fixtures;
pub mod netview;
pub mod pipeline;
pub mod service;
pub mod snapshot;
pub mod wire;

pub use counters::{Counters, DropReason};
pub use pipeline::{Engine, Event, Verdict};
pub use snapshot::{DatapathConfig, Snapshot, Timeouts};
