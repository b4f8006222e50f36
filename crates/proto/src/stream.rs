//! Messages of the control stream: one WebSocket per agent, opened by the agent
//! (`GET /v1/agents/connect`), so that agents behind NAT or firewalls can be reached.
//!
//! Messages are text, JSON (`ToAgent`, `FromAgent`). What is long or unbounded (images, the
//! output of exec and logs) does not travel here but over a transfer connection of its own
//! (see `SendImages`), so that it neither holds up the messages behind it nor fills memory.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;

use serde::{Deserialize, Serialize};

use crate::api::{
    ClusterConfig, ExitStatus, HostStats, InstanceState, Limits, Net, PortStats, SpaceSpec, Usage,
};
use crate::validate::PortSpec;

/// Controller -> agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// First message after `Hello`: the agent is registered. `credential` is set when the
    /// host has just enrolled with a join token: the agent keeps it and presents it from then
    /// on.
    Welcome {
        host_id: u32,
        config: ClusterConfig,
        #[serde(default)]
        credential: Option<String>,
        /// Instances the host reported in its hello that are not its own any more: they
        /// run on another host now (it was declared dead meanwhile) or were removed. The
        /// agent ends and removes them before it handles the next message, so that no two
        /// copies of one identity run once the views that follow are applied.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stale: Vec<String>,
    },
    /// The controller refuses this agent (bad token or credential, duplicate host name);
    /// the stream closes after it.
    Refused { reason: String },
    /// The answer to `FromAgent::Lookup`: the member, or `None` if no instance of the net has
    /// the address (or the asking host has no business with that net).
    Resolved {
        net: u32,
        ip: Ipv4Addr,
        member: Option<Member>,
    },
    /// A request the agent answers with `FromAgent::Response` carrying the same id.
    Request { id: u64, body: AgentRequest },
    /// Everything the agent needs to switch the packets of its instances: their nets, the
    /// members of those nets and of the nets they may reach, and the policies between them.
    /// Sent after `Welcome` and again whenever it changes; it replaces the previous view.
    View(AgentView),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentRequest {
    Create {
        instance: Box<InstanceSpec>,
    },
    /// SIGTERM, then SIGKILL after `timeout_secs`.
    Stop {
        id: String,
        timeout_secs: u64,
    },
    /// Stop if running, then remove every trace of the instance from the host.
    Remove {
        id: String,
    },
    /// Run a command inside the instance. Its output and exit code go as `api::frame`s,
    /// one per binary message, over the transfer connection of `ticket`.
    /// With `stdin` or `tty`, the connection carries frames both ways: the client's stdin
    /// and resize frames come to the agent over it, and its end before the exit frame means
    /// the client is gone (the command is hung up on).
    Exec {
        id: String,
        ticket: String,
        cmd: Vec<String>,
        env: Vec<(String, String)>,
        #[serde(default)]
        stdin: bool,
        #[serde(default)]
        tty: Option<crate::api::TtySize>,
    },
    /// The program's output so far (its last `tail` lines), as `Exec`'s; with `follow`,
    /// then what it writes until the instance is removed or the reader goes.
    Logs {
        id: String,
        ticket: String,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        tail: Option<u64>,
    },
    Stats {
        id: String,
    },
    /// The host's switch and tunnel counters.
    HostStats,
    /// Answered `Done` once everything sent to the agent before it is handled: views are
    /// applied in order, so the answer says the agent switches by the last view sent.
    Sync,
    /// Migration, destination side: check that CRIU is usable and make the instance's
    /// space (namespace with its address, rules, cgroups, state directory) without
    /// starting anything.
    Prepare {
        instance: Box<InstanceSpec>,
    },
    /// Migration, source side: freeze and dump the instance's process tree and pack the
    /// images. Without `leave_running` the tree is gone afterwards (until `Restore`).
    Checkpoint {
        id: String,
        leave_running: bool,
        /// Post-copy: dump everything but the tree's memory, which stays on this host,
        /// frozen, until the destination has fetched it over the link of the direct
        /// `SendImages` that follows. Falls back to a whole dump where CRIU or the host
        /// cannot (`Checkpointed::lazy` says which it was).
        #[serde(default)]
        lazy: bool,
        /// The images go straight to another host's agent next (`SendImages` with `to`),
        /// packed as they go: the dump leaves them unpacked, and `Checkpointed::bytes` is
        /// the most their pack can take.
        #[serde(default)]
        stream: bool,
    },
    /// Migration, source side, after a lazy `Checkpoint`: answered once the destination
    /// has every page and the dump has ended the tree here (the source is no longer
    /// needed), or failed.
    AwaitPages {
        id: String,
    },
    /// Sends the packed images of `id` (after `Checkpoint`) to the controller over a
    /// transfer connection (`GET /v1/agents/transfers/TICKET`, WebSocket): binary messages,
    /// then a text message `end`. Answered when all are sent.
    SendImages {
        id: String,
        ticket: String,
        /// Straight to another host's agent instead (a migration), when it can be reached.
        #[serde(default)]
        to: Option<DirectPeer>,
    },
    /// Receives `bytes` bytes of packed images for the prepared instance `id` over a
    /// transfer connection: binary messages, then `end`. Answered when all are on disk.
    /// Straight from another host (`from`), a pack of at most `bytes` bytes, unpacked as
    /// it comes.
    ReceiveImages {
        id: String,
        ticket: String,
        bytes: u64,
        /// The static public key (hex) of the host that sends them straight to this one,
        /// instead of the controller.
        #[serde(default)]
        from: Option<String>,
        /// The images are of a lazy dump: keep the direct link open afterwards, for the
        /// pages that the `Restore` fetches.
        #[serde(default)]
        pages: bool,
    },
    /// Restores the dumped tree: into the prepared space (destination), or back into its
    /// own space after a failed migration (source).
    Restore {
        id: String,
        /// Restore established TCP connections closed (a snapshot restored later, or a
        /// clone with another address) rather than repaired (a migration).
        #[serde(default)]
        tcp_close: bool,
    },
    /// Forgets a prepared space that will not be restored.
    Discard {
        id: String,
    },
    /// After a controller restart, for a migration it did not finish: makes sure instance
    /// `id` runs on this host if it is here to run, waiting for any step of its migration
    /// still under way here first. It runs already (a destination whose restore finished,
    /// a source whose dump never happened), or its tree was dumped here and is brought back
    /// (from its images, or from its lazy dump). `created` with its pid; `not_found` if
    /// this host holds no more than a prepared space for it.
    Resume {
        id: String,
    },
}

