//! Resource limits, templates, private views and path rules, measured for real on a lab of
//! one host. Run as root (`cargo test -p vane --test limits`).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use common::{wait_until, TestLab};

/// Measurements of CPU and throughput take turns, so that two of them do not share the
/// machine's cores and skew each other.
static MEASURE: Mutex<()> = Mutex::new(());

fn measuring() -> std::sync::MutexGuard<'static, ()> {
    MEASURE.lock().unwrap_or_else(|e| e.into_inner())
}

fn lab_with_net(subnet: &str) -> TestLab {
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", subnet]);
    lab
}

fn run(lab: &TestLab, args: &[&str]) -> String {
    let mut all = vec!["run", "--net", "red"];
    all.extend(args);
    lab.ok(&all).trim().to_string()
}

fn stats(lab: &TestLab, name: &str) -> serde_json::Value {
    serde_json::from_str(&lab.ok(&["stats", name, "-o", "json"])).expect("stats prints JSON")
}

/// The instance's cgroup directory holding `file` (v1: the controller's hierarchy; v2: the
/// one hierarchy).
fn cgroup_file(lab: &TestLab, name: &str, file: &str) -> PathBuf {
    find_cgroup_file(lab, name, file).unwrap_or_else(|| panic!("no cgroup file {file} for {name}"))
}

fn find_cgroup_file(lab: &TestLab, name: &str, file: &str) -> Option<PathBuf> {
    let id = lab.inspect(name)["id"].as_str().unwrap().to_string();
    let controller = file.split('.').next().unwrap();
    [
        format!("/sys/fs/cgroup/{controller}/vane/{id}/{file}"),
        format!("/sys/fs/cgroup/cpu,cpuacct/vane/{id}/{file}"),
        format!("/sys/fs/cgroup/vane/{id}/{file}"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn over_the_memory_limit_only_that_instance_stops_out_of_memory() {
    let lab = lab_with_net("10.40.1.0/24");
    run(&lab, &["--name", "sibling", "--", "sleep", "infinity"]);
    run(
        &lab,
        &[
            "--name",
            "hog",
            "--memory",
            "64M",
            "--",
            "python3",
            "-c",
            "x = []\nwhile True: x.append(b'x' * (1 << 20))",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || lab.inspect("hog")["state"]
            == "exited"),
        "the hog never stopped"
    );
    let hog = lab.inspect("hog");
    assert_eq!(hog["exit"]["oom"], true, "{hog}");
    assert_eq!(hog["limits"]["memory"], 64u64 << 20);
    let ps = lab.ok(&["ps"]);
    let line = ps.lines().find(|l| l.starts_with("hog ")).unwrap();
    assert!(line.contains("exited (out of memory)"), "{ps}");
    assert_eq!(lab.inspect("sibling")["state"], "running");
    assert_eq!(
        lab.ok(&["exec", "sibling", "--", "echo", "alive"]).trim(),
        "alive"
    );
}

#[test]
fn a_fork_past_the_pids_limit_fails() {
    let lab = lab_with_net("10.40.2.0/24");
    let prog = "import errno, os, time\n\
                n = 0\n\
                try:\n\
                \x20   while True:\n\
                \x20       if os.fork() == 0:\n\
                \x20           time.sleep(60)\n\
                \x20           os._exit(0)\n\
                \x20       n += 1\n\
                except OSError as e:\n\
                \x20   print('fork failed', errno.errorcode[e.errno], 'after', n, flush=True)\n\
                time.sleep(60)\n";
    run(
        &lab,
        &[
            "--name", "forker", "--pids", "20", "--", "python3", "-c", prog,
        ],
    );
    let mut logs = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            logs = lab.ok(&["logs", "forker"]);
            logs.contains("fork failed")
        }),
        "no fork failed: {logs}"
    );
    assert!(logs.contains("fork failed EAGAIN"), "{logs}");
    let n: u32 = logs.split_whitespace().last().unwrap().parse().unwrap();
    // 20 in all: init and the program take two.
    assert!((10..=18).contains(&n), "{logs}");
    assert_eq!(read(&cgroup_file(&lab, "forker", "pids.max")), "20");
    let s = stats(&lab, "forker");
    let pids = s["usage"]["pids"].as_u64().unwrap();
    assert!((12..=20).contains(&pids), "{s}");
}

