//! What operators do to a running service, against the engine: client-ip affinity (with
//! and without a timeout), draining a backend, and removing one (the outcome its clients
//! get: a reset with the sequence number they expect, or silence), and the sweep ending
//! a removed backend's flows in bounded time.

use lb::fixtures::{self, CLIENT_MAC, LB_MAC, SNAT, VIP};
use lb::netview::NetView;
use lb::service::{Affinity, BackendSpec, Frontend, OnRemove, Op, ServiceOptions, ServiceTable};
use lb::snapshot::FrontendKey;
use lb::wire::build::{verify, FrameSpec};
use lb::wire::ipv4::PROTO_UDP;
use lb::wire::TcpFlags;
use lb::{DatapathConfig, DropReason, Engine, Snapshot, Verdict};
use std::sync::Arc;

const SEC: u64 = 1_000_000_000;
const PORT: u16 = 8080;

/// Backend `i` (1-based): 10.1.0.(1+i), its MAC ends in 0xb0+i.
fn backend(i: u8) -> [u8; 4] {
    [10, 1, 0, 1 + i]
}

/// Client `i`: 10.0.0.(20+i).
fn client(i: u8) -> [u8; 4] {
    [10, 0, 0, 20 + i]
}

fn tcp() -> Frontend {
    fixtures::frontends()[0]
}

/// A network where 20 clients and 8 backends are resolved neighbours.
fn net() -> Arc<NetView> {
    let base = fixtures::net();
    let mut neigh = Vec::new();
    for i in 0..20 {
        neigh.push((fixtures::IFINDEX, client(i), CLIENT_MAC));
    }
    for i in 1..=8 {
        neigh.push((fixtures::IFINDEX, backend(i), [2, 0, 0, 0, 0, 0xb0 + i]));
    }
    Arc::new(NetView::new(
        base.ifaces.clone(),
        base.routes().to_vec(),
        neigh,
    ))
}

fn cfg(workers: u16) -> DatapathConfig {
    let mut c = fixtures::config();
    c.workers = workers;
    c.maglev_size = 65_537;
    c
}

/// A table with the TCP service on backends `1..=n` (weight 1) and `opts`.
fn table(n: u8, opts: ServiceOptions) -> ServiceTable {
    ServiceTable::default()
        .apply(&Op::AddService {
            frontend: tcp(),
            backends: (1..=n)
                .map(|i| BackendSpec {
                    addr: backend(i).into(),
                    port: PORT,
                    weight: 1,
                })
                .collect(),
            options: opts,
        })
        .expect("valid")
}

/// The next snapshot of `e`'s for `t`.
fn swap(e: &mut Engine, t: &ServiceTable, workers: u16) {
    let prev = Arc::clone(e.snapshot());
    let s =
        Snapshot::build(prev.generation + 1, &cfg(workers), t, net(), Some(&prev)).expect("build");
    e.set_snapshot(Arc::new(s));
}

fn engine(t: &ServiceTable, workers: u16, worker: u16) -> Engine {
    let s = Snapshot::build(1, &cfg(workers), t, net(), None).expect("build");
    let mut e = Engine::new(worker, 1024, Arc::new(s));
    e.begin_batch(SEC);
    e
}

fn seg(src: [u8; 4], sport: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src,
        dst: VIP,
        sport,
        dport: 80,
        flags,
        seq,
        ack,
        ..FrameSpec::default()
    }
    .build()
}

/// The backend a forwarded frame went to (last octet of its destination).
fn to(frame: &[u8]) -> u8 {
    frame[33] - 1
}

/// The SNAT port a forwarded frame left from.
fn sport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

/// Open a connection from `src:cport` on a one-worker engine; its backend and SNAT port.
fn open(e: &mut Engine, src: [u8; 4], cport: u16) -> (u8, u16) {
    let mut f = seg(src, cport, TcpFlags::SYN, 100, 0);
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    (to(&f), sport(&f))
}

fn client_ip() -> ServiceOptions {
    ServiceOptions {
        affinity: Affinity::ClientIp,
        ..ServiceOptions::default()
    }
}

#[test]
fn client_ip_affinity_sends_every_connection_of_a_client_to_one_backend() {
    let spread = |opts: ServiceOptions, src: [u8; 4]| {
        let mut e = engine(&table(4, opts), 1, 0);
        let mut seen = std::collections::BTreeSet::new();
        for p in 0..64 {
            seen.insert(open(&mut e, src, 30000 + p).0);
        }
        seen
    };
    // Hashed on the 5-tuple, one client's connections spread over the backends.
    assert_eq!(spread(ServiceOptions::default(), client(0)).len(), 4);
    // On the client address, they all reach one; different clients still spread.
    let mut chosen = std::collections::BTreeSet::new();
    for c in 0..20 {
        let s = spread(client_ip(), client(c));
        assert_eq!(s.len(), 1, "client {c}: {s:?}");
        chosen.extend(s);
    }
    assert!(
        chosen.len() >= 3,
        "clients spread over backends: {chosen:?}"
    );
}

