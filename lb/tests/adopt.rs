//! Adoption (`lb::pipeline::adopt`): a restarted lbd rebuilding flows from the fast-path
//! entries its predecessor installed. The adopted flow must translate exactly as the
//! original did, hold its NAT port, be installed again under the new snapshot, and end
//! as a removal says when its backend is gone; entries that do not make a flow of the
//! current configuration are refused.

use lb::fixtures::{self, BACKEND, CLIENT};
use lb::masq_fixtures as mf;
use lb::pipeline::adopt::{inherit, Unadoptable};
use lb::service::{BackendSpec, Op, ServiceTable};
use lb::wire::build::FrameSpec;
use lb::wire::ipv4::PROTO_TCP;
use lb::wire::TcpFlags;
use lb::{Engine, Event, Verdict};

const SEC: u64 = 1_000_000_000;

type Entries = Vec<(flowrec::FlowKey, flowrec::FlowEntry)>;

use fixtures::{
    backend_segment as backend, client_segment as client, engine_at as engine,
    one_worker as lb_snapshot,
};

fn sport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

fn run(e: &mut Engine, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut f = frame.to_vec();
    let v = e.process(&mut f);
    (v, f)
}

/// The fast-path entries among the engine's events (what a worker writes to the map).
fn installed(e: &mut Engine) -> Entries {
    let mut out = Vec::new();
    for ev in e.take_events() {
        if let Event::FastInstall(dirs, n) = ev {
            out.extend(dirs.iter().take(n.into()).copied());
        }
    }
    out
}

/// A client connection through the fixture's TCP service, established and installed:
/// its NAT port and the entries.
fn established(e: &mut Engine, cport: u16) -> (u16, Entries) {
    let (v, out) = run(e, &client(cport, TcpFlags::SYN, b""));
    assert_eq!(v, Verdict::Tx { iface: 0 });
    let port = sport(&out);
    let (v, _) = run(e, &backend(port, TcpFlags::SYN | TcpFlags::ACK, b""));
    assert_eq!(v, Verdict::Tx { iface: 0 });
    let (v, _) = run(e, &client(cport, TcpFlags::ACK, b""));
    assert_eq!(v, Verdict::Tx { iface: 0 });
    let entries = installed(e);
    assert_eq!(entries.len(), 2, "both directions installed");
    (port, entries)
}

#[test]
fn an_adopted_flow_translates_as_the_original_and_is_installed_again() {
    let table = fixtures::table();
    let mut old = engine(lb_snapshot(3, &table), SEC);
    let (port, mut entries) = established(&mut old, 40000);
    // The fast path forwarded packets of it since (its clock), the old lbd died.
    for (_, e) in &mut entries {
        e.last_seen = 5 * SEC;
    }
    // Entries come back from the map in its order, not the flow's.
    entries.reverse();

    let mut new = engine(lb_snapshot(8, &table), 20 * SEC);
    let inh = inherit(new.snapshot(), &entries).expect("adoptable");
    assert_eq!(inh.owner(1), Some(0));
    new.adopt(&inh, 20 * SEC).expect("adopted");
    assert_eq!(new.counters().flows_adopted, 1);
    assert_eq!(new.mappings(), 1, "the flow holds its NAT mapping");
    assert_eq!(new.pool_use(), &[1]);
    let f = *new.flows().iter().next().expect("one flow");
    assert_eq!(
        f.last_seen,
        5 * SEC,
        "its timeout goes on from the fast path's clock"
    );
    assert_eq!(
        f.keys[0].src, CLIENT,
        "the client's direction is the forward one"
    );

    // Both directions, data included, come out byte for byte as from the original.
    for frame in [
        client(
            40000,
            TcpFlags::ACK | TcpFlags::PSH,
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        backend(
            port,
            TcpFlags::ACK | TcpFlags::PSH,
            b"HTTP/1.1 200 OK\r\n\r\n",
        ),
    ] {
        let (va, a) = run(&mut old, &frame);
        let (vb, b) = run(&mut new, &frame);
        assert_eq!(va, Verdict::Tx { iface: 0 });
        assert_eq!((vb, b), (va, a));
    }
    // Installed again, under the new snapshot.
    let again = installed(&mut new);
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|(_, e)| e.generation == 8));
    let mut keys: Vec<_> = again.iter().map(|(k, _)| *k).collect();
    let mut before: Vec<_> = entries.iter().map(|(k, _)| *k).collect();
    keys.sort_by_key(|k| (k.src, k.sport));
    before.sort_by_key(|k| (k.src, k.sport));
    assert_eq!(keys, before);
    // A FIN goes through the adopted flow too.
    let (va, a) = run(&mut old, &client(40000, TcpFlags::FIN | TcpFlags::ACK, b""));
    let (vb, b) = run(&mut new, &client(40000, TcpFlags::FIN | TcpFlags::ACK, b""));
    assert_eq!((vb, b), (va, a));
}

