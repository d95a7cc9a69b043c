//! "Why did this packet go there": what the engine would do with a packet's 5-tuple
//! under a snapshot, and why, in the order the engine decides — a frontend (the
//! service, its mode, the Maglev slot and backend, the SNAT address and the port it
//! tries first), else the masquerading policy (the egress address, or the rule that
//! keeps the source), else the kernel's. Pure: the same functions the pipeline uses
//! (`flow_hash`, `Maglev::lookup`, `SnatConfig::pick`, `PortRange::preferred`,
//! `Masquerade::decide`, `NetView::next_hop`). lbd adds whether a worker already holds
//! the flow, which then decides instead.

use crate::flow::FlowKey;
use crate::hash::flow_hash;
use crate::netview::NextHopError;
use crate::service::{Affinity, Proto};
use crate::snapshot::{FrontendKey, Snapshot};
use std::net::Ipv4Addr;

/// What xlb would do with a packet, and why (also the wire form of `lbctl explain`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Explained {
    /// The XDP program sends it to a worker (else the kernel has it).
    pub steered: bool,
    /// The service it reaches (`VIP:PORT/PROTO`) and its mode.
    pub service: Option<String>,
    pub mode: Option<String>,
    /// The Maglev slot its hash falls in, and the backend there (`IP:PORT`).
    pub slot: Option<usize>,
    pub backend: Option<String>,
    /// Its source as it leaves (`ADDR:PORT`, the port the worker tries first), or why
    /// the source is kept.
    pub translation: Option<String>,
    /// Where it leaves: interface and next hop's MAC, or why it cannot.
    pub next_hop: Option<String>,
    /// The reasoning, one step a line.
    pub steps: Vec<String>,
}

fn hop(snap: &Snapshot, dst: [u8; 4]) -> String {
    match snap.net.next_hop(dst) {
        Ok(h) => {
            let iface = snap
                .net
                .ifaces
                .get(usize::from(h.iface))
                .map_or("?", |i| i.name.as_str());
            let m = h.dst_mac;
            format!(
                "{iface} to {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} (MTU {})",
                m[0], m[1], m[2], m[3], m[4], m[5], h.mtu
            )
        }
        Err(NextHopError::Unresolved { ifindex, addr }) => {
            let iface = snap
                .net
                .ifaces
                .iter()
                .find(|i| i.ifindex == ifindex)
                .map_or("?", |i| i.name.as_str());
            format!(
                "{iface}: {}'s MAC not known yet (the worker asks the kernel and holds the packet up to 1 s)",
                Ipv4Addr::from(addr)
            )
        }
        Err(NextHopError::NoRoute) => "no route: dropped (no_route)".into(),
        Err(NextHopError::ForeignInterface) => {
            "the route leaves by an interface xlb does not serve: dropped (no_route)".into()
        }
    }
}

