//! The XDP fast path end to end: established flows are forwarded by the steering
//! program (flowrec actions the workers installed) with the bytes intact both ways, a
//! configuration change takes effect on them as on the workers' flows, and they time out
//! by what the fast path forwarded, not by what the workers saw.

mod common;

use common::topo::{Topo, VIP};

/// A 20 MB exchange through the TCP echo service and 2000 datagrams through the UDP one,
/// every byte checked; then, with `--on-remove reset`, the echo connection's backend is
/// removed and its next segment must draw a reset.
const TRANSFER: &str = r#"
import hashlib, socket, sys, threading, time, subprocess
lbctl, sock = sys.argv[1], sys.argv[2]

# TCP: 20 000 lines of 1000 bytes to the echo server, read back with its name prefix.
s = socket.create_connection(("10.96.0.10", 9000), timeout=10)
lines = [(b"%06d" % i) + bytes([65 + i % 26]) * 993 + b"\n" for i in range(20000)]
def send():
    for l in lines:
        s.sendall(l)
t = threading.Thread(target=send)
t.start()
f = s.makefile("rb")
for i, l in enumerate(lines):
    got = f.readline()
    assert got == b"b1:" + l, (i, got[:40])
t.join()
print("tcp ok", len(lines))

# UDP: 2000 numbered datagrams of 1000 bytes, each answered with the server's name.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.connect(("10.96.0.10", 5353))
answered = 0
for i in range(2000):
    d = (b"%06d" % i) + bytes([97 + i % 26]) * 994
    u.send(d)
    try:
        r = u.recv(2048)
    except socket.timeout:
        continue
    assert r == b"b1:" + d, (i, r[:40])
    answered += 1
print("udp answered", answered)
assert answered >= 1990, answered

# Still established: the backend goes, the next segment draws a reset.
r = subprocess.run([lbctl, "--socket", sock, "backend", "remove", "10.96.0.10:9000/tcp", "10.1.0.11:9000"], capture_output=True, text=True)
assert r.returncode == 0, r.stderr
outcome = poke((s,), b"after")
print("after removal:", outcome)
assert outcome == "reset", outcome
print("ok")
"#;

#[test]
fn established_flows_run_in_the_fast_path_with_their_bytes_intact() {
    if !common::privileged("fastpath") {
        return;
    }
    let mut t = Topo::up("fpt", 2, 1);
    t.start_lbd(&[]);
    t.add_service(&format!("{VIP}:9000/tcp"), &["10.1.0.11:9000"]);
    t.add_service(&format!("{VIP}:5353/udp"), &["10.1.0.11:5353"]);
    let status = t.lbctl_json(&["status"]);
    assert_eq!(status["fast_path"], true, "on by default");
    let rx_before = t.worker_sum("rx");
    t.client_py_with_lbctl(TRANSFER);
    let fast = t.xdp_stat("fast_path");
    let worker_rx = t.worker_sum("rx") - rx_before;
    println!("fast path packets {fast}, worker packets {worker_rx}");
    // 20 MB each way is ~28 000 segments, 2000 datagrams each way 4000 packets: nearly
    // all of it in XDP, the workers seeing handshakes, the first datagrams and the end.
    assert!(fast >= 20_000, "fast path carried {fast}");
    assert!(worker_rx * 20 < fast, "workers saw {worker_rx} of {fast}");
    // The UDP flow is still there, in the fast path; `nat list` counts what the fast
    // path forwarded for it (the worker saw only its first exchange).
    assert!(t.fast_entries() >= 2, "{}", t.lbctl(&["status"]));
    let nat = t.lbctl_json(&["nat", "list"]);
    let udp = nat["translations"]
        .as_array()
        .expect("translations")
        .iter()
        .find(|x| x["proto"] == "udp")
        .cloned()
        .unwrap_or_else(|| panic!("no UDP translation: {nat}"));
    assert_eq!(udp["fast_path"], true, "{udp}");
    for dir in ["packets_out", "packets_in"] {
        let n = udp[dir].as_u64().unwrap_or(0);
        assert!(n >= 1990, "{dir}: {n} of the 2000 datagrams counted: {udp}");
    }
    assert!(t.lbctl(&["nat", "list"]).contains(" xdp"));
}

