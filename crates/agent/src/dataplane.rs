//! The switch's I/O shell: one thread that owns the sans-IO `Switch` and the file
//! descriptors of the instances' TUN devices, reads packets, asks the switch what to do
//! with each, and writes them where it says. The agent's async side talks to it through a
//! channel and a waker; nothing on the packet path takes a lock.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;

use vane_switch::{
    Location, NetConfig, NetId, PolicyRule, PortCounters, PortId, Switch, SwitchConfig, Verdict,
};

const WAKER: Token = Token(usize::MAX);
const EGRESS: Token = Token(usize::MAX - 1);
/// Packets read from one device before the others get their turn.
const BATCH: usize = 64;
/// Largest packet a TUN device hands over without offloads.
const MAX_PACKET: usize = 65536;

pub enum Command {
    /// Attach an instance's TUN device as `port`.
    Attach {
        port: PortId,
        tun: OwnedFd,
        net: NetConfig,
        ip: Ipv4Addr,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Detach {
        port: PortId,
    },
    /// The directory as the controller last pushed it: nets, members, policies.
    View {
        nets: Vec<NetConfig>,
        members: Vec<(NetId, Ipv4Addr, Location)>,
        policies: Vec<PolicyRule>,
    },
    /// The host-side egress device.
    Egress {
        tun: OwnedFd,
    },
    Stats {
        port: PortId,
        reply: oneshot::Sender<Option<PortCounters>>,
    },
}

/// Handle to the data-plane thread.
#[derive(Clone)]
pub struct Dataplane {
    tx: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

impl Dataplane {
    pub fn start(cfg: SwitchConfig) -> io::Result<Dataplane> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        let mut worker = Worker {
            poll,
            rx,
            switch: Switch::new(cfg),
            ports: HashMap::new(),
            egress: None,
            view_members: HashSet::new(),
            view_nets: HashSet::new(),
        };
        std::thread::Builder::new()
            .name("vane-switch".into())
            .spawn(move || worker.run())?;
        Ok(Dataplane { tx, waker })
    }

    pub fn send(&self, cmd: Command) {
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }

    pub async fn attach(
        &self,
        port: PortId,
        tun: OwnedFd,
        net: NetConfig,
        ip: Ipv4Addr,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Attach {
            port,
            tun,
            net,
            ip,
            reply,
        });
        rx.await
            .unwrap_or_else(|_| Err("switch thread is gone".into()))
    }

    pub async fn stats(&self, port: PortId) -> Option<PortCounters> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { port, reply });
        rx.await.ok().flatten()
    }
}

struct Worker {
    poll: Poll,
    rx: mpsc::Receiver<Command>,
    switch: Switch,
    ports: HashMap<PortId, File>,
    egress: Option<File>,
    /// Members and nets set from the last view, so that the next view can remove what
    /// disappeared without touching ports attached since.
    view_members: HashSet<(NetId, Ipv4Addr)>,
    view_nets: HashSet<NetId>,
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; MAX_PACKET];
        let mut backlog: Vec<Token> = Vec::new();
        let mut last_expiry = Instant::now();
        loop {
            let timeout = if backlog.is_empty() {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("switch poll failed: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    if !self.commands() {
                        return;
                    }
                } else if !backlog.contains(&ev.token()) {
                    backlog.push(ev.token());
                }
            }
            // mio is edge-triggered: a device not drained to EAGAIN stays in the backlog.
            for token in std::mem::take(&mut backlog) {
                if !self.service(token, &mut buf) {
                    backlog.push(token);
                }
            }
            let now = Instant::now();
            if now.duration_since(last_expiry) >= Duration::from_secs(1) {
                self.switch.expire_flows(now);
                last_expiry = now;
            }
        }
    }

    /// Applies queued commands; false when the agent side is gone.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Attach {
                port,
                tun,
                net,
                ip,
                reply,
            } => {
                let result = self.attach(port, tun, net, ip);
                let _ = reply.send(result);
            }
            Command::Detach { port } => {
                if let Some(f) = self.ports.remove(&port) {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&f.as_raw_fd()));
                }
                self.switch.detach_port(port);
            }
            Command::View {
                nets,
                members,
                policies,
            } => self.apply_view(nets, members, policies),
            Command::Egress { tun } => {
                let f = File::from(tun);
                match self.poll.registry().register(
                    &mut SourceFd(&f.as_raw_fd()),
                    EGRESS,
                    Interest::READABLE,
                ) {
                    Ok(()) => self.egress = Some(f),
                    Err(e) => tracing::warn!("egress device not usable: {e}"),
                }
            }
            Command::Stats { port, reply } => {
                let _ = reply.send(self.switch.port_counters(port));
            }
        }
    }

    fn attach(
        &mut self,
        port: PortId,
        tun: OwnedFd,
        net: NetConfig,
        ip: Ipv4Addr,
    ) -> Result<(), String> {
        self.switch.upsert_net(net);
        self.switch
            .attach_port(port, net.id, ip)
            .map_err(|e| e.to_string())?;
        let f = File::from(tun);
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&f.as_raw_fd()),
            Token(port.0 as usize),
            Interest::READABLE,
        ) {
            self.switch.detach_port(port);
            return Err(format!("register TUN device: {e}"));
        }
        self.ports.insert(port, f);
        Ok(())
    }

    fn apply_view(
        &mut self,
        nets: Vec<NetConfig>,
        members: Vec<(NetId, Ipv4Addr, Location)>,
        policies: Vec<PolicyRule>,
    ) {
        let new_nets: HashSet<NetId> = nets.iter().map(|n| n.id).collect();
        for net in nets {
            self.switch.upsert_net(net);
        }
        for gone in self.view_nets.difference(&new_nets) {
            self.switch.remove_net(*gone);
        }
        self.view_nets = new_nets;
        let new_members: HashSet<(NetId, Ipv4Addr)> =
            members.iter().map(|(n, ip, _)| (*n, *ip)).collect();
        for (net, ip) in self.view_members.difference(&new_members) {
            self.switch.remove_member(*net, *ip);
        }
        for (net, ip, loc) in members {
            self.switch.set_member(net, ip, loc);
        }
        self.view_members = new_members;
        self.switch.set_policies(policies);
    }

    /// Reads up to `BATCH` packets from the device of `token` and forwards them. Returns
    /// whether the device was drained.
    fn service(&mut self, token: Token, buf: &mut [u8]) -> bool {
        for _ in 0..BATCH {
            let source = if token == EGRESS {
                self.egress.as_mut()
            } else {
                self.ports.get_mut(&PortId(token.0 as u32))
            };
            let Some(source) = source else { return true };
            let n = match source.read(buf) {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("read from device {}: {e}", token.0);
                    return true;
                }
            };
            let pkt = &mut buf[..n];
            let now = Instant::now();
            let verdict = if token == EGRESS {
                self.switch.process_from_egress(pkt, now)
            } else {
                self.switch
                    .process_from_port(PortId(token.0 as u32), pkt, now)
            };
            let out = match verdict {
                Verdict::Deliver(port) => self.ports.get_mut(&port),
                Verdict::Egress => self.egress.as_mut(),
                // Remote members are reached through tunnels between hosts (multi-host).
                Verdict::Forward { .. } | Verdict::Drop(_) => None,
            };
            if let Some(out) = out {
                // A full device queue drops the packet, as a full link would.
                let _ = out.write(pkt);
            }
        }
        false
    }
}
