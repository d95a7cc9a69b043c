//! The immutable configuration a worker runs on between two batches.
//!
//! The control thread builds a new [`Snapshot`] for every accepted change (service table,
//! network view) and sends an `Arc` of it to each worker; workers swap it in between
//! batches, so a batch sees one snapshot whole. Maglev tables are built here, on the
//! control thread, never by a worker. Unchanged services keep their `Arc<ServiceState>`
//! (and Maglev table) from the previous snapshot.

use crate::maglev::{Maglev, MaglevBackend, MaglevError};
use crate::netview::NetView;
use crate::service::{BackendSpec, Frontend, ServiceSpec, ServiceTable};
use hashbrown::{HashMap, HashSet};
use nat::PortRange;
use std::sync::Arc;

const SEC: u64 = 1_000_000_000;

/// Idle timeouts in nanoseconds, by flow state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP flow that has seen only the client's SYN.
    pub tcp_syn: u64,
    /// TCP flow with traffic both ways.
    pub tcp_established: u64,
    /// TCP flow after a FIN in either direction. Longer than the remote's TIME_WAIT
    /// (Linux: 60 s, RFC 9293: 2 MSL = 4 min): the flow keeps its NAT port reserved, so a new
    /// connection from another inside host cannot take that port toward the same
    /// remote while the remote still holds the old connection. Reusing it would meet
    /// the remote's PAWS check with an unrelated TCP timestamp (per-connection offsets)
    /// and be dropped until retransmissions time out.
    pub tcp_fin: u64,
    /// TCP flow after a RST.
    pub tcp_rst: u64,
    pub udp: u64,
    /// ICMP echo flows (masquerading).
    pub icmp: u64,
    /// Established TCP flows forwarded by direct server return. xlb sees neither the
    /// backend's FIN nor its RST, so a closed connection looks established until it
    /// idles out; and an expired DSR flow loses nothing (its client's next segment
    /// reaches the backend Maglev gives it, the same while the backend set is
    /// unchanged). So shorter than SNAT's, as IPVS's direct routing: 15 min.
    pub dsr_established: u64,
}

impl Default for Timeouts {
    /// The NAT RFCs' minimums (see docs/nat-behaviour.md): established TCP 6 h (RFC 5382
    /// REQ-5: at least 2 h 4 min), every transitory TCP state (SYN seen, closing, reset)
    /// 4 min (REQ-5 and RFC 7857 §2.2), UDP 300 s (RFC 4787 REQ-5: at least 120 s, 300 s
    /// recommended), ICMP query 60 s (RFC 5508 REQ-1). Longer transitory timers do not
    /// reopen the spoofed-SYN exhaustion: a full table evicts flows that are not assured
    /// first (see the pipeline).
    fn default() -> Self {
        Timeouts {
            tcp_syn: TRANSITORY,
            tcp_established: 6 * 3600 * SEC,
            tcp_fin: TRANSITORY,
            tcp_rst: TRANSITORY,
            udp: 300 * SEC,
            icmp: 60 * SEC,
            dsr_established: 900 * SEC,
        }
    }
}

/// RFC 5382's transitory connection idle-timeout minimum (4 minutes).
const TRANSITORY: u64 = 240 * SEC;

/// A frontend as the datapath keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
}

