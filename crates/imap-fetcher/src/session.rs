//! Opening an IMAP session: TCP, TLS (implicit for `imaps`, STARTTLS for
//! `imap`, plaintext only with `allow-insecure`), the greeting, and login —
//! SASL XOAUTH2 with the shared token, or LOGIN for password configs.
//!
//! async-imap sends `AUTHENTICATE XOAUTH2` without an initial response and
//! answers the server's empty `+` with the payload. A refused token gets an
//! error challenge (`+ <base64 json>`); [`XOAuth2`] answers it with an empty
//! line, as SASL requires, and keeps the decoded challenge for the error.

use std::sync::Arc;
use std::time::Duration;

use async_imap::{Client, Session};
use common::config::{IncomingMail, ServerType};
use common::fetch::xoauth2::ErrorChallenge;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};

/// Time allowed for connect + TLS + greeting + login.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The transport under the IMAP session (shared with the POP3 client).
pub use common::tls::MailStream;

/// A logged-in IMAP session.
pub type ImapSession = Session<MailStream>;

/// How to log in.
pub enum Credentials<'a> {
    /// SASL XOAUTH2 with a bearer token.
    XOAuth2 {
        /// The token.
        token: &'a str,
    },
    /// IMAP LOGIN.
    Password {
        /// The password.
        password: &'a str,
    },
}

/// The XOAUTH2 exchange: the payload on the first (empty) challenge, an
/// empty answer to the error challenge.
pub struct XOAuth2 {
    payload: String,
    sent: bool,
    /// The error challenge the server sent, if any.
    pub challenge: Option<ErrorChallenge>,
}

impl XOAuth2 {
    /// An exchange for `user` with `token`.
    pub fn new(user: &str, token: &str) -> Self {
        Self {
            payload: common::fetch::xoauth2::initial_response(user, token),
            sent: false,
            challenge: None,
        }
    }
}

impl async_imap::Authenticator for &mut XOAuth2 {
    type Response = Vec<u8>;

    fn process(&mut self, challenge: &[u8]) -> Vec<u8> {
        if !self.sent {
            self.sent = true;
            return self.payload.as_bytes().to_vec();
        }
        self.challenge = serde_json::from_slice(challenge).ok();
        Vec::new()
    }
}

/// `host:port` of a config.
pub fn endpoint(cfg: &IncomingMail) -> String {
    format!("{}:{}", cfg.host, cfg.port)
}

/// Connects, secures and logs in, within [`LOGIN_TIMEOUT`].
pub async fn open(
    cfg: &IncomingMail,
    tls: &Arc<rustls::ClientConfig>,
    credentials: Credentials<'_>,
) -> Result<ImapSession> {
    let ep = endpoint(cfg);
    match tokio::time::timeout(LOGIN_TIMEOUT, open_inner(cfg, tls, credentials)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Connect {
            endpoint: ep,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "login timed out"),
        }),
    }
}

async fn open_inner(
    cfg: &IncomingMail,
    tls: &Arc<rustls::ClientConfig>,
    credentials: Credentials<'_>,
) -> Result<ImapSession> {
    let ep = endpoint(cfg);
    let io_err = |source| Error::Connect {
        endpoint: ep.clone(),
        source,
    };
    let imap_err = |action, source| Error::Imap {
        action,
        endpoint: ep.clone(),
        source,
    };
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(io_err)?;
    let _ = tcp.set_nodelay(true);
    common::connect::keepalive(&tcp);
    let server_name = rustls::pki_types::ServerName::try_from(cfg.host.clone()).map_err(|e| {
        Error::Unsupported(format!("host {:?} is not a valid TLS name: {e}", cfg.host))
    })?;
    let connector = TlsConnector::from(Arc::clone(tls));
    let mut client = match cfg.server_type {
        ServerType::Imaps => {
            let s = connector.connect(server_name, tcp).await.map_err(io_err)?;
            let mut c = Client::new(MailStream::Tls(Box::new(s)));
            greeting(&mut c, &ep).await?;
            c
        }
        _ => {
            let mut c = Client::new(MailStream::Plain(tcp));
            greeting(&mut c, &ep).await?;
            if cfg.starttls {
                c.run_command_and_check_ok("STARTTLS", None)
                    .await
                    .map_err(|e| match e {
                        async_imap::error::Error::Bad(m) | async_imap::error::Error::No(m) => {
                            Error::Unsupported(format!(
                                "{ep} refused STARTTLS ({m}); TLS is required unless allow-insecure = true"
                            ))
                        }
                        other => imap_err("start TLS", other),
                    })?;
                let MailStream::Plain(tcp) = c.into_inner() else {
                    unreachable!("plain before STARTTLS")
                };
                let s = connector.connect(server_name, tcp).await.map_err(io_err)?;
                Client::new(MailStream::Tls(Box::new(s)))
            } else {
                c
            }
        }
    };
    let _ = &mut client;
    match credentials {
        Credentials::XOAuth2 { token } => xoauth2_login(client, &cfg.username, token, &ep).await,
        Credentials::Password { password } => match client.login(&cfg.username, password).await {
            Ok(s) => Ok(s),
            Err((async_imap::error::Error::No(m), _)) => Err(Error::AuthFailed {
                mailbox: cfg.username.clone(),
                mechanism: "LOGIN",
                detail: m.trim().to_string(),
            }),
            Err((e, _)) => Err(imap_err("log in", e)),
        },
    }
}

