//! `vane lab`: a cluster on one machine. Each test host is a network namespace with one
//! veth link to a bridge (the underlay); the controller runs in the root namespace on the
//! bridge's address, one agent runs in each host namespace. Everything a lab makes is named
//! after it, and its state lives in /var/lib/vane/labs/NAME, so `down` finds all of it even
//! after a crash, and several labs (for example parallel tests) can run side by side.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use vane_proto::api::{Host, HostState, JoinToken, TokenSpec};

use crate::cli::LabUpArgs;
use crate::client::{Access, Client, CURRENT_CONTROLLER_FILE, LABS_DIR};

const DEFAULT_LAB: &str = "lab";

#[derive(Serialize, Deserialize)]
struct LabFile {
    name: String,
    underlay: Ipv4Net,
    hosts: u8,
    controller: String,
    #[serde(default)]
    plaintext: bool,
    /// As `lab up --global-space` gave it when the lab was made (the default otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    global_space: Option<Ipv4Net>,
    /// As `lab up --store` gave it when the lab was made: the controller's store whenever
    /// the lab brings it up again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    /// As `lab up --controllers` gave it: the controller replicas (`controller` lists their
    /// URLs, comma-separated).
    #[serde(default = "one")]
    controllers: u8,
    /// Members of the etcd the lab runs for its replicas (0: none).
    #[serde(default)]
    etcd_members: u8,
}

fn one() -> u8 {
    1
}

struct Lab {
    name: String,
    dir: PathBuf,
}

impl Lab {
    fn new(name: &str) -> Result<Lab> {
        vane_proto::validate::name("lab name", name)?;
        // Link names are at most 15 bytes: "vv-NAME-NNN".
        if name.len() > 8 {
            bail!("invalid lab name {name:?}: at most 8 characters");
        }
        Ok(Lab {
            name: name.to_string(),
            dir: Path::new(LABS_DIR).join(name),
        })
    }

    fn bridge(&self) -> String {
        format!("vb-{}", self.name)
    }
    fn veth(&self, i: u8) -> String {
        format!("vv-{}-{i}", self.name)
    }
    fn netns(&self, i: u8) -> String {
        format!("vane-{}-h{i}", self.name)
    }
    fn host_name(i: u8) -> String {
        format!("h{i}")
    }
    fn host_dir(&self, i: u8) -> PathBuf {
        self.dir.join("hosts").join(Self::host_name(i))
    }
    fn pid_file(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.pid"))
    }
    /// Controller replica `r` (from 1): what its pid file, log and data directory are
    /// named after (the first is plain `controller`, as in a lab of one).
    fn replica(r: u8) -> String {
        if r == 1 {
            "controller".into()
        } else {
            format!("controller-{r}")
        }
    }
    fn etcd_member(m: u8) -> String {
        format!("etcd-{m}")
    }
}

/// The underlay address of controller replica `r` and etcd member `r`: from the top of the
/// underlay down (.254 for the first), far from the hosts' addresses (from .1 up).
fn replica_ip(underlay: Ipv4Net, r: u8) -> Ipv4Addr {
    nth(underlay, 255 - r as u32)
}

