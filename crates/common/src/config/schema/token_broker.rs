//! `[token-broker]`: token refresh timing and how tokens are protected at
//! rest (the key files are read here).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use figment::value::Dict;
use serde::Serialize;
use sha2::Digest;

use crate::config::reader::{join, Walker};
use crate::config::section::Section;

/// `[token-broker]`
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TokenBrokerConfig {
    /// How tokens are protected at rest in Redis.
    pub encryption: TokenEncryption,
    /// Refresh when less than max(this, `refresh-lead-fraction` × lifetime) remains.
    pub refresh_lead_min: Duration,
    /// Fraction of the lifetime used as refresh lead (0.2).
    pub refresh_lead_fraction: f64,
    /// The lead never exceeds this fraction of the lifetime (0.5).
    pub refresh_max_fraction: f64,
    /// A forced refresh is done at most this often per profile.
    pub forced_refresh_min_interval: Duration,
    /// Retry interval for a profile that is failing permanently (bad secret…).
    pub failing_retry_interval: Duration,
    /// First backoff step after a transient failure.
    pub backoff_initial: Duration,
    /// Largest backoff step after transient failures.
    pub backoff_max: Duration,
    /// TCP/TLS connect timeout of token requests.
    pub connect_timeout: Duration,
    /// Total timeout of one token request.
    pub request_timeout: Duration,
    /// Time-to-live of the per-profile refresh lock.
    pub lock_ttl: Duration,
}

/// Token protection at rest.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum TokenEncryption {
    /// `token-encryption = "none"`, configured in so many words.
    None,
    /// AES-256-GCM with the keys of these files: the first encrypts, any decrypts.
    Aead {
        /// Key files in order.
        key_files: Vec<PathBuf>,
        /// The keys, when this component reads them.
        #[serde(skip)]
        keys: Vec<EncryptionKey>,
    },
}

/// A 32-byte token-encryption key and its id (a fingerprint, not a secret).
#[derive(Clone)]
pub struct EncryptionKey {
    /// Short id stored beside each ciphertext.
    pub id: String,
    /// The key bytes.
    pub key: [u8; 32],
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .field("key", &crate::secret::REDACTED)
            .finish()
    }
}

/// Reads `[token-broker]` from the top-level `tree`, and the key files
/// when `w.component` uses them.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> TokenBrokerConfig {
    let t = w.section(tree, Section::TokenBroker);
    let p = Section::TokenBroker.key();
    w.unknown_keys(
        t,
        p,
        &[
            "encryption-key-file",
            "encryption-key-files",
            "token-encryption",
            "refresh-lead-min",
            "refresh-lead-fraction",
            "refresh-max-fraction",
            "forced-refresh-min-interval",
            "failing-retry-interval",
            "backoff-initial-ms",
            "backoff-max",
            "connect-timeout",
            "request-timeout",
            "lock-ttl",
        ],
    );
    let mode = w.string(t, p, "token-encryption");
    let mut key_files: Vec<PathBuf> = Vec::new();
    if let Some(f) = w.string(t, p, "encryption-key-file") {
        key_files.push(PathBuf::from(f));
    }
    key_files.extend(
        w.string_list(t, p, "encryption-key-files")
            .into_iter()
            .map(PathBuf::from),
    );
    let encryption = match mode.as_deref() {
        Some("none") => {
            if !key_files.is_empty() {
                w.err(
                    join(p, "token-encryption"),
                    "is \"none\" but encryption key files are also set: choose one",
                );
            }
            TokenEncryption::None
        }
        None | Some("aes-256-gcm") => {
            if key_files.is_empty() {
                w.err(
                    join(p, "encryption-key-file"),
                    "missing: tokens are encrypted in Redis with this key (base64 of 32 bytes); set token-encryption = \"none\" to store them in clear",
                );
            }
            let mut keys = Vec::new();
            if w.component.reads_token_keys() {
                let mut ids = HashSet::new();
                for (i, file) in key_files.iter().enumerate() {
                    let path = if i == 0 && t.contains_key("encryption-key-file") {
                        join(p, "encryption-key-file")
                    } else {
                        format!("{} ({})", join(p, "encryption-key-files"), file.display())
                    };
                    if let Some(key) = read_key(w, file, &path) {
                        if !ids.insert(key.id.clone()) {
                            w.err(path, "the same key is configured twice");
                        }
                        keys.push(key);
                    }
                }
            }
            TokenEncryption::Aead { key_files, keys }
        }
        Some(other) => {
            w.err(
                join(p, "token-encryption"),
                format!("unknown mode {other:?}: expected \"aes-256-gcm\" (default) or \"none\""),
            );
            TokenEncryption::None
        }
    };
    let lead_fraction = w.fraction(t, p, "refresh-lead-fraction", 0.2);
    let max_fraction = w.fraction(t, p, "refresh-max-fraction", 0.5);
    if lead_fraction > max_fraction {
        w.err(
            join(p, "refresh-lead-fraction"),
            "is larger than refresh-max-fraction",
        );
    }
    TokenBrokerConfig {
        encryption,
        refresh_lead_min: w.secs(t, p, "refresh-lead-min", 0, 86_400, 300),
        refresh_lead_fraction: lead_fraction,
        refresh_max_fraction: max_fraction,
        forced_refresh_min_interval: w.secs(t, p, "forced-refresh-min-interval", 0, 86_400, 30),
        failing_retry_interval: w.secs(t, p, "failing-retry-interval", 1, 86_400, 300),
        backoff_initial: Duration::from_millis(w.int_in(
            t,
            p,
            "backoff-initial-ms",
            1,
            600_000,
            1000,
        )),
        backoff_max: w.secs(t, p, "backoff-max", 1, 86_400, 300),
        connect_timeout: w.secs(t, p, "connect-timeout", 1, 600, 10),
        request_timeout: w.secs(t, p, "request-timeout", 1, 600, 30),
        lock_ttl: w.secs(t, p, "lock-ttl", 1, 3600, 30),
    }
}

/// Reads a token-encryption key file: base64 of 32 bytes, whitespace ignored.
fn read_key(w: &mut Walker, file: &PathBuf, path: &str) -> Option<EncryptionKey> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            w.err(
                path,
                format!("cannot read key file {}: {}", file.display(), e.kind()),
            );
            return None;
        }
    };
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
        Ok(b) => b,
        Err(_) => {
            w.err(path, format!("key file {} is not base64", file.display()));
            return None;
        }
    };
    let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        w.err(
            path,
            format!(
                "key file {} holds {} bytes; expected 32 (e.g. `openssl rand -base64 32`)",
                file.display(),
                bytes.len()
            ),
        );
        return None;
    };
    let id = hex::encode(&sha2::Sha256::digest(key)[..4]);
    Some(EncryptionKey { id, key })
}
