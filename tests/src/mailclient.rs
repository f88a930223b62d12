//! Minimal line-based IMAP and POP3 clients over TLS, used by tests to check
//! what the test mail servers accept (XOAUTH2, error challenges, STARTTLS)
//! independently of the fetchers' own clients. Test support only.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Longest wait for one server line: a hang fails the test instead of blocking it.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection reading and writing CRLF lines.
pub struct Conn<S> {
    io: BufReader<S>,
    /// Every line the client sent, for assertions on what went on the wire.
    pub sent: Vec<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Wraps a stream.
    pub fn new(stream: S) -> Self {
        Self {
            io: BufReader::new(stream),
            sent: Vec::new(),
        }
    }

    /// Reads one line without its CRLF; errors on EOF or after [`LINE_TIMEOUT`].
    pub async fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(LINE_TIMEOUT, self.io.read_line(&mut line))
            .await
            .context("server sent nothing within the line timeout")??;
        if n == 0 {
            bail!("connection closed by server");
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    /// Sends one line (CRLF appended).
    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.sent.push(line.to_string());
        let stream = self.io.get_mut();
        stream.write_all(line.as_bytes()).await?;
        stream.write_all(b"\r\n").await?;
        stream.flush().await?;
        Ok(())
    }

    /// Sends raw bytes (for APPEND literals).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let stream = self.io.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await?;
        Ok(())
    }

    /// Gives the stream back (for STARTTLS).
    pub fn into_inner(self) -> S {
        self.io.into_inner()
    }
}

/// A TLS connector trusting only `ca_file`.
pub fn connector(ca_file: &Path) -> anyhow::Result<TlsConnector> {
    let config = common::tls::client_config(Some(ca_file))?;
    Ok(TlsConnector::from(Arc::clone(&config)))
}

/// Connects with implicit TLS (IMAPS, POP3S), verifying against `ca_file`.
pub async fn connect_tls(
    addr: SocketAddr,
    ca_file: &Path,
) -> anyhow::Result<Conn<TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
    let tls = connector(ca_file)?.connect(name, tcp).await?;
    Ok(Conn::new(tls))
}

/// Connects in plaintext (for STARTTLS/STLS listeners).
pub async fn connect_plain(addr: SocketAddr) -> anyhow::Result<Conn<TcpStream>> {
    Ok(Conn::new(TcpStream::connect(addr).await?))
}

/// Upgrades a plaintext connection after the server agreed to STARTTLS/STLS.
pub async fn upgrade(
    conn: Conn<TcpStream>,
    ca_file: &Path,
) -> anyhow::Result<Conn<TlsStream<TcpStream>>> {
    let name = rustls::pki_types::ServerName::try_from("localhost")?.to_owned();
    let tls = connector(ca_file)?.connect(name, conn.into_inner()).await?;
    Ok(Conn::new(tls))
}

/// How an authentication attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Accepted; the server's final line.
    Accepted(String),
    /// Refused; the decoded error challenge (if the server sent one, which
    /// the client answered with an empty line) and the final line.
    Refused {
        /// The XOAUTH2 error challenge.
        challenge: Option<common::fetch::xoauth2::ErrorChallenge>,
        /// The tagged NO / `-ERR` line.
        final_line: String,
    },
}

impl AuthOutcome {
    /// True when accepted.
    pub fn accepted(&self) -> bool {
        matches!(self, Self::Accepted(_))
    }
}

/// Reads the IMAP greeting.
pub async fn imap_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
) -> anyhow::Result<String> {
    let line = conn.read_line().await?;
    if !line.starts_with("* OK") {
        bail!("unexpected IMAP greeting {line:?}");
    }
    Ok(line)
}

/// Runs one tagged IMAP command and returns (untagged lines, tagged line).
pub async fn imap_command<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    tag: &str,
    command: &str,
) -> anyhow::Result<(Vec<String>, String)> {
    conn.send(&format!("{tag} {command}")).await?;
    let mut untagged = Vec::new();
    loop {
        let line = conn.read_line().await?;
        if line.starts_with(&format!("{tag} ")) {
            return Ok((untagged, line));
        }
        untagged.push(line);
    }
}

/// `AUTHENTICATE XOAUTH2` with the initial response, answering an error
/// challenge with an empty line.
pub async fn imap_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    user: &str,
    token: &str,
) -> anyhow::Result<AuthOutcome> {
    let payload = common::fetch::xoauth2::encoded_response(user, token);
    conn.send(&format!("a1 AUTHENTICATE XOAUTH2 {payload}"))
        .await?;
    let mut challenge = None;
    loop {
        let line = conn.read_line().await?;
        if let Some(rest) = line.strip_prefix("+") {
            challenge = common::fetch::xoauth2::decode_error_challenge(rest.trim());
            conn.send("").await?;
            continue;
        }
        if line.starts_with("a1 OK") {
            return Ok(AuthOutcome::Accepted(line));
        }
        if line.starts_with("a1 ") {
            return Ok(AuthOutcome::Refused {
                challenge,
                final_line: line,
            });
        }
    }
}

/// POP3 `AUTH XOAUTH2` in the two-step form Exchange Online requires:
/// `AUTH XOAUTH2`, server `+`, then the payload on its own line.
pub async fn pop3_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    user: &str,
    token: &str,
) -> anyhow::Result<AuthOutcome> {
    conn.send("AUTH XOAUTH2").await?;
    let first = conn.read_line().await?;
    if !first.starts_with('+') {
        bail!("server did not answer AUTH XOAUTH2 with a continuation: {first:?}");
    }
    conn.send(&common::fetch::xoauth2::encoded_response(user, token))
        .await?;
    let mut challenge = None;
    loop {
        let line = conn.read_line().await?;
        if line.starts_with("+OK") {
            return Ok(AuthOutcome::Accepted(line));
        }
        if line.starts_with("-ERR") {
            return Ok(AuthOutcome::Refused {
                challenge,
                final_line: line,
            });
        }
        if let Some(rest) = line.strip_prefix('+') {
            challenge = common::fetch::xoauth2::decode_error_challenge(rest.trim());
            conn.send("").await?;
        }
    }
}

/// Appends a message to a mailbox folder over an authenticated IMAP connection.
pub async fn imap_append<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    tag: &str,
    folder: &str,
    message: &[u8],
) -> anyhow::Result<()> {
    conn.send(&format!("{tag} APPEND {folder} {{{}}}", message.len()))
        .await?;
    let cont = conn.read_line().await?;
    if !cont.starts_with('+') {
        bail!("APPEND refused: {cont}");
    }
    conn.send_raw(message).await?;
    conn.send("").await?;
    loop {
        let line = conn.read_line().await?;
        if line.starts_with(&format!("{tag} OK")) {
            return Ok(());
        }
        if line.starts_with(&format!("{tag} ")) {
            bail!("APPEND failed: {line}");
        }
    }
}
