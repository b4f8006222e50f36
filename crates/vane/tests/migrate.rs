//! Live migration on namespace hosts with real CRIU (>= 4.2, scripts/install-criu.sh): a
//! counter server keeps its clients' connections, its state and its identity while it
//! moves from host to host; a failed migration leaves it running where it was.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::live::{finish_client, progress, run_on, start_client, start_script, CLIENT, COUNTER};
use common::{host_uid, wait_until, TestLab};

/// Sends a datagram every 10 ms to the server's UDP echo, one socket throughout; at the
/// stop file, says whether replies were still coming (the flow resumed after the moves).
const UDP_CLIENT: &str = r#"
import os, socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(0.05)
last, got, i = 0.0, 0, 0
while not os.path.exists(sys.argv[2]):
    i += 1
    try:
        u.sendto(b'%d' % i, (sys.argv[1], 7001))
        u.recvfrom(100)
        got += 1
        last = time.time()
    except OSError:
        pass
    time.sleep(0.01)
print('ok' if time.time() - last < 2 else 'stale', got, i, flush=True)
"#;

fn migrate(lab: &TestLab, name: &str, to: &str) -> String {
    let out = lab.ok(&["migrate", name, "--to", to]);
    assert!(out.contains("freeze") && out.contains("MiB"), "{out}");
    eprintln!("{}", out.trim());
    let inst = lab.inspect(name);
    assert_eq!(inst["host"], to);
    // Where the freeze went: the phases add up to it, and each says what it took.
    let last = inst["migrations"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let phase = |p: &str| last["phases"][p].as_u64().unwrap();
    let phases = [
        "hold_ms",
        "dump_ms",
        "transfer_ms",
        "restore_ms",
        "switch_ms",
    ];
    assert_eq!(
        phases.iter().map(|p| phase(p)).sum::<u64>(),
        last["freeze_ms"].as_u64().unwrap(),
        "{last}"
    );
    assert!(phase("dump_ms") > 0 && phase("restore_ms") > 0, "{last}");
    // The images went straight from agent to agent, not through the controller.
    let log = std::fs::read_to_string(format!("{}/{to}.log", lab.state_dir())).unwrap();
    assert!(
        log.contains("images received directly"),
        "{to}'s log: {log}"
    );
    assert!(out.contains(&format!("dump {}", phase("dump_ms"))), "{out}");
    out
}

#[test]
fn clients_on_three_hosts_keep_their_connections_through_a_chain_of_migrations() {
    let lab = TestLab::up(3);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.4.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let clients = [("h1", "c1"), ("h2", "c2"), ("h3", "c3"), ("h3", "u3")];
    let stops: Vec<String> = clients
        .iter()
        .map(|(host, name)| {
            let script = if name.starts_with('u') {
                UDP_CLIENT
            } else {
                CLIENT
            };
            start_script(&lab, host, name, &ip, script)
        })
        .collect();
    for to in ["h2", "h3", "h1"] {
        migrate(&lab, "srv", to);
        for (_, name) in clients {
            let before = progress(&lab, name);
            assert!(
                wait_until(Duration::from_secs(15), || progress(&lab, name)
                    > before + 20),
                "client {name} stalled after the migration to {to}: {}",
                lab.ok(&["logs", name])
            );
        }
    }
    for ((_, name), stop) in clients.iter().zip(&stops) {
        finish_client(&lab, name, stop);
    }
    let inst = lab.inspect("srv");
    let history = inst["migrations"].as_array().expect("history");
    let hops: Vec<(&str, &str)> = history
        .iter()
        .map(|m| (m["from"].as_str().unwrap(), m["to"].as_str().unwrap()))
        .collect();
    assert_eq!(hops, [("h1", "h2"), ("h2", "h3"), ("h3", "h1")]);
    assert!(history.iter().all(|m| m["image_bytes"].as_u64() > Some(0)));
    assert!(inst.get("migrating").is_none(), "{inst}");
    assert!(lab.ok(&["ps"]).contains("running (migrated 3x)"));
    // Its hostname and address came along.
    let out = lab.ok(&["exec", "srv", "--", "hostname"]);
    assert_eq!(out.trim(), "srv");
    // Where CRIU caches (the tmpfs install-criu.sh mounts), the destinations kept the probe
    // of the kernel as seen from an instance's user namespace, root's alone, for the next
    // restores.
    let run_criu = std::path::Path::new("/run/criu");
    if nix::sys::statfs::statfs(run_criu)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    {
        use std::os::unix::fs::MetadataExt;
        let kept = std::fs::symlink_metadata(run_criu.join("vane-userns.kdat")).unwrap();
        assert!(kept.is_file());
        assert_eq!((kept.uid(), kept.mode() & 0o777), (0, 0o600));
        assert_eq!(std::fs::metadata(run_criu).unwrap().mode() & 0o777, 0o700);
    }
}

#[test]
fn a_server_that_switched_to_another_user_migrates_with_its_clients() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.9.0/24"]);
    // A threaded server that dropped root inside its instance: on this host root lacks
    // CAP_SYS_RESOURCE, and only the instance's user namespace lets CRIU read its limits.
    run_on(
        &lab,
        "h1",
        "srv",
        &[
            "setpriv",
            "--reuid",
            "1000",
            "--regid",
            "1000",
            "--clear-groups",
            "python3",
            "-c",
            COUNTER,
        ],
    );
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let stop = start_client(&lab, "h2", "c2", &ip);
    let mut last = host_uid(lab.inspect("srv")["pid"].as_u64().unwrap());
    assert!(last >= 65_536 && last % 65_536 == 1000, "uid {last}");
    for to in ["h2", "h1"] {
        migrate(&lab, "srv", to);
        let pid = lab.inspect("srv")["pid"].as_u64().unwrap();
        let uid = host_uid(pid);
        // Inside it is still user 1000; outside, 1000 into this host's range for it, never
        // an id the images chose.
        assert!(uid >= 65_536 && uid % 65_536 == 1000, "uid {uid}");
        // The restoring host's own range: not the one the images were dumped from.
        assert_ne!(uid, last, "the images chose the mapping");
        last = uid;
        let out = lab.ok(&["exec", "srv", "--", "sh", "-c", "ps -o uid= -p 2"]);
        assert_eq!(out.trim(), "1000");
        let before_progress = progress(&lab, "c2");
        assert!(
            wait_until(Duration::from_secs(15), || progress(&lab, "c2")
                > before_progress + 20),
            "client stalled after the migration to {to}: {}",
            lab.ok(&["logs", "c2"])
        );
    }
    finish_client(&lab, "c2", &stop);
}

