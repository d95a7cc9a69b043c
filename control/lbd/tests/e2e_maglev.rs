//! What operators do to running services, end to end with real clients: client-ip
//! session affinity (with a timeout that outlives backend changes), per-service table
//! sizes, draining a backend (established connections go on, new ones go elsewhere,
//! `service list` counts what is left) and removing one (its clients get a TCP reset, or
//! nothing with `--on-remove drop`, and its idle flows end within a sweep period).

mod common;

use common::topo::{Topo, VIP};

/// HTTP requests (one connection each) from source address `from` in the client
/// namespace to `VIP2:80`; the backend names that answered.
fn curl_from(t: &Topo, from: &str, vip: &str, n: u32) -> Vec<String> {
    let o = t
        .cmd("client", "curl")
        .args(["-s", "--max-time", "5", "--retry", "0", "--interface", from])
        .arg(format!("http://{vip}/?[1-{n}]"))
        .output()
        .expect("curl");
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim_start_matches("backend ").to_string())
        .collect();
    assert_eq!(
        lines.len(),
        n as usize,
        "{from}: {lines:?}\n{}",
        t.lbd_log()
    );
    lines
}

fn distinct(v: &[String]) -> std::collections::BTreeSet<String> {
    v.iter().cloned().collect()
}

#[test]
fn client_ip_affinity_pins_clients_and_its_timeout_outlives_backend_changes() {
    if !common::privileged("affinity") {
        return;
    }
    let mut t = Topo::up("aff", 2, 3);
    t.start_lbd(&[]);
    // Eight more client addresses.
    let clients: Vec<String> = (20..28).map(|i| format!("10.0.0.{i}")).collect();
    for c in &clients {
        t.ip("client", &["addr", "add", &format!("{c}/24"), "dev", "c0"]);
    }
    let svc = format!("{VIP}:80/tcp");
    t.add_service(
        &svc,
        &["10.1.0.11:8080", "10.1.0.12:8080", "10.1.0.13:8080"],
    );
    // Hashed on the 5-tuple: one client's connections spread.
    let spread = curl_from(&t, "10.0.0.2", VIP, 30);
    assert!(distinct(&spread).len() >= 2, "{spread:?}");
    // Client-ip: each client's connections all reach one backend, clients spread.
    let out = t.lbctl(&["service", "set", &svc, "--affinity", "client-ip"]);
    assert!(out.contains("affinity client-ip"), "{out}");
    let mut chosen = std::collections::BTreeSet::new();
    for c in &clients {
        let got = distinct(&curl_from(&t, c, VIP, 10));
        assert_eq!(got.len(), 1, "{c}: {got:?}");
        chosen.extend(got);
    }
    assert!(chosen.len() >= 2, "clients spread: {chosen:?}");
    let list = t.lbctl_json(&["service", "list"]);
    assert_eq!(list["services"][0]["options"]["affinity"], "client-ip");

    // A table size outside the offered primes is refused; an offered one is used.
    let bad = t.try_lbctl(&["service", "set", &svc, "--table-size", "1000"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("1000") && err.contains("2039"), "{err}");
    t.lbctl(&["service", "set", &svc, "--table-size", "2039"]);
    let list = t.lbctl_json(&["service", "list"]);
    assert_eq!(list["services"][0]["table_size"], 2039);
    assert_eq!(
        list["services"][0]["options"]["affinity"], "client-ip",
        "service set changes only what it is given"
    );

    // With a timeout a client keeps its backend when the backend set changes, until it
    // opened no connection for that long.
    let svc2 = "10.96.0.11:80/tcp";
    t.lbctl(&[
        "service",
        "add",
        svc2,
        "-b",
        "10.1.0.11:8080",
        "--affinity",
        "client-ip",
        "--affinity-timeout",
        "4s",
    ]);
    assert_eq!(curl_from(&t, &clients[0], "10.96.0.11", 1), ["b1"]);
    // b2 takes 99.99 % of the table.
    t.lbctl(&[
        "backend",
        "add",
        svc2,
        "10.1.0.12:8080",
        "--weight",
        "10000",
    ]);
    for _ in 0..3 {
        assert_eq!(
            curl_from(&t, &clients[0], "10.96.0.11", 2),
            ["b1", "b1"],
            "remembered"
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    assert_eq!(
        curl_from(&t, &clients[1], "10.96.0.11", 2),
        ["b2", "b2"],
        "a new client gets the hashed backend"
    );
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(
        curl_from(&t, &clients[0], "10.96.0.11", 2),
        ["b2", "b2"],
        "forgotten after the timeout"
    );
}

/// The client program: connections to the echo service through the VIP, driven through
/// drain, removal with reset, and removal with drop; lbctl is called from inside the
/// client namespace (the control socket is a file). Prints what it saw.
const DRAIN_AND_REMOVE: &str = r#"
import json, socket, subprocess, sys, time
lbctl, sock = sys.argv[1], sys.argv[2]
SVC = "10.96.0.10:9000/tcp"
B1 = "10.1.0.11:9000"

def ctl(*a):
    r = subprocess.run([lbctl, "--socket", sock, *a], capture_output=True, text=True)
    assert r.returncode == 0, (a, r.stderr)
    return r.stdout

def backend(name):
    svc = json.loads(ctl("service", "list", "-o", "json"))["services"][0]
    for b in svc["backends"]:
        if f'{b["address"]}:{b["port"]}' == name:
            return b
    return None

def conn():
    s = socket.create_connection(("10.96.0.10", 9000), timeout=5)
    f = s.makefile("rb")
    s.sendall(b"hello\n")
    line = f.readline()
    assert line.endswith(b":hello\n"), line
    return (s, f, line.split(b":")[0].decode())

def echo(c, word):
    s, f, name = c
    s.sendall(word + b"\n")
    assert f.readline() == name.encode() + b":" + word + b"\n", name

def close(c):
    # The file object holds the socket open too: close both for the FIN.
    c[1].close()
    c[0].close()

def on(conns, name):
    return [c for c in conns if c[2] == name]

def wait_for(cond, what, secs=5.0):
    end = time.time() + secs
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(what)

# Phase 1: drain, then remove with the default outcome (reset).
conns = [conn() for _ in range(16)]
ones, twos = on(conns, "b1"), on(conns, "b2")
assert ones and twos, [c[2] for c in conns]
print("flows before drain", backend(B1)["flows"], len(ones))
assert backend(B1)["flows"] == len(ones)
ctl("backend", "drain", SVC, B1)
b = backend(B1)
assert (b["state"], b["weight"], b["flows"]) == ("draining", 0, len(ones)), b
for c in conns:
    echo(c, b"still")
fresh = [conn() for _ in range(12)]
assert all(c[2] == "b2" for c in fresh), [c[2] for c in fresh]
for c in fresh:
    close(c)
# Clients finish: what is left is counted.
for c in ones[1:]:
    close(c)
wait_for(lambda: backend(B1)["flows"] == 1, "one flow left on b1")
print("draining with", backend(B1)["flows"], "flow")
ctl("backend", "remove", SVC, B1)
t0 = time.time()
outcome = poke(ones[0], b"after")
print("removed with reset:", outcome, round(time.time() - t0, 3))
assert outcome == "reset", outcome
for c in twos:
    echo(c, b"unaffected")

# Phase 2: drained to zero, then back; removal with drop.
ctl("service", "set", SVC, "--on-remove", "drop")
ctl("backend", "add", SVC, B1)
more = []
while len(on(more, "b1")) < 2:
    more.append(conn())
ctl("backend", "drain", SVC, B1)
for c in on(more, "b1"):
    close(c)
wait_for(lambda: backend(B1)["state"] == "drained", "b1 drained")
print("drained:", backend(B1))
ctl("backend", "set-weight", SVC, B1, "3")
assert backend(B1)["weight"] == 3
more = []
while len(on(more, "b1")) < 2:
    more.append(conn())
kept, idle = on(more, "b1")[:2]
ctl("backend", "remove", SVC, B1)
kept[0].settimeout(3)
outcome = poke(kept, b"after")
print("removed with drop:", outcome)
assert outcome == "timeout", outcome
# The idle one is ended by the sweep (4 s a round) without a packet.
idle_port = idle[0].getsockname()[1]
def gone():
    nat = json.loads(ctl("nat", "list", "-o", "json"))["translations"]
    return not any(t["inside"].endswith(f":{idle_port}") for t in nat)
t0 = time.time()
wait_for(gone, "idle flow of the removed backend ended", secs=10)
print("idle flow ended after", round(time.time() - t0, 1), "s")
for c in twos:
    echo(c, b"still fine")
print("ok")
"#;

#[test]
fn draining_keeps_connections_and_removal_resets_or_drops_them() {
    if !common::privileged("drain") {
        return;
    }
    let mut t = Topo::up("drn", 2, 2);
    t.start_lbd(&[]);
    t.add_service(
        &format!("{VIP}:9000/tcp"),
        &["10.1.0.11:9000", "10.1.0.12:9000"],
    );
    t.client_py_with_lbctl(DRAIN_AND_REMOVE);
    assert!(t.worker_sum("resets_sent") >= 1);
    assert!(t.worker_drop("backend_removed") >= 2);
}

/// The backends' shares as `service list -o json` reports them, and the worst error.
fn shares(t: &Topo, frontend: &str) -> (Vec<f64>, f64) {
    let list = t.lbctl_json(&["service", "list"]);
    let svc = list["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["frontend"] == frontend))
        .unwrap_or_else(|| panic!("no {frontend} in {list}"));
    let shares = svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["share"].as_f64().unwrap_or(-1.0))
        .collect();
    (
        shares,
        svc["worst_share_error_pct"].as_f64().unwrap_or(-1.0),
    )
}

#[test]
fn service_list_shows_shares_that_follow_large_weights_and_many_backends() {
    if !common::privileged("shares") {
        return;
    }
    let mut t = Topo::up("shr", 1, 1);
    t.start_lbd(&[]);
    // Ten backends at the largest weight: a tenth each (3 had no slot when weights were
    // turn counts).
    let fe = "10.96.0.20:80/tcp";
    let ten: Vec<String> = (1..=10).map(|p| format!("10.1.0.11:{p}@10000")).collect();
    t.add_service(fe, &ten);
    let (s, worst) = shares(&t, fe);
    assert!(s.iter().all(|&x| (x - 10.0).abs() <= 0.1), "{s:?}");
    assert!(worst < 0.1, "{worst}");
    // A thousand at weight 100 (344 had none): every one has its ~0.1 %.
    let fe = "10.96.0.21:80/tcp";
    let thousand: Vec<String> = (1..=1000).map(|p| format!("10.1.0.11:{p}@100")).collect();
    t.add_service(fe, &thousand);
    let (s, worst) = shares(&t, fe);
    assert_eq!(s.len(), 1000);
    assert!(s.iter().all(|&x| (x - 0.1).abs() < 0.01), "a share is off");
    assert!(worst < 2.0, "{worst}");
    let text = t.lbctl(&["service", "list"]);
    assert!(text.contains("table < 100 × backends"), "flagged");
    // Ratios: 1:2:5.
    let fe = "10.96.0.22:80/tcp";
    t.add_service(fe, &["10.1.0.11:1@1", "10.1.0.11:2@2", "10.1.0.11:3@5"]);
    assert_eq!(shares(&t, fe).0, [12.5, 25.0, 62.5]);
}
