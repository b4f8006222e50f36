//! What the fuzz targets share: a framing that splits one fuzz input into several
//! messages (so that seeds can be written by hand and the fuzzer mutates real packets in
//! place), builders of well-formed packets for seeds and structured inputs, and checksum
//! checks that restate the RFCs independently of `vane_wire`.

use std::net::Ipv4Addr;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Splits an input into records `[tag u8][len u16 big-endian][len bytes]`; a last record
/// shorter than its length takes what is left, so no mutation is wasted on lengths.
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Records<'a> {
    pub fn new(data: &'a [u8]) -> Records<'a> {
        Records { rest: data }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.rest.split_first()?;
        let len = match rest {
            [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
            _ => 0,
        };
        let rest = rest.get(2..).unwrap_or(&[]);
        let (body, after) = rest.split_at(len.min(rest.len()));
        self.rest = after;
        Some((tag, body))
    }
}

/// One record in the framing [`Records`] reads.
pub fn record(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).expect("a record holds at most 64 KiB");
    let mut out = vec![tag];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The internet checksum (RFC 1071) of `bytes` on top of the running sum `acc`.
pub fn internet_checksum(bytes: &[u8], mut acc: u32) -> u16 {
    for pair in bytes.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).copied().map_or(0, u32::from);
        acc += hi | lo;
        acc = (acc & 0xffff) + (acc >> 16);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The sum of the TCP/UDP pseudo-header of a segment of `len` bytes, not complemented.
fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut acc = 0u32;
    for addr in [src, dst] {
        let o = addr.octets();
        acc += u32::from(u16::from_be_bytes([o[0], o[1]]));
        acc += u32::from(u16::from_be_bytes([o[2], o[3]]));
    }
    acc + u32::from(proto) + len as u32
}

/// Whether `segment` (checksum field included) sums to zero with its pseudo-header: a
/// correct TCP or UDP checksum, whichever of the two representations of zero it holds.
pub fn l4_checksum_correct(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> bool {
    internet_checksum(segment, pseudo_header(src, dst, proto, segment.len())) == 0
}

/// An IPv4 packet (20-byte header, DF clear) around `l4`, both checksums filled in (the
/// TCP or UDP one over the whole segment, the ICMP one left as `l4` has it).
pub fn ipv4(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, ident: u16, l4: &[u8]) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = internet_checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..].copy_from_slice(l4);
    let field = match proto {
        PROTO_TCP => Some(20 + 16),
        PROTO_UDP => Some(20 + 6),
        _ => None,
    };
    if let Some(at) = field {
        p[at..at + 2].fill(0);
        let mut sum = internet_checksum(&p[20..], pseudo_header(src, dst, proto, l4.len()));
        if proto == PROTO_UDP && sum == 0 {
            sum = 0xffff;
        }
        p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    p
}

/// A TCP segment header (no options) with `flags`, followed by `payload`.
pub fn tcp(sport: u16, dport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; 20];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[8..12].copy_from_slice(&1u32.to_be_bytes());
    s[12] = 0x50;
    s[13] = flags;
    s[14..16].copy_from_slice(&64240u16.to_be_bytes());
    s.extend_from_slice(payload);
    s
}

/// A UDP datagram header followed by `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    d[0..2].copy_from_slice(&sport.to_be_bytes());
    d[2..4].copy_from_slice(&dport.to_be_bytes());
    d[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(payload);
    d
}

/// An ICMP echo request with identifier `ident`, its checksum filled in.
pub fn icmp_echo(ident: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0, 0, 0, 0, 1];
    m[4..6].copy_from_slice(&ident.to_be_bytes());
    m.extend_from_slice(payload);
    let sum = internet_checksum(&m, 0);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_and_a_short_last_one_takes_the_rest() {
        let mut data = record(1, b"abc");
        data.extend_from_slice(&record(2, b""));
        data.extend_from_slice(&[3, 0, 9, b'x']);
        let got: Vec<_> = Records::new(&data).collect();
        assert_eq!(got, vec![(1, &b"abc"[..]), (2, &b""[..]), (3, &b"x"[..])]);
        assert_eq!(Records::new(&[7]).collect::<Vec<_>>(), vec![(7, &b""[..])]);
    }

    #[test]
    fn built_packets_carry_correct_checksums() {
        let a = Ipv4Addr::new(10, 1, 0, 1);
        let b = Ipv4Addr::new(10, 1, 0, 2);
        for (proto, l4) in [
            (PROTO_TCP, tcp(1, 2, 3, SYN, b"odd")),
            (PROTO_UDP, udp(5, 53, b"dns")),
        ] {
            let p = ipv4(proto, a, b, 1, &l4);
            assert_eq!(internet_checksum(&p[..20], 0), 0);
            assert!(l4_checksum_correct(a, b, proto, &p[20..]));
        }
        let ping = icmp_echo(9, b"ping");
        assert_eq!(internet_checksum(&ping, 0), 0);
    }
}