#[test]
fn an_adopted_flows_nat_port_is_not_given_to_another_flow() {
    let table = fixtures::table();
    let mut old = engine(lb_snapshot(1, &table), SEC);
    let (port, entries) = established(&mut old, 40000);
    // Another client port that prefers the same NAT port.
    let other = (1024..u16::MAX)
        .find(|&p| p != 40000 && fixtures::mapped(p) == port)
        .expect("a port with the same preference");

    // Without adoption the restarted lbd would hand that port out again...
    let mut bare = engine(lb_snapshot(2, &table), SEC);
    let (_, out) = run(&mut bare, &client(other, TcpFlags::SYN, b""));
    assert_eq!(
        sport(&out),
        port,
        "the test's premise: the port is preferred"
    );
    // ...with it, the port stays the adopted flow's.
    let mut new = engine(lb_snapshot(2, &table), SEC);
    let inh = inherit(new.snapshot(), &entries).expect("adoptable");
    new.adopt(&inh, SEC).expect("adopted");
    let (v, out) = run(&mut new, &client(other, TcpFlags::SYN, b""));
    assert_eq!(v, Verdict::Tx { iface: 0 });
    assert_ne!(sport(&out), port);
    assert_eq!(new.adopt(&inh, SEC), Err(Unadoptable::Duplicate));
}

#[test]
fn entries_that_make_no_flow_of_this_configuration_are_refused() {
    let table = fixtures::table();
    let mut old = engine(lb_snapshot(1, &table), SEC);
    let (_, entries) = established(&mut old, 40000);
    // The service is gone.
    let empty = lb_snapshot(2, &ServiceTable::default());
    assert_eq!(inherit(&empty, &entries), Err(Unadoptable::Stale));
    // One direction alone, or two that are not one flow's.
    let snap = lb_snapshot(2, &table);
    assert_eq!(inherit(&snap, &entries[..1]), Err(Unadoptable::Unpaired));
    let mut odd = entries.clone();
    odd[1].0.sport = [0, 1];
    assert_eq!(inherit(&snap, &odd), Err(Unadoptable::Unpaired));
    assert_eq!(inherit(&snap, &[]), Err(Unadoptable::Unpaired));
    // Out of an interface this lbd does not serve.
    let mut gone = entries.clone();
    gone[0].1.action.ifindex = 99;
    assert_eq!(inherit(&snap, &gone), Err(Unadoptable::Interface(99)));
    let mut v6 = entries;
    v6[0].0.family = flowrec::FAMILY_IPV6;
    assert_eq!(inherit(&snap, &v6), Err(Unadoptable::Family));
}

#[test]
fn an_adopted_flow_whose_backend_is_gone_ends_as_the_service_says() {
    let table = fixtures::table();
    let mut old = engine(lb_snapshot(1, &table), SEC);
    let (_, entries) = established(&mut old, 40000);
    // The restored service has another backend.
    let moved = table
        .apply(&Op::AddBackend {
            frontend: fixtures::frontends()[0],
            backend: BackendSpec {
                addr: BACKEND.into(),
                port: 8081,
                weight: 1,
            },
        })
        .and_then(|t| {
            t.apply(&Op::RemoveBackend {
                frontend: fixtures::frontends()[0],
                addr: BACKEND.into(),
                port: 8080,
            })
        })
        .expect("valid");
    let mut new = engine(lb_snapshot(2, &moved), SEC);
    let inh = inherit(new.snapshot(), &entries).expect("the service is there");
    new.adopt(&inh, SEC).expect("adopted");
    let (v, _) = run(&mut new, &client(40000, TcpFlags::ACK, b"x"));
    assert!(
        !matches!(v, Verdict::Tx { .. }),
        "not forwarded to a backend the service no longer has: {v:?}"
    );
    assert!(new.flows().is_empty());
    assert_eq!(new.mappings(), 0, "its port is free again");
}

