//! Egress masquerading end to end (deploy/masq-topology.sh): pods 10.244.1.2 and
//! 10.244.1.3 behind the edge node running lbd on int0/ext0, servers behind a router
//! that report the source they see (HTTP /peer, UDP and TCP "?peer", nftables counters
//! for ping). Run as root, one at a time (`--test-threads=1`).

mod common;

use common::topo::Echo;
use common::topo::Topo;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const POD_A: &str = "10.244.1.2";
const POD_B: &str = "10.244.1.3";
const EGRESS: &str = "203.0.113.7";
const SRV: &str = "20.0.0.10";
const FAR: &str = "20.1.0.10";
const NM: &str = "10.50.0.10";

/// The topology with lbd masquerading 10.244.0.0/16 out of ext0, the ip-masq-agent file
/// at `dir()/ip-masq-agent.yaml` holding `config` (None: no file, defaults).
fn start(test: &str, queues: u32, config: Option<&str>, extra: &[&str]) -> Option<Topo> {
    if !common::privileged(test) {
        return None;
    }
    let mut t = Topo::masq_up(test, queues);
    let path = t.dir().join("ip-masq-agent.yaml");
    if let Some(c) = config {
        std::fs::write(&path, c).expect("write config");
    }
    let path = path.to_string_lossy().into_owned();
    let mut args = vec![
        "--masquerade-from",
        "10.244.0.0/16",
        "--ip-masq-config",
        &path,
    ];
    args.extend_from_slice(extra);
    t.start_lbd_on(&["int0", "ext0"], &args);
    Some(t)
}

/// `lbctl ipmasq list` says what `ok` wants, and the change is applied whole (the XDP
/// maps too, not only the workers).
fn applied(t: &Topo, ok: impl Fn(&str) -> bool) -> bool {
    let l = t.lbctl(&["ipmasq", "list"]);
    ok(&l) && !l.contains("being applied")
}

