//! End to end through real namespaces: curl and python clients, python backends, lbd
//! with XDP on multi-queue veths. Run as root, one at a time (`--test-threads=1`).

mod common;

use common::topo::{tally, Topo, VIP};

const SVC: &str = "10.96.0.10:80/tcp";

fn three_backends(t: &Topo) {
    t.add_service(SVC, &["10.1.0.11:8080", "10.1.0.12:8080", "10.1.0.13:8080"]);
}

#[test]
fn http_requests_spread_over_all_backends() {
    let Some(t) = Topo::start("spr", 2, 3) else {
        return;
    };
    three_backends(&t);
    let n = 300;
    let bodies = t.curl_many(n);
    let counts = tally(&bodies);
    assert_eq!(
        bodies.len(),
        n as usize,
        "every request answered: {counts:?}\n{}",
        t.lbd_log()
    );
    // Maglev over random client ports: each of 3 backends gets 1/3 ± binomial noise
    // (σ ≈ 8 at n = 300); 20 %..47 % is > 3σ either side.
    for b in ["backend b1", "backend b2", "backend b3"] {
        let c = counts.get(b).copied().unwrap_or(0);
        assert!((60..=140).contains(&c), "{b}: {c} of {n} ({counts:?})");
    }
    assert_eq!(
        counts.len(),
        3,
        "only the three backends answer: {counts:?}"
    );
    assert!(t.worker_sum("flows_created") >= u64::from(n));
    assert_eq!(t.worker_drop("malformed"), 0);
}

#[test]
fn udp_through_the_vip_with_checksums_validated_by_the_receiver() {
    let Some(t) = Topo::start("udp", 2, 3) else {
        return;
    };
    t.lbctl(&[
        "service",
        "add",
        "10.96.0.10:53/udp",
        "-b",
        "10.1.0.11:5353",
        "-b",
        "10.1.0.12:5353",
        "-b",
        "10.1.0.13:5353",
    ]);
    // 200 sockets (200 flows), payloads of varying length and content; the backend's
    // kernel drops a datagram with a wrong checksum, and so does the client's for the
    // reply, so every answer received proves both translations' checksums.
    let out = t.client_py(&format!(
        r#"
import socket
ok = 0; names = set()
for i in range(200):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    payload = bytes([(i * 7 + j) % 256 for j in range(1 + i * 5 % 1200)])
    s.sendto(payload, ("{VIP}", 53))
    data, src = s.recvfrom(65535)
    name, echoed = data.split(b":", 1)
    assert src == ("{VIP}", 53), src
    assert echoed == payload, (i, len(echoed), len(payload))
    names.add(name); ok += 1
print(ok, len(names))
"#
    ));
    assert_eq!(out.trim(), "200 3", "{}", t.lbd_log());
}

#[test]
fn long_lived_connection_survives_changes_to_other_backends() {
    let Some(t) = Topo::start("lng", 2, 4) else {
        return;
    };
    t.lbctl(&[
        "service",
        "add",
        "10.96.0.10:9000/tcp",
        "-b",
        "10.1.0.11:9000",
        "-b",
        "10.1.0.12:9000",
        "-b",
        "10.1.0.13:9000",
    ]);
    // The client holds one connection, reports its backend, then waits for the test to
    // change the service (a file appears), then must get answers from the same backend.
    let flag = std::env::temp_dir().join(format!("{}-go", t.prefix));
    let _ = std::fs::remove_file(&flag);
    let code = format!(
        r#"
import socket, os, time, sys
s = socket.create_connection(("{VIP}", 9000), timeout=5)
f = s.makefile("rwb")
f.write(b"hello\n"); f.flush()
first = f.readline().split(b":")[0]
print(first.decode(), flush=True)
while not os.path.exists("{flag}"):
    time.sleep(0.05)
for i in range(50):
    f.write(b"msg%d\n" % i); f.flush()
    line = f.readline()
    assert line == first + b":msg%d\n" % i, line
print("ok", flush=True)
"#,
        flag = flag.display()
    );
    let mut child = t
        .cmd("client", "python3")
        .args(["-c", &code])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).expect("first line");
    let first = first.trim().to_string();
    assert!(first.starts_with('b'), "connected to a backend: {first:?}");
    // Add a fourth backend (Maglev moves ~1/4 of the table) and remove one that is not
    // ours: the established flow must not move.
    t.lbctl(&["backend", "add", "10.96.0.10:9000/tcp", "10.1.0.14:9000"]);
    let other = ["b1", "b2", "b3"]
        .into_iter()
        .find(|b| *b != first)
        .expect("another backend");
    let other_addr = format!("10.1.0.1{}:9000", &other[1..]);
    t.lbctl(&["backend", "remove", "10.96.0.10:9000/tcp", &other_addr]);
    std::fs::write(&flag, b"go").expect("flag");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("rest");
    let st = child.wait().expect("wait");
    let _ = std::fs::remove_file(&flag);
    assert!(
        st.success() && rest.trim() == "ok",
        "connection broke: {rest:?}\n{}",
        t.lbd_log()
    );
}

