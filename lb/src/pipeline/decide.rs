//! Decide: a classified frame and the snapshot in, a [`Step`] out — which flow direction's
//! action applies (opening or revalidating the flow first), or route untranslated,
//! translate an ICMP error, answer with an ICMP error or a reset, hand the frame to
//! another worker, hold it, or drop it. Decide owns the flow table's state changes
//! (TCP states, assured, last seen) and never reads or writes the frame: everything it
//! needs from the headers is in [`Parsed`]. The snapshot is borrowed, never cloned.

use super::classify::{FragKey, Kind, Parsed};
use super::execute::{rewrite, set_hop, Step};
use super::{
    removal, timeout, Event, FragTarget, State, Verdict, CLOSING_SEQ_WINDOW, EVICT_SCAN,
    FRAG_TIMEOUT_NS, MAX_PORT_TRIES, SEC,
};
use super::{AffinityKey, Sticky, AFFINITY_CAPACITY};
use crate::counters::DropReason;
use crate::flow::{Dir, Flow, FlowKey, FlowKind, FlowState, FlowTable, Forwarding, Rewrite};
use crate::hash::flow_hash;
use crate::netview::{NextHop, NextHopError};
use crate::service::{Affinity, BackendSpec, Dsr, OnRemove, Proto, DEFAULT_GUE_PORT};
use crate::snapshot::{FrontendKey, MasqState, Snapshot};
use crate::wire::icmp;
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use nat::{port_owner, MapKey, Outside, PortRange};

/// GUE's outer UDP source ports: the top quarter of the port space (the dynamic range),
/// 14 bits of the flow hash.
const GUE_SPORT_BASE: u16 = 0xc000;

/// Code of "communication administratively prohibited" (RFC 1812 §5.2.7.1).
const ADMIN_PROHIBITED: u8 = 13;

/// A new translated flow's outside: its address and port range, the remote it goes to,
/// the next hops of its two directions, its kind, and whether it is hairpinned.
struct Translation {
    outside: [u8; 4],
    range: PortRange,
    remote: ([u8; 4], u16),
    hops: (NextHop, NextHop),
    kind: FlowKind,
    hairpin: bool,
}

impl State {
    /// Decide what becomes of a classified frame.
    #[inline(always)]
    pub(super) fn decide(&mut self, snap: &Snapshot, p: &Parsed) -> Result<Step, DropReason> {
        match p.frag {
            Some((k, false)) => return self.later_fragment(p, k),
            Some((k, true)) if !self.looped => self.first_frag = Some(k),
            _ => {}
        }
        if let Kind::Error { inner, .. } = p.kind {
            return self.icmp_error(snap, p, inner);
        }
        if let Some((slot, dir)) = self.flows.lookup(&p.key) {
            if self.still_valid(snap, slot, dir, p) {
                return self.forward(snap, p, slot, dir);
            }
        }
        check_new(snap, p)?;
        // A reply to a NAT address and port with no flow here: its owner has it, or
        // nobody does.
        if let Some(owner) = nat_port_owner(snap, p.key.dst, p.key.dport) {
            // From an inside host to another's outside endpoint: hairpinning (RFC 4787
            // REQ-9), a masquerade flow like any other.
            let hairpin = snap.masq.as_ref().filter(|m| {
                m.rules.is_egress(p.key.dst.into())
                    && p.key.proto != PROTO_ICMP
                    && m.rules.decide(p.key.src.into(), p.key.dst.into())
                        != nat::Decision::NotMasqueradeSource
            });
            if let Some(m) = hairpin {
                return self.masquerade(snap, p, m);
            }
            if owner != self.worker {
                return Ok(Step::Verdict(Verdict::ToWorker(owner)));
            }
            // Turned around by a hairpin flow: to the inside host holding the port.
            if is_egress(snap, p.key.src) {
                return self.open_inbound(snap, p, true);
            }
            // Unsolicited, to a mapped pod: only with endpoint-independent filtering.
            let eif = snap.masq.as_ref().is_some_and(|m| {
                m.filtering == nat::Filtering::EndpointIndependent
                    && m.rules.is_egress(p.key.dst.into())
            });
            if eif {
                return self.open_inbound(snap, p, false);
            }
            return Err(DropReason::NoFlow);
        }
        if p.kind == Kind::Ports {
            let fk = FrontendKey {
                addr: p.key.dst,
                port: p.key.dport,
                proto: p.key.proto,
            };
            if snap.services.contains_key(&fk) {
                return self.new_flow(snap, p, fk);
            }
        }
        match snap.masq.as_ref() {
            Some(m) => self.masquerade(snap, p, m),
            None => Err(DropReason::NotForUs),
        }
    }

