//! Helpers shared by the privileged tests.
#![allow(dead_code)]

/// True if the test may use privileged kernel features. In CI (`CI=true`) a missing
/// privilege is a failure, never a silent skip.
pub fn privileged(test: &str) -> bool {
    // SAFETY-free check: effective uid via /proc to avoid libc in tests.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if root {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (CAP_NET_ADMIN, CAP_BPF); CI must run as root");
    }
    eprintln!("{test}: not root, skipped (set CI=true to make this a failure)");
    false
}
pub mod topo;