/// A UDP flow kept alive by datagrams every 0.5 s for 14 s, with a 5 s UDP timeout (the
/// workers' sweep would end it by 9 s on their own view): the workers see none of them
/// after the first exchange, yet the flow must not expire; idle, it must.
const KEEPALIVE: &str = r#"
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.bind(("10.0.0.2", 41000))
u.connect(("10.96.0.10", 5353))
for i in range(29):
    u.send(b"?peer")
    r = u.recv(100).decode()
    if i == 0:
        first = r
    assert r == first, (i, r, first)
    time.sleep(0.5)
print("same mapping for 14 s:", first)
"#;

#[test]
fn fast_path_flows_time_out_by_what_the_fast_path_forwarded() {
    if !common::privileged("fastpath-timeout") {
        return;
    }
    let mut t = Topo::up("fpo", 2, 1);
    t.start_lbd(&["--timeout-udp", "5"]);
    t.add_service(&format!("{VIP}:5353/udp"), &["10.1.0.11:5353"]);
    let out = t.client_py(KEEPALIVE);
    assert!(out.contains("same mapping"), "{out}");
    let live = |t: &Topo| {
        let nat = t.lbctl_json(&["nat", "list"]);
        nat["translations"]
            .as_array()
            .expect("translations")
            .iter()
            .filter(|x| x["inside"] == "10.0.0.2:41000")
            .count()
    };
    assert_eq!(live(&t), 1, "alive after 14 s of fast-path traffic");
    // One flow all along: it never expired and reopened.
    assert_eq!(t.worker_sum("flows_created"), 1);
    assert_eq!(t.worker_sum("flows_expired"), 0);
    assert!(t.xdp_stat("fast_path") >= 50);
    // Idle: gone within the timeout and a sweep period (4 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while live(&t) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(live(&t), 0, "expired once idle");
    assert_eq!(
        t.fast_entries(),
        0,
        "its entries left the fast path with it"
    );
}

/// An echo connection in the fast path while its backend's MAC changes (a replaced NIC,
/// a VM moved): `{b1}` and `{lb}` are the backend's and the LB's namespaces. Lines
/// before and after must come back intact, and the later ones again through the fast
/// path: the old entries, resolved under the old neighbour, are stale from the new
/// snapshot on, their next packets go to the worker, which takes the new MAC and
/// installs the flow again.
const MAC_CHANGE: &str = r#"
import json, socket, subprocess, sys
lbctl, sock = sys.argv[1], sys.argv[2]

def xdp(name):
    return lbctl_json("stats")["xdp"][name]

s = socket.create_connection(("10.96.0.10", 9000), timeout=10)
f = s.makefile("rb")
def exchange(n, tag):
    for i in range(n):
        line = b"%s-%05d-" % (tag, i) + b"x" * 200 + b"\n"
        s.sendall(line)
        got = f.readline()
        assert got == b"b1:" + line, (tag, i, got[:40])

exchange(300, b"before")
fast, stale = xdp("fast_path"), xdp("fast_path_stale_to_worker")
print("before: fast path", fast, "stale", stale)
assert fast >= 300, fast

new = "02:00:00:00:b1:99"
subprocess.run(["ip", "netns", "exec", "{b1}", "ip", "link", "set", "dev", "eth0", "address", new], check=True)
subprocess.run(["ip", "netns", "exec", "{lb}", "ip", "neigh", "replace", "10.1.0.11",
                "lladdr", new, "dev", "lb1", "nud", "reachable"], check=True)

exchange(300, b"after")
fast2, stale2 = xdp("fast_path"), xdp("fast_path_stale_to_worker")
print("after: fast path", fast2, "stale", stale2)
assert stale2 > stale, "the old entries were not used after the change"
assert fast2 - fast >= 300, fast2 - fast
print("ok")
"#;

#[test]
fn a_backend_mac_change_takes_effect_on_fast_path_flows() {
    if !common::privileged("fastpath-mac") {
        return;
    }
    let mut t = Topo::up("fpm", 2, 1);
    t.start_lbd(&[]);
    t.add_service(&format!("{VIP}:9000/tcp"), &["10.1.0.11:9000"]);
    let code = MAC_CHANGE
        .replace("{b1}", &t.ns("b1"))
        .replace("{lb}", &t.ns("lb"));
    t.client_py_with_lbctl(&code);
    // One flow all along: the change moved its packets, it did not end it.
    assert_eq!(t.worker_sum("flows_created"), 1);
    assert_eq!(t.worker_sum("flows_expired"), 0);
}

