//! The desired state as a file, end to end: `lbctl apply -f` makes lbd's services those
//! of the file in one change and prints the diff, `--dry-run` changes nothing, a
//! malformed or invalid file changes nothing and says where, and `lbctl export` prints
//! what `apply` takes back unchanged. Real curl through the VIP. Run as root (CI does).

mod common;

use common::topo::{tally, Topo};

const A: &str = "
services:
  - frontend: 10.96.0.10:80/tcp
    backends: [10.1.0.11:8080, 10.1.0.12:8080]
  - frontend: 10.96.0.10:53/udp
    backends: [10.1.0.11:5353]
";

const B: &str = "
services:
  - frontend: 10.96.0.10:80/tcp
    backends: [10.1.0.12:8080, 10.1.0.13:8080@2]
  - frontend: 10.96.0.10:53/udp
    backends: [10.1.0.11:5353]
    options: {affinity: client-ip}
";

/// The backends that answered 60 requests.
fn answered(t: &Topo) -> Vec<String> {
    let bodies = t.curl_many(60);
    assert_eq!(bodies.len(), 60, "{}", t.lbd_log());
    tally(&bodies).into_keys().collect()
}

#[test]
fn apply_makes_the_services_those_of_the_file_and_export_gives_the_file_back() {
    let Some(t) = Topo::start("apply", 2, 3) else {
        return;
    };
    let file = |name: &str, text: &str| {
        let p = t.dir().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_string_lossy().into_owned()
    };
    let a = file("a.yaml", A);
    let out = t.lbctl(&["apply", "-f", &a]);
    assert!(
        out.contains("+ service 10.96.0.10:80/tcp with 10.1.0.11:8080@1, 10.1.0.12:8080@1"),
        "{out}"
    );
    assert!(out.contains("2 change(s) applied"), "{out}");
    assert_eq!(answered(&t), ["backend b1", "backend b2"]);

    // The same file again: nothing to do.
    assert!(t.lbctl(&["apply", "-f", &a]).contains("no changes"));

    // A dry run of B says what would change and changes nothing.
    let b = file("b.yaml", B);
    let out = t.lbctl(&["apply", "-f", &b, "--dry-run"]);
    for line in [
        "- backend 10.1.0.11:8080 of 10.96.0.10:80/tcp",
        "+ backend 10.1.0.13:8080@2 of 10.96.0.10:80/tcp",
        "~ service 10.96.0.10:53/udp options: mode snat, affinity client-ip",
        "dry run: 3 change(s) would be made; nothing changed",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    assert_eq!(answered(&t), ["backend b1", "backend b2"]);

    // A malformed file (a misspelt key on line 4) and an invalid one change nothing;
    // the errors say where and what.
    let bad = file(
        "bad.yaml",
        "services:\n  - frontend: 10.96.0.10:80/tcp\n    backends: [10.1.0.13:8080]\n    option: {}\n",
    );
    let o = t.try_lbctl(&["apply", "-f", &bad]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.yaml") && err.contains("line 4") && err.contains("option"),
        "{err}"
    );
    let invalid = file(
        "invalid.json",
        r#"{"services": [{"frontend": "10.96.0.10:80/tcp", "backends": ["10.1.0.13:8080@99999"]}]}"#,
    );
    let o = t.try_lbctl(&["apply", "-f", &invalid]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("nothing changed") && err.contains("99999"),
        "{err}"
    );
    assert_eq!(answered(&t), ["backend b1", "backend b2"]);

    // B for real: one change, the new set only.
    let out = t.lbctl(&["apply", "-f", &b]);
    assert!(out.contains("3 change(s) applied"), "{out}");
    assert_eq!(answered(&t), ["backend b2", "backend b3"]);

    // Export gives B back: applying it changes nothing, in either format.
    let yaml = t.lbctl(&["export"]);
    assert!(
        yaml.contains("10.1.0.13:8080@2") && yaml.contains("affinity: client-ip"),
        "{yaml}"
    );
    let json = t.lbctl(&["export", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["services"].as_array().map(Vec::len), Some(2), "{v}");
    for (name, text) in [("e.yaml", yaml.as_str()), ("e.json", json.as_str())] {
        let p = file(name, text);
        assert!(
            t.lbctl(&["apply", "-f", &p]).contains("no changes"),
            "{name}"
        );
    }
    // An empty file removes every service.
    let none = file("none.yaml", "services: []\n");
    assert!(t
        .lbctl(&["apply", "-f", &none])
        .contains("2 change(s) applied"));
    assert!(t.lbctl(&["service", "list"]).contains("no services"));
}

/// lbd's services survive a SIGKILL: every change is in the state file, which the next
/// lbd restores before it answers. A state file that does not parse stops lbd with the
/// file and line; `--no-state` starts empty.
#[test]
fn services_come_back_after_lbd_is_killed() {
    if !common::privileged("services_come_back_after_lbd_is_killed") {
        return;
    }
    let mut t = Topo::up("persist", 2, 3);
    let path = t.dir().join("state").join("lbd.yaml");
    let state = path.to_string_lossy().into_owned();
    t.start_lbd(&["--state-file", &state]);
    t.add_service("10.96.0.10:80/tcp", &["10.1.0.11:8080", "10.1.0.12:8080@2"]);
    t.lbctl(&["backend", "add", "10.96.0.10:80/tcp", "10.1.0.13:8080"]);
    t.lbctl(&[
        "backend",
        "set-weight",
        "10.96.0.10:80/tcp",
        "10.1.0.12:8080",
        "3",
    ]);
    t.lbctl(&[
        "service",
        "set",
        "10.96.0.10:80/tcp",
        "--affinity",
        "client-ip",
        "--on-remove",
        "drop",
    ]);
    t.add_service("10.96.0.10:53/udp", &["10.1.0.11:5353"]);
    let before = t.lbctl_json(&["export"]);
    assert_eq!(
        before["services"].as_array().map(Vec::len),
        Some(2),
        "{before}"
    );
    let saved = std::fs::read_to_string(&path).expect("the state file");
    assert!(
        saved.contains("10.1.0.12:8080@3") && saved.contains("on_remove: drop"),
        "{saved}"
    );

    t.kill_lbd();
    let started = std::time::Instant::now();
    t.start_lbd(&["--state-file", &state]);
    // The first request answered through the restored service.
    let mut first = None;
    while started.elapsed() < std::time::Duration::from_secs(10) {
        if !t.curl_vip("client", "/").is_empty() {
            first = Some(started.elapsed());
            break;
        }
    }
    let first = first.expect("a request answered after the restart");
    println!(
        "restart to first forwarded request: {} ms",
        first.as_millis()
    );
    assert_eq!(
        t.lbctl_json(&["export"]),
        before,
        "the same services, backends, options"
    );
    let list = t.lbctl_json(&["service", "list"]);
    let web = list["services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["frontend"] == "10.96.0.10:80/tcp"))
        .expect("the web service");
    let weights: Vec<u64> = web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["weight"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(weights, [1, 3, 1], "{list}");
    // Client-ip affinity came back too: one client, one backend.
    let bodies = t.curl_many(20);
    assert_eq!(tally(&bodies).len(), 1, "{bodies:?}");

    // A state file that does not parse: lbd refuses to start, naming it and the line.
    t.kill_lbd();
    std::fs::write(
        &path,
        "services:\n  - frontend: 10.96.0.10:80/tcp\n    weight: 3\n",
    )
    .expect("write");
    let o = t
        .cmd("lb", env!("CARGO_BIN_EXE_lbd"))
        .args([
            "--iface",
            "lb0",
            "--iface",
            "lb1",
            "--state-file",
            &state,
            "--socket",
        ])
        .arg(t.dir().join("corrupt.sock"))
        .output()
        .expect("lbd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("lbd.yaml") && err.contains("line 3") && err.contains("weight"),
        "{err}"
    );
    // --no-state starts without services and leaves the file alone.
    t.start_lbd(&["--no-state"]);
    assert!(t.lbctl(&["service", "list"]).contains("no services"));
    t.add_service("10.96.0.10:80/tcp", &["10.1.0.11:8080"]);
    assert!(std::fs::read_to_string(&path)
        .expect("file")
        .contains("weight: 3"));
}

/// lbd's settings from a TOML file (`--config`): the file's flags apply, the command
/// line's win, and an unknown key or a file that does not parse stops lbd naming it.
#[test]
fn lbd_takes_its_settings_from_a_file_and_the_command_line_wins() {
    if !common::privileged("lbd_takes_its_settings_from_a_file_and_the_command_line_wins") {
        return;
    }
    let mut t = Topo::up("config", 1, 1);
    let conf = t.dir().join("lbd.toml");
    std::fs::write(
        &conf,
        "# lbd's settings\niface = [\"lb0\", \"lb1\"]\nsnat-ports = \"62000-65535\"\nno-state = true\nfast-path = \"off\"\n",
    )
    .expect("write");
    let c = conf.to_string_lossy().into_owned();
    // The interfaces come from the file (none on the command line); --snat-ports from
    // the command line replaces the file's.
    t.start_lbd_on(&[], &["--config", &c, "--snat-ports", "63000-65535"]);
    let st = t.lbctl_json(&["status"]);
    assert_eq!(st["snat_ports"], "63000-65535", "{st}");
    let ifaces: Vec<&str> = st["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| i["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ifaces, ["lb0", "lb1"], "{st}");
    assert_eq!(st["fast_path"], false, "{st}");
    t.stop_lbd();

    let run = |text: &str| {
        std::fs::write(&conf, text).expect("write");
        let o = t
            .cmd("lb", env!("CARGO_BIN_EXE_lbd"))
            .args(["--config", &c, "--socket"])
            .arg(t.dir().join("bad.sock"))
            .output()
            .expect("lbd");
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run("iface = [\"lb0\"]\nsnat-port = \"62000-65535\"\n");
    assert!(
        err.contains("lbd.toml") && err.contains("unknown setting `snat-port`"),
        "{err}"
    );
    let err = run("iface = [\"lb0\"]\nsnat-ports = 62000-65535\n");
    assert!(err.contains("lbd.toml") && err.contains("line 2"), "{err}");
}
