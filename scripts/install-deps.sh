#!/usr/bin/env bash
# Installs the Debian packages vane and its tests need at run time: iproute2 (ip), nftables
# (nft), util-linux, procps, curl, python3 and iputils-ping (used by the demo and the tests as
# ordinary programs inside instances), tcpdump (the tests capture the underlay to check that
# nothing crosses it in the clear and to replay captured packets), iperf3 (bandwidth limit
# tests), busybox-static (a self-contained root directory for --rootfs tests), chromium (the
# live picture's test drives it headless) and openssl (that test names the lab CA's key to
# it), etcd-server and etcd-client (the store tests start a real etcd and read it with
# etcdctl), bind9-dnsutils (dig, which the resolver's tests run inside instances),
# wireguard-go and wireguard-tools (the stock client the gateway tests connect with). Packages
# named as arguments are installed too (the benchmarks' extra tools).
# Idempotent.
set -euo pipefail
# systemd: its systemd-analyze verifies the packaged units in the package test (nothing is
# booted with it).
need=(iproute2 nftables curl python3 procps util-linux iputils-ping tcpdump iperf3 busybox-static systemd chromium openssl etcd-server etcd-client bind9-dnsutils wireguard-go wireguard-tools "$@")
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
modprobe tun 2>/dev/null || true
[ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }
# CRIU >= 4.2 for migrations, snapshots and restores (built from source when missing).
"$(dirname "$0")/install-criu.sh"
