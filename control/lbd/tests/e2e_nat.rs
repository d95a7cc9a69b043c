//! NAT behaviour end to end (RFC 4787/5382 requirements, docs/nat-behaviour.md): new
//! connections through a VIP at wrk's rate without collapse, tens of thousands of
//! concurrent connections to one backend, endpoint-independent mapping and port
//! preservation seen by STUN-style reflectors.

mod common;

use common::topo::{Topo, VIP};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The dedicated SNAT address these tests give lbd (added to lb1 for ARP).
const SNAT: &str = "10.1.0.2";

/// The two-armed topology with `backends` nginx backends (port 8081) behind
/// VIP:80/tcp, lbd SNATing from the dedicated address [`SNAT`].
fn lb_topology(tag: &str, backends: u32, conns: u32, extra: &[&str]) -> Option<Topo> {
    if !common::privileged(tag) {
        return None;
    }
    let mut t = Topo::up(tag, 2, backends);
    for i in 1..=backends {
        t.start_nginx(&format!("b{i}"), conns);
    }
    t.ip("lb", &["addr", "add", &format!("{SNAT}/32"), "dev", "lb1"]);
    let mut args = vec!["--snat-addr", SNAT];
    args.extend_from_slice(extra);
    t.start_lbd(&args);
    let mut add = vec!["service".to_string(), "add".into(), format!("{VIP}:80/tcp")];
    for i in 1..=backends {
        add.extend(["-b".into(), format!("10.1.0.1{i}:8081")]);
    }
    t.lbctl(&add.iter().map(String::as_str).collect::<Vec<_>>());
    Some(t)
}

/// lbd masquerading the pods of the masquerading topology, with `extra` arguments.
fn masquerade(t: &mut Topo, extra: &[&str]) {
    let mut args = vec!["--masquerade-from", "10.244.0.0/16"];
    args.extend_from_slice(extra);
    t.start_lbd_on(&["int0", "ext0"], &args);
}

/// Connections xlb has opened so far (new flows plus reopened closed ones).
fn connections(t: &Topo) -> u64 {
    t.worker_sum("flows_created") + t.worker_sum("flows_reopened")
}

/// Connections the client's stack has opened so far (TCP ActiveOpens of the namespace
/// process `pid` runs in): read from /proc without starting a process or asking lbd, so
/// a sample's time is the time of its value even on a loaded machine.
fn client_opens(pid: u32) -> u64 {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).expect("net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().expect("Tcp header"),
        tcp.next().expect("Tcp values"),
    );
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ActiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .expect("ActiveOpens")
}

/// wrk with `Connection: close` through the VIP for 30 s: every second the client opens
/// at least half the mean rate of new connections, wrk sees no error, and every request
/// was a connection through xlb. (Before port preservation and dedicated SNAT
/// addresses, the rate collapsed to ~500/s after a second as ports ran out.)
#[test]
fn new_connections_through_a_vip_do_not_collapse() {
    for backends in [1, 3] {
        let Some(t) = lb_topology("wrk", backends, 4096, &["--flows-per-worker", "65536"]) else {
            return;
        };
        let wrk = t
            .cmd("client", "wrk")
            .args(["-t2", "-c50", "-d30s", "-H", "Connection: close"])
            .arg(format!("http://{VIP}/"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wrk (deploy/install-deps.sh installs it)");
        let through_xlb = connections(&t);
        // (when, connections the client opened) about once a second; rates are per
        // measured interval. (Sampling xlb's counters with lbctl read a collapse twice in
        // CI where there was none: a call delayed 3-5 s on the loaded machine.)
        let pid = wrk.id();
        let start = Instant::now();
        let mut samples = vec![(start, client_opens(pid))];
        while start.elapsed() < Duration::from_secs(30) {
            let next = start + Duration::from_secs(samples.len() as u64);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            samples.push((Instant::now(), client_opens(pid)));
        }
        let out = wrk.wait_with_output().expect("wrk");
        let total = connections(&t) - through_xlb;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "wrk: {text}");
        let requests: u64 = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("wrk output: {text}"));
        assert!(
            !text.contains("Socket errors") && !text.contains("Non-2xx"),
            "wrk saw errors through xlb:\n{text}"
        );
        // Intervals of at least 0.9 s (a late sample makes one longer interval, and the
        // samples taken in haste after it join the next), inside the run: the first
        // and last are partial.
        let mut kept = vec![samples[0]];
        for &s in &samples[1..] {
            if s.0 - kept[kept.len() - 1].0 >= Duration::from_millis(900) {
                kept.push(s);
            }
        }
        let rates: Vec<u64> = kept
            .windows(2)
            .map(|w| ((w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0).as_secs_f64()) as u64)
            .collect();
        let inner = &rates[1..rates.len() - 1];
        let mean = inner.iter().sum::<u64>() as f64 / inner.len() as f64;
        let slowest = samples
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default();
        eprintln!(
            "{backends} backend(s): {requests} requests, {mean:.0} new connections/s, per second {inner:?} (longest sampling interval {slowest:?})"
        );
        assert!(mean > 100.0, "wrk barely ran: {inner:?}\n{text}");
        for (i, r) in inner.iter().enumerate() {
            assert!(
                *r as f64 >= mean / 2.0,
                "interval {}: {r} new connections/s, under half the mean {mean:.0}: {inner:?}",
                i + 1
            );
        }
        assert!(
            total >= requests,
            "xlb opened {total} connections, fewer than the {requests} requests wrk completed"
        );
        assert_eq!(t.worker_drop("ports_exhausted"), 0);
    }
}

