//! Types shared by the controller, the agents and the CLI.
//!
//! `api` holds the objects of the HTTP/JSON API (what the CLI sends and reads), `stream`
//! the messages of the control stream between the controller and each agent, `validate`
//! the checks of user input that both ends apply, so that the CLI can refuse a bad name
//! before a round trip and the controller refuses it again for any other client.

pub mod api;
pub mod stream;
pub mod trust;
pub mod validate;

/// Default TCP port of the controller's API.
pub const DEFAULT_API_PORT: u16 = 7946;

/// The header in which a standby controller replica names the leader's URL, for clients
/// (the CLI, agents) to go there.
pub const LEADER_HEADER: &str = "x-vane-leader";

/// The header of a client's key for a request it may send again (`vane run` after a lost
/// answer): the same key gets the first one's result.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Default UDP port of an agent's switch on the underlay.
pub const DEFAULT_SWITCH_PORT: u16 = 7947;

/// Seconds since the Unix epoch, as timestamps in API objects are given.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fault injection for the crash tests: with `VANE_TEST_DIE_AT` naming a file that holds
/// `step`, the process (controller or agent) removes the file and kills itself there with
/// SIGKILL: no exit handler runs, as in a real crash (an `exit` that flushed and ran
/// handlers while other threads held locks once hung instead of dying). Steps are named
/// where they are called.
pub fn test_die_at(step: &str) {
    let Some(path) = std::env::var_os("VANE_TEST_DIE_AT") else {
        return;
    };
    let armed = std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == step);
    if armed && std::fs::remove_file(&path).is_ok() {
        eprintln!("VANE_TEST_DIE_AT: exiting at {step}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    }
}

/// Lowercase hex, for keys and secrets in JSON.
pub mod hex {
    /// Encodes bytes as lowercase hex.
    pub fn encode(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Decodes exactly `N` bytes of hex; `None` if `s` is not that.
    pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
        let s = s.as_bytes();
        if s.len() != 2 * N || !s.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut out = [0u8; N];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let text = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(text, 16).ok()?;
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_refuses_bad_input() {
            let key = [0xabu8, 0x01, 0xff];
            assert_eq!(super::encode(&key), "ab01ff");
            assert_eq!(super::decode::<3>("ab01ff"), Some(key));
            assert_eq!(super::decode::<3>("ab01f"), None);
            assert_eq!(super::decode::<3>("ab01fg"), None);
            assert_eq!(super::decode::<3>("+b01ff"), None);
        }
    }
}
