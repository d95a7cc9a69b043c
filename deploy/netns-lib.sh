# Shared by deploy/topology.sh and deploy/masq-topology.sh (sourced; needs $P).

ns() { ip netns exec "$1" "${@:2}"; }

# mq_veth NS_A NAME_A NS_B NAME_B QUEUES: a veth pair NAME_A (in NS_A) ── NAME_B (in
# NS_B) with QUEUES rx/tx queues on each end, so traffic spreads over the queues.
mq_veth() {
  ip link add "$P-$2" netns "$1" numtxqueues "$5" numrxqueues "$5" type veth \
    peer name "$4" netns "$3" numtxqueues "$5" numrxqueues "$5"
  ns "$1" ip link set "$P-$2" name "$2"
}
