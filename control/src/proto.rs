//! The lbd control protocol, version 1.
//!
//! Newline-delimited JSON over a Unix stream socket: one request object per line, one
//! response object per line, in order. Every message carries `"version"`; a server
//! answers a version it does not speak with an `unsupported_version` error instead of
//! guessing. A request is validated whole before anything is applied (see
//! `lb::service::ServiceTable::apply`). See docs/protocol.md for examples.

use lb::service::{BackendSpec, Frontend, ServiceOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

pub const VERSION: u32 = 1;
/// Longest request line a server accepts.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    ServiceAdd {
        #[serde(with = "as_string")]
        frontend: Frontend,
        #[serde(default, with = "as_strings")]
        backends: Vec<BackendSpec>,
        /// Affinity, outcome of backend removal, table size (all optional).
        #[serde(default, skip_serializing_if = "ServiceOptions::is_default")]
        options: ServiceOptions,
    },
    /// Replace a service's options; backends and established flows stay.
    ServiceSet {
        #[serde(with = "as_string")]
        frontend: Frontend,
        options: ServiceOptions,
    },
    ServiceRemove {
        #[serde(with = "as_string")]
        frontend: Frontend,
    },
    BackendAdd {
        #[serde(with = "as_string")]
        frontend: Frontend,
        #[serde(with = "as_string")]
        backend: BackendSpec,
    },
    BackendRemove {
        #[serde(with = "as_string")]
        frontend: Frontend,
        address: Ipv4Addr,
        port: u16,
    },
    /// Change a backend's weight; 0 drains it (no new flows, established ones go on).
    BackendSetWeight {
        #[serde(with = "as_string")]
        frontend: Frontend,
        address: Ipv4Addr,
        port: u16,
        weight: u32,
    },
    // Empty struct variants rather than unit variants: serde ignores unknown fields on
    // internally tagged unit variants, and a misspelt option must be an error.
    ServiceList {},
    Status {},
    Stats {},
    /// Traffic by service and backend since lbd started (`lbctl stats --services`).
    ServiceStats {},
    /// Start capturing the frames the workers see (of one service and/or backend, or
    /// all), before and after translation; one capture at a time.
    CaptureStart {
        #[serde(default, with = "opt_string")]
        service: Option<Frontend>,
        #[serde(default)]
        backend: Option<Ipv4Addr>,
    },
    /// The frames captured since the last read.
    CaptureRead {},
    /// End the capture.
    CaptureStop {},
    /// What xlb would do with a packet `source` → `destination` and why.
    Explain {
        source: std::net::SocketAddrV4,
        destination: std::net::SocketAddrV4,
        /// "tcp", "udp".
        proto: String,
        /// The interface the packet arrives on (optional: any served one).
        #[serde(default)]
        iface: Option<String>,
    },
    /// Give a service's backends a health check (`check`), or none.
    ServiceHealth {
        #[serde(with = "as_string")]
        frontend: Frontend,
        #[serde(default)]
        check: Option<crate::health::HealthSpec>,
    },
    /// The effective non-masquerade list.
    IpmasqList {},
    /// What happens to a packet from `source` to `destination`, and why.
    IpmasqCheck {
        source: Ipv4Addr,
        destination: Ipv4Addr,
    },
    /// Active translations (load-balanced and masqueraded), at most `limit` per worker.
    NatList {
        #[serde(default)]
        limit: Option<usize>,
    },
    /// The desired state: every service with its backends and options.
    Export {},
    /// Make the services those of `state` in one change, or none; with `dry_run`, only
    /// say what would change.
    Apply {
        state: crate::desired::DesiredState,
        #[serde(default)]
        dry_run: bool,
    },
}

