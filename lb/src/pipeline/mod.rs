//! The worker pipeline: frame in, rewritten frame and verdict out. Two kinds of flow
//! share one flow table, one port slice and one rewrite machinery:
//!
//! ```text
//! load balancing (SNAT mode)
//! client:cport → VIP:vport        becomes   snat:port → backend:bport   (forward)
//! backend:bport → snat:port       becomes   VIP:vport → client:cport    (reverse)
//! egress masquerading (ip-masq-agent semantics, see nat::ipmasq)
//! pod:sport → remote:rport        becomes   egress:port → remote:rport  (forward)
//! remote:rport → egress:port      becomes   remote:rport → pod:sport    (reverse)
//! ```
//!
//! ICMP echo is keyed like a port pair: a request as `(id, 0)`, a reply as `(0, id)`, so
//! its identifier is translated like a source port (RFC 5508 §3.1). An ICMP error
//! (unreachable, fragmentation needed, time exceeded, parameter problem) quoting a
//! packet of a flow is translated back: the quoted packet is the inverse of a packet
//! that flow's rewrite produces, so the flow's rewrite, mirrored, restores the quoted
//! header, and the outer destination follows the flow (RFC 5508 §4, RFC 3022 §4.3).
//! Quoted and ICMP checksums are updated incrementally like the rest.
//!
//! Contract: no I/O, no clock (the caller passes `now` to [`Engine::begin_batch`], read
//! once per batch), no allocation per packet, no panics on any input. A frame is either
//! rewritten in place and sent out of an interface ([`Verdict::Tx`]), handed to the worker
//! that owns its flow ([`Verdict::ToWorker`]), or dropped with a counted reason.
//!
//! There is deliberately no `Pass` verdict: a frame in an AF_XDP socket cannot go back to
//! the kernel stack, so everything the kernel should see (ARP, TTL ≤ 1, the host's own
//! traffic) is left to it by the XDP program before a frame reaches a worker.
//!
//! Flow ownership: every NAT port has an owning worker ([`nat::port_owner`]), and a flow
//! lives on the worker owning its outside port. An inside endpoint (client or pod
//! address, port, protocol) has a *home*: the owner of the port it would keep
//! ([`nat::PortRange::preferred`]). Its packets that find no flow go home first
//! ([`Verdict::ToWorker`]), and home opens its flows, so all flows of one inside endpoint
//! share one mapping table: the endpoint keeps its port (port preservation) and one
//! outside port toward every remote (endpoint-independent mapping, RFC 4787 REQ-1). A
//! reply that arrives on another worker's queue is recognised by its destination port and
//! handed to the owner. A
//! packet that cannot open a flow (a mid-stream TCP segment, an ICMP error) and finds
//! none here may belong to a flow whose packets moved queues (an RSS change, a link
//! flap): it is handed along the workers in turn ([`Verdict::Probe`]) until one has the
//! flow or every worker has looked, and only then counted as `no_flow`.
//! Flows resolved under an older snapshot are revalidated on their next packet: a removed
//! backend ends the flow, a changed neighbour updates the MACs, nothing else moves.
//!
//! Stages: each frame goes through [`classify`] (frame → [`classify::Parsed`], read once,
//! never written), decide (parsed view and snapshot → a `Step`: which flow direction's
//! action, or route, translate, answer, hand off, hold, drop; it owns the flow table's
//! state changes and never touches the frame) and [`execute`] (applies the step to the
//! frame through the same action record the XDP fast path executes). The engine (this
//! module) holds the flow table and the per-worker state, runs the stages, counts
//! verdicts, sweeps idle flows and queues [`Event`]s for the I/O layer.

use crate::counters::{Counters, DropReason};
use crate::flow::{Dir, Flow, FlowKey, FlowKind, FlowState, FlowTable};
use crate::service::OnRemove;
use crate::snapshot::{FrontendKey, Snapshot, Timeouts};
use nat::{MapKey, Mappings};
use std::sync::Arc;

pub mod adopt;
pub mod classify;
mod decide;
pub mod execute;

use classify::{classify, FragKey};
pub use execute::action;
use execute::{execute, Done, Scratch};

