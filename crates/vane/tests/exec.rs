//! `vane exec` with input and terminals, clients that go away, and `vane logs` that follows
//! or gives the last lines: real clients on a lab, a real pseudo-terminal for `-t`.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::termios::{self, LocalFlags};

use common::{vane_bin, wait_until, TestLab};

fn vane(lab: &TestLab) -> Command {
    let mut c = Command::new(vane_bin());
    c.env("VANE_CONTROLLER", &lab.controller);
    c
}

/// A lab with one net and instance `a`, whose program runs `program` (sh -c).
fn lab_with(subnet: &str, program: &str) -> TestLab {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", subnet]);
    lab.ok(&[
        "run", "--net", "red", "--name", "a", "--", "sh", "-c", program,
    ]);
    lab
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the client did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_with_i_gives_the_program_the_client_s_stdin_and_its_end() {
    let lab = lab_with("10.117.1.0/24", "exec sleep infinity");
    // A pipe: its end is the end of the program's input, so cat ends.
    let mut c = vane(&lab)
        .args(["exec", "-i", "a", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    // More than the pipes and channels hold on the way, through a program that reads and
    // writes at once: nothing is lost or stuck.
    let input: Vec<u8> = (0..200_000)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let mut c = vane(&lab)
        .args(["exec", "-i", "a", "--", "sh", "-c", "cat; echo done >&2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let writer = {
        let input = input.clone();
        std::thread::spawn(move || stdin.write_all(&input).unwrap())
    };
    let mut got = Vec::new();
    c.stdout.take().unwrap().read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(got.len(), input.len());
    assert!(got == input, "the output differs from the input");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "done\n");
    // Without -i the program reads nothing, at once; its exit code is vane's.
    let out = vane(&lab)
        .args([
            "exec",
            "a",
            "--",
            "sh",
            "-c",
            "read x; echo \"[$x]\"; exit 7",
        ])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[]\n");
    assert_eq!(out.status.code(), Some(7));
}

/// `vane exec ARGS` on a new pseudo-terminal of `rows` x `cols`: the client, the terminal's
/// master side (non-blocking), and its slave side (kept to look at the client's settings).
fn on_terminal(lab: &TestLab, args: &[&str], rows: u16, cols: u16) -> (Child, File, OwnedFd) {
    let pty = nix::pty::openpty(None, None).unwrap();
    vane_sys::pty::set_window_size(pty.master.as_fd(), rows, cols).unwrap();
    let child = vane(lab)
        .args(args)
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let master = File::from(pty.master);
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&master),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    (child, master, pty.slave)
}

/// Reads what the client's terminal shows until it holds `needle` (panics after 15 s).
fn read_until(master: &mut File, seen: &mut String, needle: &str) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "waited for {needle:?}, the terminal shows {seen:?}"
        );
        match master.read(&mut buf) {
            Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn exec_with_it_runs_the_program_on_a_terminal_of_the_instance() {
    let lab = lab_with("10.117.2.0/24", "exec sleep infinity");
    let cooked = termios::tcgetattr(nix::pty::openpty(None, None).unwrap().slave.as_fd())
        .unwrap()
        .local_flags;
    assert!(cooked.contains(LocalFlags::ECHO | LocalFlags::ICANON));

    // A command without a prompt: its output, with the terminal's line ends.
    let (mut c, mut master, slave) =
        on_terminal(&lab, &["exec", "-it", "a", "--", "echo", "hello"], 30, 100);
    let mut seen = String::new();
    read_until(&mut master, &mut seen, "hello\r\n");
    assert!(wait_exit(&mut c, Duration::from_secs(15)).success());
    // The client's terminal is as it was.
    let after = termios::tcgetattr(slave.as_fd()).unwrap().local_flags;
    assert!(
        after.contains(LocalFlags::ECHO | LocalFlags::ICANON),
        "{after:?}"
    );

    // A terminal of the instance's own /dev/pts, of the client's size; a new size follows
    // on SIGWINCH.
    let (mut c, mut master, _slave) = on_terminal(
        &lab,
        &[
            "exec",
            "-it",
            "a",
            "--",
            "sh",
            "-c",
            "tty; stty size; read x; stty size",
        ],
        30,
        100,
    );
    let mut seen = String::new();
    read_until(&mut master, &mut seen, "30 100\r\n");
    let tty = seen.lines().next().unwrap().trim();
    assert!(
        tty.strip_prefix("/dev/pts/")
            .is_some_and(|n| n.parse::<u32>().is_ok()),
        "{seen:?}"
    );
    vane_sys::pty::set_window_size(master.as_fd(), 40, 120).unwrap();
    let client = nix::unistd::Pid::from_raw(c.id() as i32);
    // The test's terminal is no one's controlling terminal: the kernel's SIGWINCH is sent
    // by hand.
    nix::sys::signal::kill(client, nix::sys::signal::Signal::SIGWINCH).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    master.write_all(b"\r").unwrap();
    read_until(&mut master, &mut seen, "40 120\r\n");
    assert!(wait_exit(&mut c, Duration::from_secs(15)).success());

    // Ctrl-C is a byte for the instance's terminal, which interrupts the program; its exit
    // code (128 + SIGINT) is vane's.
    let (mut c, mut master, slave) = on_terminal(
        &lab,
        &[
            "exec",
            "-it",
            "a",
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 100",
        ],
        24,
        80,
    );
    let mut seen = String::new();
    read_until(&mut master, &mut seen, "ready");
    let start = Instant::now();
    master.write_all(&[0x03]).unwrap();
    let status = wait_exit(&mut c, Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{seen:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let after = termios::tcgetattr(slave.as_fd()).unwrap().local_flags;
    assert!(
        after.contains(LocalFlags::ECHO | LocalFlags::ICANON),
        "{after:?}"
    );
    // The instance runs on.
    assert_eq!(lab.inspect("a")["state"], "running");
}

/// Whether a process on the host runs `sleep ARG`.
fn sleeping(arg: &str) -> bool {
    let wanted = format!("sleep\0{arg}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| c == wanted.as_bytes())
}

#[test]
fn a_client_that_goes_away_takes_its_command_with_it() {
    let lab = lab_with("10.117.3.0/24", "exec sleep infinity");
    for (i, mode) in [None, Some("-i"), Some("-t")].into_iter().enumerate() {
        let arg = format!("432{i}");
        // The command ignores SIGHUP: SIGKILL ends it after the grace.
        let script = format!("trap '' HUP; exec sleep {arg}");
        let mut args = vec!["exec"];
        args.extend(mode);
        args.extend(["a", "--", "sh", "-c", &script]);
        let mut c = vane(&lab)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(15), || sleeping(&arg)),
            "{mode:?}: the command did not start"
        );
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(
            wait_until(Duration::from_secs(8), || !sleeping(&arg)),
            "{mode:?}: the command outlived its client"
        );
    }
    // Seen from inside too: nothing of them is left in the instance.
    let ps = lab.ok(&["exec", "a", "--", "ps", "-eo", "args"]);
    assert!(!ps.contains("sleep 432"), "{ps}");
    assert_eq!(lab.inspect("a")["state"], "running");
}

#[test]
fn logs_give_the_last_lines_and_follow_until_the_instance_goes() {
    // Five lines at once, then one for each file /tmp/go that exec leaves.
    let lab = lab_with(
        "10.117.4.0/24",
        "for i in 1 2 3 4 5; do echo early $i; done; \
         while sleep 0.1; do if [ -e /tmp/go ]; then rm /tmp/go; echo late; fi; done",
    );
    assert!(wait_until(Duration::from_secs(10), || lab
        .ok(&["logs", "a"])
        .contains("early 5")));
    assert_eq!(lab.ok(&["logs", "--tail", "2", "a"]), "early 4\nearly 5\n");
    assert_eq!(lab.ok(&["logs", "--tail", "0", "a"]), "");
    assert_eq!(lab.ok(&["logs", "--tail", "100", "a"]).lines().count(), 5);

    let mut follow = vane(&lab)
        .args(["logs", "-f", "--tail", "1", "a"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |needle: &str, seen: &mut String| {
        let start = Instant::now();
        while !seen.contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "waited for {needle:?}, got {seen:?}"
            );
            if let Ok(b) = rx.recv_timeout(Duration::from_millis(100)) {
                seen.push_str(&String::from_utf8_lossy(&b));
            }
        }
    };
    wait_for("early 5\n", &mut seen);
    // Written after the follow started.
    lab.ok(&["exec", "a", "--", "touch", "/tmp/go"]);
    wait_for("late\n", &mut seen);
    lab.ok(&["exec", "a", "--", "touch", "/tmp/go"]);
    wait_for("late\nlate\n", &mut seen);
    assert_eq!(seen, "early 5\nlate\nlate\n");
    // Removing the instance ends the follow, successfully.
    lab.ok(&["rm", "a"]);
    assert!(wait_exit(&mut follow, Duration::from_secs(10)).success());
}

#[test]
fn a_tenant_cannot_exec_into_another_tenant_s_instance() {
    let lab = TestLab::up(1);
    for (net, subnet, tenant) in [
        ("a-net", "10.117.5.0/24", "a"),
        ("b-net", "10.117.6.0/24", "b"),
    ] {
        lab.ok(&["net", "create", net, "--subnet", subnet, "--tenant", tenant]);
    }
    lab.ok(&[
        "run", "--net", "b-net", "--name", "b1", "--", "sleep", "infinity",
    ]);
    lab.ok(&[
        "run", "--net", "a-net", "--name", "a1", "--", "sleep", "infinity",
    ]);
    let cred = lab
        .ok(&["token", "create", "--tenant", "a"])
        .trim()
        .to_string();
    let as_a = |token: &str, args: &[&str]| {
        let (mut c, mut master, _slave) = {
            let pty = nix::pty::openpty(None, None).unwrap();
            let child = vane(&lab)
                .env("VANE_TOKEN", token)
                .args(args)
                .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
                .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
                .stderr(Stdio::from(pty.slave.try_clone().unwrap()))
                .spawn()
                .unwrap();
            (child, File::from(pty.master), pty.slave)
        };
        let status = wait_exit(&mut c, Duration::from_secs(15));
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&master),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let mut seen = Vec::new();
        let _ = master.read_to_end(&mut seen);
        (status, String::from_utf8_lossy(&seen).into_owned())
    };
    // Its own instance: a terminal there.
    let (status, seen) = as_a(&cred, &["exec", "-it", "a1", "--", "tty"]);
    assert!(status.success() && seen.contains("/dev/pts/"), "{seen:?}");
    // Another tenant's: refused before anything runs, one line; -i alike.
    for args in [
        &["exec", "-it", "b1", "--", "sh", "-c", "echo pwned"][..],
        &["exec", "-i", "b1", "--", "sh", "-c", "echo pwned"][..],
    ] {
        let (status, seen) = as_a(&cred, args);
        assert_eq!(status.code(), Some(1), "{args:?}: {seen:?}");
        assert!(seen.contains("another tenant"), "{args:?}: {seen:?}");
        assert!(!seen.contains("pwned"), "{seen:?}");
        assert_eq!(seen.trim().lines().count(), 1, "{seen:?}");
    }
    // Without a known credential: refused as well.
    let (status, seen) = as_a("vanetenant-forged", &["exec", "-it", "a1", "--", "true"]);
    assert_eq!(status.code(), Some(1));
    assert!(seen.contains("does not accept this credential"), "{seen:?}");
    assert_eq!(lab.inspect("b1")["state"], "running");
}