impl Request {
    /// Does it change lbd's configuration (and so is logged with who asked, and answered
    /// once per request id)?
    pub fn is_change(&self) -> bool {
        matches!(
            self,
            Request::ServiceAdd { .. }
                | Request::ServiceSet { .. }
                | Request::ServiceRemove { .. }
                | Request::BackendAdd { .. }
                | Request::BackendRemove { .. }
                | Request::BackendSetWeight { .. }
                | Request::ServiceHealth { .. }
                | Request::Apply { dry_run: false, .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub version: u32,
    /// Chosen by the client; a change sent again with the same id is not applied again
    /// (the first answer is repeated), so a client that timed out can retry safely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(flatten)]
    pub request: Request,
}

/// Longest request id.
pub const MAX_ID: usize = 128;

/// Machine-readable error classes; `message` says what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line is not a valid request object.
    BadRequest,
    UnsupportedVersion,
    /// The request is well-formed but the configuration rejects it.
    Invalid,
    /// The datapath could not apply a valid request (nothing was changed).
    Datapath,
    /// lbd is at its limit of control connections; try again.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

impl ErrorBody {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Done {
        message: String,
    },
    Services {
        services: Vec<ServiceView>,
    },
    Status(Box<StatusView>),
    Stats(StatsView),
    Ipmasq(IpmasqView),
    Check(CheckView),
    Nat(NatView),
    /// `export`: the desired state.
    State {
        state: crate::desired::DesiredState,
    },
    /// `apply`: what changed (or would, with `dry_run`), one line each.
    Applied {
        changes: Vec<String>,
        dry_run: bool,
    },
    /// `service_stats`: traffic by service and backend.
    ServiceStats {
        services: Vec<ServiceStatsView>,
    },
    Explain(ExplainView),
    /// `capture_read` and `capture_stop`: frames captured since the last read.
    Captured {
        frames: Vec<CapturedFrame>,
        /// Frames matched but not kept since the capture began (rate limit, full ring).
        dropped: u64,
        /// lbd's CLOCK_MONOTONIC now, ns (to date the frames).
        now_ns: u64,
    },
}

/// One frame a worker captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedFrame {
    pub worker: u16,
    /// "in": as the worker received it; "out": as it left after translation.
    pub direction: String,
    /// What the worker did with it ("sent", "dropped", ...).
    pub verdict: String,
    /// CLOCK_MONOTONIC, ns.
    pub ts_ns: u64,
    pub data: Vec<u8>,
}

/// `explain`: what xlb would do with a packet, and why (each step a line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainView {
    #[serde(flatten)]
    pub explained: lb::explain::Explained,
    /// A worker's flow already holds the 5-tuple: it decides (its backend and
    /// translation above).
    pub flow: Option<String>,
}

/// One service's traffic since lbd started, with each backend's (what `ipvsadm -L
/// --stats` shows). "In" is the client's direction (client → backend), "out" the
/// answers; bytes are IP bytes. The service's figures are its backends' sums (backends
/// removed since included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatsView {
    pub frontend: String,
    #[serde(flatten)]
    pub totals: TrafficView,
    pub backends: Vec<BackendStatsView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatsView {
    pub backend: String,
    #[serde(flatten)]
    pub totals: TrafficView,
}

/// Flows opened since start, flows live now, packets and bytes each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficView {
    pub flows: u64,
    pub active: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl TrafficView {
    pub fn add(&mut self, o: &TrafficView) {
        self.flows += o.flows;
        self.active += o.active;
        self.packets_in += o.packets_in;
        self.packets_out += o.packets_out;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
    }
}

/// One non-masquerade rule: the CIDR and where it comes from ("default",
/// "nonMasqueradeCIDRs", "masqLinkLocal: false", "this node", "--cluster-nodes",
/// "multicast/broadcast").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpmasqRule {
    pub cidr: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpmasqView {
    pub masquerade_from: Vec<String>,
    pub egress_address: Ipv4Addr,
    /// ip-masq-agent's list, as in effect (the defaults when the file gives none).
    pub non_masquerade: Vec<IpmasqRule>,
    /// Destinations never masqueraded whatever the list says.
    pub always_kept: Vec<IpmasqRule>,
    pub masq_link_local: bool,
    /// The watched file, if any, and the last error reading it (the last good list
    /// stays in effect).
    pub config: Option<String>,
    pub config_error: Option<String>,
    /// The list above is being applied: the workers have it, the XDP maps follow once
    /// every worker has said which flows it keeps (milliseconds).
    #[serde(default)]
    pub applying: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub masquerade: bool,
    /// E.g. "masquerade to 203.0.113.7 (no rule matches)".
    pub decision: String,
}

/// One active translation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranslationView {
    /// "masquerade", "snat" (load balancing), or a DSR forwarding: "dsr-l2", "dsr-ipip",
    /// "dsr-gue" (one direction: `packets_in` stays 0).
    pub kind: String,
    pub proto: String,
    /// The inside endpoint (pod, or the load-balanced client).
    pub inside: String,
    /// What the remote sees.
    pub outside: String,
    /// The far endpoint (remote, or backend).
    pub remote: String,
    pub state: String,
    /// Seconds since the last packet.
    pub idle_s: f64,
    pub worker: u16,
    /// Packets each way, by the worker and the XDP fast path together.
    pub packets_out: u64,
    pub packets_in: u64,
    /// Its two directions are executed in XDP (the fast path) now.
    #[serde(default)]
    pub fast_path: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatView {
    pub translations: Vec<TranslationView>,
    /// True when a worker had more flows than the limit.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasqStatusView {
    /// Interfaces masqueraded traffic leaves by (their XDP mode is in `interfaces`).
    pub egress_interfaces: Vec<String>,
    /// The first egress address; `egress_addresses` has the whole pool.
    pub egress_address: Ipv4Addr,
    #[serde(default)]
    pub egress_addresses: Vec<Ipv4Addr>,
    pub masquerade_from: Vec<String>,
    pub non_masquerade_rules: usize,
    pub config: Option<String>,
    pub config_error: Option<String>,
    /// Entries in the XDP keep map (flows masqueraded before a policy change).
    pub kept_flows: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub version: u32,
    /// The request's id, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ok { result: Reply },
    Error { error: ErrorBody },
}

impl ResponseEnvelope {
    pub fn ok(result: Reply) -> Self {
        ResponseEnvelope {
            version: VERSION,
            id: None,
            outcome: Outcome::Ok { result },
        }
    }
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        ResponseEnvelope {
            version: VERSION,
            id: None,
            outcome: Outcome::Error {
                error: ErrorBody {
                    kind,
                    message: message.into(),
                },
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    /// "active" (weight > 0), "draining" (weight 0, flows remain: they go on, no new
    /// ones come) or "drained" (weight 0, no flows left: safe to remove).
    pub state: String,
    /// Its live flows, over all workers.
    #[serde(default)]
    pub flows: u64,
    /// Share of the Maglev table, in percent.
    pub share: f64,
    /// Its next hop's MAC: "resolved", "resolving" (asked the kernel; first packets wait
    /// up to 1 s for it), or "no route".
    #[serde(default)]
    pub next_hop: String,
    /// With a health check: whether its probes say it is up, and the last probe's
    /// result and age ("up: HTTP 200, 0.4 s ago"). `state` is "unhealthy" while it is
    /// down (no new flows; its established flows go on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub id: u32,
    pub frontend: String,
    /// The forwarding mode (`lb::service::Mode`'s name), with GUE's port
    /// ("dsr-gue:6080"); what each protocol gets is `Mode::dsr`.
    pub mode: String,
    /// Affinity, affinity timeout, outcome of backend removal, chosen table size.
    #[serde(default)]
    pub options: ServiceOptions,
    pub backends: Vec<BackendView>,
    /// Digest of the Maglev table (16 hex digits): equal on every node that built the
    /// same table (same backends, weights, table size and hash seed).
    #[serde(default)]
    pub fingerprint: String,
    /// Maglev table size, and the largest gap between a backend's share and its
    /// weight's (percent of its ideal share): the paper's bound of M ≥ 100·N keeps it
    /// around 1 %.
    #[serde(default)]
    pub table_size: usize,
    #[serde(default)]
    pub worst_share_error_pct: f64,
    /// Its health check, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    pub ifindex: u32,
    pub mac: String,
    pub xdp_mode: String,
    /// It takes frames XDP redirects to it (see `lb::netview::IfaceInfo::redirect`):
    /// false means the fast path sends no flow out of it.
    #[serde(default = "yes")]
    pub takes_redirects: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    pub id: u16,
    pub queue: u32,
    pub core: Option<usize>,
    /// Inside endpoints with a NAT mapping on this worker (it owns their outside ports).
    pub mappings: u64,
    pub flows: u64,
    pub flow_capacity: u64,
    /// Flow directions the worker has in the XDP fast path.
    #[serde(default)]
    pub fast_path_entries: u64,
}

/// One address of the SNAT pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnatAddrView {
    pub address: Ipv4Addr,
    pub ports: String,
    /// Inside endpoints (clients) mapped onto it now, over all workers.
    #[serde(default)]
    pub mappings: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub interfaces: Vec<InterfaceView>,
    pub workers: Vec<WorkerView>,
    /// The load balancer's SNAT addresses (a client's flows all use the one its address
    /// hashes to).
    pub snat_pool: Vec<SnatAddrView>,
    /// `--snat-ports`: the egress address's ports (and a host-used SNAT address's).
    pub snat_ports: String,
    /// How NAT ports are dealt to workers.
    pub port_ownership: String,
    pub services: usize,
    pub flows: u64,
    pub neighbours: usize,
    pub routes: usize,
    /// None when masquerading is off.
    #[serde(default)]
    pub masquerading: Option<MasqStatusView>,
    /// Rx queues of served interfaces that no worker serves: frames that would go to
    /// a worker arriving there are dropped (`no_xsk_dropped`), never passed untranslated.
    #[serde(default)]
    pub unserved_queues: Vec<String>,
    /// Drops by reason, summed over workers (nonzero only).
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    /// Established flows are forwarded in XDP (`lbd --fast-path on`).
    #[serde(default)]
    pub fast_path: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub id: u16,
    pub rx: u64,
    pub tx: u64,
    pub handoff_out: u64,
    pub handoff_in: u64,
    pub flows_created: u64,
    pub flows_expired: u64,
    /// Frames held while their next hop was being resolved.
    pub held: u64,
    /// Forwarded untranslated (masquerade policy keeps the source).
    #[serde(default)]
    pub routed: u64,
    /// ICMP errors translated back to the inside host.
    #[serde(default)]
    pub icmp_errors: u64,
    /// Not-yet-established flows evicted for new ones while the table was full.
    #[serde(default)]
    pub flows_evicted: u64,
    /// Frames handed to the next worker to look for their flow (packets that moved
    /// queues); also in `handoff_out`.
    #[serde(default)]
    pub flow_probes: u64,
    /// Closed TCP flows reopened by a new SYN on their 5-tuple.
    #[serde(default)]
    pub flows_reopened: u64,
    /// Packets turned around between two inside hosts (hairpinning).
    #[serde(default)]
    pub hairpinned: u64,
    /// ICMP errors xlb originated (fragmentation needed, administratively prohibited).
    #[serde(default)]
    pub icmp_sent: u64,
    /// TCP resets sent to clients of removed backends.
    #[serde(default)]
    pub resets_sent: u64,
    /// Load-balanced flows opened by direct server return.
    #[serde(default)]
    pub dsr_flows: u64,
    /// Packets sent to backends inside an outer header (DSR over IPIP or GUE).
    #[serde(default)]
    pub encapsulated: u64,
    /// Flows taken over from the fast path a previous lbd left.
    #[serde(default)]
    pub flows_adopted: u64,
    /// Nonzero drop counters by reason.
    pub drops: BTreeMap<String, u64>,
}

impl WorkerStats {
    /// The wire form of worker `id`'s counters. The one place that maps `lb::Counters`
    /// onto the protocol, so a new counter cannot be forgotten in one of several copies.
    pub fn new(id: u16, c: &lb::Counters) -> WorkerStats {
        WorkerStats {
            id,
            rx: c.rx,
            tx: c.tx,
            handoff_out: c.handoff_out,
            handoff_in: c.handoff_in,
            flows_created: c.flows_created,
            flows_expired: c.flows_expired,
            held: c.held,
            routed: c.routed,
            icmp_errors: c.icmp_errors,
            flows_evicted: c.flows_evicted,
            flow_probes: c.flow_probes,
            flows_reopened: c.flows_reopened,
            hairpinned: c.hairpinned,
            icmp_sent: c.icmp_sent,
            resets_sent: c.resets_sent,
            dsr_flows: c.dsr_flows,
            encapsulated: c.encapsulated,
            flows_adopted: c.flows_adopted,
            drops: lb::DropReason::ALL
                .iter()
                .filter(|r| c.drops[**r as usize] > 0)
                .map(|r| (r.name().to_string(), c.drops[*r as usize]))
                .collect(),
        }
    }
}

/// The kernel's drop counters of one AF_XDP socket (`XDP_STATISTICS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStats {
    pub worker: u16,
    pub iface: String,
    pub queue: u32,
    /// rx_dropped, rx_invalid_descs, tx_invalid_descs, rx_ring_full,
    /// rx_fill_ring_empty_descs, tx_ring_empty_descs.
    pub kernel: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    pub workers: Vec<WorkerStats>,
    /// Every AF_XDP socket's kernel drop counters: losses before a worker sees a frame.
    #[serde(default)]
    pub sockets: Vec<SocketStats>,
    /// The XDP program's counters, summed over CPUs.
    pub xdp: BTreeMap<String, u64>,
}

/// Serde through `Display`/`FromStr`, so frontends and backends read as operators write
/// them ("10.0.0.10:80/tcp", "10.1.0.2:8080@2").
/// An optional value as its string form (`"VIP:PORT/tcp"`), or null.
pub(crate) mod opt_string {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

pub(crate) mod as_string {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

pub(crate) mod as_strings {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.to_string()))
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| s.parse().map_err(D::Error::custom))
            .collect()
    }
}

