//! Checked byte views of the packets the switch handles.
//!
//! Everything here reads bytes that came from an untrusted source: an instance's TUN device
//! (a root program inside an instance can write anything), another host, or the outside world
//! through egress. So the views follow smoltcp's `src/wire` pattern: `new_checked` validates the
//! lengths once, and after that every accessor indexes only inside the validated range and
//! cannot panic. Views borrow the caller's buffer and never allocate, so they can be used on
//! the per-packet hot path.

mod checksum;
mod error;
mod ipv4;
mod l4;
pub mod overlay;
pub mod vnet;

pub use checksum::{ipv4_checksum, ipv4_l4_checksum};
pub use error::Error;
pub use ipv4::{Ipv4Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
pub use l4::{L4Ports, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST};

/// Arbitrary bytes, as a hostile instance could write them: the views must refuse or read
/// them without panicking. A stand-in for a fuzz target, deterministic so CI can run it.
#[cfg(test)]
mod robustness {
    use super::*;

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    fn bytes(seed: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *seed ^= *seed >> 12;
                *seed ^= *seed << 25;
                *seed ^= *seed >> 27;
                (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for i in 0..200_000usize {
            let mut buf = bytes(&mut seed, i % 96);
            // Half of the inputs look like IPv4 with a plausible header, to get past the
            // first checks and exercise the deeper ones.
            if i % 2 == 0 && buf.len() >= 20 {
                buf[0] = 0x45 + (buf[0] & 0x0f).min(10) - 5;
                let total = (buf.len() as u16).saturating_sub(buf[3] as u16 % 8);
                buf[2..4].copy_from_slice(&total.to_be_bytes());
                buf[9] = [PROTO_TCP, PROTO_UDP, PROTO_ICMP, buf[9]][i % 4];
            }
            if let Ok(mut p) = Ipv4Packet::new_checked(&mut buf[..]) {
                let _ = (p.src(), p.dst(), p.protocol(), p.payload().len());
                let _ = (p.frag_offset(), p.verify_checksum(), L4Ports::of(&p));
                p.set_src(std::net::Ipv4Addr::new(10, 0, 0, 1));
                p.set_dst(std::net::Ipv4Addr::new(100, 64, 0, 2));
                p.fill_checksum();
                assert!(p.verify_checksum());
            }
        }
    }
}
