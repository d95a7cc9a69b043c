//! Direct server return end to end, on a topology where the backends' answers do not
//! pass the edge node (deploy/dsr-topology.sh: client → router → {edge node, backends};
//! the backends route to the router). Real programs: curl, python sockets, iperf3, and
//! nftables counting what the bridge forwards. Run as root (CI does).

mod common;

use common::topo::{tally, Topo, VIP};

/// nftables in the backends' bridge: frames from a backend's service ports, counted by
/// where the bridge sends them (to the edge node's port or to the router's).
fn count_answers(t: &Topo) {
    let p = &t.prefix;
    t.nft(
        "sw",
        &format!(
            "table bridge xlbtest {{\n\
               chain counts {{ type filter hook forward priority 0;\n\
                 oifname \"{p}-plb\" ip saddr 10.1.0.0/24 tcp sport {{ 8080, 9000, 5201 }} counter comment \"tcp-to-edge\"\n\
                 oifname \"{p}-plb\" ip saddr 10.1.0.0/24 udp sport {{ 5353, 5201 }} counter comment \"udp-to-edge\"\n\
                 oifname \"{p}-pr\" ip saddr {VIP} counter comment \"vip-to-router\"\n\
               }}\n\
             }}\n"
        ),
    );
}

/// The packet count of counter `name` in the bridge's table.
fn bridge_counter(t: &Topo, name: &str) -> u64 {
    t.nft_counter_in("sw", "bridge", name)
}

/// Field `field` of every item of list `list` in lbctl's JSON answer `v`.
fn column<'a>(v: &'a serde_json::Value, list: &str, field: &str) -> Vec<&'a str> {
    v[list]
        .as_array()
        .expect("a list")
        .iter()
        .map(|x| x[field].as_str().unwrap_or(""))
        .collect()
}

fn start(test: &str, backends: u32) -> Option<Topo> {
    if !common::privileged(test) {
        return None;
    }
    let mut t = Topo::dsr_up(test, 2, backends);
    t.start_lbd_on(&["lb0"], &[]);
    count_answers(&t);
    Some(t)
}

/// `lbctl service add FRONTEND --mode MODE -b …` for backends 1..=n on `port`.
fn add(t: &Topo, frontend: &str, mode: &str, n: u32, port: u16, extra: &[&str]) {
    let backends: Vec<String> = (1..=n).map(|i| format!("10.1.0.1{i}:{port}")).collect();
    let mut args = vec!["service", "add", frontend, "--mode", mode];
    for b in &backends {
        args.extend(["-b", b.as_str()]);
    }
    args.extend(extra);
    t.lbctl(&args);
}

/// curl from the client to `http://VIP:PORT/PATH` (a curl URL glob allowed): the lines
/// it got.
fn curl(t: &Topo, port: u16, path: &str) -> Vec<String> {
    t.curl_vip("client", &format!(":{port}/{path}"))
}

/// 30 UDP datagrams "?peer" to VIP:5353 from fresh sockets: every answer must come from
/// the VIP; the backends that answered, and the peer address each saw.
const UDP_PEERS: &str = r#"
import socket, collections
seen = collections.Counter()
for i in range(30):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"?peer", ("10.96.0.10", 5353))
    data, sender = s.recvfrom(200)
    assert sender == ("10.96.0.10", 5353), sender
    name, peer = data.decode().split(":peer ")
    seen[name + " " + peer.split(":")[0]] += 1
for k in sorted(seen):
    print(k, seen[k])
"#;

