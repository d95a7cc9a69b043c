//! The SNAT pipeline against byte fixtures: the shared fixture table, then stateful
//! sequences (reply translation, handoff, state, revalidation), then properties.

use lb::fixtures::{self, BACKEND, CLIENT, CLIENT_MAC, LB_MAC, SNAT, VIP};
use lb::flow::FlowState;
use lb::netview::{IfaceInfo, NetView, Route};
use lb::service::{Op, ServiceTable};
use lb::wire::build::{verify, FrameSpec};
use lb::wire::ipv4::PROTO_UDP;
use lb::wire::TcpFlags;
use lb::{DropReason, Engine, Event, Snapshot, Verdict};
use proptest::prelude::*;
use std::sync::Arc;

const SEC: u64 = 1_000_000_000;

/// The fixture snapshot with one worker: home of every client port.
fn one_worker() -> Arc<Snapshot> {
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    Arc::new(
        Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(fixtures::net()), None)
            .expect("build"),
    )
}

/// The `i`-th client port whose home is worker `w` of the fixture's two: 40000 maps to
/// 64712, a port of worker 0; ports 4 apart map 4 apart (ports go to workers in pairs).
fn cport(w: u16, i: u16) -> u16 {
    40000 + 2 * w + 4 * i
}

fn engine(worker: u16) -> Engine {
    let mut e = Engine::new(worker, 1024, Arc::new(fixtures::snapshot()));
    e.begin_batch(SEC);
    e
}

#[test]
fn fixture_table() {
    for fx in fixtures::fixtures() {
        fixtures::check(&mut engine(0), &fx);
    }
}

fn syn(sport: u16) -> FrameSpec {
    FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src: CLIENT,
        dst: VIP,
        sport,
        ..FrameSpec::default()
    }
}

/// A client segment with `flags` on the connection from port `sport`.
fn seg(sport: u16, flags: u8) -> Vec<u8> {
    FrameSpec {
        flags,
        ..syn(sport)
    }
    .build()
}

/// A client segment with `flags` and sequence number `seq`.
fn seg_at(sport: u16, flags: u8, seq: u32) -> Vec<u8> {
    FrameSpec {
        flags,
        seq,
        ..syn(sport)
    }
    .build()
}

/// The port the forward frame was sent from.
fn sport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

#[test]
fn reply_is_translated_back_to_the_client() {
    let mut e = engine(0);
    let mut f = syn(40000).build();
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    let port = sport(&f);
    let mut reply = FrameSpec {
        src_mac: fixtures::BACKEND_MAC,
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        sport: 8080,
        dport: port,
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ttl: 64,
        payload: b"hello".to_vec(),
        ..FrameSpec::default()
    }
    .build();
    assert_eq!(e.process(&mut reply), Verdict::Tx { iface: 0 });
    let expected = FrameSpec {
        src_mac: LB_MAC,
        dst_mac: CLIENT_MAC,
        src: VIP,
        dst: CLIENT,
        sport: 80,
        dport: 40000,
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ttl: 63,
        payload: b"hello".to_vec(),
        ..FrameSpec::default()
    }
    .build();
    assert_eq!(reply, expected);
    let flow = e.flows().iter().next().expect("one flow");
    assert_eq!(
        flow.state,
        FlowState::SynRecv,
        "a reply alone does not establish"
    );
    let mut ack = seg(40000, TcpFlags::ACK);
    assert_eq!(e.process(&mut ack), Verdict::Tx { iface: 0 });
    let flow = e.flows().iter().next().expect("one flow");
    assert_eq!(flow.state, FlowState::Established);
    assert!(flow.assured);
}

#[test]
fn same_flow_keeps_its_port_and_backend() {
    let mut e = engine(0);
    let mut a = syn(40000).build();
    e.process(&mut a);
    let mut b = seg(40000, TcpFlags::ACK);
    assert_eq!(e.process(&mut b), Verdict::Tx { iface: 0 });
    assert_eq!(sport(&a), sport(&b));
    assert_eq!(e.counters().flows_created, 1);
    let mut c = syn(40001).build();
    e.process(&mut c);
    assert_ne!(
        sport(&a),
        sport(&c),
        "a second flow gets another port toward the same backend"
    );
}

