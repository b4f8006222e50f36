#!/usr/bin/env python3
"""Control-plane scale, measured (bench/control.sh runs this after building vane).

For each store: a real controller on 127.0.0.1 (a temporary data directory; for etcd a real
etcd on free ports in a temporary directory), AGENTS simulated hosts (`vane
__simulate-agents`: real control-stream clients, enrolled with a real reusable join token),
NETS nets and INSTANCES instances spread over the hosts through the API, then PROBES
members added one at a time and PROBES/2 moved (removed, then run again under the same
name on another host of the same net: the simulated hosts cannot checkpoint, so this is
not a live migration). Convergence is the time from the API request until the last
simulated host that got the member in a view first had it there (one machine, one clock).
Every host of a net has instances in that net only, so the hosts that need a member are
its net's hosts.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout):
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            sys.exit(f"control bench: {what} did not happen within {timeout} s")
        time.sleep(0.05)


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Api:
    """The controller's API with the admin credential, one kept-alive connection a thread."""

    def __init__(self, port, ca, token):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=ca)
        self.token = token
        self.local = threading.local()

    def call(self, method, path, body=None):
        for attempt in range(3):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=120)
                self.local.conn = conn
            try:
                data = json.dumps(body) if body is not None else None
                conn.request(method, path, body=data, headers={
                    "Authorization": f"Bearer {self.token}",
                    "Content-Type": "application/json",
                })
                resp = conn.getresponse()
                text = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                continue
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {text[:300]!r}")
            return json.loads(text) if text else None


