//! The steering program against the shared fixture table (lb::fixtures), through
//! BPF_PROG_TEST_RUN: the same frames the Rust pipeline tests run.

use lb::fixtures::{self, Steer};
use lb::flow::Forwarding;
use lb::masq_fixtures::{self as mf, Side};
use lb::wire::build::verify;
use lb::wire::ipv4::PROTO_UDP;
use xdp::abi::Stat;
use xdp::bpf::{Steering, SteeringState};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const ETH_HLEN: usize = 14;

fn loaded() -> Steering {
    let _ = xdp::sys::raise_memlock_limit(); // best effort, as in lbd
    let mut s = Steering::load(None)
        .expect("the program loads and verifies")
        .0;
    let cfg = fixtures::config();
    let state = SteeringState::new(&fixtures::table(), &cfg.snat.pool);
    s.sync(&state)
        .expect("maps accept the fixture configuration");
    // BPF_PROG_TEST_RUN's ingress interface is the namespace's loopback.
    s.set_iface_slot(lo_ifindex(), 0, false, fixtures::LB_MAC)
        .expect("slot");
    s
}

#[test]
fn fixture_table_through_prog_test_run() {
    if !xdp::testing::privileged("fixture_table_through_prog_test_run") {
        return;
    }
    let mut s = loaded();
    for fx in fixtures::fixtures() {
        if fx.frame.len() < ETH_HLEN {
            // The kernel never runs XDP on less than an Ethernet header (test_run says
            // EINVAL; a device cannot deliver one).
            assert!(
                s.test_run(&fx.frame).is_err(),
                "{}: refused by the kernel",
                fx.name
            );
            continue;
        }
        assert_eq!(steer_of(&mut s, &fx.frame), fx.steer, "{}", fx.name);
    }
}

#[test]
fn reasons_are_counted() {
    if !xdp::testing::privileged("reasons_are_counted") {
        return;
    }
    let mut s = loaded();
    let before = s.stats();
    let runnable: Vec<_> = fixtures::fixtures()
        .into_iter()
        .filter(|f| f.frame.len() >= ETH_HLEN)
        .collect();
    for fx in &runnable {
        s.test_run(&fx.frame).expect("test run");
    }
    let after = s.stats();
    let d = |st: Stat| after[st as usize] - before[st as usize];
    let n = runnable.len() as u64;
    assert_eq!(d(Stat::Rx), n);
    // The later fragment without its first (the first fragment is steered now).
    assert_eq!(d(Stat::Fragment), 1);
    assert_eq!(d(Stat::Ttl), 1);
    assert_eq!(d(Stat::NotIpv4), 2);
    assert_eq!(d(Stat::Malformed), 3);
    assert_eq!(d(Stat::Vlan), 1);
    assert_eq!(d(Stat::Martian), 6);
    assert_eq!(d(Stat::ForeignMac), 3);
    assert_eq!(d(Stat::Length), 2);
    // Every frame ends in exactly one final class.
    let classes = d(Stat::Frontend)
        + d(Stat::Reply)
        + d(Stat::Pass)
        + d(Stat::NotIpv4)
        + d(Stat::Malformed)
        + d(Stat::Ttl)
        + d(Stat::Fragment)
        + d(Stat::Vlan)
        + d(Stat::Martian)
        + d(Stat::ForeignMac)
        + d(Stat::Length)
        + d(Stat::FragmentFollows);
    assert_eq!(classes, n);
    // Nothing is bound in a test run: every frame for the workers was dropped, none
    // passed to the kernel untranslated.
    assert_eq!(
        d(Stat::NoXsk),
        d(Stat::Frontend) + d(Stat::Reply) + d(Stat::FragmentFollows)
    );
}

#[test]
fn removing_a_service_stops_steering_it() {
    if !xdp::testing::privileged("removing_a_service_stops_steering_it") {
        return;
    }
    let mut s = loaded();
    let syn = &fixtures::fixtures()[0];
    let before = s.stats()[Stat::Frontend as usize];
    s.test_run(&syn.frame).expect("run");
    assert_eq!(s.stats()[Stat::Frontend as usize], before + 1);
    let empty = SteeringState::new(&Default::default(), &fixtures::config().snat.pool);
    s.sync(&empty).expect("sync");
    s.test_run(&syn.frame).expect("run");
    assert_eq!(
        s.stats()[Stat::Frontend as usize],
        before + 1,
        "no longer steered"
    );
}

fn lo_ifindex() -> u32 {
    std::fs::read_to_string("/sys/class/net/lo/ifindex")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("lo has an ifindex")
}

