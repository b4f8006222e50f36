#!/usr/bin/env bash
# The overlay benchmark (see bench/overlay.py): builds vane in release mode, installs the
# tools it measures with (iperf3; nebula, wireguard-go and wireguard-tools to compare with),
# and runs it. Arguments go to bench/overlay.py (--duration, --paths).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi
bash scripts/install-deps.sh nebula wireguard-go wireguard-tools
cargo build --release --quiet
exec python3 bench/overlay.py "$@"
