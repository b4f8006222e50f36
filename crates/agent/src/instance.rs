//! Instances on this host: setting one up (namespace, TUN device, rules, cgroups, program),
//! taking them back after an agent restart, tearing them down.
//!
//! Each instance has a directory `STATE/instances/ID/` (0700, the agent's alone) holding
//! `launch.json` (what to start), `instance.json` (written once it runs: its spec, pids and
//! confinement; an instance directory without it was half-made and is removed), the
//! `hosts`, `hostname` and `resolv.conf` files bound read-only into it, and `shared/`: the one part the
//! instance sees and writes (at /tmp/.vane), owned by its root, with `output.log` and the
//! `exit.json` its init writes when the program ends. The agent reads what lies in
//! `shared/` as the instance's word: without following links, bounded, never trusted for
//! anything about the host.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use vane_proto::api::ExitStatus;
use vane_proto::stream::InstanceSpec;

use crate::cgroup::{self, Layout};
use crate::dns;
use crate::launch::{self, LaunchSpec, Launched};
use crate::netconf::{self, OutboundRules};
use crate::sandbox::{self, Confinement};

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
    /// How the agent confined it; none in records of instances started before sandboxes,
    /// which run privileged.
    #[serde(default)]
    pub confinement: Option<Confinement>,
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

    pub fn confinement(&self) -> Confinement {
        self.confinement.unwrap_or(Confinement {
            idmap: None,
            caps: u64::MAX,
        })
    }
}

/// Makes an instance's directory: the agent's part (0700) with the hosts and hostname files,
/// and the shared part owned by the instance's root; claims the instance's range of host
/// ids (held as long as the directory exists) unless it runs privileged.
pub fn make_dir(dir: &Path, spec: &InstanceSpec, hosts: &str) -> Result<Confinement, CreateError> {
    use std::os::unix::fs::PermissionsExt;
    let caps = vane_proto::validate::capability_set(&spec.space.cap_add, &spec.space.cap_drop)
        .map_err(|e| CreateError::Input(e.to_string()))?;
    // Its parent, STATE/instances, the agent made (0700) when it started.
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let idmap = if spec.space.privileged {
        None
    } else {
        Some(sandbox::allocate(Path::new(sandbox::CLAIMS_DIR), dir)?)
    };
    let shared = dir.join(launch::SHARED_DIR);
    std::fs::create_dir(&shared)?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700))?;
    if let Some(m) = idmap {
        std::os::unix::fs::chown(&shared, Some(m.base), Some(m.base))?;
    }
    netconf::rewrite_in_place(&dir.join(launch::HOSTS_FILE), hosts)?;
    std::fs::write(
        dir.join(launch::HOSTNAME_FILE),
        format!("{}\n", spec.hostname),
    )?;
    std::fs::write(
        dir.join(launch::RESOLV_FILE),
        dns::resolv_conf(&spec.net.name),
    )?;
    Ok(Confinement { idmap, caps })
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

/// What this host decides about an instance's space, beside its spec.
#[derive(Debug, Clone)]
pub struct Setup {
    pub layout: Layout,
    /// The rules of its net.
    pub rules: OutboundRules,
    /// Its hosts file.
    pub hosts: String,
    /// Its device's MTU.
    pub mtu: usize,
    /// Host directories it must not see (the agent's state directory).
    pub hide: Vec<PathBuf>,
}

/// Sets up and starts an instance. On failure everything made so far is removed again.
/// Blocking: run it off the async runtime.
/// `key` names its namespace and cgroups (`Record::space_key`).
pub fn create(
    dir: &Path,
    key: &str,
    exe: &Path,
    spec: &InstanceSpec,
    setup: &Setup,
) -> Result<(Record, OwnedFd, dns::Sockets), CreateError> {
    let (record, tun, space) = prepare_space(dir, key, spec, setup)?;
    // The resolver's address is taken before the program starts: nothing inside can
    // bind it first.
    let result = dns::bind(&record.netns)
        .map_err(CreateError::from)
        .and_then(|dns| Ok((launch(dir, exe, record, space, setup)?, dns)));
    if result.is_err() {
        teardown(dir, key, &setup.layout);
    }
    result.map(|(record, dns)| (record, tun, dns))
}