def proc_stats(pid):
    """CPU seconds (user + system), peak and current RSS in KiB of process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tck
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return cpu, hwm, rss


def percentile(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


def run(args, store, agents, instances, log):
    tmp = tempfile.mkdtemp(prefix="vane-control-bench-")
    procs = []

    def start(cmd, name):
        out = open(os.path.join(tmp, name + ".log"), "w")
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        store_arg = "embedded"
        if store == "etcd":
            client, peer = free_port(), free_port()
            start(["etcd", "--name", "bench", "--data-dir", os.path.join(tmp, "etcd"),
                   "--listen-client-urls", f"http://127.0.0.1:{client}",
                   "--advertise-client-urls", f"http://127.0.0.1:{client}",
                   "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                   "--initial-cluster", f"bench=http://127.0.0.1:{peer}"], "etcd")
            wait_for("etcd listening", lambda: listening(client), 30)
            store_arg = f"etcd://127.0.0.1:{client}/vane-bench"
        port = free_port()
        data = os.path.join(tmp, "controller")
        env = dict(os.environ, VANE_LOG=os.environ.get("VANE_LOG", "warn"))
        ctl = subprocess.Popen([args.vane, "controller", "--listen", f"127.0.0.1:{port}",
                                "--data-dir", data, "--store", store_arg],
                               stdout=open(os.path.join(tmp, "controller.log"), "w"),
                               stderr=subprocess.STDOUT, env=env)
        procs.append(ctl)
        wait_for("controller listening", lambda: listening(port), 60)
        ca = os.path.join(data, "ca.crt")
        with open(os.path.join(data, "admin.token")) as f:
            api = Api(port, ca, f.read().strip())
        token = api.call("POST", "/v1/hosts/tokens", {"ttl_secs": 86400, "reusable": True})["token"]

        report = os.path.join(tmp, "report.json")
        ready = os.path.join(tmp, "ready")
        t = time.time()
        sim = subprocess.Popen([args.vane, "--controller", f"https://127.0.0.1:{port}",
                                "__simulate-agents", "--agents", str(agents), "--join", token,
                                "--report", report, "--ready", ready],
                               stdout=open(os.path.join(tmp, "simulator.log"), "w"),
                               stderr=subprocess.STDOUT, env=env)
        procs.append(sim)
        wait_for("every simulated host connected", lambda: os.path.exists(ready) or sim.poll() is not None, 1800)
        if sim.poll() is not None:
            sys.exit(f"control bench: the simulator stopped, see {tmp}/simulator.log")
        log(f"  {agents} simulated hosts enrolled and connected in {time.time() - t:.1f} s")

        nets = min(args.nets, agents)
        for k in range(nets):
            api.call("POST", "/v1/nets", {"name": f"n{k}", "subnet": f"10.{k // 16}.{(k % 16) * 16}.0/20"})

        def host_of(j):
            return j % agents

        def create(j):
            h = host_of(j)
            api.call("POST", "/v1/instances", {"name": f"i{j}", "net": f"n{h % nets}",
                                                "host": f"sim{h + 1}", "cmd": ["sleep", "infinity"]})

        t = time.time()
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(create, range(instances)))
        setup = time.time() - t
        log(f"  {nets} nets, {instances} instances created in {setup:.1f} s ({instances / setup:.0f}/s)")
        time.sleep(2)
        cpu0, _, _ = proc_stats(ctl.pid)

        # The probes: each on a host of its net, so the hosts that need it are that net's.
        probes = []
        for p in range(args.probes):
            h = (p * 7919) % agents
            name = f"p{p}"
            t0 = time.time() * 1000
            api.call("POST", "/v1/instances", {"name": name, "net": f"n{h % nets}",
                                                "host": f"sim{h + 1}", "cmd": ["sleep", "infinity"]})
            probes.append(("add", f"{name}@sim{h + 1}", t0, time.time() * 1000 - t0))
            time.sleep(args.gap)
        moves = 0
        for p in range(args.probes // 2):
            h = (p * 7919) % agents
            # Another host of the same net (host h has instances in net h % nets only).
            to = h + nets if h + nets < agents else h % nets
            if to == h:
                continue
            name = f"p{p}"
            t0 = time.time() * 1000
            api.call("DELETE", f"/v1/instances/{name}")
            api.call("POST", "/v1/instances", {"name": name, "net": f"n{h % nets}",
                                                "host": f"sim{to + 1}", "cmd": ["sleep", "infinity"]})
            probes.append(("move", f"{name}@sim{to + 1}", t0, time.time() * 1000 - t0))
            moves += 1
            time.sleep(args.gap)
        time.sleep(3)
        cpu1, hwm, rss = proc_stats(ctl.pid)
        if os.path.exists(report):
            os.unlink(report)
        sim.send_signal(signal.SIGUSR1)
        wait_for("the simulator's report", lambda: os.path.exists(report), 60)
        with open(report) as f:
            rep = json.load(f)

        lat = {"add": [], "move": []}
        api_ms = [p[3] for p in probes]
        missing = 0
        for kind, key, t0, _ in probes:
            seen = rep["members"].get(key)
            if seen is None:
                missing += 1
                continue
            lat[kind].append(seen["last_first_seen_ms"] - t0)
        every = lat["add"] + lat["move"]
        cpu_total, _, _ = proc_stats(ctl.pid)
        log(f"  probes: {len(lat['add'])} added, {len(lat['move'])} moved (remove + run on another host), "
            f"{missing} never seen")
        log(f"  API requests of the probes (answered once the host has the instance): p50 "
            f"{percentile(api_ms, 50):.0f} ms  p99 {percentile(api_ms, 99):.0f} ms  max {max(api_ms):.0f} ms")
        if os.environ.get("CONTROL_BENCH_DEBUG"):
            for kind, key, t0, api in probes:
                seen = rep["members"].get(key)
                if seen:
                    log(f"    {kind} {key} api {api:.0f} ms seen {seen['last_first_seen_ms'] - t0:.0f} ms by {seen['hosts']}")
        for kind in ("add", "move"):
            if lat[kind]:
                log(f"  {kind:5} p50 {percentile(lat[kind], 50):.0f} ms  p99 {percentile(lat[kind], 99):.0f} ms  "
                    f"max {max(lat[kind]):.0f} ms")
        log(f"  controller: CPU {cpu_total:.1f} s in all ({cpu_total / agents * 1000:.1f} ms per agent), "
            f"{cpu1 - cpu0:.2f} s for the {len(probes)} probes; peak RSS {hwm / 1024:.1f} MiB "
            f"({hwm / agents:.1f} KiB per agent), RSS now {rss / 1024:.1f} MiB")
        log(f"  views: {rep['views']} received, {rep['view_bytes_total'] / 1e6:.1f} MB in all; "
            f"last view per agent mean {rep['last_view_bytes_mean'] / 1024:.1f} KiB, "
            f"max {rep['last_view_bytes_max'] / 1024:.1f} KiB; simulator reconnections "
            f"{rep['connections'] - agents}")
        result = {
            "store": store, "agents": agents, "instances": instances, "nets": nets,
            "probes_added": len(lat["add"]), "probes_moved": len(lat["move"]), "never_seen": missing,
            "p50_ms": percentile(every, 50), "p99_ms": percentile(every, 99),
            "add_p50_ms": percentile(lat["add"], 50), "add_p99_ms": percentile(lat["add"], 99),
            "move_p50_ms": percentile(lat["move"], 50), "move_p99_ms": percentile(lat["move"], 99),
            "setup_s": setup, "controller_cpu_s": cpu_total, "controller_cpu_probes_s": cpu1 - cpu0,
            "controller_peak_rss_kib": hwm, "controller_rss_kib": rss,
            "views": rep["views"], "view_bytes_total": rep["view_bytes_total"],
            "view_bytes_mean": rep["last_view_bytes_mean"], "view_bytes_max": rep["last_view_bytes_max"],
        }
        return result, f"convergence p50 {result['p50_ms']:.0f} ms p99 {result['p99_ms']:.0f} ms agents {agents} instances {instances} store {store}"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        if args.keep:
            print(f"  (kept {tmp})", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", tmp])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vane", required=True)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=10000)
    ap.add_argument("--store", choices=["embedded", "etcd"], action="append")
    ap.add_argument("--nets", type=int, default=100)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=8, help="API requests at once while setting up")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between probes")
    ap.add_argument("--no-quarter", action="store_true", help="skip the run at a quarter of the size")
    ap.add_argument("--results", help="write the results (JSON) here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = ap.parse_args()
    stores = args.store or ["embedded", "etcd"]
    sizes = [(args.agents, args.instances)]
    if not args.no_quarter and args.agents >= 8:
        sizes.insert(0, (args.agents // 4, args.instances // 4))
    results, lines = [], []
    for store in stores:
        for agents, instances in sizes:
            print(f"store {store}, {agents} agents, {instances} instances", flush=True)
            r, line = run(args, store, agents, instances, lambda s: print(s, flush=True))
            results.append(r)
            print(line, flush=True)
            lines.append(line)
    if len(sizes) == 2:
        print("growth (full size against a quarter of it):")
        for store in stores:
            q, f = [r for r in results if r["store"] == store]
            print(f"  {store}: peak RSS x{f['controller_peak_rss_kib'] / q['controller_peak_rss_kib']:.2f}, "
                  f"CPU x{f['controller_cpu_s'] / max(q['controller_cpu_s'], 0.01):.2f}, "
                  f"view bytes per agent x{f['view_bytes_mean'] / max(q['view_bytes_mean'], 1):.2f} "
                  f"for x{f['agents'] / q['agents']:.0f} agents and x{f['instances'] / q['instances']:.0f} instances")
    if args.results:
        with open(args.results, "w") as f:
            json.dump(results, f, indent=1)
    # The last line: the last store's, at the full size.
    full = [line for line, r in zip(lines, results) if r["agents"] == args.agents]
    print(full[-1])


if __name__ == "__main__":
    main()