/// `curl --interface SRC http://DST:8080/peer` from the pod namespace: the peer the
/// server saw.
fn http_peer(t: &Topo, src: &str, dst: &str) -> String {
    let o = t
        .cmd("pod", "curl")
        .args(["-s", "--max-time", "5", "--interface", src])
        .arg(format!("http://{dst}:8080/peer"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The address part of "peer ADDR:PORT".
fn peer_addr(answer: &str) -> &str {
    answer
        .rsplit(' ')
        .next()
        .and_then(|p| p.split(':').next())
        .unwrap_or("")
}

fn peer_port(answer: &str) -> u16 {
    answer
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0)
}

/// Count ICMP echo requests (and UDP to 5353) by source in namespace `ns`.
fn count_pings(t: &Topo, ns: &str) {
    t.nft(
        ns,
        "table inet xlbtest {\n chain input {\n  type filter hook input priority 0;\n  \
         ip saddr 203.0.113.7 icmp type echo-request counter comment \"egress\"\n  \
         ip saddr 10.244.0.0/16 icmp type echo-request counter comment \"pod\"\n  \
         ip saddr 10.244.0.0/16 udp dport 5353 counter comment \"pod-udp\"\n }\n}\n",
    );
}

fn ping(t: &Topo, src: &str, dst: &str) -> bool {
    t.cmd("pod", "ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "-I", src, dst])
        .output()
        .expect("ping")
        .status
        .success()
}

#[test]
fn servers_see_the_egress_address_unless_the_policy_keeps_the_pod_address() {
    let Some(t) = start("msq", 2, None, &[]) else {
        return;
    };
    for pod in [POD_A, POD_B] {
        let a = http_peer(&t, pod, SRV);
        assert_eq!(peer_addr(&a), EGRESS, "{pod} → srv: {a:?}\n{}", t.lbd_log());
        assert!((61000..=65535).contains(&peer_port(&a)), "{a}");
        let a = http_peer(&t, pod, NM);
        assert_eq!(peer_addr(&a), pod, "{pod} → non-masquerade server: {a:?}");
    }
    // UDP: the server reports the outside tuple; the pod gets the answer.
    let out = t.py(
        "pod",
        &format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('{POD_A}',0)); s.settimeout(3)\n\
             s.sendto(b'?peer',('{SRV}',5353)); print(s.recvfrom(100)[0].decode(), s.getsockname()[1])"
        ),
    );
    assert!(out.starts_with(&format!("srv:peer {EGRESS}:")), "{out}");
    let inside_port = out.split_whitespace().last().expect("port");
    // ping through the NAT: the server sees echo requests from the egress address only.
    count_pings(&t, "srv");
    count_pings(&t, "nm");
    let fast = t.xdp_stat("fast_path");
    assert!(
        ping(&t, POD_A, SRV),
        "ping through the NAT\n{}",
        t.lbd_log()
    );
    assert!(ping(&t, POD_B, SRV));
    // Once answered, an echo runs in the fast path: of each ping's three requests and
    // replies, the last two of each.
    let fast = t.xdp_stat("fast_path") - fast;
    assert!(fast >= 8, "{fast} echo packets in the fast path");
    assert!(ping(&t, POD_A, NM), "ping to the non-masquerade server");
    assert!(t.nft_counter("srv", "egress") >= 6);
    assert_eq!(t.nft_counter("srv", "pod"), 0, "no pod address leaked");
    assert!(t.nft_counter("nm", "pod") >= 3);
    assert_eq!(t.nft_counter("nm", "egress"), 0);

    // The operator's view.
    let check = t.lbctl(&["ipmasq", "check", POD_A, SRV]);
    assert_eq!(check.trim(), "masquerade to 203.0.113.7 (no rule matches)");
    let check = t.lbctl(&["ipmasq", "check", POD_A, NM]);
    assert_eq!(check.trim(), "keep source: 10.0.0.0/8 (default)");
    // explain says the same, with the port the worker tries first; a connection from
    // that client port gets it.
    let e = t.lbctl_json(&[
        "explain",
        &format!("{POD_A}:41001"),
        &format!("{SRV}:8080/tcp"),
    ]);
    assert_eq!(e["steered"], true, "{e}");
    let said = e["translation"].as_str().unwrap_or("").to_string();
    assert!(
        said.ends_with("(masquerade to 203.0.113.7 (no rule matches))"),
        "{e}"
    );
    let said = said.split(' ').next().unwrap_or("").to_string();
    let peer = t.py(
        "pod",
        &format!(
            "import socket\ns=socket.socket(); s.bind(('{POD_A}',41001)); s.settimeout(3)\n\
             s.connect(('{SRV}',9000)); s.sendall(b'?peer\\n'); print(s.recv(100).decode().strip())"
        ),
    );
    assert_eq!(
        peer.trim(),
        format!("srv:peer {said}"),
        "explain said {said}"
    );
    let e = t.lbctl_json(&[
        "explain",
        &format!("{POD_A}:41001"),
        &format!("{NM}:8080/tcp"),
    ]);
    assert_eq!(e["steered"], false, "{e}");
    assert_eq!(e["translation"], "keep source: 10.0.0.0/8 (default)");
    // Where it arrives matters: masquerade sources are looked up on int0, not ext0.
    let from = format!("{POD_A}:41001");
    let to = format!("{SRV}:8080/tcp");
    let on = |iface: &str| t.lbctl_json(&["explain", &from, &to, "--iface", iface]);
    assert_eq!(on("int0")["steered"], true);
    let e = on("ext0");
    assert_eq!(e["steered"], false, "{e}");
    assert!(e.to_string().contains("internal interfaces"), "{e}");
    assert!(on("eth9")
        .to_string()
        .contains("not an interface lbd serves"));
    let list = t.lbctl_json(&["ipmasq", "list"]);
    let rules = list["non_masquerade"].as_array().expect("rules");
    assert_eq!(rules.len(), 12, "the 11 defaults and link-local: {list}");
    assert_eq!(rules[0]["source"], "default");
    let status = t.lbctl(&["status"]);
    assert!(
        status.contains("Masquerading: AF_XDP [ext0] egress 203.0.113.7, IPv4: enabled"),
        "{status}"
    );
    let nat = t.lbctl_json(&["nat", "list"]);
    let udp = nat["translations"]
        .as_array()
        .expect("translations")
        .iter()
        .find(|x| x["proto"] == "udp" && x["inside"] == format!("{POD_A}:{inside_port}"))
        .unwrap_or_else(|| panic!("the UDP flow is listed: {nat}"));
    assert_eq!(udp["kind"], "masquerade");
    assert_eq!(udp["remote"], format!("{SRV}:5353"));
    assert!(udp["outside"]
        .as_str()
        .is_some_and(|o| o.starts_with("203.0.113.7:")));
    assert!(nat["translations"]
        .as_array()
        .is_some_and(|v| v.iter().any(|x| x["proto"] == "icmp")));
    assert!(t.xdp_stat("to_worker_masquerade") > 0);
    assert_eq!(t.worker_drop("malformed"), 0);
}

/// Send one UDP datagram from POD_A that draws an ICMP error; print what the pod's
/// socket got on its error queue: origin, type, code, info, offender.
fn icmp_error_seen(t: &Topo, dst: &str, setup: &str, size: usize) -> String {
    t.py(
        "pod",
        &format!(
            r#"
import socket, struct, sys, time
IP_RECVERR, IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 11, 10, 2, 14
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('{POD_A}', 0))
s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
{setup}
s.connect(('{dst}', 5353))
deadline = time.time() + 6
next_send = 0
while time.time() < deadline:
    if time.time() >= next_send:
        try:
            s.send(b'x' * {size})
        except OSError:
            pass
        next_send = time.time() + 1
    try:
        _, anc, _, _ = s.recvmsg(2048, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
    except BlockingIOError:
        time.sleep(0.02)
        continue
    for lvl, typ, d in anc:
        if lvl == socket.SOL_IP and typ == IP_RECVERR:
            errno_, origin, ty, code, _, info, _ = struct.unpack('=IBBBBII', d[:16])
            mtu = s.getsockopt(socket.SOL_IP, IP_MTU)
            print(origin, ty, code, info, socket.inet_ntoa(d[20:24]), mtu)
            sys.exit(0)
sys.exit('no ICMP error reached the socket')
"#
        ),
    )
}

#[test]
fn icmp_errors_from_the_far_side_reach_the_pod_translated() {
    let Some(t) = start("ice", 2, None, &[]) else {
        return;
    };
    // TTL 2: the edge node forwards with TTL 1, the router answers "time exceeded" to
    // the egress address; xlb must hand it to the pod's socket (origin 2 = ICMP).
    let ttl = icmp_error_seen(&t, SRV, "s.setsockopt(socket.SOL_IP, socket.IP_TTL, 2)", 10);
    let f: Vec<&str> = ttl.split_whitespace().collect();
    assert_eq!(&f[..3], ["2", "11", "0"], "{ttl}\n{}", t.lbd_log());
    assert_eq!(f[4], "203.0.113.1", "the router is the offender: {ttl}");
    // DF and 1400 bytes toward far, behind the router's MTU-1280 link: "fragmentation
    // needed" with MTU 1280, which the pod's kernel takes as the path MTU.
    let frag = icmp_error_seen(
        &t,
        FAR,
        "s.setsockopt(socket.SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)",
        1400,
    );
    let f: Vec<&str> = frag.split_whitespace().collect();
    assert_eq!(&f[..4], ["2", "3", "4", "1280"], "{frag}\n{}", t.lbd_log());
    assert_eq!(f[5], "1280", "path MTU learnt by the pod: {frag}");
    assert!(t.worker_sum("icmp_errors") >= 2);
    assert!(t.xdp_stat("to_worker_icmp_error") >= 2);
}

/// Open `n` UDP flows from the pods to `dst:5353` (alternating pod addresses), each
/// asking "?peer"; print one line per answer: "inside_port outside_addr:port".
fn udp_flows(t: &Topo, dst: &str, n: usize) -> Vec<String> {
    let out = t.py(
        "pod",
        &format!(
            r#"
import resource, selectors, socket, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
socks = []
for i in range({n}):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('{POD_A}' if i % 2 == 0 else '{POD_B}', 0))
    s.setblocking(False)
    socks.append(s)
answers = {{}}
for attempt in range(3):
    pending = [s for s in socks if s.fileno() not in answers]
    for s in pending:
        s.sendto(b'?peer', ('{dst}', 5353))
        time.sleep(0.0005)
    sel = selectors.DefaultSelector()
    for s in pending:
        sel.register(s, selectors.EVENT_READ)
    deadline = time.time() + 3
    while time.time() < deadline and len(answers) < len(socks):
        for key, _ in sel.select(0.2):
            s = key.fileobj
            sel.unregister(s)
            try:
                data = s.recv(200).decode()
            except BlockingIOError:
                continue
            answers[s.fileno()] = f"{{s.getsockname()[0]}}:{{s.getsockname()[1]}} {{data.split()[-1]}}"
for a in answers.values():
    print(a)
"#
        ),
    );
    out.lines().map(str::to_string).collect()
}

