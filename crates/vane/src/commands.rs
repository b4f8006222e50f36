//! The client commands: each builds a request, sends it, and prints the answer.

use std::io::IsTerminal;
use std::io::Write;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use vane_proto::api::{
    frame, ExecSpec, Host, HostStats, Instance, InstanceState, InstanceStats, JoinToken, Limits,
    Net, NetSpec, Policy, PolicySpec, RunSpec, SpaceSpec, Template, TokenSpec,
};
use vane_proto::validate::{self, PortSpec};

use crate::cli::{
    CredentialCmd, HostCmd, NetCmd, Output, PolicyCmd, RunArgs, SettingsArgs, TemplateCmd, TokenCmd,
};
use crate::client::Client;

/// Prints rows as aligned columns under a header.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

fn path_segment(name: &str) -> Result<&str> {
    // Names travel in URL paths; anything outside the name rules is refused here already.
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("invalid name {name:?}: use lowercase letters, digits and '-'");
    }
    Ok(name)
}

pub fn net(c: &Client, cmd: NetCmd) -> Result<()> {
    match cmd {
        NetCmd::Create {
            name,
            subnet,
            tenant,
            egress,
        } => {
            let net: Net = c.post(
                "/v1/nets",
                &NetSpec {
                    name,
                    subnet,
                    tenant,
                    egress,
                },
            )?;
            println!("{}", net.name);
        }
        NetCmd::Ls(o) => {
            let nets: Vec<Net> = c.get("/v1/nets")?;
            if o.output == Output::Json {
                json(&nets);
            } else {
                table(
                    &["NAME", "TENANT", "SUBNET", "EGRESS", "ID"],
                    nets.into_iter()
                        .map(|n| {
                            vec![
                                n.name,
                                n.tenant,
                                n.subnet.to_string(),
                                if n.egress { "yes" } else { "no" }.into(),
                                n.id.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        NetCmd::Rm { name } => {
            c.delete(&format!("/v1/nets/{}", path_segment(&name)?))?;
            println!("{name}");
        }
    }
    Ok(())
}

/// Parses and checks `--env` pairs, variables included.
fn env_pairs(env: &[String]) -> Result<Vec<(String, String)>> {
    env.iter()
        .map(|e| {
            let (k, v) = validate::env_pair(e)?;
            validate::variables("environment variable", &v)?;
            Ok((k, v))
        })
        .collect()
}

/// Parses and checks limits and file-system settings.
fn settings(a: SettingsArgs) -> Result<(Limits, SpaceSpec)> {
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
    let (limits, space) = settings(args.settings)?;
    let inst: Instance = c.post(
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
        },
    )?;
    println!("{}", inst.name);
    Ok(())
}

/// Bytes in binary units, as limits are given (`256M`).
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn human_rate(bits: u64) -> String {
    match bits {
        b if b >= 1_000_000_000 && b % 1_000_000 == 0 => format!("{}Gbit", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{}Mbit", b as f64 / 1e6),
        b if b >= 1000 => format!("{}kbit", b as f64 / 1e3),
        b => format!("{b}bit"),
    }
}

fn limits_summary(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(m) = l.memory {
        parts.push(format!("mem={}", human_bytes(m)));
    }
    if let Some(c) = l.cpu_millis {
        parts.push(format!("cpus={}", c as f64 / 1000.0));
    }
    if let Some(p) = l.pids {
        parts.push(format!("pids={p}"));
    }
    if let Some(b) = l.bandwidth {
        parts.push(format!("bw={}", human_rate(b)));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

pub fn template(c: &Client, cmd: TemplateCmd) -> Result<()> {
    match cmd {
        TemplateCmd::Create {
            name,
            env,
            settings: s,
        } => {
            validate::name("template name", &name)?;
            let env = env_pairs(&env)?;
            let (limits, space) = settings(*s)?;
            let t: Template = c.post(
                "/v1/templates",
                &Template {
                    name,
                    limits,
                    env,
                    space,
                    tenant: None,
                },
            )?;
            println!("{}", t.name);
        }
        TemplateCmd::Ls(o) => {
            let list: Vec<Template> = c.get("/v1/templates")?;
            if o.output == Output::Json {
                json(&list);
            } else {
                table(
                    &["NAME", "LIMITS", "ROOTFS", "VOLUMES", "REDIRECTS", "ENV"],
                    list.into_iter()
                        .map(|t| {
                            vec![
                                t.name,
                                limits_summary(&t.limits),
                                t.space.rootfs.unwrap_or_else(|| "-".into()),
                                t.space.volumes.len().to_string(),
                                t.space.redirects.len().to_string(),
                                t.env.len().to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        TemplateCmd::Rm { name } => {
            c.delete(&format!("/v1/templates/{}", path_segment(&name)?))?;
            println!("{name}");
        }
    }
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

pub fn ps(c: &Client, output: Output) -> Result<()> {
    let list: Vec<Instance> = c.get("/v1/instances")?;
    if output == Output::Json {
        json(&list);
        return Ok(());
    }
    table(
        &[
            "NAME", "NET", "IP", "HOSTNAME", "HOST", "STATE", "PID", "LIMITS", "COMMAND",
        ],
        list.into_iter()
            .map(|i| {
                let state = match (&i.exit, i.state.as_str()) {
                    (Some(e), "exited") => format!("exited ({e})"),
                    (_, s) => s.to_string(),
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
            })
            .collect(),
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

pub fn migrate(c: &Client, name: &str, to: &str, post_copy: bool, output: Output) -> Result<()> {
    let path = path_segment(name)?;
    let spec = vane_proto::api::MigrateSpec {
        to: to.to_string(),
        post_copy,
    };
    // On a terminal, where the migration is while it lasts: its phase, bytes and rate.
    let show = output != Output::Json && std::io::stderr().is_terminal();
    let inst: Instance = std::thread::scope(|scope| {
        let moving = scope.spawn(|| c.post(&format!("/v1/instances/{path}/migrate"), &spec));
        let mut shown = false;
        while show && !moving.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let Ok(now) = c.get::<Instance>(&format!("/v1/instances/{path}")) else {
                continue;
            };
            if let Some(p) = now.progress {
                eprint!("\r\x1b[K{}", progress_line(name, &p));
                shown = true;
            }
        }
        if shown {
            eprint!("\r\x1b[K");
        }
        moving.join().expect("the migration's thread")
    })?;
    let last = inst.migrations.last();
    if output == Output::Json {
        json(&last);
        return Ok(());
    }
    match last {
        Some(m) => {
            let p = m.phases;
            let memory = match m.post_copy_ms {
                Some(ms) => format!(", memory after it (post-copy, source released in {ms} ms)"),
                None => String::new(),
            };
            println!(
                "{name}: {} -> {}, freeze {} ms (dump {}, transfer {}, restore {}, switch {}), image {:.1} MiB{memory}",
                m.from,
                m.to,
                m.freeze_ms,
                p.dump_ms,
                p.transfer_ms,
                p.restore_ms,
                p.switch_ms,
                m.image_bytes as f64 / (1024.0 * 1024.0)
            )
        }
        None => println!("{name}"),
    }
    Ok(())
}

/// `NAME: PHASE 123.4 MiB (56.7 MiB/s, 2.2 s)`, or without bytes where none are counted.
fn progress_line(name: &str, p: &vane_proto::api::Progress) -> String {
    let secs = p.phase_ms as f64 / 1000.0;
    if p.bytes == 0 {
        return format!("{name}: {} ({secs:.1} s)", p.phase);
    }
    let mib = p.bytes as f64 / (1024.0 * 1024.0);
    format!(
        "{name}: {} {mib:.1} MiB ({:.1} MiB/s, {secs:.1} s)",
        p.phase,
        mib / secs.max(0.001)
    )
}

/// The snapshot's description in its directory.
const SNAPSHOT_INSTANCE: &str = "instance.json";
/// The snapshot's packed CRIU images in its directory.
const SNAPSHOT_IMAGES: &str = "images.tar";
/// The cluster's seal of the other two files.
const SNAPSHOT_SEAL: &str = "seal";

pub fn snapshot(c: &Client, name: &str, out: &std::path::Path, stop: bool) -> Result<()> {
    let mut stream = c.stream(
        &format!("/v1/instances/{}/snapshot", path_segment(name)?),
        Some(&vane_proto::api::SnapshotSpec { stop }),
    )?;
    // A snapshot holds the instance's memory: the directory and its files are the user's
    // alone, and nothing already there (a link, say) is written through.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .and_then(|_| std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    }
    let files = [SNAPSHOT_INSTANCE, SNAPSHOT_IMAGES, SNAPSHOT_SEAL].map(|f| out.join(f));
    let result = receive_snapshot(&mut stream, &files);
    if result.is_err() {
        // Nothing half-made: a snapshot is whole or absent.
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
    }
    let bytes = result.map_err(|e| anyhow::anyhow!("snapshot of {name}: {e}"))?;
    println!(
        "{name}: snapshot in {}, {:.1} MiB",
        out.display(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// A new file only the user can read, in place of whatever was at `path`.
fn create_private(path: &std::path::Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Writes a snapshot stream (`vane_proto::api::RestoreSpec`) into the snapshot's `files`
/// (record, images, seal) as it arrives; returns the images' size.
fn receive_snapshot(
    stream: &mut impl std::io::Read,
    files: &[std::path::PathBuf; 3],
) -> Result<u64> {
    use std::io::Write;
    use vane_proto::api::frame;
    let [record_file, images_file, seal_file] = files;
    let broken = |e: std::io::Error| anyhow::anyhow!("the controller's stream broke: {e}");
    let mut images: Option<std::io::BufWriter<std::fs::File>> = None;
    let mut bytes = 0u64;
    loop {
        let Some((kind, data)) = frame::read(stream).map_err(broken)? else {
            bail!("the controller's stream ended before the snapshot was sealed");
        };
        match kind {
            frame::RECORD => {
                let instance: Instance = serde_json::from_slice(&data)
                    .map_err(|e| anyhow::anyhow!("bad record from the controller: {e}"))?;
                create_private(record_file)?
                    .write_all(&serde_json::to_vec_pretty(&instance).expect("serializes"))
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", record_file.display()))?;
                images = Some(std::io::BufWriter::with_capacity(
                    1 << 20,
                    create_private(images_file)?,
                ));
            }
            frame::IMAGES => {
                let Some(w) = images.as_mut() else {
                    bail!("images before the record in the controller's stream");
                };
                w.write_all(&data)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", images_file.display()))?;
                bytes += data.len() as u64;
            }
            frame::SEAL => {
                let Some(w) = images.take() else {
                    bail!("a seal before the record in the controller's stream");
                };
                w.into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| f.sync_all())
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", images_file.display()))?;
                let mut seal = data;
                seal.push(b'\n');
                create_private(seal_file)?
                    .write_all(&seal)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", seal_file.display()))?;
                return Ok(bytes);
            }
            frame::ERROR => bail!("{}", String::from_utf8_lossy(&data)),
            other => bail!("unexpected frame of kind {other} in the controller's stream"),
        }
    }
}

pub fn restore(
    c: &Client,
    dir: &std::path::Path,
    host: Option<String>,
    name: Option<String>,
    ip: Option<std::net::Ipv4Addr>,
    hostname: Option<String>,
) -> Result<()> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    };
    let instance: Instance = serde_json::from_slice(&read(SNAPSHOT_INSTANCE)?).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a snapshot: {e}",
            dir.join(SNAPSHOT_INSTANCE).display()
        )
    })?;
    let seal = String::from_utf8_lossy(&read(SNAPSHOT_SEAL)?)
        .trim()
        .to_string();
    let images_path = dir.join(SNAPSHOT_IMAGES);
    let images = std::fs::File::open(&images_path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", images_path.display()))?;
    let images_bytes = images
        .metadata()
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", images_path.display()))?
        .len();
    let spec = vane_proto::api::RestoreSpec {
        instance,
        seal,
        images_bytes,
        host,
        name,
        ip,
        hostname,
    };
    let record = vane_proto::api::frame::encoded(
        vane_proto::api::frame::RECORD,
        &serde_json::to_vec(&spec).expect("serializes"),
    );
    let body = std::io::Read::chain(
        std::io::Cursor::new(record),
        ImageFrames {
            file: images,
            frame: Vec::new(),
            at: 0,
        },
    );
    let inst: Instance =
        c.post_stream("/v1/restore", vane_proto::api::SNAPSHOT_MEDIA_TYPE, body)?;
    println!("{}", inst.name);
    Ok(())
}

/// A snapshot's packed images as `IMAGES` frames of up to 1 MiB, read as they are sent.
struct ImageFrames {
    file: std::fs::File,
    /// The frame being sent, and how much of it is.
    frame: Vec<u8>,
    at: usize,
}

impl std::io::Read for ImageFrames {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.frame.len() {
            let mut data = vec![0u8; 1 << 20];
            let n = self.file.read(&mut data)?;
            if n == 0 {
                return Ok(0);
            }
            self.frame =
                vane_proto::api::frame::encoded(vane_proto::api::frame::IMAGES, &data[..n]);
            self.at = 0;
        }
        let n = buf.len().min(self.frame.len() - self.at);
        buf[..n].copy_from_slice(&self.frame[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
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

pub fn exec(c: &Client, name: &str, env: Vec<String>, cmd: Vec<String>) -> Result<i32> {
    let env = env
        .iter()
        .map(|e| validate::env_pair(e))
        .collect::<Result<Vec<_>, _>>()?;
    let r = c.stream(
        &format!("/v1/instances/{}/exec", path_segment(name)?),
        Some(&ExecSpec { cmd, env }),
    )?;
    relay(r)
}

pub fn logs(c: &Client, name: &str) -> Result<()> {
    let r = c.stream::<()>(&format!("/v1/instances/{}/logs", path_segment(name)?), None)?;
    relay(r).map(|_| ())
}

pub fn policy(c: &Client, cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Allow { from, to, port } => {
            let port = port.map(|p| p.parse::<PortSpec>()).transpose()?;
            let p: Policy = c.post("/v1/policies", &PolicySpec { from, to, port })?;
            println!("{}", p.id);
        }
        PolicyCmd::Ls(o) => {
            let list: Vec<Policy> = c.get("/v1/policies")?;
            if o.output == Output::Json {
                json(&list);
            } else {
                table(
                    &["ID", "FROM", "TO", "PORT"],
                    list.into_iter()
                        .map(|p| {
                            vec![
                                p.id.to_string(),
                                p.from,
                                p.to,
                                p.port
                                    .map(|p| p.to_string())
                                    .unwrap_or_else(|| "any".into()),
                            ]
                        })
                        .collect(),
                );
            }
        }
        PolicyCmd::Rm { first, to, port } => {
            let ids: Vec<u32> = match (first.parse::<u32>(), to) {
                (Ok(id), None) => vec![id],
                (_, Some(to)) => {
                    let port = port.map(|p| p.parse::<PortSpec>()).transpose()?;
                    let list: Vec<Policy> = c.get("/v1/policies")?;
                    let ids: Vec<u32> = list
                        .into_iter()
                        .filter(|p| p.from == first && p.to == to)
                        .filter(|p| port.is_none() || p.port == port)
                        .map(|p| p.id)
                        .collect();
                    if ids.is_empty() {
                        bail!("no policy from {first:?} to {to:?}");
                    }
                    ids
                }
                (Err(_), None) => bail!("invalid policy {first:?}: give an id, or FROM TO"),
            };
            for id in ids {
                c.delete(&format!("/v1/policies/{id}"))?;
                println!("{id}");
            }
        }
    }
    Ok(())
}

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
        CredentialCmd::Ls(o) => {
            let list: Vec<vane_proto::api::CredentialInfo> = c.get("/v1/credentials")?;
            if o.output == Output::Json {
                json(&list);
            } else {
                let now = vane_proto::unix_now();
                table(
                    &["ID", "TENANT", "EXPIRES IN"],
                    list.into_iter()
                        .map(|t| {
                            let expires = t.expires.map_or("never".to_string(), |e| {
                                format!("{}s", e.saturating_sub(now))
                            });
                            vec![t.id, t.tenant, expires]
                        })
                        .collect(),
                );
            }
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
        HostCmd::Ls(o) => {
            let hosts: Vec<Host> = c.get("/v1/hosts")?;
            if o.output == Output::Json {
                json(&hosts);
            } else {
                table(
                    &["NAME", "LOCATOR", "STATE", "INSTANCES"],
                    hosts
                        .into_iter()
                        .map(|h| {
                            vec![
                                h.name,
                                h.locator
                                    .map(|l| l.to_string())
                                    .unwrap_or_else(|| "-".into()),
                                format!("{:?}", h.state).to_lowercase(),
                                h.instances.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
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
            cmd: Some(TokenCmd::Ls(o)),
            ..
        } => {
            let list: Vec<vane_proto::api::TokenInfo> = c.get("/v1/hosts/tokens")?;
            if o.output == Output::Json {
                json(&list);
            } else {
                let now = vane_proto::unix_now();
                table(
                    &["ID", "EXPIRES IN", "USES"],
                    list.into_iter()
                        .map(|t| {
                            vec![
                                t.id,
                                format!("{}s", t.expires.saturating_sub(now)),
                                if t.single_use { "once" } else { "until expiry" }.into(),
                            ]
                        })
                        .collect(),
                );
            }
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
