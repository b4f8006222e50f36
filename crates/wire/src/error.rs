//! Why a buffer was refused by a `new_checked` constructor.
//!
//! Written by hand rather than with `thiserror` to keep this crate free of dependencies: it is
//! the one crate every other part of vane links, including fuzz targets.

use std::fmt;

/// A buffer that is not a well-formed packet of the expected kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The buffer is shorter than the fixed part of the header.
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The version nibble is not 4 (an IPv6 packet lands here).
    NotIpv4 {
        /// The version nibble found.
        version: u8,
    },
    /// The IHL field is below 5 words or points past the end of the buffer.
    BadHeaderLen {
        /// Header length in bytes, from the IHL field.
        header_len: usize,
        /// Bytes in the buffer.
        len: usize,
    },
    /// The total-length field is shorter than the header or longer than the buffer.
    BadTotalLen {
        /// The total-length field.
        total_len: usize,
        /// Header length in bytes.
        header_len: usize,
        /// Bytes in the buffer.
        len: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated { len, needed } => {
                write!(
                    f,
                    "packet of {len} bytes is shorter than the {needed}-byte header"
                )
            }
            Error::NotIpv4 { version } => write!(f, "ip version {version} is not 4"),
            Error::BadHeaderLen { header_len, len } => write!(
                f,
                "ipv4 header length {header_len} is invalid for a {len}-byte packet"
            ),
            Error::BadTotalLen {
                total_len,
                header_len,
                len,
            } => write!(
                f,
                "ipv4 total length {total_len} is outside [{header_len}, {len}]"
            ),
        }
    }
}

impl std::error::Error for Error {}