/// Most slots the expiry clock hand visits per batch.
pub const EXPIRE_BUDGET: usize = 64;
/// The clock hand visits every slot once per this period (ns), paced by the clock, not
/// by the batch rate: at 64 slots per batch it streamed the whole slab (25 MB at the
/// default capacity) through the worker's cache once every 4096 batches, whatever the
/// load. Lookups already treat idle-expired flows as gone; the sweep only reclaims slots
/// and ports, within timeout + 4 s. (The flow index's cache misses under load did not
/// go away with it: they come from the index's size; see docs/benchmarks.md.)
pub const SWEEP_PERIOD_NS: u64 = 4_000_000_000;
/// How far (in sequence space, either way) a forward segment may be from where a closing
/// TCP flow's client stood when the connection began to close and still be taken as that
/// connection's (retransmitted data, its FIN, the last ACK). A new connection on the same
/// 5-tuple starts at a random ISN: it falls inside by chance once in 2¹¹.
pub const CLOSING_SEQ_WINDOW: u32 = 1 << 20;
/// Slots an early-drop scan looks at when the table is full (conntrack scans 8 hash
/// entries): bounded work per new flow under a flood.
pub const EVICT_SCAN: usize = 16;
/// Candidate SNAT ports tried before counting exhaustion.
pub const MAX_PORT_TRIES: u32 = 128;
/// Neighbour resolutions a worker can ask for between two drains.
const RESOLVE_QUEUE: usize = 16;
/// ICMP errors a worker may originate in a burst, and per second after it (each worker;
/// a router rate-limits what it originates, RFC 1812 §4.3.2.8).
pub const ICMP_BURST: u64 = 32;
pub const ICMP_PER_SEC: u64 = 100;

/// Clients a worker remembers the backend of, for services with a client-ip affinity
/// timeout (all of one client's connections to those services open on one worker, see
/// [`Engine`]'s `affinity`). Full, it forgets expired entries (at most once a second) and
/// otherwise remembers no more: those clients keep their hashed backend, which holds
/// while the backend set is unchanged.
pub const AFFINITY_CAPACITY: usize = 65_536;
const SEC: u64 = 1_000_000_000;

/// Kept flows whose end a worker can report between two drains (more are not reported:
/// a stale keep entry only steers a 5-tuple to the workers, which then decide by policy).
const UNKEEP_QUEUE: usize = 256;
/// Room reserved for events between two drains: a batch ends at most `EXPIRE_BUDGET`
/// flows in the sweep and touches at most one flow a frame; more only allocates. (A
/// masquerading policy change queues one `Kept` per flow it keeps; that is not per
/// packet.)
const EVENTS: usize = 1024 + RESOLVE_QUEUE + UNKEEP_QUEUE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the rewritten frame out of interface `iface` (index into the snapshot's
    /// interface list).
    Tx {
        iface: u8,
    },
    /// Hand the unmodified frame to worker `n`, which owns its flow.
    ToWorker(u16),
    /// Hand the unmodified frame to worker `n` to look for its flow there (it found none
    /// here and cannot open one); the I/O layer passes the hop count on, see
    /// [`Engine::process_probe`].
    Probe(u16),
    /// Send the ICMP error the engine originated ([`Engine::generated`]) out of interface
    /// `iface` instead of the frame, which is dropped (and left unmodified): a packet too
    /// big for its egress link, or one for which no NAT port was free.
    Icmp {
        iface: u8,
    },
    /// Send the TCP reset the engine originated ([`Engine::generated`]) out of interface
    /// `iface` instead of the frame, which is dropped: the frame belonged to a flow whose
    /// backend was removed from a service that resets its clients.
    Reset {
        iface: u8,
    },
    /// Send the translated packet as `count` IPv4 fragments ([`Engine::fragment`]) out
    /// of interface `iface`, instead of the frame: it was larger than the link's MTU
    /// and allowed fragmentation (RFC 4787 REQ-13).
    Fragments {
        iface: u8,
        count: u8,
    },
    /// Put the outer headers the engine wrote ([`Engine::encap_header`]) between the
    /// frame's Ethernet header and the `len` bytes after it (the IP packet and any
    /// Ethernet padding), and send it out of interface `iface`: direct server return
    /// through a tunnel. The MACs are already rewritten.
    Encap {
        iface: u8,
        len: u16,
    },
    /// Keep the unmodified frame and process it again after the next snapshot: a next
    /// hop's MAC is unknown and resolution was requested (the kernel's unresolved queue,
    /// `unres_qlen`, does the same). The I/O layer bounds how many and how long.
    Hold,
    Drop(DropReason),
}

