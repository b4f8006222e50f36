#!/usr/bin/env bash
# The overlay benchmark (see bench/overlay.py): builds vane in release mode, installs the
# tools it measures with (iperf3; nebula, wireguard-go and wireguard-tools to compare with,
# the peers themselves as trixie has them: bench/peers.sh), and runs it. Arguments go to bench/overlay.py (--duration, --paths).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi
bash scripts/install-deps.sh nebula wireguard-go wireguard-tools
# The peers as their newest Debian release (trixie) has them, unpacked for this run only;
# without the archive, the installed (bookworm) ones.
if peers=$(bash bench/peers.sh); then
  export VANE_BENCH_PEERS="$peers/usr/bin"
else
  echo "# trixie's peers could not be fetched: comparing with the installed ones" >&2
fi
cargo build --release --quiet
exec python3 bench/overlay.py "$@"