/// Makes an instance's space, for a new instance and for one about to be restored alike:
/// checks its limits against this host, makes its directory, namespaces, device, rules and
/// cgroups (`make_space`), and expands its settings (`resolve_space`); the record it
/// returns carries the expanded environment, which `vane exec` uses too. On failure
/// everything made so far is removed again. `key` names the namespace and cgroups.
pub fn prepare_space(
    dir: &Path,
    key: &str,
    spec: &InstanceSpec,
    setup: &Setup,
) -> Result<(Record, OwnedFd, Space), CreateError> {
    if dir.exists() {
        return Err(CreateError::Host(format!(
            "instance {} already exists on this host",
            spec.id
        )));
    }
    let made = (|| {
        cgroup::check_host(&spec.limits).map_err(limit_error)?;
        let (mut record, tun) = make_space(dir, key, spec, setup)?;
        let space = resolve_space(dir, spec, &record.confinement())?;
        // As its program sees them: expanded (`vane exec` takes the environment from here,
        // checkpoints and restores the root, the volumes and the path rules).
        record.spec.env = space.env.clone();
        record.spec.space.rootfs = space
            .rootfs
            .as_ref()
            .map(|r| r.to_string_lossy().into_owned());
        for (v, (host, inside)) in record.spec.space.volumes.iter_mut().zip(&space.volumes) {
            v.host = host.to_string_lossy().into_owned();
            v.inside = inside.to_string_lossy().into_owned();
        }
        record.spec.space.redirects = space
            .redirects
            .iter()
            .map(|(t, s)| {
                (
                    t.to_string_lossy().into_owned(),
                    s.to_string_lossy().into_owned(),
                )
            })
            .collect();
        Ok((record, tun, space))
    })();
    if made.is_err() {
        teardown(dir, key, &setup.layout);
    }
    made
}

