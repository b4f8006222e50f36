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
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// What the kernel may hand over unfinished, as `TUNSETOFFLOAD` flags: with
/// [`Offloads::TCP4`], a program's TCP stream comes out of the device in segments of up to
/// 64 KiB whose checksum is left to whoever finally sends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads(libc::c_uint);

impl Offloads {
    /// Every packet complete: checksums filled in, no segment larger than the MTU.
    pub const NONE: Offloads = Offloads(0);
    /// Checksums may be left partial (`TUN_F_CSUM`), and TCP over IPv4 may come in large
    /// segments (`TUN_F_TSO4`, with ECN: `TUN_F_TSO_ECN`).
    pub const TCP4: Offloads = Offloads(0x01 | 0x02 | 0x08);
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating it if needed) the L3 TUN device `name` in the calling thread's network
/// namespace, non-blocking. Every packet read or written is preceded by a `virtio_net_hdr`
/// (10 bytes, see `vane_wire::vnet`) that carries segmentation and checksum offload state;
/// `offloads` says which of those the kernel may use on packets it hands over. With
/// `persist`, the device outlives the file descriptor, so that a restarted agent can attach
/// to it again.
pub fn open(name: &str, persist: bool, offloads: Offloads) -> io::Result<OwnedFd> {
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
        flags: IFF_TUN | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has the same size and
    // layout (16-byte name, flags, padding to 40 bytes) and lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETOFFLOAD takes an integer argument by value; no memory is shared.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, offloads.0 as libc::c_ulong) };
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
        use super::{open, Offloads};
        assert!(open("", false, Offloads::NONE).is_err());
        assert!(open("a-name-far-too-long", false, Offloads::NONE).is_err());
    }
}
