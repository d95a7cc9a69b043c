//! `lbd`'s state and its control-request handler, on the control thread.
//!
//! The control thread owns the configuration (the service table), the steering program,
//! the netlink socket and the workers' handles. A request is validated whole
//! (`ServiceTable::apply`, Maglev build), then applied in an order that keeps every
//! steered packet handled the same by the old and the new configuration (see
//! [`crate::bpf`]): stale map entries out, new snapshot to the workers, new entries in.
//! A datapath failure restores the previous state and reports it; nothing half-applies.
//!
//! Periodically ([`Handler::tick`]) it asks the kernel to resolve neighbours the workers
//! could not find, and re-reads routes and neighbours; a changed view becomes a new
//! snapshot (flows pick up new MACs lazily).

use crate::abi::Stat;
use crate::bpf::{Steering, SteeringState, MAX_IFACES, MAX_QUEUES};
use crate::netlink::{local_port_range, Netlink};
use crate::sys::IoConfig;
use crate::worker::{self, WorkerShared, WorkerSpec, HANDOFF_RING_BYTES};
use control::proto::{
    BackendView, ErrorKind, InterfaceView, Reply, Request, ResponseEnvelope, ServiceView,
    StatsView, StatusView, WorkerStats, WorkerView,
};
use control::server::Handler;
use crossbeam_channel::{Receiver, Sender};
use lb::netview::{NetView, NextHopError};
use lb::service::{Op, ServiceTable};
use lb::snapshot::{DatapathConfig, SnatConfig};
use lb::{Snapshot, Timeouts};
use nat::PortRange;
use ringbuf::traits::Split;
use ringbuf::HeapRb;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often routes and neighbours are re-read.
const REFRESH: Duration = Duration::from_secs(1);
/// How soon after asking for a resolution the view is re-read.
const RESOLVE_RECHECK: Duration = Duration::from_millis(30);
/// One resolution request per address per this long.
const RESOLVE_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub ifaces: Vec<String>,
    pub snat_addr: Option<Ipv4Addr>,
    pub snat_ports: PortRange,
    pub queues: Option<u32>,
    pub cores: Vec<usize>,
    pub flows_per_worker: usize,
    pub maglev_size: u32,
    pub timeouts: Timeouts,
    pub io: IoConfig,
    pub busy_poll_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
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
    slice: PortRange,
    snapshots: Sender<Arc<Snapshot>>,
    shared: Arc<WorkerShared>,
}

