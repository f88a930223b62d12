//! SASL XOAUTH2 (§4): the initial response and the error challenge a server
//! sends after a refused token.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// The raw XOAUTH2 initial response: `user=<mailbox>^Aauth=Bearer <token>^A^A`.
pub fn initial_response(user: &str, token: &str) -> String {
    format!("user={user}\x01auth=Bearer {token}\x01\x01")
}

/// The base64 line sent on the wire.
pub fn encoded_response(user: &str, token: &str) -> String {
    STANDARD.encode(initial_response(user, token))
}

/// The JSON error a server sends as a challenge after refusing a token
/// (`{"status":"401","schemes":"bearer","scope":"…"}`). The client must
/// answer it with an empty line to receive the final failure.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
pub struct ErrorChallenge {
    /// HTTP-like status, e.g. `401` or `400`.
    #[serde(default)]
    pub status: String,
    /// Accepted schemes.
    #[serde(default)]
    pub schemes: String,
    /// Scope the server wants.
    #[serde(default)]
    pub scope: String,
}

/// Decodes a base64 error challenge; `None` when it is not one.
pub fn decode_error_challenge(encoded: &str) -> Option<ErrorChallenge> {
    let bytes = STANDARD.decode(encoded.trim()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_response_table() {
        let cases = [
            ("a@b.c", "tok", "dXNlcj1hQGIuYwFhdXRoPUJlYXJlciB0b2sBAQ=="),
            ("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg", "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="),
        ];
        for (user, token, expected) in cases {
            assert_eq!(encoded_response(user, token), expected);
        }
    }

    #[test]
    fn error_challenge_decodes() {
        let c = decode_error_challenge("eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==").unwrap();
        assert_eq!(c.status, "401");
        assert_eq!(c.schemes, "bearer");
        assert_eq!(decode_error_challenge("not base64!"), None);
        assert_eq!(decode_error_challenge(""), None);
    }
}
