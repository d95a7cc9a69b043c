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
/// Largest backend weight. Weights are ratios (a backend's share of the Maglev table is
/// its weight over the sum), so this bounds nothing but typos.
pub const MAX_WEIGHT: u32 = 10_000;
/// Table sizes a service may choose (`--table-size`): primes roughly doubling, so
/// M ≥ 100·N (the paper's bound for about 1 % imbalance) is within reach for any N up to
/// 10 000 backends. The daemon's default (`--maglev-size`) may be any prime.
pub const TABLE_SIZES: [u32; 12] = [
    1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_537, 131_071, 262_139, 524_287, 1_048_573,
    2_000_003,
];
/// Longest client-ip affinity timeout (Kubernetes' limit: one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

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

/// Which connections of a client must reach the same backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Affinity {
    /// Each connection is hashed on its 5-tuple.
    #[default]
    None,
    /// Kubernetes' `sessionAffinity: ClientIP`: the hash leaves out the client's port, so
    /// every connection from one client address reaches the same backend while the
    /// backend set is unchanged; with a timeout the client also keeps its backend across
    /// backend-set changes until it opened no connection for that long.
    ClientIp,
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Affinity::None => "none",
            Affinity::ClientIp => "client-ip",
        })
    }
}

impl FromStr for Affinity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Affinity::None),
            "client-ip" => Ok(Affinity::ClientIp),
            _ => Err(format!("{s:?} is not an affinity: none or client-ip")),
        }
    }
}

/// What the clients of a removed backend's established flows get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRemove {
    /// A TCP reset from the VIP, on the flow's next packet (either direction): the client
    /// fails fast and reconnects to a live backend.
    #[default]
    Reset,
    /// Nothing: the flow's packets are dropped and its client times out.
    Drop,
}

impl fmt::Display for OnRemove {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnRemove::Reset => "reset",
            OnRemove::Drop => "drop",
        })
    }
}

impl FromStr for OnRemove {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reset" => Ok(OnRemove::Reset),
            "drop" => Ok(OnRemove::Drop),
            _ => Err(format!("{s:?} is not a removal outcome: reset or drop")),
        }
    }
}

/// How a service's packets reach its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Full NAT: the client's packets leave from a SNAT address and port, the backend's
    /// replies come back through xlb.
    #[default]
    Snat,
    /// Direct server return, backends on this node's L2 segment: only the destination
    /// MAC changes.
    DsrL2,
    /// Direct server return, the client's packet inside an outer IPv4 header (IPIP).
    DsrIpip,
    /// Direct server return, the client's packet inside outer IPv4 + UDP + GUE.
    DsrGue,
    /// Cilium's hybrid mode: TCP by DSR (L2), UDP by SNAT.
    Hybrid,
    /// TCP by DSR over IPIP, UDP by SNAT.
    HybridIpip,
    /// TCP by DSR over GUE, UDP by SNAT.
    HybridGue,
}

/// How a DSR service's packets are carried to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dsr {
    L2,
    Ipip,
    Gue,
}

/// GUE's UDP destination port unless a service sets one (`--gue-port`; the
/// backends' `xlb-decap --gue-port` must match).
pub const DEFAULT_GUE_PORT: u16 = 6080;

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::Snat,
        Mode::DsrL2,
        Mode::DsrIpip,
        Mode::DsrGue,
        Mode::Hybrid,
        Mode::HybridIpip,
        Mode::HybridGue,
    ];

    /// What new flows of protocol `proto` get: DSR of a kind, or SNAT (`None`).
    pub fn dsr(self, proto: Proto) -> Option<Dsr> {
        match (self, proto) {
            (Mode::Snat, _) => None,
            (Mode::DsrL2, _) => Some(Dsr::L2),
            (Mode::DsrIpip, _) => Some(Dsr::Ipip),
            (Mode::DsrGue, _) => Some(Dsr::Gue),
            (Mode::Hybrid | Mode::HybridIpip | Mode::HybridGue, Proto::Udp) => None,
            (Mode::Hybrid, Proto::Tcp) => Some(Dsr::L2),
            (Mode::HybridIpip, Proto::Tcp) => Some(Dsr::Ipip),
            (Mode::HybridGue, Proto::Tcp) => Some(Dsr::Gue),
        }
    }

    /// Whether any protocol is carried by GUE.
    pub fn uses_gue(self) -> bool {
        matches!(self, Mode::DsrGue | Mode::HybridGue)
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Snat => "snat",
            Mode::DsrL2 => "dsr-l2",
            Mode::DsrIpip => "dsr-ipip",
            Mode::DsrGue => "dsr-gue",
            Mode::Hybrid => "hybrid",
            Mode::HybridIpip => "hybrid-ipip",
            Mode::HybridGue => "hybrid-gue",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("{s:?} is not a forwarding mode: {}", names.join(", "))
            })
    }
}

