//! The per-worker flow table: one entry per NATed flow, reachable from both directions.
//!
//! Layout: a slab of [`Flow`]s preallocated to capacity, a free list, and one hashbrown
//! `HashTable<u32>` index of `slot << 1 | direction` values hashed by [`FlowKey`] (the
//! 5-tuple as it arrives). The index stores only the 4-byte value: keys are compared
//! against the slab, so a key is not stored twice (20 bytes less per index entry). Each flow
//! has two keys, client→VIP (forward) and backend→SNAT (reverse) — for a masqueraded
//! flow inside host→remote and remote→egress address — so a reply finds its
//! flow with one lookup. Capacity is fixed at start-up: the map is created with room for
//! two keys per slot, so inserts never allocate. When it is full the pipeline makes room
//! with [`FlowTable::evict_oldest`] (a bounded scan for flows that are not assured) or
//! refuses the new flow; established (assured) flows are never evicted.
//!
//! Expiry is amortised: [`FlowTable::expire_step`] looks at a bounded number of slots
//! (a clock hand), and a lookup that finds an idle-expired flow treats it as gone. There
//! is no stop-the-world sweep.
//!
//! Invariant: a key is in the map iff the slot it names is live and holds that key.

use crate::wire::checksum::Delta;
use core::hash::BuildHasher;
use hashbrown::{DefaultHashBuilder, HashTable};

/// A 5-tuple as it appears in a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Two words instead of the derived field-by-field (and length-prefixed array) hashing:
/// callgrind counted ~29 instructions per lookup for the derived one.
impl core::hash::Hash for FlowKey {
    #[inline(always)]
    fn hash<H: core::hash::Hasher>(&self, h: &mut H) {
        let addrs =
            u64::from(u32::from_ne_bytes(self.src)) | u64::from(u32::from_ne_bytes(self.dst)) << 32;
        let rest =
            u64::from(self.sport) | u64::from(self.dport) << 16 | u64::from(self.proto) << 32;
        h.write_u64(addrs);
        h.write_u64(rest);
    }
}

impl FlowKey {
    /// The same 5-tuple as the flow-action record keys it (`flowrec::FlowKey`, what the
    /// XDP fast path and its maps use).
    pub fn flowrec(&self) -> flowrec::FlowKey {
        flowrec::FlowKey::v4(self.src, self.dst, self.sport, self.dport, self.proto)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client → VIP.
    Forward = 0,
    /// Backend → SNAT address.
    Reverse = 1,
}

/// Everything needed to rewrite a packet of one direction: new addresses, ports and MACs,
/// the egress interface, and checksum deltas precomputed from the flow key (so applying
/// it is a few stores and two one's-complement adds; an XDP fast path could execute the
/// same action).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub iface: u8,
    /// The egress link's MTU: a larger packet is not sent (see the pipeline).
    pub mtu: u16,
    /// IPv4 header checksum delta, TTL decrement included.
    pub ip_delta: Delta,
    /// TCP/UDP checksum delta (pseudo-header addresses and ports).
    pub l4_delta: Delta,
    /// What is done to the packet. For the DSR kinds `dst`/`dport` name the backend
    /// (the packet itself keeps the VIP); for IPIP and GUE `src`/`dst` are the outer
    /// header's addresses and `sport`/`dport` the outer UDP ports (GUE), and `mtu` is the
    /// link's MTU less the encapsulation.
    pub fwd: Forwarding,
}

/// How a direction's packets are forwarded (`flowrec::ActionKind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Forwarding {
    /// Addresses, ports, MACs, TTL and checksums rewritten (full NAT, masquerading).
    #[default]
    Nat,
    /// Direct server return on the link: the backend's MAC, the IP packet untouched.
    L2Dsr,
    /// Direct server return in an outer IPv4 header (protocol 4).
    Ipip,
    /// Direct server return in outer IPv4 + UDP + GUE (variant 0, protocol 4).
    Gue,
}

impl Forwarding {
    /// Bytes the forwarding puts in front of the IP packet.
    pub const fn overhead(self) -> usize {
        match self {
            Forwarding::Nat | Forwarding::L2Dsr => 0,
            Forwarding::Ipip => 20,
            Forwarding::Gue => 20 + 8 + 4,
        }
    }

    pub fn is_dsr(self) -> bool {
        self != Forwarding::Nat
    }

    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Nat => "nat",
            Forwarding::L2Dsr => "dsr-l2",
            Forwarding::Ipip => "dsr-ipip",
            Forwarding::Gue => "dsr-gue",
        }
    }
}

