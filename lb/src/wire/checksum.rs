//! Internet checksum (RFC 1071) and its incremental update (RFC 1624, eqn. 3).
//!
//! The datapath never recomputes a checksum over a payload: NAT changes a handful of
//! 16-bit words, so it adds a precomputed one's-complement *delta* instead
//! (`HC' = ~(~HC + ~m + m')`). A flow's delta is fixed for its lifetime because the old
//! words are the flow key, so it is computed once at flow creation. Full computation is
//! kept for tests (to check the incremental path) and for building frames.

/// One's-complement sum of `data` as big-endian 16-bit words, folded to 16 bits (so
/// callers can add a few sums without overflow), not inverted.
///
/// Adds 32-bit big-endian words into a 64-bit accumulator (RFC 1071 §2(B): the sum is
/// the same in any word size once folded, since 2¹⁶ ≡ 1 mod 2¹⁶ − 1): half the
/// additions of a 16-bit loop, which matters where it runs per packet (the IPv4 header
/// check in the engine's parse).
pub fn sum(data: &[u8]) -> u32 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    match *chunks.remainder() {
        [a, b, c] => acc += u64::from(u32::from_be_bytes([a, b, c, 0])),
        [a, b] => acc += u64::from(u32::from_be_bytes([a, b, 0, 0])),
        [a] => acc += u64::from(u32::from_be_bytes([a, 0, 0, 0])),
        _ => {}
    }
    u32::from(fold64(acc))
}

/// Fold a 64-bit one's-complement accumulator to 16 bits.
#[inline]
pub fn fold64(mut acc: u64) -> u16 {
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    fold(acc as u32)
}

/// Fold a 32-bit one's-complement accumulator to 16 bits.
#[inline]
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field value for `data` (RFC 1071): folded and inverted.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// Sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768) for `proto` and `l4_len`.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    sum(&src) + sum(&dst) + u32::from(proto) + u32::from(l4_len)
}

/// A precomputed one's-complement difference to add to a checksum field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta(pub u16);

impl Delta {
    /// Delta that turns a checksum over `old` words into one over `new` words:
    /// `~m + m'` summed over all words (RFC 1624 eqn. 3).
    pub fn between(old: &[u16], new: &[u16]) -> Delta {
        let mut acc: u32 = 0;
        for &w in old {
            acc += u32::from(!w);
        }
        for &w in new {
            acc += u32::from(w);
        }
        Delta(fold(acc))
    }

    /// Combine two deltas (one's-complement addition).
    pub fn plus(self, other: Delta) -> Delta {
        Delta(fold(u32::from(self.0) + u32::from(other.0)))
    }

    /// Apply to a checksum field value (RFC 1624 eqn. 3: `HC' = ~(~HC + delta)`).
    pub fn apply(self, field: u16) -> u16 {
        !fold(u32::from(!field) + u32::from(self.0))
    }

    /// Apply to a UDP checksum field, where 0 means "no checksum" (RFC 768): an absent
    /// checksum stays absent, and a computed 0 is sent as 0xffff.
    pub fn apply_udp(self, field: u16) -> u16 {
        if field == 0 {
            return 0;
        }
        match self.apply(field) {
            0 => 0xffff,
            v => v,
        }
    }
}

/// The IPv4 header delta for decrementing TTL by one: the word `ttl<<8 | proto` loses
/// 0x0100 whatever the TTL (TTL ≥ 2 here, so no borrow), so the delta is a constant.
pub const TTL_DECREMENT: Delta = Delta(!0x0100);

/// Split an address into its two 16-bit words.
pub fn addr_words(a: [u8; 4]) -> [u16; 2] {
    [
        u16::from_be_bytes([a[0], a[1]]),
        u16::from_be_bytes([a[2], a[3]]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example bytes: sum is 0xddf2 (folded), checksum its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12]), 0x1200);
    }

    /// The plain RFC 1071 loop over 16-bit words, as the reference.
    fn sum16(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for c in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        fold64(acc)
    }

    proptest! {
        #[test]
        fn word_size_does_not_change_the_sum(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let s = sum(&data);
            prop_assert!(s <= 0xffff);
            // Equal as one's-complement numbers (0 and 0xffff are both zero).
            prop_assert_eq!(s % 0xffff, u32::from(sum16(&data)) % 0xffff);
        }

        /// Incremental update of any set of words equals a full recomputation.
        #[test]
        fn incremental_equals_full(mut data in proptest::collection::vec(any::<u8>(), 4..64),
                                   idx in any::<prop::sample::Index>(),
                                   new_word in any::<u16>()) {
            if data.len() % 2 == 1 { data.push(0); }
            let words = data.len() / 2;
            let w = idx.index(words);
            let before = checksum(&data);
            let old_word = u16::from_be_bytes([data[2*w], data[2*w+1]]);
            data[2*w..2*w+2].copy_from_slice(&new_word.to_be_bytes());
            let after = checksum(&data);
            let inc = Delta::between(&[old_word], &[new_word]).apply(before);
            // 0x0000 and 0xffff are both one's-complement zero; compare as sums.
            prop_assert_eq!(fold(u32::from(!inc)) % 0xffff, fold(u32::from(!after)) % 0xffff);
        }
    }
}
