#!/usr/bin/env bash
# xlb's test suite: lint, unit and property tests, the XDP program through
# BPF_PROG_TEST_RUN, and end-to-end tests in network namespaces. Run as root.
# With CI=true a missing privilege or tool fails the run instead of skipping tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  echo "run as root: the XDP and namespace tests need CAP_NET_ADMIN and CAP_BPF" >&2
  exit 1
fi
deploy/install-deps.sh
export CARGO_TERM_COLOR=never
echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== pure crates: unit, property and fixture tests"
cargo test --workspace --locked --exclude xdp --exclude lbd -- --skip fuzz_ 2>&1 | tee -a "$log"
echo "== fuzz targets, bounded (bolero, 5 s each; long runs: docs/fuzzing.md)"
cargo test --locked -p lb -p nat -p control --test fuzz -- --nocapture 2>&1 | tee -a "$log"
echo "== XDP program and end-to-end namespace tests (serial)"
cargo test -p xdp -p lbd --locked -- --test-threads=1 2>&1 | tee -a "$log"
echo "== benchmark harness, smoke mode (every scenario for a few seconds)"
bench/run.sh --smoke
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "all tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"
