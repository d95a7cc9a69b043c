//! The SNAT-mode load-balancing stage: frame in, rewritten frame and verdict out.
//!
//! ```text
//! client:cport → VIP:vport        becomes   snat:port → backend:bport   (forward)
//! backend:bport → snat:port       becomes   VIP:vport → client:cport    (reverse)
//! ```
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
//! Flow ownership: the worker that sees a flow's first packet owns it and allocates its
//! SNAT port from its own slice of the port range; a reply that arrives on another
//! worker's queue is recognised by its destination port and handed to the owner.
//! Flows resolved under an older snapshot are revalidated on their next packet: a removed
//! backend ends the flow, a changed neighbour updates the MACs, nothing else moves.

use crate::counters::{Counters, DropReason};
use crate::flow::{Dir, Flow, FlowKey, FlowState, FlowTable, Rewrite};
use crate::hash::flow_hash;
use crate::netview::{NextHop, NextHopError};
use crate::snapshot::{FrontendKey, Snapshot, Timeouts};
use crate::wire::checksum::{addr_words, Delta, TTL_DECREMENT};
use crate::wire::ethernet::ETHERTYPE_IPV4;
use crate::wire::ipv4::{PROTO_TCP, PROTO_UDP};
use crate::wire::{write_u16, EthernetFrame, Ipv4Packet, TcpFlags, L4};
use nat::PortAllocator;
use std::sync::Arc;

/// Slots the expiry clock hand visits per batch.
pub const EXPIRE_BUDGET: usize = 64;
/// Candidate SNAT ports tried before counting exhaustion.
pub const MAX_PORT_TRIES: u32 = 128;
/// Neighbour resolutions a worker can ask for between two drains.
const RESOLVE_QUEUE: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the rewritten frame out of interface `iface` (index into the snapshot's
    /// interface list).
    Tx {
        iface: u8,
    },
    /// Hand the unmodified frame to worker `n`, which owns its flow.
    ToWorker(u16),
    /// Keep the unmodified frame and process it again after the next snapshot: a next
    /// hop's MAC is unknown and resolution was requested (the kernel's unresolved queue,
    /// `unres_qlen`, does the same). The I/O layer bounds how many and how long.
    Hold,
    Drop(DropReason),
}

/// Where the headers of a parsed frame sit.
struct Parsed {
    l3: usize,
    l4: usize,
    l4_end: usize,
    key: FlowKey,
    flags: TcpFlags,
}

#[derive(Debug)]
pub struct Engine {
    worker: u16,
    snap: Arc<Snapshot>,
    flows: FlowTable,
    ports: PortAllocator,
    now: u64,
    pub counters: Counters,
    resolve: [[u8; 4]; RESOLVE_QUEUE],
    resolve_len: usize,
}

fn timeout(t: &Timeouts, s: FlowState) -> u64 {
    match s {
        FlowState::SynSent => t.tcp_syn,
        FlowState::Established => t.tcp_established,
        FlowState::Fin => t.tcp_fin,
        FlowState::Rst => t.tcp_rst,
        FlowState::Udp => t.udp,
    }
}

impl Engine {
    /// A worker's engine. `flow_capacity` flows are allocated now.
    pub fn new(worker: u16, flow_capacity: usize, snap: Arc<Snapshot>) -> Engine {
        let slice = snap.snat.ports.slice(worker, snap.workers.max(1));
        Engine {
            worker,
            ports: PortAllocator::new(slice),
            snap,
            flows: FlowTable::with_capacity(flow_capacity),
            now: 0,
            counters: Counters::default(),
            resolve: [[0; 4]; RESOLVE_QUEUE],
            resolve_len: 0,
        }
    }

