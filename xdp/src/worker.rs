//! Worker threads: one per rx queue, pinned to a core, each owning its AF_XDP sockets
//! (one per served interface, on its queue), its flow table, and the NAT mappings of the
//! ports it owns (`nat::port_owner`).
//!
//! The loop, per batch: take the newest snapshot if the control thread sent one (so a
//! batch sees one configuration), read the clock once, recycle completed TX frames into
//! the fill rings, take up to a batch from each RX ring and from each hand-off ring,
//! run every frame through the pure [`lb::Engine`], queue TX, flush. Nothing here locks
//! or allocates.
//!
//! Hand-off: an XSK receives only its own queue's frames, so a reply that lands on
//! another worker's queue, or an inside endpoint's packet that finds no flow away from
//! its home worker (see `lb::pipeline`), is copied into that worker's SPSC ring (ringbuf; one ring per
//! ordered pair of workers; each frame is prefixed with its length and the number of
//! workers that already looked for its flow) and processed there. A frame that found no
//! flow and cannot open one goes round the workers the same way (`Verdict::Probe`), so a
//! flow whose packets moved queues keeps working.
//!
//! Idle: after `busy_poll_ns` without work a worker parks in poll() on its sockets and its
//! mio waker (other workers and the control thread wake it when they give it work), so
//! an idle lbd does not burn the cores the rest of the node needs. Spinning longer buys
//! latency (a parked worker pays a wake-up per packet) with CPU time.

use crate::sys::{IoConfig, WorkerIo, XSK_STATS};
use crossbeam_channel::{Receiver, Sender};
use lb::counters::{Counters, COUNTER_SLOTS};
use lb::{DropReason, Engine, Event, Snapshot, Verdict};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use ringbuf::traits::{Consumer, Observer, Producer};
use ringbuf::{HeapCons, HeapProd};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest park (the loop also notices stop requests this often).
const PARK: Duration = Duration::from_millis(20);
/// Ethernet header length: where a DSR tunnel's outer headers go.
const ETH_LEN: usize = 14;
/// Bytes of each hand-off ring (≈ 250 full-size frames).
pub const HANDOFF_RING_BYTES: usize = 512 * 1024;
/// Largest frame a hand-off carries.
const MAX_FRAME: usize = 2048;
/// How long a frame waits for its neighbour (the kernel's default probe time is 1 s).
const HOLD_NS: u64 = 1_000_000_000;
/// How often the sockets' kernel drop counters are read and published.
const KERNEL_STATS_NS: u64 = 1_000_000_000;

/// What a worker shares with the control thread: counters (written by the worker only,
/// read by anyone), its flow count, and the park flag and waker.
#[derive(Debug)]
pub struct WorkerShared {
    pub counters: [AtomicU64; COUNTER_SLOTS],
    /// The kernel's drop counters of each of the worker's sockets (one per served
    /// interface, in `--iface` order), refreshed about once a second.
    pub xsk: Vec<[AtomicU64; XSK_STATS]>,
    pub flows: AtomicU64,
    /// NAT mappings (inside endpoints) the worker holds, and how many are on each SNAT
    /// pool address (pool order).
    pub mappings: AtomicU64,
    pub pool_use: [AtomicU64; nat::MAX_POOL],
    /// New flows refused for want of a port, by NAT address (`Snapshot::nat_addrs`).
    pub pool_failures: [AtomicU64; nat::MAX_POOL],
    /// Flow directions this worker has in the XDP fast path.
    pub fast_entries: AtomicU64,
    /// Frames a capture matched but did not keep (rate limit, full ring).
    pub capture_dropped: AtomicU64,
    /// Bumped each time the worker folds removed fast-path entries' counts into its
    /// accounts (a reader of accounts and the map together checks it did not move).
    pub fold_seq: AtomicU64,
    pub parked: AtomicBool,
    /// The worker thread panicked (set by the daemon's supervisor; lbd then stops).
    pub failed: AtomicBool,
    pub waker: Waker,
}

impl WorkerShared {
    /// The sockets' kernel counters, in interface order.
    pub fn xsk_stats(&self) -> Vec<[u64; XSK_STATS]> {
        self.xsk
            .iter()
            .map(|a| std::array::from_fn(|i| a[i].load(Ordering::Relaxed)))
            .collect()
    }

