//! Pure NAT building blocks shared by the load balancer's SNAT and egress masquerading:
//! the SNAT port range, its split into one disjoint slice per worker, port allocation
//! inside a slice, IPv4 prefixes with longest-prefix match, and the masquerading policy
//! with ip-masq-agent's semantics.
//!
//! Contract: no I/O, no clock, no allocation after construction. Workers own their slice
//! outright, so allocation needs no coordination; the slice a port belongs to names the
//! worker that owns its flow, which is how a reply landing on the wrong queue finds its
//! owner ([`PortRange::owner`]).
#![forbid(unsafe_code)]

pub mod fuzzing;
pub mod ipmasq;
pub mod ports;
pub mod prefix;

pub use ipmasq::{Decision, MasqPolicy, Masquerade, NodeRule, RuleSource};
pub use ports::{PortAllocator, PortRange, PortRangeError};
pub use prefix::{Cidr, PrefixMap};