/// Where a host's agent takes images straight from another's (`SendImages`): its switch's
/// address (TCP, same port) and its static public key (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectPeer {
    pub locator: SocketAddr,
    pub public_key: String,
}

/// What an agent needs to create an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub id: String,
    pub name: String,
    pub net: Net,
    pub ip: Ipv4Addr,
    pub hostname: String,
    pub cmd: Vec<String>,
    /// Values may hold per-instance variables, expanded by the agent.
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub limits: Limits,
    /// Paths may hold per-instance variables, expanded by the agent.
    #[serde(default)]
    pub space: SpaceSpec,
    /// Ports published on its host (`vane run --publish`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::validate::Publish>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentReply {
    Done,
    Created {
        pid: u32,
    },
    Stats {
        port: PortStats,
        #[serde(default)]
        usage: Option<Usage>,
    },
    HostStats(HostStats),
    /// The instance was dumped; its packed images are `bytes` long. `lazy`: without its
    /// memory, which this host serves until `AwaitPages` is answered.
    Checkpointed {
        bytes: u64,
        #[serde(default)]
        lazy: bool,
    },
}

/// Why an agent could not do what was asked: a kind the controller maps to its answer's
/// status, and one line for the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request makes no sense (a bad argument).
    BadRequest,
    /// The instance is not on this host.
    NotFound,
    /// The instance is not in a state that allows it.
    Conflict,
    /// It was tried and failed.
    Failed,
    /// The instance left this host: the source of a post-copy migration whose memory all
    /// went to the destination cannot take it back; the destination's copy is the one.
    Moved,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AgentError {
        AgentError {
            kind,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> AgentError {
        AgentError::new(ErrorKind::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> AgentError {
        AgentError::new(ErrorKind::Conflict, message)
    }

    pub fn bad_request(message: impl Into<String>) -> AgentError {
        AgentError::new(ErrorKind::BadRequest, message)
    }
}

/// Anything that only says what failed.
impl From<String> for AgentError {
    fn from(message: String) -> AgentError {
        AgentError::new(ErrorKind::Failed, message)
    }
}

impl From<&str> for AgentError {
    fn from(message: &str) -> AgentError {
        AgentError::new(ErrorKind::Failed, message)
    }
}

/// Agent -> controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    /// First message: who the agent is and what it runs (after a restart, the instances it
    /// took back).
    Hello {
        name: String,
        locator: Option<SocketAddr>,
        /// The host's static public key for tunnels (hex).
        public_key: String,
        /// Where it takes WireGuard clients, if it does.
        #[serde(default)]
        gateway: Option<crate::api::GatewayEndpoint>,
        auth: HostAuth,
        instances: Vec<InstanceReport>,
    },
    /// A packet waits for an address of `net` that the agent's table lacks.
    Lookup { net: u32, ip: Ipv4Addr },
    Response {
        id: u64,
        result: Result<AgentReply, AgentError>,
    },
    /// Request `id` is still under way (sent four times a second while it lasts): `bytes` of its
    /// work done so far where that can be counted (images dumped or received), else 0.
    /// The controller waits for an answer as long as these keep coming.
    Progress { id: u64, bytes: u64 },
    /// An instance changed state (for example its program exited).
    Report(InstanceReport),
}

/// How an agent proves it may join the cluster as the host it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostAuth {
    /// First connection: a join token from `vane host token`.
    Token(String),
    /// Later connections: the credential the controller gave it when it enrolled.
    Credential(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub id: String,
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub exit: Option<ExitStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// Where this view stands among all the views the cluster's controllers sent: an agent
    /// applies a view only if it is newer than the last it applied, so that a view from a
    /// deposed leader, or one that overtook another, never undoes a newer one.
    #[serde(default)]
    pub revision: ViewRevision,
    /// Every enrolled host other than the receiver: where its switch is and its key.
    #[serde(default)]
    pub peers: Vec<Peer>,
    pub nets: Vec<Net>,
    pub members: Vec<Member>,
    pub policies: Vec<PolicyRule>,
    /// The services of the view's nets, with the members that take new flows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceView>,
    /// Policies from outside address ranges to the view's nets: who may open flows to
    /// their instances' published ports (a net with none: anyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outside: Vec<OutsidePolicy>,
    /// The WireGuard gateways placed on the receiving host (their members are in `members`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<GatewayView>,
}

/// A gateway as the agent of its host serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayView {
    pub net: u32,
    pub name: String,
    pub ip: Ipv4Addr,
    pub resolver: Ipv4Addr,
    /// The client's public key (base64).
    pub public_key: String,
}

/// A service as a switch and a resolver need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub net: u32,
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<PortSpec>,
    /// Addresses of its running members on hosts that are not dead.
    pub backends: Vec<Ipv4Addr>,
}