#[test]
fn reply_on_the_wrong_worker_goes_to_its_owner() {
    // Worker 1 creates the flow (the client port's home); the reply lands on worker 0.
    let mut owner = engine(1);
    let mut f = syn(cport(1, 0)).build();
    assert_eq!(owner.process(&mut f), Verdict::Tx { iface: 0 });
    let port = sport(&f);
    assert_eq!(port, fixtures::mapped(cport(1, 0)));
    assert_eq!(
        nat::port_owner(port, 2),
        1,
        "worker 1 maps to its own ports"
    );
    let reply = FrameSpec {
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        sport: 8080,
        dport: port,
        flags: TcpFlags::ACK,
        ..FrameSpec::default()
    };
    let mut other = engine(0);
    let mut r = reply.build();
    assert_eq!(other.process(&mut r), Verdict::ToWorker(1));
    assert_eq!(r, reply.build(), "a handed-off frame is untouched");
    assert_eq!(owner.process(&mut r), Verdict::Tx { iface: 0 });
    assert_eq!(&r[30..34], &CLIENT);
}

#[test]
fn sweep_is_paced_by_the_clock_not_the_batches() {
    let mut e = engine(0);
    let t = fixtures::config().timeouts;
    let mut f = syn(40000).build();
    e.process(&mut f);
    // Batches every 100 µs each earn 1024 slots * 1e5 / 4e9 = 0.026 slot visits: only
    // the carried fractions move the hand, which must still come round within a period.
    let step = 100_000;
    let mut now = SEC;
    while e.flows().len() == 1 && now < SEC + t.tcp_syn + lb::pipeline::SWEEP_PERIOD_NS * 2 {
        now += step;
        e.begin_batch(now);
    }
    assert_eq!(e.flows().len(), 0, "the idle flow was never swept");
    let after = now - SEC;
    assert!(after > t.tcp_syn, "swept before its timeout ({after} ns)");
    assert!(
        after <= t.tcp_syn + lb::pipeline::SWEEP_PERIOD_NS + step,
        "swept {after} ns after the SYN, later than timeout + one sweep period"
    );
}

#[test]
fn tcp_states_and_timeouts() {
    let mut e = engine(0);
    let t = fixtures::config().timeouts;
    let mut f = syn(40000).build();
    e.process(&mut f);
    // SYN-only flows expire after the SYN timeout, swept by the clock hand.
    let mut now = SEC + t.tcp_syn + 1;
    for _ in 0..64 {
        e.begin_batch(now);
    }
    assert_eq!(e.flows().len(), 0);
    assert_eq!(e.counters().flows_expired, 1);
    // An established flow survives the SYN timeout; a FIN makes it short-lived.
    let mut f = syn(40001).build();
    e.process(&mut f);
    let port = sport(&f);
    let mut r = synack(port);
    assert_eq!(e.process(&mut r), Verdict::Tx { iface: 0 });
    let mut ack = seg(40001, TcpFlags::ACK);
    assert_eq!(e.process(&mut ack), Verdict::Tx { iface: 0 });
    assert_eq!(
        e.flows().iter().next().map(|f| f.state),
        Some(FlowState::Established)
    );
    now += t.tcp_syn + 1;
    e.begin_batch(now);
    let mut ack = seg(40001, TcpFlags::ACK);
    assert_eq!(
        e.process(&mut ack),
        Verdict::Tx { iface: 0 },
        "established flow outlives the SYN timeout"
    );
    let mut fin = seg(40001, TcpFlags::FIN | TcpFlags::ACK);
    e.process(&mut fin);
    assert_eq!(
        e.flows().iter().next().map(|f| f.state),
        Some(FlowState::Fin)
    );
    now += t.tcp_fin + 1;
    e.begin_batch(now);
    let mut late = seg(40001, TcpFlags::ACK);
    assert_eq!(
        e.process(&mut late),
        Verdict::Probe(1), // gone here; worker 1 is asked before it is a no_flow
        "closed flow is gone after the FIN timeout"
    );
}