/// With the fast path on, lbd refuses to start when a served veth's peer cannot take
/// redirected frames (no GRO, no XDP program there: the kernel would drop the fast
/// path's redirects silently), naming the interface and the way out; with
/// `--fast-path off` it starts and forwards.
#[test]
fn the_fast_path_refuses_interfaces_that_drop_redirects() {
    if !common::privileged("fastpath-gro") {
        return;
    }
    let mut t = Topo::up("fpg", 1, 1);
    // lb0's peer is the client's c0.
    let st = t
        .cmd("client", "ethtool")
        .args(["-K", "c0", "gro", "off"])
        .status()
        .expect("ethtool");
    assert!(st.success());
    let o = t
        .cmd("lb", env!("CARGO_BIN_EXE_lbd"))
        .args(["--no-state", "--iface", "lb0", "--iface", "lb1", "--socket"])
        .arg(t.dir().join("refused.sock"))
        .output()
        .expect("lbd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "lbd started: {err}");
    assert!(
        err.contains("interface lb0 cannot take frames redirected by XDP")
            && err.contains("--fast-path off"),
        "{err}"
    );
    t.start_lbd(&["--fast-path", "off"]);
    assert_eq!(t.lbctl_json(&["status"])["fast_path"], false);
    t.add_service(&format!("{VIP}:8080/tcp"), &["10.1.0.11:8080"]);
    let bodies = t.curl_many(3);
    assert!(bodies.iter().all(|b| b.contains("b1")), "{bodies:?}");
}

/// A UDP flow in the fast path while the client's veth (lb0's peer) loses GRO and gets
/// it back: lbd sees the interface stop taking redirects (its next refresh), the flow
/// moves to the workers with every datagram still answered, then returns to the fast
/// path.
const GRO_FLIP: &str = r#"
import json, socket, subprocess, sys, time
lbctl, sock = sys.argv[1], sys.argv[2]

def fast():
    return lbctl_json("stats")["xdp"]["fast_path"]

def lb0_takes_redirects():
    return [i for i in lbctl_json("status")["interfaces"] if i["name"] == "lb0"][0]["takes_redirects"]

def wait_for(redirects):
    deadline = time.time() + 5
    while lb0_takes_redirects() != redirects:
        assert time.time() < deadline, "lbd did not notice"
        time.sleep(0.1)

u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.connect(("10.96.0.10", 5353))
def exchange(n, tag):
    for i in range(n):
        d = b"%s-%04d" % (tag, i)
        u.send(d)
        assert u.recv(100) == b"b1:" + d, (tag, i)

exchange(50, b"before")
f1 = fast()
print("fast path before:", f1)
assert f1 >= 90, f1

subprocess.run(["ethtool", "-K", "c0", "gro", "off"], check=True, capture_output=True)
wait_for(False)
exchange(50, b"workers")
f2 = fast()
print("fast path while lb0 takes no redirects:", f2 - f1)
assert f2 - f1 <= 2, f2 - f1

subprocess.run(["ethtool", "-K", "c0", "gro", "on"], check=True, capture_output=True)
wait_for(True)
exchange(50, b"again")
f3 = fast()
print("fast path again:", f3 - f2)
assert f3 - f2 >= 90, f3 - f2
print("ok")
"#;

#[test]
fn flows_leave_the_fast_path_while_an_interface_takes_no_redirects() {
    if !common::privileged("fastpath-gro-flip") {
        return;
    }
    let mut t = Topo::up("fpf", 1, 1);
    t.start_lbd(&[]);
    t.add_service(&format!("{VIP}:5353/udp"), &["10.1.0.11:5353"]);
    t.client_py_with_lbctl(GRO_FLIP);
    assert_eq!(t.worker_sum("flows_created"), 1, "one flow all along");
    assert!(t.lbd_log().contains("stopped taking XDP redirects"));
}
