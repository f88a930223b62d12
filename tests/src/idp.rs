//! **Test identity provider** — test support only, never used in production.
//!
//! An HTTP server speaking the Microsoft Entra ID v2 token endpoint
//! (`POST /{tenant}/oauth2/v2.0/token`) for the client-credentials grant,
//! which cannot be reached from the test machines. It issues RS256 JWTs
//! shaped like Entra's app-only tokens for Exchange Online (`aud`
//! `https://outlook.office365.com`, `appid`, `roles`, `tid`, `iss`, `exp`)
//! signed with the key whose public half Dovecot trusts, and answers errors
//! with Entra's bodies (`error`, `error_description` with the AADSTS code,
//! `error_codes`, `trace_id`, `correlation_id`). Knobs let a test change the
//! token lifetime, fail the next N requests with a status (429 with
//! `Retry-After`, 5xx), expire a client's secret and count requests.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::env::Endpoints;

/// The `aud` of Exchange Online tokens.
pub const EXCHANGE_AUDIENCE: &str = "https://outlook.office365.com";

/// The roles an app with both permissions carries.
pub const ROLES: &[&str] = &["IMAP.AccessAsApp", "POP.AccessAsApp"];

/// A registered application (app registration + client secret).
#[derive(Debug, Clone)]
pub struct Client {
    /// Its secret *Value*.
    pub secret: String,
    /// The secret's *ID* (what people paste by mistake).
    pub secret_id: String,
    /// The secret has expired (AADSTS7000222).
    pub expired: bool,
    /// Roles put into its tokens.
    pub roles: Vec<String>,
    /// Certificates registered on the app (Certificates & secrets → Certificates).
    pub certificates: Vec<RegisteredCert>,
    /// Federated credentials: (issuer, subject) pairs a client assertion
    /// from a workload platform may carry.
    pub federated: Vec<(String, String)>,
}

/// A certificate uploaded to an app registration.
#[derive(Debug, Clone)]
pub struct RegisteredCert {
    /// base64url SHA-256 of the DER (`x5t#S256`).
    pub x5t_s256: String,
    /// base64url SHA-1 of the DER (`x5t`).
    pub x5t: String,
    /// The RSA public key (PKCS#1 DER).
    pub public_key: Vec<u8>,
    /// `notAfter`, epoch seconds.
    pub not_after: i64,
}

/// The audience Entra ID expects in a federated (workload identity) assertion.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A canned failure for the next request(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 429 Too Many Requests with `Retry-After` seconds.
    TooManyRequests {
        /// Seconds in `Retry-After`.
        retry_after: u64,
    },
    /// A server error status (500, 503…).
    Status(u16),
    /// Hold the request for this long before answering normally.
    Delay(Duration),
}

/// One request as the IdP saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// `client_id`, when one was given.
    pub client_id: Option<String>,
    /// When it arrived.
    pub at: Instant,
    /// HTTP status answered.
    pub status: u16,
    /// A `client_secret` was sent.
    pub had_secret: bool,
    /// The `client_assertion`, when one was sent.
    pub assertion: Option<String>,
    /// The AADSTS code answered, when an error.
    pub error_code: Option<u32>,
}

impl RequestRecord {
    /// The assertion's JOSE header, decoded (not verified).
    pub fn assertion_header(&self) -> Option<jsonwebtoken::Header> {
        jsonwebtoken::decode_header(self.assertion.as_deref()?).ok()
    }

    /// The assertion's claims, decoded (not verified).
    pub fn assertion_claims(&self) -> Option<serde_json::Value> {
        let payload = self.assertion.as_deref()?.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Signing material and claims settings.
#[derive(Clone)]
pub struct Signer {
    key: EncodingKey,
    kid: String,
    /// Tenant id (`tid`).
    pub tenant: String,
    /// `iss` claim.
    pub issuer: String,
    /// `aud` claim.
    pub audience: String,
}

impl Signer {
    /// A signer from a PEM RSA private key.
    pub fn from_pem(
        pem: &[u8],
        kid: &str,
        tenant: &str,
        issuer: &str,
        audience: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            key: EncodingKey::from_rsa_pem(pem)?,
            kid: kid.to_string(),
            tenant: tenant.to_string(),
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        })
    }

    /// The signer of the test servers (`scripts/services`), whose key Dovecot trusts.
    pub fn trusted(endpoints: &Endpoints) -> Self {
        Self::from_key_file(endpoints, "MAILAGENT_TEST_IDP_KEY")
    }

