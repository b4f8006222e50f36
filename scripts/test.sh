#!/usr/bin/env bash
# The whole test suite, as root: unit tests, and integration tests that build labs of
# network namespaces, TUN devices and nftables rules for real.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi
bash scripts/install-deps.sh
cargo test --workspace --all-targets "$@"
