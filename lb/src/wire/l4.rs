//! TCP (RFC 9293 §3.1), UDP (RFC 768) and ICMP (RFC 792) headers: the few fields an L4
//! load balancer reads or rewrites: ports, TCP flags, the checksum field.
//!
//! TCP and UDP share the port layout, so one view serves both; the checksum field sits at
//! a protocol-specific offset. ICMP is viewed only far enough to classify it.

use super::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use super::{read_u16, write_u16, WireError};

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const TCP_DATA_OFF: usize = 12;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECKSUM: usize = 16;
    pub const TCP_MIN_LEN: usize = 20;
    pub const UDP_CHECKSUM: usize = 6;
    pub const UDP_LEN: usize = 8;
    pub const UDP_LEN_FIELD: usize = 4;
    pub const ICMP_MIN_LEN: usize = 8;
}

/// TCP header flags (RFC 9293 §3.1) that the flow table's state machine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    #[inline]
    pub fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }
    #[inline]
    pub fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
    #[inline]
    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }
    #[inline]
    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }
    #[inline]
    /// A connection-opening SYN (no ACK): the only segment that may create a flow.
    pub fn is_opening_syn(self) -> bool {
        self.syn() && !self.ack()
    }

    #[inline]
    /// A combination some valid TCP sends (Linux conntrack's `tcp_valid_flags`, with
    /// PSH, ECE and CWR ignored): SYN (+URG), SYN+ACK, RST, RST+ACK, FIN+ACK (+URG),
    /// ACK (+URG). SYN+FIN, SYN+RST, no flags ("null"), FIN without
    /// ACK (FIN and Xmas scans) are never sent by a TCP (RFC 9293 §3.10.7: after the
    /// SYN every segment carries ACK), only by scanners and attackers.
    pub fn is_valid(self) -> bool {
        const S: u8 = TcpFlags::SYN;
        const A: u8 = TcpFlags::ACK;
        const U: u8 = TcpFlags::URG;
        const F: u8 = TcpFlags::FIN;
        const R: u8 = TcpFlags::RST;
        const SU: u8 = S | U;
        const SA: u8 = S | A;
        const RA: u8 = R | A;
        const FA: u8 = F | A;
        const FAU: u8 = F | A | U;
        const AU: u8 = A | U;
        matches!(
            self.0 & !(Self::PSH | Self::ECE | Self::CWR),
            S | SU | SA | R | RA | FA | FAU | A | AU
        )
    }
}

/// A view of a TCP, UDP or ICMP header. After `new_checked`, the fixed header of `proto`
/// lies inside the buffer, so no accessor panics.
#[derive(Debug)]
pub struct L4<T: AsRef<[u8]>> {
    buf: T,
    proto: u8,
}

impl<T: AsRef<[u8]>> L4<T> {
    #[inline(always)]
    pub fn new_checked(buf: T, proto: u8) -> Result<Self, WireError> {
        let b = buf.as_ref();
        match proto {
            PROTO_TCP => {
                if b.len() < field::TCP_MIN_LEN {
                    return Err(WireError::Truncated);
                }
                let off = usize::from(b[field::TCP_DATA_OFF] >> 4) * 4;
                if off < field::TCP_MIN_LEN {
                    return Err(WireError::Malformed);
                }
                if b.len() < off {
                    return Err(WireError::Truncated);
                }
            }
            PROTO_UDP => {
                if b.len() < field::UDP_LEN {
                    return Err(WireError::Truncated);
                }
            }
            PROTO_ICMP => {
                if b.len() < field::ICMP_MIN_LEN {
                    return Err(WireError::Truncated);
                }
            }
            _ => return Err(WireError::Malformed),
        }
        Ok(L4 { buf, proto })
    }

    #[inline]
    pub fn has_ports(&self) -> bool {
        self.proto == PROTO_TCP || self.proto == PROTO_UDP
    }

    #[inline]
    /// Source port (TCP/UDP); for ICMP the type and code word.
    pub fn src_port(&self) -> u16 {
        read_u16(self.buf.as_ref(), field::SRC_PORT)
    }

