//! Compiles the C XDP programs in `bpf/` with clang (aya's integration tests do the
//! same); the objects are embedded with `aya::include_bytes_aligned!`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The C programs in bpf/ (the DSR backend decapsulator will join the steering program).
const PROGRAMS: &[&str] = &["xlb"];

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch_include = format!(
        "/usr/include/{}-linux-gnu",
        env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
    );
    for prog in PROGRAMS {
        let src = format!("bpf/{prog}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{prog}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            .arg(format!("-I{arch_include}"))
            .arg("-Ibpf")
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {clang} to build {src} (install clang and libbpf-dev: deploy/install-deps.sh): {e}"));
        assert!(status.success(), "{clang} failed on {src}");
    }
    println!("cargo:rerun-if-changed=bpf/xlb.h");
    println!("cargo:rerun-if-env-changed=CLANG");
}
