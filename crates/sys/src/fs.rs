//! File access relative to a directory descriptor.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Reads the file `rel` below the directory `dir` (openat(2)). Useful when the directory's
/// path now leads elsewhere, for example /proc after a new proc was mounted over it.
pub fn read_at(dir: &File, rel: &str) -> io::Result<String> {
    let path = CString::new(rel).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call, and `dir` is an
    // open descriptor borrowed for the duration of the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor; we are its only owner.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut s = String::new();
    file.read_to_string(&mut s)?;
    Ok(s)
}
