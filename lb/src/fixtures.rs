//! The fixture table shared by the Rust pipeline tests and the XDP program's
//! BPF_PROG_TEST_RUN tests (after Katran's `{description, input, expected verdict,
//! expected output}` tables): one list of frames with what the XDP program must do with
//! each and what a worker must do with it.
//!
//! The configuration is fixed: VIP 10.0.0.10 with 80/tcp and 53/udp, one backend each
//! (10.1.0.2:8080 and 10.1.0.2:5353, so the expected output frames need no Maglev
//! arithmetic), SNAT address 10.1.0.1 with ports 61000–65535 over two workers (dealt in
//! pairs: worker 0 owns 61000–61001, 61004–61005, …, worker 1 61002–61003, …), one interface `lb0` (one-armed).
//! Expected output frames are built from scratch with full checksums, so comparing bytes
//! also checks the incremental checksum updates.

use crate::netview::{IfaceInfo, NetView, Route};
use crate::service::{BackendSpec, Frontend, Op, Proto, ServiceTable};
use crate::snapshot::{DatapathConfig, Snapshot, SnatConfig, Timeouts};
use crate::wire::build::FrameSpec;
use crate::wire::ipv4::{PROTO_ICMP, PROTO_UDP};
use crate::wire::TcpFlags;
use crate::{DropReason, Verdict};
use std::sync::Arc;

pub const VIP: [u8; 4] = [10, 0, 0, 10];
pub const CLIENT: [u8; 4] = [10, 0, 0, 2];
pub const BACKEND: [u8; 4] = [10, 1, 0, 2];
pub const SNAT: [u8; 4] = [10, 1, 0, 1];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb2];
pub const IFINDEX: u32 = 2;
pub const WORKERS: u16 = 2;
pub const SNAT_PORTS: (u16, u16) = (61000, 65535);

/// What the XDP program does with a frame (observed through its counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// To the XSK of the rx queue: a frontend packet.
    Frontend,
    /// To the XSK of the rx queue: a reply to a NATed flow.
    Reply,
    /// Left to the kernel.
    Pass,
    /// Dropped in XDP (later fragments to a frontend or the SNAT range whose first
    /// fragment the workers did not get; from a masquerade source, those and protocols
    /// without ports).
    Drop,
    /// To the XSK of the rx queue: a packet to masquerade.
    Masq,
    /// To the XSK of the rx queue: from a masquerade source to another inside host's
    /// outside endpoint (hairpinning).
    Hairpin,
}

#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: &'static str,
    pub frame: Vec<u8>,
    pub steer: Steer,
    /// What worker 0 of a fresh engine returns.
    pub verdict: Verdict,
    /// The frame after processing, when the verdict is `Tx` (or the frame was turned
    /// around by hairpinning, whatever happened to it next).
    pub out: Option<Vec<u8>>,
}

/// Run `fx` through `e` and check the verdict, the output frame (bytes and checksums from
/// scratch) or that a frame not sent was left untouched. Panics with the fixture's name.
pub fn check(e: &mut crate::Engine, fx: &Fixture) {
    let mut frame = fx.frame.clone();
    let v = e.process(&mut frame);
    assert_eq!(v, fx.verdict, "{}: verdict", fx.name);
    match &fx.out {
        Some(out) => {
            assert_eq!(&frame, out, "{}: output frame", fx.name);
            assert_eq!(
                crate::wire::build::verify(&frame),
                (true, true),
                "{}: checksums",
                fx.name
            );
        }
        None => assert_eq!(
            frame, fx.frame,
            "{}: a frame not sent is not modified",
            fx.name
        ),
    }
}

pub fn frontends() -> [Frontend; 2] {
    [
        Frontend {
            addr: VIP.into(),
            port: 80,
            proto: Proto::Tcp,
        },
        Frontend {
            addr: VIP.into(),
            port: 53,
            proto: Proto::Udp,
        },
    ]
}

pub fn backends() -> [BackendSpec; 2] {
    [
        BackendSpec {
            addr: BACKEND.into(),
            port: 8080,
            weight: 1,
        },
        BackendSpec {
            addr: BACKEND.into(),
            port: 5353,
            weight: 1,
        },
    ]
}

pub fn table() -> ServiceTable {
    let mut t = ServiceTable::default();
    for (f, b) in frontends().into_iter().zip(backends()) {
        t = t
            .apply(&Op::AddService {
                frontend: f,
                backends: vec![b],
                options: Default::default(),
            })
            .expect("fixture config is valid");
    }
    t
}

