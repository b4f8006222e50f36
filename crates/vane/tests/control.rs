//! The control plane's trust, attacked: requests without the admin credential or with a
//! wrong one, plain HTTP, and a capture of the underlay while hosts enroll and commands run
//! (the agents' refusal of a controller that fails their pin is in multihost.rs, with the
//! other enrollment refusals).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_until, TestLab};

/// `curl` against the lab's API: (HTTP status, body); status 0 when no HTTP answer came.
fn curl(lab: &TestLab, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let _ = lab;
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn requests_without_the_admin_credential_are_refused_and_change_nothing() {
    let lab = TestLab::up(1);
    let ca = format!("{}/controller/ca.crt", lab.state_dir());
    let url = |path: &str| format!("{}{path}", lab.controller);
    let create = r#"{"name":"evil","subnet":"10.66.0.0/24","tenant":"x"}"#;
    for header in [
        None,
        Some("Authorization: Bearer vaneadmin-0000"),
        Some("Authorization: Basic x"),
    ] {
        let mut args = vec![
            "--cacert",
            &ca,
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
        ];
        if let Some(h) = header {
            args.extend(["-H", h]);
        }
        let target = url("/v1/nets");
        args.extend(["-d", create, &target]);
        let (code, body) = curl(&lab, &args);
        assert_eq!(code, 401, "{header:?}: {body}");
        assert!(body.contains("credential"), "{body}");
        for path in ["/v1/instances", "/v1/hosts", "/v1/status"] {
            let target = url(path);
            let mut args = vec!["--cacert", ca.as_str()];
            if let Some(h) = header {
                args.extend(["-H", h]);
            }
            args.push(&target);
            assert_eq!(curl(&lab, &args).0, 401, "{path} {header:?}");
        }
        let target = url("/v1/hosts/tokens");
        let mut args = vec![
            "--cacert",
            ca.as_str(),
            "-X",
            "POST",
            "-d",
            "{\"ttl_secs\":60}",
        ];
        if let Some(h) = header {
            args.extend(["-H", h]);
        }
        args.push(&target);
        assert_eq!(curl(&lab, &args).0, 401, "tokens {header:?}");
    }
    // Nothing was made.
    assert!(!lab.ok(&["net", "ls"]).contains("evil"));
    // Transfers are claimed with a host's credential: none, the administrator's, or a
    // forged one get nowhere, whatever the ticket.
    let admin =
        std::fs::read_to_string(format!("{}/controller/admin.token", lab.state_dir())).unwrap();
    let admin = format!("Authorization: Bearer {}", admin.trim());
    let transfer = url("/v1/agents/transfers/vanexfer-00");
    for headers in [
        vec![],
        vec!["X-Vane-Host: h1", admin.as_str()],
        vec!["X-Vane-Host: h1", "Authorization: Bearer vanecred-00"],
    ] {
        let mut args = vec!["--cacert", ca.as_str()];
        for h in &headers {
            args.extend(["-H", h]);
        }
        args.push(&transfer);
        assert_eq!(curl(&lab, &args).0, 401, "transfer with {headers:?}");
    }
    // No plain HTTP at all.
    let plain = lab.controller.replacen("https://", "http://", 1);
    let (code, _) = curl(&lab, &[&format!("{plain}/v1/nets")]);
    assert_eq!(code, 0, "plain HTTP answered");
    // And a client that does not know the cluster's CA refuses the controller.
    let (code, _) = curl(&lab, &[&url("/v1/nets")]);
    assert_eq!(
        code, 0,
        "the controller's certificate passed without its CA"
    );
    // The CLI with a wrong credential: one line.
    let out = Command::new(common::vane_bin())
        .args(["net", "ls"])
        .env("VANE_CONTROLLER", &lab.controller)
        .env("VANE_TOKEN", "vaneadmin-0000")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("does not accept this credential"), "{err}");
}

