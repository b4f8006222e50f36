#!/usr/bin/env bash
# Freeze time of live migration: a small counter server (well under 50 MiB resident) with
# three open connections (clients on three hosts asking without pause) migrates 10 times
# between two hosts of a lab with its memory inside the freeze, then 10 times post-copy
# (`--post-copy`: memory after the freeze); prints each freeze time (from the moment other
# hosts hold what they send to it until they send it on to the destination) and the
# medians, and the clients' longest waits for an answer (the freeze up to the first answer,
# as they see it). The clients must see no error. Then an idle program with 512 MiB
# resident migrates whole once, then post-copy three times: its freezes, the commands' whole
# times (post-copy's median), next to the time a plain TCP stream takes to move 512 MiB
# between the same two hosts' namespaces (median of three, each just before a post-copy
# migration), and what CRIU's lazy pages take alone between them (no vane, relay or
# encryption); then a program rewriting 20 MiB/s of its 512 MiB migrates both ways
# (post-copy has no rounds to converge: its memory moves once, after the freeze); and the
# controller's peak memory.
#
#   bench/migrate.sh [--debug] [COUNT]
#
# Builds vane in release mode unless --debug (then uses the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/build.sh
count=${1:-10}
lab="bm$$"
octet=$((($$ % 200) + 30))
export VANE_CONTROLLER="https://198.18.$octet.254:7946"
cleanup() {
  "$vane" lab down --name "$lab" >/dev/null 2>&1 || true
  rm -rf "/var/tmp/vane-bench-$lab"
}
trap cleanup EXIT
"$vane" lab up --hosts 3 --name "$lab" --underlay "198.18.$octet.0/24" >/dev/null
# Where the clients look for their stop file: not /tmp, which instances have of their own,
# nor /var/lib/vane, which they do not see.
stops="/var/tmp/vane-bench-$lab"
mkdir -p "$stops"
"$vane" net create bench --subnet 10.77.0.0/24 >/dev/null
server='
import socket, threading
def serve(c):
    f = c.makefile("rwb")
    n = 0
    while f.readline():
        n += 1
        f.write(b"%d\n" % n)
        f.flush()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'
client='
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 7000), timeout=10)
s.settimeout(60)
f = s.makefile("rwb")
n = 0
stalls = []
while not os.path.exists(sys.argv[2]):
    asked = time.monotonic()
    f.write(b"x\n")
    f.flush()
    if int(f.readline()) != n + 1:
        print("gap after", n, flush=True)
        sys.exit(1)
    # What a migration costs this client: the wait for an answer, when longer than usual.
    waited = (time.monotonic() - asked) * 1000
    if waited > 20:
        stalls.append(int(waited))
    n += 1
    time.sleep(0.002)
print("ok", n, "stalls", *stalls, flush=True)
'
"$vane" run --net bench --name srv --host h1 -- python3 -c "$server" >/dev/null
sleep 0.5
for h in h1 h2 h3; do
  "$vane" run --net bench --name "c$h" --host "$h" -- python3 -c "$client" srv "$stops/stop" >/dev/null
done
sleep 1
times=()
lazy_times=()
to=h2
for i in $(seq "$count"); do
  line=$("$vane" migrate srv --to "$to")
  echo "$line"
  times+=("$(echo "$line" | sed -n 's/.*freeze \([0-9]*\) ms.*/\1/p')")
  if [ "$to" = h2 ]; then to=h1; else to=h2; fi
  sleep 0.5
done
for i in $(seq "$count"); do
  line=$("$vane" migrate srv --to "$to" --post-copy)
  echo "$line"
  lazy_times+=("$(echo "$line" | sed -n 's/.*freeze \([0-9]*\) ms.*/\1/p')")
  if [ "$to" = h2 ]; then to=h1; else to=h2; fi
  sleep 0.5
done
touch "$stops/stop"
failed=0
for h in h1 h2 h3; do
  for _ in $(seq 100); do
    out=$("$vane" logs "c$h")
    [ -n "$out" ] && break
    sleep 0.1
  done
  case "$out" in ok*) ;; *) echo "client c$h: ${out:-no answer after 10 s}"; failed=1 ;; esac
done
[ "$failed" = 0 ] || "$vane" ps
# Each client's longest waits for an answer: one per migration (the freeze as the client
# sees it, up to the answer).
stalls=()
for h in h1 h2 h3; do
  read -ra seen <<<"$("$vane" logs "c$h" | sed -n 's/^ok [0-9]* stalls//p')"
  stalls+=("${seen[@]}")
