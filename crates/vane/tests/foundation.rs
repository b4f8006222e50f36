//! Instances with virtual identities on one host, the controller, the agent and the lab,
//! tried for real: root, network namespaces, TUN devices, nftables.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for_http, wait_until, TestLab, UDP_SINK};

const WEB: &[&str] = &["python3", "-m", "http.server", "80"];

fn run(lab: &TestLab, net: &str, name: &str, ip: Option<&str>, cmd: &[&str]) {
    let mut args = vec!["run", "--net", net, "--name", name];
    if let Some(ip) = ip {
        args.extend(["--ip", ip]);
    }
    args.push("--");
    args.extend(cmd);
    assert_eq!(lab.ok(&args).trim(), name);
}

/// A web server serving one file with `content`, in its own directory.
fn file_server(content: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "d=$(mktemp -d) && echo {content} > $d/index.html && cd $d && exec python3 -m http.server 80"
        ),
    ]
}

#[test]
fn the_demo_flow_works_end_to_end() {
    let lab = TestLab::up(1);
    lab.ok(&[
        "net",
        "create",
        "red",
        "--subnet",
        "10.10.2.0/24",
        "--tenant",
        "a",
    ]);
    lab.ok(&[
        "net",
        "create",
        "blue",
        "--subnet",
        "10.10.2.0/24",
        "--tenant",
        "b",
    ]);
    lab.ok(&["net", "create", "green", "--subnet", "10.20.0.0/24"]);
    run(&lab, "red", "web1", Some("10.10.2.1"), WEB);
    run(&lab, "red", "cli1", None, &["sleep", "infinity"]);
    assert_eq!(lab.inspect("cli1")["ip"], "10.10.2.2");

    // Same net: by name, through the switch.
    let listing = wait_for_http(&lab, "cli1", "http://web1/");
    assert!(listing.contains("Directory listing"), "{listing}");
    assert_eq!(lab.ok(&["exec", "cli1", "--", "hostname"]).trim(), "cli1");
    let hosts = lab.ok(&["exec", "cli1", "--", "getent", "hosts", "web1"]);
    assert!(hosts.starts_with("10.10.2.1"), "{hosts}");

    // Another net, no policy: refused at once with a permission error.
    run(&lab, "green", "g1", None, &["sleep", "infinity"]);
    let start = Instant::now();
    let out = lab.run(&["exec", "g1", "--", "python3", "-c", CONNECT_RED]);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("PermissionError"), "{said}");

    // Same addresses in another tenant's net: each sees only its own.
    let blue_server = file_server("blue-secret");
    let blue_server: Vec<&str> = blue_server.iter().map(String::as_str).collect();
    run(&lab, "blue", "bweb", Some("10.10.2.1"), &blue_server);
    run(
        &lab,
        "blue",
        "bcli",
        Some("10.10.2.2"),
        &["sleep", "infinity"],
    );
    assert_eq!(
        wait_for_http(&lab, "bcli", "http://10.10.2.1/index.html").trim(),
        "blue-secret"
    );
    for _ in 0..3 {
        let red = wait_for_http(&lab, "cli1", "http://10.10.2.1/");
        assert!(!red.contains("blue-secret"), "red reached blue: {red}");
    }

    // A policy opens green -> red on port 80 only, and not red -> green.
    lab.ok(&["policy", "allow", "green", "red", "--port", "80/tcp"]);
    let listing = wait_for_http(&lab, "g1", "http://10.10.2.1/");
    assert!(listing.contains("Directory listing"), "{listing}");
    assert!(!listing.contains("blue-secret"));
    let out = lab.run(&[
        "exec",
        "g1",
        "--",
        "curl",
        "-s",
        "-m",
        "2",
        "http://10.10.2.1:81/",
    ]);
    assert!(!out.status.success());
    run(&lab, "green", "g2", None, WEB);
    let out = lab.run(&[
        "exec",
        "web1",
        "--",
        "curl",
        "-s",
        "-m",
        "2",
        "http://10.20.0.2/",
    ]);
    assert!(!out.status.success(), "red opened a connection to green");

    // The policy gone, green is refused again.
    lab.ok(&["policy", "rm", "green", "red"]);
    let out = lab.run(&["exec", "g1", "--", "python3", "-c", CONNECT_RED]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PermissionError"));
}