impl AgentView {
    /// The view with every member's host id filled in from its peers, `local` standing for
    /// the receiving host (a view saved by an agent older than host ids on members).
    pub fn with_host_ids(mut self, local: (u32, &str)) -> AgentView {
        for m in self.members.iter_mut().filter(|m| m.host_id == 0) {
            m.host_id = if m.host == local.1 {
                local.0
            } else {
                self.peers
                    .iter()
                    .find(|p| p.name == m.host)
                    .map_or(0, |p| p.id)
            };
        }
        self
    }
}

/// The order of views: by the term of the controller that made them (each leader's term
/// is above every earlier one's, kept in the store), then by the order it sent them in.
/// Views saved before revisions existed are at zero, below every revision sent.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ViewRevision {
    pub term: u64,
    pub seq: u64,
}

impl ViewRevision {
    /// Whether a view of this revision is to be applied after one of `last`: it is newer,
    /// or it comes from a controller from before revisions (term 0), whose views come in
    /// order on its one stream.
    pub fn supersedes(self, last: ViewRevision) -> bool {
        self.term == 0 || self > last
    }
}

/// Another host, as a switch needs to know it to open a tunnel to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub id: u32,
    pub name: String,
    pub locator: Option<SocketAddr>,
    /// Static public key (hex).
    pub public_key: String,
}

