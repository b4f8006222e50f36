//! A real etcd for tests: Debian's etcd-server, on free local ports, in a directory of its
//! own, killed and removed when dropped (even when the test fails). Shared by the store's
//! unit tests and the lab tests (`crates/vane/tests/store.rs`).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestEtcd {
    child: Option<Child>,
    /// Its client address, HOST:PORT.
    pub member: String,
    peer_url: String,
    dir: tempfile::TempDir,
}

/// A port nobody listens on now (the kernel's choice; released before etcd binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

#[allow(dead_code)]
impl TestEtcd {
    pub fn start() -> TestEtcd {
        let mut etcd = TestEtcd {
            child: None,
            member: format!("127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir: tempfile::tempdir().expect("a directory for etcd"),
        };
        etcd.start_again();
        etcd
    }

    /// Starts the member again on its data and ports, after `stop`; returns once it
    /// listens.
    pub fn start_again(&mut self) {
        let client_url = format!("http://{}", self.member);
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("test={}", self.peer_url)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian's etcd-server; scripts/install-deps.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.member).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the member, as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `etcd://MEMBER/PREFIX`, as `--store` takes it.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.member)
    }

    /// The keys under `prefix/`, as etcdctl lists them.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.member,
                "get",
                "--prefix",
                "--keys-only",
            ])
            .arg(format!("{prefix}/"))
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}