/// The masquerading configuration of `lb::masq_fixtures`, with BPF_PROG_TEST_RUN's
/// ingress interface (the namespace's loopback) numbered slot 0.
fn masq_loaded(policy: nat::MasqPolicy) -> (Steering, SteeringState) {
    let _ = xdp::sys::raise_memlock_limit();
    let mut s = Steering::load(None)
        .expect("the program loads and verifies")
        .0;
    let cfg = mf::config(61000, 65535);
    let state = SteeringState::new(&Default::default(), &cfg.snat.pool)
        .with_masq(&mf::rules(policy), cfg.snat.ports);
    s.sync(&state)
        .expect("maps accept the masquerading configuration");
    (s, state)
}

/// What the program did with `frame`, read from its return value and counters.
fn steer_of(s: &mut Steering, frame: &[u8]) -> Steer {
    let before = s.stats();
    let ret = s.test_run(frame).expect("test run");
    let after = s.stats();
    let d = |st: Stat| after[st as usize] - before[st as usize];
    assert_eq!(d(Stat::Rx), 1);
    // No XSK is bound in a test run: a frame for the workers is dropped and counted,
    // never passed to the kernel untranslated.
    let to_worker = |steer| {
        assert_eq!(ret, XDP_DROP, "{steer:?}: no socket, no pass");
        assert_eq!(d(Stat::NoXsk), 1, "{steer:?}: counted");
        steer
    };
    if d(Stat::Frontend) == 1 {
        to_worker(Steer::Frontend)
    } else if d(Stat::Masq) == 1 || d(Stat::MasqKeep) == 1 {
        to_worker(Steer::Masq)
    } else if d(Stat::Hairpin) == 1 {
        to_worker(Steer::Hairpin)
    } else if d(Stat::Reply) == 1 || d(Stat::IcmpError) == 1 {
        to_worker(Steer::Reply)
    } else if ret == XDP_DROP {
        Steer::Drop
    } else {
        assert_eq!(ret, XDP_PASS);
        Steer::Pass
    }
}

#[test]
fn masquerade_fixtures_through_prog_test_run() {
    if !xdp::testing::privileged("masquerade_fixtures_through_prog_test_run") {
        return;
    }
    let (mut s, _) = masq_loaded(nat::MasqPolicy::defaults());
    let lo = lo_ifindex();
    for m in mf::fixtures() {
        s.set_iface_slot(lo, 0, m.on == Side::Internal, mf::mac_of(m.on))
            .expect("slot");
        assert_eq!(steer_of(&mut s, &m.fx.frame), m.fx.steer, "{}", m.fx.name);
    }
    // Masquerade sources are only looked for on internal interfaces.
    s.set_iface_slot(lo, 0, false, mf::INT_MAC).expect("slot");
    let pod = mf::fixtures()
        .into_iter()
        .find(|m| m.fx.name == "pod udp to a public address")
        .expect("the row");
    assert_eq!(pod.fx.steer, Steer::Masq);
    assert_eq!(steer_of(&mut s, &pod.fx.frame), Steer::Pass);
}

#[test]
fn kept_flows_stay_steered_after_a_policy_change() {
    if !xdp::testing::privileged("kept_flows_stay_steered_after_a_policy_change") {
        return;
    }
    let (mut s, old) = masq_loaded(nat::MasqPolicy::defaults());
    s.set_iface_slot(lo_ifindex(), 0, true, mf::INT_MAC)
        .expect("slot");
    let flow = mf::from_pod(mf::POD_A, mf::REMOTE, PROTO_UDP, 40000, 53);
    let other = mf::from_pod(mf::POD_A, mf::REMOTE, PROTO_UDP, 40001, 53);
    assert_eq!(steer_of(&mut s, &flow.build()), Steer::Masq);
    // 20.0.0.0/24 becomes non-masquerade; the flow is kept first, as lbd does.
    let key = lb::flow::FlowKey {
        src: mf::POD_A,
        dst: mf::REMOTE,
        sport: 40000,
        dport: 53,
        proto: PROTO_UDP,
    };
    s.keep(&key).expect("keep");
    let policy = nat::MasqPolicy::from_yaml("nonMasqueradeCIDRs: [20.0.0.0/24]\n").expect("valid");
    let cfg = mf::config(61000, 65535);
    let new = SteeringState::new(&Default::default(), &cfg.snat.pool)
        .with_masq(&mf::rules(policy), cfg.snat.ports);
    assert_ne!(old, new);
    s.sync(&new).expect("sync");
    assert_eq!(steer_of(&mut s, &flow.build()), Steer::Masq, "kept");
    assert_eq!(
        steer_of(&mut s, &other.build()),
        Steer::Pass,
        "new flow: kernel"
    );
    // 10.0.0.0/8 left the list: now masqueraded.
    let private = mf::from_pod(mf::POD_A, mf::PRIVATE, PROTO_UDP, 1, 2);
    assert_eq!(steer_of(&mut s, &private.build()), Steer::Masq);
    s.unkeep(&key);
    assert_eq!(s.kept(), 0);
    assert_eq!(steer_of(&mut s, &flow.build()), Steer::Pass, "released");
}