#[test]
fn refusals_come_before_anything_is_frozen() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.5.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    let err = lab.fails(&["migrate", "srv", "--to", "h9"]);
    assert!(err.contains("unknown host \"h9\""), "{err}");
    let err = lab.fails(&["migrate", "srv", "--to", "h1"]);
    assert!(err.contains("already runs on host"), "{err}");
    let pid = lab.inspect("srv")["pid"].clone();
    lab.kill("h2");
    assert!(wait_until(Duration::from_secs(10), || {
        lab.ok(&["host", "ls"])
            .lines()
            .any(|l| l.starts_with("h2") && l.contains("offline"))
    }));
    let err = lab.fails(&["migrate", "srv", "--to", "h2"]);
    assert!(err.contains("offline"), "{err}");
    let inst = lab.inspect("srv");
    assert_eq!(inst["state"], "running");
    assert_eq!(inst["pid"], pid);
    assert_eq!(inst["host"], "h1");
}

#[test]
fn a_failed_restore_resumes_the_instance_on_its_source() {
    // The real CRIU everywhere, except that it cannot restore on h2: a wrapper that fails
    // there (writing its reason where CRIU writes its log) and hands everything else on.
    let wrapper = format!("/tmp/vane-criu-fail-{}", std::process::id());
    let real = ["/usr/local/sbin/criu", "/usr/sbin/criu"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("scripts/install-criu.sh installs criu");
    let _cleanup = RemoveOnDrop(wrapper.clone());
    // The lab's name is only known once it is up, so the wrapper reads it from a file.
    let target = format!("{wrapper}.netns");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = restore ] && [ \"$(ip netns identify $$)\" = \"$(cat {target})\" ]; then\n\
             \x20 echo 'Error: this host cannot restore (test)' > \"$3/restore.log\"\n\
             \x20 exit 1\n\
             fi\n\
             exec {real} \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let _cleanup_target = RemoveOnDrop(target.clone());
    let lab = TestLab::up_with(2, &[], &[("VANE_CRIU", wrapper.as_str())]);
    std::fs::write(&target, lab.netns(2)).unwrap();
    lab.ok(&["net", "create", "red", "--subnet", "10.10.6.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let stop = start_client(&lab, "h2", "c2", &ip);
    let err = lab.fails(&["migrate", "srv", "--to", "h2"]);
    assert!(
        err.contains("failed, it runs on host \"h1\" again")
            && err.contains("cannot restore (test)"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let inst = lab.inspect("srv");
    assert_eq!(inst["state"], "running");
    assert_eq!(inst["host"], "h1");
    assert!(inst.get("migrations").is_none());
    finish_client(&lab, "c2", &stop);
    // And it still migrates once the destination is fine.
    let out = lab.ok(&["exec", "srv", "--", "hostname"]);
    assert_eq!(out.trim(), "srv");
}

#[test]
fn a_destination_its_source_cannot_reach_fails_the_migration_at_once_and_the_instance_stays() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.14.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let stop = start_client(&lab, "h2", "c2", &ip);
    // h2 drops the source's connection for the images (its tunnels, UDP, still work).
    let nft = |script: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.netns(2), "nft", script])
            .output()
            .unwrap();
        assert!(out.status.success(), "nft {script}: {out:?}");
    };
    nft("add table inet vane_test_block");
    nft("add chain inet vane_test_block input { type filter hook input priority 0 ; }");
    nft("add rule inet vane_test_block input tcp dport 7947 drop");
    let started = std::time::Instant::now();
    let err = lab.fails(&["migrate", "srv", "--to", "h2"]);
    assert!(
        err.contains("failed, it runs on host \"h1\" again") && err.contains("cannot reach"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the failure took {:?}",
        started.elapsed()
    );
    let inst = lab.inspect("srv");
    assert_eq!(inst["state"], "running");
    assert_eq!(inst["host"], "h1");
    // Reachable again, it migrates; the client saw no gap either way.
    nft("delete table inet vane_test_block");
    migrate(&lab, "srv", "h2");
    finish_client(&lab, "c2", &stop);
}

/// Asks the counter server at `server` three times from instance `client`; returns the
/// replies' totals.
fn ask(lab: &TestLab, client: &str, server: &str) -> Vec<u64> {
    const ASK: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 7000), timeout=5)
f = s.makefile('rwb')
for _ in range(3):
    f.write(b'x\n')
    f.flush()
    print(f.readline().split()[1].decode())
"#;
    let mut out = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        let o = lab.run(&["exec", client, "--", "python3", "-c", ASK, server]);
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        o.status.success()
    });
    assert!(ok, "{server} never answered {client}");
    out.lines().map(|l| l.trim().parse().unwrap()).collect()
}

