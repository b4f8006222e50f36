//! Instances on this host: setting one up (namespace, TUN device, rules, cgroups, program),
//! taking them back after an agent restart, tearing them down.
//!
//! Each instance has a directory `STATE/instances/ID/` holding `launch.json` (what to start),
//! `instance.json` (written once it runs: its spec and pids; an instance directory without it
//! was half-made and is removed), `exit.json` (written by the instance's init when the
//! program ends), `output.log`, and the `hosts` and `hostname` files bind-mounted into it.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use vane_proto::api::ExitStatus;
use vane_proto::stream::InstanceSpec;

use crate::cgroup::{self, Layout};
use crate::launch::{self, LaunchSpec, Launched};
use crate::netconf::{self, OutboundRules};

/// What the agent keeps of a running (or once running) instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub spec: InstanceSpec,
    pub netns: String,
    pub cgroups: Vec<PathBuf>,
    pub init_pid: u32,
    /// Start time of init, so that a reused pid is not taken for it.
    pub init_start: u64,
    pub pid: u32,
}

pub const RECORD_FILE: &str = "instance.json";
/// In a space prepared for a migration, before its record exists: its space key.
pub const SPACE_FILE: &str = "space";

impl Record {
    /// What names the instance's namespace (`vane-KEY`) and cgroups (`vane/KEY`) on this
    /// host: its id, or, for an instance migrated here, its id and the host's name (lab
    /// hosts share one kernel, so the source's names are still taken while it moves).
    pub fn space_key(&self) -> &str {
        self.netns.strip_prefix("vane-").unwrap_or(&self.spec.id)
    }
}

pub fn netns_name(id: &str) -> String {
    format!("vane-{id}")
}

/// Why creating an instance failed, split by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The user asked for something that cannot run (e.g. the program does not exist).
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Host(String),
}

impl From<io::Error> for CreateError {
    fn from(e: io::Error) -> Self {
        CreateError::Host(e.to_string())
    }
}

/// Sets up and starts an instance. On failure everything made so far is removed again.
/// Blocking: run it off the async runtime.
pub fn create(
    dir: &Path,
    exe: &Path,
    layout: &Layout,
    spec: &InstanceSpec,
    rules: &OutboundRules,
    hosts: &str,
    mtu: usize,
) -> Result<(Record, OwnedFd), CreateError> {
    if dir.exists() {
        return Err(CreateError::Host(format!(
            "instance {} already exists on this host",
            spec.id
        )));
    }
    let result = create_inner(dir, exe, layout, spec, rules, hosts, mtu);
    if result.is_err() {
        teardown(dir, &spec.id, layout);
    }
    result
}

fn create_inner(
    dir: &Path,
    exe: &Path,
    layout: &Layout,
    spec: &InstanceSpec,
    rules: &OutboundRules,
    hosts: &str,
    mtu: usize,
) -> Result<(Record, OwnedFd), CreateError> {
    std::fs::create_dir_all(dir)?;
    netconf::rewrite_in_place(&dir.join(launch::HOSTS_FILE), hosts)?;
    std::fs::write(
        dir.join(launch::HOSTNAME_FILE),
        format!("{}\n", spec.hostname),
    )?;
    cgroup::check_host(&spec.limits).map_err(limit_error)?;
    let space = resolve_space(dir, spec)?;
    let netns = netns_name(&spec.id);
    netconf::create_netns(&netns)?;
    let tun = open_tun(&netns)?;
    netconf::configure(&netns, spec.ip, mtu)?;
    netconf::apply_rules(&netns, rules, None)?;
    let cgroups = layout.create(&spec.id)?;
    cgroup::apply_limits(&cgroups, &spec.limits).map_err(limit_error)?;
    let launch_spec = LaunchSpec {
        hostname: spec.hostname.clone(),
        netns: netns.clone(),
        cmd: spec.cmd.clone(),
        env: launch::instance_env(&spec.hostname, &space.env),
        cgroups: cgroups.clone(),
        rootfs: space.rootfs,
        volumes: space.volumes,
        redirects: space.redirects,
    };
    std::fs::write(
        dir.join(launch::LAUNCH_FILE),
        serde_json::to_vec_pretty(&launch_spec).expect("serializes"),
    )?;
    let out = std::process::Command::new(exe)
        .arg("__launch")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(
            if msg.starts_with("program not found") || msg.starts_with("program not executable") {
                CreateError::Input(msg)
            } else {
                CreateError::Host(format!("starting the instance: {msg}"))
            },
        );
    }
    let launched: Launched = serde_json::from_slice(&out.stdout)
        .map_err(|e| CreateError::Host(format!("starting the instance: {e}")))?;
    let record = Record {
        // With its variables expanded: `vane exec` runs in the same environment.
        spec: InstanceSpec {
            env: space.env,
            ..spec.clone()
        },
        netns,
        cgroups,
        init_pid: launched.init_pid,
        init_start: vane_sys::pidfd::start_time(launched.init_pid).unwrap_or(0),
        pid: launched.pid,
    };
    write_record(dir, &record)?;
    Ok((record, tun))
}

