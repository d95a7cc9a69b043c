//! Pure NAT building blocks shared by the load balancer's SNAT and egress masquerading:
//! NAT port ranges, which worker owns a port, the candidate ports of a mapping (port
//! preservation, parity and class kept), IPv4 prefixes with longest-prefix match, and the masquerading policy
//! with ip-masq-agent's semantics.
//!
//! Contract: no I/O, no clock, no allocation after construction. Workers own their ports
//! outright ([`port_owner`]), so allocation needs no coordination; the owner of a port
//! names the worker that holds its flows, which is how a reply landing on the wrong queue
//! finds its owner.
#![forbid(unsafe_code)]

pub mod fuzzing;
pub mod ipmasq;
pub mod mapping;
pub mod ports;
pub mod prefix;

pub use ipmasq::{Decision, MasqPolicy, Masquerade, NodeRule, RuleSource};
pub use mapping::{Filtering, MapKey, MappingAllocError, Mappings, Outside};
pub use ports::{
    port_owner, Candidates, NatAddrError, NatAddrSpec, PortRange, PortRangeError, MAX_POOL,
};
pub use prefix::{Cidr, PrefixMap};