    #[inline]
    /// Destination port (TCP/UDP); for ICMP the checksum word.
    pub fn dst_port(&self) -> u16 {
        read_u16(self.buf.as_ref(), field::DST_PORT)
    }

    #[inline]
    /// The UDP length field (header and data); `None` for other protocols.
    pub fn udp_len(&self) -> Option<u16> {
        (self.proto == PROTO_UDP).then(|| read_u16(self.buf.as_ref(), field::UDP_LEN_FIELD))
    }

    #[inline]
    /// TCP flags; empty for other protocols.
    pub fn tcp_flags(&self) -> TcpFlags {
        if self.proto == PROTO_TCP {
            TcpFlags(self.buf.as_ref()[field::TCP_FLAGS])
        } else {
            TcpFlags(0)
        }
    }

    #[inline]
    /// Offset of the checksum field for this protocol.
    pub fn checksum_offset(&self) -> usize {
        match self.proto {
            PROTO_TCP => field::TCP_CHECKSUM,
            PROTO_UDP => field::UDP_CHECKSUM,
            _ => 2,
        }
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        read_u16(self.buf.as_ref(), self.checksum_offset())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> L4<T> {
    #[inline]
    pub fn set_ports(&mut self, src: u16, dst: u16) {
        let b = self.buf.as_mut();
        write_u16(b, field::SRC_PORT, src);
        write_u16(b, field::DST_PORT, dst);
    }

    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        let at = self.checksum_offset();
        write_u16(self.buf.as_mut(), at, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_flag_combinations_are_conntracks() {
        let valid: Vec<u8> = (0..=255u8).filter(|&f| TcpFlags(f).is_valid()).collect();
        // 9 combinations × 8 settings of PSH/ECE/CWR, which are ignored.
        assert_eq!(valid.len(), 9 * 8);
        for ok in [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0xc2, 0x1c] {
            assert!(TcpFlags(ok).is_valid(), "{ok:#04x}");
        }
        // SYN+FIN, SYN+RST, null, FIN alone, Xmas (FIN|PSH|URG), RST+FIN+ACK.
        for bad in [0x03, 0x06, 0x00, 0x01, 0x29, 0x15, 0x07] {
            assert!(!TcpFlags(bad).is_valid(), "{bad:#04x}");
        }
    }

    #[test]
    fn tcp_header_checks() {
        let mut h = [0u8; 20];
        h[12] = 0x50;
        h[13] = TcpFlags::SYN;
        let v = L4::new_checked(&h[..], PROTO_TCP).expect("valid");
        assert!(v.tcp_flags().syn());
        assert!(!v.tcp_flags().ack());
        assert_eq!(v.checksum_offset(), 16);
        for n in 0..20 {
            assert_eq!(
                L4::new_checked(&h[..n], PROTO_TCP).err(),
                Some(WireError::Truncated)
            );
        }
        h[12] = 0x40; // data offset 4 < 5
        assert_eq!(
            L4::new_checked(&h[..], PROTO_TCP).err(),
            Some(WireError::Malformed)
        );
        h[12] = 0x60; // options claimed but absent
        assert_eq!(
            L4::new_checked(&h[..], PROTO_TCP).err(),
            Some(WireError::Truncated)
        );
    }

    #[test]
    fn udp_ports_roundtrip() {
        let mut h = [0u8; 8];
        let mut v = L4::new_checked(&mut h[..], PROTO_UDP).expect("valid");
        v.set_ports(1234, 53);
        assert_eq!((v.src_port(), v.dst_port()), (1234, 53));
        assert_eq!(v.checksum_offset(), 6);
        assert_eq!(v.tcp_flags(), TcpFlags(0));
    }

    #[test]
    fn unknown_protocol_is_malformed_for_us() {
        assert_eq!(
            L4::new_checked(&[0u8; 40][..], 47).err(),
            Some(WireError::Malformed)
        );
    }
}