#[test]
fn removed_backend_gets_no_new_flows() {
    let Some(t) = Topo::start("rem", 2, 3) else {
        return;
    };
    three_backends(&t);
    let before = tally(&t.curl_many(60));
    assert!(
        before.contains_key("backend b2"),
        "b2 served before removal: {before:?}"
    );
    t.lbctl(&["backend", "remove", SVC, "10.1.0.12:8080"]);
    let list = t.lbctl(&["service", "list"]);
    assert!(!list.contains("10.1.0.12"), "{list}");
    let bodies = t.curl_many(150);
    let after = tally(&bodies);
    assert_eq!(bodies.len(), 150, "{after:?}");
    assert!(
        !after.contains_key("backend b2"),
        "removed backend got flows: {after:?}"
    );
    assert_eq!(after.len(), 2, "{after:?}");
}

fn replies_find_their_flows_on(test: &str, queues: u32) {
    let Some(t) = Topo::start(test, queues, 3) else {
        return;
    };
    let status = t.lbctl_json(&["status"]);
    assert_eq!(
        status["workers"].as_array().map(Vec::len),
        Some(queues as usize)
    );
    three_backends(&t);
    let bodies = t.curl_many(200);
    assert_eq!(bodies.len(), 200, "{:?}\n{}", tally(&bodies), t.lbd_log());
    // Replies hash to any of the queues; those not on their flow's worker are handed
    // over, and every request was still answered.
    let handed = t.worker_sum("handoff_in");
    assert!(
        handed > 0,
        "no reply landed on another queue with {queues} queues"
    );
    assert_eq!(t.worker_sum("handoff_out"), handed);
    assert_eq!(t.worker_drop("handoff_ring_full"), 0);
}

#[test]
fn replies_on_other_queues_reach_their_flows_2_queues() {
    replies_find_their_flows_on("q2", 2);
}

#[test]
fn replies_on_other_queues_reach_their_flows_4_queues() {
    replies_find_their_flows_on("q4", 4);
}

#[test]
fn lb_node_still_answers_ping_and_arp_with_xdp_attached() {
    let Some(t) = Topo::start("png", 2, 1) else {
        return;
    };
    t.lbctl(&["service", "add", SVC, "-b", "10.1.0.11:8080"]);
    for (ns, addr) in [("client", "10.0.0.1"), ("b1", "10.1.0.1")] {
        let _ = t.cmd(ns, "ip").args(["neigh", "flush", "all"]).status();
        let o = t
            .cmd(ns, "ping")
            .args(["-c", "3", "-i", "0.2", "-W", "2", addr])
            .output()
            .expect("ping");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("3 received"), "ping {addr} from {ns}: {out}");
    }
    assert!(
        t.xdp_stat("not_ipv4_passed") > 0,
        "ARP went through the program to the kernel"
    );
}