/// One entry of a net's forwarding table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub net: u32,
    pub ip: Ipv4Addr,
    pub name: String,
    pub hostname: String,
    /// The name of the host it runs on (for people, and for `/etc/hosts`).
    pub host: String,
    /// The id of that host, as switches and tunnels name hosts. 0 in views saved before
    /// members carried it: those are read by name once (`AgentView::with_host_ids`).
    #[serde(default)]
    pub host_id: u32,
    pub instance: String,
    /// Frozen for a migration to the host of this id: switches send nothing to it, and what
    /// their instances send waits in their miss queues for the lookup, which the controller
    /// answers once the instance runs again (where it then runs), rather than being lost at
    /// a frozen copy; packets from it are taken from either host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<u32>,
    /// A WireGuard gateway's member (`instance` is empty): its host serves it through the
    /// gateway, not through an instance's device.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gateway: bool,
}

/// A policy from an outside address range (`vane policy allow 198.51.100.0/24 red`), its
/// net as an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutsidePolicy {
    pub from: Ipv4Net,
    pub to: u32,
    pub port: Option<PortSpec>,
}

/// A policy with its nets as ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    pub from: u32,
    pub to: u32,
    pub port: Option<PortSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(host: &str, host_id: u32) -> Member {
        Member {
            net: 1,
            ip: Ipv4Addr::new(10, 1, 0, 1),
            name: "web".into(),
            hostname: "web".into(),
            host: host.into(),
            host_id,
            instance: "0123".into(),
            moving_to: None,
            gateway: false,
        }
    }

    #[test]
    fn a_view_is_applied_only_after_older_ones() {
        let rev = |term, seq| ViewRevision { term, seq };
        // In order within a term, and any view of a later term after any of an earlier one
        // (a new leader starts its count again).
        assert!(rev(3, 8).supersedes(rev(3, 7)));
        assert!(rev(4, 1).supersedes(rev(3, 900)));
        // A deposed leader's view, one that overtook another, the same view twice: not.
        assert!(!rev(3, 900).supersedes(rev(4, 1)));
        assert!(!rev(3, 7).supersedes(rev(3, 8)));
        assert!(!rev(3, 7).supersedes(rev(3, 7)));
        // A first view after a saved one of before revisions, and views of a controller
        // from before them.
        assert!(rev(1, 1).supersedes(ViewRevision::default()));
        assert!(ViewRevision::default().supersedes(rev(3, 7)));
        // A saved view without a revision reads as zero.
        let saved: AgentView =
            serde_json::from_str(r#"{"nets":[],"members":[],"policies":[]}"#).unwrap();
        assert_eq!(saved.revision, ViewRevision::default());
    }

    #[test]
    fn a_view_saved_without_host_ids_gets_them_from_its_peers() {
        let saved = r#"{"peers":[{"id":7,"name":"h2","locator":null,"public_key":"00"}],
            "nets":[],"policies":[],
            "members":[{"net":1,"ip":"10.1.0.1","name":"web","hostname":"web","host":"h2","instance":"0123"},
                       {"net":1,"ip":"10.1.0.2","name":"db","hostname":"db","host":"h1","instance":"4567"},
                       {"net":1,"ip":"10.1.0.3","name":"x","hostname":"x","host":"gone","instance":"89ab"}]}"#;
        let view: AgentView = serde_json::from_str(saved).unwrap();
        assert!(view.members.iter().all(|m| m.host_id == 0));
        let view = view.with_host_ids((3, "h1"));
        let ids: Vec<u32> = view.members.iter().map(|m| m.host_id).collect();
        assert_eq!(ids, [7, 3, 0], "a peer's id, this host's, unknown stays 0");
        // Ids given by the controller are kept.
        let mut fresh = AgentView::default();
        fresh.members.push(member("h2", 9));
        assert_eq!(fresh.with_host_ids((3, "h1")).members[0].host_id, 9);
    }
}