#[test]
fn a_busy_loop_stays_within_its_cpu_quota() {
    let lab = lab_with_net("10.40.3.0/24");
    run(
        &lab,
        &[
            "--name",
            "busy",
            "--cpus",
            "0.5",
            "--",
            "sh",
            "-c",
            "while :; do :; done",
        ],
    );
    let _turn = measuring();
    let usec = |lab: &TestLab| stats(lab, "busy")["usage"]["cpu_usec"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Never above the quota; at it, unless something else on this shared machine took the
    // cores for a while (then measure again, at most three times).
    let mut shares = Vec::new();
    for _ in 0..3 {
        let (u0, t0) = (usec(&lab), std::time::Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let (u1, t1) = (usec(&lab), std::time::Instant::now());
        let share = (u1 - u0) as f64 / 1e6 / (t1 - t0).as_secs_f64();
        assert!(
            share <= 0.5 * 1.15,
            "a busy loop limited to 0.5 CPU used {share:.3} CPU"
        );
        shares.push(share);
        if share >= 0.5 * 0.85 {
            break;
        }
    }
    assert!(
        shares.iter().any(|s| *s >= 0.5 * 0.85),
        "a busy loop limited to 0.5 CPU got only {shares:.3?} CPU"
    );
    // `vane top` shows the same.
    let top: Vec<serde_json::Value> =
        serde_json::from_str(&lab.ok(&["top", "--interval", "2", "-o", "json"])).unwrap();
    let cpu = top[0]["cpu_percent"].as_f64().unwrap();
    assert!((42.5..=57.5).contains(&cpu), "top says {cpu}%");
}

/// iperf3 from `client` to `server` for 3 s; bits per second received.
fn iperf(lab: &TestLab, client: &str, server: &str, reverse: bool) -> f64 {
    let mut args = vec![
        "exec", client, "--", "iperf3", "-c", server, "-t", "3", "-J",
    ];
    if reverse {
        args.push("-R");
    }
    let mut out = String::new();
    // The server may take a moment to listen.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let o = lab.run(&args);
            out = String::from_utf8_lossy(&o.stdout).into_owned();
            o.status.success()
        }),
        "iperf3 failed: {out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 -J prints JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("received rate")
}

/// Measures with `measure` until the rate is within 15% of `limit`: never above it, and
/// below it at most twice (a loaded machine may not reach the limit every time).
fn assert_near(mut measure: impl FnMut() -> f64, limit: f64, what: &str) {
    let mut got = Vec::new();
    for _ in 0..3 {
        let rate = measure();
        assert!(
            rate <= limit * 1.15,
            "{what}: {:.1} Mbit/s through a {:.0} Mbit/s limit",
            rate / 1e6,
            limit / 1e6
        );
        got.push(rate / 1e6);
        if rate >= limit * 0.85 {
            return;
        }
    }
    panic!(
        "{what}: only {got:.1?} Mbit/s through a {:.0} Mbit/s limit",
        limit / 1e6
    );
}

#[test]
fn throughput_stays_within_the_bandwidth_limit_both_ways() {
    let lab = lab_with_net("10.40.4.0/24");
    run(&lab, &["--name", "srv", "--", "iperf3", "-s"]);
    run(&lab, &["--name", "free", "--", "sleep", "infinity"]);
    run(
        &lab,
        &[
            "--name",
            "cli",
            "--bandwidth",
            "50Mbit",
            "--",
            "sleep",
            "infinity",
        ],
    );
    let _turn = measuring();
    assert_near(|| iperf(&lab, "cli", "srv", false), 50e6, "sending");
    assert_near(|| iperf(&lab, "cli", "srv", true), 50e6, "receiving");
    // Without a limit the same path is much faster: the limit is what held it.
    let fast = iperf(&lab, "free", "srv", false);
    assert!(fast > 100e6, "unlimited only {:.1} Mbit/s", fast / 1e6);
    let s = stats(&lab, "cli");
    assert!(s["port"]["tx_bytes"].as_u64().unwrap() > 10 << 20, "{s}");
    assert!(s["port"]["rx_bytes"].as_u64().unwrap() > 10 << 20, "{s}");
    let top = lab.ok(&["top", "--interval", "0.2"]);
    for col in ["CPU", "MEMORY", "PIDS", "RX PKTS", "TX BYTES", "REFUSED"] {
        assert!(top.contains(col), "{top}");
    }
    assert!(top.lines().any(|l| l.starts_with("cli ")), "{top}");
}

