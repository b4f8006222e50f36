//! Untrusted input: a text message of the control stream, any bytes: what an agent
//! decodes from the controller (`ToAgent`) and what the controller decodes from any
//! agent, enrolled or not (`FromAgent`), with `serde_json`. Asserts: no panic (nor
//! unbounded recursion); a message that decodes encodes again, and that encoding decodes
//! to a message that encodes the same (nothing is lost or invented on the way); the keys
//! a view carries decode or are refused without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use vane_proto::stream::{FromAgent, ToAgent};

/// Decodes `data` as a `T`; if it is one, checks that its encoding is stable.
fn round_trip<T: DeserializeOwned + Serialize>(data: &[u8]) -> Option<T> {
    let msg: T = serde_json::from_slice(data).ok()?;
    let once = serde_json::to_vec(&msg).expect("a decoded message encodes");
    let again: T = serde_json::from_slice(&once).expect("an encoded message decodes");
    let twice = serde_json::to_vec(&again).expect("a decoded message encodes");
    assert_eq!(once, twice, "encoding changed across a round trip");
    Some(msg)
}

fuzz_target!(|data: &[u8]| {
    if let Some(ToAgent::View(view)) = round_trip::<ToAgent>(data) {
        for peer in &view.peers {
            let _ = vane_proto::hex::decode::<32>(&peer.public_key);
        }
    }
    if let Some(FromAgent::Hello { public_key, .. }) = round_trip::<FromAgent>(data) {
        let _ = vane_proto::hex::decode::<32>(&public_key);
    }
});
