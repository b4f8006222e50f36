//! Nets across hosts, tried for real on namespace hosts: the directory, the encrypted
//! tunnels between switches, virtual endpoints that are rebuilt under live connections, and
//! what happens when an agent, the controller or a host's underlay address goes away.

mod common;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{wait_for_http, wait_until, TestLab};

/// Runs `cmd` as instance `name` of `net` on `host`.
fn run_on(lab: &TestLab, host: &str, net: &str, name: &str, ip: Option<&str>, cmd: &[&str]) {
    let mut args = vec!["run", "--net", net, "--name", name, "--host", host];
    if let Some(ip) = ip {
        args.extend(["--ip", ip]);
    }
    args.push("--");
    args.extend(cmd);
    assert_eq!(lab.ok(&args).trim(), name);
}

/// A web server serving one file with `content`.
fn file_server(content: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "d=$(mktemp -d) && echo {content} > $d/index.html && cd $d && exec python3 -m http.server 80"
        ),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Echoes every byte back, on TCP port 7000 and UDP port 7001.
const ECHO: &str = r#"
import socket, threading
def tcp(c):
    while True:
        d = c.recv(65536)
        if not d:
            return
        c.sendall(d)
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(('', 7001))
    while True:
        d, a = u.recvfrom(2048)
        print('udp', d.decode(), flush=True)
        u.sendto(d, a)
threading.Thread(target=udp, daemon=True).start()
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('', 7000))
l.listen()
while True:
    c, _ = l.accept()
    threading.Thread(target=tcp, args=(c,), daemon=True).start()
"#;

/// A TCP conversation that numbers its lines and checks every echo, without pause, until
/// the file named by argv[2] exists; exits 0 with "ok N" if nothing was lost, duplicated or
/// failed.
const TALKER: &str = r#"
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 7000), timeout=10)
s.settimeout(60)
f = s.makefile('rwb')
n = 0
while not os.path.exists(sys.argv[2]):
    n += 1
    f.write(b'%d\n' % n)
    f.flush()
    r = f.readline()
    if r != b'%d\n' % n:
        print('bad reply', n, r, flush=True)
        sys.exit(1)
    time.sleep(0.005)
print('ok', n, flush=True)
"#;

/// Starts a talker instance on `host` towards `server`; returns the file that stops it.
fn start_talker(lab: &TestLab, host: &str, net: &str, name: &str, server: &str) -> String {
    let stop = format!("{}/stop-{name}", lab.exchange_dir());
    let _ = std::fs::remove_file(&stop);
    run_on(
        lab,
        host,
        net,
        name,
        None,
        &["python3", "-c", TALKER, server, &stop],
    );
    // Wait for the conversation to be under way.
    assert!(
        wait_until(Duration::from_secs(10), || replies(lab, name) > 0
            || lab.inspect(name)["state"] != "running"),
        "talker {name} never started"
    );
    stop
}

/// How far a talker has got, from the server side's view: we cannot read its memory, so
/// count how long it has run by asking it to print nothing; instead rely on the TCP
/// counters of its switch port.
fn replies(lab: &TestLab, name: &str) -> u64 {
    let out = lab.run(&["stats", name, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["port"]["rx_packets"].as_u64().unwrap_or(0)
}

/// Lets a talker go on for a while (some fifty more lines: the conversation is live after
/// whatever happened before), then stops it and checks it finished without an error.
fn finish_talker(lab: &TestLab, name: &str, stop: &str) -> u64 {
    let before = replies(lab, name);
    assert!(
        wait_until(Duration::from_secs(10), || replies(lab, name)
            > before + 100),
        "talker {name} stalled: {}",
        lab.ok(&["logs", name])
    );
    std::fs::write(stop, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(70), || lab.inspect(name)["state"]
            == "exited"),
        "talker {name} did not end"
    );
    let logs = lab.ok(&["logs", name]);
    let inspect = lab.inspect(name);
    assert_eq!(inspect["exit"]["code"], 0, "talker {name} failed: {logs}");
    let _ = std::fs::remove_file(stop);
    logs.trim()
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("talker {name} said {logs:?}"))
}

