//! The DSR backend decapsulator (`xlb-decap`) on a backend: IPIP and GUE packets
//! addressed to the backend carry a client's datagram to the VIP; the backend's own
//! stack gets the datagram itself and answers the client from the VIP directly. Run as
//! root (CI does).

mod common;

use common::topo::Topo;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

/// In the client namespace: 20 client datagrams to VIP:7777 inside IPIP and 20 inside
/// GUE (port 6080), all to the backend's address; each answer must come from the VIP
/// and name the client's address and port as the backend saw them.
const CLIENT: &str = r#"
import socket, struct
VIP, B1, ME = "10.96.0.10", "10.1.0.11", "10.0.0.2"

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff

def datagram(payload):
    n = 8 + len(payload)
    src, dst = socket.inet_aton(ME), socket.inet_aton(VIP)
    udp = struct.pack("!HHHH", 40000, 7777, n, 0) + payload
    c = csum(src + dst + struct.pack("!BBH", 0, 17, n) + udp) or 0xffff
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + n, 0, 0x4000, 64, 17, 0, src, dst)
    return ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + udp

rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind((ME, 40000))
rx.settimeout(2)
ipip = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
gue = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for kind in ("ipip", "gue"):
    for i in range(20):
        p = b"%s-%02d" % (kind.encode(), i)
        if kind == "ipip":
            ipip.sendto(datagram(p), (B1, 0))
        else:
            gue.sendto(struct.pack("!BBH", 0, 4, 0) + datagram(p), (B1, 6080))
        answer, sender = rx.recvfrom(200)
        assert sender == (VIP, 7777), sender
        assert answer == b"b1 saw 10.0.0.2:40000 " + p, answer
    print(kind, "answered 20")
print("ok")
"#;

/// The backend's service: bound to the VIP (a DSR backend answers from it), naming who
/// it saw.
const SERVER: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.96.0.10", 7777))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048)
    s.sendto(b"b1 saw %s:%d " % (a[0].encode(), a[1]) + d, a)
"#;

