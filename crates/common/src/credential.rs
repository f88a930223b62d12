//! The credential an OAuth profile proves itself with at the token endpoint
//! (§3): a client secret, a certificate (an RFC 7523 client assertion as
//! Entra ID's "certificate credentials" page specifies) or a federated
//! assertion read from a file (workload identity).
//!
//! Every credential file is read afresh on each use, so replacing one (a
//! rotated certificate, a platform-refreshed assertion, a new secret) takes
//! effect at the next token request without a restart. Nothing here logs or
//! prints a secret: a credential is described by its kind and, for a
//! certificate, its SHA-1 thumbprint (what the Azure portal shows).

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::Serialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::config::{AssertionAlgorithm, Credential, OAuthProfile};
use crate::heartbeat::now_secs;
use crate::secret::Secret;

/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a certificate assertion is valid (Entra accepts up to 10 minutes).
pub const ASSERTION_LIFETIME_SECS: u64 = 300;

/// Why a credential cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// A credential file cannot be read.
    #[error("cannot read {what} {path}: {reason}")]
    Unreadable {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause (an I/O error kind, never content).
        reason: String,
    },
    /// A credential file holds something unusable.
    #[error("{what} {path} is unusable: {reason}")]
    Invalid {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key is not the certificate's.
    #[error("the private key {key} does not belong to the certificate {certificate} (thumbprint {thumbprint})")]
    KeyMismatch {
        /// The certificate file.
        certificate: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The certificate's SHA-1 thumbprint.
        thumbprint: String,
    },
    /// The certificate is outside its validity period.
    #[error("the certificate {path} (thumbprint {thumbprint}) {when}: upload a new certificate to the app registration and point the profile at it")]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// Its SHA-1 thumbprint.
        thumbprint: String,
        /// "expired on …" or "is not valid before …".
        when: String,
    },
}

