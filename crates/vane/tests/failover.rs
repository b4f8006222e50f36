//! Restart policies for real on namespace hosts: a host that vanishes as in a power loss
//! (`vane lab fail`) has its restartable instances started on another host with the same
//! address and name, and ends its stale copies when it comes back (`vane lab recover`);
//! programs that end start again on their own host as their policy says.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{wait_for_http, wait_until, TestLab};

/// A web server answering `content` on port 80.
fn web_server(content: &str) -> String {
    format!("cd $(mktemp -d) && echo {content} > index.html && exec python3 -m http.server 80")
}

fn state_of(lab: &TestLab, name: &str) -> (String, String) {
    let i = lab.inspect(name);
    (
        i["host"].as_str().unwrap_or_default().to_string(),
        i["state"].as_str().unwrap_or_default().to_string(),
    )
}

fn host_state(lab: &TestLab, host: &str) -> String {
    lab.ok(&["host", "ls"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(host))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_string()
}

/// The pids of the processes in the cgroups named `key` (an instance's id on the host
/// that first ran it; its id and host name where it was started again while the dead
/// host's copy still held its names: the lab's hosts share one kernel).
fn processes_of(key: &str) -> Vec<u32> {
    vane_agent::cgroup::procs(&vane_agent::cgroup::Layout::detect().paths(key))
}

#[test]
fn a_failed_host_s_instances_run_elsewhere_as_themselves_and_its_stale_copies_go() {
    let lab = TestLab::up_with(3, &[], &[("VANE_HOST_GRACE", "2s")]);
    let name = lab.name.clone();
    lab.ok(&["net", "create", "red", "--subnet", "10.10.7.0/24"]);
    let server = web_server("hello-from-web");
    let run = |args: &[&str]| lab.ok(args);
    run(&[
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
        &server,
    ]);
    run(&[
        "run", "--net", "red", "--name", "plain", "--host", "h1", "--", "sleep", "1000",
    ]);
    run(&[
        "run", "--net", "red", "--name", "client", "--host", "h3", "--", "sleep", "1000",
    ]);
    assert!(wait_for_http(&lab, "client", "http://web/").contains("hello-from-web"));
    let before = lab.inspect("web");
    assert_eq!(before["restart"], "always");
    let id = before["id"].as_str().unwrap().to_string();

    // Bad input: one line, a non-zero exit.
    for (args, says) in [
        (
            vec!["lab", "fail", "h9", "--name", &name],
            "unknown host \"h9\"",
        ),
        (
            vec!["lab", "recover", "h2", "--name", &name],
            "has not failed",
        ),
        (
            vec!["lab", "fail", "h1", "--name", "nolab"],
            "no lab \"nolab\"",
        ),
    ] {
        let err = lab.fails(&args);
        assert!(err.contains(says), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }

    let failed_at = Instant::now();
    let out = lab.ok(&["lab", "fail", "h1", "--name", &name]);
    assert!(out.contains("failed"), "{out}");
    assert!(lab
        .fails(&["lab", "fail", "h1", "--name", &name])
        .contains("failed already"));
    // Elsewhere within 10 s, as itself.
    assert!(
        wait_until(Duration::from_secs(10), || state_of(&lab, "web")
            == ("h2".into(), "running".into())),
        "web did not run on h2 in time: {:?}",
        state_of(&lab, "web")
    );
    let moved_after = failed_at.elapsed();
    let after = lab.inspect("web");
    for field in ["id", "ip", "hostname", "net", "name"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert_eq!(after["restarts"], 1);
    assert_eq!(after["restart_reason"], "host h1 died");
    assert_eq!(host_state(&lab, "h1"), "dead");
    assert_eq!(state_of(&lab, "plain"), ("h1".into(), "lost".into()));
    assert!(lab.ok(&["ps"]).contains("running (restarted 1x)"));
    // A client on a third host reaches it by name again.
    let mut answered = false;
    let answered_after = wait_until(Duration::from_secs(10), || {
        let out = lab.run(&[
            "exec",
            "client",
            "--",
            "curl",
            "-sf",
            "-m",
            "1",
            "http://web/",
        ]);
        answered = String::from_utf8_lossy(&out.stdout).contains("hello-from-web");
        answered
    })
    .then(|| failed_at.elapsed());
    let answered_after = answered_after.expect("web never answered from h3 after the failure");
    eprintln!(
        "lab fail h1 -> web running on h2 after {moved_after:?}, answering the client after {answered_after:?}"
    );
    assert!(
        answered_after < Duration::from_secs(10),
        "{answered_after:?}"
    );

    // The host comes back: its stale copy goes, nothing moves back, nothing runs twice.
    let out = lab.ok(&["lab", "recover", "h1", "--name", &name]);
    assert!(out.contains("recovered"), "{out}");
    assert_eq!(host_state(&lab, "h1"), "online");
    let stale_dir = format!("{}/hosts/h1/instances/{id}", lab.state_dir());
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&stale_dir).exists()),
        "h1 kept its stale copy of web at {stale_dir}"
    );
    assert!(
        Path::new(&format!("{}/hosts/h2/instances/{id}", lab.state_dir())).exists(),
        "web runs on h2"
    );
    assert_eq!(state_of(&lab, "web"), ("h2".into(), "running".into()));
    // Its one copy's processes: h2's; none is left of h1's.
    let pid = lab.inspect("web")["pid"].as_u64().unwrap() as u32;
    let procs = processes_of(&format!("{id}-h2"));
    assert!(procs.contains(&pid), "{procs:?} lacks {pid}");
    assert_eq!(processes_of(&id), Vec::<u32>::new(), "h1's copy runs");
    assert!(
        !Path::new(&format!("/run/netns/vane-{id}")).exists(),
        "h1's copy left its namespace"
    );
    assert_eq!(lab.ok(&["ps"]).matches("hello-from-web").count(), 1);
    assert_ne!(state_of(&lab, "plain").1, "running");
    assert!(wait_for_http(&lab, "client", "http://web/").contains("hello-from-web"));
    assert!(lab
        .fails(&["lab", "recover", "h1", "--name", &name])
        .contains("has not failed"));
}

