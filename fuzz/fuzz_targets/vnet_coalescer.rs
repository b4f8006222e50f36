//! Untrusted input: the TCP segments that arrive from other hosts for one local device,
//! which the receiving dataplane merges (`TcpCoalescer::push`/`take`) before writing them.
//! A peer host's switch, or an instance behind it, chooses their headers and order. The
//! input is a structured sequence (`arbitrary`): segments of two flows with chosen sequence
//! numbers, flags, options and lengths, byte flips, or raw bytes, and takes in between.
//! Asserts: no panic; what `take` gives is a virtio header and an IPv4/TCP packet of at
//! most 64 KiB (a merged one with a correct header checksum) for the tag the segments were pushed with; its
//! payload is the pushed payloads in order; a single segment comes out unchanged; and
//! cutting a merged packet again (`TcpSegments`) gives back the pushed segments.
#![no_main]

use std::net::Ipv4Addr;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vane_fuzz::{internet_checksum, ipv4, tcp, ACK, PROTO_TCP, PSH};
use vane_wire::vnet::{TcpCoalescer, TcpSegments, VnetHdr, VNET_HDR_LEN};
use vane_wire::Ipv4Packet;

#[derive(Arbitrary, Debug)]
enum Step {
    Push(Segment),
    Take,
}

#[derive(Arbitrary, Debug)]
struct Segment {
    /// The port it is for (the coalescer's tag), one of three.
    tag: u8,
    /// Which of two flows.
    flow: bool,
    seq: Seq,
    payload_len: u16,
    flags: Flags,
    /// 32-bit words of TCP options, up to 10.
    tcp_option_words: u8,
    /// An IP header with options (never merged).
    ip_options: bool,
    /// XOR one byte (position modulo the length) with a value.
    flip: Option<(u16, u8)>,
    /// Raw bytes instead of a built segment.
    raw: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
enum Seq {
    /// Right after the flow's last segment.
    Next,
    /// The last segment's sequence number again.
    Repeat,
    Exactly(u32),
}

#[derive(Arbitrary, Debug)]
enum Flags {
    Ack,
    AckPsh,
    Other(u8),
}

const SRC: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const DST: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

/// Builds segments and remembers where each flow's stream is.
#[derive(Default)]
struct Sender {
    next_seq: [u32; 2],
    last_seq: [u32; 2],
    ident: u16,
    /// Distinguishes payload bytes of different segments.
    fill: u8,
}

impl Sender {
    fn build(&mut self, s: &Segment) -> Vec<u8> {
        if let Some(raw) = &s.raw {
            return raw.clone();
        }
        let f = usize::from(s.flow);
        let seq = match s.seq {
            Seq::Next => self.next_seq[f],
            Seq::Repeat => self.last_seq[f],
            Seq::Exactly(n) => n,
        };
        let len = usize::from(s.payload_len) % 9001;
        self.fill = self.fill.wrapping_add(1);
        let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ self.fill).collect();
        let flags = match s.flags {
            Flags::Ack => ACK,
            Flags::AckPsh => ACK | PSH,
            Flags::Other(b) => b,
        };
        let mut seg = tcp(5555, 80 + u16::from(s.flow), seq, flags, &[]);
        let words = usize::from(s.tcp_option_words % 11);
        seg.resize(20 + 4 * words, 1); // NOP options
        seg[12] = ((5 + words) as u8) << 4;
        seg.extend_from_slice(&payload);
        self.ident = self.ident.wrapping_add(1);
        let mut p = ipv4(PROTO_TCP, SRC, DST, self.ident, &seg);
        if s.ip_options {
            p.splice(20..20, [1u8; 4]);
            p[0] = 0x46;
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p[10..12].fill(0);
            let sum = internet_checksum(&p[..24], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        self.last_seq[f] = seq;
        self.next_seq[f] = seq.wrapping_add(len as u32);
        if let Some((at, x)) = s.flip {
            let at = usize::from(at) % p.len();
            p[at] ^= x;
        }
        p
    }
}

/// Offset of the payload of a TCP/IPv4 segment that the coalescer took (20-byte IP header).
fn headers(pkt: &[u8]) -> usize {
    20 + usize::from(pkt[32] >> 4) * 4
}

/// Checks what `take` gave against the segments pushed since the last take.
fn check_merged(tag: u32, bytes: &[u8], pushed: &[(u32, Vec<u8>)]) {
    assert!(
        !pushed.is_empty(),
        "take gave something when nothing was pushed"
    );
    assert!(
        pushed.iter().all(|(t, _)| *t == tag),
        "segments of another tag merged"
    );
    let hdr = VnetHdr::parse(bytes).expect("a virtio header first");
    assert!(hdr.needs_csum());
    assert_eq!((hdr.csum_start, hdr.csum_offset), (20, 16));
    let merged = &bytes[VNET_HDR_LEN..];
    assert!(merged.len() <= 65535);
    let ip = Ipv4Packet::new_checked(merged).expect("an IPv4 packet");
    assert_eq!(ip.total_len(), merged.len());
    let h = headers(merged);
    let stream: Vec<u8> = pushed
        .iter()
        .flat_map(|(_, p)| p[headers(p)..].iter().copied())
        .collect();
    assert_eq!(
        &merged[h..],
        &stream[..],
        "merged payload is not the pushed stream"
    );
    if let [(_, only)] = pushed {
        assert!(!hdr.is_tcp_gso());
        assert_eq!(merged, &only[..], "a single segment changed");
        return;
    }
    // Merged: the header checksum is made anew (one segment goes on as it came).
    assert!(ip.verify_checksum());
    assert!(hdr.is_tcp_gso());
    assert_eq!(usize::from(hdr.hdr_len), h);
    let mut again = TcpSegments::new(merged, &hdr).expect("a merged packet splits");
    let mut out = vec![0u8; again.max_segment_len()];
    for (_, want) in pushed {
        let len = again
            .next_into(&mut out)
            .expect("as many segments as were pushed");
        let got = &out[..len];
        assert_eq!(len, want.len());
        // Only the IP id and both checksums may differ: the coalescer does not require
        // consecutive ids, and the checksums are partial ones made again.
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let may_differ = (4..6).contains(&i) || (10..12).contains(&i) || (36..38).contains(&i);
            assert!(
                may_differ || g == w,
                "byte {i} of a segment differs after a round trip"
            );
        }
    }
    assert!(
        again.next_into(&mut out).is_none(),
        "more segments than were pushed"
    );
}

fuzz_target!(|steps: Vec<Step>| {
    let mut coalescer = TcpCoalescer::default();
    let mut sender = Sender::default();
    let mut pushed: Vec<(u32, Vec<u8>)> = Vec::new();
    for step in steps {
        match step {
            Step::Push(s) => {
                let pkt = sender.build(&s);
                let tag = u32::from(s.tag % 3);
                if coalescer.push(tag, &pkt) {
                    pushed.push((tag, pkt));
                }
            }
            Step::Take => {
                match coalescer.take() {
                    Some((tag, bytes)) => check_merged(tag, bytes, &pushed),
                    None => assert!(pushed.is_empty(), "pushed segments vanished"),
                }
                pushed.clear();
            }
        }
        assert_eq!(coalescer.is_empty(), pushed.is_empty());
    }
    if let Some((tag, bytes)) = coalescer.take() {
        check_merged(tag, bytes, &pushed);
    }
});
