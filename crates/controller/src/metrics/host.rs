//! A host's scrape: what its agent answered (`host_stats`, `stats` per running instance)
//! as series labelled with the host, its peers and its instances.

use vane_proto::api::{HostStats, Instance, PeerStats, PortStats, Usage};

use super::{Kind, Scrape, Value};

/// A counter of an agent's answer: its name, help, and how to read it.
type Field<T> = (&'static str, &'static str, fn(&T) -> u64);

/// How to read a value off an agent's answer.
type Read<T> = fn(&T) -> Value;

/// One instance running on a host, as its agent's `stats` answered.
pub(crate) struct InstanceSample {
    pub name: String,
    pub net: String,
    pub port: PortStats,
    pub usage: Option<Usage>,
}

impl InstanceSample {
    pub(crate) fn new(inst: &Instance, port: PortStats, usage: Option<Usage>) -> InstanceSample {
        InstanceSample {
            name: inst.name.clone(),
            net: inst.net.clone(),
            port,
            usage,
        }
    }
}

/// Help of the host counters `HostStats` carries (docs/data-path.md#host-counters), but
/// the drops by reason, which make two families of their own. A counter not listed (a
/// newer agent's) is still exposed, with a help that points to the list.
const HOST_COUNTERS: &[(&str, &str)] = &[
    (
        "handshakes_initiated",
        "Handshake initiations sent (first attempts, retries, rekeys)",
    ),
    (
        "handshakes_completed",
        "Handshakes completed, as either side",
    ),
    ("handshake_timeouts", "Handshakes given up after 15 s"),
    (
        "rekeys",
        "Rekeys started by a session's age or message count",
    ),
    (
        "sessions_expired",
        "Sessions dropped at their age or message limit",
    ),
    (
        "idle_teardowns",
        "Peers whose sessions were dropped for idleness",
    ),
    ("data_sealed", "Data messages sealed, keepalives included"),
    ("data_opened", "Data messages opened, keepalives included"),
    (
        "directory_lookups",
        "Directory lookups sent to the controller",
    ),
    (
        "directory_lookup_misses",
        "Directory lookups answered with no member",
    ),
    (
        "miss_queue_dropped",
        "Packets that waited for the directory and were dropped",
    ),
    (
        "handshake_queue_dropped",
        "Packets that waited for a handshake and were dropped",
    ),
    (
        "frag_needed_sent",
        "ICMP fragmentation needed messages written back to instances",
    ),
    (
        "send_errors",
        "Sends the underlay socket refused (a failed batch counts once)",
    ),
    (
        "underlay_sends",
        "System calls that sent datagrams on the underlay",
    ),
    ("underlay_datagrams_sent", "Datagrams sent on the underlay"),
    (
        "underlay_receives",
        "System calls that received datagrams from the underlay",
    ),
    (
        "underlay_datagrams_received",
        "Datagrams received from the underlay",
    ),
];

