//! IPv4 CIDRs and a longest-prefix-match set.
//!
//! [`PrefixMap`] keeps one hash table per prefix length present and probes them longest
//! first: at most 33 probes, usually a handful (a policy has few distinct lengths), no
//! allocation on lookup. The XDP side uses a kernel LPM trie for the same decision; the
//! two must agree, which the masquerade tests check on the same lists.

use core::fmt;
use core::str::FromStr;
use hashbrown::HashMap;
use std::net::Ipv4Addr;

/// An IPv4 prefix. The address is stored masked (host bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: u32,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IPv4 CIDR (expected ADDRESS/LENGTH, e.g. 10.0.0.0/8)")]
    Syntax(String),
    #[error("{0:?} has host bits set; did you mean {1}?")]
    HostBits(String, Cidr),
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl Cidr {
    /// A prefix from an address and length (≤ 32); host bits are cleared.
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Cidr> {
        (len <= 32).then(|| Cidr {
            addr: u32::from(addr) & mask(len),
            len,
        })
    }

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & mask(self.len) == self.addr
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    /// Strict: host bits must be clear (as Go's net.ParseCIDR-based tools expect them
    /// to be meaningful, a set host bit is almost always a typo worth reporting).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (a, l) = t
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_string()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        let len: u8 = l.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        let c = Cidr::new(addr, len).ok_or_else(|| CidrError::Syntax(s.to_string()))?;
        if c.addr != u32::from(addr) {
            return Err(CidrError::HostBits(s.to_string(), c));
        }
        Ok(c)
    }
}

/// Longest-prefix match from CIDRs to values.
#[derive(Debug, Clone, Default)]
pub struct PrefixMap<T> {
    /// Prefix lengths present, longest first.
    lengths: Vec<u8>,
    by_len: HashMap<u8, HashMap<u32, (Cidr, T)>>,
}

impl<T> PrefixMap<T> {
    pub fn new() -> Self {
        PrefixMap {
            lengths: Vec::new(),
            by_len: HashMap::new(),
        }
    }

    /// Insert `c`; an equal prefix keeps its first value (returns false).
    pub fn insert(&mut self, c: Cidr, v: T) -> bool {
        let table = self.by_len.entry(c.len).or_default();
        if table.contains_key(&c.addr) {
            return false;
        }
        table.insert(c.addr, (c, v));
        if !self.lengths.contains(&c.len) {
            self.lengths.push(c.len);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        true
    }

    /// The longest prefix containing `a`, with its value.
    pub fn lookup(&self, a: Ipv4Addr) -> Option<(&Cidr, &T)> {
        let a = u32::from(a);
        self.lengths.iter().find_map(|&len| {
            self.by_len
                .get(&len)
                .and_then(|t| t.get(&(a & mask(len))))
                .map(|(c, v)| (c, v))
        })
    }

    pub fn len(&self) -> usize {
        self.by_len.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parsing_is_strict() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!("0.0.0.0/0".parse::<Cidr>().map(|c| c.len()), Ok(0));
        assert!(matches!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits(_, _))
        ));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
    }

    proptest! {
        /// Lookup equals a linear scan for the longest containing prefix.
        #[test]
        fn longest_prefix_matches_linear_scan(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..50),
        ) {
            let mut m = PrefixMap::new();
            let mut list = Vec::new();
            for (i, (a, l)) in prefixes.into_iter().enumerate() {
                let c = Cidr::new(Ipv4Addr::from(a), l).expect("len <= 32");
                if m.insert(c, i) {
                    list.push((c, i));
                }
            }
            for p in probes {
                let a = Ipv4Addr::from(p);
                let oracle = list.iter().filter(|(c, _)| c.contains(a)).max_by_key(|(c, _)| c.len());
                let got = m.lookup(a).map(|(c, v)| (*c, *v));
                prop_assert_eq!(got, oracle.copied());
            }
        }
    }
}
