//! `lbd`'s state and its control-request handler, on the control thread.
//!
//! The control thread owns the configuration (the service table), the steering program,
//! the netlink socket and the workers' handles. A request is validated whole
//! (`ServiceTable::apply`, Maglev build), then applied in an order that keeps every
//! steered packet handled the same by the old and the new configuration (see
//! [`xdp::bpf`]): stale map entries out, new snapshot to the workers, new entries in.
//! A datapath failure restores the previous state and reports it; nothing half-applies.
//!
//! Periodically ([`Handler::tick`]) it asks the kernel to resolve neighbours the workers
//! could not find, and re-reads routes and neighbours; a changed view becomes a new
//! snapshot (flows pick up new MACs lazily). With masquerading it also re-reads the
//! ip-masq-agent file; a changed, valid policy is applied in the order that keeps
//! established flows translated: new snapshot to the workers; each worker marks the
//! masqueraded flows the new policy would not masquerade and reports them; those
//! 5-tuples go into the XDP keep map; only then do the XDP tries learn the new policy.
//! An invalid file is reported (log, `lbctl status`, `lbctl ipmasq list`) and the last
//! good policy stays.

use control::desired::DesiredState;
use control::proto::{
    BackendStatsView, BackendView, CheckView, ErrorKind, ExplainView, InterfaceView, IpmasqRule,
    IpmasqView, MasqStatusView, NatView, Outcome, Reply, Request, ResponseEnvelope,
    ServiceStatsView, ServiceView, SocketStats, StatsView, StatusView, TrafficView,
    TranslationView, WorkerStats, WorkerView,
};
use control::server::{Handler, Peer};
use control::txn::Datapath as _;
use crossbeam_channel::{Receiver, Sender};
use lb::flow::{FlowKey, FlowKind};
use lb::netview::{NetView, NextHopError};
use lb::service::{Op, ServiceTable};
use lb::snapshot::{DatapathConfig, MasqState, NatAddr, SnatConfig};
use lb::{Snapshot, Timeouts};
use nat::{Cidr, MasqPolicy, PortRange};
use ringbuf::traits::Split;
use ringbuf::HeapRb;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use xdp::abi::Stat;
use xdp::bpf::{Entry, EntryValue, Steering, SteeringState, MAX_IFACES, MAX_QUEUES};
use xdp::netlink::{local_port_range, Netlink};
use xdp::sys::IoConfig;
use xdp::worker::WorkerRequest;
use xdp::worker::{self, WorkerShared, WorkerSpec, HANDOFF_RING_BYTES};

/// How often routes and neighbours are re-read.
const REFRESH: Duration = Duration::from_secs(1);
/// How soon after asking for a resolution the view is re-read.
const RESOLVE_RECHECK: Duration = Duration::from_millis(30);
/// One resolution request per address per this long.
const RESOLVE_BACKOFF: Duration = Duration::from_secs(1);
/// How often the ip-masq-agent file is re-read.
const MASQ_CONFIG_CHECK: Duration = Duration::from_secs(1);
/// How long the control thread waits for a worker's answer.
const WORKER_ANSWER: Duration = Duration::from_secs(2);

/// Egress masquerading options (`--masquerade-from` and friends).
#[derive(Debug, Clone)]
pub struct MasqOptions {
    pub from: Vec<Cidr>,
    /// The interface masqueraded traffic leaves by [default: the last --iface].
    pub egress_iface: Option<String>,
    /// Egress addresses, a pool when more than one [default: the egress interface's
    /// primary IPv4].
    pub egress_addrs: Vec<Ipv4Addr>,
    /// ip-masq-agent's YAML file, watched.
    pub config: Option<PathBuf>,
    /// Destinations never masqueraded: the cluster's nodes.
    pub cluster_nodes: Vec<Cidr>,
    /// Which unsolicited inbound packets reach a mapped pod.
    pub filtering: nat::Filtering,
}

/// Masquerading as the control thread runs it.
#[derive(Debug)]
struct MasqRuntime {
    egress_iface: String,
    config: Option<PathBuf>,
    /// The file's content last read (None: not read yet or unreadable).
    config_text: Option<String>,
    config_error: Option<String>,
    next_check: Instant,
}

/// The ip-masq-agent file's text; a missing file reads as empty (the defaults), as for
/// ip-masq-agent.
fn read_config(path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// Read and parse the ip-masq-agent file.
fn read_policy(path: &std::path::Path) -> Result<(MasqPolicy, String), String> {
    let text = read_config(path)?;
    MasqPolicy::from_yaml(&text)
        .map(|p| (p, text))
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub ifaces: Vec<String>,
    /// Seed of the flow hash and the Maglev permutations (`--hash-seed-file`): the same
    /// on every node of a tier gives identical tables; secret, it keeps the choice of
    /// backend unpredictable to clients.
    pub hash_seed: u64,
    /// SNAT pool (`--snat-addr`); empty: the last interface's primary address.
    pub snat_addrs: Vec<nat::NatAddrSpec>,
    pub snat_ports: PortRange,
    /// Outer source of DSR tunnels (`--encap-source`); none: the egress interface's.
    pub encap_source: Option<Ipv4Addr>,
    pub queues: Option<u32>,
    pub cores: Vec<usize>,
    pub flows_per_worker: usize,
    pub maglev_size: u32,
    pub timeouts: Timeouts,
    pub io: IoConfig,
    pub busy_poll_ns: u64,
    pub masq: Option<MasqOptions>,
    /// Execute established flows in XDP (`--fast-path on`).
    pub fast_path: bool,
    /// Where the program's links and the fast path's maps are pinned (`--pin-dir`), so
    /// that established flows outlive lbd; none: the program leaves with lbd.
    pub pin_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Netlink(#[from] xdp::netlink::NetlinkError),
    #[error(transparent)]
    Bpf(#[from] xdp::bpf::BpfError),
    #[error("starting worker {worker} (queue {queue}): {reason}")]
    Worker {
        worker: u16,
        queue: u32,
        reason: String,
    },
}

struct WorkerHandle {
    id: u16,
    queue: u32,
    core: Option<usize>,
    snapshots: Sender<Arc<Snapshot>>,
    requests: Sender<WorkerRequest>,
    shared: Arc<WorkerShared>,
}

pub struct Daemon {
    cfg: DatapathConfig,
    ifaces: Vec<String>,
    flows_per_worker: usize,
    fast_path: bool,
    table: ServiceTable,
    steering: Steering,
    snap: Arc<Snapshot>,
    workers: Vec<WorkerHandle>,
    threads: Vec<JoinHandle<()>>,
    netlink: Netlink,
    resolve_rx: Receiver<[u8; 4]>,
    unkept_rx: Receiver<FlowKey>,
    masq: Option<MasqRuntime>,
    resolving: HashMap<[u8; 4], Instant>,
    next_refresh: Instant,
    stop: Arc<AtomicBool>,
    /// `iface:queue` pairs no worker serves.
    unserved: Vec<String>,
    /// The node's own IPv4 addresses (at start).
    local: Vec<Ipv4Addr>,
    /// Where every committed service change is written (`--state-file`), if anywhere.
    state_file: Option<std::path::PathBuf>,
    /// Why lbd must stop (an interface vanished); read by `lbd` after the loop ends.
    fatal: Option<String>,
    /// What a previous lbd left pinned, until [`Daemon::resume`] takes it over.
    handover: Option<Handover>,
    /// A masquerading-policy change waiting for the workers' answers.
    policy_pending: Option<PendingPolicy>,
    /// Scrapes waiting for an answer (`--metrics-addr`).
    metrics: Option<Receiver<crate::metrics::Scrape>>,
    /// The most ports of each SNAT pool address held at once.
    pool_high_water: Vec<u64>,
    /// Health checks by service (the operator's; in the state file).
    health: control::desired::HealthChecks,
    /// Each checked backend's state by its probes, by (service, backend).
    checked: HashMap<crate::prober::Key, Checked>,
    /// The thread running the probes.
    prober: Option<crate::prober::Prober>,
    /// A packet capture running (`lbctl capture`).
    capture: Option<CaptureRun>,
}

/// A capture: each worker's ring, when lbctl last read, and the workers' dropped
/// counts when it began.
struct CaptureRun {
    rings: Vec<ringbuf::HeapCons<u8>>,
    last_read: Instant,
    dropped_at_start: u64,
}

impl std::fmt::Debug for CaptureRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureRun")
            .field("rings", &self.rings.len())
            .finish()
    }
}

/// Bytes of captured records a worker's ring holds between two reads.
const CAPTURE_RING: usize = 4 << 20;
/// A capture nobody has read for this long ends (lbctl went away).
const CAPTURE_IDLE: Duration = Duration::from_secs(5);
/// Frames one read returns at most.
const CAPTURE_READ: usize = 2000;

/// A checked backend: its state, and the last probe's result and when.
#[derive(Debug, Default)]
struct Checked {
    tracker: control::health::Tracker,
    last: Option<(bool, String, Instant)>,
}

/// A masquerading-policy change between its two halves (see `Daemon::apply_policy`).
#[derive(Debug)]
struct PendingPolicy {
    /// The snapshot before the change: back to it if the XDP maps refuse the change.
    before: Arc<Snapshot>,
    /// Workers yet to say which flows the new policy keeps.
    answers: Vec<(u16, Receiver<Vec<FlowKey>>)>,
    deadline: Instant,
    kept: usize,
}

/// A previous lbd's datapath, found pinned at start: the fast path's entries (still
/// executing, under the generation it left in `fp_generation`) and the interfaces whose
/// program is still its own. Until [`Daemon::resume`], lbd leaves both alone.
#[derive(Debug)]
struct Handover {
    entries: Vec<(flowrec::FlowKey, flowrec::FlowEntry)>,
    ifaces: Vec<String>,
}

/// The datapath a transaction changes: the steering maps, and the workers' snapshot
/// (published with the fast path's generation first, so entries resolved under an older
/// snapshot stop before any worker runs this one; a previous lbd's entries keep
/// executing until [`Daemon::resume`]).
struct Live<'a> {
    steering: &'a mut Steering,
    workers: &'a [WorkerHandle],
    snap: &'a mut Arc<Snapshot>,
    handover: bool,
}

impl control::txn::Datapath for Live<'_> {
    type Key = Entry;
    type Value = EntryValue;
    type Snapshot = Snapshot;
    type Error = xdp::bpf::BpfError;

    fn put(&mut self, k: &Entry, v: &EntryValue) -> Result<(), Self::Error> {
        self.steering.put(k, v)
    }

    fn del(&mut self, k: &Entry) -> Result<(), Self::Error> {
        self.steering.del(k)
    }

    fn publish(&mut self, snap: Snapshot) {
        if !self.handover {
            if let Err(e) = self.steering.set_fast_path_generation(snap.generation) {
                tracing::error!(error = %e, "fast-path generation not updated");
            }
        }
        let snap = Arc::new(snap);
        for w in self.workers {
            if w.snapshots.try_send(Arc::clone(&snap)).is_err() {
                tracing::error!(worker = w.id, "worker is not taking snapshots (stuck?)");
            }
            w.shared.wake();
        }
        *self.snap = snap;
    }
}

/// What [`Daemon::resume`] did with a previous lbd's fast-path flows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Adoption {
    /// Flows now in this lbd's workers.
    pub adopted: usize,
    /// Flows refused (their service is gone, their interface, ...): their entries were
    /// removed.
    pub refused: usize,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("ifaces", &self.ifaces)
            .finish()
    }
}