/// An affinity timeout as operators write it: seconds, or a number with `s`, `m` or `h`
/// (`10800`, `3h`, `30m`).
pub fn parse_duration_s(s: &str) -> Result<u32, String> {
    let err = || format!("{s:?} is not a duration: seconds, or a number with s, m or h (e.g. 3h)");
    let (num, unit) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    let n: u32 = num.parse().map_err(|_| err())?;
    n.checked_mul(unit).ok_or_else(err)
}

/// A service's settings besides its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceOptions {
    pub affinity: Affinity,
    /// Seconds a client keeps its backend after its last new connection
    /// (`affinity: client-ip` only; none: for as long as the backend set is unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
    /// Outcome for the flows of a backend removed with `backend remove`.
    pub on_remove: OnRemove,
    /// Maglev table size, one of [`TABLE_SIZES`]; none: the daemon's `--maglev-size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
    /// How new flows reach the backends (a flow keeps the mode it opened with).
    pub mode: Mode,
    /// GUE's UDP destination port (GUE modes only); none: [`DEFAULT_GUE_PORT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gue_port: Option<u16>,
}

impl ServiceOptions {
    pub fn is_default(&self) -> bool {
        *self == ServiceOptions::default()
    }

    /// The mode as operators read it: its name, with GUE's port (`dsr-gue:6080`).
    pub fn mode_label(&self) -> String {
        match self.mode.uses_gue() {
            true => format!(
                "{}:{}",
                self.mode,
                self.gue_port.unwrap_or(DEFAULT_GUE_PORT)
            ),
            false => self.mode.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub id: u32,
    pub frontend: Frontend,
    /// Sorted by (addr, port): listing order is stable and independent of history.
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub options: ServiceOptions,
}

impl ServiceSpec {
    /// The backend at `addr:port` (backends are sorted by address and port).
    pub fn find(&self, addr: [u8; 4], port: u16) -> Option<&BackendSpec> {
        let addr = Ipv4Addr::from(addr);
        self.backends
            .binary_search_by(|b| (b.addr, b.port).cmp(&(addr, port)))
            .ok()
            .and_then(|i| self.backends.get(i))
    }
}

/// One change to the table. `lbctl` commands map 1:1 onto these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    AddService {
        frontend: Frontend,
        backends: Vec<BackendSpec>,
        #[serde(default)]
        options: ServiceOptions,
    },
    /// Change a service's settings; its backends and flows stay.
    SetOptions {
        frontend: Frontend,
        options: ServiceOptions,
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
    /// Change a backend's weight; 0 drains it (no new flows, established ones go on).
    SetWeight {
        frontend: Frontend,
        addr: Ipv4Addr,
        port: u16,
        weight: u32,
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
    #[error("table size {0} is not offered: choose one of {sizes}", sizes = table_sizes())]
    TableSize(u32),
    #[error("{frontend} would have {count} backends in a table of {size} slots: some would get no slot; choose a table size of at least {want} (one of {sizes})", want = 100 * count, sizes = table_sizes())]
    TableTooSmall {
        frontend: Frontend,
        count: usize,
        size: u32,
    },
    #[error("an affinity timeout needs --affinity client-ip")]
    TimeoutWithoutAffinity,
    #[error("--gue-port needs a GUE mode (dsr-gue or hybrid-gue), not {0}")]
    GuePortWithoutGue(Mode),
    #[error("{frontend} forwards by DSR ({mode}): backend {addr}:{port} must listen on the service's port {want} (the packet reaches it unchanged)", want = frontend.port)]
    DsrPort {
        frontend: Frontend,
        mode: Mode,
        addr: Ipv4Addr,
        port: u16,
    },
    #[error("affinity timeout {0} s is outside 1..={max} s", max = MAX_AFFINITY_TIMEOUT_S)]
    AffinityTimeout(u32),
}

fn table_sizes() -> String {
    TABLE_SIZES.map(|m| m.to_string()).join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTable {
    services: BTreeMap<Frontend, ServiceSpec>,
    next_id: u32,
    /// The Maglev table size of services that do not choose one.
    default_table_size: u32,
}

impl Default for ServiceTable {
    fn default() -> Self {
        ServiceTable::with_table_size(crate::maglev::DEFAULT_TABLE_SIZE)
    }
}

fn check_unicast(what: &'static str, addr: Ipv4Addr) -> Result<(), ConfigError> {
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback() {
        return Err(ConfigError::BadAddress { what, addr });
    }
    Ok(())
}

fn check_options(o: &ServiceOptions) -> Result<(), ConfigError> {
    match o.gue_port {
        Some(_) if !o.mode.uses_gue() => return Err(ConfigError::GuePortWithoutGue(o.mode)),
        Some(0) => return Err(ConfigError::ZeroPort { what: "GUE" }),
        _ => {}
    }
    if let Some(m) = o.table_size.filter(|m| !TABLE_SIZES.contains(m)) {
        return Err(ConfigError::TableSize(m));
    }
    match o.affinity_timeout_s {
        Some(_) if o.affinity == Affinity::None => Err(ConfigError::TimeoutWithoutAffinity),
        Some(t) if !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => {
            Err(ConfigError::AffinityTimeout(t))
        }
        _ => Ok(()),
    }
}

/// A table smaller than the backend count leaves backends without a slot. (Below
/// 100 slots a backend the shares drift more than 1 %: shown, not refused.)
fn check_fits(svc: &ServiceSpec, default_size: u32) -> Result<(), ConfigError> {
    let size = svc.options.table_size.unwrap_or(default_size);
    let count = svc.backends.iter().filter(|b| b.weight > 0).count();
    if count > size as usize {
        return Err(ConfigError::TableTooSmall {
            frontend: svc.frontend,
            count,
            size,
        });
    }
    Ok(())
}

/// A DSR service's packets reach the backend unchanged, port included: every backend
/// listens on the frontend's port (as IPVS's direct routing requires).
fn check_dsr_ports(svc: &ServiceSpec) -> Result<(), ConfigError> {
    let f = svc.frontend;
    if svc.options.mode.dsr(f.proto).is_none() {
        return Ok(());
    }
    match svc.backends.iter().find(|b| b.port != f.port) {
        Some(b) => Err(ConfigError::DsrPort {
            frontend: f,
            mode: svc.options.mode,
            addr: b.addr,
            port: b.port,
        }),
        None => Ok(()),
    }
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
    /// An empty table whose services' Maglev tables have `m` slots unless they choose.
    pub fn with_table_size(m: u32) -> ServiceTable {
        ServiceTable {
            services: BTreeMap::new(),
            next_id: 0,
            default_table_size: m,
        }
    }

    /// The Maglev table size of `svc`.
    pub fn table_size(&self, svc: &ServiceSpec) -> u32 {
        svc.options.table_size.unwrap_or(self.default_table_size)
    }

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
            Op::AddService {
                frontend,
                backends,
                options,
            } => {
                check_unicast("frontend address", frontend.addr)?;
                check_options(options)?;
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
                        options: *options,
                    },
                );
            }
            Op::SetOptions { frontend, options } => {
                check_options(options)?;
                let svc = next
                    .services
                    .get_mut(frontend)
                    .ok_or(ConfigError::NoService(*frontend))?;
                svc.options = *options;
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
            Op::SetWeight {
                frontend,
                addr,
                port,
                weight,
            } => {
                let svc = next
                    .services
                    .get_mut(frontend)
                    .ok_or(ConfigError::NoService(*frontend))?;
                let b = svc
                    .backends
                    .iter_mut()
                    .find(|b| b.same_endpoint(*addr, *port))
                    .ok_or(ConfigError::NoBackend {
                        frontend: *frontend,
                        addr: *addr,
                        port: *port,
                    })?;
                b.weight = *weight;
                check_backend(b)?;
            }
        }
        if let Some(svc) = op_frontend(op).and_then(|f| next.services.get(f)) {
            check_fits(svc, self.default_table_size)?;
            check_dsr_ports(svc)?;
        }
        Ok(next)
    }
}