pub fn net() -> NetView {
    net_with_mtu(1500)
}

/// The fixture network with this MTU on lb0.
pub fn net_with_mtu(mtu: u16) -> NetView {
    NetView::new(
        vec![IfaceInfo {
            ifindex: IFINDEX,
            name: "lb0".into(),
            mac: LB_MAC,
            addr: Some(SNAT),
            mtu,
            redirect: true,
        }],
        vec![
            Route {
                dst: [10, 0, 0, 0],
                prefix_len: 24,
                ifindex: IFINDEX,
                gateway: None,
            },
            Route {
                dst: [10, 1, 0, 0],
                prefix_len: 24,
                ifindex: IFINDEX,
                gateway: None,
            },
        ],
        [
            (IFINDEX, CLIENT, CLIENT_MAC),
            (IFINDEX, BACKEND, BACKEND_MAC),
        ],
    )
}

pub fn config() -> DatapathConfig {
    DatapathConfig {
        snat: SnatConfig::single(
            SNAT,
            nat::PortRange::new(SNAT_PORTS.0, SNAT_PORTS.1).expect("valid range"),
        ),
        timeouts: Timeouts::default(),
        maglev_size: 251,
        hash_seed: 0,
        workers: WORKERS,
    }
}

pub fn snapshot() -> Snapshot {
    Snapshot::build(1, &config(), &table(), Arc::new(net()), None).expect("fixture snapshot builds")
}

/// The client's SYN to the VIP (port 80 unless changed).
pub fn client_syn() -> FrameSpec {
    FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src: CLIENT,
        dst: VIP,
        ..FrameSpec::default()
    }
}

/// The fixture snapshot on one worker, with `table`, under `generation`.
pub fn one_worker(generation: u64, table: &ServiceTable) -> Snapshot {
    let mut cfg = config();
    cfg.workers = 1;
    Snapshot::build(generation, &cfg, table, Arc::new(net()), None)
        .expect("fixture snapshot builds")
}

/// An engine on `snap` (worker 0, fast path on), its clock at `now`.
pub fn engine_at(snap: Snapshot, now: u64) -> crate::Engine {
    let mut e = crate::Engine::new(0, 1024, Arc::new(snap));
    e.enable_fast_path();
    e.begin_batch(now);
    e
}

/// A client segment to VIP:80 from port `sport`.
pub fn client_segment(sport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    FrameSpec {
        sport,
        dport: 80,
        flags,
        payload: payload.to_vec(),
        ..client_syn()
    }
    .build()
}

/// The backend's segment to the SNAT address's `port`.
pub fn backend_segment(port: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    FrameSpec {
        flags,
        payload: payload.to_vec(),
        ..backend_reply(port)
    }
    .build()
}

/// The SNAT port a client port maps to when it is free (port preservation within the
/// fixture range, parity kept).
pub fn mapped(client_port: u16) -> u16 {
    nat::PortRange::new(SNAT_PORTS.0, SNAT_PORTS.1)
        .expect("valid range")
        .preferred(client_port)
}

/// `spec` as its flow sends it to the backend (its mapped port, TTL − 1).
fn to_backend(spec: &FrameSpec, bport: u16) -> Vec<u8> {
    FrameSpec {
        src_mac: LB_MAC,
        dst_mac: BACKEND_MAC,
        src: SNAT,
        dst: BACKEND,
        sport: mapped(spec.sport),
        dport: bport,
        ttl: spec.ttl - 1,
        ..spec.clone()
    }
    .build()
}

/// The backend's SYN+ACK to the SNAT address's `dport`.
pub fn backend_reply(dport: u16) -> FrameSpec {
    FrameSpec {
        src_mac: BACKEND_MAC,
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        sport: 8080,
        dport,
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ..FrameSpec::default()
    }
}