/// Number of rx queues of `iface` (from sysfs).
fn rx_queues(iface: &str) -> Result<u32, DaemonError> {
    let dir = format!("/sys/class/net/{iface}/queues");
    let n = std::fs::read_dir(&dir)
        .map_err(|e| {
            DaemonError::Config(format!(
                "cannot read {dir}: {e} (does interface {iface} exist?)"
            ))
        })?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(n.max(1) as u32)
}

/// Why `a` cannot be one end of translated traffic (a SNAT, egress or backend address),
/// if it cannot.
pub fn unusable_source(a: Ipv4Addr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("0.0.0.0 is not a host's address")
    } else if a.is_broadcast() {
        Some("the limited broadcast address is not a host's")
    } else if a.is_multicast() {
        Some("a multicast address is not a host's")
    } else if a.is_loopback() {
        Some("a loopback address never leaves the host")
    } else if a.octets()[0] >= 240 {
        Some("240.0.0.0/4 is reserved")
    } else {
        None
    }
}

/// Ports a dedicated SNAT address (one the host does not use for its own traffic) gets
/// unless `--snat-addr` says otherwise: all of them, so an inside port of either class
/// (below 1024 or not) can be kept.
pub const DEDICATED_PORTS: PortRange = PortRange {
    first: 1,
    last: u16::MAX,
};

/// The largest gap between a backend's slots and its weight's ideal share of `total`,
/// in percent of that ideal (0 without weighted backends).
fn worst_share_error(backends: &[lb::service::BackendSpec], slots: &[usize], total: usize) -> f64 {
    let sum: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if sum == 0 {
        return 0.0;
    }
    let worst = backends
        .iter()
        .zip(slots)
        .filter(|(b, _)| b.weight > 0)
        .map(|(b, &n)| {
            let ideal = total as f64 * f64::from(b.weight) / sum as f64;
            (n as f64 - ideal).abs() / ideal * 100.0
        })
        .fold(0.0, f64::max);
    (worst * 100.0).round() / 100.0
}

/// Whether the host uses `a` for its own traffic: the primary address of a served
/// interface (what the kernel picks as source there).
fn host_used(net: &lb::netview::NetView, a: Ipv4Addr) -> bool {
    net.ifaces.iter().any(|i| i.addr == Some(a.octets()))
}

/// The SNAT pool from `--snat-addr`: each address with its ports (given, else
/// `--snat-ports` on a host-used address, else [`DEDICATED_PORTS`]); without the flag,
/// the last interface's primary address with `--snat-ports`.
fn snat_pool(
    dc: &DaemonConfig,
    net: &lb::netview::NetView,
    local: &[Ipv4Addr],
) -> Result<Vec<NatAddr>, DaemonError> {
    let mut pool: Vec<NatAddr> = Vec::new();
    if dc.snat_addrs.is_empty() {
        let a = net.ifaces.last().and_then(|i| i.addr).ok_or_else(|| {
            DaemonError::Config(format!(
                "interface {} has no IPv4 address to use for SNAT; pass --snat-addr",
                dc.ifaces.last().map(String::as_str).unwrap_or("?")
            ))
        })?;
        pool.push(NatAddr {
            addr: a,
            ports: dc.snat_ports,
        });
    }
    for spec in &dc.snat_addrs {
        for a in spec.addrs() {
            let bad = |why: String| DaemonError::Config(format!("--snat-addr {a}: {why}"));
            if let Some(why) = unusable_source(a) {
                return Err(bad(why.into()));
            }
            if pool.iter().any(|p| p.addr == a.octets()) {
                return Err(bad("given twice".into()));
            }
            if !local.contains(&a) {
                return Err(bad(format!(
                    "not an address of this node, so nobody answers ARP for it and the backends' replies \
                     never arrive; add it (e.g. ip addr add {a}/32 dev {})",
                    dc.ifaces.last().map(String::as_str).unwrap_or("IFACE")
                )));
            }
            let host = host_used(net, a);
            let ports = spec
                .ports
                .unwrap_or(if host { dc.snat_ports } else { DEDICATED_PORTS });
            tracing::info!(addr = %a, %ports, dedicated = !host, "SNAT address");
            pool.push(NatAddr {
                addr: a.octets(),
                ports,
            });
        }
    }
    if pool.len() > nat::MAX_POOL {
        return Err(DaemonError::Config(format!(
            "--snat-addr: {} addresses, at most {} are supported",
            pool.len(),
            nat::MAX_POOL
        )));
    }
    Ok(pool)
}

/// Whether a socket of this node (this network namespace) would take `addr:port`:
/// a listening TCP socket, or an unconnected UDP one, on that address or the wildcard
/// (IPv6 dual-stack sockets included). Unreadable tables count as no.
fn local_listener(addr: Ipv4Addr, port: u16, proto: lb::service::Proto) -> bool {
    use procfs::net::{TcpState, UdpState};
    use std::net::{IpAddr, SocketAddr};
    let takes = |a: SocketAddr| {
        a.port() == port
            && match a.ip() {
                IpAddr::V4(v4) => v4.is_unspecified() || v4 == addr,
                IpAddr::V6(v6) => v6.is_unspecified() || v6.to_ipv4_mapped() == Some(addr),
            }
    };
    match proto {
        lb::service::Proto::Tcp => [procfs::net::tcp(), procfs::net::tcp6()]
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.state == TcpState::Listen && takes(e.local_address)),
        lb::service::Proto::Udp => [procfs::net::udp(), procfs::net::udp6()]
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.state == UdpState::Close && takes(e.local_address)),
    }
}

/// What the XDP maps must hold for `table` and the masquerading state of `snap`.
fn steering_state(table: &ServiceTable, cfg: &DatapathConfig, snap: &Snapshot) -> SteeringState {
    let s = SteeringState::new(table, &cfg.snat.pool);
    match &snap.masq {
        Some(m) => s.with_masq(&m.rules, cfg.snat.ports),
        None => s,
    }
}

/// An endpoint as `lbctl nat list` shows it: `addr:port`, or `addr id N` for ICMP echo.
fn endpoint(addr: [u8; 4], port: u16, proto: u8) -> String {
    if proto == lb::wire::ipv4::PROTO_ICMP {
        format!("{} id {port}", Ipv4Addr::from(addr))
    } else {
        format!("{}:{port}", Ipv4Addr::from(addr))
    }
}

fn translation(c: &xdp::worker::FlowCopy, worker: u16, now: u64) -> TranslationView {
    let f = &c.flow;
    let (k, out) = (f.keys[0], f.rewrite[0]);
    let proto = match k.proto {
        lb::wire::ipv4::PROTO_TCP => "tcp",
        lb::wire::ipv4::PROTO_UDP => "udp",
        _ => "icmp",
    };
    let kind = match (f.kind, f.one_way()) {
        (FlowKind::Masq, _) => "masquerade",
        (FlowKind::Lb, false) => "snat",
        (FlowKind::Lb, true) => out.fwd.name(),
    };
    // A DSR flow keeps the client's address: its "outside" is the client itself (L2)
    // or the tunnel's source.
    let outside = match out.fwd {
        lb::flow::Forwarding::Nat => endpoint(out.src, out.sport, k.proto),
        lb::flow::Forwarding::L2Dsr => endpoint(k.src, k.sport, k.proto),
        _ => format!("{} (tunnel)", Ipv4Addr::from(out.src)),
    };
    TranslationView {
        kind: kind.into(),
        proto: proto.into(),
        inside: endpoint(k.src, k.sport, k.proto),
        outside,
        // An echo's remote has no identifier of its own; a DSR flow's is its backend.
        remote: if k.proto == lb::wire::ipv4::PROTO_ICMP {
            Ipv4Addr::from(out.dst).to_string()
        } else if f.one_way() {
            let (addr, port) = f.backend();
            endpoint(addr, port, k.proto)
        } else {
            endpoint(out.dst, out.dport, k.proto)
        },
        state: f.state.name().into(),
        idle_s: (now.saturating_sub(f.last_seen) as f64 / 1e9 * 10.0).round() / 10.0,
        worker,
        packets_out: u64::from(f.packets[0]) + c.fast_packets[0],
        packets_in: u64::from(f.packets[1]) + c.fast_packets[1],
        fast_path: f.fast,
    }
}

/// With the fast path on, every served interface must take frames redirected by XDP
/// (the fast path sends each flow out of its egress interface that way; the kernel's
/// word, read with the interfaces: `IfaceInfo::redirect`): refused at start, with what
/// to do, rather than dropped silently later.
fn check_redirect_targets(ifaces: &[lb::netview::IfaceInfo]) -> Result<(), DaemonError> {
    match ifaces.iter().find(|i| !i.redirect) {
        Some(i) => Err(DaemonError::Config(format!(
            "interface {} cannot take frames redirected by XDP (its XDP features lack \
             ndo_xdp_xmit), which the fast path needs: on a veth, turn GRO on at its peer \
             (ethtool -K PEER gro on) or attach an XDP program there; on a NIC, its driver \
             must support XDP_REDIRECT as a target; or start lbd with --fast-path off",
            i.name
        ))),
        None => Ok(()),
    }
}