/// A snapshot directory removed when the test ends, however it ends.
struct SnapshotDir(std::path::PathBuf);

impl SnapshotDir {
    fn new(lab: &TestLab) -> SnapshotDir {
        SnapshotDir(std::env::temp_dir().join(format!("vane-snapshot-{}", lab.name)))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for SnapshotDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_snapshot_restored_on_another_host_keeps_its_state() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.7.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    run_on(&lab, "h2", "cli", &["sleep", "600"]);
    assert_eq!(ask(&lab, "cli", "srv"), [1, 2, 3]);
    let snap = SnapshotDir::new(&lab);
    let out = lab.ok(&["snapshot", "srv", "--out", snap.path(), "--stop"]);
    assert!(out.contains("MiB"), "{out}");
    assert_eq!(lab.inspect("srv")["state"], "exited");
    let ip = lab.inspect("srv")["ip"].clone();
    lab.ok(&["rm", "srv"]);
    assert_eq!(
        lab.ok(&["restore", snap.path(), "--host", "h2"]).trim(),
        "srv"
    );
    let inst = lab.inspect("srv");
    assert_eq!(
        (&inst["host"], &inst["ip"], &inst["state"]),
        (&"h2".into(), &ip, &"running".into())
    );
    // The count goes on where it was.
    assert_eq!(ask(&lab, "cli", "srv"), [4, 5, 6]);
    assert_eq!(lab.ok(&["exec", "srv", "--", "hostname"]).trim(), "srv");
}

#[test]
fn a_changed_snapshot_is_refused_and_a_snapshot_is_its_owner_s_alone() {
    use std::os::unix::fs::PermissionsExt;
    let lab = TestLab::up(1);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.10.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    let snap = SnapshotDir::new(&lab);
    lab.ok(&["snapshot", "srv", "--out", snap.path()]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&snap.0), 0o700);
    for f in ["images.tar", "instance.json", "seal"] {
        assert_eq!(mode(&snap.0.join(f)), 0o600, "{f}");
    }
    let images = std::fs::read(snap.0.join("images.tar")).unwrap();
    let record = std::fs::read_to_string(snap.0.join("instance.json")).unwrap();
    // One image byte changed.
    let mut changed = images.clone();
    let at = changed.len() / 2;
    changed[at] ^= 0x20;
    std::fs::write(snap.0.join("images.tar"), &changed).unwrap();
    let e = lab.fails(&["restore", snap.path(), "--name", "c1"]);
    assert!(e.contains("not sealed by this cluster"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    // The record changed to run it outside the sandbox.
    std::fs::write(snap.0.join("images.tar"), &images).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&record).unwrap();
    v["space"]["privileged"] = true.into();
    std::fs::write(snap.0.join("instance.json"), v.to_string()).unwrap();
    let e = lab.fails(&["restore", snap.path(), "--name", "c2"]);
    assert!(e.contains("not sealed by this cluster"), "{e}");
    // A missing seal.
    std::fs::write(snap.0.join("instance.json"), &record).unwrap();
    std::fs::write(snap.0.join("seal"), "\n").unwrap();
    let e = lab.fails(&["restore", snap.path(), "--name", "c3"]);
    assert!(e.contains("not sealed by this cluster"), "{e}");
    // Nothing was made of them.
    for name in ["c1", "c2", "c3"] {
        assert!(!lab.run(&["inspect", name]).status.success(), "{name}");
    }
}

/// Holds 256 MiB of random bytes and tells their SHA-256 to whoever connects.
const BIG: &str = r#"
import hashlib, os, socket
b = bytearray(os.urandom(1 << 20)) * 256
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 7002))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(hashlib.sha256(b).hexdigest().encode())
    c.close()
"#;

/// The digest the big server of `name` tells, asked from inside it.
fn digest_of(lab: &TestLab, name: &str) -> String {
    const ASK: &str = "import socket; print(socket.create_connection(('127.0.0.1', 7002), timeout=30).recv(100).decode())";
    let mut out = String::new();
    assert!(wait_until(Duration::from_secs(30), || {
        let o = lab.run(&["exec", name, "--", "python3", "-c", ASK]);
        out = String::from_utf8_lossy(&o.stdout).trim().to_string();
        o.status.success() && out.len() == 64
    }));
    out
}

