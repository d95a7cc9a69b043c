#!/usr/bin/env bash
# xlb demo: a client, an LB node running lbd (XDP + AF_XDP workers on 2-queue veths) and
# three backends running HTTP servers that name themselves, all in network namespaces.
# Sends REQUESTS (default 300) HTTP requests through the VIP with curl, shows which
# backend answered how often, then lbctl's view. Cleans up on exit, Ctrl-C or failure.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then echo "run as root (namespaces, XDP)" >&2; exit 1; fi
REQUESTS=${REQUESTS:-300}
P=xdemo
RUN=/tmp/xlb-demo
VIP=10.96.0.10

deploy/install-deps.sh
echo "== building xlb (release)"
cargo build --release --workspace --locked -q
LBD=$PWD/target/release/lbd
LBCTL=$PWD/target/release/lbctl

pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null; done
  for _ in $(seq 20); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  deploy/topology.sh down "$P"
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== topology: $P-client → $P-lb (lb0 | lb1, 2 queues each) → $P-sw bridge → $P-b1..b3"
deploy/topology.sh up "$P" 2 3
mkdir -p "$RUN"
for i in 1 2 3; do
  ip netns exec "$P-b$i" python3 deploy/backend.py "b$i" --http 8080 >/dev/null 2>&1 &
  pids+=($!); disown
done

echo "== starting lbd"
ip netns exec "$P-lb" "$LBD" --iface lb0 --iface lb1 --socket "$RUN/lbd.sock" 2>"$RUN/lbd.log" &
pids+=($!); disown
export LBCTL_SOCKET=$RUN/lbd.sock
for _ in $(seq 100); do "$LBCTL" status >/dev/null 2>&1 && break; sleep 0.1; done
"$LBCTL" status || { cat "$RUN/lbd.log"; exit 1; }

echo
echo "== lbctl service add $VIP:80/tcp with three backends"
"$LBCTL" service add "$VIP:80/tcp" -b 10.1.0.11:8080 -b 10.1.0.12:8080 -b 10.1.0.13:8080
"$LBCTL" service list

echo
echo "== $REQUESTS HTTP requests from $P-client to http://$VIP/ (one connection each)"
start=$(date +%s.%N)
ip netns exec "$P-client" curl -s --max-time 5 "http://$VIP/?[1-$REQUESTS]" > "$RUN/bodies"
end=$(date +%s.%N)
echo "answers by backend:"
sort "$RUN/bodies" | uniq -c | sed 's/^/  /'
got=$(wc -l < "$RUN/bodies")
awk -v n="$got" -v s="$start" -v e="$end" 'BEGIN { printf "%d of '"$REQUESTS"' answered in %.2f s (%.0f requests/s, sequential curl)\n", n, e - s, n / (e - s) }'

echo
echo "== lbctl stats"
"$LBCTL" stats
[[ $got -eq $REQUESTS ]] || { echo "some requests were not answered" >&2; exit 1; }
