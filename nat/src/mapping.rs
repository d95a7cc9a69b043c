//! Endpoint-independent mappings (RFC 4787 §4.1, RFC 5382 §2): an inside endpoint keeps
//! one outside port on an outside address for as long as any of its flows lives, whatever
//! remote each flow goes to.
//!
//! One table per worker, holding the mappings whose outside port that worker owns (see
//! [`crate::port_owner`]); every flow of an inside endpoint is opened on that worker, so
//! the table needs no coordination. A mapping counts the flows using it and goes with the
//! last one. Capacity is fixed at construction (one mapping per flow at most), so
//! [`Mappings::acquire`] never allocates.
//!
//! The table is also indexed by outside endpoint ([`Mappings::holder`]): who an outside
//! port belongs to, for hairpinning (RFC 4787 REQ-9) and endpoint-independent filtering.
//! A port is unique per remote only, so two mappings may share an outside port when no
//! other is free; the index names the first, and allocation prefers ports no mapping
//! holds.

use hashbrown::HashMap;

/// An inside endpoint on its way out through one outside address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapKey {
    pub inside: [u8; 4],
    /// Port, or ICMP query identifier.
    pub port: u16,
    pub proto: u8,
    pub outside: [u8; 4],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    port: u16,
    flows: u32,
}

/// Which unsolicited inbound packets reach an inside endpoint through its mapping (RFC
/// 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filtering {
    /// Anyone may send to a mapped outside endpoint (what peer-to-peer software wants).
    EndpointIndependent,
    /// Only the remote endpoints the inside endpoint sent to (Linux conntrack's).
    #[default]
    AddressAndPortDependent,
}

impl core::str::FromStr for Filtering {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "endpoint-independent" => Ok(Filtering::EndpointIndependent),
            "address-and-port-dependent" => Ok(Filtering::AddressAndPortDependent),
            _ => Err(format!(
                "{s:?}: endpoint-independent or address-and-port-dependent"
            )),
        }
    }
}

impl core::fmt::Display for Filtering {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
        })
    }
}

/// An outside endpoint: address, port (or ICMP identifier), protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Outside {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
}

#[derive(Debug)]
pub struct Mappings {
    map: HashMap<MapKey, Mapping>,
    by_outside: HashMap<Outside, MapKey>,
    capacity: usize,
}

impl MapKey {
    fn outside(&self, port: u16) -> Outside {
        Outside {
            addr: self.outside,
            port,
            proto: self.proto,
        }
    }
}

/// The memory for a mapping table of this capacity could not be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate a NAT mapping table for {capacity} mappings")]
pub struct MappingAllocError {
    pub capacity: usize,
}

impl Mappings {
    /// A table for up to `capacity` mappings, allocated now.
    pub fn try_with_capacity(capacity: usize) -> Result<Mappings, MappingAllocError> {
        let (mut map, mut by_outside) = (HashMap::new(), HashMap::new());
        map.try_reserve(capacity)
            .map_err(|_| MappingAllocError { capacity })?;
        by_outside
            .try_reserve(capacity)
            .map_err(|_| MappingAllocError { capacity })?;
        Ok(Mappings {
            map,
            by_outside,
            capacity,
        })
    }

    /// The outside port of `key`'s mapping, if it has one.
    pub fn port(&self, key: &MapKey) -> Option<u16> {
        self.map.get(key).map(|m| m.port)
    }

    /// Count one more flow of `key` leaving from `port`. True when the flow counts toward
    /// the mapping (it uses the mapping's port, or it creates the mapping); false when
    /// `key` is mapped to another port (the flow had to take another one: it holds no
    /// mapping) or the table is full.
    pub fn acquire(&mut self, key: MapKey, port: u16) -> bool {
        if let Some(m) = self.map.get_mut(&key) {
            if m.port != port {
                return false;
            }
            m.flows = m.flows.saturating_add(1);
            return true;
        }
        if self.map.len() >= self.capacity {
            return false;
        }
        self.map.insert(key, Mapping { port, flows: 1 });
        self.by_outside.entry(key.outside(port)).or_insert(key);
        true
    }

    /// The inside endpoint holding `outside`, if a mapping does.
    pub fn holder(&self, outside: &Outside) -> Option<MapKey> {
        self.by_outside.get(outside).copied()
    }

    /// One flow that [`Mappings::acquire`] counted is gone.
    pub fn release(&mut self, key: &MapKey) {
        if let Some(m) = self.map.get_mut(key) {
            m.flows = m.flows.saturating_sub(1);
            if m.flows == 0 {
                let out = key.outside(m.port);
                self.map.remove(key);
                if self.by_outside.get(&out) == Some(key) {
                    self.by_outside.remove(&out);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(port: u16) -> MapKey {
        MapKey {
            inside: [10, 244, 0, 5],
            port,
            proto: 17,
            outside: [192, 0, 2, 1],
        }
    }

    #[test]
    fn a_mapping_lives_as_long_as_its_flows() {
        let mut m = Mappings::try_with_capacity(4).expect("memory");
        assert!(m.acquire(key(5000), 5000));
        assert!(m.acquire(key(5000), 5000), "a second remote: same mapping");
        assert!(!m.acquire(key(5000), 5002), "another port holds no mapping");
        assert_eq!(m.port(&key(5000)), Some(5000));
        m.release(&key(5000));
        assert_eq!(m.port(&key(5000)), Some(5000));
        m.release(&key(5000));
        assert_eq!(m.port(&key(5000)), None);
        assert!(m.is_empty());
    }

    #[test]
    fn never_beyond_capacity() {
        let mut m = Mappings::try_with_capacity(2).expect("memory");
        assert!(m.acquire(key(1), 1));
        assert!(m.acquire(key(2), 2));
        assert!(!m.acquire(key(3), 3));
        assert_eq!(m.len(), 2);
    }

    proptest! {
        /// Against a model: a mapping exists exactly while its counted flows are > 0.
        #[test]
        fn matches_a_counting_model(ops in proptest::collection::vec((0u16..4, any::<bool>()), 0..200)) {
            let mut m = Mappings::try_with_capacity(8).expect("memory");
            let mut model = [0u32; 4];
            for (k, add) in ops {
                if add {
                    prop_assert!(m.acquire(key(k), k));
                    model[usize::from(k)] += 1;
                } else if model[usize::from(k)] > 0 {
                    m.release(&key(k));
                    model[usize::from(k)] -= 1;
                }
                for (i, &n) in model.iter().enumerate() {
                    prop_assert_eq!(m.port(&key(i as u16)).is_some(), n > 0);
                    let out = Outside { addr: [192, 0, 2, 1], port: i as u16, proto: 17 };
                    prop_assert_eq!(m.holder(&out).is_some(), n > 0);
                }
            }
        }
    }
}
