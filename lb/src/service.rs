//! The operator's service table and the operations on it.
//!
//! Every operation is validated whole and produces a *new* table ([`ServiceTable::apply`]
//! takes `&self`), so a rejected request leaves nothing half-applied; the daemon swaps the
//! new table in only after the datapath accepted it. Errors name the thing to fix.

use core::fmt;
use core::str::FromStr;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Most services a node holds (the BPF frontend map is sized to match).
pub const MAX_SERVICES: usize = 4096;
/// Most backends per service (Maglev indices are u16, one value reserved).
pub const MAX_BACKENDS: usize = 4096;
/// Largest backend weight; weights are relative, so this bounds nothing but typos.
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A service frontend: `VIP:PORT/PROTO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "{0:?} is not a frontend: expected VIP:PORT/tcp or VIP:PORT/udp (e.g. 10.0.0.10:80/tcp)"
    )]
    Frontend(String),
    #[error("{0:?} is not a backend: expected IP:PORT or IP:PORT@WEIGHT (e.g. 10.1.0.2:8080@2)")]
    Backend(String),
}

impl FromStr for Frontend {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Frontend(s.to_string());
        let (hostport, proto) = s.rsplit_once('/').ok_or_else(err)?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(err()),
        };
        let (addr, port) = parse_hostport(hostport).ok_or_else(err)?;
        Ok(Frontend { addr, port, proto })
    }
}

fn parse_hostport(s: &str) -> Option<(Ipv4Addr, u16)> {
    let (a, p) = s.rsplit_once(':')?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

/// A backend with its weight: `IP:PORT[@WEIGHT]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendSpec {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
}

impl BackendSpec {
    /// The name Maglev hashes: stable across nodes, independent of weight.
    pub fn maglev_name(&self) -> Vec<u8> {
        format!("{}:{}", self.addr, self.port).into_bytes()
    }
    pub fn same_endpoint(&self, addr: Ipv4Addr, port: u16) -> bool {
        self.addr == addr && self.port == port
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@{}", self.addr, self.port, self.weight)
    }
}

impl FromStr for BackendSpec {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Backend(s.to_string());
        let (hp, weight) = match s.split_once('@') {
            Some((hp, w)) => (hp, w.parse().map_err(|_| err())?),
            None => (s, 1),
        };
        let (addr, port) = parse_hostport(hp).ok_or_else(err)?;
        Ok(BackendSpec { addr, port, weight })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub id: u32,
    pub frontend: Frontend,
    /// Sorted by (addr, port): listing order is stable and independent of history.
    pub backends: Vec<BackendSpec>,
}

