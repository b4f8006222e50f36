#!/usr/bin/env bash
# A flood of handshake initiations against one host, and what it does to an established
# stream: on a two-host lab, iperf3 (one TCP stream, 10 s) from an instance on h1 to one on
# h2, alone and then while a third namespace on the underlay sends h2's switch forged
# initiations (random bytes of an initiation's length and type) as fast as one sender on
# this machine goes. Prints both rates, their ratio, the flood's rate, and h2's counters of
# what it dropped and why.
#
#   bench/flood.sh [--debug] [SECONDS]
#
# Builds vane in release mode unless --debug (then uses the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/build.sh
secs=${1:-10}
lab="bf$$"
octet=$((($$ % 200) + 30))
export VANE_CONTROLLER="https://198.18.$octet.254:7946"
flooder="vf$$"
cleanup() {
  [ -n "${flood_pid:-}" ] && kill "$flood_pid" 2>/dev/null || true
  ip netns del "$flooder" 2>/dev/null || true
  ip link del "vf$$" 2>/dev/null || true
  "$vane" lab down --name "$lab" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$vane" lab up --hosts 2 --name "$lab" --underlay "198.18.$octet.0/24" >/dev/null
"$vane" net create bench --subnet 10.98.0.0/24 >/dev/null
"$vane" run --net bench --name srv --host h2 -- iperf3 -s >/dev/null
"$vane" run --net bench --name cli --host h1 -- sleep infinity >/dev/null
sleep 1

# The flooder: a namespace of its own on the lab's underlay bridge.
ip netns add "$flooder"
ip link add "vf$$" type veth peer name eth0 netns "$flooder"
ip link set "vf$$" master "vb-$lab" up
ip -n "$flooder" addr add "198.18.$octet.200/24" dev eth0
ip -n "$flooder" link set eth0 up
ip -n "$flooder" link set lo up

# vane_tunnel::INITIATION_LEN: header 8, ephemeral 32, static 48, timestamp 28, mac1 16,
# mac2 16.
len=148

stream() {
  "$vane" exec cli -- iperf3 -c srv -t "$secs" -J |
    python3 -c 'import json, sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))'
}

alone=$(stream)
flood_log=$(mktemp)
ip netns exec "$flooder" python3 - "198.18.$octet.2" "$len" "$((secs + 5))" >"$flood_log" <<'EOF' &
import os, socket, sys, time
host, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pool = [bytes([1, 0, 0, 0]) + os.urandom(n - 4) for _ in range(4096)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent, start = 0, time.time()
while time.time() - start < secs:
    for d in pool:
        try:
            s.sendto(d, (host, 7947))
            sent += 1
        except BlockingIOError:
            pass
print(int(sent / (time.time() - start)))
EOF
flood_pid=$!
sleep 1
flooded=$(stream)
wait "$flood_pid" || true
flood_pid=
rate=$(cat "$flood_log")
rm -f "$flood_log"
counters=$("$vane" host stats h2 -o json | python3 -c '
import json, sys
c = json.load(sys.stdin)["counters"]
print(" ".join("%s=%d" % (k, v) for k, v in sorted(c.items()) if k in ("drop_bad_mac", "drop_rate_limited", "drop_cookie_sent", "drop_under_load", "drop_source_rate_limited", "drop_auth_failed", "handshakes_completed")))')

printf 'handshake flood against h2 (%s s per run, %s build)\n' "$secs" "$profile"
printf '  TCP h1 -> h2 alone          %s Gbit/s\n' "$alone"
printf '  TCP h1 -> h2 under flood    %s Gbit/s\n' "$flooded"
python3 -c "print('  ratio                       %.2fx' % ($flooded / $alone))"
printf '  flood                       %s initiations/s from one sender\n' "$rate"
printf '  h2: %s\n' "$counters"