    /// A signer with a key Dovecot does not trust (same kid and claims).
    pub fn untrusted(endpoints: &Endpoints) -> Self {
        Self::from_key_file(endpoints, "MAILAGENT_TEST_IDP_OTHER_KEY")
    }

    fn from_key_file(endpoints: &Endpoints, key: &str) -> Self {
        let pem = std::fs::read(endpoints.get(key)).expect("read test IdP key");
        Self::from_pem(
            &pem,
            endpoints.get("MAILAGENT_TEST_IDP_KID"),
            endpoints.get("MAILAGENT_TEST_TENANT"),
            endpoints.get("MAILAGENT_TEST_ISSUER"),
            endpoints.get("MAILAGENT_TEST_AUDIENCE"),
        )
        .expect("test IdP key is an RSA PEM")
    }

    /// An app-only access token for `appid`, valid from `now + offset` for `lifetime`.
    pub fn mint(
        &self,
        appid: &str,
        roles: &[String],
        lifetime: Duration,
        offset_secs: i64,
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
            + offset_secs;
        let claims = Claims {
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
            iat: now,
            nbf: now,
            exp: now + lifetime.as_secs() as i64,
            appid: appid.to_string(),
            appidacr: "1".into(),
            idp: self.issuer.clone(),
            oid: uuid::Uuid::new_v4().to_string(),
            roles: roles.to_vec(),
            sub: appid.to_string(),
            tid: self.tenant.clone(),
            ver: "1.0".into(),
            uti: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(rand::random::<[u8; 12]>()),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign JWT")
    }
}

#[derive(Serialize)]
struct Claims {
    aud: String,
    iss: String,
    iat: i64,
    nbf: i64,
    exp: i64,
    appid: String,
    appidacr: String,
    idp: String,
    oid: String,
    roles: Vec<String>,
    sub: String,
    tid: String,
    ver: String,
    uti: String,
}

struct Inner {
    clients: HashMap<String, Client>,
    lifetime: Duration,
    failures: VecDeque<Failure>,
    requests: Vec<RequestRecord>,
    issued: Vec<String>,
}

/// The shared state of a running test IdP.
#[derive(Clone)]
pub struct IdpState {
    signer: Signer,
    inner: Arc<Mutex<Inner>>,
}

/// A running test identity provider.
pub struct TestIdp {
    /// Bound address.
    pub addr: SocketAddr,
    state: IdpState,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestIdp {
    /// Starts on a free loopback port with the trusted key of the test servers.
    pub async fn start(endpoints: &Endpoints) -> Self {
        Self::start_with(
            Signer::trusted(endpoints),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await
    }

    /// Starts one as [`TestIdp::start`] does and registers an app with it;
    /// returns it with the app's (id, secret).
    pub async fn start_with_app(endpoints: &Endpoints) -> (Self, String, String) {
        let idp = Self::start(endpoints).await;
        let (app, secret) = idp.register_app();
        (idp, app, secret)
    }

    /// Starts with a given signer and address.
    pub async fn start_with(signer: Signer, listen: SocketAddr) -> Self {
        let state = IdpState {
            signer,
            inner: Arc::new(Mutex::new(Inner {
                clients: HashMap::new(),
                lifetime: Duration::from_secs(3599),
                failures: VecDeque::new(),
                requests: Vec::new(),
                issued: Vec::new(),
            })),
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("bind test IdP");
        let addr = listener.local_addr().expect("addr");
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    /// The shared state (for knobs).
    pub fn state(&self) -> &IdpState {
        &self.state
    }

    /// The tenant's token URL (`http://…/{tenant}/oauth2/v2.0/token`).
    pub fn token_url(&self) -> String {
        format!(
            "http://{}/{}/oauth2/v2.0/token",
            self.addr, self.state.signer.tenant
        )
    }

    /// The tenant's authorize URL.
    pub fn authorize_url(&self) -> String {
        format!(
            "http://{}/{}/oauth2/v2.0/authorize",
            self.addr, self.state.signer.tenant
        )
    }
}

impl std::ops::Deref for TestIdp {
    type Target = IdpState;
    fn deref(&self) -> &IdpState {
        &self.state
    }
}

impl IdpState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an app with a fresh random id and secret; returns (id, secret).
    pub fn register_app(&self) -> (String, String) {
        let id = uuid::Uuid::new_v4().to_string();
        let secret = format!("Q~{}", hex::encode(rand::random::<[u8; 20]>()));
        self.register(&id, &secret);
        (id, secret)
    }

    /// Registers (or replaces) an app.
    pub fn register(&self, client_id: &str, secret: &str) {
        self.lock().clients.insert(
            client_id.to_string(),
            Client {
                secret: secret.to_string(),
                secret_id: uuid::Uuid::new_v4().to_string(),
                expired: false,
                roles: ROLES.iter().map(|r| r.to_string()).collect(),
                certificates: Vec::new(),
                federated: Vec::new(),
            },
        );
    }

    /// Registers an app that has no secret (a random one nobody knows)
    /// and the certificate `der`; returns its id.
    pub fn register_cert_app(&self, der: &[u8]) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.register(&id, &format!("unknown-{}", uuid::Uuid::new_v4()));
        self.add_certificate(&id, der);
        id
    }

    /// Uploads another certificate (DER) to an app.
    pub fn add_certificate(&self, client_id: &str, der: &[u8]) {
        use sha2::Digest as _;
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("an X.509 certificate");
        let registered = RegisteredCert {
            x5t_s256: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(der)),
            x5t: {
                use sha1::Digest as _;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(der))
            },
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            not_after: cert.validity().not_after.timestamp(),
        };
        if let Some(c) = self.lock().clients.get_mut(client_id) {
            c.certificates.push(registered);
        }
    }

