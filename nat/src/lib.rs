//! Pure NAT building blocks shared by the load balancer's SNAT and (next) egress
//! masquerading: the SNAT port range, its split into one disjoint slice per worker, and
//! port allocation inside a slice.
//!
//! Contract: no I/O, no clock, no allocation after construction. Workers own their slice
//! outright, so allocation needs no coordination; the slice a port belongs to names the
//! worker that owns its flow, which is how a reply landing on the wrong queue finds its
//! owner ([`PortRange::owner`]).
#![forbid(unsafe_code)]

pub mod ports;

pub use ports::{PortAllocator, PortRange, PortRangeError};
