#!/usr/bin/env bash
# How long `vane run` takes to a running program, on a one-host lab: COUNT instances of
# `sleep infinity` started one after the other, each timed from the command's start to its
# return (the agent answers once the program runs), for confined instances (user namespace,
# read-only root, minimal /dev, seccomp: the default) and, as the baseline of the same run,
# --privileged ones (namespaces and cgroups only). Prints both medians and their ratio.
#
#   bench/run.sh [--debug] [COUNT]
#
# Builds vane in release mode unless --debug (then uses the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/build.sh
count=${1:-30}
lab="br$$"
octet=$((($$ % 200) + 30))
export VANE_CONTROLLER="https://198.18.$octet.254:7946"
cleanup() {
  "$vane" lab down --name "$lab" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$vane" lab up --hosts 1 --name "$lab" --underlay "198.18.$octet.0/24" >/dev/null
"$vane" net create bench --subnet 10.99.0.0/16 >/dev/null

# time_runs KIND [run options...]: prints one duration in ms per instance.
time_runs() {
  local kind=$1
  shift
  for i in $(seq 1 "$count"); do
    local start end
    start=$(date +%s%N)
    "$vane" run --net bench --name "$kind$i" "$@" -- sleep infinity >/dev/null
    end=$(date +%s%N)
    echo $(((end - start) / 1000))
  done
  for i in $(seq 1 "$count"); do
    "$vane" rm "$kind$i" >/dev/null
  done
}

median() {
  sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.1f", m / 1000}'
}

# Interleaved rounds so that both kinds see the same machine.
confined=$(mktemp)
privileged=$(mktemp)
trap 'cleanup; rm -f "$confined" "$privileged"' EXIT
time_runs c >>"$confined"
time_runs p --privileged >>"$privileged"
time_runs c >>"$confined"
time_runs p --privileged >>"$privileged"
c=$(median <"$confined")
p=$(median <"$privileged")
printf 'vane run to a running program, median of %d each (%s build)\n' $((2 * count)) "$profile"
printf '  confined (default)   %s ms\n' "$c"
printf '  --privileged         %s ms\n' "$p"
awk -v c="$c" -v p="$p" 'BEGIN { printf "  ratio                %.2fx\n", c / p }'
