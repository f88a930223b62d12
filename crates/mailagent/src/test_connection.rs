//! `mailagent test-connection <mail config>`: walks the path a fetcher takes —
//! its own token request with the configured secret (not the broker's cached
//! token), name resolution, TCP, TLS, login, folder — and names the exact step
//! that fails with its likely cause and fix.

use std::sync::Arc;
use std::time::Duration;

use common::config::{IncomingMail, MailAuth, Protocol};
use common::Config;

/// The outcome of one step.
struct Step {
    name: String,
    result: Result<String, Diagnosis>,
}

/// What went wrong, in an operator's words.
struct Diagnosis {
    error: String,
    cause: String,
}

fn fail(error: impl Into<String>, cause: impl Into<String>) -> Diagnosis {
    Diagnosis {
        error: error.into(),
        cause: cause.into(),
    }
}

/// Runs the checks and prints them; returns false when a step failed.
pub async fn test_connection(config: &Config, name: &str) -> anyhow::Result<bool> {
    let Some(cfg) = config.mail_config(name) else {
        let known: Vec<&str> = config
            .incoming_mail
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        anyhow::bail!(
            "no incoming-mail config named {name:?} (configured: {})",
            known.join(", ")
        );
    };
    println!(
        "test-connection {} ({} {}:{}, mailbox {})",
        cfg.name,
        cfg.server_type.as_str(),
        cfg.host,
        cfg.port,
        cfg.username
    );
    let mut steps = Vec::new();
    let ok = run_steps(config, cfg, &mut steps).await;
    for s in &steps {
        match &s.result {
            Ok(detail) => println!("  [ok]   {}: {detail}", s.name),
            Err(d) => {
                println!("  [FAIL] {}: {}", s.name, d.error);
                println!("         likely cause: {}", d.cause);
            }
        }
    }
    println!(
        "{}",
        if ok {
            "all steps passed"
        } else {
            "connection test failed"
        }
    );
    Ok(ok)
}

