//! Published ports (`vane run --publish`): a client outside vane (here, the lab machine's
//! own namespace on the underlay) reaches an instance through its host, the program sees
//! the client's own address, nothing unpublished is reachable, after a migration the
//! port is published on the new host and no longer on the old one, and policies from
//! outside address ranges narrow who may connect.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{wait_until, TestLab};

/// What curl gets from `url` from the lab machine's namespace: the body, or `None` if it
/// cannot connect.
fn fetch(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "-m", "3", url])
        .output()
        .expect("run curl");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_published_port_reaches_its_instance_from_outside_and_follows_it() {
    let lab = TestLab::up(2);
    // A net without egress: only the published port's replies leave it.
    lab.ok(&["net", "create", "red", "--subnet", "10.10.41.0/24"]);
    let server = "cd $(mktemp -d) && echo published > index.html && exec python3 -m http.server 80";
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "web",
        "--host",
        "h1",
        "--publish",
        "8080:80",
        "--",
        "sh",
        "-c",
        server,
    ]);
    let (h1, h2) = (lab.host_addr(1), lab.host_addr(2));
    let url = |host: &str, port: u16| format!("http://{host}:{port}/");
    assert!(
        wait_until(Duration::from_secs(10), || fetch(&url(&h1, 8080))
            .is_some_and(|b| b.trim() == "published")),
        "the published port does not answer"
    );
    // The program saw the client's own address (the lab machine's, on the underlay).
    let logs = lab.ok(&["logs", "web"]);
    assert!(
        logs.contains(&format!("{} - - ", lab.gateway())),
        "the server did not see its client's address: {logs}"
    );
    // Nothing else of it is reachable: another port of its host, its port at another host.
    assert_eq!(fetch(&url(&h1, 8081)), None);
    assert_eq!(fetch(&url(&h2, 8080)), None);
    assert_eq!(lab.inspect("web")["publish"][0]["host_port"], 8080);

    // Bad input and clashes: one line each, nothing made.
    let err = lab.fails(&[
        "run",
        "--net",
        "red",
        "--name",
        "other",
        "--host",
        "h1",
        "--publish",
        "8080:81",
        "--",
        "sleep",
        "100",
    ]);
    assert!(
        err.contains("host port 8080/tcp of host \"h1\" is published already, by instance \"web\""),
        "{err}"
    );
    let err = lab.fails(&[
        "run",
        "--net",
        "red",
        "--name",
        "other",
        "--publish",
        "80",
        "--",
        "sleep",
        "100",
    ]);
    assert!(err.contains("invalid published port \"80\""), "{err}");
    assert!(lab.inspect("web")["state"] == "running");
    assert!(lab.run(&["inspect", "other"]).status.code() != Some(0));

    // It moves: published on the new host, on the old one no more.
    lab.ok(&["migrate", "web", "--to", "h2"]);
    assert!(
        wait_until(Duration::from_secs(10), || fetch(&url(&h2, 8080))
            .is_some_and(|b| b.trim() == "published")),
        "the port was not published on the new host"
    );
    assert_eq!(fetch(&url(&h1, 8080)), None);
    // A host that publishes nothing any more keeps no rule for it.
    let rules = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.netns(1),
            "nft",
            "list",
            "table",
            "ip",
            "vane_publish",
        ])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("dnat"),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    // Policy can still refuse: once red has a policy from an outside range, only the
    // ranges (and ports) its outside policies name connect.
    lab.ok(&[
        "policy",
        "allow",
        "203.0.113.0/24",
        "red",
        "--port",
        "80/tcp",
    ]);
    assert!(
        wait_until(Duration::from_secs(5), || fetch(&url(&h2, 8080)).is_none()),
        "an address no outside policy names still connects"
    );
    let err = lab.fails(&["policy", "allow", "203.0.113.0/33", "red"]);
    assert!(err.contains("203.0.113.0/33"), "{err}");
    let underlay = format!("198.18.{}.0/24", lab.octet);
    lab.ok(&["policy", "allow", &underlay, "red", "--port", "81/tcp"]);
    assert_eq!(fetch(&url(&h2, 8080)), None, "a policy for another port");
    lab.ok(&["policy", "allow", &underlay, "red", "--port", "80/tcp"]);
    assert!(
        wait_until(Duration::from_secs(5), || fetch(&url(&h2, 8080))
            .is_some_and(|b| b.trim() == "published")),
        "the range an outside policy names does not connect"
    );
    let listed = lab.ok(&["policy", "ls"]);
    assert!(listed.contains(&underlay), "{listed}");
    // Removed, it is reachable nowhere.
    lab.ok(&["rm", "web"]);
    assert_eq!(fetch(&url(&h2, 8080)), None);
}