fn host_stats(lab: &TestLab, host: &str) -> serde_json::Value {
    serde_json::from_str(&lab.ok(&["host", "stats", host, "-o", "json"])).expect("JSON")
}

fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
}

/// Captures what one lab host sends and receives on the underlay (UDP to and from the
/// switches) into a pcap file until stopped. On its veth port, not on the bridge: a bridge
/// device sees only frames for the bridge itself, not those it forwards between ports.
struct Capture {
    child: Child,
    file: String,
}

impl Capture {
    fn start(lab: &TestLab, host: u8, tag: &str) -> Capture {
        let file = format!("{}/{tag}.pcap", lab.state_dir());
        let child = Command::new("tcpdump")
            // -Z root: tcpdump would otherwise drop to its own user, who cannot write there.
            // Immediate mode: without it packets wait in the capture ring for a timeout,
            // and those still there when the capture is stopped are lost.
            .args(["-Z", "root", "--immediate-mode", "-i", &lab.veth(host)])
            .args(["-U", "-s", "0", "-w", &file])
            .args(["udp", "port", "7947"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tcpdump (scripts/install-deps.sh installs it)");
        // tcpdump says "listening on" once the capture runs.
        std::thread::sleep(Duration::from_millis(1500));
        Capture { child, file }
    }

    /// Stops the capture and returns the UDP datagrams: (source, destination, payload).
    fn stop(mut self) -> Vec<(String, String, Vec<u8>)> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let bytes = std::fs::read(&self.file).expect("capture file");
        let _ = std::fs::remove_file(&self.file);
        parse_pcap(&bytes)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The UDP datagrams of an Ethernet pcap file (IPv4 only, no options expected).
fn parse_pcap(bytes: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &bytes[at + 16..(at + 16 + caplen).min(bytes.len())];
        at += 16 + caplen;
        if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[9] != 17 || ip.len() < ihl + 8 {
            continue;
        }
        let src = format!("{}.{}.{}.{}", ip[12], ip[13], ip[14], ip[15]);
        let dst = format!("{}.{}.{}.{}", ip[16], ip[17], ip[18], ip[19]);
        out.push((src, dst, ip[ihl + 8..].to_vec()));
    }
    out
}

#[test]
fn three_hosts_two_tenants_talk_across_hosts_and_stay_apart() {
    let lab = TestLab::up(3);
    let hosts = lab.ok(&["host", "ls"]);
    for i in 1..=3 {
        assert!(
            hosts.contains(&format!("{}:7947", lab.host_addr(i))),
            "{hosts}"
        );
    }
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
    let red_page = file_server("red-page-8d1f3a");
    let blue_page = file_server("blue-page-77c2e9");
    // The same address in both nets, on different hosts, and both nets on every host.
    run_on(
        &lab,
        "h1",
        "red",
        "web1",
        Some("10.10.2.1"),
        &strs(&red_page),
    );
    run_on(
        &lab,
        "h2",
        "blue",
        "bweb",
        Some("10.10.2.1"),
        &strs(&blue_page),
    );
    run_on(
        &lab,
        "h3",
        "red",
        "cli1",
        Some("10.10.2.3"),
        &["sleep", "infinity"],
    );
    run_on(
        &lab,
        "h3",
        "blue",
        "bcli",
        Some("10.10.2.3"),
        &["sleep", "infinity"],
    );
    run_on(
        &lab,
        "h2",
        "red",
        "echo",
        Some("10.10.2.4"),
        &["python3", "-c", ECHO],
    );
    let ps = lab.ok(&["ps"]);
    assert!(ps.contains("h3"), "{ps}");

    // Every conversation below has an end on h3.
    let capture = Capture::start(&lab, 3, "plain");
    // TCP by name across hosts; each tenant gets its own server at the same address.
    for _ in 0..3 {
        let red = wait_for_http(&lab, "cli1", "http://web1/index.html");
        assert_eq!(red.trim(), "red-page-8d1f3a");
        let blue = wait_for_http(&lab, "bcli", "http://10.10.2.1/index.html");
        assert_eq!(blue.trim(), "blue-page-77c2e9");
    }
    // ICMP across hosts, and nothing in blue answers red's ping to the echo's address.
    lab.ok(&[
        "exec",
        "cli1",
        "--",
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        "10.10.2.4",
    ]);
    let out = lab.run(&[
        "exec",
        "bcli",
        "--",
        "ping",
        "-c",
        "2",
        "-W",
        "1",
        "10.10.2.4",
    ]);
    assert!(!out.status.success(), "blue reached red's echo instance");
    // UDP across hosts.
    let said = lab.ok(&[
        "exec",
        "cli1",
        "--",
        "python3",
        "-c",
        "import socket; u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3); \
         u.sendto(b'udp-hello', ('10.10.2.4', 7001)); print(u.recvfrom(100)[0].decode())",
    ]);
    assert_eq!(said.trim(), "udp-hello");
    let datagrams = capture.stop();

    // The underlay carried the traffic, and none of it in the clear.
    assert!(datagrams.len() > 10, "{} datagrams", datagrams.len());
    for (_, _, payload) in &datagrams {
        for secret in [&b"red-page"[..], b"blue-page", b"udp-hello", b"HTTP/1."] {
            assert!(
                !payload.windows(secret.len()).any(|w| w == secret),
                "{} in the clear on the underlay",
                String::from_utf8_lossy(secret)
            );
        }
    }
    let stats = host_stats(&lab, "h3");
    assert_eq!(stats["encrypted"], true);
    assert!(counter(&stats, "handshakes_completed") >= 1, "{stats}");
}

#[test]
fn a_gigabyte_crosses_hosts_intact_and_path_mtu_discovery_works() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    const SERVER: &str = r#"
import hashlib, os, socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('', 9000))
l.listen()
c, _ = l.accept()
h = hashlib.sha256()
block = bytearray(os.urandom(1 << 20))
for i in range(1024):
    block[:8] = i.to_bytes(8, 'big')
    h.update(block)
    c.sendall(block)
c.close()
print('sent', h.hexdigest(), flush=True)
"#;
    const CLIENT: &str = r#"
import hashlib, socket
s = socket.create_connection(('10.10.2.1', 9000), timeout=60)
h = hashlib.sha256()
n = 0
while True:
    d = s.recv(1 << 20)
    if not d:
        break
    h.update(d)
    n += len(d)
print('received', n, h.hexdigest())
"#;
    run_on(
        &lab,
        "h1",
        "red",
        "src",
        Some("10.10.2.1"),
        &["python3", "-c", SERVER],
    );
    // Given NET_ADMIN over its own network: it changes its MTU below.
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "dst",
        "--host",
        "h2",
        "--ip",
        "10.10.2.2",
        "--cap-add",
        "NET_ADMIN",
        "--",
        "sleep",
        "infinity",
    ]);
    assert!(wait_until(Duration::from_secs(10), || lab
        .run(&[
            "exec",
            "dst",
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "10.10.2.1"
        ])
        .status
        .success()));
    let got = lab.ok(&["exec", "dst", "--", "python3", "-c", CLIENT]);
    assert!(wait_until(Duration::from_secs(10), || lab
        .ok(&["logs", "src"])
        .contains("sent")));
    let sent = lab.ok(&["logs", "src"]);
    let sent_sum = sent.split_whitespace().nth(1).expect("digest");
    let got: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(got[1], (1u64 << 30).to_string(), "length");
    assert_eq!(got[2], sent_sum, "checksum");

    // The instance MTU fits the encapsulation: a full-size ping does not fragment.
    let mtu: usize = lab
        .ok(&["exec", "dst", "--", "cat", "/sys/class/net/vane0/mtu"])
        .trim()
        .parse()
        .unwrap();
    assert!((1400..=1500 - 60).contains(&mtu), "instance MTU {mtu}");
    let full = (mtu - 28).to_string();
    lab.ok(&[
        "exec",
        "dst",
        "--",
        "ping",
        "-c",
        "2",
        "-M",
        "do",
        "-s",
        &full,
        "-W",
        "2",
        "10.10.2.1",
    ]);
    // A root program raises its MTU past what the tunnel carries: the switch answers
    // "fragmentation needed" with the right MTU, and the sender's stack learns it.
    lab.ok(&[
        "exec", "dst", "--", "ip", "link", "set", "vane0", "mtu", "1500",
    ]);
    let out = lab.run(&[
        "exec",
        "dst",
        "--",
        "ping",
        "-c",
        "2",
        "-M",
        "do",
        "-s",
        "1472",
        "-W",
        "2",
        "10.10.2.1",
    ]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("mtu = {mtu}")) || said.contains(&format!("mtu={mtu}")),
        "{said}"
    );
    assert!(counter(&host_stats(&lab, "h2"), "frag_needed_sent") >= 1);
    // Without DF the oversized packet goes whole, fragmented by the underlay, and arrives.
    lab.ok(&[
        "exec",
        "dst",
        "--",
        "ping",
        "-c",
        "2",
        "-M",
        "dont",
        "-s",
        "1472",
        "-W",
        "2",
        "10.10.2.1",
    ]);
    // Below the learnt MTU, TCP still works both ways.
    assert!(wait_for_http_ok(&lab));
}

