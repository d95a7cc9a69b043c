//! lbd as a systemd service: the unit deploy/install.sh installs passes
//! `systemd-analyze verify` (no warning at all), and lbd tells systemd it is ready
//! (Type=notify) only once its state is restored. Run as root (CI does).

mod common;

use common::topo::Topo;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `systemd-analyze verify UNIT`: its complaints (empty when the unit is clean).
fn verify(unit: &Path) -> String {
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .output()
        .expect("systemd-analyze (deploy/install-deps.sh installs systemd)");
    let said =
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    if !o.status.success() && said.is_empty() {
        return format!("exit {}", o.status);
    }
    said
}

#[test]
fn the_installed_unit_verifies() {
    if !common::privileged("the_installed_unit_verifies") {
        return;
    }
    let stage = std::env::temp_dir().join(format!("xlb-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    let bins = Path::new(env!("CARGO_BIN_EXE_lbd"))
        .parent()
        .expect("bin dir");
    let st = Command::new(common::topo::repo().join("deploy/install.sh"))
        .env("SKIP_BUILD", "1")
        .env("DESTDIR", &stage)
        .env("BIN_DIR", bins)
        .status()
        .expect("install.sh");
    assert!(st.success(), "install.sh failed");
    let unit = stage.join("etc/systemd/system/xlb-lbd.service");
    let text = std::fs::read_to_string(&unit).expect("the unit");
    assert!(text.contains("Type=notify") && text.contains("StateDirectory=xlb"));
    assert!(stage.join("usr/local/bin/lbd").exists() && stage.join("etc/xlb/lbd.env").exists());
    // Verified with ExecStart pointing at the staged binary (verify wants it to exist).
    let check = stage.join("xlb-lbd.service");
    let staged = stage.join("usr/local/bin/lbd");
    std::fs::write(
        &check,
        text.replace("/usr/local/bin/lbd", &staged.to_string_lossy()),
    )
    .expect("write");
    assert_eq!(verify(&check), "", "systemd-analyze verify complained");
    // The check can fail: a misspelt setting is reported.
    std::fs::write(
        &check,
        text.replace("/usr/local/bin/lbd", &staged.to_string_lossy())
            .replace("Type=notify", "Type=notfy"),
    )
    .expect("write");
    assert!(verify(&check).contains("notfy"));
    let _ = std::fs::remove_dir_all(&stage);
}

#[test]
fn lbd_says_ready_only_with_its_state_restored() {
    if !common::privileged("lbd_says_ready_only_with_its_state_restored") {
        return;
    }
    let t = Topo::up("notify", 1, 1);
    let dir = t.dir();
    let state = dir.join("state.yaml");
    std::fs::write(
        &state,
        "services:\n  - frontend: 10.96.0.10:80/tcp\n    backends: [10.1.0.11:8080]\n",
    )
    .expect("state");
    let notify = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let control = dir.join("lbd-notify.sock");
    let mut lbd = t
        .cmd("lb", env!("CARGO_BIN_EXE_lbd"))
        .env("NOTIFY_SOCKET", &notify)
        .args(["--iface", "lb0", "--iface", "lb1", "--state-file"])
        .arg(&state)
        .arg("--socket")
        .arg(&control)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("lbd");
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("lbd said something to systemd");
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    // Asked at once: the restored service is there.
    let o = Command::new(common::topo::lbctl_path())
        .arg("--socket")
        .arg(&control)
        .args(["export", "-o", "json"])
        .output()
        .expect("lbctl");
    let _ = Command::new("kill")
        .args(["-INT", &lbd.id().to_string()])
        .status();
    let stopping = sock
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    let _ = lbd.wait();
    assert_eq!(said.trim(), "READY=1");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("export json");
    assert_eq!(v["services"][0]["frontend"], "10.96.0.10:80/tcp", "{v}");
    assert_eq!(
        stopping.map(|s| s.trim().to_string()).ok(),
        Some("STOPPING=1".into())
    );
}
