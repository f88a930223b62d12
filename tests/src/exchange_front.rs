//! An Exchange-like front: a thin TLS proxy in front of Dovecot that
//! behaves the way Exchange Online does where Dovecot is more lenient.
//!
//! For a mailbox in its *denied* set (an app without FullAccess on that
//! mailbox) Exchange accepts the XOAUTH2 login — `OK AUTHENTICATE
//! completed.` — and then answers every command with `BAD User is
//! authenticated but not connected.` The front reproduces exactly that. Any
//! other login is handed to Dovecot (IMAPS) and the connection is relayed
//! byte for byte.
//!
//! Protocols are a [`Mode`]. In [`Mode::Pop3`] the front speaks POP3 over
//! implicit TLS the way Exchange Online does: its CAPA offers
//! `SASL PLAIN XOAUTH2` and no PIPELINING; the one-line
//! `AUTH XOAUTH2 <payload>` is answered `-ERR Protocol error. Connection is
//! closed. 10` and the connection closed (only the two-step form — `AUTH
//! XOAUTH2`, `+ `, payload line — works); a denied mailbox, and any token
//! Dovecot refuses, get `-ERR Authentication failure: unknown user name or
//! bad password.` (no error challenge). An accepted login is handed to
//! Dovecot (POP3S) and relayed. [`ExchangeFront::one_line_auths`] and
//! [`ExchangeFront::two_step_auths`] count what clients sent.
//!
//! In [`Mode::Imap`] the front also counts each mailbox's relayed
//! sessions ([`ExchangeFront::peak_sessions`]) and can cap them
//! ([`ExchangeFront::limit_sessions`]), as a server's per-user connection
//! limit does (Exchange's `MaxConnectionsPerUser`, Dovecot's
//! `mail_max_userip_connections`): a login over the cap is answered
//! `NO [UNAVAILABLE]`, the way Dovecot answers it, and not relayed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::env::Endpoints;

/// Which protocol the front speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// IMAP over implicit TLS, relayed to Dovecot's IMAPS port.
    Imap,
    /// POP3 over implicit TLS (as Exchange's port 995), relayed to
    /// Dovecot's POP3S port.
    Pop3,
}

/// What clients sent the front (POP3 mode), and the IMAP sessions.
#[derive(Debug, Default)]
struct Stats {
    one_line_auths: AtomicUsize,
    two_step_auths: AtomicUsize,
    no_xoauth2: std::sync::atomic::AtomicBool,
    sessions: Mutex<Sessions>,
}

/// Relayed IMAP sessions per mailbox (lowercase).
#[derive(Debug, Default)]
struct Sessions {
    /// At most this many at once per mailbox (none: no cap).
    limit: Option<usize>,
    live: HashMap<String, usize>,
    peak: HashMap<String, usize>,
    refused: HashMap<String, usize>,
}

impl Sessions {
    /// A login for `user`: true (and counted) when under the cap.
    fn open(&mut self, user: &str) -> bool {
        let live = self.live.get(user).copied().unwrap_or(0);
        if self.limit.is_some_and(|l| live >= l) {
            *self.refused.entry(user.to_string()).or_default() += 1;
            return false;
        }
        self.live.insert(user.to_string(), live + 1);
        let peak = self.peak.entry(user.to_string()).or_default();
        *peak = (*peak).max(live + 1);
        true
    }

