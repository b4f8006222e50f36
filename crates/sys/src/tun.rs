//! TUN devices.
//!
//! A TUN device is created in the network namespace of the process that opens
//! `/dev/net/tun` (the namespace is taken from the opening socket), so callers that want a
//! device inside an instance's namespace open it from a thread that has joined it
//! (see `netns::in_netns`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it if needed) the L3 TUN device `name` in the calling thread's network
/// namespace, without packet information header, non-blocking. With `persist`, the device
/// outlives the file descriptor, so that a restarted agent can attach to it again.
pub fn open(name: &str, persist: bool) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid TUN device name {name:?}"),
        ));
    }
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has the same size and
    // layout (16-byte name, flags, padding to 40 bytes) and lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if persist {
        // SAFETY: TUNSETPERSIST takes an integer argument by value; no memory is shared.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rejects_bad_names() {
        assert!(super::open("", false).is_err());
        assert!(super::open("a-name-far-too-long", false).is_err());
    }
}