/// What the engine asks of the I/O layer, in one queue drained after each batch
/// ([`Engine::take_events`]) and applied in order.
// Events live in a buffer reserved at start; boxing the large variant would allocate per
// flow on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A next hop's MAC is unknown: have the kernel resolve it (frames wait in
    /// [`Verdict::Hold`]). At most `RESOLVE_QUEUE` distinct addresses between drains.
    Resolve([u8; 4]),
    /// A masqueraded flow the new policy would not masquerade keeps its translation: its
    /// forward key goes into the XDP program's keep map before the program learns the
    /// policy (see [`Engine::set_snapshot`]).
    Kept(FlowKey),
    /// A kept flow ended: its keep entry can go.
    Unkept(FlowKey),
    /// An established flow's directions (the first `n`: 2, or 1 for a DSR flow), to
    /// install (or replace) in the XDP fast path (`flowrec`).
    FastInstall([(flowrec::FlowKey, flowrec::FlowEntry); 2], u8),
    /// A fast-path flow's directions (the first `n`), to remove (it ended, or no longer
    /// qualifies), and its account: the packets the fast path forwarded (the entries'
    /// counters) count there ([`Engine::account_fast`]).
    FastRemove([flowrec::FlowKey; 2], u8, u32),
}

/// The event queue, reserved at start, with the bounds of its resolve and unkept
/// events.
#[derive(Debug)]
struct Events {
    queue: Vec<Event>,
    resolves: usize,
    unkept: usize,
}

impl Events {
    fn push(&mut self, e: Event) {
        self.queue.push(e);
    }

    /// Ask for `addr` to be resolved, once between drains.
    fn resolve(&mut self, addr: [u8; 4]) {
        if self.resolves < RESOLVE_QUEUE && !self.queue.contains(&Event::Resolve(addr)) {
            self.resolves += 1;
            self.queue.push(Event::Resolve(addr));
        }
    }

    fn unkept(&mut self, k: FlowKey) {
        if self.unkept < UNKEEP_QUEUE {
            self.unkept += 1;
            self.queue.push(Event::Unkept(k));
        }
    }

    fn drain(&mut self) -> std::vec::Drain<'_, Event> {
        (self.resolves, self.unkept) = (0, 0);
        self.queue.drain(..)
    }
}

/// Where a fragmented datagram's first fragment went, for the later ones (which carry no
/// ports): a flow here and its direction, or another worker.
#[derive(Debug, Clone, Copy)]
enum FragTarget {
    Flow(u32, Dir),
    Worker(u16),
    /// The first fragment is held while a next hop resolves: so are the later ones (the
    /// I/O layer retries held frames in order).
    Held,
}

/// Live flows by (service, backend address, backend port).
pub type BackendFlows = hashbrown::HashMap<(FrontendKey, [u8; 4], u16), u64>;

/// (Service, backend) accounts a worker keeps; a worker with more pairs counts the rest
/// nowhere (bounded memory, bounded label sets).
pub const ACCOUNTS: usize = 4096;
/// [`Flow::acct`] of a flow that counts to no account.
pub const NO_ACCOUNT: u32 = u32::MAX;

/// The traffic of one (service, backend) pair on one worker since lbd started: flows
/// opened, and packets and bytes (IP length) each way (0: client to backend, 1: back),
/// the worker's and, folded in when an installed flow leaves the fast path, the fast
/// path's. Live fast-path entries are added by the reader (the daemon reads the map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub frontend: FrontendKey,
    pub backend: ([u8; 4], u16),
    pub flows: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// A worker's accounts: a list (a flow keeps its index) and an index by pair, both
/// reserved at start.
#[derive(Debug)]
struct Accounts {
    list: Vec<Account>,
    index: hashbrown::HashMap<(FrontendKey, [u8; 4], u16), u32>,
}

impl Accounts {
    /// The account of a new load-balanced flow, which counts it as opened.
    fn open(&mut self, f: &Flow) -> u32 {
        let frontend = f.frontend();
        let backend = f.backend();
        let key = (frontend, backend.0, backend.1);
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None if self.list.len() < ACCOUNTS => {
                let i = self.list.len() as u32;
                self.list.push(Account {
                    frontend,
                    backend,
                    flows: 0,
                    packets: [0; 2],
                    bytes: [0; 2],
                });
                self.index.insert(key, i);
                i
            }
            None => return NO_ACCOUNT,
        };
        if let Some(a) = self.list.get_mut(i as usize) {
            a.flows += 1;
        }
        i
    }

    fn add(&mut self, i: u32, dir: usize, packets: u64, bytes: u64) {
        if let Some(a) = self.list.get_mut(i as usize) {
            a.packets[dir] += packets;
            a.bytes[dir] += bytes;
        }
    }
}