fn wait_for_http_ok(lab: &TestLab) -> bool {
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "web",
        "--host",
        "h1",
        "--",
        "python3",
        "-m",
        "http.server",
        "80",
    ]);
    let ip = lab.inspect("web")["ip"].as_str().unwrap().to_string();
    wait_for_http(lab, "dst", &format!("http://{ip}/")).contains("Directory listing")
}

#[test]
fn forged_and_replayed_packets_are_dropped_and_reach_no_instance() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    run_on(
        &lab,
        "h2",
        "red",
        "echo",
        Some("10.10.2.1"),
        &["python3", "-c", ECHO],
    );
    run_on(
        &lab,
        "h1",
        "red",
        "cli",
        Some("10.10.2.2"),
        &["sleep", "infinity"],
    );
    lab.ok(&[
        "exec",
        "cli",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "3",
        "10.10.2.1",
    ]);

    let capture = Capture::start(&lab, 2, "replay");
    let send = "import socket, time\n\
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                for i in range(20):\n    u.sendto(b'msg-%d' % i, ('10.10.2.1', 7001)); time.sleep(0.02)";
    lab.ok(&["exec", "cli", "--", "python3", "-c", send]);
    let datagrams = capture.stop();
    let h2 = lab.host_addr(2);
    // Data messages (type 3) to h2 large enough to hold one of the datagrams above.
    let data: Vec<&Vec<u8>> = datagrams
        .iter()
        .filter(|(_, dst, p)| *dst == h2 && p.first() == Some(&3) && p.len() > 32 + 8 + 28)
        .map(|(_, _, p)| p)
        .collect();
    assert!(data.len() >= 20, "captured {} data messages", data.len());

    let before = host_stats(&lab, "h2");
    let sock = UdpSocket::bind((lab.gateway().as_str(), 0)).unwrap();
    let target = format!("{h2}:7947");
    // Replayed as captured.
    for p in &data {
        sock.send_to(p, &target).unwrap();
    }
    // Forged: a fresh counter, and the ciphertext changed.
    for (i, p) in data.iter().enumerate() {
        let mut forged = p.to_vec();
        forged[8..16].copy_from_slice(&(1_000_000 + i as u64).to_be_bytes());
        let last = forged.len() - 1;
        forged[last] ^= 0x5a;
        sock.send_to(&forged, &target).unwrap();
    }
    // Not a tunnel message at all, and a plaintext frame into an encrypted cluster.
    sock.send_to(b"\x09garbage", &target).unwrap();
    sock.send_to(b"\x04\x00\x00\x00\x00\x00\x00\x01garbage", &target)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let s = host_stats(&lab, "h2");
            counter(&s, "drop_replayed") >= counter(&before, "drop_replayed") + data.len() as u64
                && counter(&s, "drop_auth_failed")
                    >= counter(&before, "drop_auth_failed") + data.len() as u64
        }),
        "{}",
        host_stats(&lab, "h2")
    );

    // The echo server saw each message exactly once.
    std::thread::sleep(Duration::from_millis(500));
    let logs = lab.ok(&["logs", "echo"]);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in logs.lines().filter(|l| l.starts_with("udp msg-")) {
        *seen.entry(line).or_default() += 1;
    }
    assert_eq!(seen.len(), 20, "{logs}");
    assert!(
        seen.values().all(|&n| n == 1),
        "a message arrived twice: {logs}"
    );
    // And the real traffic still flows.
    lab.ok(&[
        "exec",
        "cli",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "3",
        "10.10.2.1",
    ]);
}

