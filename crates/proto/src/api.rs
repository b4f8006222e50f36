//! Objects of the controller's HTTP/JSON API (documented in docs/api.md); the frames of
//! its streamed answers are in `frame`, migrations' and snapshots' objects in `migration`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::validate::PortSpec;

/// Cluster-wide settings, fixed when the controller's store is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// The global virtual address space: every net's subnet lies inside it, and traffic to
    /// any address in it that no policy allows is refused.
    pub global_space: Ipv4Net,
    /// Tunnels between hosts carry frames in the clear, without authentication. Only when
    /// the cluster was created with it explicitly (`vane controller --plaintext`).
    #[serde(default)]
    pub plaintext: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            global_space: "10.0.0.0/8".parse().expect("valid literal"),
            plaintext: false,
        }
    }
}

/// `POST /v1/nets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Let instances reach addresses outside the global space through the host, with NAT.
    #[serde(default)]
    pub egress: bool,
}

pub fn default_tenant() -> String {
    "default".to_string()
}

/// A net: an isolation group defined by a subnet inside the global space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Net {
    /// Cluster-wide id, carried in the overlay frame between hosts.
    pub id: u32,
    pub name: String,
    pub tenant: String,
    pub subnet: Ipv4Net,
    pub egress: bool,
    /// Unix time, seconds.
    pub created: u64,
}

/// `POST /v1/services` (`vane service create NAME --net NET --port P/PROTO`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub net: String,
    /// Ports it answers on; at least one.
    pub ports: Vec<PortSpec>,
}

/// A service: a name and a virtual address in a net, whose flows the switches spread over
/// its running members (instances run with `--service NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub net: String,
    /// Its virtual address, taken from the net's subnet like an instance's.
    pub vip: Ipv4Addr,
    pub ports: Vec<PortSpec>,
    /// Unix time, seconds.
    pub created: u64,
    /// Names of its members that take new flows (filled in answers, not stored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
}

/// A WireGuard gateway (`vane gateway add`): a member of `net` at `ip`, named `name`, that
/// one stock WireGuard client becomes by connecting to the agent of `host`. The switches
/// treat it as any member of its net: the same address and policy checks, by IP and by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    pub name: String,
    pub net: String,
    pub host: String,
    pub ip: Ipv4Addr,
    /// Where its client asks for names: an address of the net, answered by the gateway's
    /// host (the same resolver an instance of the net has).
    pub resolver: Ipv4Addr,
    /// The client's WireGuard public key (base64, as `wg` writes keys): the only key the
    /// gateway accepts.
    pub public_key: String,
    /// Unix time, seconds.
    pub created: u64,
}

/// `POST /v1/gateways` (`vane gateway add`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewaySpec {
    pub name: String,
    pub net: String,
    /// The host whose agent the client connects to; none: the controller chooses.
    #[serde(default)]
    pub host: Option<String>,
    /// The member's address; none: the next free one of the net.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// The client's public key (base64). None: the controller makes a key pair, and the
    /// answer's configuration carries its private key, which is kept nowhere else.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// The answer to `POST /v1/gateways`: the gateway and a WireGuard configuration for its
/// client (`wg-quick` format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayCreated {
    pub gateway: Gateway,
    pub config: String,
}

/// Where a host takes WireGuard clients: its gateway key (base64) and UDP port. The
/// address is the host's own (its locator's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayEndpoint {
    pub public_key: String,
    pub port: u16,
}

/// A host: a machine (or, in the lab, a network namespace) running an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: u32,
    pub name: String,
    /// Underlay address and port of the host's switch.
    pub locator: Option<SocketAddr>,
    /// The host's static public key for tunnels (hex), set when it enrolled.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Where its agent takes WireGuard clients, if it does (`vane agent --gateway-listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayEndpoint>,
    pub state: HostState,
    /// Instances placed on this host (filled in listings).
    #[serde(default)]
    pub instances: usize,
    /// Unix time, seconds, of the last connection or disconnection.
    pub since: u64,
}

