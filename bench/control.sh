#!/usr/bin/env bash
# Control-plane scale: N simulated hosts (`vane __simulate-agents`: real control-stream
# clients with real credentials, in one process) against a real controller on the embedded
# store and on etcd (a real etcd on free ports, started here). Through the API: 100 nets and
# M instances spread over the hosts, then 200 members added one at a time and 100 moved
# (removed and run again on another host of their net: not a live migration, which needs
# CRIU). Convergence: from the API request until every simulated host that needs the member
# has it in a view. Also the controller's CPU and peak RSS per agent and the view bytes per
# agent, at a quarter of the size first to show how they grow (--no-quarter skips it).
#
#   bench/control.sh [--agents N] [--instances M] [--store embedded|etcd] [--no-quarter]
#                    [--probes K] [--results FILE]
#
# Defaults: 1000 agents, 10000 instances, both stores. Needs no root (the simulated hosts
# run nothing); builds vane in release mode. The last line:
#   convergence p50 X ms p99 Y ms agents N instances M store S
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p vane
vane="${CARGO_TARGET_DIR:-target}/release/vane"
command -v etcd >/dev/null || { echo "etcd not found: scripts/install-deps.sh installs etcd-server" >&2; exit 1; }
# Each simulated host holds one connection, and the controller one for each.
ulimit -n "$(ulimit -Hn)"
exec python3 bench/control.py --vane "$vane" "$@"
