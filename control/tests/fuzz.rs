//! The fuzz harness (`control::fuzzing::request_line`) under `cargo test`: a bounded run in CI on every
//! change (`nat::fuzzing::run`). Long runs use cargo-fuzz on the same function
//! (`control/fuzz`, see docs/fuzzing.md).

#[test]
fn fuzz_control() {
    nat::fuzzing::run(
        "fuzz_control",
        "control request lines",
        control::fuzzing::request_line,
    );
}