    pub fn counters(&self) -> Counters {
        let mut a = [0u64; COUNTER_SLOTS];
        for (d, s) in a.iter_mut().zip(&self.counters) {
            *d = s.load(Ordering::Relaxed);
        }
        Counters::from_array(&a)
    }

    /// Wake the worker if it is parked. Call after publishing the work (ring push,
    /// snapshot send): the fence pairs with the one in the park path (store work → fence
    /// → load flag here; store flag → fence → load work there), so one side always sees
    /// the other's store and no wake-up is lost.
    pub fn wake(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }
}

/// What the control thread asks a worker between batches.
#[derive(Debug)]
pub enum WorkerRequest {
    /// Reply once every snapshot sent before this request is in use, with the forward
    /// keys of the flows the last masquerading policy change kept.
    Sync(Sender<Vec<lb::flow::FlowKey>>),
    /// A copy of up to `limit` flows, and the worker's clock (ns) to age them.
    Flows {
        limit: usize,
        reply: Sender<(Vec<FlowCopy>, u64, bool)>,
    },
    /// Live load-balanced flows by service and backend.
    BackendFlows(Sender<BackendFlows>),
    /// The flow holding this 5-tuple (either direction), if this worker has one.
    Lookup {
        key: lb::flow::FlowKey,
        reply: Sender<Option<FlowCopy>>,
    },
    /// The worker's (service, backend) accounts, its live flows by the same pairs, and
    /// its `fold_seq` as of the accounts.
    Accounts(Sender<(Vec<lb::pipeline::Account>, BackendFlows, u64)>),
    /// Start capturing into the tap, or stop (None).
    Capture(Option<CaptureTap>),
    /// Take over flows a previous lbd left in the fast path (`lb::pipeline::adopt`);
    /// reply with the ones refused (by position) and the forward keys of those the
    /// masquerading policy now keeps (for the keep map).
    Adopt {
        flows: Vec<lb::pipeline::adopt::Inherited>,
        reply: Sender<Adopted>,
    },
}

/// What a capture keeps: frames of this service and/or backend (load-balanced flows;
/// neither: every frame), before and after the worker's translation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    pub service: Option<lb::snapshot::FrontendKey>,
    pub backend: Option<[u8; 4]>,
}

/// A capture's end in a worker: the filter and the ring its records go into.
pub struct CaptureTap {
    pub filter: CaptureFilter,
    pub ring: HeapProd<u8>,
}

impl std::fmt::Debug for CaptureTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureTap")
            .field("filter", &self.filter)
            .finish()
    }
}

/// Frames a worker may capture per second (each is one record before translation and
/// one after): a capture cannot take the datapath's time; more are counted as dropped.
pub const CAPTURE_PER_SEC: u64 = 10_000;

/// A capture record's header in the ring: direction (0 in, 1 out), verdict code,
/// worker, CLOCK_MONOTONIC ns, frame length; the frame follows.
pub const CAPTURE_HEADER: usize = 1 + 1 + 2 + 8 + 2;

/// A worker's answer to [`WorkerRequest::Adopt`].
#[derive(Debug, Default)]
pub struct Adopted {
    pub refused: Vec<(usize, lb::pipeline::adopt::Unadoptable)>,
    pub kept: Vec<lb::flow::FlowKey>,
}

pub use lb::pipeline::BackendFlows;

/// A flow as `lbctl nat list` shows it: the worker's copy with what the XDP fast path did
/// for it folded in (last seen, in the worker's clock), and the packets the fast path
/// forwarded in each direction.
#[derive(Debug, Clone, Copy)]
pub struct FlowCopy {
    pub flow: lb::flow::Flow,
    pub fast_packets: [u64; 2],
}

/// Everything a worker thread needs; built by the daemon, moved into the thread.
pub struct WorkerSpec {
    pub id: u16,
    pub queue: u32,
    pub core: Option<core_affinity::CoreId>,
    pub ifaces: Vec<String>,
    pub io: IoConfig,
    pub flow_capacity: usize,
    /// How long to keep polling the rings without work before parking.
    pub busy_poll_ns: u64,
    pub snapshot: Arc<Snapshot>,
    pub snapshots: Receiver<Arc<Snapshot>>,
    pub requests: Receiver<WorkerRequest>,
    pub resolve: Sender<[u8; 4]>,
    /// Forward keys of kept masquerade flows that ended (for the keep map).
    pub unkept: Sender<lb::flow::FlowKey>,
    /// Rings to every other worker (None at our own index).
    pub out: Vec<Option<HeapProd<u8>>>,
    /// Rings from every other worker.
    pub inbound: Vec<HeapCons<u8>>,
    /// Shared state of every worker (to wake a peer we hand a frame to).
    pub peers: Vec<Arc<WorkerShared>>,
    pub poll: Poll,
    pub stop: Arc<AtomicBool>,
    /// The XDP fast path's flow map, when `--fast-path on`: the worker installs its
    /// established flows there and removes them when they end.
    pub fast_path: Option<crate::bpf::FastPathMap>,
}

