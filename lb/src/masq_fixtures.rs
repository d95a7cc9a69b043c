//! The masquerading fixture table, shared by the pipeline tests and the XDP program's
//! BPF_PROG_TEST_RUN tests (like [`crate::fixtures`] for load balancing).
//!
//! Topology: pods 10.244.1.2 and 10.244.1.3 behind `int0` (the LB node is 10.244.1.1
//! there), the egress interface `ext0` with 203.0.113.7 and a default route via the
//! router 203.0.113.1. Masquerade sources 10.244.0.0/16; the default ip-masq-agent list;
//! NAT ports 61000–65535 over two workers (ports go to them in pairs: worker 0 owns
//! 61000–61001, 61004–61005, …).
//!
//! `steer` is what the XDP program does with the frame arriving on the interface named by
//! `on`; `verdict` is what worker 0 of a fresh engine does with it.

use crate::fixtures::{Fixture, Steer};
use crate::netview::{IfaceInfo, NetView, Route};
use crate::service::ServiceTable;
use crate::snapshot::{DatapathConfig, MasqState, Snapshot, SnatConfig, Timeouts};
use crate::wire::build::{ip_packet, FrameSpec};
use crate::wire::icmp;
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::TcpFlags;
use crate::{DropReason, Verdict};
use std::net::Ipv4Addr;
use std::sync::Arc;

pub const POD_A: [u8; 4] = [10, 244, 1, 2];
pub const POD_B: [u8; 4] = [10, 244, 1, 3];
/// A pod whose address picks the second of two egress addresses (POD_A's picks the first).
pub const POD_C: [u8; 4] = [10, 244, 1, 4];
pub const NODE_INT: [u8; 4] = [10, 244, 1, 1];
pub const EGRESS: [u8; 4] = [203, 0, 113, 7];
pub const ROUTER: [u8; 4] = [203, 0, 113, 1];
/// A destination no default rule covers.
pub const REMOTE: [u8; 4] = [20, 0, 0, 10];
/// A destination inside the default 10.0.0.0/8 rule.
pub const PRIVATE: [u8; 4] = [10, 50, 0, 10];
pub const INT_IFINDEX: u32 = 2;
pub const EXT_IFINDEX: u32 = 3;
pub const INT_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0xaa];
pub const EXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 0xaa];
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x02];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 0x01];
/// Worker 0's first port, and the first port of worker 1.
/// The fixture snapshot's NAT ports.
pub const PORTS: (u16, u16) = (61000, 65535);
/// A port worker 1 owns (ports go to workers in pairs: 63270 / 2 is odd).
pub const WORKER1_PORT: u16 = 63270;

/// The outside port an inside port maps to when it is free (port preservation within
/// the fixture range, parity kept).
pub fn mapped(inside: u16) -> u16 {
    nat::PortRange::new(PORTS.0, PORTS.1)
        .expect("valid range")
        .preferred(inside)
}

/// Which interface a fixture frame arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Internal,
    External,
}

/// The MAC of the interface on `side`: where frames arriving there are addressed.
pub fn mac_of(side: Side) -> [u8; 6] {
    match side {
        Side::Internal => INT_MAC,
        Side::External => EXT_MAC,
    }
}

#[derive(Debug, Clone)]
pub struct MasqFixture {
    pub on: Side,
    pub fx: Fixture,
}

pub fn net() -> NetView {
    net_with_mtu(1500, 1500)
}

