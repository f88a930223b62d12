//! A small, complete POP3 client: RFC 1939 (USER/PASS, STAT/LIST/UIDL,
//! RETR with dot-unstuffing, DELE, QUIT), RFC 2449 (CAPA, PIPELINING),
//! RFC 2595 (STLS) and RFC 5034 (AUTH), with SASL XOAUTH2 in the two-step
//! form Exchange Online requires.
//!
//! Why not async-pop: see `docs/architecture.md` ("Why pop-fetcher has its
//! own POP3 client") and `tests/async_pop_eval.rs`.
//!
//! Every read has a timeout, every line a length limit, and nothing that
//! carries a credential is ever logged.

pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use common::config::IncomingMail;
use common::fetch::xoauth2::ErrorChallenge;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};
use wire::{Capabilities, Reply};

/// Longest status line accepted (RFC 2449 allows 512 octets; servers are lax).
pub const MAX_STATUS_LINE: usize = 8 * 1024;

/// Longest line inside a message (RFC 5322 says 998; real mail is lax).
pub const MAX_MESSAGE_LINE: usize = 1 << 20;

/// Largest CAPA, LIST or UIDL listing accepted (a million messages' lines).
pub const MAX_LISTING: usize = 256 << 20;

/// Default time allowed for one server answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The transport under a session (shared with the IMAP client).
pub use common::tls::MailStream as Transport;

/// What one RETR brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retrieved {
    /// The message, dot-unstuffed.
    Body(Vec<u8>),
    /// The server's `-ERR` answer.
    Refused(String),
    /// The message was longer than the limit: its real length (read to
    /// its end, not kept).
    TooLarge(u64),
}

/// How a login attempt ended when the server refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The final `-ERR` text.
    pub reply: String,
    /// The XOAUTH2 error challenge, when the server sent one.
    pub challenge: Option<ErrorChallenge>,
}

/// A POP3 session over any byte stream.
pub struct Session<S> {
    io: BufReader<S>,
    endpoint: String,
    timeout: Duration,
    /// What the server announced (read with [`Session::capa`]).
    pub capabilities: Capabilities,
    line: Vec<u8>,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Wraps a connected stream; `endpoint` names the server in errors.
    pub fn new(stream: S, endpoint: impl Into<String>, timeout: Duration) -> Self {
        Self {
            io: BufReader::with_capacity(64 * 1024, stream),
            endpoint: endpoint.into(),
            timeout,
            capabilities: Capabilities::default(),
            line: Vec::with_capacity(1024),
            out: Vec::with_capacity(1024),
        }
    }

    /// The server this session talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Gives the stream back (for STLS); buffered input is dropped, which is
    /// right after `+OK` to STLS (RFC 2595 §4: nothing may follow it).
    pub fn into_inner(self) -> S {
        self.io.into_inner()
    }

    /// Queues a command line without sending it (pipelining).
    pub fn queue(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Sends what was queued.
    pub async fn flush(&mut self, action: &'static str) -> Result<()> {
        let w = self.io.get_mut();
        let out = &self.out;
        let r = tokio::time::timeout(self.timeout, async {
            w.write_all(out).await?;
            w.flush().await
        })
        .await;
        // Cleared either way: it may hold a credential.
        self.out.fill(0);
        self.out.clear();
        match r {
            Ok(r) => r.map_err(|source| self.io_err(action, source)),
            Err(_) => Err(self.timeout_err(action)),
        }
    }

    /// Sends one command line.
    pub async fn send(&mut self, action: &'static str, line: &str) -> Result<()> {
        self.queue(line);
        self.flush(action).await
    }

    fn io_err(&self, action: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            action,
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    fn timeout_err(&self, action: &'static str) -> Error {
        Error::Timeout {
            action,
            endpoint: self.endpoint.clone(),
            secs: self.timeout.as_secs(),
        }
    }

    fn protocol_err(&self, action: &'static str, line: &[u8]) -> Error {
        let mut reply = String::from_utf8_lossy(wire::trim_crlf(line)).into_owned();
        // At most 200 bytes, cut on a character boundary: the line is the
        // server's, and truncate() panics inside a multi-byte character.
        let mut end = reply.len().min(200);
        while !reply.is_char_boundary(end) {
            end -= 1;
        }
        reply.truncate(end);
        Error::Protocol {
            action,
            endpoint: self.endpoint.clone(),
            reply,
        }
    }

    /// Makes sure the read buffer holds bytes: reads from the stream only
    /// when it is empty, and only then under the timeout (one timer per read
    /// from the stream, not per line: a 10,000-message RETR run has over a
    /// million lines). EOF is an error.
    async fn fill(&mut self, action: &'static str) -> Result<()> {
        if !self.io.buffer().is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.timeout, self.io.fill_buf()).await {
            Ok(Ok([])) => Err(self.io_err(
                action,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                ),
            )),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(self.io_err(action, source)),
            Err(_) => Err(self.timeout_err(action)),
        }
    }

