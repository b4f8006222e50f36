//! Commands on instances: `run` (with the parsing of its settings, shared with templates),
//! `ps`, `top`, `inspect`, `stop`, `rm`, `stats`, and `exec` and `logs`, which relay the
//! instance's output.

use std::io::Write;

use anyhow::{bail, Context, Result};

use vane_proto::api::{frame, Instance, InstanceState, InstanceStats, Limits, RunSpec, SpaceSpec};
use vane_proto::validate;

use super::output::{human_bytes, json, limits_summary, listing, table};
use super::path_segment;
use crate::cli::{ListArg, Output, RunArgs, SettingsArgs};
use crate::client::Client;

/// Parses and checks `--env` pairs, variables included.
pub(super) fn env_pairs(env: &[String]) -> Result<Vec<(String, String)>> {
    env.iter()
        .map(|e| {
            let (k, v) = validate::env_pair(e)?;
            validate::variables("environment variable", &v)?;
            Ok((k, v))
        })
        .collect()
}

/// Parses and checks limits and file-system settings.
pub(super) fn settings(a: SettingsArgs) -> Result<(Limits, SpaceSpec)> {
    let limits = Limits {
        memory: a.memory.as_deref().map(validate::size).transpose()?,
        cpu_millis: a.cpus.as_deref().map(validate::cpus).transpose()?,
        pids: a.pids.as_deref().map(validate::pids).transpose()?,
        bandwidth: a.bandwidth.as_deref().map(validate::rate).transpose()?,
    };
    if let Some(r) = &a.rootfs {
        validate::rootfs(r)?;
    }
    validate::capability_set(&a.cap_add, &a.cap_drop)?;
    let space = SpaceSpec {
        cap_add: a.cap_add,
        cap_drop: a.cap_drop,
        privileged: a.privileged,
        rootfs: a.rootfs,
        volumes: a
            .volumes
            .iter()
            .map(|v| validate::volume(v))
            .collect::<Result<_, _>>()?,
        redirects: a
            .redirects
            .iter()
            .map(|r| validate::redirect(r))
            .collect::<Result<_, _>>()?,
    };
    Ok((limits, space))
}

pub fn run(c: &Client, args: RunArgs) -> Result<()> {
    let env = env_pairs(&args.env)?;
    if let Some(name) = &args.name {
        validate::name("instance name", name)?;
    }
    if let Some(t) = &args.template {
        validate::name("template name", t)?;
    }
    if let Some(s) = &args.service {
        validate::name("service name", s)?;
    }
    let (limits, space) = settings(args.settings)?;
    let checkpoint_every = match &args.checkpoint_every {
        Some(d) => {
            let every = validate::duration("checkpoint interval", d)?;
            if every < std::time::Duration::from_secs(1) {
                bail!("invalid checkpoint interval {d:?}: at least one second");
            }
            Some(every.as_secs())
        }
        None => None,
    };
    let publish = args
        .publish
        .iter()
        .map(|p| p.parse())
        .collect::<Result<Vec<validate::Publish>, _>>()?;
    // Sent again after a lost answer (the replica that took it died), it makes one instance.
    let key = format!("{:032x}", rand::random::<u128>());
    let inst: Instance = c.post_keyed(
        "/v1/instances",
        &RunSpec {
            name: args.name,
            net: args.net,
            ip: args.ip,
            hostname: args.hostname,
            host: args.host,
            env,
            cmd: args.cmd,
            template: args.template,
            limits,
            space,
            restart: args.restart,
            publish,
            service: args.service,
            checkpoint_every,
        },
        Some(&key),
    )?;
    println!("{}", inst.name);
    Ok(())
}

/// `vane top`: two samples of every running instance's counters, `interval` apart.
pub fn top(c: &Client, interval: f64, output: Output) -> Result<()> {
    if !(interval.is_finite() && (0.1..=60.0).contains(&interval)) {
        bail!("invalid interval {interval}: give 0.1 to 60 seconds");
    }
    let list: Vec<Instance> = c.get("/v1/instances")?;
    let running: Vec<Instance> = list
        .into_iter()
        .filter(|i| i.state == InstanceState::Running)
        .collect();
    let sample = |i: &Instance| -> Option<InstanceStats> {
        c.get(&format!("/v1/instances/{}/stats", i.name)).ok()
    };
    let first: Vec<Option<InstanceStats>> = running.iter().map(sample).collect();
    let start = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs_f64(interval));
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (i, before) in running.iter().zip(first) {
        let Some(after) = sample(i) else { continue };
        let elapsed = start.elapsed().as_secs_f64();
        let usage = after.usage.unwrap_or_default();
        let cpu = match (before.and_then(|b| b.usage), after.usage) {
            (Some(b), Some(a)) => {
                100.0 * a.cpu_usec.saturating_sub(b.cpu_usec) as f64 / 1e6 / elapsed
            }
            _ => 0.0,
        };
        let p = after.port;
        rows.push(vec![
            i.name.clone(),
            format!("{cpu:.1}%"),
            format!(
                "{}{}",
                human_bytes(usage.memory),
                i.limits
                    .memory
                    .map(|m| format!(" / {}", human_bytes(m)))
                    .unwrap_or_default()
            ),
            usage.pids.to_string(),
            p.rx_packets.to_string(),
            human_bytes(p.rx_bytes),
            p.tx_packets.to_string(),
            human_bytes(p.tx_bytes),
            p.refused.to_string(),
            p.rate_limited.to_string(),
        ]);
        out.push(serde_json::json!({
            "name": i.name,
            "cpu_percent": (cpu * 10.0).round() / 10.0,
            "usage": usage,
            "port": p,
            "limits": i.limits,
        }));
    }
    if output == Output::Json {
        json(&out);
    } else {
        table(
            &[
                "NAME", "CPU", "MEMORY", "PIDS", "RX PKTS", "RX BYTES", "TX PKTS", "TX BYTES",
                "REFUSED", "LIMITED",
            ],
            rows,
        );
    }
    Ok(())
}

