//! Egress masquerading through the pipeline: the shared fixture table, then round trips
//! (UDP, TCP, ICMP echo), ICMP errors translated back, port reuse and exhaustion, and
//! policy changes that must not disturb established flows.

use lb::fixtures;
use lb::flow::FlowState;
use lb::masq_fixtures::{
    self as mf, answer, from_pod, icmp_error, masqueraded, EGRESS, INT_MAC, POD_A, POD_B, POD_MAC,
    PRIVATE, REMOTE, ROUTER,
};
use lb::snapshot::MasqState;
use lb::wire::build::{fragment, ip_packet, verify, FrameSpec};
use lb::wire::icmp;
use lb::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use lb::wire::TcpFlags;
use lb::{DropReason, Engine, Event, Snapshot, Verdict};
use std::sync::Arc;

const SEC: u64 = 1_000_000_000;
const TX_EXT: Verdict = Verdict::Tx { iface: 1 };
const TX_INT: Verdict = Verdict::Tx { iface: 0 };

fn engine_on(snap: Snapshot) -> Engine {
    let mut e = Engine::new(0, 1024, Arc::new(snap));
    e.begin_batch(SEC);
    e
}

fn engine() -> Engine {
    engine_on(mf::snapshot())
}

fn run(e: &mut Engine, spec: &FrameSpec) -> (Verdict, Vec<u8>) {
    let mut f = spec.build();
    let v = e.process(&mut f);
    (v, f)
}

/// What the pod receives: `spec` (as the remote sent it) with the pod's address and port
/// back, TTL − 1, on int0.
fn to_pod(spec: &FrameSpec, pod: [u8; 4], pod_port: u16) -> FrameSpec {
    FrameSpec {
        src_mac: INT_MAC,
        dst_mac: POD_MAC,
        dst: pod,
        dport: pod_port,
        ttl: spec.ttl - 1,
        ..spec.clone()
    }
}

#[test]
fn fixture_table() {
    for m in mf::fixtures() {
        fixtures::check(&mut engine(), &m.fx);
    }
}

#[test]
fn udp_round_trip_restores_the_pod_tuple() {
    let mut e = engine();
    let out = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53);
    let (v, f) = run(&mut e, &out);
    assert_eq!(v, TX_EXT);
    let sent = masqueraded(&out, mf::mapped(40000));
    assert_eq!(f, sent.build());
    let back = answer(&sent);
    let (v, f) = run(&mut e, &back);
    assert_eq!(v, TX_INT);
    assert_eq!(f, to_pod(&back, POD_A, 40000).build());
    assert_eq!(verify(&f), (true, true));
    // The flow is reused, not recreated.
    let (_, f) = run(&mut e, &out);
    assert_eq!(f, sent.build());
    assert_eq!(e.counters().flows_created, 1);
}

#[test]
fn tcp_round_trip_tracks_state() {
    let mut e = engine();
    let syn = from_pod(POD_B, REMOTE, PROTO_TCP, 40001, 443);
    let (v, _) = run(&mut e, &syn);
    assert_eq!(v, TX_EXT);
    let synack = answer(&masqueraded(&syn, mf::mapped(40001)));
    let (v, f) = run(&mut e, &synack);
    assert_eq!(v, TX_INT);
    assert_eq!(f, to_pod(&synack, POD_B, 40001).build());
    let flow = e.flows().iter().next().expect("one flow");
    assert_eq!(
        flow.state,
        FlowState::SynRecv,
        "the reply alone does not establish"
    );
    assert!(!flow.assured);
    let ack = FrameSpec {
        flags: TcpFlags::ACK,
        payload: b"GET / HTTP/1.1\r\n".to_vec(),
        ..syn.clone()
    };
    let (v, f) = run(&mut e, &ack);
    assert_eq!(v, TX_EXT);
    assert_eq!(f, masqueraded(&ack, mf::mapped(40001)).build());
    assert_eq!(verify(&f), (true, true));
    let flow = e.flows().iter().next().expect("one flow");
    assert_eq!(
        flow.state,
        FlowState::Established,
        "the pod's ACK completes it"
    );
    assert!(flow.assured);
}

#[test]
fn ping_translates_the_identifier() {
    let mut e = engine();
    let req = from_pod(POD_A, REMOTE, PROTO_ICMP, 8, 1);
    let (v, f) = run(&mut e, &req);
    assert_eq!(v, TX_EXT);
    let sent = masqueraded(&req, mf::mapped(8));
    assert_eq!(f, sent.build());
    assert_eq!(verify(&f), (true, true));
    let reply = answer(&sent);
    let (v, f) = run(&mut e, &reply);
    assert_eq!(v, TX_INT);
    let expect = FrameSpec {
        src_mac: INT_MAC,
        dst_mac: POD_MAC,
        dst: POD_A,
        sport: 8,
        ttl: reply.ttl - 1,
        ..reply.clone()
    };
    assert_eq!(f, expect.build());
    assert_eq!(verify(&f), (true, true));
    // A second pod using the same identifier gets another outside identifier.
    let (_, f) = run(&mut e, &from_pod(POD_B, REMOTE, PROTO_ICMP, 8, 1));
    let other = FrameSpec {
        src: POD_B,
        ..req.clone()
    };
    // Another identifier of worker 0's, of the same parity.
    let id = u16::from_be_bytes([f[38], f[39]]);
    assert_ne!(id, mf::mapped(8));
    assert_eq!((id & 1, nat::port_owner(id, 2)), (0, 0));
    assert_eq!(f, masqueraded(&other, id).build());
    assert_eq!(
        e.flows().iter().next().map(|f| f.state),
        Some(FlowState::Icmp)
    );
}