#[test]
fn live_tcp_survives_a_moved_underlay_address_an_agent_restart_and_the_controller() {
    let lab = TestLab::up(3);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    run_on(
        &lab,
        "h2",
        "red",
        "echo",
        Some("10.10.2.1"),
        &["python3", "-c", ECHO],
    );
    run_on(&lab, "h3", "red", "probe", None, &["sleep", "infinity"]);
    assert!(wait_until(Duration::from_secs(10), || lab
        .run(&[
            "exec",
            "probe",
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "10.10.2.1"
        ])
        .status
        .success()));
    let stop = start_talker(&lab, "h1", "red", "talker", "10.10.2.1");
    let echo_pid = lab.inspect("echo")["pid"].clone();

    // h2's underlay address changes: A added... B removed.
    let ns = lab.netns(2);
    let new_addr = format!("198.18.{}.102", lab.octet);
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["-n", &ns])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&["link", "set", "eth0", "up"]);
    let sysctl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.eth0.promote_secondaries=1",
        ])
        .status()
        .unwrap();
    assert!(sysctl.success());
    ip(&["addr", "add", &format!("{new_addr}/24"), "dev", "eth0"]);
    ip(&[
        "addr",
        "del",
        &format!("{}/24", lab.host_addr(2)),
        "dev",
        "eth0",
    ]);
    let _ = Command::new("ip")
        .args([
            "-n",
            &ns,
            "route",
            "replace",
            "default",
            "via",
            &lab.gateway(),
        ])
        .status();
    assert!(
        wait_until(Duration::from_secs(15), || lab
            .ok(&["host", "ls"])
            .contains(&format!("{new_addr}:7947"))),
        "the controller never learnt h2's new address: {}",
        lab.ok(&["host", "ls"])
    );
    // New conversations reach the moved host too.
    lab.ok(&[
        "exec",
        "probe",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "3",
        "10.10.2.1",
    ]);
    let n1 = finish_talker(&lab, "talker", &stop);
    assert!(n1 > 50, "{n1}");

    // h1's agent is killed and restarted under a live stream.
    let stop = start_talker(&lab, "h1", "red", "talker2", "10.10.2.1");
    lab.kill("h1");
    std::thread::sleep(Duration::from_millis(500));
    lab.restart();
    let n2 = finish_talker(&lab, "talker2", &stop);
    assert!(n2 > 50, "{n2}");

    // The controller stops: traffic between existing members goes on, and a new
    // connection between existing members works; when it returns, agents resynchronise
    // without restarting instances.
    let stop = start_talker(&lab, "h3", "red", "talker3", "10.10.2.1");
    lab.kill("controller");
    std::thread::sleep(Duration::from_secs(2));
    let said = lab_exec_without_controller(&lab, 3, "10.10.2.1");
    assert!(said, "no new connection while the controller was down");
    lab.restart();
    let n3 = finish_talker(&lab, "talker3", &stop);
    assert!(n3 > 50, "{n3}");
    assert_eq!(
        lab.inspect("echo")["pid"],
        echo_pid,
        "the server was restarted"
    );
    assert_eq!(lab.inspect("echo")["state"], "running");
    let hosts = lab.ok(&["host", "ls"]);
    assert_eq!(hosts.matches("online").count(), 3, "{hosts}");
}

