//! Established flows outlive lbd (`--pin-dir`): an iperf3 transfer through a VIP and a
//! masqueraded iperf3 transfer keep going while lbd is killed with SIGKILL and
//! restarted (every half second of both carries bytes), the restarted lbd adopts their
//! flows (they close cleanly through it), new connections work, and the flows of a
//! service that is gone after the restart are not adopted. Real iperf3, curl and python
//! sockets; run as root (CI does).

mod common;

use common::topo::Topo;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A bpffs mounted for the test in the root mount namespace (where lbd's `ip netns
/// exec` finds it: that remounts /sys only), unmounted when the test ends.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(dir: &Path) -> Bpffs {
        std::fs::create_dir_all(dir).expect("pin dir");
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount -t bpf {}", dir.display());
        Bpffs(dir.to_path_buf())
    }

    fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// iperf3 as a client in namespace `ns`, JSON, half-second intervals.
fn iperf3(t: &Topo, ns: &str, dst: &str, secs: u32) -> Child {
    t.cmd(ns, "iperf3")
        .args(["-c", dst, "-p", "5201", "-J", "-i", "0.5", "-b", "100M"])
        .args(["-t", &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iperf3")
}

/// The transfer's bytes, after checking it ended cleanly and no half second of it
/// was empty.
fn finished(c: Child, what: &str) -> u64 {
    let o = c.wait_with_output().expect("iperf3 output");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: iperf3 JSON: {e}: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert!(
        o.status.success() && v.get("error").is_none(),
        "{what}: {v}"
    );
    let intervals: Vec<u64> = v["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0))
        .collect();
    println!("{what}: bytes per half second {intervals:?}");
    assert!(intervals.len() >= 14, "{what}: {intervals:?}");
    assert!(
        intervals.iter().all(|&b| b > 0),
        "{what}: the transfer stalled: {intervals:?}"
    );
    let got = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let sent = v["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    assert!(got > 0 && got <= sent, "{what}: received {got} of {sent}");
    got
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_iperf3_transfer_through_a_vip_outlives_lbd() {
    if !common::privileged("an_iperf3_transfer_through_a_vip_outlives_lbd") {
        return;
    }
    let mut t = Topo::up("restart", 2, 2);
    let pins = Bpffs::mount(&t.dir().join("bpf"));
    let state = t.dir().join("state.json").to_string_lossy().into_owned();
    let args = ["--pin-dir", &pins.arg(), "--state-file", &state];
    t.start_lbd(&args);
    // A second lbd on the same pins (another socket, by mistake) would take the first
    // one's program and flows over: refused, as is --unpin under a running lbd.
    for extra in [
        vec![
            "--iface",
            "lb0",
            "--no-state",
            "--socket",
            "/tmp/xlb-second.sock",
        ],
        vec!["--unpin"],
    ] {
        let o = t
            .cmd("lb", env!("CARGO_BIN_EXE_lbd"))
            .args(["--pin-dir", &pins.arg()])
            .args(&extra)
            .output()
            .expect("lbd");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("another lbd"),
            "{extra:?}: {err}"
        );
    }
    t.spawn("b1", "iperf3", &["-s", "-p", "5201"]);
    t.add_service("10.96.0.10:5201/tcp", &["10.1.0.11:5201"]);
    t.add_service("10.96.0.10:80/tcp", &["10.1.0.11:8080", "10.1.0.12:8080"]);
    t.add_service("10.96.0.10:9000/tcp", &["10.1.0.12:9000"]);
    // An echo connection to a service that will be gone after the restart.
    t.spawn(
        "client",
        "python3",
        &[
            "-c",
            "import socket,time\n\
             s=socket.create_connection(('10.96.0.10',9000),timeout=3)\n\
             for i in range(5): s.sendall(b'x\\n'); s.recv(10)\n\
             time.sleep(60)",
        ],
    );
    wait_for("the echo connection in the fast path", || {
        t.fast_entries() >= 2
    });

    let transfer = iperf3(&t, "client", "10.96.0.10", 8);
    wait_for("the transfer in the fast path", || t.fast_entries() >= 4);
    std::thread::sleep(Duration::from_millis(1500));
    t.kill_lbd();
    // The service file without the echo service, as an operator might change it while
    // lbd is down.
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state")).expect("json");
    saved["services"]
        .as_array_mut()
        .expect("services")
        .retain(|s| s["frontend"] != "10.96.0.10:9000/tcp");
    std::fs::write(&state, saved.to_string()).expect("write state");
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    t.start_lbd(&args);
    let mut first = None;
    while started.elapsed() < Duration::from_secs(10) {
        if !t.curl_vip("client", "/").is_empty() {
            first = Some(started.elapsed());
            break;
        }
    }
    let first = first.expect("a new connection answered after the restart");
    println!(
        "restart to first new connection answered: {} ms",
        first.as_millis()
    );
    let adopted = t.worker_sum("flows_adopted");
    println!("flows adopted: {adopted}");
    // At least iperf3's data connection (not the echo service's flow).
    assert!(adopted >= 1, "{}", t.lbd_log());
    let log = t.lbd_log();
    assert!(
        log.contains("took over the previous lbd's datapath"),
        "{log}"
    );
    assert!(
        log.contains("not adopted"),
        "the echo flow's service is gone: {log}"
    );

    let got = finished(transfer, "through the VIP");
    println!("received {got} bytes through the VIP");
    // The adopted flows went on through this lbd's program: installed again, executed.
    assert!(t.xdp_stat("fast_path") > 0, "{}", t.lbd_log());
    // iperf3 closed its connections through the adopted flows: they are closing or gone.
    wait_for("the adopted flows to close", || {
        let flows = t.lbctl_json(&["nat", "list"]);
        !flows["translations"].as_array().is_some_and(|l| {
            l.iter().any(|f| {
                f["remote"].as_str().is_some_and(|r| r.ends_with(":5201"))
                    && f["state"] == "established"
            })
        })
    });
    let xdp_on = |t: &Topo, dev: &str| {
        let o = t
            .cmd("lb", "ip")
            .args(["link", "show", dev])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&o.stdout).contains("xdp")
    };
    // A restart that serves fewer interfaces takes the previous program off the others.
    t.kill_lbd();
    assert!(xdp_on(&t, "lb1"));
    t.start_lbd_on(&["lb0"], &args);
    assert!(!xdp_on(&t, "lb1"), "lb1 is not served any more");
    assert!(t.lbd_log().contains("which this lbd does not serve"));
    // A stop leaves the program (and the fast path's flows) for the next lbd; --unpin
    // takes xlb out: the program leaves the interfaces, nothing of lbd stays pinned.
    t.stop_lbd();
    let xdp_on_lb0 = |t: &Topo| xdp_on(t, "lb0");
    assert!(xdp_on_lb0(&t), "the program stays after a stop");
    let o = Command::new(env!("CARGO_BIN_EXE_lbd"))
        .args(["--unpin", "--pin-dir", &pins.arg()])
        .output()
        .expect("lbd --unpin");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let left: Vec<String> = std::fs::read_dir(&pins.0)
        .expect("pins")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".debug"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!xdp_on_lb0(&t), "--unpin detaches the program");
}

#[test]
fn a_masqueraded_transfer_outlives_lbd() {
    if !common::privileged("a_masqueraded_transfer_outlives_lbd") {
        return;
    }
    let mut t = Topo::masq_up("restartm", 2);
    let pins = Bpffs::mount(&t.dir().join("bpf"));
    // A policy of its own (the ip-masq-agent file): it is back after the restart.
    let policy = t.dir().join("ip-masq-agent.yaml");
    std::fs::write(
        &policy,
        "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 192.0.2.0/24\nmasqLinkLocal: true\n",
    )
    .expect("policy");
    let policy = policy.to_string_lossy().into_owned();
    let args = [
        "--masquerade-from",
        "10.244.0.0/16",
        "--ip-masq-config",
        &policy,
        "--pin-dir",
        &pins.arg(),
        "--no-state",
    ];
    t.start_lbd_on(&["int0", "ext0"], &args);
    t.spawn("srv", "iperf3", &["-s", "-p", "5201"]);
    std::thread::sleep(Duration::from_millis(500));
    let rules = t.lbctl_json(&["ipmasq", "list"]);
    assert!(rules.to_string().contains("192.0.2.0/24"), "{rules}");

    let transfer = iperf3(&t, "pod", "20.0.0.10", 8);
    wait_for("the transfer in the fast path", || t.fast_entries() >= 2);
    std::thread::sleep(Duration::from_millis(1500));
    t.kill_lbd();
    std::thread::sleep(Duration::from_secs(2));
    t.start_lbd_on(&["int0", "ext0"], &args);
    assert_eq!(t.lbctl_json(&["ipmasq", "list"]), rules, "the same policy");
    let adopted = t.worker_sum("flows_adopted");
    assert!(adopted >= 1, "{}", t.lbd_log());
    // The adopted flows keep their egress port: the server sees the egress address.
    let flows = t.lbctl_json(&["nat", "list"]);
    assert!(
        flows["translations"]
            .as_array()
            .is_some_and(|l| l.iter().any(|f| f["remote"] == "20.0.0.10:5201"
                && f["outside"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("203.0.113.7:")))),
        "{flows}"
    );
    let got = finished(transfer, "masqueraded");
    println!("received {got} bytes masqueraded, {adopted} flows adopted");
    // A new masqueraded connection after the restart.
    let o = t
        .cmd("pod", "curl")
        .args(["-s", "--max-time", "5", "http://20.0.0.10:8080/peer"])
        .output()
        .expect("curl");
    let peer = String::from_utf8_lossy(&o.stdout);
    assert!(peer.contains("203.0.113.7"), "{peer}");
}