/// A client of a service with a client-ip affinity timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AffinityKey {
    client: [u8; 4],
    service: FrontendKey,
}

/// The backend a client keeps, until when (ns).
#[derive(Debug, Clone, Copy)]
struct Sticky {
    addr: [u8; 4],
    port: u16,
    until: u64,
}

/// Datagrams in fragments a worker remembers (the oldest is forgotten first).
const FRAGS: usize = 1024;
/// How long after its first fragment a datagram's later fragments are expected (Linux's
/// ipfrag_time).
const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// One worker's engine: the snapshot it runs on and its own state. The two are apart so
/// that decide can borrow the snapshot while it changes the state (no `Arc` clone per
/// packet).
#[derive(Debug)]
pub struct Engine {
    snap: Arc<Snapshot>,
    st: State,
}

/// Everything of an engine but its snapshot.
#[derive(Debug)]
struct State {
    worker: u16,
    flows: FlowTable,
    /// Endpoint-independent mappings of the flows here (see `nat::mapping`).
    mappings: Mappings,
    now: u64,
    /// Slots the clock hand may visit (earned at capacity per SWEEP_PERIOD_NS), and the
    /// time up to which they were earned.
    sweep_credit: u64,
    sweep_clock: u64,
    counters: Counters,
    events: Events,
    /// Masquerading policy version the flows were last scanned under.
    masq_version: Option<u64>,
    /// Workers the frame being processed has already visited looking for its flow.
    hops: u8,
    /// Where the next port search starts after the preferred port (see
    /// `nat::PortRange::candidates`); moves on with every search.
    salt: u32,
    /// The frame being processed was turned around once already (hairpinning).
    looped: bool,
    /// ICMP errors this worker may still originate now, and when the bucket was filled.
    icmp_tokens: u64,
    icmp_clock: u64,
    /// The packets the engine originates (ICMP errors, resets, fragments).
    scratch: Scratch,
    /// Mappings on each NAT address (`Snapshot::nat_addrs` order: the SNAT pool, then the
    /// egress addresses).
    pool_use: [u64; nat::MAX_POOL],
    /// New flows refused for want of a free port, by NAT address (same order).
    pool_failures: [u64; nat::MAX_POOL],
    /// Fragmented datagrams whose first fragment was seen here: where the later
    /// fragments go, and when it was seen. Allocated at start; `frag_order` forgets the
    /// oldest when full.
    frags: hashbrown::HashMap<FragKey, (FragTarget, u64)>,
    frag_order: [FragKey; FRAGS],
    frag_next: usize,
    /// The flow and direction the frame being processed went through, and the datagram
    /// it is the first fragment of (as received), if it is one.
    last_flow: Option<(u32, Dir)>,
    first_frag: Option<FragKey>,
    /// Install established flows in the XDP fast path (`lbd --fast-path`).
    fast_path: bool,
    /// Traffic by (service, backend).
    accounts: Accounts,
    /// Clients' backends for services with a client-ip affinity timeout. Such a client's
    /// new connections all open on one worker, its *affinity home* (a hash of its
    /// address), so one worker remembers it. Allocated at start.
    affinity: hashbrown::HashMap<AffinityKey, Sticky>,
    /// Not before this time is a full affinity table scanned again for expired entries.
    affinity_reap: u64,
}

/// The mapping table with the pool addresses' use, as flows leaving the table need them.
struct Mapped<'a> {
    mappings: &'a mut Mappings,
    pool_use: &'a mut [u64; nat::MAX_POOL],
    snap: &'a Snapshot,
    /// Where a fast-path flow's removal and a kept flow's end are queued.
    events: &'a mut Events,
}

/// One mapping more (`up`) or fewer on `addr`, if it is a pool address.
fn count_use(pool_use: &mut [u64; nat::MAX_POOL], snap: &Snapshot, addr: [u8; 4], up: bool) {
    if let Some(n) = snap.nat_position(addr).and_then(|i| pool_use.get_mut(i)) {
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
    }
}

/// How a load-balanced flow ends when its backend (or service) is gone from `snap`:
/// `None` while it is still there. A removed service's flows are dropped.
fn removal(snap: &Snapshot, f: &Flow) -> Option<OnRemove> {
    if f.kind != FlowKind::Lb {
        return None;
    }
    let (addr, port) = f.backend();
    match snap.services.get(&f.frontend()) {
        None => Some(OnRemove::Drop),
        Some(s) if s.spec.find(addr, port).is_none() => Some(s.spec.options.on_remove),
        Some(_) => None,
    }
}

