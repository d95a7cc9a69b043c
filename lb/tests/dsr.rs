//! Direct server return against the engine: what each mode does to the client's packet,
//! the one-direction flow state (no NAT port, TCP state from the client's segments, the
//! fast-path entry of one direction), PMTU with the encapsulation's overhead, hybrid
//! services, and a flow keeping its backend while others come and go.

use lb::fixtures::{self, CLIENT_MAC, LB_MAC, SNAT, VIP};
use lb::flow::{FlowState, Forwarding};
use lb::netview::NetView;
use lb::service::{BackendSpec, Frontend, Mode, Op, Proto, ServiceOptions, ServiceTable};
use lb::wire::build::FrameSpec;
use lb::wire::ipv4::{PROTO_TCP, PROTO_UDP};
use lb::wire::TcpFlags;
use lb::{DropReason, Engine, Event, Snapshot, Verdict};
use std::sync::Arc;

const SEC: u64 = 1_000_000_000;
const CLIENT: [u8; 4] = [10, 0, 0, 2];

fn backend(i: u8) -> [u8; 4] {
    [10, 1, 0, 1 + i]
}

fn backend_mac(i: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, 0xb0 + i]
}

fn net(mtu: u16) -> Arc<NetView> {
    let base = fixtures::net_with_mtu(mtu);
    let mut neigh = vec![(fixtures::IFINDEX, CLIENT, CLIENT_MAC)];
    for i in 1..=8 {
        neigh.push((fixtures::IFINDEX, backend(i), backend_mac(i)));
    }
    Arc::new(NetView::new(
        base.ifaces.clone(),
        base.routes().to_vec(),
        neigh,
    ))
}

fn frontend(proto: Proto) -> Frontend {
    Frontend {
        addr: VIP.into(),
        port: 80,
        proto,
    }
}

/// One service on `VIP:80/proto` with backends `1..=n` (port 80) in `mode`.
fn table(proto: Proto, n: u8, mode: Mode) -> ServiceTable {
    ServiceTable::default()
        .apply(&Op::AddService {
            frontend: frontend(proto),
            backends: (1..=n)
                .map(|i| BackendSpec {
                    addr: backend(i).into(),
                    port: 80,
                    weight: 1,
                })
                .collect(),
            options: ServiceOptions {
                mode,
                gue_port: mode.uses_gue().then_some(7000),
                ..ServiceOptions::default()
            },
        })
        .expect("valid")
}

fn engine(t: &ServiceTable, mtu: u16) -> Engine {
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    let s = Snapshot::build(1, &cfg, t, net(mtu), None).expect("build");
    let mut e = Engine::new(0, 1024, Arc::new(s));
    e.enable_fast_path();
    e.begin_batch(SEC);
    e
}

fn swap(e: &mut Engine, t: &ServiceTable) {
    let prev = Arc::clone(e.snapshot());
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    let s = Snapshot::build(prev.generation + 1, &cfg, t, net(1500), Some(&prev)).expect("build");
    e.set_snapshot(Arc::new(s));
}

fn client(proto: u8, sport: u16, flags: u8, payload: &[u8]) -> FrameSpec {
    FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src: CLIENT,
        dst: VIP,
        proto,
        sport,
        dport: 80,
        flags,
        seq: 1000,
        ack: 1,
        payload: payload.to_vec(),
        ..FrameSpec::default()
    }
}

/// The backend (1-based) a DSR frame's MAC names.
fn mac_backend(frame: &[u8]) -> u8 {
    frame[5] - 0xb0
}