/// The error `from` sends about `sent` (a masqueraded frame), and what the pod must get:
/// the same error quoting the packet it sent itself.
fn error_case(
    e: &mut Engine,
    original: &FrameSpec,
    port: u16,
    from: [u8; 4],
    ty: u8,
    code: u8,
    quote: Option<usize>,
) {
    let sent = masqueraded(original, port).build();
    let mut err = icmp_error(from, EGRESS, ty, code, 1280, &sent);
    err.payload = ip_packet(&sent, quote);
    let (v, f) = run(e, &err);
    assert_eq!(v, TX_INT, "type {ty} code {code}");
    // The pod's own packet, as it was when the far side quoted it (TTL already − 1).
    let own = FrameSpec {
        ttl: original.ttl - 1,
        ..original.clone()
    }
    .build();
    let expect = FrameSpec {
        src_mac: INT_MAC,
        dst_mac: POD_MAC,
        dst: original.src,
        ttl: err.ttl - 1,
        payload: ip_packet(&own, quote),
        ..err.clone()
    };
    assert_eq!(f, expect.build(), "type {ty} code {code} quote {quote:?}");
    assert_eq!(verify(&f), (true, true));
}

#[test]
fn icmp_errors_reach_the_pod_translated() {
    let mut e = engine();
    let udp = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53);
    let tcp = FrameSpec {
        payload: vec![0x5a; 1000],
        ..from_pod(POD_B, REMOTE, PROTO_TCP, 40001, 443)
    };
    let ping = from_pod(POD_A, REMOTE, PROTO_ICMP, 9, 3);
    for (spec, port) in [
        (&udp, mf::mapped(40000)),
        (&tcp, mf::mapped(40001)),
        (&ping, mf::mapped(9)),
    ] {
        let (v, _) = run(&mut e, spec);
        assert_eq!(v, TX_EXT);
        // Time exceeded from a router on the way, quoting the whole packet.
        error_case(&mut e, spec, port, ROUTER, icmp::TIME_EXCEEDED, 0, None);
        // Fragmentation needed from the far end, quoting the header and 8 bytes.
        error_case(
            &mut e,
            spec,
            port,
            REMOTE,
            icmp::DEST_UNREACHABLE,
            icmp::FRAG_NEEDED,
            Some(28),
        );
    }
    assert_eq!(e.counters().icmp_errors, 6);
}

#[test]
fn icmp_error_without_flow_is_dropped() {
    let mut e = engine();
    let sent = masqueraded(&from_pod(POD_A, REMOTE, PROTO_UDP, 1, 2), mf::mapped(1)).build();
    let err = icmp_error(ROUTER, EGRESS, icmp::TIME_EXCEEDED, 0, 0, &sent);
    assert_eq!(run(&mut e, &err).0, Verdict::Drop(DropReason::NoFlow));
    let mut short = err.clone();
    short.payload = ip_packet(&sent, Some(24));
    assert_eq!(run(&mut e, &short).0, Verdict::Drop(DropReason::Malformed));
}

#[test]
fn ports_are_reused_per_remote_and_exhaustion_is_counted() {
    // Two workers share 61000-61007 in pairs: worker 0 owns 61000, 61001, 61004 and
    // 61005.
    let mut e = engine_on(mf::snapshot_with_ports(61000, 61007));
    // Even inside ports whose preferred ports (61000 + port mod 8) are worker 0's: the
    // even ports first, then (parity is only recommended) the odd ones.
    let mut got = Vec::new();
    for sport in [30000, 30004, 30008, 30012] {
        let (v, f) = run(&mut e, &from_pod(POD_A, REMOTE, PROTO_UDP, sport, 53));
        assert_eq!(v, TX_EXT);
        got.push(u16::from_be_bytes([f[34], f[35]]));
    }
    assert_eq!(&got[..2], &[61000, 61004]);
    got[2..].sort();
    assert_eq!(&got[2..], &[61001, 61005]);
    // No port left: counted, and the pod is told (ICMP 3/13, RFC 5508 REQ-8) from the
    // node's address on its link, quoting its datagram.
    let fifth = from_pod(POD_A, REMOTE, PROTO_UDP, 30016, 53);
    let (v, f) = run(&mut e, &fifth);
    assert_eq!(v, Verdict::Icmp { iface: 0 });
    assert_eq!(f, fifth.build(), "the datagram itself is untouched");
    let g = e.generated();
    assert_eq!((g[34], g[35]), (icmp::DEST_UNREACHABLE, 13));
    assert_eq!((&g[26..30], &g[30..34]), (&mf::NODE_INT[..], &POD_A[..]));
    assert_eq!(&g[0..6], &POD_MAC);
    assert_eq!(&g[42..], &f[14..], "quotes the datagram as sent");
    assert_eq!(verify(g), (true, true));
    // Another remote port: the mapped endpoints keep their outside ports toward it
    // (endpoint-independent mapping).
    for (i, sport) in [30000, 30004, 30008, 30012].into_iter().enumerate() {
        let (v, f) = run(&mut e, &from_pod(POD_A, REMOTE, PROTO_UDP, sport, 54));
        assert_eq!(v, TX_EXT);
        let port = u16::from_be_bytes([f[34], f[35]]);
        assert!(got.contains(&port) && (i >= 2 || port == got[i]));
    }
    assert_eq!(e.counters().drops[DropReason::PortsExhausted as usize], 1);
    // Established flows still work.
    let (v, _) = run(&mut e, &from_pod(POD_A, REMOTE, PROTO_UDP, 30000, 53));
    assert_eq!(v, TX_EXT);
    assert_eq!(e.flows().len(), 8);
}

