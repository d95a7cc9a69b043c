//! The fuzz harness (`lb::fuzzing::frames`) under `cargo test`: a bounded run in CI on every
//! change (`nat::fuzzing::run`). Long runs use cargo-fuzz on the same function
//! (`lb/fuzz`, see docs/fuzzing.md).

#[test]
fn fuzz_lb() {
    nat::fuzzing::run(
        "fuzz_lb",
        "frame sequences through the engine",
        lb::fuzzing::frames,
    );
}
