#!/usr/bin/env bash
# Installs CRIU >= 4.2 (needed by `vane migrate`, `snapshot` and `restore`) as
# /usr/local/sbin/criu. Debian 12's criu 3.17 fails on recent kernels (vDSO layout) and
# 4.1 fails on TCP sockets with kernels >= 6.16, so this builds 4.2.1 from Debian sid's
# source tarball (the system's libraries stay as they are). Also installs iptables, which
# CRIU can use to lock the network during a dump. Idempotent: does nothing when a criu on
# the PATH already says version >= 4.2 (and, for the one built here, keeps its cache dir).
#
# The build carries vane's own patches (scripts/criu-*.patch):
# - criu-userfaultfd.patch, for post-copy migration: a CRIU in a user namespace, where the
#   userfaultfd system call is refused, makes its userfaultfd from a /dev/userfaultfd
#   descriptor that the agent opens and names in CRIU_USERFAULTFD_DEV (so that confined
#   instances can be restored with lazy pages), closes it before the restored tasks run, and
#   a lazy dump that cannot serve its pages takes the tree's connections out of repair mode
#   before it resumes the tree;
# - criu-freeze.patch, for a shorter freeze: an empty tmpfs is carried as its root's
#   attributes instead of a tar and a gzip run each way, other tmpfs contents as plain tar;
#   conntrack expectations are asked of their own subsystem (the dump walked the whole
#   conntrack table a second time instead);
# - criu-lazy-pages.patch, for post-copy at the link's speed: the lazy-pages daemon keeps up
#   to three background requests on the way instead of one, doubles their size up to 4 MiB
#   instead of growing it by 64 KiB, and waits in epoll for their answers instead of
#   polling without a timeout (which took a CPU from the relay the pages come through).
#
# CRIU probes the kernel's features at every start (some 40 ms, inside a migration's freeze)
# unless it can cache them in a file on tmpfs. Where /run is not a tmpfs, the CRIU built here
# caches in /run/criu, which this script mounts as a small tmpfs (again after a reboot: run
# it again; without the mount CRIU only starts slower).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

want_major=4 want_minor=2
have_ok() {
  local v
  v=$(PATH="/usr/local/sbin:$PATH" criu --version 2>/dev/null | sed -n 's/^Version: *//p' | head -1)
  [ -n "$v" ] || return 1
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  [ "$major" -gt "$want_major" ] || { [ "$major" -eq "$want_major" ] && [ "$minor" -ge "$want_minor" ]; }
}

export DEBIAN_FRONTEND=noninteractive
deps=(iptables libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libnftables-dev libcap-dev libgnutls28-dev
  libbsd-dev pkg-config libaio-dev uuid-dev gcc make xz-utils dpkg-dev patch)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

rundir=/run/criu
# The patches the installed CRIU was built with, one after the other.
patched=/usr/local/sbin/.criu-vane.patches
patches() { cat "$here"/criu-*.patch; }
keep_cache() {
  mkdir -p "$rundir"
  if [ "$(stat -f -c %T "$rundir")" != tmpfs ]; then
    mount -t tmpfs -o mode=0700,size=4m vane-criu "$rundir"
  fi
}
built_here_ok() {
  # A criu of ours must cache in $rundir and carry today's patches (older builds of this
  # script did neither, or carried fewer).
  [ ! -x /usr/local/sbin/criu ] || { grep -qa "$rundir/criu.kdat" /usr/local/sbin/criu &&
    patches | cmp -s "$patched" -; }
}

if have_ok && built_here_ok; then
  [ ! -x /usr/local/sbin/criu ] || keep_cache
  # iptables is needed at run time even with a criu already there.
  if ! command -v iptables >/dev/null; then
    apt-get update -qq && apt-get install -y -qq iptables >/dev/null
  fi
  exit 0
fi

src_list=/etc/apt/sources.list.d/vane-criu-sid-src.sources
# The same mirror as the machine's own Debian source, where it names one.
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
if [ ! -f "$src_list" ]; then
  cat >"$src_list" <<SRC
Types: deb-src
URIs: $mirror
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=/usr/local/src/vane-criu
mkdir -p "$work"
cd "$work"
tarball=$(ls criu_4.*.orig.tar.* 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$tarball" ]; then
  # The debian.tar.xz part has been seen to answer 404 after the orig tarball arrived:
  # tolerate the failure and look for the tarball.
  apt-get source --download-only criu >/dev/null 2>&1 || true
  tarball=$(ls criu_4.*.orig.tar.* 2>/dev/null | sort -V | tail -1 || true)
fi
# Only the source was wanted from sid: leave the machine's package sources as they were.
rm -f "$src_list"
[ -n "$tarball" ] || { echo "install-criu: no criu 4.x source tarball from Debian sid" >&2; exit 1; }
dir=$(tar tf "$tarball" | sed -n 1p | cut -d/ -f1)
# A fresh tree each time: the patches apply to the release as it came.
rm -rf "$dir"
tar xf "$tarball"
for p in "$here"/criu-*.patch; do
  patch -d "$dir" -p1 --quiet <"$p"
done
# The cache directory is compiled into kerndat.o: make it again, whatever was there.
rm -f "$dir/criu/kerndat.o"
make -C "$dir" -j"$(nproc)" RUNDIR="$rundir" criu >/dev/null
install -m 0755 "$dir/criu/criu" /usr/local/sbin/criu
patches >"$patched"
chmod 0644 "$patched"
# Probes of the kernel's features made by another build (CRIU's own, and vane's of a user
# namespace) are not this one's to trust.
rm -f "$rundir"/*.kdat
rm -f /usr/local/sbin/.criu-userfaultfd.patch
keep_cache
have_ok || { echo "install-criu: /usr/local/sbin/criu does not report version >= 4.2" >&2; exit 1; }
echo "install-criu: $(/usr/local/sbin/criu --version | head -1)"
