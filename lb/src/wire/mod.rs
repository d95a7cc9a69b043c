//! Zero-copy views over frame bytes, one file per protocol (after smoltcp's `wire`).
//!
//! The promise of this module: every view has a `new_checked` constructor that validates
//! lengths once; after it succeeds, no accessor or setter panics. Views never allocate and
//! never copy; setters write in place. A failed check is a cheap [`WireError`] that the
//! pipeline turns into a counted drop, never a log line per packet.

pub mod build;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod l4;

/// Why a frame could not be viewed. Kept small and `Copy`: it is produced per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// The buffer is shorter than the header (or than a length field claims).
    Truncated,
    /// A field holds a value the protocol forbids (IP version, IHL < 5, TCP offset < 5).
    Malformed,
}

pub use ethernet::EthernetFrame;
pub use ipv4::Ipv4Packet;
pub use l4::{TcpFlags, L4};

pub(crate) fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn write_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
