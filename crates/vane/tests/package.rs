//! The Debian package of scripts/package.sh as an operator meets it: what it holds, its
//! systemd units as `systemd-analyze verify` reads them, and dpkg installing it into a root
//! of its own (this machine's /usr stays untouched). From there the packaged controller
//! starts on its controller.toml, and the packaged agent on its agent.toml alone (edited
//! to a lab's values, as an operator edits /etc/vane/agent.toml) joins the lab as one more
//! host in a network namespace of its own. Both tell a service manager they are ready,
//! over a `$NOTIFY_SOCKET` this test holds, as `Type=notify` units need.

mod common;

use std::io::Write as _;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{vane_bin, wait_until, TestLab};

/// Runs `cmd`, panicking with its stderr if it fails; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A daemon this test started: stopped (SIGTERM, then SIGKILL) when dropped, even when
/// the test fails.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(cmd: &mut Command, log: &Path) -> Daemon {
        let out = std::fs::File::create(log).expect("create the daemon's log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    /// SIGTERM, and whether it then ended by itself within 10 s.
    fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// A `$NOTIFY_SOCKET` in the abstract namespace, as a service manager holds one.
struct NotifySocket {
    name: String,
    sock: UnixDatagram,
}

impl NotifySocket {
    fn new(what: &str) -> NotifySocket {
        let name = format!("vane-test-notify-{}-{what}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        NotifySocket { name, sock }
    }

    fn env(&self) -> String {
        format!("@{}", self.name)
    }

    /// Waits up to `limit` for READY=1 from `daemon`, failing at once if it ends.
    fn wait_ready(&self, daemon: &mut Daemon, limit: Duration) {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        while start.elapsed() < limit {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "the daemon ended ({status}) before it was ready:\n{}",
                    daemon.log()
                );
            }
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]);
                assert_eq!(msg, "READY=1", "what the daemon told the service manager");
                return;
            }
        }
        panic!(
            "the daemon told no readiness within {limit:?}:\n{}",
            daemon.log()
        );
    }
}

