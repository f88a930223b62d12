//! Access tokens in Redis (§3): how the token broker stores each OAuth
//! profile's token — encrypted with AES-256-GCM under a key id, expiring with
//! the token — and how fetchers read it and ask for a forced refresh of a
//! token that failed (naming its fingerprint, never the token).

use std::time::Duration;

use crate::redis_handle::RedisHandle;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{EncryptionKey, TokenEncryption};
use crate::heartbeat::now_secs;
use crate::keys::Keys;
use crate::secret::Secret;

/// The key id written beside a token stored in clear (`token-encryption = "none"`).
pub const CLEAR: &str = "none";

/// Why a token could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Redis failed.
    #[error("cannot reach Redis for the token of profile {profile}: {source}")]
    Redis {
        /// Profile name.
        profile: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// The stored token names a key this process does not have.
    #[error("cannot decrypt the token of profile {profile}: key id {kid} is not configured (add its file to token-broker.encryption-key-files)")]
    UnknownKey {
        /// Profile name.
        profile: String,
        /// The key id in Redis.
        kid: String,
    },
    /// The ciphertext does not verify under the named key.
    #[error("cannot decrypt the token of profile {profile}: authentication failed (wrong key or tampered value)")]
    Decrypt {
        /// Profile name.
        profile: String,
    },
    /// The stored token is in clear while token keys are configured: a
    /// left-over of `token-encryption = "none"`, never trusted.
    #[error("cannot use the token of profile {profile}: it is stored in clear (kid none) while token encryption keys are configured")]
    Unsealed {
        /// Profile name.
        profile: String,
    },
    /// The stored value is not a token record.
    #[error("cannot read the token of profile {profile}: {reason}")]
    Corrupt {
        /// Profile name.
        profile: String,
        /// What is wrong.
        reason: String,
    },
}

impl TokenError {
    /// True when retrying may help (Redis down), false for a key problem.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Redis { .. })
    }
}

/// A usable access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The bearer token.
    pub token: Secret,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Names this token in refresh requests and logs without revealing it.
    pub fingerprint: String,
}

/// The record stored in Redis for a profile's token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredToken {
    /// Record version.
    pub v: u8,
    /// Id of the encryption key, or `none`.
    pub kid: String,
    /// AES-GCM nonce, base64.
    pub nonce: String,
    /// Ciphertext (or the token itself when `kid` is `none`), base64.
    pub ct: String,
    /// When the broker received it (epoch seconds).
    pub issued_at: u64,
    /// When it expires (epoch seconds).
    pub expires_at: u64,
    /// Fingerprint of the token.
    pub fingerprint: String,
}

/// The fingerprint of a token: the first 16 hex digits of its SHA-256.
pub fn fingerprint(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..8])
}

fn aad(profile: &str, expires_at: u64, fingerprint: &str) -> String {
    format!("mailagent-token\n{profile}\n{expires_at}\n{fingerprint}")
}

/// Encrypts and decrypts stored tokens: the first key encrypts, any decrypts.
#[derive(Clone)]
pub struct TokenCipher {
    keys: Vec<EncryptionKey>,
    clear: bool,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("TokenCipher")
            .field("key_ids", &ids)
            .field("clear", &self.clear)
            .finish()
    }
}

impl TokenCipher {
    /// From the `[token-broker]` settings.
    pub fn from_config(encryption: &TokenEncryption) -> Self {
        match encryption {
            TokenEncryption::None => Self {
                keys: Vec::new(),
                clear: true,
            },
            TokenEncryption::Aead { keys, .. } => Self {
                keys: keys.clone(),
                clear: false,
            },
        }
    }

    /// The id new tokens are written under.
    pub fn current_key_id(&self) -> &str {
        self.keys.first().map(|k| k.id.as_str()).unwrap_or(CLEAR)
    }

    /// Seals a token for `profile`.
    pub fn seal(&self, profile: &str, token: &str, issued_at: u64, expires_at: u64) -> StoredToken {
        let fp = fingerprint(token);
        match self.keys.first() {
            Some(key) if !self.clear => {
                let nonce_bytes: [u8; 12] = rand::random();
                let cipher = Aes256Gcm::new_from_slice(&key.key).expect("32-byte key");
                let aad = aad(profile, expires_at, &fp);
                let ct = cipher
                    .encrypt(
                        Nonce::from_slice(&nonce_bytes),
                        Payload {
                            msg: token.as_bytes(),
                            aad: aad.as_bytes(),
                        },
                    )
                    .expect("AES-GCM encryption cannot fail for this size");
                StoredToken {
                    v: 1,
                    kid: key.id.clone(),
                    nonce: STANDARD.encode(nonce_bytes),
                    ct: STANDARD.encode(ct),
                    issued_at,
                    expires_at,
                    fingerprint: fp,
                }
            }
            _ => StoredToken {
                v: 1,
                kid: CLEAR.into(),
                nonce: String::new(),
                ct: STANDARD.encode(token),
                issued_at,
                expires_at,
                fingerprint: fp,
            },
        }
    }

