//! Health checks end to end: TCP, HTTP and UDP probes from the edge node to real
//! servers; a backend whose health endpoint dies gets no new flows (its established
//! connection goes on), comes back when the endpoint does; every backend down fails
//! open; state changes are logged once; checks are in the state file. Run as root (CI
//! does).

mod common;

use common::topo::Topo;
use std::time::{Duration, Instant};

/// A TCP listener on `port` in `ns` that accepts and closes: a health endpoint the test
/// can kill without touching the service itself.
fn health_endpoint(t: &mut Topo, ns: &str, port: u16) {
    t.spawn(
        ns,
        "python3",
        &[
            "-c",
            &format!(
                "import socket\n\
                 s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('0.0.0.0', {port})); s.listen(64)\n\
                 while True: s.accept()[0].close()  # xlb-health-endpoint"
            ),
        ],
    );
}

/// The backends of `frontend` in `lbctl service list -o json`.
fn backends(t: &Topo, frontend: &str) -> Vec<serde_json::Value> {
    let v = t.lbctl_json(&["service", "list"]);
    v["services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["frontend"] == frontend))
        .and_then(|s| s["backends"].as_array().cloned())
        .unwrap_or_else(|| panic!("{frontend} missing: {v}"))
}

/// Wait until the backends' states are `want` (address order); how long it took.
fn states(t: &Topo, frontend: &str, want: &[&str]) -> Duration {
    let start = Instant::now();
    loop {
        let b = backends(t, frontend);
        let got: Vec<&str> = b
            .iter()
            .map(|b| b["state"].as_str().unwrap_or(""))
            .collect();
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{frontend}: states {got:?}, not {want:?}: {b:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` new connections to the echo service: which backend answered each.
fn who(t: &Topo, n: u32) -> Vec<String> {
    let out = t.client_py(&format!(
        "import socket\n\
         for i in range({n}):\n\
         \x20   s = socket.create_connection(('10.96.0.10', 9000), timeout=3)\n\
         \x20   s.sendall(b'x\\n'); print(s.recv(100).decode().split(':')[0]); s.close()"
    ));
    out.lines().map(str::to_string).collect()
}

#[test]
fn a_backend_failing_its_check_gets_no_new_flows_until_it_passes_again() {
    let Some(mut t) = Topo::start("health", 2, 2) else {
        return;
    };
    let state = t.dir().join("state.yaml");
    t.stop_lbd();
    t.start_lbd(&["--state-file", state.to_str().expect("utf-8")]);
    t.add_service("10.96.0.10:80/tcp", &["10.1.0.11:8080", "10.1.0.12:8080"]);
    t.add_service("10.96.0.10:53/udp", &["10.1.0.11:5353", "10.1.0.12:5353"]);
    t.add_service("10.96.0.10:9000/tcp", &["10.1.0.11:9000", "10.1.0.12:9000"]);
    for b in ["b1", "b2"] {
        health_endpoint(&mut t, b, 7000);
    }
    let fast = [
        "--interval-ms",
        "200",
        "--timeout-ms",
        "150",
        "--rise",
        "2",
        "--fall",
        "2",
    ];
    let set = |args: &[&str]| {
        let mut a = vec!["service", "health"];
        a.extend_from_slice(args);
        a.extend_from_slice(&fast);
        t.lbctl(&a)
    };
    assert!(set(&["10.96.0.10:80/tcp", "--http", "/"])
        .contains("health check of 10.96.0.10:80/tcp: http / (200-399) every 200 ms"),);
    set(&["10.96.0.10:53/udp", "--udp", "ping", "--expect", ":ping"]);
    set(&["10.96.0.10:9000/tcp", "--tcp", "--port", "7000"]);
    // A check that cannot work changes nothing.
    let o = t.try_lbctl(&[
        "service",
        "health",
        "10.96.0.10:80/tcp",
        "--http",
        "/",
        "--interval-ms",
        "50",
    ]);
    assert!(!o.status.success(), "interval 50 ms refused");

    // Every probe answers: all up, each with its last result.
    std::thread::sleep(Duration::from_millis(600));
    for (f, seen) in [
        ("10.96.0.10:80/tcp", "HTTP 200"),
        ("10.96.0.10:53/udp", "answered"),
        ("10.96.0.10:9000/tcp", "connected"),
    ] {
        for b in backends(&t, f) {
            assert_eq!(b["healthy"], true, "{f}: {b}");
            let h = b["health"].as_str().unwrap_or("");
            assert!(
                h.starts_with("up: last probe ok") && h.contains(seen),
                "{f}: {b}"
            );
        }
    }
    let mut names = who(&t, 30);
    names.sort();
    names.dedup();
    assert_eq!(names, ["b1", "b2"]);

    // An established connection to b2, then b2's health endpoint dies.
    let mut held = None;
    for _ in 0..20 {
        let mut c = common::topo::Echo::connect(&t, "10.96.0.10", 9000);
        if c.name() == "b2" {
            held = Some(c);
            break;
        }
    }
    let mut held = held.expect("a connection to b2");
    t.kill_in("b2", "xlb-health-endpoint");
    let down = states(&t, "10.96.0.10:9000/tcp", &["active", "unhealthy"]);
    println!(
        "b2 seen unhealthy {} ms after its endpoint died",
        down.as_millis()
    );
    assert!(down < Duration::from_secs(3), "fall 2 × 200 ms");
    let b2 = &backends(&t, "10.96.0.10:9000/tcp")[1];
    assert!(
        b2["health"]
            .as_str()
            .is_some_and(|h| h.starts_with("down: last probe failed")),
        "{b2}"
    );
    // New connections all go to b1; the established one to b2 goes on.
    assert!(who(&t, 30).iter().all(|n| n == "b1"));
    assert_eq!(held.say("still there"), "b2:still there");
    // The other services' checks are untouched.
    states(&t, "10.96.0.10:80/tcp", &["active", "active"]);

    // The endpoint is back: so is b2, and new connections reach it again.
    health_endpoint(&mut t, "b2", 7000);
    let up = states(&t, "10.96.0.10:9000/tcp", &["active", "active"]);
    println!(
        "b2 healthy again {} ms after its endpoint came back",
        up.as_millis()
    );
    let mut names = who(&t, 30);
    names.sort();
    names.dedup();
    assert_eq!(names, ["b1", "b2"]);
    let log = t.lbd_log();
    assert_eq!(
        log.matches("backend unhealthy").count(),
        1,
        "said once: {log}"
    );
    assert_eq!(log.matches("backend healthy again").count(), 1, "{log}");

    // Every backend down: the service fails open (new connections are still served).
    t.kill_in("b1", "xlb-health-endpoint");
    t.kill_in("b2", "xlb-health-endpoint");
    states(&t, "10.96.0.10:9000/tcp", &["unhealthy", "unhealthy"]);
    let mut names = who(&t, 30);
    names.sort();
    names.dedup();
    assert_eq!(names, ["b1", "b2"], "fail open");
    assert!(t
        .lbd_log()
        .contains("every backend failed its health check"));

    // The checks are in the state file: export shows them, a restart keeps them.
    let export = t.lbctl(&["export"]);
    assert!(
        export.contains("type: udp") && export.contains("port: 7000"),
        "{export}"
    );
    assert!(std::fs::read_to_string(&state)
        .expect("state")
        .contains("path: /"));
    t.stop_lbd();
    t.start_lbd(&["--state-file", state.to_str().expect("utf-8")]);
    assert_eq!(t.lbctl(&["export"]), export);
    // Removing a check: its backends take new flows again whatever their probes say.
    assert!(t
        .lbctl(&["service", "health", "10.96.0.10:9000/tcp", "--off"])
        .contains("removed"));
    let b = backends(&t, "10.96.0.10:9000/tcp");
    assert!(
        b.iter()
            .all(|b| b["state"] == "active" && b.get("healthy").is_none()),
        "{b:?}"
    );
    drop(held);
}