/// One row of the executor table: a frame, and the addresses and ports its action
/// gives it.
struct ActionRow {
    name: &'static str,
    frame: Vec<u8>,
    to: ([u8; 4], [u8; 4], u16, u16),
    /// NAT to `to`, or a direct server return action to the backend (`to`'s unused).
    fwd: Forwarding,
}

/// The executor table: `(frame, action) → frame` rows covering what the executors
/// treat differently (protocols, echo request and reply, odd lengths, a UDP datagram
/// without checksum, one whose translated checksum computes to 0, TTL 2, Ethernet
/// padding after the packet).
fn action_rows() -> Vec<ActionRow> {
    use lb::fixtures::{BACKEND, CLIENT, LB_MAC, SNAT, VIP};
    use lb::wire::build::FrameSpec;
    use lb::wire::ipv4::{PROTO_ICMP, PROTO_TCP};
    use lb::wire::TcpFlags;
    let spec = |proto: u8, payload: &[u8]| FrameSpec {
        dst_mac: LB_MAC,
        src: CLIENT,
        dst: VIP,
        proto,
        sport: 40000,
        dport: 80,
        flags: TcpFlags::ACK | TcpFlags::PSH,
        payload: payload.to_vec(),
        ..FrameSpec::default()
    };
    let fwd = (SNAT, BACKEND, 61000, 8080);
    let mut rows = vec![
        ActionRow {
            name: "tcp data",
            frame: spec(PROTO_TCP, b"GET / HTTP/1.1\r\n\r\n").build(),
            to: fwd,
            fwd: Forwarding::Nat,
        },
        ActionRow {
            name: "tcp, one byte",
            frame: spec(PROTO_TCP, b"x").build(),
            to: fwd,
            fwd: Forwarding::Nat,
        },
        ActionRow {
            name: "tcp, addresses only",
            frame: spec(PROTO_TCP, b"ok").build(),
            to: (SNAT, BACKEND, 40000, 80),
            fwd: Forwarding::Nat,
        },
        ActionRow {
            name: "udp data",
            frame: spec(PROTO_UDP, &[7u8; 100]).build(),
            to: fwd,
            fwd: Forwarding::Nat,
        },
        ActionRow {
            name: "udp, odd length",
            frame: spec(PROTO_UDP, b"seven!!").build(),
            to: fwd,
            fwd: Forwarding::Nat,
        },
        ActionRow {
            name: "udp, ttl 2",
            frame: FrameSpec {
                ttl: 2,
                ..spec(PROTO_UDP, b"last hop")
            }
            .build(),
            to: fwd,
            fwd: Forwarding::Nat,
        },
        ActionRow {
            name: "icmp echo request",
            frame: FrameSpec {
                sport: 0x1234,
                dport: 7,
                icmp_type: lb::wire::icmp::ECHO_REQUEST,
                ..spec(PROTO_ICMP, b"ping")
            }
            .build(),
            to: (SNAT, BACKEND, 0x4321, 0),
            fwd: Forwarding::Nat,
        },
        ActionRow {
            name: "icmp echo reply",
            frame: FrameSpec {
                sport: 0x4321,
                dport: 7,
                icmp_type: lb::wire::icmp::ECHO_REPLY,
                ..spec(PROTO_ICMP, b"pong")
            }
            .build(),
            to: (SNAT, BACKEND, 0, 0x1234),
            fwd: Forwarding::Nat,
        },
    ];
    // No UDP checksum (0): it stays 0.
    let mut none = spec(PROTO_UDP, b"no checksum").build();
    none[34 + 6..34 + 8].copy_from_slice(&[0, 0]);
    rows.push(ActionRow {
        name: "udp without checksum",
        frame: none,
        to: fwd,
        fwd: Forwarding::Nat,
    });
    // Ethernet padding after a short packet: the executors leave it.
    let mut padded = spec(PROTO_UDP, b"hi").build();
    padded.extend_from_slice(&[0; 16]);
    rows.push(ActionRow {
        name: "udp, ethernet padding",
        frame: padded,
        to: fwd,
        fwd: Forwarding::Nat,
    });
    // A datagram whose translated checksum computes to 0, which UDP sends as 0xffff.
    let zero = (0..=u16::MAX)
        .map(|v| spec(PROTO_UDP, &v.to_be_bytes()).build())
        .find(|f| {
            let a = row_action(f, fwd);
            rust_exec(f, &a).is_ok_and(|out| out[40..42] == [0xff, 0xff])
        })
        .expect("a payload whose translated UDP checksum is 0");
    // L2 DSR: the MACs only, whatever the protocol.
    for (name, proto, payload) in [
        ("l2 dsr, tcp", PROTO_TCP, &b"GET /"[..]),
        ("l2 dsr, udp", PROTO_UDP, &b"query"[..]),
    ] {
        rows.push(ActionRow {
            name,
            frame: spec(proto, payload).build(),
            to: fwd,
            fwd: Forwarding::L2Dsr,
        });
    }
    rows.push(ActionRow {
        name: "udp, translated checksum 0 (sent as 0xffff)",
        frame: zero,
        to: fwd,
        fwd: Forwarding::Nat,
    });
    // DSR tunnels: the packet whole behind the outer headers, whatever it carries (its
    // TOS copied out, Ethernet padding left behind the outer packet).
    let mut tos = spec(PROTO_TCP, b"GET / with dscp").build();
    tos[15] = 0xb8;
    fix_ip_checksum(&mut tos);
    let mut padded = spec(PROTO_UDP, b"hi").build();
    padded.extend_from_slice(&[0; 16]);
    for (fwd_kind, names) in [
        (
            Forwarding::Ipip,
            [
                "ipip, tcp",
                "ipip, udp",
                "ipip, echo",
                "ipip, tos",
                "ipip, padding",
            ],
        ),
        (
            Forwarding::Gue,
            [
                "gue, tcp",
                "gue, udp",
                "gue, echo",
                "gue, tos",
                "gue, padding",
            ],
        ),
    ] {
        let echo = FrameSpec {
            sport: 0x1234,
            dport: 7,
            icmp_type: lb::wire::icmp::ECHO_REQUEST,
            ..spec(PROTO_ICMP, b"ping")
        };
        let frames = [
            spec(PROTO_TCP, b"GET / HTTP/1.1\r\n\r\n").build(),
            spec(PROTO_UDP, &[7u8; 333]).build(),
            echo.build(),
            tos.clone(),
            padded.clone(),
        ];
        for (name, frame) in names.into_iter().zip(frames) {
            rows.push(ActionRow {
                name,
                frame,
                to: fwd,
                fwd: fwd_kind,
            });
        }
    }
    rows
}

