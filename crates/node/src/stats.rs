//! What a node counts, as `vane host stats` shows it.

use std::collections::BTreeMap;

use vane_proto::api::{HostStats, PeerStats};

use crate::Node;

impl Node {
    /// The host's counters and its peers' sessions (`vane host stats`), with the shell's
    /// own counters (`shell`: the socket's) among them.
    pub fn host_stats(&self, shell: &[(&str, u64)]) -> HostStats {
        let mut counters = BTreeMap::new();
        let t = self.tunnels.counters();
        for (name, value) in [
            ("handshakes_initiated", t.handshakes_initiated),
            ("handshakes_completed", t.handshakes_completed),
            ("handshake_timeouts", t.handshake_timeouts),
            ("rekeys", t.rekeys),
            ("sessions_expired", t.sessions_expired),
            ("idle_teardowns", t.idle_teardowns),
            ("data_sealed", t.data_sealed),
            ("data_opened", t.data_opened),
        ] {
            counters.insert(name.to_string(), value);
        }
        for reason in vane_tunnel::DropReason::ALL {
            counters.insert(
                format!("drop_{}", tunnel_drop_name(reason)),
                t.drops(reason),
            );
        }
        let d = self.switch.drop_counters();
        for reason in vane_switch::DropReason::ALL {
            counters.insert(format!("switch_drop_{}", reason.as_str()), d.get(reason));
        }
        let c = &self.counters;
        for (name, value) in [
            ("directory_lookups", c.lookups),
            ("directory_lookup_misses", c.lookup_misses),
            ("miss_queue_dropped", c.miss_queue_dropped),
            ("handshake_queue_dropped", c.handshake_queue_dropped),
            ("frag_needed_sent", c.frag_needed_sent),
            ("drop_no_locator", c.drop_no_locator),
            (
                "drop_plaintext_unknown_sender",
                c.drop_plaintext_unknown_sender,
            ),
            ("drop_wrong_mode", c.drop_wrong_mode),
            ("drop_frame_too_large", c.drop_frame_too_large),
            ("drop_bad_offload", c.drop_bad_offload),
        ]
        .into_iter()
        .chain(shell.iter().copied())
        {
            counters.insert(name.to_string(), value);
        }
        let plaintext = self.identity.is_some_and(|(_, p)| p);
        let mut peers: Vec<PeerStats> = self
            .peers
            .iter()
            .map(|(id, p)| {
                let mut s = PeerStats {
                    host: p.name.clone(),
                    endpoint: p.endpoint,
                    ..PeerStats::default()
                };
                if plaintext {
                    s.established = true;
                    s.cipher = Some("none".into());
                    (s.tx_packets, s.tx_bytes) = p.plain_tx;
                    (s.rx_packets, s.rx_bytes) = p.plain_rx;
                } else if let Some(t) = self.tunnels.peer_stats(*id) {
                    s.established = t.established;
                    s.cipher = t.cipher.map(|c| c.name().to_string());
                    s.handshakes = t.handshakes;
                    s.tx_packets = t.tx_packets;
                    s.tx_bytes = t.tx_bytes;
                    s.rx_packets = t.rx_packets;
                    s.rx_bytes = t.rx_bytes;
                }
                s
            })
            .collect();
        peers.sort_by(|a, b| a.host.cmp(&b.host));
        HostStats {
            host: String::new(),
            encrypted: !plaintext,
            counters,
            peers,
        }
    }
}

/// Counter name of a tunnel drop reason.
fn tunnel_drop_name(reason: vane_tunnel::DropReason) -> &'static str {
    use vane_tunnel::DropReason as R;
    match reason {
        R::Malformed => "malformed",
        R::UnknownType => "unknown_type",
        R::UnknownPeer => "unknown_peer",
        R::UnknownIndex => "unknown_index",
        R::AuthFailed => "auth_failed",
        R::Replayed => "replayed",
        R::StaleInitiation => "stale_initiation",
        R::Expired => "expired",
        R::TooLarge => "too_large",
        R::BadMac => "bad_mac",
        R::RateLimited => "rate_limited",
        R::CookieSent => "cookie_sent",
        R::UnderLoad => "under_load",
        R::SourceRateLimited => "source_rate_limited",
    }
}
