//! `[[oauth-profiles]]`: the app registrations tokens are requested for.

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::Walker;

/// `[[oauth-profiles]]`: one app registration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OAuthProfile {
    /// Unique name, referenced by mail configs.
    pub name: String,
    /// `azure` or `generic`.
    pub provider: Provider,
    /// `application` (client credentials).
    pub access_type: AccessType,
    /// Free text.
    pub description: String,
    /// The Application (client) ID.
    pub application_key: String,
    /// How the application proves itself: a secret, a certificate or a
    /// federated assertion file (exactly one).
    pub credential: Credential,
    /// Authorization endpoint (kept for delegated flows).
    pub authorize_url: Option<url::Url>,
    /// Token endpoint.
    pub token_url: url::Url,
    /// Requested scope (`https://outlook.office365.com/.default` for azure).
    pub scope: String,
    /// How the client authenticates at the token endpoint.
    pub client_auth: ClientAuth,
    /// Allows an `http://` token URL (tests only).
    pub allow_insecure: bool,
}

/// OAuth provider flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// Microsoft Entra ID.
    Azure,
    /// Any RFC 6749 token endpoint.
    Generic,
}

impl Provider {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Azure => "azure",
            Self::Generic => "generic",
        }
    }
}

/// OAuth access type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessType {
    /// App-only, client-credentials grant.
    Application,
}

impl AccessType {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        "application"
    }
}

/// The credential of a profile (§2, §3); its files are re-read on every
/// token request (`crate::credential::present`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Credential {
    /// `application-secret` or `application-secret-file`.
    Secret {
        /// The inline value, or the file's content at load; `None` when this
        /// component does not read secrets.
        value: Option<crate::secret::Secret>,
        /// `application-secret-file`, re-read on each request.
        file: Option<std::path::PathBuf>,
        /// `application-secret-expires` (epoch seconds), for alarms.
        expires_at: Option<i64>,
    },
    /// `application-certificate-file` and `application-certificate-key-file`:
    /// an RFC 7523 client assertion signed with the key.
    Certificate {
        /// PEM X.509 certificate (as uploaded to the app registration).
        certificate_file: std::path::PathBuf,
        /// PEM RSA private key, PKCS#8 or PKCS#1.
        key_file: std::path::PathBuf,
        /// `assertion-algorithm`: PS256 (default) or RS256.
        algorithm: AssertionAlgorithm,
    },
    /// `client-assertion-file`: a federated credential (workload identity)
    /// sent as `client_assertion` as it is.
    AssertionFile {
        /// The file (e.g. `$AZURE_FEDERATED_TOKEN_FILE`).
        path: std::path::PathBuf,
    },
}

/// The signature algorithm of certificate assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256 (what Entra ID recommends).
    #[serde(rename = "PS256")]
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (older tenants and libraries).
    #[serde(rename = "RS256")]
    Rs256,
}

/// Client authentication at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (default).
    Body,
    /// HTTP Basic authentication.
    Basic,
}

