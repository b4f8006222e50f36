//! Images straight from one agent to another, for migrations: the controller out of the
//! data's way, one stream instead of two.
//!
//! The destination's agent listens on TCP at its switch's address and port (the UDP
//! locator's number, so no new port to configure). The source connects and runs a Noise IK
//! handshake (snow, in the cipher the source's CPU is fastest at, as the tunnels pick it)
//! with the hosts' own static keys, the ones their tunnels use: the source
//! knows the destination's key from the controller, and proves its own inside the
//! handshake; its first message carries the transfer's ticket, encrypted. The destination
//! accepts the connection only for a ticket it was told to expect, from exactly the host it
//! was told to expect it from. Then the images go as a tar stream in encrypted messages of
//! up to [`CHUNK`] bytes, each `[length u16][ciphertext]`, an empty one for the end (sent
//! once the source's tar has made the whole pack); the destination unpacks them as they
//! come (`checkpoint::Unpacker`), so packing, sending and unpacking overlap, and answers
//! with one message, empty once they are unpacked, else why not. A stream that makes no
//! progress for [`STALL`] is broken off.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::checkpoint::{Unpacker, IMAGES_DIR};

/// The cipher the source picks for a link (the faster on its CPU, as the tunnels do:
/// AES-GCM with AES instructions, else ChaCha20-Poly1305, both through ring), named by the
/// connection's first byte. The byte is not secret, and not trusted either: the Noise
/// protocol name is part of the handshake's hash, so a changed byte fails the handshake.
fn cipher_byte(cipher: vane_tunnel::Cipher) -> u8 {
    match cipher {
        vane_tunnel::Cipher::ChaChaPoly => 1,
        vane_tunnel::Cipher::AesGcm => 2,
    }
}

fn cipher_of(byte: u8) -> Option<vane_tunnel::Cipher> {
    match byte {
        1 => Some(vane_tunnel::Cipher::ChaChaPoly),
        2 => Some(vane_tunnel::Cipher::AesGcm),
        _ => None,
    }
}

fn noise_builder(cipher: vane_tunnel::Cipher) -> snow::Builder<'static> {
    snow::Builder::new(cipher.noise_pattern().parse().expect("valid pattern"))
}
/// Plaintext bytes per message: a Noise message is at most 65,535 bytes with its 16-byte
/// tag.
pub const CHUNK: usize = 65_535 - 16;
/// How long either side waits for the other's next message.
pub const STALL: Duration = Duration::from_secs(30);
/// The handshake's first message: its size (an IK first message is 96 bytes and the
/// ticket) and how long a connection may take to send it.
const FIRST_MAX: usize = 512;
const FIRST_WAIT: Duration = Duration::from_secs(5);
/// Connections a destination handles at once; more are closed at once (someone on the
/// underlay opening connections for nothing gets no more than this much of the host).
pub const MAX_INBOUND: usize = 32;

/// What a destination expects: the instance directory the pack unpacks into as it
/// arrives, the most bytes it may be, and the ids its files become (`checkpoint::unpack`).
pub struct Expected {
    pub dir: std::path::PathBuf,
    pub bytes: u64,
    pub owner: Option<crate::sandbox::IdMap>,
}

/// Runs `io`, an I/O on either end, unless it makes no progress for [`STALL`]; a failure
/// of it is told as `broke: why`.
async fn within_stall<T>(
    io: impl std::future::Future<Output = std::io::Result<T>>,
    broke: &str,
) -> Result<T, String> {
    tokio::time::timeout(STALL, io)
        .await
        .map_err(|_| format!("no progress for {}s", STALL.as_secs()))?
        .map_err(|e| format!("{broke}: {e}"))
}

/// What a failed I/O on the link is.
const LINK_BROKE: &str = "the connection broke";

