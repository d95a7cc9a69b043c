//! Helpers for the privileged tests, this crate's (`tests/bpf_fixtures.rs`) and lbd's
//! end-to-end tests: not used by the datapath.

use std::path::PathBuf;

/// True if the test may use privileged kernel features (root). In CI (`CI=true`) a
/// missing privilege is a failure, never a silent skip.
pub fn privileged(test: &str) -> bool {
    // The effective uid from /proc (no libc call).
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

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}
