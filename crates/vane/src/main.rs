//! `vane`: the single binary. The CLI talks to the controller; `vane controller` and
//! `vane agent` run the daemons; `vane lab` builds a local cluster; the hidden `__launch`,
//! `__init` and `__exec` are helper processes of the agent that enter instances.

mod cli;
mod client;
mod commands;
mod config;
mod lab;
mod sd_notify;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser as _;

use cli::{Cli, Cmd, LabCmd};
use client::Client;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // Clap's message is several lines; the first says what is wrong.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "vane: error: {} (see --help)",
                first.trim_start_matches("error: ").trim()
            );
            return ExitCode::from(2);
        }
    };
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // One line: the outermost context first, then its causes.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("vane: error: {}", msg.join(": "));
            ExitCode::from(1)
        }
    }
}

fn client(
    controller: &Option<String>,
    ca: &Option<std::path::PathBuf>,
    token: &Option<String>,
) -> anyhow::Result<Client> {
    let url = controller
        .clone()
        .unwrap_or_else(client::default_controller);
    Client::new(&client::Access::resolve(&url, ca.clone(), token.clone()))
}

/// A daemon's log on standard error, where systemd's journal or the lab's log file takes it.
fn init_logging(log: cli::LogArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VANE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.log_format {
        cli::LogFormat::Text => logger.init(),
        // Fields flattened into each object (`{"timestamp":..,"level":..,"fields":..}` would
        // make every collector's query name `fields.message`).
        cli::LogFormat::Json => logger.json().flatten_event(true).init(),
    }
}

