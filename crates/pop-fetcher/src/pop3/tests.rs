//! Table-driven tests of the POP3 client against a scripted server over an
//! in-memory pipe.

use common::fetch::Failure;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

use super::*;

/// One step of a scripted server: the client lines it reads (all of them
/// before answering, which proves pipelining), then what it sends.
type Step = (&'static [&'static str], &'static str);

const TOKEN: &str = "tok";
const USER: &str = "box@example.com";

fn payload() -> String {
    common::fetch::xoauth2::encoded_response(USER, TOKEN)
}

/// Starts a scripted server; returns the client's side and the lines the
/// server received. `$PAYLOAD` in an expected line stands for the XOAUTH2
/// payload. A mismatch makes the server close the pipe.
fn scripted(steps: Vec<Step>) -> (Session<DuplexStream>, Arc<Mutex<Vec<String>>>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(server);
        let mut r = BufReader::new(r);
        for (expect, reply) in steps {
            for e in expect {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end_matches(['\r', '\n']).to_string();
                log.lock().unwrap().push(line.clone());
                if line != e.replace("$PAYLOAD", &payload()) {
                    return;
                }
            }
            if w.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
        // Keep the pipe open until the client is done.
        let mut rest = String::new();
        let _ = r.read_line(&mut rest).await;
    });
    let session = Session::new(client, "scripted:110", Duration::from_millis(500));
    (session, seen)
}

const CAPA_FULL: &str = "+OK\r\nUIDL\r\nPIPELINING\r\nUSER\r\nSASL PLAIN XOAUTH2\r\n.\r\n";
const CAPA_NO_PIPE: &str = "+OK\r\nUIDL\r\nUSER\r\nSASL XOAUTH2\r\n.\r\n";
const CAPA_NO_XOAUTH2: &str = "+OK\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";

async fn ready(steps: Vec<Step>) -> (Session<DuplexStream>, Arc<Mutex<Vec<String>>>) {
    let mut all: Vec<Step> = vec![(&[], "+OK ready\r\n")];
    all.extend(steps);
    let (mut s, seen) = scripted(all);
    s.greeting().await.unwrap();
    (s, seen)
}