#[test]
fn l2_dsr_changes_the_mac_only_and_keeps_no_nat_state() {
    let mut e = engine(&table(Proto::Tcp, 4, Mode::DsrL2), 1500);
    let syn = client(PROTO_TCP, 40000, TcpFlags::SYN, b"").build();
    let mut f = syn.clone();
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    let b = mac_backend(&f);
    assert!((1..=4).contains(&b));
    assert_eq!(&f[0..6], &backend_mac(b), "to the backend's MAC");
    assert_eq!(&f[6..12], &LB_MAC);
    assert_eq!(
        &f[12..],
        &syn[12..],
        "the IP packet untouched, TTL included"
    );
    assert_eq!(e.mappings(), 0, "no NAT port");
    let flow = *e.flows().iter().next().expect("one flow");
    assert!(flow.one_way());
    assert_eq!(flow.rewrite[0].fwd, Forwarding::L2Dsr);
    assert_eq!(flow.backend(), (backend(b), 80));
    // Only the client's key is indexed: the reply tuple is nobody's.
    let reply = lb::flow::FlowKey {
        src: VIP,
        dst: CLIENT,
        sport: 80,
        dport: 40000,
        proto: PROTO_TCP,
    };
    assert!(e.flows().lookup(&reply).is_none());
    assert_eq!(e.counters().dsr_flows, 1);
    assert_eq!(
        e.take_events().count(),
        0,
        "not in the fast path before the handshake"
    );
    // The client's ACK of the SYN+ACK it got from the backend completes the flow, which
    // goes to the fast path: one entry, the client's direction, an L2 DSR action.
    let mut ack = client(PROTO_TCP, 40000, TcpFlags::ACK, b"").build();
    assert_eq!(e.process(&mut ack), Verdict::Tx { iface: 0 });
    assert_eq!(mac_backend(&ack), b);
    let flow = *e.flows().iter().next().expect("one flow");
    assert_eq!(flow.state, FlowState::Established);
    assert!(flow.assured && flow.fast);
    let events: Vec<Event> = e.take_events().collect();
    let [Event::FastInstall(dirs, 1)] = events[..] else {
        panic!("one one-direction install: {events:?}");
    };
    assert_eq!(dirs[0].0, flow.keys[0].flowrec());
    assert_eq!(
        dirs[0].1.action.kind,
        flowrec::ActionKind::L2Dsr as u8,
        "the fast path executes L2 DSR"
    );
    assert_eq!(dirs[0].1.action.dst_mac, backend_mac(b));
    // The client's FIN closes it; its removal takes the one entry.
    let mut fin = client(PROTO_TCP, 40000, TcpFlags::FIN | TcpFlags::ACK, b"").build();
    assert_eq!(e.process(&mut fin), Verdict::Tx { iface: 0 });
    let flow = *e.flows().iter().next().expect("one flow");
    assert_eq!(flow.state, FlowState::Fin);
    let events: Vec<Event> = e.take_events().collect();
    assert!(
        matches!(events[..], [Event::FastRemove(_, 1, _)]),
        "{events:?}"
    );
}