/// TCP-aware flow state; UDP flows stay in `Udp`.
///
/// A TCP flow is established only by the handshake in the order TCP requires (RFC 9293
/// §3.5): the client's SYN opens it (`SynSent`), the server's SYN+ACK answers
/// (`SynRecv`), the client's ACK completes it (`Established`). A reply alone is not
/// enough: a backend answers a spoofed SYN too, and a flow that counted that as
/// established would hold its slot for the established timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    SynSent,
    /// The server's SYN+ACK was seen; waiting for the client's ACK.
    SynRecv,
    Established,
    Fin,
    Rst,
    Udp,
    Icmp,
}

impl FlowState {
    pub fn name(self) -> &'static str {
        match self {
            FlowState::SynSent => "syn_sent",
            FlowState::SynRecv => "syn_recv",
            FlowState::Established => "established",
            FlowState::Fin => "fin",
            FlowState::Rst => "rst",
            FlowState::Udp => "udp",
            FlowState::Icmp => "icmp",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub keys: [FlowKey; 2],
    pub rewrite: [Rewrite; 2],
    pub state: FlowState,
    pub last_seen: u64,
    /// Snapshot generation the rewrite was resolved under.
    pub generation: u64,
    pub kind: FlowKind,
    /// A masqueraded flow the current policy would no longer masquerade: the XDP
    /// program's keep map steers its packets to the workers (see the pipeline).
    pub kept: bool,
    /// The flow proved both ends real (conntrack's ASSURED): a TCP handshake completed,
    /// or a UDP/ICMP reply came back. Only flows not assured are evicted when the table
    /// is full.
    pub assured: bool,
    /// The flow counts toward its inside endpoint's mapping (`nat::Mappings`), which it
    /// releases when it goes.
    pub mapped: bool,
    /// Between two inside hosts through the egress address (hairpinning): the forward
    /// direction's packets are turned around inside xlb instead of sent out.
    pub hairpin: bool,
    /// Its backend was removed from a service that resets: the flow's next packet draws
    /// a TCP reset to the client, and the flow goes after the transitory timeout
    /// (`Timeouts::tcp_rst`) counted from the removal.
    pub removed: bool,
    /// Its two directions are installed in the XDP fast path (`flowrec`). `fast_gen`:
    /// the snapshot generation whose install decision it carries (the executor ignores
    /// entries of other generations; 0: decide at the next packet).
    pub fast: bool,
    pub fast_gen: u64,
    /// TCP: where the client's sequence space stood when the flow began to close (after
    /// FIN or RST); a forward segment far from it belongs to a new connection that reused
    /// the 5-tuple, not to this one (see the pipeline).
    pub fwd_seq: u32,
    /// Packets per direction (informational; saturates).
    pub packets: [u32; 2],
    /// The (service, backend) account its traffic counts to (`pipeline::Account`), or
    /// `pipeline::NO_ACCOUNT` (masquerading, or a worker whose accounts are full).
    pub acct: u32,
}

impl Flow {
    /// A load-balanced flow's service: where its client sent the first packet.
    pub fn frontend(&self) -> crate::snapshot::FrontendKey {
        let k = &self.keys[0];
        crate::snapshot::FrontendKey {
            addr: k.dst,
            port: k.dport,
            proto: k.proto,
        }
    }

    /// A load-balanced flow's backend: where its forward rewrite sends packets. A DSR
    /// flow's backend listens on the frontend's port (the service table holds DSR
    /// services to that), and its rewrite's ports may be a tunnel's.
    pub fn backend(&self) -> ([u8; 4], u16) {
        match self.one_way() {
            true => (self.rewrite[0].dst, self.keys[0].dport),
            false => (self.rewrite[0].dst, self.rewrite[0].dport),
        }
    }

    /// A DSR flow: xlb sees only the client's direction (the backend answers the
    /// client directly), so only `keys[0]` and `rewrite[0]` mean anything and only
    /// `keys[0]` is indexed.
    pub fn one_way(&self) -> bool {
        self.rewrite[0].fwd.is_dsr()
    }