/// `AUTHENTICATE XOAUTH2` as `user` with `token`: the payload on the
/// server's first (empty) challenge; an error challenge (RFC 7628: base64
/// JSON with `status`, `scope`) is answered with an empty line, and its
/// status goes into the [`Error::AuthFailed`] the tagged `NO` becomes.
pub async fn xoauth2_login<T>(
    client: Client<T>,
    user: &str,
    token: &str,
    ep: &str,
) -> Result<Session<T>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    let mut auth = XOAuth2::new(user, token);
    match client.authenticate("XOAUTH2", &mut auth).await {
        Ok(s) => Ok(s),
        Err((async_imap::error::Error::No(m), _)) => Err(Error::AuthFailed {
            mailbox: user.to_string(),
            mechanism: "XOAUTH2",
            detail: match &auth.challenge {
                Some(c) => format!("{} (status {})", m.trim(), c.status),
                None => m.trim().to_string(),
            },
        }),
        Err((source, _)) => Err(Error::Imap {
            action: "authenticate",
            endpoint: ep.to_string(),
            source,
        }),
    }
}

/// Reads the greeting: `* OK` goes on, `* BYE` is a refusal. Generic over
/// the stream so the `imap_response` fuzz target drives it in memory.
pub async fn greeting<T>(client: &mut Client<T>, ep: &str) -> Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug,
{
    let first = client.read_response().await;
    match first {
        Some(Ok(resp)) => {
            use async_imap::imap_proto::{Response, Status};
            if matches!(
                resp.parsed(),
                Response::Data {
                    status: Status::Bye,
                    ..
                }
            ) {
                return Err(Error::Imap {
                    action: "read the greeting",
                    endpoint: ep.to_string(),
                    source: async_imap::error::Error::Bad("server said BYE".into()),
                });
            }
            Ok(())
        }
        Some(Err(e)) => Err(Error::Connect {
            endpoint: ep.to_string(),
            source: e,
        }),
        None => Err(Error::Imap {
            action: "read the greeting",
            endpoint: ep.to_string(),
            source: async_imap::error::Error::ConnectionLost,
        }),
    }
}

/// The text Exchange Online answers every command with when the app has no
/// permission on the mailbox.
pub const NOT_CONNECTED: &str = "User is authenticated but not connected";

/// Maps an error of a command after login: Exchange's "authenticated but not
/// connected" becomes a permission failure ([`common::fetch::FetchError::Permission`]).
pub fn after_login_error(
    cfg: &IncomingMail,
    app: &str,
    action: &'static str,
    e: async_imap::error::Error,
) -> Error {
    let text = e.to_string();
    if text.contains(NOT_CONNECTED) {
        return common::fetch::FetchError::Permission {
            mailbox: cfg.username.clone(),
            app: app.to_string(),
            detail: format!("the server answered {action} with \"{NOT_CONNECTED}\""),
        }
        .into();
    }
    Error::Imap {
        action,
        endpoint: endpoint(cfg),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A server that greets, takes the XOAUTH2 payload, sends `challenge`
    /// and refuses; returns the three lines the client sent.
    async fn refusing_server(io: tokio::io::DuplexStream, challenge: String) -> Vec<String> {
        let (r, mut w) = tokio::io::split(io);
        let mut r = BufReader::new(r);
        w.write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n")
            .await
            .unwrap();
        let mut sent = Vec::new();
        for reply in ["+ \r\n".to_string(), format!("+ {challenge}\r\n")] {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            sent.push(line);
            w.write_all(reply.as_bytes()).await.unwrap();
        }
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        sent.push(line);
        let tag = sent[0].split(' ').next().unwrap().to_string();
        w.write_all(format!("{tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n").as_bytes())
            .await
            .unwrap();
        sent
    }

    #[tokio::test]
    async fn an_xoauth2_error_challenge_is_answered_with_an_empty_line_and_named() {
        let (client_io, server_io) = tokio::io::duplex(8192);
        let challenge = base64::engine::general_purpose::STANDARD.encode(
            r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office365.com/.default"}"#,
        );
        let server = tokio::spawn(refusing_server(server_io, challenge));
        let mut client = Client::new(client_io);
        greeting(&mut client, "test:993").await.unwrap();
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            xoauth2_login(client, "ann@contoso.com", "the-token", "test:993"),
        )
        .await
        .expect("the client answers the challenge instead of waiting");
        let sent = server.await.unwrap();
        assert!(sent[0].ends_with(" AUTHENTICATE XOAUTH2\r\n"), "{sent:?}");
        let payload = base64::engine::general_purpose::STANDARD
            .decode(sent[1].trim_end())
            .unwrap();
        assert_eq!(
            payload,
            b"user=ann@contoso.com\x01auth=Bearer the-token\x01\x01".to_vec()
        );
        assert_eq!(sent[2], "\r\n", "the error challenge gets an empty answer");
        match result {
            Err(Error::AuthFailed {
                mailbox,
                mechanism,
                detail,
            }) => {
                assert_eq!(
                    (mailbox.as_str(), mechanism),
                    ("ann@contoso.com", "XOAUTH2")
                );
                assert!(detail.contains("status 401"), "{detail}");
                assert!(detail.contains("Invalid credentials"), "{detail}");
            }
            other => panic!("expected AuthFailed, got {other:?}"),
        }
    }
}
