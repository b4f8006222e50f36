//! The instance as a sandbox, attacked from inside: root in an instance tries what a root
//! program would to reach the host (write its files, read its keys, make and read devices,
//! change kernel settings, mount, load modules, trace, enter cgroups, trick the agent with
//! links and forged records), and every attempt fails and leaves the host as it was.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{host_uid, wait_until, TestLab};

fn lab_with_net(hosts: u8) -> TestLab {
    let lab = TestLab::up(hosts);
    lab.ok(&["net", "create", "t", "--subnet", "10.70.0.0/24"]);
    lab
}

/// Runs `script` as root inside `name`; returns whether it succeeded and what it printed.
fn inside(lab: &TestLab, name: &str, script: &str) -> (bool, String) {
    let out = lab.run(&["exec", name, "--", "sh", "-c", script]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Each attempt must fail; says which did not.
fn all_fail(lab: &TestLab, name: &str, attempts: &[(&str, &str)]) {
    let mut escaped = Vec::new();
    for (what, script) in attempts {
        let (ok, text) = inside(lab, name, script);
        if ok {
            escaped.push(format!("{what}: {text}"));
        }
    }
    assert!(escaped.is_empty(), "escapes: {escaped:#?}");
}

fn agent_dir(lab: &TestLab, host: u8) -> String {
    format!("{}/hosts/h{host}", lab.state_dir())
}

#[test]
fn root_inside_cannot_touch_the_host() {
    let lab = lab_with_net(1);
    lab.ok(&[
        "run", "--net", "t", "--name", "x", "--", "sleep", "infinity",
    ]);
    let pid = lab.inspect("x")["pid"].as_u64().expect("pid");
    // Root inside is an unprivileged id outside.
    let uid = host_uid(pid);
    assert!(uid >= 65_536, "the program runs as host uid {uid}");
    let (ok, id) = inside(&lab, "x", "id -u");
    assert!(ok && id.trim() == "0", "{id}");

    let tag = &lab.name;
    let key = format!("{}/host.json", agent_dir(&lab, 1));
    let core_pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let host_disk = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/dev/vda")
        .to_string();
    let (major, minor) = {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&host_disk).map(|m| m.rdev()).unwrap_or(0);
        (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
    };
    let attempts = [
        (
            "write the host's binaries",
            format!("touch /usr/local/bin/escape-{tag}"),
        ),
        ("write the host's /etc", format!("touch /etc/escape-{tag}")),
        (
            "write vane's state",
            format!("touch /var/lib/vane/escape-{tag}"),
        ),
        ("read the host's key", format!("cat {key}")),
        ("list vane's state", "ls /var/lib/vane/labs".into()),
        ("read /etc/shadow", "cat /etc/shadow".into()),
        (
            "make a block device",
            format!("mknod /tmp/disk b {major} {minor}"),
        ),
        ("read the host's disk", format!("head -c 512 {host_disk}")),
        (
            "find the host's devices",
            "ls /dev/kvm || ls /dev/loop0 || ls /dev/vda || ls /dev/sda".into(),
        ),
        (
            "write core_pattern",
            "echo '|/tmp/evil' > /proc/sys/kernel/core_pattern".into(),
        ),
        (
            "write a kernel setting",
            "echo 1 > /proc/sys/vm/drop_caches".into(),
        ),
        (
            "trigger sysrq",
            "test -e /proc/sysrq-trigger && echo h > /proc/sysrq-trigger".into(),
        ),
        (
            "mount the host's disk",
            format!("mkdir -p /tmp/m && mount {host_disk} /tmp/m"),
        ),
        ("mount a tmpfs", "mount -t tmpfs x /tmp".into()),
        ("remount the root writable", "mount -o remount,rw /".into()),
        (
            "unmount the mask over vane's state",
            "umount /var/lib/vane".into(),
        ),
        (
            "mount the host's cgroups",
            "mkdir -p /tmp/cg && mount -t cgroup -o memory cg /tmp/cg".into(),
        ),
        (
            "join the host's cgroups",
            "echo $$ > /sys/fs/cgroup/memory/cgroup.procs || echo $$ > /sys/fs/cgroup/cgroup.procs"
                .into(),
        ),
        (
            "load a module",
            "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); \
             sys.exit(0 if l.syscall(313, 0, b\"\", 0) == 0 or ctypes.get_errno() not in (1,) else 1)'"
                .into(),
        ),
        (
            "trace init, which holds what the program does not",
            "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); \
             sys.exit(0 if l.ptrace(16, 1, 0, 0) == 0 else 1)'"
                .into(),
        ),
        (
            "see the host's processes",
            "test $(ls /proc | grep -c '^[0-9]') -gt 20".into(),
        ),
        (
            "a user namespace of its own",
            "unshare -U -r true".into(),
        ),
        (
            "the kernel's keyring",
            "python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); \
             sys.exit(0 if l.syscall(250, 0, 0, 0, 0, 0) >= 0 else 1)'"
                .into(),
        ),
    ];
    let attempts: Vec<(&str, &str)> = attempts.iter().map(|(w, s)| (*w, s.as_str())).collect();
    all_fail(&lab, "x", &attempts);

    // The host is as it was.
    for p in [
        format!("/usr/local/bin/escape-{tag}"),
        format!("/etc/escape-{tag}"),
        format!("/var/lib/vane/escape-{tag}"),
    ] {
        assert!(!Path::new(&p).exists(), "{p} was made");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(),
        core_pattern
    );
    // What the instance may write, it writes: its /tmp, /run, /dev/shm, state directory.
    let (ok, text) = inside(
        &lab,
        "x",
        "echo a > /tmp/a && echo b > /run/b && echo c > /dev/shm/c && echo d > /tmp/.vane/d \
         && cat /proc/self/status | grep -E '^(CapBnd|Seccomp):'",
    );
    assert!(ok, "{text}");
    assert!(text.contains("00000000a80425fb"), "{text}");
    assert!(text.contains("Seccomp:\t2"), "{text}");
}

#[test]
fn the_agent_follows_no_link_and_trusts_no_file_the_instance_writes() {
    let lab = lab_with_net(1);
    lab.ok(&[
        "run",
        "--net",
        "t",
        "--name",
        "x",
        "--ip",
        "10.70.0.5",
        "--",
        "sh",
        "-c",
        "echo started; exec sleep infinity",
    ]);
    assert!(wait_until(Duration::from_secs(5), || lab
        .ok(&["logs", "x"])
        .contains("started")));
    // The host's key and credential behind a link in place of the log.
    let key = format!("{}/host.json", agent_dir(&lab, 1));
    let secret = std::fs::read_to_string(&key).expect("host key");
    let private = secret
        .split('"')
        .skip_while(|s| *s != "private_key")
        .nth(2)
        .expect("private key")
        .to_string();
    let (ok, text) = inside(&lab, "x", &format!("ln -sf {key} /tmp/.vane/output.log"));
    assert!(ok, "{text}");
    let logs = lab.run(&["logs", "x"]);
    let printed = String::from_utf8_lossy(&logs.stdout);
    assert!(
        !printed.contains(&private),
        "vane logs printed the host's key"
    );
    // A FIFO in its place does not hang the agent.
    let (ok, text) = inside(
        &lab,
        "x",
        "rm -f /tmp/.vane/output.log && mkfifo /tmp/.vane/output.log",
    );
    assert!(ok, "{text}");
    let start = std::time::Instant::now();
    let _ = lab.run(&["logs", "x"]);
    assert!(start.elapsed() < Duration::from_secs(10));
    // The agent's record is out of reach; a forged one where the instance writes changes
    // nothing, even after an agent restart.
    let (ok, _) = inside(&lab, "x", "ls /tmp/.vane/instance.json");
    assert!(!ok, "the record is visible inside");
    let (ok, text) = inside(
        &lab,
        "x",
        "echo '{\"spec\":{\"ip\":\"10.70.0.99\"}}' > /tmp/.vane/instance.json \
         && ln -sf /etc/passwd /tmp/.vane/hosts && echo forged > /tmp/.vane/exit.json",
    );
    assert!(ok, "{text}");
    lab.kill("h1");
    lab.restart();
    assert!(wait_until(Duration::from_secs(10), || {
        lab.inspect("x")["state"] == "running"
    }));
    assert_eq!(lab.inspect("x")["ip"], "10.70.0.5");
    let (ok, text) = inside(&lab, "x", "cat /etc/hosts");
    assert!(
        ok && text.contains("10.70.0.5") && !text.contains("root:"),
        "{text}"
    );
    // The state files the agent keeps are root's alone.
    use std::os::unix::fs::PermissionsExt;
    let instances = format!("{}/instances", agent_dir(&lab, 1));
    let mode = std::fs::metadata(&instances).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{instances}");
    let id = lab.inspect("x")["id"].as_str().unwrap().to_string();
    for f in ["instance.json", "launch.json"] {
        let p = format!("{instances}/{id}/{f}");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{p}");
    }
}

#[test]
fn capabilities_follow_cap_add_and_cap_drop_and_privileged_is_explicit() {
    let lab = lab_with_net(1);
    lab.ok(&[
        "run", "--net", "t", "--name", "plain", "--", "sleep", "infinity",
    ]);
    lab.ok(&[
        "run",
        "--net",
        "t",
        "--name",
        "admin",
        "--cap-add",
        "NET_ADMIN",
        "--cap-drop",
        "NET_RAW",
        "--",
        "sleep",
        "infinity",
    ]);
    lab.ok(&[
        "run",
        "--net",
        "t",
        "--name",
        "trusted",
        "--privileged",
        "--",
        "sleep",
        "infinity",
    ]);
    // Raw sockets by default, network administration only when asked.
    let (ok, text) = inside(&lab, "plain", "ping -c1 -W1 127.0.0.1");
    assert!(ok, "{text}");
    let (ok, _) = inside(&lab, "plain", "ip link set lo mtu 1280");
    assert!(!ok, "NET_ADMIN without asking");
    let (ok, text) = inside(&lab, "admin", "ip link set lo mtu 1280");
    assert!(ok, "{text}");
    let (ok, _) = inside(&lab, "admin", "ping -c1 -W1 127.0.0.1");
    assert!(!ok, "NET_RAW after --cap-drop");
    // Privileged: shown, and root inside is root outside.
    let ps = lab.ok(&["ps"]);
    let line = ps.lines().find(|l| l.starts_with("trusted")).unwrap();
    assert!(line.contains("(privileged)"), "{ps}");
    assert!(!ps
        .lines()
        .find(|l| l.starts_with("plain"))
        .unwrap()
        .contains("privileged"));
    assert_eq!(lab.inspect("trusted")["space"]["privileged"], true);
    let pid = lab.inspect("trusted")["pid"].as_u64().unwrap();
    assert_eq!(host_uid(pid), 0);
    // Bad input: one line naming it, nothing made.
    let e = lab.fails(&[
        "run",
        "--net",
        "t",
        "--name",
        "bad",
        "--cap-add",
        "SYS_FOO",
        "--",
        "true",
    ]);
    assert!(e.contains("SYS_FOO") && e.lines().count() == 1, "{e}");
    assert!(lab.run(&["inspect", "bad"]).status.code() != Some(0));
}

#[test]
fn a_chatty_program_s_log_is_capped_and_rotated() {
    let cap: u64 = 1 << 20;
    let lab = TestLab::up_with(1, &[], &[("VANE_LOG_CAP", &cap.to_string())]);
    lab.ok(&["net", "create", "t", "--subnet", "10.70.1.0/24"]);
    lab.ok(&[
        "run",
        "--net",
        "t",
        "--name",
        "chatty",
        "--",
        "sh",
        "-c",
        "yes 0123456789abcdef | head -c 20000000; echo END-OF-CHATTER; exec sleep infinity",
    ]);
    let id = lab.inspect("chatty")["id"].as_str().unwrap().to_string();
    let shared = format!("{}/hosts/h1/instances/{id}/shared", lab.state_dir());
    let size = |f: &str| std::fs::metadata(format!("{shared}/{f}")).map_or(0, |m| m.len());
    assert!(
        wait_until(Duration::from_secs(20), || {
            size("output.log.1") > 0 && size("output.log") <= cap
        }),
        "output.log is {} bytes",
        size("output.log")
    );
    assert!(size("output.log.1") <= cap / 2);
    // What it said last is still there for `vane logs`, whose output is bounded too.
    let logs = lab.ok(&["logs", "chatty"]);
    assert!(logs.contains("END-OF-CHATTER"));
    assert!((logs.len() as u64) <= cap + cap / 2, "{} bytes", logs.len());
}
