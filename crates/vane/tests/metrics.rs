//! Prometheus metrics, scraped over HTTPS as Prometheus would (curl with the lab's CA and
//! the admin credential): known traffic between instances on two hosts shows in both
//! hosts' series, a migration in the controller's; anyone but the administrator is
//! refused.

mod common;

use std::process::Command;

use common::TestLab;

/// Echoes every UDP datagram on port 9100.
const ECHO: &str = "
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 9100))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
";

/// Waits for the echo to answer (up to 10 s), then sends SENT more datagrams of 100 bytes
/// one after the other and prints how many came back.
const CLIENT: &str = "
import socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(0.2)
dst = (sys.argv[1], 9100)
deadline = time.time() + 10
while True:
    u.sendto(b'hello', dst)
    try:
        u.recvfrom(2048)
        break
    except OSError:
        if time.time() > deadline:
            raise
u.settimeout(2)
got = 0
for i in range(int(sys.argv[2])):
    u.sendto(b'x' * 100, dst)
    try:
        u.recvfrom(2048)
        got += 1
    except OSError:
        pass
print(got, flush=True)
";

const SENT: u64 = 50;

/// A scrape's answer: status, body and content type; status 0 when no HTTP answer came.
struct Scraped {
    status: u16,
    body: String,
    content_type: String,
}

fn scrape(lab: &TestLab, path: &str, credential: Option<&str>) -> Scraped {
    let ca = format!("{}/controller/ca.crt", lab.state_dir());
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "10", "--cacert", &ca])
        .args(["-w", "\n%{http_code} %{content_type}"]);
    if let Some(c) = credential {
        cmd.args(["-H", &format!("Authorization: Bearer {c}")]);
    }
    let out = cmd
        .arg(format!("{}{path}", lab.controller))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", "0 "));
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    Scraped {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
        content_type: content_type.to_string(),
    }
}

/// The value of the series written exactly `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no {series} in the scrape:\n{text}"))
}

/// Every sample's family has a HELP and a TYPE line: what Prometheus needs to type it.
fn well_formed(text: &str) {
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = l.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
            })
            .unwrap_or(name);
        assert!(name.starts_with("vane_"), "{l}");
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no help for {l}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no type for {l}"
        );
    }
}

