//! Starting a program with chosen descriptors at chosen numbers (CRIU's `--ps-socket`,
//! `--status-fd`, `--inherit-fd`), without leaving them open for anything else the process
//! starts meanwhile, or as root of a user namespace.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Arranges for `cmd`'s program to find each `(fd, number)`'s descriptor at `number`,
/// open across its exec. The descriptors may be close-on-exec here (they should be: then
/// no other child of this process inherits them); the child's copies are not. The numbers
/// should be above 2 and distinct.
pub fn with_fds(cmd: &mut Command, fds: &[(BorrowedFd<'_>, RawFd)]) {
    let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|(fd, n)| (fd.as_raw_fd(), *n)).collect();
    let mut staged: Vec<RawFd> = vec![-1; pairs.len()];
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: it calls fcntl and dup2, which are, on
    // descriptors that the borrowed fds keep open until `spawn` returns (the caller holds
    // them across it), and allocates nothing (`staged` is allocated here, before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may sit at another pair's number), close-on-exec,
            // then each at its number, where dup2 clears close-on-exec.
            for (i, &(from, _)) in pairs.iter().enumerate() {
                staged[i] = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, STAGE_FROM);
                if staged[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, &(_, to)) in pairs.iter().enumerate() {
                if libc::dup2(staged[i], to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Where the child's staging copies start: above any number a caller asks for.
const STAGE_FROM: RawFd = 256;

/// Makes `cmd` run as root of the user namespace `userns` (joined between fork and exec),
/// which must stay open until `spawn` returns.
pub fn as_root_of(cmd: &mut Command, userns: BorrowedFd<'_>) {
    let userns = userns.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and only makes system
    // calls (setns, setresgid, setgroups, setresuid), which are async-signal-safe, on a
    // descriptor the caller keeps open until `spawn` returns; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let ok = libc::setns(userns, libc::CLONE_NEWUSER) == 0
                && libc::setresgid(0, 0, 0) == 0
                && libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresuid(0, 0, 0) == 0;
            match ok {
                true => Ok(()),
                false => Err(io::Error::last_os_error()),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsFd, OwnedFd};
    use std::process::Stdio;

    #[test]
    fn the_child_finds_the_descriptor_at_its_number_and_nothing_else_inherits_it() {
        let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo hello >&7; ls /proc/self/fd")
            .stdout(Stdio::piped());
        with_fds(&mut cmd, &[(write.as_fd(), 7)]);
        let child = cmd.spawn().unwrap();
        drop(write);
        let mut got = String::new();
        std::fs::File::from(read).read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        // A plain child of this process does not get the pipe's end.
        let plain = Command::new("ls").arg("/proc/self/fd").output().unwrap();
        let fds = String::from_utf8_lossy(&plain.stdout).to_string();
        assert!(!fds.split_whitespace().any(|f| f == "7"), "{fds}");
    }
}