async fn read_msg(io: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> Result<usize, String> {
    let read = async {
        let len = io.read_u16().await? as usize;
        io.read_exact(&mut buf[..len]).await?;
        Ok(len)
    };
    within_stall(read, LINK_BROKE).await
}

async fn write_msg(io: &mut (impl AsyncWrite + Unpin), msg: &[u8]) -> Result<(), String> {
    let write = async {
        io.write_u16(msg.len() as u16).await?;
        io.write_all(msg).await
    };
    within_stall(write, LINK_BROKE).await
}

async fn flush(io: &mut (impl AsyncWrite + Unpin)) -> Result<(), String> {
    within_stall(io.flush(), LINK_BROKE).await
}

/// The transport keys of a finished handshake.
fn keys_of(
    hs: &mut snow::HandshakeState,
    cipher: vane_tunnel::Cipher,
) -> Result<vane_tunnel::StreamKeys, String> {
    vane_tunnel::StreamKeys::from_handshake(hs, cipher)
        .ok_or_else(|| "handshake: not finished".to_string())
}

/// Bytes a message takes on the wire: its length, its ciphertext and its tag.
const MSG_MAX: usize = 2 + 65_535;
/// Messages a relay seals before it writes them, in one system call.
const BATCH: usize = 16;

/// An agent-to-agent connection after its handshake: Noise transport messages, each way
/// numbered by its own counter (so that the two directions can go their own ways once the
/// images are through: [`Link::relay`]), sealed and opened in place
/// ([`vane_tunnel::StreamKeys`]).
pub struct Link<IO> {
    io: IO,
    keys: std::sync::Arc<vane_tunnel::StreamKeys>,
    sent: u64,
    received: u64,
    /// One message on its way out or in: `[length u16][ciphertext][tag]`.
    msg: Vec<u8>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Link<IO> {
    fn new(io: IO, keys: vane_tunnel::StreamKeys) -> Self {
        Link {
            io,
            keys: std::sync::Arc::new(keys),
            sent: 0,
            received: 0,
            msg: vec![0u8; MSG_MAX],
        }
    }

    /// Sends `data` (at most [`CHUNK`] bytes) as one message, in one write.
    async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        self.msg[2..2 + data.len()].copy_from_slice(data);
        let n = seal_framed(&self.keys, &mut self.sent, &mut self.msg, data.len())?;
        write_all(&mut self.io, &self.msg[..n]).await
    }

    /// The next message, into `out`; its length.
    async fn receive(&mut self, out: &mut [u8]) -> Result<usize, String> {
        let n = read_msg(&mut self.io, &mut self.msg).await?;
        let n = open(&self.keys, &mut self.received, &mut self.msg[..n])?;
        out[..n].copy_from_slice(&self.msg[..n]);
        Ok(n)
    }

    /// Carries bytes both ways between this link and `local` until both directions have
    /// ended: what `local` reads goes out as messages (an empty one when it ends), what
    /// arrives is written to it (its write side shut at the other end's empty message).
    /// Returns the bytes carried out and in. A direction without progress for [`STALL`]
    /// breaks the relay, as does a message that fails authentication.
    ///
    /// The pages of a lazy migration take this way, every byte of them sealed, written,
    /// read and opened once more than a plain stream's: each direction seals and opens in
    /// place, reads what has arrived in one call and writes up to [`BATCH`] messages in
    /// one.
    pub async fn relay(self, local: impl AsyncRead + AsyncWrite) -> Result<(u64, u64), String> {
        let Link {
            io,
            keys,
            mut sent,
            mut received,
            msg: _,
        } = self;
        let (mut net_in, mut net_out) = tokio::io::split(io);
        let (mut local_in, mut local_out) = tokio::io::split(local);
        let keys2 = keys.clone();
        let out = async move {
            // Each read lands where its message goes in the batch and is sealed there; the
            // batch goes once no more is ready to read (the other end may be waiting for
            // it to answer) or it is full.
            let mut batch = vec![0u8; MSG_MAX * BATCH];
            let mut total = 0u64;
            loop {
                let mut filled = 0;
                let mut ended = false;
                while filled + MSG_MAX <= batch.len() {
                    let room = &mut batch[filled + 2..filled + 2 + CHUNK];
                    let read = if filled == 0 {
                        local_in.read(room).await
                    } else {
                        match futures_util::FutureExt::now_or_never(local_in.read(room)) {
                            Some(read) => read,
                            None => break,
                        }
                    };
                    let n = read.map_err(|e| format!("reading the local end: {e}"))?;
                    filled += seal_framed(&keys, &mut sent, &mut batch[filled..], n)?;
                    total += n as u64;
                    if n == 0 {
                        ended = true;
                        break;
                    }
                }
                write_all(&mut net_out, &batch[..filled]).await?;
                flush(&mut net_out).await?;
                if ended {
                    return Ok::<u64, String>(total);
                }
            }
        };
        let back = async move {
            // What has arrived, opened in place message by message; their plaintexts go
            // to the local end in one vectored write, and a message cut short by the read
            // moves to the front to be completed.
            let mut buf = vec![0u8; MSG_MAX * (BATCH + 1)];
            let mut filled = 0;
            let mut total = 0u64;
            let mut plain = Vec::with_capacity(BATCH + 1);
            loop {
                let read = within_stall(net_in.read(&mut buf[filled..]), LINK_BROKE).await?;
                if read == 0 {
                    return Err("the connection broke: closed before the end".to_string());
                }
                filled += read;
                plain.clear();
                let mut at = 0;
                let mut ended = false;
                while let Some(len) = whole_message(&buf[at..filled]) {
                    let n = open(&keys2, &mut received, &mut buf[at + 2..at + 2 + len])?;
                    if n == 0 {
                        ended = true;
                        break;
                    }
                    plain.push((at + 2, n));
                    at += 2 + len;
                }
                let mut slices: Vec<std::io::IoSlice> = plain
                    .iter()
                    .map(|&(from, n)| std::io::IoSlice::new(&buf[from..from + n]))
                    .collect();
                total += write_all_vectored(&mut local_out, &mut slices).await?;
                if ended {
                    let _ = local_out.shutdown().await;
                    return Ok::<u64, String>(total);
                }
                buf.copy_within(at..filled, 0);
                filled -= at;
            }
        };
        tokio::try_join!(out, back)
    }
}

/// The length of the message at the start of `buf` (after its 2-byte length), if all of
/// it is there.
fn whole_message(buf: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]) as usize;
    (buf.len() >= 2 + len).then_some(len)
}