#[test]
fn removed_backend_ends_its_flows_and_others_survive() {
    let mut cfg = fixtures::config();
    cfg.workers = 1; // every client port's home

    let fe = fixtures::frontends()[0];
    let two = fixtures::table()
        .apply(&Op::AddBackend {
            frontend: fe,
            backend: "10.1.0.3:8080".parse().expect("backend"),
        })
        .expect("add");
    let mut net = fixtures::net();
    net = NetView::new(
        net.ifaces.clone(),
        net.routes().to_vec(),
        [
            (fixtures::IFINDEX, CLIENT, CLIENT_MAC),
            (fixtures::IFINDEX, BACKEND, fixtures::BACKEND_MAC),
            (fixtures::IFINDEX, [10, 1, 0, 3], [2, 0, 0, 0, 0, 0xb3]),
        ],
    );
    let net = Arc::new(net);
    let s1 = Arc::new(Snapshot::build(1, &cfg, &two, net.clone(), None).expect("build"));
    let mut e = Engine::new(0, 1024, s1.clone());
    e.begin_batch(SEC);
    let mut by_backend = std::collections::HashMap::new();
    for p in 0..200u16 {
        let mut f = syn(30000 + p).build();
        assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
        by_backend
            .entry(f[33])
            .or_insert_with(Vec::new)
            .push(30000 + p);
    }
    assert_eq!(by_backend.len(), 2, "both backends get flows");
    let victims = by_backend[&3].clone();
    let survivors = by_backend[&2].clone();
    let one = two
        .apply(&Op::RemoveBackend {
            frontend: fe,
            addr: [10, 1, 0, 3].into(),
            port: 8080,
        })
        .expect("remove");
    e.set_snapshot(Arc::new(
        Snapshot::build(2, &cfg, &one, net, Some(&s1)).expect("build"),
    ));
    for p in victims {
        let mut f = seg(p, TcpFlags::ACK);
        // The default outcome: the client gets a reset (lb/tests/backend_ops.rs).
        assert_eq!(e.process(&mut f), Verdict::Reset { iface: 0 });
    }
    for p in survivors {
        let mut f = seg(p, TcpFlags::ACK);
        assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
        assert_eq!(f[33], 2);
    }
}

#[test]
fn unresolved_neighbour_is_requested_not_guessed() {
    let cfg = fixtures::config();
    let net = NetView::new(
        vec![IfaceInfo {
            ifindex: 2,
            name: "lb0".into(),
            mac: LB_MAC,
            addr: None,
            mtu: 1500,
            redirect: true,
        }],
        vec![Route {
            dst: [10, 0, 0, 0],
            prefix_len: 8,
            ifindex: 2,
            gateway: None,
        }],
        [(2, CLIENT, CLIENT_MAC)],
    );
    let s = Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(net), None).expect("build");
    let mut e = Engine::new(0, 16, Arc::new(s));
    let mut f = syn(40000).build();
    let before = f.clone();
    assert_eq!(e.process(&mut f), Verdict::Hold);
    assert_eq!(
        f, before,
        "a held frame is untouched, so it can be processed again"
    );
    assert_eq!(
        e.take_events().collect::<Vec<_>>(),
        vec![Event::Resolve(BACKEND)]
    );
    assert_eq!(e.take_events().count(), 0);
    // Once the neighbour is known, the same frame goes out.
    e.set_snapshot(Arc::new(fixtures::snapshot()));
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    assert_eq!(e.counters().held, 1);
}

/// Send the client's SYN from `cport`; the SNAT port it went out from.
fn open(e: &mut Engine, cport: u16) -> u16 {
    let mut f = syn(cport).build();
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    sport(&f)
}

/// The backend's SYN+ACK to SNAT port `port`.
fn synack(port: u16) -> Vec<u8> {
    FrameSpec {
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        sport: 8080,
        dport: port,
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ..FrameSpec::default()
    }
    .build()
}

/// Complete the handshake of the client connection from `cport` (its SYN already sent
/// from SNAT port `port`): the backend's SYN+ACK, then the client's ACK.
fn handshake(e: &mut Engine, cport: u16, port: u16) {
    let mut sa = synack(port);
    assert_eq!(e.process(&mut sa), Verdict::Tx { iface: 0 });
    let mut ack = seg(cport, TcpFlags::ACK);
    assert_eq!(e.process(&mut ack), Verdict::Tx { iface: 0 });
}