fn limit_error(e: cgroup::LimitError) -> CreateError {
    match e {
        cgroup::LimitError::Unavailable(m) => CreateError::Input(m),
        cgroup::LimitError::Io(e) => CreateError::Host(format!("setting limits: {e}")),
    }
}

/// An instance's environment and file-system settings with their variables expanded, and
/// checked against this host.
struct Space {
    env: Vec<(String, String)>,
    rootfs: Option<PathBuf>,
    volumes: Vec<(PathBuf, PathBuf)>,
    redirects: Vec<(PathBuf, PathBuf)>,
}

/// Expands the per-instance variables of `spec` and prepares what its settings need on the
/// host: a path rule's source that does not exist yet is created (a directory when the target
/// is one, an empty file otherwise), so each instance starts with its own, empty, file.
fn resolve_space(dir: &Path, spec: &InstanceSpec) -> Result<Space, CreateError> {
    let ip = spec.ip.to_string();
    let state = dir.to_string_lossy().into_owned();
    let vars = [
        ("name", spec.name.as_str()),
        ("hostname", spec.hostname.as_str()),
        ("ip", ip.as_str()),
        ("net", spec.net.name.as_str()),
        ("state", state.as_str()),
    ];
    let expand = |what: &'static str, s: &str| {
        vane_proto::validate::expand(what, s, &vars).map_err(|e| CreateError::Input(e.to_string()))
    };
    let env = spec
        .env
        .iter()
        .map(|(k, v)| Ok((k.clone(), expand("environment variable", v)?)))
        .collect::<Result<Vec<_>, CreateError>>()?;
    let rootfs = match &spec.space.rootfs {
        Some(r) => {
            let r = PathBuf::from(expand("rootfs", r)?);
            if !r.is_dir() {
                return Err(CreateError::Input(format!(
                    "rootfs {} is not a directory on this host",
                    r.display()
                )));
            }
            Some(r)
        }
        None => None,
    };
    let mut volumes = Vec::new();
    for (host, inside) in &spec.space.volumes {
        let host = PathBuf::from(expand("volume", host)?);
        if !host.is_dir() {
            return Err(CreateError::Input(format!(
                "volume {} is not a directory on this host",
                host.display()
            )));
        }
        volumes.push((host, PathBuf::from(expand("volume", inside)?)));
    }
    let mut redirects = Vec::new();
    for (target, source) in &spec.space.redirects {
        let target = PathBuf::from(expand("redirect", target)?);
        let source = PathBuf::from(expand("redirect", source)?);
        if !target.is_absolute() || !source.is_absolute() {
            return Err(CreateError::Input(format!(
                "redirect {}={}: paths must be absolute once expanded",
                target.display(),
                source.display()
            )));
        }
        if !source.exists() {
            let seen = match &rootfs {
                Some(r) => r.join(target.strip_prefix("/").unwrap_or(&target)),
                None => target.clone(),
            };
            let made = if seen.is_dir() {
                std::fs::create_dir_all(&source)
            } else {
                source
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|_| std::fs::File::create(&source).map(|_| ()))
            };
            made.map_err(|e| {
                CreateError::Host(format!("redirect source {}: {e}", source.display()))
            })?;
        }
        redirects.push((target, source));
    }
    Ok(Space {
        env,
        rootfs,
        volumes,
        redirects,
    })
}

