//! Streamed answers (exec, logs) are a sequence of frames: a 1-byte kind, a 4-byte
//! big-endian length, then that many bytes. Kinds: stdout, stderr, exit (4-byte big-endian
//! exit code), error (UTF-8 message); from the client of an exec WebSocket: stdin (an empty
//! one ends the input) and resize (rows and columns, 2-byte big-endian each).

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const EXIT: u8 = 3;
pub const ERROR: u8 = 4;
/// Snapshot streams (`RestoreSpec`): the record, packed images, the seal.
pub const RECORD: u8 = 5;
pub const IMAGES: u8 = 6;
pub const SEAL: u8 = 7;
/// What the client of an exec types or pipes; empty: the end of its input.
pub const STDIN: u8 = 8;
/// The client's terminal changed size: [`resize`].
pub const RESIZE: u8 = 9;
/// Largest frame a reader accepts.
pub const MAX_LEN: usize = 16 << 20;

/// Appends one frame to `out`.
pub fn encode(out: &mut Vec<u8>, kind: u8, data: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// One frame, in bytes of its own.
pub fn encoded(kind: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + data.len());
    encode(&mut out, kind, data);
    out
}

/// A resize frame's data.
pub fn resize(size: crate::api::TtySize) -> [u8; 4] {
    let [r0, r1] = size.rows.to_be_bytes();
    let [c0, c1] = size.cols.to_be_bytes();
    [r0, r1, c0, c1]
}

/// The size a resize frame carries; `None` if its data is not 4 bytes.
pub fn parse_resize(data: &[u8]) -> Option<crate::api::TtySize> {
    let d: [u8; 4] = data.try_into().ok()?;
    Some(crate::api::TtySize {
        rows: u16::from_be_bytes([d[0], d[1]]),
        cols: u16::from_be_bytes([d[2], d[3]]),
    })
}

/// One whole frame held in `msg` (a WebSocket message carries exactly one): its kind and
/// data, or `None` if `msg` is not exactly one well-formed frame.
pub fn parse_one(msg: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, rest) = msg.split_first()?;
    let len: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    let data = &rest[4..];
    (u32::from_be_bytes(len) as usize == data.len() && data.len() <= MAX_LEN)
        .then_some((kind, data))
}

/// Frames out of bytes that arrive in pieces of any size (a poll loop's reads).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// The next bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if it has all arrived; an error for one longer than
    /// [`MAX_LEN`] (nothing after it can be read).
    pub fn next_frame(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        let Some(head) = self.buf.get(..5) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream frame larger than 16 MiB",
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let kind = self.buf[0];
        let data = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some((kind, data)))
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read(r: &mut impl std::io::Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream frame larger than 16 MiB",
        ));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(Some((head[0], data)))
}

#[cfg(test)]
mod tests {
    use crate::api::frame;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        frame::encode(&mut buf, frame::STDOUT, b"hello");
        frame::encode(&mut buf, frame::EXIT, &7i32.to_be_bytes());
        let mut r = &buf[..];
        assert_eq!(
            frame::read(&mut r).unwrap(),
            Some((frame::STDOUT, b"hello".to_vec()))
        );
        assert_eq!(
            frame::read(&mut r).unwrap(),
            Some((frame::EXIT, 7i32.to_be_bytes().to_vec()))
        );
        assert_eq!(frame::read(&mut r).unwrap(), None);
    }

    #[test]
    fn the_decoder_takes_frames_in_any_pieces() {
        let mut bytes = frame::encoded(frame::STDIN, b"hello");
        frame::encode(&mut bytes, frame::STDIN, b"");
        frame::encode(&mut bytes, frame::RESIZE, &[0, 1, 0, 2]);
        for piece in [1, 2, 3, 7, bytes.len()] {
            let mut d = frame::Decoder::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(
                got,
                vec![
                    (frame::STDIN, b"hello".to_vec()),
                    (frame::STDIN, vec![]),
                    (frame::RESIZE, vec![0, 1, 0, 2])
                ]
            );
        }
        let mut d = frame::Decoder::default();
        d.push(&[frame::STDIN, 0xff, 0xff, 0xff, 0xff]);
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn one_frame_per_message_and_resize() {
        let size = crate::api::TtySize {
            rows: 30,
            cols: 100,
        };
        let msg = frame::encoded(frame::RESIZE, &frame::resize(size));
        let (kind, data) = frame::parse_one(&msg).unwrap();
        assert_eq!(kind, frame::RESIZE);
        assert_eq!(frame::parse_resize(data), Some(size));
        // Short, long, or two frames in one message: refused.
        assert_eq!(frame::parse_one(&msg[..msg.len() - 1]), None);
        let mut two = msg.clone();
        frame::encode(&mut two, frame::STDIN, b"x");
        assert_eq!(frame::parse_one(&two), None);
        assert_eq!(frame::parse_one(&[frame::STDIN, 0, 0]), None);
        assert_eq!(
            frame::parse_one(&frame::encoded(frame::STDIN, b"")),
            Some((frame::STDIN, &b""[..]))
        );
        assert_eq!(frame::parse_resize(b"abc"), None);
    }
}
