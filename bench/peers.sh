#!/usr/bin/env bash
# Fetches the newest releases of the peers the overlay benchmark compares with that Debian
# carries (trixie: wireguard-go 0.0.20231211, with TUN and UDP offloads; nebula 1.9.3) and
# unpacks them under DIR (default /var/tmp/vane-bench-peers), for the benchmark only:
# nothing is installed, the host's apt state is not touched (a private one is used).
# Prints the directory whose usr/bin holds them. Idempotent.
set -euo pipefail
dir="${1:-/var/tmp/vane-bench-peers}"
if [ -x "$dir/usr/bin/wireguard-go" ] && [ -x "$dir/usr/bin/nebula" ]; then
  echo "$dir"
  exit 0
fi
apt_dir=$(mktemp -d)
trap 'rm -rf "$apt_dir"' EXIT
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dir"
echo "deb http://deb.debian.org/debian trixie main" > "$apt_dir/sources.list"
apt=(apt-get -q -o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=/dev/null
     -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
     -o APT::Sandbox::User=root)
"${apt[@]}" update >/dev/null
(cd "$apt_dir" && "${apt[@]}" download wireguard-go nebula >/dev/null)
for deb in "$apt_dir"/*.deb; do
  dpkg-deb -x "$deb" "$dir"
done
echo "$dir"
