//! `control::fuzzing::request_line` under libFuzzer: the same harness and invariants as the bounded run in
//! `cargo test` (`control/tests/fuzz.rs`), for long coverage-guided runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| control::fuzzing::request_line(data));
