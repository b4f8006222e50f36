//! The transport fields the switch keys flows and policy on.
//!
//! The switch does not need full TCP/UDP/ICMP views, only the few fields that identify a flow,
//! so this reads them straight out of a checked [`Ipv4Packet`] without a second validation
//! step; fields that are not present (a short or non-first fragment) read as zero.

use crate::ipv4::{Ipv4Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// ICMP type of an echo reply.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP type of an echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Transport "ports" of a packet, as used for flow keys and port policies.
///
/// - TCP and UDP: the source and destination ports, read from the first fragment.
/// - ICMP echo request and reply: the echo identifier as both ports, so that a reply (whose
///   identifier is the request's) matches the request's flow reversed.
/// - Anything else, other ICMP types, and fragments other than the first: `(0, 0)`. Such a
///   packet can match a flow or a port policy only by protocol and address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4Ports {
    /// Source port (or ICMP echo identifier).
    pub src: u16,
    /// Destination port (or ICMP echo identifier).
    pub dst: u16,
    /// The ICMP type, for an ICMP first fragment with a type byte.
    pub icmp_type: Option<u8>,
    /// Whether this is a TCP segment with SYN set and ACK clear: an attempt to open a
    /// connection.
    pub tcp_syn: bool,
}

impl L4Ports {
    /// Reads the transport fields of `pkt`. Cannot panic: every read is bounds-checked
    /// against the payload.
    pub fn of<T: AsRef<[u8]>>(pkt: &Ipv4Packet<T>) -> Self {
        if !pkt.is_first_fragment() {
            return L4Ports::default();
        }
        let payload = pkt.payload();
        match pkt.protocol() {
            PROTO_TCP | PROTO_UDP => {
                let Some(&[s0, s1, d0, d1]) = payload.first_chunk::<4>() else {
                    return L4Ports::default();
                };
                let tcp_syn = pkt.protocol() == PROTO_TCP
                    && payload
                        .get(13)
                        .is_some_and(|f| f & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN);
                L4Ports {
                    src: u16::from_be_bytes([s0, s1]),
                    dst: u16::from_be_bytes([d0, d1]),
                    icmp_type: None,
                    tcp_syn,
                }
            }
            PROTO_ICMP => {
                let icmp_type = payload.first().copied();
                let ident = match (icmp_type, payload.get(4..6)) {
                    (Some(ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY), Some(&[i0, i1])) => {
                        u16::from_be_bytes([i0, i1])
                    }
                    _ => 0,
                };
                L4Ports {
                    src: ident,
                    dst: ident,
                    icmp_type,
                    tcp_syn: false,
                }
            }
            _ => L4Ports::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = proto;
        p[20..].copy_from_slice(l4);
        p
    }

    fn ports(p: &[u8]) -> L4Ports {
        L4Ports::of(&Ipv4Packet::new_checked(p).unwrap())
    }

    #[test]
    fn tcp_ports_and_syn() {
        let mut seg = [0u8; 20];
        seg[0..2].copy_from_slice(&1234u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[13] = TCP_FLAG_SYN;
        let p = ports(&packet(PROTO_TCP, 0, &seg));
        assert_eq!(
            (p.src, p.dst, p.tcp_syn, p.icmp_type),
            (1234, 80, true, None)
        );
        seg[13] = TCP_FLAG_SYN | TCP_FLAG_ACK;
        assert!(!ports(&packet(PROTO_TCP, 0, &seg)).tcp_syn);
        // Ports present but flags cut off.
        let p = ports(&packet(PROTO_TCP, 0, &seg[..4]));
        assert_eq!((p.src, p.dst, p.tcp_syn), (1234, 80, false));
    }

    #[test]
    fn udp_ports_need_four_bytes() {
        let dgram = [0x14, 0xe9, 0x00, 0x35, 0, 8, 0, 0];
        let p = ports(&packet(PROTO_UDP, 0, &dgram));
        assert_eq!((p.src, p.dst), (5353, 53));
        assert_eq!(
            ports(&packet(PROTO_UDP, 0, &dgram[..3])),
            L4Ports::default()
        );
    }

    #[test]
    fn icmp_echo_uses_identifier() {
        let req = [ICMP_ECHO_REQUEST, 0, 0, 0, 0xab, 0xcd, 0, 1];
        let p = ports(&packet(PROTO_ICMP, 0, &req));
        assert_eq!((p.src, p.dst, p.icmp_type), (0xabcd, 0xabcd, Some(8)));
        let reply = [ICMP_ECHO_REPLY, 0, 0, 0, 0xab, 0xcd, 0, 1];
        assert_eq!(ports(&packet(PROTO_ICMP, 0, &reply)).src, 0xabcd);
        let unreachable = [3u8, 1, 0, 0, 0xab, 0xcd, 0, 0];
        let p = ports(&packet(PROTO_ICMP, 0, &unreachable));
        assert_eq!((p.src, p.dst, p.icmp_type), (0, 0, Some(3)));
        assert_eq!(ports(&packet(PROTO_ICMP, 0, &[])), L4Ports::default());
    }

    #[test]
    fn later_fragments_and_other_protocols_have_no_ports() {
        let seg = [0x04, 0xd2, 0x00, 0x50, 0, 0, 0, 0];
        assert_eq!(ports(&packet(PROTO_TCP, 1, &seg)), L4Ports::default());
        assert_eq!(ports(&packet(47, 0, &seg)), L4Ports::default());
        // More-fragments set but offset 0 is the first fragment: ports are there.
        assert_eq!(ports(&packet(PROTO_TCP, 0x2000, &seg)).dst, 80);
    }
}
