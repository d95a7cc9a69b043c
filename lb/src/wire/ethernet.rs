//! Ethernet II with at most one 802.1Q tag (IEEE 802.1Q §9.6).
//!
//! The view reads one tag so that tools and tests can see behind it; the datapath serves
//! untagged ports only and drops tagged frames (the XDP program leaves them to the
//! kernel's VLAN devices), so a tag is never forwarded onto a port that does not carry it.

use super::WireError;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

mod field {
    pub const DST: core::ops::Range<usize> = 0..6;
    pub const SRC: core::ops::Range<usize> = 6..12;
    pub const TYPE: usize = 12;
    pub const HEADER_LEN: usize = 14;
    pub const VLAN_TYPE: usize = 16;
    pub const VLAN_HEADER_LEN: usize = 18;
}

/// A view of an Ethernet frame. After `new_checked`, `payload_offset` and the MAC
/// accessors never panic.
#[derive(Debug)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buf: T,
    payload_offset: usize,
    ethertype: u16,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < field::HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let outer = super::read_u16(b, field::TYPE);
        let (ethertype, payload_offset) = if outer == ETHERTYPE_VLAN {
            if b.len() < field::VLAN_HEADER_LEN {
                return Err(WireError::Truncated);
            }
            (super::read_u16(b, field::VLAN_TYPE), field::VLAN_HEADER_LEN)
        } else {
            (outer, field::HEADER_LEN)
        };
        Ok(EthernetFrame {
            buf,
            payload_offset,
            ethertype,
        })
    }

    #[inline]
    /// True when an 802.1Q tag follows the MAC addresses.
    pub fn is_tagged(&self) -> bool {
        self.payload_offset == field::VLAN_HEADER_LEN
    }

    #[inline]
    /// The ethertype after at most one VLAN tag.
    pub fn ethertype(&self) -> u16 {
        self.ethertype
    }

    #[inline]
    /// Where the L3 header starts (14, or 18 behind a VLAN tag).
    pub fn payload_offset(&self) -> usize {
        self.payload_offset
    }

    #[inline]
    pub fn dst(&self) -> [u8; 6] {
        mac(&self.buf.as_ref()[field::DST])
    }

    #[inline]
    pub fn src(&self) -> [u8; 6] {
        mac(&self.buf.as_ref()[field::SRC])
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    #[inline]
    pub fn set_macs(&mut self, src: [u8; 6], dst: [u8; 6]) {
        let b = self.buf.as_mut();
        b[field::DST].copy_from_slice(&dst);
        b[field::SRC].copy_from_slice(&src);
    }
}

fn mac(b: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(b);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNTAGGED: [u8; 14] = [
        0x02, 0, 0, 0, 0, 0x02, // dst
        0x02, 0, 0, 0, 0, 0x01, // src
        0x08, 0x00,
    ];

    #[test]
    fn parses_untagged() {
        let f = EthernetFrame::new_checked(&UNTAGGED[..]).expect("valid");
        assert_eq!(f.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(f.payload_offset(), 14);
        assert_eq!(f.src(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.dst(), [2, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn parses_one_vlan_tag() {
        let mut b = UNTAGGED[..12].to_vec();
        b.extend_from_slice(&[0x81, 0x00, 0x00, 0x64, 0x08, 0x00]);
        let f = EthernetFrame::new_checked(&b[..]).expect("valid");
        assert_eq!(f.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(f.payload_offset(), 18);
    }

    #[test]
    fn truncated_is_an_error_not_a_panic() {
        for n in 0..14 {
            assert_eq!(
                EthernetFrame::new_checked(&UNTAGGED[..n]).err(),
                Some(WireError::Truncated)
            );
        }
        let mut tagged = UNTAGGED[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00]);
        assert_eq!(
            EthernetFrame::new_checked(&tagged[..]).err(),
            Some(WireError::Truncated)
        );
    }

    #[test]
    fn set_macs_writes_both() {
        let mut b = UNTAGGED;
        let mut f = EthernetFrame::new_checked(&mut b[..]).expect("valid");
        f.set_macs([1; 6], [2; 6]);
        assert_eq!(b[..6], [2; 6]);
        assert_eq!(b[6..12], [1; 6]);
    }
}