impl std::fmt::Debug for WorkerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSpec")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .finish()
    }
}

pub const WAKER: Token = Token(usize::MAX);

/// Create a worker's poll instance and shared state for `sockets` sockets (the waker must
/// be registered with the poll the worker will park on).
pub fn shared_state(sockets: usize) -> std::io::Result<(Poll, Arc<WorkerShared>)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    Ok((
        poll,
        Arc::new(WorkerShared {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            xsk: (0..sockets)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            flows: AtomicU64::new(0),
            mappings: AtomicU64::new(0),
            pool_use: std::array::from_fn(|_| AtomicU64::new(0)),
            pool_failures: std::array::from_fn(|_| AtomicU64::new(0)),
            fast_entries: AtomicU64::new(0),
            fold_seq: AtomicU64::new(0),
            capture_dropped: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            waker,
        }),
    ))
}

/// Bind the worker's sockets (in the calling thread), report their fds through `ready`,
/// then run until `stop`.
pub fn run(mut spec: WorkerSpec, ready: Sender<Result<Vec<RawFd>, String>>) {
    if let Some(core) = spec.core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                worker = spec.id,
                core = core.id,
                "could not pin worker to its core"
            );
        }
    }
    // The flow table first: lbd says "ready" only when every worker has its memory, and
    // a table that does not fit is a start-up error, not an abort later.
    let mut engine = match Engine::try_new(spec.id, spec.flow_capacity, Arc::clone(&spec.snapshot))
    {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(format!("{e}; lower --flows-per-worker")));
            return;
        }
    };
    let mut io = match WorkerIo::new(&spec.ifaces, spec.queue, spec.io) {
        Ok(io) => io,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let fds = io.fds();
    for (i, fd) in fds.iter().enumerate() {
        if let Err(e) =
            spec.poll
                .registry()
                .register(&mut SourceFd(fd), Token(i), Interest::READABLE)
        {
            let _ = ready.send(Err(format!("registering socket {i} with poll: {e}")));
            return;
        }
    }
    if ready.send(Ok(fds)).is_err() {
        return;
    }
    let me = Arc::clone(&spec.peers[spec.id as usize]);
    let mut events = Events::with_capacity(16);
    let mut buf = [0u8; MAX_FRAME];
    // The engine's clock is CLOCK_MONOTONIC, the fast path's (it stamps entries with it):
    // one clock for both, and for flows adopted from a previous lbd's fast path.
    let clock = crate::sys::monotonic_ns;
    let mut fast_entries = 0u64;
    let mut folds = Vec::with_capacity(FOLDS);
    let mut capture: Option<Capture> = None;
    let mut kept = Vec::new();
    // Carry out the engine's events (see `dispatch`), from the loop's own state.
    macro_rules! dispatch_events {
        () => {
            dispatch(
                &mut engine,
                Sinks::of(
                    &mut spec,
                    &mut kept,
                    &mut fast_entries,
                    &mut folds,
                    &me.fold_seq,
                ),
            )
        };
    }
    if spec.fast_path.is_some() {
        engine.enable_fast_path();
    }
    let mut last_work = 0u64;
    let mut wake_peer = vec![false; spec.peers.len()];
    let mut next_kernel_stats = 0u64;
    while !spec.stop.load(Ordering::Relaxed) {
        let mut fresh = false;
        while let Ok(s) = spec.snapshots.try_recv() {
            engine.set_snapshot(s);
            fresh = true;
        }
        let now = clock();
        while let Ok(req) = spec.requests.try_recv() {
            match req {
                WorkerRequest::Sync(reply) => {
                    // A snapshot sent just before the request may have arrived after
                    // the check above.
                    while let Ok(s) = spec.snapshots.try_recv() {
                        engine.set_snapshot(s);
                        fresh = true;
                    }
                    dispatch_events!();
                    let _ = reply.send(std::mem::take(&mut kept));
                }
                WorkerRequest::Flows { limit, reply } => {
                    let map = spec.fast_path.as_ref();
                    let flows: Vec<FlowCopy> = engine
                        .flows()
                        .iter()
                        .take(limit)
                        .map(|f| flow_copy(f, map))
                        .collect();
                    let truncated = engine.flows().len() > limit;
                    let _ = reply.send((flows, now, truncated));
                }
                WorkerRequest::BackendFlows(reply) => {
                    let _ = reply.send(engine.backend_flows());
                }
                WorkerRequest::Lookup { key, reply } => {
                    let found = engine
                        .flows()
                        .lookup(&key)
                        .and_then(|(slot, _)| engine.flows().get(slot))
                        .map(|f| flow_copy(f, spec.fast_path.as_ref()));
                    let _ = reply.send(found);
                }
                WorkerRequest::Accounts(reply) => {
                    let seq = me.fold_seq.load(Ordering::SeqCst);
                    let _ = reply.send((engine.accounts().to_vec(), engine.backend_flows(), seq));
                }
                WorkerRequest::Capture(tap) => {
                    capture = tap.map(|t| Capture {
                        tap: t,
                        tokens: CAPTURE_PER_SEC,
                        refilled: now,
                        pre: Vec::with_capacity(MAX_FRAME),
                        post: Vec::with_capacity(MAX_FRAME),
                        rec: Vec::with_capacity(MAX_FRAME + CAPTURE_HEADER),
                    });
                }
                WorkerRequest::Adopt { flows, reply } => {
                    let mut answer = Adopted::default();
                    for (i, f) in flows.iter().enumerate() {
                        match engine.adopt(f, now) {
                            // Its entries are in the map already.
                            Ok(()) => fast_entries += if f.rewrite[0].fwd.is_dsr() { 1 } else { 2 },
                            Err(why) => answer.refused.push((i, why)),
                        }
                    }
                    dispatch_events!();
                    answer.kept = std::mem::take(&mut kept);
                    me.fast_entries.store(fast_entries, Ordering::Relaxed);
                    publish(&me, &engine);
                    let _ = reply.send(answer);
                }
            }
        }
        match &spec.fast_path {
            Some(map) => engine.begin_batch_with(now, &mut |k| {
                map.get(k).filter(|e| e.last_seen != 0).map(|e| e.last_seen)
            }),
            None => engine.begin_batch(now),
        }
        io.refill();
        let expired = io.expire_held(now);
        for _ in 0..expired {
            engine.dropped(DropReason::NoNeighbour);
        }
        let mut work = 0;
        if fresh {
            work += io.requeue_held();
        }
        for port in 0..io.ports() {
            work += io.receive(port);
        }
        for ring in &mut spec.inbound {
            work += drain_ring(ring, &mut io, &mut engine, &mut buf);
        }
        for i in 0..io.batch_len() {
            let hops = io.hops(i);
            if let Some(c) = capture.as_mut() {
                c.pre.clear();
                c.pre.extend_from_slice(io.frame(i));
            }
            let v = engine.process_probe(io.frame(i), hops);
            if let Some(c) = capture.as_mut() {
                c.post.clear();
                c.post.extend_from_slice(io.frame(i));
                c.record(&engine, v, spec.id, now, &me);
            }
            match v {
                Verdict::Tx { iface } => {
                    if !io.send(i, usize::from(iface)) {
                        engine.undelivered(v, DropReason::TxRingFull);
                    }
                }
                Verdict::Fragments { iface, count } => {
                    let port = usize::from(iface);
                    let mut sent = io.replace(i, engine.fragment(0)) && io.send(i, port);
                    for k in 1..usize::from(count) {
                        sent &= io.send_copy(port, engine.fragment(k));
                    }
                    if !sent {
                        engine.undelivered(v, DropReason::TxRingFull);
                        io.release(i);
                    }
                }
                Verdict::Encap { iface, len } => {
                    let hdr = engine.encap_header();
                    if !io.insert(i, ETH_LEN, hdr, usize::from(len)) {
                        engine.undelivered(v, DropReason::Oversize);
                        io.release(i);
                    } else if !io.send(i, usize::from(iface)) {
                        engine.undelivered(v, DropReason::TxRingFull);
                        io.release(i);
                    }
                }
                Verdict::Icmp { iface } | Verdict::Reset { iface } => {
                    if !io.replace(i, engine.generated()) || !io.send(i, usize::from(iface)) {
                        engine.undelivered(v, DropReason::TxRingFull);
                        io.release(i);
                    }
                }
                Verdict::ToWorker(w) | Verdict::Probe(w) => {
                    // One more worker has looked for the frame's flow (a hand-off to an
                    // inside endpoint's home is a look too; see Engine::process_probe).
                    let w = usize::from(w);
                    let hops = hops.saturating_add(1);
                    let frame = io.frame(i);
                    let pushed = spec
                        .out
                        .get_mut(w)
                        .and_then(Option::as_mut)
                        .is_some_and(|p| push_frame(p, frame, hops));
                    if pushed {
                        wake_peer[w] = true;
                    } else {
                        engine.undelivered(v, DropReason::HandoffRingFull);
                    }
                    io.release(i);
                }
                Verdict::Hold => {
                    if !io.hold(i, now + HOLD_NS) {
                        engine.undelivered(v, DropReason::NoNeighbour);
                    }
                }
                Verdict::Drop(_) => io.release(i),
            }
        }
        // The engine's events before the batch leaves: an ended flow's fast-path
        // entries are gone before a new flow that reuses its NAT port sends its first
        // packet.
        dispatch_events!();
        me.fast_entries.store(fast_entries, Ordering::Relaxed);
        io.end_batch();
        io.flush();
        io.wake_fill();
        for (w, flag) in wake_peer.iter_mut().enumerate() {
            if std::mem::take(flag) {
                spec.peers[w].wake();
            }
        }

        publish(&me, &engine);
        if now >= next_kernel_stats {
            next_kernel_stats = now + KERNEL_STATS_NS;
            for (slot, st) in me.xsk.iter().zip(io.kernel_stats()) {
                for (a, v) in slot.iter().zip(st) {
                    a.store(v, Ordering::Relaxed);
                }
            }
        }
        if work > 0 || io.backlog() > 0 || io.tx_in_flight() > 0 {
            last_work = now;
        } else if now.saturating_sub(last_work) >= spec.busy_poll_ns {
            me.parked.store(true, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            // Re-check after announcing the park: a peer that pushed before seeing the
            // flag set must not be missed.
            let pending = spec.inbound.iter().any(|r| r.occupied_len() > 0)
                || !spec.snapshots.is_empty()
                || !spec.requests.is_empty();
            if !pending {
                let _ = spec.poll.poll(&mut events, Some(PARK));
            }
            me.parked.store(false, Ordering::SeqCst);
            last_work = clock();
        }
    }
}

/// `f` with the fast path's packets and last-seen (one lookup a direction, for
/// installed flows only; an operator's request, not per packet).
fn flow_copy(f: &lb::flow::Flow, map: Option<&crate::bpf::FastPathMap>) -> FlowCopy {
    let mut c = FlowCopy {
        flow: *f,
        fast_packets: [0; 2],
    };
    let Some(map) = map.filter(|_| f.fast) else {
        return c;
    };
    for (d, k) in f.keys.iter().enumerate().take(f.directions()) {
        if let Some(e) = map.get(&k.flowrec()) {
            c.fast_packets[d] = e.packets;
            if e.last_seen != 0 {
                c.flow.last_seen = c.flow.last_seen.max(e.last_seen);
            }
        }
    }
    c
}

/// A capture running in this worker.
struct Capture {
    tap: CaptureTap,
    /// Frames it may still keep this second, and when the allowance was last refilled.
    tokens: u64,
    refilled: u64,
    /// The frame before and after the engine, and a record being built.
    pre: Vec<u8>,
    post: Vec<u8>,
    rec: Vec<u8>,
}

impl Capture {
    /// Keep the frame just processed, before and after, if it matches the filter and
    /// the rate allows (else count it dropped).
    fn record(&mut self, engine: &Engine, v: Verdict, worker: u16, now: u64, me: &WorkerShared) {
        let f = self.tap.filter;
        if f.service.is_some() || f.backend.is_some() {
            let Some((svc, addr, _)) = engine.last_pair() else {
                return;
            };
            if f.service.is_some_and(|s| s != svc) || f.backend.is_some_and(|b| b != addr) {
                return;
            }
        }
        if now.saturating_sub(self.refilled) >= 1_000_000_000 {
            self.tokens = CAPTURE_PER_SEC;
            self.refilled = now;
        }
        let sent = matches!(v, Verdict::Tx { .. });
        let need = 2 * CAPTURE_HEADER + self.pre.len() + if sent { self.post.len() } else { 0 };
        if self.tokens == 0 || self.tap.ring.vacant_len() < need {
            me.capture_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.tokens -= 1;
        let code = verdict_code(v);
        let (ring, rec) = (&mut self.tap.ring, &mut self.rec);
        push_record(ring, rec, 0, code, worker, now, &self.pre);
        if sent {
            push_record(ring, rec, 1, code, worker, now, &self.post);
        }
    }
}

/// A verdict as a capture record says it (see [`capture_verdict`]).
fn verdict_code(v: Verdict) -> u8 {
    match v {
        Verdict::Tx { .. } => 0,
        Verdict::Encap { .. } => 1,
        Verdict::Fragments { .. } => 2,
        Verdict::Icmp { .. } => 3,
        Verdict::Reset { .. } => 4,
        Verdict::ToWorker(_) | Verdict::Probe(_) => 5,
        Verdict::Hold => 6,
        Verdict::Drop(_) => 7,
    }
}

/// What a capture record's verdict code means.
pub fn capture_verdict(code: u8) -> &'static str {
    match code {
        0 => "sent",
        1 => "sent in a tunnel",
        2 => "sent in fragments",
        3 => "answered with an ICMP error",
        4 => "answered with a reset",
        5 => "handed to another worker",
        6 => "held for a neighbour",
        _ => "dropped",
    }
}

/// Put one record (header and frame) into the ring in one push, so the reader sees it
/// whole or not at all.
fn push_record(
    ring: &mut HeapProd<u8>,
    rec: &mut Vec<u8>,
    dir: u8,
    code: u8,
    worker: u16,
    now: u64,
    frame: &[u8],
) {
    rec.clear();
    rec.push(dir);
    rec.push(code);
    rec.extend_from_slice(&worker.to_be_bytes());
    rec.extend_from_slice(&now.to_be_bytes());
    rec.extend_from_slice(&(frame.len() as u16).to_be_bytes());
    rec.extend_from_slice(frame);
    ring.push_slice(rec);
}

/// One record a worker captured: direction (0 in, 1 out), verdict code, worker,
/// CLOCK_MONOTONIC ns, the frame.
pub type CaptureRecord = (u8, u8, u16, u64, Vec<u8>);

/// The next whole record in a capture ring, if there is one.
pub fn pop_record(ring: &mut HeapCons<u8>) -> Option<CaptureRecord> {
    if ring.occupied_len() < CAPTURE_HEADER {
        return None;
    }
    let mut h = [0u8; CAPTURE_HEADER];
    ring.pop_slice(&mut h);
    let len = usize::from(u16::from_be_bytes([h[12], h[13]]));
    let mut frame = vec![0u8; len];
    ring.pop_slice(&mut frame);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&h[4..12]);
    Some((
        h[0],
        h[1],
        u16::from_be_bytes([h[2], h[3]]),
        u64::from_be_bytes(ts),
        frame,
    ))
}

