//! `vane exec`: a command inside an instance, over the exec WebSocket (docs/api.md): the
//! `ExecSpec` first, then frames both ways, one a message: the command's output and exit
//! code from the controller; the client's input and its terminal's size to it. Leaving
//! early (Ctrl-C without a terminal, a killed client) closes the socket, and the agent
//! hangs the command up.

use std::io::{Read, Write};
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use nix::sys::termios;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use vane_proto::api::{frame, ExecSpec, TtySize};

use super::path_segment;
use crate::client::Client;

/// What `vane exec` was asked for besides the command.
pub struct ExecArgs {
    /// `-e KEY=VALUE`.
    pub env: Vec<String>,
    /// `-i`: send standard input.
    pub interactive: bool,
    /// `-t`: a terminal for the command.
    pub tty: bool,
}

/// The size a terminal is taken to have when the client's is not one.
const DEFAULT_SIZE: TtySize = TtySize { rows: 24, cols: 80 };

pub fn exec(c: &Client, name: &str, cmd: Vec<String>, args: ExecArgs) -> Result<i32> {
    let path = format!("/v1/instances/{}/exec", path_segment(name)?);
    let stdin_is_terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
    // A terminal's keys are input even without -i: that is what -t alone means when the
    // client types.
    let send_input = args.interactive || (args.tty && stdin_is_terminal);
    let mut env = args
        .env
        .iter()
        .map(|e| vane_proto::validate::env_pair(e))
        .collect::<Result<Vec<_>, _>>()?;
    if args.tty && !env.iter().any(|(k, _)| k == "TERM") {
        // Programs on the terminal draw for the client's terminal.
        if let Ok(term) = std::env::var("TERM") {
            env.push(("TERM".into(), term));
        }
    }
    let spec = ExecSpec {
        cmd,
        env,
        stdin: send_input,
        tty: args.tty.then(|| terminal_size().unwrap_or(DEFAULT_SIZE)),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    // Keys go to the command as typed (Ctrl-C too, which interrupts it there); the
    // client's terminal is restored when `raw` drops, error or not.
    let raw = if args.tty && stdin_is_terminal {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let result = rt.block_on(session(c, &path, spec, send_input));
    drop(raw);
    // The thread reading stdin may be blocked in a read that never returns.
    rt.shutdown_background();
    result
}

async fn session(c: &Client, path: &str, spec: ExecSpec, send_input: bool) -> Result<i32> {
    let ws = c.websocket(path).await?;
    let (mut sink, mut stream) = ws.split();
    let tty = spec.tty.is_some();
    sink.send(Message::Text(serde_json::to_string(&spec)?.into()))
        .await
        .context("sending the command to the controller")?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    if send_input {
        let tx = tx.clone();
        std::thread::spawn(move || read_input(&tx));
    }
    if tty {
        let tx = tx.clone();
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                .context("watch the terminal's size")?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(size) = terminal_size() {
                    let msg = frame::encoded(frame::RESIZE, &frame::resize(size));
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let send = async {
        while let Some(msg) = rx.recv().await {
            if sink.send(Message::Binary(msg.into())).await.is_err() {
                break;
            }
        }
        // No more input is not leaving: the socket stays open until the exit frame.
        std::future::pending::<()>().await;
    };
    let receive = async {
        let mut out = std::io::stdout().lock();
        let mut err = std::io::stderr().lock();
        while let Some(msg) = stream.next().await {
            let Message::Binary(msg) = msg.context("reading from the controller")? else {
                continue;
            };
            let (kind, data) =
                frame::parse_one(&msg).context("malformed frame from the controller")?;
            match kind {
                frame::STDOUT => {
                    out.write_all(data)?;
                    out.flush()?;
                }
                frame::STDERR => {
                    err.write_all(data)?;
                    err.flush()?;
                }
                frame::EXIT => {
                    let code: [u8; 4] = data.try_into().context("malformed exit frame")?;
                    return Ok(i32::from_be_bytes(code));
                }
                frame::ERROR => bail!("{}", String::from_utf8_lossy(data)),
                _ => {}
            }
        }
        bail!("the connection to the instance's host was lost")
    };
    tokio::select! {
        () = send => unreachable!("pending forever"),
        code = receive => code,
    }
}

/// Sends what comes on standard input as stdin frames, then the empty frame that ends it.
fn read_input(tx: &mpsc::Sender<Vec<u8>>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .blocking_send(frame::encoded(frame::STDIN, &buf[..n]))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = tx.blocking_send(frame::encoded(frame::STDIN, b""));
}

/// The client's terminal size: its stdin's, else its stdout's.
fn terminal_size() -> Option<TtySize> {
    let size = vane_sys::pty::window_size(std::io::stdin().as_fd())
        .or_else(|_| vane_sys::pty::window_size(std::io::stdout().as_fd()))
        .ok()?;
    (size.0 > 0 && size.1 > 0).then_some(TtySize {
        rows: size.0,
        cols: size.1,
    })
}

/// The client's terminal in raw mode (no echo, no line editing, no signals from keys) for
/// as long as this lives.
struct RawMode {
    saved: termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("read the terminal's settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw)
            .context("put the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Output still queued goes out first, in the command's settings.
        let _ = termios::tcsetattr(
            std::io::stdin().as_fd(),
            termios::SetArg::TCSADRAIN,
            &self.saved,
        );
    }
}
