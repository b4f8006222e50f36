//! `vane host` and `vane token`: hosts (list, stats, removal), the join tokens that enroll
//! them, and tenant credentials.

use anyhow::{bail, Result};

use vane_proto::api::{Host, HostStats, JoinToken, TokenSpec};
use vane_proto::validate;

use super::output::{json, listing, table};
use super::path_segment;
use crate::cli::{CredentialCmd, HostCmd, Output, TokenCmd};
use crate::client::Client;

pub fn credential(c: &Client, cmd: CredentialCmd) -> Result<()> {
    match cmd {
        CredentialCmd::Create { tenant, ttl } => {
            validate::name("tenant", &tenant)?;
            let ttl_secs = ttl.as_deref().map(parse_duration).transpose()?;
            let cred: vane_proto::api::TenantCredential = c.post(
                "/v1/credentials",
                &vane_proto::api::CredentialSpec { tenant, ttl_secs },
            )?;
            println!("{}", cred.credential);
        }
        CredentialCmd::Ls(how) => {
            let list: Vec<vane_proto::api::CredentialInfo> = c.get("/v1/credentials")?;
            let now = vane_proto::unix_now();
            listing(
                how,
                list,
                &["ID", "TENANT", "EXPIRES IN"],
                |t| t.id.clone(),
                |t| {
                    let expires = t.expires.map_or("never".to_string(), |e| {
                        format!("{}s", e.saturating_sub(now))
                    });
                    vec![t.id, t.tenant, expires]
                },
            );
        }
        CredentialCmd::Rm { id } => {
            c.delete(&format!("/v1/credentials/{}", path_segment(&id)?))?;
            println!("{id}");
        }
    }
    Ok(())
}

pub fn host(c: &Client, cmd: HostCmd) -> Result<()> {
    match cmd {
        HostCmd::Ls(how) => {
            let hosts: Vec<Host> = c.get("/v1/hosts")?;
            listing(
                how,
                hosts,
                &["NAME", "LOCATOR", "STATE", "INSTANCES"],
                |h| h.name.clone(),
                |h| {
                    vec![
                        h.name,
                        h.locator
                            .map(|l| l.to_string())
                            .unwrap_or_else(|| "-".into()),
                        h.state.as_str().to_string(),
                        h.instances.to_string(),
                    ]
                },
            );
        }
        HostCmd::Token {
            cmd: None,
            ttl,
            reusable,
        } => {
            let ttl_secs = parse_duration(&ttl)?;
            let token: JoinToken = c.post("/v1/hosts/tokens", &TokenSpec { ttl_secs, reusable })?;
            println!("{}", token.token);
        }
        HostCmd::Token {
            cmd: Some(TokenCmd::Ls(how)),
            ..
        } => {
            let list: Vec<vane_proto::api::TokenInfo> = c.get("/v1/hosts/tokens")?;
            let now = vane_proto::unix_now();
            listing(
                how,
                list,
                &["ID", "EXPIRES IN", "USES"],
                |t| t.id.clone(),
                |t| {
                    vec![
                        t.id,
                        format!("{}s", t.expires.saturating_sub(now)),
                        if t.single_use { "once" } else { "until expiry" }.into(),
                    ]
                },
            );
        }
        HostCmd::Token {
            cmd: Some(TokenCmd::Rm { id }),
            ..
        } => {
            c.delete(&format!("/v1/hosts/tokens/{}", path_segment(&id)?))?;
            println!("{id}");
        }
        HostCmd::Stats { name, output } => {
            vane_proto::validate::name("host name", &name)?;
            let stats: HostStats = c.get(&format!("/v1/hosts/{name}/stats"))?;
            if output.output == Output::Json {
                json(&stats);
                return Ok(());
            }
            println!(
                "host {}  tunnels {}",
                stats.host,
                if stats.encrypted {
                    "encrypted (Noise IK)"
                } else {
                    "PLAINTEXT"
                }
            );
            table(
                &["COUNTER", "VALUE"],
                stats
                    .counters
                    .iter()
                    .map(|(k, v)| vec![k.clone(), v.to_string()])
                    .collect(),
            );
            println!();
            table(
                &[
                    "PEER",
                    "ENDPOINT",
                    "SESSION",
                    "CIPHER",
                    "HANDSHAKES",
                    "TX",
                    "RX",
                ],
                stats
                    .peers
                    .into_iter()
                    .map(|p| {
                        vec![
                            p.host,
                            p.endpoint
                                .map(|e| e.to_string())
                                .unwrap_or_else(|| "-".into()),
                            if p.established { "up" } else { "idle" }.into(),
                            p.cipher.unwrap_or_else(|| "-".into()),
                            p.handshakes.to_string(),
                            format!("{} pkts/{} B", p.tx_packets, p.tx_bytes),
                            format!("{} pkts/{} B", p.rx_packets, p.rx_bytes),
                        ]
                    })
                    .collect(),
            );
        }
        HostCmd::Rm { name, force } => {
            vane_proto::validate::name("host name", &name)?;
            let q = if force { "?force=true" } else { "" };
            c.delete(&format!("/v1/hosts/{name}{q}"))?;
            println!("{name}");
        }
    }
    Ok(())
}

/// Parses a duration given as seconds or with a unit: `90`, `90s`, `30m`, `12h`, `7d`.
fn parse_duration(text: &str) -> Result<u64> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("invalid duration {text:?}: use seconds or a unit s, m, h, d (e.g. 12h)"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid duration {text:?}: use e.g. 90, 30m, 12h, 7d"))?;
    Ok(n.saturating_mul(scale))
}