fn with_policy(snap: &Snapshot, yaml: &str, version: u64) -> Arc<Snapshot> {
    let old = snap.masq.as_ref().expect("masquerading");
    let policy = Arc::new(nat::MasqPolicy::from_yaml(yaml).expect("valid policy"));
    Arc::new(snap.with_masq(
        snap.generation + 1,
        Some(Arc::new(MasqState {
            rules: old.rules.with_policy(policy),
            previous: Some(Arc::clone(&old.rules.policy)),
            version,
            filtering: old.filtering,
        })),
    ))
}

#[test]
fn a_new_non_masquerade_cidr_changes_new_flows_only() {
    let mut e = engine();
    let old = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53);
    assert_eq!(run(&mut e, &old).0, TX_EXT);
    let snap = with_policy(e.snapshot(), "nonMasqueradeCIDRs: [20.0.0.0/24]\n", 2);
    e.set_snapshot(Arc::clone(&snap));
    assert_eq!(
        kept(&mut e),
        vec![lb::flow::FlowKey {
            src: POD_A,
            dst: REMOTE,
            sport: 40000,
            dport: 53,
            proto: PROTO_UDP
        }]
    );
    assert!(kept(&mut e).is_empty(), "reported once");
    // The established flow keeps its translation.
    let (v, f) = run(&mut e, &old);
    assert_eq!(v, TX_EXT);
    assert_eq!(f, masqueraded(&old, mf::mapped(40000)).build());
    // A new flow to the same remote leaves with the pod's address.
    let new = from_pod(POD_A, REMOTE, PROTO_UDP, 40001, 53);
    let (v, f) = run(&mut e, &new);
    assert_eq!(v, TX_EXT);
    assert_eq!(&f[26..30], &POD_A);
    assert_eq!(e.counters().routed, 1);
    // Now PRIVATE (10.0.0.0/8) is no longer in the list: it is masqueraded.
    let (_, f) = run(&mut e, &from_pod(POD_A, PRIVATE, PROTO_UDP, 40000, 53));
    assert_eq!(&f[26..30], &EGRESS);
    // When the kept flow ends, its keep entry is released.
    e.begin_batch(SEC * 1000);
    let mut unkept = Vec::new();
    for _ in 0..64 {
        e.begin_batch(SEC * 1000);
        unkept.extend(e.take_events().filter_map(|ev| match ev {
            Event::Unkept(k) => Some(k),
            _ => None,
        }));
    }
    assert_eq!(unkept.len(), 1);
    assert_eq!(unkept[0].sport, 40000);
}

#[test]
fn connections_the_old_policy_left_alone_continue_unmasqueraded() {
    let mut e = engine();
    // 10.0.0.0/8 was non-masquerade; the new list drops it.
    let snap = with_policy(e.snapshot(), "nonMasqueradeCIDRs: [172.16.0.0/12]\n", 2);
    e.set_snapshot(snap);
    let mid = FrameSpec {
        flags: TcpFlags::ACK,
        ..from_pod(POD_A, PRIVATE, PROTO_TCP, 40000, 3306)
    };
    let (v, _) = run(&mut e, &mid);
    assert_eq!(v, Verdict::Probe(1), "another worker may own it");
    // The last worker in the chain (every worker has looked) routes it.
    let mut f = mid.build();
    let v = e.process_probe(&mut f, 1);
    assert_eq!(v, TX_EXT);
    assert_eq!(
        &f[26..30],
        &POD_A,
        "the kernel-routed connection keeps its source"
    );
    // A new connection there is masqueraded.
    let (_, f) = run(&mut e, &from_pod(POD_A, PRIVATE, PROTO_TCP, 40001, 3306));
    assert_eq!(&f[26..30], &EGRESS);
    // Elsewhere a mid-stream segment without flow is still refused.
    // (40004's home is worker 0 too: 40004 maps to 64716, a port of worker 0.)
    let lost = FrameSpec {
        flags: TcpFlags::ACK,
        ..from_pod(POD_A, REMOTE, PROTO_TCP, 40004, 443)
    };
    assert_eq!(run(&mut e, &lost).0, Verdict::Probe(1));
    let mut f = lost.build();
    assert_eq!(
        e.process_probe(&mut f, 1),
        Verdict::Drop(DropReason::NoFlow),
        "refused once every worker has looked"
    );
}