/// A flow's idle timeout in its state.
fn timeout(t: &Timeouts, f: &Flow) -> u64 {
    match f.state {
        FlowState::SynSent | FlowState::SynRecv => t.tcp_syn,
        FlowState::Established if f.one_way() => t.dsr_established,
        FlowState::Established => t.tcp_established,
        FlowState::Fin => t.tcp_fin,
        FlowState::Rst => t.tcp_rst,
        FlowState::Udp => t.udp,
        FlowState::Icmp => t.icmp,
    }
}

/// The mapping a flow's forward direction uses: inside endpoint and outside address.
fn map_key(f: &Flow) -> MapKey {
    let k = &f.keys[0];
    MapKey {
        inside: k.src,
        port: k.sport,
        proto: k.proto,
        outside: f.rewrite[0].src,
    }
}

/// The event removing `f`'s fast-path entries.
fn fast_remove(f: &Flow) -> Event {
    Event::FastRemove(
        [f.keys[0].flowrec(), f.keys[1].flowrec()],
        f.directions() as u8,
        f.acct,
    )
}

/// What a flow leaving the table takes with it: its fast-path entries, its count in its
/// mapping (and the mapping, with its pool address's use, when it was the last), and (a
/// kept masqueraded flow) its keep entry, reported.
fn gone(maps: &mut Mapped<'_>, f: &Flow) {
    if f.fast {
        maps.events.push(fast_remove(f));
    }
    if f.mapped {
        let key = map_key(f);
        maps.mappings.release(&key);
        if maps.mappings.port(&key).is_none() {
            count_use(maps.pool_use, maps.snap, key.outside, false);
        }
    }
    if f.kept {
        maps.events.unkept(f.keys[0]);
    }
}

fn reserve<T>(capacity: usize, flow_capacity: usize) -> Result<Vec<T>, crate::flow::AllocError> {
    let mut v = Vec::new();
    v.try_reserve(capacity)
        .map_err(|_| crate::flow::AllocError {
            capacity: flow_capacity,
        })?;
    Ok(v)
}

fn reserve_map<K, V>(
    capacity: usize,
    flow_capacity: usize,
) -> Result<hashbrown::HashMap<K, V>, crate::flow::AllocError>
where
    K: Eq + core::hash::Hash,
{
    let mut m = hashbrown::HashMap::new();
    m.try_reserve(capacity)
        .map_err(|_| crate::flow::AllocError {
            capacity: flow_capacity,
        })?;
    Ok(m)
}

impl Engine {
    /// A worker's engine. `flow_capacity` flows are allocated now (panics if they cannot
    /// be; see [`Engine::try_new`]).
    pub fn new(worker: u16, flow_capacity: usize, snap: Arc<Snapshot>) -> Engine {
        Engine::try_new(worker, flow_capacity, snap).expect("memory for the flow table")
    }

    /// A worker's engine, or an error if its flow table cannot be allocated.
    pub fn try_new(
        worker: u16,
        flow_capacity: usize,
        snap: Arc<Snapshot>,
    ) -> Result<Engine, crate::flow::AllocError> {
        let flows = FlowTable::try_with_capacity(flow_capacity)?;
        let mappings =
            Mappings::try_with_capacity(flow_capacity).map_err(|_| crate::flow::AllocError {
                capacity: flow_capacity,
            })?;
        let masq_version = snap.masq.as_ref().map(|m| m.version);
        let st = State {
            worker,
            mappings,
            flows,
            now: 0,
            sweep_credit: 0,
            sweep_clock: 0,
            counters: Counters::default(),
            events: Events {
                queue: reserve(EVENTS, flow_capacity)?,
                resolves: 0,
                unkept: 0,
            },
            masq_version,
            hops: 0,
            salt: u32::from(worker).wrapping_mul(0x9E37_79B9),
            looped: false,
            icmp_tokens: ICMP_BURST,
            icmp_clock: 0,
            scratch: Scratch::new(),
            pool_use: [0; nat::MAX_POOL],
            pool_failures: [0; nat::MAX_POOL],
            frags: reserve_map(FRAGS, flow_capacity)?,
            frag_order: [FragKey::default(); FRAGS],
            frag_next: 0,
            last_flow: None,
            first_frag: None,
            fast_path: false,
            accounts: Accounts {
                list: reserve(ACCOUNTS, flow_capacity)?,
                index: reserve_map(ACCOUNTS, flow_capacity)?,
            },
            affinity: reserve_map(AFFINITY_CAPACITY, flow_capacity)?,
            affinity_reap: 0,
        };
        Ok(Engine { snap, st })
    }

