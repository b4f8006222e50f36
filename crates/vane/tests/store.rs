//! A lab whose controller keeps its state in a real etcd (Debian's etcd-server, started
//! here): what it acknowledged is in etcd and comes back after the controller dies; while
//! etcd is down, instances keep talking, a change is never half-made (the controller waits
//! for etcd, then exits rather than keep what etcd lacks), and the lab comes back whole.

mod common;

#[path = "../../controller/src/store/test_etcd.rs"]
mod test_etcd;

use std::time::Duration;

use common::{wait_for_http, wait_until, TestLab};
use test_etcd::TestEtcd;

const SERVER: &str =
    "d=$(mktemp -d); echo etcd kept me > $d/index.html; cd $d; exec python3 -m http.server 80";

#[test]
fn a_lab_on_etcd_keeps_its_state_through_controller_deaths_and_etcd_outages() {
    let mut etcd = TestEtcd::start();
    let lab = TestLab::up_with(2, &["--store", &etcd.url("lab")], &[]);
    lab.ok(&["net", "create", "kept", "--subnet", "10.64.0.0/24"]);
    lab.ok(&[
        "run", "--net", "kept", "--name", "srv", "--host", "h1", "--", "sh", "-c", SERVER,
    ]);
    lab.ok(&[
        "run", "--net", "kept", "--name", "cli", "--host", "h2", "--", "sleep", "infinity",
    ]);
    assert_eq!(
        wait_for_http(&lab, "cli", "http://srv/").trim(),
        "etcd kept me"
    );

    // Every record is a key of its own in etcd.
    let keys = etcd.keys("lab");
    for wanted in [
        "lab/nets/kept",
        "lab/hosts/h1",
        "lab/hosts/h2",
        "lab/meta/config",
    ] {
        assert!(keys.iter().any(|k| k == wanted), "no {wanted} in {keys:?}");
    }
    assert_eq!(
        keys.iter()
            .filter(|k| k.starts_with("lab/instances/"))
            .count(),
        2,
        "{keys:?}"
    );

    // The controller dies: its successor loads everything back from etcd.
    lab.kill("controller");
    lab.restart();
    assert_eq!(
        lab.ok(&["ps", "-q"]).lines().collect::<Vec<_>>(),
        ["cli", "srv"]
    );
    assert_eq!(lab.ok(&["net", "ls", "-q"]).trim(), "kept");

    // etcd goes down. The instances do not notice (asked from inside cli's network
    // namespace, since `vane exec` goes through the controller); a change waits for etcd,
    // and when etcd does not come back the controller exits instead of keeping what etcd
    // lacks.
    let cli_pid = lab.inspect("cli")["pid"].as_u64().expect("cli's pid");
    let srv_ip = lab.inspect("srv")["ip"]
        .as_str()
        .expect("srv's ip")
        .to_string();
    let fetch = || {
        let out = std::process::Command::new("nsenter")
            .args(["-t", &cli_pid.to_string(), "-n", "curl", "-sf", "-m", "2"])
            .arg(format!("http://{srv_ip}/"))
            .output()
            .expect("run nsenter");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(fetch(), "etcd kept me");
    let controller = lab.pid_of("controller");
    etcd.stop();
    let out = lab.run(&["net", "create", "lost", "--subnet", "10.65.0.0/24"]);
    assert!(
        !out.status.success(),
        "a change without its store succeeded"
    );
    let gone = || {
        std::fs::read_to_string(format!("/proc/{controller}/stat"))
            .map_or(true, |s| s.contains(") Z "))
    };
    assert!(
        wait_until(Duration::from_secs(20), gone),
        "the controller kept running with a change its store lacks"
    );
    let log = std::fs::read_to_string(format!("{}/controller.log", lab.state_dir())).unwrap();
    // Whichever comes first: the change that waited 10 s, or the leader's lease, which
    // etcd could not keep (3 s).
    assert!(
        log.contains("the store did not take a change for 10 s")
            || log.contains("lost the leadership"),
        "{log}"
    );
    assert_eq!(fetch(), "etcd kept me");

    // etcd back, the controller again: the refused change is nowhere, the rest is whole.
    etcd.start_again();
    lab.restart();
    assert_eq!(lab.ok(&["net", "ls", "-q"]).trim(), "kept");
    assert!(!etcd.keys("lab").iter().any(|k| k == "lab/nets/lost"));
    assert_eq!(
        lab.ok(&["ps", "-q"]).lines().collect::<Vec<_>>(),
        ["cli", "srv"]
    );
    lab.ok(&["net", "create", "after", "--subnet", "10.66.0.0/24"]);
    assert!(etcd.keys("lab").iter().any(|k| k == "lab/nets/after"));
    assert_eq!(
        wait_for_http(&lab, "cli", "http://srv/").trim(),
        "etcd kept me"
    );
}

#[test]
fn a_lab_keeps_the_store_it_was_made_with() {
    let lab = TestLab::up(1);
    let err = lab.fails(&[
        "lab",
        "up",
        "--name",
        &lab.name,
        "--underlay",
        &format!("198.18.{}.0/24", lab.octet),
        "--store",
        "etcd://127.0.0.1:2379",
    ]);
    assert!(err.contains("was made with its store embedded"), "{err}");
    let err = lab.fails(&["lab", "up", "--name", "x", "--store", "etcd://nowhere"]);
    assert!(err.contains("invalid etcd member \"nowhere\""), "{err}");
}