pub fn ps(c: &Client, how: ListArg) -> Result<()> {
    let list: Vec<Instance> = c.get("/v1/instances")?;
    listing(
        how,
        list,
        &[
            "NAME", "NET", "IP", "HOSTNAME", "HOST", "STATE", "PID", "LIMITS", "COMMAND",
        ],
        |i| i.name.clone(),
        |i| {
            let state = match (&i.exit, i.state.as_str()) {
                (Some(e), "exited") => format!("exited ({e})"),
                (_, s) => s.to_string(),
            };
            let state = match i.restarts {
                0 => state,
                n => format!("{state} (restarted {n}x)"),
            };
            let state = match (&i.migrating, i.migrations.len()) {
                (Some(to), _) => format!("{state} (migrating to {to})"),
                (None, 0) => state,
                (None, n) => format!("{state} (migrated {n}x)"),
            };
            // Outside the sandbox: worth seeing at a glance.
            let state = if i.space.privileged {
                format!("{state} (privileged)")
            } else {
                state
            };
            vec![
                i.name,
                i.net,
                i.ip.to_string(),
                i.hostname,
                i.host,
                state,
                i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                limits_summary(&i.limits),
                i.cmd.join(" "),
            ]
        },
    );
    Ok(())
}

pub fn inspect(c: &Client, name: &str) -> Result<()> {
    let inst: Instance = c.get(&format!("/v1/instances/{}", path_segment(name)?))?;
    json(&inst);
    Ok(())
}

pub fn stop(c: &Client, name: &str) -> Result<()> {
    let _: Instance = c.post(
        &format!("/v1/instances/{}/stop", path_segment(name)?),
        &serde_json::json!({}),
    )?;
    println!("{name}");
    Ok(())
}

pub fn rm(c: &Client, name: &str, force: bool) -> Result<()> {
    let q = if force { "?force=true" } else { "" };
    c.delete(&format!("/v1/instances/{}{q}", path_segment(name)?))?;
    println!("{name}");
    Ok(())
}

pub fn stats(c: &Client, name: &str, output: Output) -> Result<()> {
    let s: InstanceStats = c.get(&format!("/v1/instances/{}/stats", path_segment(name)?))?;
    if output == Output::Json {
        json(&s);
        return Ok(());
    }
    let p = s.port;
    table(
        &[
            "NAME", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES", "REFUSED", "SPOOFED", "DROPPED",
            "LIMITED",
        ],
        vec![vec![
            s.name,
            p.tx_packets.to_string(),
            p.tx_bytes.to_string(),
            p.rx_packets.to_string(),
            p.rx_bytes.to_string(),
            p.refused.to_string(),
            p.spoofed.to_string(),
            p.dropped.to_string(),
            p.rate_limited.to_string(),
        ]],
    );
    Ok(())
}

/// Copies a stream of frames to stdout and stderr; returns the exit code it ends with.
fn relay(mut r: impl std::io::Read) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    while let Some((kind, data)) = frame::read(&mut r).context("reading from the controller")? {
        match kind {
            frame::STDOUT => {
                out.write_all(&data)?;
                out.flush()?;
            }
            frame::STDERR => {
                err.write_all(&data)?;
                err.flush()?;
            }
            frame::EXIT => {
                let code: [u8; 4] = data.as_slice().try_into().context("malformed exit frame")?;
                return Ok(i32::from_be_bytes(code));
            }
            frame::ERROR => bail!("{}", String::from_utf8_lossy(&data)),
            _ => {}
        }
    }
    bail!("the connection to the instance's host was lost")
}

/// `vane logs`: the whole log, or its last `tail` lines; with `follow`, then what the
/// program writes, until Ctrl-C or the instance's removal.
pub fn logs(c: &Client, name: &str, follow: bool, tail: Option<u64>) -> Result<()> {
    let mut query = Vec::new();
    if follow {
        query.push("follow=true".to_string());
    }
    if let Some(n) = tail {
        query.push(format!("tail={n}"));
    }
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    let r = c.stream::<()>(
        &format!("/v1/instances/{}/logs{query}", path_segment(name)?),
        None,
    )?;
    relay(r).map(|_| ())
}
