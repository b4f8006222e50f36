#!/usr/bin/env bash
# The overlay benchmark (see bench/overlay.py): builds vane in release mode, installs the
# tools it measures with (iperf3; nebula, wireguard-go and wireguard-tools to compare with),
# and runs it. Arguments go to bench/overlay.py (--duration, --paths).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi
bash scripts/install-deps.sh
need=(iperf3 nebula wireguard-go wireguard-tools)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --quiet
exec python3 bench/overlay.py "$@"