/// Starts the program of an instance whose space is made, and writes its record with the
/// pids.
fn launch(
    dir: &Path,
    exe: &Path,
    mut record: Record,
    space: Space,
    setup: &Setup,
) -> Result<Record, CreateError> {
    let confinement = record.confinement();
    let spec = &record.spec;
    let launch_spec = LaunchSpec {
        hostname: spec.hostname.clone(),
        netns: record.netns.clone(),
        cmd: spec.cmd.clone(),
        env: launch::instance_env(&spec.hostname, &space.env),
        cgroups: record.cgroups.clone(),
        rootfs: space.rootfs,
        volumes: space.volumes,
        redirects: space.redirects,
        confinement,
        hide: setup.hide.clone(),
    };
    write_private(
        &dir.join(launch::LAUNCH_FILE),
        &serde_json::to_vec_pretty(&launch_spec).expect("serializes"),
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
    record.init_pid = launched.init_pid;
    record.init_start = vane_sys::pidfd::start_time(launched.init_pid).unwrap_or(0);
    record.pid = launched.pid;
    write_record(dir, &record)?;
    Ok(record)
}

/// Makes what an instance needs before its program starts: its directory, its user namespace (unless privileged) and a
/// network namespace owned by it with `vane0`, its address and rules, its cgroups with their
/// limits. Returns its record without pids, and its TUN device. `key` names the namespace
/// and cgroups.
fn make_space(
    dir: &Path,
    key: &str,
    spec: &InstanceSpec,
    setup: &Setup,
) -> Result<(Record, OwnedFd), CreateError> {
    let confinement = make_dir(dir, spec, &setup.hosts)?;
    // First: an agent restarted halfway finds what to remove under this key.
    std::fs::write(dir.join(SPACE_FILE), key)?;
    let userns = confinement
        .idmap
        .map(|m| vane_sys::confine::new_userns(&m.map_line()))
        .transpose()
        .map_err(|e| CreateError::Host(format!("user namespace: {e}")))?;
    let netns = netns_name(key);
    netconf::create_netns(&netns, userns.as_ref())?;
    let tun = open_tun(&netns)?;
    netconf::configure(&netns, spec.ip, setup.mtu)?;
    netconf::apply_rules(&netns, &setup.rules, None)?;
    let cgroups = setup.layout.create(key)?;
    cgroup::apply_limits(&cgroups, &spec.limits).map_err(limit_error)?;
    let record = Record {
        spec: spec.clone(),
        netns,
        cgroups,
        init_pid: 0,
        init_start: 0,
        pid: 0,
        confinement: Some(confinement),
    };
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
pub struct Space {
    env: Vec<(String, String)>,
    rootfs: Option<PathBuf>,
    volumes: Vec<(PathBuf, PathBuf)>,
    redirects: Vec<(PathBuf, PathBuf)>,
}

/// Expands the per-instance variables of `spec` and prepares what its settings need on the
/// host: a path rule's source that does not exist yet is created (a directory when the target
/// is one, an empty file otherwise), so each instance starts with its own, empty, file.
fn resolve_space(
    dir: &Path,
    spec: &InstanceSpec,
    confinement: &Confinement,
) -> Result<Space, CreateError> {
    let ip = spec.ip.to_string();
    let shared = dir.join(launch::SHARED_DIR);
    let state = shared.to_string_lossy().into_owned();
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
    for v in &spec.space.volumes {
        let (host, inside) = (&v.host, &v.inside);
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
            // What the agent makes in the shared directory is the instance's, like the rest
            // of it.
            let owned = match confinement.idmap {
                Some(m) if source.starts_with(&shared) => made.and_then(|_| {
                    source
                        .strip_prefix(&shared)
                        .into_iter()
                        .flat_map(|rel| rel.ancestors())
                        .filter(|a| !a.as_os_str().is_empty())
                        .try_for_each(|a| {
                            std::os::unix::fs::lchown(shared.join(a), Some(m.base), Some(m.base))
                        })
                }),
                _ => made,
            };
            owned.map_err(|e| {
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
    write_private(
        &dir.join(RECORD_FILE),
        &serde_json::to_vec_pretty(record).expect("serializes"),
    )
}

/// Replaces `path` atomically with a file only root can read (0600).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(bytes)?;
    std::fs::rename(tmp, path)
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

/// The exit status init recorded (in the shared directory), or the one the agent recorded
/// when init could not, if any.
pub fn read_exit(dir: &Path) -> Option<ExitStatus> {
    let from_init = open_shared(dir, launch::EXIT_FILE).ok().and_then(|f| {
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(f, 4096), &mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    });
    from_init.or_else(|| {
        let bytes = std::fs::read(dir.join(launch::EXIT_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    })
}

/// Opens the regular file `name` of the instance's shared directory for reading, refusing
/// links the instance may have planted (a link to a host file would make the agent read
/// that file for it) and anything but a regular file (a FIFO would block the agent).
pub fn open_shared(dir: &Path, name: &str) -> io::Result<std::fs::File> {
    use std::os::unix::fs::FileTypeExt;
    let shared = std::fs::File::open(dir.join(launch::SHARED_DIR))?;
    let f = vane_sys::confine::open_beneath(
        &shared,
        Path::new(name),
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
    )?;
    let kind = f.metadata()?.file_type();
    if !kind.is_file() || kind.is_fifo() {
        return Err(io::Error::other(format!("{name} is not a regular file")));
    }
    Ok(f)
}

/// The rotated part of an instance's output log, in its shared directory.
pub const OLD_LOG_FILE: &str = "output.log.1";

/// Rotates the instance's output log when it holds more than `cap` bytes: its newest half
/// goes to `output.log.1` (replacing the one before) and the log starts again empty (the
/// program appends, so it writes on at the start). What the program writes between the copy
/// and the truncation is lost. A link or anything but a regular file where the old log
/// goes is not written through: the log is then only cut.
pub fn rotate_log(dir: &Path, cap: u64) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileTypeExt;
    let shared = std::fs::File::open(dir.join(launch::SHARED_DIR))?;
    let mut log = vane_sys::confine::open_beneath(
        &shared,
        Path::new(launch::LOG_FILE),
        libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
    )?;
    let meta = log.metadata()?;
    if !meta.file_type().is_file() || meta.file_type().is_fifo() || meta.len() <= cap {
        return Ok(false);
    }
    let keep = cap / 2;
    let old = vane_sys::confine::open_beneath(
        &shared,
        Path::new(OLD_LOG_FILE),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NONBLOCK | libc::O_NOCTTY,
        0o600,
    );
    if let Ok(mut old) = old.and_then(|f| {
        let m = f.metadata()?;
        if m.file_type().is_file() {
            Ok(f)
        } else {
            Err(io::Error::other("not a regular file"))
        }
    }) {
        log.seek(SeekFrom::Start(meta.len() - keep))?;
        let mut tail = Vec::with_capacity(keep as usize);
        (&mut log).take(keep).read_to_end(&mut tail)?;
        old.write_all(&tail)?;
    }
    log.set_len(0)?;
    Ok(true)
}

/// Records an exit status when init could not (it was killed), in the agent's part of the
/// directory.
pub fn record_exit_if_missing(dir: &Path, status: ExitStatus) {
    if read_exit(dir).is_none() {
        let _ = write_private(
            &dir.join(launch::EXIT_FILE),
            &serde_json::to_vec(&status).expect("serializes"),
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
    sandbox::release(Path::new(sandbox::CLAIMS_DIR), dir);
}

/// Hosts-file entries (name, hostname, ip) of a net's members.
pub type HostEntries = Vec<(String, String, Ipv4Addr)>;