/// Pings `dst` from an instance on lab host `i` without the controller (no `vane exec`):
/// enters the instance's namespaces with nsenter, as an operator could.
fn lab_exec_without_controller(lab: &TestLab, i: u8, dst: &str) -> bool {
    let dir = format!("{}/hosts/h{i}/instances", lab.state_dir());
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("instance.json")) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let Some(pid) = v["init_pid"].as_u64() else {
            continue;
        };
        let out = Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-n",
                "ping",
                "-c",
                "1",
                "-W",
                "3",
                dst,
            ])
            .output()
            .unwrap();
        return out.status.success();
    }
    false
}

#[test]
fn idle_tunnels_are_torn_down_and_rebuilt_and_sessions_rekey_under_traffic() {
    let lab = TestLab::up_with(
        2,
        &[],
        &[("VANE_TUNNEL_IDLE", "2"), ("VANE_REKEY_AFTER", "3")],
    );
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    run_on(
        &lab,
        "h2",
        "red",
        "echo",
        Some("10.10.2.1"),
        &["python3", "-c", ECHO],
    );
    // One connection with a long pause: the tunnel goes idle and is torn down, and the
    // connection notices nothing when it speaks again.
    const PAUSER: &str = r#"
import socket, time
s = socket.create_connection(('10.10.2.1', 7000), timeout=10)
for i in range(3):
    s.sendall(b'before-%d' % i)
    assert s.recv(100) == b'before-%d' % i
time.sleep(6)
for i in range(3):
    s.sendall(b'after-%d' % i)
    assert s.recv(100) == b'after-%d' % i
print('ok')
"#;
    run_on(
        &lab,
        "h1",
        "red",
        "pauser",
        None,
        &["python3", "-c", PAUSER],
    );
    assert!(
        wait_until(Duration::from_secs(6), || counter(
            &host_stats(&lab, "h1"),
            "idle_teardowns"
        ) >= 1),
        "{}",
        host_stats(&lab, "h1")
    );
    assert!(wait_until(Duration::from_secs(20), || lab
        .inspect("pauser")["state"]
        == "exited"));
    assert_eq!(
        lab.inspect("pauser")["exit"]["code"],
        0,
        "{}",
        lab.ok(&["logs", "pauser"])
    );

    // A conversation long enough to cross several rekeys.
    let stop = start_talker(&lab, "h1", "red", "talker", "10.10.2.1");
    std::thread::sleep(Duration::from_secs(8));
    finish_talker(&lab, "talker", &stop);
    let rekeys =
        counter(&host_stats(&lab, "h1"), "rekeys") + counter(&host_stats(&lab, "h2"), "rekeys");
    assert!(rekeys >= 2, "{rekeys} rekeys");
}

