//! The command line's habits, as podman users have them: `-q` for names alone,
//! `--format json` beside `-o json`, tables that keep one line per row whatever a command
//! holds; and daemons' logs as JSON lines for a collector.

mod common;

use common::TestLab;

#[test]
fn listings_print_names_json_and_one_line_per_row() {
    let lab = TestLab::up_with(1, &[], &[("VANE_LOG_FORMAT", "json")]);
    lab.ok(&["net", "create", "n1", "--subnet", "10.61.0.0/24"]);
    lab.ok(&["net", "create", "n2", "--subnet", "10.62.0.0/24"]);
    lab.ok(&["policy", "allow", "n1", "n2", "--port", "80/tcp"]);
    // A command that holds a newline, a tab and an escape sequence that would clear a
    // terminal.
    let script = "echo one\n\techo two; printf '\\033[2J'; sleep infinity";
    lab.ok(&[
        "run", "--net", "n1", "--name", "multi", "--", "sh", "-c", script,
    ]);
    lab.ok(&[
        "run", "--net", "n2", "--name", "plain", "--", "sleep", "infinity",
    ]);

    let ps = lab.ok(&["ps"]);
    assert_eq!(
        ps.lines().count(),
        3,
        "a header and one line per instance:\n{ps}"
    );
    let row = ps
        .lines()
        .find(|l| l.starts_with("multi"))
        .expect("multi's row");
    assert!(
        row.contains(r"echo one\n\techo two"),
        "the command's newline and tab shown escaped: {row}"
    );
    assert!(
        !ps.contains('\u{1b}'),
        "no escape character reaches the terminal"
    );

    let names = |args: &[&str]| -> Vec<String> {
        lab.ok(args).lines().map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(names(&["ps", "-q"]), ["multi", "plain"]);
    assert_eq!(names(&["net", "ls", "--quiet"]), ["n1", "n2"]);
    assert_eq!(names(&["host", "ls", "-q"]), ["h1"]);
    let policies = names(&["policy", "ls", "-q"]);
    assert_eq!(policies.len(), 1);
    assert!(
        policies[0].parse::<u32>().is_ok(),
        "a policy's id: {policies:?}"
    );

    for args in [["ps", "--format", "json"], ["ps", "-o", "json"]] {
        let list: serde_json::Value = serde_json::from_str(&lab.ok(&args)).expect("ps prints JSON");
        let list = list.as_array().expect("a list");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["cmd"][2], script, "JSON keeps the command as it is");
    }
    let inspected: serde_json::Value =
        serde_json::from_str(&lab.ok(&["inspect", "plain", "--format", "json"]))
            .expect("inspect prints JSON");
    assert_eq!(inspected["name"], "plain");

    // The live picture's address, with the admin credential in its fragment.
    let token = std::fs::read_to_string(format!("{}/controller/admin.token", lab.state_dir()))
        .expect("the lab's admin credential");
    assert_eq!(
        lab.ok(&["ui"]).trim(),
        format!("{}/ui#token={}", lab.controller, token.trim())
    );

    let err = lab.fails(&["ps", "-q", "-o", "json"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = lab.fails(&["inspect", "plain", "--format", "table"]);
    assert!(err.contains("invalid value 'table'"), "{err}");

    // The daemons were started with VANE_LOG_FORMAT=json: every line of their logs is one
    // JSON object with a level and a message, as a collector reads them.
    for daemon in ["controller", "h1"] {
        let path = format!("{}/{daemon}.log", lab.state_dir());
        let log = std::fs::read_to_string(&path).expect("the daemon's log");
        let lines: Vec<&str> = log.lines().collect();
        assert!(!lines.is_empty(), "{path} is empty");
        for line in lines {
            let entry: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{path}: not a JSON line ({e}): {line}"));
            assert!(entry["level"].is_string(), "{path}: no level: {line}");
            assert!(entry["message"].is_string(), "{path}: no message: {line}");
            assert!(entry["timestamp"].is_string(), "{path}: no time: {line}");
        }
    }
}

/// Runs `vane ARGS` with stderr on a new terminal and stdout on a pipe, to its end: its
/// status, its stdout, and what the terminal showed.
fn on_terminal(lab: &TestLab, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let pty = nix::pty::openpty(None, None).unwrap();
    let child = {
        // Dropped once spawned: the child holds the terminal's only slave side then, and
        // the master reads its end when the child exits.
        let mut cmd = Command::new(common::vane_bin());
        cmd.args(args)
            .env("VANE_CONTROLLER", &lab.controller)
            .env("TERM", "xterm")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(pty.slave));
        cmd.spawn().expect("run vane")
    };
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut shown = Vec::new();
        // EIO once no slave side is left open.
        let _ = master.read_to_end(&mut shown);
        String::from_utf8_lossy(&shown).into_owned()
    });
    let out = child.wait_with_output().expect("wait for vane");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        reader.join().expect("the terminal's reader"),
    )
}

#[test]
fn long_work_shows_progress_on_a_terminal_and_nothing_in_a_pipe() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "pn", "--subnet", "10.63.0.0/24"]);
    // Some 64 MiB of memory to move: long enough for the progress to be drawn.
    let hold = "b = bytearray(64 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time\ntime.sleep(1e9)";
    lab.ok(&[
        "run", "--net", "pn", "--name", "big", "--host", "h1", "--", "python3", "-c", hold,
    ]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let snap = snap.to_str().unwrap();

    let (status, stdout, shown) = on_terminal(&lab, &["snapshot", "big", "--out", snap]);
    assert!(status.success(), "snapshot failed: {shown}");
    assert!(stdout.starts_with("big: snapshot in "), "{stdout}");
    assert!(
        shown.contains("big: snapshot") && shown.contains("MiB/s"),
        "the snapshot's bytes and rate on the terminal: {shown:?}"
    );

    let (status, stdout, shown) = on_terminal(&lab, &["migrate", "big", "--to", "h2"]);
    assert!(status.success(), "migrate failed: {shown}");
    assert!(stdout.starts_with("big: h1 -> h2, freeze "), "{stdout}");
    assert!(
        shown.contains("big: "),
        "the migration's phase on the terminal: {shown:?}"
    );

    let (status, stdout, shown) =
        on_terminal(&lab, &["restore", snap, "--name", "clone", "--host", "h1"]);
    assert!(status.success(), "restore failed: {shown}");
    assert_eq!(stdout, "clone\n");
    assert!(
        shown.contains("clone: restore [") && shown.contains("left"),
        "a bar of the bytes sent, with the time left: {shown:?}"
    );

    // Piped, or with -o json: the result alone.
    let out = lab.run(&["migrate", "big", "--to", "h1", "-o", "json"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = lab.run(&["snapshot", "clone", "--out", &format!("{snap}2")]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
