#!/usr/bin/env bash
# xlb's benchmarks in one command (as root, on a fresh machine too): installs what they
# need, builds the release binaries, runs every scenario in namespaces (bench/netns.sh).
#
#   bench/run.sh           full run (~10 min): rewrites the results section of
#                          docs/benchmarks.md and docs/bench/{results.json,pps.png,latency.png}
#   bench/run.sh --smoke   a few seconds per scenario into target/bench-smoke (CI: proves
#                          the harness works; fails if any scenario moved no traffic)
#
# Further arguments go to `xlb-bench run` (target/release/xlb-bench run --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  echo "run as root: the benchmarks attach XDP programs and build namespaces" >&2
  exit 1
fi
deploy/install-deps.sh
export CARGO_TERM_COLOR=never
cargo build --release --workspace --locked
if [[ ${1:-} == --smoke ]]; then
  exec target/release/xlb-bench run --out target/bench-smoke "$@"
fi
exec target/release/xlb-bench run --out docs/bench --doc docs/benchmarks.md "$@"