/// Removed fast-path directions whose counts one drain of the engine's events folds
/// into accounts (at most two per event; more go uncounted).
const FOLDS: usize = 4096;

/// Where the engine's events go.
struct Sinks<'a> {
    fast_path: Option<&'a mut crate::bpf::FastPathMap>,
    resolve: &'a Sender<[u8; 4]>,
    unkept: &'a Sender<lb::flow::FlowKey>,
    /// Flows kept by a policy change, for the next `WorkerRequest::Sync`.
    kept: &'a mut Vec<lb::flow::FlowKey>,
    /// Fast-path entries this worker has installed.
    entries: &'a mut u64,
    /// What removed entries had forwarded, for their accounts: (account, direction,
    /// packets, bytes). Reserved at start.
    folds: &'a mut Vec<(u32, usize, u64, u64)>,
    fold_seq: &'a AtomicU64,
}

impl<'a> Sinks<'a> {
    fn of(
        spec: &'a mut WorkerSpec,
        kept: &'a mut Vec<lb::flow::FlowKey>,
        entries: &'a mut u64,
        folds: &'a mut Vec<(u32, usize, u64, u64)>,
        fold_seq: &'a AtomicU64,
    ) -> Self {
        Sinks {
            fold_seq,
            fast_path: spec.fast_path.as_mut(),
            resolve: &spec.resolve,
            unkept: &spec.unkept,
            kept,
            entries,
            folds,
        }
    }
}