/// etcd's ports on each member's address.
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// Starts the lab's etcd of `members` members, one on each replica's address, if they do
/// not run; returns the store URL for the controllers.
fn start_etcd(lab: &Lab, underlay: Ipv4Net, members: u8) -> Result<String> {
    let peers: Vec<String> = (1..=members)
        .map(|m| {
            format!(
                "{}=http://{}:{ETCD_PEER_PORT}",
                Lab::etcd_member(m),
                replica_ip(underlay, m)
            )
        })
        .collect();
    for m in 1..=members {
        let name = Lab::etcd_member(m);
        let pid_file = lab.pid_file(&name);
        if read_pid(&pid_file).is_some() {
            continue;
        }
        let ip = replica_ip(underlay, m);
        let client = format!("http://{ip}:{ETCD_CLIENT_PORT}");
        let peer = format!("http://{ip}:{ETCD_PEER_PORT}");
        let data = lab.dir.join(&name);
        let args: Vec<String> = [
            "--name",
            &name,
            "--data-dir",
            &data.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &peers.join(","),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &format!("vane-lab-{}", lab.name),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        spawn_process(
            Path::new("etcd"),
            &args,
            &[],
            &lab.dir.join(format!("{name}.log")),
            &pid_file,
        )
        .context("start etcd (Debian's etcd-server) for the lab's controller replicas")?;
    }
    let members: Vec<String> = (1..=members)
        .map(|m| format!("{}:{ETCD_CLIENT_PORT}", replica_ip(underlay, m)))
        .collect();
    Ok(format!("etcd://{}/lab-{}", members.join(","), lab.name))
}

/// Gives replica `r` the files replicas share (`vane_controller::REPLICA_FILES`), from the
/// first replica's data directory, unless it has them.
fn share_replica_files(lab: &Lab, r: u8) -> Result<()> {
    let (from, to) = (lab.dir.join(Lab::replica(1)), lab.dir.join(Lab::replica(r)));
    fs::create_dir_all(&to).with_context(|| format!("create {}", to.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o700))?;
    }
    for file in vane_controller::REPLICA_FILES {
        if !to.join(file).exists() {
            fs::copy(from.join(file), to.join(file)).with_context(|| {
                format!(
                    "copy {file} of the first controller replica to {}",
                    to.display()
                )
            })?;
        }
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    vane_agent::netconf::run(Command::new("ip").args(args), None).map_err(Into::into)
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// The pid in `path`, if that process runs.
fn read_pid(path: &Path) -> Option<Pid> {
    let pid: u32 = fs::read_to_string(path).ok()?.trim().parse().ok()?;
    vane_sys::pidfd::is_running(pid).then_some(Pid::from_raw(pid as i32))
}

/// Starts `vane ARGS` detached from this process: its own process group, output to `log`.
fn spawn_daemon(args: &[String], env: &[(&str, &str)], log: &Path, pid_file: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("find the vane binary")?;
    spawn_process(&exe, args, env, log, pid_file)
}

/// Starts `exe ARGS` detached from this process: its own process group, output to `log`.
fn spawn_process(
    exe: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
    pid_file: &Path,
) -> Result<()> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .env_remove("VANE_CONTROLLER")
        .env_remove("VANE_JOIN_TOKEN")
        .envs(env.iter().copied())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {} {}", exe.display(), args.join(" ")))?;
    fs::write(pid_file, child.id().to_string())?;
    Ok(())
}

pub fn up(args: LabUpArgs) -> Result<()> {
    let lab = Lab::new(&args.name.name)?;
    let underlay = args.underlay.trunc();
    if underlay.prefix_len() > 24 {
        bail!("invalid underlay {underlay}: a lab needs at least a /24");
    }
    if args.hosts == 0 || args.hosts > 200 {
        bail!("invalid number of hosts {}: 1 to 200", args.hosts);
    }
    fs::create_dir_all(&lab.dir).with_context(|| format!("create {}", lab.dir.display()))?;
    let lab_file = lab.dir.join("lab.json");
    let previous: Option<LabFile> = fs::read(&lab_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(p) = &previous {
        if p.plaintext != args.plaintext {
            bail!(
                "lab {:?} already runs with {} tunnels; `vane lab down --name {}` first",
                lab.name,
                if p.plaintext {
                    "plaintext"
                } else {
                    "encrypted"
                },
                lab.name
            );
        }
        let made_with = p
            .global_space
            .unwrap_or(vane_proto::api::ClusterConfig::default().global_space);
        if let Some(space) = args.global_space.filter(|s| *s != made_with) {
            bail!(
                "lab {:?} was made with another global space than {space}; `vane lab down --name {}` first",
                lab.name,
                lab.name
            );
        }
        if args.store.is_some() && args.store != p.store {
            bail!(
                "lab {:?} was made with its store {}; `vane lab down --name {}` first",
                lab.name,
                p.store.as_deref().unwrap_or("embedded"),
                lab.name
            );
        }
        if args.controllers.is_some_and(|n| n != p.controllers) {
            bail!(
                "lab {:?} was made with {} controller replica(s); `vane lab down --name {}` first",
                lab.name,
                p.controllers,
                lab.name
            );
        }
        if p.underlay != underlay {
            bail!(
                "lab {:?} already runs on underlay {}; `vane lab down --name {}` first",
                lab.name,
                p.underlay,
                lab.name
            );
        }
    }
    let hosts = args.hosts.max(previous.as_ref().map_or(0, |p| p.hosts));
    let replicas = args
        .controllers
        .or(previous.as_ref().map(|p| p.controllers))
        .unwrap_or(1);
    if replicas == 0 || replicas > 7 {
        bail!("invalid number of controllers {replicas}: 1 to 7");
    }
    if hosts as u32 + replicas as u32 > 254 {
        bail!(
            "{hosts} hosts and {replicas} controllers do not fit in the underlay's 254 addresses"
        );
    }
    let store = args
        .store
        .clone()
        .or_else(|| previous.as_ref().and_then(|p| p.store.clone()));
    // Replicas need a store they share: the lab's own etcd, unless one was given.
    let etcd_members = match &store {
        None if replicas > 1 => replicas,
        _ => previous.as_ref().map_or(0, |p| p.etcd_members),
    };
    let gateway = nth(underlay, 254);
    let replica_addrs: Vec<SocketAddr> = (1..=replicas)
        .map(|r| SocketAddr::from((replica_ip(underlay, r), vane_proto::DEFAULT_API_PORT)))
        .collect();
    let controller_url = replica_addrs
        .iter()
        .map(|a| format!("https://{a}"))
        .collect::<Vec<_>>()
        .join(",");

    // Underlay: a bridge in the root namespace holding the controller's address.
    let bridge = lab.bridge();
    if !link_exists(&bridge) {
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{gateway}/{}", underlay.prefix_len()),
            "dev",
            &bridge,
        ])?;
    }
    ip(&["link", "set", &bridge, "up"])?;
    for i in 1..=hosts {
        add_host(&lab, i, underlay, gateway)?;
    }

    for r in 2..=replicas {
        let addr = format!("{}/{}", replica_ip(underlay, r), underlay.prefix_len());
        let has = Command::new("ip")
            .args(["-o", "addr", "show", "dev", &bridge])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {addr} ")));
        if !has {
            ip(&["addr", "add", &addr, "dev", &bridge])?;
        }
    }
    let store = match etcd_members {
        0 => store,
        n => Some(start_etcd(&lab, underlay, n)?),
    };

    // Controllers: the first alone, until it has made the files the others share.
    let start_replica = |r: u8| -> Result<()> {
        let name = Lab::replica(r);
        if read_pid(&lab.pid_file(&name)).is_some() {
            return Ok(());
        }
        let addr = replica_addrs[r as usize - 1];
        let mut controller_args = vec![
            "controller".into(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            lab.dir.join(&name).display().to_string(),
        ];
        if args.plaintext {
            controller_args.push("--plaintext".into());
        }
        if let Some(space) = args.global_space {
            controller_args.extend(["--global-space".into(), space.to_string()]);
        }
        if let Some(store) = &store {
            controller_args.extend(["--store".into(), store.clone()]);
        }
        spawn_daemon(
            &controller_args,
            &[],
            &lab.dir.join(format!("{name}.log")),
            &lab.pid_file(&name),
        )
    };
    start_replica(1)?;
    // Its CA and admin credential appear with its data directory.
    let connect = || Client::new(&Access::of_lab(&controller_url, &lab.dir));
    wait_for(Duration::from_secs(15), "the controller to answer", || {
        connect().is_ok_and(|c| c.get::<serde_json::Value>("/v1/status").is_ok())
    })
    .with_context(|| format!("see {}", lab.dir.join("controller.log").display()))?;
    let client = connect()?;
    for r in 2..=replicas {
        share_replica_files(&lab, r)?;
        start_replica(r)?;
    }

    // Agents. Each enrolls with a join token the first time (passed in the environment,
    // not on the command line where `ps` would show it); later it has its credential.
    let mut token: Option<JoinToken> = None;
    for i in 1..=hosts {
        let name = Lab::host_name(i);
        let pid_file = lab.pid_file(&name);
        if read_pid(&pid_file).is_some() {
            continue;
        }
        if token.is_none() {
            // One token for the lab's hosts, short-lived.
            token = Some(client.post(
                "/v1/hosts/tokens",
                &TokenSpec {
                    ttl_secs: 600,
                    reusable: true,
                },
            )?);
        }
        let join = token.as_ref().map(|t| t.token.as_str()).unwrap_or_default();
        start_agent(&lab, i, &controller_url, Some(join))?;
    }
    let offline = || -> Vec<String> {
        let known = client.get::<Vec<Host>>("/v1/hosts").unwrap_or_default();
        (1..=hosts)
            .map(Lab::host_name)
            .filter(|n| {
                !known
                    .iter()
                    .any(|h| &h.name == n && h.state == HostState::Online)
            })
            .collect()
    };
    if wait_for(Duration::from_secs(20), "every agent to register", || {
        offline().is_empty()
    })
    .is_err()
    {
        let missing = offline();
        let why: Vec<String> = missing
            .iter()
            .map(|n| match read_pid(&lab.pid_file(n)) {
                Some(pid) => format!("{n} (its agent, pid {pid}, runs)"),
                None => format!("{n} (its agent is not running)"),
            })
            .collect();
        bail!(
            "timed out after 20s waiting for {} to register: see {}",
            why.join(", "),
            lab.dir
                .join(format!("{}.log", missing.first().map_or("h1", |n| n)))
                .display()
        );
    }

    let file = LabFile {
        name: lab.name.clone(),
        underlay,
        hosts,
        controller: controller_url.clone(),
        plaintext: args.plaintext,
        global_space: args
            .global_space
            .or(previous.as_ref().and_then(|p| p.global_space)),
        store: if etcd_members > 0 { None } else { store },
        controllers: replicas,
        etcd_members,
    };
    fs::write(&lab_file, serde_json::to_vec_pretty(&file)?)?;
    if lab.name == DEFAULT_LAB {
        fs::create_dir_all(
            Path::new(CURRENT_CONTROLLER_FILE)
                .parent()
                .expect("has parent"),
        )?;
        fs::write(CURRENT_CONTROLLER_FILE, format!("{controller_url}\n"))?;
    }
    println!(
        "lab {:?} up: {hosts} host{} on {underlay}, controller{} {controller_url}",
        lab.name,
        if hosts == 1 { "" } else { "s" },
        if replicas == 1 { "" } else { "s" }
    );
    if lab.name != DEFAULT_LAB {
        println!("export VANE_CONTROLLER={controller_url}");
    }
    Ok(())
}

/// Starts the agent of lab host `i`, with a join token the first time.
fn start_agent(lab: &Lab, i: u8, controller_url: &str, join: Option<&str>) -> Result<()> {
    let name = Lab::host_name(i);
    let env: Vec<(&str, &str)> = join.map(|t| ("VANE_JOIN_TOKEN", t)).into_iter().collect();
    spawn_daemon(
        &[
            "agent".into(),
            "--name".into(),
            name.clone(),
            "--controller".into(),
            controller_url.to_string(),
            "--state-dir".into(),
            lab.host_dir(i).display().to_string(),
            "--netns".into(),
            lab.netns(i),
            // Each lab host takes WireGuard clients on its own underlay address.
            "--gateway-listen".into(),
            format!("0.0.0.0:{LAB_GATEWAY_PORT}"),
        ],
        &env,
        &lab.dir.join(format!("{name}.log")),
        &lab.pid_file(&name),
    )
}

/// The UDP port where every lab host takes WireGuard clients (`vane gateway add`).
pub const LAB_GATEWAY_PORT: u16 = 51820;

/// The lab's file and the number of lab host `host` (`h1` is 1), or one line saying why
/// not.
fn lab_host(lab: &Lab, host: &str) -> Result<(LabFile, u8)> {
    let file: LabFile = fs::read(lab.dir.join("lab.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no lab {:?} is up (vane lab up --name {})",
                lab.name,
                lab.name
            )
        })?;
    let i = host
        .strip_prefix('h')
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|i| (1..=file.hosts).contains(i) && Lab::host_name(*i) == host)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown host {host:?} in lab {:?}: it has h1 to h{}",
                lab.name,
                file.hosts
            )
        })?;
    Ok((file, i))
}

