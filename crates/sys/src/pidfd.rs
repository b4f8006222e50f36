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
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
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
    }
}