done
rss=$("$vane" exec srv -- sh -c 'grep VmRSS /proc/2/status' | awk '{print $2}')
median_of() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
median=$(median_of "${times[@]}")
lazy_median=$(median_of "${lazy_times[@]}")
small="server resident: $((rss / 1024)) MiB; $count migrations each ($profile build): median freeze $median ms whole, $lazy_median ms post-copy"
if [ "${#stalls[@]}" -gt 0 ]; then
  answered="${#stalls[@]} waits over 20 ms seen by the clients in $((2 * count * 3)) client-migrations: median $(median_of "${stalls[@]}") ms, longest $(printf '%s\n' "${stalls[@]}" | sort -n | tail -1) ms"
else
  answered="no client waited over 20 ms"
fi

# 512 MiB resident, idle.
big='
import os, time
b = bytearray(os.urandom(1 << 20)) * 512
print("ready", flush=True)
time.sleep(1e9)
'
"$vane" run --net bench --name big --host h1 -- python3 -c "$big" >/dev/null
for _ in $(seq 300); do
  "$vane" logs big 2>/dev/null | grep -q ready && break
  sleep 0.1
done
start=$(date +%s%N)
line=$("$vane" migrate big --to h2)
total_ms=$((($(date +%s%N) - start) / 1000000))
echo "$line"
# The same bytes over a plain TCP stream between the hosts' namespaces, from h2 (where the
# program now is) to h1, then the program's post-copy migration the same way; three such
# pairs, back and forth, each stream just before its migration so that both see the same
# machine (its load swings a single stream between 165 and 350 ms), the medians compared.
sink() {
  ip netns exec "vane-$lab-$1" python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7900)); s.listen(1)