#[test]
fn load_balanced_flows_get_their_icmp_errors_too() {
    use fixtures::{BACKEND, BACKEND_MAC, CLIENT, CLIENT_MAC, LB_MAC, SNAT, VIP};
    let mut e = Engine::new(0, 64, Arc::new(fixtures::snapshot()));
    e.begin_batch(SEC);
    let q = FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src: CLIENT,
        dst: VIP,
        proto: PROTO_UDP,
        sport: 5000,
        dport: 53,
        payload: b"query".to_vec(),
        ..FrameSpec::default()
    };
    let (v, sent) = run(&mut e, &q);
    assert_eq!(v, Verdict::Tx { iface: 0 });
    let unreachable = FrameSpec {
        src_mac: BACKEND_MAC,
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        proto: PROTO_ICMP,
        icmp_type: icmp::DEST_UNREACHABLE,
        icmp_code: 3,
        sport: 0,
        dport: 0,
        payload: ip_packet(&sent, None),
        ..FrameSpec::default()
    };
    let (v, f) = run(&mut e, &unreachable);
    assert_eq!(v, Verdict::Tx { iface: 0 });
    let own = FrameSpec {
        ttl: q.ttl - 1,
        ..q.clone()
    }
    .build();
    let expect = FrameSpec {
        src_mac: LB_MAC,
        dst_mac: CLIENT_MAC,
        src: VIP,
        dst: CLIENT,
        ttl: unreachable.ttl - 1,
        payload: ip_packet(&own, None),
        ..unreachable.clone()
    };
    assert_eq!(f, expect.build());
    assert_eq!(verify(&f), (true, true));
}

/// The default timers meet the NAT RFCs' minimums, proven through the engine: an idle
/// UDP mapping still takes the remote's answer after 130 s and 300 s (RFC 4787 REQ-5:
/// at least 120 s, 300 s recommended), an ICMP query mapping after 60 s (RFC 5508
/// REQ-1), a closing TCP connection after 4 min (RFC 5382 REQ-5, transitory); and each
/// is gone once idle past its timer (the answer then has no flow).
#[test]
fn default_timers_meet_the_rfc_minimums() {
    let t = lb::Timeouts::default();
    assert!(t.tcp_established >= (2 * 3600 + 4 * 60) * SEC);
    // (protocol, idle time that must be survived, pod port whose home is worker 0)
    let cases = [
        (PROTO_UDP, 130, 40000),
        (PROTO_UDP, 300, 40001),
        (PROTO_ICMP, 60, 8),
        (PROTO_TCP, 240, 40004),
    ];
    for (proto, idle, pod_port) in cases {
        let mut e = engine();
        let out = from_pod(POD_A, REMOTE, proto, pod_port, 53);
        let (v, sent) = run(&mut e, &out);
        assert_eq!(v, TX_EXT);
        let port = u16::from_be_bytes([sent[34], sent[35]]);
        let port = if proto == PROTO_ICMP {
            u16::from_be_bytes([sent[38], sent[39]])
        } else {
            port
        };
        let mut back = answer(&masqueraded(&out, port));
        if proto == PROTO_TCP {
            // Established, then closed by the pod: the transitory (closing) timer runs.
            assert_eq!(run(&mut e, &back).0, TX_INT);
            let ack = FrameSpec {
                flags: TcpFlags::ACK,
                ..out.clone()
            };
            assert_eq!(run(&mut e, &ack).0, TX_EXT);
            let fin = FrameSpec {
                flags: TcpFlags::FIN | TcpFlags::ACK,
                ..out.clone()
            };
            assert_eq!(run(&mut e, &fin).0, TX_EXT);
            back.flags = TcpFlags::ACK;
        }
        e.begin_batch(SEC + idle * SEC);
        let (v, f) = run(&mut e, &back);
        assert_eq!(
            v, TX_INT,
            "proto {proto}: mapping alive after {idle} s idle"
        );
        let mut expect = to_pod(&back, POD_A, pod_port);
        if proto == PROTO_ICMP {
            // An echo reply carries the identifier where the builder keeps sport.
            (expect.sport, expect.dport) = (pod_port, back.dport);
        }
        assert_eq!(f, expect.build());
        // Idle past the timer (from the answer just translated): gone.
        let limit = match proto {
            PROTO_UDP => t.udp,
            PROTO_ICMP => t.icmp,
            _ => t.tcp_fin,
        };
        e.begin_batch(SEC + idle * SEC + limit + 1);
        let (v, _) = run(&mut e, &back);
        assert_eq!(
            v,
            Verdict::Drop(DropReason::NoFlow),
            "proto {proto}: mapping gone after its timer"
        );
    }
}