/// `POST /v1/hosts/tokens` (`vane host token`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenSpec {
    /// How long the token may be used to enroll hosts, in seconds.
    pub ttl_secs: u64,
    /// Enrolls any number of hosts until it expires; otherwise the first one spends it.
    #[serde(default)]
    pub reusable: bool,
}

/// `POST /v1/credentials` (`vane token create --tenant T`): a credential for a tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialSpec {
    pub tenant: String,
    /// Its lifetime in seconds; none: until revoked.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A tenant credential: `credential` is shown in this answer only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantCredential {
    pub credential: String,
    #[serde(flatten)]
    pub info: CredentialInfo,
}

/// `GET /v1/credentials` (`vane token ls`): a tenant credential, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialInfo {
    /// `vane token rm ID` revokes it.
    pub id: String,
    pub tenant: String,
    /// Unix time, seconds, after which it is refused; none: until revoked.
    pub expires: Option<u64>,
}

/// `GET /v1/hosts/tokens` (`vane host token ls`): a join token not yet spent or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The start of the token's hash: `vane host token rm ID` revokes it.
    pub id: String,
    pub expires: u64,
    pub single_use: bool,
}

/// A join token: a new host's agent presents it once (`vane agent --join TOKEN`) and gets
/// its own credential in exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    /// Unix time, seconds, after which the token is refused.
    pub expires: u64,
    #[serde(default)]
    pub id: String,
}

/// `GET /v1/hosts/{name}/stats` (`vane host stats`): the host's switch and tunnels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStats {
    pub host: String,
    /// Whether tunnels are encrypted (false only in a plaintext cluster).
    pub encrypted: bool,
    /// Host-wide counters: handshakes, rekeys, teardowns, drops by reason (`drop_*`),
    /// directory lookups, queued packets.
    pub counters: BTreeMap<String, u64>,
    pub peers: Vec<PeerStats>,
}

/// The channel to one other host, as this host sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    pub host: String,
    /// Where this host sends the peer's packets (its locator, or the address it roamed to).
    pub endpoint: Option<SocketAddr>,
    /// Whether a session is up (false when idle and torn down, or before the first packet).
    pub established: bool,
    /// The AEAD of the session up: "aes-256-gcm" or "chacha20-poly1305" ("none" in a
    /// plaintext cluster).
    #[serde(default)]
    pub cipher: Option<String>,
    pub handshakes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// `POST /v1/instances` (`vane run`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunSpec {
    pub name: Option<String>,
    pub net: String,
    pub ip: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    pub host: Option<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub cmd: Vec<String>,
    /// Template whose limits, environment and space settings apply first; the fields below
    /// override it.
    #[serde(default)]
    pub template: Option<String>,
    /// Resource limits (each one overrides the template's).
    #[serde(default)]
    pub limits: Limits,
    /// Private view of the file system (added to the template's).
    #[serde(default)]
    pub space: SpaceSpec,
    /// When the program is started again (default: never).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Ports that clients outside vane reach through the instance's host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::validate::Publish>,
    /// The service it joins as a member (`vane run --service NAME`), of its own net.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Seconds between the checkpoints the controller keeps (the last one) to start the
    /// instance from on another host when its host dies; needs a restart policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
}

/// Resource limits of an instance; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory, bytes (cgroup memory.max / memory.limit_in_bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// CPU, thousandths of a CPU (500 = half a CPU; cgroup cpu.max / cfs quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Most processes (and threads) at once (cgroup pids.max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// Bandwidth through the switch, bits per second, each direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

