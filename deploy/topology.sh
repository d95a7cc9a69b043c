#!/usr/bin/env bash
# Build or tear down xlb's test/demo topology in network namespaces.
#
#   topology.sh up PREFIX [QUEUES] [BACKENDS]    topology.sh down PREFIX
#
#   PREFIX-client  c0 10.0.0.2/24 ──veth── lb0 10.0.0.1/24   PREFIX-lb   lb1 10.1.0.1/24 ──veth── PREFIX-sw (bridge br0)
#                  route 10.96.0.0/16 via 10.0.0.1                                                  ├── PREFIX-b1 eth0 10.1.0.11/24
#                                                                                                    ├── PREFIX-b2 eth0 10.1.0.12/24
#                                                                                                    ├── PREFIX-b3 eth0 10.1.0.13/24
#                                                                                                    └── PREFIX-oc eth0 10.1.0.100/24
# PREFIX-oc is a client on the backends' segment, for one-armed mode (lbd --iface lb1).
# VIPs live in 10.96.0.0/16 (routed to the LB, as a router or BGP would). lb0/lb1 are
# veths with QUEUES rx/tx queues each, so replies spread over the LB's queues. TX checksum
# offload is off on the traffic sources (client, backends): veth would otherwise hand XDP
# CHECKSUM_PARTIAL frames (see docs/operations.md).
set -euo pipefail
cmd=${1:?up|down}; P=${2:?prefix}; Q=${3:-2}; NB=${4:-3}

. "$(dirname "$0")/netns-lib.sh"

down() {
  for n in client lb sw oc $(seq -f 'b%g' 1 9); do
    ip netns del "$P-$n" 2>/dev/null || true
  done
}

up() {
  down
  for n in client lb sw; do ip netns add "$P-$n"; done
  mq_veth "$P-client" c0 "$P-lb" lb0 "$Q"
  mq_veth "$P-lb" lb1 "$P-sw" swlb "$Q"
  ns "$P-sw" ip link add br0 type bridge
  ns "$P-sw" ip link set swlb master br0
  for i in $(seq 1 "$NB"); do
    ip netns add "$P-b$i"
    ip link add "$P-s$i" netns "$P-sw" type veth peer name eth0 netns "$P-b$i"
    ns "$P-sw" ip link set "$P-s$i" master br0
    ns "$P-sw" ip link set "$P-s$i" up
    ns "$P-b$i" ip addr add "10.1.0.1$i/24" dev eth0
    ns "$P-b$i" ip link set eth0 up
    ns "$P-b$i" ip link set lo up
    ns "$P-b$i" ip route add default via 10.1.0.1
    ns "$P-b$i" ethtool -K eth0 tx off >/dev/null
  done
  ip netns add "$P-oc"
  ip link add "$P-so" netns "$P-sw" type veth peer name eth0 netns "$P-oc"
  ns "$P-sw" ip link set "$P-so" master br0
  ns "$P-sw" ip link set "$P-so" up
  ns "$P-oc" ip addr add 10.1.0.100/24 dev eth0
  ns "$P-oc" ip link set eth0 up
  ns "$P-oc" ip link set lo up
  ns "$P-oc" ip route add 10.96.0.0/16 via 10.1.0.1
  ns "$P-oc" ethtool -K eth0 tx off >/dev/null
  ns "$P-sw" ip link set br0 up
  ns "$P-sw" ip link set swlb up
  ns "$P-client" ip addr add 10.0.0.2/24 dev c0
  ns "$P-client" ip link set c0 up
  ns "$P-client" ip link set lo up
  ns "$P-client" ip route add 10.96.0.0/16 via 10.0.0.1
  ns "$P-client" ethtool -K c0 tx off >/dev/null
  ns "$P-lb" ip addr add 10.0.0.1/24 dev lb0
  ns "$P-lb" ip addr add 10.1.0.1/24 dev lb1
  ns "$P-lb" ip link set lb0 up
  ns "$P-lb" ip link set lb1 up
  ns "$P-lb" ip link set lo up
  # The client side stands in for the upstream router. The kernel forwards what XDP
  # leaves to it, so a VIP packet with TTL <= 1 gets ICMP time exceeded, as from a router.
  ns "$P-lb" ip route add default via 10.0.0.2
  ns "$P-lb" sysctl -qw net.ipv4.ip_forward=1
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down PREFIX [QUEUES] [BACKENDS]" >&2; exit 2 ;;
esac