/// RFC 4787 REQ-1 / RFC 5382 REQ-1 and port preservation: one inside socket keeps one
/// outside port toward every remote (a STUN client's view), its own port when the range
/// holds it; a second pod with the same port gets another port toward the same remote
/// only (same parity); the mapping goes with the last flow.
#[test]
fn endpoint_independent_mapping_and_port_preservation() {
    let mut e = engine_on(mf::snapshot_with_ports(1024, 65535));
    let sport = 40000; // its home is worker 0: 40000 / 2 is even
    let other_remote = [20, 0, 0, 11];
    for (dst, dport) in [(REMOTE, 3478), (REMOTE, 3479), (other_remote, 3478)] {
        let (v, f) = run(&mut e, &from_pod(POD_A, dst, PROTO_UDP, sport, dport));
        assert_eq!(v, TX_EXT);
        assert_eq!(&f[26..30], &EGRESS);
        assert_eq!(&f[34..36], &sport.to_be_bytes(), "to {dst:?}:{dport}");
    }
    assert_eq!(e.mappings(), 1);
    // POD_B from the same port: REMOTE:3478 already sees EGRESS:40000 (POD_A's), so
    // another even port of worker 0; toward a fresh remote it keeps that mapping.
    let (_, f) = run(&mut e, &from_pod(POD_B, REMOTE, PROTO_UDP, sport, 3478));
    let b_port = u16::from_be_bytes([f[34], f[35]]);
    assert_ne!(b_port, sport);
    assert_eq!((b_port & 1, nat::port_owner(b_port, 2)), (0, 0));
    let (_, f) = run(
        &mut e,
        &from_pod(POD_B, [20, 0, 0, 12], PROTO_UDP, sport, 9),
    );
    assert_eq!(&f[34..36], &b_port.to_be_bytes());
    assert_eq!(e.mappings(), 2);
    // Replies to either mapping reach the right pod.
    let back = answer(&masqueraded(
        &from_pod(POD_B, REMOTE, PROTO_UDP, sport, 3478),
        b_port,
    ));
    let (v, f) = run(&mut e, &back);
    assert_eq!(v, TX_INT);
    assert_eq!(&f[30..34], &POD_B);
    // Everything idles out: the mappings go with their flows.
    for _ in 0..100 {
        e.begin_batch(SEC * 10_000);
    }
    assert_eq!((e.flows().len(), e.mappings()), (0, 0));
}

/// A pod's packets go to its home worker (the owner of the port it would keep) before
/// any flow is opened, so all its flows share one mapping table.
#[test]
fn a_new_flow_goes_to_its_home_worker() {
    let mut w1 = Engine::new(1, 64, Arc::new(mf::snapshot()));
    w1.begin_batch(SEC);
    let out = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53); // home: worker 0
    let mut f = out.build();
    assert_eq!(w1.process(&mut f), Verdict::ToWorker(0));
    assert_eq!(f, out.build(), "handed on untouched");
    // Handed on once already (snapshots disagreeing): served here, from its own ports.
    let (v, f) = {
        let mut f = out.build();
        (w1.process_probe(&mut f, 1), f)
    };
    assert_eq!(v, TX_EXT);
    let port = u16::from_be_bytes([f[34], f[35]]);
    assert_eq!(nat::port_owner(port, 2), 1);
}

/// A flow the policy now keeps lives at its pod's home worker: its packets arriving on
/// another worker go there, not out untranslated (the policy would route them so).
#[test]
fn a_kept_flows_packets_go_home_first() {
    let snap = mf::snapshot();
    let kept = with_policy(&snap, "nonMasqueradeCIDRs: [20.0.0.0/24]\n", 2);
    let mut w1 = Engine::new(1, 64, kept);
    w1.begin_batch(SEC);
    let out = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53); // home: worker 0
    let mut f = out.build();
    assert_eq!(w1.process(&mut f), Verdict::ToWorker(0));
    // Handed on already: the policy decides (routed with the pod's address).
    let mut f = out.build();
    assert_eq!(w1.process_probe(&mut f, 1), TX_EXT);
    assert_eq!(&f[26..30], &POD_A);
}

/// Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8): POD_B sends to the egress address at
/// POD_A's mapped port and reaches POD_A, from POD_B's own outside endpoint (§6); POD_A's
/// answer to that endpoint comes back to POD_B. On one worker, and across two (the
/// turned-around packet is handed to the owner of its destination port).
#[test]
fn hairpinning_between_two_pods() {
    for workers in [1u16, 2] {
        let mut cfg = mf::config(61000, 65535);
        cfg.workers = workers;
        let snap = Arc::new(mf::snapshot_from(&cfg));
        let mut engines: Vec<Engine> = (0..workers)
            .map(|w| {
                let mut e = Engine::new(w, 64, Arc::clone(&snap));
                e.begin_batch(SEC);
                e
            })
            .collect();
        // Run a frame through the workers as the I/O layer would (hand-offs included).
        let mut deliver = |f: &mut Vec<u8>, mut w: u16| loop {
            match engines[usize::from(w)].process(f) {
                Verdict::ToWorker(n) => w = n,
                v => return v,
            }
        };
        // POD_A talks to REMOTE from port 40000: its mapping, 61000 + 40000 mod 4536.
        let a_out = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53);
        assert_eq!(deliver(&mut a_out.build(), 0), TX_EXT);
        let a_port = mf::mapped(40000);
        // POD_B (port 40101) to EGRESS:a_port.
        let b_out = from_pod(POD_B, EGRESS, PROTO_UDP, 40101, a_port);
        let mut f = b_out.build();
        assert_eq!(deliver(&mut f, 1 % workers), TX_INT, "{workers} worker(s)");
        let b_port = mf::mapped(40101);
        // Turned around inside xlb: the TTL drops twice.
        let at_a = FrameSpec {
            src: EGRESS,
            sport: b_port,
            ttl: b_out.ttl - 2,
            ..to_pod(&b_out, POD_A, 40000)
        };
        assert_eq!(f, at_a.build(), "POD_A sees POD_B's outside endpoint");
        assert_eq!(verify(&f), (true, true));
        // POD_A answers that endpoint: POD_B gets it from POD_A's outside endpoint.
        let a_answer = FrameSpec {
            payload: b"pong".to_vec(),
            ..from_pod(POD_A, EGRESS, PROTO_UDP, 40000, b_port)
        };
        let mut f = a_answer.build();
        assert_eq!(deliver(&mut f, 0), TX_INT);
        let at_b = FrameSpec {
            src: EGRESS,
            sport: a_port,
            ttl: a_answer.ttl - 2,
            ..to_pod(&a_answer, POD_B, 40101)
        };
        assert_eq!(f, at_b.build(), "POD_B sees POD_A's outside endpoint");
        assert_eq!(verify(&f), (true, true));
        let turned: u64 = engines.iter().map(|e| e.counters().hairpinned).sum();
        assert_eq!(turned, 2);
        // POD_A's mapping serves both its remote and the hairpin: one mapping each.
        let maps: usize = engines.iter().map(|e| e.mappings()).sum();
        assert_eq!(maps, 2);
    }
}