#[test]
fn a_flow_whose_packets_moved_queues_is_found_by_probing() {
    // The connection opened on worker 1 (its client port's home); after an RSS change
    // its client's segments arrive on worker 0's queue, which sends them home first.
    let c = cport(1, 0);
    let mut owner = engine(1);
    let port = open(&mut owner, c);
    let mut other = engine(0);
    let ack = seg(c, TcpFlags::ACK);
    let mut a = ack.clone();
    assert_eq!(other.process(&mut a), Verdict::ToWorker(1));
    assert_eq!(a, ack, "a handed-off frame is untouched");
    assert_eq!(owner.process_probe(&mut a, 1), Verdict::Tx { iface: 0 });
    assert_eq!(sport(&a), port, "the owner's translation");
    // After FIN the 5-tuple may already belong to a new connection (its SYN went to
    // another worker): a closing flow takes only segments near where its client left off.
    let mut fin = seg_at(c, TcpFlags::FIN | TcpFlags::ACK, 1000);
    assert_eq!(owner.process(&mut fin), Verdict::Tx { iface: 0 });
    let mut last_ack = seg_at(c, TcpFlags::ACK, 1001);
    assert_eq!(
        owner.process_probe(&mut last_ack, 1),
        Verdict::Tx { iface: 0 },
        "the old connection's last ACK, even handed on"
    );
    let mut reused = seg_at(c, TcpFlags::ACK, 3_000_000_000);
    assert_eq!(
        owner.process(&mut reused),
        Verdict::Probe(0),
        "a new connection's segment is not the closing flow's: asked elsewhere"
    );
    assert_eq!(
        owner.process_probe(&mut reused, 1),
        Verdict::Drop(DropReason::NoFlow)
    );
    // A segment nobody has (its home is worker 0): probed, and the last worker in the
    // chain counts it.
    let mut stray = seg(cport(0, 3), TcpFlags::ACK);
    assert_eq!(other.process(&mut stray), Verdict::Probe(1));
    assert_eq!(other.counters().flow_probes, 1);
    assert_eq!(
        owner.process_probe(&mut stray, 1),
        Verdict::Drop(DropReason::NoFlow)
    );
    // With one worker there is nobody to ask.
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    let s = Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(fixtures::net()), None)
        .expect("build");
    let mut alone = Engine::new(0, 16, Arc::new(s));
    let mut stray = seg(40999, TcpFlags::ACK);
    assert_eq!(alone.process(&mut stray), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn a_new_syn_on_a_closed_flow_reopens_it_with_its_mapping() {
    let mut e = engine(0);
    let port = open(&mut e, 40000);
    handshake(&mut e, 40000, port);
    let mut fin = seg(40000, TcpFlags::FIN | TcpFlags::ACK);
    e.process(&mut fin);
    assert_eq!(
        e.flows().iter().next().map(|f| f.state),
        Some(FlowState::Fin)
    );
    // The client reuses its port: the backend may still hold TIME_WAIT for snat:port,
    // and accepts the new SYN there only on the same mapping (conntrack does the same).
    let mut again = syn(40000).build();
    assert_eq!(e.process(&mut again), Verdict::Tx { iface: 0 });
    assert_eq!(sport(&again), port, "the same SNAT port");
    assert_eq!(e.flows().len(), 1);
    assert_eq!(e.counters().flows_reopened, 1);
    let flow = *e.flows().iter().next().expect("flow");
    assert_eq!(flow.state, FlowState::SynSent);
    assert!(!flow.assured, "proven again only by its own handshake");
    assert_eq!(e.counters().flows_created, 1);
}

/// Open the client connection from `cport` and complete its handshake.
fn establish(e: &mut Engine, cport: u16) {
    let port = open(e, cport);
    handshake(e, cport, port);
}

#[test]
fn full_table_evicts_half_open_flows_and_keeps_established_ones() {
    let mut e = Engine::new(0, 4, one_worker());
    let mut now = SEC;
    e.begin_batch(now);
    // Two established connections and two half-open ones (SYN seen, and SYN+ACK seen).
    for p in [1000, 1001] {
        establish(&mut e, p);
    }
    let mut f = syn(1002).build();
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    let mut sa = synack(sport(&f));
    assert_eq!(e.process(&mut sa), Verdict::Tx { iface: 0 });
    now += SEC;
    e.begin_batch(now);
    let mut f = syn(1003).build();
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    // Full. A flood of new SYNs (a spoofed-source attack looks like this) evicts the
    // half-open flows, oldest first, and never an established one.
    for p in 2000..2100 {
        now += 1000;
        e.begin_batch(now);
        let mut f = syn(p).build();
        assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 }, "port {p}");
    }
    assert_eq!(e.counters().flows_evicted, 100);
    assert_eq!(e.counters().drops[DropReason::FlowTableFull as usize], 0);
    assert_eq!(e.flows().len(), 4);
    for p in [1000, 1001] {
        let mut f = seg(p, TcpFlags::ACK);
        assert_eq!(
            e.process(&mut f),
            Verdict::Tx { iface: 0 },
            "established {p}"
        );
    }
    for p in [1002, 1003, 2000, 2097] {
        let mut f = seg(p, TcpFlags::ACK);
        assert_eq!(
            e.process(&mut f),
            Verdict::Drop(DropReason::NoFlow), // gone (the only worker)
            "evicted {p}"
        );
    }
    // A table of established flows only refuses (counted) and keeps them all.
    let mut e = Engine::new(0, 2, one_worker());
    e.begin_batch(SEC);
    for p in [1000, 1001] {
        establish(&mut e, p);
    }
    let mut f = syn(1002).build();
    assert_eq!(e.process(&mut f), Verdict::Drop(DropReason::FlowTableFull));
    assert_eq!(e.counters().flows_evicted, 0);
    let mut f = seg(1000, TcpFlags::ACK);
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
}