/// Reads one `[[oauth-profiles]]` table at `path`; `None` when it is
/// unusable (its errors are recorded).
pub(super) fn parse(w: &mut Walker, path: &str, t: &Dict) -> Option<OAuthProfile> {
    w.unknown_keys(
        t,
        path,
        &[
            "name",
            "provider",
            "access-type",
            "description",
            "application-key",
            "application-secret",
            "application-secret-file",
            "application-secret-expires",
            "application-certificate-file",
            "application-certificate-key-file",
            "assertion-algorithm",
            "client-assertion-file",
            "authorize-url",
            "token-url",
            "scope",
            "client-auth",
            "allow-insecure",
        ],
    );
    let name = w.name(t, path, "name", None);
    let provider = match w
        .string(t, path, "provider")
        .map(|s| s.to_lowercase())
        .as_deref()
    {
        None | Some("azure") => Provider::Azure,
        Some("generic") => Provider::Generic,
        Some(other) => {
            w.err(
                format!("{path}.provider"),
                format!("unknown provider {other:?}: expected \"azure\" or \"generic\""),
            );
            Provider::Generic
        }
    };
    let access_type = match w
        .string(t, path, "access-type")
        .map(|s| s.to_lowercase())
        .as_deref()
    {
        None | Some("application") => AccessType::Application,
        Some("delegated") => {
            w.err(
                format!("{path}.access-type"),
                "\"delegated\" is not supported yet: use \"application\" (client credentials)",
            );
            AccessType::Application
        }
        Some(other) => {
            w.err(
                format!("{path}.access-type"),
                format!("unknown access type {other:?}: expected \"application\""),
            );
            AccessType::Application
        }
    };
    let description = w.string(t, path, "description").unwrap_or_default();
    let application_key = w.string(t, path, "application-key").unwrap_or_default();
    if application_key.trim().is_empty() {
        w.err(
            format!("{path}.application-key"),
            "missing: the Application (client) ID of the app registration",
        );
    }
    let credential = credential(w, path, t);
    let allow_insecure = w.boolean(t, path, "allow-insecure", false);
    let token_url = w.url(t, path, "token-url", allow_insecure, true);
    let authorize_url = w.url(t, path, "authorize-url", allow_insecure, false);
    let scope = match (w.string(t, path, "scope"), provider) {
        (Some(s), _) if !s.trim().is_empty() => s,
        (_, Provider::Azure) => "https://outlook.office365.com/.default".to_string(),
        (_, Provider::Generic) => {
            w.err(
                format!("{path}.scope"),
                "missing: required for provider \"generic\"",
            );
            String::new()
        }
    };
    if provider == Provider::Azure && !scope.ends_with("/.default") {
        w.err(
            format!("{path}.scope"),
            format!("{scope:?}: the client-credentials grant on Entra ID needs a \"/.default\" scope, e.g. https://outlook.office365.com/.default"),
        );
    }
    let client_auth = match w.string(t, path, "client-auth").as_deref() {
        None | Some("body") => ClientAuth::Body,
        Some("basic") => ClientAuth::Basic,
        Some(other) => {
            w.err(
                format!("{path}.client-auth"),
                format!("unknown client authentication {other:?}: expected \"body\" or \"basic\""),
            );
            ClientAuth::Body
        }
    };
    if client_auth == ClientAuth::Basic
        && !matches!(credential, Some(Credential::Secret { .. }) | None)
    {
        w.err(
            format!("{path}.client-auth"),
            "\"basic\" sends a client secret: a certificate or assertion credential is always sent in the body",
        );
    }
    Some(OAuthProfile {
        name: name?,
        provider,
        access_type,
        description,
        application_key,
        credential: credential?,
        authorize_url,
        token_url: token_url?,
        scope,
        client_auth,
        allow_insecure,
    })
}