const CONNECT_RED: &str = "
import socket
s = socket.socket()
s.settimeout(5)
try:
    s.connect(('10.10.2.1', 80))
    print('connected')
except OSError as e:
    print(type(e).__name__, e)
";

#[test]
fn the_switch_drops_what_rules_inside_would_have_refused() {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    lab.ok(&["net", "create", "green", "--subnet", "10.20.0.0/24"]);
    run(
        &lab,
        "red",
        "sink",
        Some("10.10.2.1"),
        &["python3", "-c", UDP_SINK],
    );
    run(
        &lab,
        "red",
        "peer",
        Some("10.10.2.3"),
        &["sleep", "infinity"],
    );
    run(&lab, "green", "tame", None, &["sleep", "infinity"]);
    // Root inside holds no NET_ADMIN by default: the rules stay.
    let refused = lab.fails(&["exec", "tame", "--", "nft", "flush", "ruleset"]);
    assert!(refused.contains("Operation not permitted"), "{refused}");
    // Given NET_ADMIN, a root program inside removes the friendly rules and routes...
    assert_eq!(
        lab.ok(&[
            "run",
            "--net",
            "green",
            "--name",
            "rogue",
            "--cap-add",
            "NET_ADMIN",
            "--",
            "sleep",
            "infinity",
        ])
        .trim(),
        "rogue"
    );
    lab.ok(&["exec", "rogue", "--", "nft", "flush", "ruleset"]);
    lab.ok(&[
        "exec",
        "rogue",
        "--",
        "ip",
        "route",
        "replace",
        "10.10.2.0/24",
        "dev",
        "vane0",
    ]);
    lab.ok(&[
        "exec",
        "rogue",
        "--",
        "python3",
        "-c",
        &send_udp("10.10.2.1", 20),
    ]);
    // ...and forges its source address inside its own net.
    lab.ok(&["exec", "peer", "--", "python3", "-c", SPOOF]);
    // A packet from the right source on the same net does arrive, so the sink listens.
    lab.ok(&[
        "exec",
        "peer",
        "--",
        "python3",
        "-c",
        &send_udp("10.10.2.1", 1),
    ]);
    assert!(wait_until(Duration::from_secs(5), || {
        lab.ok(&["logs", "sink"]).contains("from 10.10.2.3")
    }));
    let logs = lab.ok(&["logs", "sink"]);
    assert!(
        !logs.contains("10.20.0"),
        "cross-net packet arrived: {logs}"
    );
    assert!(
        !logs.contains("10.10.2.99"),
        "spoofed packet arrived: {logs}"
    );
    let rogue: serde_json::Value =
        serde_json::from_str(&lab.ok(&["stats", "rogue", "-o", "json"])).unwrap();
    assert!(rogue["port"]["refused"].as_u64().unwrap() >= 20, "{rogue}");
    let peer: serde_json::Value =
        serde_json::from_str(&lab.ok(&["stats", "peer", "-o", "json"])).unwrap();
    assert!(peer["port"]["spoofed"].as_u64().unwrap() >= 1, "{peer}");
}

fn send_udp(to: &str, count: u32) -> String {
    format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range({count}): s.sendto(b'x', ('{to}', 9999))\n"
    )
}

/// Sends a UDP datagram with a forged source address (10.10.2.99) through a raw socket.
const SPOOF: &str = "
import socket, struct
src, dst = socket.inet_aton('10.10.2.99'), socket.inet_aton('10.10.2.1')
udp = struct.pack('!HHHH', 4444, 9999, 9, 0) + b'x'
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(5):
    s.sendto(ip + udp, ('10.10.2.1', 0))
