//! Streamed answers (exec, logs) are a sequence of frames: a 1-byte kind, a 4-byte
//! big-endian length, then that many bytes. Kinds: stdout, stderr, exit (4-byte big-endian
//! exit code), error (UTF-8 message).

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const EXIT: u8 = 3;
pub const ERROR: u8 = 4;
/// Snapshot streams (`RestoreSpec`): the record, packed images, the seal.
pub const RECORD: u8 = 5;
pub const IMAGES: u8 = 6;
pub const SEAL: u8 = 7;
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
}