impl Daemon {
    /// Read the kernel's view, attach the program, start the workers.
    pub fn start(dc: DaemonConfig, stop: Arc<AtomicBool>) -> Result<Daemon, DaemonError> {
        if dc.ifaces.is_empty() || dc.ifaces.len() > MAX_IFACES {
            return Err(DaemonError::Config(format!(
                "give 1 to {MAX_IFACES} interfaces with --iface"
            )));
        }
        let available = core_affinity::get_core_ids().unwrap_or_default();
        if let Some(c) = dc
            .cores
            .iter()
            .find(|c| !available.iter().any(|a| a.id == **c))
        {
            return Err(DaemonError::Config(format!(
                "--cores: core {c} does not exist (this machine has cores {})",
                available
                    .iter()
                    .map(|a| a.id.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )));
        }
        let mut nl = Netlink::open()?;
        let net = nl.dump(&dc.ifaces)?;
        let local = nl.ipv4_addrs(None)?;
        let pool = snat_pool(&dc, &net, &local)?;
        let mut masq = None;
        let mut masq_state = None;
        if let Some(o) = &dc.masq {
            if o.from.is_empty() {
                return Err(DaemonError::Config(
                    "masquerading needs at least one --masquerade-from CIDR".into(),
                ));
            }
            let egress_iface = o
                .egress_iface
                .clone()
                .or_else(|| dc.ifaces.last().cloned())
                .unwrap_or_default();
            let iface = net
                .ifaces
                .iter()
                .find(|i| i.name == egress_iface)
                .ok_or_else(|| {
                    DaemonError::Config(format!(
                        "--egress-iface {egress_iface} is not one of the --iface interfaces"
                    ))
                })?;
            let egress = match o.egress_addrs.first().copied().or(iface.addr.map(Ipv4Addr::from)) {
                Some(a) => a,
                None => {
                    return Err(DaemonError::Config(format!(
                        "interface {egress_iface} has no IPv4 address to masquerade to; pass --egress-addr"
                    )))
                }
            };
            if o.egress_addrs.len() > nat::MAX_POOL {
                return Err(DaemonError::Config(format!(
                    "--egress-addr: {} addresses, at most {} are supported",
                    o.egress_addrs.len(),
                    nat::MAX_POOL
                )));
            }
            // A second egress address must be this node's, or nobody answers ARP for it.
            if let Some(a) = o.egress_addrs.iter().skip(1).find(|a| !local.contains(a)) {
                return Err(DaemonError::Config(format!(
                    "--egress-addr {a}: not an address of this node, so replies to it never arrive; add it \
                     (e.g. ip addr add {a}/32 dev {egress_iface})"
                )));
            }
            let (policy, text) = match &o.config {
                Some(path) => {
                    let (p, t) = read_policy(path).map_err(DaemonError::Config)?;
                    (p, Some(t))
                }
                None => (MasqPolicy::defaults(), None),
            };
            let rules = nat::Masquerade::new(
                o.from.clone(),
                Arc::new(policy),
                egress,
                &local,
                &o.cluster_nodes,
            )
            .with_egress_pool(o.egress_addrs.clone());
            masq_state = Some(Arc::new(MasqState {
                rules,
                previous: None,
                version: 1,
                filtering: o.filtering,
            }));
            masq = Some(MasqRuntime {
                egress_iface,
                config: o.config.clone(),
                config_text: text,
                config_error: None,
                next_check: Instant::now() + MASQ_CONFIG_CHECK,
            });
        }
        let egress_addrs: Vec<Ipv4Addr> = masq_state
            .as_ref()
            .map(|m| m.rules.egress_pool().to_vec())
            .unwrap_or_default();
        for &e in &egress_addrs {
            if let Some(why) = unusable_source(e) {
                return Err(DaemonError::Config(format!("--egress-addr {e}: {why}")));
            }
            if let Some(p) = pool.iter().find(|p| p.addr == e.octets()) {
                if p.ports != dc.snat_ports {
                    return Err(DaemonError::Config(format!(
                        "{e} is both the egress address and a SNAT address with other ports ({}): masquerading \
                         uses --snat-ports ({}) on it; give it those",
                        p.ports, dc.snat_ports
                    )));
                }
            }
        }
        // The host's own addresses share ports with its sockets.
        let host_ranges = pool
            .iter()
            .map(|p| (Ipv4Addr::from(p.addr), p.ports, "--snat-addr"))
            .chain(
                egress_addrs
                    .iter()
                    .map(|e| (*e, dc.snat_ports, "--egress-addr")),
            )
            .filter(|(a, _, _)| host_used(&net, *a));
        for (addr, ports, flag) in host_ranges {
            if let Some((lo, hi)) = local_port_range() {
                if ports.first <= hi && lo <= ports.last {
                    return Err(DaemonError::Config(format!(
                        "NAT ports {ports} overlap the host's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range) on \
                         {addr}, a host address: replies to the host's own connections would be taken. Choose \
                         --snat-ports outside {lo}-{hi} or a dedicated {flag}"
                    )));
                }
            }
        }
        let mut queues = u32::MAX;
        let mut per_iface = Vec::new();
        for i in &dc.ifaces {
            let n = rx_queues(i)?;
            per_iface.push((i.clone(), n));
            queues = queues.min(n);
        }
        if let Some(q) = dc.queues {
            if q == 0 || q > queues {
                return Err(DaemonError::Config(format!(
                    "--queues {q}: the interfaces have {queues} rx queue(s)"
                )));
            }
            queues = q;
        }
        let queues = queues.min(MAX_QUEUES);
        // A queue without a worker cannot translate: the XDP program drops (and counts)
        // what it would steer there. Say so loudly: the fix is the NIC's channel count.
        let unserved: Vec<String> = per_iface
            .iter()
            .flat_map(|(i, n)| (queues..*n).map(move |q| format!("{i}:{q}")))
            .collect();
        for (i, n) in per_iface.iter().filter(|(_, n)| *n > queues) {
            tracing::warn!(
                iface = %i,
                rx_queues = n,
                served = queues,
                "rx queues {queues}..{n} of {i} have no worker: service and masquerade traffic RSS puts there is \
                 DROPPED (counted as no_xsk_dropped), never passed untranslated. Serve every queue \
                 (--queues {n}) or reduce the NIC's channels (ethtool -L {i} combined {queues})"
            );
        }
        if let Some(a) = dc.encap_source {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
                return Err(DaemonError::Config(format!(
                    "--encap-source {a}: the outer source of DSR tunnels must be a unicast address"
                )));
            }
            if !local.contains(&a) {
                tracing::warn!(
                    addr = %a,
                    "--encap-source is not an address of this node: backends' answers to tunnel errors will not reach it"
                );
            }
        }
        let workers = queues as u16;
        for p in &pool {
            p.ports
                .check_workers(workers)
                .map_err(|e| DaemonError::Config(format!("{}: {e}", Ipv4Addr::from(p.addr))))?;
        }
        dc.snat_ports
            .check_workers(workers)
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        let cfg = DatapathConfig {
            snat: SnatConfig {
                pool: Arc::from(pool),
                ports: dc.snat_ports,
                encap_source: dc.encap_source.map(|a| a.octets()),
            },
            timeouts: dc.timeouts,
            maglev_size: dc.maglev_size,
            hash_seed: dc.hash_seed,
            workers,
        };
        lb::maglev::Maglev::build(&[], cfg.maglev_size, 0)
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        let table = ServiceTable::with_table_size(cfg.maglev_size);
        let (mut steering, inherited) = Steering::load(dc.pin_dir.as_deref())?;
        for i in steering.unpin_links_except(&dc.ifaces)? {
            tracing::warn!(iface = %i, "the previous lbd's program left {i}, which this lbd does not serve");
        }
        // Generations go on from the previous lbd's, so none of its entries is ever
        // taken for one of ours.
        let first = inherited.as_ref().map_or(1, |i| i.generation + 1);
        let snap = Arc::new(
            Snapshot::build(first, &cfg, &table, Arc::new(net), None)
                .map_err(|e| DaemonError::Config(e.to_string()))?
                .with_masq(first, masq_state),
        );

        if let Err(e) = xdp::sys::raise_memlock_limit() {
            tracing::debug!(error = %e, "RLIMIT_MEMLOCK not raised (fine with CAP_IPC_LOCK on Linux 5.11+)");
        }
        if dc.fast_path {
            check_redirect_targets(&snap.net.ifaces)?;
        }
        // A previous lbd's fast-path entries keep executing (under its generation) until
        // resume() has our workers adopt them.
        if inherited.is_none() {
            steering.set_fast_path_generation(snap.generation)?;
        }
        steering.set_fast_path_clock(xdp::sys::monotonic_ns())?;
        for (slot, iface) in snap.net.ifaces.iter().enumerate() {
            // Masquerade sources arrive on the cluster side: every interface but the
            // egress one, or the only one.
            let internal = masq
                .as_ref()
                .is_some_and(|m| dc.ifaces.len() == 1 || iface.name != m.egress_iface);
            steering.set_iface_slot(iface.ifindex, slot as u32, internal, iface.mac)?;
        }
        steering.sync(&steering_state(&table, &cfg, &snap))?;
        // An interface still running a previous lbd's program (pinned link) keeps it
        // until resume() replaces it, once our workers run and have adopted its flows.
        let mut inherited_ifaces = Vec::new();
        for i in &dc.ifaces {
            if steering.has_pinned_link(i) {
                inherited_ifaces.push(i.clone());
                continue;
            }
            let mode = steering.attach(i)?;
            tracing::info!(iface = %i, mode, "XDP program attached");
        }
        let handover = (inherited.is_some() || !inherited_ifaces.is_empty()).then(|| Handover {
            entries: inherited.map(|i| i.entries).unwrap_or_default(),
            ifaces: inherited_ifaces,
        });

        // Hand-off rings: one per ordered pair of workers.
        let n = usize::from(workers);
        let mut outs: Vec<Vec<Option<ringbuf::HeapProd<u8>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut ins: Vec<Vec<ringbuf::HeapCons<u8>>> = (0..n).map(|_| Vec::new()).collect();
        for (from, out_row) in outs.iter_mut().enumerate() {
            for (to, in_row) in ins.iter_mut().enumerate() {
                if from != to {
                    let (p, c) = HeapRb::<u8>::new(HANDOFF_RING_BYTES).split();
                    out_row[to] = Some(p);
                    in_row.push(c);
                }
            }
        }
        let mut polls = Vec::new();
        let mut shared = Vec::new();
        for _ in 0..n {
            let (poll, s) = worker::shared_state(dc.ifaces.len())
                .map_err(|e| DaemonError::Config(format!("creating poll: {e}")))?;
            polls.push(poll);
            shared.push(s);
        }
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let cores: Vec<core_affinity::CoreId> = if dc.cores.is_empty() {
            cores
        } else {
            cores
                .into_iter()
                .filter(|c| dc.cores.contains(&c.id))
                .collect()
        };
        let (resolve_tx, resolve_rx) = crossbeam_channel::bounded(1024);
        let (unkept_tx, unkept_rx) = crossbeam_channel::bounded(65536);
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (id, ((out, inbound), poll)) in outs.into_iter().zip(ins).zip(polls).enumerate() {
            let (snap_tx, snap_rx) = crossbeam_channel::bounded(64);
            let (req_tx, req_rx) = crossbeam_channel::bounded(16);
            let core = if cores.is_empty() {
                None
            } else {
                Some(cores[id % cores.len()])
            };
            let queue = id as u32;
            let spec = WorkerSpec {
                id: id as u16,
                queue,
                core,
                ifaces: dc.ifaces.clone(),
                io: dc.io,
                flow_capacity: dc.flows_per_worker,
                busy_poll_ns: dc.busy_poll_ns,
                snapshot: Arc::clone(&snap),
                snapshots: snap_rx,
                requests: req_rx,
                resolve: resolve_tx.clone(),
                unkept: unkept_tx.clone(),
                out,
                inbound,
                peers: shared.clone(),
                poll,
                stop: Arc::clone(&stop),
                fast_path: if dc.fast_path {
                    Some(steering.fast_path_map()?)
                } else {
                    None
                },
            };
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let supervised = (Arc::clone(&shared[id]), Arc::clone(&stop));
            let t = std::thread::Builder::new()
                .name(format!("xlb-worker-{id}"))
                .spawn(move || {
                    // No queue is ever silently dead: a worker that panics stops lbd
                    // (with an error its supervisor sees) instead of black-holing its
                    // queue while the rest keeps running.
                    let run = std::panic::AssertUnwindSafe(|| worker::run(spec, ready_tx));
                    if std::panic::catch_unwind(run).is_err() {
                        let (me, stop) = supervised;
                        me.failed.store(true, Ordering::SeqCst);
                        stop.store(true, Ordering::SeqCst);
                    }
                })
                .map_err(|e| DaemonError::Worker {
                    worker: id as u16,
                    queue,
                    reason: e.to_string(),
                })?;
            threads.push(t);
            let fds = ready_rx
                .recv()
                .map_err(|_| DaemonError::Worker {
                    worker: id as u16,
                    queue,
                    reason: "worker exited".into(),
                })?
                .map_err(|reason| DaemonError::Worker {
                    worker: id as u16,
                    queue,
                    reason,
                })?;
            for (slot, fd) in fds.into_iter().enumerate() {
                steering.set_xsk(slot as u32, queue, fd)?;
            }
            handles.push(WorkerHandle {
                id: id as u16,
                queue,
                core: core.map(|c| c.id),
                snapshots: snap_tx,
                requests: req_tx,
                shared: Arc::clone(&shared[id]),
            });
            tracing::info!(worker = id, queue, core = ?core.map(|c| c.id), "worker started");
        }
        Ok(Daemon {
            cfg,
            ifaces: dc.ifaces,
            flows_per_worker: dc.flows_per_worker,
            fast_path: dc.fast_path,
            table,
            steering,
            snap,
            workers: handles,
            threads,
            netlink: nl,
            resolve_rx,
            unkept_rx,
            masq,
            resolving: HashMap::new(),
            next_refresh: Instant::now() + REFRESH,
            state_file: None,
            stop,
            unserved,
            local,
            fatal: None,
            handover,
            policy_pending: None,
            metrics: None,
            pool_high_water: Vec::new(),
            health: control::desired::HealthChecks::new(),
            checked: HashMap::new(),
            capture: None,
            prober: match crate::prober::spawn() {
                Ok(p) => Some(p),
                Err(e) => {
                    return Err(DaemonError::Config(format!(
                        "starting the health prober: {e}"
                    )))
                }
            },
        })
    }

