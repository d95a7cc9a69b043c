//! IPv4 header (RFC 791 §3.1), options allowed (IHL 5..=15).
//!
//! `new_checked` validates version, IHL, total length against the buffer and the header
//! checksum is *not* verified here: the datapath updates it incrementally, and a frame
//! with a bad checksum stays bad (the receiver drops it) rather than being "fixed" by us.

use super::{read_u16, WireError};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

mod field {
    pub const VER_IHL: usize = 0;
    pub const TOTAL_LEN: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    pub const MIN_HEADER_LEN: usize = 20;
}

const FLAG_MF: u16 = 0x2000;
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 packet starting at the IP header. After `new_checked`, the header
/// (options included) and `total_len` bytes lie inside the buffer.
#[derive(Debug)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < field::MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(WireError::Malformed);
        }
        let hl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if hl < field::MIN_HEADER_LEN {
            return Err(WireError::Malformed);
        }
        let total = usize::from(read_u16(b, field::TOTAL_LEN));
        if total < hl {
            return Err(WireError::Malformed);
        }
        if b.len() < total {
            return Err(WireError::Truncated);
        }
        Ok(Ipv4Packet { buf })
    }

    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    #[inline]
    pub fn total_len(&self) -> usize {
        usize::from(read_u16(self.buf.as_ref(), field::TOTAL_LEN))
    }

    #[inline]
    /// True for any fragment: MF set or a nonzero offset (RFC 791 §3.2).
    pub fn is_fragment(&self) -> bool {
        let f = read_u16(self.buf.as_ref(), field::FLAGS_FRAG);
        f & FLAG_MF != 0 || f & FRAG_OFFSET_MASK != 0
    }

    /// A fragment after the first: no L4 header (nonzero offset).
    #[inline]
    pub fn is_later_fragment(&self) -> bool {
        read_u16(self.buf.as_ref(), field::FLAGS_FRAG) & FRAG_OFFSET_MASK != 0
    }

    /// The identification field (names a datagram's fragments with the addresses and
    /// protocol).
    #[inline]
    pub fn ident(&self) -> u16 {
        read_u16(self.buf.as_ref(), field::IDENT)
    }

    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[field::TTL]
    }

    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[field::PROTO]
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        read_u16(self.buf.as_ref(), field::CHECKSUM)
    }

    #[inline]
    pub fn src(&self) -> [u8; 4] {
        addr(&self.buf.as_ref()[field::SRC..field::SRC + 4])
    }

    #[inline]
    pub fn dst(&self) -> [u8; 4] {
        addr(&self.buf.as_ref()[field::DST..field::DST + 4])
    }

    #[inline]
    /// The L4 bytes: from the end of the header to `total_len` (Ethernet padding excluded).
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..self.total_len()]
    }

    #[inline]
    /// The header checksum verifies: the one's-complement sum of the header, checksum
    /// included, is all ones (RFC 1071).
    pub fn checksum_ok(&self) -> bool {
        let b = self.buf.as_ref();
        let hl = self.header_len();
        let acc = match b.get(..field::MIN_HEADER_LEN) {
            // Per packet in the engine: the usual 20-byte header as five 32-bit words,
            // no loop (RFC 1071 §2(B) allows any word size).
            Some(h) if hl == field::MIN_HEADER_LEN => {
                let w =
                    |i: usize| u64::from(u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]));
                w(0) + w(4) + w(8) + w(12) + w(16)
            }
            _ => u64::from(super::checksum::sum(&b[..hl])),
        };
        super::checksum::fold64(acc) == 0xffff
    }

    #[inline]
    /// The header checksum recomputed from scratch (for tests and frame builders):
    /// removing the stored word from the sum is adding its complement.
    pub fn compute_checksum(&self) -> u16 {
        let h = &self.buf.as_ref()[..self.header_len()];
        let s = super::checksum::sum(h) + u32::from(!self.checksum());
        !super::checksum::fold(s)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline]
    pub fn set_src(&mut self, a: [u8; 4]) {
        self.buf.as_mut()[field::SRC..field::SRC + 4].copy_from_slice(&a);
    }

    #[inline]
    pub fn set_dst(&mut self, a: [u8; 4]) {
        self.buf.as_mut()[field::DST..field::DST + 4].copy_from_slice(&a);
    }

    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buf.as_mut()[field::TTL] = ttl;
    }

    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        super::write_u16(self.buf.as_mut(), field::CHECKSUM, c);
    }

    #[inline]
    /// Recompute the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len();
        let c = super::checksum::checksum(&self.buf.as_ref()[..hl]);
        self.set_checksum(c);
    }

    #[inline]
    /// Mutable L4 bytes (header_len..total_len).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), self.total_len());
        &mut self.buf.as_mut()[hl..tl]
    }
}

fn addr(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte header (UDP, 10.0.0.1 → 10.0.0.2, total 28) with a correct checksum.
    pub(crate) fn header() -> Vec<u8> {
        let mut h = vec![
            0x45, 0, 0, 28, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        h.extend_from_slice(&[0; 8]);
        let mut p = Ipv4Packet::new_checked(&mut h[..]).expect("valid");
        p.fill_checksum();
        h
    }

    #[test]
    fn fields() {
        let h = header();
        let p = Ipv4Packet::new_checked(&h[..]).expect("valid");
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 28);
        assert_eq!(p.protocol(), PROTO_UDP);
        assert_eq!(p.src(), [10, 0, 0, 1]);
        assert_eq!(p.dst(), [10, 0, 0, 2]);
        assert!(!p.is_fragment()); // DF only
        assert_eq!(p.compute_checksum(), p.checksum());
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn options_move_the_payload() {
        let mut h = header();
        h[0] = 0x46; // IHL 6: one option word
        h[3] = 32;
        h.splice(20..20, [1, 1, 1, 0]); // NOP NOP NOP EOL
        let p = Ipv4Packet::new_checked(&h[..]).expect("valid");
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn rejects_bad_headers() {
        let h = header();
        for n in 0..20 {
            assert_eq!(
                Ipv4Packet::new_checked(&h[..n]).err(),
                Some(WireError::Truncated)
            );
        }
        let mut v6 = h.clone();
        v6[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&v6[..]).err(),
            Some(WireError::Malformed)
        );
        let mut short_ihl = h.clone();
        short_ihl[0] = 0x44;
        assert_eq!(
            Ipv4Packet::new_checked(&short_ihl[..]).err(),
            Some(WireError::Malformed)
        );
        let mut long_total = h.clone();
        long_total[3] = 200;
        assert_eq!(
            Ipv4Packet::new_checked(&long_total[..]).err(),
            Some(WireError::Truncated)
        );
        let mut small_total = h;
        small_total[3] = 10;
        assert_eq!(
            Ipv4Packet::new_checked(&small_total[..]).err(),
            Some(WireError::Malformed)
        );
    }

    #[test]
    fn fragments_are_recognised() {
        let mut h = header();
        h[6] = 0x20; // MF
        assert!(Ipv4Packet::new_checked(&h[..])
            .expect("valid")
            .is_fragment());
        h[6] = 0x00;
        h[7] = 0x10; // offset 16
        assert!(Ipv4Packet::new_checked(&h[..])
            .expect("valid")
            .is_fragment());
    }
}
