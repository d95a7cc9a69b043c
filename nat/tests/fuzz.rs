//! The fuzz harness (`nat::fuzzing::ipmasq`) under `cargo test`: a bounded run in CI on every
//! change (`nat::fuzzing::run`). Long runs use cargo-fuzz on the same function
//! (`nat/fuzz`, see docs/fuzzing.md).

#[test]
fn fuzz_nat() {
    nat::fuzzing::run("fuzz_nat", "ip-masq-agent files", nat::fuzzing::ipmasq);
}