/// 21 000 connections to a one-backend service, all open at once, each answering a
/// request (the issue asks for at least 20 000); every client port is kept on the dedicated SNAT address (the backend
/// sees the client's ports).
#[test]
fn twenty_thousand_concurrent_connections_to_one_backend() {
    let Some(t) = lb_topology("conc", 1, 25_000, &["--flows-per-worker", "32768"]) else {
        return;
    };
    // Three client processes of 7 000 connections each: a process here may not hold
    // 20 000 files (the hard RLIMIT_NOFILE, which tests cannot raise).
    let (procs, each) = (3u32, 7_000u32);
    let n = procs * each;
    let code = format!(
        r#"
import os, socket, sys
def run(w):
    socks = [socket.create_connection(('{VIP}', 80), timeout=10) for _ in range({each})]
    for s in socks:
        s.sendall(b'GET / HTTP/1.1\r\nHost: vip\r\n\r\n')
    ok = 0
    for s in socks:
        data = b''
        while not data.endswith(b'ok b1\n'):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        ok += data.startswith(b'HTTP/1.1 200') and data.endswith(b'ok b1\n')
    os.write(w, ('%d %s\n' % (ok, ','.join(str(s.getsockname()[1]) for s in socks[:70]))).encode())
    sys.stdin.read()
pipes = []
for _ in range({procs}):
    r, w = os.pipe()
    if os.fork() == 0:
        run(w)
        os._exit(0)
    pipes.append(r)
lines = [os.fdopen(r).readline().split() for r in pipes]
print(sum(int(l[0]) for l in lines), flush=True)
print(' '.join(','.join(l[1:]) for l in lines).replace(',', ' '), flush=True)
sys.stdin.read()
for _ in pipes:
    os.wait()
"#
    );
    let mut client = t
        .cmd("client", "python3")
        .args(["-c", &code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("client");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    let ok: u32 = lines
        .next()
        .and_then(Result::ok)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("client failed\n{}", t.lbd_log()));
    let ports: Vec<u16> = lines
        .next()
        .and_then(Result::ok)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    // All still open: the flows are there, and the backend sees them.
    let status = t.lbctl_json(&["status"]);
    let flows = status["flows"].as_u64().unwrap_or(0);
    let on_snat = status["snat_pool"][0]["mappings"].as_u64().unwrap_or(0);
    let backend_conns = t
        .cmd("b1", "ss")
        .args(["-Htn", "state", "established", "( sport = :8081 )"])
        .output()
        .expect("ss");
    let at_backend = String::from_utf8_lossy(&backend_conns.stdout)
        .lines()
        .count();
    let seen = String::from_utf8_lossy(&backend_conns.stdout).into_owned();
    drop(client.stdin.take());
    let _ = client.wait();
    eprintln!("{ok} of {n} answered; {flows} flows; {at_backend} connections at the backend");
    assert_eq!(ok, n, "{}", t.lbd_log());
    assert!(flows >= u64::from(n), "{flows} flows");
    assert!(
        on_snat >= u64::from(n),
        "{on_snat} mappings shown on {SNAT}: {status}"
    );
    assert!(at_backend >= n as usize, "{at_backend} at the backend");
    // Port preservation: the backend sees the client's own ports (from the SNAT address).
    assert_eq!(ports.len(), 210);
    for p in &ports {
        assert!(
            seen.contains(&format!("{SNAT}:{p}")),
            "client port {p} not kept toward the backend"
        );
    }
    assert_eq!(t.worker_drop("ports_exhausted"), 0);
}

/// A UDP reflector on `ports` answering every datagram with the source it saw.
const REFLECTOR: &str = r#"
import socket, select, sys
socks = []
for p in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('0.0.0.0', int(p)))
    socks.append(s)
