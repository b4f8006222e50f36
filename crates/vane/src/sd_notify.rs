//! Readiness for systemd's `Type=notify` services: one `READY=1` datagram to the socket
//! the service manager names in `$NOTIFY_SOCKET`. A few lines over a Unix datagram socket
//! rather than libsystemd, which vane does not otherwise link.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Arc;

use tokio::sync::Notify;

/// What a daemon notifies once it is ready, and the task that passes that on to the
/// service manager (for the daemon's runtime to run); `None` when no service manager
/// asked (no `$NOTIFY_SOCKET`). See `Notifier::take` for when to call it.
pub fn readiness() -> io::Result<Option<(Arc<Notify>, impl std::future::Future<Output = ()>)>> {
    let Some(notifier) = Notifier::take()? else {
        return Ok(None);
    };
    let ready = Arc::new(Notify::new());
    let waiting = ready.clone();
    Ok(Some((ready, async move {
        waiting.notified().await;
        match notifier.ready() {
            Ok(()) => tracing::debug!("told the service manager this service is ready"),
            Err(e) => tracing::warn!("cannot tell the service manager this service is ready: {e}"),
        }
    })))
}

pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The service manager's socket, if it gave one. The variable is removed from the
    /// environment: the agent's helpers and instances inherit it otherwise, and they are
    /// not the service. Call it before any thread starts (the environment is not
    /// thread-safe) and before the process changes network namespace (an abstract
    /// socket's name belongs to the namespace the socket was made in).
    pub fn take() -> io::Result<Option<Notifier>> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        std::env::remove_var("NOTIFY_SOCKET");
        Notifier::to(&name).map(Some)
    }

    /// A notifier for socket `name`: a path, or `@NAME` for a name in the abstract
    /// namespace, as systemd writes them.
    pub fn to(name: &OsStr) -> io::Result<Notifier> {
        let bytes = name.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            Some(b'/') => SocketAddr::from_pathname(Path::new(name))?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET {name:?} is neither a path nor an abstract name"),
                ))
            }
        };
        Ok(Notifier {
            sock: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Tells the service manager the service is ready.
    pub fn ready(&self) -> io::Result<()> {
        self.sock.send_to_addr(b"READY=1", &self.addr).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        Notifier::to(path.as_os_str()).unwrap().ready().unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn sends_ready_to_an_abstract_name() {
        let name = format!("vane-test-notify-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::to(OsStr::new(&format!("@{name}")))
            .unwrap()
            .ready()
            .unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn refuses_a_relative_name() {
        let e = Notifier::to(OsStr::new("notify")).err().unwrap();
        assert!(e.to_string().contains("neither a path"), "{e}");
    }
}