#[test]
fn tunnels_wrap_the_packet_from_the_encap_source_to_the_backend() {
    for (mode, overhead) in [(Mode::DsrIpip, 20), (Mode::DsrGue, 32)] {
        let mut e = engine(&table(Proto::Udp, 4, mode), 1500);
        let dgram = client(PROTO_UDP, 5000, 0, b"query").build();
        let mut f = dgram.clone();
        let v = e.process(&mut f);
        let Verdict::Encap { iface: 0, len } = v else {
            panic!("{mode}: {v:?}");
        };
        assert_eq!(usize::from(len), dgram.len() - 14);
        assert_eq!(
            &f[14..],
            &dgram[14..],
            "{mode}: the packet itself untouched"
        );
        let b = mac_backend(&f);
        let hdr = e.encap_header().to_vec();
        assert_eq!(hdr.len(), overhead);
        assert_eq!(&hdr[12..16], &SNAT, "{mode}: from lb0's address");
        assert_eq!(&hdr[16..20], &backend(b), "{mode}: to the backend");
        assert_eq!(
            usize::from(u16::from_be_bytes([hdr[2], hdr[3]])),
            overhead + dgram.len() - 14
        );
        if mode == Mode::DsrGue {
            let sport = u16::from_be_bytes([hdr[20], hdr[21]]);
            assert!(sport >= 0xc000, "{sport}: from the dynamic range");
            assert_eq!(u16::from_be_bytes([hdr[22], hdr[23]]), 7000, "--gue-port");
            // Other flows leave from other source ports (the backend's NIC spreads them).
            let mut ports = std::collections::BTreeSet::new();
            for p in 0..32 {
                let mut g = client(PROTO_UDP, 6000 + p, 0, b"q").build();
                assert!(matches!(e.process(&mut g), Verdict::Encap { .. }));
                ports.insert(u16::from_be_bytes([
                    e.encap_header()[20],
                    e.encap_header()[21],
                ]));
            }
            assert!(ports.len() > 16, "{ports:?}");
        } else {
            assert_eq!(hdr[9], 4, "IPIP");
        }
        assert_eq!(e.counters().encapsulated, e.counters().tx);
        // The second datagram makes the flow assured and puts it in the fast path with
        // the tunnel's action, template included.
        let mut again = dgram.clone();
        assert!(matches!(e.process(&mut again), Verdict::Encap { .. }));
        let install = e
            .take_events()
            .find_map(|ev| match ev {
                Event::FastInstall(d, 1)
                    if d[0].0
                        == lb::flow::FlowKey {
                            src: CLIENT,
                            dst: VIP,
                            sport: 5000,
                            dport: 80,
                            proto: PROTO_UDP,
                        }
                        .flowrec() =>
                {
                    Some(d[0].1)
                }
                _ => None,
            })
            .expect("installed");
        let a = install.action;
        assert_eq!(usize::from(a.encap_len), overhead);
        assert_eq!(&a.encap[12..16], &SNAT);
        assert_eq!(a.mtu, 1500 - overhead as u16);
    }
}

#[test]
fn the_encap_source_can_be_set() {
    let t = table(Proto::Udp, 1, Mode::DsrIpip);
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    cfg.snat.encap_source = Some([192, 0, 2, 7]);
    let s = Snapshot::build(1, &cfg, &t, net(1500), None).expect("build");
    let mut e = Engine::new(0, 64, Arc::new(s));
    e.begin_batch(SEC);
    let mut f = client(PROTO_UDP, 5000, 0, b"q").build();
    assert!(matches!(e.process(&mut f), Verdict::Encap { .. }));
    assert_eq!(&e.encap_header()[12..16], &[192, 0, 2, 7]);
}

#[test]
fn too_big_for_the_tunnel_draws_frag_needed_from_the_vip() {
    let mut e = engine(&table(Proto::Tcp, 2, Mode::DsrGue), 1500);
    let mut syn = client(PROTO_TCP, 40000, TcpFlags::SYN, b"").build();
    assert!(matches!(e.process(&mut syn), Verdict::Encap { .. }));
    // A first packet too big for the tunnel opens no flow.
    let mut big_syn = client(PROTO_TCP, 40001, TcpFlags::SYN, &[0xab; 1460]).build();
    assert_eq!(e.process(&mut big_syn), Verdict::Icmp { iface: 0 });
    assert_eq!(e.counters().dsr_flows, 1, "only the first connection's");
    assert_eq!(e.flows().len(), 1);
    // 1500 bytes with DF fit the link but not the link less GUE's 32.
    let big = || client(PROTO_TCP, 40000, TcpFlags::ACK, &[0xab; 1460]);
    let mut f = big().build();
    assert_eq!(u16::from_be_bytes([f[16], f[17]]), 1500);
    assert_eq!(e.process(&mut f), Verdict::Icmp { iface: 0 });
    let icmp = e.generated().to_vec();
    assert_eq!(&icmp[26..30], &VIP, "from the VIP the client sent to");
    assert_eq!(&icmp[30..34], &CLIENT);
    assert_eq!(&icmp[34..36], &[3, 4], "fragmentation needed");
    assert_eq!(
        u16::from_be_bytes([icmp[40], icmp[41]]),
        1468,
        "MTU less GUE"
    );
    assert_eq!(lb::wire::build::verify(&icmp), (true, true));
    // 1468 passes.
    let mut fits = client(PROTO_TCP, 40000, TcpFlags::ACK, &[0xab; 1428]).build();
    assert!(matches!(e.process(&mut fits), Verdict::Encap { .. }));
    // Without DF: not fragmented, dropped and counted.
    let mut nodf = big().build();
    nodf[20] &= !0x40;
    lb::wire::Ipv4Packet::new_checked(&mut nodf[14..])
        .expect("ipv4")
        .fill_checksum();
    assert_eq!(e.process(&mut nodf), Verdict::Drop(DropReason::TooBig));
}