/// Recompute a built frame's IPv4 header checksum (after a test changed the header).
fn fix_ip_checksum(frame: &mut [u8]) {
    use lb::wire::checksum::{fold, sum};
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = !fold(sum(&frame[14..34]));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// The DSR action of the table's rows: to the backend's MAC, out of the loopback; for
/// the tunnels from the SNAT address to the backend, GUE from port 0xc123 to 6080.
fn dsr_action(fwd: Forwarding) -> flowrec::Action {
    let rw = lb::flow::Rewrite {
        src: fixtures::SNAT,
        dst: fixtures::BACKEND,
        sport: 0xc123,
        dport: 6080,
        src_mac: fixtures::LB_MAC,
        dst_mac: fixtures::BACKEND_MAC,
        mtu: 1500 - fwd.overhead() as u16,
        fwd,
        ..lb::flow::Rewrite::default()
    };
    lb::pipeline::execute::action(&rw, lo_ifindex())
}

/// Run the Rust executor on a copy of `frame` with room to grow: the frame it makes.
fn rust_exec(frame: &[u8], a: &flowrec::Action) -> Result<Vec<u8>, lb::DropReason> {
    let mut buf = frame.to_vec();
    buf.resize(frame.len() + flowrec::ENCAP_MAX, 0);
    let n = lb::pipeline::execute::execute_action(&mut buf, frame.len(), a)?;
    buf.truncate(n);
    Ok(buf)
}

/// The frame's key as the fast path looks it up, and the action of its row.
fn row_key(frame: &[u8]) -> lb::flow::FlowKey {
    let (ihl, proto) = (usize::from(frame[14] & 0x0f) * 4, frame[23]);
    let l4 = &frame[14 + ihl..];
    let word = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    let (sport, dport) = match (proto, l4[0]) {
        (1, 8) => (word(4), 0),
        (1, _) => (0, word(4)),
        _ => (word(0), word(2)),
    };
    lb::flow::FlowKey {
        src: [frame[26], frame[27], frame[28], frame[29]],
        dst: [frame[30], frame[31], frame[32], frame[33]],
        sport,
        dport,
        proto,
    }
}

fn row_action(frame: &[u8], to: ([u8; 4], [u8; 4], u16, u16)) -> flowrec::Action {
    let from = row_key(frame);
    let to = lb::flow::FlowKey {
        src: to.0,
        dst: to.1,
        sport: to.2,
        dport: to.3,
        proto: from.proto,
    };
    let macs = (fixtures::LB_MAC, fixtures::BACKEND_MAC);
    lb::pipeline::execute::nat_action(&from, &to, macs, 1500, lo_ifindex())
}

/// A current (generation 7) fast-path entry of the table's tests carrying `action`.
fn table_entry(action: flowrec::Action) -> flowrec::FlowEntry {
    flowrec::FlowEntry {
        generation: 7,
        last_seen: 0,
        packets: 0,
        bytes: 0,
        worker: 0,
        slot: 0,
        action,
    }
}

/// Every row of the executor table through the Rust executor and, by
/// BPF_PROG_TEST_RUN, through the C one (the row's action installed as a current
/// fast-path entry): the same bytes, and checksums right by full recomputation.
#[test]
fn the_executors_agree_on_every_row_of_the_action_table() {
    if !xdp::testing::privileged("the_executors_agree_on_every_row_of_the_action_table") {
        return;
    }
    const XDP_REDIRECT: u32 = 4;
    let mut s = loaded();
    let mut map = s.fast_path_map().expect("fp_flows");
    s.set_fast_path_generation(7).expect("generation");
    let rows = action_rows();
    assert!(rows.len() >= 23);
    for row in rows {
        let what = row.name;
        let action = match row.fwd {
            Forwarding::Nat => row_action(&row.frame, row.to),
            dsr => dsr_action(dsr),
        };
        let key = row_key(&row.frame).flowrec();
        let entry = table_entry(action);
        map.install(&key, &entry).expect("install");
        let rust = rust_exec(&row.frame, &action).expect("rust executes");
        assert_ne!(rust, row.frame, "{what}: rewritten");
        let (ret, c) = s.test_run_frame(&row.frame).expect("test run");
        assert_eq!(ret, XDP_REDIRECT, "{what}: executed and redirected");
        assert_eq!(c, rust, "{what}: C and Rust bytes");
        let n = row.fwd.overhead();
        if n > 0 {
            check_tunnel(what, &row.frame, &c, &action);
        } else {
            assert_eq!(verify(&c), (true, true), "{what}: checksums");
        }
        let hit = map.get(&key).expect("entry");
        assert_eq!(hit.packets, 1, "{what}: counted once");
        assert!(map.remove(&key));
    }
    // A kind neither executor carries out (Route is reserved): the C fast path leaves
    // the frame to the workers untouched, the Rust executor refuses.
    let row = &action_rows()[0];
    let action = flowrec::Action {
        kind: flowrec::ActionKind::Route as u8,
        ..dsr_action(Forwarding::L2Dsr)
    };
    let key = row_key(&row.frame).flowrec();
    let entry = table_entry(action);
    map.install(&key, &entry).expect("install");
    let (ret, c) = s.test_run_frame(&row.frame).expect("test run");
    assert_ne!(ret, XDP_REDIRECT, "a route action is not executed in C");
    assert_eq!(c, row.frame, "untouched");
    assert!(rust_exec(&row.frame, &action).is_err());
}

/// Two served interfaces whose ifindexes share an `iface_cache` slot: the one registered
/// second (here the loopback, BPF_PROG_TEST_RUN's ingress) is found in the hash map, so
/// its fast-path flows still execute.
#[test]
fn an_interface_whose_cache_slot_is_taken_is_found_in_the_hash() {
    if !xdp::testing::privileged("an_interface_whose_cache_slot_is_taken_is_found_in_the_hash") {
        return;
    }
    const XDP_REDIRECT: u32 = 4;
    let _ = xdp::sys::raise_memlock_limit();
    let mut s = Steering::load(None)
        .expect("the program loads and verifies")
        .0;
    let cfg = fixtures::config();
    s.sync(&SteeringState::new(&fixtures::table(), &cfg.snat.pool))
        .expect("maps");
    let lo = lo_ifindex();
    // Another interface first, in the slot the loopback's ifindex maps to.
    s.set_iface_slot(lo + xdp::abi::IFACE_CACHE, 1, false, [2, 0, 0, 0, 0, 0x77])
        .expect("slot");
    s.set_iface_slot(lo, 0, false, fixtures::LB_MAC)
        .expect("slot");
    s.set_fast_path_generation(7).expect("generation");
    let mut map = s.fast_path_map().expect("fp_flows");
    let row = &action_rows()[0];
    let key = row_key(&row.frame).flowrec();
    map.install(&key, &table_entry(row_action(&row.frame, row.to)))
        .expect("install");
    let (ret, _) = s.test_run_frame(&row.frame).expect("test run");
    assert_eq!(ret, XDP_REDIRECT, "executed: the loopback was found");
    assert_eq!(map.get(&key).map(|e| e.packets), Some(1));
    // A frame to the other interface's MAC is not ours on the loopback.
    let mut foreign = row.frame.clone();
    foreign[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x77]);
    let (ret, _) = s.test_run_frame(&foreign).expect("test run");
    assert_ne!(
        ret, XDP_REDIRECT,
        "not executed for another interface's MAC"
    );
}