c, _ = s.accept()
while c.recv(1 << 20): pass
c.close()
' &
}
stream() {
  local to_addr
  to_addr=$(ip -n "vane-$lab-$2" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
  ip netns exec "vane-$lab-$1" python3 -c '
import socket, sys, time
b = bytes(1 << 20)
for _ in range(50):
    try:
        s = socket.create_connection((sys.argv[1], 7900))
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
t = time.time()
for _ in range(512): s.sendall(b)
s.shutdown(socket.SHUT_WR); s.recv(1)
print(int((time.time() - t) * 1000))
' "$to_addr"
}
lazy_totals=()
lazy_freezes=()
lazy_lines=()
tcp_runs=()
from=h2
to=h1
for _ in 1 2 3; do
  sink "$to"
  tcp_runs+=("$(stream "$from" "$to")")
  wait
  start=$(date +%s%N)
  lazy_line=$("$vane" migrate big --to "$to" --post-copy)
  lazy_totals+=($((($(date +%s%N) - start) / 1000000)))
  lazy_freezes+=("$(echo "$lazy_line" | sed -n 's/.*freeze \([0-9]*\) ms.*/\1/p')")
  lazy_lines+=("$lazy_line")
  echo "$lazy_line (plain TCP just before: ${tcp_runs[-1]} ms)"
  tmp=$from
  from=$to
  to=$tmp
done
lazy_total_ms=$(median_of "${lazy_totals[@]}")
tcp_ms=$(median_of "${tcp_runs[@]}")
lazy_released=()
for l in "${lazy_lines[@]}"; do
  lazy_released+=("$(echo "$l" | sed -n 's/.*source released in \([0-9]*\) ms.*/\1/p')")
done
"$vane" rm --force big >/dev/null

# What CRIU's lazy pages take alone between the same two namespaces: no vane, no relay, no
# encryption; a 512 MiB program dumped lazily on h1, restored on h2, its pages pulled over
# the underlay by `criu lazy-pages` straight from the dump's page server. From its log:
# the first page copied into the restored program to the last (median of three). The part
# of a post-copy migration's total that no encryption or relay can beat.
criu_alone() {
  local d="$stops/criu" port=7910 marker="vane-bench-$lab-criu" pid dump lazy
  rm -rf "$d" && mkdir -p "$d"
  nsenter --net="/run/netns/vane-$lab-h1" unshare -pf setsid python3 -c '
import os, sys, time
b = bytearray(os.urandom(1 << 20)) * 512
open(sys.argv[1], "w").close()
time.sleep(1e9)
' "$d/ready" "$marker" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 300); do [ -e "$d/ready" ] && break; sleep 0.1; done
  pid=$(pgrep -f "$marker" | while read -r p; do [ "$(cat "/proc/$p/comm")" = python3 ] && echo "$p"; done)
  nsenter --net="/run/netns/vane-$lab-h1" criu dump -t "$pid" -D "$d" --lazy-pages \
    --address "198.18.$octet.1" --port $port -o dump.log -v4 &
  dump=$!
  for _ in $(seq 100); do
    ip netns exec "vane-$lab-h1" ss -ltn | grep -q ":$port " && break
    sleep 0.05
  done
  nsenter --net="/run/netns/vane-$lab-h2" criu lazy-pages --page-server \
    --address "198.18.$octet.1" --port $port -D "$d" -o lazy.log -v4 &
  lazy=$!
  sleep 0.3
  nsenter --net="/run/netns/vane-$lab-h2" criu restore -D "$d" --lazy-pages -d -o restore.log
  wait "$lazy" "$dump"
  pkill -9 -f "$marker" || true
  awk -F'[()]' '/uffd_copy/ && !first {first = $2} /UFFD transferred pages/ {last = $2}
    END {printf "%d\n", (last - first) * 1000}' "$d/lazy.log"
}
criu_runs=()
for _ in 1 2 3; do
  criu_runs+=("$(criu_alone)")
done
criu_ms=$(median_of "${criu_runs[@]}")

# 512 MiB resident, rewriting 20 MiB/s (a page of each 4 KiB in 20 MiB every second).
busy='
import os, time
b = bytearray(os.urandom(1 << 20)) * 512
print("ready", flush=True)
off = 0
while True:
    t = time.time()
    for i in range(off, off + (20 << 20), 4096):
        b[i % len(b)] = (b[i % len(b)] + 1) % 256
    off = (off + (20 << 20)) % len(b)
    time.sleep(max(0, 1 - (time.time() - t)))
'
"$vane" run --net bench --name busy --host h1 -- python3 -c "$busy" >/dev/null
for _ in $(seq 300); do
  "$vane" logs busy 2>/dev/null | grep -q ready && break
  sleep 0.1
done
busy_line=$("$vane" migrate busy --to h2)
echo "$busy_line"
busy_lazy_line=$("$vane" migrate busy --to h1 --post-copy)
echo "$busy_lazy_line"
busy_freeze=$(echo "$busy_line" | sed -n 's/.*freeze \([0-9]*\) ms.*/\1/p')
busy_lazy_freeze=$(echo "$busy_lazy_line" | sed -n 's/.*freeze \([0-9]*\) ms.*/\1/p')
busy_released=$(echo "$busy_lazy_line" | sed -n 's/.*source released in \([0-9]*\) ms.*/\1/p')

peak=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$(cat "/var/lib/vane/labs/$lab/controller.pid")/status")
big_freeze=$(echo "$line" | sed -n 's/.*freeze \([0-9]*\) ms.*/\1/p')
lazy_freeze=$(median_of "${lazy_freezes[@]}")

echo
echo "migration ($profile build)"
echo "  small server, 3 connections     $small"
echo "  ... as its clients saw it        $answered"
echo "  512 MiB resident, idle, whole    freeze $big_freeze ms; migrate took $total_ms ms, plain TCP 512 MiB $tcp_ms ms ($(awk -v a="$total_ms" -v b="$tcp_ms" 'BEGIN {printf "%.1f", a / b}')x)"
echo "  512 MiB resident, idle, post-copy median of 3: freeze $lazy_freeze ms; migrate took $lazy_total_ms ms ($(awk -v a="$lazy_total_ms" -v b="$tcp_ms" 'BEGIN {printf "%.1f", a / b}')x plain TCP); pages after the freeze $(median_of "${lazy_released[@]}") ms"
echo "  ... CRIU's lazy pages alone      no vane, relay or encryption, same namespaces: pages in $criu_ms ms ($(awk -v a="$criu_ms" -v b="$tcp_ms" 'BEGIN {printf "%.1f", a / b}')x plain TCP; runs: ${criu_runs[*]})"
echo "  512 MiB, rewriting 20 MiB/s      freeze $busy_freeze ms whole; post-copy $busy_lazy_freeze ms, source released in $busy_released ms"
echo "  controller peak RSS             $peak MiB"
exit $failed
