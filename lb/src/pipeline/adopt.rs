//! Adoption: taking over the flows a previous lbd left executing in the XDP fast path.
//!
//! The fast path's flow map outlives lbd (it is pinned): while lbd is down, the flows
//! installed there keep being forwarded. A restarted lbd reads the entries back and
//! turns each flow's entries (two for a translated flow, one for a DSR flow; the
//! flow-action record, `flowrec`) into a [`Flow`] of its own table again, with the NAT
//! port it holds, so that port is not given to another flow and the flow's timeout goes
//! on from when the fast path last saw it.
//!
//! An adopted flow is resolved under no snapshot (`generation` 0): its first packet at a
//! worker, or the expiry sweep, revalidates it against the current one like any flow
//! after a change, so a flow whose service or backend is gone ends as a removal says,
//! and the others get their next hops refreshed and are installed again.
//!
//! What cannot be adopted is refused with its reason ([`Unadoptable`]); the daemon
//! removes those entries.

use super::{count_use, map_key, Engine, Event};
use crate::flow::{Flow, FlowKey, FlowKind, FlowState, Forwarding, Rewrite};
use crate::snapshot::{FrontendKey, Snapshot};
use crate::wire::checksum::Delta;
use crate::wire::ipv4::{PROTO_TCP, PROTO_UDP};

/// A flow rebuilt from its fast-path entries, not yet in any table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inherited {
    pub keys: [FlowKey; 2],
    pub rewrite: [Rewrite; 2],
    pub kind: FlowKind,
    /// When the fast path last forwarded a packet of it (CLOCK_MONOTONIC ns; 0: not
    /// since it was installed).
    pub last_seen: u64,
}

/// Why fast-path entries do not make a flow this lbd can take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unadoptable {
    #[error("not an IPv4 flow")]
    Family,
    #[error("the entries do not make one flow (a direction is missing or they disagree)")]
    Unpaired,
    #[error("its egress interface (ifindex {0}) is not one lbd serves")]
    Interface(u32),
    #[error("no service or masquerading address of this configuration translates it")]
    Stale,
    #[error("the flow is already in the table")]
    Duplicate,
    #[error("the flow table is full")]
    TableFull,
}

/// The IPv4 address in a flow-action record's 16-byte field.
fn a4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

fn key_of(k: &flowrec::FlowKey) -> Result<FlowKey, Unadoptable> {
    if k.family != flowrec::FAMILY_IPV4 {
        return Err(Unadoptable::Family);
    }
    Ok(FlowKey {
        src: a4(&k.src),
        dst: a4(&k.dst),
        sport: u16::from_be_bytes(k.sport),
        dport: u16::from_be_bytes(k.dport),
        proto: k.proto,
    })
}

/// The rewrite an action was made from (`execute::action` backwards): the interface by
/// its position among the snapshot's.
fn rewrite_of(snap: &Snapshot, a: &flowrec::Action) -> Result<Rewrite, Unadoptable> {
    if a.family != flowrec::FAMILY_IPV4 {
        return Err(Unadoptable::Family);
    }
    let fwd = match a.kind {
        k if k == flowrec::ActionKind::Nat as u8 => Forwarding::Nat,
        k if k == flowrec::ActionKind::L2Dsr as u8 => Forwarding::L2Dsr,
        k if k == flowrec::ActionKind::Ipip as u8 => Forwarding::Ipip,
        k if k == flowrec::ActionKind::Gue as u8 => Forwarding::Gue,
        _ => return Err(Unadoptable::Unpaired),
    };
    let iface = snap
        .net
        .ifaces
        .iter()
        .position(|i| i.ifindex == a.ifindex)
        .and_then(|i| u8::try_from(i).ok())
        .ok_or(Unadoptable::Interface(a.ifindex))?;
    Ok(Rewrite {
        src: a4(&a.src),
        dst: a4(&a.dst),
        sport: u16::from_be_bytes(a.sport),
        dport: u16::from_be_bytes(a.dport),
        src_mac: a.src_mac,
        dst_mac: a.dst_mac,
        iface,
        mtu: a.mtu,
        ip_delta: Delta(a.ip_delta),
        l4_delta: Delta(a.l4_delta),
        fwd,
    })
}

/// The key of the direction coming back to a translated flow's outside address.
fn reply_key(k: &FlowKey, rw: &Rewrite) -> FlowKey {
    FlowKey {
        src: rw.dst,
        dst: rw.src,
        sport: rw.dport,
        dport: rw.sport,
        proto: k.proto,
    }
}

/// What a translated flow is under `snap`, with `fwd` its first direction: load
/// balanced (its client sent to a frontend, it leaves from a SNAT pool address) or
/// masqueraded (it leaves from an egress address, a port of the masquerading range).
fn translated_kind(snap: &Snapshot, fwd: &FlowKey, rw: &Rewrite) -> Option<FlowKind> {
    let fk = FrontendKey {
        addr: fwd.dst,
        port: fwd.dport,
        proto: fwd.proto,
    };
    if snap.services.contains_key(&fk) && snap.snat.pool.iter().any(|p| p.addr == rw.src) {
        return Some(FlowKind::Lb);
    }
    let masq = snap.masq.as_ref()?;
    (masq.rules.is_egress(rw.src.into()) && snap.snat.ports.contains(rw.sport))
        .then_some(FlowKind::Masq)
}

