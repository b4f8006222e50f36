//! Types shared by the controller, the agents and the CLI.
//!
//! `api` holds the objects of the HTTP/JSON API (what the CLI sends and reads), `stream`
//! the messages of the control stream between the controller and each agent, `validate`
//! the checks of user input that both ends apply, so that the CLI can refuse a bad name
//! before a round trip and the controller refuses it again for any other client.

pub mod api;
pub mod stream;
pub mod validate;

/// Default TCP port of the controller's API.
pub const DEFAULT_API_PORT: u16 = 7946;
/// Default UDP port of an agent's switch on the underlay.
pub const DEFAULT_SWITCH_PORT: u16 = 7947;

/// Seconds since the Unix epoch, as timestamps in API objects are given.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