    fn publish(&mut self, snap: Snapshot) {
        self.live().publish(snap);
    }

    /// The datapath as a transaction changes it (see `control::txn`).
    fn live(&mut self) -> Live<'_> {
        Live {
            steering: &mut self.steering,
            workers: &self.workers,
            snap: &mut self.snap,
            handover: self.handover.is_some(),
        }
    }

    /// Make the steering maps hold `next` and the workers run `snap`, in one ordered
    /// change that any failure undoes exactly (`control::txn`).
    fn change(&mut self, next: &SteeringState, snap: Snapshot) -> Result<(), String> {
        let before = Arc::clone(&self.snap);
        self.change_from(next, snap, &before)
    }

    /// [`Daemon::change`], going back to `before` (with today's next hops) on failure.
    fn change_from(
        &mut self,
        next: &SteeringState,
        snap: Snapshot,
        before: &Snapshot,
    ) -> Result<(), String> {
        let cur = self.steering.held().clone();
        // Under a newer generation than `snap`'s (generations only grow).
        let old = before.with_net(snap.generation + 1, Arc::clone(&self.snap.net));
        let (held, r) = control::txn::apply(&mut self.live(), &cur, &next.entries(), snap, old);
        self.steering.set_held(held);
        r.map_err(|e| e.to_string())
    }

    fn next_generation(&self) -> u64 {
        self.snap.generation + 1
    }

    /// What the service table cannot know: addresses of this node. A backend that is a
    /// VIP, the SNAT or egress address or another address of this node would loop or
    /// be answered by the node itself; a frontend on a NAT address inside the NAT port
    /// range would take replies of translated flows.
    fn check_addresses(&self, op: &Op) -> Result<(), String> {
        let egress = |a: Ipv4Addr| {
            self.snap
                .masq
                .as_ref()
                .is_some_and(|m| m.rules.is_egress(a))
        };
        let snat = &self.cfg.snat;
        // The NAT ports of a NAT address.
        let nat_range = |a: Ipv4Addr| {
            snat.range_of(a.octets())
                .or(egress(a).then_some(snat.ports))
        };
        let ours = |a: Ipv4Addr| nat_range(a).is_some() || self.local.contains(&a);
        let backends: Vec<Ipv4Addr> = match op {
            Op::AddService { backends, .. } => backends.iter().map(|b| b.addr).collect(),
            Op::AddBackend { backend, .. } => vec![backend.addr],
            _ => Vec::new(),
        };
        if let Op::AddService { frontend, .. } = op {
            if let Some(r) = nat_range(frontend.addr).filter(|r| r.contains(frontend.port)) {
                return Err(format!(
                    "frontend {frontend} is inside the NAT port range {r} of {}: it would take replies of translated flows",
                    frontend.addr
                ));
            }
            if ours(frontend.addr) && local_listener(frontend.addr, frontend.port, frontend.proto) {
                return Err(format!(
                    "frontend {frontend}: a process on this node listens on that port ({}:{}); xlb would take its traffic. \
                     Use a VIP, or another port",
                    frontend.addr, frontend.port
                ));
            }
        }
        for b in backends {
            if self.snap.vips.contains(&b.octets())
                || matches!(op, Op::AddService { frontend, .. } if frontend.addr == b)
            {
                return Err(format!(
                    "backend {b} is a VIP: traffic would loop through xlb"
                ));
            }
            if ours(b) {
                return Err(format!(
                    "backend {b} is an address of this node (SNAT, egress or local): xlb forwards to other hosts"
                ));
            }
        }
        Ok(())
    }

    /// What the service table cannot check about `op` (addresses of this node, L2
    /// reachability), against the table `next` it leads to.
    fn check_op(&self, op: &Op, next: &ServiceTable) -> Result<(), String> {
        self.check_addresses(op)?;
        if let Some(svc) = op_service(op).and_then(|f| next.get(f)) {
            check_dsr_l2(svc, &self.snap.net)?;
        }
        Ok(())
    }

    /// Validate `op` whole, then apply it to the maps and workers in the safe order.
    fn apply(&mut self, op: Op) -> ResponseEnvelope {
        let next = match self.table.apply(&op) {
            Ok(t) => t,
            Err(e) => return ResponseEnvelope::error(ErrorKind::Invalid, e.to_string()),
        };
        if let Err(e) = self.check_op(&op, &next) {
            return ResponseEnvelope::error(ErrorKind::Invalid, e);
        }
        if let Err((kind, e)) = self.commit(next) {
            return ResponseEnvelope::error(kind, e);
        }
        self.done(&op)
    }

    /// Make the services those of `state` in one change (`lbctl apply -f`): the plan's
    /// operations are validated as each alone would be, then the table they lead to is
    /// committed at once, so clients see the old services or the new, never a mix.
    fn apply_state(&mut self, state: DesiredState, dry_run: bool) -> ResponseEnvelope {
        let planned = self
            .plan_state(&state)
            .and_then(|(ops, next)| state.health().map(|h| (ops, next, h)));
        let (ops, next, health) = match planned {
            Ok(p) => p,
            Err(e) => {
                return ResponseEnvelope::error(ErrorKind::Invalid, format!("nothing changed: {e}"))
            }
        };
        let mut changes: Vec<String> = ops
            .iter()
            .map(|o| control::desired::Change(o).to_string())
            .collect();
        changes.extend(health_changes(&self.health, &health));
        if !dry_run && !changes.is_empty() {
            if let Err((kind, e)) = self.commit_all(next, health) {
                return ResponseEnvelope::error(kind, e);
            }
            self.prime(ops.iter().flat_map(new_backends).collect());
            tracing::info!(changes = changes.len(), "desired state applied");
        }
        ResponseEnvelope::ok(Reply::Applied { changes, dry_run })
    }

    /// The operations that make the services those of `state`, and the table they lead
    /// to, validated whole (as each would be alone, and against this node).
    fn plan_state(&self, state: &DesiredState) -> Result<(Vec<Op>, ServiceTable), String> {
        let ops = control::desired::plan(&self.table, state).map_err(|e| e.to_string())?;
        let next = control::desired::apply_all(&self.table, &ops).map_err(|e| e.to_string())?;
        for op in &ops {
            self.check_op(op, &next)?;
        }
        // A backend that is a VIP of the new table (check_op sees the current VIPs).
        let vips: Vec<Ipv4Addr> = next.services().map(|s| s.frontend.addr).collect();
        for s in next.services() {
            if let Some(b) = s.backends.iter().find(|b| vips.contains(&b.addr)) {
                return Err(format!(
                    "backend {} of {} is a VIP: traffic would loop through xlb",
                    b.addr, s.frontend
                ));
            }
        }
        Ok((ops, next))
    }

    /// Put the services of the state file in force at start, before lbd answers, and
    /// write every committed change to `path` from then on. An error (a service the
    /// node cannot run any more) names the file.
    pub fn restore(
        &mut self,
        path: std::path::PathBuf,
        state: Option<DesiredState>,
    ) -> Result<usize, String> {
        let mut n = 0;
        if let Some(state) = state {
            let (ops, next, health) = self
                .plan_state(&state)
                .and_then(|(ops, next)| state.health().map(|h| (ops, next, h)))
                .map_err(|e| format!("state file {}: {e}", path.display()))?;
            n = next.len();
            if !ops.is_empty() || !health.is_empty() {
                self.commit_all(next, health)
                    .map_err(|(_, e)| format!("state file {}: {e}", path.display()))?;
                let fresh = self
                    .table
                    .services()
                    .flat_map(|s| s.backends.iter().map(|b| b.addr.octets()))
                    .collect();
                self.prime(fresh);
            }
        }
        self.state_file = Some(path);
        Ok(n)
    }

    /// Put the service table `next` in force: written to the state file first (not yet
    /// in place), then maps and workers in the safe order (stale entries out, the
    /// snapshot to the workers, new entries in), then the state file put in place; or
    /// nothing on error.
    /// Take over what a previous lbd left pinned, once the state is restored (the
    /// services its flows belong to are back) and before lbd answers: the workers adopt
    /// the fast path's flows (each translated flow on its NAT port's worker), then this
    /// lbd's program replaces the previous one on its interfaces, then the fast path's
    /// generation becomes ours, so the previous entries stop and their next packets come
    /// to the workers that now hold their flows (which install them again). Entries no
    /// worker took are removed. Nothing is lost in between: until the switch the previous
    /// entries keep executing. Without a handover this does nothing.
    pub fn resume(&mut self) -> Result<Adoption, DaemonError> {
        let Some(h) = self.handover.take() else {
            return Ok(Adoption::default());
        };
        let mut report = Adoption::default();
        let mut groups: BTreeMap<(u32, u32), Vec<(flowrec::FlowKey, flowrec::FlowEntry)>> =
            BTreeMap::new();
        for (k, e) in h.entries {
            groups.entry((e.worker, e.slot)).or_default().push((k, e));
        }
        let n = self.workers.len().max(1);
        let mut per_worker: Vec<Vec<lb::pipeline::adopt::Inherited>> = vec![Vec::new(); n];
        let mut keys_of: Vec<Vec<Vec<flowrec::FlowKey>>> = vec![Vec::new(); n];
        let mut stale: Vec<flowrec::FlowKey> = Vec::new();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for ((worker, _), entries) in groups {
            match lb::pipeline::adopt::inherit(&self.snap, &entries) {
                Ok(f) => {
                    // A DSR flow lives where its client's packets arrive: the worker
                    // that had it, if there still is one.
                    let w = usize::from(f.owner(self.cfg.workers).unwrap_or(worker as u16)) % n;
                    per_worker[w].push(f);
                    keys_of[w].push(entries.iter().map(|(k, _)| *k).collect());
                }
                Err(why) => {
                    *reasons.entry(why.to_string()).or_default() += 1;
                    stale.extend(entries.iter().map(|(k, _)| *k));
                }
            }
        }
        let mut answers = Vec::new();
        for (w, flows) in self.workers.iter().zip(per_worker) {
            let count = flows.len();
            if count == 0 {
                continue;
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            if w.requests
                .send(WorkerRequest::Adopt { flows, reply: tx })
                .is_ok()
            {
                w.shared.wake();
                answers.push((usize::from(w.id), count, rx));
            }
        }
        for (id, count, rx) in answers {
            // Start-up, before lbd answers: waiting here blocks no client.
            let answer = rx
                .recv_timeout(WORKER_ANSWER * 5)
                .map_err(|_| DaemonError::Worker {
                    worker: id as u16,
                    queue: id as u32,
                    reason: "did not answer the adoption of the previous lbd's flows".into(),
                })?;
            report.adopted += count - answer.refused.len();
            for (i, why) in answer.refused {
                *reasons.entry(why.to_string()).or_default() += 1;
                if let Some(keys) = keys_of[id].get(i) {
                    stale.extend(keys.iter().copied());
                }
            }
            for k in answer.kept {
                if let Err(e) = self.steering.keep(&k) {
                    tracing::warn!(error = %e, "adopted flow not kept: it will lose its translation");
                }
            }
        }
        for i in &h.ifaces {
            let how = self.steering.take_over(i)?;
            tracing::info!(iface = %i, how, "XDP program in place of the previous lbd's");
        }
        self.steering
            .set_fast_path_generation(self.snap.generation)?;
        report.refused = reasons.values().sum();
        // The previous entries no longer execute; remove those no worker holds (and, with
        // the fast path off, all: the workers forward their flows).
        let mut map = self.steering.fast_path_map()?;
        if !self.fast_path {
            stale.extend(keys_of.iter().flatten().flatten().copied());
        }
        for k in &stale {
            map.remove(k);
        }
        for (why, count) in &reasons {
            tracing::warn!(
                count,
                "fast-path flows of the previous lbd not adopted: {why}"
            );
        }
        tracing::info!(
            adopted = report.adopted,
            refused = report.refused,
            "took over the previous lbd's datapath"
        );
        Ok(report)
    }

    fn commit(&mut self, next: ServiceTable) -> Result<(), (ErrorKind, String)> {
        // A removed service's health check goes with it.
        let health = self
            .health
            .iter()
            .filter(|(f, _)| next.get(f).is_some())
            .map(|(f, h)| (*f, h.clone()))
            .collect();
        self.commit_all(next, health)
    }

    /// [`Daemon::commit`] of a table and the services' health checks together.
    fn commit_all(
        &mut self,
        next: ServiceTable,
        health: control::desired::HealthChecks,
    ) -> Result<(), (ErrorKind, String)> {
        let pending = match &self.state_file {
            Some(path) => Some(
                control::desired::prepare(path, &DesiredState::of(&next, &health)).map_err(
                    |e| {
                        (
                            ErrorKind::Datapath,
                            format!(
                                "nothing changed: cannot write the state file {}: {e}",
                                path.display()
                            ),
                        )
                    },
                )?,
            ),
            None => None,
        };
        let before = std::mem::replace(&mut self.health, health);
        if let Err(e) = self.commit_datapath(next) {
            self.health = before;
            return Err(e);
        }
        self.sync_prober();
        if let Some(p) = pending {
            if let Err(e) = p.finish() {
                tracing::error!(error = %e, "the change is in force but the state file was not replaced: a restart would lose it");
            }
        }
        Ok(())
    }

    fn capture_dropped(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.shared.capture_dropped.load(Ordering::Relaxed))
            .sum()
    }

    /// Send every worker its end of a capture, or None to stop.
    fn capture_taps(
        &mut self,
        filter: Option<xdp::worker::CaptureFilter>,
    ) -> Vec<ringbuf::HeapCons<u8>> {
        let mut rings = Vec::new();
        for w in &self.workers {
            let tap = filter.map(|filter| {
                let (p, c) = HeapRb::<u8>::new(CAPTURE_RING).split();
                rings.push(c);
                xdp::worker::CaptureTap { filter, ring: p }
            });
            if w.requests
                .send_timeout(WorkerRequest::Capture(tap), WORKER_ANSWER)
                .is_ok()
            {
                w.shared.wake();
            }
        }
        rings
    }

    /// `lbctl capture`: start capturing what the workers see.
    fn capture_start(
        &mut self,
        service: Option<lb::service::Frontend>,
        backend: Option<Ipv4Addr>,
    ) -> ResponseEnvelope {
        if self
            .capture
            .as_ref()
            .is_some_and(|c| c.last_read.elapsed() < CAPTURE_IDLE)
        {
            return ResponseEnvelope::error(
                ErrorKind::Busy,
                "a capture is running (one at a time); it ends when its lbctl stops reading",
            );
        }
        if let Some(s) = &service {
            if self.table.get(s).is_none() {
                return ResponseEnvelope::error(ErrorKind::Invalid, format!("no service {s}"));
            }
        }
        let filter = xdp::worker::CaptureFilter {
            service: service.as_ref().map(lb::snapshot::FrontendKey::from),
            backend: backend.map(|a| a.octets()),
        };
        let rings = self.capture_taps(Some(filter));
        self.capture = Some(CaptureRun {
            rings,
            last_read: Instant::now(),
            dropped_at_start: self.capture_dropped(),
        });
        tracing::info!(?service, ?backend, "packet capture started");
        ResponseEnvelope::ok(Reply::Done {
            message: "capture started".into(),
        })
    }

    /// The frames captured since the last read; with `stop`, the capture ends.
    fn capture_read(&mut self, stop: bool) -> ResponseEnvelope {
        let dropped = self.capture_dropped();
        let Some(run) = self.capture.as_mut() else {
            return ResponseEnvelope::error(ErrorKind::Invalid, "no capture is running");
        };
        run.last_read = Instant::now();
        let mut frames = Vec::new();
        'rings: for ring in &mut run.rings {
            while let Some((dir, code, worker, ts_ns, data)) = xdp::worker::pop_record(ring) {
                frames.push(control::proto::CapturedFrame {
                    worker,
                    direction: if dir == 0 { "in" } else { "out" }.into(),
                    verdict: xdp::worker::capture_verdict(code).into(),
                    ts_ns,
                    data,
                });
                if frames.len() >= CAPTURE_READ && !stop {
                    break 'rings;
                }
            }
        }
        frames.sort_by_key(|f| f.ts_ns);
        let dropped = dropped.saturating_sub(run.dropped_at_start);
        if stop {
            self.capture_taps(None);
            self.capture = None;
            tracing::info!(dropped, "packet capture ended");
        }
        ResponseEnvelope::ok(Reply::Captured {
            frames,
            dropped,
            now_ns: xdp::sys::monotonic_ns(),
        })
    }

    /// `lbctl explain`: what the snapshot in force does with a new flow of this 5-tuple,
    /// or what the worker flow that already holds it does.
    fn explain(
        &self,
        source: std::net::SocketAddrV4,
        destination: std::net::SocketAddrV4,
        proto: &str,
        iface: Option<&str>,
    ) -> ResponseEnvelope {
        let p = match proto {
            "tcp" => Some(lb::service::Proto::Tcp),
            "udp" => Some(lb::service::Proto::Udp),
            _ => None,
        };
        let Some(p) = p else {
            return ResponseEnvelope::error(
                ErrorKind::BadRequest,
                format!("proto {proto:?}: tcp or udp"),
            );
        };
        let key = FlowKey {
            src: source.ip().octets(),
            dst: destination.ip().octets(),
            sport: source.port(),
            dport: destination.port(),
            proto: p.number(),
        };
        // Masquerade sources are looked up on internal interfaces: all but the egress
        // one, or the only one.
        let internal = match iface {
            None => None,
            Some(i) if !self.ifaces.iter().any(|x| x == i) => {
                let mut e = lb::explain::Explained::default();
                e.steps.push(format!(
                    "{i} is not an interface lbd serves: no XDP program of lbd sees it, the kernel has it"
                ));
                return ResponseEnvelope::ok(Reply::Explain(ExplainView {
                    explained: e,
                    flow: None,
                }));
            }
            Some(i) => Some(
                self.ifaces.len() == 1 || self.masq.as_ref().is_none_or(|m| m.egress_iface != i),
            ),
        };
        let mut view = ExplainView {
            explained: lb::explain::explain(&self.snap, &key, internal),
            flow: None,
        };
        let mut answers = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if w.requests
                .try_send(WorkerRequest::Lookup { key, reply: tx })
                .is_ok()
            {
                w.shared.wake();
                answers.push((w.id, rx));
            }
        }
        for (id, rx) in answers {
            let Ok(Some(c)) = rx.recv_timeout(WORKER_ANSWER) else {
                continue;
            };
            let t = translation(&c, id, 0);
            let f = &c.flow;
            if f.kind == FlowKind::Lb {
                let (a, port) = f.backend();
                view.explained.backend = Some(format!("{}:{port}", Ipv4Addr::from(a)));
            }
            view.explained.translation = Some(t.outside.clone());
            let line = format!(
                "a flow already holds it on worker {id} ({}, {}{}): {} → {} → {}; it decides, not the table",
                t.kind,
                t.state,
                if t.fast_path { ", in the XDP fast path" } else { "" },
                t.inside,
                t.outside,
                t.remote
            );
            view.explained.steps.push(line.clone());
            view.flow = Some(line);
        }
        ResponseEnvelope::ok(Reply::Explain(view))
    }

    /// `lbctl service health`: give a service's backends a check, or none.
    fn set_health(
        &mut self,
        frontend: lb::service::Frontend,
        check: Option<control::health::HealthSpec>,
    ) -> ResponseEnvelope {
        if self.table.get(&frontend).is_none() {
            return ResponseEnvelope::error(ErrorKind::Invalid, format!("no service {frontend}"));
        }
        if let Some(Err(e)) = check.as_ref().map(|c| c.validate()) {
            return ResponseEnvelope::error(ErrorKind::Invalid, format!("nothing changed: {e}"));
        }
        let mut health = self.health.clone();
        let message = match check {
            Some(c) => {
                let m = format!("health check of {frontend}: {c}");
                health.insert(frontend, c);
                m
            }
            None => {
                health.remove(&frontend);
                format!("health check of {frontend} removed")
            }
        };
        match self.commit_all(self.table.clone(), health) {
            Ok(()) => ResponseEnvelope::ok(Reply::Done { message }),
            Err((kind, e)) => ResponseEnvelope::error(kind, e),
        }
    }

    /// The key a checked backend's results come under.
    fn health_key(
        frontend: &lb::service::Frontend,
        b: &lb::service::BackendSpec,
    ) -> crate::prober::Key {
        (*frontend, std::net::SocketAddrV4::new(b.addr, b.port))
    }

    /// A checked backend its probes say is down.
    fn is_down(&self, frontend: &lb::service::Frontend, b: &lb::service::BackendSpec) -> bool {
        self.health.contains_key(frontend)
            && self
                .checked
                .get(&Self::health_key(frontend, b))
                .is_some_and(|c| !c.tracker.up)
    }

    /// The table the datapath runs: the operator's, with the backends their health
    /// checks say are down out of new flows (`control::health::effective`).
    fn effective(&self, table: &ServiceTable) -> ServiceTable {
        control::health::effective(table, |f, b| self.is_down(f, b))
    }

    /// Hand the prober every checked backend; forget the states of backends no longer
    /// checked.
    fn sync_prober(&mut self) {
        let mut targets = Vec::new();
        for svc in self.table.services() {
            let Some(spec) = self.health.get(&svc.frontend) else {
                continue;
            };
            for b in &svc.backends {
                targets.push(crate::prober::Target {
                    key: Self::health_key(&svc.frontend, b),
                    addr: std::net::SocketAddr::from((b.addr, spec.port.unwrap_or(b.port))),
                    spec: spec.clone(),
                });
            }
        }
        self.checked
            .retain(|k, _| targets.iter().any(|t| &t.key == k));
        if let Some(p) = &self.prober {
            p.set(targets);
        }
    }

    /// Count the probes' results; a backend that changes state is said once in the log
    /// and the datapath follows (new flows avoid a down backend).
    fn poll_health(&mut self) {
        let Some(p) = &self.prober else {
            return;
        };
        let results: Vec<crate::prober::Outcome> = p.results().collect();
        let mut changed = Vec::new();
        for r in results {
            let Some(spec) = self.health.get(&r.key.0) else {
                continue;
            };
            let c = self.checked.entry(r.key).or_default();
            c.last = Some((r.ok, r.detail.clone(), Instant::now()));
            if let Some(up) = c.tracker.record(r.ok, spec.rise, spec.fall) {
                match up {
                    true => {
                        tracing::info!(service = %r.key.0, backend = %r.key.1, "backend healthy again ({}): new flows reach it", r.detail)
                    }
                    false => {
                        tracing::warn!(service = %r.key.0, backend = %r.key.1, "backend unhealthy ({}): no new flows until it answers again", r.detail)
                    }
                }
                changed.push(r.key.0);
            }
        }
        if changed.is_empty() {
            return;
        }
        for svc in self.table.services() {
            let weighted: Vec<_> = svc.backends.iter().filter(|b| b.weight > 0).collect();
            if changed.contains(&svc.frontend)
                && !weighted.is_empty()
                && weighted.iter().all(|b| self.is_down(&svc.frontend, b))
            {
                tracing::warn!(service = %svc.frontend, "every backend failed its health check: traffic goes to all of them (fail open)");
            }
        }
        if let Err((_, e)) = self.commit_datapath(self.table.clone()) {
            tracing::error!(error = %e, "the datapath did not take the health change; it is tried again at the next one");
        }
    }

    fn commit_datapath(&mut self, next: ServiceTable) -> Result<(), (ErrorKind, String)> {
        let run = self.effective(&next);
        let snap = match Snapshot::build(
            self.next_generation(),
            &self.cfg,
            &run,
            Arc::clone(&self.snap.net),
            Some(&self.snap),
        ) {
            Ok(s) => s,
            Err(e) => return Err((ErrorKind::Invalid, e.to_string())),
        };
        let new_state = steering_state(&run, &self.cfg, &self.snap);
        self.change(&new_state, snap)
            .map_err(|e| (ErrorKind::Datapath, e))?;
        self.table = next;
        Ok(())
    }

    /// The answer to an applied `op` (and what follows it: resolving new backends).
    fn done(&mut self, op: &Op) -> ResponseEnvelope {
        let msg = match op {
            Op::AddService {
                frontend, backends, ..
            } => {
                self.prime(new_backends(op));
                format!(
                    "service {frontend} added with {} backend(s)",
                    backends.len()
                )
            }
            Op::RemoveService { frontend } => format!("service {frontend} removed"),
            Op::AddBackend { frontend, backend } => {
                self.prime(new_backends(op));
                format!(
                    "backend {}:{} added to {frontend}",
                    backend.addr, backend.port
                )
            }
            Op::RemoveBackend {
                frontend,
                addr,
                port,
            } => {
                let outcome = self.table.get(frontend).map(|s| s.options.on_remove);
                format!(
                    "backend {addr}:{port} removed from {frontend}; its flows end ({})",
                    match outcome {
                        Some(lb::service::OnRemove::Drop) => "dropped",
                        _ => "clients get a TCP reset",
                    }
                )
            }
            Op::SetWeight {
                frontend,
                addr,
                port,
                weight: 0,
            } => format!(
                "backend {addr}:{port} of {frontend} draining: no new flows, established ones go on"
            ),
            Op::SetWeight {
                frontend,
                addr,
                port,
                weight,
            } => format!("backend {addr}:{port} of {frontend} now has weight {weight}"),
            Op::SetOptions { frontend, options } => format!(
                "service {frontend}: mode {} (for new flows), affinity {}{}, on-remove {}, table size {}",
                options.mode_label(),
                options.affinity,
                options
                    .affinity_timeout_s
                    .map(|t| format!(" (timeout {t} s)"))
                    .unwrap_or_default(),
                options.on_remove,
                options.table_size.unwrap_or(self.cfg.maglev_size)
            ),
        };
        ResponseEnvelope::ok(Reply::Done { message: msg })
    }

    /// Ask the kernel to resolve the next hops of `addrs` and re-read the neighbour table
    /// soon, without waiting: the control thread never blocks on the network. Until the
    /// answer is in, the backend shows as "resolving" and a worker holds its first
    /// frames (up to 1 s, like the kernel's unresolved queue).
    fn prime(&mut self, addrs: Vec<[u8; 4]>) {
        let mut asked = false;
        for a in &addrs {
            asked |= self.request_resolution(*a, true);
        }
        if asked {
            self.next_refresh = self.next_refresh.min(Instant::now() + RESOLVE_RECHECK);
        }
    }

    /// "resolved", "resolving" or "no route", for `lbctl service list`.
    fn next_hop_state(&self, addr: [u8; 4]) -> &'static str {
        match self.snap.net.next_hop(addr) {
            Ok(_) => "resolved",
            Err(NextHopError::Unresolved { .. }) => "resolving",
            Err(_) => "no route",
        }
    }

    /// Ask the kernel to resolve the neighbour for `dst` (a destination or a next hop
    /// itself); true if a request went out.
    fn request_resolution(&mut self, dst: [u8; 4], force: bool) -> bool {
        let Err(NextHopError::Unresolved { ifindex, addr }) = self.snap.net.next_hop(dst) else {
            return false;
        };
        let now = Instant::now();
        if !force
            && self
                .resolving
                .get(&addr)
                .is_some_and(|t| now.duration_since(*t) < RESOLVE_BACKOFF)
        {
            return false;
        }
        self.resolving.insert(addr, now);
        if let Err(e) = self.netlink.resolve(ifindex, addr) {
            tracing::warn!(addr = %Ipv4Addr::from(addr), error = %e, "neighbour resolution request failed");
            return false;
        }
        true
    }

    /// Re-read routes and neighbours; publish a snapshot if they changed.
    fn refresh_net(&mut self) {
        match self.netlink.dump(&self.ifaces) {
            Ok(net) if net != *self.snap.net => {
                for (new, old) in net.ifaces.iter().zip(&self.snap.net.ifaces) {
                    if new.redirect != old.redirect {
                        match (self.fast_path, new.redirect) {
                            (true, false) => tracing::warn!(
                                iface = %new.name,
                                "the interface stopped taking XDP redirects (a veth peer's GRO turned off?): \
                                 flows out of it leave the fast path for the workers"
                            ),
                            (true, true) => tracing::info!(
                                iface = %new.name,
                                "the interface takes XDP redirects again: its flows return to the fast path"
                            ),
                            _ => {}
                        }
                    }
                }
                let s = self.snap.with_net(self.next_generation(), Arc::new(net));
                self.publish(s);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading routes and neighbours"),
        }
    }

    /// Live flows by service and backend, summed over the workers (each answers between
    /// two batches).
    fn backend_flows(&self) -> Result<xdp::worker::BackendFlows, String> {
        let mut answers = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if w.requests.try_send(WorkerRequest::BackendFlows(tx)).is_ok() {
                w.shared.wake();
                answers.push((w.id, rx));
            }
        }
        let mut total = xdp::worker::BackendFlows::new();
        for (id, rx) in answers {
            let counts = rx
                .recv_timeout(WORKER_ANSWER)
                .map_err(|_| format!("worker {id} did not answer"))?;
            for (k, n) in counts {
                *total.entry(k).or_insert(0) += n;
            }
        }
        Ok(total)
    }

    /// Traffic by service and backend: the workers' accounts (what they forwarded, and
    /// what the fast path forwarded for flows no longer installed), the live fast-path
    /// entries' counters (read from the map here, off the workers), and live flows.
    fn service_stats(&self) -> Result<Vec<ServiceStatsView>, String> {
        type Pair = (lb::snapshot::FrontendKey, [u8; 4], u16);
        let name = |k: &Pair| {
            let f = lb::service::Frontend {
                addr: Ipv4Addr::from(k.0.addr),
                port: k.0.port,
                proto: lb::service::Proto::from_number(k.0.proto)
                    .unwrap_or(lb::service::Proto::Tcp),
            };
            (f.to_string(), format!("{}:{}", Ipv4Addr::from(k.1), k.2))
        };
        // The workers' accounts and the map's live entries must be read as of one
        // moment: a flow whose entries a worker folds into its account between the two
        // reads would count in neither (or in both). A worker's fold_seq says whether it
        // folded since its answer; then the reading is taken again.
        let mut attempt = 0;
        let (answers, dump) = loop {
            attempt += 1;
            let mut asked = Vec::new();
            for w in &self.workers {
                let (tx, rx) = crossbeam_channel::bounded(1);
                if w.requests.try_send(WorkerRequest::Accounts(tx)).is_ok() {
                    w.shared.wake();
                    asked.push((w, rx));
                }
            }
            let mut answers = Vec::new();
            for (w, rx) in asked {
                let a = rx
                    .recv_timeout(WORKER_ANSWER)
                    .map_err(|_| format!("worker {} did not answer", w.id))?;
                answers.push((w, a));
            }
            let dump = match self.fast_path {
                true => self
                    .steering
                    .fast_path_map()
                    .map_err(|e| e.to_string())?
                    .entries(),
                false => Vec::new(),
            };
            let moved = answers
                .iter()
                .any(|(w, (_, _, seq))| w.shared.fold_seq.load(Ordering::SeqCst) != *seq);
            if !moved || attempt == 5 {
                break (answers, dump);
            }
        };
        let mut pairs: BTreeMap<(String, String), TrafficView> = BTreeMap::new();
        for (_, (accounts, live, _)) in answers {
            for a in accounts {
                let t = pairs
                    .entry(name(&(a.frontend, a.backend.0, a.backend.1)))
                    .or_default();
                t.flows += a.flows;
                t.packets_in += a.packets[0];
                t.packets_out += a.packets[1];
                t.bytes_in += a.bytes[0];
                t.bytes_out += a.bytes[1];
            }
            for (k, n) in live {
                pairs.entry(name(&k)).or_default().active += n;
            }
        }
        let mut flows: BTreeMap<(u32, u32), Vec<(flowrec::FlowKey, flowrec::FlowEntry)>> =
            BTreeMap::new();
        for (k, e) in dump {
            flows.entry((e.worker, e.slot)).or_default().push((k, e));
        }
        for entries in flows.values() {
            let Ok(f) = lb::pipeline::adopt::inherit(&self.snap, entries) else {
                continue;
            };
            if f.kind != FlowKind::Lb {
                continue;
            }
            let (addr, port) = f.backend();
            let t = pairs.entry(name(&(f.frontend(), addr, port))).or_default();
            for (k, e) in entries {
                if *k == f.keys[0].flowrec() {
                    t.packets_in += e.packets;
                    t.bytes_in += e.bytes;
                } else {
                    t.packets_out += e.packets;
                    t.bytes_out += e.bytes;
                }
            }
        }
        // Every service of the table, with each backend, also before any traffic.
        for svc in self.table.services() {
            for b in &svc.backends {
                pairs
                    .entry((svc.frontend.to_string(), format!("{}:{}", b.addr, b.port)))
                    .or_default();
            }
        }
        let mut out: Vec<ServiceStatsView> = Vec::new();
        for ((frontend, backend), totals) in pairs {
            if out.last().is_none_or(|s| s.frontend != frontend) {
                out.push(ServiceStatsView {
                    frontend,
                    totals: TrafficView::default(),
                    backends: Vec::new(),
                });
            }
            if let Some(s) = out.last_mut() {
                s.totals.add(&totals);
                s.backends.push(BackendStatsView { backend, totals });
            }
        }
        Ok(out)
    }

    fn service_list(&self) -> ResponseEnvelope {
        match self.service_views() {
            Ok(services) => ResponseEnvelope::ok(Reply::Services { services }),
            Err(e) => ResponseEnvelope::error(ErrorKind::Datapath, e),
        }
    }

    /// The services as `lbctl service list` shows them.
    fn service_views(&self) -> Result<Vec<ServiceView>, String> {
        let flows = self.backend_flows()?;
        let mut services = Vec::new();
        for spec in self.table.services() {
            let key = lb::snapshot::FrontendKey::from(&spec.frontend);
            let mut slots = vec![0usize; spec.backends.len()];
            let mut total = 1usize;
            let mut fingerprint = String::new();
            if let Some(state) = self.snap.services.get(&key) {
                total = state.maglev.size().max(1);
                let named: Vec<lb::maglev::MaglevBackend> = spec
                    .backends
                    .iter()
                    .map(|b| lb::maglev::MaglevBackend {
                        name: b.maglev_name(),
                        weight: b.weight,
                    })
                    .collect();
                fingerprint = format!("{:016x}", state.maglev.fingerprint(&named));
                if spec.backends.iter().any(|b| b.weight > 0) {
                    for &s in state.maglev.slots() {
                        if let Some(c) = slots.get_mut(usize::from(s)) {
                            *c += 1;
                        }
                    }
                }
            }
            let worst = worst_share_error(&spec.backends, &slots, total);
            services.push(ServiceView {
                id: spec.id,
                frontend: spec.frontend.to_string(),
                mode: spec.options.mode_label(),
                options: spec.options,
                backends: spec
                    .backends
                    .iter()
                    .zip(slots)
                    .map(|(b, n)| {
                        let live = flows
                            .get(&(key, b.addr.octets(), b.port))
                            .copied()
                            .unwrap_or(0);
                        let checked = self
                            .health
                            .contains_key(&spec.frontend)
                            .then(|| self.checked.get(&Self::health_key(&spec.frontend, b)));
                        let down = self.is_down(&spec.frontend, b);
                        BackendView {
                            address: b.addr,
                            port: b.port,
                            weight: b.weight,
                            flows: live,
                            state: match (b.weight, live, down) {
                                (1.., _, true) => "unhealthy",
                                (1.., _, false) => "active",
                                (0, 1.., _) => "draining",
                                (0, 0, _) => "drained",
                            }
                            .into(),
                            share: (n as f64 * 1000.0 / total as f64).round() / 10.0,
                            next_hop: self.next_hop_state(b.addr.octets()).into(),
                            healthy: checked.map(|_| !down),
                            health: checked.map(|c| match c.and_then(|c| c.last.as_ref()) {
                                Some((ok, detail, at)) => format!(
                                    "{}: last probe {} ({detail}), {:.1} s ago",
                                    if down { "down" } else { "up" },
                                    if *ok { "ok" } else { "failed" },
                                    at.elapsed().as_secs_f64()
                                ),
                                None => "up: not probed yet".into(),
                            }),
                        }
                    })
                    .collect(),
                fingerprint,
                table_size: total,
                worst_share_error_pct: worst,
                health_check: self.health.get(&spec.frontend).map(ToString::to_string),
            });
        }
        Ok(services)
    }

    /// Start answering scrapes: each request on `rx` gets the exposition
    /// (`crate::metrics`), between two ticks.
    pub fn serve_metrics(&mut self, rx: Receiver<crate::metrics::Scrape>) {
        self.metrics = Some(rx);
    }

    /// NAT addresses' ports (the SNAT pool's, then the egress addresses), over the
    /// workers, with the high-water marks.
    fn pools(&self) -> Vec<crate::metrics::PoolSample> {
        let sum =
            |i: usize, f: fn(&xdp::worker::WorkerShared) -> &[std::sync::atomic::AtomicU64]| {
                self.workers
                    .iter()
                    .filter_map(|w| f(&w.shared).get(i))
                    .map(|n| n.load(Ordering::Relaxed))
                    .sum::<u64>()
            };
        self.snap
            .nat_addrs()
            .enumerate()
            .map(|(i, a)| crate::metrics::PoolSample {
                address: Ipv4Addr::from(a.addr).to_string(),
                ports: u64::from(a.ports.len()),
                allocated: sum(i, |w| &w.pool_use),
                high_water: self.pool_high_water.get(i).copied().unwrap_or(0),
                failures: sum(i, |w| &w.pool_failures),
            })
            .collect()
    }

    /// The metrics exposition (`/metrics`), from what the loop has now.
    fn metrics_text(&self) -> Result<String, String> {
        let (Reply::Stats(stats), Reply::Status(status)) = (self.stats(), self.status()) else {
            return Err("no stats".into());
        };
        let sample = crate::metrics::Sample {
            stats,
            status: *status,
            services: self.service_views()?,
            traffic: self.service_stats()?,
            pools: self.pools(),
        };
        crate::metrics::encode(&sample).map_err(|e| e.to_string())
    }

    /// Answer the scrapes waiting, and follow the NAT pools' high-water marks.
    fn tick_metrics(&mut self) {
        let now = self.pools();
        self.pool_high_water.resize(now.len(), 0);
        for (h, p) in self.pool_high_water.iter_mut().zip(&now) {
            *h = (*h).max(p.allocated);
        }
        let Some(rx) = self.metrics.as_ref() else {
            return;
        };
        let waiting: Vec<crate::metrics::Scrape> = rx.try_iter().collect();
        for reply in waiting {
            let body = self.metrics_text();
            if let Err(e) = &body {
                tracing::warn!(error = %e, "metrics not collected");
            }
            let _ = reply.send(body);
        }
    }

    fn status(&self) -> Reply {
        let modes: HashMap<&str, &str> = self
            .steering
            .attached()
            .iter()
            .map(|(i, m)| (i.as_str(), *m))
            .collect();
        let net: &NetView = &self.snap.net;
        Reply::Status(Box::new(StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: net
                .ifaces
                .iter()
                .map(|i| InterfaceView {
                    name: i.name.clone(),
                    ifindex: i.ifindex,
                    mac: i
                        .mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                    xdp_mode: modes.get(i.name.as_str()).copied().unwrap_or("none").into(),
                    takes_redirects: i.redirect,
                })
                .collect(),
            workers: self
                .workers
                .iter()
                .map(|w| WorkerView {
                    id: w.id,
                    queue: w.queue,
                    core: w.core,
                    mappings: w.shared.mappings.load(Ordering::Relaxed),
                    flows: w.shared.flows.load(Ordering::Relaxed),
                    flow_capacity: self.flows_per_worker as u64,
                    fast_path_entries: w.shared.fast_entries.load(Ordering::Relaxed),
                })
                .collect(),
            snat_pool: self
                .cfg
                .snat
                .pool
                .iter()
                .enumerate()
                .map(|(i, a)| control::proto::SnatAddrView {
                    address: Ipv4Addr::from(a.addr),
                    ports: a.ports.to_string(),
                    mappings: self
                        .workers
                        .iter()
                        .filter_map(|w| w.shared.pool_use.get(i))
                        .map(|n| n.load(Ordering::Relaxed))
                        .sum(),
                })
                .collect(),
            snat_ports: self.cfg.snat.ports.to_string(),
            port_ownership: format!(
                "in pairs round-robin over {} worker(s): port p is worker (p / 2) mod {}",
                self.workers.len(),
                self.workers.len()
            ),
            services: self.table.len(),
            flows: self
                .workers
                .iter()
                .map(|w| w.shared.flows.load(Ordering::Relaxed))
                .sum(),
            neighbours: net.neighbour_count(),
            routes: net.routes().len(),
            masquerading: self
                .snap
                .masq
                .as_ref()
                .zip(self.masq.as_ref())
                .map(|(m, rt)| MasqStatusView {
                    egress_interfaces: vec![rt.egress_iface.clone()],
                    egress_address: m.rules.egress,
                    egress_addresses: m.rules.egress_pool().to_vec(),
                    masquerade_from: m.rules.from.iter().map(ToString::to_string).collect(),
                    non_masquerade_rules: m.rules.policy.rules().len(),
                    config: rt.config.as_ref().map(|p| p.display().to_string()),
                    config_error: rt.config_error.clone(),
                    kept_flows: self.steering.kept(),
                }),
            unserved_queues: self.unserved.clone(),
            fast_path: self.fast_path,
            drops: {
                let mut d = BTreeMap::new();
                for w in &self.workers {
                    let c = w.shared.counters();
                    for r in lb::DropReason::ALL {
                        let n = c.drops[*r as usize];
                        if n > 0 {
                            *d.entry(r.name().to_string()).or_insert(0) += n;
                        }
                    }
                }
                d
            },
        }))
    }

    fn stats(&self) -> Reply {
        let workers = self
            .workers
            .iter()
            .map(|w| WorkerStats::new(w.id, &w.shared.counters()))
            .collect();
        let xs = self.steering.stats();
        let xdp: BTreeMap<String, u64> = Stat::ALL
            .iter()
            .map(|s| (s.name().to_string(), xs[*s as usize]))
            .collect();
        let sockets = self
            .workers
            .iter()
            .flat_map(|w| {
                w.shared
                    .xsk_stats()
                    .into_iter()
                    .zip(&self.ifaces)
                    .map(|(st, iface)| SocketStats {
                        worker: w.id,
                        iface: iface.clone(),
                        queue: w.queue,
                        kernel: xdp::sys::XSK_STAT_NAMES
                            .iter()
                            .map(|n| n.to_string())
                            .zip(st)
                            .collect(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Reply::Stats(StatsView {
            workers,
            sockets,
            xdp,
        })
    }

    /// Re-read the ip-masq-agent file if it is time; apply a changed, valid policy.
    fn check_masq_config(&mut self, now: Instant) {
        let Some(m) = self.masq.as_mut() else {
            return;
        };
        let Some(path) = m.config.clone() else {
            return;
        };
        if now < m.next_check {
            return;
        }
        m.next_check = now + MASQ_CONFIG_CHECK;
        let text = match read_config(&path) {
            Ok(t) => t,
            Err(err) => {
                if m.config_error.as_ref() != Some(&err) {
                    tracing::error!(error = %err, "ip-masq-agent config unreadable; the last good list stays");
                    m.config_error = Some(err);
                }
                return;
            }
        };
        if m.config_text.as_ref() == Some(&text) {
            return;
        }
        m.config_text = Some(text.clone());
        match MasqPolicy::from_yaml(&text) {
            Ok(p) => {
                m.config_error = None;
                self.apply_policy(Arc::new(p));
            }
            Err(e) => {
                let err = format!("{}: {e}", path.display());
                tracing::error!(error = %err, "ip-masq-agent config rejected; the last good list stays");
                m.config_error = Some(err);
            }
        }
    }

    /// Apply a new non-masquerade policy without disturbing established flows (see the
    /// module documentation for the order), without blocking the control loop: the
    /// workers get the new snapshot and are asked which of their flows it keeps; the
    /// loop collects their answers ([`Daemon::poll_policy`]) and only then changes the
    /// XDP maps, once those flows are in the keep map.
    fn apply_policy(&mut self, policy: Arc<MasqPolicy>) {
        let Some(cur) = self.snap.masq.clone() else {
            return;
        };
        if cur.rules.policy.rules() == policy.rules()
            && cur.rules.policy.masq_link_local() == policy.masq_link_local()
        {
            return;
        }
        let state = MasqState {
            rules: cur.rules.with_policy(policy),
            previous: Some(Arc::clone(&cur.rules.policy)),
            version: cur.version + 1,
            filtering: cur.filtering,
        };
        let before = Arc::clone(&self.snap);
        let snap = self
            .snap
            .with_masq(self.next_generation(), Some(Arc::new(state)));
        self.publish(snap);
        let mut answers = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if w.requests.try_send(WorkerRequest::Sync(tx)).is_ok() {
                w.shared.wake();
                answers.push((w.id, rx));
            }
        }
        self.policy_pending = Some(PendingPolicy {
            before,
            answers,
            deadline: Instant::now() + WORKER_ANSWER,
            kept: 0,
        });
    }

    /// Go on with a policy change once every worker answered (or the wait is over): keep
    /// the flows they name, then change the XDP maps in one transaction. If the maps
    /// refuse it, everything goes back to the previous policy, and the error is shown
    /// (`lbctl ipmasq list`).
    fn poll_policy(&mut self, now: Instant) {
        let (Some(p), steering) = (self.policy_pending.as_mut(), &mut self.steering) else {
            return;
        };
        p.answers.retain(|(id, rx)| match rx.try_recv() {
            Ok(keys) => {
                for k in keys {
                    match steering.keep(&k) {
                        Ok(()) => p.kept += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, "flow not kept: it will lose its translation")
                        }
                    }
                }
                false
            }
            Err(crossbeam_channel::TryRecvError::Empty) => true,
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                tracing::error!(worker = id, "worker gone during the policy sync");
                false
            }
        });
        if !p.answers.is_empty() && now < p.deadline {
            return;
        }
        let Some(p) = self.policy_pending.take() else {
            return;
        };
        for (id, _) in &p.answers {
            tracing::error!(worker = id, "worker did not answer the policy sync");
        }
        let next = steering_state(&self.table, &self.cfg, &self.snap);
        let again = self
            .snap
            .with_net(self.next_generation(), Arc::clone(&self.snap.net));
        match self.change_from(&next, again, &p.before) {
            Ok(()) => {
                let rules = self
                    .snap
                    .masq
                    .as_ref()
                    .map_or(0, |m| m.rules.policy.rules().len());
                tracing::info!(rules, kept = p.kept, "masquerade policy applied");
            }
            Err(e) => {
                tracing::error!(error = %e, "XDP maps did not take the new masquerade policy; the previous one stays");
                if let Some(m) = self.masq.as_mut() {
                    m.config_error = Some(format!(
                        "XDP maps refused the policy, the previous one stays: {e}"
                    ));
                }
            }
        }
    }

    fn masq_rules(m: &MasqState) -> (Vec<IpmasqRule>, Vec<IpmasqRule>) {
        let list = m
            .rules
            .policy
            .rules()
            .iter()
            .map(|(c, s)| IpmasqRule {
                cidr: c.to_string(),
                source: s.to_string(),
            })
            .collect();
        let always = m
            .rules
            .node_rules()
            .iter()
            .map(|(c, k)| IpmasqRule {
                cidr: c.to_string(),
                source: k.to_string(),
            })
            .collect();
        (list, always)
    }

    fn masq_off() -> ResponseEnvelope {
        ResponseEnvelope::error(
            ErrorKind::Invalid,
            "masquerading is off: start lbd with --masquerade-from CIDR",
        )
    }

    fn ipmasq_list(&self) -> ResponseEnvelope {
        let (Some(m), Some(rt)) = (self.snap.masq.as_ref(), self.masq.as_ref()) else {
            return Self::masq_off();
        };
        let (non_masquerade, always_kept) = Self::masq_rules(m);
        ResponseEnvelope::ok(Reply::Ipmasq(IpmasqView {
            masquerade_from: m.rules.from.iter().map(ToString::to_string).collect(),
            egress_address: m.rules.egress,
            non_masquerade,
            always_kept,
            masq_link_local: m.rules.policy.masq_link_local(),
            config: rt.config.as_ref().map(|p| p.display().to_string()),
            config_error: rt.config_error.clone(),
            applying: self.policy_pending.is_some(),
        }))
    }

    fn ipmasq_check(&self, source: Ipv4Addr, destination: Ipv4Addr) -> ResponseEnvelope {
        let Some(m) = self.snap.masq.as_ref() else {
            return Self::masq_off();
        };
        let d = m.rules.decide(source, destination);
        ResponseEnvelope::ok(Reply::Check(CheckView {
            source,
            destination,
            masquerade: d.masquerades(),
            decision: d.to_string(),
        }))
    }

    fn nat_list(&self, limit: usize) -> ResponseEnvelope {
        let mut answers = Vec::new();
        for w in &self.workers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if w.requests
                .try_send(WorkerRequest::Flows { limit, reply: tx })
                .is_ok()
            {
                w.shared.wake();
                answers.push((w.id, rx));
            }
        }
        let mut translations = Vec::new();
        let mut truncated = false;
        for (id, rx) in answers {
            match rx.recv_timeout(WORKER_ANSWER) {
                Ok((flows, now, more)) => {
                    truncated |= more;
                    translations.extend(flows.iter().map(|f| translation(f, id, now)));
                }
                Err(_) => {
                    return ResponseEnvelope::error(
                        ErrorKind::Datapath,
                        format!("worker {id} did not answer"),
                    )
                }
            }
        }
        translations
            .sort_by(|a, b| (&a.kind, &a.inside, &a.remote).cmp(&(&b.kind, &b.inside, &b.remote)));
        ResponseEnvelope::ok(Reply::Nat(NatView {
            translations,
            truncated,
        }))
    }

    /// Stop the workers and wait for them; dropping the daemon then detaches XDP.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &self.workers {
            let _ = w.shared.waker.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Handler for Daemon {
    fn handle(&mut self, req: Request, peer: Peer) -> ResponseEnvelope {
        if !req.is_change() {
            return self.answer(req);
        }
        let what = format!("{req:?}");
        let resp = self.answer(req);
        // Every change is logged with who asked (SO_PEERCRED) and what came of it.
        match &resp.outcome {
            Outcome::Ok { result } => {
                let msg = match result {
                    Reply::Done { message } => message.as_str(),
                    _ => "done",
                };
                tracing::info!(%peer, request = %what, "change applied: {msg}");
            }
            Outcome::Error { error } => {
                tracing::info!(%peer, request = %what, "change refused: {}", error.message)
            }
        }
        resp
    }

    fn tick(&mut self) {
        self.tick_inner();
    }
}

