//! NAT port ranges: parsing, which worker owns a port, and the candidates for a mapping.
//!
//! Ownership: ports are dealt out to the workers in pairs, round-robin over the whole
//! port space ([`port_owner`]): `2k` and `2k+1` belong to worker `k mod n`. It is pure
//! arithmetic, the same for every address and range, and gives every worker ports of
//! both parities everywhere in the space, so a worker can keep an inside port's parity
//! and class (RFC 4787 REQ-3, REQ-4) without asking anyone. A mapping lives on the
//! worker owning its outside port, which is how a reply landing on another queue finds
//! its flow.
//!
//! Allocation follows Linux conntrack (nf_nat_l4proto_unique_tuple): the inside port is
//! kept when free ([`PortRange::preferred`]), and a port is not reserved globally but per
//! remote endpoint, so [`PortRange::candidates`] only proposes ports and the caller checks
//! whether the reply tuple `(remote, addr:port)` is in use. Capacity therefore grows with
//! the number of distinct remotes.

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
    #[error("port range {range} has {len} ports: too few for {workers} workers to own ports of both parities each (ports go to workers in pairs, round-robin)")]
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

    /// Check that every one of `workers` owns ports of both parities in the range (so
    /// each can keep an inside port's parity).
    pub fn check_workers(&self, workers: u16) -> Result<(), PortRangeError> {
        let both = |w| (0..2).all(|b| Progression::new(*self, w, workers, b).is_some());
        if workers == 0 || !(0..workers).all(both) {
            return Err(PortRangeError::TooSmall {
                range: *self,
                len: self.len(),
                workers,
            });
        }
        Ok(())
    }

    /// The port an inside port maps to when it is free: the inside port itself when the
    /// range holds it (port preservation), else a port of the range in the inside port's
    /// class (0–1023 or 1024–65535) and of its parity, as far as the range allows.
    pub fn preferred(&self, inside: u16) -> u16 {
        let sub = self.class_of(inside);
        if sub.contains(inside) {
            return inside;
        }
        let off = u32::from(inside) % sub.len();
        // first + off <= last because off < len.
        let p = (u32::from(sub.first) + off) as u16;
        match (p & 1 == inside & 1, p < sub.last) {
            (true, _) => p,
            (false, true) => p + 1,
            (false, false) => p.saturating_sub(1).max(sub.first),
        }
    }

    /// The part of the range in `port`'s class (0–1023 or 1024–65535), or the whole
    /// range when it has no port of that class.
    fn class_of(&self, port: u16) -> PortRange {
        let (lo, hi) = if port < 1024 {
            (1, 1023)
        } else {
            (1024, u16::MAX)
        };
        let (first, last) = (self.first.max(lo), self.last.min(hi));
        if first <= last {
            PortRange { first, last }
        } else {
            *self
        }
    }

    /// The ports worker `w` of `n` may map `inside` to, best first: the preferred port
    /// when `w` owns it; then `w`'s other ports of the same parity in the same class
    /// (else in the range); then, parity being only RECOMMENDED (RFC 4787 REQ-4) and
    /// capacity mattering more, `w`'s ports of the other parity. After the preferred
    /// port each group is walked from the position `salt` selects, so that successive
    /// allocations scatter instead of piling up behind one another (conntrack restarts
    /// at random offsets for the same reason).
    pub fn candidates(&self, inside: u16, w: u16, n: u16, salt: u32) -> Candidates {
        let parity = inside & 1;
        let class = self.class_of(inside);
        let same =
            Progression::new(class, w, n, parity).or_else(|| Progression::new(*self, w, n, parity));
        let other = Progression::new(*self, w, n, parity ^ 1);
        let pref = self.preferred(inside);
        let owned = port_owner(pref, n) == w && same.is_some_and(|t| t.holds(pref));
        Candidates {
            pref: owned.then_some(pref),
            pref_given: false,
            tiers: [same, other],
            tier: 0,
            taken: 0,
            salt,
        }
    }
}

/// Which of `workers` owns `port` (see the module doc): `(port / 2) mod workers`.
pub fn port_owner(port: u16, workers: u16) -> u16 {
    (port >> 1) % workers.max(1)
}

/// The ports `base + stride·j` for `j` in `lo..=hi`: one worker's ports of one parity in
/// one range.
#[derive(Debug, Clone, Copy)]
struct Progression {
    base: u32,
    stride: u32,
    lo: u32,
    hi: u32,
}