/// `text` with the commented example line of `key` (`#key = ...`) set to `value`: the
/// example files show every key, so an operator uncomments and edits.
fn set(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("#{key} = ");
    assert!(
        text.lines().any(|l| l.starts_with(&prefix)),
        "the example file shows no {key:?}"
    );
    text.lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the package from the binary under test (no release build), uncompressed: what
/// is checked is its contents.
fn build_package(dir: &Path) -> PathBuf {
    let out = ok(Command::new("bash")
        .arg(repo().join("scripts/package.sh"))
        .env("VANE_BIN", vane_bin())
        .env("VANE_DEB_DIR", dir)
        .env("VANE_DEB_COMPRESSION", "none"));
    let deb = PathBuf::from(out.lines().last().expect("package.sh prints the package"));
    let arch = ok(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("vane_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim())
    );
    deb
}

#[test]
fn package_installs_and_its_agent_joins_a_lab() {
    let lab = TestLab::up(1);
    let work = tempfile::Builder::new()
        .prefix("vane-package-")
        .tempdir()
        .expect("temporary directory");
    let deb = build_package(work.path());

    // What the package says of itself and holds.
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for line in [
        "Package: vane",
        &format!("Version: {}", env!("CARGO_PKG_VERSION")),
        "Depends: libc6 (>= 2.",
        "iproute2, nftables",
        "Recommends: criu (>= 4.2)",
        " conffiles",
        " postinst",
    ] {
        assert!(
            info.contains(line),
            "dpkg-deb --info shows no {line:?}:\n{info}"
        );
    }
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("the package holds no {path}:\n{contents}"))
            .to_string()
    };
    for path in [
        "/usr/bin/vane",
        "/lib/systemd/system/vane-controller.service",
        "/lib/systemd/system/vane-agent.service",
        "/etc/vane/controller.toml",
        "/usr/share/bash-completion/completions/vane",
        "/usr/share/zsh/vendor-completions/_vane",
        "/usr/share/fish/vendor_completions.d/vane.fish",
        "/usr/share/man/man1/vane.1.gz",
        "/usr/share/man/man1/vane-agent.1.gz",
        "/usr/share/man/man1/vane-controller.1.gz",
        "/usr/share/man/man1/vane-net-create.1.gz",
        "/usr/share/doc/vane/copyright",
        "/usr/share/doc/vane/README.md.gz",
    ] {
        let line = entry(path);
        assert!(line.contains(" root/root "), "not root's: {line}");
    }
    let top = contents.lines().next().unwrap_or_default();
    assert!(
        top.starts_with("drwxr-xr-x root/root ") && top.ends_with(" ./"),
        "the archive's root is not /'s mode: {top}"
    );
    // The agent's settings will hold a join token.
    assert!(entry("/etc/vane/agent.toml").starts_with("-rw------- root/root "));
    assert!(entry("/usr/bin/vane").starts_with("-rwxr-xr-x "));

    // Installed by dpkg into a root of its own. Its maintainer scripts run outside it
    // (there is no shell inside) and leave this machine's services alone; the root has
    // none of the packages vane depends on, so dpkg is told to go on without them.
    let root = work.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("dpkg's database");
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").expect("dpkg status");
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", work.path().join("dpkg.log").display()))
        .args(["--force-script-chrootless", "--force-depends", "-i"])
        .arg(&deb));
    let status = ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "vane"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(
        status.contains(" /etc/vane/agent.toml "),
        "conffiles: {status}"
    );
    let agent_conf = root.join("etc/vane/agent.toml");
    let mode = std::fs::metadata(&agent_conf).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "agent.toml's mode");

    // The units as systemd reads them. This machine does not run systemd, and verify
    // wants the binary a unit starts to exist: it reads copies of the installed units
    // whose ExecStart names the installed binary, against this machine's own units (the
    // private root has no sysinit.target). Warnings go to stderr with a status of 0, so
    // stderr has to be empty. The man pages named in Documentation= are checked above.
    let units = work.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let vane = root.join("usr/bin/vane");
    let mut copies = Vec::new();
    for (unit, daemon) in [
        ("vane-controller.service", "controller"),
        ("vane-agent.service", "agent"),
    ] {
        let text = std::fs::read_to_string(root.join("lib/systemd/system").join(unit)).unwrap();
        let exec = format!("ExecStart=/usr/bin/vane {daemon} --config /etc/vane/{daemon}.toml\n");
        assert!(text.contains(&exec), "{unit} starts {exec:?}");
        assert!(text.contains("\nType=notify\n"), "{unit} is Type=notify");
        let text = text.replace(
            "ExecStart=/usr/bin/vane ",
            &format!("ExecStart={} ", vane.display()),
        );
        std::fs::write(units.join(unit), text).unwrap();
        copies.push(units.join(unit));
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&copies)
        .output()
        .expect("run systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // The controller's sandbox stays as tight as it is (exposure 2.1 of 10 when written;
    // the threshold is in tenths). The agent's is open on purpose: see its unit.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=25"])
        .arg(&copies[0])
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success(),
        "the controller's unit lost some of its sandbox:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The packaged controller, on its own settings: ready once it listens.
    let conf = std::fs::read_to_string(root.join("etc/vane/controller.toml")).unwrap();
    let conf = set(&conf, "listen", "\"127.0.0.1:0\"");
    let conf = set(
        &conf,
        "data-dir",
        &format!("\"{}\"", work.path().join("controller").display()),
    );
    std::fs::write(root.join("etc/vane/controller.toml"), conf).unwrap();
    let notify = NotifySocket::new("controller");
    let mut controller = Daemon::start(
        Command::new(&vane)
            .arg("controller")
            .arg("--config")
            .arg(root.join("etc/vane/controller.toml"))
            .env("NOTIFY_SOCKET", notify.env()),
        &work.path().join("controller.log"),
    );
    notify.wait_ready(&mut controller, Duration::from_secs(20));
    assert!(
        controller.stop(),
        "the controller did not stop cleanly:\n{}",
        controller.log()
    );

    // The packaged agent: one more host of the lab in a namespace of its own, made as the
    // lab makes its hosts and named as the lab's second would be, so that `lab down`
    // removes it (and stops the agent, through the pid file) even after a crash.
    let (ns, veth) = (lab.netns(2), lab.veth(2));
    ok(Command::new("ip").args(["netns", "add", &ns]));
    ok(Command::new("ip").args([
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]));
    ok(Command::new("ip").args(["link", "set", &veth, "master", &lab.bridge(), "up"]));
    let mut batch = Command::new("ip");
    batch.args(["-n", &ns, "-batch", "-"]).stdin(Stdio::piped());
    let mut ip = batch.spawn().expect("run ip");
    write!(
        ip.stdin.take().unwrap(),
        "link set lo up\nlink set eth0 up\naddr add {}/24 dev eth0\nroute add default via {}\n",
        lab.host_addr(2),
        lab.gateway()
    )
    .unwrap();
    assert!(ip.wait().unwrap().success(), "configure {ns}");

    let token = lab.ok(&["host", "token"]);
    let conf = std::fs::read_to_string(&agent_conf).unwrap();
    let conf = set(&conf, "name", "\"pkg\"");
    let conf = set(&conf, "controller", &format!("\"{}\"", lab.controller));
    let conf = set(&conf, "join", &format!("\"{}\"", token.trim()));
    let conf = set(
        &conf,
        "state-dir",
        &format!("\"{}/hosts/h2\"", lab.state_dir()),
    );
    let conf = set(&conf, "netns", &format!("\"{ns}\""));
    std::fs::write(&agent_conf, conf).unwrap();
    let notify = NotifySocket::new("agent");
    let mut agent = Daemon::start(
        Command::new(&vane)
            .arg("agent")
            .arg("--config")
            .arg(&agent_conf)
            // Its settings come from the file alone.
            .env_remove("VANE_CONTROLLER")
            .env_remove("VANE_JOIN_TOKEN")
            .env("NOTIFY_SOCKET", notify.env()),
        // Shown with the lab's logs if the test fails.
        Path::new(&format!("{}/h2.log", lab.state_dir())),
    );
    std::fs::write(
        format!("{}/h2.pid", lab.state_dir()),
        agent.child.id().to_string(),
    )
    .expect("pid file");
    // Ready only once the controller has welcomed it.
    notify.wait_ready(&mut agent, Duration::from_secs(30));
    let online = || {
        let hosts: serde_json::Value =
            serde_json::from_str(&lab.ok(&["host", "ls", "-o", "json"])).expect("JSON");
        hosts.as_array().expect("a list").iter().any(|h| {
            h["name"] == "pkg"
                && h["state"] == "online"
                && h["locator"]
                    .as_str()
                    .is_some_and(|l| l.starts_with(&format!("{}:", lab.host_addr(2))))
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), online),
        "the packaged agent's host is not online: {}",
        lab.ok(&["host", "ls"])
    );
    assert!(
        agent.stop(),
        "the agent did not stop cleanly:\n{}",
        agent.log()
    );
}

/// A mistake in a config file is one line naming the file and the key, and the daemon
/// does not start.
#[test]
fn a_bad_config_file_is_one_line_and_no_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "name = \"h1\"\ncolour = \"blue\"\n").unwrap();
    for (text, expect) in [
        (
            "name = \"h1\"\ncolour = \"blue\"\n",
            "unknown key \"colour\"",
        ),
        (
            "name = \"h1\"\ntunnel-idle = \"soon\"\n",
            "key \"tunnel-idle\": invalid value \"soon\"",
        ),
        ("name = \"h1\"\nstate_dir = \"/srv\"\n", "\"state-dir\""),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(vane_bin())
            .args(["agent", "--config"])
            .arg(&path)
            .env_remove("VANE_TUNNEL_IDLE")
            .output()
            .expect("run vane");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {text:?}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(&format!("{}: ", path.display())) && stderr.contains(expect),
            "{text:?} gave: {stderr}"
        );
    }
    let out = Command::new(vane_bin())
        .args(["controller", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .expect("run vane");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("read config file") && stderr.contains("missing.toml"),
        "{stderr}"
    );
}
