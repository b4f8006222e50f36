//! The `virtio_net_hdr` in front of every packet on a TUN device opened with
//! `IFF_VNET_HDR`, and software segmentation of the large TCP segments it announces.
//!
//! With offloads on, an instance's kernel hands the switch a TCP stream in segments of up
//! to 64 KiB (`gso_type` TCPv4, cut into `gso_size` pieces by whoever sends them on) whose
//! checksum is left partial: the TCP checksum field holds only the pseudo-header sum, and
//! `csum_start`/`csum_offset` say where the sum over the rest belongs. Delivered to another
//! local device, such a packet goes on as it is; for the tunnel, [`TcpSegments`] cuts it
//! into MTU-sized segments, each with its own IP and TCP header and its checksum still
//! partial, which the receiving switch hands to its device as partial again. No byte of
//! payload is summed anywhere on the way: the tunnel's AEAD protects it between hosts.
//!
//! The header's integers are in the host's byte order for the legacy header vane uses;
//! this reads and writes them little-endian, as on x86-64 and aarch64.

mod coalesce;

pub use coalesce::TcpCoalescer;

use crate::checksum::{fold, sum};
use crate::{Ipv4Packet, PROTO_TCP, PROTO_UDP};

/// Length of `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum is partial (see the module docs).
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into the type: the segments carry ECN (CWR on the first).
pub const GSO_ECN: u8 = 0x80;