/// A tunnelled frame, checked field by field against what a decapsulator expects: the
/// Ethernet header to the backend, the outer IPv4 header (valid checksum, DF, TTL 64,
/// the inner TOS, lengths counting the packet but not the padding, the tunnel's
/// addresses), for GUE the UDP and GUE headers; behind them the client's frame's bytes
/// unchanged.
fn check_tunnel(what: &str, frame: &[u8], out: &[u8], a: &flowrec::Action) {
    use lb::wire::checksum::{fold, sum};
    let n = usize::from(a.encap_len);
    let inner_len = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    assert_eq!(&out[0..6], &fixtures::BACKEND_MAC, "{what}: dst mac");
    assert_eq!(&out[6..12], &fixtures::LB_MAC, "{what}: src mac");
    assert_eq!(&out[12..14], &[0x08, 0x00], "{what}: ethertype");
    let ip = &out[14..34];
    assert_eq!(fold(sum(ip)), 0xffff, "{what}: outer checksum");
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[1], frame[15], "{what}: inner TOS");
    assert_eq!(
        usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        n + inner_len,
        "{what}: outer length"
    );
    assert_eq!(&ip[6..8], &[0x40, 0], "{what}: DF");
    assert_eq!(ip[8], 64, "{what}: TTL");
    assert_eq!(&ip[12..16], &fixtures::SNAT);
    assert_eq!(&ip[16..20], &fixtures::BACKEND);
    if n == 20 {
        assert_eq!(ip[9], 4, "{what}: IPIP");
    } else {
        assert_eq!(ip[9], 17, "{what}: UDP");
        let udp = &out[34..42];
        assert_eq!(udp[0..4], [0xc1, 0x23, 0x17, 0xc0], "{what}: ports");
        let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        assert_eq!(ulen, 8 + 4 + inner_len, "{what}: UDP length");
        assert_eq!(udp[6..8], [0, 0], "{what}: no UDP checksum");
        assert_eq!(out[42..46], [0, 4, 0, 0], "{what}: GUE variant 0, IPv4");
    }
    assert_eq!(
        &out[14 + n..],
        &frame[14..],
        "{what}: the client's packet unchanged"
    );
}