/// SIGINT or SIGTERM: how the daemons are asked to stop. The handlers are installed by
/// this call (inside the runtime), not when the future is first polled: a service manager
/// may stop a daemon as soon as it has said it is ready, before its loop ever waits.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// A daemon's runtime, with its readiness for the service manager told from it (if it
/// asks), and the signals that stop it.
fn daemon_runtime(
    readiness: Option<(
        std::sync::Arc<tokio::sync::Notify>,
        impl std::future::Future<Output = ()> + Send + 'static,
    )>,
) -> Result<(
    tokio::runtime::Runtime,
    Option<std::sync::Arc<tokio::sync::Notify>>,
    impl std::future::Future<Output = ()>,
)> {
    let rt = runtime()?;
    let ready = readiness.map(|(ready, tell)| {
        rt.spawn(tell);
        ready
    });
    let shutdown = {
        let _in = rt.enter();
        shutdown_signal()
    };
    Ok((rt, ready, shutdown))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn dispatch(cli: Cli) -> Result<i32> {
    let (controller, ca, token) = (cli.controller.clone(), cli.ca.clone(), cli.token.clone());
    let c = || client(&controller, &ca, &token);
    match cli.command {
        Cmd::Net(cmd) => commands::net(&c()?, cmd)?,
        Cmd::Run(args) => commands::run(&c()?, *args)?,
        Cmd::Ps(list) => commands::ps(&c()?, list)?,
        Cmd::Top { interval, output } => commands::top(&c()?, interval, output.output)?,
        Cmd::Template(cmd) => commands::template(&c()?, cmd)?,
        Cmd::Inspect { name, .. } => commands::inspect(&c()?, &name)?,
        Cmd::Logs { name, follow, tail } => commands::logs(&c()?, &name, follow, tail)?,
        Cmd::Stop { name } => commands::stop(&c()?, &name)?,
        Cmd::Migrate {
            name,
            to,
            post_copy,
            output,
        } => commands::migrate(&c()?, &name, &to, post_copy, output.output)?,
        Cmd::Snapshot { name, out, stop } => commands::snapshot(&c()?, &name, &out, stop)?,
        Cmd::Restore {
            dir,
            host,
            name,
            ip,
            hostname,
        } => commands::restore(&c()?, &dir, host, name, ip, hostname)?,
        Cmd::Rm { name, force } => commands::rm(&c()?, &name, force)?,
        Cmd::Exec {
            name,
            env,
            interactive,
            tty,
            cmd,
        } => {
            let args = commands::ExecArgs {
                env,
                interactive,
                tty,
            };
            return commands::exec(&c()?, &name, cmd, args);
        }
        Cmd::Stats { name, output } => commands::stats(&c()?, &name, output.output)?,
        Cmd::Policy(cmd) => commands::policy(&c()?, cmd)?,
        Cmd::Service(cmd) => commands::service(&c()?, cmd)?,
        Cmd::Gateway(cmd) => commands::gateway(&c()?, cmd)?,
        Cmd::Host(cmd) => commands::host(&c()?, cmd)?,
        Cmd::Token(cmd) => commands::credential(&c()?, cmd)?,
        Cmd::Lab(LabCmd::Up(args)) => lab::up(args)?,
        Cmd::Lab(LabCmd::Down(args)) => lab::down(&args.name)?,
        Cmd::Lab(LabCmd::Fail { host, name }) => lab::fail(&name.name, &host)?,
        Cmd::Lab(LabCmd::Recover { host, name }) => lab::recover(&name.name, &host)?,
        Cmd::Controller(args) => {
            let args = match &args.config {
                Some(path) => config::controller(path)?,
                None => args,
            };
            let host_grace = vane_proto::validate::duration("host grace", &args.host_grace)?;
            if host_grace.is_zero() {
                anyhow::bail!(
                    "invalid host grace {:?}: must be more than zero",
                    args.host_grace
                );
            }
            let readiness = sd_notify::readiness().context("NOTIFY_SOCKET")?;
            init_logging(args.log);
            let (rt, ready, shutdown) = daemon_runtime(readiness)?;
            rt.block_on(vane_controller::run(
                vane_controller::ControllerConfig {
                    listen: args.listen,
                    data_dir: args.data_dir,
                    store: args.store,
                    cluster: vane_proto::api::ClusterConfig {
                        global_space: args.global_space,
                        plaintext: args.plaintext,
                    },
                    host_grace,
                    ready,
                    advertise: args.advertise,
                },
                shutdown,
            ))?;
        }
        Cmd::Agent(args) => {
            let (args, controller) = match &args.config {
                Some(path) => config::agent(path)?,
                None => (args, cli.controller.clone()),
            };
            let name = args
                .name
                .context("no host name: give --name, or `name` in the config file")?;
            // Before the network namespace changes: see `Notifier::take`.
            let readiness = sd_notify::readiness().context("NOTIFY_SOCKET")?;
            init_logging(args.log);
            if let Some(ns) = &args.netns {
                // Before the runtime starts any thread: every thread it makes inherits this
                // namespace.
                let f = std::fs::File::open(vane_agent::netconf::netns_path(ns))
                    .with_context(|| format!("open network namespace {ns:?}"))?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("enter network namespace {ns:?}"))?;
            }
            let controller = controller.unwrap_or_else(client::default_controller);
            let (rt, ready, shutdown) = daemon_runtime(readiness)?;
            rt.block_on(vane_agent::run(
                vane_agent::AgentConfig {
                    name,
                    controller,
                    state_dir: args.state_dir,
                    join_token: args.join,
                    listen: args.listen,
                    gateway_listen: args.gateway_listen,
                    locator: args.locator,
                    tunnel_idle: std::time::Duration::from_secs(args.tunnel_idle),
                    log_cap: args.log_cap,
                    rekey_after: std::time::Duration::from_secs(args.rekey_after),
                    exe: std::env::current_exe().context("find the vane binary")?,
                    ready,
                },
                shutdown,
            ))?;
        }
        Cmd::Ui => {
            let url = controller
                .clone()
                .unwrap_or_else(client::default_controller);
            let access = client::Access::resolve(&url, ca.clone(), token.clone());
            let Some(token) = access.token.clone() else {
                anyhow::bail!(
                    "no credential for {}: give --token or VANE_TOKEN",
                    access.url
                );
            };
            // The page polls one replica: the one that leads now.
            let base = Client::new(&access)?.leader_url()?;
            println!("{base}/ui#token={token}");
            if let Some(ca) = access.ca {
                eprintln!(
                    "(the browser must trust the cluster's CA, {}, or be told to)",
                    ca.display()
                );
            }
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            use std::io::Write as _;
            // Into memory first: clap_complete panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vane", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("write the completion script")?;
        }
        Cmd::InternalMan { dir } => {
            use clap::CommandFactory as _;
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("write man pages into {}", dir.display()))?;
        }
        Cmd::InternalLaunch { dir } => return Ok(vane_agent::launch::launch_main(&dir)),
        Cmd::InternalInit { pivoted } => {
            return Ok(vane_agent::launch::init_main(pivoted.as_deref()))
        }
        Cmd::InternalExec { args } => return Ok(vane_agent::exec_helper_main(&args)),
        Cmd::InternalRestore { dir } => return Ok(vane_agent::launch::restore_main(&dir)),
        Cmd::InternalSimulateAgents(a) => {
            init_logging(a.log);
            runtime()?.block_on(vane_agent::simulate::run(vane_agent::simulate::Options {
                agents: a.agents,
                controller: cli
                    .controller
                    .clone()
                    .context("no controller: give --controller URL")?,
                join: a.join,
                prefix: a.prefix,
                report: a.report,
                ready: a.ready,
                enroll_parallel: a.enroll_parallel,
            }))?;
        }
    }
    Ok(0)
}