";

#[test]
fn bad_input_gets_one_clear_line_and_leaves_nothing() {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    run(
        &lab,
        "red",
        "web1",
        Some("10.10.2.1"),
        &["sleep", "infinity"],
    );
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--net", "nope", "--", "true"],
            "unknown net \"nope\"",
        ),
        (&["inspect", "ghost"], "unknown instance \"ghost\""),
        (
            &["net", "create", "x", "--subnet", "10.1.2.300/24"],
            "invalid value",
        ),
        (
            &["net", "create", "x", "--subnet", "10.1.2.1/24"],
            "host bits",
        ),
        (
            &["net", "create", "x", "--subnet", "192.168.1.0/24"],
            "outside the global",
        ),
        (
            &["net", "create", "red", "--subnet", "10.11.0.0/24"],
            "already exists",
        ),
        (
            &["run", "--net", "red", "--ip", "10.10.3.1", "--", "true"],
            "outside net",
        ),
        (
            &["run", "--net", "red", "--ip", "10.10.2.1", "--", "true"],
            "already in use",
        ),
        (
            &["run", "--net", "red", "--name", "web1", "--", "true"],
            "already exists",
        ),
        (
            &["run", "--net", "red", "--host", "h9", "--", "true"],
            "unknown host",
        ),
        (
            &["run", "--net", "red", "--name", "Bad_Name", "--", "true"],
            "invalid instance name",
        ),
        (
            &["run", "--net", "red", "--", "no-such-program-x"],
            "program not found: no-such-program-x",
        ),
        (&["net", "rm", "red"], "used by instances: web1"),
        (&["policy", "allow", "red", "nope"], "unknown net"),
        (&["exec", "ghost", "--", "true"], "unknown instance"),
    ];
    for (args, expected) in cases {
        let err = lab.fails(args);
        assert!(
            err.contains(expected),
            "vane {}: expected {expected:?}, got {err:?}",
            args.join(" ")
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "more than one line: {err:?}"
        );
    }
    // The failed runs left no instance, namespace or state behind.
    let ps: Vec<serde_json::Value> = serde_json::from_str(&lab.ok(&["ps", "-o", "json"])).unwrap();
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_no_orphan_namespaces();
    let instances = std::fs::read_dir(format!("{}/hosts/h1/instances", lab.state_dir()))
        .unwrap()
        .count();
    assert_eq!(instances, 1);

    // Controller unreachable.
    let out = std::process::Command::new(common::vane_bin())
        .args(["net", "ls"])
        .env("VANE_CONTROLLER", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the controller at https://127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);
}