/// The exit status init recorded, marked out of memory when the program was killed and the
/// instance's memory cgroup counted an out-of-memory kill.
pub fn exit_status(dir: &Path, cgroups: &[PathBuf]) -> Option<ExitStatus> {
    let mut exit = read_exit(dir)?;
    if exit.signal == Some(9) && cgroup::oom_kills(cgroups) > 0 {
        exit.oom = true;
    }
    Some(exit)
}

pub(crate) fn write_record(dir: &Path, record: &Record) -> io::Result<()> {
    let tmp = dir.join(".instance.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(record).expect("serializes"))?;
    std::fs::rename(tmp, dir.join(RECORD_FILE))
}

/// Opens (or, after an agent restart, re-opens) the instance's TUN device from inside its
/// namespace.
pub fn open_tun(netns: &str) -> io::Result<OwnedFd> {
    vane_sys::netns::in_netns(&netconf::netns_path(netns), || {
        // The instance's kernel hands over TCP in large segments with partial checksums;
        // the switch cuts them only where they leave the host (see `dataplane`).
        vane_sys::tun::open(netconf::TUN_NAME, true, vane_sys::tun::Offloads::TCP4)
    })
}

/// Whether the instance's init still runs (and is the same process).
pub fn is_alive(record: &Record) -> bool {
    vane_sys::pidfd::is_running(record.init_pid)
        && vane_sys::pidfd::start_time(record.init_pid).ok() == Some(record.init_start)
}

/// The exit status init recorded, if any.
pub fn read_exit(dir: &Path) -> Option<ExitStatus> {
    let bytes = std::fs::read(dir.join(launch::EXIT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Records an exit status when init could not (it was killed).
pub fn record_exit_if_missing(dir: &Path, status: ExitStatus) {
    if read_exit(dir).is_none() {
        let _ = std::fs::write(
            dir.join(launch::EXIT_FILE),
            serde_json::to_vec(&status).expect("serializes"),
        );
    }
}

/// What the agent finds in its state directory at start.
pub enum Found {
    Instance(Box<Record>, PathBuf),
    /// A directory without a record: an interrupted create (or a space prepared for a
    /// migration that never came), to remove; with its space key.
    HalfMade(String, PathBuf),
}

pub fn scan(instances_dir: &Path) -> Vec<Found> {
    let Ok(entries) = std::fs::read_dir(instances_dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        let id = e.file_name().to_string_lossy().into_owned();
        match std::fs::read(dir.join(RECORD_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        {
            Some(r) => found.push(Found::Instance(Box::new(r), dir)),
            None => {
                // A space prepared for a migration names its key.
                let key = std::fs::read_to_string(dir.join(SPACE_FILE))
                    .map(|k| k.trim().to_string())
                    .unwrap_or(id);
                found.push(Found::HalfMade(key, dir))
            }
        }
    }
    found
}

/// Removes every trace of instance `id`: namespace (and with it the TUN device), cgroups,
/// state directory. Processes still in its cgroups are killed. Best effort: what fails is
/// logged.
pub fn teardown(dir: &Path, id: &str, layout: &Layout) {
    cgroup::kill_all(&layout.paths(id));
    let netns = netns_name(id);
    if let Err(e) = netconf::delete_netns(&netns) {
        tracing::warn!(instance = id, "removing namespace: {e}");
    }
    if let Err(e) = cgroup::remove(&layout.paths(id)) {
        tracing::warn!(instance = id, "{e}");
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(instance = id, "removing {}: {e}", dir.display());
        }
    }
}

/// Hosts-file entries (name, hostname, ip) of a net's members.
pub type HostEntries = Vec<(String, String, Ipv4Addr)>;