/// A certificate credential read from its files.
pub struct Certificate {
    /// SHA-1 thumbprint, upper-case hex (as the Azure portal shows it).
    pub thumbprint: String,
    /// `x5t`: base64url of the SHA-1 of the certificate's DER.
    pub x5t: String,
    /// `x5t#S256`: base64url of the SHA-256 of the certificate's DER.
    pub x5t_s256: String,
    /// `notBefore`, epoch seconds.
    pub not_before: i64,
    /// `notAfter`, epoch seconds.
    pub not_after: i64,
    key: EncodingKey,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("thumbprint", &self.thumbprint)
            .field("not_after", &self.not_after)
            .field("key", &"[redacted]")
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CredentialError> {
    std::fs::read(path).map_err(|e| CredentialError::Unreadable {
        what,
        path: path.to_path_buf(),
        reason: e.kind().to_string(),
    })
}

impl Certificate {
    /// Reads a PEM X.509 certificate and its PEM RSA private key (PKCS#8 or
    /// PKCS#1), and checks that the key is the certificate's. Validity is
    /// not checked here: see [`Certificate::check_validity`].
    pub fn read(cert_path: &Path, key_path: &Path) -> Result<Self, CredentialError> {
        let invalid = |what: &'static str, path: &Path, reason: String| CredentialError::Invalid {
            what,
            path: path.to_path_buf(),
            reason,
        };
        let pem = read("certificate file", cert_path)?;
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .and_then(|r| r.ok())
            .ok_or_else(|| {
                invalid(
                    "certificate file",
                    cert_path,
                    "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
                )
            })?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| {
            invalid(
                "certificate file",
                cert_path,
                format!("not an X.509 certificate: {e}"),
            )
        })?;
        let spki = cert.public_key();
        if spki.algorithm.algorithm != x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
            return Err(invalid(
                "certificate file",
                cert_path,
                "its key is not RSA (Entra ID certificate credentials are RSA)".into(),
            ));
        }
        let sha1 = Sha1::digest(der.as_ref());
        let thumbprint = hex::encode_upper(sha1);
        let key_pem = read("private key file", key_path)?;
        let key = EncodingKey::from_rsa_pem(&key_pem).map_err(|_| {
            invalid(
                "private key file",
                key_path,
                "not a PEM RSA private key (PKCS#8 \"PRIVATE KEY\" or PKCS#1 \"RSA PRIVATE KEY\", unencrypted)".into(),
            )
        })?;
        // The key matches when what it signs verifies under the certificate's key.
        let probe = b"mailagent certificate key check";
        let public = DecodingKey::from_rsa_der(&spki.subject_public_key.data);
        let matches = jsonwebtoken::crypto::sign(probe, &key, Algorithm::RS256)
            .ok()
            .and_then(|sig| {
                jsonwebtoken::crypto::verify(&sig, probe, &public, Algorithm::RS256).ok()
            })
            .unwrap_or(false);
        if !matches {
            return Err(CredentialError::KeyMismatch {
                certificate: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
                thumbprint,
            });
        }
        let validity = cert.validity();
        Ok(Self {
            thumbprint,
            x5t: URL_SAFE_NO_PAD.encode(sha1),
            x5t_s256: URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_ref())),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            key,
        })
    }

    /// An error when `now` (epoch seconds) is outside the validity period.
    pub fn check_validity(&self, path: &Path, now: i64) -> Result<(), CredentialError> {
        let when = if now > self.not_after {
            format!("expired on {}", crate::credential::date(self.not_after))
        } else if now < self.not_before {
            format!(
                "is not valid before {}",
                crate::credential::date(self.not_before)
            )
        } else {
            return Ok(());
        };
        Err(CredentialError::Expired {
            path: path.to_path_buf(),
            thumbprint: self.thumbprint.clone(),
            when,
        })
    }

    /// A fresh client assertion: `aud` = `token_url`, `iss` = `sub` =
    /// `client_id`, a random `jti`, `nbf`/`iat` now, `exp` in
    /// [`ASSERTION_LIFETIME_SECS`].
    pub fn assertion(
        &self,
        client_id: &str,
        token_url: &str,
        algorithm: AssertionAlgorithm,
    ) -> Secret {
        let now = now_secs();
        let claims = AssertionClaims {
            aud: token_url,
            iss: client_id,
            sub: client_id,
            jti: uuid::Uuid::new_v4().to_string(),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        let mut header = Header::new(match algorithm {
            AssertionAlgorithm::Ps256 => Algorithm::PS256,
            AssertionAlgorithm::Rs256 => Algorithm::RS256,
        });
        header.typ = Some("JWT".into());
        header.x5t = Some(self.x5t.clone());
        header.x5t_s256 = Some(self.x5t_s256.clone());
        Secret::new(
            jsonwebtoken::encode(&header, &claims, &self.key)
                .expect("an RSA key read by jsonwebtoken signs"),
        )
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

/// `YYYY-MM-DD HH:MM:SS UTC` of epoch seconds.
pub fn date(epoch: i64) -> String {
    chrono::DateTime::from_timestamp(epoch, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| epoch.to_string())
}

/// What the client sends to prove itself.
pub enum Proof {
    /// `client_secret`.
    Secret(Secret),
    /// `client_assertion` with [`JWT_BEARER`] as its type.
    Assertion(Secret),
}

/// A credential ready for one token request.
pub struct Presented {
    /// What is sent.
    pub proof: Proof,
    /// Names the credential in logs and output without revealing it:
    /// `secret`, `certificate <thumbprint>`, `assertion file <path>`.
    pub description: String,
    /// When the credential itself expires (epoch seconds), when known.
    pub expires_at: Option<i64>,
}

/// The short kind of a profile's credential: `secret`, `certificate` or
/// `assertion-file`.
pub fn kind(credential: &Credential) -> &'static str {
    match credential {
        Credential::Secret { .. } => "secret",
        Credential::Certificate { .. } => "certificate",
        Credential::AssertionFile { .. } => "assertion-file",
    }
}

/// Reads the profile's credential afresh and prepares it for one token
/// request (a new assertion with a new `jti` for a certificate).
pub fn present(profile: &OAuthProfile) -> Result<Presented, CredentialError> {
    match &profile.credential {
        Credential::Secret {
            value,
            file,
            expires_at,
        } => {
            let secret = match (file, value) {
                (Some(path), _) => {
                    let raw = read("secret file", path)?;
                    let text = String::from_utf8(raw).map_err(|_| CredentialError::Invalid {
                        what: "secret file",
                        path: path.clone(),
                        reason: "not UTF-8".into(),
                    })?;
                    let text = text.trim_end_matches(['\r', '\n']);
                    if text.is_empty() {
                        return Err(CredentialError::Invalid {
                            what: "secret file",
                            path: path.clone(),
                            reason: "empty".into(),
                        });
                    }
                    Secret::new(text)
                }
                (None, Some(v)) => v.clone(),
                (None, None) => {
                    return Err(CredentialError::Invalid {
                        what: "secret",
                        path: PathBuf::from("application-secret"),
                        reason: "no client secret configured".into(),
                    })
                }
            };
            Ok(Presented {
                proof: Proof::Secret(secret),
                description: "secret".into(),
                expires_at: *expires_at,
            })
        }
        Credential::Certificate {
            certificate_file,
            key_file,
            algorithm,
        } => {
            let cert = Certificate::read(certificate_file, key_file)?;
            cert.check_validity(certificate_file, now_secs() as i64)?;
            Ok(Presented {
                proof: Proof::Assertion(cert.assertion(
                    &profile.application_key,
                    profile.token_url.as_str(),
                    *algorithm,
                )),
                description: format!("certificate {}", cert.thumbprint),
                expires_at: Some(cert.not_after),
            })
        }
        Credential::AssertionFile { path } => {
            let raw = read("client assertion file", path)?;
            let text = String::from_utf8(raw).map_err(|_| CredentialError::Invalid {
                what: "client assertion file",
                path: path.clone(),
                reason: "not UTF-8".into(),
            })?;
            let text = text.trim();
            if text.is_empty() {
                return Err(CredentialError::Invalid {
                    what: "client assertion file",
                    path: path.clone(),
                    reason: "empty".into(),
                });
            }
            Ok(Presented {
                proof: Proof::Assertion(Secret::new(text)),
                description: format!("assertion file {}", path.display()),
                expires_at: None,
            })
        }
    }
}

/// When the profile's credential expires (epoch seconds): the certificate's
/// `notAfter`, or the configured `application-secret-expires`; `None` when
/// unknown (a federated assertion is renewed by its platform).
pub fn expiry(profile: &OAuthProfile) -> Result<Option<i64>, CredentialError> {
    match &profile.credential {
        Credential::Secret { expires_at, .. } => Ok(*expires_at),
        Credential::Certificate {
            certificate_file,
            key_file,
            ..
        } => Certificate::read(certificate_file, key_file).map(|c| Some(c.not_after)),
        Credential::AssertionFile { .. } => Ok(None),
    }
}

/// Parses `application-secret-expires`: `YYYY-MM-DD` (the end of that day
/// is not assumed: the secret is treated as gone at 00:00 UTC) or an RFC
/// 3339 date-time. Epoch seconds.
pub fn parse_expiry_date(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(d.timestamp());
    }
    let d = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_dates() {
        assert_eq!(parse_expiry_date("2027-01-01"), Some(1_798_761_600));
        assert_eq!(
            parse_expiry_date("2027-01-01T00:00:10Z"),
            Some(1_798_761_610)
        );
        assert_eq!(parse_expiry_date("01/01/2027"), None);
        assert_eq!(parse_expiry_date("soon"), None);
    }

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(date(1_798_761_600), "2027-01-01 00:00:00 UTC");
    }
}