/// Reads the profile's credential: exactly one of a secret, a certificate
/// (with its key) or a client assertion file. A certificate is checked
/// (readable, key matches, valid now) by components that request tokens.
fn credential(w: &mut Walker, path: &str, t: &Dict) -> Option<Credential> {
    let has = |k: &str| t.contains_key(k);
    let secret_set = has("application-secret") || has("application-secret-file");
    let cert_set = has("application-certificate-file") || has("application-certificate-key-file");
    let assertion_set = has("client-assertion-file");
    let set: Vec<&str> = [
        (secret_set, "application-secret"),
        (cert_set, "application-certificate-file"),
        (assertion_set, "client-assertion-file"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, k)| *k)
    .collect();
    let reads = w.component.reads_client_secrets();
    if set.len() > 1 {
        w.err(
            format!("{path}.{}", set[1]),
            format!(
                "set exactly one credential: {} are both set (a secret, a certificate or a client assertion file)",
                set.join(" and ")
            ),
        );
        return None;
    }
    if !secret_set && has("application-secret-expires") {
        w.err(
            format!("{path}.application-secret-expires"),
            "only for a secret credential: a certificate's expiry is read from the certificate",
        );
    }
    if !cert_set && has("assertion-algorithm") {
        w.err(
            format!("{path}.assertion-algorithm"),
            "only for a certificate credential (application-certificate-file)",
        );
    }
    if cert_set {
        let cert = file_path(w, t, path, "application-certificate-file");
        let key = file_path(w, t, path, "application-certificate-key-file");
        let algorithm = match w.string(t, path, "assertion-algorithm").as_deref() {
            None => AssertionAlgorithm::Ps256,
            Some(a) if a.eq_ignore_ascii_case("PS256") => AssertionAlgorithm::Ps256,
            Some(a) if a.eq_ignore_ascii_case("RS256") => AssertionAlgorithm::Rs256,
            Some(other) => {
                w.err(
                    format!("{path}.assertion-algorithm"),
                    format!("unknown algorithm {other:?}: expected \"PS256\" or \"RS256\""),
                );
                AssertionAlgorithm::Ps256
            }
        };
        let (cert, key) = (cert?, key?);
        if reads {
            use crate::credential::{Certificate, CredentialError};
            let checked = Certificate::read(&cert, &key)
                .and_then(|c| c.check_validity(&cert, crate::heartbeat::now_secs() as i64));
            if let Err(e) = checked {
                let key_name = match &e {
                    CredentialError::Unreadable { path: p, .. }
                    | CredentialError::Invalid { path: p, .. }
                        if *p == key =>
                    {
                        "application-certificate-key-file"
                    }
                    CredentialError::KeyMismatch { .. } => "application-certificate-key-file",
                    _ => "application-certificate-file",
                };
                w.err(format!("{path}.{key_name}"), e.to_string());
            }
        }
        return Some(Credential::Certificate {
            certificate_file: cert,
            key_file: key,
            algorithm,
        });
    }
    if assertion_set {
        let file = file_path(w, t, path, "client-assertion-file")?;
        if reads {
            match std::fs::read_to_string(&file) {
                Ok(text) if text.trim().is_empty() => w.err(
                    format!("{path}.client-assertion-file"),
                    format!("client assertion file {} is empty", file.display()),
                ),
                Ok(_) => {}
                Err(e) => w.err(
                    format!("{path}.client-assertion-file"),
                    format!(
                        "cannot read client assertion file {}: {}",
                        file.display(),
                        e.kind()
                    ),
                ),
            }
        }
        return Some(Credential::AssertionFile { path: file });
    }
    let value = w.secret(t, path, "application-secret", reads, true);
    let file = match t.get("application-secret-file") {
        Some(figment::value::Value::String(_, f)) => Some(std::path::PathBuf::from(f)),
        _ => None,
    };
    let expires_at = match t.get("application-secret-expires") {
        None => None,
        Some(v) => {
            let text = match v {
                figment::value::Value::String(_, s) => Some(s.clone()),
                // A bare TOML date (`2027-06-30`) arrives as toml's datetime table.
                figment::value::Value::Dict(_, d) => d
                    .values()
                    .next()
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                _ => None,
            };
            let parsed = text
                .as_deref()
                .and_then(crate::credential::parse_expiry_date);
            if parsed.is_none() {
                w.err(
                    format!("{path}.application-secret-expires"),
                    "must be a date, YYYY-MM-DD (the \"Expires\" column of Certificates & secrets)",
                );
            }
            parsed
        }
    };
    Some(Credential::Secret {
        value,
        file,
        expires_at,
    })
}

/// A required file path at `path.key`.
fn file_path(w: &mut Walker, t: &Dict, path: &str, key: &str) -> Option<std::path::PathBuf> {
    match w.string(t, path, key) {
        Some(s) if !s.trim().is_empty() => Some(std::path::PathBuf::from(s)),
        Some(_) => {
            w.err(format!("{path}.{key}"), "is empty");
            None
        }
        None => {
            w.err(format!("{path}.{key}"), "missing: a certificate credential needs both application-certificate-file and application-certificate-key-file");
            None
        }
    }
}