/// Images stream through the controller and the agents: none of them holds one whole.
#[test]
fn a_snapshot_of_256_mib_is_taken_and_restored_whole() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.11.0/24"]);
    run_on(&lab, "h1", "big", &["python3", "-c", BIG]);
    let digest = digest_of(&lab, "big");
    let snap = SnapshotDir::new(&lab);
    let out = lab.ok(&["snapshot", "big", "--out", snap.path(), "--stop"]);
    assert!(out.contains("MiB"), "{out}");
    let size = std::fs::metadata(snap.0.join("images.tar")).unwrap().len();
    assert!(size > 256 << 20, "{size} bytes of images");
    lab.ok(&["restore", snap.path(), "--name", "big2", "--host", "h2"]);
    assert_eq!(digest_of(&lab, "big2"), digest);
    migrate(&lab, "big2", "h1");
    assert_eq!(digest_of(&lab, "big2"), digest);
    for process in ["controller", "h1", "h2"] {
        let peak = lab.peak_memory(process);
        assert!(
            peak < 64 << 20,
            "{process} held {} MiB at its peak",
            peak >> 20
        );
    }
}

#[test]
fn clones_of_one_snapshot_run_side_by_side_with_their_own_identities() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.8.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    run_on(&lab, "h2", "cli", &["sleep", "600"]);
    assert_eq!(ask(&lab, "cli", "srv"), [1, 2, 3]);
    let snap = SnapshotDir::new(&lab);
    lab.ok(&["snapshot", "srv", "--out", snap.path()]);
    assert_eq!(lab.inspect("srv")["state"], "running");
    let clones = [
        ("c1", "h1", "10.10.8.101"),
        ("c2", "h2", "10.10.8.102"),
        ("c3", "h2", "10.10.8.103"),
    ];
    for (name, host, ip) in clones {
        let hostname = format!("{name}-host");
        lab.ok(&[
            "restore",
            snap.path(),
            "--host",
            host,
            "--name",
            name,
            "--ip",
            ip,
            "--hostname",
            &hostname,
        ]);
    }
    for (name, host, ip) in clones {
        let inst = lab.inspect(name);
        assert_eq!(
            (inst["host"].as_str(), inst["ip"].as_str()),
            (Some(host), Some(ip))
        );
        assert_eq!(
            lab.ok(&["exec", name, "--", "hostname"]).trim(),
            format!("{name}-host")
        );
        // Each with the snapshot's state, on its own address, by its name.
        assert_eq!(ask(&lab, "cli", ip), [4, 5, 6]);
        assert_eq!(ask(&lab, "cli", name), [7, 8, 9]);
        // The same PIDs inside its own PID namespace: init 1, the program 2.
        let cmdline = lab.ok(&["exec", name, "--", "cat", "/proc/2/cmdline"]);
        assert!(cmdline.starts_with("python3"), "{cmdline}");
    }
    // The original goes on with its own count.
    assert_eq!(ask(&lab, "cli", "srv"), [4, 5, 6]);
}

#[test]
fn a_host_without_a_usable_criu_is_refused_before_anything_is_frozen() {
    let lab = TestLab::up_with(2, &[], &[("VANE_CRIU", "/nonexistent/criu")]);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.3.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER]);
    let pid = lab.inspect("srv")["pid"].clone();
    let err = lab.fails(&["migrate", "srv", "--to", "h2"]);
    assert!(
        err.contains("host \"h2\"") && err.contains("criu is not installed"),
        "{err}"
    );
    let inst = lab.inspect("srv");
    assert_eq!(
        (&inst["state"], &inst["pid"], &inst["host"]),
        (&"running".into(), &pid, &"h1".into())
    );
    // Nothing was left on the destination.
    let dir = format!("{}/hosts/h2/instances", lab.state_dir());
    let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "{dir} is not empty");
    assert_no_restore_waits(&dir);
}

/// No `vane __restore` waits in a space under `dir`: the helper of a discarded space went
/// with it.
fn assert_no_restore_waits(dir: &str) {
    let waiting: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("__restore") && c.contains(dir))
        .collect();
    assert!(waiting.is_empty(), "{waiting:?}");
}

