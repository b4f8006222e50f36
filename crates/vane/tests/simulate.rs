//! `bench/control.sh` kept from rotting: its driver, small (20 simulated hosts, 100
//! instances, the embedded store), against this build. Needs no root: the simulated hosts
//! (`vane __simulate-agents`) run nothing.

use std::process::Command;

#[test]
fn the_control_plane_bench_runs_small() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("python3")
        .arg(format!("{root}/bench/control.py"))
        .args(["--vane", env!("CARGO_BIN_EXE_vane")])
        .args(["--agents", "20", "--instances", "100", "--nets", "5"])
        .args(["--store", "embedded", "--no-quarter", "--probes", "10"])
        .output()
        .expect("python3 bench/control.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("probes: 10 added, 5 moved (remove + run on another host), 0 never seen"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split(' ').collect();
    assert_eq!(words.len(), 13, "{last}");
    assert_eq!(
        [words[0], words[1], words[3], words[4], words[6]],
        ["convergence", "p50", "ms", "p99", "ms"]
    );
    assert_eq!(
        &words[7..],
        ["agents", "20", "instances", "100", "store", "embedded"]
    );
    let p99: f64 = words[5].parse().expect("p99 in ms");
    assert!(p99 < 5000.0, "{last}");
}
