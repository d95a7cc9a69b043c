#!/usr/bin/env bash
# xlb demo, in network namespaces, three parts (DEMO=lb, masq or dsr runs one):
#  lb:   a client, an LB node running lbd (XDP + AF_XDP workers on 2-queue veths) and
#        three backends running HTTP servers that name themselves. Sends REQUESTS
#        (default 300) HTTP requests through the VIP with curl, shows which backend
#        answered how often, then lbctl's view.
#  masq: two pods behind an edge node running lbd as an egress NAT with ip-masq-agent
#        semantics; servers report the source address they see. Shows lbctl ipmasq
#        check/list and nat list, then changes the ip-masq-agent file while running.
#  dsr:  direct server return: a client behind a router, an edge node running lbd
#        one-armed, three backends on the router's segment running xlb-decap; the
#        backends answer the client through the router, not the edge node. One
#        service per mode (dsr-l2, dsr-gue); each backend reports the client address it
#        saw, and the edge node's counters show the one direction it carried.
# Cleans up on exit, Ctrl-C or failure. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then echo "run as root (namespaces, XDP)" >&2; exit 1; fi
REQUESTS=${REQUESTS:-300}
DEMO=${DEMO:-all}
P=xdemo
M=xmasq
D=xdsr
RUN=/tmp/xlb-demo
VIP=10.96.0.10