/// Removes a file when dropped, also when the test fails.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Post-copy: the memory moves after the freeze, pulled by the destination; the freeze is
/// that of a small instance, the memory arrives whole, a server with 512 MiB resident keeps
/// answering a live client with consecutive replies, and the destination's copy can move
/// on again (the descriptor CRIU made its userfaultfd from is not left in it: the next dump
/// would refuse it).
#[test]
fn servers_of_256_and_512_mib_move_their_memory_after_the_freeze_with_post_copy() {
    let lab = TestLab::up(3);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.14.0/24"]);
    run_on(&lab, "h1", "big", &["python3", "-c", BIG]);
    let digest = digest_of(&lab, "big");
    // The counter server with 512 MiB resident beside its state.
    let heavy = format!("import os\nballast = bytearray(os.urandom(1 << 20)) * 512\n{COUNTER}");
    run_on(&lab, "h1", "srv", &["python3", "-c", &heavy]);
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let stop = start_client(&lab, "h3", "c3", &ip);
    let rss = lab.ok(&["exec", "srv", "--", "sh", "-c", "grep VmRSS /proc/2/status"]);
    let kib: u64 = rss.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(kib >= 512 << 10, "{rss}");
    let out = lab.ok(&["migrate", "big", "--to", "h2", "--post-copy"]);
    assert!(out.contains("post-copy, source released in"), "{out}");
    let last = lab.inspect("big")["migrations"][0].clone();
    assert!(last["image_bytes"].as_u64().unwrap() < 64 << 20, "{last}");
    assert!(last["post_copy_ms"].as_u64().is_some(), "{last}");
    assert_eq!(digest_of(&lab, "big"), digest);
    // A server under a live client.
    lab.ok(&["migrate", "srv", "--to", "h2", "--post-copy"]);
    let before = progress(&lab, "c3");
    assert!(
        wait_until(Duration::from_secs(15), || progress(&lab, "c3")
            > before + 20),
        "the client stalled after the post-copy migration: {}",
        lab.ok(&["logs", "c3"])
    );
    // And on: whole this time, then post-copy again. While the whole migration lasts, the
    // instance says where it is: the bytes of its phase (the dump's images, then the
    // images unpacked on the destination, then the memory restored) grow.
    let seen = std::thread::scope(|scope| {
        let moving = scope.spawn(|| migrate(&lab, "big", "h3"));
        let mut seen = std::collections::BTreeMap::new();
        while !moving.is_finished() {
            let now = lab.inspect("big");
            if let (Some(phase), Some(bytes)) = (
                now["progress"]["phase"].as_str(),
                now["progress"]["bytes"].as_u64(),
            ) {
                let most = seen.entry(phase.to_string()).or_insert(0);
                *most = bytes.max(*most);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        moving.join().unwrap();
        seen
    });
    assert!(
        seen.values().any(|&bytes| bytes > 0),
        "no progress was seen: {seen:?}"
    );
    assert!(lab.inspect("big").get("progress").is_none());
    assert_eq!(digest_of(&lab, "big"), digest);
    lab.ok(&["migrate", "big", "--to", "h1", "--post-copy"]);
    assert_eq!(digest_of(&lab, "big"), digest);
    finish_client(&lab, "c3", &stop);
}

/// What a checkpoint cannot carry is refused before anything is frozen, and the instance
/// runs on where it was (a restore that could not be done would leave it nowhere: its
/// source's restore fails the same way).
#[test]
fn instances_a_checkpoint_cannot_carry_are_refused_and_keep_running() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.15.0/24"]);
    let shared = tempfile::tempdir().unwrap();
    let volume = format!("{}:/tmp/data", shared.path().display());
    std::fs::write(shared.path().join("issue"), "host\n").unwrap();
    let host_rule = format!("/etc/issue={}/issue", shared.path().display());
    // A root with a static busybox and its sleep.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.path().join("bin/sleep")).unwrap();
    std::os::unix::fs::symlink("busybox", root.path().join("bin/true")).unwrap();
    let rootfs = root.path().to_str().unwrap();
    // A target the host's root lacks: the launch lays a layer over /srv to make it.
    let layered = format!("{}:/srv/vane-made-here:shared", shared.path().display());
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "ruled",
            &["--redirect", &host_rule],
            "takes a file of this host, which would not come along",
        ),
        (
            "vol",
            &["--volume", &volume],
            "is a directory of this host, which would not come along (mark it :shared",
        ),
        (
            "rooted",
            &["--privileged", "--rootfs", rootfs],
            "privileged instance's --rootfs root",
        ),
        (
            "layered",
            &["--volume", &layered],
            "laid a layer over a directory of the host's root",
        ),
    ];
    for (name, flags, why) in cases {
        let mut args = vec!["run", "--net", "red", "--name", name, "--host", "h1"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "/bin/sleep", "1000"]);
        lab.ok(&args);
        let pid = lab.inspect(name)["pid"].clone();
        let err = lab.fails(&["migrate", name, "--to", "h2"]);
        assert!(
            err.contains("cannot be checkpointed") && err.contains(why),
            "{err}"
        );
        let err = lab.fails(&["migrate", name, "--to", "h2", "--post-copy"]);
        assert!(err.contains("cannot be checkpointed"), "{err}");
        let snap = SnapshotDir::new(&lab);
        let err = lab.fails(&["snapshot", name, "--out", snap.path()]);
        assert!(err.contains("cannot be checkpointed"), "{err}");
        let inst = lab.inspect(name);
        assert_eq!((&inst["state"], &inst["pid"]), (&"running".into(), &pid));
        lab.ok(&["exec", name, "--", "/bin/true"]);
    }
    let dir = format!("{}/hosts/h2/instances", lab.state_dir());
    let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "{dir} is not empty");
    assert_no_restore_waits(&dir);
    // What the instance writes after a migration still reaches its log: the log moved as
    // the instance's own file.
    let counter = "import time\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.05)\n";
    run_on(&lab, "h1", "talker", &["python3", "-c", counter]);
    migrate(&lab, "talker", "h2");
    let last = |lab: &TestLab| -> u64 {
        lab.ok(&["logs", "talker"])
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    };
    let after = last(&lab);
    assert!(
        wait_until(Duration::from_secs(10), || last(&lab) > after + 10),
        "the log stopped growing after the migration"
    );
}

