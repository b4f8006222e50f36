//! Command-line interface: `vane` with `ip`/`podman`-style subcommands.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;

#[derive(Parser)]
#[command(
    name = "vane",
    version,
    about = "Run unmodified Linux programs in isolated virtual networks",
    propagate_version = true
)]
pub struct Cli {
    /// Controller API URL [default: the running lab's, else http://127.0.0.1:7946]
    #[arg(long, global = true, env = "VANE_CONTROLLER")]
    pub controller: Option<String>,
    /// The controller's CA certificate (PEM) [default: the lab's, on the machine that runs it]
    #[arg(long, global = true, env = "VANE_CA")]
    pub ca: Option<PathBuf>,
    /// The credential to present [default: the lab's admin credential, on the machine that
    /// runs it]
    #[arg(long, global = true, env = "VANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum InspectFormat {
    #[default]
    Json,
}

#[derive(Args, Clone, Copy)]
pub struct OutputArg {
    /// Output format (`--format json` as podman spells it)
    #[arg(long, short = 'o', visible_alias = "format", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// A listing's options: its format, or only the names (ids where a row has no name).
#[derive(Args, Clone, Copy)]
pub struct ListArg {
    /// Output format (`--format json` as podman spells it)
    #[arg(long, short = 'o', visible_alias = "format", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print only each row's name (or id), one per line
    #[arg(long, short = 'q', conflicts_with = "output")]
    pub quiet: bool,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Manage nets (isolation groups with a subnet)
    #[command(subcommand)]
    Net(NetCmd),
    /// Start a program detached in a new instance; prints the instance's name
    Run(Box<RunArgs>),
    /// List instances
    Ps(ListArg),
    /// Show each running instance's resource use and traffic: CPU, memory, processes,
    /// packets and bytes in and out, packets refused by policy or over the bandwidth limit
    Top {
        /// Seconds over which CPU use is measured
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Manage templates: named limits, environment and file-system settings for `run`
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Show an instance as JSON
    Inspect {
        name: String,
        /// Output format: JSON is the only one (accepted for podman's habits)
        #[arg(long, short = 'o', visible_alias = "format", value_enum, default_value_t = InspectFormat::Json)]
        output: InspectFormat,
    },
    /// Print an instance's program output (stdout and stderr)
    Logs {
        name: String,
        /// Then print what the program writes, until Ctrl-C or the instance is removed
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last N lines
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Stop an instance's program (SIGTERM, then SIGKILL after 10 s)
    Stop { name: String },
    /// Move a running instance to another host, with its processes and open connections;
    /// prints the freeze time, its phases (dump, transfer, restore, switch) and the size of
    /// the images moved
    Migrate {
        name: String,
        /// The destination host
        #[arg(long)]
        to: String,
        /// Move the memory after the freeze (lazy pages): a short freeze whatever the
        /// instance's size, but the instance is lost if the source fails before its last
        /// page has moved
        #[arg(long)]
        post_copy: bool,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Dump a running instance (its processes, memory, open files) to a directory, leaving
    /// it running unless --stop
    Snapshot {
        name: String,
        /// Directory to write the snapshot to (made if missing)
        #[arg(long)]
        out: PathBuf,
        /// Stop the instance once dumped
        #[arg(long)]
        stop: bool,
    },
    /// Bring a snapshot back as a new instance; with --name (and --ip, --hostname) a clone
    /// with its own identity
    Restore {
        dir: PathBuf,
        /// Host to restore on [default: the least busy online host]
        #[arg(long)]
        host: Option<String>,
        /// Name of the restored instance [default: the snapshot's]
        #[arg(long)]
        name: Option<String>,
        /// Virtual IP [default: the snapshot's, or a free one for a clone]
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Hostname [default: the snapshot's, or the new name for a clone]
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Remove an instance, stopping it first
    Rm {
        name: String,
        /// Forget the instance even if its host is offline
        #[arg(long)]
        force: bool,
    },
    /// Run a command inside a running instance (it is hung up if the client goes)
    Exec {
        name: String,
        /// Send standard input to the command (its end closes the command's)
        #[arg(long, short = 'i')]
        interactive: bool,
        /// Run the command on a terminal inside the instance; the client's terminal goes
        /// raw (keys, Ctrl-C too, reach the command) and passes its size on. With a
        /// terminal as stdin, what is typed is sent even without -i
        #[arg(long, short = 't')]
        tty: bool,
        /// Set an environment variable (KEY=VALUE), repeatable
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// The command and its arguments
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Show an instance's traffic counters
    Stats {
        name: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Manage policies between nets
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Manage services: a name and a virtual IP in a net, whose connections the switches
    /// spread over the instances run with --service NAME
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Manage WireGuard gateways: a stock WireGuard client becomes a member of a net, with
    /// its own address and name
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Hosts of the cluster
    #[command(subcommand)]
    Host(HostCmd),
    /// Credentials for tenants: each sees and changes only its tenant's nets, instances,
    /// templates and policies
    #[command(subcommand)]
    Token(CredentialCmd),
    /// A local multi-host lab: test hosts as network namespaces on a bridge underlay
    #[command(subcommand)]
    Lab(LabCmd),
    /// Print the address of the controller's live picture (hosts, instances, tunnels and
    /// traffic, in a browser), with the credential in its fragment, which no server sees
    Ui,
    /// Run the controller (control plane)
    Controller(ControllerArgs),
    /// Run the agent of one host
    Agent(AgentArgs),
    /// Print a shell completion script (bash: `source <(vane completions bash)`)
    Completions { shell: clap_complete::Shell },
    /// Writes the man pages (vane.1 and one per subcommand) into DIR: for packaging
    #[command(name = "__man", hide = true)]
    InternalMan { dir: PathBuf },
    #[command(name = "__launch", hide = true)]
    InternalLaunch { dir: PathBuf },
    #[command(name = "__init", hide = true)]
    InternalInit {
        #[arg(long)]
        pivoted: Option<String>,
    },
    #[command(name = "__exec", hide = true)]
    InternalExec { args: String },
    #[command(name = "__restore", hide = true)]
    InternalRestore { dir: PathBuf },
    /// Simulated hosts for `bench/control.sh`: real control-stream clients, no instances
    #[command(name = "__simulate-agents", hide = true)]
    InternalSimulateAgents(SimulateArgs),
}

#[derive(Args)]
pub struct SimulateArgs {
    /// How many hosts
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// A reusable join token (`vane host token --reusable`)
    #[arg(long)]
    pub join: String,
    /// Hosts are named PREFIX1 .. PREFIXN
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// Where SIGUSR1 writes the report (JSON)
    #[arg(long)]
    pub report: PathBuf,
    /// Written once every host is connected and has its first view
    #[arg(long)]
    pub ready: Option<PathBuf>,
    /// Hosts enrolling at once
    #[arg(long, default_value_t = 4)]
    pub enroll_parallel: usize,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Subcommand)]
pub enum NetCmd {
    /// Create a net
    Create {
        name: String,
        /// The net's subnet, inside the global virtual space (default 10.0.0.0/8)
        #[arg(long)]
        subnet: Ipv4Net,
        /// Tenant owning the net; nets of different tenants may overlap
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Let instances reach addresses outside the global space through their host (NAT)
        #[arg(long)]
        egress: bool,
    },
    /// List nets
    Ls(ListArg),
    /// Remove a net (refused while instances use it)
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a service: it gets a virtual IP of its net, and the name NAME (NAME.NET from
    /// other nets that a policy lets reach it)
    Create {
        name: String,
        /// The net of the service and of its members
        #[arg(long)]
        net: String,
        /// A port it answers on, as PORT/PROTO (e.g. 80/tcp); repeatable
        #[arg(long = "port", value_name = "PORT/PROTO", required = true)]
        ports: Vec<String>,
    },
    /// List services, with the members that take new connections
    Ls(ListArg),
    /// Remove a service (its members run on)
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum GatewayCmd {
    /// Add a gateway and print its client's WireGuard configuration (wg-quick format; it
    /// holds the client's private key unless --public-key is given, and is shown only now)
    Add {
        name: String,
        /// The net the client becomes a member of
        #[arg(long)]
        net: String,
        /// The host whose agent the client connects to (its agent runs with
        /// --gateway-listen) [default: the least loaded such host]
        #[arg(long)]
        host: Option<String>,
        /// The client's address in the net [default: the first free address of the net]
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// The client's WireGuard public key (`wg pubkey` prints it), to keep its private
        /// key to itself [default: a key pair is made, its private key in the configuration]
        #[arg(long, value_name = "KEY")]
        public_key: Option<String>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// List gateways
    Ls(ListArg),
    /// Remove gateways: their clients are cut off at once
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// Net to join
    #[arg(long)]
    pub net: String,
    /// Instance name [default: NET-<id>]
    #[arg(long)]
    pub name: Option<String>,
    /// Virtual IP [default: the first free address of the net]
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
    /// Virtual hostname [default: the name]
    #[arg(long)]
    pub hostname: Option<String>,
    /// Host to run on [default: the least loaded]
    #[arg(long)]
    pub host: Option<String>,
    /// Environment variable (KEY=VALUE), repeatable; the value may use {name}, {hostname},
    /// {ip}, {net}, {state}
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Start from this template's settings; the options given here override them
    #[arg(long)]
    pub template: Option<String>,
    /// When to start the program again: `no`, `on-failure` (a non-zero exit or a signal),
    /// `always` (any end but `vane stop`); with either of the last two, also on another host
    /// when its host dies
    #[arg(long, default_value = "no", value_name = "no|on-failure|always")]
    pub restart: vane_proto::api::RestartPolicy,
    /// Have the controller keep a checkpoint of the instance taken this often (e.g. 30s,
    /// 5m), to start it from on another host when its host dies (needs --restart)
    #[arg(long, value_name = "DURATION")]
    pub checkpoint_every: Option<String>,
    /// Let clients outside vane reach PORT of the instance at HOSTPORT of its host (at
    /// HOSTIP only, if given); they keep their own address; repeatable
    #[arg(short = 'p', long, value_name = "[HOSTIP:]HOSTPORT:PORT[/PROTO]")]
    pub publish: Vec<String>,
    /// Join this service (of the same net) as a member: the switches send it part of the
    /// service's new connections while it runs
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// The program and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// Limits and file-system settings, for `run` and `template create`.
#[derive(Args)]
pub struct SettingsArgs {
    /// Memory limit, e.g. 256M or 1G; over it the program is killed (out of memory)
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU limit as a number of CPUs, e.g. 0.5
    #[arg(long)]
    pub cpus: Option<String>,
    /// Most processes (and threads) at once, the instance's init included
    #[arg(long)]
    pub pids: Option<String>,
    /// Bandwidth through the switch, each direction, e.g. 50Mbit
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// Use this directory as the root, below a private copy-on-write layer (the directory
    /// itself is never written)
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<String>,
    /// Share a host directory at PATH inside, repeatable; `:shared` says the directory is
    /// the same on every host (network storage), so the instance can migrate
    #[arg(long = "volume", short = 'v', value_name = "HOST_DIR:PATH[:shared]")]
    pub volumes: Vec<String>,
    /// Path rule: the program sees SOURCE at TARGET, repeatable; paths may use {name},
    /// {hostname}, {ip}, {net}, {state}
    #[arg(long = "redirect", value_name = "TARGET=SOURCE")]
    pub redirects: Vec<String>,
    /// Give root inside this capability beyond the default set (e.g. NET_ADMIN, or ALL),
    /// repeatable
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Take this capability from the default set (or ALL), repeatable
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// Run outside the sandbox (no user namespace: root inside is root on the host); for
    /// trusted programs only
    #[arg(long)]
    pub privileged: bool,
}

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Create (or replace) a template
    Create {
        name: String,
        /// Environment variable (KEY=VALUE), repeatable
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[command(flatten)]
        settings: Box<SettingsArgs>,
    },
    /// List templates
    Ls(ListArg),
    /// Remove a template (instances made from it keep their settings)
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Let FROM open connections (or send datagrams) to TO; replies come back. FROM may be
    /// an outside address range (198.51.100.0/24): then once TO has such a policy, the
    /// ports its instances publish take new connections only from the ranges allowed
    Allow {
        from: String,
        to: String,
        /// Only this destination port, e.g. 80/tcp or 53/udp
        #[arg(long)]
        port: Option<String>,
    },
    /// List policies
    Ls(ListArg),
    /// Remove a policy: by id, or by FROM TO [--port]
    Rm {
        /// Policy id, or FROM net
        first: String,
        /// TO net, when removing by nets
        to: Option<String>,
        #[arg(long)]
        port: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum CredentialCmd {
    /// Print a new credential for a tenant (shown once; give it with --token or VANE_TOKEN)
    Create {
        #[arg(long)]
        tenant: String,
        /// How long it is accepted: seconds, or with a unit (30m, 12h, 7d) [default: until
        /// revoked]
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List tenant credentials (their ids and tenants, never their secrets)
    Ls(ListArg),
    /// Revoke a tenant credential
    Rm { id: String },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// List join tokens not yet spent or expired (their ids, never their secrets)
    Ls(ListArg),
    /// Revoke a join token: no host joins with it any more
    Rm { id: String },
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// List hosts: name, underlay locator, state, instance count
    Ls(ListArg),
    /// Print a join token for a new host (`vane agent --join TOKEN`); `ls` and `rm` list
    /// and revoke tokens
    #[command(args_conflicts_with_subcommands = true)]
    Token {
        #[command(subcommand)]
        cmd: Option<TokenCmd>,
        /// How long the token can be used: seconds, or with a unit (30m, 12h, 7d)
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Let it enroll any number of hosts until it expires (else the first spends it)
        #[arg(long)]
        reusable: bool,
    },
    /// Show a host's switch and tunnel counters (handshakes, drops by reason, peers)
    Stats {
        name: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Forget an offline host without instances, with its enrollment; --force evicts a
    /// host whatever its state (its credential and key revoked, its instances forgotten,
    /// every other host drops its sessions with it)
    Rm {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build (or complete) a lab and start its controller and agents
    Up(LabUpArgs),
    /// Remove everything `lab up` made: instances, agents, controller, namespaces, links, state
    Down(LabNameArg),
    /// Make a host vanish as in a power loss: its agent and instances killed, its underlay
    /// link down
    Fail {
        /// The lab host (h1, h2, ...)
        host: String,
        #[command(flatten)]
        name: LabNameArg,
    },
    /// Bring a failed host back: its underlay link up, its agent started again
    Recover {
        /// The lab host (h1, h2, ...)
        host: String,
        #[command(flatten)]
        name: LabNameArg,
    },
}

#[derive(Args)]
pub struct LabNameArg {
    /// Lab name (at most 8 characters); several labs can run side by side
    #[arg(long, default_value = "lab")]
    pub name: String,
}

#[derive(Args)]
pub struct LabUpArgs {
    /// Number of test hosts
    #[arg(long, default_value_t = 1)]
    pub hosts: u8,
    #[command(flatten)]
    pub name: LabNameArg,
    /// Underlay subnet of the lab's bridge (a /24 of 198.18.0.0/15 is a good choice)
    #[arg(long, default_value = "198.18.0.0/24")]
    pub underlay: Ipv4Net,
    /// Tunnels between hosts without encryption or authentication (for comparison only)
    #[arg(long)]
    pub plaintext: bool,
    /// Global virtual address space of the lab's controller, when the lab is created
    /// (default 10.0.0.0/8)
    #[arg(long)]
    pub global_space: Option<Ipv4Net>,
    /// The controller's store, as `vane controller --store` takes it (default: embedded in
    /// the lab's directory); kept for the lab's life
    #[arg(long, value_name = "STORE", value_parser = store_location)]
    pub store: Option<String>,
    /// Controller replicas, one of which leads; with more than one and no --store, the lab
    /// runs an etcd of as many members for them; kept for the lab's life
    #[arg(long)]
    pub controllers: Option<u8>,
}

/// A store location checked as the controller will read it, kept as written.
fn store_location(s: &str) -> Result<String, String> {
    s.parse::<vane_controller::StoreLocation>()?;
    Ok(s.to_string())
}

#[derive(Args)]
pub struct ControllerArgs {
    /// TOML file of settings, keyed by these flags' long names (`data-dir = "/srv/vane"`);
    /// the command line and the environment win over it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address and port of the API
    #[arg(long, default_value = "127.0.0.1:7946")]
    pub listen: SocketAddr,
    /// Directory of the persistent store
    #[arg(long, default_value = "/var/lib/vane/controller")]
    pub data_dir: PathBuf,
    /// Where the store is: `embedded` (in the data directory), or an etcd cluster,
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (its members' client addresses; keys under
    /// PREFIX/, default `vane`)
    #[arg(long, default_value = "embedded", value_name = "STORE")]
    pub store: vane_controller::StoreLocation,
    /// Global virtual address space, when the store is created
    #[arg(long, default_value = "10.0.0.0/8")]
    pub global_space: Ipv4Net,
    /// Tunnels between hosts without encryption or authentication, when the store is created
    #[arg(long)]
    pub plaintext: bool,
    /// How long a host may be silent before it is declared dead and its instances with a
    /// restart policy start on other hosts (e.g. 5s, 500ms)
    #[arg(
        long,
        env = "VANE_HOST_GRACE",
        default_value = "5s",
        value_name = "DURATION"
    )]
    pub host_grace: String,
    /// This replica's URL, as the standbys name it to clients while it leads (with an etcd
    /// store, where replicas elect a leader) [default: https://LISTEN]
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
}

/// How a daemon writes its log (to standard error).
#[derive(Args, Clone, Copy)]
pub struct LogArgs {
    /// Lines of text for people, or one JSON object per line for a log collector; levels
    /// come from VANE_LOG (else RUST_LOG), e.g. `info` or `info,vane_agent=debug`
    /// [default level: info]
    #[arg(long, env = "VANE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Default, ValueEnum, PartialEq, Eq, Debug)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Args)]
pub struct AgentArgs {
    /// TOML file of settings, keyed by these flags' long names and `controller`
    /// (`state-dir = "/srv/vane"`); the command line and the environment win over it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This host's name in the cluster (needed, here or in the config file)
    #[arg(long, required_unless_present = "config")]
    pub name: Option<String>,
    /// Directory of the agent's state (instances)
    #[arg(long, default_value = "/var/lib/vane/agent")]
    pub state_dir: PathBuf,
    /// Join token from `vane host token`, needed the first time this host joins
    #[arg(long, env = "VANE_JOIN_TOKEN", hide_env_values = true)]
    pub join: Option<String>,
    /// UDP address the switch listens on for tunnels from other hosts
    #[arg(long, default_value = "0.0.0.0:7947")]
    pub listen: SocketAddr,
    /// UDP address where this host takes WireGuard clients of its gateways (`vane gateway
    /// add`), e.g. 0.0.0.0:51820 [default: it takes none]
    #[arg(long, value_name = "ADDR")]
    pub gateway_listen: Option<SocketAddr>,
    /// Underlay address and port other hosts reach this switch at [default: the address
    /// this host reaches the controller from, followed when it changes, and the listen port]
    #[arg(long)]
    pub locator: Option<SocketAddr>,
    /// Seconds without traffic after which the tunnel to a host is torn down (it is rebuilt
    /// on demand)
    #[arg(long, env = "VANE_TUNNEL_IDLE", default_value_t = 180)]
    pub tunnel_idle: u64,
    /// Seconds after which a tunnel session is rekeyed
    #[arg(long, env = "VANE_REKEY_AFTER", default_value_t = 120)]
    pub rekey_after: u64,
    /// Bytes an instance's output log may reach before it is rotated (its newest half kept
    /// as output.log.1)
    #[arg(long, env = "VANE_LOG_CAP", default_value_t = 16 << 20)]
    pub log_cap: u64,
    /// Run in this named network namespace (/run/netns/NAME), as the lab's hosts do
    #[arg(long)]
    pub netns: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
}
