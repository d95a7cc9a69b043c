#!/usr/bin/env bash
# The benchmark topology (xlb-bench sets it up and tears it down itself; run by hand to
# look around):   bench/netns.sh up|down
#
#   xb-gen  gen0 10.10.0.2/24 ──veth── lbin 10.10.0.1/24  xb-lb  lbout 10.20.0.1/24 ──veth── srv0  xb-srv
#           (generator, latency                            (system under test:            10.20.0.11-13/24 (3 backends)
#            client)                                        xlb, nftables or a             20.0.0.10/32 (the "internet"
#                                                           reference forwarder)           host of the egress scenarios)
#
# Generated sources: 10.99.0.0/16 (load-balancer clients) and 10.244.0.0/16 (pods, for
# egress masquerading); both are routed back to xb-gen. xb-lb routes 20.0.0.0/8 via the
# "router" 10.20.0.11. srv0 carries the counting sink (XDP, per CPU), which drops
# TCP/UDP to ports 9-24 and passes the rest (ARP, the latency echo on port 7).
# xb-lb's ip_local_port_range is 60000-65000 so xlb and nftables may both NAT from
# 1024-59999 (3 backends x 59k ports covers the 100 k-flow runs).
set -euo pipefail
cmd=${1:?up|down}

ns() { ip netns exec "$1" "${@:2}"; }

down() {
  for n in gen lb srv; do ip netns del "xb-$n" 2>/dev/null || true; done
}

up() {
  down
  for n in gen lb srv; do ip netns add "xb-$n"; ns "xb-$n" ip link set lo up; done
  ip link add gen0 netns xb-gen type veth peer name lbin netns xb-lb
  ip link add lbout netns xb-lb type veth peer name srv0 netns xb-srv
  ns xb-gen ip addr add 10.10.0.2/24 dev gen0
  ns xb-gen ip link set gen0 up
  ns xb-gen ip route add 10.96.0.0/16 via 10.10.0.1
  ns xb-gen ip route add 20.0.0.0/8 via 10.10.0.1
  ns xb-gen ethtool -K gen0 tx off >/dev/null
  # lbd's fast path redirects into lbin/lbout: their peers must take XDP frames (GRO on,
  # or an XDP program), or the kernel drops them silently.
  ns xb-gen ethtool -K gen0 gro on >/dev/null
  ns xb-lb ip addr add 10.10.0.1/24 dev lbin
  ns xb-lb ip addr add 10.20.0.1/24 dev lbout
  ns xb-lb ip link set lbin up
  # The backend side carries DSR tunnels: MTU 1600 leaves room for a full-size client
  # packet in IPIP or GUE (docs/operations.md, MTU planning).
  ns xb-lb ip link set lbout mtu 1600 up
  ns xb-lb ip route add 10.99.0.0/16 via 10.10.0.2
  ns xb-lb ip route add 10.244.0.0/16 via 10.10.0.2
  ns xb-lb ip route add 20.0.0.0/8 via 10.20.0.11
  ns xb-lb sysctl -qw net.ipv4.ip_forward=1
  ns xb-lb sysctl -qw net.ipv4.conf.all.rp_filter=0
  ns xb-lb sysctl -qw net.ipv4.conf.default.rp_filter=0
  ns xb-lb sysctl -qw net.ipv4.conf.lbin.rp_filter=0
  ns xb-lb sysctl -qw net.ipv4.ip_local_port_range="60000 65000"
  for i in 11 12 13; do ns xb-srv ip addr add "10.20.0.$i/24" dev srv0; done
  ns xb-srv ip addr add 20.0.0.10/32 dev srv0
  ns xb-srv ip link set srv0 mtu 1600 up
  ns xb-srv ip route add default via 10.20.0.1
  ns xb-srv ethtool -K srv0 tx off >/dev/null
  ns xb-srv ethtool -K srv0 gro on >/dev/null
  # Neighbours known up front, as on a node that has been running: the measurement
  # windows are about forwarding, not ARP.
  for a in 10.10.0.2 10.20.0.11 10.20.0.12 10.20.0.13; do
    ns xb-lb ping -q -c1 -W1 "$a" >/dev/null
  done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
