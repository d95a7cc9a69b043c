#!/usr/bin/env bash
# Soak test: real clients through xlb for MINUTES (default 5) while its configuration
# churns, then a verdict. Not part of the test command (it runs for minutes); run it as
# root with one command:
#
#   deploy/soak.sh [MINUTES]
#
# Two lbd instances, each in its own namespaces (deploy/topology.sh, masq-topology.sh):
#  load balancing: new-connection HTTP to a stable service (VIP:80 → b1) and to a churned
#    one (VIP:81 → b1 + b2|b3), 16 long-lived TCP echo connections (VIP:9000 → b1 +
#    b2|b3); every second b2 and b3 trade places in the churned services.
#  masquerading: pods make new-connection HTTP requests and hold 8 long-lived TCP echo
#    connections to a public server; every 5 s the ip-masq-agent file adds or removes
#    that server's network from nonMasqueradeCIDRs.
# Passes when: no request to the stable service and no pod request failed; every
# long-lived connection whose backend was never removed (b1) and every masqueraded
# long-lived connection survived the whole run; each lbd's resident memory at the end is
# within 5 % (or 4 MiB) of what it was after the first fifth of the run.
# Requests to the churned service may fail when their backend is removed mid-request:
# they are counted and reported, not judged.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then echo "run as root (namespaces, XDP)" >&2; exit 1; fi
MINUTES=${1:-5}
SECS=$((MINUTES * 60))
P=xsoak
M=xsmq
RUN=/tmp/xlb-soak
VIP=10.96.0.10
# Seconds between masquerade policy changes.
POLICY_EVERY=${POLICY_EVERY:-5}

