//! ICMP (RFC 792): the echo and error messages a NAT has to translate.
//!
//! Echo request and reply carry an identifier that plays the role of a port (RFC 3022
//! §4.1, RFC 5508 §3.1). Destination unreachable, time exceeded and parameter problem
//! quote the offending packet: its IPv4 header and at least 8 bytes of what followed
//! (RFC 792; RFC 1812 §4.3.2.3 asks routers to quote as much as fits in 576 bytes), so
//! the quoted ports (and a quoted echo's identifier) are always present. A quoted packet
//! is truncated by design: [`Quoted::new_checked`] does not require `total_len` bytes.

use super::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use super::{read_u16, WireError};

pub const ECHO_REPLY: u8 = 0;
pub const DEST_UNREACHABLE: u8 = 3;
pub const ECHO_REQUEST: u8 = 8;
pub const TIME_EXCEEDED: u8 = 11;
pub const PARAMETER_PROBLEM: u8 = 12;

/// Code of destination unreachable meaning "fragmentation needed and DF set".
pub const FRAG_NEEDED: u8 = 4;

/// Offset of the identifier in an echo message, and of the quoted packet in an error.
pub const ECHO_ID: usize = 4;
pub const QUOTE: usize = 8;
/// ICMP header length (type, code, checksum, 4 bytes that depend on the type).
pub const HEADER_LEN: usize = 8;

/// True for the error types a NAT translates.
pub fn is_error(ty: u8) -> bool {
    matches!(ty, DEST_UNREACHABLE | TIME_EXCEEDED | PARAMETER_PROBLEM)
}

/// A quoted IPv4 packet inside an ICMP error: header plus at least 8 bytes of L4.
#[derive(Debug)]
pub struct Quoted<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Quoted<T> {
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < 20 {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 4 || b[0] & 0x0f < 5 {
            return Err(WireError::Malformed);
        }
        let hl = usize::from(b[0] & 0x0f) * 4;
        if b.len() < hl + 8 {
            return Err(WireError::Truncated);
        }
        Ok(Quoted { buf })
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[0] & 0x0f) * 4
    }

    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[9]
    }

    /// True when the quoted packet is a non-first fragment (no L4 header to read).
    pub fn is_later_fragment(&self) -> bool {
        read_u16(self.buf.as_ref(), 6) & 0x1fff != 0
    }

    pub fn src(&self) -> [u8; 4] {
        let b = self.buf.as_ref();
        [b[12], b[13], b[14], b[15]]
    }

    pub fn dst(&self) -> [u8; 4] {
        let b = self.buf.as_ref();
        [b[16], b[17], b[18], b[19]]
    }

    /// The quoted L4 "ports" as the flow table keys them: TCP/UDP ports; for an echo
    /// request `(id, 0)`, for an echo reply `(0, id)`. None for anything else.
    pub fn ports(&self) -> Option<(u16, u16)> {
        let b = self.buf.as_ref();
        let l4 = self.header_len();
        match self.protocol() {
            PROTO_TCP | PROTO_UDP => Some((read_u16(b, l4), read_u16(b, l4 + 2))),
            PROTO_ICMP => match b[l4] {
                ECHO_REQUEST => Some((read_u16(b, l4 + ECHO_ID), 0)),
                ECHO_REPLY => Some((0, read_u16(b, l4 + ECHO_ID))),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut q = vec![0x45, 0, 0, 84, 0, 0, 0x40, 0, 1, proto, 0, 0];
        q.extend_from_slice(&[10, 244, 1, 2, 20, 0, 0, 10]);
        q.extend_from_slice(l4);
        q
    }

    #[test]
    fn quoted_ports_by_protocol() {
        let udp = quoted(PROTO_UDP, &[0x12, 0x34, 0, 53, 0, 8, 0, 0]);
        let q = Quoted::new_checked(&udp[..]).expect("valid");
        assert_eq!(q.ports(), Some((0x1234, 53)));
        assert_eq!(q.src(), [10, 244, 1, 2]);
        assert_eq!(q.dst(), [20, 0, 0, 10]);
        let echo = quoted(PROTO_ICMP, &[ECHO_REQUEST, 0, 0, 0, 0, 7, 0, 1]);
        assert_eq!(
            Quoted::new_checked(&echo[..]).expect("valid").ports(),
            Some((7, 0))
        );
        let other = quoted(PROTO_ICMP, &[13, 0, 0, 0, 0, 7, 0, 1]);
        assert_eq!(
            Quoted::new_checked(&other[..]).expect("valid").ports(),
            None
        );
    }

    #[test]
    fn quoted_needs_header_and_eight_bytes() {
        let udp = quoted(PROTO_UDP, &[0; 8]);
        for n in 0..udp.len() {
            assert_eq!(
                Quoted::new_checked(&udp[..n]).err(),
                Some(WireError::Truncated),
                "{n}"
            );
        }
        let mut bad = udp.clone();
        bad[0] = 0x44;
        assert_eq!(
            Quoted::new_checked(&bad[..]).err(),
            Some(WireError::Malformed)
        );
    }
}