    pub fn worker(&self) -> u16 {
        self.st.worker
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// This worker's counters (the engine counts every verdict as it is given; see
    /// [`Engine::undelivered`]).
    pub fn counters(&self) -> &Counters {
        &self.st.counters
    }

    /// The I/O layer could not carry out `v` (a full ring, no free frame): the frame is
    /// dropped for `reason` instead of counted as `v`.
    pub fn undelivered(&mut self, v: Verdict, reason: DropReason) {
        let c = &mut self.st.counters;
        match v {
            Verdict::Tx { .. } | Verdict::Fragments { .. } => c.tx = c.tx.saturating_sub(1),
            Verdict::Encap { .. } => {
                c.tx = c.tx.saturating_sub(1);
                c.encapsulated = c.encapsulated.saturating_sub(1);
            }
            Verdict::Icmp { .. } => c.icmp_sent = c.icmp_sent.saturating_sub(1),
            Verdict::Reset { .. } => c.resets_sent = c.resets_sent.saturating_sub(1),
            Verdict::ToWorker(_) | Verdict::Probe(_) => {
                c.handoff_out = c.handoff_out.saturating_sub(1)
            }
            Verdict::Hold => c.held = c.held.saturating_sub(1),
            Verdict::Drop(_) => return,
        }
        c.drop(reason);
    }

    /// A frame the I/O layer dropped before the engine saw it (or after holding it).
    pub fn dropped(&mut self, reason: DropReason) {
        self.st.counters.drop(reason);
    }

    /// A frame another worker handed over arrived (see [`Verdict::ToWorker`]).
    pub fn handed_in(&mut self) {
        self.st.counters.handoff_in += 1;
    }

    /// Swap in a new snapshot (between batches). Flows revalidate lazily, except after a
    /// masquerading policy change: then every masqueraded flow the new policy would not
    /// masquerade is marked kept, and its forward key queued as [`Event::Kept`] (the
    /// daemon puts those in the XDP program's keep map before the program learns the
    /// new policy, so established flows keep their translation). Not per packet: it
    /// walks the table and may allocate.
    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        let version = snap.masq.as_ref().map(|m| m.version);
        self.snap = snap;
        let st = &mut self.st;
        if version == st.masq_version {
            return;
        }
        st.masq_version = version;
        let Some(m) = self.snap.masq.as_ref() else {
            return;
        };
        for f in st.flows.iter_mut() {
            if f.kind == FlowKind::Masq
                && !f.kept
                && !m
                    .rules
                    .decide(f.keys[0].src.into(), f.keys[0].dst.into())
                    .masquerades()
            {
                f.kept = true;
                st.events.push(Event::Kept(f.keys[0]));
            }
        }
    }

