//! How agents and the CLI know the controller and the controller knows them: the
//! controller's CA is pinned by the SHA-256 of its certificate (DER), which join tokens
//! carry after their secret (`SECRET.PIN`), as kubeadm's discovery hash does; the API's
//! credentials are bearer secrets sent only inside TLS.

use crate::hex;

/// The SHA-256 of a CA certificate, in DER: what a join token pins.
pub type Pin = [u8; 32];

/// A join token as handed to an operator: the secret the controller checks, and the pin of
/// its CA that the agent checks.
pub fn join_token(secret: &str, pin: &Pin) -> String {
    format!("{secret}.{}", hex::encode(pin))
}

/// The secret and the pin of a join token; `None` if it carries no (well-formed) pin.
pub fn split_join_token(token: &str) -> Option<(&str, Pin)> {
    let (secret, pin) = token.trim().rsplit_once('.')?;
    Some((secret, hex::decode::<32>(pin)?))
}

/// The header that carries a credential.
pub fn bearer(credential: &str) -> String {
    format!("Bearer {credential}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_carry_their_pin() {
        let pin = [7u8; 32];
        let t = join_token("vanejoin-abc", &pin);
        assert_eq!(split_join_token(&t), Some(("vanejoin-abc", pin)));
        assert_eq!(split_join_token("vanejoin-abc"), None);
        assert_eq!(split_join_token("vanejoin-abc.1234"), None);
    }
}