#[test]
fn metrics_show_traffic_between_two_hosts_and_a_migration_to_the_administrator_alone() {
    let lab = TestLab::up(2);
    let admin = std::fs::read_to_string(format!("{}/controller/admin.token", lab.state_dir()))
        .expect("admin credential");
    let admin = Some(admin.trim());
    lab.ok(&["net", "create", "mnet", "--subnet", "10.71.0.0/24"]);
    lab.ok(&[
        "run",
        "--net",
        "mnet",
        "--name",
        "m-a",
        "--host",
        "h1",
        "--ip",
        "10.71.0.1",
        "--",
        "sleep",
        "infinity",
    ]);
    lab.ok(&[
        "run",
        "--net",
        "mnet",
        "--name",
        "m-b",
        "--host",
        "h2",
        "--ip",
        "10.71.0.2",
        "--",
        "python3",
        "-c",
        ECHO,
    ]);
    // Known traffic: SENT datagrams from m-a on h1 to m-b on h2 (and the first ones that
    // waited for the echo to start), through a tunnel.
    let sent = SENT.to_string();
    let got: u64 = lab
        .ok(&[
            "exec",
            "m-a",
            "--",
            "python3",
            "-c",
            CLIENT,
            "10.71.0.2",
            &sent,
        ])
        .trim()
        .parse()
        .expect("the client prints a count");
    assert!(got >= SENT - 5, "only {got} of {SENT} echoed");

    // h1: the sender's port, the tunnel to h2, the handshake that made it.
    let h1 = scrape(&lab, "/v1/hosts/h1/metrics", admin);
    assert_eq!(h1.status, 200, "{}", h1.body);
    assert!(
        h1.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        h1.content_type
    );
    let text = &h1.body;
    well_formed(text);
    let a = "{name=\"m-a\",net=\"mnet\",host=\"h1\"}";
    assert!(must(text, &format!("vane_instance_tx_packets_total{a}")) >= (SENT + 1) as f64);
    // 100 bytes of payload, 8 of UDP header, 20 of IP header each.
    assert!(must(text, &format!("vane_instance_tx_bytes_total{a}")) >= (SENT * 128) as f64);
    assert!(must(text, &format!("vane_instance_rx_packets_total{a}")) >= got as f64);
    assert_eq!(
        must(text, &format!("vane_instance_spoofed_packets_total{a}")),
        0.0
    );
    assert!(must(text, &format!("vane_instance_memory_bytes{a}")) > 0.0);
    assert!(must(text, &format!("vane_instance_pids{a}")) >= 1.0);
    value(text, &format!("vane_instance_cpu_seconds_total{a}")).expect("CPU time");
    assert!(must(text, "vane_host_handshakes_completed_total{host=\"h1\"}") >= 1.0);
    let to_h2 = "{host=\"h1\",peer=\"h2\"}";
    assert!(must(text, &format!("vane_peer_tx_packets_total{to_h2}")) >= (SENT + 1) as f64);
    assert!(must(text, &format!("vane_peer_rx_packets_total{to_h2}")) >= got as f64);
    assert_eq!(
        must(text, &format!("vane_peer_session_established{to_h2}")),
        1.0
    );
    assert!(
        text.contains("vane_host_drops_total{host=\"h1\",reason=\"bad_mac\"}"),
        "{text}"
    );
    // m-b runs on h2: not in h1's series.
    assert!(!text.contains("name=\"m-b\""), "{text}");

    // h2: the receiver, which echoed each datagram it got.
    let h2 = scrape(&lab, "/v1/hosts/h2/metrics", admin);
    assert_eq!(h2.status, 200, "{}", h2.body);
    let text = &h2.body;
    well_formed(text);
    let b = "{name=\"m-b\",net=\"mnet\",host=\"h2\"}";
    assert!(must(text, &format!("vane_instance_rx_packets_total{b}")) >= got as f64);
    assert!(must(text, &format!("vane_instance_tx_packets_total{b}")) >= got as f64);
    assert!(must(text, "vane_host_handshakes_completed_total{host=\"h2\"}") >= 1.0);
    assert!(must(text, "vane_peer_rx_packets_total{host=\"h2\",peer=\"h1\"}") >= got as f64);

    // One migration: counted, its freeze in the histogram, the instance's series on its
    // new host.
    lab.ok(&["migrate", "m-b", "--to", "h1"]);
    let freeze_ms = lab.inspect("m-b")["migrations"][0]["freeze_ms"]
        .as_u64()
        .expect("a migration record");
    let ctl = scrape(&lab, "/metrics", admin);
    assert_eq!(ctl.status, 200, "{}", ctl.body);
    let text = &ctl.body;
    well_formed(text);
    assert_eq!(must(text, "vane_hosts{state=\"online\"}"), 2.0);
    assert_eq!(must(text, "vane_hosts{state=\"offline\"}"), 0.0);
    assert_eq!(must(text, "vane_instances{state=\"running\"}"), 2.0);
    assert_eq!(must(text, "vane_nets"), 1.0);
    assert_eq!(must(text, "vane_agents_connected"), 2.0);
    assert_eq!(must(text, "vane_migrations_total"), 1.0);
    assert_eq!(must(text, "vane_migrations_failed_total"), 0.0);
    assert_eq!(must(text, "vane_migration_freeze_seconds_count"), 1.0);
    let sum = must(text, "vane_migration_freeze_seconds_sum");
    assert!(
        (sum - freeze_ms as f64 / 1000.0).abs() < 1e-9,
        "{sum} for {freeze_ms} ms"
    );
    assert!(
        must(
            text,
            "vane_api_requests_total{route=\"/v1/instances\",method=\"POST\",status=\"201\"}"
        ) >= 2.0,
        "{text}"
    );
    let moved = scrape(&lab, "/v1/hosts/h1/metrics", admin);
    assert!(
        moved
            .body
            .contains("{name=\"m-b\",net=\"mnet\",host=\"h1\"}"),
        "{}",
        moved.body
    );

    // Refused: no credential and an unknown one (401), a tenant's (403); none of them
    // counted a scrape of their own.
    let tenant = lab
        .ok(&["token", "create", "--tenant", "mt"])
        .trim()
        .to_string();
    assert!(tenant.starts_with("vanetenant-"), "{tenant}");
    for path in ["/metrics", "/v1/hosts/h1/metrics"] {
        for (credential, status) in [
            (None, 401),
            (Some("vaneadmin-0000"), 401),
            (Some(tenant.as_str()), 403),
        ] {
            let s = scrape(&lab, path, credential);
            assert_eq!(s.status, status, "{path} with {credential:?}: {}", s.body);
            assert!(
                !s.body.contains("vane_"),
                "{path} with {credential:?}: {}",
                s.body
            );
        }
    }
    let text = scrape(&lab, "/metrics", admin).body;
    assert_eq!(
        must(
            &text,
            "vane_api_requests_total{route=\"/metrics\",method=\"GET\",status=\"403\"}"
        ),
        1.0
    );
}