impl Limits {
    /// `self`, with each limit `over` sets replacing ours.
    pub fn overridden_by(self, over: Limits) -> Limits {
        Limits {
            memory: over.memory.or(self.memory),
            cpu_millis: over.cpu_millis.or(self.cpu_millis),
            pids: over.pids.or(self.pids),
            bandwidth: over.bandwidth.or(self.bandwidth),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

/// What an instance sees of the file system beyond its own /proc, /sys and /tmp. Paths may
/// hold the variables {name}, {hostname}, {ip}, {net} and {state}, expanded per instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceSpec {
    /// A directory used as the instance's root, read-only below a private copy-on-write
    /// layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Host directories shared on purpose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Path rules: the program sees `source` at `target` (both absolute).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirects: Vec<(String, String)>,
    /// Capabilities added to the default set (names as `validate::CAPABILITIES`, or ALL).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities removed from the default set (or ALL).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Runs outside the sandbox: no user namespace, every capability, no seccomp filter,
    /// the host's files writable. Never the default; shown by `ps` and `inspect`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
}

/// A host directory shared with an instance on purpose (`--volume HOST_DIR:PATH[:shared]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "VolumeForm", into = "VolumeForm")]
pub struct Volume {
    /// The directory on the host.
    pub host: String,
    /// Where the instance sees it.
    pub inside: String,
    /// The directory is the same on every host (network storage, say): a checkpoint leaves
    /// it out and a restore binds the destination's directory at the same path, so the
    /// instance can migrate. Without it, a checkpoint is refused: the files would not come
    /// along.
    pub shared: bool,
}

/// How a volume is written: `[HOST_DIR, PATH]` as before volumes could be shared (so
/// agents and stores of that time read it), an object when shared.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum VolumeForm {
    Pair(String, String),
    Marked {
        host: String,
        inside: String,
        shared: bool,
    },
}

impl From<VolumeForm> for Volume {
    fn from(f: VolumeForm) -> Volume {
        match f {
            VolumeForm::Pair(host, inside) => Volume {
                host,
                inside,
                shared: false,
            },
            VolumeForm::Marked {
                host,
                inside,
                shared,
            } => Volume {
                host,
                inside,
                shared,
            },
        }
    }
}

impl From<Volume> for VolumeForm {
    fn from(v: Volume) -> VolumeForm {
        match v.shared {
            false => VolumeForm::Pair(v.host, v.inside),
            true => VolumeForm::Marked {
                host: v.host,
                inside: v.inside,
                shared: true,
            },
        }
    }
}

impl std::fmt::Display for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.inside)?;
        if self.shared {
            f.write_str(":shared")?;
        }
        Ok(())
    }
}

impl SpaceSpec {
    /// The template's settings with `over`'s: its root if it gives one, volumes and path
    /// rules added (a rule for the same target replaces the template's).
    pub fn overridden_by(&self, over: &SpaceSpec) -> SpaceSpec {
        let mut out = self.clone();
        if over.rootfs.is_some() {
            out.rootfs = over.rootfs.clone();
        }
        for v in &over.volumes {
            out.volumes.retain(|w| w.inside != v.inside);
            out.volumes.push(v.clone());
        }
        for r in &over.redirects {
            out.redirects.retain(|(t, _)| *t != r.0);
            out.redirects.push(r.clone());
        }
        // The instance's own word on a capability wins over the template's.
        for c in &over.cap_add {
            out.cap_drop.retain(|d| !d.eq_ignore_ascii_case(c));
            out.cap_add.push(c.clone());
        }
        for c in &over.cap_drop {
            out.cap_add.retain(|a| !a.eq_ignore_ascii_case(c));
            out.cap_drop.push(c.clone());
        }
        out.privileged |= over.privileged;
        out
    }
}

/// `POST /v1/templates` (`vane template create`); also what `GET /v1/templates` lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    /// The tenant that owns it; none: shared by every tenant (made by the administrator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub space: SpaceSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Being set up on its host.
    Creating,
    Running,
    /// The program ended (by itself, or stopped).
    Exited,
    /// Its host does not know it any more (for example the host's state was wiped).
    Lost,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Creating => "creating",
            InstanceState::Running => "running",
            InstanceState::Exited => "exited",
            InstanceState::Lost => "lost",
        }
    }
}

/// How the instance's program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when the program exited by itself.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Unix time, seconds.
    pub at: u64,
    /// The kernel killed it for going over the instance's memory limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom: bool,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.oom {
            return write!(f, "out of memory");
        }
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown"),
        }
    }
}