    /// Adds a federated credential (issuer, subject) to an app.
    pub fn add_federated(&self, client_id: &str, issuer: &str, subject: &str) {
        if let Some(c) = self.lock().clients.get_mut(client_id) {
            c.federated.push((issuer.to_string(), subject.to_string()));
        }
    }

    /// The secret *ID* of a client (for the "ID instead of Value" mistake).
    pub fn secret_id(&self, client_id: &str) -> Option<String> {
        self.lock()
            .clients
            .get(client_id)
            .map(|c| c.secret_id.clone())
    }

    /// Marks a client's secret expired (or valid again).
    pub fn set_expired(&self, client_id: &str, expired: bool) {
        if let Some(c) = self.lock().clients.get_mut(client_id) {
            c.expired = expired;
        }
    }

    /// Sets `expires_in` of tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lock().lifetime = lifetime;
    }

    /// Answers the next `count` requests with `failure`.
    pub fn fail_next(&self, count: usize, failure: Failure) {
        let mut inner = self.lock();
        for _ in 0..count {
            inner.failures.push_back(failure);
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// Requests made by one client.
    pub fn request_count(&self, client_id: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.client_id.as_deref() == Some(client_id))
            .count()
    }

    /// Every access token issued so far (for secret scans).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.clone()
    }

    /// Mints a token directly, bypassing the endpoint.
    pub fn mint(&self, appid: &str, lifetime: Duration) -> String {
        let roles: Vec<String> = ROLES.iter().map(|r| r.to_string()).collect();
        self.signer.mint(appid, &roles, lifetime, 0)
    }
}

fn router(state: IdpState) -> Router {
    Router::new()
        .route("/:tenant/oauth2/v2.0/token", post(token))
        .route("/_control/clients", post(control_register))
        .route("/_control/fail", post(control_fail))
        .route("/_control/lifetime", post(control_lifetime))
        .route("/_control/stats", get(control_stats))
        .with_state(state)
}

#[derive(Deserialize, Default)]
struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
    scope: Option<String>,
}

/// Entra's error codes used here, with their `error` and message.
fn entra_error(status: StatusCode, error: &str, code: u32, description: String) -> Response {
    let trace_id = uuid::Uuid::new_v4().to_string();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let timestamp = "2026-01-01 00:00:00Z";
    let body = serde_json::json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-test-aadsts", code.to_string().parse().expect("header"));
    response
}