    /// Opens a stored token.
    pub fn open(&self, profile: &str, stored: &StoredToken) -> Result<AccessToken, TokenError> {
        let corrupt = |reason: &str| TokenError::Corrupt {
            profile: profile.into(),
            reason: reason.into(),
        };
        let ct = STANDARD
            .decode(&stored.ct)
            .map_err(|_| corrupt("ciphertext is not base64"))?;
        let plain = if stored.kid == CLEAR {
            if !self.clear {
                return Err(TokenError::Unsealed {
                    profile: profile.into(),
                });
            }
            ct
        } else {
            let key = self
                .keys
                .iter()
                .find(|k| k.id == stored.kid)
                .ok_or_else(|| TokenError::UnknownKey {
                    profile: profile.into(),
                    kid: stored.kid.clone(),
                })?;
            let nonce = STANDARD
                .decode(&stored.nonce)
                .map_err(|_| corrupt("nonce is not base64"))?;
            if nonce.len() != 12 {
                return Err(corrupt("nonce is not 12 bytes"));
            }
            let cipher = Aes256Gcm::new_from_slice(&key.key).expect("32-byte key");
            let aad = aad(profile, stored.expires_at, &stored.fingerprint);
            cipher
                .decrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &ct,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| TokenError::Decrypt {
                    profile: profile.into(),
                })?
        };
        let token = String::from_utf8(plain).map_err(|_| corrupt("token is not UTF-8"))?;
        if fingerprint(&token) != stored.fingerprint {
            return Err(corrupt("fingerprint does not match"));
        }
        Ok(AccessToken {
            token: Secret::new(token),
            expires_at: stored.expires_at,
            fingerprint: stored.fingerprint.clone(),
        })
    }
}

/// A fetcher's request to refresh a token that failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefreshRequest {
    /// Profile name.
    pub profile: String,
    /// Fingerprint of the token that failed.
    pub fingerprint: String,
}

/// Reads and writes profile tokens in Redis.
#[derive(Clone)]
pub struct TokenClient {
    redis: RedisHandle,
    keys: Keys,
    cipher: TokenCipher,
}

impl TokenClient {
    /// A client over a Redis connection with the configured keys.
    pub fn new(redis: RedisHandle, keys: Keys, encryption: &TokenEncryption) -> Self {
        Self {
            redis,
            keys,
            cipher: TokenCipher::from_config(encryption),
        }
    }

    /// The cipher in use.
    pub fn cipher(&self) -> &TokenCipher {
        &self.cipher
    }