. deploy/netns-lib.sh
pids=()
cleanup() {
  set +e
  stop_pids
  deploy/topology.sh down "$P"
  deploy/masq-topology.sh down "$M"
  deploy/dsr-topology.sh down "$D"
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_lbd NS ARGS...: lbd in namespace NS with its socket and log in $RUN; waits until
# it answers, then shows lbctl status.
start_lbd() {
  ip netns exec "$1" "$LBD" "${@:2}" --no-state --no-pin --socket "$RUN/lbd.sock" 2>"$RUN/lbd.log" &
  pids+=($!); disown
  export LBCTL_SOCKET=$RUN/lbd.sock
  for _ in $(seq 100); do
    if "$LBCTL" status >/dev/null 2>&1; then "$LBCTL" status; return 0; fi
    sleep 0.1
  done
  cat "$RUN/lbd.log"; return 1
}

lb_demo() {
echo "== topology: $P-client → $P-lb (lb0 | lb1, 2 queues each) → $P-sw bridge → $P-b1..b3"
deploy/topology.sh up "$P" 2 3
mkdir -p "$RUN"
for i in 1 2 3; do start_server "$P-b$i" "b$i" --http 8080; done

echo "== starting lbd"
start_lbd "$P-lb" --iface lb0 --iface lb1

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
}

masq_demo() {
  echo "== topology: $M-pod (10.244.1.2, 10.244.1.3) → $M-lb (int0 | ext0 203.0.113.7) → $M-rt → $M-srv 20.0.0.10, $M-nm 10.50.0.10"
  deploy/masq-topology.sh up "$M" 2
  mkdir -p "$RUN"
  for n in srv far nm; do start_server "$M-$n" "$n" --http 8080 --udp 5353; done
  cat > "$RUN/ip-masq-agent.yaml" <<'YAML'
# ip-masq-agent's ConfigMap content, as an operator would reuse it.
nonMasqueradeCIDRs:
  - 10.0.0.0/8
masqLinkLocal: false
resyncInterval: 60s
YAML
  echo "== starting lbd as egress NAT: --masquerade-from 10.244.0.0/16 --ip-masq-config $RUN/ip-masq-agent.yaml"
  start_lbd "$M-lb" --iface int0 --iface ext0 --masquerade-from 10.244.0.0/16 \
    --ip-masq-config "$RUN/ip-masq-agent.yaml"
  echo
  echo "== lbctl ipmasq list"
  "$LBCTL" ipmasq list
  echo
  for dst in 20.0.0.10 10.50.0.10; do
    echo "\$ lbctl ipmasq check 10.244.1.2 $dst"
    "$LBCTL" ipmasq check 10.244.1.2 "$dst"
  done
  echo
  echo "== what the servers see (HTTP /peer from each pod)"
  local bad=0
  for pod in 10.244.1.2 10.244.1.3; do
    for dst in 20.0.0.10 10.50.0.10; do
      seen=$(ip netns exec "$M-pod" curl -s --max-time 5 --interface "$pod" "http://$dst:8080/peer")
      printf '  %-11s → %-11s server saw %s\n' "$pod" "$dst" "$seen"
      want=203.0.113.7; [[ $dst == 10.50.0.10 ]] && want=$pod
      [[ $seen == "peer $want:"* ]] || bad=1
    done
  done
  echo "== ping and UDP from the pods through the NAT"
  ip netns exec "$M-pod" ping -c 2 -i 0.2 -I 10.244.1.2 20.0.0.10 | sed 's/^/  /' | grep -E "bytes from|packet loss" || bad=1
  ip netns exec "$M-pod" python3 -c "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.244.1.3', 0)); s.settimeout(3)
s.sendto(b'?peer', ('20.0.0.10', 5353)); print('  udp from 10.244.1.3:%d, server answered %s' % (s.getsockname()[1], s.recv(100).decode()))" || bad=1
  echo
  echo "== lbctl nat list"
  "$LBCTL" nat list
  echo
  echo "== adding 20.0.0.0/24 to nonMasqueradeCIDRs while lbd runs"
  sed -i 's|  - 10.0.0.0/8|  - 10.0.0.0/8\n  - 20.0.0.0/24|' "$RUN/ip-masq-agent.yaml"
  for _ in $(seq 50); do "$LBCTL" ipmasq list | grep -q 20.0.0.0/24 && break; sleep 0.1; done
  echo "\$ lbctl ipmasq check 10.244.1.2 20.0.0.10"
  "$LBCTL" ipmasq check 10.244.1.2 20.0.0.10
  seen=$(ip netns exec "$M-pod" curl -s --max-time 5 --interface 10.244.1.2 "http://20.0.0.10:8080/peer")
  echo "  a new connection from 10.244.1.2 → 20.0.0.10: server saw $seen"
  [[ $seen == "peer 10.244.1.2:"* ]] || bad=1
  echo
  echo "== lbctl stats"
  "$LBCTL" stats
  if ((bad)); then echo "masquerading did not behave as shown above" >&2; exit 1; fi
}

dsr_demo() {
  echo "== topology: $D-client → $D-rtr → $D-sw bridge → $D-lb (lb0, one-armed) and $D-b1..b3"
  echo "   the backends' default route is the router: their answers skip the edge node"
  deploy/dsr-topology.sh up "$D" 2 3
  mkdir -p "$RUN"
  for i in 1 2 3; do
    start_server "$D-b$i" "b$i" --http 8080 --http 80
    ip netns exec "$D-b$i" "$DECAP" run --iface eth0 >"$RUN/decap-b$i.log" 2>&1 &
    pids+=($!); disown
  done
  echo "== starting lbd on lb0"
  start_lbd "$D-lb" --iface lb0
  echo
  echo "== two services: $VIP:8080 by L2 DSR, $VIP:80 by DSR over GUE (backends on the same ports)"
  "$LBCTL" service add "$VIP:8080/tcp" --mode dsr-l2 -b 10.1.0.11:8080 -b 10.1.0.12:8080 -b 10.1.0.13:8080
  "$LBCTL" service add "$VIP:80/tcp" --mode dsr-gue -b 10.1.0.11:80 -b 10.1.0.12:80 -b 10.1.0.13:80
  "$LBCTL" service list
  local bad=0
  for port in 8080 80; do
    echo
    echo "== $REQUESTS HTTP requests to http://$VIP:$port/, then /peer"
    ip netns exec "$D-client" curl -s --max-time 5 "http://$VIP:$port/?[1-$REQUESTS]" > "$RUN/bodies"
    sort "$RUN/bodies" | uniq -c | sed 's/^/  /'
    [[ $(wc -l < "$RUN/bodies") -eq $REQUESTS ]] || bad=1
    seen=$(ip netns exec "$D-client" curl -s --max-time 5 "http://$VIP:$port/peer")
    echo "  the backend saw the client as: $seen (the client is 10.0.0.2)"
    [[ $seen == "peer 10.0.0.2:"* ]] || bad=1
  done
  echo
  echo "== packets counted by the kernel on each link (the edge node forwards the client's"
  echo "   direction only; the backends' answers go through the router, never through it)"
  stat() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/$3"; }
  local sent got edge back=0
  sent=$(stat "$D-client" c0 tx_packets); got=$(stat "$D-client" c0 rx_packets)
  edge=$(stat "$D-lb" lb0 rx_packets)
  for i in 1 2 3; do back=$((back + $(stat "$D-b$i" eth0 tx_packets))); done
  echo "  client sent $sent packets and received $got"
  echo "  the backends sent $back packets; the edge node received $edge (about what the client sent)"
  ((edge < sent + got)) || bad=1
  echo
  echo "== lbctl stats (dsr flows, packets encapsulated for GUE)"
  "$LBCTL" stats
  echo
  echo "== xlb-decap status on b1"
  ip netns exec "$D-b1" "$DECAP" status
  if ((bad)); then echo "direct server return did not behave as shown above" >&2; exit 1; fi
}

deploy/install-deps.sh
echo "== building xlb (release)"
cargo build --release --workspace --locked -q
LBD=$PWD/target/release/lbd
LBCTL=$PWD/target/release/lbctl
DECAP=$PWD/target/release/xlb-decap
case "$DEMO" in
  lb) lb_demo ;;
  masq) masq_demo ;;
  dsr) dsr_demo ;;
  all) lb_demo; cleanup; echo; masq_demo; cleanup; echo; dsr_demo ;;
  *) echo "DEMO must be lb, masq, dsr or all" >&2; exit 2 ;;
esac