#[derive(Debug, PartialEq)]
enum AuthEnd {
    Accepted,
    Refused {
        reply: String,
        status: Option<String>,
    },
    Failed(&'static str),
}

async fn auth(steps: Vec<Step>) -> (AuthEnd, Vec<String>) {
    let (mut s, seen) = ready(steps).await;
    s.capa().await.unwrap();
    let end = match s.auth_xoauth2(USER, TOKEN).await {
        Ok(Ok(())) => AuthEnd::Accepted,
        Ok(Err(r)) => AuthEnd::Refused {
            reply: r.reply,
            status: r.challenge.map(|c| c.status),
        },
        Err(e) => AuthEnd::Failed(e.kind()),
    };
    let sent = seen.lock().unwrap().clone();
    (end, sent)
}

#[tokio::test]
async fn xoauth2_table() {
    let cases: Vec<(&str, Vec<Step>, AuthEnd)> = vec![
        (
            "two-step accepted",
            vec![
                (&["CAPA"], CAPA_FULL),
                (&["AUTH XOAUTH2"], "+ \r\n"),
                (&["$PAYLOAD"], "+OK Logged in.\r\n"),
            ],
            AuthEnd::Accepted,
        ),
        (
            "bare + continuation",
            vec![
                (&["CAPA"], CAPA_NO_PIPE),
                (&["AUTH XOAUTH2"], "+\r\n"),
                (&["$PAYLOAD"], "+OK User successfully authenticated.\r\n"),
            ],
            AuthEnd::Accepted,
        ),
        (
            "error challenge answered with an empty line",
            vec![
                (&["CAPA"], CAPA_FULL),
                (&["AUTH XOAUTH2"], "+ \r\n"),
                (
                    &["$PAYLOAD"],
                    "+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=\r\n",
                ),
                (&[""], "-ERR [AUTH] Authentication failed.\r\n"),
            ],
            AuthEnd::Refused {
                reply: "[AUTH] Authentication failed.".into(),
                status: Some("401".into()),
            },
        ),
        (
            "Exchange refusal without challenge",
            vec![
                (&["CAPA"], CAPA_NO_PIPE),
                (&["AUTH XOAUTH2"], "+ \r\n"),
                (
                    &["$PAYLOAD"],
                    "-ERR Authentication failure: unknown user name or bad password.\r\n",
                ),
            ],
            AuthEnd::Refused {
                reply: "Authentication failure: unknown user name or bad password.".into(),
                status: None,
            },
        ),
        (
            "Exchange protocol error closes",
            vec![
                (&["CAPA"], CAPA_NO_PIPE),
                (
                    &["AUTH XOAUTH2"],
                    "-ERR Protocol error. Connection is closed. 10\r\n",
                ),
            ],
            AuthEnd::Failed("pop3"),
        ),
        (
            "no XOAUTH2 offered",
            vec![(&["CAPA"], CAPA_NO_XOAUTH2)],
            AuthEnd::Failed("unsupported"),
        ),
        (
            "server hangs after the payload",
            vec![(&["CAPA"], CAPA_FULL), (&["AUTH XOAUTH2"], "+ \r\n")],
            AuthEnd::Failed("io"),
        ),
    ];
    for (name, steps, expected) in cases {
        let (end, sent) = auth(steps).await;
        assert_eq!(end, expected, "{name}");
        // Never the one-line form.
        assert!(
            !sent.iter().any(|l| l.starts_with("AUTH XOAUTH2 ")),
            "{name}: one-line AUTH sent: {sent:?}"
        );
    }
}

#[tokio::test]
async fn missing_xoauth2_error_names_the_offered_mechanisms() {
    let (mut s, _) = ready(vec![(&["CAPA"], CAPA_NO_XOAUTH2)]).await;
    s.capa().await.unwrap();
    let err = s.auth_xoauth2(USER, TOKEN).await.unwrap_err().to_string();
    assert!(err.contains("does not offer SASL XOAUTH2"), "{err}");
    assert!(err.contains("PLAIN LOGIN"), "{err}");
}

#[tokio::test]
async fn user_pass_table() {
    let cases: Vec<(Vec<Step>, bool)> = vec![
        (vec![(&["USER u"], "+OK\r\n"), (&["PASS p w"], "+OK Logged in.\r\n")], true),
        (vec![(&["USER u"], "+OK\r\n"), (&["PASS p w"], "-ERR [AUTH] Authentication failed.\r\n")], false),
        (vec![(&["USER u"], "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n")], false),
    ];
    for (steps, ok) in cases {
        let (mut s, _) = ready(steps).await;
        assert_eq!(s.user_pass("u", "p w").await.unwrap().is_ok(), ok);
    }
}

#[tokio::test]
async fn list_and_uidl_are_parsed() {
    let (mut s, _) = ready(vec![
        (&["LIST"], "+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
        (
            &["UIDL"],
            "+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n.\r\n",
        ),
    ])
    .await;
    assert_eq!(s.list().await.unwrap(), vec![(1, 120), (2, 200)]);
    assert_eq!(
        s.uidl().await.unwrap(),
        vec![
            (1, "whqtswO00WBw418f9t5JxYwZ".into()),
            (2, "QhdPYR:00WBw1Ph7x7".into())
        ]
    );
}

#[tokio::test]
async fn empty_maildrop_lists_nothing() {
    let (mut s, _) = ready(vec![
        (&["LIST"], "+OK 0 messages\r\n.\r\n"),
        (&["UIDL"], "+OK\r\n.\r\n"),
    ])
    .await;
    assert!(s.list().await.unwrap().is_empty());
    assert!(s.uidl().await.unwrap().is_empty());
}

#[tokio::test]
async fn uidl_refused_is_unsupported() {
    let (mut s, _) = ready(vec![(&["UIDL"], "-ERR unknown command\r\n")]).await;
    assert_eq!(s.uidl().await.unwrap_err().kind(), "unsupported");
}

const M1: &[u8] = b"Subject: one\r\n\r\n.leading dot\r\n..two\r\nend\r\n";
const M1_WIRE: &str =
    "+OK 44 octets\r\nSubject: one\r\n\r\n..leading dot\r\n...two\r\nend\r\n.\r\n";
const M2_WIRE: &str = "+OK\r\nSubject: two\r\n\r\n.\r\n";

#[tokio::test]
async fn retr_is_pipelined_when_offered_and_unstuffed() {
    // The server reads all three RETR lines before answering any: only a
    // pipelining client gets an answer.
    let (mut s, _) = ready(vec![
        (&["CAPA"], CAPA_FULL),
        (&["RETR 1", "RETR 2", "RETR 3"], "+OK\r\nSubject: one\r\n\r\n..leading dot\r\n...two\r\nend\r\n.\r\n+OK\r\nSubject: two\r\n\r\n.\r\n-ERR no such message\r\n"),
    ])
    .await;
    s.capa().await.unwrap();
    let got = s.retr_many(&[(1, 44), (2, 10), (3, 1)]).await.unwrap();
    assert_eq!(got[0], (1, Ok(M1.to_vec())));
    assert_eq!(got[1], (2, Ok(b"Subject: two\r\n\r\n".to_vec())));
    assert_eq!(got[2], (3, Err("no such message".into())));
}

#[tokio::test]
async fn retr_waits_for_each_reply_without_pipelining() {
    let (mut s, _) = ready(vec![
        (&["CAPA"], CAPA_NO_PIPE),
        (&["RETR 1"], M1_WIRE),
        (&["RETR 2"], M2_WIRE),
    ])
    .await;
    s.capa().await.unwrap();
    let got = s.retr_many(&[(1, 44), (2, 10)]).await.unwrap();
    assert_eq!(got[0].1.as_deref(), Ok(M1));
    assert_eq!(got[1].1.as_deref(), Ok(&b"Subject: two\r\n\r\n"[..]));
}

#[tokio::test]
async fn a_body_longer_than_the_limit_is_counted_not_kept_and_the_session_stays_in_step() {
    // LIST said 10 octets; the body is 44. With a 20-byte limit the first
    // comes back as too large with its real (unstuffed) length, and the
    // pipelined answers after it are read in step: the second is discarded,
    // the third refused.
    let (mut s, _) = ready(vec![
        (&["CAPA"], CAPA_FULL),
        (&["RETR 1", "RETR 2", "RETR 3"], "+OK\r\nSubject: one\r\n\r\n..leading dot\r\n...two\r\nend\r\n.\r\n+OK\r\nSubject: two\r\n\r\n.\r\n-ERR no such message\r\n"),
        (&["QUIT"], "+OK bye\r\n"),
    ])
    .await;
    s.capa().await.unwrap();
    s.retr_send(&[1, 2, 3]).await.unwrap();
    assert_eq!(
        s.retr_read(1, 10, 20).await.unwrap(),
        Retrieved::TooLarge(M1.len() as u64)
    );
    s.retr_discard(2).await.unwrap();
    assert_eq!(
        s.retr_read(3, 10, 20).await.unwrap(),
        Retrieved::Refused("no such message".into())
    );
    s.quit().await.unwrap();
}

#[tokio::test]
async fn dele_and_quit() {
    let (mut s, seen) = ready(vec![
        (&["CAPA"], CAPA_FULL),
        (&["DELE 1", "DELE 2"], "+OK\r\n+OK\r\n"),
        (&["QUIT"], "+OK Logging out, messages deleted.\r\n"),
    ])
    .await;
    s.capa().await.unwrap();
    s.dele_many(&[1, 2]).await.unwrap();
    s.quit().await.unwrap();
    assert_eq!(
        seen.lock().unwrap().last().map(String::as_str),
        Some("QUIT")
    );
}

#[tokio::test]
async fn a_lost_connection_mid_message_is_an_error_not_a_short_message() {
    let (mut s, _) = ready(vec![(&["RETR 1"], "+OK\r\nSubject: cut\r\n\r\npartial")]).await;
    let err = tokio::time::timeout(Duration::from_secs(5), s.retr_many(&[(1, 100)]))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(err.kind(), "io");
}

#[tokio::test]
async fn stls_requires_the_capability() {
    let (mut s, _) = ready(vec![(&["CAPA"], CAPA_FULL)]).await;
    s.capa().await.unwrap();
    let err = s.stls().await.unwrap_err();
    assert!(err.to_string().contains("does not offer STLS"), "{err}");
    let (mut s, _) = ready(vec![
        (&["CAPA"], "+OK\r\nSTLS\r\n.\r\n"),
        (&["STLS"], "+OK Begin TLS negotiation now.\r\n"),
    ])
    .await;
    s.capa().await.unwrap();
    s.stls().await.unwrap();
}

#[tokio::test]
async fn garbage_greeting_is_a_protocol_error() {
    let (mut s, _) = scripted(vec![(&[], "* OK IMAP4rev1 ready\r\n")]);
    assert_eq!(s.greeting().await.unwrap_err().kind(), "pop3");
}

/// Found by the `pop3_response` fuzz target: the error quotes the line cut
/// to 200 bytes, and bytes that are not UTF-8 become 3-byte U+FFFD, so the
/// cut fell inside a character and `truncate` panicked.
#[tokio::test]
async fn garbage_greeting_with_invalid_utf8_past_200_bytes_is_an_error_not_a_panic() {
    let mut line = vec![0xffu8; 82];
    line.extend_from_slice(b"+$OK POP3 ready\r\n");
    let stream = tokio::io::join(std::io::Cursor::new(line), tokio::io::sink());
    let mut s = Session::new(stream, "scripted:110", Duration::from_millis(500));
    match s.greeting().await.unwrap_err() {
        Error::Protocol { reply, .. } => {
            assert_eq!(reply.len(), 198);
            assert!(reply.chars().all(|c| c == char::REPLACEMENT_CHARACTER));
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn retr_bodies_split_at_every_byte_are_unstuffed_the_same() {
    // Every message line split across reads at every offset: the lines
    // taken straight from the buffer and the ones reassembled in `line`
    // must give the same bytes, the terminator included.
    let wire: &[u8] = b"+OK 30 octets\r\nSubject: a\r\n\r\n..dot\r\nx\r\n.\r\n+OK\r\n";
    for split in 1..wire.len() {
        let (client, mut server) = tokio::io::duplex(64);
        let (head, tail) = wire.split_at(split);
        let (head, tail) = (head.to_vec(), tail.to_vec());
        let server_task = tokio::spawn(async move {
            server.write_all(&head).await.unwrap();
            server.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
            for b in tail {
                server.write_all(&[b]).await.unwrap();
                server.flush().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        let mut s = Session::new(client, "split:110", Duration::from_millis(500));
        let body = s.retr_read(1, 30, u64::MAX).await.unwrap();
        assert_eq!(
            body,
            Retrieved::Body(b"Subject: a\r\n\r\n.dot\r\nx\r\n".to_vec()),
            "split at {split}"
        );
        assert!(matches!(
            s.read_reply("next").await.unwrap(),
            wire::Reply::Ok(_)
        ));
        server_task.abort();
    }
}
