#!/usr/bin/env bash
# Build or tear down the direct-server-return topology: replies do not pass the edge node.
#
#   dsr-topology.sh up PREFIX [QUEUES] [BACKENDS]    dsr-topology.sh down PREFIX
#
#   PREFIX-client c0 10.0.0.2/24 ──veth── r0 10.0.0.1/24  PREFIX-rtr  r1 10.1.0.1/24 ──┐
#                 default via 10.0.0.1                    10.96.0.0/16 via 10.1.0.2     │
#                                                                           PREFIX-sw (bridge br0)
#                          PREFIX-lb  lb0 10.1.0.2/24 (QUEUES queues) ──────────────────┤
#                                     default via 10.1.0.1                              ├── PREFIX-b1 eth0 10.1.0.11/24
#                                                                                       ├── PREFIX-b2 eth0 10.1.0.12/24
#                                                                                       └── PREFIX-b3 eth0 10.1.0.13/24
#
# The router sends VIP traffic (10.96.0.0/16) to the edge node PREFIX-lb, one-armed on
# lb0; the backends' default route is the router, so their answers go straight to the
# client. Each backend holds the VIPs on lo and neither answers ARP for them nor uses
# them as ARP sources (arp_ignore=1, arp_announce=2: docs/operations.md, DSR backends).
# TX checksum offload is off on the traffic sources (see topology.sh).
set -euo pipefail
cmd=${1:?up|down}; P=${2:?prefix}; Q=${3:-2}; NB=${4:-3}

. "$(dirname "$0")/netns-lib.sh"

down() {
  for n in client rtr lb sw $(seq -f 'b%g' 1 9); do
    ip netns del "$P-$n" 2>/dev/null || true
  done
}

# port NS NAME ADDR BRIDGEPORT: a veth from NAME (in NS) into the bridge (where it is
# BRIDGEPORT), addressed ADDR.
port() {
  ip link add "$4" netns "$P-sw" type veth peer name "$2" netns "$1"
  ns "$P-sw" ip link set "$4" master br0
  ns "$P-sw" ip link set "$4" up
  ns "$1" ip addr add "$3" dev "$2"
  ns "$1" ip link set "$2" up
  ns "$1" ip link set lo up
}

up() {
  down
  for n in client rtr lb sw; do ip netns add "$P-$n"; done
  ns "$P-sw" ip link add br0 type bridge
  ns "$P-sw" ip link set br0 up
  # Client and router.
  ip link add "$P-c0" netns "$P-client" type veth peer name r0 netns "$P-rtr"
  ns "$P-client" ip link set "$P-c0" name c0
  ns "$P-client" ip addr add 10.0.0.2/24 dev c0
  ns "$P-client" ip link set c0 up
  ns "$P-client" ip link set lo up
  ns "$P-client" ip route add default via 10.0.0.1
  ns "$P-client" ethtool -K c0 tx off >/dev/null
  ns "$P-rtr" ip addr add 10.0.0.1/24 dev r0
  ns "$P-rtr" ip link set r0 up
  port "$P-rtr" r1 10.1.0.1/24 "$P-pr"
  ns "$P-rtr" ip route add 10.96.0.0/16 via 10.1.0.2
  ns "$P-rtr" sysctl -qw net.ipv4.ip_forward=1
  # The edge node: QUEUES queues on lb0; GRO on its bridge port, which the fast path's
  # redirects into lb0 need (see netns-lib.sh).
  ip link add "$P-plb" netns "$P-sw" numtxqueues "$Q" numrxqueues "$Q" type veth \
    peer name lb0 netns "$P-lb" numtxqueues "$Q" numrxqueues "$Q"
  ns "$P-sw" ip link set "$P-plb" master br0
  ns "$P-sw" ip link set "$P-plb" up
  ns "$P-sw" ethtool -K "$P-plb" gro on >/dev/null
  ns "$P-lb" ethtool -K lb0 gro on >/dev/null
  ns "$P-lb" ip addr add 10.1.0.2/24 dev lb0
  ns "$P-lb" ip link set lb0 up
  ns "$P-lb" ip link set lo up
  ns "$P-lb" ip route add default via 10.1.0.1
  for i in $(seq 1 "$NB"); do
    ip netns add "$P-b$i"
    port "$P-b$i" eth0 "10.1.0.1$i/24" "$P-pb$i"
    ns "$P-b$i" ip route add default via 10.1.0.1
    ns "$P-b$i" ethtool -K eth0 tx off >/dev/null
    ns "$P-b$i" ip addr add 10.96.0.10/32 dev lo
    ns "$P-b$i" sysctl -qw net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2 \
      net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
  done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down PREFIX [QUEUES] [BACKENDS]" >&2; exit 2 ;;
esac
