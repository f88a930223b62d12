//! A fetcher's tunables that are not part of the configuration file. The
//! binary reads them once from its environment ([`Options::from_env`]) and
//! passes them in; tests and benchmarks build them directly.

use std::time::Duration;

/// How long a fetcher waits, retries and pipelines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Lease time-to-live (clamped to 3 s..=30 s), `<PREFIX>_LEASE_TTL` in seconds.
    pub lease_ttl: Duration,
    /// Outstanding publisher confirms, `<PREFIX>_WINDOW`.
    pub window: usize,
    /// First reconnect wait, `<PREFIX>_BACKOFF_MS`.
    pub backoff_initial: Duration,
    /// Longest reconnect wait, `<PREFIX>_BACKOFF_MAX_MS`.
    pub backoff_max: Duration,
    /// How long to wait for the token broker to replace a refused token,
    /// `<PREFIX>_TOKEN_WAIT_MS`.
    pub token_wait: Duration,
    /// Time allowed for one server answer where the protocol times single
    /// reads (POP3 so far), `<PREFIX>_READ_TIMEOUT` in seconds.
    pub read_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: super::lease::DEFAULT_TTL,
            window: super::publish::DEFAULT_WINDOW,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            token_wait: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
        }
    }
}

impl Options {
    /// Defaults overridden by the environment variables `<prefix>_…`
    /// (`MAILAGENT_IMAP`, `MAILAGENT_POP3`); unparsable values are ignored.
    pub fn from_env(prefix: &str) -> Self {
        Self::from_lookup(prefix, |k| std::env::var(k).ok())
    }

    /// [`Options::from_env`] over any variable lookup.
    pub fn from_lookup(prefix: &str, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let num = |name: &str| {
            lookup(&format!("{prefix}_{name}")).and_then(|v| v.trim().parse::<u64>().ok())
        };
        let secs = |name: &str| num(name).map(Duration::from_secs);
        let millis = |name: &str| num(name).map(Duration::from_millis);
        let d = Self::default();
        Self {
            lease_ttl: secs("LEASE_TTL").unwrap_or(d.lease_ttl),
            window: num("WINDOW").map(|w| w as usize).unwrap_or(d.window),
            backoff_initial: millis("BACKOFF_MS").unwrap_or(d.backoff_initial),
            backoff_max: millis("BACKOFF_MAX_MS").unwrap_or(d.backoff_max),
            token_wait: millis("TOKEN_WAIT_MS").unwrap_or(d.token_wait),
            read_timeout: secs("READ_TIMEOUT").unwrap_or(d.read_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_override_defaults_under_the_given_prefix() {
        let env = [
            ("MAILAGENT_POP3_LEASE_TTL", "5"),
            ("MAILAGENT_POP3_WINDOW", "8"),
            ("MAILAGENT_POP3_BACKOFF_MS", "300"),
            ("MAILAGENT_POP3_BACKOFF_MAX_MS", "2000"),
            ("MAILAGENT_POP3_TOKEN_WAIT_MS", "1500"),
            ("MAILAGENT_POP3_READ_TIMEOUT", "9"),
            ("MAILAGENT_IMAP_WINDOW", "99"),
        ];
        let lookup = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let o = Options::from_lookup("MAILAGENT_POP3", lookup);
        assert_eq!(
            o,
            Options {
                lease_ttl: Duration::from_secs(5),
                window: 8,
                backoff_initial: Duration::from_millis(300),
                backoff_max: Duration::from_secs(2),
                token_wait: Duration::from_millis(1500),
                read_timeout: Duration::from_secs(9),
            }
        );
        let bad = |_: &str| Some("soon".to_string());
        assert_eq!(
            Options::from_lookup("MAILAGENT_IMAP", bad),
            Options::default()
        );
    }
}