#[test]
fn a_reply_alone_does_not_establish_and_half_open_flows_keep_the_short_timeout() {
    let mut e = engine(0);
    let t = fixtures::snapshot().timeouts;
    let mut f = syn(40000).build();
    e.process(&mut f);
    // The backend answers a (possibly spoofed) SYN; the client never ACKs.
    let mut sa = synack(sport(&f));
    e.process(&mut sa);
    let flow = *e.flows().iter().next().expect("flow");
    assert_eq!(flow.state, FlowState::SynRecv);
    assert!(!flow.assured);
    // Gone after the SYN timeout, not the established one.
    e.begin_batch(SEC + t.tcp_syn + 1);
    let mut ack = seg(40000, TcpFlags::ACK);
    assert_eq!(
        e.process(&mut ack),
        Verdict::Probe(1),
        "gone: worker 1 is asked"
    );
}

#[test]
fn tiny_port_range_is_exhausted_and_counted() {
    let mut cfg = fixtures::config();
    // Worker 0 owns 61000 and 61001.
    cfg.snat = lb::snapshot::SnatConfig::single(
        fixtures::SNAT,
        nat::PortRange::new(61000, 61003).expect("range"),
    );
    let s = Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(fixtures::net()), None)
        .expect("build");
    let mut e = Engine::new(0, 64, Arc::new(s));
    e.begin_batch(SEC);
    let mut ok = 0;
    // Even client ports whose home is worker 0 (each prefers 61000): one gets it, one
    // gets 61001 (parity is only recommended), the rest find nothing.
    for p in 0..5 {
        let mut f = syn(2000 + 4 * p).build();
        if e.process(&mut f) == (Verdict::Tx { iface: 0 }) {
            ok += 1;
        }
    }
    assert_eq!(ok, 2);
    assert_eq!(e.counters().drops[DropReason::PortsExhausted as usize], 3);
}

#[test]
fn empty_service_counts_no_backend() {
    let fe = fixtures::frontends()[0];
    let t = ServiceTable::default()
        .apply(&Op::AddService {
            frontend: fe,
            backends: vec![],
            options: Default::default(),
        })
        .expect("add");
    let s = Snapshot::build(1, &fixtures::config(), &t, Arc::new(fixtures::net()), None)
        .expect("build");
    let mut e = Engine::new(0, 16, Arc::new(s));
    let mut f = syn(1).build();
    assert_eq!(e.process(&mut f), Verdict::Drop(DropReason::NoBackend));
}