/// A `--rootfs` instance moves with what it wrote over its root (a changed file, a new
/// one, a deleted one, a directory made again in place of the root's) and with a file of
/// that layer held open and appended to, whole and with post-copy; its snapshot carries
/// the layer to a clone; the root directory itself stays as it was.
#[test]
fn a_rootfs_instance_migrates_with_what_it_wrote_over_its_root() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.16.0/24"]);
    let root = tempfile::tempdir().unwrap();
    for d in ["bin", "etc", "data"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    for cmd in ["sh", "cat", "ls", "sleep", "rm", "mkdir", "wc", "true"] {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(cmd)).unwrap();
    }
    for (f, text) in [
        ("etc/motd", "original\n"),
        ("etc/issue", "issue\n"),
        ("data/old", "old\n"),
    ] {
        std::fs::write(root.path().join(f), text).unwrap();
    }
    let writer = "echo changed > /etc/motd; echo new > /new-file; rm /etc/issue; \
                  rm -r /data; mkdir /data; echo fresh > /data/only; exec 3>>/ticks; \
                  while true; do echo tick >&3; sleep 0.05; done";
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "rooted",
        "--host",
        "h1",
        "--rootfs",
        root.path().to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        writer,
    ]);
    let ticks = |lab: &TestLab| -> usize {
        lab.run(&["exec", "rooted", "--", "/bin/cat", "/ticks"])
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| l == b"tick")
            .count()
    };
    assert!(wait_until(Duration::from_secs(10), || ticks(&lab) > 5));
    for (to, post_copy) in [("h2", false), ("h1", true)] {
        if post_copy {
            lab.ok(&["migrate", "rooted", "--to", to, "--post-copy"]);
        } else {
            migrate(&lab, "rooted", to);
        }
        assert_eq!(lab.inspect("rooted")["host"], to);
        assert_eq!(
            lab.ok(&["exec", "rooted", "--", "/bin/cat", "/etc/motd", "/new-file"]),
            "changed\nnew\n"
        );
        assert_eq!(
            lab.ok(&["exec", "rooted", "--", "/bin/ls", "/data"]),
            "only\n"
        );
        let issue = lab.run(&["exec", "rooted", "--", "/bin/cat", "/etc/issue"]);
        assert!(!issue.status.success(), "the deleted file came back");
        // The program's open file is the moved layer's: what it appends lands there.
        let before = ticks(&lab);
        assert!(
            wait_until(Duration::from_secs(10), || ticks(&lab) > before + 5),
            "the program stopped appending after the move to {to}"
        );
    }
    // A snapshot carries the layer too: a clone starts from what the original wrote.
    let snap = SnapshotDir::new(&lab);
    lab.ok(&["snapshot", "rooted", "--out", snap.path()]);
    lab.ok(&["restore", snap.path(), "--host", "h2", "--name", "rooted2"]);
    assert_eq!(
        lab.ok(&[
            "exec",
            "rooted2",
            "--",
            "/bin/cat",
            "/etc/motd",
            "/data/only"
        ]),
        "changed\nfresh\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/motd")).unwrap(),
        "original\n"
    );
    assert!(root.path().join("etc/issue").exists());
    assert!(!root.path().join("new-file").exists());
}

/// A volume marked `:shared` (a directory every host has: here the lab's hosts share one
/// file system) stays out of the images and is bound again on the destination: the program
/// keeps appending to the file it held open, and sees what others write there.
#[test]
fn an_instance_with_a_shared_volume_migrates_and_keeps_writing_to_it() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.17.0/24"]);
    let data = tempfile::tempdir().unwrap();
    let volume = format!("{}:/tmp/data:shared", data.path().display());
    let writer = "exec 3>>/tmp/data/log; while true; do echo tick >&3; sleep 0.05; done";
    lab.ok(&[
        "run", "--net", "red", "--name", "vol", "--host", "h1", "--volume", &volume, "--", "sh",
        "-c", writer,
    ]);
    let log = data.path().join("log");
    let ticks = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert!(wait_until(Duration::from_secs(10), || ticks() > 5));
    for (to, post_copy) in [("h2", false), ("h1", true)] {
        if post_copy {
            lab.ok(&["migrate", "vol", "--to", to, "--post-copy"]);
        } else {
            migrate(&lab, "vol", to);
        }
        let before = ticks();
        assert!(
            wait_until(Duration::from_secs(10), || ticks() > before + 5),
            "the program stopped appending to the volume after the move to {to}"
        );
        std::fs::write(data.path().join(format!("from-host-{to}")), "hi").unwrap();
        let seen = lab.ok(&["exec", "vol", "--", "ls", "/tmp/data"]);
        assert!(seen.contains(&format!("from-host-{to}")), "{seen}");
    }
    // Bound again as the launch binds it, through the instance's id mapping: root inside
    // writes as root on the host.
    lab.ok(&["exec", "vol", "--", "sh", "-c", "echo x > /tmp/data/after"]);
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(data.path().join("after")).unwrap());
    assert_eq!(owner, 0);
}

/// Path rules whose sources are in the instance's state directory move with it (the
/// sources come with the images, and each restore binds them again): a file rule and a
/// directory rule, whole and with post-copy.
#[test]
fn path_rules_from_the_state_directory_migrate_with_their_files() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.18.0/24"]);
    let setup = "echo one > /etc/issue; echo two > /var/tmp/kept; exec sleep 1000";
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "ruled",
        "--host",
        "h1",
        "--redirect",
        "/etc/issue={state}/issue",
        "--redirect",
        "/var/tmp={state}/vartmp",
        "--",
        "sh",
        "-c",
        setup,
    ]);
    let cat =
        |lab: &TestLab| lab.ok(&["exec", "ruled", "--", "cat", "/etc/issue", "/var/tmp/kept"]);
    assert!(wait_until(Duration::from_secs(10), || cat(&lab) == "one\ntwo\n"));
    let mut issue = "one".to_string();
    for (to, post_copy) in [("h2", false), ("h1", true)] {
        if post_copy {
            lab.ok(&["migrate", "ruled", "--to", to, "--post-copy"]);
        } else {
            migrate(&lab, "ruled", to);
        }
        assert_eq!(cat(&lab), format!("{issue}\ntwo\n"));
        // Still the rules' files, where the instance now is: written through the target,
        // seen in the source.
        lab.ok(&[
            "exec",
            "ruled",
            "--",
            "sh",
            "-c",
            &format!("echo {to} > /etc/issue"),
        ]);
        let id = lab.inspect("ruled")["id"].as_str().unwrap().to_string();
        let source = format!("{}/hosts/{to}/instances/{id}/shared/issue", lab.state_dir());
        assert_eq!(std::fs::read_to_string(&source).unwrap(), format!("{to}\n"));
        issue = to.to_string();
    }
}