#[test]
fn instances_have_their_own_spaces_and_exec_logs_stop_rm_work() {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    run(
        &lab,
        "red",
        "app",
        None,
        &[
            "sh",
            "-c",
            "echo started as $HOSTNAME; echo oops >&2; exec sleep infinity",
        ],
    );
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "named",
        "--hostname",
        "db.internal",
        "--env",
        "MODE=test",
        "--",
        "sleep",
        "infinity",
    ]);
    // Children inherit the identity.
    assert_eq!(
        lab.ok(&[
            "exec",
            "named",
            "--",
            "sh",
            "-c",
            "sh -c hostname; echo $MODE"
        ]),
        "db.internal\ntest\n"
    );
    // Own PID namespace: the instance sees only its own processes.
    let pids = lab.ok(&[
        "exec",
        "app",
        "--",
        "sh",
        "-c",
        "ls /proc | grep -E '^[0-9]+$'",
    ]);
    assert!(pids.lines().count() <= 5, "{pids}");
    assert!(pids.lines().any(|p| p == "1"));
    // Own network namespace: one TUN device with the virtual IP.
    let addrs = lab.ok(&["exec", "app", "--", "ip", "-4", "-o", "addr"]);
    assert!(
        addrs.contains("vane0") && addrs.contains("10.10.2.1/32"),
        "{addrs}"
    );
    // Exec streams both outputs and passes the exit code on.
    let out = lab.run(&[
        "exec",
        "app",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let out = lab.run(&["exec", "app", "--", "no-such-program-y"]);
    assert_eq!(out.status.code(), Some(127));
    // Logs hold stdout and stderr.
    assert!(wait_until(Duration::from_secs(5), || lab
        .ok(&["logs", "app"])
        .contains("oops")));
    assert!(lab.ok(&["logs", "app"]).contains("started as app"));
    // Inspect, stop, rm.
    let info = lab.inspect("app");
    assert_eq!(info["state"], "running");
    assert_eq!(info["host"], "h1");
    let pid = info["pid"].as_u64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    lab.ok(&["stop", "app"]);
    let info = lab.inspect("app");
    assert_eq!(info["state"], "exited");
    assert!(
        info["exit"]["signal"].as_i64() == Some(15) || info["exit"]["code"].is_number(),
        "{info}"
    );
    lab.ok(&["rm", "app"]);
    assert!(lab.fails(&["inspect", "app"]).contains("unknown instance"));
    // A program that ends by itself is reported with its code.
    run(&lab, "red", "short", None, &["sh", "-c", "exit 7"]);
    assert!(wait_until(Duration::from_secs(5), || lab.inspect("short")
        ["state"]
        == "exited"));
    assert_eq!(lab.inspect("short")["exit"]["code"], 7);
}

#[test]
fn instances_survive_agent_and_controller_restarts() {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    lab.ok(&["net", "create", "green", "--subnet", "10.20.0.0/24"]);
    lab.ok(&["policy", "allow", "green", "red", "--port", "80/tcp"]);
    run(&lab, "red", "web1", Some("10.10.2.1"), WEB);
    run(&lab, "red", "cli1", None, &["sleep", "infinity"]);
    wait_for_http(&lab, "cli1", "http://web1/");
    let pid = lab.inspect("web1")["pid"].clone();
    // A TCP conversation that goes on while the agent is away.
    run(
        &lab,
        "red",
        "echo",
        Some("10.10.2.7"),
        &["python3", "-c", ECHO_SERVER],
    );
    run(&lab, "red", "talker", None, &["python3", "-c", TALKER]);
    assert!(wait_until(Duration::from_secs(10), || lab
        .ok(&["logs", "talker"])
        .contains("connected")));

    lab.kill("h1");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "instance died with the agent"
    );
    lab.restart();
    wait_for_http(&lab, "cli1", "http://web1/");
    assert_eq!(lab.inspect("web1")["pid"], pid);
    assert_eq!(lab.inspect("web1")["state"], "running");

    lab.kill("controller");
    lab.restart();
    let nets = lab.ok(&["net", "ls"]);
    assert!(nets.contains("red") && nets.contains("green"), "{nets}");
    assert!(lab.ok(&["policy", "ls"]).contains("80/tcp"));
    assert!(wait_until(Duration::from_secs(10), || lab.inspect("web1")
        ["state"]
        == "running"));
    wait_for_http(&lab, "cli1", "http://web1/");
    // The instance still exits cleanly under the restarted agent.
    lab.ok(&["stop", "cli1"]);
    assert_eq!(lab.inspect("cli1")["state"], "exited");
    // The conversation survived both restarts: every echo came back, in order.
    assert!(wait_until(Duration::from_secs(30), || lab
        .inspect("talker")["state"]
        == "exited"));
    let said = lab.ok(&["logs", "talker"]);
    assert!(said.contains("all 100 echoes"), "{said}");
    assert_eq!(lab.inspect("talker")["exit"]["code"], 0);
}

const ECHO_SERVER: &str = "
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 7000))
s.listen()
while True:
    c, _ = s.accept()
    while True:
        data = c.recv(4096)
        if not data:
            break
        c.sendall(data)