#[test]
fn plaintext_clusters_work_only_when_chosen_and_enrollment_refuses_strangers() {
    let lab = TestLab::up_with(2, &["--plaintext"], &[]);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.2.0/24"]);
    let page = file_server("open-page-4a5b");
    run_on(&lab, "h1", "red", "web", Some("10.10.2.1"), &strs(&page));
    run_on(&lab, "h2", "red", "cli", None, &["sleep", "infinity"]);
    assert_eq!(
        wait_for_http(&lab, "cli", "http://web/").trim(),
        "open-page-4a5b"
    );
    assert_eq!(host_stats(&lab, "h2")["encrypted"], false);

    // Bad input: unknown host, offline host, bad token, duplicate host name.
    let err = lab.fails(&["run", "--net", "red", "--host", "h9", "--", "true"]);
    assert!(
        err.contains("unknown host") && err.lines().count() == 1,
        "{err}"
    );
    let err = lab.fails(&["host", "stats", "h9"]);
    assert!(err.contains("unknown host"), "{err}");
    let err = lab.fails(&["host", "token", "--ttl", "soon"]);
    assert!(err.contains("invalid duration"), "{err}");
    let stranger_dir = format!("{}/stranger", lab.state_dir());
    let agent = |name: &str, token: &str| {
        Command::new(common::vane_bin())
            .args(["agent", "--name", name, "--state-dir", &stranger_dir])
            .args(["--controller", &lab.controller, "--netns", &lab.netns(2)])
            .args(["--listen", "0.0.0.0:7950"])
            .stdin(std::process::Stdio::null())
            .env("VANE_JOIN_TOKEN", token)
            .output()
            .unwrap()
    };
    let token = lab.ok(&["host", "token", "--ttl", "5m"]);
    // The right controller, a made-up secret.
    let (_, pin) = token
        .trim()
        .rsplit_once('.')
        .expect("a token carries a pin");
    let out = agent("h3", &format!("vanejoin-0000.{pin}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad join token"), "{err}");
    // A token without the controller's pin, or with another controller's.
    let out = agent("h3", "vanejoin-0000");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("carries no controller pin"), "{err}");
    let (secret, _) = token.trim().rsplit_once('.').unwrap();
    let out = agent("h3", &format!("{secret}.{}", "ab".repeat(32)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not the one the join token names"), "{err}");
    let out = agent("h1", token.trim());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("duplicate host name"), "{err}");
    let _ = std::fs::remove_dir_all(&stranger_dir);

    lab.kill("h2");
    assert!(wait_until(Duration::from_secs(5), || lab
        .ok(&["host", "ls"])
        .contains("offline")));
    let err = lab.fails(&["run", "--net", "red", "--host", "h2", "--", "true"]);
    assert!(err.contains("offline"), "{err}");
}