    fn too_long(&self, action: &'static str, limit: usize) -> Error {
        self.io_err(
            action,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {limit} bytes"),
            ),
        )
    }

    /// Reads one line (with its line ending) into `self.line`, at most
    /// `limit` bytes; EOF is an error. Each wait for bytes is bounded by
    /// the timeout.
    async fn read_line(&mut self, action: &'static str, limit: usize) -> Result<()> {
        self.line.clear();
        loop {
            self.fill(action).await?;
            let buf = self.io.buffer();
            let (used, done) = match memchr(b'\n', buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            self.line.extend_from_slice(&buf[..used]);
            self.io.consume(used);
            if done {
                return Ok(());
            }
            if self.line.len() > limit {
                return Err(self.too_long(action, limit));
            }
        }
    }

    /// Reads one status line.
    pub async fn read_reply(&mut self, action: &'static str) -> Result<Reply> {
        self.read_line(action, MAX_STATUS_LINE).await?;
        wire::parse_reply(&self.line).ok_or_else(|| self.protocol_err(action, &self.line.clone()))
    }

    /// Reads a status line that must be `+OK`; `-ERR` becomes
    /// [`Error::Refused`] (or [`Error::ProtocolClosed`]).
    pub async fn expect_ok(&mut self, command: &'static str) -> Result<String> {
        match self.read_reply(command).await? {
            Reply::Ok(text) => Ok(text),
            Reply::Err(reply) => Err(self.refused(command, reply)),
            Reply::Continue(_) => Err(self.protocol_err(command, &self.line.clone())),
        }
    }

    fn refused(&self, command: &'static str, reply: String) -> Error {
        if wire::is_protocol_close(&reply) {
            Error::ProtocolClosed {
                command,
                endpoint: self.endpoint.clone(),
                reply,
            }
        } else {
            Error::Refused {
                command,
                endpoint: self.endpoint.clone(),
                reply,
            }
        }
    }

    /// Reads the body of a multi-line response into `out`, dot-unstuffed,
    /// and returns its length. Lines are unstuffed straight from the read
    /// buffer; only a line split across two reads is copied into
    /// `self.line` first. Past `body_limit` bytes the body is counted, not
    /// kept: `out` is left empty and the length returned is the real one.
    pub async fn read_multiline(
        &mut self,
        action: &'static str,
        out: &mut Vec<u8>,
        line_limit: usize,
        body_limit: usize,
    ) -> Result<usize> {
        self.line.clear();
        let mut dropped = 0usize;
        loop {
            self.fill(action).await?;
            let buf = self.io.buffer();
            let mut pos = 0;
            let mut finished = false;
            while let Some(i) = memchr(b'\n', &buf[pos..]) {
                let end = pos + i + 1;
                let done = if self.line.is_empty() {
                    wire::push_multiline(out, &buf[pos..end])
                } else {
                    self.line.extend_from_slice(&buf[pos..end]);
                    let done = wire::push_multiline(out, &self.line);
                    self.line.clear();
                    done
                };
                if dropped > 0 || out.len() > body_limit {
                    // Over the limit: count it, hold nothing.
                    dropped += out.len();
                    if out.capacity() > 64 << 10 {
                        *out = Vec::new();
                    } else {
                        out.clear();
                    }
                }
                pos = end;
                if done {
                    finished = true;
                    break;
                }
            }
            if !finished {
                self.line.extend_from_slice(&buf[pos..]);
                pos = buf.len();
            }
            self.io.consume(pos);
            if finished {
                return Ok(dropped + out.len());
            }
            if self.line.len() > line_limit {
                return Err(self.too_long(action, line_limit));
            }
        }
    }

    /// Reads a multi-line response's lines as text (CAPA, LIST, UIDL).
    async fn read_text_lines(&mut self, action: &'static str) -> Result<Vec<String>> {
        let mut raw = Vec::new();
        self.read_multiline(action, &mut raw, MAX_STATUS_LINE, MAX_LISTING)
            .await?;
        Ok(String::from_utf8_lossy(&raw)
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// Reads the greeting.
    pub async fn greeting(&mut self) -> Result<String> {
        self.expect_ok("read the greeting").await
    }

    /// CAPA (RFC 2449); a server without CAPA counts as announcing nothing.
    pub async fn capa(&mut self) -> Result<&Capabilities> {
        self.send("send CAPA", "CAPA").await?;
        match self.read_reply("read the CAPA reply").await? {
            Reply::Ok(_) => {
                let lines = self.read_text_lines("read the CAPA listing").await?;
                let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
                self.capabilities = Capabilities::parse(&refs);
            }
            _ => self.capabilities = Capabilities::default(),
        }
        Ok(&self.capabilities)
    }

    /// Sends STLS and expects `+OK`; the caller then starts TLS on the stream.
    pub async fn stls(&mut self) -> Result<()> {
        if !self.capabilities.stls {
            return Err(Error::Unsupported(format!(
                "the server {} does not offer STLS, and mail-server-type pop3 requires it (use pop3s, or allow-insecure = true with starttls = false on a trusted network)",
                self.endpoint
            )));
        }
        self.send("send STLS", "STLS").await?;
        self.expect_ok("STLS").await.map(|_| ())
    }

    /// SASL XOAUTH2 in the two-step form (RFC 5034 without initial
    /// response): `AUTH XOAUTH2`, the server's `+`, then the base64 payload
    /// on its own line. An error challenge (`+ <base64 JSON>`) is answered
    /// with an empty line to receive the final `-ERR`. `Ok(Err(_))` is a
    /// refusal; `Err(_)` a transport or protocol failure.
    pub async fn auth_xoauth2(
        &mut self,
        user: &str,
        token: &str,
    ) -> Result<std::result::Result<(), Refusal>> {
        if !self.capabilities.has_sasl("XOAUTH2") {
            let offered = if self.capabilities.sasl.is_empty() {
                "none".to_string()
            } else {
                self.capabilities.sasl.join(" ")
            };
            return Err(Error::Unsupported(format!(
                "the server {} does not offer SASL XOAUTH2 (CAPA SASL mechanisms: {offered}); OAuth login needs it",
                self.endpoint
            )));
        }
        self.send("send AUTH XOAUTH2", "AUTH XOAUTH2").await?;
        match self.read_reply("AUTH XOAUTH2").await? {
            Reply::Continue(_) => {}
            Reply::Err(reply) => {
                if wire::is_protocol_close(&reply) {
                    return Err(self.refused("AUTH XOAUTH2", reply));
                }
                return Ok(Err(Refusal {
                    reply,
                    challenge: None,
                }));
            }
            Reply::Ok(_) => return Err(self.protocol_err("AUTH XOAUTH2", &self.line.clone())),
        }
        let payload = common::fetch::xoauth2::encoded_response(user, token);
        // Not through `send`: nothing that carries the token goes near a log.
        self.queue(&payload);
        self.flush("send the XOAUTH2 response").await?;
        drop(payload);
        let mut challenge = None;
        loop {
            match self.read_reply("AUTH XOAUTH2").await? {
                Reply::Ok(_) => return Ok(Ok(())),
                Reply::Err(reply) => {
                    if wire::is_protocol_close(&reply) {
                        return Err(self.refused("AUTH XOAUTH2", reply));
                    }
                    return Ok(Err(Refusal { reply, challenge }));
                }
                Reply::Continue(data) => {
                    if challenge.is_some() {
                        // A second challenge: cancel the exchange (RFC 5034 §4).
                        self.send("cancel AUTH", "*").await?;
                    } else {
                        challenge = Some(
                            common::fetch::xoauth2::decode_error_challenge(&data)
                                .unwrap_or_default(),
                        );
                        self.send("answer the XOAUTH2 error challenge", "").await?;
                    }
                }
            }
        }
    }

    /// USER/PASS (only for configs without an OAuth profile).
    pub async fn user_pass(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<std::result::Result<(), Refusal>> {
        self.send("send USER", &format!("USER {user}")).await?;
        if let Reply::Err(reply) = self.read_reply("USER").await? {
            return Ok(Err(Refusal {
                reply,
                challenge: None,
            }));
        }
        self.queue(&format!("PASS {password}"));
        self.flush("send PASS").await?;
        match self.read_reply("PASS").await? {
            Reply::Ok(_) => Ok(Ok(())),
            Reply::Err(reply) => Ok(Err(Refusal {
                reply,
                challenge: None,
            })),
            Reply::Continue(_) => Err(self.protocol_err("PASS", &self.line.clone())),
        }
    }

    /// LIST: message number → size in octets.
    pub async fn list(&mut self) -> Result<Vec<(u32, u64)>> {
        self.send("send LIST", "LIST").await?;
        self.expect_ok("LIST").await?;
        let lines = self.read_text_lines("read the LIST listing").await?;
        lines
            .iter()
            .map(|l| wire::parse_scan(l).ok_or_else(|| self.protocol_err("LIST", l.as_bytes())))
            .collect()
    }

    /// UIDL: message number → unique id.
    pub async fn uidl(&mut self) -> Result<Vec<(u32, String)>> {
        self.send("send UIDL", "UIDL").await?;
        match self.read_reply("UIDL").await? {
            Reply::Ok(_) => {}
            Reply::Err(reply) => {
                return Err(Error::Unsupported(format!(
                    "the server {} refused UIDL ({reply}); pop-fetcher needs unique ids to know what it handed over",
                    self.endpoint
                )))
            }
            Reply::Continue(_) => return Err(self.protocol_err("UIDL", &self.line.clone())),
        }
        let lines = self.read_text_lines("read the UIDL listing").await?;
        lines
            .iter()
            .map(|l| wire::parse_uidl(l).ok_or_else(|| self.protocol_err("UIDL", l.as_bytes())))
            .collect()
    }

    /// RETR of several messages, pipelined when the server offers
    /// PIPELINING (else one after the other). Each message comes back
    /// dot-unstuffed, with its line endings as sent; a message the server
    /// refuses comes back as `Err(reply)`. All bodies are held at once: the
    /// fetcher reads them one by one with [`Self::retr_send`] and
    /// [`Self::retr_read`] instead.
    pub async fn retr_many(
        &mut self,
        msgs: &[(u32, u64)],
    ) -> Result<Vec<(u32, std::result::Result<Vec<u8>, String>)>> {
        let numbers: Vec<u32> = msgs.iter().map(|m| m.0).collect();
        self.retr_send(&numbers).await?;
        let mut out = Vec::with_capacity(msgs.len());
        for &(n, size) in msgs {
            let body = match self.retr_read(n, size, u64::MAX).await? {
                Retrieved::Body(b) => Ok(b),
                Retrieved::Refused(reply) => Err(reply),
                Retrieved::TooLarge(_) => unreachable!("no limit"),
            };
            out.push((n, body));
        }
        Ok(out)
    }

    /// Starts the RETRs of `msgs`: when the server offers PIPELINING they
    /// all go out now; otherwise each goes out in its [`Self::retr_read`].
    pub async fn retr_send(&mut self, msgs: &[u32]) -> Result<()> {
        if self.capabilities.pipelining {
            for n in msgs {
                self.queue(&format!("RETR {n}"));
            }
            self.flush("send RETR").await?;
        }
        Ok(())
    }

    /// Reads the answer to the RETR of message `n` (sent by
    /// [`Self::retr_send`], or now), LIST'ed at `size` bytes. The body's
    /// real length is checked while it streams: past `max` bytes it is read
    /// to its end but not kept ([`Retrieved::TooLarge`]).
    pub async fn retr_read(&mut self, n: u32, size: u64, max: u64) -> Result<Retrieved> {
        if !self.capabilities.pipelining {
            self.send("send RETR", &format!("RETR {n}")).await?;
        }
        match self.read_reply("RETR").await? {
            Reply::Ok(_) => {}
            Reply::Err(reply) => return Ok(Retrieved::Refused(reply)),
            Reply::Continue(_) => return Err(self.protocol_err("RETR", &self.line.clone())),
        }
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let expected = usize::try_from(size).unwrap_or(usize::MAX);
        let mut body = Vec::with_capacity(expected.min(max).min(64 << 20) + 64);
        let len = self
            .read_multiline("read a RETR body", &mut body, MAX_MESSAGE_LINE, max)
            .await?;
        Ok(if len > max {
            Retrieved::TooLarge(len as u64)
        } else {
            Retrieved::Body(body)
        })
    }

    /// Reads and drops the answer to a RETR [`Self::retr_send`] already
    /// sent (pipelined); nothing when it was not sent.
    pub async fn retr_discard(&mut self, n: u32) -> Result<()> {
        if self.capabilities.pipelining {
            self.retr_read(n, 0, 0).await?;
        }
        Ok(())
    }

    /// DELE of several messages (pipelined when offered). Deletions take
    /// effect only at a successful QUIT.
    pub async fn dele_many(&mut self, msgs: &[u32]) -> Result<()> {
        if self.capabilities.pipelining {
            for n in msgs {
                self.queue(&format!("DELE {n}"));
            }
            self.flush("send DELE").await?;
            let mut first_err = None;
            for _ in msgs {
                if let Err(e) = self.expect_ok("DELE").await {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        } else {
            for n in msgs {
                self.send("send DELE", &format!("DELE {n}")).await?;
                self.expect_ok("DELE").await?;
            }
            Ok(())
        }
    }

    /// QUIT: enters the UPDATE state, which commits the deletions.
    pub async fn quit(&mut self) -> Result<()> {
        self.send("send QUIT", "QUIT").await?;
        self.expect_ok("QUIT").await.map(|_| ())
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// Opens a session for a mail config: TCP, TLS (implicit for `pop3s`; STLS
/// for `pop3` unless `starttls = false` with `allow-insecure`), greeting and
/// CAPA. Not yet authenticated.
pub async fn connect(
    cfg: &IncomingMail,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Session<Transport>> {
    let endpoint = format!("{}:{}", cfg.host, cfg.port);
    let connect_err = |source| Error::Connect {
        endpoint: endpoint.clone(),
        source,
    };
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect((cfg.host.as_str(), cfg.port)))
        .await
    {
        Ok(r) => r.map_err(connect_err)?,
        Err(_) => {
            return Err(connect_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )))
        }
    };
    let _ = tcp.set_nodelay(true);
    common::connect::keepalive(&tcp);
    let server_name = ServerName::try_from(cfg.host.clone()).map_err(|e| {
        Error::Setup(format!(
            "host {:?} is not a valid server name: {e}",
            cfg.host
        ))
    })?;
    let handshake = |tcp: TcpStream| {
        let connector = TlsConnector::from(Arc::clone(&tls));
        let server_name = server_name.clone();
        let endpoint = endpoint.clone();
        async move {
            match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
                Ok(Ok(s)) => Ok(Transport::Tls(Box::new(s))),
                Ok(Err(source)) => Err(Error::Connect { endpoint, source }),
                Err(_) => Err(Error::Connect {
                    endpoint,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    ),
                }),
            }
        }
    };
    let mut session = if cfg.server_type.implicit_tls() {
        let mut s = Session::new(handshake(tcp).await?, endpoint.clone(), timeout);
        s.greeting().await?;
        s
    } else {
        let mut plain = Session::new(tcp, endpoint.clone(), timeout);
        plain.greeting().await?;
        plain.capa().await?;
        if cfg.starttls {
            plain.stls().await?;
            Session::new(
                handshake(plain.into_inner()).await?,
                endpoint.clone(),
                timeout,
            )
        } else if cfg.allow_insecure {
            tracing::warn!(config = %cfg.name, %endpoint, "POP3 without TLS (allow-insecure)");
            Session::new(
                Transport::Plain(plain.into_inner()),
                endpoint.clone(),
                timeout,
            )
        } else {
            return Err(Error::Setup(format!(
                "mail config {} disables STLS without allow-insecure = true",
                cfg.name
            )));
        }
    };
    session.capa().await?;
    Ok(session)
}

#[cfg(test)]
mod tests;