/// Carry out the engine's events in order: fast-path changes on the map (an install the
/// map refuses, full, leaves the flow with the worker, which forwards it as before),
/// resolutions and ended keep entries to the daemon, kept flows for the next sync.
fn dispatch(engine: &mut Engine, mut sinks: Sinks<'_>) {
    let entries = sinks.entries;
    let folds = sinks.folds;
    for ev in engine.take_events() {
        match ev {
            Event::FastInstall(dirs, n) => {
                let Some(map) = sinks.fast_path.as_deref_mut() else {
                    continue;
                };
                for (k, e) in dirs.iter().take(n.into()) {
                    match map.install(k, e) {
                        Ok(true) => *entries += 1,
                        Ok(false) => {}
                        Err(e) => tracing::debug!(error = %e, "fast-path install refused"),
                    }
                }
            }
            Event::FastRemove(keys, n, acct) => {
                let Some(map) = sinks.fast_path.as_deref_mut() else {
                    continue;
                };
                for (dir, k) in keys.iter().take(n.into()).enumerate() {
                    // What it forwarded counts to its account (a packet the fast path
                    // forwards between the read and the removal goes uncounted).
                    if let Some(e) = map.get(k) {
                        if acct != lb::pipeline::NO_ACCOUNT && folds.len() < folds.capacity() {
                            folds.push((acct, dir, e.packets, e.bytes));
                        }
                    }
                    if map.remove(k) {
                        *entries = entries.saturating_sub(1);
                    }
                }
            }
            Event::Resolve(addr) => {
                let _ = sinks.resolve.try_send(addr);
            }
            Event::Unkept(k) => {
                let _ = sinks.unkept.try_send(k);
            }
            Event::Kept(k) => sinks.kept.push(k),
        }
    }
    let folded = !folds.is_empty();
    for (acct, dir, packets, bytes) in folds.drain(..) {
        engine.account_fast(acct, dir, packets, bytes);
    }
    if folded {
        sinks.fold_seq.fetch_add(1, Ordering::SeqCst);
    }
}