/// The C executor against the Rust one on a masqueraded ICMP echo: installed once the
/// remote answered, the next request and reply are executed by the steering program
/// with the same bytes as the engine writes (identifier and checksum translated).
#[test]
fn the_c_executor_translates_echo_like_the_rust_one() {
    if !xdp::testing::privileged("the_c_executor_translates_echo_like_the_rust_one") {
        return;
    }
    use lb::wire::build::verify;
    use lb::wire::ipv4::PROTO_ICMP;
    use lb::Event;
    const XDP_REDIRECT: u32 = 4;

    let (mut s, _) = masq_loaded(nat::MasqPolicy::defaults());
    let mut map = s.fast_path_map().expect("fp_flows");
    let mut e = lb::Engine::new(0, 64, std::sync::Arc::new(mf::snapshot()));
    e.enable_fast_path();
    e.begin_batch(1_000_000_000);
    s.set_fast_path_generation(e.snapshot().generation)
        .expect("generation");
    let lo = lo_ifindex();
    let run = |e: &mut lb::Engine, f: &lb::wire::build::FrameSpec| {
        let mut b = f.build();
        assert!(matches!(e.process(&mut b), lb::Verdict::Tx { .. }));
        b
    };
    // Identifier 8 keeps its value on worker 0 (see mf::mapped).
    let ping = |seq: u16| mf::from_pod(mf::POD_A, mf::REMOTE, PROTO_ICMP, 8, seq);
    let out = mf::masqueraded(&ping(1), mf::mapped(8));
    run(&mut e, &ping(1));
    assert_eq!(e.take_events().count(), 0, "not before an answer");
    run(&mut e, &mf::answer(&out));
    let mut installed = 0;
    for ev in e.take_events() {
        if let Event::FastInstall(dirs, n) = ev {
            for (k, v) in dirs.iter().take(n.into()) {
                map.install(k, v).expect("install");
                installed += 1;
            }
        }
    }
    assert_eq!(installed, 2, "both directions installed");
    let out2 = mf::masqueraded(&ping(2), mf::mapped(8));
    for (f, side, what) in [
        (ping(2), Side::Internal, "echo request"),
        (mf::answer(&out2), Side::External, "echo reply"),
    ] {
        s.set_iface_slot(lo, 0, side == Side::Internal, mf::mac_of(side))
            .expect("slot");
        let before = s.stats()[Stat::FastPath as usize];
        let rust = run(&mut e, &f);
        let (ret, c) = s.test_run_frame(&f.build()).expect("test run");
        assert_eq!(ret, XDP_REDIRECT, "{what}: executed and redirected");
        assert_eq!(s.stats()[Stat::FastPath as usize] - before, 1, "{what}");
        assert_eq!(c, rust, "{what}: C and Rust bytes");
        assert_eq!(verify(&c), (true, true), "{what}: checksums");
    }
}

