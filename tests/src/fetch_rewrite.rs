//! A TLS front for Dovecot's IMAPS that withholds one message's body: while
//! a UID is [withheld](FetchRewriter::withhold), every untagged FETCH reply
//! that carries that message's `BODY[]` reaches the client without it —
//! `* 3 FETCH (UID 3 BODY[] {1234}…)` becomes `* 3 FETCH (UID 3
//! RFC822.SIZE 1234)`, a well-formed reply with no body, as a server
//! glitch would send (issue 12 item 7). Everything else is relayed byte for
//! byte.
//!
//! The front terminates TLS with the test servers' `localhost` certificate
//! and opens its own IMAPS connection to Dovecot per client, so the client
//! needs nothing but a different port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::env::Endpoints;

/// What the front withholds and how often it did.
#[derive(Debug, Default)]
struct State {
    /// The UID whose body is withheld; 0: none.
    uid: AtomicU32,
    /// FETCH replies sent without their body.
    withheld: AtomicUsize,
}

/// A running front.
pub struct FetchRewriter {
    /// Where clients connect (TLS, certificate for `localhost`).
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FetchRewriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FetchRewriter {
    /// Starts a front to Dovecot's IMAPS on a free loopback port, relaying
    /// everything untouched until told to withhold a body.
    pub async fn start(env: &Endpoints) -> Self {
        let acceptor = crate::exchange_front::localhost_acceptor(env);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let upstream = env.mail_addr("IMAPS");
        let ca = env.ca_file();
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let state = Arc::clone(&shared);
                let ca = ca.clone();
                tokio::spawn(async move {
                    let Ok(client) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(server) = crate::mailclient::connect_tls(upstream, &ca).await else {
                        return;
                    };
                    relay(client, server.into_inner(), &state).await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// From now on, FETCH replies with `uid`'s body reach clients without
    /// it.
    pub fn withhold(&self, uid: u32) {
        self.state.uid.store(uid, Ordering::SeqCst);
    }

    /// From now on, every body reaches clients again.
    pub fn release(&self) {
        self.state.uid.store(0, Ordering::SeqCst);
    }

    /// How many FETCH replies went out without their body so far.
    pub fn withheld(&self) -> usize {
        self.state.withheld.load(Ordering::SeqCst)
    }
}

/// Relays one connection until either side ends: the client's bytes as
/// they are, the server's response by response (see [`rewrite`]).
async fn relay<C, S>(client: C, server: S, state: &State)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_in, client_out) = tokio::io::split(client);
    let (server_in, mut server_out) = tokio::io::split(server);
    let up = async {
        let _ = tokio::io::copy(&mut client_in, &mut server_out).await;
    };
    let down = async {
        let _ = rewrite(server_in, client_out, state).await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies the server's responses to the client, one whole response at a
/// time (its lines and literals), each flushed at once so that
/// continuations and IDLE updates are not held back; a FETCH reply with
/// the withheld message's body goes without it.
async fn rewrite<R, W>(server: R, mut client: W, state: &State) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut server = BufReader::new(server);
    loop {
        let mut first = Vec::new();
        if server.read_until(b'\n', &mut first).await? == 0 {
            return Ok(());
        }
        let Some(len) = literal_len(&first) else {
            client.write_all(&first).await?;
            client.flush().await?;
            continue;
        };
        let mut literal = vec![0u8; len];
        server.read_exact(&mut literal).await?;
        // The rest of the response: more lines, each perhaps with a literal.
        let mut rest = Vec::new();
        loop {
            let start = rest.len();
            if server.read_until(b'\n', &mut rest).await? == 0 {
                break;
            }
            let Some(more) = literal_len(&rest[start..]) else {
                break;
            };
            let at = rest.len();
            rest.resize(at + more, 0);
            server.read_exact(&mut rest[at..]).await?;
        }
        let withheld = state.uid.load(Ordering::SeqCst);
        match without_body(&first, len, &rest, withheld) {
            Some(reply) => {
                state.withheld.fetch_add(1, Ordering::SeqCst);
                client.write_all(&reply).await?;
            }
            None => {
                client.write_all(&first).await?;
                client.write_all(&literal).await?;
                client.write_all(&rest).await?;
            }
        }
        client.flush().await?;
    }
}

/// The length of the literal a response line announces (`… {123}\r\n`, or
/// the non-synchronizing `{123+}`), if it ends with one.
fn literal_len(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `* n FETCH (UID u BODY[] {len}` + literal + `rest` of message `uid`,
/// rewritten without the body: `* n FETCH (UID u RFC822.SIZE len` + `rest`.
/// `None` for any other response.
fn without_body(first: &[u8], len: usize, rest: &[u8], uid: u32) -> Option<Vec<u8>> {
    if uid == 0 {
        return None;
    }
    let text = std::str::from_utf8(first).ok()?;
    if !text.starts_with("* ") {
        return None;
    }
    let items = &text[text.find(" FETCH (")? + " FETCH (".len()..];
    let body = text.rfind("BODY[] {")?;
    if text[body..].trim_end() != format!("BODY[] {{{len}}}") {
        return None;
    }
    let tail = String::from_utf8_lossy(rest);
    if fetch_uid(items).or_else(|| fetch_uid(&tail)) != Some(uid) {
        return None;
    }
    let mut reply = first[..body].to_vec();
    reply.extend_from_slice(format!("RFC822.SIZE {len}").as_bytes());
    reply.extend_from_slice(rest);
    Some(reply)
}

/// The value of the `UID` item in a FETCH reply's item list.
fn fetch_uid(items: &str) -> Option<u32> {
    let mut words = items.split([' ', '(', ')']);
    while let Some(w) = words.next() {
        if w.eq_ignore_ascii_case("UID") {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_lengths_are_read_from_the_line_end() {
        let cases: [(&[u8], Option<usize>); 6] = [
            (b"* 3 FETCH (UID 3 BODY[] {1234}\r\n", Some(1234)),
            (b"* 3 FETCH (UID 3 BODY[] {7+}\r\n", Some(7)),
            (b"* 3 FETCH (UID 3 RFC822.SIZE 12)\r\n", None),
            (b"a1 OK done {}\r\n", None),
            (b"* OK {x}\r\n", None),
            (b")\r\n", None),
        ];
        for (line, len) in cases {
            assert_eq!(literal_len(line), len, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn only_the_withheld_messages_body_is_dropped() {
        let first = b"* 3 FETCH (UID 7 BODY[] {5}\r\n";
        assert_eq!(
            without_body(first, 5, b")\r\n", 7).as_deref(),
            Some(&b"* 3 FETCH (UID 7 RFC822.SIZE 5)\r\n"[..])
        );
        assert_eq!(without_body(first, 5, b")\r\n", 8), None);
        assert_eq!(without_body(first, 5, b")\r\n", 0), None);
        // The UID after the body.
        assert_eq!(
            without_body(b"* 3 FETCH (BODY[] {5}\r\n", 5, b" UID 7)\r\n", 7).as_deref(),
            Some(&b"* 3 FETCH (RFC822.SIZE 5 UID 7)\r\n"[..])
        );
        // Another item's literal is left alone.
        let header = b"* 3 FETCH (UID 7 BODY[HEADER] {5}\r\n";
        assert_eq!(without_body(header, 5, b")\r\n", 7), None);
    }
}