/// A host's scrape: its switch and tunnel counters, its peers, its running instances.
pub(crate) fn host_text(host: &str, stats: &HostStats, instances: &[InstanceSample]) -> String {
    let mut s = Scrape::default();
    let h = [("host", host)];
    s.family(
        "host_encrypted",
        "Whether tunnels between hosts are encrypted (0 only in a plaintext cluster)",
        Kind::Gauge,
    );
    s.sample(&h, Value::Int(stats.encrypted as u64));
    // Drops by reason: `drop_*` are the node's and the tunnels' (datagrams and frames),
    // `switch_drop_*` the switch's (packets).
    let mut drops = Vec::new();
    let mut switch_drops = Vec::new();
    let mut others = Vec::new();
    for (name, v) in &stats.counters {
        // Names come from the agent: only what is a valid name part goes into the text.
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            continue;
        }
        if let Some(reason) = name.strip_prefix("switch_drop_") {
            switch_drops.push((reason, *v));
        } else if let Some(reason) = name.strip_prefix("drop_") {
            drops.push((reason, *v));
        } else {
            others.push((name.as_str(), *v));
        }
    }
    s.family(
        "host_drops",
        "Datagrams and frames the host's tunnels and node dropped, by reason (docs/data-path.md#host-counters)",
        Kind::Counter,
    );
    for (reason, v) in drops {
        s.sample(&[("host", host), ("reason", reason)], Value::Int(v));
    }
    s.family(
        "switch_drops",
        "Packets the host's switch dropped, by reason (docs/data-path.md#host-counters)",
        Kind::Counter,
    );
    for (reason, v) in switch_drops {
        s.sample(&[("host", host), ("reason", reason)], Value::Int(v));
    }
    for (name, v) in others {
        let help = HOST_COUNTERS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, help)| help.to_string())
            .unwrap_or_else(|| format!("Host counter {name} (docs/data-path.md#host-counters)"));
        s.family(&format!("host_{name}"), &help, Kind::Counter);
        s.sample(&h, Value::Int(v));
    }
    // Per peer host, in the agent's order (by name).
    let peer_counters: [Field<PeerStats>; 5] = [
        (
            "peer_handshakes",
            "Handshakes completed with the peer host",
            |p| p.handshakes,
        ),
        (
            "peer_tx_packets",
            "Data messages sent to the peer host, keepalives included",
            |p| p.tx_packets,
        ),
        ("peer_tx_bytes", "Inner bytes sent to the peer host", |p| {
            p.tx_bytes
        }),
        (
            "peer_rx_packets",
            "Data messages received from the peer host, keepalives included",
            |p| p.rx_packets,
        ),
        (
            "peer_rx_bytes",
            "Inner bytes received from the peer host",
            |p| p.rx_bytes,
        ),
    ];
    for (name, help, get) in peer_counters {
        s.family(name, help, Kind::Counter);
        for p in &stats.peers {
            s.sample(&[("host", host), ("peer", &p.host)], Value::Int(get(p)));
        }
    }
    s.family(
        "peer_session_established",
        "Whether a tunnel session with the peer host is up (always 1 in a plaintext cluster)",
        Kind::Gauge,
    );
    for p in &stats.peers {
        s.sample(
            &[("host", host), ("peer", &p.host)],
            Value::Int(p.established as u64),
        );
    }
    s.family(
        "peer_session_cipher",
        "The AEAD of the session up with the peer host, as a label (1 while the session is up)",
        Kind::Gauge,
    );
    for p in &stats.peers {
        if let Some(cipher) = &p.cipher {
            s.sample(
                &[("host", host), ("peer", &p.host), ("cipher", cipher)],
                Value::Int(1),
            );
        }
    }
    // Per instance, by name.
    let mut instances: Vec<&InstanceSample> = instances.iter().collect();
    instances.sort_by(|a, b| a.name.cmp(&b.name));
    let port_counters: [Field<PortStats>; 8] = [
        ("instance_tx_packets", "Packets the instance sent", |p| {
            p.tx_packets
        }),
        ("instance_tx_bytes", "Bytes the instance sent", |p| {
            p.tx_bytes
        }),
        (
            "instance_rx_packets",
            "Packets delivered to the instance",
            |p| p.rx_packets,
        ),
        (
            "instance_rx_bytes",
            "Bytes delivered to the instance",
            |p| p.rx_bytes,
        ),
        (
            "instance_refused_packets",
            "Packets the instance sent that policy refused",
            |p| p.refused,
        ),
        (
            "instance_spoofed_packets",
            "Packets the instance sent with a source address not its own",
            |p| p.spoofed,
        ),
        (
            "instance_dropped_packets",
            "Other drops of packets the instance sent",
            |p| p.dropped,
        ),
        (
            "instance_rate_limited_packets",
            "Packets to or from the instance dropped over its bandwidth limit",
            |p| p.rate_limited,
        ),
    ];
    // `name`, not `instance`: Prometheus gives every series it scrapes an `instance`
    // label of its own (the target), and would rename ours.
    let labels = |i: &InstanceSample| {
        [
            ("name", i.name.clone()),
            ("net", i.net.clone()),
            ("host", host.to_string()),
        ]
    };
    for (name, help, get) in port_counters {
        // Counted by the switch port since it was attached (the instance's start, a
        // migration's restore, an agent's restart).
        s.family(name, help, Kind::Counter);
        for i in &instances {
            s.sample_owned(labels(i), Value::Int(get(&i.port)));
        }
    }
    // From the instance's cgroups, while it runs.
    let usage: [(&str, &str, Kind, Read<Usage>); 4] = [
        (
            "instance_cpu_seconds",
            "CPU time the instance used since it started",
            Kind::Counter,
            |u| Value::Float(u.cpu_usec as f64 / 1e6),
        ),
        (
            "instance_memory_bytes",
            "Memory the instance's cgroup holds now",
            Kind::Gauge,
            |u| Value::Int(u.memory),
        ),
        (
            "instance_pids",
            "Processes and threads of the instance now",
            Kind::Gauge,
            |u| Value::Int(u.pids),
        ),
        (
            "instance_oom_kills",
            "Processes of the instance the kernel killed for its memory limit",
            Kind::Counter,
            |u| Value::Int(u.oom_kills),
        ),
    ];
    for (name, help, kind, get) in usage {
        s.family(name, help, kind);
        for i in &instances {
            if let Some(u) = &i.usage {
                s.sample_owned(labels(i), get(u));
            }
        }
    }
    s.encode()
}