async fn run_steps(config: &Config, cfg: &IncomingMail, steps: &mut Vec<Step>) -> bool {
    macro_rules! step {
        ($name:expr, $result:expr) => {{
            let name = $name.to_string();
            match $result {
                Ok((value, detail)) => {
                    steps.push(Step {
                        name,
                        result: Ok(detail),
                    });
                    value
                }
                Err(diagnosis) => {
                    steps.push(Step {
                        name,
                        result: Err(diagnosis),
                    });
                    return false;
                }
            }
        }};
    }

    // 1. Credentials: our own token request, or the configured password.
    let (token, app) = match &cfg.auth {
        MailAuth::OAuth { profile } => {
            let Some(profile) = config.profile(profile) else {
                steps.push(Step {
                    name: "token".into(),
                    result: Err(fail("no such oauth profile", "configuration")),
                });
                return false;
            };
            let t = step!(
                format!("token ({})", profile.token_url),
                request_token(config, profile).await
            );
            (Some(t), profile.application_key.clone())
        }
        MailAuth::Password { .. } => (None, cfg.username.clone()),
    };

    // 2. Name resolution and TCP.
    step!("resolve", resolve(cfg).await);
    step!("connect", connect(cfg).await);

    // 3. TLS, login and folder, with the fetcher's own client code.
    let tls = match common::tls::client_config(config.tls.extra_ca_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            steps.push(Step {
                name: "tls setup".into(),
                result: Err(fail(e.to_string(), "check [tls] extra-ca-file")),
            });
            return false;
        }
    };
    let password = match &cfg.auth {
        MailAuth::Password { password } => password.as_ref().map(|p| p.expose().to_string()),
        MailAuth::OAuth { .. } => None,
    };
    match cfg.protocol() {
        Protocol::Imap => {
            let credentials = match (&token, &password) {
                (Some(t), _) => imap_fetcher::session::Credentials::XOAuth2 { token: t.as_str() },
                (None, Some(p)) => imap_fetcher::session::Credentials::Password {
                    password: p.as_str(),
                },
                (None, None) => imap_fetcher::session::Credentials::Password { password: "" },
            };
            let mut session = step!(
                "tls and login",
                imap_fetcher::session::open(cfg, &tls, credentials)
                    .await
                    .map(|s| (s, "TLS verified, logged in".to_string()))
                    .map_err(|e| diagnose_imap(&e, cfg, &app))
            );
            let folder = imap_fetcher::utf7::encode(&cfg.folder);
            step!(
                format!("select {}", cfg.folder),
                session
                    .select(&folder)
                    .await
                    .map(|m| ((), format!("{} message(s)", m.exists)))
                    .map_err(|e| {
                        let e = imap_fetcher::session::after_login_error(cfg, &app, "select", e);
                        diagnose_imap(&e, cfg, &app)
                    })
            );
            let _ = session.logout().await;
        }
        Protocol::Pop3 => {
            let mut session = step!(
                "tls and capabilities",
                pop_fetcher::pop3::connect(cfg, Arc::clone(&tls), Duration::from_secs(20))
                    .await
                    .map(|s| (s, "TLS verified, CAPA read".to_string()))
                    .map_err(|e| diagnose_pop(&e))
            );
            let login = match (&token, &password) {
                (Some(t), _) => session.auth_xoauth2(&cfg.username, t).await,
                (None, p) => {
                    session
                        .user_pass(&cfg.username, p.as_deref().unwrap_or(""))
                        .await
                }
            };
            let mechanism = if token.is_some() {
                "AUTH XOAUTH2 (two-step)"
            } else {
                "USER/PASS"
            };
            step!(
                "login",
                match login {
                    Ok(Ok(())) => Ok(((), format!("logged in with {mechanism}"))),
                    Ok(Err(refusal)) => Err(fail(
                        format!("the server refused the login: {}", refusal.reply),
                        refused_login_cause(token.is_some(), &app),
                    )),
                    Err(e) => Err(diagnose_pop(&e)),
                }
            );
            step!(
                "list",
                session
                    .list()
                    .await
                    .map(|l| ((), format!("{} message(s) in the maildrop", l.len())))
                    .map_err(|e| diagnose_pop(&e))
            );
            let _ = session.quit().await;
        }
    }
    true
}

async fn request_token(
    config: &Config,
    profile: &common::config::OAuthProfile,
) -> Result<(String, String), Diagnosis> {
    use token_broker::request::{http_client, request_token_with, RequestError};
    let http = http_client(&config.token_broker, &config.tls)
        .map_err(|e| fail(e.to_string(), "check [tls] extra-ca-file"))?;
    let presented = common::credential::present(profile).map_err(|e| {
        fail(
            e.to_string(),
            "fix the profile's credential files (see docs/exchange-online.md)",
        )
    })?;
    let used = presented.description.clone();
    match request_token_with(&http, profile, &presented).await {
        Ok(t) => Ok((
            t.access_token.expose().to_string(),
            format!("got a token valid for {} s with the {used}", t.expires_in),
        )),
        Err(RequestError::Rejected { code, reason, .. }) => {
            let cause = match code.as_deref() {
                Some("AADSTS7000215") => "the client secret is wrong: configure the secret's Value, not its Secret ID".to_string(),
                Some("AADSTS7000222") => "the client secret has expired: create a new one under Certificates & secrets".to_string(),
                Some("AADSTS700016") => "no such application in this tenant: check application-key and the tenant id in token-url".to_string(),
                Some("AADSTS1002012") | Some("AADSTS500011") => "wrong scope: use https://outlook.office365.com/.default".to_string(),
                Some(c @ ("AADSTS700027" | "AADSTS700024" | "AADSTS700023" | "AADSTS700021")) => format!(
                    "{} (credential used: {used})",
                    token_broker::request::hint(c).unwrap_or("the client assertion was refused")
                ),
                Some(c) => token_broker::request::hint(c).map(str::to_string).unwrap_or_else(|| format!("Entra ID refused the request ({c})")),
                None => "the token endpoint refused the request".to_string(),
            };
            Err(fail(reason, cause))
        }
        Err(e @ RequestError::Throttled { .. }) => Err(fail(
            e.to_string(),
            "the token endpoint is throttling; try again later",
        )),
        Err(e @ RequestError::Transient(_)) => Err(fail(
            e.to_string(),
            "the token endpoint cannot be reached: check token-url, DNS, proxy and firewall",
        )),
    }
}

