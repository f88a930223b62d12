//! The client-credentials request to a token endpoint (RFC 6749 §4.4) and
//! Entra ID's answers: the success body, the error body, and what each
//! failure means for retrying.

use std::time::Duration;

use common::config::{ClientAuth, OAuthProfile, TlsConfig, TokenBrokerConfig};
use common::credential::{self, Presented, Proof};
use common::Secret;
use serde::Deserialize;

/// A token as the endpoint returned it.
#[derive(Debug)]
pub struct IssuedToken {
    /// The access token.
    pub access_token: Secret,
    /// Lifetime in seconds (`expires_in`; Entra gives 60–90 minutes).
    pub expires_in: u64,
}

/// Why a token request failed, classified for retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// 429: wait `retry_after` (when given) before the next request.
    #[error("token endpoint throttled the request (429){}", .retry_after.map(|d| format!(", retry after {} s", d.as_secs())).unwrap_or_default())]
    Throttled {
        /// The `Retry-After` delay.
        retry_after: Option<Duration>,
    },
    /// 5xx, timeout, connection error: retry with backoff.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
    /// The endpoint refused the credentials or the request (bad secret,
    /// unknown app, wrong scope): retry only slowly; a human must act.
    #[error("{}", .reason)]
    Rejected {
        /// OAuth `error` (`invalid_client`…).
        error: String,
        /// `AADSTS…` code, when Entra gave one.
        code: Option<String>,
        /// The full, printable reason.
        reason: String,
    },
}

/// Entra's (RFC 6749 §5.2) error body.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u64>,
    #[serde(default)]
    trace_id: String,
    #[serde(default)]
    correlation_id: String,
}

#[derive(Deserialize)]
struct SuccessBody {
    access_token: String,
    #[serde(default)]
    token_type: String,
    expires_in: serde_json::Value,
}

/// Builds the HTTP client: connect and total timeouts, TLS verified with the
/// extra CA added to the roots.
pub fn http_client(cfg: &TokenBrokerConfig, tls: &TlsConfig) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.request_timeout)
        .user_agent(concat!(
            "mailagent-token-broker/",
            env!("CARGO_PKG_VERSION")
        ))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &tls.extra_ca_file {
        for cert in common::tls::read_certs(path)? {
            builder = builder.add_root_certificate(reqwest::Certificate::from_der(&cert)?);
        }
    }
    Ok(builder.build()?)
}

/// Requests a token for `profile`, reading its credential afresh.
pub async fn request_token(
    http: &reqwest::Client,
    profile: &OAuthProfile,
) -> Result<IssuedToken, RequestError> {
    let presented = credential::present(profile).map_err(credential_error)?;
    request_token_with(http, profile, &presented).await
}

/// A credential that cannot be used. An expired certificate needs a person
/// (a refusal, retried slowly); a file that is missing, unreadable or does
/// not match its key may be in the middle of a rotation (the certificate
/// replaced, the key not yet), so it is retried on the transient schedule.
pub fn credential_error(e: credential::CredentialError) -> RequestError {
    let reason = format!("cannot use the profile's credential: {e}");
    match e {
        credential::CredentialError::Expired { .. } => RequestError::Rejected {
            error: "credential".into(),
            code: None,
            reason,
        },
        _ => RequestError::Transient(reason),
    }
}

/// Requests a token for `profile` with an already presented credential.
pub async fn request_token_with(
    http: &reqwest::Client,
    profile: &OAuthProfile,
    presented: &Presented,
) -> Result<IssuedToken, RequestError> {
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", "client_credentials"),
        ("scope", &profile.scope),
    ];
    let mut request = http.post(profile.token_url.clone());
    match (&presented.proof, profile.client_auth) {
        (Proof::Secret(secret), ClientAuth::Basic) => {
            // RFC 6749 §2.3.1: form-urlencode id and secret before Basic.
            let id = form_encode(&profile.application_key);
            let pw = form_encode(secret.expose());
            request = request.basic_auth(id, Some(pw));
        }
        (Proof::Secret(secret), ClientAuth::Body) => {
            form.push(("client_id", &profile.application_key));
            form.push(("client_secret", secret.expose()));
        }
        (Proof::Assertion(assertion), _) => {
            form.push(("client_id", &profile.application_key));
            form.push(("client_assertion_type", credential::JWT_BEARER));
            form.push(("client_assertion", assertion.expose()));
        }
    }
    let response = request
        .form(&form)
        .send()
        .await
        .map_err(|e| RequestError::Transient(describe(&e)))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = response
        .bytes()
        .await
        .map_err(|e| RequestError::Transient(describe(&e)))?;
    classify(status.as_u16(), retry_after, &body)
}

