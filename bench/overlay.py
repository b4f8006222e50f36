#!/usr/bin/env python3
"""Overlay benchmark: vane against the kernel's own data path, measured in one run.

Builds a two-host vane lab (network namespaces on a bridge underlay) and measures, between
its two hosts and over the same underlay:

  veth            the underlay itself, no overlay
  kernel-vxlan    a kernel VXLAN device in each host (the baseline every ratio refers to)
  vane            vane instances, encrypted tunnels (the default)
  vane-plaintext  vane instances in a cluster created with --plaintext
  nebula          nebula, when its Debian package is installed
  wireguard-go    wireguard-go with wireguard-tools, when installed
  vane-gateway    wireguard-go (the stock client, in host 2's namespace, outside vane) to a
                  vane instance on host 1 through that host's WireGuard gateway
                  (`vane gateway add`): the same client as wireguard-go, vane's agent as
                  its peer instead of a second wireguard-go

For each: iperf3 TCP with 1 and 4 streams, UDP with 64-byte payloads (packets per second
received), ping RTT p50 and p99, and for the overlays run by a userspace daemon (vane's
agents, nebula, wireguard-go) the daemons' CPU time and peak RSS over the run. Prints one
table with every figure also as a ratio to kernel VXLAN of the same run, and writes the
results as JSON under bench/results/.

Run as root from the repository: bench/overlay.sh [--duration SECONDS] [--paths a,b,...].
The two hosts share the machine's cores with the daemons, so only ratios of one run mean
anything; absolute figures from different runs or machines do not compare.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = "bench"
OCTET = 250
UNDERLAY = f"198.18.{OCTET}.0/24"
H1, H2 = f"198.18.{OCTET}.1", f"198.18.{OCTET}.2"
NS1, NS2 = f"vane-{LAB}-h1", f"vane-{LAB}-h2"
CONTROLLER = f"https://198.18.{OCTET}.254:7946"
ALL_PATHS = ["veth", "kernel-vxlan", "vane", "vane-plaintext", "nebula", "wireguard-go",
             "vane-gateway"]
BASELINE = "kernel-vxlan"
# Where the peers' binaries are (bench/overlay.sh points it at trixie's, unpacked by
# bench/peers.sh); else those on PATH.
PEERS = os.environ.get("VANE_BENCH_PEERS")


def peer(name):
    """The peer program `name`: from VANE_BENCH_PEERS if it has it, else from PATH."""
    if PEERS and os.access(os.path.join(PEERS, name), os.X_OK):
        return os.path.join(PEERS, name)
    return shutil.which(name)


def peer_version(name):
    """Which build of peer `name` the run measures: its path and what it says it is."""
    path = peer(name)
    if not path:
        return None
    flag = "-version" if name == "nebula" else "--version"
    out = subprocess.run([path, flag], capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip()
    return f"{path}: {text.splitlines()[0]}" if text else path


def log(msg):
    print(f"# {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def ns(name, *cmd):
    return ["ip", "netns", "exec", name, *cmd]


class Vane:
    def __init__(self, binary):
        self.binary = binary

    def __call__(self, *args, check=True):
        env = dict(os.environ, VANE_CONTROLLER=CONTROLLER)
        return run([self.binary, *args], check=check, env=env)

    def lab_up(self, plaintext):
        self("lab", "down", "--name", LAB, check=False)
        extra = ["--plaintext"] if plaintext else []
        self("lab", "up", "--hosts", "2", "--name", LAB, "--underlay", UNDERLAY, *extra)

    def lab_down(self):
        self("lab", "down", "--name", LAB, check=False)

    def agent_pids(self):
        pids = []
        for h in ("h1", "h2"):
            with open(f"/var/lib/vane/labs/{LAB}/{h}.pid") as f:
                pids.append(int(f.read().strip()))
        return pids


# Measurements. Each takes the command prefix that runs a program on the client side, and
# the server's address; the server side runs `iperf3 -s` already.


def iperf(client, server, duration, *extra):
    out = run([*client, "iperf3", "-c", server, "-t", str(duration), "-J", *extra], check=False)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 to {server} printed no JSON: {out[:300]}")


def tcp_gbits(client, server, duration, streams):
    r = iperf(client, server, duration, "-P", str(streams))
    if "error" in r:
        raise RuntimeError(f"iperf3: {r['error']}")
    return r["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_kpps(client, server, duration):
    r = iperf(client, server, duration, "-u", "-l", "64", "-b", "0")
    if "error" in r:
        raise RuntimeError(f"iperf3: {r['error']}")
    s = r["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    return received / s["seconds"] / 1e3


def ping_us(client, server, count=300):
    out = run([*client, "ping", "-c", str(count), "-i", "0.01", "-W", "1", server], check=False)
    rtts = sorted(float(m) * 1000 for m in re.findall(r"time=([\d.]+) ms", out))
    if len(rtts) < count // 2:
        raise RuntimeError(f"ping to {server}: only {len(rtts)} of {count} replies")
    q = statistics.quantiles(rtts, n=100)
    return q[49], q[98]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(name, client, server, duration, daemons):
    """All figures of one path. `daemons`: pids whose CPU time and peak RSS count."""
    log(f"{name}: warming up")
    ping_us(client, server, count=20)
    cpu0 = sum(cpu_seconds(p) for p in daemons)
    result = {}
    log(f"{name}: TCP, 1 stream, {duration} s")
    result["tcp1_gbits"] = tcp_gbits(client, server, duration, 1)
    log(f"{name}: TCP, 4 streams, {duration} s")
    result["tcp4_gbits"] = tcp_gbits(client, server, duration, 4)
    log(f"{name}: UDP, 64-byte payloads, {duration} s")
    result["udp64_kpps"] = udp_kpps(client, server, duration)
    log(f"{name}: ping")
    result["rtt_p50_us"], result["rtt_p99_us"] = ping_us(client, server)
    if daemons:
        result["daemon_cpu_s"] = sum(cpu_seconds(p) for p in daemons) - cpu0
        result["daemon_peak_rss_mib"] = max(peak_rss_mib(p) for p in daemons)
    return result


class Background:
    """Processes started for one path, killed when it is done."""

    def __init__(self):
        self.procs = []

    def start(self, cmd):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, text=True)
        self.procs.append(p)
        return p

    def failure(self):
        """What the last process said when it failed, or that it still runs."""
        p = self.procs[-1]
        if p.poll() is None:
            return "still running"
        return f"exit status {p.returncode}: {p.stderr.read().strip()[-300:]}"

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs = []


def iperf_server(bg, netns):
    bg.start(ns(netns, "iperf3", "-s"))
    time.sleep(0.5)


def bench_veth(bg, duration):
    iperf_server(bg, NS1)
    return measure("veth", ns(NS2), H1, duration, [])


def bench_vxlan(bg, duration):
    for netns, local, remote, addr in ((NS1, H1, H2, "10.99.0.1"), (NS2, H2, H1, "10.99.0.2")):
        run(["ip", "-n", netns, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport",
             "4789", "local", local, "remote", remote, "dev", "eth0"])
        run(["ip", "-n", netns, "addr", "add", f"{addr}/24", "dev", "vx0"])
        run(["ip", "-n", netns, "link", "set", "vx0", "up"])
    iperf_server(bg, NS1)
    try:
        return measure("kernel-vxlan", ns(NS2), "10.99.0.1", duration, [])
    finally:
        for netns in (NS1, NS2):
            run(["ip", "-n", netns, "link", "del", "vx0"], check=False)


def bench_vane(vane, name, duration):
    vane("net", "create", "bench", "--subnet", "10.77.0.0/24")
    vane("run", "--net", "bench", "--name", "srv", "--host", "h1", "--ip", "10.77.0.1", "--",
         "iperf3", "-s")
    vane("run", "--net", "bench", "--name", "cli", "--host", "h2", "--ip", "10.77.0.2", "--",
         "sleep", "infinity")
    client = [vane.binary, "--controller", CONTROLLER, "exec", "cli", "--"]
    deadline = time.time() + 10
    while "1 received" not in run([*client, "ping", "-c", "1", "-W", "1", "10.77.0.1"],
                                  check=False):
        if time.time() > deadline:
            raise RuntimeError("the vane instances never reached each other")
        time.sleep(0.2)
    return measure(name, client, "10.77.0.1", duration, vane.agent_pids())


def bench_nebula(bg, duration, tmp):
    nebula, nebula_cert = peer("nebula"), peer("nebula-cert")
    if not nebula or not nebula_cert:
        return None
    d = os.path.join(tmp, "nebula")
    os.makedirs(d)
    run([nebula_cert, "ca", "-name", "bench", "-out-crt", f"{d}/ca.crt", "-out-key",
         f"{d}/ca.key"])
    pids = []
    for i, (netns, under) in enumerate(((NS1, H1), (NS2, H2)), start=1):
        run([nebula_cert, "sign", "-ca-crt", f"{d}/ca.crt", "-ca-key", f"{d}/ca.key",
             "-name", f"h{i}", "-ip", f"10.98.0.{i}/24", "-out-crt", f"{d}/h{i}.crt",
             "-out-key", f"{d}/h{i}.key"])
        other = 3 - i
        config = {
            "pki": {"ca": f"{d}/ca.crt", "cert": f"{d}/h{i}.crt", "key": f"{d}/h{i}.key"},
            "static_host_map": {f"10.98.0.{other}": [f"198.18.{OCTET}.{other}:4242"]},
            "lighthouse": {"am_lighthouse": False, "hosts": []},
            "listen": {"host": under, "port": 4242},
            "punchy": {"punch": False},
            "tun": {"dev": "nebula1", "mtu": 1300},
            "logging": {"level": "warning"},
            "firewall": {"outbound": [{"port": "any", "proto": "any", "host": "any"}],
                         "inbound": [{"port": "any", "proto": "any", "host": "any"}]},
        }
        with open(f"{d}/h{i}.yml", "w") as f:
            json.dump(config, f)  # JSON is YAML
        pids.append(bg.start(ns(netns, nebula, "-config", f"{d}/h{i}.yml")).pid)
    time.sleep(2)
    iperf_server(bg, NS1)
    return measure("nebula", ns(NS2), "10.98.0.1", duration, pids)


def bench_wireguard_go(bg, duration, tmp):
    wireguard_go = peer("wireguard-go")
    if not wireguard_go or not shutil.which("wg"):
        return None
    keys = []
    for _ in range(2):
        private = run(["wg", "genkey"]).strip()
        public = run(["wg", "pubkey"], input=private).strip()
        keys.append((private, public))
    pids = []
    for i, (netns, under) in enumerate(((NS1, H1), (NS2, H2)), start=1):
        private, _ = keys[i - 1]
        _, peer_public = keys[2 - i]
        other = 3 - i
        # Port 51830: the lab's agents take gateway clients on 51820. One name per host:
        # the control socket, /run/wireguard/NAME.sock, is not per
        # network namespace.
        dev = f"wgb{i}"
        remove_stale_socket(dev)
        pids.append(bg.start(ns(netns, "env", "WG_PROCESS_FOREGROUND=1", wireguard_go,
                                dev)).pid)
        deadline = time.time() + 5
        while not os.path.exists(f"/var/run/wireguard/{dev}.sock"):
            if time.time() > deadline:
                raise RuntimeError(f"wireguard-go made no device: {bg.failure()}")
            time.sleep(0.1)
        key_file = os.path.join(tmp, f"wg{i}.key")
        with open(key_file, "w") as f:
            f.write(private)
        run(ns(netns, "wg", "set", dev, "listen-port", "51830", "private-key", key_file,
               "peer", peer_public, "endpoint", f"198.18.{OCTET}.{other}:51830",
               "allowed-ips", f"10.97.0.{other}/32"))
        run(["ip", "-n", netns, "addr", "add", f"10.97.0.{i}/24", "dev", dev])
        run(["ip", "-n", netns, "link", "set", dev, "mtu", "1420", "up"])
    iperf_server(bg, NS1)
    return measure("wireguard-go", ns(NS2), "10.97.0.1", duration, pids)


def remove_stale_socket(dev):
    """A killed wireguard-go leaves its control socket, which `wg` would try first."""
    try:
        os.remove(f"/var/run/wireguard/{dev}.sock")
    except FileNotFoundError:
        pass


def bench_vane_gateway(vane, bg, duration, tmp):
    wireguard_go = peer("wireguard-go")
    if not wireguard_go or not shutil.which("wg"):
        return None
    vane("net", "create", "gwbench", "--subnet", "10.76.0.0/24")
    vane("run", "--net", "gwbench", "--name", "gsrv", "--host", "h1", "--ip", "10.76.0.1",
         "--", "iperf3", "-s")
    private = run(["wg", "genkey"]).strip()
    public = run(["wg", "pubkey"], input=private).strip()
    config = vane("gateway", "add", "gclient", "--net", "gwbench", "--host", "h1",
                  "--public-key", public)
    value = {}
    for line in config.splitlines():
        key, sep, val = line.partition("=")
        if sep:
            value[key.strip()] = val.strip()
    dev = "wgbgw"
    remove_stale_socket(dev)
    client = bg.start(ns(NS2, "env", "WG_PROCESS_FOREGROUND=1", wireguard_go, dev))
    deadline = time.time() + 5
    while not os.path.exists(f"/var/run/wireguard/{dev}.sock"):
        if time.time() > deadline:
            raise RuntimeError(f"wireguard-go made no device: {bg.failure()}")
        time.sleep(0.1)
    key_file = os.path.join(tmp, "wg-gateway.key")
    with open(key_file, "w") as f:
        f.write(private)
    run(ns(NS2, "wg", "set", dev, "private-key", key_file, "peer", value["PublicKey"],
           "endpoint", value["Endpoint"], "allowed-ips", "10.76.0.0/24",
           "persistent-keepalive", "25"))
    run(["ip", "-n", NS2, "addr", "add", value["Address"], "dev", dev])
    run(["ip", "-n", NS2, "link", "set", dev, "mtu", value.get("MTU", "1420"), "up"])
    run(["ip", "-n", NS2, "route", "add", "10.76.0.0/24", "dev", dev])
    try:
        return measure("vane-gateway", ns(NS2), "10.76.0.1", duration,
                       [*vane.agent_pids(), client.pid])
    finally:
        vane("gateway", "rm", "gclient", check=False)


COLUMNS = [
    ("tcp1_gbits", "TCP 1 Gbit/s", "{:.2f}"),
    ("tcp4_gbits", "TCP 4 Gbit/s", "{:.2f}"),
    ("udp64_kpps", "UDP64 kpps", "{:.0f}"),
    ("rtt_p50_us", "RTT p50 us", "{:.0f}"),
    ("rtt_p99_us", "RTT p99 us", "{:.0f}"),
    ("daemon_cpu_s", "CPU s", "{:.1f}"),
    ("daemon_peak_rss_mib", "RSS MiB", "{:.1f}"),
]


def table(results):
    base = results.get(BASELINE, {})
    header = ["path"] + [c[1] for c in COLUMNS]
    rows = [header]
    for path, r in results.items():
        if r is None or "error" in r:
            rows.append([path, (r or {}).get("error", "not installed")])
            continue
        row = [path]
        for key, _, fmt in COLUMNS:
            if key not in r:
                row.append("-")
                continue
            cell = fmt.format(r[key])
            if key in base and base[key] and not key.startswith("daemon_"):
                cell += f" ({r[key] / base[key]:.2f}x)"
            row.append(cell)
        rows.append(row)
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]
    lines = []
    for r in rows:
        if len(r) == 2 and len(header) > 2:
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per iperf3 test")
    ap.add_argument("--paths", default=",".join(ALL_PATHS),
                    help=f"comma-separated subset of {','.join(ALL_PATHS)}")
    ap.add_argument("--vane", default=os.path.join(ROOT, "target", "release", "vane"),
                    help="the vane binary (default: the release build)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/overlay.py: run as root (it builds network namespaces)")
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in ALL_PATHS]
    if unknown:
        sys.exit(f"bench/overlay.py: unknown path {unknown[0]!r} (known: {', '.join(ALL_PATHS)})")
    if not os.access(args.vane, os.X_OK):
        sys.exit(f"bench/overlay.py: no vane binary at {args.vane} (cargo build --release)")
    vane = Vane(args.vane)
    results = {}
    bg = Background()
    tmp = tempfile.mkdtemp(prefix="vane-bench-")
    try:
        # Every path but vane-plaintext runs over the encrypted lab's hosts.
        vane.lab_up(plaintext=False)
        for path in [p for p in paths if p != "vane-plaintext"]:
            try:
                if path == "veth":
                    results[path] = bench_veth(bg, args.duration)
                elif path == "kernel-vxlan":
                    results[path] = bench_vxlan(bg, args.duration)
                elif path == "vane":
                    results[path] = bench_vane(vane, path, args.duration)
                elif path == "nebula":
                    results[path] = bench_nebula(bg, args.duration, tmp)
                elif path == "wireguard-go":
                    results[path] = bench_wireguard_go(bg, args.duration, tmp)
                elif path == "vane-gateway":
                    results[path] = bench_vane_gateway(vane, bg, args.duration, tmp)
            except RuntimeError as e:
                log(f"{path}: {e}")
                results[path] = {"error": str(e)}
            finally:
                bg.stop()
        if "vane-plaintext" in paths:
            vane.lab_up(plaintext=True)
            try:
                results["vane-plaintext"] = bench_vane(vane, "vane-plaintext", args.duration)
            except RuntimeError as e:
                log(f"vane-plaintext: {e}")
                results["vane-plaintext"] = {"error": str(e)}
    finally:
        bg.stop()
        vane.lab_down()
        shutil.rmtree(tmp, ignore_errors=True)
        for dev in ("wgb1", "wgb2", "wgbgw"):
            remove_stale_socket(dev)

    ordered = {p: results.get(p) for p in paths}
    for name in ("wireguard-go", "nebula"):
        log(f"{name}: {peer_version(name)}")
    print(table(ordered))
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "when": stamp,
        "duration_s": args.duration,
        "baseline": BASELINE,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "vane_commit": run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                           check=False).strip(),
        "peers": {name: peer_version(name) for name in ("wireguard-go", "nebula")},
        "results": ordered,
    }
    for name in (f"overlay-{stamp}.json", "overlay-latest.json"):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    log(f"results written to {args.out}/overlay-{stamp}.json")


if __name__ == "__main__":
    main()
