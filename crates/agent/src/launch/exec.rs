//! `vane __exec`: a command run inside a running instance, in its namespaces and cgroups
//! and confined as the instance is.
//!
//! The command runs in a process group of its own (with a terminal: a session of its own,
//! on a pseudo-terminal of the instance's `/dev/pts`). SIGHUP or SIGTERM to the helper (the
//! agent's, when the client is gone) hangs the command up as a closed terminal would:
//! SIGHUP to its process group, then SIGKILL after [`HANGUP_GRACE`]. With input, the
//! helper's standard input carries frames (`api::frame`: stdin, resize) from the agent;
//! with a terminal, its standard output is what the terminal shows.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use vane_proto::api::{frame, TtySize};

use super::{enter_userns, errno};
use crate::cgroup;
use crate::sandbox::Confinement;

/// How long a hung-up command's process group has to end before it is killed.
pub const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// What the command reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `/dev/null`.
    Null,
    /// The stdin frames on the helper's standard input, through a pipe.
    Pipe,
    /// A pseudo-terminal of this size, fed by the stdin frames, resized by resize frames.
    Tty(TtySize),
}

/// `vane __exec`: runs CMD inside the namespaces and cgroups of the instance whose init is
/// `init_pid`, confined as the instance is, with `env`, and exits with CMD's exit code.
pub fn exec_main(
    init_pid: u32,
    cgroups: &[PathBuf],
    confinement: &Confinement,
    env: &[(String, String)],
    cmd: &[String],
    input: Input,
) -> i32 {
    match exec(init_pid, cgroups, confinement, env, cmd, input) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vane: exec: {e}");
            if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        }
    }
}

