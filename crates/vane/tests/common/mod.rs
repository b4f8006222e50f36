//! A lab of its own for each test: unique name and underlay, torn down on drop, even when
//! the test fails.

#![allow(dead_code)]

pub mod live;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TestLab {
    pub name: String,
    pub controller: String,
    /// Third octet of the lab's underlay, 198.18.X.0/24.
    pub octet: u8,
}

pub fn vane_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vane")
}

/// Lab tests build network namespaces, devices and nftables rules: they need root. As
/// another user the test binary ends at the first of them, successfully, after saying so
/// (every test in these files is a lab test); `cargo test` then runs the unit tests, those
/// of the node and the workflows among them, without root. CI runs everything as root,
/// where this never happens.
fn require_root() {
    if !nix::unistd::Uid::effective().is_root() {
        use std::io::Write;
        // Straight to the descriptor: the harness captures `eprintln!` of a test.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: the lab tests of this file need root (run scripts/test.sh, or cargo test as root)"
        );
        std::process::exit(0);
    }
}

impl TestLab {
    pub fn up(hosts: u8) -> TestLab {
        TestLab::up_with(hosts, &[], &[])
    }

    /// A lab with extra `lab up` arguments, and environment variables for its daemons
    /// (agent settings such as `VANE_TUNNEL_IDLE`).
    pub fn up_with(hosts: u8, extra: &[&str], env: &[(&str, &str)]) -> TestLab {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Unique within the process by the counter, across runs by the pid.
        let tag = (std::process::id() % 4096) * 16 + n % 16;
        let name = format!("t{tag:x}");
        let octet = (tag % 250 + 2) as u8;
        let mut lab = TestLab {
            controller: format!("https://198.18.{octet}.254:7946"),
            name,
            octet,
        };
        let underlay = format!("198.18.{octet}.0/24");
        let hosts = hosts.to_string();
        let mut args = vec![
            "lab",
            "up",
            "--hosts",
            &hosts,
            "--name",
            &lab.name,
            "--underlay",
            &underlay,
        ];
        args.extend(extra);
        let out = lab.run_with(&args, env);
        assert!(
            out.status.success(),
            "lab up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // All its controller replicas, as the lab lists them.
        let file = std::fs::read(format!("{}/lab.json", lab.state_dir())).expect("lab.json");
        let file: serde_json::Value = serde_json::from_slice(&file).expect("lab.json is JSON");
        lab.controller = file["controller"].as_str().expect("controller").to_string();
        lab
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[])
    }

