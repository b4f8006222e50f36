//! The streamed requests: `exec` (a command in an instance, its output, and what the
//! client sends it, over a transfer connection) and `logs` (an instance's output log, its
//! last lines, followed); and `vane __exec`'s entry.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use vane_proto::api::{frame, TtySize};
use vane_proto::stream::{AgentError, AgentReply};

use crate::{instance, launch, Agent};

/// Frames of one exec or logs stream waiting for the transfer connection.
const STREAM_DEPTH: usize = 8;

/// The arguments of `vane __exec`, passed as one JSON argument.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ExecArgs {
    pub init_pid: u32,
    pub cgroups: Vec<std::path::PathBuf>,
    pub confinement: crate::sandbox::Confinement,
    pub env: Vec<(String, String)>,
    pub cmd: Vec<String>,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub tty: Option<TtySize>,
}

/// How long, after the hang-up, the helper has to end the command's process group and
/// itself before it is killed.
const HANGUP_WAIT: Duration = Duration::from_secs(5);

/// Runs `cmd` in instance `id` through `vane __exec`, its output (and what the client sends
/// it) over transfer `ticket`. A client that goes away before the command ends hangs it up
/// (`launch::exec`: SIGHUP, then SIGKILL, to its process group).
pub async fn exec(
    agent: Arc<Agent>,
    id: &str,
    ticket: String,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    stdin: bool,
    tty: Option<TtySize>,
) -> Result<AgentReply, AgentError> {
    let args = agent.running(id, |local| ExecArgs {
        init_pid: local.record.init_pid,
        cgroups: local.record.cgroups.clone(),
        confinement: local.record.confinement(),
        env: launch::instance_env(
            &local.record.spec.hostname,
            local.record.spec.env.iter().chain(&env),
        ),
        cmd,
        stdin,
        tty,
    })?;
    let interactive = stdin || tty.is_some();
    let mut child = tokio::process::Command::new(&agent.cfg.exe)
        .arg("__exec")
        .arg(serde_json::to_string(&args).expect("serializes"))
        .stdin(if interactive {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start exec helper: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let helper_in = child.stdin.take();
    let (tx, rx) = mpsc::channel(STREAM_DEPTH);
    let (in_tx, in_rx) = mpsc::channel(STREAM_DEPTH);
    tokio::spawn(async move {
        let helper = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        // The client's frames go to the helper as they came, checked one by one; their end
        // (the connection's) closes the helper's input.
        tokio::spawn(feed(in_rx, helper_in));
        let gone = {
            let child = &mut child;
            let output = async move {
                tokio::join!(
                    pump(&tx, frame::STDOUT, stdout),
                    pump(&tx, frame::STDERR, stderr)
                );
                let code = match child.wait().await {
                    Ok(s) => s.code().unwrap_or(128),
                    Err(_) => 128,
                };
                let _ = tx
                    .send(frame::encoded(frame::EXIT, &code.to_be_bytes()))
                    .await;
            };
            let transfer = crate::transfer::duplex(&agent, &ticket, rx, in_tx);
            tokio::pin!(transfer, output);
            let sent = tokio::select! {
                sent = &mut transfer => sent.and(Err(AgentError::from("the client went away"))),
                () = &mut output => transfer.await,
            };
            match sent {
                Ok(()) => false,
                Err(e) => {
                    tracing::debug!("exec: {e}");
                    true
                }
            }
        };
        if gone {
            // As a closed terminal would: the helper hangs the command's process group up;
            // one that does not end by itself is killed (`kill_on_drop`).
            if let Some(pid) = helper {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
            }
            let _ = tokio::time::timeout(HANGUP_WAIT, child.wait()).await;
        }
    });
    Ok(AgentReply::Done)
}

/// Writes the client's stdin and resize frames (one a message) into the helper's input;
/// anything else is dropped.
async fn feed(mut frames: mpsc::Receiver<Vec<u8>>, helper: Option<tokio::process::ChildStdin>) {
    let Some(mut helper) = helper else {
        while frames.recv().await.is_some() {}
        return;
    };
    while let Some(msg) = frames.recv().await {
        if matches!(
            frame::parse_one(&msg),
            Some((frame::STDIN | frame::RESIZE, _))
        ) && helper.write_all(&msg).await.is_err()
        {
            // The helper stopped reading (its command ended): the rest goes nowhere.
            while frames.recv().await.is_some() {}
            return;
        }
    }
}

/// Runs `output` (which puts frames into the sender of `rx`) while the frames go out as
/// transfer `ticket`; `output` ends early, dropped, if the transfer does.
async fn stream_out(
    agent: &Agent,
    ticket: &str,
    rx: mpsc::Receiver<Vec<u8>>,
    output: impl std::future::Future<Output = ()>,
    what: &str,
) {
    let send = crate::transfer::send_frames(agent, ticket, rx);
    tokio::pin!(send, output);
    let sent = tokio::select! {
        sent = &mut send => sent,
        () = &mut output => send.await,
    };
    if let Err(e) = sent {
        tracing::debug!("{what}: {e}");
    }
}

/// Frames of `kind` from `r` into `tx`, until either ends.
async fn pump(tx: &mpsc::Sender<Vec<u8>>, kind: u8, mut r: impl tokio::io::AsyncRead + Unpin) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(frame::encoded(kind, &buf[..n])).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// How often a followed log is looked at for more.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// How long a followed log may say nothing before an empty frame goes out: writing is how
/// a reader that left is noticed, so that its follow ends.
const FOLLOW_HEARTBEAT: Duration = Duration::from_secs(5);

/// The program's output log (its last `tail` lines), then, with `follow`, what it writes
/// until the instance leaves this host or the reader goes.
pub async fn logs(
    agent: Arc<Agent>,
    id: &str,
    ticket: String,
    follow: bool,
    tail: Option<u64>,
) -> Result<AgentReply, AgentError> {
    let dir = {
        agent
            .state()
            .instances
            .get(id)
            .map(|l| l.dir.clone())
            .ok_or_else(|| AgentError::not_found(format!("instance {id} is not on this host")))?
    };
    // The log lies in the instance's shared directory: opened without following links;
    // its rotated part first.
    let old = instance::open_shared(&dir, instance::OLD_LOG_FILE).ok();
    let current = instance::open_shared(&dir, launch::LOG_FILE).ok();
    let lines = tail.unwrap_or(u64::MAX);
    let (mut current_from, found) = match &current {
        Some(f) => tail_start(f, lines).map_err(|e| format!("reading the log: {e}"))?,
        None => (0, 0),
    };
    let old_from = match &old {
        Some(f) if found < lines => Some(
            tail_start(f, lines - found)
                .map_err(|e| format!("reading the log: {e}"))?
                .0,
        ),
        _ => None,
    };
    let id = id.to_string();
    let (tx, rx) = mpsc::channel(STREAM_DEPTH);
    tokio::spawn(async move {
        let output = async {
            if let (Some(f), Some(from)) = (old, old_from) {
                let _ = copy_from(&tx, f, from, u64::MAX).await;
            }
            if let Some(f) = current {
                let mut f = tokio::fs::File::from_std(f);
                let end = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                current_from = copy_to(&tx, &mut f, current_from, end).await;
                if follow {
                    follow_log(&agent, &id, &tx, &mut f, current_from).await;
                }
            }
            let _ = tx
                .send(frame::encoded(frame::EXIT, &0i32.to_be_bytes()))
                .await;
        };
        stream_out(&agent, &ticket, rx, output, "logs").await;
    });
    Ok(AgentReply::Done)
}

/// Sends what the log gains after `from`, until the instance leaves this host or the
/// frames have nowhere to go. The log is cut to nothing when it rotates (the program writes
/// on at its start): a log shorter than what was sent is read again from its start.
async fn follow_log(
    agent: &Agent,
    id: &str,
    tx: &mpsc::Sender<Vec<u8>>,
    log: &mut tokio::fs::File,
    mut from: u64,
) {
    let mut said = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        if !agent.state().instances.contains_key(id) {
            return;
        }
        let Ok(meta) = log.metadata().await else {
            return;
        };
        if meta.len() < from {
            from = 0;
        }
        if meta.len() > from {
            from = copy_to(tx, log, from, meta.len()).await;
            said = tokio::time::Instant::now();
        } else if said.elapsed() >= FOLLOW_HEARTBEAT {
            if tx.send(frame::encoded(frame::STDOUT, b"")).await.is_err() {
                return;
            }
            said = tokio::time::Instant::now();
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Sends `f` from `from` to `end` as stdout frames; returns where it stopped.
async fn copy_to(tx: &mpsc::Sender<Vec<u8>>, f: &mut tokio::fs::File, from: u64, end: u64) -> u64 {
    use tokio::io::AsyncSeekExt;
    if f.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return from;
    }
    let mut at = from;
    let mut buf = vec![0u8; 32 * 1024];
    while at < end {
        let want = buf.len().min((end - at) as usize);
        match f.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send(frame::encoded(frame::STDOUT, &buf[..n]))
                    .await
                    .is_err()
                {
                    break;
                }
                at += n as u64;
            }
        }
    }
    at
}

/// Sends the std file `f` from `from` up to `end` (or its end).
async fn copy_from(tx: &mpsc::Sender<Vec<u8>>, f: std::fs::File, from: u64, end: u64) -> u64 {
    let mut f = tokio::fs::File::from_std(f);
    let end = match f.metadata().await {
        Ok(m) => m.len().min(end),
        Err(_) => return from,
    };
    copy_to(tx, &mut f, from, end).await
}

/// Where the last `lines` lines of `f` start, and how many lines that is (fewer when the
/// file has fewer). A final newline ends the last line rather than starting another.
fn tail_start(
    mut f: impl std::io::Read + std::io::Seek,
    lines: u64,
) -> std::io::Result<(u64, u64)> {
    use std::io::SeekFrom;
    let len = f.seek(SeekFrom::End(0))?;
    if lines == 0 || len == 0 {
        return Ok((len, 0));
    }
    if lines == u64::MAX {
        // All of it, and all of the older part: the count does not matter.
        return Ok((0, 0));
    }
    let mut end = len;
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        end -= 1;
    }
    let mut found = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = end;
    while at > 0 {
        let n = buf.len().min(at as usize);
        at -= n as u64;
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            if buf[i] == b'\n' {
                found += 1;
                if found == lines {
                    return Ok((at + i as u64 + 1, lines));
                }
            }
        }
    }
    // The whole file: its newlines, and the first line before them.
    Ok((0, found + 1))
}