    fn close(&mut self, user: &str) {
        if let Some(n) = self.live.get_mut(user) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A running front.
pub struct ExchangeFront {
    /// Where clients connect (TLS, certificate for `localhost`).
    pub addr: SocketAddr,
    denied: Arc<Mutex<HashSet<String>>>,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ExchangeFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ExchangeFront {
    /// Starts a front in `mode` on a free loopback port.
    pub async fn start(env: &Endpoints, mode: Mode) -> Self {
        let acceptor = localhost_acceptor(env);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let denied = Arc::new(Mutex::new(HashSet::new()));
        let upstream = match mode {
            Mode::Imap => env.mail_addr("IMAPS"),
            Mode::Pop3 => env.mail_addr("POP3S"),
        };
        let ca = env.ca_file();
        let d = Arc::clone(&denied);
        let stats = Arc::new(Stats::default());
        let st = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let denied = Arc::clone(&d);
                let stats = Arc::clone(&st);
                let ca = ca.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_conn(mode, tls, denied, stats, upstream, ca).await;
                    }
                });
            }
        });
        Self {
            addr,
            denied,
            stats,
            task,
        }
    }

    /// POP3: from now on CAPA offers `SASL PLAIN` only, as a server (or an
    /// Exchange with OAuth for POP turned off) without XOAUTH2 would.
    pub fn without_xoauth2(&self) {
        self.stats.no_xoauth2.store(true, Ordering::SeqCst);
    }

    /// POP3: how many one-line `AUTH XOAUTH2 <payload>` commands clients
    /// sent (each was refused and its connection closed, as Exchange does).
    pub fn one_line_auths(&self) -> usize {
        self.stats.one_line_auths.load(Ordering::SeqCst)
    }

    /// POP3: how many two-step `AUTH XOAUTH2` exchanges clients completed
    /// (accepted or refused).
    pub fn two_step_auths(&self) -> usize {
        self.stats.two_step_auths.load(Ordering::SeqCst)
    }

    /// IMAP: from now on at most `n` sessions per mailbox at once; a login
    /// over that is refused with `NO [UNAVAILABLE]`.
    pub fn limit_sessions(&self, n: usize) {
        self.stats.sessions.lock().expect("lock").limit = Some(n);
    }

    /// IMAP: the most sessions `mailbox` had at once.
    pub fn peak_sessions(&self, mailbox: &str) -> usize {
        self.session_count(mailbox, |s| &s.peak)
    }

    /// IMAP: logins on `mailbox` refused for the session cap.
    pub fn refused_sessions(&self, mailbox: &str) -> usize {
        self.session_count(mailbox, |s| &s.refused)
    }

    fn session_count(
        &self,
        mailbox: &str,
        counts: impl Fn(&Sessions) -> &HashMap<String, usize>,
    ) -> usize {
        let sessions = self.stats.sessions.lock().expect("lock");
        counts(&sessions)
            .get(&mailbox.to_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Makes `mailbox` answer as a mailbox the app has no permission on.
    pub fn deny(&self, mailbox: &str) {
        self.denied
            .lock()
            .expect("lock")
            .insert(mailbox.to_lowercase());
    }
}

/// A TLS acceptor with the test servers' certificate for `localhost`
/// (signed by the CA the configs trust), for fronts that stand in for a
/// mail server.
pub fn localhost_acceptor(env: &Endpoints) -> TlsAcceptor {
    let tls_dir: PathBuf = env.ca_file().parent().expect("tls dir").to_path_buf();
    let certs = mailagent_certs(&tls_dir.join("server-chain.pem"));
    let key = {
        let bytes = std::fs::read(tls_dir.join("server.key")).expect("server key");
        rustls_pemfile::private_key(&mut bytes.as_slice())
            .expect("parse key")
            .expect("a key")
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    TlsAcceptor::from(Arc::new(server))
}

fn mailagent_certs(path: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let bytes = std::fs::read(path).expect("server chain");
    rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .expect("certs")
}

/// The XOAUTH2 `user=` of a base64 payload.
pub fn xoauth2_user(payload_b64: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(payload_b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.split('\x01')
        .find_map(|p| p.strip_prefix("user="))
        .map(|u| u.to_lowercase())
}

async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    mode: Mode,
    client: S,
    denied: Arc<Mutex<HashSet<String>>>,
    stats: Arc<Stats>,
    upstream: SocketAddr,
    ca: PathBuf,
) -> anyhow::Result<()> {
    match mode {
        Mode::Imap => serve_imap(client, denied, stats, upstream, ca).await,
        Mode::Pop3 => serve_pop3(client, denied, stats, upstream, ca).await,
    }
}

/// Exchange Online's answer to a refused POP3 login (bad token, or an app
/// without permission on the mailbox).
pub const POP3_AUTH_FAILURE: &str =
    "-ERR Authentication failure: unknown user name or bad password.";

/// Exchange Online's answer to a one-line `AUTH XOAUTH2 <payload>`; it
/// closes the connection after it.
pub const POP3_PROTOCOL_ERROR: &str = "-ERR Protocol error. Connection is closed. 10";

async fn serve_pop3<S: AsyncRead + AsyncWrite + Unpin>(
    client: S,
    denied: Arc<Mutex<HashSet<String>>>,
    stats: Arc<Stats>,
    upstream: SocketAddr,
    ca: PathBuf,
) -> anyhow::Result<()> {
    let mut client = BufReader::new(client);
    let greet = "+OK The Microsoft Exchange POP3 service is ready.\r\n";
    client.get_mut().write_all(greet.as_bytes()).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if client.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let cmd = parts.next().unwrap_or("").to_ascii_uppercase();
        match cmd.as_str() {
            "CAPA" => {
                let sasl = if stats.no_xoauth2.load(Ordering::SeqCst) {
                    "PLAIN"
                } else {
                    "PLAIN XOAUTH2"
                };
                client
                    .get_mut()
                    .write_all(
                        format!("+OK\r\nTOP\r\nUIDL\r\nSASL {sasl}\r\nUSER\r\n.\r\n").as_bytes(),
                    )
                    .await?;
            }
            "AUTH" => {
                let mech = parts.next().unwrap_or("").to_ascii_uppercase();
                if mech != "XOAUTH2" {
                    client
                        .get_mut()
                        .write_all(format!("{POP3_AUTH_FAILURE}\r\n").as_bytes())
                        .await?;
                    continue;
                }
                if parts.next().is_some_and(|ir| !ir.trim().is_empty()) {
                    // The initial-response form: Exchange Online drops it.
                    stats.one_line_auths.fetch_add(1, Ordering::SeqCst);
                    client
                        .get_mut()
                        .write_all(format!("{POP3_PROTOCOL_ERROR}\r\n").as_bytes())
                        .await?;
                    let _ = client.get_mut().shutdown().await;
                    return Ok(());
                }
                client.get_mut().write_all(b"+ \r\n").await?;
                let mut payload = String::new();
                if client.read_line(&mut payload).await? == 0 {
                    return Ok(());
                }
                let payload = payload.trim().to_string();
                stats.two_step_auths.fetch_add(1, Ordering::SeqCst);
                if payload == "*" {
                    client
                        .get_mut()
                        .write_all(b"-ERR Authentication canceled.\r\n")
                        .await?;
                    continue;
                }
                let user = xoauth2_user(&payload).unwrap_or_default();
                let is_denied = denied.lock().expect("lock").contains(&user);
                if is_denied {
                    client
                        .get_mut()
                        .write_all(format!("{POP3_AUTH_FAILURE}\r\n").as_bytes())
                        .await?;
                    continue;
                }
                // Log in to Dovecot with the same payload; relay from here on.
                let mut up = crate::mailclient::connect_tls(upstream, &ca).await?;
                let greeting = up.read_line().await?;
                anyhow::ensure!(
                    greeting.starts_with("+OK"),
                    "upstream greeting {greeting:?}"
                );
                up.send("AUTH XOAUTH2").await?;
                let cont = up.read_line().await?;
                anyhow::ensure!(cont.starts_with('+'), "upstream AUTH reply {cont:?}");
                up.send(&payload).await?;
                let reply = up.read_line().await?;
                if !reply.starts_with("+OK") {
                    // Dovecot's error challenge or -ERR: Exchange sends neither,
                    // only its own refusal.
                    client
                        .get_mut()
                        .write_all(format!("{POP3_AUTH_FAILURE}\r\n").as_bytes())
                        .await?;
                    continue;
                }
                client
                    .get_mut()
                    .write_all(b"+OK User successfully authenticated.\r\n")
                    .await?;
                relay(client, up.into_inner()).await;
                return Ok(());
            }
            "QUIT" => {
                client
                    .get_mut()
                    .write_all(b"+OK Microsoft Exchange Server POP3 server signing off.\r\n")
                    .await?;
                return Ok(());
            }
            _ => {
                client
                    .get_mut()
                    .write_all(b"-ERR Command is not valid in this state.\r\n")
                    .await?;
            }
        }
    }
}

async fn serve_imap<S: AsyncRead + AsyncWrite + Unpin>(
    client: S,
    denied: Arc<Mutex<HashSet<String>>>,
    stats: Arc<Stats>,
    upstream: SocketAddr,
    ca: PathBuf,
) -> anyhow::Result<()> {
    let mut client = BufReader::new(client);
    let greet = "* OK The Microsoft Exchange IMAP4 service is ready.\r\n";
    client.get_mut().write_all(greet.as_bytes()).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if client.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.trim_end().splitn(4, ' ');
        let tag = parts.next().unwrap_or("*").to_string();
        let cmd = parts.next().unwrap_or("").to_ascii_uppercase();
        match cmd.as_str() {
            "CAPABILITY" => {
                client
                    .get_mut()
                    .write_all(
                        format!("* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+\r\n{tag} OK CAPABILITY completed.\r\n")
                            .as_bytes(),
                    )
                    .await?;
            }
            "AUTHENTICATE" => {
                let mech = parts.next().unwrap_or("").to_ascii_uppercase();
                if mech != "XOAUTH2" {
                    client
                        .get_mut()
                        .write_all(format!("{tag} NO AUTHENTICATE failed.\r\n").as_bytes())
                        .await?;
                    continue;
                }
                let payload = match parts.next() {
                    Some(ir) => ir.to_string(),
                    None => {
                        client.get_mut().write_all(b"+ \r\n").await?;
                        let mut p = String::new();
                        client.read_line(&mut p).await?;
                        p.trim().to_string()
                    }
                };
                let user = xoauth2_user(&payload).unwrap_or_default();
                let is_denied = denied.lock().expect("lock").contains(&user);
                if is_denied {
                    client
                        .get_mut()
                        .write_all(format!("{tag} OK AUTHENTICATE completed.\r\n").as_bytes())
                        .await?;
                    return not_connected(client).await;
                }
                if !stats.sessions.lock().expect("lock").open(&user) {
                    client
                        .get_mut()
                        .write_all(format!("{tag} NO [UNAVAILABLE] Maximum number of connections from user exceeded.\r\n").as_bytes())
                        .await?;
                    continue;
                }
                // Hand the login to Dovecot and relay from here on.
                let relayed = relay_imap(client, &tag, &payload, upstream, &ca).await;
                stats.sessions.lock().expect("lock").close(&user);
                return relayed;
            }
            "LOGOUT" => {
                client
                    .get_mut()
                    .write_all(
                        format!("* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n{tag} OK LOGOUT completed.\r\n")
                            .as_bytes(),
                    )
                    .await?;
                return Ok(());
            }
            _ => {
                client
                    .get_mut()
                    .write_all(format!("{tag} BAD Command Argument Error. 11\r\n").as_bytes())
                    .await?;
            }
        }
    }
}