/// Parse one request line: the version is checked before the body, so a future
/// client's unknown request type gets `unsupported_version`, not a parse error.
/// A parsed request line: the request and the client's id for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub id: Option<String>,
    pub request: Request,
}

/// Reject JSON that names a key twice in one object: serde (and most parsers) keep the
/// last silently, so `{"port":80,"port":8080}` would mean whatever the parser chose.
fn no_duplicate_keys(line: &[u8]) -> Result<(), String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    struct Check;
    impl<'de> DeserializeSeed<'de> for Check {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(Check)
        }
    }
    impl<'de> Visitor<'de> for Check {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
            while a.next_element_seed(Check)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
            let mut seen: Vec<String> = Vec::new();
            while let Some(k) = a.next_key::<String>()? {
                if seen.contains(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate key \"{k}\"")));
                }
                a.next_value_seed(Check)?;
                seen.push(k);
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    Check.deserialize(&mut de).map_err(|e| e.to_string())
}

pub fn parse_request(line: &[u8]) -> Result<Parsed, ErrorBody> {
    let mut v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| ErrorBody::new(ErrorKind::BadRequest, format!("request is not JSON: {e}")))?;
    no_duplicate_keys(line).map_err(|e| ErrorBody::new(ErrorKind::BadRequest, e))?;
    match v.get("version").and_then(|x| x.as_u64()) {
        Some(n) if n == u64::from(VERSION) => {}
        Some(n) => {
            return Err(ErrorBody::new(
                ErrorKind::UnsupportedVersion,
                format!("protocol version {n} is not supported; this lbd speaks version {VERSION}"),
            ))
        }
        None => {
            return Err(ErrorBody::new(
                ErrorKind::BadRequest,
                "request lacks a numeric \"version\" field",
            ))
        }
    }
    // The envelope's own field goes; what remains must be exactly one request (serde's
    // `flatten` would silently accept unknown fields, so the envelope is not used here).
    let mut id = None;
    if let Some(o) = v.as_object_mut() {
        o.remove("version");
        match o.remove("id") {
            None => {}
            Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID => {
                id = Some(s)
            }
            Some(_) => {
                return Err(ErrorBody::new(
                    ErrorKind::BadRequest,
                    format!("\"id\" must be a string of 1 to {MAX_ID} bytes"),
                ))
            }
        }
    }
    let request = serde_json::from_value::<Request>(v)
        .map_err(|e| ErrorBody::new(ErrorKind::BadRequest, format!("bad request: {e}")))?;
    Ok(Parsed { id, request })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form() {
        let r = RequestEnvelope {
            version: 1,
            id: None,
            request: Request::ServiceAdd {
                frontend: "10.0.0.10:80/tcp".parse().expect("fe"),
                backends: vec!["10.1.0.2:8080@2".parse().expect("be")],
                options: ServiceOptions::default(),
            },
        };
        let s = serde_json::to_string(&r).expect("ser");
        assert_eq!(
            s,
            r#"{"version":1,"type":"service_add","frontend":"10.0.0.10:80/tcp","backends":["10.1.0.2:8080@2"]}"#
        );
        assert_eq!(
            parse_request(s.as_bytes()).map(|p| p.request),
            Ok(r.request)
        );
        let with_options = r#"{"version":1,"type":"service_add","frontend":"10.0.0.10:80/tcp","options":{"affinity":"client-ip","affinity_timeout_s":600,"on_remove":"drop","table_size":2039,"mode":"dsr-gue","gue_port":7000}}"#;
        assert_eq!(
            parse_request(with_options.as_bytes()).map(|p| p.request),
            Ok(Request::ServiceAdd {
                frontend: "10.0.0.10:80/tcp".parse().expect("fe"),
                backends: vec![],
                options: ServiceOptions {
                    affinity: lb::service::Affinity::ClientIp,
                    affinity_timeout_s: Some(600),
                    on_remove: lb::service::OnRemove::Drop,
                    table_size: Some(2039),
                    mode: lb::service::Mode::DsrGue,
                    gue_port: Some(7000),
                },
            })
        );
        let misspelt = with_options.replace("on_remove", "on_removal");
        let e = parse_request(misspelt.as_bytes()).expect_err("unknown option");
        assert!(e.message.contains("on_removal"), "{}", e.message);
        let with_id = r#"{"version":1,"id":"a-1","type":"status"}"#;
        assert_eq!(
            parse_request(with_id.as_bytes()),
            Ok(Parsed {
                id: Some("a-1".into()),
                request: Request::Status {}
            })
        );
    }

    #[test]
    fn duplicate_keys_and_bad_ids_are_refused() {
        for (line, needle) in [
            (
                r#"{"version":1,"type":"backend_remove","frontend":"10.0.0.10:80/tcp","address":"10.1.0.2","port":80,"port":8080}"#,
                "duplicate key \"port\"",
            ),
            (
                r#"{"version":1,"version":1,"type":"status"}"#,
                "duplicate key \"version\"",
            ),
            (r#"{"version":1,"id":7,"type":"status"}"#, "\"id\" must be"),
            (r#"{"version":1,"id":"","type":"status"}"#, "\"id\" must be"),
        ] {
            let e = parse_request(line.as_bytes()).expect_err(line);
            assert_eq!(e.kind, ErrorKind::BadRequest, "{line}");
            assert!(e.message.contains(needle), "{line}: {}", e.message);
        }
        // Nested objects are checked too; the same key in two objects is fine.
        assert!(no_duplicate_keys(br#"{"a":{"b":1,"b":2}}"#).is_err());
        assert!(no_duplicate_keys(br#"{"a":{"b":1},"c":{"b":2},"d":[{"b":1}]}"#).is_ok());
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: &[(&str, ErrorKind, &str)] = &[
            ("not json", ErrorKind::BadRequest, "not JSON"),
            (r#"{"type":"status"}"#, ErrorKind::BadRequest, "version"),
            (
                r#"{"version":2,"type":"status"}"#,
                ErrorKind::UnsupportedVersion,
                "version 2",
            ),
            (
                r#"{"version":1,"type":"launch"}"#,
                ErrorKind::BadRequest,
                "launch",
            ),
            (
                r#"{"version":1,"type":"service_add","frontend":"10.0.0.10:80"}"#,
                ErrorKind::BadRequest,
                "VIP:PORT/tcp",
            ),
            (
                r#"{"version":1,"type":"status","extra":1}"#,
                ErrorKind::BadRequest,
                "extra",
            ),
        ];
        for (line, kind, needle) in cases {
            let error = parse_request(line.as_bytes()).expect_err(line);
            assert_eq!(error.kind, *kind, "{line}");
            assert!(error.message.contains(needle), "{line}: {}", error.message);
        }
    }

    #[test]
    fn response_roundtrip() {
        let r = ResponseEnvelope::error(ErrorKind::Invalid, "no service 10.0.0.10:80/tcp");
        let s = serde_json::to_string(&r).expect("ser");
        assert_eq!(
            s,
            r#"{"version":1,"status":"error","error":{"kind":"invalid","message":"no service 10.0.0.10:80/tcp"}}"#
        );
        let back: ResponseEnvelope = serde_json::from_str(&s).expect("de");
        assert_eq!(back, r);
    }
}
