#!/usr/bin/env bash
# Sets up vane on a fresh machine and shows what it does: a one-host lab, two tenants with
# the same subnet, a web server reached by name, a refused connection, a policy.
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
step lab up --hosts 1
step net create red --subnet 10.10.2.0/24 --tenant a
step net create blue --subnet 10.10.2.0/24 --tenant b
step net create green --subnet 10.20.0.0/24
step run --net red --name web1 --ip 10.10.2.1 -- python3 -m http.server 80
step run --net red --name cli1 -- sleep infinity
step run --net blue --name web2 --ip 10.10.2.1 -- sh -c 'd=$(mktemp -d); echo blue says hello > $d/index.html; cd $d; exec python3 -m http.server 80'
step run --net blue --name cli2 -- sleep infinity
step run --net green --name g1 -- sleep infinity
sleep 1
step ps
step exec cli1 -- hostname
step exec cli1 -- sh -c 'curl -s http://web1/ | head -4'
step exec cli2 -- curl -s http://10.10.2.1/
printf '\n# green has no policy to red: refused at once\n'
step exec g1 -- python3 -c "import socket
try: socket.create_connection(('10.10.2.1', 80), timeout=5)
except OSError as e: print('connect:', e)"
step policy allow green red --port 80/tcp
step exec g1 -- sh -c 'curl -s http://10.10.2.1/ | head -4'
printf '\nvane is installed as /usr/local/bin/vane. The lab stays up: try more vane commands,\nthen `vane lab down`.\n'