impl Lab {
    /// The mark of a host that `lab fail` made vanish.
    fn failed_mark(&self, i: u8) -> PathBuf {
        self.dir.join(format!("{}.failed", Self::host_name(i)))
    }
}

/// `vane lab fail HOST`: the host vanishes as in a power loss. Its underlay link goes down
/// first (nothing it says on the way out reaches anyone), then its agent and every process
/// of its instances are killed; their namespaces, devices and state stay, as a machine's
/// disk would.
pub fn fail(name: &str, host: &str) -> Result<()> {
    let lab = Lab::new(name)?;
    let (_, i) = lab_host(&lab, host)?;
    if lab.failed_mark(i).exists() {
        bail!("host {host:?} of lab {name:?} has failed already (vane lab recover {host} --name {name})");
    }
    ip(&["link", "set", &lab.veth(i), "down"])?;
    fs::write(lab.failed_mark(i), b"")?;
    let pid_file = lab.pid_file(host);
    if let Some(pid) = read_pid(&pid_file) {
        let _ = kill(pid, Signal::SIGKILL);
        wait_for(Duration::from_secs(10), "the agent to die", || {
            read_pid(&pid_file).is_none()
        })?;
    }
    let killed = vane_agent::kill_instances(&lab.host_dir(i));
    println!(
        "host {host:?} failed: agent and {killed} running instance(s) killed, underlay link down"
    );
    Ok(())
}