    fn redis_err(profile: &str) -> impl FnOnce(redis::RedisError) -> TokenError + '_ {
        move |source| TokenError::Redis {
            profile: profile.into(),
            source,
        }
    }

    /// The stored record of a profile's token (without decrypting it).
    pub async fn stored(&self, profile: &str) -> Result<Option<StoredToken>, TokenError> {
        let mut redis = self.redis.clone();
        let raw: Option<String> = redis
            .get(self.keys.token(profile))
            .await
            .map_err(Self::redis_err(profile))?;
        match raw {
            None => Ok(None),
            Some(raw) => serde_json::from_str(&raw)
                .map(Some)
                .map_err(|e| TokenError::Corrupt {
                    profile: profile.into(),
                    reason: format!("not a token record: {e}"),
                }),
        }
    }

    /// The current token of a profile; `None` when absent or expired.
    pub async fn current(&self, profile: &str) -> Result<Option<AccessToken>, TokenError> {
        match self.stored(profile).await? {
            Some(stored) if stored.expires_at > now_secs() => {
                self.cipher.open(profile, &stored).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Stores a token (what the broker does); the key expires with the token.
    pub async fn store(
        &self,
        profile: &str,
        token: &str,
        expires_at: u64,
    ) -> Result<AccessToken, TokenError> {
        let now = now_secs();
        let stored = self.cipher.seal(profile, token, now, expires_at);
        let json = serde_json::to_string(&stored).expect("token record serializes");
        let ttl = expires_at.saturating_sub(now).max(1);
        let mut redis = self.redis.clone();
        let () = redis
            .set_ex(self.keys.token(profile), json, ttl)
            .await
            .map_err(Self::redis_err(profile))?;
        Ok(AccessToken {
            token: Secret::new(token),
            expires_at,
            fingerprint: stored.fingerprint,
        })
    }

    /// Asks the broker to refresh `failed` (if it is still the current token).
    pub async fn report_failure(
        &self,
        profile: &str,
        failed: &AccessToken,
    ) -> Result<(), TokenError> {
        let request = RefreshRequest {
            profile: profile.into(),
            fingerprint: failed.fingerprint.clone(),
        };
        let json = serde_json::to_string(&request).expect("request serializes");
        let mut redis = self.redis.clone();
        let _: i64 = redis
            .publish(self.keys.token_refresh_channel(), json)
            .await
            .map_err(Self::redis_err(profile))?;
        tracing::info!(profile, fingerprint = %failed.fingerprint, "asked the token broker to refresh a refused token");
        Ok(())
    }

    /// Waits (polling) until the profile's token differs from `failed`, up to
    /// `timeout`. A stored token that cannot be opened counts as not replaced
    /// yet; only a transient error (Redis) ends the wait early.
    pub async fn wait_for_replacement(
        &self,
        profile: &str,
        failed: &AccessToken,
        timeout: Duration,
    ) -> Result<Option<AccessToken>, TokenError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.current(profile).await {
                Ok(Some(t)) if t.fingerprint != failed.fingerprint => return Ok(Some(t)),
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e),
                // Stored but not to be opened (an unknown key id, say): not
                // replaced yet.
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A profile's refresh state, for `mailagent status` and metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ProfileState {
    /// `ok`, `refreshing` or `failing`.
    pub state: String,
    /// The last error (Entra's code and description, or the transport error).
    pub last_error: Option<String>,
    /// The AADSTS code of the last error, e.g. `AADSTS7000215`.
    pub error_code: Option<String>,
    /// Expiry of the current token (epoch seconds).
    pub expires_at: Option<u64>,
    /// When the next request may be made (epoch milliseconds).
    pub next_attempt_ms: Option<u64>,
    /// Last successful refresh (epoch milliseconds).
    pub last_refresh_ms: Option<u64>,
    /// Consecutive failed attempts.
    pub failures: u32,
    /// Ceiling of the current backoff step, milliseconds.
    pub backoff_ceiling_ms: Option<u64>,
    /// The credential kind: `secret`, `certificate` or `assertion-file`.
    #[serde(default)]
    pub credential: Option<String>,
    /// The credential last used, named without its value (`secret`,
    /// `certificate <thumbprint>`, `assertion file <path>`).
    #[serde(default)]
    pub credential_used: Option<String>,
    /// When the credential expires (epoch seconds), when known.
    #[serde(default)]
    pub credential_expires_at: Option<i64>,
    /// Why the credential cannot be read, when it cannot.
    #[serde(default)]
    pub credential_error: Option<String>,
    /// When this state was written (epoch seconds).
    pub updated_at: u64,
}

/// Reads a profile's state.
pub async fn read_state(
    redis: &mut RedisHandle,
    keys: &Keys,
    profile: &str,
) -> redis::RedisResult<Option<ProfileState>> {
    let raw: Option<String> = redis.get(keys.token_state(profile)).await?;
    Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> EncryptionKey {
        EncryptionKey {
            id: id.into(),
            key: [byte; 32],
        }
    }

    #[test]
    fn sealed_token_opens_and_hides_the_token() {
        let old = TokenCipher {
            keys: vec![key("aaaa", 1)],
            clear: false,
        };
        let token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.payload.signature";
        let stored = old.seal("contoso", token, 10, 4_000_000_000);
        let json = serde_json::to_string(&stored).unwrap();
        for window in token.as_bytes().windows(16) {
            assert!(!json.contains(std::str::from_utf8(window).unwrap()));
        }
        assert_eq!(old.open("contoso", &stored).unwrap().token.expose(), token);
        // Bound to its profile: the record cannot be moved to another one.
        assert!(matches!(
            old.open("fabrikam", &stored),
            Err(TokenError::Decrypt { .. })
        ));
        // Rotation: a new key in front still opens the old record.
        let rotated = TokenCipher {
            keys: vec![key("bbbb", 2), key("aaaa", 1)],
            clear: false,
        };
        assert_eq!(
            rotated.open("contoso", &stored).unwrap().token.expose(),
            token
        );
        assert_eq!(rotated.seal("contoso", token, 10, 20).kid, "bbbb");
        // Without the key: a clear error naming the key id.
        let other = TokenCipher {
            keys: vec![key("cccc", 3)],
            clear: false,
        };
        assert!(
            matches!(other.open("contoso", &stored), Err(TokenError::UnknownKey { kid, .. }) if kid == "aaaa")
        );
    }

    #[test]
    fn tampered_record_is_refused() {
        let c = TokenCipher {
            keys: vec![key("aaaa", 1)],
            clear: false,
        };
        let mut stored = c.seal("p", "tok", 1, 4_000_000_000);
        stored.expires_at += 3600;
        assert!(c.open("p", &stored).is_err());
    }
}
