// Shared by xdp/build.rs and bench/build.rs (`include!`d): compile C XDP programs with
// clang (aya's integration tests do the same); the objects land in OUT_DIR and are
// embedded with `aya::include_bytes_aligned!`.

/// Compile `bpf/{prog}.bpf.c` for each of `programs` into `$OUT_DIR/{prog}.bpf.o`;
/// `headers` are extra files whose change must rebuild.
fn compile_bpf(programs: &[&str], headers: &[&str]) {
    use std::env;
    use std::path::PathBuf;
    use std::process::Command;

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch_include = format!(
        "/usr/include/{}-linux-gnu",
        env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
    );
    for prog in programs {
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
    for h in headers {
        println!("cargo:rerun-if-changed={h}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
}
