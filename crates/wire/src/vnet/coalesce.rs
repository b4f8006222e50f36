//! Receive-side coalescing: merging the TCP segments that [`TcpSegments`] cut back into one
//! large segment, with its virtio header, for a device that takes them.

#[cfg(doc)]
use super::TcpSegments;
use super::{pseudo_header_sum, VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, VNET_HDR_LEN};
use crate::checksum::{fold, sum};
use crate::{Ipv4Packet, PROTO_TCP};

/// Merges consecutive TCP/IPv4 segments of one flow, as [`TcpSegments`] cut them, back
/// into one large segment for a device that takes them (virtio header included): the
/// receiving kernel then handles one packet where it would have handled dozens. Only
/// plain data segments join (ACK, and PSH on the last), in sequence, with identical
/// headers otherwise, all of one size but the last; anything else is written as it is.
pub struct TcpCoalescer {
    /// Virtio header, then the merged packet.
    buf: Vec<u8>,
    /// Bytes of the merged packet in `buf` (after the virtio header).
    len: usize,
    headers: usize,
    mss: usize,
    count: usize,
    next_seq: u32,
    /// A shorter segment or PSH ended the run.
    closed: bool,
    /// Where the merged packet goes (the caller's port number).
    tag: u32,
}

const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
/// Largest merged packet: the IPv4 length field's limit.
const MAX_MERGED: usize = 65535;

impl Default for TcpCoalescer {
    fn default() -> Self {
        TcpCoalescer {
            buf: vec![0; VNET_HDR_LEN + MAX_MERGED],
            len: 0,
            headers: 0,
            mss: 0,
            count: 0,
            next_seq: 0,
            closed: false,
            tag: 0,
        }
    }
}

impl TcpCoalescer {
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `pkt` (a TCP/IPv4 segment with a partial checksum) for `tag`. False when it
    /// cannot join what waits, or cannot be merged at all: the caller then takes what waits
    /// ([`TcpCoalescer::take`]) and tries once more, or writes `pkt` as it is.
    pub fn push(&mut self, tag: u32, pkt: &[u8]) -> bool {
        let Some((headers, seq, payload)) = mergeable(pkt) else {
            return false;
        };
        if self.count == 0 {
            self.buf[VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()].copy_from_slice(pkt);
            (self.len, self.headers, self.mss, self.count) = (pkt.len(), headers, payload, 1);
            self.next_seq = seq.wrapping_add(payload as u32);
            self.closed = pkt[20 + 13] & TCP_PSH != 0;
            self.tag = tag;
            return true;
        }
        let first = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.headers];
        let same_headers = headers == self.headers
            && pkt[..2] == first[..2]
            && pkt[6..10] == first[6..10]
            && pkt[12..24] == first[12..24]
            && pkt[28..33] == first[28..33]
            && pkt[33] & !TCP_PSH == first[33] & !TCP_PSH
            && pkt[34..36] == first[34..36]
            && pkt[38..headers] == first[38..headers];
        if tag != self.tag
            || self.closed
            || !same_headers
            || seq != self.next_seq
            || payload > self.mss
            || self.len + payload > MAX_MERGED
        {
            return false;
        }
        let at = VNET_HDR_LEN + self.len;
        self.buf[at..at + payload].copy_from_slice(&pkt[headers..]);
        self.len += payload;
        self.count += 1;
        self.next_seq = seq.wrapping_add(payload as u32);
        if payload < self.mss || pkt[33] & TCP_PSH != 0 {
            self.buf[VNET_HDR_LEN + 33] |= pkt[33] & TCP_PSH;
            self.closed = true;
        }
        true
    }

    /// What waits, ready for the device: its tag and the virtio header and packet. Empties
    /// the coalescer.
    pub fn take(&mut self) -> Option<(u32, &[u8])> {
        if self.count == 0 {
            return None;
        }
        let count = std::mem::take(&mut self.count);
        let (len, headers) = (self.len, self.headers);
        let pkt = &mut self.buf[VNET_HDR_LEN..VNET_HDR_LEN + len];
        let mut hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::PLAIN
        };
        if count > 1 {
            pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            pkt[10..12].fill(0);
            let ip_sum = !fold(sum(&pkt[..20], 0));
            pkt[10..12].copy_from_slice(&ip_sum.to_be_bytes());
            let src = [pkt[12], pkt[13], pkt[14], pkt[15]];
            let dst = [pkt[16], pkt[17], pkt[18], pkt[19]];
            let partial = pseudo_header_sum(src, dst, PROTO_TCP, len - 20);
            pkt[36..38].copy_from_slice(&partial.to_be_bytes());
            hdr.gso_type = GSO_TCPV4;
            hdr.hdr_len = headers as u16;
            hdr.gso_size = self.mss as u16;
        }
        hdr.write(&mut self.buf);
        Some((self.tag, &self.buf[..VNET_HDR_LEN + len]))
    }
}