#[test]
fn affinity_timeout_keeps_a_client_on_its_backend_across_changes_until_it_expires() {
    let opts = ServiceOptions {
        affinity_timeout_s: Some(60),
        ..client_ip()
    };
    let one = table(1, opts);
    let mut e = engine(&one, 1, 0);
    assert_eq!(open(&mut e, client(0), 30000).0, 1);
    // Backend 2 takes almost the whole table: without memory the client would move.
    let heavy = one
        .apply(&Op::AddBackend {
            frontend: tcp(),
            backend: BackendSpec {
                addr: backend(2).into(),
                port: PORT,
                weight: 10_000,
            },
        })
        .expect("add");
    swap(&mut e, &heavy, 1);
    let mut plain = engine(&table(1, client_ip()), 1, 0);
    swap(
        &mut plain,
        &heavy
            .apply(&Op::SetOptions {
                frontend: tcp(),
                options: client_ip(),
            })
            .expect("set"),
        1,
    );
    assert_eq!(open(&mut plain, client(0), 30000).0, 2, "hashed: moves");
    // Remembered: stays, and each new connection restarts the timeout.
    let mut now = SEC;
    for p in 1..=5 {
        now += 50 * SEC;
        e.begin_batch(now);
        assert_eq!(open(&mut e, client(0), 30000 + p).0, 1, "connection {p}");
    }
    // Another client has no memory: it gets the hashed backend.
    assert_eq!(open(&mut e, client(1), 30000).0, 2);
    // 61 s without a new connection: forgotten.
    now += 61 * SEC;
    e.begin_batch(now);
    assert_eq!(open(&mut e, client(0), 31000).0, 2);
    // A drained backend takes no new flow, remembered or not.
    let mut e = engine(&one, 1, 0);
    assert_eq!(open(&mut e, client(0), 30000).0, 1);
    let drained = heavy
        .apply(&Op::SetWeight {
            frontend: tcp(),
            addr: backend(1).into(),
            port: PORT,
            weight: 0,
        })
        .expect("drain");
    swap(&mut e, &drained, 1);
    assert_eq!(open(&mut e, client(0), 30001).0, 2);
}

#[test]
fn with_an_affinity_timeout_a_clients_connections_open_on_one_worker() {
    let opts = ServiceOptions {
        affinity_timeout_s: Some(600),
        ..client_ip()
    };
    let t = table(4, opts);
    let mut e = [engine(&t, 2, 0), engine(&t, 2, 1)];
    for c in 0..8 {
        let mut homes = std::collections::BTreeSet::new();
        let mut backends = std::collections::BTreeSet::new();
        for p in 0..16u16 {
            // The SYN lands on either worker (RSS); it opens on the client's home.
            let w = usize::from(p % 2);
            let mut f = seg(client(c), 30000 + p, TcpFlags::SYN, 1, 0);
            let home = match e[w].process(&mut f) {
                Verdict::Tx { .. } => w,
                Verdict::ToWorker(h) => {
                    let h = usize::from(h);
                    assert_eq!(e[h].process_probe(&mut f, 1), Verdict::Tx { iface: 0 });
                    h
                }
                v => panic!("{v:?}"),
            };
            homes.insert(home);
            backends.insert(to(&f));
            // Its SNAT port is the home's, so replies reach the flow there.
            assert_eq!(nat::port_owner(sport(&f), 2), home as u16);
        }
        assert_eq!(homes.len(), 1, "client {c}: one home");
        assert_eq!(backends.len(), 1, "client {c}: one backend");
    }
}

#[test]
fn a_drained_backend_keeps_its_flows_gets_no_new_ones_and_they_are_counted() {
    let t = table(2, ServiceOptions::default());
    let mut e = engine(&t, 1, 0);
    let mut on = [Vec::new(), Vec::new()];
    for p in 0..100 {
        let (b, _) = open(&mut e, client(0), 30000 + p);
        on[usize::from(b) - 1].push(30000 + p);
    }
    assert!(!on[0].is_empty() && !on[1].is_empty());
    let drained = t
        .apply(&Op::SetWeight {
            frontend: tcp(),
            addr: backend(2).into(),
            port: PORT,
            weight: 0,
        })
        .expect("drain");
    swap(&mut e, &drained, 1);
    for &p in &on[1] {
        let mut f = seg(client(0), p, TcpFlags::ACK, 101, 1);
        assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
        assert_eq!(to(&f), 2, "established flows stay on the drained backend");
    }
    for p in 0..100 {
        assert_eq!(
            open(&mut e, client(0), 40000 + p).0,
            1,
            "new flows avoid it"
        );
    }
    let fk = FrontendKey::from(&tcp());
    let counts = e.backend_flows();
    assert_eq!(
        counts.get(&(fk, backend(2), PORT)),
        Some(&(on[1].len() as u64))
    );
    assert_eq!(
        counts.get(&(fk, backend(1), PORT)),
        Some(&(on[0].len() as u64 + 100))
    );
    // A closing connection no longer counts: the backend drains as its clients finish.
    let mut fin = seg(client(0), on[1][0], TcpFlags::FIN | TcpFlags::ACK, 102, 1);
    assert_eq!(e.process(&mut fin), Verdict::Tx { iface: 0 });
    assert_eq!(
        e.backend_flows().get(&(fk, backend(2), PORT)),
        Some(&(on[1].len() as u64 - 1))
    );
}