print('ready', flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(2048)
        s.sendto(('%s:%d' % peer).encode(), peer)
"#;

/// RFC 4787 REQ-1 (endpoint-independent mapping) and port preservation, as a STUN
/// client checks them: one pod socket asks two servers on two ports each what source
/// they see. Ten sockets on ports inside the NAT range keep their ports (10/10); one on
/// a port outside it gets a port of the same parity; each socket's four answers agree.
#[test]
fn mapping_is_endpoint_independent_and_ports_are_preserved() {
    if !common::privileged("stun") {
        return;
    }
    let mut t = Topo::masq_up("stun", 2);
    masquerade(&mut t, &[]);
    for ns in ["srv", "far"] {
        t.spawn_ready(ns, "python3", &["-c", REFLECTOR, "3478", "3479"]);
    }
    let probe = r#"
import socket, sys
for port in [int(p) for p in sys.argv[1:]]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('10.244.1.2', port))
    s.settimeout(3)
    seen = []
    for dst in [('20.0.0.10', 3478), ('20.0.0.10', 3479), ('20.1.0.10', 3478), ('20.1.0.10', 3479)]:
        s.sendto(b'?', dst)
        seen.append(s.recvfrom(2048)[0].decode())
    print(port, ' '.join(seen))
"#;
    let mut args: Vec<String> = (0..10).map(|i| (61100 + 7 * i).to_string()).collect();
    args.push("40000".into());
    let out = t
        .cmd("pod", "python3")
        .args(["-c", probe])
        .args(&args)
        .output()
        .expect("probe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.lbd_log()
    );
    let mut preserved = 0;
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let port: u16 = w.next().and_then(|p| p.parse().ok()).expect("port");
        let seen: Vec<&str> = w.collect();
        assert_eq!(seen.len(), 4, "{line}");
        assert!(
            seen.iter().all(|s| *s == seen[0]),
            "pod port {port}: one outside endpoint for every server and port, saw {seen:?}"
        );
        let (addr, outside) = seen[0].split_once(':').expect("addr:port");
        assert_eq!(addr, "203.0.113.7");
        let outside: u16 = outside.parse().expect("port");
        if (61000..=65535).contains(&port) {
            preserved += u32::from(outside == port);
        } else {
            assert!((61000..=65535).contains(&outside));
            assert_eq!(outside & 1, port & 1, "parity kept for {port} -> {outside}");
        }
    }
    assert_eq!(text.lines().count(), 11, "{text}");
    assert_eq!(preserved, 10, "ports preserved: {text}");
}

/// Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8), UDP and TCP, as two pods behind the
/// same node find each other: each learns its outside endpoint from a server, then one
/// reaches the other at that endpoint. The receiver sees the sender's outside endpoint
/// (not its pod address), and its answer to it comes back.
#[test]
fn hairpinning_between_pods_udp_and_tcp() {
    if !common::privileged("hairpin") {
        return;
    }
    let mut t = Topo::masq_up("hpin", 2);
    masquerade(&mut t, &[]);
    t.spawn_ready("srv", "python3", &["-c", REFLECTOR, "3478"]);
    let code = r#"
import socket
S = socket.SOCK_DGRAM
def learn(s):
    s.sendto(b'?', ('20.0.0.10', 3478))
    return s.recvfrom(2048)[0].decode()
a = socket.socket(socket.AF_INET, S); a.bind(('10.244.1.2', 40000)); a.settimeout(3)
b = socket.socket(socket.AF_INET, S); b.bind(('10.244.1.3', 40101)); b.settimeout(3)
ma, mb = learn(a), learn(b)
ip, port = ma.split(':')
b.sendto(b'hello a', (ip, int(port)))
data, peer = a.recvfrom(2048)
a.sendto(b'hello b', peer)
back, peer2 = b.recvfrom(2048)
print('udp', ma, mb, data.decode().replace(' ', '_'), '%s:%d' % peer, back.decode().replace(' ', '_'), '%s:%d' % peer2)
# TCP: A listens on the port it also connects out from (its mapping).
def sock():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.settimeout(5)
    return s
ls = sock(); ls.bind(('10.244.1.2', 40010)); ls.listen()
c = sock(); c.bind(('10.244.1.2', 40010)); c.connect(('20.0.0.10', 9000))
c.sendall(b'?peer\n')
ma = c.makefile().readline().strip().split()[-1]
ip, port = ma.split(':')
bc = socket.create_connection((ip, int(port)), timeout=5, source_address=('10.244.1.3', 40111))
conn, peer = ls.accept()
conn.sendall(b'hi from a\n')
got = bc.makefile().readline().strip().replace(' ', '_')
bc.sendall(b'hi from b\n')
got_a = conn.makefile().readline().strip().replace(' ', '_')
print('tcp', ma, '%s:%d' % peer, got, got_a)
"#;
    let out = t
        .cmd("pod", "python3")
        .args(["-c", code])
        .output()
        .expect("pods");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.lbd_log()
    );
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let udp = &lines[0];
    let (ma, mb) = (udp[1], udp[2]);
    assert!(
        ma.starts_with("203.0.113.7:") && mb.starts_with("203.0.113.7:"),
        "{text}"
    );
    assert_eq!(udp[3], "hello_a");
    assert_eq!(udp[4], mb, "A sees B's outside endpoint");
    assert_eq!(udp[5], "hello_b");
    assert_eq!(udp[6], ma, "B sees A's outside endpoint");
    let tcp = &lines[1];
    assert!(tcp[1].starts_with("203.0.113.7:"), "{text}");
    assert!(
        tcp[2].starts_with("203.0.113.7:"),
        "A's listener sees B's outside endpoint: {text}"
    );
    assert_eq!((tcp[3], tcp[4]), ("hi_from_a", "hi_from_b"));
    assert!(t.worker_sum("hairpinned") >= 4, "{}", t.lbctl(&["stats"]));
    assert!(t.xdp_stat("to_worker_hairpin") >= 2);
}

/// xlb as a router on its own links (RFC 4787 REQ-13): with the egress link's MTU at
/// 1400, a pod's full-size DF segments draw ICMP fragmentation needed from xlb, the
/// pod's PMTU discovery shrinks them, and a 200 kB upload echoed back completes; ping
/// with DF reports the link's MTU; a datagram without DF is fragmented to fit.
#[test]
fn pmtu_discovery_through_a_smaller_egress_link() {
    if !common::privileged("pmtu") {
        return;
    }
    let mut t = Topo::masq_up("pmtu", 2);
    for (ns, dev) in [("lb", "ext0"), ("rt", "rt0")] {
        t.ip(ns, &["link", "set", dev, "mtu", "1400"]);
    }
    masquerade(&mut t, &[]);
    let ping = t
        .cmd("pod", "ping")
        .args([
            "-c",
            "1",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            "1450",
            "-I",
            "10.244.1.2",
            "20.0.0.10",
        ])
        .output()
        .expect("ping");
    let said =
        String::from_utf8_lossy(&ping.stdout).into_owned() + &String::from_utf8_lossy(&ping.stderr);
    assert!(
        said.contains("mtu = 1400") || said.contains("mtu=1400"),
        "ping should report the egress link's MTU: {said}"
    );
    let code = r#"
import socket
c = socket.create_connection(('20.0.0.10', 9000), source_address=('10.244.1.2', 0), timeout=10)
c.sendall(b'x' * 200000 + b'\n')
line = c.makefile('rb').readline()
print(len(line))
"#;
    let out = t.py("pod", code);
    assert_eq!(out.trim(), (200_000 + "srv:".len() + 1).to_string());
    assert!(t.worker_sum("icmp_sent") >= 1, "{}", t.lbctl(&["stats"]));
    // Without DF (the socket turns path MTU discovery off), a 1500-byte datagram is
    // translated and cut into fragments that fit the 1400-byte link; the server gets
    // it whole and its answer comes back.
    let code = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT
s.bind(('10.244.1.2', 0))
s.settimeout(3)
data = bytes(i % 253 for i in range(1472))
s.sendto(data, ('20.0.0.10', 5353))
got = s.recvfrom(65535)[0]
print(got == b'srv:' + data)
"#;
    assert_eq!(t.py("pod", code).trim(), "True", "{}", t.lbctl(&["stats"]));
}