#[test]
fn a_mid_stream_segment_without_a_flow_goes_to_the_backend_maglev_gives_it() {
    let t = table(Proto::Tcp, 4, Mode::DsrL2);
    let mut e = engine(&t, 1500);
    let mut syn = client(PROTO_TCP, 41000, TcpFlags::SYN, b"").build();
    e.process(&mut syn);
    let b = mac_backend(&syn);
    // lbd restarted: a new engine, the same backends, the client's next segment.
    let mut e2 = engine(&t, 1500);
    let mut data = client(PROTO_TCP, 41000, TcpFlags::ACK | TcpFlags::PSH, b"more").build();
    assert_eq!(e2.process(&mut data), Verdict::Tx { iface: 0 });
    assert_eq!(mac_backend(&data), b, "the same backend");
    // It is established, and the client's next segment makes it assured (then it goes
    // to the fast path); a RST without a flow reaches the backend but opens nothing
    // lasting.
    let flow = *e2.flows().iter().next().expect("taken up");
    assert_eq!(flow.state, FlowState::Established);
    assert!(!flow.assured);
    let mut more = client(PROTO_TCP, 41000, TcpFlags::ACK, b"again").build();
    e2.process(&mut more);
    let flow = *e2.flows().iter().next().expect("taken up");
    assert!(flow.assured && flow.fast);
    let mut rst = client(PROTO_TCP, 41999, TcpFlags::RST, b"").build();
    assert_eq!(e2.process(&mut rst), Verdict::Tx { iface: 0 });
    let closed = e2
        .flows()
        .iter()
        .find(|f| f.keys[0].sport == 41999)
        .expect("flow");
    assert_eq!(closed.state, FlowState::Rst);
    // SNAT cannot do that: the backend would see a new source port.
    let mut e3 = engine(&table(Proto::Tcp, 4, Mode::Snat), 1500);
    let mut data = client(PROTO_TCP, 41000, TcpFlags::ACK, b"more").build();
    assert_eq!(e3.process(&mut data), Verdict::Drop(DropReason::NoFlow));
}

#[test]
fn hybrid_sends_tcp_by_dsr_and_udp_by_snat() {
    let tcp = table(Proto::Tcp, 2, Mode::Hybrid);
    let both = tcp
        .apply(&Op::AddService {
            frontend: frontend(Proto::Udp),
            backends: vec![BackendSpec {
                addr: backend(1).into(),
                port: 5353,
                weight: 1,
            }],
            options: ServiceOptions {
                mode: Mode::Hybrid,
                ..ServiceOptions::default()
            },
        })
        .expect("hybrid UDP maps ports");
    let mut e = engine(&both, 1500);
    let syn = client(PROTO_TCP, 40000, TcpFlags::SYN, b"").build();
    let mut f = syn.clone();
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    assert_eq!(&f[14..], &syn[14..], "TCP: DSR");
    let mut u = client(PROTO_UDP, 5000, 0, b"q").build();
    assert_eq!(e.process(&mut u), Verdict::Tx { iface: 0 });
    assert_eq!(&u[26..30], &SNAT, "UDP: from the SNAT address");
    assert_eq!(&u[30..34], &backend(1));
    assert_eq!(u16::from_be_bytes([u[36], u[37]]), 5353);
    assert_eq!(e.counters().dsr_flows, 1);
    assert_eq!(e.mappings(), 1, "only the SNAT flow maps a port");
}

