//! IPv4 packet view.

use std::net::Ipv4Addr;

use crate::checksum::{self, adjust};
use crate::Error;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Length of an IPv4 header without options.
const MIN_HEADER_LEN: usize = 20;
const CHECKSUM: usize = 10;
const SRC: usize = 12;
const DST: usize = 16;
/// Offset of the checksum inside a TCP header; the header must reach past it.
const TCP_CHECKSUM: usize = 16;
/// Offset of the checksum inside a UDP header.
const UDP_CHECKSUM: usize = 6;

/// A checked view of an IPv4 packet in a byte buffer.
///
/// After [`Ipv4Packet::new_checked`] succeeds, `20 <= header_len() <= total_len() <=
/// buffer length` holds and no accessor of this type can panic (provided the buffer's
/// `as_ref` keeps returning the same length, as slices and vectors do). The buffer may be
/// longer than the packet (a reused receive buffer); `total_len()` is the packet's length and
/// bytes past it are ignored.
///
/// The header checksum is not verified by the constructor: packets from a TUN device or a
/// decrypted tunnel were checksummed by a kernel or authenticated by AEAD, and checking again
/// per packet costs time; call [`Ipv4Packet::verify_checksum`] where it matters.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps `buffer` after checking the version and the length fields against it.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let buf = buffer.as_ref();
        let len = buf.len();
        let Some(&first) = buf.first() else {
            return Err(Error::Truncated {
                len,
                needed: MIN_HEADER_LEN,
            });
        };
        // Look at the version before the length so an IPv6 packet (whose header is 40 bytes)
        // is reported as what it is.
        let version = first >> 4;
        if version != 4 {
            return Err(Error::NotIpv4 { version });
        }
        if len < MIN_HEADER_LEN {
            return Err(Error::Truncated {
                len,
                needed: MIN_HEADER_LEN,
            });
        }
        let header_len = usize::from(first & 0x0f) * 4;
        if header_len < MIN_HEADER_LEN || header_len > len {
            return Err(Error::BadHeaderLen { header_len, len });
        }
        let total_len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if total_len < header_len || total_len > len {
            return Err(Error::BadTotalLen {
                total_len,
                header_len,
                len,
            });
        }
        Ok(Ipv4Packet { buffer })
    }

    /// Gives the buffer back.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    fn read_u16(&self, at: usize) -> u16 {
        let b = self.bytes();
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    fn read_addr(&self, at: usize) -> Ipv4Addr {
        let b = self.bytes();
        Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.bytes()[0] & 0x0f) * 4
    }

    /// Packet length in bytes (the total-length field), header included.
    pub fn total_len(&self) -> usize {
        usize::from(self.read_u16(2))
    }

    /// The identification field (shared by the fragments of one datagram).
    pub fn ident(&self) -> u16 {
        self.read_u16(4)
    }

    /// Whether the more-fragments flag is set.
    pub fn more_fragments(&self) -> bool {
        self.bytes()[6] & 0x20 != 0
    }

    /// Whether the don't-fragment flag is set.
    pub fn dont_fragment(&self) -> bool {
        self.bytes()[6] & 0x40 != 0
    }

    /// Offset of this fragment's payload in the datagram, in bytes.
    pub fn frag_offset(&self) -> usize {
        usize::from(self.read_u16(6) & 0x1fff) * 8
    }

    /// Whether this is an unfragmented packet or the first fragment: only then does the
    /// payload start with the transport header.
    pub fn is_first_fragment(&self) -> bool {
        self.frag_offset() == 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.bytes()[8]
    }

    /// The protocol field (see [`PROTO_TCP`] and friends).
    pub fn protocol(&self) -> u8 {
        self.bytes()[9]
    }

    /// The header checksum field.
    pub fn checksum(&self) -> u16 {
        self.read_u16(CHECKSUM)
    }

    /// Whether the header checksum is correct.
    pub fn verify_checksum(&self) -> bool {
        checksum::ipv4_checksum(&self.bytes()[..self.header_len()]) == 0
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        self.read_addr(SRC)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        self.read_addr(DST)
    }

    /// The payload: bytes after the header up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[self.header_len()..self.total_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Rewrites the source address, fixing the header checksum and the TCP/UDP checksum
    /// incrementally.
    pub fn set_src(&mut self, addr: Ipv4Addr) {
        self.rewrite_addr(SRC, addr);
    }

    /// Rewrites the destination address, fixing the header checksum and the TCP/UDP checksum
    /// incrementally.
    pub fn set_dst(&mut self, addr: Ipv4Addr) {
        self.rewrite_addr(DST, addr);
    }

    /// Recomputes the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        let header_len = self.header_len();
        let buf = self.buffer.as_mut();
        buf[CHECKSUM..CHECKSUM + 2].fill(0);
        let sum = checksum::ipv4_checksum(&buf[..header_len]);
        buf[CHECKSUM..CHECKSUM + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len(), self.total_len());
        &mut self.buffer.as_mut()[start..end]
    }

    fn rewrite_addr(&mut self, at: usize, addr: Ipv4Addr) {
        let (header_len, total_len) = (self.header_len(), self.total_len());
        let first_fragment = self.is_first_fragment();
        let proto = self.protocol();
        let new = addr.octets();
        let buf = self.buffer.as_mut();
        let mut old = [0u8; 4];
        old.copy_from_slice(&buf[at..at + 4]);
        if old == new {
            return;
        }
        buf[at..at + 4].copy_from_slice(&new);
        update_checksum(buf, CHECKSUM, old, new, false);

        // Only the first fragment carries the transport header; the others have no checksum
        // of their own. A header cut short before its checksum field is left alone: the
        // receiver will drop that segment whatever we do.
        if !first_fragment {
            return;
        }
        let l4 = &mut buf[header_len..total_len];
        match proto {
            PROTO_TCP if l4.len() >= TCP_CHECKSUM + 2 => {
                update_checksum(l4, TCP_CHECKSUM, old, new, false);
            }
            PROTO_UDP if l4.len() >= UDP_CHECKSUM + 2 => {
                update_checksum(l4, UDP_CHECKSUM, old, new, true);
            }
            // ICMP's checksum does not cover the IP addresses; other protocols are opaque.
            _ => {}
        }
    }
}