";

const TALKER: &str = "
import socket, time
c = socket.create_connection(('10.10.2.7', 7000), timeout=30)
print('connected', flush=True)
for i in range(100):
    msg = b'%08d' % i
    c.sendall(msg)
    got = b''
    while len(got) < len(msg):
        got += c.recv(len(msg) - len(got))
    assert got == msg, (got, msg)
    time.sleep(0.1)
print('all 100 echoes', flush=True)
";

#[test]
fn egress_goes_out_through_the_host_only_when_enabled() {
    let lab = TestLab::up(1);
    lab.ok(&[
        "net",
        "create",
        "out",
        "--subnet",
        "10.30.0.0/24",
        "--egress",
    ]);
    lab.ok(&["net", "create", "closed", "--subnet", "10.31.0.0/24"]);
    // A server outside the global space: on the lab's bridge, in the root namespace.
    let mut server = std::process::Command::new("python3")
        .args(["-m", "http.server", "18080", "--bind", &lab.gateway()])
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{}:18080/", lab.gateway());
    run(&lab, "out", "o1", None, &["sleep", "infinity"]);
    run(&lab, "closed", "c1", None, &["sleep", "infinity"]);
    let reached = wait_until(Duration::from_secs(10), || {
        lab.run(&["exec", "o1", "--", "curl", "-sf", "-m", "2", &url])
            .status
            .success()
    });
    let out = lab.run(&["exec", "c1", "--", "curl", "-sS", "-m", "2", &url]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(reached, "egress net could not reach {url}");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Couldn't connect") || err.contains("Permission"),
        "{err}"
    );
}

#[test]
fn lab_up_twice_is_harmless_and_down_removes_everything() {
    let lab = TestLab::up(2);
    lab.restart();
    let hosts = lab.ok(&["host", "ls"]);
    assert_eq!(hosts.matches("online").count(), 2, "{hosts}");
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    run(&lab, "red", "a", None, &["sleep", "infinity"]);
    let id = lab.inspect("a")["id"].as_str().unwrap().to_string();
    let pids: Vec<i32> = ["controller", "h1", "h2"]
        .iter()
        .map(|w| lab.pid_of(w))
        .collect();
    let program = lab.inspect("a")["pid"].as_u64().unwrap();
    let name = lab.name.clone();
    drop(lab);
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !netns.iter().any(|n| n.contains(&name) || n.contains(&id)),
        "{netns:?}"
    );
    assert!(!std::path::Path::new(&format!("/sys/class/net/vb-{name}")).exists());
    assert!(!std::path::Path::new(&format!("/var/lib/vane/labs/{name}")).exists());
    for pid in pids.iter().map(|p| *p as u64).chain([program]) {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false);
        assert!(!alive, "process {pid} survived lab down");
    }
}

/// Every instance namespace on the machine belongs to an instance some agent knows of (its
/// state directory exists), whatever other tests run meanwhile: agents create the directory
/// before the namespace and remove it after.
fn assert_no_orphan_namespaces() {
    let mut known = std::collections::HashSet::new();
    for lab in std::fs::read_dir("/var/lib/vane/labs").unwrap().flatten() {
        for host in std::fs::read_dir(lab.path().join("hosts"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for inst in std::fs::read_dir(host.path().join("instances"))
                .into_iter()
                .flatten()
                .flatten()
            {
                known.insert(format!("vane-{}", inst.file_name().to_string_lossy()));
            }
        }
    }
    for ns in std::fs::read_dir("/run/netns").unwrap().flatten() {
        let name = ns.file_name().to_string_lossy().into_owned();
        let is_instance = name.len() == 21 && name.starts_with("vane-");
        if is_instance && !known.contains(&name) {
            // It may be being torn down right now; look again.
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                !ns.path().exists(),
                "namespace {name} belongs to no instance"
            );
        }
    }
}