fn exec(
    init_pid: u32,
    cgroups: &[PathBuf],
    confinement: &Confinement,
    env: &[(String, String)],
    cmd: &[String],
    input: Input,
) -> io::Result<i32> {
    cgroup::join(cgroups, std::process::id())?;
    let open = |name: &str| {
        File::open(format!("/proc/{init_pid}/ns/{name}"))
            .map_err(|e| io::Error::new(e.kind(), format!("instance is gone: {e}")))
    };
    // Every namespace is opened before any is joined: after joining the mount namespace,
    // /proc is the instance's and the init pid means something else there. The network
    // namespace belongs to the host's user namespace: joined first, while this process is
    // still root there; then the instance's user namespace, which owns the others.
    let net = open("net")?;
    let user = if confinement.privileged() {
        None
    } else {
        Some(OwnedFd::from(open("user")?))
    };
    let mut kinds = vec![
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("pid", CloneFlags::CLONE_NEWPID),
    ];
    if user.is_some() {
        kinds.push(("cgroup", CloneFlags::CLONE_NEWCGROUP));
    }
    kinds.push(("mnt", CloneFlags::CLONE_NEWNS));
    let mut files = Vec::new();
    for (name, flag) in kinds {
        files.push((open(name)?, flag, name));
    }
    setns(&net, CloneFlags::CLONE_NEWNET).map_err(|e| errno("join net namespace", e))?;
    if let Some(user) = &user {
        enter_userns(user)?;
    }
    for (f, flag, name) in &files {
        setns(f, *flag).map_err(|e| errno(&format!("join {name} namespace"), e))?;
    }
    drop(files);
    std::env::set_current_dir("/")?;
    crate::sandbox::confine(confinement)?;
    // One thread only: a process that joined a PID namespace cannot start threads (clone
    // refuses CLONE_THREAD then). Signals arrive through a signalfd in the relay's poll
    // loop: blocked here, before the command starts (the standard library clears the mask
    // in the child).
    let mut signals = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGCHLD] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| errno("block signals", e))?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| errno("signalfd", e))?;
    // An agent that dies takes its sessions with it. Set after the credentials changed
    // (entering the user namespace), which clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGHUP).map_err(|e| errno("set pdeathsig", e))?;
    // Opened after joining the mount namespace: the instance's /dev/ptmx and /dev/pts.
    let pty = match input {
        Input::Tty(size) => {
            let ws = nix::pty::Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            Some(
                nix::pty::openpty(Some(&ws), None)
                    .map_err(|e| errno("open a pseudo-terminal", e))?,
            )
        }
        _ => None,
    };
    let program = &cmd[0];
    let mut command = Command::new(program);
    command
        .args(&cmd[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    match &pty {
        Some(pty) => {
            command
                .stdin(Stdio::from(pty.slave.try_clone()?))
                .stdout(Stdio::from(pty.slave.try_clone()?))
                .stderr(Stdio::from(pty.slave.try_clone()?));
            vane_sys::pty::session_on_stdin_terminal(&mut command);
        }
        None => {
            command
                .stdin(if input == Input::Pipe {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .process_group(0);
        }
    }
    // Spawned after joining: the child is the one in the instance's PID namespace.
    let mut child = command.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => io::Error::new(
            io::ErrorKind::NotFound,
            format!("program not found: {program}"),
        ),
        _ => io::Error::new(e.kind(), format!("cannot start {program}: {e}")),
    })?;
    // It holds copies of the terminal's slave side.
    drop(command);
    let (sink, output) = match pty {
        Some(pty) => {
            // Only the command holds the terminal's slave side now: its end (and its
            // children's) ends the master's output.
            drop(pty.slave);
            let master = File::from(pty.master);
            (Some(master.try_clone()?), Some(master))
        }
        None => (
            child.stdin.take().map(|s| File::from(OwnedFd::from(s))),
            None,
        ),
    };
    let relay = Relay {
        terminal: matches!(input, Input::Tty(_)),
        source: input != Input::Null,
        sink,
        output,
        ..Relay::default()
    };
    let status = relay.run(&mut child, &sigfd)?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// The helper's one loop: the agent's frames (this process's stdin) into the command's
/// input, the terminal's output to this process's stdout, signals (the command's end, a
/// hang-up).
#[derive(Default)]
struct Relay {
    terminal: bool,
    /// Frames still come on stdin.
    source: bool,
    decoder: frame::Decoder,
    /// The command's input: its pipe, or the terminal's master side (non-blocking).
    sink: Option<File>,
    /// Input not yet taken by the command. No more is read while some waits.
    pending: Vec<u8>,
    /// The input ended: once `pending` is written, the pipe closes (a terminal gets its EOF
    /// character).
    ended: bool,
    /// The terminal's master side, read for what it shows.
    output: Option<File>,
}

impl Relay {
    fn run(mut self, child: &mut Child, sigfd: &SignalFd) -> io::Result<ExitStatus> {
        if let Some(sink) = &self.sink {
            nix::fcntl::fcntl(sink.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(|e| errno("make the input non-blocking", e))?;
        }
        let stdin = io::stdin();
        let mut exited: Option<(ExitStatus, Instant)> = None;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            if let Some((status, at)) = exited {
                // What the command wrote last may still be in the terminal; a child it left
                // behind that holds the terminal open does not keep this process.
                if self.output.is_none() || at.elapsed() >= DRAIN {
                    return Ok(status);
                }
            }
            let reading = self.source && self.pending.is_empty() && !self.ended;
            let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
            let input_at = reading.then(|| {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let sink_at = match &self.sink {
                Some(s) if !self.pending.is_empty() => {
                    fds.push(PollFd::new(s.as_fd(), PollFlags::POLLOUT));
                    Some(fds.len() - 1)
                }
                _ => None,
            };
            let output_at = self.output.as_ref().map(|o| {
                fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let timeout = match exited {
                Some(_) => PollTimeout::from(100u16),
                None => PollTimeout::NONE,
            };
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(errno("poll", e)),
            }
            let ready = |at: Option<usize>| {
                at.and_then(|i| fds[i].revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let (signalled, input_ready, sink_ready, output_ready) = (
                ready(Some(0)),
                ready(input_at),
                ready(sink_at),
                ready(output_at),
            );
            drop(fds);
            if signalled {
                while let Ok(Some(info)) = sigfd.read_signal() {
                    let signo = info.ssi_signo as i32;
                    if signo == Signal::SIGHUP as i32 || signo == Signal::SIGTERM as i32 {
                        hang_up(child);
                    }
                }
                if exited.is_none() {
                    if let Some(status) = child.try_wait()? {
                        exited = Some((status, Instant::now()));
                    }
                }
            }
            if input_ready {
                match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                    Ok(0) | Err(_) => self.ended = true,
                    Ok(n) => self.take_frames(&buf[..n]),
                }
            }
            if sink_ready || !self.pending.is_empty() {
                self.write_pending();
            }
            if self.ended && self.pending.is_empty() && self.sink.is_some() {
                if self.terminal {
                    // Best effort: a terminal that takes no more input has no use for it.
                    if let Some(s) = &mut self.sink {
                        let _ = s.write(&[EOF_CHAR]);
                    }
                }
                self.sink = None;
            }
            if output_ready {
                self.show(&mut buf)?;
            }
        }
    }

    /// Frames from the agent: stdin data to write, the end of the input, a new size.
    fn take_frames(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
        loop {
            match self.decoder.next_frame() {
                Ok(Some((frame::STDIN, data))) if data.is_empty() => self.ended = true,
                Ok(Some((frame::STDIN, data))) => {
                    if !self.ended {
                        self.pending.extend_from_slice(&data);
                    }
                }
                Ok(Some((frame::RESIZE, data))) if self.terminal => {
                    if let (Some(size), Some(sink)) = (frame::parse_resize(&data), &self.sink) {
                        let _ = vane_sys::pty::set_window_size(sink.as_fd(), size.rows, size.cols);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => {
                    self.ended = true;
                    return;
                }
            }
        }
    }

    /// Writes what the command's input takes now.
    fn write_pending(&mut self) {
        let Some(sink) = &mut self.sink else {
            self.pending.clear();
            return;
        };
        while !self.pending.is_empty() {
            match sink.write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The command closed its input: the rest goes nowhere.
                Err(_) => {
                    self.pending.clear();
                    self.sink = None;
                    self.ended = true;
                    return;
                }
            }
        }
    }

    /// Copies what the terminal shows to stdout; its end (EIO once every holder of the
    /// slave side closed it) ends the output.
    fn show(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let Some(master) = &mut self.output else {
            return Ok(());
        };
        match master.read(buf) {
            Ok(0) => self.output = None,
            Ok(n) => {
                let mut out = io::stdout().lock();
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.output = None,
        }
        Ok(())
    }
}

/// How long the terminal's last output may take after the command ended.
const DRAIN: Duration = Duration::from_secs(1);

/// The terminal's EOF character as the line discipline knows it by default (VEOF, Ctrl-D).
const EOF_CHAR: u8 = 0x04;

/// Ends the command's process group as a closed terminal would: SIGHUP, and SIGKILL for
/// what is left after [`HANGUP_GRACE`]; then this process.
fn hang_up(child: &mut Child) -> ! {
    // Its process group (and session) is its pid, as this process sees it.
    let group = Pid::from_raw(child.id() as i32);
    let _ = killpg(group, Signal::SIGHUP);
    let until = Instant::now() + HANGUP_GRACE;
    loop {
        // Reaped, so that a command that ended counts as gone.
        let _ = child.try_wait();
        // Signal 0: does any process of the group remain?
        if killpg(group, None).is_err() || Instant::now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.try_wait();
    std::process::exit(128 + Signal::SIGHUP as i32);
}