/// xlb as a router on its own links (RFC 4787 REQ-13, RFC 1191): a DF packet larger
/// than the egress link draws ICMP fragmentation needed with that link's MTU, from the
/// address of the link it came in on, quoting it as sent, in both directions; without
/// DF it is a counted drop; the ICMP errors are rate-limited.
#[test]
fn too_big_for_the_egress_link_draws_fragmentation_needed() {
    let snap = mf::snapshot().with_net(2, Arc::new(mf::net_with_mtu(1500, 1400)));
    let mut e = engine_on(snap);
    let big = FrameSpec {
        payload: vec![7; 1400], // 1428-byte packet
        ..from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53)
    };
    let (v, f) = run(&mut e, &big);
    assert_eq!(v, Verdict::Icmp { iface: 0 });
    assert_eq!(f, big.build(), "the packet itself is untouched");
    let g = e.generated().to_vec();
    assert_eq!((g[34], g[35]), (icmp::DEST_UNREACHABLE, icmp::FRAG_NEEDED));
    assert_eq!(u16::from_be_bytes([g[40], g[41]]), 1400, "next-hop MTU");
    assert_eq!((&g[26..30], &g[30..34]), (&mf::NODE_INT[..], &POD_A[..]));
    assert_eq!(&g[42..62], &f[14..34], "quotes the header as sent");
    assert!(g.len() - 14 <= 576, "within 576 bytes");
    assert_eq!(verify(&g), (true, true));
    assert_eq!(
        e.flows().len(),
        0,
        "no flow for a packet that did not leave"
    );
    // Small enough: translated and sent.
    let small = FrameSpec {
        payload: vec![7; 1300],
        ..big.clone()
    };
    assert_eq!(run(&mut e, &small).0, TX_EXT);
    // Without DF: translated, then cut into fragments that fit (RFC 4787 REQ-13), which
    // reassemble into exactly the translated datagram.
    let no_df = FrameSpec {
        frag: 0,
        ..big.clone()
    };
    let (v, _) = run(&mut e, &no_df);
    assert_eq!(v, Verdict::Fragments { iface: 1, count: 2 });
    let pieces: Vec<Vec<u8>> = (0..2).map(|k| e.fragment(k).to_vec()).collect();
    for f in &pieces {
        assert!(f.len() - 14 <= 1400);
        assert!(verify(f).0, "each fragment's header checksum");
    }
    assert_eq!(
        reassemble(&pieces),
        masqueraded(&no_df, mf::mapped(40000)).build()
    );
    // Inbound, on an established mapping: the remote is told, from the egress address.
    let snap = mf::snapshot().with_net(3, Arc::new(mf::net_with_mtu(1280, 1500)));
    e.set_snapshot(Arc::new(snap));
    let back = FrameSpec {
        payload: vec![9; 1300],
        ..answer(&masqueraded(&small, mf::mapped(40000)))
    };
    let (v, _) = run(&mut e, &back);
    assert_eq!(v, Verdict::Icmp { iface: 1 });
    let g = e.generated();
    assert_eq!(u16::from_be_bytes([g[40], g[41]]), 1280);
    assert_eq!((&g[26..30], &g[30..34]), (&EGRESS[..], &REMOTE[..]));
    // The rate limit: a burst, then counted drops until the clock refills it.
    let snap = mf::snapshot().with_net(4, Arc::new(mf::net_with_mtu(1500, 1400)));
    e.set_snapshot(Arc::new(snap));
    let mut sent = 2;
    while run(&mut e, &big).0 == (Verdict::Icmp { iface: 0 }) {
        sent += 1;
    }
    assert_eq!(sent, lb::pipeline::ICMP_BURST);
    assert_eq!(e.counters().icmp_sent, lb::pipeline::ICMP_BURST);
    assert_eq!(
        e.counters().drops[DropReason::TooBig as usize],
        1,
        "rate-limited"
    );
    e.begin_batch(SEC * 2);
    assert_eq!(run(&mut e, &big).0, Verdict::Icmp { iface: 0 });
}

