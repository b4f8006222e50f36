#!/usr/bin/env bash
# What one crossing into userspace costs on this machine, next to the kernel answering by
# itself: two network namespaces joined by a veth pair; `ping` (the kernel answers ICMP in
# its receive path, no program runs) against a UDP echo program (bench/udp_echo.c: the
# kernel wakes the program, which answers). Both at 10 ms intervals, as bench/overlay.sh
# pings. A round trip through any userspace overlay crosses at least three times (the
# sender's switch, the receiver's, the sender's again for the reply); kernel VXLAN none.
#
#   bench/crossing.sh [COUNT]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi
count=${1:-500}
a="vane-xing-a-$$"
b="vane-xing-b-$$"
work=$(mktemp -d)
cleanup() {
  ip netns pids "$a" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$a" 2>/dev/null || true
  ip netns del "$b" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cc -O2 -o "$work/udp_echo" bench/udp_echo.c
ip netns add "$a"
ip netns add "$b"
ip link add xa0 netns "$a" type veth peer name xb0 netns "$b"
ip -n "$a" addr add 192.0.2.1/24 dev xa0
ip -n "$b" addr add 192.0.2.2/24 dev xb0
ip -n "$a" link set xa0 up
ip -n "$b" link set xb0 up
ip netns exec "$a" "$work/udp_echo" serve 9999 &
sleep 0.3
ip netns exec "$b" ping -c 3 -q 192.0.2.1 >/dev/null
kernel=$(ip netns exec "$b" ping -c "$count" -i 0.01 192.0.2.1 |
  sed -n 's/.*time=\([0-9.]*\).*/\1/p' | sort -n |
  awk '{v[NR] = $1 * 1000} END {printf "%.0f %.0f %.0f", v[int(NR / 2) + 1], v[int(NR * 0.9) + 1], v[1]}')
program=$(ip netns exec "$b" "$work/udp_echo" ask 192.0.2.1 9999 "$count" 10000)
read -r k50 k90 kmin <<<"$kernel"
read -r p50 p90 pmin <<<"$program"
printf '%-28s %8s %8s %8s\n' "round trip (us)" p50 p90 min
printf '%-28s %8s %8s %8s\n' "kernel answers (ping)" "$k50" "$k90" "$kmin"
printf '%-28s %8s %8s %8s\n' "a program answers (UDP)" "$p50" "$p90" "$pmin"
printf 'one crossing into userspace: +%s us at p50\n' "$((p50 - k50))"