#[test]
fn every_dsr_mode_is_answered_by_every_backend_directly_with_the_client_address() {
    let Some(mut t) = start("dmodes", 3) else {
        return;
    };
    // iperf3 on b1, bound to the VIP (see the PMTU test), for a one-backend service.
    t.spawn("b1", "iperf3", &["-s", "-p", "5201", "-B", VIP]);
    for mode in ["dsr-l2", "dsr-ipip", "dsr-gue"] {
        let (edge_tcp, edge_udp) = (
            bridge_counter(&t, "tcp-to-edge"),
            bridge_counter(&t, "udp-to-edge"),
        );
        let to_router = bridge_counter(&t, "vip-to-router");
        let encapsulated = t.worker_sum("encapsulated");
        add(&t, &format!("{VIP}:8080/tcp"), mode, 3, 8080, &[]);
        add(&t, &format!("{VIP}:5353/udp"), mode, 3, 5353, &[]);
        let list = t.lbctl_json(&["service", "list"]);
        let modes = column(&list, "services", "mode");
        let want = if mode == "dsr-gue" {
            "dsr-gue:6080"
        } else {
            mode
        };
        assert_eq!(modes, [want, want], "{mode}: {list}");

        // HTTP: every backend answers; each saw the client's own address.
        let bodies = curl(&t, 8080, "?[1-30]");
        let by = tally(&bodies);
        assert_eq!(bodies.len(), 30, "{mode}: {by:?}\n{}", t.lbd_log());
        for b in ["backend b1", "backend b2", "backend b3"] {
            assert!(by.get(b).copied().unwrap_or(0) > 0, "{mode}: {by:?}");
        }
        let peer = curl(&t, 8080, "peer").join("\n");
        assert!(peer.starts_with("peer 10.0.0.2:"), "{mode}: {peer}");

        // UDP: answers from the VIP, every backend, the client's address seen.
        let said = t.client_py(UDP_PEERS);
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(lines.len(), 3, "{mode}: {said}");
        assert!(
            lines.iter().all(|l| l.contains(" 10.0.0.2 ")),
            "{mode}: {said}"
        );

        // Nothing the backends sent went to the edge node; their answers went to the
        // router, from the VIP.
        assert_eq!(bridge_counter(&t, "tcp-to-edge"), edge_tcp, "{mode}");
        assert_eq!(bridge_counter(&t, "udp-to-edge"), edge_udp, "{mode}");
        assert!(
            bridge_counter(&t, "vip-to-router") >= to_router + 30 * 3 + 30,
            "{mode}"
        );
        // The edge node forwarded one direction: DSR flows, nothing coming back.
        let nat = t.lbctl_json(&["nat", "list"]);
        let flows = nat["translations"].as_array().expect("translations");
        let mine: Vec<_> = flows
            .iter()
            .filter(|f| f["kind"].as_str() == Some(mode))
            .collect();
        assert!(mine.len() >= 60, "{mode}: {nat}");
        assert!(
            mine.iter().all(|f| f["packets_in"].as_u64() == Some(0)),
            "{nat}"
        );
        assert!(
            flows.iter().all(|f| f["kind"].as_str() != Some("snat")),
            "{nat}"
        );
        let tunnelled = t.worker_sum("encapsulated") - encapsulated;
        if mode == "dsr-l2" {
            assert_eq!(tunnelled, 0);
        } else {
            assert!(tunnelled >= 60, "{mode}: {tunnelled} packets tunnelled");
        }
        // iperf3, TCP and a UDP stream, through the VIP to b1 (sized to fit the tunnel:
        // this test is not about PMTU).
        add(&t, &format!("{VIP}:5201/tcp"), mode, 1, 5201, &[]);
        add(&t, &format!("{VIP}:5201/udp"), mode, 1, 5201, &[]);
        let (got, v) = iperf3(&t, &["-t", "1", "-M", "1400"]);
        assert!(
            v["error"].is_null() && got > 5_000_000,
            "{mode}: {got} bytes: {v}"
        );
        let (got, v) = iperf3(&t, &["-u", "-b", "20M", "-t", "1", "-l", "1200"]);
        let lost = v["end"]["sum"]["lost_percent"].as_f64().unwrap_or(100.0);
        assert!(
            v["error"].is_null() && got > 1_500_000 && lost < 5.0,
            "{mode}: {got} bytes, {lost} % lost: {v}"
        );
        for fe in ["8080/tcp", "5353/udp", "5201/tcp", "5201/udp"] {
            t.lbctl(&["service", "remove", &format!("{VIP}:{fe}")]);
        }
    }
    assert!(t.worker_sum("dsr_flows") >= 3 * 61);
    // The backends' decapsulators did the tunnels' work.
    let o = t
        .cmd("b1", common::topo::decap_path())
        .args(["status", "-o", "json"])
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let sum = |k: &str| -> u64 {
        v.as_array()
            .expect("list")
            .iter()
            .map(|p| p["counters"][k].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(sum("ipip_decapsulated") >= 60, "{v}");
    assert!(sum("gue_decapsulated") >= 60, "{v}");
}

/// iperf3's result: bytes the server received, and the error if any.
fn iperf3(t: &Topo, args: &[&str]) -> (u64, serde_json::Value) {
    let o = t
        .cmd("client", "iperf3")
        .args(["-c", VIP, "-p", "5201", "-J"])
        .args(args)
        .output()
        .expect("iperf3");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("iperf3 json");
    let end = &v["end"];
    let got = end["sum_received"]["bytes"]
        .as_u64()
        .or(end["sum"]["bytes"].as_u64())
        .unwrap_or(0);
    (got, v)
}

#[test]
fn a_tunnel_too_small_for_the_client_draws_frag_needed_and_iperf3_completes() {
    let Some(mut t) = start("dpmtu", 1) else {
        return;
    };
    // Bound to the VIP: its UDP test answers the client from it (a wildcard-bound
    // iperf3 connects its UDP socket from eth0's address, which the client ignores).
    t.spawn("b1", "iperf3", &["-s", "-p", "5201", "-B", VIP]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // iperf3's control and data connections must reach the same server: one backend.
    add(&t, &format!("{VIP}:5201/tcp"), "dsr-gue", 1, 5201, &[]);
    add(&t, &format!("{VIP}:5201/udp"), "dsr-ipip", 1, 5201, &[]);
    let before = t.worker_sum("icmp_sent");
    // TCP from the client: its 1500-byte segments do not fit lb0's 1500 less GUE's 32.
    let (got, v) = iperf3(&t, &["-t", "2"]);
    assert!(v["error"].is_null(), "{v}");
    assert!(got > 10_000_000, "{got} bytes: {v}");
    assert!(t.worker_sum("icmp_sent") > before, "frag-needed sent");
    let o = t
        .cmd("client", "ip")
        .args(["route", "get", VIP])
        .output()
        .expect("ip route get");
    let route = String::from_utf8_lossy(&o.stdout);
    assert!(
        route.contains("mtu 1468"),
        "the client learnt the tunnel's MTU: {route}"
    );
    // A UDP stream over IPIP (sized for the tunnel: iperf3 UDP sets no DF).
    let (got, v) = iperf3(&t, &["-u", "-b", "20M", "-t", "2", "-l", "1400"]);
    assert!(v["error"].is_null(), "{v}");
    let lost = v["end"]["sum"]["lost_percent"].as_f64().unwrap_or(100.0);
    assert!(
        got > 4_000_000 && lost < 5.0,
        "{got} bytes, {lost} % lost: {v}"
    );
    assert_eq!(bridge_counter(&t, "tcp-to-edge"), 0);
    assert_eq!(bridge_counter(&t, "udp-to-edge"), 0);
    assert!(t.worker_sum("encapsulated") > 0 || t.xdp_stat("fast_path") > 0);
}

/// A TCP echo connection to VIP:9000 that carries 300 lines, all answered by one
/// backend, while lbctl (argv 1, 2) adds two more backends after line 100 and removes
/// them after line 200.
const LONG_LIVED: &str = r#"
import socket, subprocess, sys
def lbctl(*a):
    subprocess.run([sys.argv[1], "--socket", sys.argv[2], *a], check=True, capture_output=True)
s = socket.create_connection(("10.96.0.10", 9000), timeout=3)
f = s.makefile("rb")
names = set()
for i in range(300):
    s.sendall(b"line %d\n" % i)
    reply = f.readline()
    assert reply.endswith(b"line %d\n" % i), reply
    names.add(reply.split(b":")[0])
    if i == 100:
        for b in ("10.1.0.12:9000", "10.1.0.13:9000"):
            lbctl("backend", "add", "10.96.0.10:9000/tcp", b)
    if i == 200:
        for b in ("10.1.0.12:9000", "10.1.0.13:9000"):
            lbctl("backend", "remove", "10.96.0.10:9000/tcp", b)
assert len(names) == 1, names
print("one backend", names.pop().decode())
s.close()
print("ok")
"#;

#[test]
fn a_long_lived_dsr_connection_keeps_its_backend_and_runs_in_the_fast_path() {
    let Some(t) = start("dlong", 3) else {
        return;
    };
    add(&t, &format!("{VIP}:9000/tcp"), "dsr-l2", 1, 9000, &[]);
    // Its only backend now: b1; then the others come and go under it.
    let fast = t.xdp_stat("fast_path");
    let said = t.client_py_with_lbctl(LONG_LIVED);
    assert!(said.contains("one backend b1"), "{said}");
    assert!(
        t.xdp_stat("fast_path") >= fast + 250,
        "the established connection's segments went through XDP"
    );
    assert_eq!(bridge_counter(&t, "tcp-to-edge"), 0);
}

#[test]
fn hybrid_sends_tcp_by_dsr_and_udp_by_snat() {
    let Some(t) = start("dhybrid", 2) else {
        return;
    };
    add(&t, &format!("{VIP}:8080/tcp"), "hybrid", 2, 8080, &[]);
    // UDP in hybrid is SNAT: a backend port other than the frontend's is fine.
    add(&t, &format!("{VIP}:53/udp"), "hybrid", 2, 5353, &[]);
    let peer = curl(&t, 8080, "peer").join("\n");
    assert!(peer.starts_with("peer 10.0.0.2:"), "TCP by DSR: {peer}");
    let said = t.client_py(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.sendto(b"?peer", ("10.96.0.10", 53))
data, sender = s.recvfrom(200)
assert sender == ("10.96.0.10", 53), sender
print(data.decode())
"#,
    );
    assert!(
        said.contains(":peer 10.1.0.2:"),
        "UDP by SNAT from lb0: {said}"
    );
    let nat = t.lbctl_json(&["nat", "list"]);
    let kinds = column(&nat, "translations", "kind");
    assert!(
        kinds.contains(&"dsr-l2") && kinds.contains(&"snat"),
        "{nat}"
    );
    // The SNAT answers come back through the edge node; the DSR ones do not.
    assert_eq!(bridge_counter(&t, "tcp-to-edge"), 0);
    assert!(bridge_counter(&t, "udp-to-edge") >= 1);
}

#[test]
fn l2_dsr_refuses_a_backend_behind_a_router() {
    let Some(t) = start("dcheck", 1) else {
        return;
    };
    // `service add VIP:8080/tcp --mode MODE -b BACKEND`: refused, with its error.
    let refused = |mode: &str, backend: &[&str]| {
        let mut a = vec!["service", "add", "10.96.0.10:8080/tcp", "--mode", mode];
        for b in backend {
            a.extend(["-b", b]);
        }
        let o = t.try_lbctl(&a);
        assert!(!o.status.success(), "{mode} {backend:?} accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = refused("dsr-l2", &["10.1.0.11:8080", "10.7.0.5:8080"]);
    assert!(
        err.contains("10.7.0.5") && err.contains("gateway 10.1.0.1"),
        "{err}"
    );
    let err = refused("dsr-ipip", &["10.1.0.11:80"]);
    assert!(err.contains("port 8080"), "{err}");
    // Nothing was added; a tunnel reaches a routed backend.
    let list = t.lbctl_json(&["service", "list"]);
    assert_eq!(list["services"].as_array().map(Vec::len), Some(0), "{list}");
    t.lbctl(&[
        "service",
        "add",
        &format!("{VIP}:8080/tcp"),
        "--mode",
        "dsr-ipip",
        "-b",
        "10.7.0.5:8080",
    ]);
}