    /// The directions xlb sees: 2, or 1 for a DSR flow.
    pub fn directions(&self) -> usize {
        if self.one_way() {
            1
        } else {
            2
        }
    }
}

/// What created a flow. Nothing more is stored: a load-balanced flow's service and
/// backend follow from its key and rewrite ([`Flow::frontend`], [`Flow::backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    /// Load balancing: client → VIP, SNAT address → backend.
    Lb,
    /// Egress masquerading: `keys[0]` is inside host → remote, `keys[1]` remote → egress.
    Masq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

/// The memory for a flow table of this capacity could not be allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate a flow table for {capacity} flows (about {} MiB)", capacity.saturating_mul(FLOW_BYTES) >> 20)]
pub struct AllocError {
    pub capacity: usize,
}

/// Bytes per flow of capacity: a slot, a free-list entry and two index entries with
/// hashbrown's load factor (measured: see docs/benchmarks.md).
pub const FLOW_BYTES: usize = core::mem::size_of::<Option<Flow>>() + 4 + 2 * 4 * 8 / 7 + 2;

#[derive(Debug)]
pub struct FlowTable {
    /// `slot << 1 | direction`, hashed by the key the slot holds for that direction.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    slots: Vec<Option<Flow>>,
    free: Vec<u32>,
    hand: usize,
    /// Where the next eviction scan starts.
    evict_hand: usize,
}

/// The key an index value names, if its slot is live.
fn key_at(slots: &[Option<Flow>], v: u32) -> Option<&FlowKey> {
    slots
        .get((v >> 1) as usize)?
        .as_ref()
        .map(|f| &f.keys[(v & 1) as usize])
}

fn decode(v: u32) -> (u32, Dir) {
    (
        v >> 1,
        if v & 1 == 0 {
            Dir::Forward
        } else {
            Dir::Reverse
        },
    )
}

impl FlowTable {
    /// A table for at most `capacity` flows (2 × capacity keys). Allocates everything now.
    /// Panics if the memory cannot be had; see [`FlowTable::try_with_capacity`].
    pub fn with_capacity(capacity: usize) -> FlowTable {
        FlowTable::try_with_capacity(capacity).expect("memory for the flow table")
    }

    /// As [`FlowTable::with_capacity`], but a failed allocation is an error (so a daemon
    /// can refuse to start instead of aborting). `capacity` is clamped to 1..=2³¹−1.
    pub fn try_with_capacity(capacity: usize) -> Result<FlowTable, AllocError> {
        let capacity = capacity.clamp(1, (u32::MAX >> 1) as usize);
        let hasher = DefaultHashBuilder::default();
        let mut index = HashTable::new();
        index
            .try_reserve(capacity * 2, |_: &u32| 0)
            .map_err(|_| AllocError { capacity })?;
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(capacity)
            .map_err(|_| AllocError { capacity })?;
        slots.resize(capacity, None);
        let mut free = Vec::new();
        free.try_reserve_exact(capacity)
            .map_err(|_| AllocError { capacity })?;
        free.extend((0..capacity as u32).rev());
        Ok(FlowTable {
            index,
            hasher,
            slots,
            free,
            hand: 0,
            evict_hand: 0,
        })
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot and direction a packet with `key` belongs to.
    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<(u32, Dir)> {
        let slots = &self.slots;
        self.index
            .find(self.hasher.hash_one(key), |&v| {
                key_at(slots, v) == Some(key)
            })
            .map(|&v| decode(v))
    }

    pub fn contains_key(&self, key: &FlowKey) -> bool {
        self.lookup(key).is_some()
    }

    pub fn get(&self, slot: u32) -> Option<&Flow> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut Flow> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Insert a flow under both its keys (a DSR flow: its one). The caller has checked that neither key is
    /// present (the pipeline looks both up first); a present key is taken over.
    pub fn insert(&mut self, flow: Flow) -> Result<u32, TableFull> {
        let slot = self.free.pop().ok_or(TableFull)?;
        let (keys, n) = (flow.keys, flow.directions());
        self.slots[slot as usize] = Some(flow);
        for (d, k) in keys.iter().enumerate().take(n) {
            let h = self.hasher.hash_one(k);
            let (slots, hasher) = (&self.slots, &self.hasher);
            let v = slot << 1 | d as u32;
            if let Ok(old) = self
                .index
                .find_entry(h, |&o| o != v && key_at(slots, o) == Some(k))
            {
                old.remove();
            }
            // Capacity for two keys per slot was reserved, so this never rehashes; the
            // hasher is still exact (every indexed slot is live).
            self.index.insert_unique(h, v, |&o| {
                key_at(slots, o).map_or(0, |k| hasher.hash_one(k))
            });
        }
        Ok(slot)
    }

    pub fn remove(&mut self, slot: u32) -> Option<Flow> {
        let f = self.slots.get(slot as usize)?.as_ref()?;
        let (keys, n) = (f.keys, f.directions());
        for (d, k) in keys.iter().enumerate().take(n) {
            let v = slot << 1 | d as u32;
            // Only the entry naming this slot and direction (another flow may have taken
            // the key over).
            if let Ok(e) = self.index.find_entry(self.hasher.hash_one(k), |&o| o == v) {
                e.remove();
            }
        }
        let flow = self.slots.get_mut(slot as usize)?.take();
        self.free.push(slot);
        flow
    }

    /// Look at up to `budget` slots from the clock hand and remove flows for which
    /// `expired` says yes. Returns how many were removed.
    pub fn expire_step(
        &mut self,
        budget: usize,
        mut expired: impl FnMut(&mut Flow) -> bool,
    ) -> usize {
        let n = self.slots.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            let slot = self.hand;
            self.hand = if self.hand + 1 == n { 0 } else { self.hand + 1 };
            if self.slots[slot].as_mut().is_some_and(&mut expired) {
                self.remove(slot as u32);
                removed += 1;
            }
        }
        removed
    }