    /// `run`, with `env` added to vane's environment (and so to the daemons it starts).
    fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(vane_bin())
            .args(args)
            .env("VANE_CONTROLLER", &self.controller)
            .envs(env.iter().copied())
            .output()
            .expect("run vane")
    }

    /// Runs vane and returns its stdout; panics with its stderr if it failed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vane {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs vane, expects it to fail with exactly one error line, and returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "vane {} should have failed, printed {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    pub fn inspect(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["inspect", name])).expect("inspect prints JSON")
    }

    /// Underlay address of lab host `i` (h1 is .1).
    pub fn host_addr(&self, i: u8) -> String {
        format!("198.18.{}.{i}", self.octet)
    }

    pub fn bridge(&self) -> String {
        format!("vb-{}", self.name)
    }

    /// The bridge's port towards lab host `i`.
    pub fn veth(&self, i: u8) -> String {
        format!("vv-{}-{i}", self.name)
    }

    pub fn netns(&self, i: u8) -> String {
        format!("vane-{}-h{i}", self.name)
    }

    pub fn gateway(&self) -> String {
        format!("198.18.{}.254", self.octet)
    }

    pub fn state_dir(&self) -> String {
        format!("/var/lib/vane/labs/{}", self.name)
    }

    /// A host directory the lab's instances see (read-only, as they see the host's root
    /// file system): where a test leaves them files, such as stop files. Not under
    /// /var/lib/vane (hidden from instances) nor /tmp (each has its own).
    pub fn exchange_dir(&self) -> String {
        let dir = format!("/var/tmp/vane-tests/{}", self.name);
        std::fs::create_dir_all(&dir).expect("create the exchange directory");
        dir
    }

    /// The most memory the process of `what` (`controller`, `h1`, ...) has held, in bytes.
    pub fn peak_memory(&self, what: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid_of(what))).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib << 10
    }

    pub fn pid_of(&self, what: &str) -> i32 {
        std::fs::read_to_string(format!("{}/{what}.pid", self.state_dir()))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    /// Kills a lab daemon (controller or hN) the hard way and waits for it to be gone.
    pub fn kill(&self, what: &str) {
        let pid = self.pid_of(what);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        wait_until(Duration::from_secs(5), || ended(pid));
    }

    /// Waits until daemon `what` (which has been told to die) has ended all its threads: a
    /// killed process is not gone at once, and `lab up` restarts only what has.
    pub fn wait_ended(&self, what: &str) {
        let pid = self.pid_of(what);
        let start = std::time::Instant::now();
        assert!(
            wait_until(Duration::from_secs(20), || ended(pid)),
            "{what} (pid {pid}) was to die and still runs: state {:?}",
            leader_state(pid)
        );
        if start.elapsed() > Duration::from_millis(500) {
            eprintln!("{what} took {:?} to end", start.elapsed());
        }
    }

    /// Waits until every lab daemon that has died has ended all its threads.
    fn settle_deaths(&self) {
        let Ok(entries) = std::fs::read_dir(self.state_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let pid = std::fs::read_to_string(e.path())
                .ok()
                .filter(|_| e.path().extension().is_some_and(|x| x == "pid"))
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|p| leader_state(*p).is_none_or(|s| s == 'Z')) {
                assert!(
                    wait_until(Duration::from_secs(10), || ended(pid)),
                    "{} died but its threads did not end",
                    e.path().display()
                );
            }
        }
    }

    /// `lab up` again, with `extra` arguments: restarts what is not running.
    fn up_again(&self, extra: &[&str]) {
        self.up_again_with(extra, &[]);
    }

    /// `up_again`, the daemons it starts given `env`.
    fn up_again_with(&self, extra: &[&str], env: &[(&str, &str)]) {
        self.settle_deaths();
        let underlay = format!("198.18.{}.0/24", self.octet);
        let mut args = vec!["lab", "up", "--name", &self.name, "--underlay", &underlay];
        args.extend(extra);
        let out = self.run_with(&args, env);
        assert!(
            out.status.success(),
            "lab up again failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Brings the lab to `hosts` hosts (new ones enroll with a join token).
    pub fn grow(&self, hosts: u8) {
        self.up_again(&["--hosts", &hosts.to_string()]);
    }

    pub fn restart(&self) {
        self.up_again(&[]);
    }

    /// Restarts what is not running, with `env` in its environment.
    #[allow(dead_code)]
    pub fn restart_with(&self, env: &[(&str, &str)]) {
        self.up_again_with(&[], env);
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the daemons said is gone with the lab: show its end with the failure.
            let dir = self.state_dir();
            let mut logs: Vec<_> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {} (last {} lines)", log.display(), tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(format!("/var/tmp/vane-tests/{}", self.name));
        // The last lab out leaves nothing either.
        let _ = std::fs::remove_dir("/var/tmp/vane-tests");
        let out = Command::new(vane_bin())
            .args(["lab", "down", "--name", &self.name])
            .output()
            .expect("run vane lab down");
        if !out.status.success() {
            eprintln!("lab down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The state of process `pid`'s leader thread (`R`, `S`, `Z`, ...), if it exists.
fn leader_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether process `pid` is gone, or a zombie whose every thread has ended: the leader
/// turns zombie while other threads may still be exiting and holding the daemon's sockets
/// (a restarted agent would then find its UDP port in use).
fn ended(pid: i32) -> bool {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    leader_state(pid).is_none_or(|s| s == 'Z') && threads <= 1
}

/// A UDP server on port 9999 that logs the source address of every datagram.
pub const UDP_SINK: &str = "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 9999))
while True:
    data, addr = s.recvfrom(2048)
    print('from', addr[0], flush=True)
";

/// The host uid a process runs as.
pub fn host_uid(pid: u64) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("uid")
}

pub fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Waits until `name`'s server answers on `url` from inside `client`.
pub fn wait_for_http(lab: &TestLab, client: &str, url: &str) -> String {
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        let out = lab.run(&["exec", client, "--", "curl", "-sf", "-m", "2", url]);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success()
    });
    assert!(ok, "{url} never answered from {client}");
    last
}
