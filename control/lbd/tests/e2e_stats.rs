//! What operators look at: `lbctl stats --services [--rate]` counts flows, packets and
//! bytes by service and backend, the worker's and the XDP fast path's, while flows live
//! and after they end. Real curl and iperf3 through a VIP; run as root (CI does).

mod common;

use common::topo::Topo;
use std::time::Duration;

/// The service `frontend` in `lbctl stats --services -o json`.
fn service(t: &Topo, frontend: &str) -> serde_json::Value {
    let v = t.lbctl_json(&["stats", "--services"]);
    v["services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["frontend"] == frontend))
        .cloned()
        .unwrap_or_else(|| panic!("{frontend} missing: {v}"))
}

fn n(v: &serde_json::Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {v}"))
}

#[test]
fn service_stats_count_flows_packets_and_bytes_by_backend() {
    let Some(mut t) = Topo::start("stats", 2, 2) else {
        return;
    };
    t.add_service("10.96.0.10:80/tcp", &["10.1.0.11:8080", "10.1.0.12:8080"]);
    t.spawn("b1", "iperf3", &["-s", "-p", "5201"]);
    t.add_service("10.96.0.10:5201/tcp", &["10.1.0.11:5201"]);
    let idle = service(&t, "10.96.0.10:80/tcp");
    assert_eq!(n(&idle, "flows"), 0, "{idle}");
    assert_eq!(idle["backends"].as_array().map(Vec::len), Some(2), "{idle}");

    // 40 requests, a connection each.
    let bodies = t.curl_many(40);
    assert_eq!(bodies.len(), 40, "{}", t.lbd_log());
    let web = service(&t, "10.96.0.10:80/tcp");
    assert_eq!(n(&web, "flows"), 40, "{web}");
    // Each connection: at least SYN, ACK, request, FIN, ACK in; SYN+ACK, answer, FIN out.
    assert!(n(&web, "packets_in") >= 40 * 5, "{web}");
    assert!(n(&web, "packets_out") >= 40 * 3, "{web}");
    assert!(
        n(&web, "bytes_out") > n(&web, "bytes_in"),
        "answers are bigger: {web}"
    );
    let backends = web["backends"].as_array().expect("backends");
    for field in [
        "flows",
        "packets_in",
        "packets_out",
        "bytes_in",
        "bytes_out",
    ] {
        let sum: u64 = backends.iter().map(|b| n(b, field)).sum();
        assert_eq!(sum, n(&web, field), "{field}: {web}");
    }
    assert!(
        backends.iter().all(|b| n(b, "flows") > 0),
        "both backends answered: {web}"
    );
    let table = t.lbctl(&["stats", "--services"]);
    println!("{table}");
    assert!(table.contains("  -> 10.1.0.12:8080"), "{table}");

    // 20 MB uploaded through the fast path: counted while the flow is installed (the
    // map's counters) and after it closed (folded into the worker's account).
    let o = t
        .cmd("client", "iperf3")
        .args(["-c", "10.96.0.10", "-p", "5201", "-n", "20M", "-J"])
        .output()
        .expect("iperf3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let up = service(&t, "10.96.0.10:5201/tcp");
    println!("after upload: {up}");
    assert!(n(&up, "bytes_in") >= 20 << 20, "{up}");
    assert!(
        t.xdp_stat("fast_path") > 1000,
        "the transfer went through the fast path"
    );
    std::thread::sleep(Duration::from_millis(500));
    let later = service(&t, "10.96.0.10:5201/tcp");
    assert!(
        n(&later, "bytes_in") >= n(&up, "bytes_in"),
        "{up} then {later}"
    );
    assert_eq!(n(&later, "active"), 0, "closed: {later}");

    // Rates while a transfer runs.
    t.spawn(
        "client",
        "iperf3",
        &["-c", "10.96.0.10", "-p", "5201", "-t", "4", "-b", "40M"],
    );
    std::thread::sleep(Duration::from_millis(1000));
    let r = t.lbctl_json(&["stats", "--services", "--rate"]);
    let rate = r["services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "10.96.0.10:5201/tcp"))
        .cloned()
        .unwrap_or_else(|| panic!("{r}"));
    let bps = rate["in_bps"].as_f64().unwrap_or(0.0);
    // 40 Mbit/s is 5 MB/s of payload.
    assert!(bps > 2e6 && bps < 2e7, "{rate}");
    assert!(
        rate["out_pps"].as_f64().unwrap_or(0.0) > 10.0,
        "ACKs: {rate}"
    );
}

/// `curl -s URL` in namespace `ns`: the body.
fn get(t: &Topo, ns: &str, url: &str) -> String {
    let o = t
        .cmd(ns, "curl")
        .args(["-s", "--max-time", "5", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A PromQL query against the test's Prometheus: the result vector.
fn query(t: &Topo, q: &str) -> Vec<serde_json::Value> {
    let o = t
        .cmd("lb", "curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-G",
            "http://127.0.0.1:9090/api/v1/query",
        ])
        .args(["--data-urlencode", &format!("query={q}")])
        .output()
        .expect("curl");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The sum of a query's values (0 without series).
fn total(t: &Topo, q: &str) -> f64 {
    query(t, q)
        .iter()
        .filter_map(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Wait (scrapes are a second apart) until `q` sums to at least `min`.
fn eventually(t: &Topo, q: &str, min: f64) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = total(t, q);
        if v >= min {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{q} stayed at {v} (< {min})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every metric family lbd exports, each moved by this test.
const FAMILIES: &[&str] = &[
    "xlb_build_info",
    "xlb_worker_rx_packets_total",
    "xlb_worker_tx_packets_total",
    "xlb_worker_handoff_packets_total",
    "xlb_worker_flows_created_total",
    "xlb_worker_flows_expired_total",
    "xlb_worker_flows_evicted_total",
    "xlb_worker_flows_adopted_total",
    "xlb_worker_generated_packets_total",
    "xlb_drops_total",
    "xlb_xdp_packets_total",
    "xlb_fast_path_packets_total",
    "xlb_afxdp_kernel_total",
    "xlb_flow_table_entries",
    "xlb_flow_table_capacity",
    "xlb_nat_mappings",
    "xlb_fast_path_entries",
    "xlb_nat_ports",
    "xlb_nat_ports_allocated",
    "xlb_nat_ports_free",
    "xlb_nat_ports_allocated_high_water",
    "xlb_nat_port_allocation_failures_total",
    "xlb_service_flows_total",
    "xlb_service_flows_active",
    "xlb_service_packets_total",
    "xlb_service_bytes_total",
    "xlb_backend_weight",
    "xlb_backend_state",
    "xlb_backend_healthy",
    "xlb_service_maglev_info",
];

#[test]
fn a_real_prometheus_scrapes_the_metrics_and_they_move_with_the_traffic() {
    if !common::privileged("a_real_prometheus_scrapes_the_metrics_and_they_move_with_the_traffic") {
        return;
    }
    // The real programs this test needs (deploy/install-deps.sh installs them).
    let runs = |prog: &str, args: &[&str]| {
        std::process::Command::new(prog)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(runs("prometheus", &["--version"]), "prometheus is missing");
    assert!(
        runs("/usr/bin/python3", &["-c", "import prometheus_client"]),
        "python3-prometheus-client is missing"
    );
    let mut t = Topo::up("metrics", 2, 2);
    // 64 NAT ports (32 a worker): 80 connections to one backend exhaust them.
    t.start_lbd(&[
        "--metrics-addr",
        "127.0.0.1:9567",
        "--snat-ports",
        "61000-61063",
    ]);
    t.add_service("10.96.0.10:80/tcp", &["10.1.0.11:8080", "10.1.0.12:8080"]);
    t.add_service("10.96.0.10:9000/tcp", &["10.1.0.11:9000"]);
    t.lbctl(&[
        "service",
        "health",
        "10.96.0.10:9000/tcp",
        "--tcp",
        "--interval-ms",
        "500",
    ]);

    // The exposition itself: OpenMetrics, accepted by promtool.
    let o = t
        .cmd("lb", "curl")
        .args(["-s", "-i", "http://127.0.0.1:9567/metrics"])
        .output()
        .expect("curl");
    let raw = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        raw.contains("application/openmetrics-text; version=1.0.0"),
        "{raw}"
    );
    assert!(raw.trim_end().ends_with("# EOF"), "{raw}");
    let body = get(&t, "lb", "http://127.0.0.1:9567/metrics");
    let path = t.dir().join("metrics.txt");
    std::fs::write(&path, &body).expect("write");
    // A strict OpenMetrics parser (the Python client's, Debian's python3-prometheus-client)
    // takes it whole: names, types, units, label escaping, the closing # EOF.
    let parsed = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import sys\n\
             from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
             fams = list(p(open(sys.argv[1]).read()))\n\
             print(len(fams), sum(len(f.samples) for f in fams))",
        )
        .arg(&path)
        .output()
        .expect("python3");
    assert!(
        parsed.status.success(),
        "OpenMetrics parser: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    println!(
        "families, samples: {}",
        String::from_utf8_lossy(&parsed.stdout).trim()
    );
    assert!(get(&t, "lb", "http://127.0.0.1:9567/other").contains("not found"));

    // A real Prometheus in the edge node's namespace, scraping every second.
    let cfg = t.dir().join("prometheus.yml");
    std::fs::write(
        &cfg,
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n\
         scrape_configs:\n  - job_name: xlb\n    static_configs: [{targets: ['127.0.0.1:9567']}]\n",
    )
    .expect("config");
    let tsdb = t.dir().join("tsdb");
    t.spawn(
        "lb",
        "prometheus",
        &[
            &format!("--config.file={}", cfg.display()),
            &format!("--storage.tsdb.path={}", tsdb.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
    );
    eventually(&t, "up{job=\"xlb\"}", 1.0);
    // A scrape happened: the workers' series are there (before any traffic).
    assert!(!query(&t, "xlb_worker_rx_packets_total").is_empty());
    let idle_rx = total(&t, "xlb_worker_rx_packets_total");
    assert_eq!(total(&t, "xlb_service_flows_total"), 0.0);

    // Traffic: 30 requests, a few invalid segments, an upload through the fast path.
    assert_eq!(t.curl_many(30).len(), 30, "{}", t.lbd_log());
    let st = t
        .cmd("client", "hping3")
        .args([
            "-q",
            "-c",
            "3",
            "-i",
            "u10000",
            "-S",
            "-F",
            "-p",
            "80",
            "10.96.0.10",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("hping3");
    assert!(st.code().is_some(), "hping3 ran");
    t.spawn("b1", "iperf3", &["-s", "-p", "5201"]);
    t.add_service("10.96.0.10:5201/tcp", &["10.1.0.11:5201"]);
    let up = t
        .cmd("client", "iperf3")
        .args(["-c", "10.96.0.10", "-p", "5201", "-n", "10M"])
        .output()
        .expect("iperf3");
    assert!(up.status.success());
    let web = "{service=\"10.96.0.10:80/tcp\"}";
    eventually(&t, &format!("xlb_service_flows_total{web}"), 30.0);
    eventually(&t, &format!("xlb_service_packets_total{web}"), 150.0);
    eventually(&t, &format!("xlb_service_bytes_total{web}"), 6000.0);
    eventually(
        &t,
        "xlb_service_bytes_total{service=\"10.96.0.10:5201/tcp\",direction=\"in\"}",
        10.0 * 1024.0 * 1024.0,
    );
    assert!(eventually(&t, "xlb_worker_rx_packets_total", 1.0) > idle_rx);
    eventually(&t, "xlb_worker_tx_packets_total", 100.0);
    eventually(&t, "xlb_worker_flows_created_total", 31.0);
    eventually(&t, "xlb_fast_path_packets_total", 1000.0);
    eventually(&t, "xlb_xdp_packets_total{counter=\"fast_path\"}", 1000.0);
    eventually(
        &t,
        "xlb_drops_total{source=\"worker\",reason=\"invalid_tcp_flags\"}",
        3.0,
    );
    eventually(&t, "xlb_flow_table_capacity", 2.0 * 16384.0);
    eventually(&t, "xlb_nat_ports{address=\"10.1.0.1\"}", 64.0);
    eventually(&t, "xlb_backend_weight", 4.0);
    eventually(&t, "xlb_backend_state{state=\"active\"}", 4.0);
    eventually(
        &t,
        "xlb_backend_healthy{service=\"10.96.0.10:9000/tcp\"}",
        1.0,
    );
    eventually(&t, "xlb_service_maglev_info", 3.0);
    eventually(&t, "xlb_build_info", 1.0);
    // Live connections hold ports, exhaust them, and show in the gauges.
    let held = t.py(
        "client",
        "import socket\n\
         socks, refused = [], 0\n\
         for i in range(80):\n\
         \x20   try:\n\
         \x20       socks.append(socket.create_connection(('10.96.0.10', 9000), timeout=2))\n\
         \x20   except OSError:\n\
         \x20       refused += 1\n\
         import time\n\
         time.sleep(3)\n\
         print(len(socks), refused)",
    );
    println!("connections held, refused: {held}");
    eventually(
        &t,
        "xlb_nat_ports_allocated_high_water{address=\"10.1.0.1\"}",
        64.0,
    );
    eventually(&t, "xlb_nat_ports_allocated{address=\"10.1.0.1\"}", 32.0);
    eventually(
        &t,
        "xlb_nat_port_allocation_failures_total{address=\"10.1.0.1\"}",
        1.0,
    );
    // The 64 connections held for 3 s were live flows in the scrapes of that time.
    eventually(
        &t,
        "max_over_time(xlb_service_flows_active{service=\"10.96.0.10:9000/tcp\"}[1m])",
        60.0,
    );
    // Draining a backend shows in its state.
    t.lbctl(&["backend", "drain", "10.96.0.10:80/tcp", "10.1.0.12:8080"]);
    eventually(
        &t,
        "xlb_backend_state{backend=\"10.1.0.12:8080\",state=\"drained\"}",
        1.0,
    );
    // Every family is there.
    let names: Vec<String> = query(&t, "count by (__name__) ({__name__=~\"xlb_.*\"})")
        .iter()
        .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_string))
        .collect();
    for f in FAMILIES {
        assert!(names.iter().any(|n| n == f), "{f} missing from {names:?}");
    }
    let after = get(&t, "lb", "http://127.0.0.1:9567/metrics");
    let sample: Vec<&str> = after
        .lines()
        .filter(|l| {
            l.contains("10.96.0.10:80/tcp")
                || l.contains("10.1.0.1\"")
                || l.starts_with("xlb_build")
        })
        .collect();
    println!("{}", sample.join("\n"));
}

#[test]
fn explain_says_what_the_datapath_does_with_a_tuple() {
    let Some(t) = Topo::start("explain", 2, 3) else {
        return;
    };
    t.add_service(
        "10.96.0.10:9000/tcp",
        &["10.1.0.11:9000", "10.1.0.12:9000", "10.1.0.13:9000"],
    );
    let names = ["10.1.0.11:9000", "10.1.0.12:9000", "10.1.0.13:9000"];
    // For a few client ports: explain, then a real connection from that port.
    for port in [41000u16, 41002, 41004, 41006, 41008, 41010] {
        let e = t.lbctl_json(&[
            "explain",
            &format!("10.0.0.2:{port}"),
            "10.96.0.10:9000/tcp",
        ]);
        assert_eq!(e["steered"], true, "{e}");
        assert_eq!(e["service"], "10.96.0.10:9000/tcp");
        assert!(e["slot"].as_u64().is_some(), "{e}");
        // lb1 to the backend's MAC, or (before its first packet) the MAC being learnt.
        assert!(
            e["next_hop"].as_str().is_some_and(|h| h.starts_with("lb1")),
            "{e}"
        );
        let backend = e["backend"].as_str().expect("backend").to_string();
        let answer = t.client_py_with_lbctl(&format!(
            "import socket, subprocess, sys\n\
             s=socket.socket(); s.bind(('10.0.0.2',{port})); s.settimeout(3)\n\
             s.connect(('10.96.0.10',9000)); s.sendall(b'?peer\\n')\n\
             print(s.recv(100).decode().strip())\n\
             cmd = [sys.argv[1], '--socket', sys.argv[2], 'explain', '10.0.0.2:{port}', '10.96.0.10:9000/tcp', '-o', 'json']\n\
             print(subprocess.run(cmd, capture_output=True, text=True).stdout.replace('\\n', ' '))\n\
             print('ok')"
        ));
        // "bN:peer 10.1.0.1:PORT": the backend that answered and the source it saw.
        let mut lines = answer.lines();
        let first = lines.next().expect("answer");
        let (who, seen) = first.split_once(":peer ").expect("peer answer");
        let n: usize = who.trim_start_matches('b').parse().expect("bN");
        assert_eq!(
            names[n - 1],
            backend,
            "explain said {backend}, {who} answered"
        );
        assert_eq!(e["translation"], seen, "the SNAT source and port");
        // While the connection is open, a flow holds the tuple: explain says so.
        let during: serde_json::Value =
            serde_json::from_str(lines.next().unwrap_or("")).expect("explain json");
        assert!(
            during["flow"]
                .as_str()
                .is_some_and(|f| f.contains("a flow already holds it")),
            "{during}"
        );
        assert_eq!(during["backend"], backend.as_str());
    }
    let table = t.lbctl(&["explain", "10.0.0.2:41000", "10.96.0.10:9000/tcp"]);
    assert!(table.contains("Maglev slot"), "{table}");
    println!("{table}");
    let other = t.lbctl_json(&["explain", "10.0.0.2:41000", "10.96.0.10:9999/tcp"]);
    assert_eq!(other["steered"], false);
}

#[test]
fn capture_writes_what_the_workers_see_before_and_after_translation() {
    if !common::privileged("capture_writes_what_the_workers_see_before_and_after_translation") {
        return;
    }
    let tshark = std::process::Command::new("tshark")
        .arg("--version")
        .output();
    assert!(
        tshark.is_ok_and(|o| o.status.success()),
        "tshark is missing: deploy/install-deps.sh installs it"
    );
    let mut t = Topo::up("capture", 2, 2);
    // Every packet through the workers (the fast path's are not captured).
    t.start_lbd(&["--fast-path", "off"]);
    t.add_service("10.96.0.10:80/tcp", &["10.1.0.11:8080", "10.1.0.12:8080"]);
    t.add_service("10.96.0.10:9000/tcp", &["10.1.0.11:9000"]);
    let file = t.dir().join("capture.pcapng");
    let capture = std::process::Command::new(common::topo::lbctl_path())
        .arg("--socket")
        .arg(t.socket())
        .args([
            "capture",
            "--service",
            "10.96.0.10:80/tcp",
            "--count",
            "40",
            "--seconds",
            "10",
            "-w",
        ])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("lbctl capture");
    std::thread::sleep(Duration::from_millis(300));
    // Traffic of the captured service and of another one.
    let mut echo = common::topo::Echo::connect(&t, "10.96.0.10", 9000);
    assert_eq!(echo.say("x"), "b1:x");
    assert_eq!(t.curl_many(20).len(), 20);
    let out = capture.wait_with_output().expect("lbctl capture");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    println!("{said}");
    // Read back with tshark.
    let o = std::process::Command::new("tshark")
        .args(["-r"])
        .arg(&file)
        .args(["-T", "fields", "-E", "separator=|"])
        .args([
            "-e",
            "frame.comment",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "tcp.dstport",
        ])
        .output()
        .expect("tshark");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<Vec<String>> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect();
    let ins: Vec<&Vec<String>> = rows.iter().filter(|r| r[0].starts_with("in ")).collect();
    let outs: Vec<&Vec<String>> = rows.iter().filter(|r| r[0].starts_with("out ")).collect();
    assert_eq!(ins.len(), 40, "--count 40: {rows:?}");
    assert_eq!(
        outs.len(),
        40,
        "each frame sent has its translation: {rows:?}"
    );
    for r in &rows {
        assert_ne!(r[3], "9000", "another service's frame: {r:?}");
        match (r[0].split(' ').next(), r[1].as_str(), r[2].as_str()) {
            // From the client to the VIP, out from the SNAT address to a backend.
            (Some("in"), "10.0.0.2", "10.96.0.10") => {}
            (Some("out"), "10.1.0.1", b) => assert!(b == "10.1.0.11" || b == "10.1.0.12", "{r:?}"),
            // A backend's answer, out from the VIP to the client.
            (Some("in"), b, "10.1.0.1") => assert!(b == "10.1.0.11" || b == "10.1.0.12", "{r:?}"),
            (Some("out"), "10.96.0.10", "10.0.0.2") => {}
            _ => panic!("unexpected frame {r:?}"),
        }
    }
    assert!(rows
        .iter()
        .all(|r| r[0].contains("worker") && r[0].ends_with("sent")));
    // One capture at a time, and none left running.
    let o = t.try_lbctl(&["capture", "-w", "/dev/null", "--seconds", "0.2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
