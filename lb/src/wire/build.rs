//! Building frames with correct checksums, for fixtures, tests and the bench generator.
//! Allocates; never used on the datapath.

use super::checksum::{checksum, fold, pseudo_header_sum, sum};
use super::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

#[derive(Debug, Clone)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (ignored for UDP).
    pub flags: u8,
    /// TCP sequence and acknowledgment numbers.
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// Extra IPv4 option bytes (a multiple of 4).
    pub ip_options: Vec<u8>,
    /// Raw value of the flags/fragment-offset word.
    pub frag: u16,
    /// IPv4 identification.
    pub ident: u16,
    /// ICMP type and code (ICMP only). The 4 bytes after the checksum are `sport` and
    /// `dport`: identifier and sequence for echo, unused and next-hop MTU for
    /// "fragmentation needed"; `payload` follows (an error's quoted packet).
    pub icmp_type: u8,
    pub icmp_code: u8,
}

impl Default for FrameSpec {
    fn default() -> Self {
        FrameSpec {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src: [10, 0, 0, 2],
            dst: [10, 0, 0, 10],
            ttl: 64,
            proto: PROTO_TCP,
            sport: 40000,
            dport: 80,
            flags: super::TcpFlags::SYN,
            seq: 1,
            ack: 0,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            ident: 0x1234,
            icmp_type: super::icmp::ECHO_REQUEST,
            icmp_code: 0,
        }
    }
}

impl FrameSpec {
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(64 + self.payload.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(v) = self.vlan {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let l4 = self.l4();
        let ihl = 5 + self.ip_options.len() / 4;
        let total = (ihl * 4 + l4.len()) as u16;
        let ip_start = f.len();
        f.push(0x40 | ihl as u8);
        f.push(0);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&self.ident.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src);
        f.extend_from_slice(&self.dst);
        f.extend_from_slice(&self.ip_options);
        let c = checksum(&f[ip_start..]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&l4);
        f
    }

    fn l4(&self) -> Vec<u8> {
        let mut h = Vec::new();
        match self.proto {
            PROTO_TCP => {
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&self.dport.to_be_bytes());
                h.extend_from_slice(&self.seq.to_be_bytes());
                h.extend_from_slice(&self.ack.to_be_bytes());
                h.extend_from_slice(&[0x50, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            PROTO_UDP => {
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&self.dport.to_be_bytes());
                h.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
            }
            PROTO_ICMP => {
                h.extend_from_slice(&[self.icmp_type, self.icmp_code, 0, 0]);
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&self.dport.to_be_bytes());
            }
            _ => {}
        }
        h.extend_from_slice(&self.payload);
        let c = match self.proto {
            PROTO_ICMP => checksum(&h),
            _ => !fold(pseudo_header_sum(self.src, self.dst, self.proto, h.len() as u16) + sum(&h)),
        };
        let at = match self.proto {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => 2,
        };
        if self.proto == PROTO_TCP || self.proto == PROTO_UDP || self.proto == PROTO_ICMP {
            let c = if self.proto == PROTO_UDP && c == 0 {
                0xffff
            } else {
                c
            };
            h[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        h
    }
}

/// The IPv4 packet of `frame` (everything after the Ethernet header and a VLAN tag), as
/// an ICMP error quotes it: truncated to `len` bytes when given.
pub fn ip_packet(frame: &[u8], len: Option<usize>) -> Vec<u8> {
    let l3 = if frame.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    let ip = &frame[l3.min(frame.len())..];
    ip[..len.unwrap_or(ip.len()).min(ip.len())].to_vec()
}

/// Verify every checksum in an Ethernet/IPv4/TCP|UDP frame from scratch.
/// Returns `(ip_ok, l4_ok)`.
pub fn verify(frame: &[u8]) -> (bool, bool) {
    let l3 = if frame.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    let Some(ip) = frame.get(l3..) else {
        return (false, false);
    };
    let Ok(p) = super::Ipv4Packet::new_checked(ip) else {
        return (false, false);
    };
    let hl = p.header_len();
    let ip_ok = fold(sum(&ip[..hl])) == 0xffff;
    let seg = p.payload();
    let l4_ok = match p.protocol() {
        PROTO_UDP if seg.get(6..8) == Some(&[0, 0]) => true,
        PROTO_TCP | PROTO_UDP => {
            fold(pseudo_header_sum(p.src(), p.dst(), p.protocol(), seg.len() as u16) + sum(seg))
                == 0xffff
        }
        _ => fold(sum(seg)) == 0xffff,
    };
    (ip_ok, l4_ok)
}

/// Split a built Ethernet + IPv4 frame (no VLAN tag) into IPv4 fragments carrying
/// `size` bytes of its payload each (a multiple of 8), as a router or the sender's stack
/// would (RFC 791): same identification, MF on all but the last, offsets in 8-byte units.
pub fn fragment(frame: &[u8], size: usize) -> Vec<Vec<u8>> {
    assert!(size.is_multiple_of(8) && size > 0);
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let payload = &frame[14 + ihl..];
    let base_off = u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff;
    let chunks: Vec<&[u8]> = payload.chunks(size).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut f = frame[..14 + ihl].to_vec();
            f.extend_from_slice(c);
            let total = (ihl + c.len()) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            let mf = if i + 1 < chunks.len() { 0x2000 } else { 0 };
            let off = base_off + (i * size / 8) as u16;
            f[20..22].copy_from_slice(&(mf | off).to_be_bytes());
            f[24..26].copy_from_slice(&[0, 0]);
            let c = checksum(&f[14..14 + ihl]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
            f
        })
        .collect()
}