proptest! {
    /// Any byte string gets a verdict, never a panic; nothing but Tx modifies it.
    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut e = engine(0);
        let before = bytes.clone();
        let v = e.process(&mut bytes);
        if !matches!(v, Verdict::Tx { .. }) {
            prop_assert_eq!(bytes, before);
        }
    }

    /// Mutating a valid frame anywhere still never panics.
    #[test]
    fn mutated_frames_never_panic(idx in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut e = engine(0);
        let mut f = FrameSpec { proto: PROTO_UDP, dport: 53, payload: vec![1; 30], ..syn(5) }.build();
        let i = idx.index(f.len());
        f[i] = val;
        let n = cut.index(f.len() + 1);
        f.truncate(n);
        let _ = e.process(&mut f);
    }

    /// Incremental checksums equal full recomputation for any addresses, ports, payload.
    #[test]
    fn checksums_match_full_recompute(last in 3u8..=254, sport in 1u16.., ttl in 2u8.., udp in any::<bool>(),
                                      payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assume!(last != VIP[3]);
        let src = [10, 0, 0, last]; // on the fixture's on-link /24
        let mut net = fixtures::net();
        net = NetView::new(net.ifaces.clone(), net.routes().to_vec(),
            [(fixtures::IFINDEX, src, CLIENT_MAC), (fixtures::IFINDEX, BACKEND, fixtures::BACKEND_MAC)]);
        let mut cfg = fixtures::config();
        cfg.workers = 1; // every client port's home
        let s = Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(net), None).expect("build");
        let mut e = Engine::new(0, 16, Arc::new(s));
        let spec = FrameSpec { src, sport, ttl, payload, proto: if udp { PROTO_UDP } else { 6 }, dport: if udp { 53 } else { 80 }, ..syn(0) };
        let mut f = spec.build();
        prop_assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
        prop_assert_eq!(verify(&f), (true, true));
    }
}

/// A client's DF segment larger than the backend-side link draws ICMP fragmentation
/// needed with the link's MTU (the client's PMTUD then shrinks its segments); the
/// connection's later segments that fit go through.
#[test]
fn too_big_for_the_backend_link_draws_fragmentation_needed() {
    let snap = fixtures::snapshot().with_net(2, Arc::new(fixtures::net_with_mtu(1400)));
    let mut e = Engine::new(0, 64, Arc::new(snap));
    e.begin_batch(SEC);
    let c = cport(0, 0);
    let port = open(&mut e, c);
    handshake(&mut e, c, port);
    let big = FrameSpec {
        flags: TcpFlags::ACK,
        payload: vec![1; 1400],
        ..syn(c)
    };
    let mut f = big.build();
    assert_eq!(e.process(&mut f), Verdict::Icmp { iface: 0 });
    let g = e.generated();
    assert_eq!((g[34], g[35]), (3, 4));
    assert_eq!(u16::from_be_bytes([g[40], g[41]]), 1400);
    assert_eq!((&g[26..30], &g[30..34]), (&SNAT[..], &CLIENT[..]));
    assert_eq!(verify(g), (true, true));
    let fits = FrameSpec {
        payload: vec![1; 1360],
        ..big
    };
    let mut f = fits.build();
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    assert_eq!(sport(&f), port);
}

