//! The fuzz harness (`nat::fuzzing::ipmasq`) under `cargo test`: a bounded run with bolero's
//! random engine, in CI on every change. Long runs use cargo-fuzz on the same function
//! (`nat/fuzz`, see docs/fuzzing.md). `BOLERO_RANDOM_TEST_TIME_MS` and
//! `BOLERO_RANDOM_SEED` change the budget and reproduce a failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[test]
fn fuzz_nat() {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let budget = std::env::var("BOLERO_RANDOM_TEST_TIME_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(5), Duration::from_millis);
    bolero::check!()
        .with_test_time(budget)
        .with_max_len(4096)
        .for_each(|data: &[u8]| {
            RUNS.fetch_add(1, Ordering::Relaxed);
            nat::fuzzing::ipmasq(data);
        });
    let runs = RUNS.load(Ordering::Relaxed);
    eprintln!("fuzz_nat: {runs} ip-masq-agent files without a finding in {budget:?}");
    assert!(runs > 100, "the fuzzer ran ({runs} inputs)");
}