/// For a segment that may be merged: its header length, sequence number and payload
/// length. A TCP/IPv4 segment without IP options or fragmentation, with only ACK (and
/// PSH) set, and some payload.
fn mergeable(pkt: &[u8]) -> Option<(usize, u32, usize)> {
    let ip = Ipv4Packet::new_checked(pkt).ok()?;
    if ip.header_len() != 20
        || ip.protocol() != PROTO_TCP
        || ip.frag_offset() != 0
        || ip.more_fragments()
        || ip.total_len() != pkt.len()
    {
        return None;
    }
    let tcp_header = usize::from(*pkt.get(20 + 12)? >> 4) * 4;
    let headers = 20 + tcp_header;
    if tcp_header < 20 || headers >= pkt.len() || pkt[33] & !TCP_PSH != TCP_ACK {
        return None;
    }
    let seq = u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]);
    Some((headers, seq, pkt.len() - headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4_l4_checksum;
    use crate::vnet::tests::{complete_checksum, tcp_packet};
    use crate::vnet::TcpSegments;
    use std::net::Ipv4Addr;

    #[test]
    fn coalesced_segments_are_the_original_stream() {
        let mut pkt = tcp_packet(10_000);
        pkt[33] = 0x10 | 0x08; // ACK|PSH: mergeable, PSH on the last segment only
        let hdr = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            ..VnetHdr::partial_for(&pkt).unwrap()
        };
        let mut segs = TcpSegments::new(&pkt, &hdr).unwrap();
        let mut out = vec![0u8; 2000];
        let mut c = TcpCoalescer::default();
        while let Some(len) = segs.next_into(&mut out) {
            assert!(c.push(7, &out[..len]));
        }
        // The run is closed by the short last segment.
        let mut more = tcp_packet(100);
        more[33] = 0x10;
        assert!(!c.push(7, &more));
        let (tag, merged) = c.take().unwrap();
        assert_eq!(tag, 7);
        let vh = VnetHdr::parse(merged).unwrap();
        assert!(vh.is_tcp_gso() && vh.needs_csum());
        assert_eq!((vh.gso_size, vh.hdr_len, vh.csum_start), (1400, 52, 20));
        let merged = &merged[VNET_HDR_LEN..];
        assert_eq!(merged.len(), pkt.len());
        assert_eq!(merged[52..], pkt[52..]);
        assert!(Ipv4Packet::new_checked(merged).unwrap().verify_checksum());
        assert_eq!(merged[33], 0x18, "PSH of the last segment kept");
        // The partial checksum completes to the real one over the whole packet.
        let mut m = merged.to_vec();
        complete_checksum(&mut m, &vh);
        let stored = u16::from_be_bytes([m[36], m[37]]);
        m[36..38].fill(0);
        let src = Ipv4Addr::new(10, 1, 0, 1);
        let dst = Ipv4Addr::new(10, 1, 0, 2);
        assert_eq!(stored, ipv4_l4_checksum(src, dst, PROTO_TCP, &m[20..]));
        assert!(c.is_empty() && c.take().is_none());
    }

    #[test]
    fn only_plain_data_in_sequence_joins() {
        let mut a = tcp_packet(1000);
        a[33] = 0x10;
        let mut c = TcpCoalescer::default();
        assert!(c.push(1, &a));
        // Another port, a gap in sequence, another flow, SYN: none joins.
        assert!(!c.push(2, &a));
        assert!(!c.push(1, &a), "same sequence number again");
        let mut b = a.clone();
        b[24..28].copy_from_slice(&0xffff_fff0u32.wrapping_add(1000).to_be_bytes());
        let mut other = b.clone();
        other[22] ^= 1;
        assert!(!c.push(1, &other));
        let mut syn = b.clone();
        syn[33] = 0x12;
        assert!(!c.push(1, &syn));
        assert!(c.push(1, &b));
        let (_, merged) = c.take().unwrap();
        assert_eq!(merged.len(), VNET_HDR_LEN + 52 + 2000);
        // A lone segment goes out as it came, partial checksum marked, not as GSO.
        assert!(c.push(1, &a));
        let (_, single) = c.take().unwrap();
        let vh = VnetHdr::parse(single).unwrap();
        assert!(!vh.is_tcp_gso() && vh.needs_csum());
        assert_eq!(&single[VNET_HDR_LEN..], &a[..]);
    }
}
