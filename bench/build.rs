//! Compiles the bench's C XDP programs in `bpf/`: the generator, the sink and the
//! reference forwarders (see ../xdp/build_bpf.rs).

include!("../xdp/build_bpf.rs");

fn main() {
    compile_bpf(&["gen", "sink", "fwd"], &["bpf/csum.h"]);
}
