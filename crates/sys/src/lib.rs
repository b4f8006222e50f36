//! The only crate of vane with `unsafe` code: thin, documented wrappers over the kernel
//! interfaces that `nix` does not cover (TUN ioctls, pidfd_open, user namespaces, the new
//! mount API, capabilities, seccomp). Everything else uses
//! `nix`'s safe wrappers.

pub mod confine;
pub mod fs;
pub mod netns;
pub mod pidfd;
pub mod pty;
pub mod socket;
pub mod spawn;
pub mod tun;
pub mod udp;
