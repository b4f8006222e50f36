//! Services for real on namespace hosts: a name and a virtual IP whose connections the
//! switches spread over members on two hosts, seen from a client on a third; a member
//! stopped while the client asks in a loop costs no request, and one whose host dies is
//! chosen no more once the host is declared dead; connections through the service keep
//! their member when members are added and while it migrates.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::live::{finish_client, start_script, CLIENT, COUNTER};
use common::{vane_bin, wait_for_http, wait_until, TestLab};

/// A web server answering `content` on port 80.
fn web_server(content: &str) -> String {
    format!("cd $(mktemp -d) && echo {content} > index.html && exec python3 -m http.server 80")
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

/// Has `cli` ask `http://web/` in a loop for `secs` seconds, and does `action` after 1.5 s.
/// Returns when `action` began (ns since the epoch), and each request with when it began
/// (the lab's hosts share the machine's clock) and its answer, `FAIL` for none.
fn ask_in_a_loop<T>(
    lab: &TestLab,
    secs: u32,
    action: impl FnOnce() -> T,
) -> (u128, Vec<(u128, String)>) {
    let script = format!(
        "end=$(($(date +%s) + {secs})); while [ $(date +%s) -lt $end ]; do \
         s=$(date +%s%N); r=$(curl -sf -m 2 http://web/ || echo FAIL); \
         echo \"$s $r\"; sleep 0.03; done"
    );
    let client = Command::new(vane_bin())
        .args(["exec", "cli", "--", "sh", "-c", &script])
        .env("VANE_CONTROLLER", &lab.controller)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client's loop");
    std::thread::sleep(Duration::from_millis(1500));
    let at = now_ns();
    action();
    let out = client.wait_with_output().expect("the client's loop");
    let answers = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, r) = l.split_once(' ')?;
            Some((t.parse().ok()?, r.to_string()))
        })
        .collect();
    (at, answers)
}

/// A lab with service `web` of net red (members `w-one` on h1 and `w-two` on h2, each
/// answering its name) and a client `cli` on h3; returns the service's address.
fn web_on_two_hosts(lab: &TestLab) -> String {
    lab.ok(&["net", "create", "red", "--subnet", "10.62.1.0/24"]);
    lab.ok(&[
        "service", "create", "web", "--net", "red", "--port", "80/tcp",
    ]);
    for (name, host) in [("one", "h1"), ("two", "h2")] {
        lab.ok(&[
            "run",
            "--net",
            "red",
            "--name",
            &format!("w-{name}"),
            "--host",
            host,
            "--service",
            "web",
            "--",
            "sh",
            "-c",
            &web_server(name),
        ]);
    }
    lab.ok(&[
        "run", "--net", "red", "--name", "cli", "--host", "h3", "--", "sleep", "infinity",
    ]);
    wait_for_http(lab, "cli", "http://web/");
    let listed: serde_json::Value =
        serde_json::from_str(&lab.ok(&["service", "ls", "-o", "json"])).expect("JSON");
    listed[0]["vip"].as_str().expect("vip").to_string()
}

#[test]
fn a_member_whose_host_dies_is_chosen_no_more() {
    let lab = TestLab::up_with(3, &[], &[("VANE_HOST_GRACE", "2s")]);
    web_on_two_hosts(&lab);
    let name = lab.name.clone();
    let (failed_at, answers) =
        ask_in_a_loop(&lab, 10, || lab.ok(&["lab", "fail", "h2", "--name", &name]));
    let out = format!("{answers:?}");
    assert!(
        answers.iter().any(|(t, r)| *t < failed_at && r == "two"),
        "{out}"
    );
    // Silent for the grace period, then dead: from then on only w-one is chosen.
    let settled = failed_at + 5_000_000_000;
    let late: Vec<_> = answers.iter().filter(|(t, _)| *t > settled).collect();
    assert!(late.len() > 10, "{out}");
    assert!(late.iter().all(|(_, r)| r == "one"), "{out}");
    let failures = answers.iter().filter(|(_, r)| r == "FAIL").count();
    eprintln!("requests failed while h2 was not yet dead: {failures}");
    let _ = lab.run(&["lab", "recover", "h2", "--name", &name]);
}