impl Daemon {
    /// Why lbd has to stop, if it has: a worker panicked, or an interface vanished (lbd
    /// exits with it, nonzero).
    pub fn fatal(&self) -> Option<String> {
        let failed = self
            .workers
            .iter()
            .find(|w| w.shared.failed.load(Ordering::SeqCst))
            .map(|w| format!("worker {} (queue {}) panicked", w.id, w.queue));
        failed.or_else(|| self.fatal.clone())
    }

    /// An interface lbd serves is gone or was replaced (a different ifindex under its
    /// name): its XDP program and sockets went with it. lbd does not re-attach by itself;
    /// it stops with a clear error so its supervisor restarts it on the new interface.
    fn check_interfaces(&mut self) {
        for i in &self.snap.net.ifaces {
            let path = format!("/sys/class/net/{}/ifindex", i.name);
            let now = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if now != Some(i.ifindex) {
                let why = match now {
                    None => format!("interface {} disappeared", i.name),
                    Some(n) => format!(
                        "interface {} was replaced (ifindex {} → {n})",
                        i.name, i.ifindex
                    ),
                };
                tracing::error!("{why}: its XDP program and sockets are gone; lbd stops (restart it to serve the interface again)");
                self.fatal = Some(why);
                self.stop.store(true, Ordering::Relaxed);
                return;
            }
        }
    }