/// `vane lab recover HOST`: a failed host comes back: its underlay link up, its agent
/// started again as `lab up` starts it, which takes back what it finds and reconnects.
pub fn recover(name: &str, host: &str) -> Result<()> {
    let lab = Lab::new(name)?;
    let (file, i) = lab_host(&lab, host)?;
    if !lab.failed_mark(i).exists() {
        bail!("host {host:?} of lab {name:?} has not failed (vane lab fail {host} --name {name})");
    }
    ip(&["link", "set", &lab.veth(i), "up"])?;
    start_agent(&lab, i, &file.controller, None)?;
    fs::remove_file(lab.failed_mark(i))?;
    let client = Client::new(&Access::of_lab(&file.controller, &lab.dir))?;
    wait_for(
        Duration::from_secs(20),
        "the host's agent to register",
        || {
            client
                .get::<Vec<Host>>("/v1/hosts")
                .unwrap_or_default()
                .iter()
                .any(|h| h.name == host && h.state == HostState::Online)
        },
    )
    .with_context(|| format!("see {}", lab.dir.join(format!("{host}.log")).display()))?;
    println!("host {host:?} recovered");
    Ok(())
}

/// The `n`th address of `net`.
fn nth(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

fn add_host(lab: &Lab, i: u8, underlay: Ipv4Net, gateway: Ipv4Addr) -> Result<()> {
    let ns = lab.netns(i);
    let veth = lab.veth(i);
    if !netns_exists(&ns) {
        ip(&["netns", "add", &ns])?;
    }
    if !link_exists(&veth) {
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &veth, "master", &lab.bridge(), "up"])?;
        let addr = format!("{}/{}", nth(underlay, i as u32), underlay.prefix_len());
        vane_agent::netconf::run(
            Command::new("ip").args(["-n", &ns, "-batch", "-"]),
            Some(&format!(
                "link set lo up\nlink set eth0 up\naddr add {addr} dev eth0\n\
                 route add default via {gateway}\n"
            )),
        )?;
    }
    Ok(())
}

fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {}s waiting for {what}", limit.as_secs())
}

/// SIGTERM, then SIGKILL after a grace period.
fn stop_process(pid_file: &Path) {
    let Some(pid) = read_pid(pid_file) else {
        let _ = fs::remove_file(pid_file);
        return;
    };
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if read_pid(pid_file).is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if read_pid(pid_file).is_some() {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let _ = fs::remove_file(pid_file);
}

pub fn down(name: &str) -> Result<()> {
    let lab = Lab::new(name)?;
    let file: Option<LabFile> = fs::read(lab.dir.join("lab.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    // Hosts: those the lab file names, and any namespace of this lab left by a crash.
    let mut hosts: Vec<u8> = (1..=file.as_ref().map_or(0, |f| f.hosts)).collect();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        let prefix = format!("vane-{}-h", lab.name);
        for e in entries.flatten() {
            if let Some(i) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|i| i.parse::<u8>().ok())
            {
                if !hosts.contains(&i) {
                    hosts.push(i);
                }
            }
        }
    }
    for i in &hosts {
        stop_process(&lab.pid_file(&Lab::host_name(*i)));
    }
    for r in 1..=file.as_ref().map_or(1, |f| f.controllers) {
        stop_process(&lab.pid_file(&Lab::replica(r)));
    }
    for m in 1..=file.as_ref().map_or(0, |f| f.etcd_members) {
        stop_process(&lab.pid_file(&Lab::etcd_member(m)));
    }
    if let Ok(entries) = fs::read_dir(lab.dir.join("hosts")) {
        for e in entries.flatten() {
            vane_agent::purge_instances(&e.path());
        }
    }
    for i in &hosts {
        let ns = lab.netns(*i);
        if netns_exists(&ns) {
            ip(&["netns", "delete", &ns])?;
        }
        // Deleting the namespace deletes the veth pair too, but asynchronously: the link
        // may vanish between the check and the delete.
        let veth = lab.veth(*i);
        if link_exists(&veth) {
            if let Err(e) = ip(&["link", "delete", &veth]) {
                if link_exists(&veth) {
                    return Err(e);
                }
            }
        }
    }
    let bridge = lab.bridge();
    if link_exists(&bridge) {
        ip(&["link", "delete", &bridge])?;
    }
    if lab.dir.exists() {
        fs::remove_dir_all(&lab.dir).with_context(|| format!("remove {}", lab.dir.display()))?;
    }
    if let Some(f) = &file {
        if fs::read_to_string(CURRENT_CONTROLLER_FILE).is_ok_and(|c| c.trim() == f.controller) {
            let _ = fs::remove_file(CURRENT_CONTROLLER_FILE);
        }
    }
    println!("lab {:?} down", lab.name);
    Ok(())
}