/// Backend 2's flows from `client(0)` after opening 100 connections, and the engine.
fn with_flows_on_two(opts: ServiceOptions) -> (Engine, ServiceTable, Vec<(u16, u16)>) {
    let t = table(2, opts);
    let mut e = engine(&t, 1, 0);
    let mut victims = Vec::new();
    for p in 0..100 {
        let (b, snat_port) = open(&mut e, client(0), 30000 + p);
        if b == 2 {
            victims.push((30000 + p, snat_port));
        }
    }
    assert!(victims.len() >= 2);
    let removed = t
        .apply(&Op::RemoveBackend {
            frontend: tcp(),
            addr: backend(2).into(),
            port: PORT,
        })
        .expect("remove");
    swap(&mut e, &removed, 1);
    (e, removed, victims)
}

fn word(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
}

#[test]
fn removing_a_backend_resets_its_clients_with_the_sequence_number_they_expect() {
    let (mut e, _, victims) = with_flows_on_two(ServiceOptions::default());
    let (cport, snat_port) = victims[0];
    // The client's segment: the reset takes its sequence number from the client's ACK.
    let mut f = seg(client(0), cport, TcpFlags::ACK | TcpFlags::PSH, 5000, 9000);
    let before = f.clone();
    assert_eq!(e.process(&mut f), Verdict::Reset { iface: 0 });
    assert_eq!(f, before, "the segment itself is not sent");
    let r = e.generated().to_vec();
    assert_eq!(verify(&r), (true, true), "checksums");
    assert_eq!(&r[0..6], &CLIENT_MAC);
    assert_eq!(&r[6..12], &LB_MAC);
    assert_eq!(&r[26..30], &VIP, "from the VIP");
    assert_eq!(&r[30..34], &client(0));
    assert_eq!(u16::from_be_bytes([r[34], r[35]]), 80);
    assert_eq!(u16::from_be_bytes([r[36], r[37]]), cport);
    assert_eq!(word(&r, 38), 9000, "seq = the client's acknowledgment");
    assert_eq!(r[47], TcpFlags::RST);
    // Its flow is gone: the next segment finds nothing (one worker: no_flow).
    let mut again = seg(client(0), cport, TcpFlags::ACK, 5000, 9000);
    assert_eq!(e.process(&mut again), Verdict::Drop(DropReason::NoFlow));

    // The backend's segment (it spoke first): the client gets the reset, with the
    // backend's sequence number, which is what the client expects next.
    let (cport, snat_port2) = victims[1];
    let mut from_backend = FrameSpec {
        src_mac: [2, 0, 0, 0, 0, 0xb2],
        dst_mac: LB_MAC,
        src: backend(2),
        dst: SNAT,
        sport: PORT,
        dport: snat_port2,
        flags: TcpFlags::ACK | TcpFlags::PSH,
        seq: 7000,
        ack: 3000,
        payload: b"late".to_vec(),
        ..FrameSpec::default()
    }
    .build();
    assert_eq!(e.process(&mut from_backend), Verdict::Reset { iface: 0 });
    let r = e.generated();
    assert_eq!(verify(r), (true, true));
    assert_eq!(&r[30..34], &client(0));
    assert_eq!(u16::from_be_bytes([r[36], r[37]]), cport);
    assert_eq!((word(r, 38), word(r, 42)), (7000, 3000));
    assert_eq!(r[47], TcpFlags::RST | TcpFlags::ACK);
    assert_eq!(e.counters().resets_sent, 2);
    assert_eq!(e.counters().drops[DropReason::BackendRemoved as usize], 2);
    let _ = snat_port;
}

