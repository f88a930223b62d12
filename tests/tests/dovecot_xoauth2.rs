//! The test mail server checks XOAUTH2 tokens for real: a token from the test
//! identity provider logs into a granted mailbox over IMAPS, IMAP+STARTTLS,
//! POP3S (two-step AUTH) and POP3+STLS; an app without a grant, an expired
//! token, a token signed by another key and garbage are refused, and the
//! error challenge Dovecot sends first is answered instead of hanging.

use std::time::Duration;

use mailagent_tests::env::{unique, Endpoints};
use mailagent_tests::idp::{Signer, TestIdp, ROLES};
use mailagent_tests::mailclient::{self, AuthOutcome};

/// A client connection with implicit TLS or after STARTTLS/STLS.
type TlsConn = mailclient::Conn<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A fresh mailbox granted to a fresh app of a running test IdP.
struct Granted {
    env: Endpoints,
    idp: TestIdp,
    app: String,
    secret: String,
    user: String,
}

impl Granted {
    async fn new() -> Self {
        let env = Endpoints::load();
        let (idp, app, secret) = TestIdp::start_with_app(&env).await;
        let user = format!("{}@example.com", unique("box"));
        env.grant(&app, &user);
        Self {
            env,
            idp,
            app,
            secret,
            user,
        }
    }

    /// A TLS connection to `listener` (`IMAPS`, `POP3S`).
    async fn connect_tls(&self, listener: &str) -> TlsConn {
        mailclient::connect_tls(self.env.mail_addr(listener), &self.env.ca_file())
            .await
            .unwrap()
    }

    /// A plaintext connection to `listener` (`IMAP`, `POP3`), for STARTTLS/STLS.
    async fn connect_plain(&self, listener: &str) -> mailclient::Conn<tokio::net::TcpStream> {
        mailclient::connect_plain(self.env.mail_addr(listener))
            .await
            .unwrap()
    }

    /// Upgrades `plain` after the server agreed to STARTTLS/STLS.
    async fn upgrade(&self, plain: mailclient::Conn<tokio::net::TcpStream>) -> TlsConn {
        mailclient::upgrade(plain, &self.env.ca_file())
            .await
            .unwrap()
    }

    /// Requests a token for the granted app from the test IdP the way the
    /// token broker does (client credentials at the token endpoint).
    async fn token_from_idp(&self) -> String {
        let response: serde_json::Value = reqwest::Client::new()
            .post(self.idp.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.app.as_str()),
                ("client_secret", self.secret.as_str()),
                ("scope", "https://outlook.office365.com/.default"),
            ])
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token body");
        response["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    /// A token minted directly by the IdP for the granted app.
    fn mint(&self) -> String {
        self.idp.mint(&self.app, Duration::from_secs(600))
    }

    /// Connects to IMAPS, reads the greeting and offers `token` for the
    /// mailbox; the connection and how authentication ended.
    async fn imaps_login(&self, token: &str) -> (TlsConn, AuthOutcome) {
        let mut conn = self.connect_tls("IMAPS").await;
        mailclient::imap_greeting(&mut conn).await.unwrap();
        let outcome = mailclient::imap_xoauth2(&mut conn, &self.user, token)
            .await
            .unwrap();
        (conn, outcome)
    }

    /// Connects to POP3S, checks the `+OK` greeting and offers `token` for
    /// the mailbox; the connection and how authentication ended.
    async fn pop3s_login(&self, token: &str) -> (TlsConn, AuthOutcome) {
        let mut conn = self.connect_tls("POP3S").await;
        let greeting = conn.read_line().await.unwrap();
        assert!(greeting.starts_with("+OK"), "{greeting}");
        let outcome = mailclient::pop3_xoauth2(&mut conn, &self.user, token)
            .await
            .unwrap();
        (conn, outcome)
    }
}

#[tokio::test]
async fn imaps_accepts_a_granted_app_token_and_selects_inbox() {
    let g = Granted::new().await;
    let (mut conn, outcome) = g.imaps_login(&g.token_from_idp().await).await;
    assert!(outcome.accepted(), "{outcome:?}");
    let (_, tagged) = mailclient::imap_command(&mut conn, "a2", "SELECT INBOX")
        .await
        .unwrap();
    assert!(tagged.starts_with("a2 OK"), "{tagged}");
}