/// The datagram the fragments `frags` (Ethernet frames, no IP options) carry, as one
/// frame: the first fragment's headers, the payloads in offset order.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let mut parts: Vec<(u16, &[u8])> = frags
        .iter()
        .map(|f| (u16::from_be_bytes([f[20], f[21]]) & 0x1fff, &f[34..]))
        .collect();
    parts.sort_by_key(|p| p.0);
    let first = frags
        .iter()
        .find(|f| u16::from_be_bytes([f[20], f[21]]) & 0x1fff == 0)
        .expect("a first fragment");
    let mut d = first[..34].to_vec();
    for (_, p) in parts {
        d.extend_from_slice(p);
    }
    let total = (d.len() - 14) as u16;
    d[16..18].copy_from_slice(&total.to_be_bytes());
    d[20..22].copy_from_slice(&[0, 0]);
    d[24..26].copy_from_slice(&[0, 0]);
    let c = lb::wire::checksum::checksum(&d[14..34]);
    d[24..26].copy_from_slice(&c.to_be_bytes());
    d
}

/// IPv4 fragments of a masqueraded flow both ways (RFC 4787 REQ-14): a pod's 3 000-byte
/// UDP datagram in three fragments leaves as the masqueraded datagram (reassembled, it
/// is exactly that, checksums included), and so does the answer back; later fragments
/// follow their first fragment to the pod's home worker; a later fragment whose first
/// was not seen is counted.
#[test]
fn fragments_are_translated_both_ways() {
    let mut w0 = engine();
    let mut w1 = Engine::new(1, 64, Arc::new(mf::snapshot()));
    w1.begin_batch(SEC);
    let big = FrameSpec {
        frag: 0,
        payload: (0..3000u32).map(|i| i as u8).collect(),
        ..from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53) // home: worker 0
    };
    let frags = fragment(&big.build(), 1480);
    assert_eq!(frags.len(), 3);
    // They arrive on worker 1's queue (RSS keeps a datagram's fragments together).
    let mut out = Vec::new();
    for f in &frags {
        let mut f = f.clone();
        assert_eq!(
            w1.process(&mut f),
            Verdict::ToWorker(0),
            "follows the first"
        );
        let before = f.clone();
        assert_eq!(w0.process_probe(&mut f, 1), TX_EXT);
        assert_ne!(f, before);
        out.push(f);
    }
    let port = mf::mapped(40000);
    assert_eq!(reassemble(&out), masqueraded(&big, port).build());
    assert_eq!(verify(&reassemble(&out)), (true, true));
    // The answer, in fragments, reaches the pod as one datagram.
    let answer_big = FrameSpec {
        payload: (0..3000u32).map(|i| (i * 7) as u8).collect(),
        ident: 0x7777,
        ..answer(&masqueraded(&big, port))
    };
    let mut back = Vec::new();
    for f in fragment(&answer_big.build(), 1480) {
        let mut f = f.clone();
        assert_eq!(w0.process(&mut f), TX_INT);
        back.push(f);
    }
    let at_pod = reassemble(&back);
    assert_eq!(at_pod, to_pod(&answer_big, POD_A, 40000).build());
    // A later fragment of a datagram whose first fragment never came: counted.
    let mut stray = fragment(
        &FrameSpec {
            ident: 0x9999,
            ..big.clone()
        }
        .build(),
        1480,
    )[1]
    .clone();
    assert_eq!(w0.process(&mut stray), Verdict::Drop(DropReason::Fragment));
}

/// Filtering (RFC 4787 REQ-8, RFC 5382 REQ-3/4): by default a packet from a remote the
/// pod never sent to is dropped silently, even to its mapped port; with
/// endpoint-independent filtering it reaches the pod, whose answer leaves from the same
/// outside endpoint.
#[test]
fn filtering_is_selectable() {
    let stranger = [20, 0, 0, 99];
    for filtering in [
        nat::Filtering::AddressAndPortDependent,
        nat::Filtering::EndpointIndependent,
    ] {
        let snap = mf::snapshot();
        let m = snap.masq.clone().expect("masquerading");
        let snap = snap.with_masq(
            2,
            Some(Arc::new(MasqState {
                rules: m.rules.clone(),
                previous: None,
                version: m.version,
                filtering,
            })),
        );
        let mut e = engine_on(snap);
        let out = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 3478);
        assert_eq!(run(&mut e, &out).0, TX_EXT);
        let port = mf::mapped(40000);
        let unsolicited = FrameSpec {
            src: stranger,
            sport: 5000,
            ..answer(&masqueraded(&out, port))
        };
        let (v, f) = run(&mut e, &unsolicited);
        if filtering == nat::Filtering::AddressAndPortDependent {
            assert_eq!(v, Verdict::Drop(DropReason::NoFlow));
            let syn = FrameSpec {
                proto: PROTO_TCP,
                flags: TcpFlags::SYN,
                ..unsolicited.clone()
            };
            assert_eq!(
                run(&mut e, &syn).0,
                Verdict::Drop(DropReason::NoFlow),
                "no answer to a SYN"
            );
            continue;
        }
        assert_eq!(v, TX_INT);
        assert_eq!(f, to_pod(&unsolicited, POD_A, 40000).build());
        let reply = from_pod(POD_A, stranger, PROTO_UDP, 40000, 5000);
        let (v, f) = run(&mut e, &reply);
        assert_eq!(v, TX_EXT);
        assert_eq!(
            f,
            masqueraded(&reply, port).build(),
            "from the same mapping"
        );
    }
}