#[test]
fn two_instances_with_the_same_path_rule_keep_separate_files() {
    let lab = lab_with_net("10.40.5.0/24");
    lab.ok(&[
        "template",
        "create",
        "app",
        "--redirect",
        "/etc/vane-test-app/config={state}/config",
        "--env",
        "HOME=/srv/{name}",
        "--env",
        "WHERE={hostname}@{ip}/{net}",
        "--memory",
        "128M",
    ]);
    let ls: Vec<serde_json::Value> =
        serde_json::from_str(&lab.ok(&["template", "ls", "-o", "json"])).unwrap();
    assert_eq!(ls[0]["name"], "app");
    for name in ["one", "two"] {
        run(
            &lab,
            &[
                "--name",
                name,
                "--template",
                "app",
                "--pids",
                "50",
                "--",
                "sleep",
                "infinity",
            ],
        );
    }
    for name in ["one", "two"] {
        lab.ok(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            &format!("echo {name} >> /etc/vane-test-app/config"),
        ]);
    }
    for name in ["one", "two"] {
        let seen = lab.ok(&["exec", name, "--", "cat", "/etc/vane-test-app/config"]);
        assert_eq!(seen.trim(), name);
        let env = lab.ok(&["exec", name, "--", "sh", "-c", "echo $HOME $WHERE"]);
        let ip = lab.inspect(name)["ip"].as_str().unwrap().to_string();
        assert_eq!(env.trim(), format!("/srv/{name} {name}@{ip}/red"));
        // The template's limit and the flag's, together.
        let limits = &lab.inspect(name)["limits"];
        assert_eq!(limits["memory"], 128u64 << 20);
        assert_eq!(limits["pids"], 50);
    }
    assert!(
        !Path::new("/etc/vane-test-app").exists(),
        "the host's /etc was changed"
    );
    // The files live in the part of each instance's state directory it shares.
    let id = lab.inspect("one")["id"].as_str().unwrap().to_string();
    let file = format!("{}/hosts/h1/instances/{id}/shared/config", lab.state_dir());
    assert_eq!(read(Path::new(&file)), "one");
    lab.ok(&["template", "rm", "app"]);
    let e = lab.fails(&["run", "--net", "red", "--template", "app", "--", "true"]);
    assert!(e.contains("unknown template \"app\""), "{e}");
}

/// A root directory with a static busybox and nothing else.
fn busybox_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (scripts/install-deps.sh)");
    for cmd in ["sh", "cat", "ls", "echo", "sleep", "ps", "grep", "wc"] {
        std::os::unix::fs::symlink("busybox", bin.join(cmd)).unwrap();
    }
    std::fs::write(dir.path().join("etc/motd"), "original\n").unwrap();
    dir
}

fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p.clone());
                out.push((p, Vec::new()));
            } else if meta.is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            } else {
                out.push((p, Vec::new()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_rootfs_instance_writes_privately_and_the_directory_stays_unchanged() {
    let lab = lab_with_net("10.40.6.0/24");
    let root = busybox_root();
    let before = tree(root.path());
    let rootfs = root.path().to_str().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let volume = format!("{}:/shared", shared.path().display());
    for name in ["r1", "r2"] {
        run(
            &lab,
            &[
                "--name",
                name,
                "--rootfs",
                rootfs,
                "--volume",
                &volume,
                "--",
                "/bin/sleep",
                "1000",
            ],
        );
    }
    lab.ok(&[
        "exec",
        "r1",
        "--",
        "/bin/sh",
        "-c",
        "echo changed > /etc/motd; echo new > /new-file; echo r1 > /shared/from-r1",
    ]);
    assert_eq!(
        lab.ok(&["exec", "r1", "--", "/bin/cat", "/etc/motd", "/new-file"]),
        "changed\nnew\n"
    );
    // The other instance of the same root sees the original.
    assert_eq!(
        lab.ok(&["exec", "r2", "--", "/bin/cat", "/etc/motd"]),
        "original\n"
    );
    assert!(!lab
        .run(&["exec", "r2", "--", "/bin/cat", "/new-file"])
        .status
        .success());
    // The volume is shared on purpose.
    assert_eq!(
        lab.ok(&["exec", "r2", "--", "/bin/cat", "/shared/from-r1"]),
        "r1\n"
    );
    assert_eq!(read(&shared.path().join("from-r1")), "r1");
    // It is the busybox root, with its own /proc and /tmp.
    let ls = lab.ok(&["exec", "r1", "--", "/bin/ls", "/"]);
    assert!(!ls.contains("usr"), "{ls}");
    lab.ok(&["rm", "r1"]);
    lab.ok(&["rm", "r2"]);
    assert_eq!(tree(root.path()), before, "the root directory was changed");
}

#[test]
fn proc_and_tmp_inside_are_the_instance_s_own() {
    let lab = lab_with_net("10.40.7.0/24");
    // A host directory under the host's /tmp, shared at a path under the instance's own /tmp.
    let shared = tempfile::tempdir().unwrap();
    let volume = format!("{}:/tmp/shared", shared.path().display());
    run(
        &lab,
        &[
            "--name", "a", "--volume", &volume, "--", "sleep", "infinity",
        ],
    );
    run(&lab, &["--name", "b", "--", "sleep", "infinity"]);
    let pids = lab.ok(&[
        "exec",
        "a",
        "--",
        "sh",
        "-c",
        "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '",
    ]);
    let pids: Vec<u32> = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // init, sleep, sh, ls, grep, sort, tr: the instance's processes only.
    assert_eq!(pids[..2], [1, 2], "{pids:?}");
    assert!(pids.len() <= 7, "{pids:?}");
    // PID 1 is the instance's init, and the host's processes are not there.
    assert_eq!(
        lab.ok(&["exec", "a", "--", "cat", "/proc/1/comm"]),
        "vane\n"
    );
    let agent = lab.pid_of("h1");
    assert!(!pids.contains(&(agent as u32)) || agent < 8);
    // /tmp is private to each instance.
    lab.ok(&[
        "exec",
        "a",
        "--",
        "sh",
        "-c",
        "echo a > /tmp/vane-limits-test",
    ]);
    assert!(!Path::new("/tmp/vane-limits-test").exists());
    assert!(!lab
        .run(&["exec", "b", "--", "cat", "/tmp/vane-limits-test"])
        .status
        .success());
    assert_eq!(
        lab.ok(&["exec", "a", "--", "cat", "/tmp/vane-limits-test"]),
        "a\n"
    );
    lab.ok(&["exec", "a", "--", "sh", "-c", "echo v > /tmp/shared/file"]);
    assert_eq!(read(&shared.path().join("file")), "v");
}

#[test]
fn limits_survive_an_agent_restart() {
    let lab = lab_with_net("10.40.8.0/24");
    run(&lab, &["--name", "srv", "--", "iperf3", "-s"]);
    run(
        &lab,
        &[
            "--name",
            "lim",
            "--memory",
            "96M",
            "--cpus",
            "0.5",
            "--pids",
            "30",
            "--bandwidth",
            "20Mbit",
            "--",
            "sleep",
            "infinity",
        ],
    );
    let pid = lab.inspect("lim")["pid"].clone();
    lab.kill("h1");
    lab.restart();
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let o = lab.run(&["stats", "lim"]);
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            o.status.success()
        }),
        "stats after restart: {last}"
    );
    assert_eq!(lab.inspect("lim")["pid"], pid);
    let memory = find_cgroup_file(&lab, "lim", "memory.limit_in_bytes")
        .unwrap_or_else(|| cgroup_file(&lab, "lim", "memory.max"));
    let memory = read(&memory);
    assert_eq!(memory, (96u64 << 20).to_string());
    assert_eq!(read(&cgroup_file(&lab, "lim", "pids.max")), "30");
    let _turn = measuring();
    assert_near(|| iperf(&lab, "lim", "srv", false), 20e6, "after a restart");
}

#[test]
fn bad_input_gets_one_clear_line() {
    let lab = lab_with_net("10.40.9.0/24");
    let cases: &[(&[&str], &str)] = &[
        (&["--template", "nope"], "unknown template \"nope\""),
        (&["--memory", "12Q"], "invalid size \"12Q\""),
        (&["--bandwidth", "fast"], "invalid rate \"fast\""),
        (&["--cpus", "4096"], "more than this host's"),
        (&["--memory", "1000T"], "more than this host's"),
        (
            &["--redirect", "/etc/x=relative/y"],
            "source must be an absolute path",
        ),
        (&["--env", "A=/srv/{user}"], "unknown variable {user}"),
        (
            &["--redirect", "/etc/x=/srv/{nmae}"],
            "unknown variable {nmae}",
        ),
        (&["--rootfs", "/nonexistent-vane-root"], "not a directory"),
    ];
    for (args, want) in cases {
        let mut all = vec!["run", "--net", "red"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "true"]);
        let e = lab.fails(&all);
        assert!(e.starts_with("vane: error: "), "{e}");
        assert!(e.contains(want), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
    let e = lab.fails(&["template", "create", "t", "--memory", "lots"]);
    assert!(e.contains("invalid size \"lots\""), "{e}");
    // Nothing was left behind by the refused runs.
    let ps: Vec<serde_json::Value> = serde_json::from_str(&lab.ok(&["ps", "-o", "json"])).unwrap();
    assert!(ps.is_empty(), "{ps:?}");
}