#[test]
fn a_dsr_flow_keeps_its_backend_while_others_come_and_go_and_a_mode_change_is_for_new_flows() {
    for mode in [Mode::DsrL2, Mode::DsrIpip, Mode::DsrGue] {
        let t = table(Proto::Tcp, 4, mode);
        let mut e = engine(&t, 1500);
        // The backend a DSR frame went to: its MAC's (L2) or the tunnel's destination.
        let sent = |e: &mut Engine, flags: u8, payload: &[u8]| {
            let mut f = client(PROTO_TCP, 42000, flags, payload).build();
            match e.process(&mut f) {
                Verdict::Tx { .. } if mode == Mode::DsrL2 => mac_backend(&f),
                Verdict::Encap { .. } => e.encap_header()[19] - 1,
                v => panic!("{mode}: {v:?}"),
            }
        };
        let b = sent(&mut e, TcpFlags::SYN, b"");
        sent(&mut e, TcpFlags::ACK, b"");
        let f = frontend(Proto::Tcp);
        let mut t2 = t.clone();
        for i in (1..=4).filter(|&i| i != b) {
            t2 = t2
                .apply(&Op::RemoveBackend {
                    frontend: f,
                    addr: backend(i).into(),
                    port: 80,
                })
                .expect("remove");
        }
        for i in 5..=8 {
            t2 = t2
                .apply(&Op::AddBackend {
                    frontend: f,
                    backend: BackendSpec {
                        addr: backend(i).into(),
                        port: 80,
                        weight: 10,
                    },
                })
                .expect("add");
        }
        let t2 = t2
            .apply(&Op::SetOptions {
                frontend: f,
                options: ServiceOptions::default(),
            })
            .expect("to snat");
        swap(&mut e, &t2);
        for _ in 0..3 {
            assert_eq!(
                sent(&mut e, TcpFlags::ACK, b"data"),
                b,
                "{mode}: its mode and backend"
            );
        }
        let flow = *e.flows().iter().next().expect("the flow");
        assert_eq!(flow.backend(), (backend(b), 80), "{mode}");
        assert_eq!(
            e.counters().flows_created,
            1,
            "{mode}: the same flow throughout"
        );
        // A new connection gets the new mode.
        let mut syn = client(PROTO_TCP, 42001, TcpFlags::SYN, b"").build();
        assert_eq!(e.process(&mut syn), Verdict::Tx { iface: 0 });
        assert_eq!(&syn[26..30], &SNAT, "{mode}");
    }
}

#[test]
fn an_idle_established_dsr_flow_expires_sooner_and_its_client_keeps_its_backend() {
    let mut e = engine(&table(Proto::Tcp, 4, Mode::DsrL2), 1500);
    let mut syn = client(PROTO_TCP, 43000, TcpFlags::SYN, b"").build();
    e.process(&mut syn);
    let b = mac_backend(&syn);
    let mut ack = client(PROTO_TCP, 43000, TcpFlags::ACK, b"").build();
    e.process(&mut ack);
    let t = lb::Timeouts::default();
    assert!(t.dsr_established < t.tcp_established);
    // Just within the DSR timeout: the same flow.
    e.begin_batch(SEC + t.dsr_established);
    let mut d = client(PROTO_TCP, 43000, TcpFlags::ACK, b"x").build();
    assert_eq!(e.process(&mut d), Verdict::Tx { iface: 0 });
    assert_eq!(e.counters().flows_expired, 0);
    // Silent for longer (the backend closed it, unseen): gone; the client's next segment
    // opens a flow to the same backend.
    e.begin_batch(2 * SEC + 2 * t.dsr_established);
    let mut d = client(PROTO_TCP, 43000, TcpFlags::ACK, b"y").build();
    assert_eq!(e.process(&mut d), Verdict::Tx { iface: 0 });
    assert_eq!(mac_backend(&d), b);
    assert_eq!(e.counters().flows_expired, 1);
    assert_eq!(e.counters().flows_created, 2);
}