#[test]
fn malformed_frames_get_a_verdict_and_a_counter() {
    let Some(mut t) = Topo::start("mal", 2, 1) else {
        return;
    };
    t.lbctl(&["service", "add", SVC, "-b", "10.1.0.11:8080"]);
    t.lbctl(&[
        "service",
        "add",
        "10.96.0.10:53/udp",
        "-b",
        "10.1.0.11:5353",
    ]);
    let ping = t
        .cmd("client", "ping")
        .args(["-c", "1", "-W", "2", "10.0.0.1"])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "the client resolves the LB's MAC first"
    );
    // Raw frames from the client: fragments to the VIP, a truncated TCP header, a TCP
    // header with data offset < 5, IHL < 5, and a UDP datagram with IP options (which is
    // valid and must be translated: the backend answers it).
    let out = t.client_py(&format!(
        r#"
import socket, struct
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
lb_mac = bytes.fromhex(open("/sys/class/net/c0/address").read().strip().replace(":", ""))
import subprocess
neigh = subprocess.run(["ip", "neigh", "show", "10.0.0.1"], capture_output=True, text=True).stdout.split()
dst_mac = bytes.fromhex(neigh[neigh.index("lladdr") + 1].replace(":", ""))
src = socket.inet_aton("10.0.0.2"); dst = socket.inet_aton("{VIP}")
def ip(proto, l4, frag=0x4000, ihl=None, opts=b"", ttl=64):
    ihl = 5 + len(opts) // 4 if ihl is None else ihl
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(opts) + len(l4), 1, frag, ttl, proto, 0, src, dst) + opts
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + l4
def eth(p): return dst_mac + lb_mac + b"\x08\x00" + p
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("c0", 0))
tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, 2, 65535, 0, 0)
frames = [
    eth(ip(6, tcp, frag=0x2000)),             # first fragment to the VIP
    eth(ip(6, tcp[:8], frag=0x0010)),          # its later fragment
    eth(ip(6, tcp[:10])),                      # truncated TCP header
    eth(ip(6, tcp[:12] + b"\x40" + tcp[13:])), # data offset 4
    eth(ip(6, tcp, ihl=4)),                    # IHL 4
    eth(b"\x45\x00"),                          # truncated IPv4 header
]
for f in frames * 5:
    s.send(f)
# A UDP datagram with IP options (record route padding: NOP NOP NOP EOL) through the VIP.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("10.0.0.2", 0)); u.settimeout(2)
port = u.getsockname()[1]
payload = b"with-options"
udp = struct.pack("!HHHH", port, 53, 8 + len(payload), 0) + payload
pseudo = src + dst + struct.pack("!BBH", 0, 17, len(udp))
udp = udp[:6] + struct.pack("!H", csum(pseudo + udp)) + udp[8:]
s.send(eth(ip(17, udp, opts=b"\x01\x01\x01\x00")))
data, peer = u.recvfrom(2048)
print(data.decode())
"#
    ));
    assert_eq!(
        out.trim(),
        "b1:with-options",
        "options frame translated and answered"
    );
    assert!(t.lbd_alive(), "lbd survived: {}", t.lbd_log());
    // The first fragment goes to the workers like any frontend packet (it has the
    // ports); its later fragment follows it.
    assert_eq!(
        t.xdp_stat("to_worker_fragment"),
        5,
        "later fragments follow their first × 5"
    );
    assert_eq!(t.xdp_stat("fragment_dropped"), 0);
    assert!(
        t.xdp_stat("malformed_passed") >= 15,
        "three malformed kinds × 5 left to the kernel"
    );
    // And the service still works.
    let bodies = t.curl_many(10);
    assert_eq!(bodies.len(), 10);
}

