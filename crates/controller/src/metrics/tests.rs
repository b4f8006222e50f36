//! The text a scrape gives, read back as Prometheus would: names, types, help, values.

use super::*;
use vane_proto::api::{HostStats, PortStats, Usage};

/// The samples of `text`, name with labels -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .expect("a sample is a series and a value");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

/// Every family has one HELP and one TYPE line, and every sample belongs to one.
fn check_families(text: &str) {
    let mut typed = BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                typed.insert(name.to_string(), kind.to_string()).is_none(),
                "{name} twice"
            );
        }
    }
    for (name, kind) in &typed {
        assert!(name.starts_with("vane_"), "{name}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no help"
        );
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name} is a {kind}"
        );
    }
    for series in samples(text).keys() {
        let name = series.split('{').next().unwrap();
        let family = typed.keys().any(|f| {
            name == f
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f.as_str()))
        });
        assert!(family, "{series} belongs to no family");
    }
}

#[test]
fn the_controller_scrape_counts_states_migrations_and_requests() {
    let m = Metrics::default();
    m.migration_started();
    m.migration_started();
    m.migration_failed();
    m.migration_done(
        260,
        &Phases {
            hold_ms: 2,
            dump_ms: 120,
            transfer_ms: 10,
            restore_ms: 125,
            switch_ms: 3,
        },
    );
    m.request("/v1/instances/{name}", &axum::http::Method::GET, 200);
    m.request("/v1/instances/{name}", &axum::http::Method::GET, 200);
    m.request(
        "unmatched",
        &axum::http::Method::from_bytes(b"BREW").unwrap(),
        401,
    );
    let view = ControllerView {
        hosts: [("offline", 1), ("online", 2)].into_iter().collect(),
        instances: [("creating", 0), ("exited", 1), ("lost", 0), ("running", 3)]
            .into_iter()
            .collect(),
        nets: 2,
        policies: 1,
        agents_connected: 2,
    };
    let text = controller_text(&view, &m);
    check_families(&text);
    let s = samples(&text);
    assert_eq!(s["vane_hosts{state=\"online\"}"], 2.0);
    assert_eq!(s["vane_instances{state=\"running\"}"], 3.0);
    assert_eq!(s["vane_instances{state=\"lost\"}"], 0.0);
    assert_eq!(s["vane_nets"], 2.0);
    assert_eq!(s["vane_agents_connected"], 2.0);
    assert_eq!(s["vane_migrations_total"], 2.0);
    assert_eq!(s["vane_migrations_failed_total"], 1.0);
    // 260 ms: above the 0.2 s bound, within the 0.3 s one.
    assert_eq!(s["vane_migration_freeze_seconds_bucket{le=\"0.2\"}"], 0.0);
    assert_eq!(s["vane_migration_freeze_seconds_bucket{le=\"0.3\"}"], 1.0);
    assert_eq!(s["vane_migration_freeze_seconds_bucket{le=\"+Inf\"}"], 1.0);
    assert_eq!(s["vane_migration_freeze_seconds_sum"], 0.26);
    assert_eq!(s["vane_migration_freeze_seconds_count"], 1.0);
    assert_eq!(s["vane_migration_phase_seconds_sum{phase=\"dump\"}"], 0.12);
    assert_eq!(
        s["vane_api_requests_total{route=\"/v1/instances/{name}\",method=\"GET\",status=\"200\"}"],
        2.0
    );
    assert_eq!(
        s["vane_api_requests_total{route=\"unmatched\",method=\"other\",status=\"401\"}"],
        1.0
    );
    // The same state scrapes the same.
    assert_eq!(text, controller_text(&view, &m));
}

#[test]
fn a_host_scrape_labels_instances_peers_and_drop_reasons() {
    let stats = HostStats {
        host: "h1".into(),
        encrypted: true,
        counters: [
            ("handshakes_completed", 2),
            ("drop_bad_mac", 7),
            ("switch_drop_refused", 3),
            ("rekeys", 0),
            ("some_new_counter", 5),
            // Not a name: left out rather than written into the text.
            ("bad name\n{", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        peers: vec![vane_proto::api::PeerStats {
            host: "h2".into(),
            endpoint: None,
            established: true,
            cipher: Some("aes-256-gcm".into()),
            handshakes: 1,
            tx_packets: 10,
            tx_bytes: 840,
            rx_packets: 9,
            rx_bytes: 756,
        }],
    };
    let instances = [InstanceSample {
        name: "web1".into(),
        net: "red".into(),
        port: PortStats {
            tx_packets: 12,
            tx_bytes: 1008,
            refused: 1,
            ..PortStats::default()
        },
        usage: Some(Usage {
            cpu_usec: 1_500_000,
            memory: 4096,
            pids: 2,
            oom_kills: 0,
        }),
    }];
    let text = host_text("h1", &stats, &instances);
    check_families(&text);
    assert!(!text.contains("bad name"), "{text}");
    let s = samples(&text);
    assert_eq!(s["vane_host_encrypted{host=\"h1\"}"], 1.0);
    assert_eq!(s["vane_host_handshakes_completed_total{host=\"h1\"}"], 2.0);
    assert_eq!(s["vane_host_some_new_counter_total{host=\"h1\"}"], 5.0);
    assert_eq!(
        s["vane_host_drops_total{host=\"h1\",reason=\"bad_mac\"}"],
        7.0
    );
    assert_eq!(
        s["vane_switch_drops_total{host=\"h1\",reason=\"refused\"}"],
        3.0
    );
    assert_eq!(
        s["vane_peer_tx_packets_total{host=\"h1\",peer=\"h2\"}"],
        10.0
    );
    assert_eq!(
        s["vane_peer_session_established{host=\"h1\",peer=\"h2\"}"],
        1.0
    );
    assert_eq!(
        s["vane_peer_session_cipher{host=\"h1\",peer=\"h2\",cipher=\"aes-256-gcm\"}"],
        1.0
    );
    let inst = "{name=\"web1\",net=\"red\",host=\"h1\"}";
    assert_eq!(s[&format!("vane_instance_tx_packets_total{inst}")], 12.0);
    assert_eq!(
        s[&format!("vane_instance_refused_packets_total{inst}")],
        1.0
    );
    assert_eq!(s[&format!("vane_instance_cpu_seconds_total{inst}")], 1.5);
    assert_eq!(s[&format!("vane_instance_memory_bytes{inst}")], 4096.0);
    assert!(text.contains("# HELP vane_host_handshakes_completed_total Handshakes completed"));
}