/// A parsed `virtio_net_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (IP and TCP) in front of the payload, a hint.
    pub hdr_len: u16,
    /// Payload bytes per segment when the packet is cut.
    pub gso_size: u16,
    /// Where the partial checksum's sum starts (the L4 header), from the IP header.
    pub csum_start: u16,
    /// Where in the L4 header the checksum field is.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// A complete packet: nothing to segment, checksums filled in.
    pub const PLAIN: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the header at the start of `bytes`. Cannot panic.
    pub fn parse(bytes: &[u8]) -> Option<VnetHdr> {
        let b = bytes.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`; false if shorter.
    pub fn write(&self, out: &mut [u8]) -> bool {
        let Some(b) = out.get_mut(..VNET_HDR_LEN) else {
            return false;
        };
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        true
    }

    /// Whether the packet is a large TCP segment to be cut.
    pub fn is_tcp_gso(&self) -> bool {
        self.gso_type & !GSO_ECN == GSO_TCPV4 && self.gso_size > 0
    }

    /// Whether the L4 checksum is partial.
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    /// The header that marks the TCP or UDP checksum of IPv4 packet `pkt` partial, as the
    /// receiving side of the tunnel gives it to its device. `None` for other packets.
    pub fn partial_for(pkt: &[u8]) -> Option<VnetHdr> {
        let ip = Ipv4Packet::new_checked(pkt).ok()?;
        let offset: u16 = match ip.protocol() {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => return None,
        };
        let start = ip.header_len();
        if ip.frag_offset() != 0
            || ip.more_fragments()
            || pkt.len() < start + usize::from(offset) + 2
        {
            return None;
        }
        Some(VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: start as u16,
            csum_offset: offset,
            ..VnetHdr::PLAIN
        })
    }
}

/// Complements the checksum field `hdr` points at. Rewriting an address adjusts a
/// checksum incrementally as if it were complete (RFC 1624); for a partial one, the
/// pseudo-header sum, the same adjustment is right on its complement. So a switch that
/// rewrites addresses of a packet with a partial checksum complements the field before and
/// after. False (nothing changed) unless `hdr` points at the TCP or UDP checksum field of
/// IPv4 packet `pkt`: the header comes from the instance, and a field elsewhere (an address,
/// a port) would have the switch check other bytes than the ones it passes on.
pub fn complement_checksum_field(pkt: &mut [u8], hdr: &VnetHdr) -> bool {
    let Some(l4) = VnetHdr::partial_for(pkt) else {
        return false;
    };
    if (hdr.csum_start, hdr.csum_offset) != (l4.csum_start, l4.csum_offset) {
        return false;
    }
    let field = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
    let Some(bytes) = pkt.get_mut(field..field + 2) else {
        return false;
    };
    bytes[0] = !bytes[0];
    bytes[1] = !bytes[1];
    true
}

/// Finishes the partial checksum of `pkt` as `hdr` describes it, as a device that took it
/// would: sums from `csum_start` to the end (the field holds the pseudo-header sum) and
/// stores the complement. For a peer that takes only whole packets (a WireGuard client).
/// False (nothing changed) if `hdr` points outside `pkt`.
pub fn complete_checksum(pkt: &mut [u8], hdr: &VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if start > pkt.len() || field + 2 > pkt.len() {
        return false;
    }
    let mut value = !fold(sum(&pkt[start..], 0));
    if value == 0 && pkt.get(9) == Some(&PROTO_UDP) {
        value = 0xffff;
    }
    pkt[field..field + 2].copy_from_slice(&value.to_be_bytes());
    true
}

/// The partial checksum of an L4 segment of `l4_len` bytes: the folded pseudo-header sum.
fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize) -> u16 {
    let acc = sum(&dst, sum(&src, 0)) + u64::from(proto) + l4_len as u64;
    fold(acc)
}

/// The TCP/IPv4 segments of a large segment from a device, cut at `gso_size` payload bytes
/// (see the module docs). Each has the original headers with its own IP length, id and
/// header checksum, its own sequence number, FIN and PSH only on the last, CWR only on the
/// first, and a partial TCP checksum.
pub struct TcpSegments<'a> {
    pkt: &'a [u8],
    headers: usize,
    ip_header: usize,
    mss: usize,
    /// Offset of the next payload byte to send.
    at: usize,
    index: u16,
}

impl<'a> TcpSegments<'a> {
    /// The segments of `pkt`, a TCP/IPv4 packet with `hdr.gso_size` > 0; `None` if it is not
    /// one, or its headers are not whole.
    pub fn new(pkt: &'a [u8], hdr: &VnetHdr) -> Option<TcpSegments<'a>> {
        let ip = Ipv4Packet::new_checked(pkt).ok()?;
        if ip.protocol() != PROTO_TCP || hdr.gso_size == 0 || ip.frag_offset() != 0 {
            return None;
        }
        let ip_header = ip.header_len();
        let tcp_header = usize::from(*pkt.get(ip_header + 12)? >> 4) * 4;
        let headers = ip_header + tcp_header;
        if tcp_header < 20 || headers > ip.total_len() {
            return None;
        }
        Some(TcpSegments {
            pkt: &pkt[..ip.total_len()],
            headers,
            ip_header,
            mss: usize::from(hdr.gso_size),
            at: headers,
            index: 0,
        })
    }

    /// Length of the longest segment: the headers and `gso_size` payload bytes.
    pub fn max_segment_len(&self) -> usize {
        self.headers + self.mss
    }

    /// Writes the next segment into `out` and returns its length; `None` when all were
    /// written (or `out` is shorter than [`TcpSegments::max_segment_len`]).
    pub fn next_into(&mut self, out: &mut [u8]) -> Option<usize> {
        let payload_len = self.pkt.len() - self.at;
        if payload_len == 0 && self.index > 0 {
            return None;
        }
        let take = payload_len.min(self.mss);
        let len = self.headers + take;
        let out = out.get_mut(..len)?;
        let first = self.index == 0;
        let last = self.at + take == self.pkt.len();
        out[..self.headers].copy_from_slice(&self.pkt[..self.headers]);
        out[self.headers..].copy_from_slice(&self.pkt[self.at..self.at + take]);
        let (ih, p) = (self.ip_header, &self.pkt);
        // IP: length, id, header checksum.
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let id = u16::from_be_bytes([p[4], p[5]]).wrapping_add(self.index);
        out[4..6].copy_from_slice(&id.to_be_bytes());
        out[10..12].fill(0);
        let ip_sum = !fold(sum(&out[..ih], 0));
        out[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        // TCP: sequence number, flags, partial checksum.
        let seq = u32::from_be_bytes([p[ih + 4], p[ih + 5], p[ih + 6], p[ih + 7]])
            .wrapping_add((self.at - self.headers) as u32);
        out[ih + 4..ih + 8].copy_from_slice(&seq.to_be_bytes());
        const FIN: u8 = 0x01;
        const PSH: u8 = 0x08;
        const CWR: u8 = 0x80;
        let mut flags = p[ih + 13];
        if !last {
            flags &= !(FIN | PSH);
        }
        if !first {
            flags &= !CWR;
        }
        out[ih + 13] = flags;
        let src = [p[12], p[13], p[14], p[15]];
        let dst = [p[16], p[17], p[18], p[19]];
        let partial = pseudo_header_sum(src, dst, PROTO_TCP, len - ih);
        out[ih + 16..ih + 18].copy_from_slice(&partial.to_be_bytes());
        self.at += take;
        self.index += 1;
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    pub(super) use super::complete_checksum;
    use super::*;
    use crate::ipv4_l4_checksum;
    use std::net::Ipv4Addr;

    /// A TCP/IPv4 packet with `payload` bytes counting up, flags FIN|PSH|ACK|CWR, and the
    /// partial checksum a kernel leaves.
    pub(super) fn tcp_packet(payload: usize) -> Vec<u8> {
        let len = 20 + 32 + payload;
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 1, 0, 1]);
        p[16..20].copy_from_slice(&[10, 1, 0, 2]);
        p[20..22].copy_from_slice(&5555u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[24..28].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        p[32] = 8 << 4; // 32-byte header: 12 bytes of options
        p[33] = 0x80 | 0x10 | 0x08 | 0x01;
        for (i, b) in p[52..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1388,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        assert!(h.write(&mut b));
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert!(h.is_tcp_gso() && h.needs_csum());
        assert_eq!(VnetHdr::parse(&b[..9]), None);
        assert!(!h.write(&mut [0u8; 9]));
    }

    #[test]
    fn segments_reassemble_to_the_stream_with_valid_checksums() {
        let pkt = tcp_packet(10_000);
        let hdr = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            ..VnetHdr::partial_for(&pkt).unwrap()
        };
        let mut segs = TcpSegments::new(&pkt, &hdr).unwrap();
        assert_eq!(segs.max_segment_len(), 52 + 1400);
        let mut stream = Vec::new();
        let mut out = vec![0u8; 2000];
        let mut n = 0usize;
        while let Some(len) = segs.next_into(&mut out) {
            let seg = &mut out[..len];
            let ip = Ipv4Packet::new_checked(&*seg).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.ident(), 0xfff0u16.wrapping_add(n as u16));
            let seq = u32::from_be_bytes(seg[24..28].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(n as u32 * 1400));
            let flags = seg[33];
            let last = len < 52 + 1400;
            assert_eq!(flags & 0x09 != 0, last, "FIN/PSH only on the last");
            assert_eq!(flags & 0x80 != 0, n == 0, "CWR only on the first");
            // Completing the partial checksum gives the real one.
            let hdr = VnetHdr::partial_for(seg).unwrap();
            assert!(complete_checksum(seg, &hdr));
            let stored = u16::from_be_bytes([seg[36], seg[37]]);
            seg[36..38].fill(0);
            let real = ipv4_l4_checksum(
                Ipv4Addr::new(10, 1, 0, 1),
                Ipv4Addr::new(10, 1, 0, 2),
                PROTO_TCP,
                &seg[20..],
            );
            assert_eq!(stored, real);
            stream.extend_from_slice(&seg[52..]);
            n += 1;
        }
        assert_eq!(n, 8);
        assert_eq!(stream, pkt[52..]);
        assert!(segs.next_into(&mut out).is_none());
    }

    #[test]
    fn only_the_l4_checksum_field_is_complemented() {
        let pkt = tcp_packet(100);
        let tcp = VnetHdr::partial_for(&pkt).unwrap();
        let mut p = pkt.clone();
        assert!(complement_checksum_field(&mut p, &tcp));
        assert_eq!((p[36], p[37]), (!pkt[36], !pkt[37]));
        // A header naming any other field, as an instance may write one: the source
        // address would pass the switch's check complemented and leave as it was.
        for (csum_start, csum_offset) in [(0, 12), (0, 16), (20, 2), (20, 0), (21, 16)] {
            let hdr = VnetHdr {
                csum_start,
                csum_offset,
                ..tcp
            };
            let mut p = pkt.clone();
            assert!(!complement_checksum_field(&mut p, &hdr));
            assert_eq!(p, pkt);
        }
        let mut not_ip = vec![0u8; 64];
        assert!(!complement_checksum_field(&mut not_ip, &tcp));
    }

    #[test]
    fn refuses_what_is_not_tcp_or_too_short() {
        let pkt = tcp_packet(100);
        let hdr = VnetHdr {
            gso_size: 10,
            ..VnetHdr::PLAIN
        };
        let mut udp = pkt.clone();
        udp[9] = PROTO_UDP;
        assert!(TcpSegments::new(&udp, &hdr).is_none());
        assert!(TcpSegments::new(&pkt, &VnetHdr::PLAIN).is_none());
        assert!(TcpSegments::new(&pkt[..40], &hdr).is_none());
        let mut segs = TcpSegments::new(&pkt, &hdr).unwrap();
        assert!(segs.next_into(&mut [0u8; 20]).is_none());
        assert!(!complete_checksum(
            &mut [0u8; 10],
            &VnetHdr::partial_for(&pkt).unwrap()
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for i in 0..50_000usize {
            let mut buf: Vec<u8> = (0..(i % 120))
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            if buf.len() >= 40 {
                buf[0] = 0x45;
                let len = buf.len() as u16;
                buf[2..4].copy_from_slice(&len.to_be_bytes());
                buf[6] = 0;
                buf[7] = 0;
                buf[9] = PROTO_TCP;
            }
            let hdr = VnetHdr::parse(&buf).unwrap_or_default();
            let _ = complete_checksum(&mut buf.clone(), &hdr);
            let gso = VnetHdr {
                gso_size: (i % 50) as u16,
                ..hdr
            };
            if let Some(mut s) = TcpSegments::new(&buf, &gso) {
                let mut out = [0u8; 256];
                while s.next_into(&mut out).is_some() {}
            }
        }
    }
}