    /// Early drop (after conntrack's `early_drop`): look at up to `scan` slots from the
    /// eviction hand and remove the least recently seen flow for which `evictable` says
    /// yes. Bounded work per call, no allocation; `None` if none of those slots held one.
    /// The hand moves on, so repeated calls under a flood walk the whole table.
    pub fn evict_oldest(
        &mut self,
        scan: usize,
        mut evictable: impl FnMut(&Flow) -> bool,
    ) -> Option<Flow> {
        let n = self.slots.len();
        let mut best: Option<(u32, u64)> = None;
        for _ in 0..scan.min(n) {
            let slot = self.evict_hand;
            self.evict_hand = if slot + 1 == n { 0 } else { slot + 1 };
            if let Some(f) = self.slots[slot].as_ref() {
                if evictable(f) && best.is_none_or(|(_, seen)| f.last_seen < seen) {
                    best = Some((slot as u32, f.last_seen));
                }
            }
        }
        best.and_then(|(slot, _)| self.remove(slot))
    }

    /// All live flows (for `lbctl` listings; not for the hot path).
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.slots.iter().filter_map(Option::as_ref)
    }

    /// All live flows, mutably (to mark them after a policy change; not per packet).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Flow> {
        self.slots.iter_mut().filter_map(Option::as_mut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap as Oracle;

    fn key(n: u16, rev: bool) -> FlowKey {
        FlowKey {
            src: [10, 0, 0, rev as u8],
            dst: [10, 0, 1, 1],
            sport: n,
            dport: 80,
            proto: 6,
        }
    }

    fn flow(n: u16, t: u64) -> Flow {
        Flow {
            keys: [key(n, false), key(n, true)],
            rewrite: [Rewrite::default(); 2],
            state: FlowState::SynSent,
            last_seen: t,
            generation: 0,
            kind: FlowKind::Lb,
            kept: false,
            assured: false,
            mapped: false,
            hairpin: false,
            removed: false,
            fast: false,
            fast_gen: 0,
            fwd_seq: 0,
            packets: [0; 2],
            acct: u32::MAX,
        }
    }

    #[test]
    fn eviction_takes_the_oldest_evictable_in_the_window() {
        let mut t = FlowTable::with_capacity(8);
        for n in 0..8u16 {
            let mut f = flow(n, 100 - u64::from(n));
            f.assured = n == 7; // the oldest is assured: never evicted
            t.insert(f).expect("room");
        }
        let gone = t.evict_oldest(8, |f| !f.assured).expect("one evicted");
        assert_eq!(gone.keys[0], key(6, false), "oldest not-assured flow");
        assert_eq!(t.len(), 7);
        assert!(t.lookup(&key(6, false)).is_none() && t.lookup(&key(6, true)).is_none());
        // Nothing evictable: nothing removed.
        assert!(t.evict_oldest(8, |_| false).is_none());
        assert_eq!(t.len(), 7);
        // A window of 2 only sees 2 slots, and the hand moves on.
        let mut t = FlowTable::with_capacity(4);
        for n in 0..4u16 {
            t.insert(flow(n, u64::from(n))).expect("room");
        }
        let a = t.evict_oldest(2, |_| true).expect("evicted");
        let b = t.evict_oldest(2, |_| true).expect("evicted");
        assert_ne!(a.keys[0], b.keys[0]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn an_impossible_table_is_an_error_not_an_abort() {
        let e = FlowTable::try_with_capacity(usize::MAX).expect_err("2^31 flows do not fit");
        assert!(e.to_string().contains("cannot allocate"), "{e}");
        assert!(FlowTable::try_with_capacity(10).is_ok());
    }

    #[test]
    fn full_table_refuses() {
        let mut t = FlowTable::with_capacity(2);
        assert!(t.insert(flow(1, 0)).is_ok());
        assert!(t.insert(flow(2, 0)).is_ok());
        assert_eq!(t.insert(flow(3, 0)).err(), Some(TableFull));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn both_directions_find_the_slot() {
        let mut t = FlowTable::with_capacity(4);
        let s = t.insert(flow(7, 0)).expect("room");
        assert_eq!(t.lookup(&key(7, false)), Some((s, Dir::Forward)));
        assert_eq!(t.lookup(&key(7, true)), Some((s, Dir::Reverse)));
        t.remove(s);
        assert_eq!(t.lookup(&key(7, false)), None);
        assert_eq!(t.lookup(&key(7, true)), None);
    }

    #[test]
    fn a_one_way_flow_is_indexed_by_its_client_key_only() {
        let mut t = FlowTable::with_capacity(4);
        let mut f = flow(9, 0);
        f.rewrite[0].fwd = Forwarding::Gue;
        f.keys[1] = f.keys[0];
        assert!(f.one_way() && f.directions() == 1);
        let s = t.insert(f).expect("room");
        assert_eq!(t.lookup(&key(9, false)), Some((s, Dir::Forward)));
        // Its reverse key is nobody's.
        assert_eq!(t.lookup(&key(9, true)), None);
        let other = t.insert(flow(10, 0)).expect("room");
        assert_eq!(t.lookup(&key(10, true)), Some((other, Dir::Reverse)));
        assert!(t.remove(s).is_some());
        assert_eq!(t.lookup(&key(9, false)), None);
        assert_eq!(t.lookup(&key(10, false)), Some((other, Dir::Forward)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn expiry_is_bounded_per_step() {
        let mut t = FlowTable::with_capacity(100);
        for n in 0..100 {
            t.insert(flow(n, 0)).expect("room");
        }
        assert_eq!(t.expire_step(10, |_| true), 10);
        assert_eq!(t.len(), 90);
        let mut total = 10;
        while !t.is_empty() {
            total += t.expire_step(10, |_| true);
        }
        assert_eq!(total, 100);
    }

    #[derive(Debug, Clone)]
    enum Action {
        Insert(u16),
        Remove(u16),
        Expire(u8, u64),
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            (0u16..64).prop_map(Action::Insert),
            (0u16..64).prop_map(Action::Remove),
            (1u8..20, 0u64..64).prop_map(|(b, t)| Action::Expire(b, t)),
        ]
    }

    proptest! {
        /// The table behaves like a HashMap of flows keyed by their forward key, with a
        /// capacity, and both keys always resolve to the same live flow.
        #[test]
        fn matches_hashmap_oracle(actions in proptest::collection::vec(action(), 1..300)) {
            let cap = 32;
            let mut t = FlowTable::with_capacity(cap);
            let mut oracle: Oracle<u16, u64> = Oracle::new();
            for (i, a) in actions.into_iter().enumerate() {
                match a {
                    Action::Insert(n) => {
                        if oracle.contains_key(&n) { continue; }
                        let r = t.insert(flow(n, i as u64));
                        if oracle.len() < cap {
                            prop_assert!(r.is_ok());
                            oracle.insert(n, i as u64);
                        } else {
                            prop_assert_eq!(r.err(), Some(TableFull));
                        }
                    }
                    Action::Remove(n) => {
                        let got = t.lookup(&key(n, false)).and_then(|(s, _)| t.remove(s));
                        prop_assert_eq!(got.is_some(), oracle.remove(&n).is_some());
                    }
                    Action::Expire(budget, before) => {
                        t.expire_step(usize::from(budget), |f| f.last_seen < before);
                        // Whatever was removed must have been expired; the rest stays.
                        let live: Vec<u16> = oracle.keys().copied().collect();
                        for n in live {
                            if t.lookup(&key(n, false)).is_none() {
                                prop_assert!(oracle[&n] < before);
                                oracle.remove(&n);
                            }
                        }
                    }
                }
                prop_assert_eq!(t.len(), oracle.len());
                for (&n, &seen) in &oracle {
                    let (s, d) = t.lookup(&key(n, false)).expect("forward key present");
                    prop_assert_eq!(d, Dir::Forward);
                    prop_assert_eq!(t.lookup(&key(n, true)), Some((s, Dir::Reverse)));
                    prop_assert_eq!(t.get(s).map(|f| f.last_seen), Some(seen));
                }
            }
        }
    }
}