/// The instance's own tmpfs mounts move with it: files in `/tmp` and `/dev/shm`, and an
/// empty `/run` whose root the program made another user's with other permissions (an
/// empty tmpfs travels as its root's attributes alone, `scripts/criu-freeze.patch`).
#[test]
fn private_tmpfs_mounts_migrate_with_their_files_and_their_roots() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.19.0/24"]);
    let setup = "echo kept > /tmp/a; mkdir /tmp/d; echo deep > /tmp/d/b; \
                 echo shm > /dev/shm/s; chown 1000:1000 /run; chmod 0710 /run; \
                 exec sleep 1000";
    lab.ok(&[
        "run", "--net", "red", "--name", "tmpfs", "--host", "h1", "--", "sh", "-c", setup,
    ]);
    let look = |lab: &TestLab| {
        lab.ok(&[
            "exec",
            "tmpfs",
            "--",
            "sh",
            "-c",
            "cat /tmp/a /tmp/d/b /dev/shm/s; ls -A /run; stat -c '%a %u %g' /run /tmp",
        ])
    };
    let want = "kept\ndeep\nshm\n710 1000 1000\n1777 0 0\n";
    assert!(wait_until(Duration::from_secs(10), || look(&lab) == want));
    for (to, post_copy) in [("h2", false), ("h1", true)] {
        if post_copy {
            lab.ok(&["migrate", "tmpfs", "--to", to, "--post-copy"]);
        } else {
            migrate(&lab, "tmpfs", to);
        }
        assert_eq!(look(&lab), want, "after the migration to {to}");
    }
}

/// A client that goes away during a migration (Ctrl-C on `vane migrate`) does not cut
/// it off: the controller finishes it, and the instance runs on the destination.
#[test]
fn a_migration_whose_client_goes_away_finishes_anyway() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.19.0/24"]);
    // Enough memory that the dump takes a while.
    let big = "import time\nb = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\ntime.sleep(1e9)";
    run_on(&lab, "h1", "big", &["python3", "-c", big]);
    assert!(wait_until(Duration::from_secs(20), || lab
        .ok(&["logs", "big"])
        .contains("ready")));
    let mut client = Command::new(common::vane_bin())
        .args(["migrate", "big", "--to", "h2"])
        .env("VANE_CONTROLLER", &lab.controller)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || !lab.inspect("big")["migrating"]
            .is_null()),
        "the migration did not start"
    );
    client.kill().unwrap();
    client.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || lab.inspect("big")["migrating"]
            .is_null()),
        "the migration did not end"
    );
    let inst = lab.inspect("big");
    assert_eq!(
        (&inst["host"], &inst["state"]),
        (&"h2".into(), &"running".into()),
        "{inst}"
    );
    assert!(lab.ok(&["logs", "big"]).contains("ready"));
    lab.ok(&["exec", "big", "--", "true"]);
}

/// Processes on the lab's one kernel running the counter server: its running copies.
/// How many copies of the counter server of `lab` run on this machine. Told apart from
/// other tests' (they run in parallel) by the lab's name, its last argument.
fn counter_copies(lab: &TestLab) -> usize {
    let tag = format!("\0{}\0", lab.name);
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("python3\0") && c.contains("def echo():") && c.ends_with(&tag)
            })
        })
        .count()
}

