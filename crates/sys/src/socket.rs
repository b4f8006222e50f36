//! Socket options that the safe wrappers in use do not expose.

use std::io;
use std::os::fd::AsRawFd;

/// `setsockopt(fd, level, name, &value, sizeof(int))`.
pub fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: usize,
) -> io::Result<()> {
    let value = libc::c_int::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option value too large"))?;
    // SAFETY: the pointer and length describe `value`, a live c_int on the stack; the kernel
    // reads it and keeps no reference. A bad fd, level or name is reported as an error.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