/// Sends, from lab host `from`'s namespace, plaintext overlay datagrams to host `to`'s
/// switch in the name of host id `sender`, carrying a UDP packet `src` -> `dst`:9999 of net
/// `net`: what a host (or whoever holds its address on a plaintext underlay) can forge.
fn forge_plain(lab: &TestLab, from: u8, to: u8, sender: u64, net: u64, src: &str, dst: &str) {
    let script = format!(
        r#"
import socket, struct
def csum(b):
    s = sum(struct.unpack('!10H', b))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return (~s) & 0xffff
src, dst = socket.inet_aton('{src}'), socket.inet_aton('{dst}')
udp = struct.pack('!HHHH', 5555, 9999, 8 + 6, 0) + b'forged'
hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0, src, dst)
hdr = hdr[:10] + struct.pack('!H', csum(hdr)) + hdr[12:]
frame = bytes([0, 0, 0, 0]) + struct.pack('!II', {net}, {net}) + hdr + udp
datagram = bytes([4, 0, 0, 0]) + struct.pack('!I', {sender}) + frame
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(datagram, ('{to_addr}', 7947))
"#,
        to_addr = lab.host_addr(to),
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.netns(from), "python3", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_host_speaking_for_members_it_does_not_host_is_dropped_and_counted() {
    // Plaintext, so that the test can speak as host h2 without its key: the check is the
    // same behind the encryption, where only h2's switch could send this.
    let lab = TestLab::up_with(3, &["--plaintext"], &[]);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.12.0/24"]);
    run_on(
        &lab,
        "h1",
        "red",
        "sink",
        None,
        &["python3", "-c", common::UDP_SINK],
    );
    run_on(&lab, "h2", "red", "mine", None, &["sleep", "infinity"]);
    run_on(&lab, "h3", "red", "theirs", None, &["sleep", "infinity"]);
    let ip = |n: &str| lab.inspect(n)["ip"].as_str().unwrap().to_string();
    let nets: serde_json::Value =
        serde_json::from_str(&lab.ok(&["net", "ls", "-o", "json"])).unwrap();
    let net = nets[0]["id"].as_u64().unwrap();
    let hosts: serde_json::Value =
        serde_json::from_str(&lab.ok(&["host", "ls", "-o", "json"])).unwrap();
    let id_of = |name: &str| {
        hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .and_then(|h| h["id"].as_u64())
            .unwrap()
    };
    let h2 = id_of("h2");
    // h2 for its own member: delivered (the forgery is well made).
    forge_plain(&lab, 2, 1, h2, net, &ip("mine"), &ip("sink"));
    assert!(wait_until(Duration::from_secs(5), || lab
        .ok(&["logs", "sink"])
        .contains(&format!("from {}", ip("mine")))));
    // h2 for h3's member, for an address nobody has: dropped and counted.
    let before = counter(&host_stats(&lab, "h1"), "switch_drop_wrong_host");
    forge_plain(&lab, 2, 1, h2, net, &ip("theirs"), &ip("sink"));
    forge_plain(&lab, 2, 1, h2, net, "10.10.12.200", &ip("sink"));
    assert!(wait_until(Duration::from_secs(5), || counter(
        &host_stats(&lab, "h1"),
        "switch_drop_wrong_host"
    ) >= before + 10));
    std::thread::sleep(Duration::from_millis(300));
    let logs = lab.ok(&["logs", "sink"]);
    assert!(!logs.contains(&format!("from {}", ip("theirs"))), "{logs}");
    assert!(!logs.contains("from 10.10.12.200"), "{logs}");
}

/// A cluster made with another global space than 10.0.0.0/8: nets inside it are told apart
/// from the outside world by every switch, so a policy opens traffic between them across
/// hosts (a switch that kept the default space took it for egress and sent it out through
/// NAT), and a net outside it is refused.
#[test]
fn a_cluster_with_its_own_global_space_forwards_what_policy_allows_between_its_nets() {
    let lab = TestLab::up_with(2, &["--global-space", "172.16.0.0/12"], &[]);
    let refused = lab.fails(&["net", "create", "ten", "--subnet", "10.10.1.0/24"]);
    assert!(refused.contains("172.16.0.0/12"), "{refused}");
    lab.ok(&[
        "net",
        "create",
        "red",
        "--subnet",
        "172.16.1.0/24",
        "--egress",
    ]);
    lab.ok(&["net", "create", "blue", "--subnet", "172.16.2.0/24"]);
    run_on(
        &lab,
        "h2",
        "blue",
        "bweb",
        Some("172.16.2.1"),
        &strs(&file_server("blue-page")),
    );
    run_on(&lab, "h1", "red", "rcli", None, &["sleep", "infinity"]);
    let refused = lab.run(&[
        "exec",
        "rcli",
        "--",
        "curl",
        "-sf",
        "-m",
        "2",
        "http://172.16.2.1/",
    ]);
    assert!(
        !refused.status.success(),
        "red reached blue without a policy"
    );
    lab.ok(&["policy", "allow", "red", "blue", "--port", "80/tcp"]);
    assert_eq!(
        wait_for_http(&lab, "rcli", "http://172.16.2.1/index.html").trim(),
        "blue-page"
    );
}
