//! Process file descriptors: a way to learn that a process which is not our child has
//! exited (instances outlive the agent that started them, so after an agent restart the
//! instance's init is no longer the agent's child).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// `pidfd_open(2)`: a file descriptor that becomes readable when process `pid` exits.
pub fn open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat). Together
/// with the pid it names a process uniquely, so that a reused pid is not mistaken for an
/// instance that has exited.
pub fn start_time(pid: u32) -> io::Result<u64> {
    stat_field(pid, 19)?
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat"))
}

/// Whether process `pid` exists and has not exited (a zombie has exited: it only waits for
/// its parent to collect its status).
pub fn is_running(pid: u32) -> bool {
    stat_field(pid, 0).is_ok_and(|state| state != "Z")
}

/// Field `n` of /proc/PID/stat counted from the state (field 3), so 0 is the state.
fn stat_field(pid: u32, n: usize) -> io::Result<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(n))
        .map(str::to_string)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_start_time() {
        let me = std::process::id();
        let a = super::start_time(me).unwrap();
        assert_eq!(a, super::start_time(me).unwrap());
        assert!(super::open(me).is_ok());
        assert!(super::is_running(me));
        assert!(!super::is_running(u32::MAX));
    }
}