impl Progression {
    fn new(r: PortRange, w: u16, n: u16, parity: u16) -> Option<Progression> {
        let (base, stride) = (
            2 * u32::from(w) + u32::from(parity),
            2 * u32::from(n.max(1)),
        );
        let (first, last) = (u32::from(r.first), u32::from(r.last));
        if last < base {
            return None;
        }
        let lo = first.saturating_sub(base).div_ceil(stride);
        let hi = (last - base) / stride;
        (lo <= hi).then_some(Progression {
            base,
            stride,
            lo,
            hi,
        })
    }

    fn len(&self) -> u32 {
        self.hi - self.lo + 1
    }

    fn holds(&self, port: u16) -> bool {
        let p = u32::from(port);
        p >= self.base
            && (p - self.base).is_multiple_of(self.stride)
            && (self.lo..=self.hi).contains(&((p - self.base) / self.stride))
    }

    /// The `i`-th port from the one `salt` selects (wrapping).
    fn nth_from(&self, salt: u32, i: u32) -> u16 {
        let j = self.lo + (salt % self.len() + i) % self.len();
        // base + stride·hi <= last <= u16::MAX by construction.
        (self.base + self.stride * j) as u16
    }
}

/// The candidate ports of one mapping (see [`PortRange::candidates`]).
#[derive(Debug, Clone)]
pub struct Candidates {
    /// The preferred port, when the worker owns it: proposed first, skipped later.
    pref: Option<u16>,
    pref_given: bool,
    tiers: [Option<Progression>; 2],
    tier: usize,
    taken: u32,
    salt: u32,
}

impl Iterator for Candidates {
    type Item = u16;
    fn next(&mut self) -> Option<u16> {
        if !self.pref_given {
            self.pref_given = true;
            if self.pref.is_some() {
                return self.pref;
            }
        }
        while let Some(t) = self.tiers.get(self.tier).copied() {
            match t {
                Some(t) if self.taken < t.len() => {
                    self.taken += 1;
                    let p = t.nth_from(self.salt, self.taken - 1);
                    // The preferred port came first already.
                    if Some(p) != self.pref {
                        return Some(p);
                    }
                }
                _ => {
                    self.tier += 1;
                    self.taken = 0;
                }
            }
        }
        None
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

/// Most addresses in the SNAT pool (the XDP program's `snat_addrs` map holds these and
/// the egress address).
pub const MAX_POOL: usize = 15;

/// One `--snat-addr` argument: an address or an inclusive range of addresses (a pool),
/// optionally with the ports to use on them: `192.0.2.10`, `192.0.2.10-192.0.2.13`,
/// `192.0.2.10:1024-65535`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatAddrSpec {
    pub first: std::net::Ipv4Addr,
    pub last: std::net::Ipv4Addr,
    pub ports: Option<PortRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatAddrError {
    #[error("{0:?} is not ADDR, ADDR-ADDR or either with :FIRST-LAST ports (e.g. 192.0.2.10-192.0.2.13:1024-65535)")]
    Syntax(String),
    #[error("{0}: the first address is above the last")]
    Empty(String),
    #[error("{0}: more than {MAX_POOL} addresses")]
    TooMany(String),
    #[error("{0}: {1}")]
    Ports(String, PortRangeError),
}

impl NatAddrSpec {
    pub fn addrs(&self) -> impl Iterator<Item = std::net::Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(std::net::Ipv4Addr::from)
    }
}

impl FromStr for NatAddrSpec {
    type Err = NatAddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || NatAddrError::Syntax(s.to_string());
        let (addrs, ports) = match s.split_once(':') {
            Some((a, p)) => (
                a,
                Some(
                    p.parse::<PortRange>()
                        .map_err(|e| NatAddrError::Ports(s.to_string(), e))?,
                ),
            ),
            None => (s, None),
        };
        let (first, last) = match addrs.split_once('-') {
            Some((a, b)) => (a, b),
            None => (addrs, addrs),
        };
        let first: std::net::Ipv4Addr = first.trim().parse().map_err(|_| syntax())?;
        let last: std::net::Ipv4Addr = last.trim().parse().map_err(|_| syntax())?;
        if first > last {
            return Err(NatAddrError::Empty(s.to_string()));
        }
        if u32::from(last) - u32::from(first) >= MAX_POOL as u32 {
            return Err(NatAddrError::TooMany(s.to_string()));
        }
        Ok(NatAddrSpec { first, last, ports })
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
    fn nat_address_specs() {
        let a: NatAddrSpec = "192.0.2.10".parse().expect("one address");
        assert_eq!((a.addrs().count(), a.ports), (1, None));
        let a: NatAddrSpec = "192.0.2.10-192.0.2.13:1024-65535".parse().expect("a pool");
        assert_eq!(a.addrs().count(), 4);
        assert_eq!(a.ports, Some(PortRange::new(1024, 65535).expect("valid")));
        assert!(matches!(
            "192.0.2.13-192.0.2.10".parse::<NatAddrSpec>(),
            Err(NatAddrError::Empty(_))
        ));
        assert!(matches!(
            "10.0.0.0-10.0.1.0".parse::<NatAddrSpec>(),
            Err(NatAddrError::TooMany(_))
        ));
        assert!(matches!(
            "192.0.2.10:0-9".parse::<NatAddrSpec>(),
            Err(NatAddrError::Ports(..))
        ));
        assert!(matches!(
            "example".parse::<NatAddrSpec>(),
            Err(NatAddrError::Syntax(_))
        ));
    }

