//! `nat::fuzzing::ipmasq` under libFuzzer: the same harness and invariants as the bounded run in
//! `cargo test` (`nat/tests/fuzz.rs`), for long coverage-guided runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nat::fuzzing::ipmasq(data));
