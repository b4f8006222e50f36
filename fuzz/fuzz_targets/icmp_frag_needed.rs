//! Untrusted input: a packet from an instance too large for the tunnel, any bytes, which
//! the dataplane answers with ICMP "fragmentation needed" (`overlay::icmp_frag_needed`).
//! Input: `[mtu u16][room u16][packet]`, where room is the size of the output buffer.
//! Asserts: no panic; the answer fits the buffer and is an IPv4 ICMP packet with correct
//! IP and ICMP checksums, from the packet's destination to its source, type 3 code 4 with
//! the MTU, quoting the packet's header and first 8 payload bytes; refused only when the
//! input is not IPv4 or the buffer is too small.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_fuzz::{internet_checksum, PROTO_ICMP};
use vane_wire::{overlay, Ipv4Packet};

fuzz_target!(|data: &[u8]| {
    let Some((&[m0, m1, r0, r1], orig)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mtu = u16::from_be_bytes([m0, m1]);
    let room = usize::from(u16::from_be_bytes([r0, r1])) % 512;
    let mut out = vec![0u8; room];
    let answer = overlay::icmp_frag_needed(orig, mtu, &mut out);
    let Ok(ip) = Ipv4Packet::new_checked(orig) else {
        assert_eq!(answer, None);
        return;
    };
    let quoted = (ip.header_len() + 8).min(orig.len());
    let Some(n) = answer else {
        assert!(28 + quoted > room, "refused though it fits");
        return;
    };
    assert_eq!(n, 28 + quoted);
    assert!(n <= room);
    let reply = Ipv4Packet::new_checked(&out[..n]).expect("the answer is IPv4");
    assert!(reply.verify_checksum());
    assert_eq!(reply.protocol(), PROTO_ICMP);
    assert_eq!((reply.src(), reply.dst()), (ip.dst(), ip.src()));
    assert_eq!(reply.total_len(), n);
    let icmp = reply.payload();
    assert_eq!(internet_checksum(icmp, 0), 0);
    assert_eq!((icmp[0], icmp[1]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), mtu);
    assert_eq!(&icmp[8..], &orig[..quoted]);
});
