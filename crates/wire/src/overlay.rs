//! The overlay frame: what one switch hands another for each packet, inside the tunnel.
//!
//! ```text
//! inner frame:        [flags u8][0 0 0][src net u32][dst net u32][IPv4 packet]
//! plaintext datagram: [4][0 0 0][sender host u32][inner frame]
//! ```
//!
//! Both nets travel with the packet: nets of different tenants may use the same addresses,
//! so the destination net says which member the address means, and the source net is what
//! the receiving switch checks its policy against (policy holds at both ends). In an
//! encrypted cluster the inner frame is the plaintext of a tunnel data message
//! (`vane_tunnel`); in a plaintext cluster it follows the 8-byte header above. All integers
//! are big-endian.
//!
//! One flag exists, [`FLAG_CSUM_PARTIAL`]: the packet's TCP or UDP checksum field holds
//! only the pseudo-header sum, as the sending instance's kernel left it with checksum
//! offload on (see `vnet`). The receiving switch hands such a packet to its device as
//! partial again, so no host ever sums the payload; between hosts the tunnel's AEAD (or in
//! a plaintext cluster the underlay's UDP checksum) protects it.

use std::net::Ipv4Addr;

use crate::{ipv4_checksum, Ipv4Packet, PROTO_ICMP};

/// Length of the frame header (flags and nets) in front of the IPv4 packet.
pub const NETS_LEN: usize = 12;
/// Frame flag: the packet's L4 checksum is partial (see the module docs).
pub const FLAG_CSUM_PARTIAL: u8 = 1;
/// Message type of a plaintext datagram (tunnel messages are of types 1, 2, 3, 5 and 6).
pub const PLAIN_TYPE: u8 = 4;
/// Length of the plaintext datagram header.
pub const PLAIN_HEADER_LEN: usize = 8;

/// Writes the frame header into the first `NETS_LEN` bytes of `frame`. Returns false if
/// `frame` is too short (nothing written).
pub fn write_nets(frame: &mut [u8], src_net: u32, dst_net: u32, flags: u8) -> bool {
    let Some(head) = frame.get_mut(..NETS_LEN) else {
        return false;
    };
    head[..4].copy_from_slice(&[flags, 0, 0, 0]);
    head[4..8].copy_from_slice(&src_net.to_be_bytes());
    head[8..].copy_from_slice(&dst_net.to_be_bytes());
    true
}

/// Splits an inner frame into its nets, its flags and the packet. `None` if it is shorter
/// than the header, or has flags or reserved bits this version does not know. Cannot panic.
pub fn split_frame(frame: &mut [u8]) -> Option<(u32, u32, u8, &mut [u8])> {
    if frame.len() < NETS_LEN || frame[0] & !FLAG_CSUM_PARTIAL != 0 || frame[1..4] != [0; 3] {
        return None;
    }
    let (head, packet) = frame.split_at_mut(NETS_LEN);
    let src = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let dst = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    Some((src, dst, head[0], packet))
}

/// Writes the plaintext datagram header for `sender` into `out[..PLAIN_HEADER_LEN]`.
/// Returns false if `out` is too short.
pub fn write_plain_header(out: &mut [u8], sender: u32) -> bool {
    let Some(head) = out.get_mut(..PLAIN_HEADER_LEN) else {
        return false;
    };
    head[..4].copy_from_slice(&[PLAIN_TYPE, 0, 0, 0]);
    head[4..].copy_from_slice(&sender.to_be_bytes());
    true
}

/// The sender host of a plaintext datagram and its inner frame. Cannot panic.
pub fn parse_plain(datagram: &mut [u8]) -> Option<(u32, &mut [u8])> {
    if datagram.len() < PLAIN_HEADER_LEN || datagram[0] != PLAIN_TYPE {
        return None;
    }
    let (head, frame) = datagram.split_at_mut(PLAIN_HEADER_LEN);
    Some((
        u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        frame,
    ))
}

/// ICMP type and code of "destination unreachable, fragmentation needed and DF set".
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

/// Writes into `out` the ICMP "fragmentation needed" error (RFC 792, with the next-hop MTU
/// of RFC 1191) that tells the sender of `orig` to send packets of at most `mtu` bytes.
/// It comes from `orig`'s destination, as if the path to it said so, and quotes `orig`'s
/// header and first 8 payload bytes, as the sender's stack needs to find the socket.
/// Returns its length, or `None` if `orig` is not an IPv4 packet or `out` is too short.
pub fn icmp_frag_needed(orig: &[u8], mtu: u16, out: &mut [u8]) -> Option<usize> {
    let ip = Ipv4Packet::new_checked(orig).ok()?;
    let quoted = (ip.header_len() + 8).min(orig.len());
    let len = 20 + 8 + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = 64;
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&ip.dst().octets());
    out[16..20].copy_from_slice(&ip.src().octets());
    let sum = ipv4_checksum(&out[..20]);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    let icmp = &mut out[20..];
    icmp[0] = ICMP_UNREACHABLE;
    icmp[1] = ICMP_FRAG_NEEDED;
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[8..].copy_from_slice(&orig[..quoted]);
    let sum = ipv4_checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(len)
}

/// The source and destination of an IPv4 packet, or `None` if it is not one.
pub fn addresses(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    Some((ip.src(), ip.dst()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = crate::PROTO_UDP;
        p[12..16].copy_from_slice(&[10, 1, 0, 1]);
        p[16..20].copy_from_slice(&[10, 1, 0, 2]);
        let sum = ipv4_checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn nets_round_trip() {
        let mut frame = vec![0u8; NETS_LEN + 3];
        assert!(write_nets(&mut frame, 7, 0x0102_0304, FLAG_CSUM_PARTIAL));
        let (src, dst, flags, packet) = split_frame(&mut frame).unwrap();
        assert_eq!((src, dst, flags, packet.len()), (7, 0x0102_0304, 1, 3));
        assert!(split_frame(&mut [0u8; NETS_LEN - 1]).is_none());
        assert!(!write_nets(&mut [0u8; NETS_LEN - 1], 1, 2, 0));
        // Unknown flags and reserved bits are refused.
        frame[0] = 2;
        assert!(split_frame(&mut frame).is_none());
        frame[0] = 0;
        frame[2] = 1;
        assert!(split_frame(&mut frame).is_none());
    }

    #[test]
    fn plain_header_round_trips_and_refuses_other_types() {
        let mut d = vec![0u8; PLAIN_HEADER_LEN + 2];
        assert!(write_plain_header(&mut d, 42));
        let (sender, frame) = parse_plain(&mut d).unwrap();
        assert_eq!((sender, frame.len()), (42, 2));
        d[0] = 3;
        assert!(parse_plain(&mut d).is_none());
        assert!(parse_plain(&mut [PLAIN_TYPE; 7]).is_none());
    }

    #[test]
    fn frag_needed_quotes_the_packet_and_checks_out() {
        let orig = udp_packet(1500);
        let mut out = [0u8; 128];
        let n = icmp_frag_needed(&orig, 1420, &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 28);
        let ip = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src(), Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(ip.dst(), Ipv4Addr::new(10, 1, 0, 1));
        let icmp = ip.payload();
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1420);
        assert_eq!(ipv4_checksum(icmp), 0);
        assert_eq!(&icmp[8..], &orig[..28]);
        assert!(icmp_frag_needed(&orig, 1420, &mut [0u8; 40]).is_none());
        assert!(icmp_frag_needed(&[1, 2, 3], 1420, &mut out).is_none());
    }
}