/// The flowrec layout both sides assert: every `_Static_assert` of xdp/bpf/flowrec.h,
/// read from the header, against `flowrec::LAYOUT` (so the numbers are one list).
#[test]
fn the_c_header_asserts_the_same_layout_as_flowrec() {
    let h =
        std::fs::read_to_string(xdp::testing::repo().join("xdp/bpf/flowrec.h")).expect("flowrec.h");
    let mut asserted = std::collections::BTreeMap::new();
    for line in h.lines().filter(|l| l.starts_with("_Static_assert(")) {
        let inner = &line["_Static_assert(".len()..];
        let (expr, _) = inner.rsplit_once(", \"").expect("assert message");
        let (lhs, n) = expr.split_once("==").expect("==");
        let n: usize = n.trim().parse().expect("a number");
        let lhs = lhs.trim();
        let (st, field) = if let Some(s) = lhs.strip_prefix("sizeof(struct ") {
            (s.trim_end_matches(')').to_string(), String::new())
        } else {
            let s = lhs
                .strip_prefix("__builtin_offsetof(struct ")
                .expect("sizeof or offsetof")
                .trim_end_matches(')');
            let (st, f) = s.split_once(',').expect("struct, field");
            (st.trim().to_string(), f.trim().to_string())
        };
        asserted.insert((st, field), n);
    }
    let rust: std::collections::BTreeMap<(String, String), usize> = flowrec::LAYOUT
        .iter()
        .map(|(s, f, n)| ((s.to_string(), f.to_string()), *n))
        .collect();
    assert_eq!(asserted, rust);
}

/// The numbers xdp/bpf/flowrec.h defines (limits, families, action kinds and flags)
/// against `flowrec::CONSTANTS`.
#[test]
fn the_c_header_defines_the_same_numbers_as_flowrec() {
    let h =
        std::fs::read_to_string(xdp::testing::repo().join("xdp/bpf/flowrec.h")).expect("flowrec.h");
    let number = |v: &str| -> u64 {
        let v = v.trim().trim_start_matches('(').trim_end_matches(')');
        match v.split_once("<<") {
            Some((a, b)) => {
                let a: u64 = a.trim().trim_end_matches('u').parse().expect("a number");
                a << b.trim().parse::<u64>().expect("a shift")
            }
            None => v.trim_end_matches('u').parse().expect("a number"),
        }
    };
    let mut defined = std::collections::BTreeMap::new();
    for line in h.lines().map(str::trim) {
        if let Some(d) = line.strip_prefix("#define XLB_") {
            if let Some((name, v)) = d.split_once(char::is_whitespace) {
                defined.insert(format!("XLB_{name}"), number(v));
            }
        } else if let Some(e) = line.strip_prefix("XLB_ACT_") {
            let (name, v) = e.split_once('=').expect("an enumerator with its value");
            let v = v.split(',').next().expect("value");
            defined.insert(format!("XLB_ACT_{}", name.trim()), number(v));
        }
    }
    let rust: std::collections::BTreeMap<String, u64> = flowrec::CONSTANTS
        .iter()
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
    assert_eq!(defined, rust);
}