/// A controller killed at any step of a migration (whole or post-copy) leaves, once it is
/// back, exactly one running copy of the instance, where the step says it should be, with
/// its client's connection.
#[test]
fn a_controller_killed_at_each_step_of_a_migration_leaves_one_running_copy() {
    let marker = format!("/var/tmp/vane-die-at-{}", std::process::id());
    let _gone = RemoveOnDrop(marker.clone());
    let lab = TestLab::up_with(2, &[], &[("VANE_TEST_DIE_AT", &marker)]);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.16.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER, &lab.name]);
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let stop = start_client(&lab, "h2", "c2", &ip);
    let mut at = "h1";
    // (step the controller dies after, post-copy, whether the instance ends up moved)
    let steps = [
        ("prepared", false, false),
        ("dumped", false, false),
        ("transferred", false, false),
        ("restored", false, true),
        ("transferred", true, false),
        ("restored", true, true),
    ];
    for (step, post_copy, moved) in steps {
        let to = if at == "h1" { "h2" } else { "h1" };
        std::fs::write(&marker, step).unwrap();
        let mut args = vec!["migrate", "srv", "--to", to];
        if post_copy {
            args.push("--post-copy");
        }
        let out = lab.run(&args);
        assert!(!out.status.success(), "the controller did not die {step}");
        assert!(
            !Path::new(&marker).exists(),
            "the controller did not die {step}"
        );
        lab.wait_ended("controller");
        lab.restart_with(&[("VANE_TEST_DIE_AT", &marker)]);
        assert!(
            wait_until(Duration::from_secs(30), || lab
                .inspect("srv")
                .get("migrating")
                .is_none()),
            "the migration interrupted {step} was not finished: {}",
            lab.inspect("srv")
        );
        let inst = lab.inspect("srv");
        let expected = if moved { to } else { at };
        assert_eq!(
            (&inst["host"], &inst["state"]),
            (&expected.into(), &"running".into()),
            "after the controller died {step} (post-copy: {post_copy}): {inst}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || counter_copies(&lab) == 1),
            "{} copies after the controller died {step} (post-copy: {post_copy})",
            counter_copies(&lab)
        );
        lab.ok(&["exec", "srv", "--", "true"]);
        let progressed = progress(&lab, "c2");
        assert!(
            wait_until(Duration::from_secs(15), || progress(&lab, "c2")
                > progressed + 20),
            "the client stalled after the controller died {step}: {}",
            lab.ok(&["logs", "c2"])
        );
        at = expected;
    }
    finish_client(&lab, "c2", &stop);
}

/// An agent killed in a migration (the source's once its dump is done, whole or lazy; the
/// destination's once its restore is done) leaves, once it is back, exactly one running
/// copy of the instance, with its client's connection: the source brings the tree back
/// from its images or its lazy dump resumes it, and the destination's copy is removed as
/// soon as its agent reports it; but a post-copy destination that had all the memory when
/// it stopped keeps the instance (the source has none left to resume).
#[test]
fn an_agent_killed_in_a_migration_leaves_one_running_copy() {
    let marker = format!("/var/tmp/vane-die-at-{}-agents", std::process::id());
    let _gone = RemoveOnDrop(marker.clone());
    let env = [("VANE_TEST_DIE_AT", marker.as_str())];
    let lab = TestLab::up_with(2, &[], &env);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.17.0/24"]);
    run_on(&lab, "h1", "srv", &["python3", "-c", COUNTER, &lab.name]);
    let ip = lab.inspect("srv")["ip"].as_str().unwrap().to_string();
    let stop = start_client(&lab, "h2", "c2", &ip);
    for (step, post_copy) in [
        ("agent-dumped", false),
        ("agent-dumped", true),
        ("agent-restored", false),
        ("agent-restored", true),
    ] {
        std::fs::write(&marker, step).unwrap();
        let mut args = vec!["migrate", "srv", "--to", "h2"];
        if post_copy {
            args.push("--post-copy");
        }
        let out = lab.run(&args);
        assert!(!out.status.success(), "the migration went through {step}");
        assert!(!Path::new(&marker).exists(), "no agent died {step}");
        lab.wait_ended(if step == "agent-dumped" { "h1" } else { "h2" });
        lab.restart_with(&env);
        let destination_may_keep = step == "agent-restored" && post_copy;
        let settled = || {
            let inst = lab.inspect("srv");
            (inst["host"] == "h1" || destination_may_keep && inst["host"] == "h2")
                && inst["state"] == "running"
                && inst.get("migrating").is_none()
                && counter_copies(&lab) == 1
                && lab.run(&["exec", "srv", "--", "true"]).status.success()
        };
        assert!(
            wait_until(Duration::from_secs(30), settled),
            "after an agent died {step} (post-copy: {post_copy}): {} copies, {}",
            counter_copies(&lab),
            lab.inspect("srv")
        );
        eprintln!(
            "after an agent died {step} (post-copy: {post_copy}) the instance runs on {}",
            lab.inspect("srv")["host"]
        );
        let progressed = progress(&lab, "c2");
        assert!(
            wait_until(Duration::from_secs(15), || progress(&lab, "c2")
                > progressed + 20),
            "the client stalled after an agent died {step} (post-copy: {post_copy}): {}",
            lab.ok(&["logs", "c2"])
        );
    }
    finish_client(&lab, "c2", &stop);
}

/// A restored instance's space is made as a new one's: its settings are expanded for the
/// host it moves to, so `vane exec` there sees its `{state}` directory, not the source's
/// (nor the unexpanded template).
#[test]
fn a_moved_instance_s_environment_names_its_new_host_s_state_directory() {
    let lab = TestLab::up(2);
    lab.ok(&["net", "create", "red", "--subnet", "10.10.19.0/24"]);
    lab.ok(&[
        "run",
        "--net",
        "red",
        "--name",
        "envy",
        "--host",
        "h1",
        "--env",
        "DIR={state}/data",
        "--",
        "sleep",
        "infinity",
    ]);
    let dir_on = |host: &str| {
        let out = lab.ok(&["exec", "envy", "--", "sh", "-c", "echo $DIR"]);
        let dir = out.trim().to_string();
        let home = format!("{}/hosts/{host}/", lab.state_dir());
        assert!(dir.starts_with(&home), "DIR={dir} on {host}");
        dir
    };
    let before = dir_on("h1");
    lab.ok(&["migrate", "envy", "--to", "h2"]);
    let after = dir_on("h2");
    assert_ne!(before, after);
}
