#!/usr/bin/env bash
# Build or tear down xlb's egress-masquerading topology in network namespaces.
#
#   masq-topology.sh up PREFIX [QUEUES]        masq-topology.sh down PREFIX
#
#   PREFIX-pod  p0 10.244.1.2/24 ─veth─ int0 10.244.1.1/24  PREFIX-lb  ext0 203.0.113.7/24 ─veth─ rt0 203.0.113.1/24  PREFIX-rt
#               p0 10.244.1.3/24        (the edge node)                                             │
#               default via 10.244.1.1                                                               ├─ s0 20.0.0.1/24 ── PREFIX-srv eth0 20.0.0.10/24
#                                                                                                    ├─ f0 20.1.0.1/24, MTU 1280 ── PREFIX-far eth0 20.1.0.10/24
#                                                                                                    └─ n0 10.50.0.1/24 ── PREFIX-nm eth0 10.50.0.10/24
#
# PREFIX-pod holds two pod addresses; PREFIX-lb is the edge node xlb runs on (egress
# address 203.0.113.7, the primary address of ext0); PREFIX-rt is the upstream router.
# srv and far are public servers (not in ip-masq-agent's default list); nm (10.50.0.10)
# is inside 10.0.0.0/8, a default non-masquerade range: it sees pod addresses and routes
# them back through the router, which knows the pod CIDR via the edge node. The router's
# link to far has MTU 1280, so a larger DF packet from a pod draws "fragmentation needed".
# int0 and ext0 are veths with QUEUES queues each. TX checksum offload is off on every
# sender (see docs/operations.md).
set -euo pipefail
cmd=${1:?up|down}; P=${2:?prefix}; Q=${3:-2}

. "$(dirname "$0")/netns-lib.sh"

down() {
  for n in pod lb rt srv far nm; do
    ip netns del "$P-$n" 2>/dev/null || true
  done
}

# host NAME ADDR/LEN GATEWAY RT_IF RT_ADDR/LEN [RT_MTU]: a server behind the router.
host() {
  ip netns add "$P-$1"
  ip link add "$P-$4" netns "$P-rt" type veth peer name eth0 netns "$P-$1"
  ns "$P-rt" ip link set "$P-$4" name "$4"
  ns "$P-rt" ip addr add "$5" dev "$4"
  if [ -n "${6:-}" ]; then ns "$P-rt" ip link set "$4" mtu "$6"; fi
  ns "$P-rt" ip link set "$4" up
  ns "$P-rt" ethtool -K "$4" tx off >/dev/null
  ns "$P-$1" ip addr add "$2" dev eth0
  ns "$P-$1" ip link set eth0 up
  ns "$P-$1" ip link set lo up
  ns "$P-$1" ip route add default via "$3"
  ns "$P-$1" ethtool -K eth0 tx off >/dev/null
}

up() {
  down
  for n in pod lb rt; do ip netns add "$P-$n"; done
  mq_veth "$P-pod" p0 "$P-lb" int0 "$Q"
  mq_veth "$P-lb" ext0 "$P-rt" rt0 "$Q"

  ns "$P-pod" ip addr add 10.244.1.2/24 dev p0
  ns "$P-pod" ip addr add 10.244.1.3/24 dev p0
  ns "$P-pod" ip link set p0 up
  ns "$P-pod" ip link set lo up
  ns "$P-pod" ip route add default via 10.244.1.1
  ns "$P-pod" ethtool -K p0 tx off >/dev/null

  ns "$P-lb" ip addr add 10.244.1.1/24 dev int0
  ns "$P-lb" ip addr add 203.0.113.7/24 dev ext0
  ns "$P-lb" ip link set int0 up
  ns "$P-lb" ip link set ext0 up
  ns "$P-lb" ip link set lo up
  ns "$P-lb" ip route add default via 203.0.113.1
  ns "$P-lb" sysctl -qw net.ipv4.ip_forward=1

  ns "$P-rt" ip addr add 203.0.113.1/24 dev rt0
  ns "$P-rt" ip link set rt0 up
  ns "$P-rt" ip link set lo up
  ns "$P-rt" ethtool -K rt0 tx off >/dev/null
  ns "$P-rt" ip route add 10.244.0.0/16 via 203.0.113.7
  ns "$P-rt" sysctl -qw net.ipv4.ip_forward=1

  host srv 20.0.0.10/24 20.0.0.1 s0 20.0.0.1/24
  host far 20.1.0.10/24 20.1.0.1 f0 20.1.0.1/24 1280
  host nm 10.50.0.10/24 10.50.0.1 n0 10.50.0.1/24
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down PREFIX [QUEUES]" >&2; exit 2 ;;
esac