impl From<&Frontend> for FrontendKey {
    fn from(f: &Frontend) -> Self {
        FrontendKey {
            addr: f.addr.octets(),
            port: f.port,
            proto: f.proto.number(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct ServiceState {
    pub spec: ServiceSpec,
    pub maglev: Maglev,
}

impl ServiceState {
    pub fn backend(&self, idx: usize) -> Option<&BackendSpec> {
        self.spec.backends.get(idx)
    }
}

/// One NAT address and the ports xlb may use on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatAddr {
    pub addr: [u8; 4],
    pub ports: PortRange,
}

/// The load balancer's SNAT addresses and the masquerading address's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatConfig {
    /// SNAT addresses for traffic to backends (a pool, never empty). All flows of one
    /// client address leave from the same one (RFC 4787 REQ-2, "paired" pooling).
    pub pool: Arc<[NatAddr]>,
    /// Ports of the egress (masquerading) address: a host address, so a range the host's
    /// own sockets do not use.
    pub ports: PortRange,
    /// The outer source of DSR tunnels (IPIP, GUE) to backends (`lbd --encap-source`);
    /// none: the address of the interface the tunnel leaves by.
    pub encap_source: Option<[u8; 4]>,
}

impl SnatConfig {
    /// A pool of one address with `ports`, also the masquerading address's ports.
    pub fn single(addr: [u8; 4], ports: PortRange) -> SnatConfig {
        SnatConfig {
            pool: Arc::from([NatAddr { addr, ports }]),
            ports,
            encap_source: None,
        }
    }

    /// The pool address the flows of `client` leave from: a fixed hash of the address,
    /// the same on every worker and across restarts.
    pub fn pick(&self, client: [u8; 4]) -> Option<NatAddr> {
        let n = self.pool.len();
        let h = u32::from_be_bytes(client).wrapping_mul(0x9E37_79B1) >> 8;
        self.pool.get(h as usize % n.max(1)).copied()
    }

    /// The ports of pool address `addr`, if it is one.
    pub fn range_of(&self, addr: [u8; 4]) -> Option<PortRange> {
        self.pool.iter().find(|a| a.addr == addr).map(|a| a.ports)
    }
}

/// Egress masquerading as the workers apply it.
#[derive(Debug)]
pub struct MasqState {
    /// Sources, node rules, the current non-masquerade policy, the egress address.
    pub rules: nat::Masquerade,
    /// The policy before the last change. A TCP segment with no flow that the previous
    /// policy left unmasqueraded belongs to a connection the kernel routed with its pod
    /// address: it keeps going that way instead of being dropped.
    pub previous: Option<Arc<nat::MasqPolicy>>,
    /// Changes with every policy change (workers rescan their flows then).
    pub version: u64,
    /// Whether unsolicited inbound packets reach a mapped pod (`--nat-filtering`).
    pub filtering: nat::Filtering,
}

#[derive(Debug)]
pub struct Snapshot {
    /// Increases with every snapshot; flows remember the one they were resolved under.
    pub generation: u64,
    pub services: HashMap<FrontendKey, Arc<ServiceState>>,
    /// Every frontend address: a packet from one of them is spoofed (martian).
    pub vips: Arc<HashSet<[u8; 4]>>,
    pub snat: SnatConfig,
    pub net: Arc<NetView>,
    pub timeouts: Timeouts,
    pub hash_seed: u64,
    pub workers: u16,
    /// Egress masquerading, when `--masquerade-from` is given.
    pub masq: Option<Arc<MasqState>>,
}

/// Datapath settings fixed at start-up.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub snat: SnatConfig,
    pub timeouts: Timeouts,
    pub maglev_size: u32,
    pub hash_seed: u64,
    pub workers: u16,
}

impl Snapshot {
    /// The NAT addresses per-address counts are kept for: the SNAT pool's, then the
    /// egress (masquerading) addresses not in it, with their ports.
    pub fn nat_addrs(&self) -> impl Iterator<Item = NatAddr> + '_ {
        let pool = &self.snat.pool;
        let egress = self
            .masq
            .iter()
            .flat_map(|m| m.rules.egress_pool().iter())
            .map(|e| e.octets())
            .filter(move |e| !pool.iter().any(|a| a.addr == *e))
            .map(|addr| NatAddr {
                addr,
                ports: self.snat.ports,
            });
        pool.iter().copied().chain(egress)
    }

    /// Where `addr` stands in [`Snapshot::nat_addrs`].
    pub fn nat_position(&self, addr: [u8; 4]) -> Option<usize> {
        self.nat_addrs().position(|a| a.addr == addr)
    }

    /// Build the snapshot for `table`, reusing service states (and their Maglev tables)
    /// from `prev` where the spec is unchanged.
    pub fn build(
        generation: u64,
        cfg: &DatapathConfig,
        table: &ServiceTable,
        net: Arc<NetView>,
        prev: Option<&Snapshot>,
    ) -> Result<Snapshot, MaglevError> {
        let mut services = HashMap::with_capacity(table.len());
        for spec in table.services() {
            let key = FrontendKey::from(&spec.frontend);
            let reused = prev
                .and_then(|p| p.services.get(&key))
                .filter(|s| s.spec == *spec)
                .cloned();
            let state = match reused {
                Some(s) => s,
                None => {
                    let mb: Vec<MaglevBackend> = spec
                        .backends
                        .iter()
                        .map(|b| MaglevBackend {
                            name: b.maglev_name(),
                            weight: b.weight,
                        })
                        .collect();
                    Arc::new(ServiceState {
                        spec: spec.clone(),
                        maglev: Maglev::build(
                            &mb,
                            spec.options.table_size.unwrap_or(cfg.maglev_size),
                            cfg.hash_seed,
                        )?,
                    })
                }
            };
            services.insert(key, state);
        }
        let vips = Arc::new(services.keys().map(|k| k.addr).collect());
        Ok(Snapshot {
            generation,
            vips,
            services,
            snat: cfg.snat.clone(),
            net,
            timeouts: cfg.timeouts,
            hash_seed: cfg.hash_seed,
            workers: cfg.workers,
            masq: prev.and_then(|p| p.masq.clone()),
        })
    }

    /// Same services, new network view (after a neighbour or route change).
    pub fn with_net(&self, generation: u64, net: Arc<NetView>) -> Snapshot {
        Snapshot {
            generation,
            services: self.services.clone(),
            vips: Arc::clone(&self.vips),
            snat: self.snat.clone(),
            net,
            timeouts: self.timeouts,
            hash_seed: self.hash_seed,
            workers: self.workers,
            masq: self.masq.clone(),
        }
    }

    /// Same everything, another masquerading state.
    pub fn with_masq(&self, generation: u64, masq: Option<Arc<MasqState>>) -> Snapshot {
        Snapshot {
            generation,
            masq,
            ..self.with_net(generation, Arc::clone(&self.net))
        }
    }
}
