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
        .with_context(|| format!("start vane {}", args.join(" ")))?;
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
    let store = args
        .store
        .clone()
        .or_else(|| previous.as_ref().and_then(|p| p.store.clone()));
    let gateway = nth(underlay, 254);
    let controller_addr = SocketAddr::from((gateway, vane_proto::DEFAULT_API_PORT));
    let controller_url = format!("https://{controller_addr}");

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

    // Controller.
    if read_pid(&lab.pid_file("controller")).is_none() {
        let mut controller_args = vec![
            "controller".into(),
            "--listen".into(),
            controller_addr.to_string(),
            "--data-dir".into(),
            lab.dir.join("controller").display().to_string(),
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
            &lab.dir.join("controller.log"),
            &lab.pid_file("controller"),
        )?;
    }
    // Its CA and admin credential appear with its data directory.
    let connect = || Client::new(&Access::of_lab(&controller_url, &lab.dir));
    wait_for(Duration::from_secs(15), "the controller to answer", || {
        connect().is_ok_and(|c| c.get::<serde_json::Value>("/v1/status").is_ok())
    })
    .with_context(|| format!("see {}", lab.dir.join("controller.log").display()))?;
    let client = connect()?;

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
        store,
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
        "lab {:?} up: {hosts} host{} on {underlay}, controller {controller_url}",
        lab.name,
        if hosts == 1 { "" } else { "s" }
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
        ],
        &env,
        &lab.dir.join(format!("{name}.log")),
        &lab.pid_file(&name),
    )
}

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
    stop_process(&lab.pid_file("controller"));
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