pub fn fixtures() -> Vec<Fixture> {
    let syn = client_syn();
    let udp = FrameSpec {
        proto: PROTO_UDP,
        dport: 53,
        payload: b"query".to_vec(),
        ..client_syn()
    };
    let opts = FrameSpec {
        ip_options: vec![1, 1, 1, 0],
        ..client_syn()
    };
    let vlan = FrameSpec {
        vlan: Some(100),
        ..client_syn()
    };
    let big = FrameSpec {
        payload: vec![0xab; 1400],
        ..client_syn()
    };
    let mut truncated = syn.build();
    truncated.truncate(14 + 20 + 10);
    // Keep the IP total length consistent with the cut so only the TCP header is short.
    truncated[16..18].copy_from_slice(&30u16.to_be_bytes());
    crate::wire::Ipv4Packet::new_checked(&mut truncated[14..])
        .expect("an IPv4 header")
        .fill_checksum();
    let mut bad_doff = syn.build();
    bad_doff[14 + 20 + 12] = 0x40;
    let mut bad_ihl = syn.build();
    bad_ihl[14] = 0x44;
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VIP);
    let mut ipv6 = syn.build();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let mut bad_ip_sum = syn.build();
    bad_ip_sum[14 + 10] ^= 0x40;
    let mut udp_len_long = udp.build();
    udp_len_long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
    let mut udp_len_short = udp.build();
    udp_len_short[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&9u16.to_be_bytes());
    let flags = |flags: u8| FrameSpec {
        flags,
        ..client_syn()
    };
    let from = |src: [u8; 4]| FrameSpec {
        src,
        ..client_syn()
    };
    let to_mac = |dst_mac: [u8; 6]| FrameSpec {
        dst_mac,
        ..client_syn()
    };
    let tx = Verdict::Tx { iface: 0 };
    let drop = Verdict::Drop;
    let mut rows = vec![
        Fixture {
            name: "tcp syn to vip",
            frame: syn.build(),
            steer: Steer::Frontend,
            verdict: tx,
            out: Some(to_backend(&syn, 8080)),
        },
        Fixture {
            name: "udp to vip",
            frame: udp.build(),
            steer: Steer::Frontend,
            verdict: tx,
            out: Some(to_backend(&udp, 5353)),
        },
        Fixture {
            name: "tcp syn with ip options",
            frame: opts.build(),
            steer: Steer::Frontend,
            verdict: tx,
            out: Some(to_backend(&opts, 8080)),
        },
        Fixture {
            // xlb serves untagged ports: the kernel's VLAN devices own tagged frames,
            // and a worker never forwards a tag onto a port that does not carry it.
            name: "tcp syn behind vlan tag",
            frame: vlan.build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::VlanTagged),
            out: None,
        },
        Fixture {
            name: "1400-byte tcp segment opening a flow",
            frame: big.build(),
            steer: Steer::Frontend,
            verdict: tx,
            out: Some(to_backend(&big, 8080)),
        },
        Fixture {
            // Its packets may have moved queues: worker 1 looks before it is a no_flow.
            name: "tcp ack without flow",
            frame: FrameSpec {
                flags: TcpFlags::ACK,
                ..client_syn()
            }
            .build(),
            steer: Steer::Frontend,
            verdict: Verdict::Probe(1),
            out: None,
        },
        Fixture {
            name: "tcp to vip, unserved port",
            frame: FrameSpec {
                dport: 81,
                ..client_syn()
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::NotForUs),
            out: None,
        },
        Fixture {
            name: "udp to tcp-only port",
            frame: FrameSpec {
                proto: PROTO_UDP,
                ..client_syn()
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::NotForUs),
            out: None,
        },
        Fixture {
            name: "tcp to another host",
            frame: FrameSpec {
                dst: [10, 0, 0, 99],
                ..client_syn()
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::NotForUs),
            out: None,
        },
        Fixture {
            name: "reply owned by worker 1",
            frame: backend_reply(64002).build(),
            steer: Steer::Reply,
            verdict: Verdict::ToWorker(1),
            out: None,
        },
        Fixture {
            name: "reply without flow",
            frame: backend_reply(61000).build(),
            steer: Steer::Reply,
            verdict: drop(DropReason::NoFlow),
            out: None,
        },
        Fixture {
            name: "to snat address below the range (host ssh)",
            frame: FrameSpec {
                dport: 22,
                ..backend_reply(0)
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::NotForUs),
            out: None,
        },
        Fixture {
            name: "to snat range from a non-backend",
            frame: FrameSpec {
                src: [10, 1, 0, 77],
                ..backend_reply(61000)
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::NoFlow),
            out: None,
        },
        Fixture {
            name: "ttl 1 to vip",
            frame: FrameSpec {
                ttl: 1,
                ..client_syn()
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::TtlExceeded),
            out: None,
        },
        Fixture {
            name: "first fragment to vip",
            frame: FrameSpec {
                frag: 0x2000,
                ..client_syn()
            }
            .build(),
            steer: Steer::Frontend,
            verdict: tx,
            out: Some(to_backend(
                &FrameSpec {
                    frag: 0x2000,
                    ..client_syn()
                },
                8080,
            )),
        },
        Fixture {
            name: "later fragment to vip without its first",
            frame: FrameSpec {
                frag: 0x0010,
                ident: 0x4321,
                ..client_syn()
            }
            .build(),
            steer: Steer::Drop,
            verdict: drop(DropReason::Fragment),
            out: None,
        },
        Fixture {
            name: "truncated tcp header",
            frame: truncated,
            steer: Steer::Pass,
            verdict: drop(DropReason::Malformed),
            out: None,
        },
        Fixture {
            name: "tcp data offset below 5",
            frame: bad_doff,
            steer: Steer::Pass,
            verdict: drop(DropReason::Malformed),
            out: None,
        },
        Fixture {
            name: "ihl below 5",
            frame: bad_ihl,
            steer: Steer::Pass,
            verdict: drop(DropReason::Malformed),
            out: None,
        },
        Fixture {
            name: "ethernet runt",
            frame: vec![0x02; 10],
            steer: Steer::Pass,
            verdict: drop(DropReason::Malformed),
            out: None,
        },
        Fixture {
            name: "arp request for vip",
            frame: arp,
            steer: Steer::Pass,
            verdict: drop(DropReason::NotIpv4),
            out: None,
        },
        Fixture {
            name: "ipv6 ethertype",
            frame: ipv6,
            steer: Steer::Pass,
            verdict: drop(DropReason::NotIpv4),
            out: None,
        },
        Fixture {
            name: "icmp echo to vip",
            frame: FrameSpec {
                proto: PROTO_ICMP,
                ..client_syn()
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::NotForUs),
            out: None,
        },
        Fixture {
            name: "icmp echo to snat address",
            frame: FrameSpec {
                proto: PROTO_ICMP,
                ..backend_reply(0)
            }
            .build(),
            steer: Steer::Pass,
            verdict: drop(DropReason::NotForUs),
            out: None,
        },
        Fixture {
            name: "bad ipv4 header checksum",
            frame: bad_ip_sum,
            steer: Steer::Frontend,
            verdict: drop(DropReason::BadIpChecksum),
            out: None,
        },
        Fixture {
            name: "udp length beyond the datagram",
            frame: udp_len_long,
            steer: Steer::Drop,
            verdict: drop(DropReason::LengthMismatch),
            out: None,
        },
        Fixture {
            name: "udp length short of the datagram",
            frame: udp_len_short,
            steer: Steer::Drop,
            verdict: drop(DropReason::LengthMismatch),
            out: None,
        },
    ];
    for (name, f) in [
        ("syn+fin", TcpFlags::SYN | TcpFlags::FIN),
        ("syn+rst", TcpFlags::SYN | TcpFlags::RST),
        ("null flags", 0),
        ("fin without ack", TcpFlags::FIN),
        ("xmas", TcpFlags::FIN | TcpFlags::PSH | TcpFlags::URG),
    ] {
        rows.push(Fixture {
            name,
            frame: flags(f).build(),
            steer: Steer::Frontend,
            verdict: drop(DropReason::InvalidTcpFlags),
            out: None,
        });
    }
    for (name, src) in [
        ("source 127.0.0.1", [127, 0, 0, 1]),
        ("source 0.0.0.0", [0, 0, 0, 0]),
        ("source 255.255.255.255", [255, 255, 255, 255]),
        ("source multicast", [224, 0, 0, 5]),
        ("source 240/4", [240, 1, 2, 3]),
        ("source is the vip", VIP),
    ] {
        rows.push(Fixture {
            name,
            frame: from(src).build(),
            steer: Steer::Drop,
            verdict: drop(DropReason::MartianSource),
            out: None,
        });
    }
    for (name, mac) in [
        ("destination mac of another host", [0x02, 0, 0, 0, 0, 0x99]),
        ("broadcast destination mac", [0xff; 6]),
        ("multicast destination mac", [0x01, 0x00, 0x5e, 0, 0, 1]),
    ] {
        rows.push(Fixture {
            name,
            frame: to_mac(mac).build(),
            steer: Steer::Drop,
            verdict: drop(DropReason::ForeignMac),
            out: None,
        });
    }
    rows
}