#[test]
fn with_on_remove_drop_the_clients_get_nothing() {
    let opts = ServiceOptions {
        on_remove: OnRemove::Drop,
        ..ServiceOptions::default()
    };
    let (mut e, _, victims) = with_flows_on_two(opts);
    for (cport, _) in victims {
        let mut f = seg(client(0), cport, TcpFlags::ACK, 5000, 9000);
        assert_eq!(e.process(&mut f), Verdict::Drop(DropReason::BackendRemoved));
    }
    assert_eq!(e.counters().resets_sent, 0);
}

/// Run the clock from `from` for `secs` seconds in 100 ms batches.
fn run_clock(e: &mut Engine, from: u64, secs: u64) -> u64 {
    let mut now = from;
    for _ in 0..secs * 10 {
        now += SEC / 10;
        e.begin_batch(now);
    }
    now
}

#[test]
fn the_sweep_ends_a_removed_backends_idle_flows_in_bounded_time() {
    let fk = FrontendKey::from(&tcp());
    // Flows to backend 2 in the table, live or kept to answer with a reset.
    let on_two = |e: &Engine| {
        e.flows()
            .iter()
            .filter(|f| f.backend() == (backend(2), PORT))
            .count()
    };
    // Drop: gone within one sweep period; the other backend's flows stay.
    let drop = ServiceOptions {
        on_remove: OnRemove::Drop,
        ..ServiceOptions::default()
    };
    let (mut e, _, victims) = with_flows_on_two(drop);
    let before = e.flows().len();
    assert_eq!(on_two(&e), victims.len());
    run_clock(&mut e, SEC, 5);
    assert_eq!(on_two(&e), 0);
    assert_eq!(e.flows().len(), before - victims.len());
    assert_eq!(e.backend_flows().get(&(fk, backend(2), PORT)), None);

    // Reset: kept (not counted as live) for the transitory timeout after the removal, so
    // that the client's next segment still draws its reset, then gone.
    let (mut e, _, victims) = with_flows_on_two(ServiceOptions::default());
    let now = run_clock(&mut e, SEC, 5);
    assert_eq!(on_two(&e), victims.len());
    assert_eq!(e.backend_flows().get(&(fk, backend(2), PORT)), None);
    let mut f = seg(client(0), victims[0].0, TcpFlags::ACK, 5000, 9000);
    assert_eq!(e.process(&mut f), Verdict::Reset { iface: 0 });
    assert_eq!(on_two(&e), victims.len() - 1);
    // Added again before a silent flow spoke: that flow goes on (and counts again).
    let (mut back, table, victims) = with_flows_on_two(ServiceOptions::default());
    run_clock(&mut back, SEC, 5);
    let again = table
        .apply(&Op::AddBackend {
            frontend: tcp(),
            backend: BackendSpec {
                addr: backend(2).into(),
                port: PORT,
                weight: 1,
            },
        })
        .expect("add again");
    swap(&mut back, &again, 1);
    let mut f = seg(client(0), victims[0].0, TcpFlags::ACK, 101, 1);
    assert_eq!(back.process(&mut f), Verdict::Tx { iface: 0 });
    assert_eq!(back.backend_flows().get(&(fk, backend(2), PORT)), Some(&1));

    let t = lb::Timeouts::default();
    let now = run_clock(&mut e, now, t.tcp_rst / SEC - 10);
    assert_eq!(on_two(&e), victims.len() - 1, "kept for the whole timeout");
    run_clock(&mut e, now, 15);
    assert_eq!(on_two(&e), 0);
}

#[test]
fn a_udp_client_of_a_removed_backend_moves_with_its_next_datagram() {
    let udp = fixtures::frontends()[1];
    let t = ServiceTable::default()
        .apply(&Op::AddService {
            frontend: udp,
            backends: (1..=2)
                .map(|i| BackendSpec {
                    addr: backend(i).into(),
                    port: 53,
                    weight: 1,
                })
                .collect(),
            options: ServiceOptions::default(),
        })
        .expect("valid");
    let mut e = engine(&t, 1, 0);
    let dgram = |sport: u16| {
        FrameSpec {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src: client(0),
            dst: VIP,
            proto: PROTO_UDP,
            sport,
            dport: 53,
            payload: b"query".to_vec(),
            ..FrameSpec::default()
        }
        .build()
    };
    let mut on_two = None;
    for p in 0..50 {
        let mut f = dgram(30000 + p);
        assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
        if to(&f) == 2 {
            on_two = Some(30000 + p);
        }
    }
    let cport = on_two.expect("a flow on backend 2");
    let removed = t
        .apply(&Op::RemoveBackend {
            frontend: udp,
            addr: backend(2).into(),
            port: 53,
        })
        .expect("remove");
    swap(&mut e, &removed, 1);
    let mut f = dgram(cport);
    assert_eq!(e.process(&mut f), Verdict::Tx { iface: 0 });
    assert_eq!(to(&f), 1, "the datagram went to the live backend");
    assert_eq!(verify(&f), (true, true));
}
