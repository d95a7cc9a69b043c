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
