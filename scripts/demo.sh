#!/usr/bin/env bash
# Sets up vane on a fresh machine and shows what it does: a three-host lab, two tenants with
# the same subnet spread over the hosts, a web server reached by name from another host
# through an encrypted tunnel, the underlay showing no plaintext, root inside an instance
# confined, a refused connection, a policy, and a live migration of the web server to
# another host.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi
bash scripts/install-deps.sh
cargo build --release --quiet
install -m 755 "${CARGO_TARGET_DIR:-target}/release/vane" /usr/local/bin/vane
step() { printf '\n\033[1m$ vane %s\033[0m\n' "$*"; vane "$@"; }
vane --version

vane lab down >/dev/null 2>&1 || true
step lab up --hosts 3
step host ls
step net create red --subnet 10.10.2.0/24 --tenant a
step net create blue --subnet 10.10.2.0/24 --tenant b
step net create green --subnet 10.20.0.0/24
step run --net red --name web1 --host h1 --ip 10.10.2.1 -- sh -c 'd=$(mktemp -d); echo red secret page > $d/index.html; cd $d; exec python3 -m http.server 80'
step run --net red --name cli1 --host h3 -- sleep infinity
step run --net blue --name web2 --host h2 --ip 10.10.2.1 -- sh -c 'd=$(mktemp -d); echo blue secret page > $d/index.html; cd $d; exec python3 -m http.server 80'
step run --net blue --name cli2 --host h3 -- sleep infinity
step run --net green --name g1 --host h2 -- sleep infinity
sleep 1
step ps

printf '\n# root inside an instance is nobody outside: an unprivileged host uid, the host read-only\n'
step exec cli1 -- sh -c 'id -u; touch /usr/local/bin/x 2>&1; cat /etc/shadow 2>&1; ls /var/lib/vane'
pid=$(vane inspect cli1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])')
printf '$ ps -o uid,pid,args -p %s   # on the host\n' "$pid"
ps -o uid,pid,args -p "$pid"

printf '\n# cli1 (red, on h3) fetches from web1 (red, on h1) by name, while the underlay is captured\n'
capture=$(mktemp)
tcpdump -Z root --immediate-mode -i vv-lab-1 -U -s 0 -w "$capture" udp port 7947 2>/dev/null &
tcpdump_pid=$!
sleep 1.5
step exec cli1 -- hostname
step exec cli1 -- curl -s http://web1/
step exec cli2 -- curl -s http://10.10.2.1/
sleep 0.5
kill -INT "$tcpdump_pid"; wait "$tcpdump_pid" || true
datagrams=$(tcpdump -r "$capture" 2>/dev/null | wc -l)
plain=$(tcpdump -A -r "$capture" 2>/dev/null | grep -c 'secret page' || true)
rm -f "$capture"
printf '\n# the underlay carried %s datagrams to and from h1; lines with the page in the clear: %s\n' "$datagrams" "$plain"
step host stats h3

printf '\n# green has no policy to red: refused at once\n'
step exec g1 -- python3 -c "import socket
try: socket.create_connection(('10.10.2.1', 80), timeout=5)
except OSError as e: print('connect:', e)"
step policy allow green red --port 80/tcp
step exec g1 -- curl -s http://10.10.2.1/

printf '\n# web1 moves to h2 with its address, name and state; clients notice nothing\n'
step migrate web1 --to h2
step exec cli1 -- curl -s http://web1/
step ps

printf '\n# a machine without vane joins red: a stock WireGuard client (wg-quick) takes this file\n'
step gateway add laptop --net red --host h1
step gateway ls
printf '\nvane is installed as /usr/local/bin/vane. The lab stays up: try more vane commands,\nthen `vane lab down`.\n'
