//! Untrusted input: an IPv4 packet as an instance writes it to its device or another host's
//! switch sends it, any bytes. Input: `[rewrite u8][address 4][packet]`. Runs
//! `Ipv4Packet::new_checked`, every accessor, `L4Ports::of` and `overlay::addresses`, then
//! rewrites the source or destination address as egress NAT does. Asserts: no panic; the
//! lengths the view reports lie inside the buffer; a rewrite changes only the address and
//! the checksum fields, and leaves a correct IP header checksum and a correct TCP or UDP
//! checksum correct.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use vane_fuzz::{internet_checksum, l4_checksum_correct, PROTO_TCP, PROTO_UDP};
use vane_wire::{overlay, Ipv4Packet, L4Ports};

fuzz_target!(|data: &[u8]| {
    let Some((&[rewrite, a, b, c, d], packet)) = data.split_first_chunk::<5>() else {
        return;
    };
    let new_addr = Ipv4Addr::new(a, b, c, d);
    let mut buf = packet.to_vec();
    let Ok(ip) = Ipv4Packet::new_checked(&buf[..]) else {
        assert!(overlay::addresses(&buf).is_none());
        return;
    };
    let (header_len, total_len) = (ip.header_len(), ip.total_len());
    assert!(20 <= header_len && header_len <= total_len && total_len <= buf.len());
    assert_eq!(ip.payload().len(), total_len - header_len);
    let (src, dst, proto) = (ip.src(), ip.dst(), ip.protocol());
    assert_eq!(overlay::addresses(&buf), Some((src, dst)));
    let _ = (ip.ident(), ip.ttl(), ip.checksum(), ip.dont_fragment());
    let ports = L4Ports::of(&ip);
    if !ip.is_first_fragment() {
        assert_eq!(ports, L4Ports::default());
    }

    // What the rewrite promises to keep correct: the header checksum, and the TCP or UDP
    // checksum of a first fragment long enough to hold its field (a UDP field of zero means
    // "no checksum" and stays so).
    let header_ok = internet_checksum(&buf[..header_len], 0) == 0;
    let segment = &buf[header_len..total_len];
    let l4_field = match proto {
        PROTO_TCP if ip.is_first_fragment() && segment.len() >= 18 => Some(16),
        PROTO_UDP if ip.is_first_fragment() && segment.len() >= 8 => Some(6),
        _ => None,
    };
    let l4_ok = l4_field.filter(|&at| {
        (proto == PROTO_TCP || segment[at..at + 2] != [0, 0])
            && l4_checksum_correct(src, dst, proto, segment)
    });
    let before = buf.clone();

    let rewrite_src = rewrite & 1 == 0;
    let mut ip = Ipv4Packet::new_checked(&mut buf[..]).expect("parsed above");
    if rewrite_src {
        ip.set_src(new_addr);
    } else {
        ip.set_dst(new_addr);
    }
    let (src, dst) = (ip.src(), ip.dst());
    assert_eq!(if rewrite_src { src } else { dst }, new_addr);
    assert_eq!(ip.header_len(), header_len);
    assert_eq!(ip.total_len(), total_len);

    let address = if rewrite_src { 12..16 } else { 16..20 };
    let l4_range = l4_field.map(|at| header_len + at..header_len + at + 2);
    for (i, (old, new)) in before.iter().zip(&buf).enumerate() {
        let may_change = (10..12).contains(&i)
            || address.contains(&i)
            || l4_range.as_ref().is_some_and(|r| r.contains(&i));
        assert!(may_change || old == new, "byte {i} changed");
    }
    if header_ok {
        assert_eq!(internet_checksum(&buf[..header_len], 0), 0);
    }
    if let Some(at) = l4_ok {
        let segment = &buf[header_len..total_len];
        assert!(l4_checksum_correct(src, dst, proto, segment));
        if proto == PROTO_UDP {
            assert_ne!(segment[at..at + 2], [0, 0], "UDP checksum became 'none'");
        }
    }

    let mut ip = Ipv4Packet::new_checked(&mut buf[..]).expect("still a packet");
    ip.fill_checksum();
    assert!(ip.verify_checksum());
});
