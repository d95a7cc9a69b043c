//! SNAT port ranges: parsing, per-worker slices, allocation.
//!
//! A slice is a contiguous run of ports; the split gives every worker `len / n` ports and
//! the first `len % n` workers one more, so [`PortRange::owner`] is pure arithmetic and
//! agrees with [`PortRange::slice`] by construction (property-tested below).
//!
//! Allocation follows Linux conntrack's idea (nf_nat_l4proto_unique_tuple): a port is not
//! reserved globally but per remote endpoint, so the allocator only proposes candidates
//! and the caller checks whether the reply tuple `(remote, snat_addr:port)` is in use.
//! Capacity therefore grows with the number of distinct remotes.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Serialize};

/// An inclusive port range `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("port range {0:?} is not of the form FIRST-LAST (e.g. 61000-65535)")]
    Syntax(String),
    #[error("port range {first}-{last} is empty: FIRST must not exceed LAST")]
    Empty { first: u16, last: u16 },
    #[error("port range {first}-{last} includes port 0")]
    Zero { first: u16, last: u16 },
    #[error("port range {range} has {len} ports, fewer than the {workers} workers that need a slice each")]
    TooSmall {
        range: PortRange,
        len: u32,
        workers: u16,
    },
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Result<Self, PortRangeError> {
        if first > last {
            return Err(PortRangeError::Empty { first, last });
        }
        if first == 0 {
            return Err(PortRangeError::Zero { first, last });
        }
        Ok(PortRange { first, last })
    }

    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Check that the range can give each of `workers` a nonempty slice.
    pub fn check_workers(&self, workers: u16) -> Result<(), PortRangeError> {
        if workers == 0 || self.len() < u32::from(workers) {
            return Err(PortRangeError::TooSmall {
                range: *self,
                len: self.len(),
                workers,
            });
        }
        Ok(())
    }

    /// The slice of worker `w` out of `n`. Requires `check_workers(n)` to have passed.
    pub fn slice(&self, w: u16, n: u16) -> PortRange {
        let (base, extra) = (self.len() / u32::from(n), self.len() % u32::from(n));
        let w32 = u32::from(w);
        let start = u32::from(self.first) + w32 * base + w32.min(extra);
        let size = base + u32::from(w32 < extra);
        // start + size - 1 <= last <= u16::MAX by the split's arithmetic.
        PortRange {
            first: start as u16,
            last: (start + size - 1) as u16,
        }
    }

    /// Which of `n` workers owns `port`, if it lies in the range.
    pub fn owner(&self, port: u16, n: u16) -> Option<u16> {
        if !self.contains(port) || n == 0 {
            return None;
        }
        let (base, extra) = (self.len() / u32::from(n), self.len() % u32::from(n));
        let off = u32::from(port - self.first);
        let boundary = extra * (base + 1);
        let w = if off < boundary {
            off / (base + 1)
        } else {
            extra + (off - boundary) / base.max(1)
        };
        Some(w as u16)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| PortRangeError::Syntax(s.to_string()))?;
        let parse = |x: &str| {
            x.trim()
                .parse::<u16>()
                .map_err(|_| PortRangeError::Syntax(s.to_string()))
        };
        PortRange::new(parse(a)?, parse(b)?)
    }
}

/// Proposes ports from one worker's slice, round-robin from where it last succeeded, so
/// that recently freed ports are the last to be reused (TIME_WAIT on the backend side).
#[derive(Debug, Clone)]
pub struct PortAllocator {
    slice: PortRange,
    next: u16,
}

impl PortAllocator {
    pub fn new(slice: PortRange) -> Self {
        PortAllocator {
            slice,
            next: slice.first,
        }
    }

    /// Start proposing at the port `seed` selects in the slice. A daemon seeds from its
    /// clock, so a restart (which forgets the flows) does not hand out first the ports
    /// the previous run used most recently, toward remotes that may still hold them in
    /// TIME_WAIT.
    pub fn seeded(slice: PortRange, seed: u64) -> Self {
        let off = (seed % u64::from(slice.len())) as u32;
        PortAllocator {
            slice,
            // first + off <= last <= u16::MAX because off < len.
            next: (u32::from(slice.first) + off) as u16,
        }
    }

    pub fn slice(&self) -> PortRange {
        self.slice
    }

    /// The first port (trying at most `max_tries`) for which `in_use` says no.
    pub fn allocate(&mut self, max_tries: u32, mut in_use: impl FnMut(u16) -> bool) -> Option<u16> {
        let tries = max_tries.min(self.slice.len());
        for _ in 0..tries {
            let p = self.next;
            self.next = if p >= self.slice.last {
                self.slice.first
            } else {
                p + 1
            };
            if !in_use(p) {
                return Some(p);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn parse_and_display() {
        let r: PortRange = "61000-65535".parse().expect("valid");
        assert_eq!((r.first, r.last, r.len()), (61000, 65535, 4536));
        assert_eq!(r.to_string(), "61000-65535");
        assert!(matches!(
            "6100".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
        assert!(matches!(
            "9-1".parse::<PortRange>(),
            Err(PortRangeError::Empty { .. })
        ));
        assert!(matches!(
            "0-10".parse::<PortRange>(),
            Err(PortRangeError::Zero { .. })
        ));
        assert!(matches!(
            "1-70000".parse::<PortRange>(),
            Err(PortRangeError::Syntax(_))
        ));
    }

    #[test]
    fn seeded_allocation_starts_inside_the_slice_and_goes_round() {
        let r = PortRange::new(65530, 65535).expect("valid");
        let mut a = PortAllocator::seeded(r, 4);
        let got: Vec<u16> = (0..7).filter_map(|_| a.allocate(1, |_| false)).collect();
        assert_eq!(got, [65534, 65535, 65530, 65531, 65532, 65533, 65534]);
        let mut a = PortAllocator::seeded(r, u64::MAX);
        assert!(a.allocate(1, |_| false).is_some_and(|p| r.contains(p)));
    }

    #[test]
    fn too_small_for_workers() {
        let r = PortRange::new(100, 102).expect("valid");
        assert!(r.check_workers(3).is_ok());
        assert!(r.check_workers(4).is_err());
        assert!(r.check_workers(0).is_err());
    }

    proptest! {
        /// Slices never overlap, cover the range exactly, and `owner` agrees with them.
        #[test]
        fn slices_partition_the_range(first in 1u16..=65535, len in 1u32..5000, n in 1u16..=16) {
            let last = (u32::from(first) + len - 1).min(65535) as u16;
            let r = PortRange::new(first, last).expect("valid");
            prop_assume!(r.check_workers(n).is_ok());
            let mut seen = HashSet::new();
            for w in 0..n {
                let s = r.slice(w, n);
                prop_assert!(s.first <= s.last);
                for p in s.first..=s.last {
                    prop_assert!(seen.insert(p), "port {} in two slices", p);
                    prop_assert_eq!(r.owner(p, n), Some(w));
                }
            }
            prop_assert_eq!(seen.len() as u32, r.len());
        }

        /// The allocator never hands out a port that is in use, and finds a free one
        /// whenever one exists within its tries.
        #[test]
        fn allocator_never_returns_a_used_port(
            used in proptest::collection::hash_set(1000u16..1064, 0..64),
            seed in any::<u64>(),
        ) {
            let mut a = PortAllocator::seeded(PortRange::new(1000, 1063).expect("valid"), seed);
            let mut taken = used.clone();
            while let Some(p) = a.allocate(64, |p| taken.contains(&p)) {
                prop_assert!(!taken.contains(&p));
                taken.insert(p);
            }
            prop_assert_eq!(taken.len(), 64);
        }
    }
}