#[test]
fn thousands_of_udp_flows_get_unique_outside_tuples() {
    let Some(t) = start("udm", 2, None, &[]) else {
        return;
    };
    let n = 2000;
    let answers = udp_flows(&t, SRV, n);
    assert_eq!(answers.len(), n, "every flow answered\n{}", t.lbd_log());
    let outside: BTreeSet<&str> = answers
        .iter()
        .map(|a| a.split(' ').nth(1).expect("outside"))
        .collect();
    assert_eq!(outside.len(), n, "unique outside tuples");
    assert!(outside.iter().all(|o| o.starts_with("203.0.113.7:")));
    // Replies land on both queues; those on the other worker's queue are handed over.
    assert!(t.worker_sum("handoff_in") > 0, "{}", t.lbctl(&["stats"]));
    let nat = t.lbctl_json(&["nat", "list"]);
    let udp = nat["translations"]
        .as_array()
        .expect("translations")
        .iter()
        .filter(|x| x["kind"] == "masquerade" && x["proto"] == "udp")
        .count();
    assert!(udp >= n, "{udp} translations listed");
}

#[test]
fn exhausted_ports_are_counted_and_established_flows_keep_working() {
    // One worker with 8 ports.
    let Some(t) = start(
        "exh",
        1,
        None,
        &[
            "--snat-ports",
            "62000-62007",
            "--timeout-udp",
            "120",
            "--metrics-addr",
            "127.0.0.1:9568",
        ],
    ) else {
        return;
    };
    count_pings(&t, "srv");
    let mut echo = Echo::from(&t, "pod", POD_A, SRV, 9000);
    let first = echo.say("?peer");
    assert!(first.starts_with("srv:peer 203.0.113.7:620"), "{first}");

    // Toward srv:5353 every one of the 8 ports can be used once (the TCP flow goes to
    // another remote port, so it does not take one); the rest are refused and counted.
    let answers = udp_flows(&t, SRV, 20);
    assert_eq!(answers.len(), 8, "{answers:?}\n{}", t.lbctl(&["stats"]));
    assert!(t.worker_drop("ports_exhausted") >= 12);
    // The egress address's ports in the metrics: all 8 held toward srv, the refusals
    // counted on it.
    let o = t
        .cmd("lb", "curl")
        .args(["-s", "http://127.0.0.1:9568/metrics"])
        .output()
        .expect("curl");
    let metrics = String::from_utf8_lossy(&o.stdout);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{address=\"{EGRESS}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
    };
    assert_eq!(value("xlb_nat_ports"), 8.0);
    assert!(value("xlb_nat_ports_allocated") >= 8.0);
    assert_eq!(value("xlb_nat_ports_free"), 0.0);
    assert!(value("xlb_nat_port_allocation_failures_total") >= 12.0);
    let status = t.lbctl(&["status"]);
    assert!(status.contains("ports_exhausted"), "{status}");
    assert_eq!(
        t.nft_counter("srv", "pod-udp"),
        0,
        "nothing left untranslated"
    );
    // Another remote: the same 8 ports again (reuse per remote endpoint).
    let answers = udp_flows(&t, FAR, 8);
    assert_eq!(answers.len(), 8, "{answers:?}");
    assert_eq!(echo.say("still there"), "srv:still there");
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn a_policy_change_applies_to_new_flows_only() {
    let Some(t) = start("pol", 2, Some("nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n"), &[]) else {
        return;
    };
    let config = t.dir().join("ip-masq-agent.yaml");
    let mut echo = Echo::from(&t, "pod", POD_A, SRV, 9000);
    assert!(echo.say("?peer").starts_with("srv:peer 203.0.113.7:"));
    // Established, the connection runs in the XDP fast path.
    assert!(t.xdp_stat("fast_path") >= 1, "{}", t.lbctl(&["stats"]));
    assert_eq!(peer_addr(&http_peer(&t, POD_A, SRV)), EGRESS);

    // While the connection runs, srv's network joins the non-masquerade list.
    std::fs::write(
        &config,
        "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 20.0.0.0/24\n",
    )
    .expect("write");
    wait_for("the new list", || {
        applied(&t, |l| l.contains("20.0.0.0/24"))
    });
    assert_eq!(
        t.lbctl(&["ipmasq", "check", POD_A, SRV]).trim(),
        "keep source: 20.0.0.0/24 (nonMasqueradeCIDRs)"
    );
    // The established connection keeps its translation...
    for i in 0..5 {
        assert_eq!(echo.say(&format!("line {i}")), format!("srv:line {i}"));
    }
    // ...from the workers: a kept flow leaves the fast path (the new policy's
    // generation made its entries stale; its next packet reached its worker).
    assert_eq!(t.fast_entries(), 0, "{}", t.lbctl(&["status"]));
    let status = t.lbctl_json(&["status"]);
    assert!(
        status["masquerading"]["kept_flows"].as_u64() >= Some(1),
        "{status}"
    );
    // ...new flows leave with the pod's address.
    assert_eq!(peer_addr(&http_peer(&t, POD_A, SRV)), POD_A);
    assert_eq!(peer_addr(&http_peer(&t, POD_B, SRV)), POD_B);

    // A malformed file is reported; the last good list stays.
    std::fs::write(&config, "nonMasqueradeCidrs:\n  - 10.0.0.0/8\n").expect("write");
    wait_for("the config error", || {
        t.lbctl(&["status"])
            .contains("unknown field `nonMasqueradeCidrs`")
    });
    let list = t.lbctl(&["ipmasq", "list"]);
    assert!(
        list.contains("20.0.0.0/24") && list.contains("unknown field"),
        "{list}"
    );
    assert_eq!(peer_addr(&http_peer(&t, POD_A, SRV)), POD_A);
    assert_eq!(echo.say("after"), "srv:after");

    // Back to a list without srv's network: new flows are masqueraded again.
    std::fs::write(&config, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").expect("write");
    wait_for("the list without 20.0.0.0/24", || {
        applied(&t, |l| !l.contains("20.0.0.0/24"))
    });
    assert_eq!(peer_addr(&http_peer(&t, POD_A, SRV)), EGRESS);
    assert_eq!(echo.say("end"), "srv:end");
    assert!(t.lbd_log().contains("masquerade policy applied"));
}