    pub fn worker(&self) -> u16 {
        self.worker
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// Swap in a new snapshot (between batches). Flows revalidate lazily.
    pub fn set_snapshot(&mut self, snap: Arc<Snapshot>) {
        self.snap = snap;
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    pub fn port_slice(&self) -> nat::PortRange {
        self.ports.slice()
    }

    /// Start a batch at time `now` (ns, monotonic): advances the expiry clock hand.
    pub fn begin_batch(&mut self, now: u64) {
        self.now = now;
        let t = self.snap.timeouts;
        let expired = self.flows.expire_step(EXPIRE_BUDGET, |f| {
            now.saturating_sub(f.last_seen) > timeout(&t, f.state)
        });
        self.counters.flows_expired += expired as u64;
    }

    /// Neighbours this worker needs resolved since the last call.
    pub fn take_resolve_requests(&mut self) -> impl Iterator<Item = [u8; 4]> + '_ {
        let n = core::mem::take(&mut self.resolve_len);
        self.resolve[..n].iter().copied()
    }

    /// Process one frame in place.
    pub fn process(&mut self, frame: &mut [u8]) -> Verdict {
        self.counters.rx += 1;
        let v = match self.process_inner(frame) {
            Ok(v) => v,
            // Only new flows resolve next hops, before touching the frame.
            Err(DropReason::NoNeighbour) => Verdict::Hold,
            Err(r) => Verdict::Drop(r),
        };
        match v {
            Verdict::Tx { .. } => self.counters.tx += 1,
            Verdict::ToWorker(_) => self.counters.handoff_out += 1,
            Verdict::Hold => self.counters.held += 1,
            Verdict::Drop(r) => self.counters.drop(r),
        }
        v
    }

    fn parse(frame: &[u8]) -> Result<Parsed, DropReason> {
        let eth = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Malformed)?;
        if eth.ethertype() != ETHERTYPE_IPV4 {
            return Err(DropReason::NotIpv4);
        }
        let l3 = eth.payload_offset();
        let ip = Ipv4Packet::new_checked(&frame[l3..]).map_err(|_| DropReason::Malformed)?;
        if ip.is_fragment() {
            return Err(DropReason::Fragment);
        }
        if ip.ttl() <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        let proto = ip.protocol();
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Err(DropReason::UnsupportedProtocol);
        }
        let l4 = l3 + ip.header_len();
        let l4_end = l3 + ip.total_len();
        let seg = L4::new_checked(&frame[l4..l4_end], proto).map_err(|_| DropReason::Malformed)?;
        Ok(Parsed {
            l3,
            l4,
            l4_end,
            key: FlowKey {
                src: ip.src(),
                dst: ip.dst(),
                sport: seg.src_port(),
                dport: seg.dst_port(),
                proto,
            },
            flags: seg.tcp_flags(),
        })
    }

    fn process_inner(&mut self, frame: &mut [u8]) -> Result<Verdict, DropReason> {
        let p = Self::parse(frame)?;
        if let Some((slot, dir)) = self.flows.lookup(&p.key) {
            if self.still_valid(slot, dir, &p) {
                return self.forward(frame, slot, dir, &p);
            }
        }
        let snat = self.snap.snat;
        if p.key.dst == snat.addr && snat.ports.contains(p.key.dport) {
            let owner = snat
                .ports
                .owner(p.key.dport, self.snap.workers)
                .unwrap_or(self.worker);
            if owner != self.worker {
                return Ok(Verdict::ToWorker(owner));
            }
            return Err(DropReason::NoFlow);
        }
        self.new_flow(frame, &p)
    }

    /// False (after removing it) when the flow found for this packet has idled out, or is
    /// a closed TCP flow whose 5-tuple a new SYN reuses.
    fn still_valid(&mut self, slot: u32, dir: Dir, p: &Parsed) -> bool {
        let Some(f) = self.flows.get(slot) else {
            return false;
        };
        let idle = self.now.saturating_sub(f.last_seen) > timeout(&self.snap.timeouts, f.state);
        let reused = dir == Dir::Forward
            && p.flags.is_opening_syn()
            && matches!(f.state, FlowState::Fin | FlowState::Rst);
        if idle || reused {
            self.flows.remove(slot);
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
            self.revalidate(slot)?;
        }
        let now = self.now;
        let f = self.flows.get_mut(slot).ok_or(DropReason::NoFlow)?;
        if p.key.proto == PROTO_TCP {
            f.state = if p.flags.rst() {
                FlowState::Rst
            } else if p.flags.fin() && f.state != FlowState::Rst {
                FlowState::Fin
            } else if dir == Dir::Reverse && f.state == FlowState::SynSent {
                FlowState::Established
            } else {
                f.state
            };
        }
        f.last_seen = now;
        f.packets[dir as usize] += 1;
        let rw = f.rewrite[dir as usize];
        apply(frame, p, &rw);
        Ok(Verdict::Tx { iface: rw.iface })
    }

    /// Bring a flow up to the current snapshot: end it if its backend is gone, refresh
    /// its next hops if they changed. Addresses and ports never change mid-flow.
    fn revalidate(&mut self, slot: u32) -> Result<(), DropReason> {
        let snap = Arc::clone(&self.snap);
        let Some(f) = self.flows.get_mut(slot) else {
            return Err(DropReason::NoFlow);
        };
        let alive = snap.services.get(&f.frontend).is_some_and(|s| {
            s.spec
                .backends
                .iter()
                .any(|b| b.addr.octets() == f.backend.0 && b.port == f.backend.1)
        });
        if !alive {
            self.flows.remove(slot);
            return Err(DropReason::BackendRemoved);
        }
        if let Ok(h) = snap.net.next_hop(f.backend.0) {
            set_hop(&mut f.rewrite[0], h);
        }
        if let Ok(h) = snap.net.next_hop(f.keys[0].src) {
            set_hop(&mut f.rewrite[1], h);
        }
        f.generation = snap.generation;
        Ok(())
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

    fn new_flow(&mut self, frame: &mut [u8], p: &Parsed) -> Result<Verdict, DropReason> {
        let k = p.key;
        let snap = Arc::clone(&self.snap);
        let fk = FrontendKey {
            addr: k.dst,
            port: k.dport,
            proto: k.proto,
        };
        let svc = snap.services.get(&fk).ok_or(DropReason::NotForUs)?;
        // Only a SYN opens a TCP flow: a mid-stream segment would reach the backend from a
        // new SNAT port, which the backend can only reset.
        if k.proto == PROTO_TCP && !p.flags.is_opening_syn() {
            return Err(DropReason::NoFlow);
        }
        if self.flows.len() >= self.flows.capacity() {
            return Err(DropReason::FlowTableFull);
        }
        let h = flow_hash(snap.hash_seed, k.src, k.dst, k.sport, k.dport, k.proto);
        let backend = svc
            .maglev
            .lookup(h)
            .and_then(|i| svc.backend(i))
            .copied()
            .ok_or(DropReason::NoBackend)?;
        let baddr = backend.addr.octets();
        let fwd_hop = self.hop(baddr)?;
        let rev_hop = self.hop(k.src)?;
        let snat_addr = snap.snat.addr;
        let flows = &self.flows;
        let port = self
            .ports
            .allocate(MAX_PORT_TRIES, |port| {
                flows.contains_key(&FlowKey {
                    src: baddr,
                    dst: snat_addr,
                    sport: backend.port,
                    dport: port,
                    proto: k.proto,
                })
            })
            .ok_or(DropReason::PortsExhausted)?;
        let rev_key = FlowKey {
            src: baddr,
            dst: snat_addr,
            sport: backend.port,
            dport: port,
            proto: k.proto,
        };
        let fwd = rewrite(&k, snat_addr, baddr, port, backend.port, fwd_hop);
        let rev = rewrite(&rev_key, k.dst, k.src, k.dport, k.sport, rev_hop);
        let flow = Flow {
            keys: [k, rev_key],
            rewrite: [fwd, rev],
            state: if k.proto == PROTO_TCP {
                FlowState::SynSent
            } else {
                FlowState::Udp
            },
            last_seen: self.now,
            generation: snap.generation,
            frontend: fk,
            backend: (baddr, backend.port),
            packets: [1, 0],
        };
        self.flows
            .insert(flow)
            .map_err(|_| DropReason::FlowTableFull)?;
        self.counters.flows_created += 1;
        apply(frame, p, &fwd);
        Ok(Verdict::Tx { iface: fwd.iface })
    }
}

fn set_hop(rw: &mut Rewrite, h: NextHop) {
    rw.iface = h.iface;
    rw.src_mac = h.src_mac;
    rw.dst_mac = h.dst_mac;
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
    let l4_delta = Delta::between(
        &[os0, os1, od0, od1, from.sport, from.dport],
        &[ns0, ns1, nd0, nd1, sport, dport],
    );
    Rewrite {
        src,
        dst,
        sport,
        dport,
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
        iface: hop.iface,
        ip_delta: ip_delta.plus(TTL_DECREMENT),
        l4_delta,
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
    write_u16(l4, 0, rw.sport);
    write_u16(l4, 2, rw.dport);
    if p.key.proto == PROTO_TCP {
        let c = u16::from_be_bytes([l4[16], l4[17]]);
        write_u16(l4, 16, rw.l4_delta.apply(c));
    } else {
        let c = u16::from_be_bytes([l4[6], l4[7]]);
        write_u16(l4, 6, rw.l4_delta.apply_udp(c));
    }
}
