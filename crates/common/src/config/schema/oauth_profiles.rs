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
    /// The client secret *Value*; `None` when this component does not read it.
    pub application_secret: Option<crate::secret::Secret>,
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
    let secret = w.secret(
        t,
        path,
        "application-secret",
        w.component.reads_client_secrets(),
        true,
    );
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
    Some(OAuthProfile {
        name: name?,
        provider,
        access_type,
        description,
        application_key,
        application_secret: secret,
        authorize_url,
        token_url: token_url?,
        scope,
        client_auth,
        allow_insecure,
    })
}