#[test]
fn lbctl_errors_are_clear_and_change_nothing() {
    let Some(t) = Topo::start("cli", 2, 2) else {
        return;
    };
    t.lbctl(&["service", "add", SVC, "-b", "10.1.0.11:8080"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["service", "add", SVC, "-b", "10.1.0.12:8080"],
            "already exists",
        ),
        (
            &["service", "remove", "10.96.0.99:80/tcp"],
            "no service 10.96.0.99:80/tcp",
        ),
        (
            &["backend", "remove", SVC, "10.1.0.99:8080"],
            "no backend 10.1.0.99:8080",
        ),
        (
            &["backend", "add", SVC, "10.1.0.11:8080"],
            "already in service",
        ),
        (
            &["backend", "add", SVC, "10.1.0.12:8080", "--weight", "99999"],
            "above the maximum",
        ),
        (
            &["backend", "add", SVC, "0.0.0.0:8080"],
            "must be a unicast address",
        ),
        (&["service", "add", "10.96.0.11:80"], "VIP:PORT/tcp"),
        (&["backend", "add", SVC, "10.96.0.10:8080"], "is a VIP"),
        (
            &["service", "add", "10.96.0.12:80/tcp", "-b", "10.96.0.12:80"],
            "is a VIP",
        ),
        (
            &["backend", "add", SVC, "10.1.0.1:8080"],
            "address of this node",
        ),
        (
            &[
                "service",
                "add",
                "10.1.0.1:62000/tcp",
                "-b",
                "10.1.0.11:8080",
            ],
            "inside the NAT port range",
        ),
        (
            &[
                "service",
                "add",
                "10.96.0.11:80/tcp",
                "-b",
                "10.1.0.11:8080",
                "-b",
                "10.1.0.11:8080",
            ],
            "listed twice",
        ),
        (
            &[
                "service",
                "add",
                "10.96.0.11:80/tcp",
                "--affinity",
                "clientip",
            ],
            "none or client-ip",
        ),
        (
            &[
                "service",
                "add",
                "10.96.0.11:80/tcp",
                "--affinity-timeout",
                "60",
            ],
            "needs --affinity client-ip",
        ),
        (
            &[
                "service",
                "add",
                "10.96.0.11:80/tcp",
                "--affinity",
                "client-ip",
                "--affinity-timeout",
                "3d",
            ],
            "not a duration",
        ),
        (
            &["service", "add", "10.96.0.11:80/tcp", "--on-remove", "rst"],
            "reset or drop",
        ),
        (
            &[
                "service",
                "add",
                "10.96.0.11:80/tcp",
                "--table-size",
                "65536",
            ],
            "is not offered",
        ),
        (
            &["service", "set", "10.96.0.99:80/tcp", "--on-remove", "drop"],
            "no service",
        ),
        (
            &["backend", "set-weight", SVC, "10.1.0.99:8080", "2"],
            "no backend",
        ),
        (
            &["backend", "set-weight", SVC, "10.1.0.11:8080", "10001"],
            "above the maximum",
        ),
        (
            &["backend", "drain", "10.96.0.99:80/tcp", "10.1.0.11:8080"],
            "no service",
        ),
    ];
    for (args, needle) in cases {
        let o = t.try_lbctl(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "lbctl {args:?} must fail");
        assert!(
            err.contains(needle),
            "lbctl {args:?}: {err:?} lacks {needle:?}"
        );
    }
    // A socket nobody serves is reported as such.
    let lbctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lbd")).with_file_name("lbctl");
    let o = std::process::Command::new(lbctl)
        .args(["--socket", "/nonexistent/lbd.sock", "status"])
        .output()
        .expect("lbctl");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cannot connect") && err.contains("is lbd running"),
        "{err}"
    );
    let s = t.lbctl_json(&["service", "list"]);
    let services = s["services"].as_array().expect("services");
    assert_eq!(services.len(), 1, "{s}");
    assert_eq!(
        services[0]["backends"].as_array().map(Vec::len),
        Some(1),
        "{s}"
    );
    assert_eq!(t.curl_many(5), vec!["backend b1".to_string(); 5]);
}