/// Verifies a client assertion as Entra ID does: a certificate assertion
/// (`x5t#S256`/`x5t` in its header) by the signature with the registered
/// certificate, its validity, `aud` = the token URL, `iss` = `sub` = the
/// client id, and the time window; a federated assertion (no thumbprint)
/// by a registered (issuer, subject) pair and [`FEDERATED_AUDIENCE`] (the
/// platform issuer's signature is not fetched and checked here).
#[allow(clippy::result_large_err)]
fn verify_assertion(
    client: &Client,
    client_id: &str,
    assertion: &str,
    token_url: &str,
) -> Result<(), Response> {
    use jsonwebtoken::{DecodingKey, Validation};
    let bad = |code: u32, error: &str, message: String| {
        Err(entra_error(StatusCode::UNAUTHORIZED, error, code, message))
    };
    let Ok(header) = jsonwebtoken::decode_header(assertion) else {
        return bad(
            50027,
            "invalid_request",
            "JWT token is invalid or malformed.".into(),
        );
    };
    let claims: serde_json::Value = match assertion
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(c) => c,
        None => {
            return bad(
                50027,
                "invalid_request",
                "JWT token is invalid or malformed.".into(),
            )
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let claim = |k: &str| {
        claims
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let number = |k: &str| claims.get(k).and_then(|v| v.as_i64());
    if header.x5t_s256.is_none() && header.x5t.is_none() {
        // Federated credential.
        let (iss, sub) = (claim("iss"), claim("sub"));
        if !client.federated.iter().any(|(i, s)| *i == iss && *s == sub) {
            return bad(700213, "invalid_client", format!("No matching federated identity record found for presented assertion subject '{sub}'. Check your federated identity credential Subject, Audience and Issuer against the presented assertion."));
        }
        if claim("aud") != FEDERATED_AUDIENCE {
            return bad(700212, "invalid_client", format!("No matching federated identity record found for presented assertion audience '{}'.", claim("aud")));
        }
        if number("exp").is_none_or(|e| e < now) {
            return bad(
                700024,
                "invalid_client",
                "Client assertion is not within its valid time range.".into(),
            );
        }
        return Ok(());
    }
    let found = client.certificates.iter().find(|c| {
        header.x5t_s256.as_deref() == Some(c.x5t_s256.as_str())
            || (header.x5t_s256.is_none() && header.x5t.as_deref() == Some(c.x5t.as_str()))
    });
    let Some(cert) = found else {
        return bad(700027, "invalid_client", format!("Client assertion failed signature validation. [Reason - The key was not found., Thumbprint of key used by client: '{}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]", header.x5t.clone().unwrap_or_default()));
    };
    if let (Some(s256), Some(x5t)) = (&header.x5t_s256, &header.x5t) {
        if *s256 != cert.x5t_s256 || *x5t != cert.x5t {
            return bad(700027, "invalid_client", "Client assertion failed signature validation. [Reason - x5t and x5t#S256 name different keys.]".into());
        }
    }
    if cert.not_after < now {
        return bad(700027, "invalid_client", format!("Client assertion contains an invalid signature. [Reason - The key used is expired., Thumbprint of key used by client: '{}']", header.x5t.clone().unwrap_or_default()));
    }
    if !matches!(
        header.alg,
        jsonwebtoken::Algorithm::PS256 | jsonwebtoken::Algorithm::RS256
    ) {
        return bad(700027, "invalid_client", format!("Client assertion failed signature validation. [Reason - unsupported algorithm {:?}.]", header.alg));
    }
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    if jsonwebtoken::decode::<serde_json::Value>(
        assertion,
        &DecodingKey::from_rsa_der(&cert.public_key),
        &validation,
    )
    .is_err()
    {
        return bad(700027, "invalid_client", "Client assertion contains an invalid signature. [Reason - The provided signature value did not match the expected signature value.]".into());
    }
    if claim("aud") != token_url {
        return bad(700023, "invalid_client", format!("Client assertion audience claim does not match Realm issuer. Review the documentation at https://aka.ms/certCreds. Expected audience '{token_url}', got '{}'.", claim("aud")));
    }
    if claim("iss") != client_id || claim("sub") != client_id {
        return bad(700021, "invalid_client", "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://aka.ms/certCreds .".to_string());
    }
    let skew = 300;
    let (nbf, exp) = (number("nbf").unwrap_or(0), number("exp"));
    if exp.is_none_or(|e| e + skew < now) || nbf > now + skew {
        return bad(700024, "invalid_client", "Client assertion is not within its valid time range. Ensure that the access token is not expired before using it.".into());
    }
    Ok(())
}

async fn token(
    State(state): State<IdpState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    form: Option<Form<TokenForm>>,
) -> Response {
    let Form(mut form) = form.unwrap_or_default();
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // HTTP Basic client authentication, as RFC 6749 §2.3.1 allows.
    if let Some(basic) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
    {
        if let Some((id, secret)) = basic.split_once(':') {
            form.client_id.get_or_insert(id.to_string());
            form.client_secret.get_or_insert(secret.to_string());
        }
    }
    let failure = state.lock().failures.pop_front();
    let response = match failure {
        Some(Failure::TooManyRequests { retry_after }) => {
            let mut r = entra_error(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                50196,
                "The server temporarily throttled the request.".into(),
            );
            r.headers_mut().insert(
                "retry-after",
                retry_after.to_string().parse().expect("header"),
            );
            r
        }
        Some(Failure::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            entra_error(
                status,
                "temporarily_unavailable",
                50001,
                "The service is temporarily unavailable.".into(),
            )
        }
        Some(Failure::Delay(d)) => {
            tokio::time::sleep(d).await;
            issue(&state, &tenant, &form, &host)
        }
        None => issue(&state, &tenant, &form, &host),
    };
    let error_code = response
        .headers()
        .get("x-test-aadsts")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    state.lock().requests.push(RequestRecord {
        client_id: form.client_id.clone(),
        at: Instant::now(),
        status: response.status().as_u16(),
        had_secret: form.client_secret.is_some(),
        assertion: form.client_assertion.clone(),
        error_code,
    });
    response
}

fn issue(state: &IdpState, tenant: &str, form: &TokenForm, host: &str) -> Response {
    if tenant != state.signer.tenant {
        return entra_error(StatusCode::BAD_REQUEST, "invalid_request", 90002, format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."));
    }
    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(other) => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{other}'."),
            );
        }
        None => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.".into(),
            );
        }
    }
    let Some(client_id) = form.client_id.as_deref() else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.".into(),
        );
    };
    let client = state.lock().clients.get(client_id).cloned();
    let Some(client) = client else {
        return entra_error(StatusCode::BAD_REQUEST, "unauthorized_client", 700016, format!("Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."));
    };
    if let Some(assertion) = form.client_assertion.as_deref() {
        if form.client_assertion_type.as_deref() != Some(common::credential::JWT_BEARER) {
            return entra_error(StatusCode::BAD_REQUEST, "invalid_request", 50027, "Invalid client_assertion_type: expected urn:ietf:params:oauth:client-assertion-type:jwt-bearer.".into());
        }
        let token_url = format!("http://{host}/{tenant}/oauth2/v2.0/token");
        if let Err(refusal) = verify_assertion(&client, client_id, assertion, &token_url) {
            return refusal;
        }
    } else {
        let Some(secret) = form.client_secret.as_deref() else {
            return entra_error(StatusCode::BAD_REQUEST, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.".into());
        };
        if secret != client.secret {
            return entra_error(StatusCode::UNAUTHORIZED, "invalid_client", 7000215, format!("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."));
        }
        if client.expired {
            return entra_error(StatusCode::UNAUTHORIZED, "invalid_client", 7000222, format!("The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds."));
        }
    }
    let scope = form.scope.as_deref().unwrap_or("");
    if scope.is_empty() {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'scope'.".into(),
        );
    }
    if !scope.ends_with("/.default") {
        return entra_error(StatusCode::BAD_REQUEST, "invalid_scope", 1002012, format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."));
    }
    if scope.trim_end_matches("/.default") != state.signer.audience {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            format!(
                "The resource principal named {} was not found in the tenant named {tenant}.",
                scope.trim_end_matches("/.default")
            ),
        );
    }
    let lifetime = state.lock().lifetime;
    let token = state.signer.mint(client_id, &client.roles, lifetime, 0);
    state.lock().issued.push(token.clone());
    let body = serde_json::json!({
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "ext_expires_in": lifetime.as_secs(),
        "access_token": token,
    });
    (StatusCode::OK, Json(body)).into_response()
}

