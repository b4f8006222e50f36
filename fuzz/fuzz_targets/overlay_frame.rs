//! Untrusted input: a datagram from the underlay of a plaintext cluster, or the opened
//! plaintext of a tunnel data message, any bytes (`overlay::parse_plain`, then
//! `overlay::split_frame`; the whole input is also split as a tunnel plaintext). Asserts:
//! no panic; what each returns lies inside its input, right after the header it read; the
//! sender, nets and flags are the header's bytes; unknown flags and non-zero reserved bytes
//! are refused; and writing the header back (`write_plain_header`, `write_nets`) gives the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_wire::overlay::{self, FLAG_CSUM_PARTIAL, NETS_LEN, PLAIN_HEADER_LEN, PLAIN_TYPE};

/// Whether `inner` is the part of `outer` that starts `offset` bytes in and runs to its end.
fn is_tail(outer: (*const u8, usize), inner: &[u8], offset: usize) -> bool {
    let (start, len) = outer;
    inner.as_ptr() == start.wrapping_add(offset) && offset + inner.len() == len
}

fn check_frame(frame: &mut [u8]) {
    let original = frame.to_vec();
    let outer = (frame.as_ptr(), frame.len());
    let Some((src, dst, flags, packet)) = overlay::split_frame(frame) else {
        assert!(
            original.len() < NETS_LEN
                || original[0] & !FLAG_CSUM_PARTIAL != 0
                || original[1..4] != [0; 3]
        );
        return;
    };
    assert!(is_tail(outer, packet, NETS_LEN), "packet outside the frame");
    assert_eq!(flags & !FLAG_CSUM_PARTIAL, 0);
    let _ = overlay::addresses(packet);
    let mut header = [0u8; NETS_LEN];
    assert!(overlay::write_nets(&mut header, src, dst, flags));
    assert_eq!(header, original[..NETS_LEN]);
}

fuzz_target!(|data: &[u8]| {
    let mut datagram = data.to_vec();
    let outer = (datagram.as_ptr(), datagram.len());
    match overlay::parse_plain(&mut datagram) {
        Some((sender, frame)) => {
            assert!(
                is_tail(outer, frame, PLAIN_HEADER_LEN),
                "frame outside the datagram"
            );
            assert_eq!(data[0], PLAIN_TYPE);
            let mut header = [0u8; PLAIN_HEADER_LEN];
            assert!(overlay::write_plain_header(&mut header, sender));
            // The reserved bytes are not checked on the way in; the rest must match.
            assert_eq!(header[4..], data[4..PLAIN_HEADER_LEN]);
            check_frame(frame);
        }
        None => assert!(data.len() < PLAIN_HEADER_LEN || data[0] != PLAIN_TYPE),
    }
    check_frame(&mut data.to_vec());
});