    #[test]
    fn preservation_keeps_the_port_else_its_class_and_parity() {
        let r = PortRange::new(1024, 65535).expect("valid");
        assert_eq!(r.preferred(40000), 40000);
        assert_eq!(r.preferred(500) & 1, 0, "no low port in range: parity kept");
        let r = PortRange::new(61000, 65535).expect("valid");
        for inside in [500u16, 40000, 40001, 61000, 65535] {
            let p = r.preferred(inside);
            assert!(r.contains(p));
            assert_eq!(p & 1, inside & 1, "{inside} -> {p}");
        }
        let r = PortRange::new(600, 2000).expect("valid");
        assert!(r.preferred(500) < 1024, "class 0-1023 kept");
        assert!(r.preferred(5000) >= 1024, "class 1024-65535 kept");
    }

    #[test]
    fn too_small_for_workers() {
        // Pairs (100,101) and (102,103) go to workers 0 and 1 of 2.
        let r = PortRange::new(100, 103).expect("valid");
        assert!(r.check_workers(2).is_ok());
        assert!(r.check_workers(3).is_err());
        assert!(r.check_workers(0).is_err());
        assert!(PortRange::new(101, 103)
            .expect("valid")
            .check_workers(2)
            .is_err());
    }

    proptest! {
        /// A worker's candidates are exactly its ports in the range, each once: the
        /// preferred port first when the worker owns it, then those of the inside
        /// port's parity (its class first), then the others.
        #[test]
        fn candidates_are_the_workers_own_ports(
            first in 1u16..=65535, len in 1u32..3000, n in 1u16..=8, inside in 1u16..=65535,
            salt in any::<u32>(),
        ) {
            let last = (u32::from(first) + len - 1).min(65535) as u16;
            let r = PortRange::new(first, last).expect("valid");
            prop_assume!(r.check_workers(n).is_ok());
            let pref = r.preferred(inside);
            prop_assert!(r.contains(pref));
            if r.contains(inside) {
                prop_assert_eq!(pref, inside);
            }
            let parity = inside & 1;
            for w in 0..n {
                let got: Vec<u16> = r.candidates(inside, w, n, salt).collect();
                let set: HashSet<u16> = got.iter().copied().collect();
                prop_assert_eq!(set.len(), got.len(), "a port proposed twice");
                let class = r.class_of(inside);
                let same_in_class = |p: &u16| class.contains(*p) && *p & 1 == parity;
                let mine: HashSet<u16> =
                    (r.first..=r.last).filter(|&p| port_owner(p, n) == w).collect();
                let has_class = mine.iter().any(same_in_class);
                // Without a port of its class and parity, the class is not kept.
                let want: HashSet<u16> = if has_class {
                    mine.iter().copied().filter(|p| class.contains(*p) || *p & 1 != parity).collect()
                } else {
                    mine.clone()
                };
                prop_assert_eq!(&set, &want);
                if port_owner(pref, n) == w && pref & 1 == parity {
                    prop_assert_eq!(got[0], pref);
                }
                // Same parity before the other parity.
                let first_other = got.iter().position(|p| p & 1 != parity).unwrap_or(got.len());
                prop_assert!(got[first_other..].iter().all(|p| p & 1 != parity));
            }
        }
    }
}