#[derive(Deserialize)]
struct RegisterBody {
    client_id: String,
    secret: String,
    #[serde(default)]
    expired: bool,
}

async fn control_register(
    State(state): State<IdpState>,
    Json(body): Json<RegisterBody>,
) -> StatusCode {
    state.register(&body.client_id, &body.secret);
    state.set_expired(&body.client_id, body.expired);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct FailBody {
    count: usize,
    status: u16,
    #[serde(default)]
    retry_after: u64,
}

async fn control_fail(State(state): State<IdpState>, Json(body): Json<FailBody>) -> StatusCode {
    let failure = if body.status == 429 {
        Failure::TooManyRequests {
            retry_after: body.retry_after,
        }
    } else {
        Failure::Status(body.status)
    };
    state.fail_next(body.count, failure);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct LifetimeBody {
    seconds: u64,
}

async fn control_lifetime(
    State(state): State<IdpState>,
    Json(body): Json<LifetimeBody>,
) -> StatusCode {
    state.set_lifetime(Duration::from_secs(body.seconds));
    StatusCode::NO_CONTENT
}

async fn control_stats(State(state): State<IdpState>) -> Json<serde_json::Value> {
    let mut per_client: HashMap<String, usize> = HashMap::new();
    for r in state.requests() {
        *per_client
            .entry(r.client_id.unwrap_or_default())
            .or_default() += 1;
    }
    Json(serde_json::json!({ "requests": per_client }))
}
