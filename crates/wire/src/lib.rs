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

pub use checksum::{ipv4_checksum, ipv4_l4_checksum};
pub use error::Error;
pub use ipv4::{Ipv4Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP};
pub use l4::{L4Ports, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST};
