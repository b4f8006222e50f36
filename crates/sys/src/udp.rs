//! UDP segmentation offloads (Linux >= 5.0): one `sendmsg` of many equal-sized datagrams
//! (`UDP_SEGMENT`), and one `recvmsg` of many datagrams of one sender that the kernel
//! coalesced on receipt (`UDP_GRO`). They cut the system calls of a bulk transfer between
//! switches by a factor of up to 64 in each direction.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most datagrams one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`): [`recv`] then reports the
/// size of the datagrams a buffer holds.
pub fn enable_gro(socket: &impl AsRawFd) -> io::Result<()> {
    crate::socket::set_int_option(socket, libc::SOL_UDP, UDP_GRO, 1)
}

/// A control-message buffer with the alignment `cmsghdr` needs, large enough for one
/// integer option.
#[repr(C, align(8))]
struct Control([u8; 32]);

fn sockaddr_v4(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Sends `buf` to `to` as datagrams of `segment` bytes each (the last may be shorter), in
/// one system call. `segment` 0, or not less than `buf.len()`, sends one datagram.
pub fn send(
    socket: &impl AsRawFd,
    buf: &[u8],
    segment: usize,
    to: SocketAddr,
) -> io::Result<usize> {
    let SocketAddr::V4(to) = to else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "IPv6 underlay"));
    };
    let mut name = sockaddr_v4(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = Control([0; 32]);
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if segment > 0 && segment < buf.len() {
        let value = u16::try_from(segment)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        msg.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        // SAFETY: msg_control points at `control`, 32 bytes aligned for cmsghdr, which holds
        // CMSG_SPACE(2) (24) bytes; CMSG_FIRSTHDR is therefore non-null and CMSG_DATA points
        // inside it with room for the u16 written unaligned.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), value);
        }
    }
    // SAFETY: every pointer in `msg` (name, iovec over `buf`, control) refers to memory that
    // lives across the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What [`recv`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The sender.
    pub from: SocketAddr,
    /// Size of each datagram in the buffer (the last may be shorter): `len` when the
    /// kernel did not coalesce.
    pub segment: usize,
}

impl Received {
    /// Nothing received: what a slot holds before [`recv_many`] fills it.
    pub const NONE: Received = Received {
        len: 0,
        from: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
        segment: 0,
    };
}

/// Receives one datagram, or several of one sender coalesced by `UDP_GRO`, into `buf`,
/// waiting for one if the socket is blocking.
pub fn recv(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    recv_with(socket, buf, 0)
}