#[test]
fn programs_that_end_start_again_on_their_host_as_their_policy_says() {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.8.0/24"]);
    let err = lab.fails(&[
        "run",
        "--net",
        "red",
        "--restart",
        "sometimes",
        "--",
        "true",
    ]);
    assert!(err.contains("sometimes"), "{err}");
    let restarts = |name: &str| lab.inspect(name)["restarts"].as_u64().unwrap_or(0);
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "always",
        "--restart",
        "always",
        "--",
        "true",
    ]);
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "fails",
        "--restart",
        "on-failure",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "done",
        "--restart",
        "on-failure",
        "--",
        "true",
    ]);
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "stopped",
        "--restart",
        "always",
        "--",
        "sleep",
        "1000",
    ]);
    lab.ok(&["stop", "stopped"]);
    // Backoff 1 s, then 2 s: two restarts within some 4 s.
    assert!(
        wait_until(Duration::from_secs(10), || restarts("always") >= 2
            && restarts("fails") >= 2),
        "always: {}, fails: {}",
        restarts("always"),
        restarts("fails")
    );
    assert_eq!(lab.inspect("fails")["restart_reason"], "exit code 3");
    assert_eq!(lab.inspect("always")["restart_reason"], "exit code 0");
    assert!(lab.ok(&["ps"]).contains("(restarted"));
    let done = lab.inspect("done");
    assert_eq!(done["state"], "exited");
    assert_eq!(restarts("done"), 0);
    let stopped = lab.inspect("stopped");
    assert_eq!(stopped["state"], "exited");
    assert_eq!(restarts("stopped"), 0);
    // Removing one that restarts ends it for good.
    lab.ok(&["rm", "always"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(lab
        .fails(&["inspect", "always"])
        .contains("unknown instance"));
    assert!(!lab.ok(&["ps"]).contains("always"));
}

/// A web server answering a token drawn when it started, kept in memory only.
const MEMORY: &str = r#"
import http.server, os
token = os.urandom(8).hex()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(token.encode())
    def log_message(self, *a):
        pass
http.server.HTTPServer(('', 80), H).serve_forever()
"#;

#[test]
fn a_checkpointed_instance_fails_over_with_what_it_had_in_memory() {
    let lab = TestLab::up_with(2, &[], &[("VANE_HOST_GRACE", "2s")]);
    let name = lab.name.clone();
    lab.ok(&["net", "create", "red", "--subnet", "10.10.9.0/24"]);
    let err = lab.fails(&[
        "run",
        "--net",
        "red",
        "--checkpoint-every",
        "1s",
        "--",
        "true",
    ]);
    assert!(err.contains("--restart"), "{err}");
    let err = lab.fails(&[
        "run",
        "--net",
        "red",
        "--restart",
        "always",
        "--checkpoint-every",
        "soon",
        "--",
        "true",
    ]);
    assert!(
        err.contains("invalid checkpoint interval \"soon\""),
        "{err}"
    );
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "mem",
        "--host",
        "h1",
        "--restart",
        "always",
        "--checkpoint-every",
        "1s",
        "--",
        "python3",
        "-c",
        MEMORY,
    ]);
    lab.ok(&[
        "run", "--net", "red", "--name", "client", "--host", "h2", "--", "sleep", "1000",
    ]);
    let token = wait_for_http(&lab, "client", "http://mem/");
    assert_eq!(token.len(), 16, "{token}");
    // A checkpoint taken after the token was drawn (one kept before it, while python was
    // still starting, would restore a program that has yet to draw one).
    let drawn = vane_proto::unix_now();
    assert!(
        wait_until(Duration::from_secs(15), || lab.inspect("mem")
            ["checkpointed"]
            .as_u64()
            .is_some_and(|t| t >= drawn + 2)),
        "no checkpoint kept"
    );
    let failed_at = Instant::now();
    lab.ok(&["lab", "fail", "h1", "--name", &name]);
    assert!(
        wait_until(Duration::from_secs(15), || state_of(&lab, "mem")
            == ("h2".into(), "running".into())),
        "mem did not run on h2 in time: {:?}",
        state_of(&lab, "mem")
    );
    let reason = lab.inspect("mem")["restart_reason"].clone();
    assert_eq!(reason, "host h1 died, restored from its checkpoint");
    let again = wait_for_http(&lab, "client", "http://mem/");
    eprintln!(
        "lab fail h1 -> mem restored on h2, answering after {:?}",
        failed_at.elapsed()
    );
    assert_eq!(
        again,
        token,
        "restarted afresh, not from its checkpoint: {}",
        lab.inspect("mem")
    );
    lab.ok(&["lab", "recover", "h1", "--name", &name]);
    assert_eq!(wait_for_http(&lab, "client", "http://mem/"), token);
    lab.ok(&["rm", "--force", "mem"]);
    let pack = format!("{}/controller/checkpoints", lab.state_dir());
    assert!(
        std::fs::read_dir(&pack).map_or(true, |mut d| d.next().is_none()),
        "the removed instance's checkpoint stays in {pack}"
    );
}