#[tokio::test]
async fn imap_starttls_then_xoauth2_works_and_plaintext_login_is_refused() {
    let g = Granted::new().await;

    let mut plain = g.connect_plain("IMAP").await;
    mailclient::imap_greeting(&mut plain).await.unwrap();
    let (_, tagged) = mailclient::imap_command(&mut plain, "a0", "LOGIN someone secret")
        .await
        .unwrap();
    assert!(
        !tagged.starts_with("a0 OK"),
        "plaintext login before STARTTLS must fail: {tagged}"
    );
    let (_, tagged) = mailclient::imap_command(&mut plain, "a1", "STARTTLS")
        .await
        .unwrap();
    assert!(tagged.starts_with("a1 OK"), "{tagged}");
    let mut tls = g.upgrade(plain).await;
    let outcome = mailclient::imap_xoauth2(&mut tls, &g.user, &g.mint())
        .await
        .unwrap();
    assert!(outcome.accepted(), "{outcome:?}");
}

#[tokio::test]
async fn pop3s_two_step_xoauth2_is_accepted() {
    let g = Granted::new().await;
    let (mut conn, outcome) = g.pop3s_login(&g.token_from_idp().await).await;
    assert!(outcome.accepted(), "{outcome:?}");
    // Two steps: the command alone, then the payload alone, never one line.
    assert_eq!(conn.sent[0], "AUTH XOAUTH2");
    conn.send("STAT").await.unwrap();
    assert!(conn.read_line().await.unwrap().starts_with("+OK 0 "));
}

#[tokio::test]
async fn pop3_stls_then_xoauth2_works() {
    let g = Granted::new().await;

    let mut plain = g.connect_plain("POP3").await;
    assert!(plain.read_line().await.unwrap().starts_with("+OK"));
    plain.send("STLS").await.unwrap();
    assert!(plain.read_line().await.unwrap().starts_with("+OK"));
    let mut tls = g.upgrade(plain).await;
    let outcome = mailclient::pop3_xoauth2(&mut tls, &g.user, &g.mint())
        .await
        .unwrap();
    assert!(outcome.accepted(), "{outcome:?}");
}

/// The refused cases: (what, token for the mailbox).
fn refused_cases(g: &Granted) -> Vec<(&'static str, String)> {
    let Granted {
        env,
        idp,
        app: granted_app,
        ..
    } = g;
    let roles: Vec<String> = ROLES.iter().map(|r| r.to_string()).collect();
    let (ungranted, _) = idp.register_app();
    vec![
        (
            "app without a grant on the mailbox",
            idp.mint(&ungranted, Duration::from_secs(600)),
        ),
        (
            "expired token",
            Signer::trusted(env).mint(granted_app, &roles, Duration::from_secs(60), -3600),
        ),
        (
            "token signed by another key",
            Signer::untrusted(env).mint(granted_app, &roles, Duration::from_secs(600), 0),
        ),
        ("garbage", "not-a-jwt".to_string()),
    ]
}

#[tokio::test]
async fn imaps_refuses_bad_tokens_without_hanging() {
    let g = Granted::new().await;
    for (what, token) in refused_cases(&g) {
        let (_conn, outcome) = g.imaps_login(&token).await;
        match outcome {
            AuthOutcome::Refused {
                challenge,
                final_line,
            } => {
                assert!(final_line.starts_with("a1 NO"), "{what}: {final_line}");
                // When the server sends the XOAUTH2 error challenge the
                // client answers it with an empty line (else this read would
                // time out); the challenge, when sent, must decode.
                // (The test Dovecot's passdb chain answers NO directly: see
                // docs/test-services.md.)
                if let Some(challenge) = challenge {
                    assert!(!challenge.status.is_empty(), "{what}: {challenge:?}");
                }
            }
            AuthOutcome::Accepted(line) => panic!("{what} was accepted: {line}"),
        }
    }
}

#[tokio::test]
async fn pop3s_refuses_bad_tokens() {
    let g = Granted::new().await;
    for (what, token) in refused_cases(&g) {
        let (_conn, outcome) = g.pop3s_login(&token).await;
        assert!(!outcome.accepted(), "{what} was accepted: {outcome:?}");
    }
}
