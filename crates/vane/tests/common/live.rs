//! Live traffic for lab tests: a server that numbers its replies, a client that checks
//! they come consecutive without pause, and their lifecycle as instances of net `red`.

use std::time::Duration;

use super::{wait_until, TestLab};

/// Numbers every reply: per connection (the client checks they are consecutive) and in
/// total (the server's state).
pub const COUNTER: &str = r#"
import socket, threading
total = 0
lock = threading.Lock()
def serve(c):
    global total
    f = c.makefile('rwb')
    n = 0
    while True:
        line = f.readline()
        if not line:
            return
        n += 1
        with lock:
            total += 1
            t = total
        f.write(b'%d %d\n' % (n, t))
        f.flush()
def echo():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(('0.0.0.0', 7001))
    while True:
        d, a = u.recvfrom(100)
        u.sendto(d, a)
threading.Thread(target=echo, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 7000))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Asks without pause; every reply must carry the next number. Exits 0 when the stop file
/// appears, 1 on the first error or gap.
pub const CLIENT: &str = r#"
import os, socket, sys, time
deadline = time.time() + 20
while True:
    try:
        s = socket.create_connection((sys.argv[1], 7000), timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
s.settimeout(60)
f = s.makefile('rwb')
n = 0
while not os.path.exists(sys.argv[2]):
    f.write(b'x\n')
    f.flush()
    r = f.readline().split()
    if not r or int(r[0]) != n + 1:
        print('bad reply after', n, r, flush=True)
        sys.exit(1)
    n += 1
    time.sleep(0.002)
print('ok', n, flush=True)
"#;

pub fn run_on(lab: &TestLab, host: &str, name: &str, cmd: &[&str]) {
    let mut args = vec!["run", "--net", "red", "--name", name, "--host", host, "--"];
    args.extend(cmd);
    assert_eq!(lab.ok(&args).trim(), name);
}

/// Packets the client's port has received so far: a measure of its progress.
pub fn progress(lab: &TestLab, name: &str) -> u64 {
    let out = lab.run(&["stats", name, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["port"]["rx_packets"].as_u64().unwrap_or(0)
}

pub fn start_client(lab: &TestLab, host: &str, name: &str, server: &str) -> String {
    start_script(lab, host, name, server, CLIENT)
}

pub fn start_script(lab: &TestLab, host: &str, name: &str, server: &str, script: &str) -> String {
    let stop = format!("{}/stop-{name}", lab.exchange_dir());
    let _ = std::fs::remove_file(&stop);
    run_on(lab, host, name, &["python3", "-c", script, server, &stop]);
    assert!(
        wait_until(Duration::from_secs(20), || progress(lab, name) > 50),
        "client {name} never got going: {}",
        lab.ok(&["logs", name])
    );
    stop
}

/// Checks that a client is still talking, stops it and checks it saw no error or gap.
pub fn finish_client(lab: &TestLab, name: &str, stop: &str) {
    let before = progress(lab, name);
    assert!(
        wait_until(Duration::from_secs(15), || progress(lab, name)
            > before + 50),
        "client {name} stalled: {}",
        lab.ok(&["logs", name])
    );
    std::fs::write(stop, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(70), || lab.inspect(name)["state"]
            == "exited"),
        "client {name} did not end"
    );
    let logs = lab.ok(&["logs", name]);
    let _ = std::fs::remove_file(stop);
    assert_eq!(
        lab.inspect(name)["exit"]["code"],
        0,
        "client {name} failed: {logs}"
    );
    assert!(logs.starts_with("ok "), "client {name}: {logs}");
}
