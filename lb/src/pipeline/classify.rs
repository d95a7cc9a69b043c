//! Classify: a frame in, where its headers sit and what it carries out ([`Parsed`]), or
//! a drop reason. Reads the frame, never writes it; knows nothing of flows or the
//! snapshot. Everything later stages need from the frame's headers is read here once,
//! so decide never touches the frame.

use crate::counters::DropReason;
use crate::flow::FlowKey;
use crate::wire::ethernet::ETHERTYPE_IPV4;
use crate::wire::icmp::{self, Quoted};
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::{EthernetFrame, Ipv4Packet, TcpFlags, L4};

/// What kind of L4 message a parsed frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// TCP or UDP.
    Ports,
    EchoRequest,
    EchoReply,
    /// An ICMP error quoting the IPv4 packet at `il3` (its L4 header at `il4`) whose
    /// 5-tuple is `inner`.
    Error {
        il3: u32,
        il4: u32,
        inner: FlowKey,
    },
}

/// Where the headers of a parsed frame sit, and the header fields the engine decides on.
/// Offsets were validated by the wire views: indexing the frame with them cannot fail.
#[derive(Debug, Clone, Copy)]
pub(super) struct Parsed {
    pub l3: usize,
    pub l4: usize,
    pub l4_end: usize,
    pub key: FlowKey,
    pub flags: TcpFlags,
    pub kind: Kind,
    /// A fragment: the datagram it belongs to, and whether it is the first (which alone
    /// has the L4 header).
    pub frag: Option<(FragKey, bool)>,
    /// The destination MAC (one of ours, or the frame is not for a router).
    pub dst_mac: [u8; 6],
    /// Don't fragment.
    pub df: bool,
    /// TCP sequence and acknowledgment numbers (0 for other protocols and later
    /// fragments).
    pub seq: u32,
    pub ack: u32,
}

impl Parsed {
    /// The IPv4 packet's length (header and payload), what an MTU bounds.
    pub fn ip_len(&self) -> usize {
        self.l4_end - self.l3
    }
}

/// An IPv4 datagram in fragments: source, destination, protocol and identification
/// (RFC 791).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(super) struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: u16,
    pub proto: u8,
}

/// Offsets of the sequence and acknowledgment numbers in a TCP header (RFC 9293 §3.1).
const TCP_SEQ: usize = 4;
const TCP_ACK: usize = 8;

#[inline(always)]
fn word(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|w| <[u8; 4]>::try_from(w).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Classify one frame: Ethernet (untagged), IPv4 with a good header checksum and TTL ≥ 2,
/// TCP with a valid flag combination, UDP with a consistent length, ICMP echo, or an
/// ICMP error quoting a packet with ports or an echo.
#[inline(always)]
pub(super) fn classify(frame: &[u8]) -> Result<Parsed, DropReason> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Malformed)?;
    if eth.is_tagged() {
        return Err(DropReason::VlanTagged);
    }
    if eth.ethertype() != ETHERTYPE_IPV4 {
        return Err(DropReason::NotIpv4);
    }
    let dst_mac = eth.dst();
    let l3 = eth.payload_offset();
    let ip = Ipv4Packet::new_checked(&frame[l3..]).map_err(|_| DropReason::Malformed)?;
    if !ip.checksum_ok() {
        return Err(DropReason::BadIpChecksum);
    }
    if ip.ttl() <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    let proto = ip.protocol();
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Err(DropReason::UnsupportedProtocol);
    }
    let l4 = l3 + ip.header_len();
    let l4_end = l3 + ip.total_len();
    let df = frame[l3 + 6] & 0x40 != 0;
    let frag = ip.is_fragment().then(|| {
        let k = FragKey {
            src: ip.src(),
            dst: ip.dst(),
            id: ip.ident(),
            proto,
        };
        (k, !ip.is_later_fragment())
    });
    if let Some((k, false)) = frag {
        // A later fragment: no L4 header; it follows its first fragment.
        return Ok(Parsed {
            l3,
            l4,
            l4_end,
            key: FlowKey {
                src: k.src,
                dst: k.dst,
                sport: 0,
                dport: 0,
                proto,
            },
            flags: TcpFlags::default(),
            kind: Kind::Ports,
            frag,
            dst_mac,
            df,
            seq: 0,
            ack: 0,
        });
    }
    let seg = L4::new_checked(&frame[l4..l4_end], proto).map_err(|_| DropReason::Malformed)?;
    // A first fragment's UDP length is the whole datagram's.
    if frag.is_none() && seg.udp_len().is_some_and(|n| usize::from(n) != l4_end - l4) {
        return Err(DropReason::LengthMismatch);
    }
    let (mut seq, mut ack) = (0, 0);
    if proto == PROTO_TCP {
        if !seg.tcp_flags().is_valid() {
            return Err(DropReason::InvalidTcpFlags);
        }
        // The view checked the 20-byte header.
        (seq, ack) = (word(frame, l4 + TCP_SEQ), word(frame, l4 + TCP_ACK));
    }
    let mut key = FlowKey {
        src: ip.src(),
        dst: ip.dst(),
        sport: seg.src_port(),
        dport: seg.dst_port(),
        proto,
    };
    let mut kind = Kind::Ports;
    if proto == PROTO_ICMP {
        // L4 checked 8 bytes: type, code, checksum, and the identifier of an echo.
        let ty = frame[l4];
        let id = u16::from_be_bytes([frame[l4 + icmp::ECHO_ID], frame[l4 + icmp::ECHO_ID + 1]]);
        (key.sport, key.dport, kind) = match ty {
            icmp::ECHO_REQUEST => (id, 0, Kind::EchoRequest),
            icmp::ECHO_REPLY => (0, id, Kind::EchoReply),
            t if icmp::is_error(t) => {
                let il3 = l4 + icmp::QUOTE;
                let q =
                    Quoted::new_checked(&frame[il3..l4_end]).map_err(|_| DropReason::Malformed)?;
                if q.is_later_fragment() {
                    return Err(DropReason::UnsupportedProtocol);
                }
                let (sport, dport) = q.ports().ok_or(DropReason::UnsupportedProtocol)?;
                let inner = FlowKey {
                    src: q.src(),
                    dst: q.dst(),
                    sport,
                    dport,
                    proto: q.protocol(),
                };
                (
                    0,
                    0,
                    Kind::Error {
                        il3: il3 as u32,
                        il4: (il3 + q.header_len()) as u32,
                        inner,
                    },
                )
            }
            _ => return Err(DropReason::UnsupportedProtocol),
        };
    }
    Ok(Parsed {
        l3,
        l4,
        l4_end,
        key,
        flags: seg.tcp_flags(),
        kind,
        frag,
        dst_mac,
        df,
        seq,
        ack,
    })
}