/// What the engine would do with a new flow of `k` under `snap`, arriving on an
/// internal interface (`internal`: where masquerade sources are looked up; `None`: any).
pub fn explain(snap: &Snapshot, k: &FlowKey, internal: Option<bool>) -> Explained {
    let mut e = Explained::default();
    let proto = Proto::from_number(k.proto);
    let fk = FrontendKey {
        addr: k.dst,
        port: k.dport,
        proto: k.proto,
    };
    if let (Some(svc), Some(pr)) = (snap.services.get(&fk), proto) {
        let spec = &svc.spec;
        e.steered = true;
        e.service = Some(spec.frontend.to_string());
        let opts = spec.options;
        e.mode = Some(opts.mode_label());
        e.steps.push(format!(
            "{} is a frontend: the XDP program steers the packet to a worker",
            spec.frontend
        ));
        let sport = match opts.affinity {
            Affinity::ClientIp => 0,
            Affinity::None => k.sport,
        };
        if opts.affinity == Affinity::ClientIp {
            e.steps
                .push("client-ip affinity: the client's port is left out of the hash".into());
        }
        let h = flow_hash(snap.hash_seed, k.src, k.dst, sport, k.dport, k.proto);
        let size = svc.maglev.size().max(1);
        let slot = (h % size as u64) as usize;
        e.slot = Some(slot);
        let Some(b) = svc.maglev.lookup(h).and_then(|i| svc.backend(i)) else {
            e.steps.push(format!(
                "Maglev slot {slot} of {size}: the service has no backend with weight: dropped (no_backend)"
            ));
            return e;
        };
        let backend = format!("{}:{}", b.addr, b.port);
        e.steps.push(format!(
            "hash {h:016x} → Maglev slot {slot} of {size} → backend {backend}"
        ));
        e.backend = Some(backend);
        match opts.mode.dsr(pr) {
            Some(d) => {
                e.translation = Some(format!(
                    "none: direct server return ({d:?}); the backend answers the client itself"
                ));
                e.steps
                    .push("direct server return: the packet keeps its addresses".into());
            }
            None => match snap.snat.pick(k.src) {
                Some(nat) => {
                    let port = nat.ports.preferred(k.sport);
                    let owner = nat::port_owner(port, snap.workers);
                    e.translation = Some(format!("{}:{port}", Ipv4Addr::from(nat.addr)));
                    e.steps.push(format!(
                        "SNAT: {}:{} leaves as {}:{port} (the port tried first; worker {owner} owns it; another of its ports if that one is taken toward this backend)",
                        Ipv4Addr::from(k.src),
                        k.sport,
                        Ipv4Addr::from(nat.addr)
                    ));
                }
                None => e.steps.push("no SNAT address: not forwarded".into()),
            },
        }
        e.next_hop = Some(hop(snap, b.addr.octets()));
        return e;
    }
    let Some(m) = snap.masq.as_ref() else {
        e.steps.push(format!(
            "{}:{} is no frontend and there is no masquerading: left to the kernel",
            Ipv4Addr::from(k.dst),
            k.dport
        ));
        return e;
    };
    if internal == Some(false) {
        e.steps.push(
            "no frontend, and masquerade sources are looked up only on internal interfaces (not the egress one): left to the kernel".into(),
        );
        return e;
    }
    let d = m.rules.decide(k.src.into(), k.dst.into());
    e.steered = d.masquerades();
    e.translation = Some(d.to_string());
    if d.masquerades() {
        let to = m.rules.egress_for(k.src.into());
        let port = snap.snat.ports.preferred(k.sport);
        e.steps.push(format!(
            "from a masquerade source, not a kept destination: the XDP program steers it to a worker, which masquerades it to {to}:{port} (the port tried first)"
        ));
        e.translation = Some(format!("{to}:{port} ({d})"));
        e.next_hop = Some(hop(snap, k.dst));
    } else {
        e.steps.push(format!(
            "{d}: the XDP program leaves it to the kernel, which routes it as it is"
        ));
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, BACKEND, CLIENT, SNAT, VIP};
    use crate::wire::build::FrameSpec;
    use crate::{Engine, Verdict};
    use std::sync::Arc;

    #[test]
    fn the_explanation_matches_what_the_engine_does() {
        let mut cfg = fixtures::config();
        cfg.workers = 1;
        let snap = Arc::new(
            Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(fixtures::net()), None)
                .expect("build"),
        );
        let k = FlowKey {
            src: CLIENT,
            dst: VIP,
            sport: 40000,
            dport: 80,
            proto: 6,
        };
        let e = explain(&snap, &k, None);
        assert!(e.steered);
        assert_eq!(e.service.as_deref(), Some("10.0.0.10:80/tcp"));
        assert_eq!(e.backend, Some(format!("{}:8080", Ipv4Addr::from(BACKEND))));
        let mut engine = Engine::new(0, 64, Arc::clone(&snap));
        engine.begin_batch(1);
        let mut f = FrameSpec {
            sport: 40000,
            dport: 80,
            ..fixtures::client_syn()
        }
        .build();
        assert!(matches!(engine.process(&mut f), Verdict::Tx { .. }));
        let sport = u16::from_be_bytes([f[34], f[35]]);
        assert_eq!(
            e.translation,
            Some(format!("{}:{sport}", Ipv4Addr::from(SNAT))),
            "{:?}",
            e.steps
        );
        assert!(e
            .next_hop
            .is_some_and(|h| h.starts_with("lb0 to 02:00:00:00:00:b2")));
        // Not a frontend, no masquerading: the kernel's.
        let other = explain(&snap, &FlowKey { dport: 81, ..k }, Some(true));
        assert!(!other.steered && other.backend.is_none());
    }
}