    fn answer(&mut self, req: Request) -> ResponseEnvelope {
        match req {
            Request::ServiceAdd {
                frontend,
                backends,
                options,
            } => self.apply(Op::AddService {
                frontend,
                backends,
                options,
            }),
            Request::ServiceSet { frontend, options } => {
                self.apply(Op::SetOptions { frontend, options })
            }
            Request::BackendSetWeight {
                frontend,
                address,
                port,
                weight,
            } => self.apply(Op::SetWeight {
                frontend,
                addr: address,
                port,
                weight,
            }),
            Request::ServiceRemove { frontend } => self.apply(Op::RemoveService { frontend }),
            Request::BackendAdd { frontend, backend } => {
                self.apply(Op::AddBackend { frontend, backend })
            }
            Request::BackendRemove {
                frontend,
                address,
                port,
            } => self.apply(Op::RemoveBackend {
                frontend,
                addr: address,
                port,
            }),
            Request::ServiceList {} => self.service_list(),
            Request::Status {} => ResponseEnvelope::ok(self.status()),
            Request::Stats {} => ResponseEnvelope::ok(self.stats()),
            Request::ServiceHealth { frontend, check } => self.set_health(frontend, check),
            Request::CaptureStart { service, backend } => self.capture_start(service, backend),
            Request::CaptureRead {} => self.capture_read(false),
            Request::CaptureStop {} => self.capture_read(true),
            Request::Explain {
                source,
                destination,
                proto,
                iface,
            } => self.explain(source, destination, &proto, iface.as_deref()),
            Request::ServiceStats {} => match self.service_stats() {
                Ok(services) => ResponseEnvelope::ok(Reply::ServiceStats { services }),
                Err(e) => ResponseEnvelope::error(ErrorKind::Datapath, e),
            },
            Request::IpmasqList {} => self.ipmasq_list(),
            Request::IpmasqCheck {
                source,
                destination,
            } => self.ipmasq_check(source, destination),
            Request::NatList { limit } => self.nat_list(limit.unwrap_or(10_000)),
            Request::Export {} => ResponseEnvelope::ok(Reply::State {
                state: DesiredState::of(&self.table, &self.health),
            }),
            Request::Apply { state, dry_run } => self.apply_state(state, dry_run),
        }
    }