#[test]
fn ipip_and_gue_reach_the_backend_which_answers_from_the_vip() {
    if !common::privileged("decap") {
        return;
    }
    let mut t = Topo::up("dcp", 1, 1);
    // The backend's DSR set-up (docs/operations.md): the VIP on lo, and no ARP answers
    // for it on the segment.
    t.ip("b1", &["addr", "add", "10.96.0.10/32", "dev", "lo"]);
    for (k, v) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let st = t
            .cmd("b1", "sysctl")
            .args(["-qw", &format!("net.ipv4.conf.eth0.{k}={v}")])
            .status()
            .expect("sysctl");
        assert!(st.success());
    }
    // The client reaches the backends' segment through the LB node (its kernel routes).
    t.ip(
        "client",
        &["route", "add", "10.1.0.0/24", "via", "10.0.0.1"],
    );
    t.spawn_ready("b1", "python3", &["-c", SERVER]);
    let mut decap = t
        .cmd("b1", common::topo::decap_path())
        .args(["run", "--iface", "eth0", "--gue-port", "6080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("xlb-decap");
    let mut out = BufReader::new(decap.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    assert_eq!(line.trim(), "ready");

    let said = t.client_py(CLIENT);
    assert!(said.ends_with("ok\n"), "{said}");

    let status = t
        .cmd("b1", common::topo::decap_path())
        .args(["status", "-o", "json"])
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    let counters = &v.as_array().expect("a list")[0]["counters"];
    assert!(counters["ipip_decapsulated"].as_u64() >= Some(20), "{v}");
    assert!(counters["gue_decapsulated"].as_u64() >= Some(20), "{v}");
    // The backend's own traffic (ARP, the answers' neighbour) passed untouched.
    assert!(counters["passed"].as_u64() >= Some(1), "{v}");

    // Stopped, it detaches and reports its counters.
    let pid = decap.id().to_string();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    let st = decap.wait().expect("wait");
    assert!(st.success(), "xlb-decap exited with {st}");
    let mut last = String::new();
    out.read_line(&mut last).expect("counters line");
    let last: serde_json::Value = serde_json::from_str(&last).expect("counters json");
    assert!(last["ipip_decapsulated"].as_u64() >= Some(20), "{last}");
    let link = t
        .cmd("b1", "ip")
        .args(["-j", "link", "show", "eth0"])
        .output()
        .expect("ip");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(!link.contains("\"xdp\""), "still attached: {link}");
}

/// A decapsulator row: its name, the frame, the XDP action, the frame it must leave as
/// (None: untouched) and the counter it counts under.
type Row = (
    &'static str,
    Vec<u8>,
    u32,
    Option<Vec<u8>>,
    xdp::decap::DecapStat,
);

/// The decapsulator's rows through BPF_PROG_TEST_RUN: what it strips (and to which
/// bytes), what it passes untouched, and what it drops as unusable, each counted.
#[test]
fn decapsulator_rows_through_prog_test_run() {
    use lb::wire::build::FrameSpec;
    use lb::wire::checksum::checksum;
    use xdp::decap::{Decap, DecapStat};
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    if !common::privileged("decap-rows") {
        return;
    }
    let me = std::net::Ipv4Addr::new(10, 1, 0, 11);
    let _ = xdp::sys::raise_memlock_limit();
    let mut d = Decap::load(&[me], 6080).expect("the decapsulator loads and verifies");
    // The client's datagram as the backend must get it (Ethernet header included).
    let inner_frame = FrameSpec {
        src: [10, 0, 0, 2],
        dst: [10, 96, 0, 10],
        proto: lb::wire::ipv4::PROTO_UDP,
        sport: 40000,
        dport: 7777,
        payload: b"hello".to_vec(),
        ..FrameSpec::default()
    }
    .build();
    let (eth, inner) = inner_frame.split_at(14);
    // Ethernet + an outer IPv4 header (protocol `proto`, to `dst`, `ihl` words, the
    // fragment word `frag`) + `rest`.
    let outer = |proto: u8, dst: [u8; 4], ihl: u8, frag: u16, rest: &[u8]| {
        let hl = usize::from(ihl) * 4;
        let mut ip = vec![0u8; hl];
        ip[0] = 0x40 | ihl;
        ip[2..4].copy_from_slice(&((hl + rest.len()) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[10, 1, 0, 1]);
        ip[16..20].copy_from_slice(&dst);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        [eth, &ip, rest].concat()
    };
    let gue = |port: u16, first: u8, proto: u8, rest: &[u8]| {
        let mut b = Vec::new();
        b.extend_from_slice(&54321u16.to_be_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&((8 + 4 + rest.len()) as u16).to_be_bytes());
        b.extend_from_slice(&[0, 0, first, proto, 0, 0]);
        b.extend_from_slice(rest);
        b
    };
    let mut v6 = inner.to_vec();
    v6[0] = 0x60;
    let mut arp = eth.to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let rows: Vec<Row> = vec![
        (
            "ipip to this backend",
            outer(4, me.octets(), 5, 0, inner),
            XDP_PASS,
            Some(inner_frame.clone()),
            DecapStat::Ipip,
        ),
        (
            "gue to this backend",
            outer(17, me.octets(), 5, 0, &gue(6080, 0, 4, inner)),
            XDP_PASS,
            Some(inner_frame.clone()),
            DecapStat::Gue,
        ),
        (
            "ipip to another address",
            outer(4, [10, 1, 0, 12], 5, 0, inner),
            XDP_PASS,
            None,
            DecapStat::Pass,
        ),
        (
            "udp to another port",
            outer(17, me.octets(), 5, 0, &gue(6081, 0, 4, inner)),
            XDP_PASS,
            None,
            DecapStat::Pass,
        ),
        (
            "outer header with options",
            outer(4, me.octets(), 6, 0, inner),
            XDP_PASS,
            None,
            DecapStat::Pass,
        ),
        (
            "outer fragment",
            outer(4, me.octets(), 5, 0x2000, inner),
            XDP_PASS,
            None,
            DecapStat::Pass,
        ),
        ("arp", arp, XDP_PASS, None, DecapStat::Pass),
        (
            "gue of another version",
            outer(17, me.octets(), 5, 0, &gue(6080, 0x40, 4, inner)),
            XDP_DROP,
            None,
            DecapStat::Bad,
        ),
        (
            "gue carrying another protocol",
            outer(17, me.octets(), 5, 0, &gue(6080, 0, 41, inner)),
            XDP_DROP,
            None,
            DecapStat::Bad,
        ),
        (
            "ipip whose inner packet is not IPv4",
            outer(4, me.octets(), 5, 0, &v6),
            XDP_DROP,
            None,
            DecapStat::Bad,
        ),
        (
            "ipip with a truncated inner header",
            outer(4, me.octets(), 5, 0, &inner[..12]),
            XDP_DROP,
            None,
            DecapStat::Bad,
        ),
    ];
    for (name, frame, action, want, stat) in rows {
        let before = d.counters().expect("counters");
        let (ret, out) = d.test_run_frame(&frame).expect("test run");
        let after = d.counters().expect("counters");
        assert_eq!(ret, action, "{name}: action");
        if ret == XDP_PASS {
            assert_eq!(out, want.unwrap_or(frame), "{name}: bytes");
        }
        for s in DecapStat::ALL {
            let want = u64::from(s == stat || s == DecapStat::Rx);
            assert_eq!(
                after[s as usize] - before[s as usize],
                want,
                "{name}: {}",
                s.name()
            );
        }
    }
}