/// The C executor against the Rust one: the same established flow's packets, both
/// directions, TCP with data and UDP, through `lb::Engine` and through the steering
/// program with the engine's installed fast-path entries; the bytes must be equal, and
/// the checksums right by full recomputation. An entry of an older generation is not
/// executed.
#[test]
fn the_c_executor_writes_the_same_bytes_as_the_rust_one() {
    if !xdp::testing::privileged("the_c_executor_writes_the_same_bytes_as_the_rust_one") {
        return;
    }
    use lb::fixtures::{BACKEND, BACKEND_MAC, CLIENT, CLIENT_MAC, LB_MAC, SNAT, VIP};
    use lb::wire::build::{verify, FrameSpec};
    use lb::wire::TcpFlags;
    use lb::Event;
    const XDP_REDIRECT: u32 = 4;

    let mut s = loaded();
    let mut map = s.fast_path_map().expect("fp_flows");
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    let snap = lb::Snapshot::build(
        1,
        &cfg,
        &fixtures::table(),
        std::sync::Arc::new(fixtures::net()),
        None,
    )
    .expect("snapshot");
    let mut e = lb::Engine::new(0, 64, std::sync::Arc::new(snap));
    e.enable_fast_path();
    e.begin_batch(1_000_000_000);
    s.set_fast_path_generation(1).expect("generation");

    let client = |proto: u8, dport: u16, flags: u8, payload: &[u8]| FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src: CLIENT,
        dst: VIP,
        proto,
        sport: 40000,
        dport,
        flags,
        seq: 1000,
        ack: 2000,
        payload: payload.to_vec(),
        ..FrameSpec::default()
    };
    let backend = |proto: u8, sport: u16, dport: u16, flags: u8, payload: &[u8]| FrameSpec {
        src_mac: BACKEND_MAC,
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        proto,
        sport,
        dport,
        flags,
        seq: 2000,
        ack: 1001,
        payload: payload.to_vec(),
        ..FrameSpec::default()
    };
    let run = |e: &mut lb::Engine, f: &FrameSpec| {
        let mut b = f.build();
        assert!(matches!(e.process(&mut b), lb::Verdict::Tx { .. }));
        b
    };
    let install = |e: &mut lb::Engine, map: &mut xdp::bpf::FastPathMap| {
        let mut n = 0;
        for ev in e.take_events() {
            if let Event::FastInstall(dirs, _) = ev {
                for (k, v) in &dirs {
                    map.install(k, v).expect("install");
                    n += 1;
                }
            }
        }
        n
    };
    let compare = |e: &mut lb::Engine, s: &mut Steering, f: FrameSpec, what: &str| {
        let rust = run(e, &f);
        let (ret, c) = s.test_run_frame(&f.build()).expect("test run");
        assert_eq!(ret, XDP_REDIRECT, "{what}: executed and redirected");
        assert_eq!(c, rust, "{what}: C and Rust bytes");
        assert_eq!(verify(&c), (true, true), "{what}: checksums");
    };

    // TCP: the handshake through the engine establishes the flow and installs it.
    let syn = run(&mut e, &client(6, 80, TcpFlags::SYN, b""));
    let port = u16::from_be_bytes([syn[34], syn[35]]);
    run(
        &mut e,
        &backend(6, 8080, port, TcpFlags::SYN | TcpFlags::ACK, b""),
    );
    run(&mut e, &client(6, 80, TcpFlags::ACK, b""));
    assert_eq!(install(&mut e, &mut map), 2, "both directions installed");
    let data = b"GET / HTTP/1.1\r\n\r\n";
    compare(
        &mut e,
        &mut s,
        client(6, 80, TcpFlags::ACK | TcpFlags::PSH, data),
        "tcp forward",
    );
    compare(
        &mut e,
        &mut s,
        backend(6, 8080, port, TcpFlags::ACK, b"HTTP/1.1 200 OK"),
        "tcp reverse",
    );

    // UDP: installed once the backend answered.
    let q = run(&mut e, &client(17, 53, 0, b"query"));
    let uport = u16::from_be_bytes([q[34], q[35]]);
    run(&mut e, &backend(17, 5353, uport, 0, b"answer"));
    assert_eq!(install(&mut e, &mut map), 2);
    compare(
        &mut e,
        &mut s,
        client(17, 53, 0, b"another query"),
        "udp forward",
    );
    compare(
        &mut e,
        &mut s,
        backend(17, 5353, uport, 0, b"another answer"),
        "udp reverse",
    );

    // A newer configuration: the entries are stale and the frame goes to the workers
    // (dropped here: no socket), untouched by the executor.
    s.set_fast_path_generation(2).expect("generation");
    let before = s.stats();
    let f = client(6, 80, TcpFlags::ACK, b"x").build();
    let (ret, out) = s.test_run_frame(&f).expect("test run");
    assert_eq!((ret, out), (XDP_DROP, f));
    let after = s.stats();
    assert_eq!(
        after[Stat::FastPathStale as usize] - before[Stat::FastPathStale as usize],
        1
    );
}