#[test]
fn ttl_expiring_at_the_lb_is_answered_by_the_kernel() {
    let Some(t) = Topo::start("ttl", 2, 1) else {
        return;
    };
    t.lbctl(&[
        "service",
        "add",
        "10.96.0.10:53/udp",
        "-b",
        "10.1.0.11:5353",
    ]);
    let out = t.client_py(&format!(
        r#"
import socket
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
icmp.settimeout(3)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
u.sendto(b"expire", ("{VIP}", 53))
while True:
    pkt, src = icmp.recvfrom(2048)
    ihl = (pkt[0] & 15) * 4
    if pkt[ihl] == 11:
        print(src[0], pkt[ihl], pkt[ihl + 1])
        break
u.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
u.settimeout(3)
u.sendto(b"live", ("{VIP}", 53))
print(u.recvfrom(2048)[0].decode())
"#
    ));
    assert_eq!(out.trim(), "10.0.0.1 11 0\nb1:live", "{}", t.lbd_log());
    assert!(t.xdp_stat("ttl_passed") >= 1);
}

#[test]
fn one_armed_on_a_single_interface() {
    if !common::privileged("one_armed") {
        return;
    }
    // Clients and backends on one segment behind lb1: requests and replies enter and
    // leave through the same interface.
    let mut t = Topo::up("one", 2, 3);
    t.start_lbd_on(&["lb1"], &[]);
    let status = t.lbctl_json(&["status"]);
    assert_eq!(
        status["interfaces"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    three_backends(&t);
    let bodies = t.curl_many_from("oc", 150);
    let counts = tally(&bodies);
    assert_eq!(bodies.len(), 150, "{counts:?}\n{}", t.lbd_log());
    assert_eq!(counts.len(), 3, "{counts:?}");
    // The two-armed client is not served: lb0 has no program, so the kernel forwards
    // its VIP packets to its default route instead.
    let o = t
        .cmd("client", "curl")
        .args(["-s", "--max-time", "1", &format!("http://{VIP}/")])
        .output()
        .expect("curl");
    assert!(o.stdout.is_empty() && !o.status.success());
}

/// Two daemons given the same backends, weights, table size and hash seed show the same
/// Maglev fingerprint in `lbctl service list` whatever order the backends were given
/// in; another seed or weight shows another. Shares follow the weights.
#[test]
fn nodes_with_the_same_config_show_the_same_table_fingerprint() {
    if !common::privileged("fingerprint") {
        return;
    }
    let mut t = Topo::up("fpr", 2, 3);
    let seeds = [("a", "0123456789abcdef\n"), ("b", "fedcba9876543210\n")];
    for (name, seed) in seeds {
        std::fs::write(t.dir().join(name), seed).expect("seed file");
    }
    let mut run = |seed: &str, backends: &[&str]| -> (String, Vec<f64>) {
        let path = t.dir().join(seed).to_string_lossy().into_owned();
        t.start_lbd(&["--hash-seed-file", &path]);
        let mut add = vec!["service", "add", "10.96.0.10:80/tcp"];
        for b in backends {
            add.extend(["-b", b]);
        }
        t.lbctl(&add);
        let s = t.lbctl_json(&["service", "list"]);
        t.stop_lbd();
        let svc = &s["services"][0];
        let mut shares: Vec<(String, f64)> = svc["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or("").to_string(),
                    b["share"].as_f64().unwrap_or(0.0),
                )
            })
            .collect();
        shares.sort_by(|a, b| a.0.cmp(&b.0));
        (
            svc["fingerprint"].as_str().unwrap_or("").to_string(),
            shares.into_iter().map(|(_, s)| s).collect(),
        )
    };
    let forward = ["10.1.0.11:8080", "10.1.0.12:8080", "10.1.0.13:8080@2"];
    let (fp, shares) = run("a", &forward);
    assert_eq!(fp.len(), 16, "{fp}");
    for (got, want) in shares.iter().zip([25.0, 25.0, 50.0]) {
        assert!((got - want).abs() <= 0.1, "shares {shares:?}");
    }
    let reversed = ["10.1.0.13:8080@2", "10.1.0.12:8080", "10.1.0.11:8080"];
    assert_eq!(run("a", &reversed).0, fp, "same config, another order");
    assert_ne!(run("b", &forward).0, fp, "another seed");
    let heavier = ["10.1.0.11:8080", "10.1.0.12:8080", "10.1.0.13:8080@3"];
    assert_ne!(run("a", &heavier).0, fp, "another weight");
}
