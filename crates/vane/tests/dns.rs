//! The resolver every instance gets at 127.0.0.53 (its /etc/resolv.conf), asked with real
//! clients (getent through the C library, dig) from inside instances: names of its own net
//! and of the nets a policy lets it reach, not of the others; reverse names; answers that
//! follow the directory within a second; after a migration and an agent restart; and root
//! inside trying to take the resolver's address or to flood it.

mod common;

use std::time::{Duration, Instant};

use common::{wait_until, TestLab};

/// Runs `cmd` inside `name`; its success and what it printed (stdout, then stderr).
fn inside(lab: &TestLab, name: &str, cmd: &[&str]) -> (bool, String) {
    let mut args = vec!["exec", name, "--"];
    args.extend(cmd);
    let out = lab.run(&args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `dig` inside `name`, one try, short: its whole answer.
fn dig(lab: &TestLab, name: &str, args: &[&str]) -> String {
    let mut cmd = vec!["dig", "+tries=1", "+time=2"];
    cmd.extend(args);
    inside(lab, name, &cmd).1
}

/// The addresses (or names, for PTR) `dig +short` gives inside `name`.
fn short(lab: &TestLab, name: &str, args: &[&str]) -> String {
    let mut cmd = vec!["+short"];
    cmd.extend(args);
    dig(lab, name, &cmd).trim().to_string()
}

fn run(lab: &TestLab, net: &str, name: &str, host: &str) {
    lab.ok(&[
        "run", "--net", net, "--name", name, "--host", host, "--", "sleep", "infinity",
    ]);
}

fn ip(lab: &TestLab, name: &str) -> String {
    lab.inspect(name)["ip"].as_str().expect("ip").to_string()
}

/// The reverse name of an IPv4 address.
fn arpa(ip: &str) -> String {
    let mut o: Vec<&str> = ip.split('.').collect();
    o.reverse();
    format!("{}.in-addr.arpa.", o.join("."))
}

#[test]
fn names_resolve_by_net_and_policy_and_follow_the_directory() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.61.1.0/24"]);
    lab.ok(&["net", "create", "blue", "--subnet", "10.61.2.0/24"]);
    lab.ok(&["net", "create", "secret", "--subnet", "10.61.3.0/24"]);
    // red may open connections to blue (on one port: names do not care), not the other
    // way; secret shares no policy with red.
    lab.ok(&["policy", "allow", "red", "blue", "--port", "80/tcp"]);
    run(&lab, "red", "web1", "h1");
    run(&lab, "red", "cli1", "h2");
    run(&lab, "blue", "web2", "h1");
    run(&lab, "secret", "s1", "h2");
    let (web1, web2, s1) = (ip(&lab, "web1"), ip(&lab, "web2"), ip(&lab, "s1"));

    let (ok, conf) = inside(&lab, "cli1", &["cat", "/etc/resolv.conf"]);
    assert!(ok, "{conf}");
    assert!(conf.contains("nameserver 127.0.0.53\n"), "{conf}");
    assert!(conf.contains("search red\n"), "{conf}");

    // Through the C library (getent: /etc/hosts first, then the resolver), on another host
    // than the member.
    for name in ["web1", "web1.red", "WEB1.Red"] {
        let (ok, out) = inside(&lab, "cli1", &["getent", "hosts", name]);
        assert!(ok && out.starts_with(&web1), "getent hosts {name}: {out}");
    }
    let (ok, out) = inside(&lab, "cli1", &["getent", "hosts", "web2.blue"]);
    assert!(
        ok && out.starts_with(&web2),
        "getent hosts web2.blue: {out}"
    );
    // No policy lets red reach secret: its names do not exist for red.
    let (ok, out) = inside(&lab, "cli1", &["getent", "hosts", "s1.secret"]);
    assert!(!ok && out.is_empty(), "getent hosts s1.secret: {out}");
    // Straight from the resolver (dig reads no /etc/hosts).
    assert_eq!(short(&lab, "cli1", &["web1"]), web1);
    assert_eq!(short(&lab, "cli1", &["web1.red."]), web1);
    assert_eq!(short(&lab, "cli1", &["web2.blue."]), web2);
    let hidden = dig(&lab, "cli1", &["s1.secret."]);
    assert!(hidden.contains("status: NXDOMAIN"), "{hidden}");
    let unknown = dig(&lab, "cli1", &["s9.nowhere."]);
    assert!(unknown.contains("status: NXDOMAIN"), "{unknown}");
    // The policy is red to blue: blue does not see red.
    let back = dig(&lab, "web2", &["web1.red."]);
    assert!(back.contains("status: NXDOMAIN"), "{back}");
    assert_eq!(short(&lab, "web2", &["web2.blue."]), web2);

    // Reverse lookups, of visible members only.
    assert_eq!(short(&lab, "cli1", &["-x", &web2]), "web2.blue.");
    assert_eq!(short(&lab, "cli1", &["-x", &web1]), "web1.red.");
    let hidden = dig(&lab, "cli1", &["-x", &s1]);
    assert!(hidden.contains("status: NXDOMAIN"), "{hidden}");
    let (ok, out) = inside(&lab, "cli1", &["getent", "hosts", &web2]);
    assert!(
        ok && out.contains("web2.blue"),
        "getent hosts {web2}: {out}"
    );
    // Over TCP as well.
    assert_eq!(short(&lab, "cli1", &["+tcp", "web2.blue."]), web2);

    // A member that comes and goes: the answer follows within a second of the command.
    run(&lab, "red", "late", "h1");
    let start = Instant::now();
    let late = ip(&lab, "late");
    assert!(
        wait_until(Duration::from_secs(1), || short(
            &lab,
            "cli1",
            &["late.red."]
        ) == late),
        "late.red did not resolve within a second"
    );
    eprintln!("late.red resolved after {:?}", start.elapsed());
    lab.ok(&["rm", "late"]);
    let start = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || dig(&lab, "cli1", &["late.red."])
            .contains("status: NXDOMAIN")),
        "late.red still resolved a second after its removal"
    );
    eprintln!("late.red gone after {:?}", start.elapsed());
    // And a policy: once gone, blue's names are gone for red.
    let id = lab
        .ok(&["policy", "ls", "-q"])
        .lines()
        .next()
        .expect("policy")
        .trim()
        .to_string();
    lab.ok(&["policy", "rm", &id]);
    assert!(
        wait_until(Duration::from_secs(1), || dig(
            &lab,
            "cli1",
            &["web2.blue."]
        )
        .contains("status: NXDOMAIN")),
        "web2.blue still resolved a second after the policy went"
    );
}