pub struct Daemon {
    cfg: DatapathConfig,
    ifaces: Vec<String>,
    flows_per_worker: usize,
    table: ServiceTable,
    steering: Steering,
    snap: Arc<Snapshot>,
    workers: Vec<WorkerHandle>,
    threads: Vec<JoinHandle<()>>,
    netlink: Netlink,
    resolve_rx: Receiver<[u8; 4]>,
    resolving: HashMap<[u8; 4], Instant>,
    next_refresh: Instant,
    stop: Arc<AtomicBool>,
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

impl Daemon {
    /// Read the kernel's view, attach the program, start the workers.
    pub fn start(dc: DaemonConfig, stop: Arc<AtomicBool>) -> Result<Daemon, DaemonError> {
        if dc.ifaces.is_empty() || dc.ifaces.len() > MAX_IFACES {
            return Err(DaemonError::Config(format!(
                "give 1 to {MAX_IFACES} interfaces with --iface"
            )));
        }
        let mut nl = Netlink::open()?;
        let net = nl.dump(&dc.ifaces)?;
        let snat_addr = match dc.snat_addr {
            Some(a) => a,
            None => net
                .ifaces
                .last()
                .and_then(|i| i.addr)
                .map(Ipv4Addr::from)
                .ok_or_else(|| {
                    DaemonError::Config(format!(
                        "interface {} has no IPv4 address to use for SNAT; pass --snat-addr",
                        dc.ifaces.last().map(String::as_str).unwrap_or("?")
                    ))
                })?,
        };
        let mut local = Vec::new();
        for i in &net.ifaces {
            local.extend(nl.ipv4_addrs(i.ifindex)?);
        }
        if local.contains(&snat_addr) {
            if let Some((lo, hi)) = local_port_range() {
                if dc.snat_ports.first <= hi && lo <= dc.snat_ports.last {
                    return Err(DaemonError::Config(format!(
                        "SNAT ports {} overlap the host's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range) on \
                         {snat_addr}, a host address: replies to the host's own connections would be taken. Choose \
                         --snat-ports outside {lo}-{hi} or a dedicated --snat-addr",
                        dc.snat_ports
                    )));
                }
            }
        }
        let mut queues = u32::MAX;
        for i in &dc.ifaces {
            queues = queues.min(rx_queues(i)?);
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
        let workers = queues as u16;
        dc.snat_ports
            .check_workers(workers)
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        let cfg = DatapathConfig {
            snat: SnatConfig {
                addr: snat_addr.octets(),
                ports: dc.snat_ports,
            },
            timeouts: dc.timeouts,
            maglev_size: dc.maglev_size,
            hash_seed: 0,
            workers,
        };
        lb::maglev::Maglev::build(&[], cfg.maglev_size, 0)
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        let table = ServiceTable::default();
        let snap = Arc::new(
            Snapshot::build(1, &cfg, &table, Arc::new(net), None)
                .map_err(|e| DaemonError::Config(e.to_string()))?,
        );

        if let Err(e) = crate::sys::raise_memlock_limit() {
            tracing::debug!(error = %e, "RLIMIT_MEMLOCK not raised (fine with CAP_IPC_LOCK on Linux 5.11+)");
        }
        let mut steering = Steering::load()?;
        for (slot, iface) in snap.net.ifaces.iter().enumerate() {
            steering.set_iface_slot(iface.ifindex, slot as u32)?;
        }
        steering.add_new(&SteeringState::new(&table, cfg.snat.addr, cfg.snat.ports))?;
        for i in &dc.ifaces {
            let mode = steering.attach(i)?;
            tracing::info!(iface = %i, mode, "XDP program attached");
        }

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
            let (poll, s) = worker::shared_state()
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
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (id, ((out, inbound), poll)) in outs.into_iter().zip(ins).zip(polls).enumerate() {
            let (snap_tx, snap_rx) = crossbeam_channel::bounded(64);
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
                resolve: resolve_tx.clone(),
                out,
                inbound,
                peers: shared.clone(),
                poll,
                stop: Arc::clone(&stop),
            };
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let t = std::thread::Builder::new()
                .name(format!("xlb-worker-{id}"))
                .spawn(move || worker::run(spec, ready_tx))
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
                slice: dc.snat_ports.slice(id as u16, workers),
                snapshots: snap_tx,
                shared: Arc::clone(&shared[id]),
            });
            tracing::info!(worker = id, queue, core = ?core.map(|c| c.id), "worker started");
        }
        Ok(Daemon {
            cfg,
            ifaces: dc.ifaces,
            flows_per_worker: dc.flows_per_worker,
            table,
            steering,
            snap,
            workers: handles,
            threads,
            netlink: nl,
            resolve_rx,
            resolving: HashMap::new(),
            next_refresh: Instant::now() + REFRESH,
            stop,
        })
    }

    fn publish(&mut self, snap: Snapshot) {
        let snap = Arc::new(snap);
        for w in &self.workers {
            if w.snapshots.try_send(Arc::clone(&snap)).is_err() {
                tracing::error!(worker = w.id, "worker is not taking snapshots (stuck?)");
            }
            w.shared.wake();
        }
        self.snap = snap;
    }

    fn next_generation(&self) -> u64 {
        self.snap.generation + 1
    }

    /// Validate `op` whole, then apply it to the maps and workers in the safe order.
    fn apply(&mut self, op: Op) -> ResponseEnvelope {
        let next = match self.table.apply(&op) {
            Ok(t) => t,
            Err(e) => return ResponseEnvelope::error(ErrorKind::Invalid, e.to_string()),
        };
        let snap = match Snapshot::build(
            self.next_generation(),
            &self.cfg,
            &next,
            Arc::clone(&self.snap.net),
            Some(&self.snap),
        ) {
            Ok(s) => s,
            Err(e) => return ResponseEnvelope::error(ErrorKind::Invalid, e.to_string()),
        };
        let old_state = self.steering.current().clone();
        let new_state = SteeringState::new(&next, self.cfg.snat.addr, self.cfg.snat.ports);
        if let Err(e) = self.steering.remove_stale(&new_state) {
            let _ = self.steering.add_new(&old_state);
            return ResponseEnvelope::error(ErrorKind::Datapath, format!("nothing changed: {e}"));
        }
        let old_snap = Arc::clone(&self.snap);
        self.publish(snap);
        if let Err(e) = self.steering.add_new(&new_state) {
            let _ = self.steering.remove_stale(&old_state);
            let _ = self.steering.add_new(&old_state);
            let restored = old_snap.with_net(self.next_generation(), Arc::clone(&self.snap.net));
            self.publish(restored);
            return ResponseEnvelope::error(ErrorKind::Datapath, format!("nothing changed: {e}"));
        }
        self.table = next;
        let msg = match &op {
            Op::AddService { frontend, backends } => {
                self.prime(backends.iter().map(|b| b.addr.octets()).collect());
                format!(
                    "service {frontend} added with {} backend(s)",
                    backends.len()
                )
            }
            Op::RemoveService { frontend } => format!("service {frontend} removed"),
            Op::AddBackend { frontend, backend } => {
                self.prime(vec![backend.addr.octets()]);
                format!(
                    "backend {}:{} added to {frontend}",
                    backend.addr, backend.port
                )
            }
            Op::RemoveBackend {
                frontend,
                addr,
                port,
            } => format!("backend {addr}:{port} removed from {frontend}"),
        };
        ResponseEnvelope::ok(Reply::Done { message: msg })
    }

    /// Ask the kernel to resolve the next hops of `addrs` and wait briefly for answers,
    /// so a new backend's first packet finds its MAC.
    fn prime(&mut self, addrs: Vec<[u8; 4]>) {
        let mut asked = false;
        for a in &addrs {
            asked |= self.request_resolution(*a, true);
        }
        if !asked {
            return;
        }
        for _ in 0..25 {
            std::thread::sleep(Duration::from_millis(20));
            self.refresh_net();
            if addrs.iter().all(|a| {
                !matches!(
                    self.snap.net.next_hop(*a),
                    Err(NextHopError::Unresolved { .. })
                )
            }) {
                return;
            }
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
                let s = self.snap.with_net(self.next_generation(), Arc::new(net));
                self.publish(s);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading routes and neighbours"),
        }
    }

    fn service_list(&self) -> Reply {
        let mut services = Vec::new();
        for spec in self.table.services() {
            let key = lb::snapshot::FrontendKey::from(&spec.frontend);
            let mut slots = vec![0usize; spec.backends.len()];
            let mut total = 1usize;
            if let Some(state) = self.snap.services.get(&key) {
                total = state.maglev.size().max(1);
                if spec.backends.iter().any(|b| b.weight > 0) {
                    for &s in state.maglev.slots() {
                        if let Some(c) = slots.get_mut(usize::from(s)) {
                            *c += 1;
                        }
                    }
                }
            }
            services.push(ServiceView {
                id: spec.id,
                frontend: spec.frontend.to_string(),
                mode: "snat".into(),
                backends: spec
                    .backends
                    .iter()
                    .zip(slots)
                    .map(|(b, n)| BackendView {
                        address: b.addr,
                        port: b.port,
                        weight: b.weight,
                        state: if b.weight > 0 {
                            "active".into()
                        } else {
                            "drained".into()
                        },
                        share: (n as f64 * 1000.0 / total as f64).round() / 10.0,
                    })
                    .collect(),
            });
        }
        Reply::Services { services }
    }

    fn status(&self) -> Reply {
        let modes: HashMap<&str, &str> = self
            .steering
            .attached()
            .iter()
            .map(|(i, m)| (i.as_str(), *m))
            .collect();
        let net: &NetView = &self.snap.net;
        Reply::Status(StatusView {
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
                })
                .collect(),
            workers: self
                .workers
                .iter()
                .map(|w| WorkerView {
                    id: w.id,
                    queue: w.queue,
                    core: w.core,
                    snat_ports: w.slice.to_string(),
                    flows: w.shared.flows.load(Ordering::Relaxed),
                    flow_capacity: self.flows_per_worker as u64,
                })
                .collect(),
            snat_address: Ipv4Addr::from(self.cfg.snat.addr),
            snat_ports: self.cfg.snat.ports.to_string(),
            services: self.table.len(),
            flows: self
                .workers
                .iter()
                .map(|w| w.shared.flows.load(Ordering::Relaxed))
                .sum(),
            neighbours: net.neighbour_count(),
            routes: net.routes().len(),
        })
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
        Reply::Stats(StatsView { workers, xdp })
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
    fn handle(&mut self, req: Request) -> ResponseEnvelope {
        match req {
            Request::ServiceAdd { frontend, backends } => {
                self.apply(Op::AddService { frontend, backends })
            }
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
            Request::ServiceList {} => ResponseEnvelope::ok(self.service_list()),
            Request::Status {} => ResponseEnvelope::ok(self.status()),
            Request::Stats {} => ResponseEnvelope::ok(self.stats()),
        }
    }

    fn tick(&mut self) {
        let mut asked = false;
        while let Ok(addr) = self.resolve_rx.try_recv() {
            asked |= self.request_resolution(addr, false);
        }
        let now = Instant::now();
        if asked {
            self.next_refresh = self.next_refresh.min(now + RESOLVE_RECHECK);
        }
        if now >= self.next_refresh {
            self.refresh_net();
            self.next_refresh = now + REFRESH;
            self.resolving
                .retain(|_, t| now.duration_since(*t) < RESOLVE_BACKOFF * 10);
        }
    }
}
