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

use crate::counters::{Counters, DropReason};
use crate::flow::{Dir, Flow, FlowKey, FlowKind, FlowState, FlowTable, Rewrite};
use crate::hash::flow_hash;
use crate::netview::{NextHop, NextHopError};
use crate::service::{Affinity, BackendSpec, OnRemove};
use crate::snapshot::{FrontendKey, MasqState, Snapshot, Timeouts};
use crate::wire::checksum::{addr_words, fold, sum, Delta, TTL_DECREMENT};
use crate::wire::ethernet::ETHERTYPE_IPV4;
use crate::wire::icmp::{self, Quoted};
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::{write_u16, EthernetFrame, Ipv4Packet, TcpFlags, L4};
use nat::{port_owner, MapKey, Mappings, Outside, PortRange};
use std::sync::Arc;

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
/// Most bytes of the offending packet an originated ICMP error quotes: the error stays
/// within 576 bytes (RFC 1812 §4.3.2.3).
const ICMP_QUOTE: usize = 576 - 20 - icmp::HEADER_LEN;
/// Room for an originated ICMP error: Ethernet, IPv4 and ICMP headers and the quote.
const GENERATED: usize = 14 + 20 + icmp::HEADER_LEN + ICMP_QUOTE;
/// Most fragments xlb cuts one packet into, and the room they take.
const SPLIT_MAX: usize = 8;
const SPLIT_BYTES: usize = 4096;
/// Code of "communication administratively prohibited" (RFC 1812 §5.2.7.1).
const ADMIN_PROHIBITED: u8 = 13;

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
    /// Keep the unmodified frame and process it again after the next snapshot: a next
    /// hop's MAC is unknown and resolution was requested (the kernel's unresolved queue,
    /// `unres_qlen`, does the same). The I/O layer bounds how many and how long.
    Hold,
    Drop(DropReason),
}

/// What kind of L4 message a parsed frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// TCP or UDP.
    Ports,
    EchoRequest,
    EchoReply,
    /// An ICMP error quoting the IPv4 packet at `il3` (its L4 header at `il4`) whose
    /// 5-tuple is `inner`.
    Error {
        il3: usize,
        il4: usize,
        inner: FlowKey,
    },
}

/// Where the headers of a parsed frame sit.
struct Parsed {
    l3: usize,
    l4: usize,
    l4_end: usize,
    key: FlowKey,
    flags: TcpFlags,
    kind: Kind,
    /// A fragment: the datagram it belongs to, and whether it is the first (which alone
    /// has the L4 header).
    frag: Option<(FragKey, bool)>,
}

/// An IPv4 datagram in fragments: source, destination, protocol and identification
/// (RFC 791).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct FragKey {
    src: [u8; 4],
    dst: [u8; 4],
    id: u16,
    proto: u8,
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

#[derive(Debug)]
pub struct Engine {
    worker: u16,
    snap: Arc<Snapshot>,
    flows: FlowTable,
    /// Endpoint-independent mappings of the flows here (see `nat::mapping`).
    mappings: Mappings,
    now: u64,
    /// Slots the clock hand may visit (earned at capacity per SWEEP_PERIOD_NS), and the
    /// time up to which they were earned.
    sweep_credit: u64,
    sweep_clock: u64,
    pub counters: Counters,
    resolve: [[u8; 4]; RESOLVE_QUEUE],
    resolve_len: usize,
    /// Masquerading policy version the flows were last scanned under.
    masq_version: Option<u64>,
    /// Forward keys of flows newly kept by the last policy change (see
    /// [`Engine::set_snapshot`]).
    kept_new: Vec<FlowKey>,
    unkept: [FlowKey; UNKEEP_QUEUE],
    unkept_len: usize,
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
    /// The last ICMP error originated ([`Verdict::Icmp`]).
    generated: [u8; GENERATED],
    generated_len: usize,
    /// Mappings on each SNAT pool address (by position in the snapshot's pool).
    pool_use: [u64; nat::MAX_POOL],
    /// The fragments of the last [`Verdict::Fragments`]: bytes, and where each ends.
    split: [u8; SPLIT_BYTES],
    split_ends: [usize; SPLIT_MAX],
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
    /// Fast-path changes for the I/O layer (see [`FpEvent`]).
    fp_events: Vec<FpEvent>,
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
    pool: &'a [crate::snapshot::NatAddr],
    /// Where a fast-path flow's removal is queued.
    fp: &'a mut Vec<FpEvent>,
}

/// A change the I/O layer makes to the XDP fast path (`flowrec`) for this worker,
/// drained after each batch ([`Engine::take_fast_path`]).
// Events live in a buffer reserved at start; boxing the large variant would allocate per
// flow on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FpEvent {
    /// Install (or replace) a flow's two directions.
    Install([(flowrec::FlowKey, flowrec::FlowEntry); 2]),
    /// Remove a flow's two directions (it ended, or no longer qualifies).
    Remove([flowrec::FlowKey; 2]),
}

/// Room reserved for fast-path events between two drains: a batch ends at most
/// `EXPIRE_BUDGET` flows in the sweep and touches at most one flow a frame; more only
/// allocates.
const FP_EVENTS: usize = 1024;

/// The flowrec key of a flow key.
fn fp_key(k: &FlowKey) -> flowrec::FlowKey {
    flowrec::FlowKey::v4(k.src, k.dst, k.sport, k.dport, k.proto)
}

