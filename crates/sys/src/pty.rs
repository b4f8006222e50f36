//! Terminal ioctls `nix` has no safe wrapper for: a terminal's window size, and a child that
//! starts as the leader of a session whose controlling terminal is its standard input (so
//! that the terminal's Ctrl-C and hang-up reach it).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The size of the terminal `fd`: (rows, columns).
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, which is valid for it; `fd` is
    // open for the call (borrowed).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((ws.ws_row, ws.ws_col))
}

/// Sets the size of the terminal `fd` (the kernel tells its foreground process group with
/// SIGWINCH).
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for it; `fd` is
    // open for the call (borrowed).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Arranges for `cmd`'s program to start in a new session whose controlling terminal is its
/// standard input (which must be a terminal's slave side).
pub fn session_on_stdin_terminal(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: setsid and ioctl are; it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::process::Stdio;

    #[test]
    fn the_child_leads_a_session_on_its_terminal_of_the_size_set() {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_window_size(pty.master.as_fd(), 31, 101).unwrap();
        assert_eq!(window_size(pty.slave.as_fd()).unwrap(), (31, 101));
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("stty size; cut -d' ' -f6 /proc/$$/stat; echo $$")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        session_on_stdin_terminal(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        drop(pty.slave);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(child.wait().unwrap().success());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "31 101", "{out}");
        // The session id (field 6 of stat) is the shell's own pid: it leads its session.
        assert_eq!(lines[1], lines[2], "{out}");
    }
}
