//! Three controller replicas on a three-member etcd (`vane lab up --controllers 3`): the
//! leader is killed while the CLI runs and removes instances in a loop and while a TCP
//! connection between hosts carries numbered replies; then an etcd member dies; then a host
//! fails and comes back. No command fails, no reply is lost, instances keep one copy.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::live::{finish_client, progress, run_on, start_client, COUNTER};
use common::{wait_for_http, wait_until, TestLab};

/// The replica that leads now (its pid file's name), asked of each replica's API: a
/// standby answers 503.
fn leader(lab: &TestLab) -> String {
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            found = (1..=3u8).find_map(|r| {
                let url = format!("https://198.18.{}.{}:7946/v1/status", lab.octet, 255 - r);
                let out = Command::new("curl")
                    .args([
                        "-sk",
                        "-m",
                        "2",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        &url,
                    ])
                    .output()
                    .ok()?;
                let code = String::from_utf8_lossy(&out.stdout).to_string();
                (code != "503" && code != "000").then(|| {
                    if r == 1 {
                        "controller".to_string()
                    } else {
                        format!("controller-{r}")
                    }
                })
            });
            found.is_some()
        }),
        "no replica leads"
    );
    found.unwrap()
}

/// Runs and removes instances on h2 until `stop`; returns what failed, each with its
/// command, and how many rounds ran.
fn churn(lab: Arc<TestLab>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, u32)> {
    std::thread::spawn(move || {
        let mut failures = Vec::new();
        let mut rounds = 0;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("churn{rounds}");
            for args in [
                vec![
                    "run", "--net", "red", "--name", &name, "--host", "h2", "--", "sleep", "600",
                ],
                vec!["rm", &name],
            ] {
                let out = lab.run(&args);
                if !out.status.success() {
                    failures.push(format!(
                        "vane {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
            rounds += 1;
        }
        (failures, rounds)
    })
}

/// Kills the leader and returns how long `vane ps` took to work again.
fn kill_leader(lab: &TestLab) -> Duration {
    let old = leader(lab);
    lab.kill(&old);
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || lab
            .run(&["ps", "-q"])
            .status
            .success()),
        "the CLI found no leader after {old} died"
    );
    let took = killed.elapsed();
    assert_ne!(leader(lab), old);
    took
}

#[test]
fn the_leader_dies_under_a_cli_loop_and_live_tcp_and_nothing_fails() {
    let lab = Arc::new(TestLab::up_with(
        3,
        &["--controllers", "3"],
        &[("VANE_HOST_GRACE", "2s")],
    ));
    assert_eq!(lab.controller.split(',').count(), 3, "{}", lab.controller);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.31.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let stop_client = start_client(&lab, "h3", "c3", &ip);

    let stop = Arc::new(AtomicBool::new(false));
    let loop_ = churn(lab.clone(), stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let first = kill_leader(&lab);
    eprintln!(
        "the CLI worked again {} ms after the leader died",
        first.as_millis()
    );
    // The client's connection, through the switches, never needed a controller.
    let before = progress(&lab, "c3");
    assert!(
        wait_until(Duration::from_secs(10), || progress(&lab, "c3")
            > before + 50),
        "the client stalled"
    );
    std::thread::sleep(Duration::from_secs(2));
    // The new leader dies too: the third replica takes over.
    let second = kill_leader(&lab);
    eprintln!("and {} ms after the second leader died", second.as_millis());
    std::thread::sleep(Duration::from_secs(2));

    // An etcd member dies: the majority left carries on.
    lab.kill("etcd-2");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let (failures, rounds) = loop_.join().unwrap();
    assert!(failures.is_empty(), "after {rounds} rounds: {failures:#?}");
    assert!(rounds >= 5, "only {rounds} rounds of run and rm");
    finish_client(&lab, "c3", &stop_client);
    // Every churned instance was removed once, none twice nor left behind.
    let left: Vec<String> = lab.ok(&["ps", "-q"]).lines().map(str::to_string).collect();
    assert_eq!(left, ["c3", "srv"]);

    // A host fails under the last replica: its restartable instance runs elsewhere as
    // itself, and a client on a third host reaches it by name.
    let server =
        "cd $(mktemp -d) && echo hello-from-web > index.html && exec python3 -m http.server 80";
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "web",
        "--host",
        "h1",
        "--restart",
        "always",
        "--",
        "sh",
        "-c",
        server,
    ]);
    lab.ok(&[
        "run", "--net", "red", "--name", "client", "--host", "h3", "--", "sleep", "600",
    ]);
    assert!(wait_for_http(&lab, "client", "http://web/").contains("hello-from-web"));
    let before = lab.inspect("web");
    lab.ok(&["lab", "fail", "h1", "--name", &lab.name]);
    let failed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = lab.inspect("web");
            now["state"] == "running" && now["host"] != "h1"
        }),
        "web did not run elsewhere within 10 s: {}",
        lab.inspect("web")
    );
    eprintln!(
        "web ran elsewhere {} ms after h1 failed",
        failed.elapsed().as_millis()
    );
    let after = lab.inspect("web");
    assert_eq!(
        (&after["ip"], &after["hostname"], &after["id"]),
        (&before["ip"], &before["hostname"], &before["id"])
    );
    assert!(wait_for_http(&lab, "client", "http://web/").contains("hello-from-web"));

    // h1 back: its stale copy ends, the one elsewhere stays the only one.
    lab.ok(&["lab", "recover", "h1", "--name", &lab.name]);
    let host_now = after["host"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(format!("{}/h1.log", lab.state_dir()))
                .is_ok_and(|l| l.contains("not this host's any more"))
        }),
        "h1 kept its stale copy of web"
    );
    let web = lab.inspect("web");
    assert_eq!(
        (web["state"].as_str(), web["host"].as_str()),
        (Some("running"), Some(host_now.as_str()))
    );
    assert!(wait_for_http(&lab, "client", "http://web/").contains("hello-from-web"));
}

#[test]
fn a_standby_names_the_leader_and_a_single_url_follows_it() {
    let lab = TestLab::up_with(1, &["--controllers", "3"], &[]);
    let led_by = leader(&lab);
    let standby = (1..=3u8)
        .map(|r| {
            (
                r,
                if r == 1 {
                    "controller".to_string()
                } else {
                    format!("controller-{r}")
                },
            )
        })
        .find(|(_, name)| *name != led_by)
        .map(|(r, _)| format!("https://198.18.{}.{}:7946", lab.octet, 255 - r))
        .unwrap();
    // Without a credential a standby says no more than where the leader is.
    let out = Command::new("curl")
        .args(["-sk", "-D", "-", &format!("{standby}/v1/instances")])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("x-vane-leader: https://"), "{answer}");
    assert!(answer.contains("is a standby: the leader is"), "{answer}");
    // The CLI given only the standby goes to the leader it names.
    let out = Command::new(common::vane_bin())
        .args(["--controller", &standby, "host", "ls", "-q"])
        .env_remove("VANE_CONTROLLER")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "h1");
    // Bad input: one line.
    let err = lab.fails(&["lab", "up", "--name", &lab.name, "--controllers", "2"]);
    assert!(
        err.contains("was made with 3 controller replica(s)"),
        "{err}"
    );
}