#[test]
fn a_service_spreads_over_members_on_two_hosts_and_loses_no_request_when_one_stops() {
    let lab = TestLab::up(3);
    let vip = web_on_two_hosts(&lab);
    assert_eq!(vip, "10.62.1.254");
    // A member must be of the service's net.
    lab.ok(&["net", "create", "blue", "--subnet", "10.62.2.0/24"]);
    let e = lab.fails(&[
        "run",
        "--net",
        "blue",
        "--service",
        "web",
        "--",
        "sleep",
        "infinity",
    ]);
    assert!(e.contains("service \"web\" is in net \"red\""), "{e}");
    assert!(lab.ok(&["service", "ls", "-q"]).trim() == "web");

    // The name gives the service's address, through the C library.
    let out = lab.ok(&["exec", "cli", "--", "getent", "hosts", "web"]);
    assert!(out.starts_with(&format!("{vip} ")), "{out}");

    // Both members answer (each connection is a new flow).
    let mut seen = std::collections::BTreeSet::new();
    let both = wait_until(Duration::from_secs(20), || {
        let out = lab.run(&["exec", "cli", "--", "curl", "-sf", "-m", "2", "http://web/"]);
        seen.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
        seen.contains("one") && seen.contains("two")
    });
    assert!(both, "answers seen: {seen:?}");
    wait_until(Duration::from_secs(10), || {
        lab.ok(&["service", "ls"]).contains("w-one,w-two")
    });

    // A client asking in a loop; a member stopped in the middle.
    let (stopped_at, answers) = ask_in_a_loop(&lab, 6, || lab.ok(&["stop", "w-one"]));
    let out = format!("{answers:?}");
    let before: Vec<&str> = answers
        .iter()
        .filter(|(t, _)| *t < stopped_at)
        .map(|(_, r)| r.as_str())
        .collect();
    assert!(before.contains(&"one") && before.contains(&"two"), "{out}");
    let late_failures: Vec<&(u128, String)> = answers
        .iter()
        .filter(|(t, r)| *t > stopped_at + 1_000_000_000 && r != "two")
        .collect();
    assert!(!answers.is_empty());
    assert!(late_failures.is_empty(), "stopped at {stopped_at}: {out}");
    let failures = answers.iter().filter(|(_, r)| r == "FAIL").count();
    eprintln!("requests failed around the stop: {failures}");
    assert!(
        answers.iter().filter(|(t, _)| *t > stopped_at).count() > 10,
        "{out}"
    );
    assert!(lab.ok(&["service", "ls"]).contains(" w-two"));

    // Removed: the name is gone, the members run on.
    lab.ok(&["service", "rm", "web"]);
    assert!(lab.ok(&["service", "ls", "-q"]).trim().is_empty());
    let gone = wait_until(Duration::from_secs(5), || {
        !lab.run(&["exec", "cli", "--", "getent", "hosts", "web"])
            .status
            .success()
    });
    assert!(gone, "the name still answers");
    lab.ok(&["net", "rm", "blue"]);
}

#[test]
fn connections_through_a_service_keep_their_member_when_one_joins_and_while_it_migrates() {
    let lab = TestLab::up(3);
    lab.ok(&["net", "create", "red", "--subnet", "10.62.3.0/24"]);
    lab.ok(&[
        "service", "create", "ctr", "--net", "red", "--port", "7000/tcp",
    ]);
    let member = |name: &str, host: &str| {
        lab.ok(&[
            "run",
            "--net",
            "red",
            "--name",
            name,
            "--host",
            host,
            "--service",
            "ctr",
            "--",
            "python3",
            "-c",
            COUNTER,
        ]);
    };
    member("srv1", "h1");
    // Clients on two hosts, by the service's name: each reply must be the next of its
    // connection's count, without a gap.
    let clients = [("h2", "c2"), ("h3", "c3")];
    let stops: Vec<String> = clients
        .iter()
        .map(|(host, name)| start_script(&lab, host, name, "ctr", CLIENT))
        .collect();
    // A new member takes new connections only.
    member("srv2", "h2");
    assert!(wait_until(Duration::from_secs(10), || lab
        .ok(&["service", "ls"])
        .contains("srv1,srv2")));
    // The member they are on moves, with its address: their flows keep it.
    let out = lab.ok(&["migrate", "srv1", "--to", "h3"]);
    eprintln!("{}", out.trim());
    for ((_, name), stop) in clients.iter().zip(&stops) {
        finish_client(&lab, name, stop);
    }
    assert_eq!(lab.inspect("srv1")["host"], "h3");
}