/// Turns a response into a token or a classified error (pure, for tests).
pub fn classify(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<IssuedToken, RequestError> {
    if status == 200 {
        let ok: SuccessBody = serde_json::from_slice(body).map_err(|e| {
            RequestError::Transient(format!(
                "token endpoint answered 200 with an unreadable body: {e}"
            ))
        })?;
        if !ok.token_type.is_empty() && !ok.token_type.eq_ignore_ascii_case("bearer") {
            return Err(RequestError::Transient(format!(
                "unexpected token_type {:?}",
                ok.token_type
            )));
        }
        let expires_in = match &ok.expires_in {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .filter(|&s| s > 0)
        .ok_or_else(|| {
            RequestError::Transient("token endpoint gave no usable expires_in".into())
        })?;
        return Ok(IssuedToken {
            access_token: Secret::new(ok.access_token),
            expires_in,
        });
    }
    if status == 429 {
        return Err(RequestError::Throttled { retry_after });
    }
    let err: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    if status >= 500 || status == 408 || (err.error == "temporarily_unavailable") {
        let what = if err.error.is_empty() {
            String::new()
        } else {
            format!(" ({})", short_description(&err))
        };
        return Err(RequestError::Transient(format!("HTTP {status}{what}")));
    }
    let code = err
        .error_codes
        .first()
        .map(|c| format!("AADSTS{c}"))
        .or_else(|| {
            err.error_description
                .split(':')
                .next()
                .filter(|p| p.starts_with("AADSTS"))
                .map(str::to_string)
        });
    let error = if err.error.is_empty() {
        format!("http_{status}")
    } else {
        err.error.clone()
    };
    let mut reason = format!("{error}: {}", short_description(&err));
    if let Some(hint) = code.as_deref().and_then(hint) {
        reason.push_str(&format!(" [{hint}]"));
    }
    if !err.trace_id.is_empty() || !err.correlation_id.is_empty() {
        reason.push_str(&format!(
            " (trace id {}, correlation id {})",
            err.trace_id, err.correlation_id
        ));
    }
    Err(RequestError::Rejected {
        error,
        code,
        reason,
    })
}

/// Entra's description without its trailing trace/correlation/timestamp lines.
fn short_description(err: &ErrorBody) -> String {
    let d = err
        .error_description
        .split(" Trace ID:")
        .next()
        .unwrap_or("")
        .trim();
    if d.is_empty() {
        "no description".to_string()
    } else {
        d.to_string()
    }
}

/// What an operator should check for the usual AADSTS codes.
pub fn hint(code: &str) -> Option<&'static str> {
    Some(match code {
        "AADSTS7000215" => "wrong client secret: configure the secret's Value, not its ID",
        "AADSTS7000222" => "the client secret has expired: create a new one in the app registration (or move to a certificate), then update application-secret and application-secret-expires",
        "AADSTS700027" => "the certificate assertion was refused: the certificate is not registered on the app (Certificates & secrets -> Certificates), has expired, or the key does not match it",
        "AADSTS700024" => "the client assertion is outside its time window: check this host's clock (NTP)",
        "AADSTS700023" => "the client assertion's audience is wrong: its aud must be the profile's token-url",
        "AADSTS700021" => "the client assertion's issuer is wrong: iss and sub must be the application (client) id",
        "AADSTS7000218" => "the request carried no credential: configure a secret, a certificate or a client assertion file",
        "AADSTS700213" | "AADSTS70021" => "no federated credential on the app matches the assertion's issuer and subject: check the federated credential in the app registration",
        "AADSTS700016" => "unknown application id in this tenant: check application-key and the tenant in token-url",
        "AADSTS1002012" => "the scope must end in /.default for the client-credentials grant",
        "AADSTS90002" => "unknown tenant: check the tenant id in token-url",
        "AADSTS500011" => "unknown resource: the scope should be https://outlook.office365.com/.default",
        _ => return None,
    })
}

fn describe(e: &reqwest::Error) -> String {
    // reqwest's Display names the URL (no secret: it is in the body) and the kind.
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut msg = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// `Retry-After`: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn form_encode(s: &str) -> String {
    url_encode(s)
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entra(error: &str, code: u64, description: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description} Trace ID: t-1 Correlation ID: c-1 Timestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [code],
            "trace_id": "t-1",
            "correlation_id": "c-1",
        }))
        .unwrap()
    }

    #[test]
    fn classification_table() {
        let ok = br#"{"token_type":"Bearer","expires_in":4199,"ext_expires_in":4199,"access_token":"eyJ.x.y"}"#;
        let t = classify(200, None, ok).unwrap();
        assert_eq!(t.expires_in, 4199);
        assert_eq!(t.access_token.expose(), "eyJ.x.y");
        let string_expiry = br#"{"token_type":"Bearer","expires_in":"3599","access_token":"a"}"#;
        assert_eq!(classify(200, None, string_expiry).unwrap().expires_in, 3599);

        let cases: Vec<(u16, Vec<u8>, &str)> = vec![
            (
                401,
                entra("invalid_client", 7000215, "Invalid client secret provided."),
                "rejected AADSTS7000215",
            ),
            (
                401,
                entra(
                    "invalid_client",
                    7000222,
                    "The provided client secret keys are expired.",
                ),
                "rejected AADSTS7000222",
            ),
            (
                400,
                entra("unauthorized_client", 700016, "Application not found."),
                "rejected AADSTS700016",
            ),
            (
                400,
                entra(
                    "invalid_scope",
                    1002012,
                    "The provided value for scope is not valid.",
                ),
                "rejected AADSTS1002012",
            ),
            (400, b"{}".to_vec(), "rejected"),
            (
                503,
                entra("temporarily_unavailable", 50001, "down"),
                "transient",
            ),
            (500, b"<html>".to_vec(), "transient"),
            (429, vec![], "throttled"),
            (200, b"{\"access_token\":\"a\"}".to_vec(), "transient"),
        ];
        for (status, body, expected) in cases {
            let got = match classify(status, Some(Duration::from_secs(2)), &body) {
                Err(RequestError::Rejected {
                    code: Some(c),
                    reason,
                    ..
                }) => {
                    assert!(reason.contains(&c), "{reason}");
                    assert!(!reason.contains("Timestamp"), "{reason}");
                    format!("rejected {c}")
                }
                Err(RequestError::Rejected { code: None, .. }) => "rejected".into(),
                Err(RequestError::Transient(_)) => "transient".into(),
                Err(RequestError::Throttled { retry_after }) => {
                    assert_eq!(retry_after, Some(Duration::from_secs(2)));
                    "throttled".into()
                }
                Ok(_) => "ok".into(),
            };
            assert_eq!(got, expected, "status {status}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn basic_auth_values_are_form_encoded() {
        assert_eq!(url_encode("a b+c~"), "a+b%2Bc%7E");
    }
}