. deploy/netns-lib.sh
pids=()
cleanup() {
  set +e
  stop_pids
  deploy/topology.sh down "$P"
  deploy/masq-topology.sh down "$M"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

deploy/install-deps.sh
echo "== building xlb (release)"
cargo build --release --workspace --locked -q
LBD=$PWD/target/release/lbd
LBCTL=$PWD/target/release/lbctl
rm -rf "$RUN"; mkdir -p "$RUN"

start_lbd() { # NS SOCKET LOG ARGS...
  ip netns exec "$1" "$LBD" "${@:4}" --no-state --no-pin --socket "$2" 2>"$3" &
  pids+=($!); disown
  for _ in $(seq 100); do "$LBCTL" --socket "$2" status >/dev/null 2>&1 && return 0; sleep 0.1; done
  cat "$3"; return 1
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

echo "== topologies"
deploy/topology.sh up "$P" 2 3
deploy/masq-topology.sh up "$M" 2
for i in 1 2 3; do start_server "$P-b$i" "b$i" --http 8080 --tcp-echo 9000; done
start_server "$M-srv" srv --http 8080 --tcp-echo 9000
start_server "$M-nm" nm --http 8080 --tcp-echo 9000
LB_SOCK=$RUN/lb.sock; MQ_SOCK=$RUN/mq.sock
# The clients open ~100 connections a second to one backend and one server port, and a
# closed connection keeps its NAT port 120 s (the remote's TIME_WAIT): the default
# 4 536 ports would run out (issue 10 is about exactly that). Give NAT the wide range,
# with the nodes' own ephemeral ports moved out of its way.
for ns in "$P-lb" "$M-lb"; do ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="60000 65000"; done
NAT_PORTS=(--snat-ports 1024-59999)
start_lbd "$P-lb" "$LB_SOCK" "$RUN/lbd-lb.log" --iface lb0 --iface lb1 "${NAT_PORTS[@]}"
lb_pid=${pids[-1]}
printf 'nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n' >"$RUN/ipmasq.yaml"
start_lbd "$M-lb" "$MQ_SOCK" "$RUN/lbd-mq.log" --iface int0 --iface ext0 \
  --masquerade-from 10.244.0.0/16 --ip-masq-config "$RUN/ipmasq.yaml" "${NAT_PORTS[@]}"
mq_pid=${pids[-1]}
lb() { "$LBCTL" --socket "$LB_SOCK" "$@" >/dev/null; }
lb service add "$VIP:80/tcp" -b 10.1.0.11:8080
lb service add "$VIP:81/tcp" -b 10.1.0.11:8080 -b 10.1.0.12:8080
lb service add "$VIP:9000/tcp" -b 10.1.0.11:9000 -b 10.1.0.12:9000

echo "== soaking for $MINUTES min"
client() { # NS OUT ARGS...
  ip netns exec "$1" python3 deploy/soak_client.py "${@:3}" >"$RUN/$2.json" 2>"$RUN/$2.err" &
  pids+=($!)
}
client "$P-client" stable http "http://$VIP:80/" "$SECS" 2
client "$P-client" churned http "http://$VIP:81/" "$SECS" 2
client "$P-client" held hold "$VIP" 9000 16 "$SECS"
client "$M-pod" pod_http http "http://20.0.0.10:8080/peer" "$SECS" 2 10.244.1.2
client "$M-pod" pod_held hold 20.0.0.10 9000 8 "$SECS" 10.244.1.3
clients=("${pids[@]: -5}")
start=$(date +%s)
rss_lb_early=""; rss_mq_early=""
removals=0; policy_changes=0; on=b2
while (( $(date +%s) - start < SECS )); do
  sleep 1
  off=$on; [[ $on == b2 ]] && on=b3 || on=b2
  n_on=${on#b}; n_off=${off#b}
  for svc in 81:8080 9000:9000; do
    lb backend add "$VIP:${svc%%:*}/tcp" "10.1.0.1$n_on:${svc##*:}"
    lb backend remove "$VIP:${svc%%:*}/tcp" "10.1.0.1$n_off:${svc##*:}"
  done
  removals=$((removals + 2))
  elapsed=$(( $(date +%s) - start ))
  if (( elapsed % POLICY_EVERY == 0 )); then
    if grep -q 20.0.0.0 "$RUN/ipmasq.yaml"; then
      printf 'nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n' >"$RUN/ipmasq.yaml.new"
    else
      printf 'nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 20.0.0.0/24\n' >"$RUN/ipmasq.yaml.new"
    fi
    mv "$RUN/ipmasq.yaml.new" "$RUN/ipmasq.yaml"
    policy_changes=$((policy_changes + 1))
  fi
  if [[ -z $rss_lb_early ]] && (( elapsed >= SECS / 5 )); then
    rss_lb_early=$(rss_kib "$lb_pid"); rss_mq_early=$(rss_kib "$mq_pid")
  fi
done
for c in "${clients[@]}"; do wait "$c" || true; done
rss_lb_end=$(rss_kib "$lb_pid"); rss_mq_end=$(rss_kib "$mq_pid")
"$LBCTL" --socket "$LB_SOCK" stats -o json >"$RUN/lb-stats.json"
"$LBCTL" --socket "$MQ_SOCK" stats -o json >"$RUN/mq-stats.json"

echo "== verdict"
python3 - "$RUN" "$removals" "$policy_changes" "$rss_lb_early" "$rss_lb_end" "$rss_mq_early" "$rss_mq_end" <<'PY'
import json, sys
run, removals, policy_changes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rss = [int(x) for x in sys.argv[4:8]]
load = lambda n: json.load(open(f"{run}/{n}.json"))
ok = True
def check(cond, msg):
    global ok
    print(("PASS " if cond else "FAIL ") + msg)
    ok &= cond
s, c, p = load("stable"), load("churned"), load("pod_http")
check(s["fail"] == 0 and s["ok"] > 0, f"stable service: {s['ok']} requests, {s['fail']} failed {s['errors'][:3]}")
print(f"     churned service: {c['ok']} requests, {c['fail']} failed (backend removed mid-request; "
      f"{removals} removals), answers {c['bodies']}")
check(p["fail"] == 0 and p["ok"] > 0, f"pods through the NAT: {p['ok']} requests, {p['fail']} failed, sources seen {p['bodies']} {p['errors'][:3]}")
h = load("held")["conns"]
b1 = [x for x in h if x["backend"] == "b1"]
check(len(b1) > 0 and all(x["failed"] is None for x in b1),
      f"long-lived via the VIP on the surviving backend: {len(b1)} connections, "
      f"{sum(x['failed'] is not None for x in b1)} broke {[x['failed'] for x in b1 if x['failed']][:3]}")
other = [x for x in h if x["backend"] != "b1"]
print(f"     long-lived on churned backends: {len(other)}, ended by their backend's removal: "
      f"{sum(x['failed'] is not None for x in other)}")
m = load("pod_held")["conns"]
check(all(x["failed"] is None for x in m),
      f"masqueraded long-lived connections across {policy_changes} policy changes: {len(m)}, "
      f"{sum(x['failed'] is not None for x in m)} broke {[x['failed'] for x in m if x['failed']][:3]}")
for name, early, end in (("lbd (load balancing)", rss[0], rss[1]), ("lbd (masquerading)", rss[2], rss[3])):
    check(end <= max(early * 1.05, early + 4096), f"{name} resident memory: {early} KiB → {end} KiB")
for n in ("lb", "mq"):
    st = json.load(open(f"{run}/{n}-stats.json"))
    drops = {}
    for w in st["workers"]:
        for k, v in w["drops"].items():
            drops[k] = drops.get(k, 0) + v
    print(f"     {n} drops: {drops}")
sys.exit(0 if ok else 1)
PY