/// The fixture network with these link MTUs on int0 and ext0.
pub fn net_with_mtu(int_mtu: u16, ext_mtu: u16) -> NetView {
    NetView::new(
        vec![
            IfaceInfo {
                ifindex: INT_IFINDEX,
                name: "int0".into(),
                mac: INT_MAC,
                addr: Some(NODE_INT),
                mtu: int_mtu,
                redirect: true,
            },
            IfaceInfo {
                ifindex: EXT_IFINDEX,
                name: "ext0".into(),
                mac: EXT_MAC,
                addr: Some(EGRESS),
                mtu: ext_mtu,
                redirect: true,
            },
        ],
        vec![
            Route {
                dst: [10, 244, 1, 0],
                prefix_len: 24,
                ifindex: INT_IFINDEX,
                gateway: None,
            },
            Route {
                dst: [203, 0, 113, 0],
                prefix_len: 24,
                ifindex: EXT_IFINDEX,
                gateway: None,
            },
            Route {
                dst: [0; 4],
                prefix_len: 0,
                ifindex: EXT_IFINDEX,
                gateway: Some(ROUTER),
            },
        ],
        [
            (INT_IFINDEX, POD_A, POD_MAC),
            (INT_IFINDEX, POD_B, POD_MAC),
            (INT_IFINDEX, POD_C, POD_MAC),
            (EXT_IFINDEX, ROUTER, ROUTER_MAC),
        ],
    )
}

pub fn rules(policy: nat::MasqPolicy) -> nat::Masquerade {
    nat::Masquerade::new(
        vec!["10.244.0.0/16".parse().expect("valid")],
        Arc::new(policy),
        Ipv4Addr::from(EGRESS),
        &[Ipv4Addr::from(NODE_INT), Ipv4Addr::from(EGRESS)],
        &[],
    )
}

pub fn config(first: u16, last: u16) -> DatapathConfig {
    DatapathConfig {
        snat: SnatConfig::single(
            EGRESS,
            nat::PortRange::new(first, last).expect("valid range"),
        ),
        timeouts: Timeouts::default(),
        maglev_size: 251,
        hash_seed: 0,
        workers: 2,
    }
}

/// The snapshot with the default policy and the given NAT port range.
pub fn snapshot_with_ports(first: u16, last: u16) -> Snapshot {
    snapshot_from(&config(first, last))
}

/// The snapshot with the default policy and datapath settings `cfg`.
pub fn snapshot_from(cfg: &DatapathConfig) -> Snapshot {
    let s = Snapshot::build(1, cfg, &ServiceTable::default(), Arc::new(net()), None)
        .expect("fixture snapshot builds");
    s.with_masq(
        1,
        Some(Arc::new(MasqState {
            rules: rules(nat::MasqPolicy::defaults()),
            previous: None,
            version: 1,
            filtering: nat::Filtering::default(),
        })),
    )
}

pub fn snapshot() -> Snapshot {
    snapshot_with_ports(PORTS.0, PORTS.1)
}

