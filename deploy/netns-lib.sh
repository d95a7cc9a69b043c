# Shared by the topology scripts, the demo and the soak test (sourced; mq_veth needs $P,
# start_server $RUN and a pids array).

ns() { ip netns exec "$1" "${@:2}"; }

# mq_veth NS_A NAME_A NS_B NAME_B QUEUES: a veth pair NAME_A (in NS_A) ── NAME_B (in
# NS_B) with QUEUES rx/tx queues on each end, so traffic spreads over the queues. GRO is
# on at both ends: a veth takes frames an XDP program redirects (or sends back with
# XDP_TX) into its peer only when the receiving end has an XDP program or GRO, else the
# kernel drops them silently; lbd's fast path redirects.
mq_veth() {
  ip link add "$P-$2" netns "$1" numtxqueues "$5" numrxqueues "$5" type veth \
    peer name "$4" netns "$3" numtxqueues "$5" numrxqueues "$5"
  ns "$1" ip link set "$P-$2" name "$2"
  ns "$1" ethtool -K "$2" gro on >/dev/null
  ns "$3" ethtool -K "$4" gro on >/dev/null
}

# start_server NS NAME ARGS...: deploy/backend.py NAME in namespace NS, its pid added to
# pids; returns once it listens (it prints "ready" after binding), so nothing races it.
start_server() {
  local ready=$RUN/$2.ready
  ip netns exec "$1" python3 deploy/backend.py "$2" "${@:3}" >"$ready" 2>/dev/null &
  pids+=($!); disown
  for _ in $(seq 100); do
    grep -q ready "$ready" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server $2 in $1 did not start" >&2; return 1
}

# stop_pids: SIGINT to every pid in pids (lbd detaches cleanly), SIGKILL to what is left
# after 2 s; empties pids.
stop_pids() {
  local p alive
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null; done
  for _ in $(seq 20); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  pids=()
}
