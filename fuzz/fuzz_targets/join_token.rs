//! Untrusted input: a join token as an operator pastes it to an agent, any bytes
//! (`trust::split_join_token`), and hex of keys and pins (`hex::decode`). Asserts: no
//! panic; a token that splits is its secret, a dot and the hex of its pin, so that
//! joining them again gives the token back (hex in lowercase); hex that decodes is the
//! encoding of what it decodes to, and nothing else decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_proto::{hex, trust};

fn check_hex<const N: usize>(s: &str) {
    match hex::decode::<N>(s) {
        Some(bytes) => assert_eq!(hex::encode(&bytes), s.to_ascii_lowercase()),
        None => assert!(s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit())),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((secret, pin)) = trust::split_join_token(s) {
        let token = s.trim();
        let (head, tail) = token.split_at(token.len() - 64);
        assert_eq!(head, format!("{secret}."));
        assert_eq!(
            trust::join_token(secret, &pin),
            format!("{head}{}", tail.to_ascii_lowercase())
        );
    }
    check_hex::<32>(s);
    check_hex::<4>(s);
    check_hex::<1>(s);
    check_hex::<0>(s);
});