/// An instance: one isolated space running a process tree, with its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Cluster-wide id: what frames carry to say which net a packet belongs to.
    pub id: String,
    pub name: String,
    pub net: String,
    pub ip: Ipv4Addr,
    pub hostname: String,
    pub host: String,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub state: InstanceState,
    /// Host PID of the program, while it runs.
    pub pid: Option<u32>,
    pub exit: Option<ExitStatus>,
    /// Unix time, seconds.
    pub created: u64,
    /// The template it was made from, if any (its settings are already merged below).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub space: SpaceSpec,
    /// Ports that clients outside vane reach through its host (`vane run --publish`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::validate::Publish>,
    /// The service it is a member of (`vane run --service NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The client's key of the request that made it (`Idempotency-Key`): a client that
    /// sends that request again, its answer lost with the controller that took it, gets
    /// this instance rather than a second one or a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The host it is moving to, while a migration is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating: Option<String>,
    /// How far the migration under way has come (not stored: the controller's answers
    /// carry it while it lasts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Live migrations of this instance, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<Migration>,
    /// When its program is started again (`no` in records made before there was a choice).
    /// Defaults are left out of the record, so that a record of that time reads and writes
    /// back the same (a snapshot's seal covers it).
    #[serde(default, skip_serializing_if = "RestartPolicy::is_no")]
    pub restart: RestartPolicy,
    /// How many times it was started again, on its host or on another one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Why it was last started again ("exit code 1", "host h1 died").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_reason: Option<String>,
    /// `vane stop` ended it: no restart policy starts it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// Seconds between checkpoints kept by the controller (`vane run --checkpoint-every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// Unix time, seconds, of the checkpoint the controller keeps, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `POST /v1/policies` (`vane policy allow FROM TO [--port P]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicySpec {
    /// A net's name, or an outside address range (`198.51.100.0/24`): see [`Policy`].
    pub from: String,
    pub to: String,
    pub port: Option<PortSpec>,
}

/// Lets instances of `from` open connections (or send datagrams) to `to`; replies come back.
///
/// With an address range as `from` (an outside policy), it says who may connect to the
/// ports `to`'s instances publish (`vane run --publish`): once a net has an outside policy,
/// its published ports take new connections only from the ranges (and on the ports) its
/// outside policies name; a net with none takes them from anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub id: u32,
    pub from: String,
    pub to: String,
    pub port: Option<PortSpec>,
}

impl Policy {
    /// The outside address range of an outside policy (`from` is a range, not a net).
    pub fn outside(&self) -> Option<ipnet::Ipv4Net> {
        outside_range(&self.from)
    }
}

/// `from` of a policy read as an outside address range, if it is one (a net's name has no
/// '/').
pub fn outside_range(from: &str) -> Option<ipnet::Ipv4Net> {
    from.contains('/').then(|| from.parse().ok()).flatten()
}

/// `POST /v1/instances/{name}/exec`, or the first message of the exec WebSocket
/// (`GET /v1/instances/{name}/exec`). The answer is a stream of frames (`api::frame`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The program reads what the client sends (stdin frames); otherwise its standard
    /// input is `/dev/null`. Only over the WebSocket.
    #[serde(default)]
    pub stdin: bool,
    /// The program runs on a pseudo-terminal of the instance's, this size at first (then
    /// resize frames). Only over the WebSocket.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// Traffic counters of one instance, as its switch port sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets the instance sent that policy refused.
    pub refused: u64,
    /// Packets the instance sent with a source address that is not its own.
    pub spoofed: u64,
    pub dropped: u64,
    /// Packets dropped over the instance's bandwidth limit, both directions.
    #[serde(default)]
    pub rate_limited: u64,
}

/// `GET /v1/instances/{name}/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstanceStats {
    pub name: String,
    pub port: PortStats,
    /// What the instance's cgroups account (absent when the instance has ended).
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// Resource use of a running instance, from its cgroups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time used since the instance started, microseconds.
    pub cpu_usec: u64,
    /// Memory in use now, bytes.
    pub memory: u64,
    /// Processes (and threads) now.
    pub pids: u64,
    /// Times the kernel killed a process of the instance for its memory limit.
    pub oom_kills: u64,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub config: ClusterConfig,
    pub counts: BTreeMap<String, usize>,
}

mod failover;
pub mod frame;
mod migration;

pub use failover::{HostState, RestartPolicy};
pub use migration::*;