/// One change to the table. `lbctl` commands map 1:1 onto these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    AddService {
        frontend: Frontend,
        backends: Vec<BackendSpec>,
    },
    RemoveService {
        frontend: Frontend,
    },
    AddBackend {
        frontend: Frontend,
        backend: BackendSpec,
    },
    RemoveBackend {
        frontend: Frontend,
        addr: Ipv4Addr,
        port: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "service {0} already exists; remove it first or add backends with `lbctl backend add`"
    )]
    ServiceExists(Frontend),
    #[error("no service {0}; `lbctl service list` shows the configured ones")]
    NoService(Frontend),
    #[error("backend {addr}:{port} is already in service {frontend}")]
    BackendExists {
        frontend: Frontend,
        addr: Ipv4Addr,
        port: u16,
    },
    #[error("backend {addr}:{port} is listed twice for {frontend}")]
    DuplicateBackend {
        frontend: Frontend,
        addr: Ipv4Addr,
        port: u16,
    },
    #[error("no backend {addr}:{port} in service {frontend}")]
    NoBackend {
        frontend: Frontend,
        addr: Ipv4Addr,
        port: u16,
    },
    #[error("{what} {addr} cannot be used: it must be a unicast address (not 0.0.0.0, broadcast, multicast or loopback)")]
    BadAddress { what: &'static str, addr: Ipv4Addr },
    #[error("{what} port 0 is not a valid port")]
    ZeroPort { what: &'static str },
    #[error("weight {weight} for backend {addr}:{port} is above the maximum {max}", max = MAX_WEIGHT)]
    WeightTooLarge {
        addr: Ipv4Addr,
        port: u16,
        weight: u32,
    },
    #[error("{frontend} would have {count} backends, more than the limit of {max}", max = MAX_BACKENDS)]
    TooManyBackends { frontend: Frontend, count: usize },
    #[error("the node already has the maximum of {max} services", max = MAX_SERVICES)]
    TooManyServices,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTable {
    services: BTreeMap<Frontend, ServiceSpec>,
    next_id: u32,
}

fn check_unicast(what: &'static str, addr: Ipv4Addr) -> Result<(), ConfigError> {
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback() {
        return Err(ConfigError::BadAddress { what, addr });
    }
    Ok(())
}

fn check_backend(b: &BackendSpec) -> Result<(), ConfigError> {
    check_unicast("backend address", b.addr)?;
    if b.port == 0 {
        return Err(ConfigError::ZeroPort { what: "backend" });
    }
    if b.weight > MAX_WEIGHT {
        return Err(ConfigError::WeightTooLarge {
            addr: b.addr,
            port: b.port,
            weight: b.weight,
        });
    }
    Ok(())
}

impl ServiceTable {
    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.values()
    }

    pub fn get(&self, f: &Frontend) -> Option<&ServiceSpec> {
        self.services.get(f)
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Validate `op` against this table and return the table it produces.
    pub fn apply(&self, op: &Op) -> Result<ServiceTable, ConfigError> {
        let mut next = self.clone();
        match op {
            Op::AddService { frontend, backends } => {
                check_unicast("frontend address", frontend.addr)?;
                if frontend.port == 0 {
                    return Err(ConfigError::ZeroPort { what: "frontend" });
                }
                if self.services.contains_key(frontend) {
                    return Err(ConfigError::ServiceExists(*frontend));
                }
                if self.services.len() >= MAX_SERVICES {
                    return Err(ConfigError::TooManyServices);
                }
                if backends.len() > MAX_BACKENDS {
                    return Err(ConfigError::TooManyBackends {
                        frontend: *frontend,
                        count: backends.len(),
                    });
                }
                let mut list = backends.clone();
                for b in &list {
                    check_backend(b)?;
                }
                list.sort();
                for w in list.windows(2) {
                    if w[0].same_endpoint(w[1].addr, w[1].port) {
                        return Err(ConfigError::DuplicateBackend {
                            frontend: *frontend,
                            addr: w[1].addr,
                            port: w[1].port,
                        });
                    }
                }
                next.next_id += 1;
                next.services.insert(
                    *frontend,
                    ServiceSpec {
                        id: next.next_id,
                        frontend: *frontend,
                        backends: list,
                    },
                );
            }
            Op::RemoveService { frontend } => {
                next.services
                    .remove(frontend)
                    .ok_or(ConfigError::NoService(*frontend))?;
            }
            Op::AddBackend { frontend, backend } => {
                check_backend(backend)?;
                let svc = next
                    .services
                    .get_mut(frontend)
                    .ok_or(ConfigError::NoService(*frontend))?;
                if svc
                    .backends
                    .iter()
                    .any(|b| b.same_endpoint(backend.addr, backend.port))
                {
                    return Err(ConfigError::BackendExists {
                        frontend: *frontend,
                        addr: backend.addr,
                        port: backend.port,
                    });
                }
                if svc.backends.len() >= MAX_BACKENDS {
                    return Err(ConfigError::TooManyBackends {
                        frontend: *frontend,
                        count: svc.backends.len() + 1,
                    });
                }
                svc.backends.push(*backend);
                svc.backends.sort();
            }
            Op::RemoveBackend {
                frontend,
                addr,
                port,
            } => {
                let svc = next
                    .services
                    .get_mut(frontend)
                    .ok_or(ConfigError::NoService(*frontend))?;
                let before = svc.backends.len();
                svc.backends.retain(|b| !b.same_endpoint(*addr, *port));
                if svc.backends.len() == before {
                    return Err(ConfigError::NoBackend {
                        frontend: *frontend,
                        addr: *addr,
                        port: *port,
                    });
                }
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fe(s: &str) -> Frontend {
        s.parse().expect("frontend")
    }
    fn be(s: &str) -> BackendSpec {
        s.parse().expect("backend")
    }

    #[test]
    fn parsing() {
        assert_eq!(
            fe("10.0.0.10:80/TCP"),
            Frontend {
                addr: [10, 0, 0, 10].into(),
                port: 80,
                proto: Proto::Tcp
            }
        );
        assert_eq!(be("10.1.0.2:8080@3").weight, 3);
        assert_eq!(be("10.1.0.2:8080").weight, 1);
        assert!("10.0.0.10:80".parse::<Frontend>().is_err());
        assert!("10.0.0.10/tcp".parse::<Frontend>().is_err());
        assert!("10.0.0.10:80/sctp".parse::<Frontend>().is_err());
        assert!("10.1.0.2:99999".parse::<BackendSpec>().is_err());
        assert!("10.1.0.2:80@x".parse::<BackendSpec>().is_err());
        assert_eq!(fe("10.0.0.10:80/tcp").to_string(), "10.0.0.10:80/tcp");
    }

    #[test]
    fn add_remove_cycle() {
        let t = ServiceTable::default();
        let t = t
            .apply(&Op::AddService {
                frontend: fe("10.0.0.10:80/tcp"),
                backends: vec![be("10.1.0.3:80"), be("10.1.0.2:80")],
            })
            .expect("add");
        let svc = t.get(&fe("10.0.0.10:80/tcp")).expect("present");
        assert_eq!(svc.backends[0], be("10.1.0.2:80"), "sorted");
        let t = t
            .apply(&Op::AddBackend {
                frontend: fe("10.0.0.10:80/tcp"),
                backend: be("10.1.0.4:80@2"),
            })
            .expect("add backend");
        assert_eq!(
            t.get(&fe("10.0.0.10:80/tcp")).map(|s| s.backends.len()),
            Some(3)
        );
        let t = t
            .apply(&Op::RemoveBackend {
                frontend: fe("10.0.0.10:80/tcp"),
                addr: [10, 1, 0, 2].into(),
                port: 80,
            })
            .expect("remove backend");
        assert_eq!(
            t.get(&fe("10.0.0.10:80/tcp")).map(|s| s.backends.len()),
            Some(2)
        );
        let t = t
            .apply(&Op::RemoveService {
                frontend: fe("10.0.0.10:80/tcp"),
            })
            .expect("remove");
        assert!(t.is_empty());
    }

    #[test]
    fn rejected_ops_leave_the_table_unchanged() {
        let t = ServiceTable::default()
            .apply(&Op::AddService {
                frontend: fe("10.0.0.10:80/tcp"),
                backends: vec![be("10.1.0.2:80")],
            })
            .expect("add");
        let bad = [
            Op::AddService {
                frontend: fe("10.0.0.10:80/tcp"),
                backends: vec![],
            },
            Op::AddService {
                frontend: fe("0.0.0.0:80/tcp"),
                backends: vec![],
            },
            Op::AddService {
                frontend: fe("10.0.0.11:0/tcp"),
                backends: vec![],
            },
            Op::AddService {
                frontend: fe("10.0.0.11:80/tcp"),
                backends: vec![be("10.1.0.2:80"), be("10.1.0.2:80@2")],
            },
            Op::AddService {
                frontend: fe("10.0.0.11:80/tcp"),
                backends: vec![be("10.1.0.2:80"), be("224.0.0.1:80")],
            },
            Op::AddBackend {
                frontend: fe("10.0.0.10:80/tcp"),
                backend: be("10.1.0.2:80"),
            },
            Op::AddBackend {
                frontend: fe("10.0.0.10:80/tcp"),
                backend: be("10.1.0.3:80@20000"),
            },
            Op::AddBackend {
                frontend: fe("10.0.0.99:80/tcp"),
                backend: be("10.1.0.3:80"),
            },
            Op::RemoveBackend {
                frontend: fe("10.0.0.10:80/tcp"),
                addr: [10, 1, 0, 9].into(),
                port: 80,
            },
            Op::RemoveService {
                frontend: fe("10.0.0.10:81/tcp"),
            },
        ];
        for op in bad {
            let err = t.apply(&op).expect_err("must be rejected");
            assert!(!err.to_string().is_empty());
        }
        assert_eq!(t.len(), 1);
    }
}