async fn resolve(cfg: &IncomingMail) -> Result<((), String), Diagnosis> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::lookup_host((cfg.host.as_str(), cfg.port)),
    )
    .await
    {
        Ok(Ok(addrs)) => {
            let list: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            Ok(((), list.join(", ")))
        }
        Ok(Err(e)) => Err(fail(
            format!("{} does not resolve: {e}", cfg.host),
            "wrong host name in the mail config (Exchange Online: outlook.office365.com)",
        )),
        Err(_) => Err(fail(
            format!("resolving {} timed out", cfg.host),
            "DNS is unreachable",
        )),
    }
}

async fn connect(cfg: &IncomingMail) -> Result<((), String), Diagnosis> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port)),
    )
    .await
    {
        Ok(Ok(s)) => Ok((
            (),
            format!(
                "TCP connected to {}",
                s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
            ),
        )),
        Ok(Err(e)) => Err(fail(
            format!("cannot connect to {}:{}: {e}", cfg.host, cfg.port),
            "wrong host or port, the protocol is not served there, or a firewall blocks it",
        )),
        Err(_) => Err(fail(
            format!("connecting to {}:{} timed out", cfg.host, cfg.port),
            "a firewall drops the connection, or wrong host",
        )),
    }
}

fn refused_login_cause(oauth: bool, app: &str) -> String {
    if oauth {
        format!(
            "the mailbox refused app {app}: no Exchange service principal (New-ServicePrincipal with the enterprise application's object id), no mailbox permission (Add-MailboxPermission), missing IMAP.AccessAsApp/POP.AccessAsApp admin consent, IMAP/POP disabled for the mailbox, or a wrong username"
        )
    } else {
        "wrong user name or password".to_string()
    }
}

fn diagnose_imap(e: &imap_fetcher::error::Error, cfg: &IncomingMail, app: &str) -> Diagnosis {
    use common::fetch::FetchError;
    use imap_fetcher::error::Error;
    let cause = match e {
        Error::Connect { source, .. } => common::tls::handshake_cause(source).unwrap_or_else(|| "the connection failed during TLS or the greeting".into()),
        Error::AuthFailed { .. } => refused_login_cause(matches!(cfg.auth, MailAuth::OAuth { .. }), app),
        Error::Fetch(FetchError::Permission { .. }) => format!("app {app} has no permission on mailbox {} (Add-MailboxPermission -AccessRights FullAccess)", cfg.username),
        Error::Unsupported(_) => "the server lacks STARTTLS or a required capability; IMAP may be disabled".into(),
        Error::Imap { .. } => format!("the folder {:?} may not exist, or the server failed", cfg.folder),
        _ => "see the error".into(),
    };
    fail(e.to_string(), cause)
}

fn diagnose_pop(e: &pop_fetcher::error::Error) -> Diagnosis {
    use pop_fetcher::error::Error;
    let cause = match e {
        Error::Connect { source, .. } => common::tls::handshake_cause(source).unwrap_or_else(|| "the connection failed during TLS".into()),
        Error::Unsupported(_) => "the server does not offer what the config needs (SASL XOAUTH2 or STLS); POP may be disabled".into(),
        Error::ProtocolClosed { .. } => "Exchange Online closed the connection on a malformed command".into(),
        _ => "see the error".into(),
    };
    fail(e.to_string(), cause)
}
