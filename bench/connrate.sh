#!/usr/bin/env bash
# New connections per second through a VIP: xlb (lbd with a dedicated SNAT address)
# against nftables DNAT + masquerade (kube-proxy's nftables mode: numgen over per-backend
# chains, masquerade toward the backends), in the same namespaces (deploy/topology.sh),
# alternating rounds of `wrk -t2 -c50 -H 'Connection: close'` against three nginx
# backends. Run as root.
#
#   bench/connrate.sh [SECONDS] [ROUNDS]      default: 60 s, 2 rounds of each
#   QUEUES=1 XLB_ARGS=... bench/connrate.sh   queues of the LB veths (default 2), extra lbd arguments
#
# Per round it prints wrk's requests/s and errors, and the client's new connections per
# second (TCP ActiveOpens in its namespace, sampled every second): the mean and the
# slowest whole second. Figures are reported, never asserted (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  echo "run as root: the benchmark attaches XDP programs and builds namespaces" >&2
  exit 1
fi
D=${1:-60}
R=${2:-2}
P=xcr$$
VIP=10.96.0.10
SNAT=10.1.0.2
deploy/install-deps.sh
cargo build --release --workspace --locked -q
. deploy/netns-lib.sh
dir=$(mktemp -d)
lbd_pid=
cleanup() {
  [[ -n $lbd_pid ]] && kill -INT "$lbd_pid" 2>/dev/null && wait "$lbd_pid" 2>/dev/null || true
  for n in client lb b1 b2 b3; do
    for pid in $(ip netns pids "$P-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done
  deploy/topology.sh down "$P"
  rm -rf "$dir"
}
trap cleanup EXIT

deploy/topology.sh up "$P" "${QUEUES:-2}" 3
for i in 1 2 3; do
  mkdir -p "$dir/b$i"
  cat > "$dir/b$i/nginx.conf" <<EOF
daemon on; worker_processes 1; pid $dir/b$i/pid; error_log $dir/b$i/error.log;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $dir/b$i; proxy_temp_path $dir/b$i;
fastcgi_temp_path $dir/b$i; uwsgi_temp_path $dir/b$i; scgi_temp_path $dir/b$i;
server { listen 8081 backlog=4096; location / { return 200 "ok b$i\n"; } } }
EOF
  ns "$P-b$i" sysctl -qw net.core.somaxconn=4096
  ns "$P-b$i" nginx -c "$dir/b$i/nginx.conf" < /dev/null > /dev/null 2>&1
done
ns "$P-lb" ip addr add "$SNAT/32" dev lb1

opens() { ns "$P-client" awk '/^Tcp:/ { if (seen) print $6; seen = 1 }' /proc/net/snmp; }

# One measured run: wrk for D seconds, ActiveOpens sampled every second.
measure() {
  local name=$1 out="$dir/wrk.out" samples=() start
  ns "$P-client" wrk -t2 -c50 -d"${D}s" -H 'Connection: close' "http://$VIP/" > "$out" 2>&1 &
  local wrk=$!
  start=$(date +%s.%N)
  samples+=("$(opens)")
  for ((s = 1; s <= D; s++)); do
    sleep "$(awk -v t="$start" -v s="$s" -v now="$(date +%s.%N)" 'BEGIN { d = t + s - now; print (d > 0 ? d : 0) }')"
    samples+=("$(opens)")
  done
  wait "$wrk"
  local rps errors
  rps=$(awk '/Requests\/sec/ { print $2 }' "$out")
  errors=$(grep -E 'Socket errors|Non-2xx' "$out" | tr '\n' ' ' || true)
  printf '%s\n' "${samples[@]}" | awk -v name="$name" -v rps="$rps" -v err="${errors:-none}" '
    { v[NR] = $1 }
    END {
      n = 0; sum = 0; min = -1
      for (i = 3; i < NR; i++) { d = v[i] - v[i - 1]; sum += d; n++; if (min < 0 || d < min) min = d }
      printf "| %s | %.0f | %.0f | %d | %s |\n", name, rps, sum / n, min, err
    }'
}

xlb_round() {
  # Not through the ns function: $! must be lbd's pid (SIGINT detaches it cleanly).
  ip netns exec "$P-lb" target/release/lbd --iface lb0 --iface lb1 --snat-addr "$SNAT" ${XLB_ARGS:-} \
    --no-state --no-pin --socket "$dir/lbd.sock" --log warn < /dev/null > /dev/null 2> "$dir/lbd.log" &
  lbd_pid=$!
  for _ in $(seq 100); do
    target/release/lbctl --socket "$dir/lbd.sock" status > /dev/null 2>&1 && break
    sleep 0.1
  done
  target/release/lbctl --socket "$dir/lbd.sock" service add "$VIP:80/tcp" \
    -b 10.1.0.11:8081 -b 10.1.0.12:8081 -b 10.1.0.13:8081 > /dev/null
  measure xlb
  kill -INT "$lbd_pid"
  wait "$lbd_pid" || true
  lbd_pid=
}

nft_round() {
  ns "$P-lb" nft -f - <<EOF
table ip xlbbench {
  chain b1 { meta l4proto tcp dnat to 10.1.0.11:8081; }
  chain b2 { meta l4proto tcp dnat to 10.1.0.12:8081; }
  chain b3 { meta l4proto tcp dnat to 10.1.0.13:8081; }
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr $VIP tcp dport 80 numgen random mod 3 vmap { 0 : jump b1, 1 : jump b2, 2 : jump b3 }
  }
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "lb1" ip daddr 10.1.0.0/24 masquerade
  }
}
EOF
  measure nftables
  ns "$P-lb" nft delete table ip xlbbench
}

echo "| system | requests/s (wrk) | new connections/s (mean) | slowest second | errors |"
echo "|---|---:|---:|---:|---|"
for ((r = 1; r <= R; r++)); do
  xlb_round
  sleep 2
  nft_round
  sleep 2
done