    fn tick_inner(&mut self) {
        // The fast path's clock (see maps.h, fp_clock): one step per tick.
        if let Err(e) = self.steering.set_fast_path_clock(xdp::sys::monotonic_ns()) {
            tracing::warn!(error = %e, "fast-path clock not stamped");
        }
        let mut asked = false;
        while let Ok(addr) = self.resolve_rx.try_recv() {
            asked |= self.request_resolution(addr, false);
        }
        while let Ok(k) = self.unkept_rx.try_recv() {
            self.steering.unkeep(&k);
        }
        self.tick_metrics();
        self.poll_health();
        if self
            .capture
            .as_ref()
            .is_some_and(|c| c.last_read.elapsed() >= CAPTURE_IDLE)
        {
            tracing::info!("packet capture ended: nobody read it for 5 s");
            self.capture_taps(None);
            self.capture = None;
        }
        let now = Instant::now();
        self.poll_policy(now);
        if self.policy_pending.is_none() {
            self.check_masq_config(now);
        }
        if asked {
            self.next_refresh = self.next_refresh.min(now + RESOLVE_RECHECK);
        }
        if now >= self.next_refresh {
            self.check_interfaces();
            self.refresh_net();
            self.next_refresh = now + REFRESH;
            self.resolving
                .retain(|_, t| now.duration_since(*t) < RESOLVE_BACKOFF * 10);
        }
    }
}