/// IPv4 fragments both ways (RFC 4787 REQ-14): a 3 000-byte UDP datagram (three
/// fragments on 1500-byte links) from a pod to a server through masquerading, and from a
/// client to a backend through a VIP, each echoed back whole (the answer in fragments
/// too). The node's kernel never sees them: its fragment reassembly counters stay still.
#[test]
fn fragmented_datagrams_through_masquerading_and_a_vip() {
    if !common::privileged("frag") {
        return;
    }
    let echo = |t: &Topo, ns: &str, src: &str, dst: &str, port: u16| -> String {
        let code = format!(
            r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('{src}', 0))
s.settimeout(3)
data = bytes(i % 251 for i in range(3000))
s.sendto(data, ('{dst}', {port}))
got, peer = s.recvfrom(65535)
name, _, body = got.partition(b':')
print(name.decode(), len(body), body == data)
"#
        );
        t.py(ns, &code).trim().to_string()
    };
    let reasm = |t: &Topo| -> u64 {
        let snmp = t
            .cmd("lb", "cat")
            .arg("/proc/net/snmp")
            .output()
            .expect("snmp");
        let text = String::from_utf8_lossy(&snmp.stdout).into_owned();
        let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "ReasmReqds")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    {
        let mut t = Topo::masq_up("frgm", 2);
        masquerade(&mut t, &[]);
        let before = reasm(&t);
        assert_eq!(
            echo(&t, "pod", "10.244.1.2", "20.0.0.10", 5353),
            "srv 3000 True",
            "{}",
            t.lbctl(&["stats"])
        );
        assert_eq!(
            reasm(&t),
            before,
            "the node reassembled fragments of a flow"
        );
        assert!(t.xdp_stat("to_worker_fragment") >= 2);
    }
    let Some(t) = Topo::start("frgv", 2, 1) else {
        return;
    };
    t.lbctl(&[
        "service",
        "add",
        &format!("{VIP}:53/udp"),
        "-b",
        "10.1.0.11:5353",
    ]);
    let before = reasm(&t);
    assert_eq!(
        echo(&t, "client", "10.0.0.2", VIP, 53),
        "b1 3000 True",
        "{}",
        t.lbctl(&["stats"])
    );
    assert_eq!(reasm(&t), before);
    assert!(t.xdp_stat("to_worker_fragment") >= 2);
}

/// An egress address pool (`--egress-addr` twice): each pod leaves from the address its
/// own address picks, every time, and the server's answers to both come back.
#[test]
fn an_egress_pool_pairs_each_pod_with_one_address() {
    if !common::privileged("epool") {
        return;
    }
    let mut t = Topo::masq_up("epol", 2);
    t.ip("lb", &["addr", "add", "203.0.113.8/32", "dev", "ext0"]);
    t.ip("pod", &["addr", "add", "10.244.1.4/24", "dev", "p0"]);
    masquerade(
        &mut t,
        &[
            "--egress-addr",
            "203.0.113.7",
            "--egress-addr",
            "203.0.113.8",
        ],
    );
    // 10.244.1.2 picks the first address, 10.244.1.4 the second (a fixed hash).
    for (pod, want) in [("10.244.1.2", "203.0.113.7"), ("10.244.1.4", "203.0.113.8")] {
        for _ in 0..3 {
            let o = t
                .cmd("pod", "curl")
                .args(["-s", "--max-time", "5", "--interface", pod])
                .arg("http://20.0.0.10:8080/peer")
                .output()
                .expect("curl");
            let said = String::from_utf8_lossy(&o.stdout).trim().to_string();
            assert!(
                said.contains(&format!("peer {want}:")),
                "{pod} should leave from {want}: {said:?}\n{}",
                t.lbd_log()
            );
        }
    }
    let status = t.lbctl_json(&["status"]);
    assert_eq!(
        status["masquerading"]["egress_addresses"],
        serde_json::json!(["203.0.113.7", "203.0.113.8"])
    );
}
