#!/usr/bin/env bash
# Builds the release binary and a Debian package of it, target/debian/vane_VERSION_ARCH.deb:
# /usr/bin/vane, the systemd units, example settings as conffiles in /etc/vane, bash, zsh
# and fish completions, man pages and docs. Needs only dpkg-deb and gzip (any Debian).
#
#   VANE_BIN=PATH          package this binary instead of building the release one (the
#                          package test passes the binary it was built with)
#   VANE_DEB_DIR=DIR       where the package goes [default: target/debian]
#   VANE_DEB_COMPRESSION   dpkg-deb's compressor: xz, gzip, zstd or none [default: xz]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
if [ -n "${VANE_BIN:-}" ]; then
  bin=$VANE_BIN
else
  cargo build --release --locked --quiet -p vane
  bin=$target/release/vane
fi
out=${VANE_DEB_DIR:-$target/debian}
# The version the binary says it is, so that package and binary never disagree.
version=$("$bin" --version | awk '{print $2}')
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the binary uses is the libc6 it needs (what
# dpkg-shlibdeps would find, without dpkg-dev and a debian/ directory).
glibc=$(grep -aoE 'GLIBC_2\.[0-9]+(\.[0-9]+)?' "$bin" | sed 's/GLIBC_//' | sort -uV | tail -n1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# The archive's "./" takes the staging directory's mode: mktemp's 0700 is not what / is.
chmod 0755 "$stage"
install -D -m 0755 "$bin" "$stage/usr/bin/vane"
install -D -m 0644 -t "$stage/lib/systemd/system" \
  packaging/systemd/vane-controller.service packaging/systemd/vane-agent.service
install -D -m 0644 packaging/controller.toml "$stage/etc/vane/controller.toml"
# It holds the join token once edited.
install -D -m 0600 packaging/agent.toml "$stage/etc/vane/agent.toml"

completions=$stage/usr/share
mkdir -p "$completions/bash-completion/completions" "$completions/zsh/vendor-completions" \
  "$completions/fish/vendor_completions.d"
"$bin" completions bash >"$completions/bash-completion/completions/vane"
"$bin" completions zsh >"$completions/zsh/vendor-completions/_vane"
"$bin" completions fish >"$completions/fish/vendor_completions.d/vane.fish"

man=$stage/usr/share/man/man1
"$bin" __man "$man"
gzip -9n "$man"/*.1

doc=$stage/usr/share/doc/vane
mkdir -p "$doc"
gzip -9nc README.md >"$doc/README.md.gz"
cat >"$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vane
Comment: vane runs unmodified Linux programs in isolated virtual networks that span
 several hosts. The binary links Rust crates from crates.io under their own licences
 (MIT, Apache-2.0, ISC, BSD and the like), as listed in the source tree's Cargo.lock.

Files: *
Copyright: the vane authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
chmod 0644 "$doc"/*

mkdir -p "$stage/DEBIAN"
printf '%s\n' /etc/vane/controller.toml /etc/vane/agent.toml >"$stage/DEBIAN/conffiles"
# Maintainer scripts do nothing when dpkg installs into another root (--root sets
# DPKG_ROOT): that system's services are not this one's.
cat >"$stage/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
[ -z "${DPKG_ROOT:-}" ] || exit 0
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # An upgrade restarts what runs; the agent's instances keep running across it.
    if [ -n "$2" ]; then
        systemctl try-restart vane-controller.service vane-agent.service || true
    fi
fi
SCRIPT
cat >"$stage/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
[ -z "${DPKG_ROOT:-}" ] || exit 0
# Instances outlive their agent: `vane rm` them before removing vane to stop them.
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop vane-agent.service vane-controller.service || true
fi
SCRIPT
cat >"$stage/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
[ -z "${DPKG_ROOT:-}" ] || exit 0
# /var/lib/vane (the cluster's store, CA and keys, the hosts' identities) stays, even on
# purge: removing it is the operator's decision.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
SCRIPT
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: vane
Version: $version
Architecture: $arch
Maintainer: vane maintainers <maintainers@vane.invalid>
Installed-Size: $size
Depends: libc6 (>= $glibc), iproute2, nftables
Recommends: criu (>= 4.2)
Section: net
Priority: optional
Description: run unmodified Linux programs in isolated virtual networks
 vane runs programs in instances that have their own network identity and
 namespaces, in virtual networks that span several hosts, with policies between
 nets and encrypted tunnels between hosts. One binary is the CLI, the controller
 (vane-controller.service) and the per-host agent (vane-agent.service); settings
 are in /etc/vane.
 .
 Live migration, snapshots and restores need CRIU 4.2 or newer, which Debian 12
 does not ship: the source tree's scripts/install-criu.sh builds it.
CONTROL

mkdir -p "$out"
deb=$out/vane_${version}_${arch}.deb
dpkg-deb --root-owner-group -Z"${VANE_DEB_COMPRESSION:-xz}" --build "$stage" "$deb" >/dev/null
echo "$deb"