    /// A packet that found no flow here and cannot open one: the next worker to look in,
    /// unless every worker has looked (then it has no flow).
    fn probe_next(&self, snap: &Snapshot) -> Option<Step> {
        let n = snap.workers.max(1);
        (u16::from(self.hops) + 1 < n).then(|| Step::Verdict(Verdict::Probe((self.worker + 1) % n)))
    }

    /// The home of an inside endpoint whose port is `port`, when it is another worker and
    /// the frame has not been handed on yet: its packets go there (see the module doc).
    /// A frame that was handed on is served here, with this worker's own ports, so two
    /// snapshots that disagree cannot bounce it.
    fn go_home(&self, snap: &Snapshot, range: PortRange, port: u16) -> Option<Step> {
        let home = port_owner(range.preferred(port), snap.workers);
        (home != self.worker && self.hops == 0).then_some(Step::Verdict(Verdict::ToWorker(home)))
    }

    /// A packet to the egress address's port P with no flow: open a flow
    /// for the inside endpoint holding P, the remote seen as it is. Either the receiving
    /// side of a hairpin (`hairpin`: the packet was turned around, egress:Px → egress:P;
    /// RFC 4787 §6: the pod sees the sender's outside endpoint, and its answers turn
    /// around the same way), or an unsolicited packet under endpoint-independent
    /// filtering (RFC 4787 §5).
    fn open_inbound(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        hairpin: bool,
    ) -> Result<Step, DropReason> {
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
        let to_y = self.hop(snap, y.inside)?;
        let around = match hairpin {
            true => loop_hop(snap, p)?,
            false => self.hop(snap, k.src)?,
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
            snap,
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
        snap: &Snapshot,
        key: &MapKey,
        range: PortRange,
        free: impl Fn(&FlowTable, u16) -> bool,
    ) -> Result<u16, DropReason> {
        if let Some(port) = self.mappings.port(key).filter(|&p| free(&self.flows, p)) {
            return Ok(port);
        }
        self.salt = self.salt.wrapping_add(0x9E37_79B9);
        let (flows, maps) = (&self.flows, &self.mappings);
        let cands = || range.candidates(key.port, self.worker, snap.workers, self.salt);
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
    fn still_valid(&mut self, snap: &Snapshot, slot: u32, dir: Dir, p: &Parsed) -> bool {
        let now = self.now;
        let Some(f) = self.flows.get_mut(slot) else {
            return false;
        };
        let idle = now.saturating_sub(f.last_seen) > timeout(&snap.timeouts, f);
        let reused = !idle
            && dir == Dir::Forward
            && p.key.proto == PROTO_TCP
            && matches!(f.state, FlowState::Fin | FlowState::Rst);
        if reused && !p.flags.is_opening_syn() {
            return p
                .seq
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
            self.remove_flow(snap, slot);
            self.counters.flows_expired += 1;
            return false;
        }
        true
    }

    /// A packet of an existing flow: revalidate the flow if the snapshot changed, track
    /// TCP state, and take the direction's action.
    fn forward(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        slot: u32,
        dir: Dir,
    ) -> Result<Step, DropReason> {
        let f = self.flows.get(slot).ok_or(DropReason::NoFlow)?;
        if f.generation != snap.generation {
            if let Some(outcome) = self.revalidate(snap, slot)? {
                return self.end_removed(snap, p, slot, dir, outcome);
            }
        }
        let now = self.now;
        let f = self.flows.get_mut(slot).ok_or(DropReason::NoFlow)?;
        let mtu = f.rewrite[dir as usize].mtu;
        let one_way = f.one_way();
        if p.df && p.ip_len() > usize::from(mtu) {
            return self.too_big(snap, p, mtu, one_way);
        }
        if p.key.proto == PROTO_TCP {
            let fl = p.flags;
            // The handshake in TCP's order (see FlowState): the server's SYN+ACK, then
            // the client's ACK. Any reply alone proves nothing (a backend answers
            // spoofed SYNs too). A DSR flow never sees the server: the client's ACK of
            // the SYN+ACK it got completes it.
            let answered =
                f.state == FlowState::SynRecv || (one_way && f.state == FlowState::SynSent);
            let completes = answered && dir == Dir::Forward && fl.ack() && !fl.syn();
            // A DSR flow taken up mid-stream: the client's second segment.
            let resumed = one_way && f.state == FlowState::Established && f.packets[0] > 0;
            f.assured |= completes || resumed;
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
                    Dir::Forward => p.seq,
                    Dir::Reverse => p.ack,
                };
            }
        } else if dir == Dir::Reverse || (one_way && f.packets[0] > 0) {
            // A UDP or ICMP answer: the far end is real. (A DSR flow sees no answer: its
            // client's second datagram is the best sign that it is real.)
            f.assured = true;
        }
        f.last_seen = now;
        f.packets[dir as usize] = f.packets[dir as usize].saturating_add(1);
        let rw = f.rewrite[dir as usize];
        let around = f.hairpin && dir == Dir::Forward;
        let acct = f.acct;
        self.accounts.add(acct, dir as usize, 1, p.ip_len() as u64);
        self.fast_sync(snap, slot);
        self.last_flow = Some((slot, dir));
        Ok(Step::Nat { rw, around })
    }