#[test]
fn the_underlay_carries_no_credential_token_or_output_in_clear() {
    let lab = TestLab::up(1);
    let capture = format!("{}/control.pcap", lab.exchange_dir());
    let mut tcpdump = Command::new("tcpdump")
        .args(["-U", "-s", "0", "--immediate-mode", "-i"])
        .arg(lab.bridge())
        // The controller's port, and the agents' (migrations' images, host to host).
        .args([
            "-w", &capture, "tcp", "and", "(port", "7946", "or", "port", "7947)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(1500));
    // A second host enrolls (join token, then its credential), commands run on it.
    lab.grow(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.67.0.0/24"]);
    // Its memory holds a marker that its images carry (built at run time: the command
    // line does not hold it whole).
    let program = "import time; m = ('memory-marker-' + '4713') * 1000; \
                   print('logged-marker-4711', flush=True); time.sleep(1e9)";
    lab.ok(&[
        "run", "--net", "red", "--name", "x", "--host", "h2", "--", "python3", "-c", program,
    ]);
    assert!(wait_until(Duration::from_secs(5), || lab
        .ok(&["logs", "x"])
        .contains("logged-marker-4711")));
    let out = lab.ok(&["exec", "x", "--", "echo", "exec-marker-4712"]);
    assert!(out.contains("exec-marker-4712"));
    // Images cross the underlay too: a snapshot's, and a migration's.
    let snapshot = format!("{}/snap", lab.exchange_dir());
    lab.ok(&["snapshot", "x", "--out", &snapshot]);
    let images = std::fs::read(format!("{snapshot}/images.tar")).unwrap();
    let marker = b"memory-marker-4713memory-marker-4713";
    assert!(
        images.windows(marker.len()).any(|w| w == marker),
        "the images do not hold the marker: the capture would prove nothing"
    );
    lab.ok(&["migrate", "x", "--to", "h1"]);
    std::thread::sleep(Duration::from_millis(500));
    let h1_log = std::fs::read_to_string(format!("{}/h1.log", lab.state_dir())).unwrap();
    assert!(
        h1_log.contains("images received directly"),
        "the migration's images did not go host to host: the capture would not see them"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = tcpdump.wait();
    let bytes = std::fs::read(&capture).expect("capture");
    assert!(bytes.len() > 4096, "the capture saw no control traffic");
    let text = String::from_utf8_lossy(&bytes);
    for secret in [
        "vanejoin-",
        "vanecred-",
        "vaneadmin-",
        "logged-marker-4711",
        "exec-marker-4712",
        "memory-marker-4713memory-marker-4713",
        "public_key",
    ] {
        assert!(
            !text.contains(secret),
            "{secret} crossed the underlay in clear"
        );
    }
}

#[test]
fn join_tokens_are_listed_and_revoked_by_id_and_never_shown_again() {
    let lab = TestLab::up(1);
    let token = lab.ok(&["host", "token", "--ttl", "10m"]);
    let (secret, pin) = token
        .trim()
        .rsplit_once('.')
        .expect("a token carries a pin");
    assert_eq!(pin.len(), 64);
    let list = lab.ok(&["host", "token", "ls"]);
    assert!(!list.contains(secret), "the secret is listed: {list}");
    let line = list
        .lines()
        .find(|l| l.contains("once"))
        .unwrap_or_else(|| panic!("{list}"));
    let id = line.split_whitespace().next().unwrap().to_string();
    assert_eq!(lab.ok(&["host", "token", "rm", &id]).trim(), id);
    assert!(!lab.ok(&["host", "token", "ls"]).contains(&id));
    let e = lab.fails(&["host", "token", "rm", &id]);
    assert!(e.contains("unknown join token"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn a_tenant_credential_reaches_its_own_tenant_only() {
    let lab = TestLab::up(1);
    lab.ok(&[
        "net",
        "create",
        "a-net",
        "--subnet",
        "10.68.1.0/24",
        "--tenant",
        "a",
    ]);
    lab.ok(&[
        "net",
        "create",
        "b-net",
        "--subnet",
        "10.68.2.0/24",
        "--tenant",
        "b",
    ]);
    lab.ok(&[
        "run", "--net", "b-net", "--name", "b1", "--", "sleep", "infinity",
    ]);
    let cred = lab
        .ok(&["token", "create", "--tenant", "a"])
        .trim()
        .to_string();
    assert!(cred.starts_with("vanetenant-"), "{cred}");
    let as_a = |args: &[&str]| {
        Command::new(common::vane_bin())
            .args(args)
            .env("VANE_CONTROLLER", &lab.controller)
            .env("VANE_TOKEN", &cred)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = as_a(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Its own tenant: as usual. A net made without --tenant is its tenant's.
    ok(&[
        "run", "--net", "a-net", "--name", "a1", "--", "sleep", "infinity",
    ]);
    ok(&["net", "create", "a-two", "--subnet", "10.68.4.0/24"]);
    ok(&["policy", "allow", "a-two", "a-net"]);
    let ps = ok(&["ps"]);
    assert!(ps.contains("a1") && !ps.contains("b1"), "{ps}");
    let nets = ok(&["net", "ls"]);
    assert!(nets.contains("a-net") && !nets.contains("b-net"), "{nets}");
    assert_eq!(ok(&["exec", "a1", "--", "hostname"]).trim(), "a1");
    // Another tenant's, and what is the administrator's: refused, one line each.
    let snap = format!("{}/snap", lab.exchange_dir());
    let refused: [&[&str]; 15] = [
        &["inspect", "b1"],
        &["exec", "b1", "--", "true"],
        &["logs", "b1"],
        &["stop", "b1"],
        &["snapshot", "b1", "--out", &snap],
        &["migrate", "b1", "--to", "h1"],
        &["rm", "b1"],
        &["run", "--net", "b-net", "--", "true"],
        &["net", "rm", "b-net"],
        &[
            "net",
            "create",
            "x",
            "--subnet",
            "10.68.3.0/24",
            "--tenant",
            "b",
        ],
        &["policy", "allow", "a-net", "b-net"],
        &["host", "ls"],
        &["host", "token"],
        &["token", "ls"],
        &["token", "create", "--tenant", "a"],
    ];
    for args in refused {
        let out = as_a(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was let through");
        assert!(
            err.contains("another tenant") || err.contains("administrator"),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Nothing of tenant b changed.
    assert_eq!(lab.inspect("b1")["state"], "running");
    assert!(lab.ok(&["net", "ls"]).contains("b-net"));
    assert!(!lab.ok(&["net", "ls"]).contains(" x "));
    // A revoked credential is refused.
    let list = lab.ok(&["token", "ls"]);
    let id = list
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("a"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{list}"))
        .to_string();
    lab.ok(&["token", "rm", &id]);
    let out = as_a(&["ps"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not accept this credential"));
}

#[test]
fn an_evicted_host_is_cut_off_at_once() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.69.0.0/24"]);
    lab.ok(&[
        "run", "--net", "red", "--name", "a", "--host", "h1", "--", "sleep", "infinity",
    ]);
    lab.ok(&[
        "run", "--net", "red", "--name", "b", "--host", "h2", "--", "sleep", "infinity",
    ]);
    let b_ip = lab.inspect("b")["ip"].as_str().unwrap().to_string();
    let ping = |lab: &TestLab| {
        lab.run(&["exec", "a", "--", "ping", "-c", "1", "-W", "1", &b_ip])
            .status
            .success()
    };
    assert!(wait_until(Duration::from_secs(10), || ping(&lab)));
    let h1_peers = |lab: &TestLab| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&lab.ok(&["host", "stats", "h1", "-o", "json"])).unwrap();
        v["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["host"].as_str().map(str::to_string))
            .collect()
    };
    assert!(h1_peers(&lab).contains(&"h2".to_string()));
    let agent = lab.pid_of("h2");
    // Online, with an instance: only --force removes it.
    let e = lab.fails(&["host", "rm", "h2"]);
    assert!(e.contains("online"), "{e}");
    lab.ok(&["host", "rm", "h2", "--force"]);
    // Its agent is told and stops; the other host forgets it; its instance is gone.
    assert!(wait_until(Duration::from_secs(10), || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), None).is_err()
            || std::fs::read_to_string(format!("/proc/{agent}/stat"))
                .is_ok_and(|s| s.contains(") Z"))
    }));
    let log = std::fs::read_to_string(format!("{}/h2.log", lab.state_dir())).unwrap();
    assert!(log.contains("evicted"), "{log}");
    assert!(wait_until(Duration::from_secs(5), || !h1_peers(&lab)
        .contains(&"h2".to_string())));
    assert!(!lab.ok(&["host", "ls"]).contains("h2"));
    assert!(!lab.run(&["inspect", "b"]).status.success());
    assert!(!ping(&lab), "a still reaches the evicted host's instance");
}

/// Output travels at the pace it is read: a command that writes without end, read for a
/// while and then not at all, holds no more than a few MiB in the controller or the agent,
/// and ends when its reader goes away.
#[test]
fn a_command_s_output_is_carried_at_its_reader_s_pace_and_ends_with_it() {
    use std::io::Read;
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.13.0/24"]);
    lab.ok(&[
        "run", "--net", "red", "--name", "x", "--", "sleep", "infinity",
    ]);
    // `yes` with the lab's name: a writer of its own, found by its command line.
    let mut cli = Command::new(common::vane_bin())
        .args(["exec", "x", "--", "yes", &lab.name])
        .env("VANE_CONTROLLER", &lab.controller)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vane exec");
    let mut out = cli.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0usize;
    while read < 128 << 20 {
        let n = out.read(&mut buf).expect("reading the output");
        assert!(n > 0, "the output ended after {read} bytes");
        read += n;
    }
    // The reader stops: the writer must wait, not pile its output up anywhere.
    std::thread::sleep(Duration::from_secs(3));
    for process in ["controller", "h1"] {
        let peak = lab.peak_memory(process);
        assert!(
            peak < 64 << 20,
            "{process} held {} MiB at its peak",
            peak >> 20
        );
    }
    let writer = format!("^yes {}$", lab.name);
    let running = || {
        Command::new("pgrep")
            .args(["-f", &writer])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(running(), "the command is gone while its reader waits");
    drop(out);
    let _ = cli.kill();
    let _ = cli.wait();
    assert!(
        wait_until(Duration::from_secs(10), || !running()),
        "the command outlived its reader"
    );
}
