//! The internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Address rewriting (egress NAT) touches 4 bytes of a packet that may be 64 KiB long; the
//! incremental form fixes the IPv4 and TCP/UDP checksums in constant time instead of summing
//! the whole segment again.

use std::net::Ipv4Addr;

/// One's-complement sum of `bytes` as big-endian 16-bit words (odd tail padded with zero),
/// added to `acc`. Not folded.
pub(crate) fn sum(bytes: &[u8], mut acc: u64) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds the carries of a wide one's-complement sum into 16 bits.
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves acc <= 0xffff.
    acc as u16
}

/// The internet checksum of `bytes`: the complement of their one's-complement sum.
///
/// Over an IPv4 header whose checksum field is zero this gives the value to store; over a
/// header with a correct checksum it gives 0.
pub fn ipv4_checksum(bytes: &[u8]) -> u16 {
    !fold(sum(bytes, 0))
}

/// The TCP or UDP checksum of `segment` (header with a zero checksum field, plus payload)
/// carried between `src` and `dst`, including the IPv4 pseudo-header.
///
/// Returns the value as computed; UDP senders store 0xffff instead of 0, because 0 there
/// means "no checksum".
pub fn ipv4_l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = sum(&src.octets(), 0);
    acc = sum(&dst.octets(), acc);
    acc += u64::from(proto);
    acc += segment.len() as u64;
    !fold(sum(segment, acc))
}

/// Updates checksum `hc` for a 4-byte field changing from `old` to `new` (RFC 1624 eqn. 3:
/// HC' = ~(~HC + ~m + m')), which unlike eqn. 2 never produces the -0 that RFC 1624 warns of.
pub(crate) fn adjust(hc: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut acc = u64::from(!hc);
    for i in [0, 2] {
        let m = u16::from_be_bytes([old[i], old[i + 1]]);
        let m_new = u16::from_be_bytes([new[i], new[i + 1]]);
        acc += u64::from(!m) + u64::from(m_new);
    }
    !fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: sum 0xddf2, checksum its complement.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(ipv4_checksum(&bytes), !0xddf2);
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(
            ipv4_checksum(&[0x12, 0x34, 0x56]),
            ipv4_checksum(&[0x12, 0x34, 0x56, 0])
        );
    }

    #[test]
    fn adjust_matches_recomputation() {
        let mut data = [0x45u8, 0, 0, 20, 1, 2, 3, 4, 10, 0, 0, 1, 10, 0, 0, 2];
        let before = ipv4_checksum(&data);
        let old = [10, 0, 0, 1];
        let new = [100, 64, 0, 7];
        data[8..12].copy_from_slice(&new);
        assert_eq!(adjust(before, old, new), ipv4_checksum(&data));
    }
}