/// Tries to take 127.0.0.53:53 beside the agent, over UDP and TCP, with every option that
/// shares a port; prints what happened and exits 0 only if a bind succeeded.
const TAKE_OVER: &str = r#"
import socket, sys
took = []
for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(('127.0.0.53', 53))
        took.append(kind)
    except OSError as e:
        print('refused:', e, flush=True)
print('took', took, flush=True)
sys.exit(0 if took else 1)
"#;

/// Sends queries as fast as it can for three seconds (random ids, one socket), reading
/// whatever comes back; prints how many went and came.
const FLOOD: &str = r#"
import os, socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
q = b'\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00' + b'\x04web1\x03red\x00' + b'\x00\x01\x00\x01'
sent = got = 0
end = time.time() + 3
while time.time() < end:
    try:
        s.sendto(os.urandom(2) + q, ('127.0.0.53', 53))
        sent += 1
    except OSError:
        pass
    try:
        while True:
            s.recv(512)
            got += 1
    except OSError:
        pass
print('sent', sent, 'got', got, flush=True)
"#;

#[test]
fn root_inside_can_neither_take_the_resolver_nor_starve_it() {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.62.1.0/24"]);
    lab.ok(&["net", "create", "other", "--subnet", "10.62.2.0/24"]);
    run(&lab, "red", "web1", "h1");
    run(&lab, "red", "x", "h1");
    run(&lab, "other", "o1", "h1");
    let web1 = ip(&lab, "web1");

    let (took, out) = inside(&lab, "x", &["python3", "-c", TAKE_OVER]);
    assert!(!took, "root inside bound the resolver's address: {out}");
    assert_eq!(out.matches("refused:").count(), 2, "{out}");
    // Its resolver file is read-only, and names of another tenant's net stay unknown.
    let (wrote, out) = inside(
        &lab,
        "x",
        &["sh", "-c", "echo nameserver 10.62.1.9 > /etc/resolv.conf"],
    );
    assert!(!wrote, "root inside rewrote /etc/resolv.conf: {out}");
    let o1 = dig(&lab, "x", &["o1.other."]);
    assert!(o1.contains("status: NXDOMAIN"), "{o1}");
    let o1 = dig(&lab, "x", &["-x", &ip(&lab, "o1")]);
    assert!(o1.contains("status: NXDOMAIN"), "{o1}");

    // A flood from x: answered at most at the resolver's rate, and the other instances'
    // resolvers answer meanwhile.
    lab.ok(&[
        "run", "--net", "red", "--name", "flood", "--host", "h1", "--", "python3", "-c", FLOOD,
    ]);
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        assert_eq!(short(&lab, "web1", &["web1.red."]), web1);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .ok(&["logs", "flood"])
            .contains("sent")),
        "the flood did not end"
    );
    let said = lab.ok(&["logs", "flood"]);
    let numbers: Vec<u64> = said
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [sent, got] = numbers[..] else {
        panic!("{said}")
    };
    eprintln!("flood: {said}; slowest answer to web1 meanwhile {slowest:?}");
    // 3 s at 1000 a second, and the burst.
    assert!(got <= 3_300, "the flood got {got} answers of {sent}");
    assert!(got > 0, "{said}");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
}

#[test]
fn names_resolve_after_a_migration_and_an_agent_restart() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.63.1.0/24"]);
    run(&lab, "red", "web1", "h1");
    run(&lab, "red", "mover", "h1");
    let web1 = ip(&lab, "web1");
    let mover = ip(&lab, "mover");
    assert_eq!(short(&lab, "mover", &["web1.red."]), web1);

    lab.ok(&["migrate", "mover", "--to", "h2"]);
    assert_eq!(lab.inspect("mover")["host"], "h2");
    assert_eq!(short(&lab, "mover", &["web1.red."]), web1);
    assert_eq!(short(&lab, "mover", &["-x", &web1]), "web1.red.");
    assert_eq!(short(&lab, "web1", &["mover.red."]), mover);
    let (ok, out) = inside(&lab, "mover", &["cat", "/etc/resolv.conf"]);
    assert!(ok && out.contains("nameserver 127.0.0.53"), "{out}");
    // And back, where the resolver of its first stay is gone with its namespace.
    lab.ok(&["migrate", "mover", "--to", "h1"]);
    assert_eq!(short(&lab, "mover", &["web1.red."]), web1);

    // The agent's sockets end with it; the restarted agent makes them again.
    lab.kill("h1");
    lab.restart();
    assert!(
        wait_until(Duration::from_secs(10), || short(
            &lab,
            "mover",
            &["web1.red."]
        ) == web1),
        "no answer after the agent's restart: {}",
        dig(&lab, "mover", &["web1.red."])
    );
    assert_eq!(short(&lab, "mover", &[&arpa(&web1), "PTR"]), "web1.red.");
}
