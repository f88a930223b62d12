//! A string that must never be printed: client secrets, passwords, URLs with
//! credentials, tokens.

use std::fmt;

/// The text every redacted value prints as.
pub const REDACTED: &str = "[redacted]";

/// A secret value. `Debug`, `Display` and `Serialize` print `[redacted]`; the
/// value is reached only through [`Secret::expose`], so every use is visible
/// in review.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself. Call only where it is sent to its one consumer.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// A URL whose password (if any) is secret, such as `amqp://user:pass@host`.
/// Prints with the password replaced by `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Secret);

impl SecretUrl {
    /// Wraps a URL string.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Secret::new(value))
    }

    /// The full URL, credentials included.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with its password replaced, safe to print.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl serde::Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// Replaces the password of a URL (and the whole text when it does not parse)
/// so the result can be logged.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_none() {
                return url.to_string();
            }
            // The url crate percent-encodes brackets, so set a marker and swap it.
            let _ = url.set_password(Some("REDACTEDPASSWORD"));
            url.to_string().replace("REDACTEDPASSWORD", REDACTED)
        }
        Err(_) => REDACTED.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_prints_redacted_everywhere() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn url_password_is_redacted() {
        let cases = [
            (
                "amqp://user:pa55@host:5672/%2f",
                "amqp://user:[redacted]@host:5672/%2f",
            ),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("postgres://a:b@h/db", "postgres://a:[redacted]@h/db"),
            ("not a url with secret", "[redacted]"),
        ];
        for (input, expected) in cases {
            let u = SecretUrl::new(input);
            assert_eq!(u.redacted(), expected, "{input}");
            assert_eq!(format!("{u:?}"), format!("{expected:?}"));
            assert_eq!(format!("{u}"), expected);
        }
    }
}