    /// What the engine asks of the I/O layer since the last call, in order.
    pub fn take_events(&mut self) -> impl Iterator<Item = Event> + '_ {
        self.st.events.drain()
    }

    pub fn flows(&self) -> &FlowTable {
        &self.st.flows
    }

    /// Inside endpoints with a mapping on this worker.
    pub fn mappings(&self) -> usize {
        self.st.mappings.len()
    }

    /// Mappings on each NAT address, in `Snapshot::nat_addrs` order.
    pub fn pool_use(&self) -> &[u64] {
        &self.st.pool_use[..self.snap.nat_addrs().count().min(nat::MAX_POOL)]
    }

    /// New flows refused because no port was free, by NAT address (same order).
    pub fn pool_failures(&self) -> &[u64] {
        &self.st.pool_failures[..self.snap.nat_addrs().count().min(nat::MAX_POOL)]
    }

    /// Start a batch at time `now` (ns, monotonic): advances the expiry clock hand.
    pub fn begin_batch(&mut self, now: u64) {
        self.begin_batch_with(now, &mut |_| None);
    }

    /// [`Engine::begin_batch`], with the time (in this engine's clock) the XDP fast path
    /// last forwarded a packet of an installed flow direction, asked only of flows that
    /// look idle to the worker.
    pub fn begin_batch_with(
        &mut self,
        now: u64,
        fp_seen: &mut dyn FnMut(&flowrec::FlowKey) -> Option<u64>,
    ) {
        let st = &mut self.st;
        let cap = u128::from(st.flows.capacity() as u64);
        let period = u128::from(SWEEP_PERIOD_NS);
        let earned = u128::from(now.saturating_sub(st.sweep_clock)) * cap / period;
        if earned > 0 {
            // Advance by the time those slots stand for, so fractions carry over.
            st.sweep_clock += (earned * period / cap) as u64;
            st.sweep_credit = (u128::from(st.sweep_credit) + earned).min(cap) as u64;
        }
        let budget = st.sweep_credit.min(EXPIRE_BUDGET as u64);
        st.sweep_credit -= budget;
        st.now = now;
        let refill = now.saturating_sub(st.icmp_clock) / (1_000_000_000 / ICMP_PER_SEC);
        if refill > 0 {
            st.icmp_tokens = (st.icmp_tokens + refill).min(ICMP_BURST);
            st.icmp_clock = now;
        }
        let snap = &*self.snap;
        let t = snap.timeouts;
        let mut maps = Mapped {
            mappings: &mut st.mappings,
            pool_use: &mut st.pool_use,
            snap,
            events: &mut st.events,
        };
        let expired = st.flows.expire_step(budget as usize, |f| {
            // Flows of a removed backend end within a sweep period: at once, or (TCP,
            // resetting service) after the transitory timeout, so that the client's next
            // packet still draws its reset.
            let mut ended = false;
            if f.generation != snap.generation && !f.removed {
                match removal(snap, f) {
                    Some(OnRemove::Reset) if f.keys[0].proto == crate::wire::ipv4::PROTO_TCP => {
                        f.removed = true;
                        f.last_seen = now;
                    }
                    Some(_) => ended = true,
                    None => {}
                }
            }
            let limit = if f.removed { t.tcp_rst } else { timeout(&t, f) };
            let mut idle = ended || now.saturating_sub(f.last_seen) > limit;
            // The fast path may have forwarded it since the worker last did.
            if idle && !ended && f.fast {
                let seen = f
                    .keys
                    .iter()
                    .take(f.directions())
                    .filter_map(|k| fp_seen(&k.flowrec()))
                    .max();
                if let Some(t) = seen.filter(|&t| now.saturating_sub(t) <= limit) {
                    f.last_seen = t;
                    idle = false;
                }
            }
            if idle {
                gone(&mut maps, f);
            }
            idle
        });
        st.counters.flows_expired += expired as u64;
    }

    /// Fragment `k` of the last [`Verdict::Fragments`] (empty past its count).
    pub fn fragment(&self, k: usize) -> &[u8] {
        self.st.scratch.fragment(k)
    }

    /// The ICMP error or TCP reset of the last [`Verdict::Icmp`] or [`Verdict::Reset`].
    pub fn generated(&self) -> &[u8] {
        self.st.scratch.generated()
    }

    /// The outer headers of the last [`Verdict::Encap`].
    pub fn encap_header(&self) -> &[u8] {
        self.st.scratch.encap()
    }

    /// Process one frame in place.
    pub fn process(&mut self, frame: &mut [u8]) -> Verdict {
        self.process_probe(frame, 0)
    }

    /// Process a frame that `hops` other workers have already looked for its flow in
    /// (after [`Verdict::Probe`]); a frame from an RX ring has 0.
    pub fn process_probe(&mut self, frame: &mut [u8], hops: u8) -> Verdict {
        let st = &mut self.st;
        st.hops = hops;
        st.looped = false;
        st.last_flow = None;
        st.first_frag = None;
        st.counters.rx += 1;
        let v = match st.run(&self.snap, frame) {
            Ok(v) => v,
            // Only new flows resolve next hops, before touching the frame.
            Err(DropReason::NoNeighbour) => Verdict::Hold,
            Err(r) => Verdict::Drop(r),
        };
        if let Some(k) = st.first_frag {
            st.remember_fragment(k, v);
        }
        let c = &mut st.counters;
        match v {
            Verdict::Tx { .. } | Verdict::Fragments { .. } => c.tx += 1,
            Verdict::Encap { .. } => {
                c.tx += 1;
                c.encapsulated += 1;
            }
            Verdict::Icmp { .. } => c.icmp_sent += 1,
            Verdict::Reset { .. } => c.resets_sent += 1,
            Verdict::ToWorker(_) => c.handoff_out += 1,
            Verdict::Probe(_) => {
                c.handoff_out += 1;
                c.flow_probes += 1;
            }
            Verdict::Hold => c.held += 1,
            Verdict::Drop(r) => c.drop(r),
        }
        v
    }

    /// Install established flows in the XDP fast path from now on (`lbd --fast-path on`).
    pub fn enable_fast_path(&mut self) {
        self.st.fast_path = true;
    }

    /// The service and backend of the flow the last processed frame went through (a
    /// load-balanced flow's), for packet capture's filter.
    pub fn last_pair(&self) -> Option<(FrontendKey, [u8; 4], u16)> {
        let (slot, _) = self.st.last_flow?;
        let f = self.st.flows.get(slot)?;
        if f.kind != FlowKind::Lb {
            return None;
        }
        let (addr, port) = f.backend();
        Some((f.frontend(), addr, port))
    }

    /// The traffic by (service, backend) this worker counted (see [`Account`]).
    pub fn accounts(&self) -> &[Account] {
        &self.st.accounts.list
    }

    /// Count what the fast path forwarded for a flow direction (`dir`: 0 forward, 1
    /// reverse) whose entry is being removed ([`Event::FastRemove`] names the account).
    pub fn account_fast(&mut self, acct: u32, dir: usize, packets: u64, bytes: u64) {
        self.st.accounts.add(acct, dir, packets, bytes);
    }

    /// Live load-balanced flows by service and backend (for `lbctl service list`: a
    /// draining backend's remaining flows): not idle-expired, not closing (after FIN or
    /// RST), not ended by a removal. Not per packet: it walks the table.
    pub fn backend_flows(&self) -> BackendFlows {
        let t = self.snap.timeouts;
        let mut m = hashbrown::HashMap::new();
        for f in self.st.flows.iter() {
            let idle = self.st.now.saturating_sub(f.last_seen) > timeout(&t, f);
            let closing = matches!(f.state, FlowState::Fin | FlowState::Rst);
            if f.kind == FlowKind::Lb && !f.removed && !idle && !closing {
                let (addr, port) = f.backend();
                *m.entry((f.frontend(), addr, port)).or_insert(0) += 1;
            }
        }
        m
    }
}