/// A pod's packet as it reaches int0.
pub fn from_pod(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> FrameSpec {
    FrameSpec {
        src_mac: POD_MAC,
        dst_mac: INT_MAC,
        src,
        dst,
        proto,
        sport,
        dport,
        payload: if proto == PROTO_TCP {
            Vec::new()
        } else {
            b"ping".to_vec()
        },
        ..FrameSpec::default()
    }
}

/// `spec` after masquerading to `port` (or ICMP identifier), as it leaves ext0.
pub fn masqueraded(spec: &FrameSpec, port: u16) -> FrameSpec {
    FrameSpec {
        src_mac: EXT_MAC,
        dst_mac: ROUTER_MAC,
        src: EGRESS,
        sport: port,
        ttl: spec.ttl - 1,
        ..spec.clone()
    }
}

/// The remote's answer to a masqueraded `out` (ports swapped; for ICMP an echo reply).
pub fn answer(out: &FrameSpec) -> FrameSpec {
    let mut a = FrameSpec {
        src_mac: ROUTER_MAC,
        dst_mac: EXT_MAC,
        src: out.dst,
        dst: out.src,
        sport: out.dport,
        dport: out.sport,
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ttl: 60,
        ..out.clone()
    };
    if out.proto == PROTO_ICMP {
        a.icmp_type = icmp::ECHO_REPLY;
        (a.sport, a.dport) = (out.sport, out.dport);
    }
    a
}

/// An ICMP error from `from` (router or remote) to `to`, quoting `quoted` (a frame).
pub fn icmp_error(
    from: [u8; 4],
    to: [u8; 4],
    ty: u8,
    code: u8,
    mtu: u16,
    quoted: &[u8],
) -> FrameSpec {
    FrameSpec {
        src_mac: ROUTER_MAC,
        dst_mac: EXT_MAC,
        src: from,
        dst: to,
        proto: PROTO_ICMP,
        icmp_type: ty,
        icmp_code: code,
        sport: 0,
        dport: mtu,
        payload: ip_packet(quoted, None),
        ttl: 64,
        frag: 0,
        ..FrameSpec::default()
    }
}

pub fn fixtures() -> Vec<MasqFixture> {
    let tx_ext = Verdict::Tx { iface: 1 };
    let drop = Verdict::Drop;
    let udp = from_pod(POD_A, REMOTE, PROTO_UDP, 40000, 53);
    let tcp = from_pod(POD_B, REMOTE, PROTO_TCP, 40001, 443);
    let ping = from_pod(POD_A, REMOTE, PROTO_ICMP, 8, 1);
    let udp_out = masqueraded(&udp, mapped(udp.sport));
    let reply_w1 = FrameSpec {
        dport: WORKER1_PORT,
        ..answer(&udp_out)
    };
    let private = from_pod(POD_A, PRIVATE, PROTO_UDP, 40000, 53);
    let private_out = FrameSpec {
        src_mac: EXT_MAC,
        dst_mac: ROUTER_MAC,
        ttl: private.ttl - 1,
        ..private.clone()
    };
    let expired = icmp_error(
        ROUTER,
        EGRESS,
        icmp::TIME_EXCEEDED,
        0,
        0,
        &masqueraded(&udp, WORKER1_PORT).build(),
    );
    let m =
        |on: Side, name, frame: FrameSpec, steer, verdict, out: Option<FrameSpec>| MasqFixture {
            on,
            fx: Fixture {
                name,
                frame: frame.build(),
                steer,
                verdict,
                out: out.map(|o| o.build()),
            },
        };
    use Side::{External, Internal};
    let mut bad_doff = tcp.build();
    bad_doff[14 + 20 + 12] = 0x40;
    let malformed = MasqFixture {
        on: Internal,
        fx: Fixture {
            name: "pod tcp with data offset below 5",
            frame: bad_doff,
            steer: Steer::Drop,
            verdict: drop(DropReason::Malformed),
            out: None,
        },
    };
    let hairpin = from_pod(POD_B, EGRESS, PROTO_UDP, 40101, 61004);
    let mut all = vec![
        m(
            Internal,
            "pod udp to the egress address in the nat range (hairpinning, no mapping there)",
            hairpin.clone(),
            Steer::Hairpin,
            drop(DropReason::NoFlow),
            // Turned around from POD_B's outside endpoint, then refused: no inside host
            // holds 61004.
            Some(FrameSpec {
                src_mac: INT_MAC,
                src: EGRESS,
                sport: mapped(hairpin.sport),
                ttl: hairpin.ttl - 1,
                ..hairpin.clone()
            }),
        ),
        m(
            Internal,
            "pod tcp to the egress address below the nat range (the node's own ssh)",
            from_pod(POD_B, EGRESS, PROTO_TCP, 40101, 22),
            Steer::Pass,
            drop(DropReason::NotForUs),
            None,
        ),
        m(
            Internal,
            "pod udp to a public address",
            udp.clone(),
            Steer::Masq,
            tx_ext,
            Some(udp_out.clone()),
        ),
        m(
            Internal,
            "pod tcp syn to a public address",
            tcp.clone(),
            Steer::Masq,
            tx_ext,
            Some(masqueraded(&tcp, mapped(tcp.sport))),
        ),
        m(
            Internal,
            "pod ping to a public address",
            ping.clone(),
            Steer::Masq,
            tx_ext,
            Some(masqueraded(&ping, mapped(ping.sport))),
        ),
        m(
            Internal,
            "pod tcp ack without flow: worker 1 may have it",
            FrameSpec {
                flags: TcpFlags::ACK,
                ..tcp.clone()
            },
            Steer::Masq,
            Verdict::Probe(1),
            None,
        ),
        m(
            Internal,
            "pod to a non-masquerade destination",
            private.clone(),
            Steer::Pass,
            tx_ext,
            Some(private_out),
        ),
        m(
            Internal,
            "pod to the node itself",
            from_pod(POD_A, NODE_INT, PROTO_UDP, 40000, 53),
            Steer::Pass,
            drop(DropReason::NotForUs),
            None,
        ),
        m(
            Internal,
            "pod multicast",
            from_pod(POD_A, [239, 1, 1, 1], PROTO_UDP, 40000, 5353),
            Steer::Pass,
            drop(DropReason::NotForUs),
            None,
        ),
        m(
            Internal,
            "not a masquerade source",
            from_pod([192, 168, 7, 7], REMOTE, PROTO_UDP, 40000, 53),
            Steer::Pass,
            drop(DropReason::NotForUs),
            None,
        ),
        m(
            Internal,
            "pod packet with ttl 1",
            FrameSpec {
                ttl: 1,
                ..udp.clone()
            },
            Steer::Pass,
            drop(DropReason::TtlExceeded),
            None,
        ),
        m(
            Internal,
            "pod first fragment to a public address",
            FrameSpec {
                frag: 0x2000,
                ..udp.clone()
            },
            Steer::Masq,
            tx_ext,
            Some(masqueraded(
                &FrameSpec {
                    frag: 0x2000,
                    ..udp.clone()
                },
                mapped(udp.sport),
            )),
        ),
        m(
            Internal,
            "pod later fragment without its first",
            FrameSpec {
                frag: 0x0010,
                ident: 0x4321,
                ..udp.clone()
            },
            Steer::Drop,
            drop(DropReason::Fragment),
            None,
        ),
        m(
            Internal,
            "pod gre to a public address",
            FrameSpec {
                proto: 47,
                ..udp.clone()
            },
            Steer::Drop,
            drop(DropReason::UnsupportedProtocol),
            None,
        ),
        m(
            External,
            "reply to a port of worker 0 without flow",
            answer(&udp_out),
            Steer::Reply,
            drop(DropReason::NoFlow),
            None,
        ),
        m(
            External,
            "reply to a port of worker 1",
            reply_w1,
            Steer::Reply,
            Verdict::ToWorker(1),
            None,
        ),
        m(
            External,
            "echo reply to an identifier of worker 1",
            FrameSpec {
                sport: WORKER1_PORT,
                ..answer(&masqueraded(&ping, WORKER1_PORT))
            },
            Steer::Reply,
            Verdict::ToWorker(1),
            None,
        ),
        m(
            External,
            "time exceeded quoting a flow of worker 1",
            expired,
            Steer::Reply,
            Verdict::ToWorker(1),
            None,
        ),
        m(
            External,
            "tcp syn to the egress address without flow",
            FrameSpec {
                src: [20, 0, 0, 99],
                sport: 5000,
                proto: PROTO_TCP,
                flags: TcpFlags::SYN,
                payload: Vec::new(),
                ..answer(&masqueraded(&udp, 61004))
            },
            Steer::Reply,
            drop(DropReason::NoFlow),
            None,
        ),
        m(
            External,
            "reply to the egress address below the nat range",
            FrameSpec {
                dport: 22,
                ..answer(&udp_out)
            },
            Steer::Pass,
            drop(DropReason::NotForUs),
            None,
        ),
        m(
            External,
            "echo request to the egress address",
            FrameSpec {
                src_mac: ROUTER_MAC,
                dst_mac: EXT_MAC,
                src: REMOTE,
                dst: EGRESS,
                proto: PROTO_ICMP,
                sport: WORKER1_PORT,
                dport: 1,
                ..FrameSpec::default()
            },
            Steer::Pass,
            drop(DropReason::NotForUs),
            None,
        ),
    ];
    all.push(malformed);
    all
}