/// What `apply -f` changes in the services' health checks, one line each.
fn health_changes(
    cur: &control::desired::HealthChecks,
    next: &control::desired::HealthChecks,
) -> Vec<String> {
    let mut out = Vec::new();
    for (f, h) in next {
        if cur.get(f) != Some(h) {
            out.push(format!("~ service {f} health check: {h}"));
        }
    }
    for f in cur.keys().filter(|f| !next.contains_key(*f)) {
        out.push(format!("~ service {f} health check: none"));
    }
    out
}

/// The backend addresses an operation adds (their next hops to resolve ahead).
fn new_backends(op: &Op) -> Vec<[u8; 4]> {
    match op {
        Op::AddService { backends, .. } => backends.iter().map(|b| b.addr.octets()).collect(),
        Op::AddBackend { backend, .. } => vec![backend.addr.octets()],
        _ => Vec::new(),
    }
}

/// The service an operation adds to or changes.
fn op_service(op: &Op) -> Option<&lb::service::Frontend> {
    match op {
        Op::AddService { frontend, .. }
        | Op::SetOptions { frontend, .. }
        | Op::AddBackend { frontend, .. } => Some(frontend),
        _ => None,
    }
}

/// L2 DSR only changes the destination MAC, so each backend must be a neighbour
/// (`NetView::on_link`).
fn check_dsr_l2(svc: &lb::service::ServiceSpec, net: &lb::netview::NetView) -> Result<(), String> {
    let f = svc.frontend;
    if svc.options.mode.dsr(f.proto) != Some(lb::service::Dsr::L2) {
        return Ok(());
    }
    for b in &svc.backends {
        net.on_link(b.addr.octets()).map_err(|why| {
            format!(
                "{f} forwards by L2 DSR ({}): backend {why}; L2 DSR needs backends on a subnet \
                 of an interface xlb serves (use dsr-ipip or dsr-gue across routers)",
                svc.options.mode
            )
        })?;
    }
    Ok(())
}