/// Applies an address change to the checksum stored at `buf[at..at + 2]`. With `udp`, a
/// stored 0 means "no checksum" and stays 0, and a computed 0 is stored as 0xffff (RFC 768).
fn update_checksum(buf: &mut [u8], at: usize, old: [u8; 4], new: [u8; 4], udp: bool) {
    let current = u16::from_be_bytes([buf[at], buf[at + 1]]);
    if udp && current == 0 {
        return;
    }
    let mut updated = adjust(current, old, new);
    if udp && updated == 0 {
        updated = 0xffff;
    }
    buf[at..at + 2].copy_from_slice(&updated.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{ipv4_checksum, ipv4_l4_checksum};

    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);
    const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
    const NAT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);

    /// Builds an IPv4 packet with correct checksums around `l4` (whose checksum field, if
    /// any, is filled in here).
    fn build(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = ipv4_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..].copy_from_slice(l4);
        let at = match proto {
            PROTO_TCP => Some(20 + TCP_CHECKSUM),
            PROTO_UDP => Some(20 + UDP_CHECKSUM),
            _ => None,
        };
        if let Some(at) = at {
            p[at..at + 2].fill(0);
            let mut c = ipv4_l4_checksum(src, dst, proto, &p[20..]);
            if proto == PROTO_UDP && c == 0 {
                c = 0xffff;
            }
            p[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        p
    }

    fn tcp_segment() -> Vec<u8> {
        let mut s = vec![0u8; 20];
        s[0..2].copy_from_slice(&40000u16.to_be_bytes());
        s[2..4].copy_from_slice(&80u16.to_be_bytes());
        s[12] = 0x50;
        s[13] = 0x02; // SYN
        s.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n!");
        s
    }

    fn udp_datagram(payload: &[u8]) -> Vec<u8> {
        let mut s = vec![0u8; 8];
        s[0..2].copy_from_slice(&5353u16.to_be_bytes());
        s[2..4].copy_from_slice(&53u16.to_be_bytes());
        s[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        s.extend_from_slice(payload);
        s
    }

    /// Whether the TCP/UDP checksum of `p` is what a full recomputation gives.
    fn l4_checksum_ok(p: &[u8]) -> bool {
        let pkt = Ipv4Packet::new_checked(p).unwrap();
        let at = if pkt.protocol() == PROTO_TCP {
            TCP_CHECKSUM
        } else {
            UDP_CHECKSUM
        };
        let mut seg = pkt.payload().to_vec();
        let stored = u16::from_be_bytes([seg[at], seg[at + 1]]);
        seg[at..at + 2].fill(0);
        let mut want = ipv4_l4_checksum(pkt.src(), pkt.dst(), pkt.protocol(), &seg);
        if pkt.protocol() == PROTO_UDP && want == 0 {
            want = 0xffff;
        }
        stored == want
    }

    #[test]
    fn accessors() {
        let p = build(PROTO_TCP, A, B, &tcp_segment());
        let pkt = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(pkt.src(), A);
        assert_eq!(pkt.dst(), B);
        assert_eq!(pkt.protocol(), PROTO_TCP);
        assert_eq!(pkt.header_len(), 20);
        assert_eq!(pkt.total_len(), p.len());
        assert_eq!(pkt.ttl(), 64);
        assert_eq!(pkt.ident(), 0x1234);
        assert!(pkt.is_first_fragment());
        assert!(!pkt.more_fragments());
        assert!(pkt.verify_checksum());
        assert_eq!(pkt.payload(), &p[20..]);
    }

    #[test]
    fn buffer_longer_than_packet() {
        let mut p = build(PROTO_UDP, A, B, &udp_datagram(b"hi"));
        let len = p.len();
        p.extend_from_slice(&[0xee; 30]);
        let pkt = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(pkt.total_len(), len);
        assert_eq!(pkt.payload().len(), len - 20);
    }

    #[test]
    fn rejects_malformed() {
        let good = build(PROTO_UDP, A, B, &udp_datagram(b"x"));
        assert!(matches!(
            Ipv4Packet::new_checked(&[][..]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Ipv4Packet::new_checked(&good[..19]),
            Err(Error::Truncated { .. })
        ));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(
            Ipv4Packet::new_checked(&v6[..]).unwrap_err(),
            Error::NotIpv4 { version: 6 }
        );
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert!(matches!(
            Ipv4Packet::new_checked(&short_ihl[..]),
            Err(Error::BadHeaderLen { .. })
        ));
        let mut long_ihl = good.clone();
        long_ihl[0] = 0x4f; // 60 bytes, more than the packet
        assert!(matches!(
            Ipv4Packet::new_checked(&long_ihl[..]),
            Err(Error::BadHeaderLen { .. })
        ));
        let mut long_total = good.clone();
        long_total[2..4].copy_from_slice(&(good.len() as u16 + 1).to_be_bytes());
        assert!(matches!(
            Ipv4Packet::new_checked(&long_total[..]),
            Err(Error::BadTotalLen { .. })
        ));
        let mut short_total = good.clone();
        short_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert!(matches!(
            Ipv4Packet::new_checked(&short_total[..]),
            Err(Error::BadTotalLen { .. })
        ));
    }

    #[test]
    fn every_truncation_is_refused_or_safe() {
        // No prefix of a valid packet may make an accessor panic.
        let p = build(PROTO_TCP, A, B, &tcp_segment());
        for n in 0..=p.len() {
            let mut buf = p[..n].to_vec();
            if let Ok(mut pkt) = Ipv4Packet::new_checked(&mut buf[..]) {
                let _ = (
                    pkt.src(),
                    pkt.dst(),
                    pkt.payload().len(),
                    pkt.verify_checksum(),
                );
                pkt.set_src(NAT);
                pkt.fill_checksum();
            }
        }
    }

    #[test]
    fn set_src_tcp_matches_recomputation() {
        let mut p = build(PROTO_TCP, A, B, &tcp_segment());
        let mut pkt = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        pkt.set_src(NAT);
        assert_eq!(pkt.src(), NAT);
        assert!(pkt.verify_checksum());
        let incremental = pkt.checksum();
        pkt.fill_checksum();
        assert_eq!(pkt.checksum(), incremental);
        assert!(l4_checksum_ok(&p));
        // Same result as building the packet with the new address in the first place.
        assert_eq!(p, build(PROTO_TCP, NAT, B, &tcp_segment()));
    }

    #[test]
    fn set_dst_udp_matches_recomputation() {
        let mut p = build(PROTO_UDP, B, NAT, &udp_datagram(b"odd length"));
        let mut pkt = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        pkt.set_dst(A);
        assert_eq!(pkt.dst(), A);
        assert!(pkt.verify_checksum());
        assert!(l4_checksum_ok(&p));
        assert_eq!(p, build(PROTO_UDP, B, A, &udp_datagram(b"odd length")));
    }

    #[test]
    fn udp_without_checksum_stays_without() {
        let mut p = build(PROTO_UDP, A, B, &udp_datagram(b"x"));
        p[26..28].fill(0);
        let mut pkt = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        pkt.set_src(NAT);
        assert!(pkt.verify_checksum());
        assert_eq!(&p[26..28], &[0, 0]);
    }

    #[test]
    fn udp_checksum_never_becomes_zero() {
        // Search for a payload word that makes the rewritten datagram's checksum come out as
        // 0, which UDP must send as 0xffff.
        let hit = (0..=u16::MAX).find_map(|w| {
            let mut p = build(PROTO_UDP, A, B, &udp_datagram(&w.to_be_bytes()));
            let mut pkt = Ipv4Packet::new_checked(&mut p[..]).unwrap();
            pkt.set_src(NAT);
            (u16::from_be_bytes([p[26], p[27]]) == 0xffff).then_some(p)
        });
        let p = hit.expect("some payload yields checksum 0xffff");
        assert!(l4_checksum_ok(&p));
    }

    #[test]
    fn icmp_and_other_fragments_only_touch_ip_header() {
        let icmp = [8u8, 0, 0x12, 0x34, 0, 1, 0, 1];
        let mut p = build(PROTO_ICMP, A, B, &icmp);
        Ipv4Packet::new_checked(&mut p[..]).unwrap().set_src(NAT);
        assert_eq!(&p[20..], &icmp);
        assert!(Ipv4Packet::new_checked(&p[..]).unwrap().verify_checksum());

        // A non-first fragment of a TCP datagram has no TCP header: its payload must not be
        // mistaken for one.
        let mut frag = build(PROTO_TCP, A, B, &tcp_segment());
        frag[6..8].copy_from_slice(&(0x2000u16 | 3).to_be_bytes()); // MF, offset 24
        Ipv4Packet::new_checked(&mut frag[..])
            .unwrap()
            .fill_checksum();
        let payload = frag[20..].to_vec();
        let mut pkt = Ipv4Packet::new_checked(&mut frag[..]).unwrap();
        assert_eq!(pkt.frag_offset(), 24);
        assert!(!pkt.is_first_fragment());
        assert!(pkt.more_fragments());
        pkt.set_src(NAT);
        assert!(pkt.verify_checksum());
        assert_eq!(&frag[20..], &payload[..]);
    }

    #[test]
    fn header_with_options() {
        let mut p = build(PROTO_UDP, A, B, &udp_datagram(b"opt"));
        // Insert 4 bytes of options (NOPs) and fix the lengths.
        p.splice(20..20, [1u8, 1, 1, 1]);
        p[0] = 0x46;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let mut pkt = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        pkt.fill_checksum();
        assert_eq!(pkt.header_len(), 24);
        assert_eq!(&pkt.payload()[..2], &5353u16.to_be_bytes());
        pkt.set_dst(NAT);
        assert!(pkt.verify_checksum());
        let seg = pkt.payload().to_vec();
        let mut zeroed = seg.clone();
        zeroed[6..8].fill(0);
        let want = ipv4_l4_checksum(A, NAT, PROTO_UDP, &zeroed);
        assert_eq!(u16::from_be_bytes([seg[6], seg[7]]), want);
    }
}