/// `vane __exec JSON`.
pub fn exec_helper_main(json: &str) -> i32 {
    match serde_json::from_str::<ExecArgs>(json) {
        Ok(a) => {
            let input = match (a.tty, a.stdin) {
                (Some(size), _) => launch::ExecInput::Tty(size),
                (None, true) => launch::ExecInput::Pipe,
                (None, false) => launch::ExecInput::Null,
            };
            launch::exec_main(
                a.init_pid,
                &a.cgroups,
                &a.confinement,
                &a.env,
                &a.cmd,
                input,
            )
        }
        Err(e) => {
            eprintln!("vane: exec: bad arguments: {e}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tail_start;
    use std::io::Cursor;

    #[test]
    fn tail_starts_at_the_last_lines() {
        let log = b"one\ntwo\nthree\n";
        let at = |lines| tail_start(Cursor::new(&log[..]), lines).unwrap();
        assert_eq!(at(1), (8, 1));
        assert_eq!(at(2), (4, 2));
        assert_eq!(at(3), (0, 3));
        // Fewer lines than asked: all of them, counted.
        assert_eq!(at(5), (0, 3));
        assert_eq!(at(0), (14, 0));
        // A last line without its newline is a line.
        let open = b"one\ntwo";
        assert_eq!(tail_start(Cursor::new(&open[..]), 1).unwrap(), (4, 1));
        assert_eq!(tail_start(Cursor::new(&b""[..]), 3).unwrap(), (0, 0));
        // Longer than one read.
        let long: Vec<u8> = (0..100_000)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let (from, n) = tail_start(Cursor::new(&long[..]), 2).unwrap();
        assert_eq!((&long[from as usize..], n), (&b"99998\n99999\n"[..], 2));
    }
}
