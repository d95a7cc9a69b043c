//! Compiles the C XDP programs in `bpf/` (see build_bpf.rs).

include!("build_bpf.rs");

fn main() {
    // The steering program (the edge node) and the DSR backend decapsulator.
    compile_bpf(
        &["xlb", "decap"],
        &[
            "bpf/xlb.h",
            "bpf/flowrec.h",
            "bpf/execute.h",
            "bpf/maps.h",
            "bpf/parse.h",
            "bpf/fastpath.h",
            "bpf/icmp.h",
            "bpf/csum.h",
        ],
    );
}