/// One mapping more (`up`) or fewer on `addr`, if it is a pool address.
fn count_use(
    pool_use: &mut [u64; nat::MAX_POOL],
    pool: &[crate::snapshot::NatAddr],
    addr: [u8; 4],
    up: bool,
) {
    if let Some(n) = pool
        .iter()
        .position(|a| a.addr == addr)
        .and_then(|i| pool_use.get_mut(i))
    {
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

fn timeout(t: &Timeouts, s: FlowState) -> u64 {
    match s {
        FlowState::SynSent | FlowState::SynRecv => t.tcp_syn,
        FlowState::Established => t.tcp_established,
        FlowState::Fin => t.tcp_fin,
        FlowState::Rst => t.tcp_rst,
        FlowState::Udp => t.udp,
        FlowState::Icmp => t.icmp,
    }
}

/// What a flow leaving the table takes with it: its count in its mapping (and the
/// mapping, with its pool address's use, when it was the last), and (a kept masqueraded
/// flow) its keep entry, reported.
fn gone(queue: &mut [FlowKey; UNKEEP_QUEUE], len: &mut usize, maps: &mut Mapped<'_>, f: &Flow) {
    if f.fast {
        maps.fp
            .push(FpEvent::Remove([fp_key(&f.keys[0]), fp_key(&f.keys[1])]));
    }
    if f.mapped {
        let key = map_key(f);
        maps.mappings.release(&key);
        if maps.mappings.port(&key).is_none() {
            count_use(maps.pool_use, maps.pool, key.outside, false);
        }
    }
    if f.kept && *len < UNKEEP_QUEUE {
        queue[*len] = f.keys[0];
        *len += 1;
    }
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
        Ok(Engine {
            worker,
            mappings,
            snap,
            flows,
            now: 0,
            sweep_credit: 0,
            sweep_clock: 0,
            counters: Counters::default(),
            resolve: [[0; 4]; RESOLVE_QUEUE],
            resolve_len: 0,
            masq_version,
            kept_new: Vec::new(),
            unkept: [FlowKey::default(); UNKEEP_QUEUE],
            unkept_len: 0,
            hops: 0,
            salt: u32::from(worker).wrapping_mul(0x9E37_79B9),
            looped: false,
            icmp_tokens: ICMP_BURST,
            icmp_clock: 0,
            generated: [0; GENERATED],
            generated_len: 0,
            pool_use: [0; nat::MAX_POOL],
            split: [0; SPLIT_BYTES],
            split_ends: [0; SPLIT_MAX],
            frags: {
                let mut m = hashbrown::HashMap::new();
                m.try_reserve(FRAGS).map_err(|_| crate::flow::AllocError {
                    capacity: flow_capacity,
                })?;
                m
            },
            frag_order: [FragKey::default(); FRAGS],
            frag_next: 0,
            last_flow: None,
            first_frag: None,
            fast_path: false,
            fp_events: {
                let mut v = Vec::new();
                v.try_reserve(FP_EVENTS)
                    .map_err(|_| crate::flow::AllocError {
                        capacity: flow_capacity,
                    })?;
                v
            },
            affinity: {
                let mut m = hashbrown::HashMap::new();
                m.try_reserve(AFFINITY_CAPACITY)
                    .map_err(|_| crate::flow::AllocError {
                        capacity: flow_capacity,
                    })?;
                m
            },
            affinity_reap: 0,
        })
    }

    pub fn worker(&self) -> u16 {
        self.worker
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// Swap in a new snapshot (between batches). Flows revalidate lazily, except after a
    /// masquerading policy change: then every masqueraded flow the new policy would not
    /// masquerade is marked kept, and its forward key queued for [`Engine::take_kept`]
    /// (the daemon puts those in the XDP program's keep map before the program learns
    /// the new policy, so established flows keep their translation). Not per packet: it
    /// walks the table and may allocate.
    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        let version = snap.masq.as_ref().map(|m| m.version);
        self.snap = snap;
        if version == self.masq_version {
            return;
        }
        self.masq_version = version;
        let Some(m) = self.snap.masq.clone() else {
            return;
        };
        for f in self.flows.iter_mut() {
            if f.kind == FlowKind::Masq
                && !f.kept
                && !m
                    .rules
                    .decide(f.keys[0].src.into(), f.keys[0].dst.into())
                    .masquerades()
            {
                f.kept = true;
                self.kept_new.push(f.keys[0]);
            }
        }
    }

    /// Forward keys of flows kept by the last policy change (see [`Engine::set_snapshot`]).
    pub fn take_kept(&mut self) -> Vec<FlowKey> {
        core::mem::take(&mut self.kept_new)
    }

    /// Forward keys of kept flows that ended since the last call.
    pub fn take_unkept(&mut self) -> impl Iterator<Item = FlowKey> + '_ {
        let n = core::mem::take(&mut self.unkept_len);
        self.unkept[..n].iter().copied()
    }

    fn remove_flow(&mut self, slot: u32) {
        if let Some(f) = self.flows.remove(slot) {
            self.forget(&f);
        }
    }

    /// Release what a flow that left the table held (see `gone`).
    fn forget(&mut self, f: &Flow) {
        let mut maps = Mapped {
            mappings: &mut self.mappings,
            pool_use: &mut self.pool_use,
            pool: &self.snap.snat.pool,
            fp: &mut self.fp_events,
        };
        gone(&mut self.unkept, &mut self.unkept_len, &mut maps, f);
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Inside endpoints with a mapping on this worker.
    pub fn mappings(&self) -> usize {
        self.mappings.len()
    }

    /// Mappings on each SNAT pool address, in the snapshot's pool order.
    pub fn pool_use(&self) -> &[u64] {
        &self.pool_use[..self.snap.snat.pool.len().min(nat::MAX_POOL)]
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
        let cap = u128::from(self.flows.capacity() as u64);
        let period = u128::from(SWEEP_PERIOD_NS);
        let earned = u128::from(now.saturating_sub(self.sweep_clock)) * cap / period;
        if earned > 0 {
            // Advance by the time those slots stand for, so fractions carry over.
            self.sweep_clock += (earned * period / cap) as u64;
            self.sweep_credit = (u128::from(self.sweep_credit) + earned).min(cap) as u64;
        }
        let budget = self.sweep_credit.min(EXPIRE_BUDGET as u64);
        self.sweep_credit -= budget;
        self.now = now;
        let refill = now.saturating_sub(self.icmp_clock) / (1_000_000_000 / ICMP_PER_SEC);
        if refill > 0 {
            self.icmp_tokens = (self.icmp_tokens + refill).min(ICMP_BURST);
            self.icmp_clock = now;
        }
        let t = self.snap.timeouts;
        let snap = &self.snap;
        let (queue, len) = (&mut self.unkept, &mut self.unkept_len);
        let mut maps = Mapped {
            mappings: &mut self.mappings,
            pool_use: &mut self.pool_use,
            pool: &snap.snat.pool,
            fp: &mut self.fp_events,
        };
        let expired = self.flows.expire_step(budget as usize, |f| {
            // Flows of a removed backend end within a sweep period: at once, or (TCP,
            // resetting service) after the transitory timeout, so that the client's next
            // packet still draws its reset.
            let mut ended = false;
            if f.generation != snap.generation && !f.removed {
                match removal(snap, f) {
                    Some(OnRemove::Reset) if f.keys[0].proto == PROTO_TCP => {
                        f.removed = true;
                        f.last_seen = now;
                    }
                    Some(_) => ended = true,
                    None => {}
                }
            }
            let limit = if f.removed {
                t.tcp_rst
            } else {
                timeout(&t, f.state)
            };
            let mut idle = ended || now.saturating_sub(f.last_seen) > limit;
            // The fast path may have forwarded it since the worker last did.
            if idle && !ended && f.fast {
                let seen = f.keys.iter().filter_map(|k| fp_seen(&fp_key(k))).max();
                if let Some(t) = seen.filter(|&t| now.saturating_sub(t) <= limit) {
                    f.last_seen = t;
                    idle = false;
                }
            }
            if idle {
                gone(queue, len, &mut maps, f);
            }
            idle
        });
        self.counters.flows_expired += expired as u64;
    }

    /// Fragment `k` of the last [`Verdict::Fragments`] (empty past its count).
    pub fn fragment(&self, k: usize) -> &[u8] {
        let start = k.checked_sub(1).map_or(0, |j| self.split_ends[j]);
        self.split_ends
            .get(k)
            .and_then(|&end| self.split.get(start..end))
            .unwrap_or(&[])
    }

    /// The ICMP error of the last [`Verdict::Icmp`].
    pub fn generated(&self) -> &[u8] {
        &self.generated[..self.generated_len]
    }

    /// Neighbours this worker needs resolved since the last call.
    pub fn take_resolve_requests(&mut self) -> impl Iterator<Item = [u8; 4]> + '_ {
        let n = core::mem::take(&mut self.resolve_len);
        self.resolve[..n].iter().copied()
    }

    /// Process one frame in place.
    pub fn process(&mut self, frame: &mut [u8]) -> Verdict {
        self.process_probe(frame, 0)
    }

    /// Process a frame that `hops` other workers have already looked for its flow in
    /// (after [`Verdict::Probe`]); a frame from an RX ring has 0.
    pub fn process_probe(&mut self, frame: &mut [u8], hops: u8) -> Verdict {
        self.hops = hops;
        self.looped = false;
        self.last_flow = None;
        self.first_frag = None;
        self.counters.rx += 1;
        let v = match self.process_inner(frame) {
            Ok(v) => v,
            // Only new flows resolve next hops, before touching the frame.
            Err(DropReason::NoNeighbour) => Verdict::Hold,
            Err(r) => Verdict::Drop(r),
        };
        if let Some(k) = self.first_frag {
            self.remember_fragment(k, v);
        }
        match v {
            Verdict::Tx { .. } | Verdict::Fragments { .. } => self.counters.tx += 1,
            Verdict::Icmp { .. } => self.counters.icmp_sent += 1,
            Verdict::Reset { .. } => self.counters.resets_sent += 1,
            Verdict::ToWorker(_) => self.counters.handoff_out += 1,
            Verdict::Probe(_) => {
                self.counters.handoff_out += 1;
                self.counters.flow_probes += 1;
            }
            Verdict::Hold => self.counters.held += 1,
            Verdict::Drop(r) => self.counters.drop(r),
        }
        v
    }

    fn parse(frame: &[u8]) -> Result<Parsed, DropReason> {
        let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Malformed)?;
        if eth.is_tagged() {
            return Err(DropReason::VlanTagged);
        }
        if eth.ethertype() != ETHERTYPE_IPV4 {
            return Err(DropReason::NotIpv4);
        }
        let l3 = eth.payload_offset();
        let ip = Ipv4Packet::new_checked(&frame[l3..]).map_err(|_| DropReason::Malformed)?;
        if !ip.checksum_ok() {
            return Err(DropReason::BadIpChecksum);
        }
        if ip.ttl() <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        let proto = ip.protocol();
        if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
            return Err(DropReason::UnsupportedProtocol);
        }
        let l4 = l3 + ip.header_len();
        let l4_end = l3 + ip.total_len();
        let frag = ip.is_fragment().then(|| {
            let k = FragKey {
                src: ip.src(),
                dst: ip.dst(),
                id: ip.ident(),
                proto,
            };
            (k, !ip.is_later_fragment())
        });
        if let Some((k, false)) = frag {
            // A later fragment: no L4 header; it follows its first fragment.
            return Ok(Parsed {
                l3,
                l4,
                l4_end,
                key: FlowKey {
                    src: k.src,
                    dst: k.dst,
                    sport: 0,
                    dport: 0,
                    proto,
                },
                flags: TcpFlags::default(),
                kind: Kind::Ports,
                frag,
            });
        }
        let seg = L4::new_checked(&frame[l4..l4_end], proto).map_err(|_| DropReason::Malformed)?;
        // A first fragment's UDP length is the whole datagram's.
        if frag.is_none() && seg.udp_len().is_some_and(|n| usize::from(n) != l4_end - l4) {
            return Err(DropReason::LengthMismatch);
        }
        if proto == PROTO_TCP && !seg.tcp_flags().is_valid() {
            return Err(DropReason::InvalidTcpFlags);
        }
        let mut key = FlowKey {
            src: ip.src(),
            dst: ip.dst(),
            sport: seg.src_port(),
            dport: seg.dst_port(),
            proto,
        };
        let mut kind = Kind::Ports;
        if proto == PROTO_ICMP {
            // L4 checked 8 bytes: type, code, checksum, and the identifier of an echo.
            let ty = frame[l4];
            let id = u16::from_be_bytes([frame[l4 + icmp::ECHO_ID], frame[l4 + icmp::ECHO_ID + 1]]);
            (key.sport, key.dport, kind) = match ty {
                icmp::ECHO_REQUEST => (id, 0, Kind::EchoRequest),
                icmp::ECHO_REPLY => (0, id, Kind::EchoReply),
                t if icmp::is_error(t) => {
                    let il3 = l4 + icmp::QUOTE;
                    let q = Quoted::new_checked(&frame[il3..l4_end])
                        .map_err(|_| DropReason::Malformed)?;
                    if q.is_later_fragment() {
                        return Err(DropReason::UnsupportedProtocol);
                    }
                    let (sport, dport) = q.ports().ok_or(DropReason::UnsupportedProtocol)?;
                    let inner = FlowKey {
                        src: q.src(),
                        dst: q.dst(),
                        sport,
                        dport,
                        proto: q.protocol(),
                    };
                    (
                        0,
                        0,
                        Kind::Error {
                            il3,
                            il4: il3 + q.header_len(),
                            inner,
                        },
                    )
                }
                _ => return Err(DropReason::UnsupportedProtocol),
            };
        }
        Ok(Parsed {
            l3,
            l4,
            l4_end,
            key,
            flags: seg.tcp_flags(),
            kind,
            frag,
        })
    }

    fn process_inner(&mut self, frame: &mut [u8]) -> Result<Verdict, DropReason> {
        let p = Self::parse(frame)?;
        match p.frag {
            Some((k, false)) => return self.later_fragment(frame, &p, k),
            Some((k, true)) if !self.looped => self.first_frag = Some(k),
            _ => {}
        }
        if let Kind::Error { il3, il4, inner } = p.kind {
            return self.icmp_error(frame, &p, il3, il4, inner);
        }
        if let Some((slot, dir)) = self.flows.lookup(&p.key) {
            if self.still_valid(frame, slot, dir, &p) {
                return self.forward(frame, slot, dir, &p);
            }
        }
        self.check_new(frame, &p)?;
        // A reply to a NAT address and port with no flow here: its owner has it, or
        // nobody does.
        if let Some(owner) = self.nat_port_owner(p.key.dst, p.key.dport) {
            // From an inside host to another's outside endpoint: hairpinning (RFC 4787
            // REQ-9), a masquerade flow like any other.
            let hairpin = self.snap.masq.as_ref().is_some_and(|m| {
                m.rules.is_egress(p.key.dst.into())
                    && p.key.proto != PROTO_ICMP
                    && m.rules.decide(p.key.src.into(), p.key.dst.into())
                        != nat::Decision::NotMasqueradeSource
            });
            if let Some(m) = self.snap.masq.clone().filter(|_| hairpin) {
                return self.masquerade(frame, &p, &m);
            }
            if owner != self.worker {
                return Ok(Verdict::ToWorker(owner));
            }
            // Turned around by a hairpin flow: to the inside host holding the port.
            if self.is_egress(p.key.src) {
                return self.open_inbound(frame, &p, true);
            }
            // Unsolicited, to a mapped pod: only with endpoint-independent filtering.
            let eif = self.snap.masq.as_ref().is_some_and(|m| {
                m.filtering == nat::Filtering::EndpointIndependent
                    && m.rules.is_egress(p.key.dst.into())
            });
            if eif {
                return self.open_inbound(frame, &p, false);
            }
            return Err(DropReason::NoFlow);
        }
        if p.kind == Kind::Ports {
            let fk = FrontendKey {
                addr: p.key.dst,
                port: p.key.dport,
                proto: p.key.proto,
            };
            if self.snap.services.contains_key(&fk) {
                return self.new_flow(frame, &p, fk);
            }
        }
        match self.snap.masq.clone() {
            Some(m) => self.masquerade(frame, &p, &m),
            None => Err(DropReason::NotForUs),
        }
    }

    /// A packet that found no flow here and cannot open one: the next worker to look in,
    /// unless every worker has looked (then it has no flow).
    fn probe_next(&self) -> Option<Verdict> {
        let n = self.snap.workers.max(1);
        (u16::from(self.hops) + 1 < n).then(|| Verdict::Probe((self.worker + 1) % n))
    }

    /// What a router checks before it forwards a packet, for packets that would open a
    /// flow (the XDP program checks the same before steering; this is the second line,
    /// and it keeps them out of the flow table): the frame is addressed to one of our
    /// interfaces, and its source is not martian (RFC 1812 §5.3.7, as the kernel's
    /// `ip_route_input_slow` rules) nor one of our VIPs.
    fn check_new(&self, frame: &[u8], p: &Parsed) -> Result<(), DropReason> {
        if !self.snap.net.ifaces.iter().any(|i| frame[0..6] == i.mac) {
            return Err(DropReason::ForeignMac);
        }
        if is_martian(p.key.src) || self.snap.vips.contains(&p.key.src) {
            return Err(DropReason::MartianSource);
        }
        Ok(())
    }

    /// The worker owning `port` when `addr:port` is one of our NAT endpoints (a SNAT
    /// pool address or the egress address, inside its port range).
    fn nat_port_owner(&self, addr: [u8; 4], port: u16) -> Option<u16> {
        let snat = &self.snap.snat;
        let range = snat.range_of(addr).or_else(|| {
            self.snap
                .masq
                .as_ref()
                .filter(|m| m.rules.is_egress(addr.into()))
                .map(|_| snat.ports)
        })?;
        range
            .contains(port)
            .then(|| port_owner(port, self.snap.workers))
    }

    /// The home of an inside endpoint whose port is `port`, when it is another worker and
    /// the frame has not been handed on yet: its packets go there (see the module doc).
    /// A frame that was handed on is served here, with this worker's own ports, so two
    /// snapshots that disagree cannot bounce it.
    fn go_home(&self, range: PortRange, port: u16) -> Option<Verdict> {
        let home = port_owner(range.preferred(port), self.snap.workers);
        (home != self.worker && self.hops == 0).then_some(Verdict::ToWorker(home))
    }

    /// Whether `addr` is the masquerading (egress) address.
    fn is_egress(&self, addr: [u8; 4]) -> bool {
        self.snap
            .masq
            .as_ref()
            .is_some_and(|m| m.rules.is_egress(addr.into()))
    }

    /// The next hop of a hairpinned direction: the packet never leaves, it is turned
    /// around inside xlb, so it keeps a MAC of the interface it came in on (frames are
    /// only taken when addressed to one of ours).
    fn loop_hop(&self, frame: &[u8]) -> Result<NextHop, DropReason> {
        let (i, f) = self
            .snap
            .net
            .ifaces
            .iter()
            .enumerate()
            .find(|(_, i)| frame[0..6] == i.mac)
            .ok_or(DropReason::ForeignMac)?;
        Ok(NextHop {
            iface: i as u8,
            src_mac: f.mac,
            dst_mac: f.mac,
            mtu: f.mtu,
        })
    }

    /// A hairpin flow's packet after its forward rewrite (now from the sender's outside
    /// endpoint to the receiver's): processed again as arriving at the egress address,
    /// here or at the worker owning the destination port.
    fn turn_around(&mut self, frame: &mut [u8], dport: u16) -> Result<Verdict, DropReason> {
        if self.looped {
            // A hairpin flow's rewrite never targets another hairpin flow's forward key.
            return Err(DropReason::NoFlow);
        }
        self.counters.hairpinned += 1;
        let owner = port_owner(dport, self.snap.workers);
        if owner != self.worker {
            return Ok(Verdict::ToWorker(owner));
        }
        self.looped = true;
        self.process_inner(frame)
    }

    /// A packet to the egress address's port P with no flow: open a flow
    /// for the inside endpoint holding P, the remote seen as it is. Either the receiving
    /// side of a hairpin (`hairpin`: the packet was turned around, egress:Px → egress:P;
    /// RFC 4787 §6: the pod sees the sender's outside endpoint, and its answers turn
    /// around the same way), or an unsolicited packet under endpoint-independent
    /// filtering (RFC 4787 §5).
    fn open_inbound(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        hairpin: bool,
    ) -> Result<Verdict, DropReason> {
        let k = p.key;
        if k.proto == PROTO_ICMP || (k.proto == PROTO_TCP && !p.flags.is_opening_syn()) {
            return Err(DropReason::NoFlow);
        }
        let y = self
            .mappings
            .holder(&Outside {
                addr: k.dst,
                port: k.dport,
                proto: k.proto,
            })
            .ok_or(DropReason::NoFlow)?;
        let to_y = self.hop(y.inside)?;
        let around = match hairpin {
            true => self.loop_hop(frame)?,
            false => self.hop(k.src)?,
        };
        let fwd_key = FlowKey {
            src: y.inside,
            dst: k.src,
            sport: y.port,
            dport: k.sport,
            proto: k.proto,
        };
        let fwd = rewrite(&fwd_key, k.dst, k.src, k.dport, k.sport, around);
        let rev = rewrite(&k, k.src, y.inside, k.sport, y.port, to_y);
        self.open_flow(
            frame,
            p,
            [fwd_key, k],
            [fwd, rev],
            FlowKind::Masq,
            hairpin,
            Dir::Reverse,
        )
    }

    /// The outside port for a new flow of `key`'s inside endpoint, to a remote where
    /// `free(port)` says whether the reply tuple is unused: the endpoint's mapping when
    /// it has one (endpoint-independent mapping), else its own port when this worker
    /// owns it (port preservation), else another of this worker's ports of the same
    /// parity and class.
    fn map_port(
        &mut self,
        key: &MapKey,
        range: PortRange,
        free: impl Fn(&FlowTable, u16) -> bool,
    ) -> Result<u16, DropReason> {
        if let Some(port) = self.mappings.port(key).filter(|&p| free(&self.flows, p)) {
            return Ok(port);
        }
        self.salt = self.salt.wrapping_add(0x9E37_79B9);
        let (flows, maps) = (&self.flows, &self.mappings);
        let cands = || range.candidates(key.port, self.worker, self.snap.workers, self.salt);
        // A port no other mapping holds first (its outside endpoint then names one
        // inside endpoint, which hairpinning needs), then any port free toward this
        // remote.
        let unheld = |p: u16| {
            maps.holder(&Outside {
                addr: key.outside,
                port: p,
                proto: key.proto,
            })
            .is_none()
        };
        cands()
            .take(MAX_PORT_TRIES as usize / 2)
            .find(|&p| unheld(p) && free(flows, p))
            .or_else(|| {
                cands()
                    .take(MAX_PORT_TRIES as usize)
                    .find(|&p| free(flows, p))
            })
            .ok_or(DropReason::PortsExhausted)
    }

    /// Does the flow found for this packet take it? Not when it has idled out (it is
    /// removed), and not when it is a closed TCP flow (after FIN or RST) whose 5-tuple a
    /// new connection reuses — clients reuse source ports within seconds, a new socket's
    /// queue (so its worker) is random, and a closed flow lingers 120 s:
    /// - a new SYN reopens the flow with its translation, as conntrack reopens a
    ///   TIME_WAIT entry: the far end may still hold TIME_WAIT for that mapping and
    ///   accepts the new SYN there (same client, newer timestamps). Retiring the flow
    ///   would free its NAT port for an unrelated connection, whose SYN that TIME_WAIT
    ///   answers with a challenge ACK (PAWS): the client resets and retries. A kept
    ///   masqueraded flow is removed instead: the current policy decides the new one.
    /// - any other forward segment far (in sequence space) from where the client stood
    ///   when the connection closed belongs to a new connection whose flow is elsewhere:
    ///   it goes on as a miss (to the other workers, or routed when the policy keeps it)
    ///   instead of leaving with the old mapping. The flow stays.
    fn still_valid(&mut self, frame: &[u8], slot: u32, dir: Dir, p: &Parsed) -> bool {
        let now = self.now;
        let Some(f) = self.flows.get_mut(slot) else {
            return false;
        };
        let idle = now.saturating_sub(f.last_seen) > timeout(&self.snap.timeouts, f.state);
        let reused = !idle
            && dir == Dir::Forward
            && p.key.proto == PROTO_TCP
            && matches!(f.state, FlowState::Fin | FlowState::Rst);
        if reused && !p.flags.is_opening_syn() {
            return tcp_word(frame, p, TCP_SEQ)
                .wrapping_sub(f.fwd_seq)
                .wrapping_add(CLOSING_SEQ_WINDOW)
                <= 2 * CLOSING_SEQ_WINDOW;
        }
        if reused && !f.kept {
            f.state = FlowState::SynSent;
            f.assured = false;
            self.counters.flows_reopened += 1;
            return true;
        }
        if idle || reused {
            self.remove_flow(slot);
            self.counters.flows_expired += 1;
            return false;
        }
        true
    }

    fn forward(
        &mut self,
        frame: &mut [u8],
        slot: u32,
        dir: Dir,
        p: &Parsed,
    ) -> Result<Verdict, DropReason> {
        if self
            .flows
            .get(slot)
            .is_some_and(|f| f.generation != self.snap.generation)
        {
            if let Some(outcome) = self.revalidate(slot)? {
                return self.end_removed(frame, p, slot, dir, outcome);
            }
        }
        let mtu = self
            .flows
            .get(slot)
            .map_or(u16::MAX, |f| f.rewrite[dir as usize].mtu);
        let over = p.l4_end - p.l3 > usize::from(mtu);
        if over && dont_fragment(frame, p) {
            return self.too_big(frame, p, mtu);
        }
        let now = self.now;
        let f = self.flows.get_mut(slot).ok_or(DropReason::NoFlow)?;
        if p.key.proto == PROTO_TCP {
            let fl = p.flags;
            // The handshake in TCP's order (see FlowState): the server's SYN+ACK, then
            // the client's ACK. Any reply alone proves nothing (a backend answers
            // spoofed SYNs too).
            let completes =
                f.state == FlowState::SynRecv && dir == Dir::Forward && fl.ack() && !fl.syn();
            f.assured |= completes;
            let was_closing = matches!(f.state, FlowState::Fin | FlowState::Rst);
            f.state = if fl.rst() {
                FlowState::Rst
            } else if fl.fin() && f.state != FlowState::Rst {
                FlowState::Fin
            } else if completes {
                FlowState::Established
            } else if f.state == FlowState::SynSent && dir == Dir::Reverse && fl.syn() && fl.ack() {
                FlowState::SynRecv
            } else {
                f.state
            };
            if !was_closing && matches!(f.state, FlowState::Fin | FlowState::Rst) {
                // Where the client's sequence space stands as the connection closes (see
                // `still_valid`): its own segment's sequence number, or what the server
                // acknowledges.
                f.fwd_seq = match dir {
                    Dir::Forward => tcp_word(frame, p, TCP_SEQ),
                    Dir::Reverse => tcp_word(frame, p, TCP_ACK),
                };
            }
        } else if dir == Dir::Reverse {
            // A UDP or ICMP answer: the far end is real.
            f.assured = true;
        }
        f.last_seen = now;
        f.packets[dir as usize] = f.packets[dir as usize].saturating_add(1);
        let rw = f.rewrite[dir as usize];
        let around = f.hairpin && dir == Dir::Forward;
        self.fast_sync(slot);
        self.last_flow = Some((slot, dir));
        apply(frame, p, &rw);
        if around {
            return self.turn_around(frame, rw.dport);
        }
        if over {
            return self.split(frame, p, rw.iface, mtu);
        }
        Ok(Verdict::Tx { iface: rw.iface })
    }

    /// Bring a flow up to the current snapshot: refresh next hops if they changed, or
    /// say how the flow ends when its backend is gone (`Some`). Addresses and ports never
    /// change mid-flow (a masqueraded flow keeps its translation across policy changes).
    fn revalidate(&mut self, slot: u32) -> Result<Option<OnRemove>, DropReason> {
        let snap = Arc::clone(&self.snap);
        let Some(f) = self.flows.get_mut(slot) else {
            return Err(DropReason::NoFlow);
        };
        if let Some(outcome) = removal(&snap, f) {
            return Ok(Some(outcome));
        }
        // Its backend is back (removed and added again) before the flow spoke: it goes on.
        f.removed = false;
        let fwd_to = match f.kind {
            FlowKind::Lb => f.backend().0,
            FlowKind::Masq => f.keys[0].dst,
        };
        // A hairpin flow's forward direction turns around inside xlb: no next hop.
        if let (false, Ok(h)) = (f.hairpin, snap.net.next_hop(fwd_to)) {
            set_hop(&mut f.rewrite[0], h);
        }
        if let Ok(h) = snap.net.next_hop(f.keys[0].src) {
            set_hop(&mut f.rewrite[1], h);
        }
        f.generation = snap.generation;
        Ok(None)
    }

    /// A packet of a flow whose backend is gone: the flow ends. A client's UDP datagram
    /// opens a new flow (to a live backend); a TCP segment, from either end, draws a
    /// reset to the client when the service resets (`on_remove`), else is dropped.
    fn end_removed(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        slot: u32,
        dir: Dir,
        outcome: OnRemove,
    ) -> Result<Verdict, DropReason> {
        let Some(f) = self.flows.get(slot).copied() else {
            return Err(DropReason::NoFlow);
        };
        self.remove_flow(slot);
        let fk = f.frontend();
        if p.key.proto == PROTO_UDP && dir == Dir::Forward && self.snap.services.contains_key(&fk) {
            return self.new_flow(frame, p, fk);
        }
        if outcome == OnRemove::Drop || p.key.proto != PROTO_TCP || p.flags.rst() {
            return Err(DropReason::BackendRemoved);
        }
        self.counters.drop(DropReason::BackendRemoved);
        Ok(self.reset_client(frame, p, &f, dir))
    }

    /// Write into `generated` the TCP reset that ends `f` for its client, from the VIP,
    /// answering the segment in `frame` (direction `dir`). Its sequence number is the
    /// one the client expects next (RFC 5961 §3.2 makes Linux take only that): the
    /// client's own acknowledgment when the segment is the client's, the backend's
    /// sequence number when it is the backend's. A client segment without ACK gets
    /// sequence 0 and acknowledges it (RFC 9293 §3.10.7.1).
    fn reset_client(&mut self, frame: &[u8], p: &Parsed, f: &Flow, dir: Dir) -> Verdict {
        let mut rw = f.rewrite[Dir::Reverse as usize];
        if let Ok(h) = self.snap.net.next_hop(rw.dst) {
            set_hop(&mut rw, h);
        }
        let (seq, ack, flags) = match dir {
            Dir::Forward if p.flags.ack() => (tcp_word(frame, p, TCP_ACK), 0, TCP_RST),
            Dir::Forward => {
                let doff = usize::from(frame[p.l4 + 12] >> 4) * 4;
                let fl = p.flags;
                let len = p.l4_end.saturating_sub(p.l4 + doff) as u32
                    + u32::from(fl.syn())
                    + u32::from(fl.fin());
                (
                    0,
                    tcp_word(frame, p, TCP_SEQ).wrapping_add(len),
                    TCP_RST | TCP_ACK_FLAG,
                )
            }
            Dir::Reverse => (
                tcp_word(frame, p, TCP_SEQ),
                tcp_word(frame, p, TCP_ACK),
                TCP_RST | TCP_ACK_FLAG,
            ),
        };
        let g = &mut self.generated;
        g[0..6].copy_from_slice(&rw.dst_mac);
        g[6..12].copy_from_slice(&rw.src_mac);
        write_u16(g, 12, ETHERTYPE_IPV4);
        // IPv4: no options, DF, TTL 64, TCP, 40 bytes.
        g[14..34].copy_from_slice(&[
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        g[26..30].copy_from_slice(&rw.src);
        g[30..34].copy_from_slice(&rw.dst);
        let c = !fold(sum(&g[14..34]));
        write_u16(g, 24, c);
        let t = 34;
        g[t..t + 20].fill(0);
        write_u16(g, t, rw.sport);
        write_u16(g, t + 2, rw.dport);
        g[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        g[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
        g[t + 12] = 5 << 4;
        g[t + 13] = flags;
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&rw.src);
        pseudo[4..8].copy_from_slice(&rw.dst);
        pseudo[9] = PROTO_TCP;
        pseudo[11] = 20;
        let c = !fold(sum(&pseudo) + sum(&g[t..t + 20]));
        write_u16(g, t + 16, c);
        self.generated_len = t + 20;
        Verdict::Reset { iface: rw.iface }
    }

    fn hop(&mut self, dst: [u8; 4]) -> Result<NextHop, DropReason> {
        match self.snap.net.next_hop(dst) {
            Ok(h) => Ok(h),
            Err(NextHopError::Unresolved { addr, .. }) => {
                if self.resolve_len < RESOLVE_QUEUE
                    && !self.resolve[..self.resolve_len].contains(&addr)
                {
                    self.resolve[self.resolve_len] = addr;
                    self.resolve_len += 1;
                }
                Err(DropReason::NoNeighbour)
            }
            Err(NextHopError::NoRoute | NextHopError::ForeignInterface) => Err(DropReason::NoRoute),
        }
    }

    fn new_flow(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        fk: FrontendKey,
    ) -> Result<Verdict, DropReason> {
        let k = p.key;
        let snap = Arc::clone(&self.snap);
        let svc = snap.services.get(&fk).ok_or(DropReason::NotForUs)?;
        let nat = snap.snat.pick(k.src).ok_or(DropReason::NotForUs)?;
        let opts = svc.spec.options;
        let sticky = match (opts.affinity, opts.affinity_timeout_s) {
            (Affinity::ClientIp, Some(t)) => Some(u64::from(t) * SEC),
            _ => None,
        };
        // A client with a remembered backend opens its flows on its affinity home, any
        // other inside endpoint on its port's home.
        let home = match sticky {
            Some(_) => self.affinity_home(k.src),
            None => self.go_home(nat.ports, k.sport),
        };
        if let Some(v) = home {
            return Ok(v);
        }
        // Only a SYN opens a TCP flow: a mid-stream segment would reach the backend from a
        // new SNAT port, which the backend can only reset.
        if k.proto == PROTO_TCP && !p.flags.is_opening_syn() {
            return self.probe_next().ok_or(DropReason::NoFlow);
        }
        let sport = match opts.affinity {
            Affinity::ClientIp => 0,
            Affinity::None => k.sport,
        };
        let h = flow_hash(snap.hash_seed, k.src, k.dst, sport, k.dport, k.proto);
        let ak = AffinityKey {
            client: k.src,
            service: fk,
        };
        let now = self.now;
        let remembered = sticky
            .and_then(|_| self.affinity.get(&ak))
            .filter(|s| s.until >= now)
            .and_then(|s| svc.spec.find(s.addr, s.port))
            .filter(|b| b.weight > 0);
        let backend = match remembered {
            Some(b) => *b,
            None => svc
                .maglev
                .lookup(h)
                .and_then(|i| svc.backend(i))
                .copied()
                .ok_or(DropReason::NoBackend)?,
        };
        let baddr = backend.addr.octets();
        let fwd_hop = self.hop(baddr)?;
        let rev_hop = self.hop(k.src)?;
        let reply = |port: u16| FlowKey {
            src: baddr,
            dst: nat.addr,
            sport: backend.port,
            dport: port,
            proto: k.proto,
        };
        let mk = MapKey {
            inside: k.src,
            port: k.sport,
            proto: k.proto,
            outside: nat.addr,
        };
        let port = match self.map_port(&mk, nat.ports, |f, port| !f.contains_key(&reply(port))) {
            Ok(port) => port,
            Err(r) => return self.refuse(frame, p, r),
        };
        let rev_key = reply(port);
        let fwd = rewrite(&k, nat.addr, baddr, port, backend.port, fwd_hop);
        let rev = rewrite(&rev_key, k.dst, k.src, k.dport, k.sport, rev_hop);
        let v = self.open_flow(
            frame,
            p,
            [k, rev_key],
            [fwd, rev],
            FlowKind::Lb,
            false,
            Dir::Forward,
        )?;
        if let Some(t) = sticky {
            self.remember(ak, &backend, now.saturating_add(t));
        }
        Ok(v)
    }

    /// The affinity home of `client` (see `affinity`), when it is another worker and the
    /// frame has not been handed on yet.
    fn affinity_home(&self, client: [u8; 4]) -> Option<Verdict> {
        let n = u64::from(self.snap.workers.max(1));
        let home = (flow_hash(self.snap.hash_seed, client, [0; 4], 0, 0, 0) % n) as u16;
        (home != self.worker && self.hops == 0).then_some(Verdict::ToWorker(home))
    }

    /// Remember `client`'s backend until `until` (Kubernetes counts the affinity timeout
    /// from the client's last new connection). No allocation: a full table forgets
    /// expired entries, or remembers nothing more.
    fn remember(&mut self, key: AffinityKey, b: &BackendSpec, until: u64) {
        if self.affinity.len() >= AFFINITY_CAPACITY && !self.affinity.contains_key(&key) {
            if self.now < self.affinity_reap {
                return;
            }
            let now = self.now;
            self.affinity.retain(|_, s| s.until >= now);
            self.affinity_reap = now.saturating_add(SEC);
            if self.affinity.len() >= AFFINITY_CAPACITY {
                return;
            }
        }
        self.affinity.insert(
            key,
            Sticky {
                addr: b.addr.octets(),
                port: b.port,
                until,
            },
        );
    }

    /// Install established flows in the XDP fast path from now on (`lbd --fast-path on`).
    pub fn enable_fast_path(&mut self) {
        self.fast_path = true;
    }

    /// Fast-path changes since the last call, for the I/O layer to apply in order.
    pub fn take_fast_path(&mut self) -> impl Iterator<Item = FpEvent> + '_ {
        self.fp_events.drain(..)
    }

    /// Bring the flow's fast-path entries in line with it: installed (again, after a
    /// revalidation) while it qualifies, removed when it stops qualifying. A flow
    /// qualifies when both ends proved real and nothing about its packets needs a
    /// worker: a TCP connection established by its handshake (the worker still sees every
    /// SYN, FIN and RST), a UDP flow with an answer; not hairpinned, kept or ended.
    fn fast_sync(&mut self, slot: u32) {
        let snap = &self.snap;
        let Some(f) = self.flows.get_mut(slot) else {
            return;
        };
        let qualifies = self.fast_path
            && f.assured
            && !f.hairpin
            && !f.kept
            && !f.removed
            && match f.keys[0].proto {
                PROTO_TCP => f.state == FlowState::Established,
                PROTO_UDP => true,
                _ => false,
            };
        if qualifies && (!f.fast || f.fast_gen != f.generation) {
            let entry = |dir: usize| {
                let rw = &f.rewrite[dir];
                let ifindex = snap
                    .net
                    .ifaces
                    .get(usize::from(rw.iface))
                    .map(|i| i.ifindex);
                (
                    fp_key(&f.keys[dir]),
                    flowrec::FlowEntry {
                        generation: f.generation,
                        last_seen: 0,
                        packets: 0,
                        bytes: 0,
                        worker: u32::from(self.worker),
                        slot,
                        action: action(rw, ifindex.unwrap_or(0)),
                    },
                )
            };
            let entries = [entry(0), entry(1)];
            if entries.iter().all(|(_, e)| e.action.ifindex != 0) {
                self.fp_events.push(FpEvent::Install(entries));
                f.fast = true;
                f.fast_gen = f.generation;
            }
        } else if !qualifies && f.fast {
            self.fp_events
                .push(FpEvent::Remove([fp_key(&f.keys[0]), fp_key(&f.keys[1])]));
            f.fast = false;
        }
    }

    /// Live load-balanced flows by service and backend (for `lbctl service list`: a
    /// draining backend's remaining flows): not idle-expired, not closing (after FIN or
    /// RST), not ended by a removal. Not per packet: it walks the table.
    pub fn backend_flows(&self) -> BackendFlows {
        let t = self.snap.timeouts;
        let mut m = hashbrown::HashMap::new();
        for f in self.flows.iter() {
            let idle = self.now.saturating_sub(f.last_seen) > timeout(&t, f.state);
            let closing = matches!(f.state, FlowState::Fin | FlowState::Rst);
            if f.kind == FlowKind::Lb && !f.removed && !idle && !closing {
                let (addr, port) = f.backend();
                *m.entry((f.frontend(), addr, port)).or_insert(0) += 1;
            }
        }
        m
    }

    /// Insert a new flow under both keys, count it, and send its first packet (which
    /// travels in direction `first`).
    #[allow(clippy::too_many_arguments)]
    fn open_flow(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        keys: [FlowKey; 2],
        rewrite: [Rewrite; 2],
        kind: FlowKind,
        hairpin: bool,
        first: Dir,
    ) -> Result<Verdict, DropReason> {
        let mut flow = Flow {
            keys,
            rewrite,
            state: match keys[0].proto {
                PROTO_TCP => FlowState::SynSent,
                PROTO_UDP => FlowState::Udp,
                _ => FlowState::Icmp,
            },
            last_seen: self.now,
            generation: self.snap.generation,
            kind,
            kept: false,
            assured: false,
            mapped: false,
            hairpin,
            removed: false,
            fast: false,
            fast_gen: 0,
            fwd_seq: 0,
            packets: if first == Dir::Forward {
                [1, 0]
            } else {
                [0, 1]
            },
        };
        let mtu = rewrite[first as usize].mtu;
        let over = p.l4_end - p.l3 > usize::from(mtu);
        if over && dont_fragment(frame, p) {
            return self.too_big(frame, p, mtu);
        }
        self.make_room()?;
        let key = map_key(&flow);
        let fresh = self.mappings.port(&key).is_none();
        flow.mapped = self.mappings.acquire(key, rewrite[0].sport);
        let Ok(slot) = self.flows.insert(flow) else {
            if flow.mapped {
                self.mappings.release(&key);
            }
            return Err(DropReason::FlowTableFull);
        };
        if flow.mapped && fresh {
            count_use(&mut self.pool_use, &self.snap.snat.pool, key.outside, true);
        }
        self.last_flow = Some((slot, first));
        self.counters.flows_created += 1;
        let rw = rewrite[first as usize];
        apply(frame, p, &rw);
        if hairpin && first == Dir::Forward {
            return self.turn_around(frame, rw.dport);
        }
        if over {
            return self.split(frame, p, rw.iface, mtu);
        }
        Ok(Verdict::Tx { iface: rw.iface })
    }

    /// Room for one more flow: when the table is full, evict the least recently seen
    /// flow that is idle-expired or not assured among [`EVICT_SCAN`] slots (conntrack's
    /// early drop), so a flood of spoofed SYNs or one-way datagrams cannot lock new
    /// clients out; flows that proved both ends real are never evicted.
    fn make_room(&mut self) -> Result<(), DropReason> {
        if self.flows.len() < self.flows.capacity() {
            return Ok(());
        }
        let (now, t) = (self.now, self.snap.timeouts);
        let idle = |f: &Flow| now.saturating_sub(f.last_seen) > timeout(&t, f.state);
        let f = self
            .flows
            .evict_oldest(EVICT_SCAN, |f| !f.assured || idle(f))
            .ok_or(DropReason::FlowTableFull)?;
        if idle(&f) {
            self.counters.flows_expired += 1;
        } else {
            self.counters.flows_evicted += 1;
        }
        self.forget(&f);
        Ok(())
    }

    /// A packet with no flow and no service: masquerade it, route it untranslated, or
    /// refuse it, as the policy says.
    fn masquerade(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        m: &MasqState,
    ) -> Result<Verdict, DropReason> {
        let k = p.key;
        // To another inside host's outside endpoint (see `process_inner`).
        let hairpin = m.rules.is_egress(k.dst.into())
            && k.proto != PROTO_ICMP
            && self.snap.snat.ports.contains(k.dport);
        let decision = match hairpin {
            true => nat::Decision::Masquerade {
                to: m.rules.egress_for(k.src.into()),
            },
            false => m.rules.decide(k.src.into(), k.dst.into()),
        };
        let mine = !matches!(
            decision,
            nat::Decision::NotMasqueradeSource
                | nat::Decision::Node {
                    kind: nat::NodeRule::ThisNode | nat::NodeRule::Multicast,
                    ..
                }
        );
        // A masquerade source's packet without a flow here may belong to one at its home,
        // a flow the policy now keeps included: it goes there before anything is decided.
        if mine && p.kind != Kind::EchoReply {
            if let Some(v) = self.go_home(self.snap.snat.ports, k.sport) {
                return Ok(v);
            }
        }
        match decision {
            nat::Decision::NotMasqueradeSource => Err(DropReason::NotForUs),
            nat::Decision::Masquerade { to } => {
                if p.kind == Kind::EchoReply {
                    return Err(DropReason::NoFlow);
                }
                if k.proto == PROTO_TCP && !p.flags.is_opening_syn() {
                    if let Some(v) = self.probe_next() {
                        return Ok(v);
                    }
                    // A connection the previous policy left to the kernel unmasqueraded
                    // continues that way; any other mid-stream segment has lost its flow.
                    let was_kept = m
                        .previous
                        .as_ref()
                        .is_some_and(|prev| prev.non_masquerade(k.dst.into()).is_some());
                    if was_kept {
                        return self.route(frame, p);
                    }
                    return Err(DropReason::NoFlow);
                }
                self.new_masq_flow(frame, p, to.octets(), hairpin)
            }
            // The node's own addresses and multicast are the kernel's (the XDP program
            // passes them; this is defensive).
            nat::Decision::Node {
                kind: nat::NodeRule::ThisNode | nat::NodeRule::Multicast,
                ..
            } => Err(DropReason::NotForUs),
            // Only while the XDP maps catch up with a policy change, or for a kept
            // 5-tuple whose flow has ended: do what the kernel would have done.
            nat::Decision::KeepSource { .. } | nat::Decision::Node { .. } => self.route(frame, p),
        }
    }

    fn new_masq_flow(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        egress: [u8; 4],
        hairpin: bool,
    ) -> Result<Verdict, DropReason> {
        let k = p.key;
        let fwd_hop = match hairpin {
            true => self.loop_hop(frame)?,
            false => self.hop(k.dst)?,
        };
        let rev_hop = self.hop(k.src)?;
        // The reply key for a candidate port. For an echo request (id, 0) it is (0, id'):
        // the same formula, because k.dport is 0.
        let reply = |port: u16| FlowKey {
            src: k.dst,
            dst: egress,
            sport: k.dport,
            dport: port,
            proto: k.proto,
        };
        let mk = MapKey {
            inside: k.src,
            port: k.sport,
            proto: k.proto,
            outside: egress,
        };
        let range = self.snap.snat.ports;
        let port = match self.map_port(&mk, range, |f, port| !f.contains_key(&reply(port))) {
            Ok(port) => port,
            Err(r) => return self.refuse(frame, p, r),
        };
        let rev_key = reply(port);
        let fwd = rewrite(&k, egress, k.dst, port, k.dport, fwd_hop);
        let rev = rewrite(&rev_key, k.dst, k.src, k.dport, k.sport, rev_hop);
        self.open_flow(
            frame,
            p,
            [k, rev_key],
            [fwd, rev],
            FlowKind::Masq,
            hairpin,
            Dir::Forward,
        )
    }

    /// Forward untranslated, as a router: next hop from the routing table, TTL − 1.
    fn route(&mut self, frame: &mut [u8], p: &Parsed) -> Result<Verdict, DropReason> {
        let hop = self.hop(p.key.dst)?;
        let over = p.l4_end - p.l3 > usize::from(hop.mtu);
        if over && dont_fragment(frame, p) {
            return self.too_big(frame, p, hop.mtu);
        }
        frame[0..6].copy_from_slice(&hop.dst_mac);
        frame[6..12].copy_from_slice(&hop.src_mac);
        decrement_ttl(&mut frame[p.l3..p.l4], TTL_DECREMENT);
        self.counters.routed += 1;
        if over {
            return self.split(frame, p, hop.iface, hop.mtu);
        }
        Ok(Verdict::Tx { iface: hop.iface })
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

    /// A later fragment (no ports): translated like its datagram's first fragment was,
    /// addresses only (the first fragment's L4 checksum update covers the whole
    /// datagram), or handed to the worker that got the first fragment.
    fn later_fragment(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        k: FragKey,
    ) -> Result<Verdict, DropReason> {
        let (target, seen) = *self.frags.get(&k).ok_or(DropReason::Fragment)?;
        if self.now.saturating_sub(seen) > FRAG_TIMEOUT_NS {
            return Err(DropReason::Fragment);
        }
        let (slot, dir) = match target {
            FragTarget::Worker(w) if w != self.worker => return Ok(Verdict::ToWorker(w)),
            FragTarget::Worker(_) => return Err(DropReason::Fragment),
            FragTarget::Held => return Err(DropReason::NoNeighbour),
            FragTarget::Flow(slot, dir) => (slot, dir),
        };
        let f = self.flows.get(slot).ok_or(DropReason::Fragment)?;
        let fk = &f.keys[dir as usize];
        // The slot may hold another flow by now.
        if fk.src != k.src || fk.dst != k.dst || fk.proto != k.proto || f.hairpin {
            return Err(DropReason::Fragment);
        }
        let rw = f.rewrite[dir as usize];
        frame[0..6].copy_from_slice(&rw.dst_mac);
        frame[6..12].copy_from_slice(&rw.src_mac);
        let ip = &mut frame[p.l3..p.l4];
        ip[12..16].copy_from_slice(&rw.src);
        ip[16..20].copy_from_slice(&rw.dst);
        decrement_ttl(ip, rw.ip_delta);
        // A fragment has no DF: too big for the link, it is cut again.
        if p.l4_end - p.l3 > usize::from(rw.mtu) {
            return self.split(frame, p, rw.iface, rw.mtu);
        }
        Ok(Verdict::Tx { iface: rw.iface })
    }

    /// A DF packet larger than its egress link's `mtu`: ICMP fragmentation needed back
    /// to its sender with that MTU (RFC 1191, RFC 4787 REQ-13). (Without DF the packet
    /// is translated and cut into fragments: [`Engine::split`].)
    fn too_big(&mut self, frame: &[u8], p: &Parsed, mtu: u16) -> Result<Verdict, DropReason> {
        self.originate(frame, p, icmp::FRAG_NEEDED, mtu, DropReason::TooBig)
    }

    /// Cut the translated packet in `frame` into IPv4 fragments of at most `mtu` bytes
    /// (RFC 791 §3.2, RFC 4787 REQ-13): each carries the header with its own length,
    /// offset and MF (a packet that is itself a fragment keeps its place in the
    /// datagram) and checksum. A packet with IP options, or that would take more than
    /// `SPLIT_MAX` fragments, is a counted `too_big` drop.
    fn split(
        &mut self,
        frame: &[u8],
        p: &Parsed,
        iface: u8,
        mtu: u16,
    ) -> Result<Verdict, DropReason> {
        let ihl = p.l4 - p.l3;
        let chunk = (usize::from(mtu).saturating_sub(20) / 8) * 8;
        let payload = &frame[p.l4..p.l4_end];
        let word = u16::from_be_bytes([frame[p.l3 + 6], frame[p.l3 + 7]]);
        let (base, more) = (word & 0x1fff, word & 0x2000 != 0);
        if ihl != 20
            || chunk == 0
            || payload.len().div_ceil(chunk) > SPLIT_MAX
            || usize::from(base) + payload.len() / 8 > 0x1fff
        {
            return Err(DropReason::TooBig);
        }
        let mut at = 0;
        let pieces = payload.len().div_ceil(chunk);
        for (k, piece) in payload.chunks(chunk).enumerate() {
            let len = p.l3 + 20 + piece.len();
            let out = self.split.get_mut(at..at + len).ok_or(DropReason::TooBig)?;
            out[..p.l3 + 20].copy_from_slice(&frame[..p.l3 + 20]);
            out[p.l3 + 20..].copy_from_slice(piece);
            let ip = &mut out[p.l3..p.l3 + 20];
            write_u16(ip, 2, (20 + piece.len()) as u16);
            let mf = if k + 1 < pieces || more { 0x2000 } else { 0 };
            write_u16(ip, 6, mf | (base + (k * chunk / 8) as u16));
            write_u16(ip, 10, 0);
            let c = !fold(sum(ip));
            write_u16(ip, 10, c);
            at += len;
            self.split_ends[k] = at;
        }
        Ok(Verdict::Fragments {
            iface,
            count: pieces as u8,
        })
    }

    /// No NAT port for a new flow: counted, and ICMP communication administratively
    /// prohibited back to its sender (RFC 5508 REQ-8). Not for ICMP errors.
    fn refuse(
        &mut self,
        frame: &[u8],
        p: &Parsed,
        reason: DropReason,
    ) -> Result<Verdict, DropReason> {
        let v = self.originate(frame, p, ADMIN_PROHIBITED, 0, reason)?;
        self.counters.drop(reason);
        Ok(v)
    }

    /// Write into `generated` the ICMP destination unreachable (code `code`, next-hop MTU
    /// `mtu`) a router sends about the received packet in `frame`: from the address of
    /// the interface it came in on, to its source, quoting it as received. `reason`
    /// when the rate limit or a missing address prevents it; `Hold` (via NoNeighbour)
    /// while the way back is being resolved.
    fn originate(
        &mut self,
        frame: &[u8],
        p: &Parsed,
        code: u8,
        mtu: u16,
        reason: DropReason,
    ) -> Result<Verdict, DropReason> {
        let from = self
            .snap
            .net
            .ifaces
            .iter()
            .find(|i| frame[0..6] == i.mac)
            .and_then(|i| i.addr)
            .ok_or(reason)?;
        if self.icmp_tokens == 0 {
            return Err(reason);
        }
        let back = self.hop(p.key.src)?;
        self.icmp_tokens -= 1;
        let quote = (p.l4_end - p.l3).min(ICMP_QUOTE);
        let total = 20 + icmp::HEADER_LEN + quote;
        let g = &mut self.generated;
        g[0..6].copy_from_slice(&back.dst_mac);
        g[6..12].copy_from_slice(&back.src_mac);
        write_u16(g, 12, ETHERTYPE_IPV4);
        // IPv4: no options, no fragmentation, TTL 64, ICMP.
        let ip = &mut g[14..34];
        ip.copy_from_slice(&[
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        write_u16(ip, 2, total as u16);
        ip[12..16].copy_from_slice(&from);
        ip[16..20].copy_from_slice(&p.key.src);
        let c = !fold(sum(ip));
        write_u16(ip, 10, c);
        // ICMP destination unreachable, the next-hop MTU in the second word (RFC 1191).
        let l4 = 34;
        g[l4..l4 + 8].copy_from_slice(&[icmp::DEST_UNREACHABLE, code, 0, 0, 0, 0, 0, 0]);
        write_u16(g, l4 + 6, mtu);
        g[l4 + 8..l4 + 8 + quote].copy_from_slice(&frame[p.l3..p.l3 + quote]);
        let c = !fold(sum(&g[l4..l4 + 8 + quote]));
        write_u16(g, l4 + 2, c);
        self.generated_len = 14 + total;
        Ok(Verdict::Icmp { iface: back.iface })
    }

    /// Translate an ICMP error quoting a packet of one of our flows. The quoted packet
    /// went out translated, so its 5-tuple reversed is the key of the direction this
    /// error travels; that direction's rewrite gives the new outer destination (and the
    /// new outer source when the error comes from the flow's far end itself), and,
    /// mirrored, the quoted packet's original addresses and ports.
    fn icmp_error(
        &mut self,
        frame: &mut [u8],
        p: &Parsed,
        il3: usize,
        il4: usize,
        inner: FlowKey,
    ) -> Result<Verdict, DropReason> {
        let rk = FlowKey {
            src: inner.dst,
            dst: inner.src,
            sport: inner.dport,
            dport: inner.sport,
            proto: inner.proto,
        };
        let Some((slot, dir)) = self.flows.lookup(&rk) else {
            return match self.nat_port_owner(rk.dst, rk.dport) {
                Some(owner) if owner != self.worker => Ok(Verdict::ToWorker(owner)),
                Some(_) => Err(DropReason::NoFlow),
                None => self.probe_next().ok_or(DropReason::NoFlow),
            };
        };
        let stale = self
            .flows
            .get(slot)
            .is_some_and(|f| f.generation != self.snap.generation);
        // An error about a flow whose backend is gone ends the flow, unanswered.
        if stale && self.revalidate(slot)?.is_some() {
            self.remove_flow(slot);
            return Err(DropReason::BackendRemoved);
        }
        let rw = self
            .flows
            .get(slot)
            .map(|f| f.rewrite[dir as usize])
            .ok_or(DropReason::NoFlow)?;
        let icmp_sum = fold(sum(&frame[p.l4..p.l4_end]));
        {
            let q = &mut frame[il3..p.l4_end];
            let addr_delta = Delta::between(&words(inner.src, inner.dst), &words(rw.dst, rw.src));
            let c = u16::from_be_bytes([q[10], q[11]]);
            write_u16(q, 10, addr_delta.apply(c));
            q[12..16].copy_from_slice(&rw.dst);
            q[16..20].copy_from_slice(&rw.src);
            let l4 = &mut q[il4 - il3..];
            match inner.proto {
                PROTO_ICMP => {
                    // (id, 0) or (0, id): the identifier is whichever is set.
                    let (old_id, new_id) = (inner.sport | inner.dport, rw.sport | rw.dport);
                    write_u16(l4, icmp::ECHO_ID, new_id);
                    let c = u16::from_be_bytes([l4[2], l4[3]]);
                    write_u16(l4, 2, Delta::between(&[old_id], &[new_id]).apply(c));
                }
                _ => {
                    write_u16(l4, 0, rw.dport);
                    write_u16(l4, 2, rw.sport);
                    let d = addr_delta.plus(Delta::between(
                        &[inner.sport, inner.dport],
                        &[rw.dport, rw.sport],
                    ));
                    if inner.proto == PROTO_UDP {
                        let c = u16::from_be_bytes([l4[6], l4[7]]);
                        write_u16(l4, 6, d.apply_udp(c));
                    } else if l4.len() >= 18 {
                        // A quote of only 8 bytes lacks the TCP checksum; nothing to fix.
                        let c = u16::from_be_bytes([l4[16], l4[17]]);
                        write_u16(l4, 16, d.apply(c));
                    }
                }
            }
        }
        let icmp_new = fold(sum(&frame[p.l4..p.l4_end]));
        let c = u16::from_be_bytes([frame[p.l4 + 2], frame[p.l4 + 3]]);
        write_u16(
            &mut frame[p.l4..],
            2,
            Delta::between(&[icmp_sum], &[icmp_new]).apply(c),
        );
        let src = if p.key.src == rk.src {
            rw.src
        } else {
            p.key.src
        };
        frame[0..6].copy_from_slice(&rw.dst_mac);
        frame[6..12].copy_from_slice(&rw.src_mac);
        let ip = &mut frame[p.l3..p.l4];
        let d = Delta::between(&words(p.key.src, p.key.dst), &words(src, rw.dst));
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&rw.dst);
        decrement_ttl(ip, d.plus(TTL_DECREMENT));
        self.counters.icmp_errors += 1;
        Ok(Verdict::Tx { iface: rw.iface })
    }
}

/// Whether the packet forbids fragmentation (DF).
fn dont_fragment(frame: &[u8], p: &Parsed) -> bool {
    frame[p.l3 + 6] & 0x40 != 0
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

/// Offsets of the sequence and acknowledgment numbers in a TCP header (RFC 9293 §3.1).
const TCP_SEQ: usize = 4;
const TCP_ACK: usize = 8;
/// TCP flag bits.
const TCP_RST: u8 = 0x04;
const TCP_ACK_FLAG: u8 = 0x10;

/// A 32-bit word of a TCP header. Read only where needed (a flow closing, a segment
/// meeting a closing flow), not in parse; `parse` validated the 20-byte TCP header.
fn tcp_word(frame: &[u8], p: &Parsed, at: usize) -> u32 {
    let t = &frame[p.l4 + at..p.l4 + at + 4];
    u32::from_be_bytes([t[0], t[1], t[2], t[3]])
}

/// A source address no router accepts: "this network" (0/8), loopback (127/8),
/// multicast (224/4) and the reserved 240/4 with the limited broadcast (RFC 1812
/// §5.3.7, RFC 6890). The XDP program's `martian()` (xdp/bpf/xlb.bpf.c) applies the same
/// rule; the fixture rows "source …" check both.
fn is_martian(a: [u8; 4]) -> bool {
    a[0] == 0 || a[0] == 127 || a[0] >= 224
}

/// The four 16-bit words of an address pair.
fn words(a: [u8; 4], b: [u8; 4]) -> [u16; 4] {
    let ([a0, a1], [b0, b1]) = (addr_words(a), addr_words(b));
    [a0, a1, b0, b1]
}

/// Decrement the TTL (≥ 2, checked in parse) and apply `delta` (which must include
/// [`TTL_DECREMENT`]) to the header checksum.
fn decrement_ttl(ip: &mut [u8], delta: Delta) {
    ip[8] -= 1;
    let c = u16::from_be_bytes([ip[10], ip[11]]);
    write_u16(ip, 10, delta.apply(c));
}

fn set_hop(rw: &mut Rewrite, h: NextHop) {
    rw.iface = h.iface;
    rw.src_mac = h.src_mac;
    rw.dst_mac = h.dst_mac;
    rw.mtu = h.mtu;
}

/// The rewrite turning packets with key `from` into `src:sport → dst:dport` via `hop`,
/// with checksum deltas computed once (RFC 1624).
fn rewrite(
    from: &FlowKey,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    hop: NextHop,
) -> Rewrite {
    let [os0, os1] = addr_words(from.src);
    let [od0, od1] = addr_words(from.dst);
    let [ns0, ns1] = addr_words(src);
    let [nd0, nd1] = addr_words(dst);
    let ip_delta = Delta::between(&[os0, os1, od0, od1], &[ns0, ns1, nd0, nd1]);
    let l4_delta = if from.proto == PROTO_ICMP {
        // No pseudo-header; only the identifier changes, and it is whichever of the
        // key's two "ports" is set ((id, 0) for a request, (0, id) for a reply).
        Delta::between(&[from.sport | from.dport], &[sport | dport])
    } else {
        Delta::between(
            &[os0, os1, od0, od1, from.sport, from.dport],
            &[ns0, ns1, nd0, nd1, sport, dport],
        )
    };
    Rewrite {
        src,
        dst,
        sport,
        dport,
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
        iface: hop.iface,
        mtu: hop.mtu,
        ip_delta: ip_delta.plus(TTL_DECREMENT),
        l4_delta,
    }
}

/// The flow-action record of a rewrite, sent out of `ifindex`.
pub fn action(rw: &Rewrite, ifindex: u32) -> flowrec::Action {
    flowrec::Action {
        kind: flowrec::ActionKind::Nat as u8,
        family: flowrec::FAMILY_IPV4,
        ifindex,
        src_mac: rw.src_mac,
        dst_mac: rw.dst_mac,
        mtu: rw.mtu,
        ip_delta: rw.ip_delta.0,
        l4_delta: rw.l4_delta.0,
        sport: rw.sport.to_be_bytes(),
        dport: rw.dport.to_be_bytes(),
        src: flowrec::v4(rw.src),
        dst: flowrec::v4(rw.dst),
        ..flowrec::Action::default()
    }
}

/// Apply a rewrite. Offsets in `p` were validated by the views in [`Engine::parse`]
/// (Ethernet, IPv4 with options, L4 header within `total_len`), so indexing cannot fail.
fn apply(frame: &mut [u8], p: &Parsed, rw: &Rewrite) {
    frame[0..6].copy_from_slice(&rw.dst_mac);
    frame[6..12].copy_from_slice(&rw.src_mac);
    let ip = &mut frame[p.l3..p.l4];
    ip[8] -= 1; // TTL ≥ 2 was checked in parse
    ip[12..16].copy_from_slice(&rw.src);
    ip[16..20].copy_from_slice(&rw.dst);
    let c = u16::from_be_bytes([ip[10], ip[11]]);
    write_u16(ip, 10, rw.ip_delta.apply(c));
    let l4 = &mut frame[p.l4..p.l4_end];
    match p.key.proto {
        PROTO_TCP => {
            write_u16(l4, 0, rw.sport);
            write_u16(l4, 2, rw.dport);
            let c = u16::from_be_bytes([l4[16], l4[17]]);
            write_u16(l4, 16, rw.l4_delta.apply(c));
        }
        PROTO_UDP => {
            write_u16(l4, 0, rw.sport);
            write_u16(l4, 2, rw.dport);
            let c = u16::from_be_bytes([l4[6], l4[7]]);
            write_u16(l4, 6, rw.l4_delta.apply_udp(c));
        }
        _ => {
            // ICMP echo: the identifier is whichever "port" the rewrite sets.
            write_u16(l4, icmp::ECHO_ID, rw.sport | rw.dport);
            let c = u16::from_be_bytes([l4[2], l4[3]]);
            write_u16(l4, 2, rw.l4_delta.apply(c));
        }
    }
}