    /// Bring a flow up to the current snapshot: refresh next hops if they changed, or
    /// say how the flow ends when its backend is gone (`Some`). Addresses and ports never
    /// change mid-flow (a masqueraded flow keeps its translation across policy changes).
    fn revalidate(&mut self, snap: &Snapshot, slot: u32) -> Result<Option<OnRemove>, DropReason> {
        let Some(f) = self.flows.get_mut(slot) else {
            return Err(DropReason::NoFlow);
        };
        if let Some(outcome) = removal(snap, f) {
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
        if let (false, Ok(h)) = (f.one_way(), snap.net.next_hop(f.keys[0].src)) {
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
        snap: &Snapshot,
        p: &Parsed,
        slot: u32,
        dir: Dir,
        outcome: OnRemove,
    ) -> Result<Step, DropReason> {
        let Some(f) = self.flows.get(slot).copied() else {
            return Err(DropReason::NoFlow);
        };
        self.remove_flow(snap, slot);
        let fk = f.frontend();
        if p.key.proto == PROTO_UDP && dir == Dir::Forward && snap.services.contains_key(&fk) {
            return self.new_flow(snap, p, fk);
        }
        if outcome == OnRemove::Drop || p.key.proto != PROTO_TCP || p.flags.rst() {
            return Err(DropReason::BackendRemoved);
        }
        self.counters.drop(DropReason::BackendRemoved);
        // The reset travels the flow's reverse way, to the client's current next hop (a
        // DSR flow has no reverse action: the reset comes from the VIP all the same).
        let k = f.keys[0];
        let mut rw = match f.one_way() {
            false => f.rewrite[Dir::Reverse as usize],
            true => Rewrite {
                src: k.dst,
                dst: k.src,
                sport: k.dport,
                dport: k.sport,
                ..Rewrite::default()
            },
        };
        if let Ok(h) = snap.net.next_hop(rw.dst) {
            set_hop(&mut rw, h);
        }
        Ok(Step::Reset { rw, dir })
    }

    fn hop(&mut self, snap: &Snapshot, dst: [u8; 4]) -> Result<NextHop, DropReason> {
        match snap.net.next_hop(dst) {
            Ok(h) => Ok(h),
            Err(NextHopError::Unresolved { addr, .. }) => {
                self.events.resolve(addr);
                Err(DropReason::NoNeighbour)
            }
            Err(NextHopError::NoRoute | NextHopError::ForeignInterface) => Err(DropReason::NoRoute),
        }
    }

    fn new_flow(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        fk: FrontendKey,
    ) -> Result<Step, DropReason> {
        let k = p.key;
        let svc = snap.services.get(&fk).ok_or(DropReason::NotForUs)?;
        let opts = svc.spec.options;
        let dsr = Proto::from_number(k.proto).and_then(|pr| opts.mode.dsr(pr));
        // A DSR flow takes no NAT port: it lives where its client's packets arrive.
        let nat = match dsr {
            Some(_) => None,
            None => Some(snap.snat.pick(k.src).ok_or(DropReason::NotForUs)?),
        };
        let sticky = match (opts.affinity, opts.affinity_timeout_s) {
            (Affinity::ClientIp, Some(t)) => Some(u64::from(t) * SEC),
            _ => None,
        };
        // A client with a remembered backend opens its flows on its affinity home, any
        // other inside endpoint on its port's home.
        let home = match (sticky, nat) {
            (Some(_), _) => self.affinity_home(snap, k.src),
            (None, Some(nat)) => self.go_home(snap, nat.ports, k.sport),
            (None, None) => None,
        };
        if let Some(v) = home {
            return Ok(v);
        }
        // Only a SYN opens a SNAT TCP flow: a mid-stream segment would reach the backend
        // from a new SNAT port, which the backend can only reset. A DSR segment reaches
        // the backend unchanged, so one whose flow is gone (lbd restarted, the flow
        // expired) is taken up again: Maglev gives it the same backend while the backend
        // set is unchanged.
        if k.proto == PROTO_TCP && !p.flags.is_opening_syn() && dsr.is_none() {
            return self.probe_next(snap).ok_or(DropReason::NoFlow);
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
        let (Some(nat), None) = (nat, dsr) else {
            let dsr = dsr.ok_or(DropReason::NotForUs)?;
            let step = self.open_dsr(snap, p, &backend, dsr, h, opts.gue_port)?;
            if let Some(t) = sticky {
                self.remember(ak, &backend, now.saturating_add(t));
            }
            return Ok(step);
        };
        let hops = (self.hop(snap, baddr)?, self.hop(snap, k.src)?);
        let to = Translation {
            outside: nat.addr,
            range: nat.ports,
            remote: (baddr, backend.port),
            hops,
            kind: FlowKind::Lb,
            hairpin: false,
        };
        let step = self.open_translated(snap, p, to)?;
        if let Some(t) = sticky {
            self.remember(ak, &backend, now.saturating_add(t));
        }
        Ok(step)
    }

    /// Open a DSR flow to `backend`: one direction, no NAT port. The packet keeps the
    /// VIP and goes to the backend's MAC (L2), or inside an outer IPv4 header from the
    /// encapsulation source to the backend (IPIP, GUE; GUE's UDP source port from the
    /// flow hash `h`, so a backend's NIC spreads flows over its queues). The flow's MTU
    /// is the link's less the encapsulation: a larger DF packet draws "fragmentation
    /// needed" with it.
    fn open_dsr(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        backend: &BackendSpec,
        dsr: Dsr,
        h: u64,
        gue_port: Option<u16>,
    ) -> Result<Step, DropReason> {
        let k = p.key;
        let baddr = backend.addr.octets();
        let hop = self.hop(snap, baddr)?;
        let fwd = match dsr {
            Dsr::L2 => Forwarding::L2Dsr,
            Dsr::Ipip => Forwarding::Ipip,
            Dsr::Gue => Forwarding::Gue,
        };
        let src = match fwd {
            Forwarding::L2Dsr => k.src,
            _ => snap
                .snat
                .encap_source
                .or_else(|| snap.net.ifaces.get(usize::from(hop.iface))?.addr)
                .ok_or(DropReason::NoRoute)?,
        };
        let (sport, dport) = match fwd {
            Forwarding::Gue => (
                GUE_SPORT_BASE | (h as u16 & 0x3fff),
                gue_port.unwrap_or(DEFAULT_GUE_PORT),
            ),
            _ => (k.sport, backend.port),
        };
        let rw = Rewrite {
            src,
            dst: baddr,
            sport,
            dport,
            src_mac: hop.src_mac,
            dst_mac: hop.dst_mac,
            iface: hop.iface,
            mtu: hop.mtu.saturating_sub(fwd.overhead() as u16),
            fwd,
            ..Rewrite::default()
        };
        let step = self.open_flow(snap, p, [k, k], [rw, rw], FlowKind::Lb, false, Dir::Forward)?;
        // The flow opened (a packet too big for it opens none: it draws frag-needed).
        let Some((slot, _)) = self.last_flow else {
            return Ok(step);
        };
        self.counters.dsr_flows += 1;
        // Taken up mid-stream (see `new_flow`): in the state its segment says, assured
        // by the client's next one (see `forward`).
        let fl = p.flags;
        if k.proto == PROTO_TCP && !fl.is_opening_syn() {
            if let Some(f) = self.flows.get_mut(slot) {
                f.state = if fl.rst() {
                    FlowState::Rst
                } else if fl.fin() {
                    FlowState::Fin
                } else {
                    FlowState::Established
                };
                f.fwd_seq = p.seq;
            }
        }
        Ok(step)
    }

    /// The affinity home of `client` (see `affinity`), when it is another worker and the
    /// frame has not been handed on yet.
    fn affinity_home(&self, snap: &Snapshot, client: [u8; 4]) -> Option<Step> {
        let n = u64::from(snap.workers.max(1));
        let home = (flow_hash(snap.hash_seed, client, [0; 4], 0, 0, 0) % n) as u16;
        (home != self.worker && self.hops == 0).then_some(Step::Verdict(Verdict::ToWorker(home)))
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

    /// Bring the flow's fast-path entries in line with it: installed (again, after a
    /// revalidation) while it qualifies, removed when it stops qualifying. A flow
    /// qualifies when both ends proved real and nothing about its packets needs a
    /// worker: a TCP connection established by its handshake (the worker still sees every
    /// SYN, FIN and RST), a UDP flow or an ICMP echo with an answer; not hairpinned,
    /// kept or ended. It is installed only when both its egress interfaces take
    /// redirected frames (`IfaceInfo::redirect`); the decision is made once per
    /// snapshot generation (`Flow::fast_gen`), so a flow that cannot be installed costs
    /// nothing per packet.
    pub(super) fn fast_sync(&mut self, snap: &Snapshot, slot: u32) {
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
                // UDP, ICMP echo (an ICMP flow is an echo; errors have no flow).
                _ => true,
            };
        if qualifies && f.fast_gen != f.generation {
            let entry = |dir: usize| {
                let rw = &f.rewrite[dir];
                let ifindex = snap
                    .net
                    .ifaces
                    .get(usize::from(rw.iface))
                    .filter(|i| i.redirect)
                    .map(|i| i.ifindex);
                (
                    f.keys[dir].flowrec(),
                    flowrec::FlowEntry {
                        generation: f.generation,
                        last_seen: 0,
                        packets: 0,
                        bytes: 0,
                        worker: u32::from(self.worker),
                        slot,
                        action: super::execute::action(rw, ifindex.unwrap_or(0)),
                    },
                )
            };
            // A DSR flow has one direction (its second entry repeats the first and is
            // not installed).
            let n = f.directions() as u8;
            let entries = [entry(0), entry(1)];
            if entries
                .iter()
                .take(n.into())
                .all(|(_, e)| e.action.ifindex != 0)
            {
                self.events.push(Event::FastInstall(entries, n));
                f.fast = true;
            } else if f.fast {
                // Installed under an older snapshot, out of an interface that no longer
                // takes redirects: the worker forwards it from now on.
                self.events.push(super::fast_remove(f));
                f.fast = false;
            }
            f.fast_gen = f.generation;
        } else if !qualifies && f.fast {
            self.events.push(super::fast_remove(f));
            f.fast = false;
            // It may qualify again (a reopened connection): decide again then.
            f.fast_gen = 0;
        }
    }

    /// Insert a new flow under both keys, count it, and take its first packet (which
    /// travels in direction `first`).
    #[allow(clippy::too_many_arguments)]
    fn open_flow(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        keys: [FlowKey; 2],
        rewrite: [Rewrite; 2],
        kind: FlowKind,
        hairpin: bool,
        first: Dir,
    ) -> Result<Step, DropReason> {
        let mut flow = Flow {
            keys,
            rewrite,
            state: match keys[0].proto {
                PROTO_TCP => FlowState::SynSent,
                PROTO_UDP => FlowState::Udp,
                _ => FlowState::Icmp,
            },
            last_seen: self.now,
            generation: snap.generation,
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
            acct: super::NO_ACCOUNT,
        };
        let mtu = rewrite[first as usize].mtu;
        if p.df && p.ip_len() > usize::from(mtu) {
            return self.too_big(snap, p, mtu, flow.one_way());
        }
        self.make_room(snap)?;
        let key = super::map_key(&flow);
        let fresh = self.mappings.port(&key).is_none();
        // A DSR flow holds no NAT port.
        flow.mapped = !flow.one_way() && self.mappings.acquire(key, rewrite[0].sport);
        let Ok(slot) = self.flows.insert(flow) else {
            if flow.mapped {
                self.mappings.release(&key);
            }
            return Err(DropReason::FlowTableFull);
        };
        if flow.mapped && fresh {
            super::count_use(&mut self.pool_use, snap, key.outside, true);
        }
        if kind == FlowKind::Lb {
            let acct = self.accounts.open(&flow);
            self.accounts
                .add(acct, first as usize, 1, p.ip_len() as u64);
            if let Some(f) = self.flows.get_mut(slot) {
                f.acct = acct;
            }
        }
        self.last_flow = Some((slot, first));
        self.counters.flows_created += 1;
        Ok(Step::Nat {
            rw: rewrite[first as usize],
            around: hairpin && first == Dir::Forward,
        })
    }

    /// Room for one more flow: when the table is full, evict the least recently seen
    /// flow that is idle-expired or not assured among [`EVICT_SCAN`] slots (conntrack's
    /// early drop), so a flood of spoofed SYNs or one-way datagrams cannot lock new
    /// clients out; flows that proved both ends real are never evicted.
    fn make_room(&mut self, snap: &Snapshot) -> Result<(), DropReason> {
        if self.flows.len() < self.flows.capacity() {
            return Ok(());
        }
        let (now, t) = (self.now, snap.timeouts);
        let idle = |f: &Flow| now.saturating_sub(f.last_seen) > timeout(&t, f);
        let f = self
            .flows
            .evict_oldest(EVICT_SCAN, |f| !f.assured || idle(f))
            .ok_or(DropReason::FlowTableFull)?;
        if idle(&f) {
            self.counters.flows_expired += 1;
        } else {
            self.counters.flows_evicted += 1;
        }
        self.forget(snap, &f);
        Ok(())
    }

    /// A packet with no flow and no service: masquerade it, route it untranslated, or
    /// refuse it, as the policy says.
    fn masquerade(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        m: &MasqState,
    ) -> Result<Step, DropReason> {
        let k = p.key;
        // To another inside host's outside endpoint (see `decide`).
        let hairpin = m.rules.is_egress(k.dst.into())
            && k.proto != PROTO_ICMP
            && snap.snat.ports.contains(k.dport);
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
            if let Some(v) = self.go_home(snap, snap.snat.ports, k.sport) {
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
                    if let Some(v) = self.probe_next(snap) {
                        return Ok(v);
                    }
                    // A connection the previous policy left to the kernel unmasqueraded
                    // continues that way; any other mid-stream segment has lost its flow.
                    let was_kept = m
                        .previous
                        .as_ref()
                        .is_some_and(|prev| prev.non_masquerade(k.dst.into()).is_some());
                    if was_kept {
                        return self.route(snap, p);
                    }
                    return Err(DropReason::NoFlow);
                }
                self.new_masq_flow(snap, p, to.octets(), hairpin)
            }
            // The node's own addresses and multicast are the kernel's (the XDP program
            // passes them; this is defensive).
            nat::Decision::Node {
                kind: nat::NodeRule::ThisNode | nat::NodeRule::Multicast,
                ..
            } => Err(DropReason::NotForUs),
            // Only while the XDP maps catch up with a policy change, or for a kept
            // 5-tuple whose flow has ended: do what the kernel would have done.
            nat::Decision::KeepSource { .. } | nat::Decision::Node { .. } => self.route(snap, p),
        }
    }

    fn new_masq_flow(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        egress: [u8; 4],
        hairpin: bool,
    ) -> Result<Step, DropReason> {
        let k = p.key;
        let fwd_hop = match hairpin {
            true => loop_hop(snap, p)?,
            false => self.hop(snap, k.dst)?,
        };
        let rev_hop = self.hop(snap, k.src)?;
        let to = Translation {
            outside: egress,
            range: snap.snat.ports,
            remote: (k.dst, k.dport),
            hops: (fwd_hop, rev_hop),
            kind: FlowKind::Masq,
            hairpin,
        };
        self.open_translated(snap, p, to)
    }

    /// Open a translated flow for `p`'s inside endpoint: out from `to.outside` and a
    /// port of `to.range` (the endpoint's mapping, see `map_port`) to `to.remote`;
    /// answers go back to the endpoint from where it sent them. The reply key of a
    /// candidate port is `remote → outside:port`; for an echo request `(id, 0)` that is
    /// `(0, id')`, the same formula, because its "destination port" is 0.
    fn open_translated(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        to: Translation,
    ) -> Result<Step, DropReason> {
        let k = p.key;
        let (raddr, rport) = to.remote;
        let reply = |port: u16| FlowKey {
            src: raddr,
            dst: to.outside,
            sport: rport,
            dport: port,
            proto: k.proto,
        };
        let mk = MapKey {
            inside: k.src,
            port: k.sport,
            proto: k.proto,
            outside: to.outside,
        };
        let port = match self.map_port(snap, &mk, to.range, |f, port| !f.contains_key(&reply(port)))
        {
            Ok(port) => port,
            Err(r) => {
                if let Some(n) = snap
                    .nat_position(to.outside)
                    .and_then(|i| self.pool_failures.get_mut(i))
                {
                    *n += 1;
                }
                return self.refuse(snap, p, r);
            }
        };
        let rev_key = reply(port);
        let fwd = rewrite(&k, to.outside, raddr, port, rport, to.hops.0);
        let rev = rewrite(&rev_key, k.dst, k.src, k.dport, k.sport, to.hops.1);
        self.open_flow(
            snap,
            p,
            [k, rev_key],
            [fwd, rev],
            to.kind,
            to.hairpin,
            Dir::Forward,
        )
    }

    /// Forward untranslated, as a router: next hop from the routing table, TTL − 1.
    fn route(&mut self, snap: &Snapshot, p: &Parsed) -> Result<Step, DropReason> {
        let hop = self.hop(snap, p.key.dst)?;
        if p.df && p.ip_len() > usize::from(hop.mtu) {
            return self.too_big(snap, p, hop.mtu, false);
        }
        self.counters.routed += 1;
        Ok(Step::Route(hop))
    }

    /// A later fragment (no ports): translated like its datagram's first fragment was,
    /// or handed to the worker that got the first fragment.
    fn later_fragment(&mut self, p: &Parsed, k: FragKey) -> Result<Step, DropReason> {
        let (target, seen) = *self.frags.get(&k).ok_or(DropReason::Fragment)?;
        if self.now.saturating_sub(seen) > FRAG_TIMEOUT_NS {
            return Err(DropReason::Fragment);
        }
        let (slot, dir) = match target {
            FragTarget::Worker(w) if w != self.worker => {
                return Ok(Step::Verdict(Verdict::ToWorker(w)))
            }
            FragTarget::Worker(_) => return Err(DropReason::Fragment),
            FragTarget::Held => return Err(DropReason::NoNeighbour),
            FragTarget::Flow(slot, dir) => (slot, dir),
        };
        let f = self.flows.get(slot).ok_or(DropReason::Fragment)?;
        let fk = &f.keys[dir as usize];
        // The slot may hold another flow by now.
        if fk.src != p.key.src || fk.dst != p.key.dst || fk.proto != p.key.proto || f.hairpin {
            return Err(DropReason::Fragment);
        }
        Ok(Step::Fragment(f.rewrite[dir as usize]))
    }

    /// A DF packet larger than its egress link's `mtu`: ICMP fragmentation needed back
    /// to its sender with that MTU (RFC 1191, RFC 4787 REQ-13). (Without DF the packet
    /// is translated and cut into fragments by execute.) A DSR flow's (`from_vip`) comes
    /// from the VIP the client sent to, with the MTU left inside the encapsulation.
    fn too_big(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        mtu: u16,
        from_vip: bool,
    ) -> Result<Step, DropReason> {
        let from = from_vip.then_some(p.key.dst);
        self.unreachable(snap, p, icmp::FRAG_NEEDED, mtu, DropReason::TooBig, from)
    }

    /// No NAT port for a new flow: counted, and ICMP communication administratively
    /// prohibited back to its sender (RFC 5508 REQ-8). Not for ICMP errors.
    fn refuse(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        reason: DropReason,
    ) -> Result<Step, DropReason> {
        let step = self.unreachable(snap, p, ADMIN_PROHIBITED, 0, reason, None)?;
        self.counters.drop(reason);
        Ok(step)
    }

    /// An ICMP destination unreachable (code `code`, next-hop MTU `mtu`) back to the
    /// sender, from `from`, else from the address of the interface the packet came in
    /// on: `reason` when the rate limit or a missing address prevents it; `Hold` (via
    /// NoNeighbour) while the way back is being resolved.
    fn unreachable(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        code: u8,
        mtu: u16,
        reason: DropReason,
        from: Option<[u8; 4]>,
    ) -> Result<Step, DropReason> {
        let from = from
            .or_else(|| {
                snap.net
                    .ifaces
                    .iter()
                    .find(|i| p.dst_mac == i.mac)
                    .and_then(|i| i.addr)
            })
            .ok_or(reason)?;
        if self.icmp_tokens == 0 {
            return Err(reason);
        }
        let back = self.hop(snap, p.key.src)?;
        self.icmp_tokens -= 1;
        Ok(Step::Unreachable {
            back,
            from,
            code,
            mtu,
        })
    }

    /// An ICMP error quoting a packet of one of our flows. The quoted packet went out
    /// translated, so its 5-tuple reversed is the key of the direction this error
    /// travels; that direction's action gives the new outer destination (and the new
    /// outer source when the error comes from the flow's far end itself).
    fn icmp_error(
        &mut self,
        snap: &Snapshot,
        p: &Parsed,
        inner: FlowKey,
    ) -> Result<Step, DropReason> {
        let rk = FlowKey {
            src: inner.dst,
            dst: inner.src,
            sport: inner.dport,
            dport: inner.sport,
            proto: inner.proto,
        };
        let Some((slot, dir)) = self.flows.lookup(&rk) else {
            return match nat_port_owner(snap, rk.dst, rk.dport) {
                Some(owner) if owner != self.worker => Ok(Step::Verdict(Verdict::ToWorker(owner))),
                Some(_) => Err(DropReason::NoFlow),
                None => self.probe_next(snap).ok_or(DropReason::NoFlow),
            };
        };
        let stale = self
            .flows
            .get(slot)
            .is_some_and(|f| f.generation != snap.generation);
        // An error about a flow whose backend is gone ends the flow, unanswered.
        if stale && self.revalidate(snap, slot)?.is_some() {
            self.remove_flow(snap, slot);
            return Err(DropReason::BackendRemoved);
        }
        let rw = self
            .flows
            .get(slot)
            .map(|f| f.rewrite[dir as usize])
            .ok_or(DropReason::NoFlow)?;
        let src = if p.key.src == rk.src {
            rw.src
        } else {
            p.key.src
        };
        self.counters.icmp_errors += 1;
        Ok(Step::Error { rw, src })
    }
}

/// What a router checks before it forwards a packet, for packets that would open a
/// flow (the XDP program checks the same before steering; this is the second line,
/// and it keeps them out of the flow table): the frame is addressed to one of our
/// interfaces, and its source is not martian (RFC 1812 §5.3.7, as the kernel's
/// `ip_route_input_slow` rules) nor one of our VIPs.
fn check_new(snap: &Snapshot, p: &Parsed) -> Result<(), DropReason> {
    if !snap.net.ifaces.iter().any(|i| p.dst_mac == i.mac) {
        return Err(DropReason::ForeignMac);
    }
    if is_martian(p.key.src) || snap.vips.contains(&p.key.src) {
        return Err(DropReason::MartianSource);
    }
    Ok(())
}

/// The worker owning `port` when `addr:port` is one of our NAT endpoints (a SNAT
/// pool address or the egress address, inside its port range).
fn nat_port_owner(snap: &Snapshot, addr: [u8; 4], port: u16) -> Option<u16> {
    let snat = &snap.snat;
    let range = snat.range_of(addr).or_else(|| {
        snap.masq
            .as_ref()
            .filter(|m| m.rules.is_egress(addr.into()))
            .map(|_| snat.ports)
    })?;
    range.contains(port).then(|| port_owner(port, snap.workers))
}

/// Whether `addr` is the masquerading (egress) address.
fn is_egress(snap: &Snapshot, addr: [u8; 4]) -> bool {
    snap.masq
        .as_ref()
        .is_some_and(|m| m.rules.is_egress(addr.into()))
}

/// The next hop of a hairpinned direction: the packet never leaves, it is turned
/// around inside xlb, so it keeps a MAC of the interface it came in on (frames are
/// only taken when addressed to one of ours).
fn loop_hop(snap: &Snapshot, p: &Parsed) -> Result<NextHop, DropReason> {
    let (i, f) = snap
        .net
        .ifaces
        .iter()
        .enumerate()
        .find(|(_, i)| p.dst_mac == i.mac)
        .ok_or(DropReason::ForeignMac)?;
    Ok(NextHop {
        iface: i as u8,
        src_mac: f.mac,
        dst_mac: f.mac,
        mtu: f.mtu,
    })
}

/// A source address no router accepts: "this network" (0/8), loopback (127/8),
/// multicast (224/4) and the reserved 240/4 with the limited broadcast (RFC 1812
/// §5.3.7, RFC 6890). The XDP program's `martian()` (xdp/bpf/xlb.bpf.c) applies the same
/// rule; the fixture rows "source …" check both.
fn is_martian(a: [u8; 4]) -> bool {
    a[0] == 0 || a[0] == 127 || a[0] >= 224
}