/// Paired pooling (RFC 4787 REQ-2): with a pool of SNAT addresses, every flow of one
/// client leaves from the same address, whatever its ports; clients spread over the pool.
#[test]
fn a_clients_flows_share_one_pool_address() {
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    let pool: Vec<lb::snapshot::NatAddr> = (1..=4)
        .map(|i| lb::snapshot::NatAddr {
            addr: [10, 1, 0, 100 + i],
            ports: nat::PortRange::new(1024, 65535).expect("range"),
        })
        .collect();
    cfg.snat = lb::snapshot::SnatConfig {
        pool: Arc::from(pool),
        ports: cfg.snat.ports,
        encap_source: None,
    };
    let mut by_client = std::collections::HashMap::new();
    for last in 2..40u8 {
        let client = [10, 0, 0, last];
        if client == VIP {
            continue;
        }
        let net = NetView::new(
            fixtures::net().ifaces.clone(),
            fixtures::net().routes().to_vec(),
            [
                (fixtures::IFINDEX, client, CLIENT_MAC),
                (fixtures::IFINDEX, BACKEND, fixtures::BACKEND_MAC),
            ],
        );
        let s = Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(net), None).expect("build");
        let mut e = Engine::new(0, 64, Arc::new(s));
        e.begin_batch(SEC);
        for sport in [40000, 40001, 51234] {
            let mut f = FrameSpec {
                src: client,
                ..syn(sport)
            }
            .build();
            assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
            let from: [u8; 4] = f[26..30].try_into().expect("4 bytes");
            assert_eq!(
                *by_client.entry(last).or_insert(from),
                from,
                "client {last}"
            );
        }
        // Three mappings (one per client socket), all on the client's pool address.
        let at = cfg
            .snat
            .pool
            .iter()
            .position(|a| by_client.get(&last) == Some(&a.addr))
            .expect("a pool address");
        let mut want = [0u64; 4];
        want[at] = 3;
        assert_eq!(e.pool_use(), &want[..], "lbctl status's use per address");
        for _ in 0..100 {
            e.begin_batch(SEC * 100_000);
        }
        assert_eq!(e.pool_use(), &[0u64; 4][..], "mappings go with their flows");
    }
    let used: std::collections::HashSet<_> = by_client.values().collect();
    assert_eq!(used.len(), 4, "every pool address serves some clients");
}

/// The fast path follows the kernel's word on each egress interface: an answered UDP
/// flow is installed while its interfaces take XDP redirects; when a new snapshot says
/// one no longer does (a veth peer's GRO turned off), the flow's next packet takes it
/// out of the fast path, later packets cost nothing more, and when the interface takes
/// redirects again the next packet installs it again.
#[test]
fn the_fast_path_follows_the_interfaces_redirect_feature() {
    let base = one_worker();
    let with = |generation: u64, redirect: bool| {
        let mut net = fixtures::net();
        for i in &mut net.ifaces {
            i.redirect = redirect;
        }
        Arc::new(base.with_net(generation, Arc::new(net)))
    };
    let mut e = Engine::new(0, 64, with(1, true));
    e.enable_fast_path();
    e.begin_batch(SEC);
    let query = FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src: CLIENT,
        dst: VIP,
        proto: PROTO_UDP,
        sport: 40000,
        dport: 53,
        payload: b"query".to_vec(),
        ..FrameSpec::default()
    };
    let mut q = query.build();
    assert!(matches!(e.process(&mut q), Verdict::Tx { .. }));
    let port = sport(&q);
    let answer = FrameSpec {
        src_mac: fixtures::BACKEND_MAC,
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        proto: PROTO_UDP,
        sport: 5353,
        dport: port,
        payload: b"answer".to_vec(),
        ..FrameSpec::default()
    };
    let kinds = |e: &mut Engine| -> Vec<&'static str> {
        e.take_events()
            .map(|ev| match ev {
                Event::FastInstall(..) => "install",
                Event::FastRemove(..) => "remove",
                _ => "other",
            })
            .collect()
    };
    let send = |e: &mut Engine, f: &FrameSpec| {
        assert!(matches!(e.process(&mut f.build()), Verdict::Tx { .. }));
    };
    assert!(kinds(&mut e).is_empty(), "not before an answer");
    send(&mut e, &answer);
    assert_eq!(kinds(&mut e), ["install"]);
    e.set_snapshot(with(2, false));
    send(&mut e, &query);
    assert_eq!(kinds(&mut e), ["remove"], "out of the fast path");
    send(&mut e, &answer);
    send(&mut e, &query);
    assert!(kinds(&mut e).is_empty(), "decided once a generation");
    e.set_snapshot(with(3, true));
    send(&mut e, &answer);
    assert_eq!(kinds(&mut e), ["install"], "back in the fast path");
    assert_eq!(e.flows().len(), 1, "one flow all along");
}