fn op_frontend(op: &Op) -> Option<&Frontend> {
    match op {
        Op::AddService { frontend, .. }
        | Op::SetOptions { frontend, .. }
        | Op::AddBackend { frontend, .. }
        | Op::SetWeight { frontend, .. } => Some(frontend),
        Op::RemoveService { .. } | Op::RemoveBackend { .. } => None,
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
    fn option_parsing() {
        assert_eq!("client-ip".parse(), Ok(Affinity::ClientIp));
        assert_eq!("none".parse(), Ok(Affinity::None));
        assert!("clientip".parse::<Affinity>().is_err());
        assert_eq!("drop".parse(), Ok(OnRemove::Drop));
        assert!("rst".parse::<OnRemove>().is_err());
        assert_eq!(parse_duration_s("10800"), Ok(10_800));
        assert_eq!(parse_duration_s("3h"), Ok(10_800));
        assert_eq!(parse_duration_s("30m"), Ok(1_800));
        assert_eq!(parse_duration_s("90s"), Ok(90));
        for bad in ["", "h", "3d", "-1", "1.5h", "5000000h"] {
            assert!(parse_duration_s(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_offered_table_size_is_a_prime_maglev_takes() {
        for m in TABLE_SIZES {
            assert!(crate::maglev::is_prime(m), "{m}");
            assert!(m <= crate::maglev::MAX_TABLE_SIZE, "{m}");
        }
        assert!(TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn modes_parse_and_say_what_each_protocol_gets() {
        for m in Mode::ALL {
            assert_eq!(m.name().parse::<Mode>(), Ok(m));
            let json = serde_json::to_string(&m).expect("json");
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
        let e = "dsr".parse::<Mode>().expect_err("not a mode");
        assert!(e.contains("dsr-l2") && e.contains("hybrid-gue"), "{e}");
        assert_eq!(Mode::Hybrid.dsr(Proto::Tcp), Some(Dsr::L2));
        assert_eq!(Mode::Hybrid.dsr(Proto::Udp), None);
        assert_eq!(Mode::HybridGue.dsr(Proto::Tcp), Some(Dsr::Gue));
        assert_eq!(Mode::DsrIpip.dsr(Proto::Udp), Some(Dsr::Ipip));
        assert_eq!(Mode::Snat.dsr(Proto::Tcp), None);
    }

    #[test]
    fn dsr_services_keep_the_port_and_gue_port_needs_gue() {
        let f = fe("10.0.0.10:80/tcp");
        let dsr = ServiceOptions {
            mode: Mode::DsrIpip,
            ..ServiceOptions::default()
        };
        let add = |backends: Vec<BackendSpec>, options| Op::AddService {
            frontend: f,
            backends,
            options,
        };
        let t0 = ServiceTable::with_table_size(1021);
        let e = t0
            .apply(&add(vec![be("10.1.0.2:8080")], dsr))
            .expect_err("port differs");
        assert!(matches!(e, ConfigError::DsrPort { port: 8080, .. }), "{e}");
        assert!(
            e.to_string()
                .contains("must listen on the service's port 80"),
            "{e}"
        );
        let t = t0
            .apply(&add(vec![be("10.1.0.2:80")], dsr))
            .expect("same port");
        // A backend added later, and a mode change, are held to the same rule.
        assert!(t
            .apply(&Op::AddBackend {
                frontend: f,
                backend: be("10.1.0.3:81"),
            })
            .is_err());
        let snat = t0
            .apply(&add(vec![be("10.1.0.2:8080")], ServiceOptions::default()))
            .expect("snat maps ports");
        assert!(snat
            .apply(&Op::SetOptions {
                frontend: f,
                options: dsr,
            })
            .is_err());
        // Hybrid on a UDP service is SNAT: any port.
        let u = fe("10.0.0.10:53/udp");
        let hybrid = ServiceOptions {
            mode: Mode::Hybrid,
            ..ServiceOptions::default()
        };
        assert!(t0
            .apply(&Op::AddService {
                frontend: u,
                backends: vec![be("10.1.0.2:5353")],
                options: hybrid,
            })
            .is_ok());
        let gue_port = |mode| ServiceOptions {
            mode,
            gue_port: Some(7000),
            ..ServiceOptions::default()
        };
        assert_eq!(
            t0.apply(&add(vec![be("10.1.0.2:80")], gue_port(Mode::DsrIpip)))
                .err(),
            Some(ConfigError::GuePortWithoutGue(Mode::DsrIpip))
        );
        assert!(t0
            .apply(&add(vec![be("10.1.0.2:80")], gue_port(Mode::DsrGue)))
            .is_ok());
    }

    #[test]
    fn options_weights_and_table_sizes() {
        let f = fe("10.0.0.10:80/tcp");
        let t = ServiceTable::with_table_size(1021)
            .apply(&Op::AddService {
                frontend: f,
                backends: vec![be("10.1.0.2:80"), be("10.1.0.3:80")],
                options: ServiceOptions::default(),
            })
            .expect("add");
        // Weight changes in place; 0 drains (the backend stays, with its flows).
        let t = t
            .apply(&Op::SetWeight {
                frontend: f,
                addr: [10, 1, 0, 2].into(),
                port: 80,
                weight: 0,
            })
            .expect("drain");
        let svc = t.get(&f).expect("svc");
        assert_eq!(svc.backends.len(), 2);
        assert_eq!(svc.find([10, 1, 0, 2], 80).map(|b| b.weight), Some(0));
        assert_eq!(svc.find([10, 1, 0, 3], 80).map(|b| b.weight), Some(1));
        assert_eq!(svc.find([10, 1, 0, 4], 80), None);
        for bad in [
            Op::SetWeight {
                frontend: f,
                addr: [10, 1, 0, 9].into(),
                port: 80,
                weight: 1,
            },
            Op::SetWeight {
                frontend: f,
                addr: [10, 1, 0, 3].into(),
                port: 80,
                weight: MAX_WEIGHT + 1,
            },
            Op::SetOptions {
                frontend: f,
                options: ServiceOptions {
                    table_size: Some(1000),
                    ..ServiceOptions::default()
                },
            },
            Op::SetOptions {
                frontend: f,
                options: ServiceOptions {
                    affinity_timeout_s: Some(60),
                    ..ServiceOptions::default()
                },
            },
            Op::SetOptions {
                frontend: f,
                options: ServiceOptions {
                    affinity: Affinity::ClientIp,
                    affinity_timeout_s: Some(MAX_AFFINITY_TIMEOUT_S + 1),
                    ..ServiceOptions::default()
                },
            },
        ] {
            let e = t.apply(&bad).expect_err("rejected");
            assert!(!e.to_string().is_empty());
        }
        let opts = ServiceOptions {
            affinity: Affinity::ClientIp,
            affinity_timeout_s: Some(10_800),
            on_remove: OnRemove::Drop,
            table_size: Some(2039),
            mode: Mode::DsrGue,
            gue_port: Some(7000),
        };
        let t2 = t
            .apply(&Op::SetOptions {
                frontend: f,
                options: opts,
            })
            .expect("set");
        assert_eq!(t2.get(&f).map(|s| s.options), Some(opts));
        assert_eq!(t2.get(&f).map(|s| t2.table_size(s)), Some(2039));
        assert_eq!(t.get(&f).map(|s| t.table_size(s)), Some(1021));
        // A table smaller than the weighted backends is refused; drained ones take no slot.
        let many: Vec<BackendSpec> = (0..1022u32)
            .map(|i| BackendSpec {
                addr: Ipv4Addr::from(0x0a01_0000 + i + 1),
                port: 80,
                weight: 1,
            })
            .collect();
        let add = |backends: Vec<BackendSpec>| Op::AddService {
            frontend: fe("10.0.0.11:80/tcp"),
            backends,
            options: ServiceOptions::default(),
        };
        let e = t.apply(&add(many.clone())).expect_err("too small");
        assert!(e.to_string().contains("102200"), "{e}");
        let mut drained = many;
        drained[0].weight = 0;
        assert!(t.apply(&add(drained)).is_ok());
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
                options: ServiceOptions::default(),
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
                options: ServiceOptions::default(),
            })
            .expect("add");
        let bad = [
            Op::AddService {
                frontend: fe("10.0.0.10:80/tcp"),
                backends: vec![],
                options: ServiceOptions::default(),
            },
            Op::AddService {
                frontend: fe("0.0.0.0:80/tcp"),
                backends: vec![],
                options: ServiceOptions::default(),
            },
            Op::AddService {
                frontend: fe("10.0.0.11:0/tcp"),
                backends: vec![],
                options: ServiceOptions::default(),
            },
            Op::AddService {
                frontend: fe("10.0.0.11:80/tcp"),
                backends: vec![be("10.1.0.2:80"), be("10.1.0.2:80@2")],
                options: ServiceOptions::default(),
            },
            Op::AddService {
                frontend: fe("10.0.0.11:80/tcp"),
                backends: vec![be("10.1.0.2:80"), be("224.0.0.1:80")],
                options: ServiceOptions::default(),
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