/// Logs in to Dovecot with the client's XOAUTH2 `payload` under its `tag`
/// and relays both ways until either side closes.
async fn relay_imap<S: AsyncRead + AsyncWrite + Unpin>(
    client: BufReader<S>,
    tag: &str,
    payload: &str,
    upstream: SocketAddr,
    ca: &std::path::Path,
) -> anyhow::Result<()> {
    let mut up = crate::mailclient::connect_tls(upstream, ca).await?;
    crate::mailclient::imap_greeting(&mut up).await?;
    up.send(&format!("{tag} AUTHENTICATE XOAUTH2 {payload}"))
        .await?;
    relay(client, up.into_inner()).await;
    Ok(())
}

/// Copies both ways between `client` and the server `up` until either
/// side closes.
async fn relay<C, U>(client: C, up: U)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(up);
    tokio::select! {
        _ = tokio::io::copy(&mut cr, &mut uw) => {}
        _ = tokio::io::copy(&mut ur, &mut cw) => {}
    }
}

/// After a login on a mailbox without permission: `BAD` to every command.
async fn not_connected<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: BufReader<S>,
) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if client.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let tag = line.split_whitespace().next().unwrap_or("*").to_string();
        if line.to_ascii_uppercase().contains(" LOGOUT") {
            client
                .get_mut()
                .write_all(format!("* BYE\r\n{tag} OK LOGOUT completed.\r\n").as_bytes())
                .await?;
            return Ok(());
        }
        client
            .get_mut()
            .write_all(format!("{tag} BAD User is authenticated but not connected.\r\n").as_bytes())
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoauth2_user_is_read_from_the_payload() {
        let p = common::fetch::xoauth2::encoded_response("Box@Example.com", "tok");
        assert_eq!(xoauth2_user(&p).as_deref(), Some("box@example.com"));
        assert_eq!(xoauth2_user("not base64"), None);
    }
}