impl State {
    /// classify → decide → execute, once, or twice for a hairpin flow's packet (turned
    /// around after its forward rewrite: it arrives anew at the egress address).
    fn run(&mut self, snap: &Snapshot, frame: &mut [u8]) -> Result<Verdict, DropReason> {
        loop {
            let p = classify(frame)?;
            let step = self.decide(snap, &p)?;
            match execute(&mut self.scratch, frame, &p, step)? {
                Done::Verdict(v) => return Ok(v),
                Done::TurnAround { dport } => {
                    if self.looped {
                        // A hairpin flow's rewrite never targets another hairpin flow's
                        // forward key.
                        return Err(DropReason::NoFlow);
                    }
                    self.counters.hairpinned += 1;
                    let owner = nat::port_owner(dport, snap.workers);
                    if owner != self.worker {
                        return Ok(Verdict::ToWorker(owner));
                    }
                    self.looped = true;
                }
            }
        }
    }

    fn remove_flow(&mut self, snap: &Snapshot, slot: u32) {
        if let Some(f) = self.flows.remove(slot) {
            self.forget(snap, &f);
        }
    }

    /// Release what a flow that left the table held (see `gone`).
    fn forget(&mut self, snap: &Snapshot, f: &Flow) {
        let mut maps = Mapped {
            mappings: &mut self.mappings,
            pool_use: &mut self.pool_use,
            snap,
            events: &mut self.events,
        };
        gone(&mut maps, f);
    }

    /// After a first fragment: remember where it went, for its datagram's later
    /// fragments (through the flow it took here, or to the worker it was handed to).
    fn remember_fragment(&mut self, k: FragKey, v: Verdict) {
        let target = match (v, self.last_flow) {
            (Verdict::Tx { .. }, Some((slot, dir))) => FragTarget::Flow(slot, dir),
            (Verdict::ToWorker(w) | Verdict::Probe(w), _) => FragTarget::Worker(w),
            (Verdict::Hold, _) => FragTarget::Held,
            _ => return,
        };
        // A key sits in `frag_order` once: a repeated first fragment only updates it.
        if let Some(e) = self.frags.get_mut(&k) {
            *e = (target, self.now);
            return;
        }
        if self.frags.len() >= FRAGS {
            self.frags.remove(&self.frag_order[self.frag_next]);
        }
        self.frag_order[self.frag_next] = k;
        self.frag_next = (self.frag_next + 1) % FRAGS;
        self.frags.insert(k, (target, self.now));
    }
}
