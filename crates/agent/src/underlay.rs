//! The switch's socket on the underlay: datagrams to other hosts' switches go out in
//! batches of equal-sized datagrams, one `sendmsg` each (UDP GSO), and come in coalesced by
//! the kernel (UDP GRO). A bulk TCP stream between two hosts costs one system call per up to
//! 64 datagrams each way instead of one per datagram.
//!
//! The socket blocks on send and not on receive: when the underlay is slower than the
//! instances, a full send buffer holds the switch thread back, which leaves packets in the
//! instances' device queues and slows their senders, rather than dropping what was already
//! encrypted.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::slice::ChunksMut;

use vane_sys::udp;

/// Largest batch: what one UDP GSO send may carry, short of the 64 KiB IP limit.
const BATCH_BYTES: usize = 60 * 1024;
/// Largest datagram the switch sends or receives.
pub const MAX_DATAGRAM: usize = 65535;
/// How long a bind waits for an address in use to be released.
const BIND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
/// Socket buffers: room for bursts while the thread is busy.
const SOCKET_BUFFER: usize = 4 << 20;

/// Binds a UDP socket of the switch's thread at `listen`, with large buffers. An address
/// in use is tried again for a few seconds: an agent restarted at once finds its
/// predecessor's socket still bound while the last threads of that process exit.
pub fn bind_patiently(listen: SocketAddr) -> io::Result<UdpSocket> {
    let deadline = std::time::Instant::now() + BIND_PATIENCE;
    let socket = loop {
        match UdpSocket::bind(listen) {
            Ok(socket) => break socket,
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("listen on {listen}: {e}"))),
        }
    };
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // Best effort: a small buffer only costs drops under bursts.
        let _ = vane_sys::socket::set_int_option(&socket, libc::SOL_SOCKET, opt, SOCKET_BUFFER);
    }
    Ok(socket)
}

/// The slots [`Underlay::recv`] fills in.
pub type Receptions = [udp::Received; udp::RECV_SLOTS];

/// Empty slots for [`Underlay::recv`].
pub fn receptions() -> Receptions {
    [udp::Received::NONE; udp::RECV_SLOTS]
}

/// The datagrams of reception `i` of an [`Underlay::recv`] into `buf`: its run, cut at the
/// size its sender's datagrams had.
pub fn datagrams_of<'b>(buf: &'b mut [u8], i: usize, r: &udp::Received) -> ChunksMut<'b, u8> {
    buf[i * MAX_DATAGRAM..][..r.len].chunks_mut(r.segment.max(1))
}

/// Counters of the underlay socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnderlayCounters {
    /// Sends that failed (the datagrams were lost, as on a full link).
    pub send_errors: u64,
    /// System calls that sent datagrams, and datagrams they sent.
    pub sends: u64,
    pub datagrams_sent: u64,
    /// System calls that received datagrams, and datagrams they received.
    pub receives: u64,
    pub datagrams_received: u64,
}

pub struct Underlay {
    socket: UdpSocket,
    /// Datagrams not yet sent: `batch[..len]`, `count` of them, all `segment` bytes long
    /// but the last, which may be shorter (and then closes the batch).
    batch: Vec<u8>,
    len: usize,
    count: usize,
    segment: usize,
    closed: bool,
    to: Option<SocketAddr>,
    /// Whether the kernel takes segmented sends (it did so far).
    gso: bool,
    /// Datagrams longer than this (which the underlay fragments) go alone: a segmented
    /// send refuses segments larger than the path MTU.
    largest_segment: usize,
    /// Whether the last receptions were coalesced runs (bulk traffic): then one run per
    /// call, into the same hot buffer; otherwise (small datagrams of many senders, a
    /// flood of forged handshakes) up to [`udp::RECV_SLOTS`] per call. Eight 64 KiB runs
    /// per call carried about half the TCP rate of one (cache misses on a 512 KiB buffer).
    bulk: bool,
    pub counters: UnderlayCounters,
}

impl Underlay {
    /// Binds the switch's socket (`bind_patiently`).
    pub fn bind(listen: SocketAddr, largest_segment: usize) -> io::Result<Underlay> {
        let socket = bind_patiently(listen)?;
        // Without GRO every datagram is read by itself: slower, not wrong.
        let _ = udp::enable_gro(&socket);
        Ok(Underlay {
            socket,
            batch: vec![0; BATCH_BYTES + MAX_DATAGRAM],
            bulk: false,
            len: 0,
            count: 0,
            segment: 0,
            closed: false,
            to: None,
            gso: true,
            largest_segment,
            counters: UnderlayCounters::default(),
        })
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }

    #[cfg(test)]
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Room for the next datagram to `to`, of at most `max` bytes. Sends the batch first
    /// when the datagram cannot join it. Follow with [`Underlay::commit`] to queue it, or
    /// with nothing to drop it.
    pub fn slot(&mut self, to: SocketAddr, max: usize) -> &mut [u8] {
        let max = max.min(MAX_DATAGRAM);
        if self.count > 0
            && (self.to != Some(to)
                || self.closed
                || self.count >= udp::MAX_SEGMENTS
                || self.len + max > BATCH_BYTES)
        {
            self.flush();
        }
        self.to = Some(to);
        &mut self.batch[self.len..self.len + max]
    }

    /// Queues the `n` bytes written at the start of the last [`Underlay::slot`].
    pub fn commit(&mut self, n: usize) {
        if n > self.largest_segment {
            // Too large to be a segment: the batch before it goes, then it alone.
            let start = self.len;
            let to = self.to;
            self.flush();
            if let Some(to) = to {
                send_one(
                    &self.socket,
                    &mut self.counters,
                    &self.batch[start..start + n],
                    to,
                );
            }
            return;
        }
        if self.count > 0 && n > self.segment {
            // Longer than those before it: they go now, and it starts the next batch.
            let start = self.len;
            self.flush();
            self.batch.copy_within(start..start + n, 0);
        }
        if self.count == 0 {
            self.segment = n;
        } else if n < self.segment {
            self.closed = true;
        }
        self.len += n;
        self.count += 1;
    }

    /// Sends what is queued.
    pub fn flush(&mut self) {
        let Some(to) = self.to else { return };
        if self.count == 0 {
            return;
        }
        let (len, count, segment) = (self.len, self.count, self.segment);
        (self.len, self.count, self.closed) = (0, 0, false);
        if self.gso && count > 1 {
            match udp::send(&self.socket, &self.batch[..len], segment, to) {
                Ok(_) => {
                    self.counters.sends += 1;
                    self.counters.datagrams_sent += count as u64;
                    return;
                }
                // A kernel or device without UDP GSO: send them one by one from now on.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EIO)) => {
                    tracing::info!(
                        "UDP segmentation offload unavailable ({e}), sending datagrams one by one"
                    );
                    self.gso = false;
                }
                Err(e) => {
                    self.counters.send_errors += 1;
                    tracing::trace!("send to {to}: {e}");
                    return;
                }
            }
        }
        for datagram in self.batch[..len].chunks(segment) {
            send_one(&self.socket, &mut self.counters, datagram, to);
        }
    }

    /// Sends one datagram at once, outside the batch (handshake messages).
    pub fn send_now(&mut self, datagram: &[u8], to: SocketAddr) {
        send_one(&self.socket, &mut self.counters, datagram, to);
    }

    /// Receives without blocking, up to [`udp::RECV_SLOTS`] receptions in one call, the
    /// `i`-th into `buf[i * MAX_DATAGRAM..]`; 0 when nothing waits.
    pub fn recv(&mut self, buf: &mut [u8], out: &mut Receptions) -> usize {
        let slots = if self.bulk { 1 } else { udp::RECV_SLOTS };
        let len = (slots * MAX_DATAGRAM).min(buf.len());
        let buf = &mut buf[..len];
        loop {
            match udp::recv_many(&self.socket, buf, MAX_DATAGRAM, out) {
                Ok(n) => {
                    if n > 0 {
                        self.counters.receives += 1;
                        self.bulk = out[..n].iter().any(|r| r.len > r.segment);
                    }
                    for r in &out[..n] {
                        self.counters.datagrams_received += r.len.div_ceil(r.segment.max(1)) as u64;
                    }
                    return n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("read from the underlay: {e}");
                    return 0;
                }
            }
        }
    }
}

fn send_one(socket: &UdpSocket, counters: &mut UnderlayCounters, datagram: &[u8], to: SocketAddr) {
    match socket.send_to(datagram, to) {
        Ok(_) => {
            counters.sends += 1;
            counters.datagrams_sent += 1;
        }
        // A full link drops the datagram; the tunnel and the programs' own protocols
        // recover.
        Err(e) => {
            counters.send_errors += 1;
            tracing::trace!("send to {to}: {e}");
        }
    }
}