/// Rebuild one flow from its fast-path entries (one flow's: the daemon groups entries by
/// the worker and slot they name), as `snap` would have made it.
pub fn inherit(
    snap: &Snapshot,
    entries: &[(flowrec::FlowKey, flowrec::FlowEntry)],
) -> Result<Inherited, Unadoptable> {
    let last_seen = entries.iter().map(|(_, e)| e.last_seen).max().unwrap_or(0);
    match entries {
        [(k, e)] => {
            // Direct server return: one direction, to a frontend.
            let key = key_of(k)?;
            let rw = rewrite_of(snap, &e.action)?;
            if !rw.fwd.is_dsr() {
                return Err(Unadoptable::Unpaired);
            }
            let fk = FrontendKey {
                addr: key.dst,
                port: key.dport,
                proto: key.proto,
            };
            if !snap.services.contains_key(&fk) {
                return Err(Unadoptable::Stale);
            }
            Ok(Inherited {
                keys: [key, key],
                rewrite: [rw, rw],
                kind: FlowKind::Lb,
                last_seen,
            })
        }
        [(ka, ea), (kb, eb)] => {
            let (ka, kb) = (key_of(ka)?, key_of(kb)?);
            let (ra, rb) = (rewrite_of(snap, &ea.action)?, rewrite_of(snap, &eb.action)?);
            if ra.fwd.is_dsr() || rb.fwd.is_dsr() || ka.proto != kb.proto {
                return Err(Unadoptable::Unpaired);
            }
            // Each direction's reply key is the other's key, whichever came first.
            if reply_key(&ka, &ra) != kb || reply_key(&kb, &rb) != ka {
                return Err(Unadoptable::Unpaired);
            }
            // The forward direction is the one that leaves from an outside address.
            for (k, r, other) in [(ka, ra, (kb, rb)), (kb, rb, (ka, ra))] {
                if let Some(kind) = translated_kind(snap, &k, &r) {
                    return Ok(Inherited {
                        keys: [k, other.0],
                        rewrite: [r, other.1],
                        kind,
                        last_seen,
                    });
                }
            }
            Err(Unadoptable::Stale)
        }
        _ => Err(Unadoptable::Unpaired),
    }
}

impl Inherited {
    /// A load-balanced flow's service (where its client sent), as [`Flow::frontend`].
    pub fn frontend(&self) -> FrontendKey {
        let k = &self.keys[0];
        FrontendKey {
            addr: k.dst,
            port: k.dport,
            proto: k.proto,
        }
    }

    /// A load-balanced flow's backend, as [`Flow::backend`].
    pub fn backend(&self) -> ([u8; 4], u16) {
        match self.rewrite[0].fwd.is_dsr() {
            true => (self.rewrite[0].dst, self.keys[0].dport),
            false => (self.rewrite[0].dst, self.rewrite[0].dport),
        }
    }

    /// The worker a translated flow belongs to: its NAT port's (where its replies
    /// arrive). A DSR flow has none: it lives where its client's packets arrive.
    pub fn owner(&self, workers: u16) -> Option<u16> {
        (!self.rewrite[0].fwd.is_dsr()).then(|| nat::port_owner(self.rewrite[0].sport, workers))
    }
}

impl Engine {
    /// Take over a flow a previous lbd left in the fast path. `now`: this engine's clock
    /// (CLOCK_MONOTONIC ns, the fast path's). The flow is established and assured (only
    /// such flows are installed), counts toward its NAT mapping, and revalidates at its
    /// next packet (see the module doc); its fast-path entries stay until then.
    pub fn adopt(&mut self, f: &Inherited, now: u64) -> Result<(), Unadoptable> {
        let st = &mut self.st;
        let snap = &*self.snap;
        let one_way = f.rewrite[0].fwd.is_dsr();
        if st.flows.contains_key(&f.keys[0]) || (!one_way && st.flows.contains_key(&f.keys[1])) {
            return Err(Unadoptable::Duplicate);
        }
        if st.flows.len() >= st.flows.capacity() {
            return Err(Unadoptable::TableFull);
        }
        let mut flow = Flow {
            keys: f.keys,
            rewrite: f.rewrite,
            state: match f.keys[0].proto {
                PROTO_TCP => FlowState::Established,
                PROTO_UDP => FlowState::Udp,
                _ => FlowState::Icmp,
            },
            last_seen: match f.last_seen {
                0 => now,
                t => t.min(now),
            },
            generation: 0,
            kind: f.kind,
            kept: false,
            assured: true,
            mapped: false,
            hairpin: false,
            removed: false,
            fast: true,
            fast_gen: 0,
            fwd_seq: 0,
            packets: [0, 0],
            acct: super::NO_ACCOUNT,
        };
        let key = map_key(&flow);
        let fresh = st.mappings.port(&key).is_none();
        flow.mapped = !one_way && st.mappings.acquire(key, f.rewrite[0].sport);
        // A masqueraded flow the policy now leaves alone keeps its translation, as after
        // a policy change (see `Engine::set_snapshot`).
        if let (FlowKind::Masq, Some(m)) = (f.kind, snap.masq.as_ref()) {
            let k = f.keys[0];
            if !m.rules.decide(k.src.into(), k.dst.into()).masquerades() {
                flow.kept = true;
                st.events.push(Event::Kept(k));
            }
        }
        if f.kind == FlowKind::Lb {
            // Its packets so far are in its fast-path entries (they count there).
            flow.acct = st.accounts.open(&flow);
        }
        if st.flows.insert(flow).is_err() {
            if flow.mapped {
                st.mappings.release(&key);
            }
            return Err(Unadoptable::TableFull);
        }
        if flow.mapped && fresh {
            count_use(&mut st.pool_use, snap, key.outside, true);
        }
        st.counters.flows_adopted += 1;
        Ok(())
    }
}