/// Like [`recv`], but never waits (`MSG_DONTWAIT`), even on a blocking socket: fails with
/// `WouldBlock` when nothing is there.
pub fn recv_nonblocking(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Received> {
    recv_with(socket, buf, libc::MSG_DONTWAIT)
}

fn recv_with(socket: &impl AsRawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    // SAFETY: an all-zero sockaddr_in is a valid (unspecified) address.
    let mut name: libc::sockaddr_in = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control([0; 32]);
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    // SAFETY: every pointer in `msg` refers to memory that lives across the call and is as
    // large as its length says; the kernel writes at most that much.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = n as usize;
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen` with well-formed
    // control messages; CMSG_FIRSTHDR/NXTHDR walk only inside it, and a UDP_GRO message
    // carries an int, read unaligned.
    let segment = unsafe { gro_segment(&msg) }.unwrap_or(len);
    let from = SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
        u16::from_be(name.sin_port),
    ));
    Ok(Received { len, from, segment })
}

/// Most receptions [`recv_many`] takes in one call.
pub const RECV_SLOTS: usize = 8;

/// Receives up to [`RECV_SLOTS`] receptions without waiting (`recvmmsg`, `MSG_DONTWAIT`):
/// each a datagram or a run of one sender's datagrams coalesced by `UDP_GRO`, the `i`-th
/// into `buf[i * slot..(i + 1) * slot]`. Returns how many, 0 when nothing waits. A flood of
/// small datagrams (which `UDP_GRO` does not coalesce: forged handshakes, say) then costs a
/// system call per eight, not per datagram.
pub fn recv_many(
    socket: &impl AsRawFd,
    buf: &mut [u8],
    slot: usize,
    out: &mut [Received; RECV_SLOTS],
) -> io::Result<usize> {
    let slots = (buf.len() / slot.max(1)).min(RECV_SLOTS);
    if slots == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "buffer smaller than a slot",
        ));
    }
    // SAFETY: an all-zero sockaddr_in is a valid (unspecified) address.
    let mut names: [libc::sockaddr_in; RECV_SLOTS] = unsafe { zeroed() };
    let mut controls: [Control; RECV_SLOTS] = std::array::from_fn(|_| Control([0; 32]));
    let base = buf.as_mut_ptr();
    let mut iovs: [libc::iovec; RECV_SLOTS] = std::array::from_fn(|i| libc::iovec {
        // Slots past `slots` are never handed to the kernel.
        iov_base: if i < slots {
            // SAFETY: `i * slot + slot <= buf.len()` for `i < slots`.
            unsafe { base.add(i * slot) }.cast()
        } else {
            std::ptr::null_mut()
        },
        iov_len: if i < slots { slot } else { 0 },
    });
    // SAFETY: an all-zero mmsghdr is a valid empty message.
    let mut msgs: [libc::mmsghdr; RECV_SLOTS] = unsafe { zeroed() };
    for i in 0..slots {
        let msg = &mut msgs[i].msg_hdr;
        msg.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iovs[i];
        msg.msg_iovlen = 1;
        msg.msg_control = controls[i].0.as_mut_ptr().cast();
        msg.msg_controllen = controls[i].0.len();
    }
    // SAFETY: the first `slots` entries of `msgs` point at names, iovecs (disjoint pieces
    // of `buf`, each `slot` long and inside it) and control buffers that live across the
    // call; the kernel writes at most their lengths.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            slots as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ => Err(e),
        };
    }
    let n = n as usize;
    for i in 0..n {
        let len = msgs[i].msg_len as usize;
        out[i] = Received {
            len,
            // SAFETY: as in `recv_with`, for the control messages the kernel wrote.
            segment: unsafe { gro_segment(&msgs[i].msg_hdr) }.unwrap_or(len),
            from: SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(names[i].sin_addr.s_addr)),
                u16::from_be(names[i].sin_port),
            )),
        };
    }
    Ok(n)
}

/// The datagram size a `UDP_GRO` control message of `msg` gives, if any.
///
/// # Safety
/// `msg`'s control buffer holds well-formed control messages up to `msg_controllen`.
unsafe fn gro_segment(msg: &libc::msghdr) -> Option<usize> {
    let mut cmsg = libc::CMSG_FIRSTHDR(msg);
    while !cmsg.is_null() {
        if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
            let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
            if size > 0 {
                return Some(size as usize);
            }
        }
        cmsg = libc::CMSG_NXTHDR(msg, cmsg);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    /// Over loopback, a segmented send arrives as separate datagrams (or coalesced ones
    /// that split back into the same), in order.
    #[test]
    fn segmented_send_arrives_as_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let gro = enable_gro(&rx).is_ok();
        let mut buf = Vec::new();
        for i in 0..10u8 {
            buf.extend(std::iter::repeat_n(i, if i == 9 { 50 } else { 100 }));
        }
        assert_eq!(
            send(&tx, &buf, 100, rx.local_addr().unwrap()).unwrap(),
            buf.len()
        );
        let mut got = Vec::new();
        let mut space = [0u8; 4096];
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        while got.len() < 10 {
            let r = recv(&rx, &mut space).unwrap();
            assert_eq!(r.from, tx.local_addr().unwrap());
            got.extend(space[..r.len].chunks(r.segment).map(<[u8]>::to_vec));
        }
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.len(), if i == 9 { 50 } else { 100 }, "gro {gro}");
            assert!(d.iter().all(|&b| b == i as u8));
        }
    }

    /// Datagrams of several senders come in one call, each in its own slot with its
    /// sender; an empty socket gives 0 at once.
    #[test]
    fn many_receptions_in_one_call() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let senders: Vec<UdpSocket> = (0..5)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let slot = 256;
        let mut buf = vec![0u8; slot * RECV_SLOTS];
        let mut out = [Received::NONE; RECV_SLOTS];
        assert_eq!(recv_many(&rx, &mut buf, slot, &mut out).unwrap(), 0);
        for (i, s) in senders.iter().enumerate() {
            s.send_to(&vec![i as u8; 10 + i], rx.local_addr().unwrap())
                .unwrap();
        }
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while seen.len() < 5 && std::time::Instant::now() < deadline {
            let n = recv_many(&rx, &mut buf, slot, &mut out).unwrap();
            for (k, r) in out[..n].iter().enumerate() {
                let data = &buf[k * slot..k * slot + r.len];
                let i = data[0] as usize;
                assert_eq!(r.len, 10 + i);
                assert_eq!(r.segment, r.len);
                assert_eq!(r.from, senders[i].local_addr().unwrap());
                assert!(data.iter().all(|&b| b == i as u8));
                seen.push(i);
            }
        }
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }
}