#[test]
fn a_masqueraded_flow_is_adopted_with_its_egress_port() {
    let mut cfg = mf::config(mf::PORTS.0, mf::PORTS.1);
    cfg.workers = 1;
    let mut old = engine(mf::snapshot_from(&cfg), SEC);
    let syn = FrameSpec {
        flags: TcpFlags::SYN,
        ..mf::from_pod(mf::POD_A, mf::REMOTE, PROTO_TCP, 40000, 443)
    };
    let (v, out) = run(&mut old, &syn.build());
    assert!(matches!(v, Verdict::Tx { .. }), "{v:?}");
    let port = sport(&out);
    let out_spec = mf::masqueraded(&syn, port);
    let (v, _) = run(&mut old, &mf::answer(&out_spec).build());
    assert!(matches!(v, Verdict::Tx { .. }), "{v:?}");
    let ack = FrameSpec {
        flags: TcpFlags::ACK,
        ..syn.clone()
    };
    run(&mut old, &ack.build());
    let entries = installed(&mut old);
    assert_eq!(entries.len(), 2);

    let mut new = engine(mf::snapshot_from(&cfg), SEC);
    let inh = inherit(new.snapshot(), &entries).expect("adoptable");
    assert_eq!(inh.kind, lb::flow::FlowKind::Masq);
    assert_eq!(inh.keys[0].src, mf::POD_A);
    new.adopt(&inh, SEC).expect("adopted");
    let data = FrameSpec {
        flags: TcpFlags::ACK | TcpFlags::PSH,
        payload: b"hello".to_vec(),
        ..syn
    };
    let reply = FrameSpec {
        flags: TcpFlags::ACK | TcpFlags::PSH,
        payload: b"world".to_vec(),
        ..mf::answer(&out_spec)
    };
    for frame in [data.build(), reply.build()] {
        let (va, a) = run(&mut old, &frame);
        let (vb, b) = run(&mut new, &frame);
        assert!(matches!(va, Verdict::Tx { .. }), "{va:?}");
        assert_eq!((vb, b), (va, a));
    }
}

#[test]
fn a_dsr_flow_is_adopted_on_its_own_entry() {
    use lb::service::{Mode, ServiceOptions};
    let table = ServiceTable::default()
        .apply(&Op::AddService {
            frontend: fixtures::frontends()[0],
            backends: vec![BackendSpec {
                addr: BACKEND.into(),
                port: 80,
                weight: 1,
            }],
            options: ServiceOptions {
                mode: Mode::DsrL2,
                ..ServiceOptions::default()
            },
        })
        .expect("valid");
    let mut old = engine(lb_snapshot(1, &table), SEC);
    run(&mut old, &client(40000, TcpFlags::SYN, b""));
    run(&mut old, &client(40000, TcpFlags::ACK, b""));
    let entries = installed(&mut old);
    assert_eq!(entries.len(), 1, "one direction");
    let mut new = engine(lb_snapshot(4, &table), SEC);
    let inh = inherit(new.snapshot(), &entries).expect("adoptable");
    assert_eq!(inh.owner(2), None, "a DSR flow has no NAT port to follow");
    assert_eq!(inh.backend(), (BACKEND, 80));
    new.adopt(&inh, SEC).expect("adopted");
    assert_eq!(new.mappings(), 0, "no NAT port");
    let frame = client(40000, TcpFlags::ACK | TcpFlags::PSH, b"data");
    let (va, a) = run(&mut old, &frame);
    let (vb, b) = run(&mut new, &frame);
    assert_eq!((vb, b), (va, a));
    assert_eq!(installed(&mut new).len(), 1, "installed again");
}
