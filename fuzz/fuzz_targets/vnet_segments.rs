//! Untrusted input: what an instance writes to its TUN device with offloads on, a
//! `virtio_net_hdr` and a packet, both any bytes (a root program in the instance chooses
//! them). Input: `[virtio header 10][packet]`. Runs `VnetHdr::parse`,
//! `complement_checksum_field`, `VnetHdr::partial_for` and the GSO split
//! (`TcpSegments::new`/`next_into`) that the dataplane does before the tunnel. Asserts: no
//! panic; the header round-trips; only the packet's TCP or UDP checksum field is ever
//! complemented, and complementing twice restores the packet; every segment fits
//! `max_segment_len`, is an IPv4/TCP packet with a correct header checksum and a partial
//! TCP checksum that completes to the right one, with its sequence number; and the
//! segments' payloads are the packet's payload, in order.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use vane_fuzz::{internet_checksum, l4_checksum_correct, PROTO_TCP};
use vane_wire::vnet::{self, TcpSegments, VnetHdr, VNET_HDR_LEN};
use vane_wire::Ipv4Packet;

fuzz_target!(|data: &[u8]| {
    let Some(hdr) = VnetHdr::parse(data) else {
        assert!(data.len() < VNET_HDR_LEN);
        return;
    };
    let mut written = [0u8; VNET_HDR_LEN];
    assert!(hdr.write(&mut written));
    assert_eq!(written, data[..VNET_HDR_LEN]);
    let _ = (hdr.is_tcp_gso(), hdr.needs_csum());

    let mut pkt = data[VNET_HDR_LEN..].to_vec();
    // Only ever the packet's own TCP or UDP checksum field, whatever the header says.
    let l4_field = VnetHdr::partial_for(&pkt).map(|h| (h.csum_start, h.csum_offset));
    let complemented = vnet::complement_checksum_field(&mut pkt, &hdr);
    assert_eq!(
        complemented,
        l4_field == Some((hdr.csum_start, hdr.csum_offset))
    );
    vnet::complement_checksum_field(&mut pkt, &hdr);
    assert_eq!(
        pkt,
        data[VNET_HDR_LEN..],
        "complementing twice is the identity"
    );

    if let Some(partial) = VnetHdr::partial_for(&pkt) {
        assert!(partial.needs_csum() && !partial.is_tcp_gso());
        let at = usize::from(partial.csum_start) + usize::from(partial.csum_offset);
        assert!(at + 2 <= pkt.len());
    }

    let Some(mut segments) = TcpSegments::new(&pkt, &hdr) else {
        return;
    };
    // What the split must preserve, read independently of the code under test.
    let ip = Ipv4Packet::new_checked(&pkt[..]).expect("split only IPv4 packets");
    assert_eq!(ip.protocol(), PROTO_TCP);
    let ip_header = ip.header_len();
    let total = ip.total_len();
    let headers = ip_header + usize::from(pkt[ip_header + 12] >> 4) * 4;
    let first_seq = u32::from_be_bytes(pkt[ip_header + 4..ip_header + 8].try_into().unwrap());
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(&pkt[12..16]).unwrap());
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&pkt[16..20]).unwrap());
    let payload = &pkt[headers..total];
    let mss = usize::from(hdr.gso_size);

    let max = segments.max_segment_len();
    assert_eq!(max, headers + mss);
    let mut out = vec![0u8; max];
    let mut stream = Vec::with_capacity(payload.len());
    let mut count = 0usize;
    loop {
        // A buffer one byte short of the longest segment takes only a shorter last one;
        // when it is refused, nothing may have advanced.
        let len = match segments.next_into(&mut out[..max - 1]) {
            Some(len) => len,
            None => match segments.next_into(&mut out) {
                Some(len) => len,
                None => break,
            },
        };
        assert!(len <= max, "segment of {len} bytes, longest allowed {max}");
        let seg = &mut out[..len];
        let ip = Ipv4Packet::new_checked(&*seg).expect("a segment is an IPv4 packet");
        assert!(ip.verify_checksum());
        assert_eq!(ip.total_len(), len);
        assert_eq!((ip.src(), ip.dst(), ip.protocol()), (src, dst, PROTO_TCP));
        let seq = u32::from_be_bytes(seg[ip_header + 4..ip_header + 8].try_into().unwrap());
        assert_eq!(seq, first_seq.wrapping_add(stream.len() as u32));
        stream.extend_from_slice(&seg[headers..]);
        // The field holds the pseudo-header sum: summing the segment over it and storing
        // the complement gives the real checksum.
        let tcp = &mut seg[ip_header..];
        let completed = internet_checksum(tcp, 0);
        tcp[16..18].copy_from_slice(&completed.to_be_bytes());
        assert!(l4_checksum_correct(src, dst, PROTO_TCP, tcp));
        count += 1;
        assert!(
            count <= payload.len() / mss + 1,
            "more segments than the payload needs"
        );
    }
    assert!(count >= 1, "even a packet without payload is one segment");
    assert_eq!(stream, payload);
});