/// An egress address pool (RFC 4787 REQ-2, paired): every flow of a pod leaves from the
/// one address its own address picks, other pods spread over the pool, and answers to
/// every pool address come back.
#[test]
fn an_egress_pool_pairs_each_pod_with_one_address() {
    let second = [203, 0, 113, 8];
    let snap = mf::snapshot();
    let m = snap.masq.clone().expect("masquerading");
    let rules = m
        .rules
        .clone()
        .with_egress_pool(vec![EGRESS.into(), second.into()]);
    let snap = snap.with_masq(
        2,
        Some(Arc::new(MasqState {
            rules,
            previous: None,
            version: m.version,
            filtering: m.filtering,
        })),
    );
    let mut e = engine_on(snap);
    for (pod, want) in [(POD_A, EGRESS), (mf::POD_C, second)] {
        for dport in [53, 54, 443] {
            let out = from_pod(pod, REMOTE, PROTO_UDP, 40000, dport);
            let (v, f) = run(&mut e, &out);
            assert_eq!(v, TX_EXT);
            assert_eq!(&f[26..30], &want, "pod {pod:?} leaves from one address");
            let port = u16::from_be_bytes([f[34], f[35]]);
            assert_eq!(port, mf::mapped(40000), "and keeps its port there");
            let back = FrameSpec {
                src: EGRESS,
                ..masqueraded(&out, port)
            };
            let back = answer(&FrameSpec { src: want, ..back });
            let (v, f) = run(&mut e, &back);
            assert_eq!(v, TX_INT);
            assert_eq!(&f[30..34], &pod);
        }
    }
}

/// RFC 5382 REQ-2: every valid TCP sequence, simultaneous open included. Both ends send
/// a SYN (the pod's opens the flow, the remote's crosses it), then both SYN+ACKs, then
/// the ACKs: every segment is translated, and the flow ends established.
#[test]
fn simultaneous_open_goes_through() {
    let mut e = engine();
    let syn = from_pod(POD_A, REMOTE, PROTO_TCP, 40000, 5000);
    assert_eq!(run(&mut e, &syn).0, TX_EXT);
    let port = mf::mapped(40000);
    let their_syn = FrameSpec {
        flags: TcpFlags::SYN,
        ..answer(&masqueraded(&syn, port))
    };
    let (v, f) = run(&mut e, &their_syn);
    assert_eq!(v, TX_INT, "the crossing SYN reaches the pod");
    assert_eq!(f, to_pod(&their_syn, POD_A, 40000).build());
    let our_synack = FrameSpec {
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ..syn.clone()
    };
    let (v, f) = run(&mut e, &our_synack);
    assert_eq!(v, TX_EXT);
    assert_eq!(f, masqueraded(&our_synack, port).build());
    let their_synack = FrameSpec {
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ..their_syn.clone()
    };
    assert_eq!(run(&mut e, &their_synack).0, TX_INT);
    let ack = FrameSpec {
        flags: TcpFlags::ACK,
        ..syn.clone()
    };
    assert_eq!(run(&mut e, &ack).0, TX_EXT);
    let their_ack = FrameSpec {
        flags: TcpFlags::ACK,
        ..their_syn.clone()
    };
    assert_eq!(run(&mut e, &their_ack).0, TX_INT);
    let flow = e.flows().iter().next().expect("one flow");
    assert_eq!(flow.state, FlowState::Established);
    assert!(flow.assured);
    assert_eq!(e.flows().len(), 1);
}

/// The forward keys of flows the last policy change kept (`Event::Kept`).
fn kept(e: &mut Engine) -> Vec<lb::flow::FlowKey> {
    e.take_events()
        .filter_map(|ev| match ev {
            Event::Kept(k) => Some(k),
            _ => None,
        })
        .collect()
}

#[test]
fn per_address_counts_cover_the_egress_addresses_after_the_snat_pool() {
    let mut snap = mf::snapshot();
    let ports = snap.snat.ports;
    snap.snat.pool = std::sync::Arc::from(vec![lb::snapshot::NatAddr {
        addr: [198, 51, 100, 1],
        ports,
    }]);
    let addrs: Vec<[u8; 4]> = snap.nat_addrs().map(|a| a.addr).collect();
    assert_eq!(addrs, [[198, 51, 100, 1], mf::EGRESS]);
    assert_eq!(snap.nat_position(mf::EGRESS), Some(1));
    assert_eq!(snap.nat_position([192, 0, 2, 1]), None);
    // An egress address that is also a pool address is counted once, as the pool's.
    let snap = mf::snapshot();
    assert_eq!(snap.nat_addrs().count(), 1);
}