/// Seals the `n` plaintext bytes at `frame[2..]` in place as the next message and writes
/// its length in front: the frame's length.
fn seal_framed(
    keys: &vane_tunnel::StreamKeys,
    nonce: &mut u64,
    frame: &mut [u8],
    n: usize,
) -> Result<usize, String> {
    let len = keys
        .seal_in_place(*nonce, &mut frame[2..], n)
        .ok_or("sealing a message: no room")?;
    *nonce += 1;
    frame[..2].copy_from_slice(&(len as u16).to_be_bytes());
    Ok(2 + len)
}

/// Opens the next message in place: its plaintext's length, at its start.
fn open(keys: &vane_tunnel::StreamKeys, nonce: &mut u64, msg: &mut [u8]) -> Result<usize, String> {
    let n = keys
        .open_in_place(*nonce, msg)
        .ok_or("a message that fails authentication")?;
    *nonce += 1;
    Ok(n)
}

async fn write_all(io: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<(), String> {
    within_stall(io.write_all(bytes), LINK_BROKE).await
}

/// Writes all of `slices` to the local end; their length.
async fn write_all_vectored(
    io: &mut (impl AsyncWrite + Unpin),
    mut slices: &mut [std::io::IoSlice<'_>],
) -> Result<u64, String> {
    let mut total = 0u64;
    while !slices.is_empty() {
        let n = within_stall(io.write_vectored(slices), "writing the local end").await?;
        if n == 0 {
            return Err("writing the local end: it takes no more".to_string());
        }
        total += n as u64;
        std::io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(total)
}

/// The connection both transfer ends use: buffered both ways, so that a message goes out
/// in one system call.
pub type Buffered<IO> = tokio::io::BufStream<IO>;

/// Source side: sends `pack` (read to its end, then `ended`, which says whether all of it
/// came) as transfer `ticket` to the host whose static key is `remote`; returns the bytes
/// sent once the destination has unpacked them, and the link, for what may follow (the
/// pages of a lazy migration).
pub async fn send<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    local_private: &[u8; 32],
    remote: &[u8; 32],
    ticket: &str,
    mut pack: impl AsyncRead + Unpin,
    ended: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(u64, Link<Buffered<IO>>), String> {
    let mut io = tokio::io::BufStream::with_capacity(1 << 16, 1 << 17, io);
    let noise = |e: snow::Error| format!("handshake: {e}");
    let cipher = vane_tunnel::Cipher::fastest();
    let mut hs = noise_builder(cipher)
        .local_private_key(local_private)
        .and_then(|b| b.remote_public_key(remote))
        .and_then(|b| b.build_initiator())
        .map_err(noise)?;
    let mut msg = vec![0u8; 65_535];
    let n = hs
        .write_message(ticket.as_bytes(), &mut msg)
        .map_err(noise)?;
    io.write_u8(cipher_byte(cipher))
        .await
        .map_err(|e| format!("the connection broke: {e}"))?;
    write_msg(&mut io, &msg[..n]).await?;
    flush(&mut io).await?;
    let n = read_msg(&mut io, &mut msg).await?;
    let mut payload = vec![0u8; 65_535];
    hs.read_message(&msg[..n], &mut payload)
        .map_err(|_| "the destination refused the transfer, or is not the host it should be")?;
    let mut link = Link::new(io, keys_of(&mut hs, cipher)?);
    let mut chunk = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let filled = crate::transfer::read_full(&mut pack, &mut chunk)
            .await
            .map_err(|e| format!("reading the images: {e}"))?;
        if filled == 0 {
            break;
        }
        link.send(&chunk[..filled]).await?;
        sent += filled as u64;
    }
    // The last, empty, message is the end: only for a pack made whole.
    ended.await?;
    link.send(&[]).await?;
    flush(&mut link.io).await?;
    let n = link
        .receive(&mut payload)
        .await
        .map_err(|e| format!("the destination's answer: {e}"))?;
    if n > 0 {
        return Err(format!(
            "the destination: {}",
            String::from_utf8_lossy(&payload[..n])
        ));
    }
    Ok((sent, link))
}

/// How a transfer a destination took ended: its ticket, and the link once the images are
/// unpacked, or why not.
pub type Accepted<IO> = (String, Result<Link<Buffered<IO>>, String>);

/// Destination side: takes a transfer on `io`. `claim(ticket, sender's static key)` says
/// where it goes, if this host expects that ticket from that host (and forgets it: a ticket
/// is good once).
pub async fn accept<IO, F>(
    io: IO,
    local_private: &[u8; 32],
    claim: F,
) -> Result<Accepted<IO>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: AsyncFnOnce(&str, &[u8; 32]) -> Option<Expected>,
{
    let mut io = io;
    let noise = |e: snow::Error| format!("handshake: {e}");
    // Whoever reaches the port gets this far: a cipher's byte and a small message, soon,
    // or nothing. Buffers for the images come only after the sender has proved who it is.
    let mut first = [0u8; FIRST_MAX];
    let mut payload = [0u8; FIRST_MAX];
    let read = async {
        let cipher = io.read_u8().await?;
        let len = io.read_u16().await? as usize;
        if len > FIRST_MAX {
            return Err(std::io::Error::other("a first message too long"));
        }
        io.read_exact(&mut first[..len]).await?;
        Ok((cipher, len))
    };
    let (cipher, n) = tokio::time::timeout(FIRST_WAIT, read)
        .await
        .map_err(|_| format!("no handshake within {}s", FIRST_WAIT.as_secs()))?
        .map_err(|e| format!("the connection broke: {e}"))?;
    let cipher = cipher_of(cipher).ok_or("a handshake in an unknown cipher")?;
    let mut hs = noise_builder(cipher)
        .local_private_key(local_private)
        .and_then(|b| b.build_responder())
        .map_err(noise)?;
    let n = hs
        .read_message(&first[..n], &mut payload)
        .map_err(|_| "a handshake not made with this host's key")?;
    let ticket = String::from_utf8_lossy(&payload[..n]).into_owned();
    let remote: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or("a handshake without the sender's key")?;
    // Nothing is answered to a stranger, or to a known host with a ticket not its own.
    let expected = claim(&ticket, &remote)
        .await
        .ok_or_else(|| format!("a transfer nobody expects (ticket {ticket:.16}...)"))?;
    let n = hs.write_message(&[], &mut first).map_err(noise)?;
    write_msg(&mut io, &first[..n]).await?;
    let io = tokio::io::BufStream::with_capacity(1 << 17, 1 << 16, io);
    let mut link = Link::new(io, keys_of(&mut hs, cipher)?);
    let result = receive(&mut link, &expected).await;
    let answer = match &result {
        Ok(()) => Vec::new(),
        Err(e) => e.as_bytes()[..e.len().min(1000)].to_vec(),
    };
    let answered = match link.send(&answer).await {
        Ok(()) => flush(&mut link.io).await,
        Err(e) => Err(e),
    };
    Ok((ticket, result.and(answered).map(|()| link)))
}

/// Unpacks the pack as it arrives; nothing of it stays if it does not all come.
async fn receive<IO: AsyncRead + AsyncWrite + Unpin>(
    link: &mut Link<IO>,
    expected: &Expected,
) -> Result<(), String> {
    let mut unpacker = Unpacker::start(&expected.dir, expected.bytes)?;
    let mut data = vec![0u8; 65_535];
    let ended = loop {
        let piece = match link.receive(&mut data).await {
            Ok(0) => break Ok(()),
            Ok(n) => unpacker.write(&data[..n]).await,
            Err(e) => Err(e),
        };
        if piece.is_err() {
            break piece;
        }
    };
    match ended {
        Ok(()) => match unpacker.finish(expected.owner).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(expected.dir.join(IMAGES_DIR)).await;
                Err(e)
            }
        },
        Err(e) => {
            unpacker.abandon().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_tunnel::Keypair;

    /// A pack (as `checkpoint::pack_to_pipe` makes one) of an images directory whose one
    /// file holds `data`.
    fn pack_of(data: &[u8]) -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join(IMAGES_DIR)).unwrap();
        std::fs::write(src.path().join(IMAGES_DIR).join("pages-1.img"), data).unwrap();
        // In records of 64 KiB, as `checkpoint::pack_to_pipe` makes them.
        let out = std::process::Command::new("tar")
            .arg("-C")
            .arg(src.path())
            .args(["--blocking-factor", "128", "-cf", "-", IMAGES_DIR])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    }

    /// The destination's end of `io`: takes one transfer, ticket `t-1` from the host whose
    /// key is `sender` and nobody else, unpacked into `dir`, at most `bytes` of it.
    fn expecting(
        io: tokio::io::DuplexStream,
        dest: &Keypair,
        sender: [u8; 32],
        dir: &std::path::Path,
        bytes: u64,
    ) -> tokio::task::JoinHandle<Result<Accepted<tokio::io::DuplexStream>, String>> {
        let (private, dir) = (dest.private, dir.to_path_buf());
        tokio::spawn(async move {
            accept(io, &private, async |ticket: &str, from: &[u8; 32]| {
                (ticket == "t-1" && *from == sender).then(|| Expected {
                    dir: dir.clone(),
                    bytes,
                    owner: None,
                })
            })
            .await
        })
    }

    /// Runs a transfer of `pack` from `source` (which takes `dest_key` for the
    /// destination's) to `dest`, which expects `ticket` from `expected_sender` and a pack
    /// of at most `bound` bytes (`None`: the pack's own length); what the destination
    /// unpacked, and whether it left anything of a failed transfer.
    async fn transfer(
        source: &Keypair,
        dest: &Keypair,
        dest_key: [u8; 32],
        sent_ticket: &str,
        expected_sender: [u8; 32],
        pack: Vec<u8>,
        bound: Option<u64>,
    ) -> (Result<u64, String>, Result<Vec<u8>, String>) {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let bytes = bound.unwrap_or(pack.len() as u64);
        let receiver = expecting(b, dest, expected_sender, dir.path(), bytes);
        let sent = send(
            a,
            &source.private,
            &dest_key,
            sent_ticket,
            &pack[..],
            async { Ok(()) },
        )
        .await
        .map(|(n, _)| n);
        let images = dir.path().join(IMAGES_DIR);
        let received = match receiver.await.unwrap() {
            Ok((_, Ok(_))) => Ok(std::fs::read(images.join("pages-1.img")).unwrap()),
            Ok((_, Err(e))) | Err(e) => {
                assert!(!images.exists(), "a failed transfer left images: {e}");
                Err(e)
            }
        };
        (sent, received)
    }

    /// After the images, the link carries a conversation both ways (a lazy migration's
    /// page requests and pages), between the local sockets at its ends.
    #[tokio::test]
    async fn after_the_images_the_link_relays_both_ways_until_both_ends_close() {
        let (src, dst) = (Keypair::generate(), Keypair::generate());
        let dir = tempfile::tempdir().unwrap();
        let pack = pack_of(b"abc");
        // Reads of the link cut its messages (frames are up to 65,537 bytes).
        let (a, b) = tokio::io::duplex(50_000);
        let receiver = expecting(b, &dst, src.public, dir.path(), pack.len() as u64);
        let ended = async { Ok(()) };
        let (_, source_link) = send(a, &src.private, &dst.public, "t-1", &pack[..], ended)
            .await
            .unwrap();
        let (_, dest_link) = receiver.await.unwrap().unwrap();
        let dest_link = dest_link.unwrap();
        // The page server at the source's end, the daemon at the destination's.
        // The page server's end holds more than a batch of messages: the relay reads many
        // at once and sends them together.
        let (server, server_side) = tokio::io::duplex(1 << 22);
        let (daemon, daemon_side) = tokio::io::duplex(1 << 16);
        let source = tokio::spawn(source_link.relay(server_side));
        let dest = tokio::spawn(dest_link.relay(daemon_side));
        let (mut server_r, mut server_w) = tokio::io::split(server);
        let (mut daemon_r, mut daemon_w) = tokio::io::split(daemon);
        // More than a batch of messages each time.
        let pages: Vec<u8> = (0..2_500_000u32).map(|i| (i % 253) as u8).collect();
        for round in 0..3u8 {
            daemon_w.write_all(&[round; 16]).await.unwrap();
            let mut ask = [0u8; 16];
            server_r.read_exact(&mut ask).await.unwrap();
            assert_eq!(ask, [round; 16]);
            // More than the pipes hold: written and read at once.
            let mut got = vec![0u8; pages.len()];
            let (written, read) =
                tokio::join!(server_w.write_all(&pages), daemon_r.read_exact(&mut got));
            written.unwrap();
            read.unwrap();
            assert_eq!(got, pages);
        }
        daemon_w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server_r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        server_w.shutdown().await.unwrap();
        daemon_r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (out, back) = source.await.unwrap().unwrap();
        assert_eq!((out, back), (3 * pages.len() as u64, 48));
        assert_eq!(dest.await.unwrap().unwrap(), (48, 3 * pages.len() as u64));
    }

    #[tokio::test]
    async fn the_expected_host_s_images_arrive_whole() {
        let (src, dst) = (Keypair::generate(), Keypair::generate());
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (sent, received) = transfer(
            &src,
            &dst,
            dst.public,
            "t-1",
            src.public,
            pack_of(&data),
            None,
        )
        .await;
        assert_eq!(sent, Ok(pack_of(&data).len() as u64));
        assert_eq!(received.unwrap(), data);
        // Empty images too.
        let (sent, received) = transfer(
            &src,
            &dst,
            dst.public,
            "t-1",
            src.public,
            pack_of(&[]),
            None,
        )
        .await;
        assert_eq!(sent, Ok(pack_of(&[]).len() as u64));
        assert_eq!(received.unwrap(), Vec::<u8>::new());
        // The padding of a pack's last record, which tar leaves unread once it has read
        // the archive's end (and may have exited before the rest comes).
        let mut padded = pack_of(&data);
        padded.resize(padded.len() + (1 << 20), 0);
        let (sent, received) =
            transfer(&src, &dst, dst.public, "t-1", src.public, padded, None).await;
        assert_eq!(sent, Ok(pack_of(&data).len() as u64 + (1 << 20)));
        assert_eq!(received.unwrap(), data);
    }

    #[tokio::test]
    async fn a_pack_longer_than_announced_or_not_whole_is_refused_and_removed() {
        let (src, dst) = (Keypair::generate(), Keypair::generate());
        let data = vec![5u8; 300_000];
        let bound = Some(pack_of(&data).len() as u64 - 1);
        let (sent, received) = transfer(
            &src,
            &dst,
            dst.public,
            "t-1",
            src.public,
            pack_of(&data),
            bound,
        )
        .await;
        assert!(sent.is_err(), "{sent:?}");
        assert!(received.unwrap_err().contains("longer than"));

        // A source whose tar failed after some of the pack: no end, and nothing stays.
        let dir = tempfile::tempdir().unwrap();
        let pack = pack_of(&[7u8; 200_000]);
        let (a, b) = tokio::io::duplex(1 << 16);
        let receiver = expecting(b, &dst, src.public, dir.path(), pack.len() as u64);
        let failed = async { Err("packing images: tar died".to_string()) };
        let sent = send(
            a,
            &src.private,
            &dst.public,
            "t-1",
            &pack[..100_000],
            failed,
        )
        .await;
        assert_eq!(sent.err().as_deref(), Some("packing images: tar died"));
        let (_, received) = receiver.await.unwrap().unwrap();
        assert!(received.is_err());
        assert!(!dir.path().join(IMAGES_DIR).exists());
    }

    #[tokio::test]
    async fn another_host_a_wrong_ticket_or_a_wrong_destination_key_get_nothing_through() {
        let (src, dst, other) = (
            Keypair::generate(),
            Keypair::generate(),
            Keypair::generate(),
        );
        let data = vec![1u8; 100_000];
        // Another enrolled host, with the right ticket.
        let (sent, received) = transfer(
            &other,
            &dst,
            dst.public,
            "t-1",
            src.public,
            pack_of(&data),
            None,
        )
        .await;
        assert!(sent.is_err() && received.is_err(), "{sent:?} {received:?}");
        // The right host, another ticket.
        let (sent, received) = transfer(
            &src,
            &dst,
            dst.public,
            "t-2",
            src.public,
            pack_of(&data),
            None,
        )
        .await;
        assert!(sent.is_err() && received.is_err(), "{sent:?} {received:?}");
        // A source that takes someone else for the destination: the handshake fails.
        let (sent, received) = transfer(
            &src,
            &dst,
            other.public,
            "t-1",
            src.public,
            pack_of(&data),
            None,
        )
        .await;
        assert!(sent.is_err() && received.is_err(), "{sent:?} {received:?}");
    }

    #[tokio::test]
    async fn a_changed_byte_on_the_way_breaks_the_transfer() {
        // Well after the handshake, or the cipher's byte (the other cipher named).
        for (at, flip) in [(50_000, 1), (0, 3)] {
            let outcome = transfer_changed(at, flip).await;
            assert!(outcome.is_err(), "a byte changed at {at} went through");
        }
    }

    /// A transfer whose byte `at` (of what the source sends) is xored with `flip` on the
    /// way: how the destination takes it (never leaving images behind).
    async fn transfer_changed(at: usize, flip: u8) -> Result<(), String> {
        let (src, dst) = (Keypair::generate(), Keypair::generate());
        let dir = tempfile::tempdir().unwrap();
        let pack = pack_of(&[3u8; 200_000]);
        let (a, b) = tokio::io::duplex(1 << 16);
        // Source <-> c | d <-> relay <-> a | b <-> destination.
        let (c, d) = tokio::io::duplex(1 << 16);
        let (mut d_read, mut d_write) = tokio::io::split(d);
        let (mut a_read, mut a_write) = tokio::io::split(a);
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut a_read, &mut d_write).await;
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut seen = 0usize;
            loop {
                let n = match d_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if seen <= at && seen + n > at {
                    buf[at - seen] ^= flip;
                }
                seen += n;
                if a_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let receiver = expecting(b, &dst, src.public, dir.path(), pack.len() as u64);
        // The source may wait for an answer that does not come (the relay holds its
        // connection open): only the destination's outcome matters here.
        let sending = send(c, &src.private, &dst.public, "t-1", &pack[..], async {
            Ok(())
        });
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), sending).await;
        let outcome = match receiver.await.unwrap() {
            Ok((_, result)) => result.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            !dir.path().join(IMAGES_DIR).exists() || outcome.is_ok(),
            "a broken transfer left its images"
        );
        outcome
    }
}