fn publish(me: &WorkerShared, engine: &Engine) {
    for (slot, v) in me.counters.iter().zip(engine.counters().to_array()) {
        slot.store(v, Ordering::Relaxed);
    }
    me.flows
        .store(engine.flows().len() as u64, Ordering::Relaxed);
    me.mappings
        .store(engine.mappings() as u64, Ordering::Relaxed);
    for (a, n) in me.pool_use.iter().zip(engine.pool_use()) {
        a.store(*n, Ordering::Relaxed);
    }
    for (a, n) in me.pool_failures.iter().zip(engine.pool_failures()) {
        a.store(*n, Ordering::Relaxed);
    }
}

/// Bytes before each frame in a hand-off ring: its length (u16) and its hop count.
const RING_HEADER: usize = 3;

/// Copy into a peer's ring behind its length and hop count; false if it does not fit.
fn push_frame(p: &mut HeapProd<u8>, frame: &[u8], hops: u8) -> bool {
    if frame.len() > MAX_FRAME || p.vacant_len() < frame.len() + RING_HEADER {
        return false;
    }
    let [a, b] = (frame.len() as u16).to_be_bytes();
    p.push_slice(&[a, b, hops]);
    p.push_slice(frame);
    true
}

/// Move whole frames from a ring into free UMEM frames of this worker's batch.
fn drain_ring(
    ring: &mut HeapCons<u8>,
    io: &mut WorkerIo,
    engine: &mut Engine,
    buf: &mut [u8; MAX_FRAME],
) -> usize {
    let mut n = 0;
    while n < 64 && ring.occupied_len() >= RING_HEADER {
        let mut head = [0u8; RING_HEADER];
        ring.peek_slice(&mut head);
        let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
        let hops = head[2];
        if ring.occupied_len() < len + RING_HEADER {
            break; // the producer has not finished this frame yet
        }
        ring.skip(RING_HEADER);
        engine.handed_in();
        n += 1;
        if len > MAX_FRAME {
            // Cannot happen with push_frame as the only producer; keep the ring in step.
            ring.skip(len);
            engine.dropped(DropReason::Oversize);
            continue;
        }
        let got = ring.pop_slice(&mut buf[..len]);
        if !io.inject(&buf[..got], hops) {
            engine.dropped(DropReason::NoFreeFrame);
        }
    }
    n
}
