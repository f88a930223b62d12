//! The POP3 wire format as pure functions: status lines (RFC 1939 §3),
//! CAPA (RFC 2449), scan and unique-id listings, and the dot-stuffing of
//! multi-line responses.

/// A single-line server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK <text>`.
    Ok(String),
    /// `-ERR <text>`.
    Err(String),
    /// `+ <base64>` (a SASL challenge, RFC 5034); empty for a bare `+`.
    Continue(String),
}

/// Parses one reply line (with or without its CRLF); `None` when it is no
/// POP3 status line.
pub fn parse_reply(line: &[u8]) -> Option<Reply> {
    let line = trim_crlf(line);
    let text = |rest: &[u8]| String::from_utf8_lossy(rest).trim().to_string();
    if let Some(rest) = strip_prefix_ci(line, b"+OK") {
        if rest.is_empty() || rest[0] == b' ' {
            return Some(Reply::Ok(text(rest)));
        }
    }
    if let Some(rest) = strip_prefix_ci(line, b"-ERR") {
        if rest.is_empty() || rest[0] == b' ' {
            return Some(Reply::Err(text(rest)));
        }
    }
    if let Some(rest) = line.strip_prefix(b"+") {
        if rest.is_empty() || rest[0] == b' ' {
            return Some(Reply::Continue(text(rest)));
        }
    }
    None
}

fn strip_prefix_ci<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &line[prefix.len()..])
}

/// The line without its trailing CRLF (or bare LF).
pub fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What a server announced in its CAPA listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// SASL mechanisms, uppercased.
    pub sasl: Vec<String>,
    /// `STLS` (RFC 2595).
    pub stls: bool,
    /// `PIPELINING` (RFC 2449).
    pub pipelining: bool,
    /// `UIDL`.
    pub uidl: bool,
    /// `USER` (USER/PASS offered).
    pub user: bool,
    /// Every line as sent, for error messages.
    pub raw: Vec<String>,
}

impl Capabilities {
    /// Parses the lines of a CAPA response (without the `+OK` line and the
    /// terminating `.`).
    pub fn parse(lines: &[&str]) -> Self {
        let mut c = Self::default();
        for line in lines {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            c.raw.push(line.to_string());
            let mut words = line.split_ascii_whitespace();
            let Some(name) = words.next() else { continue };
            match name.to_ascii_uppercase().as_str() {
                "SASL" => c.sasl.extend(words.map(|w| w.to_ascii_uppercase())),
                "STLS" => c.stls = true,
                "PIPELINING" => c.pipelining = true,
                "UIDL" => c.uidl = true,
                "USER" => c.user = true,
                _ => {}
            }
        }
        c
    }

    /// True when SASL `mechanism` is offered.
    pub fn has_sasl(&self, mechanism: &str) -> bool {
        self.sasl.iter().any(|m| m.eq_ignore_ascii_case(mechanism))
    }
}

/// One `<msg> <size>` scan listing line of LIST.
pub fn parse_scan(line: &str) -> Option<(u32, u64)> {
    let mut words = line.split_ascii_whitespace();
    let n = words.next()?.parse().ok()?;
    let size = words.next()?.parse().ok()?;
    Some((n, size))
}

/// One `<msg> <unique-id>` line of UIDL. The unique id is 1 to 70
/// characters in 0x21..=0x7E (RFC 1939 §7).
pub fn parse_uidl(line: &str) -> Option<(u32, String)> {
    let mut words = line.split_ascii_whitespace();
    let n = words.next()?.parse().ok()?;
    let id = words.next()?;
    let valid = (1..=70).contains(&id.len()) && id.bytes().all(|b| (0x21..=0x7e).contains(&b));
    (valid && words.next().is_none()).then(|| (n, id.to_string()))
}

/// Appends one line of a multi-line response to `out`, undoing the
/// dot-stuffing (RFC 1939 §3: a line starting with `.` had one more `.`
/// prepended). Returns `true` for the terminating `.` line, which is not
/// appended. Line endings are kept as sent.
pub fn push_multiline(out: &mut Vec<u8>, line: &[u8]) -> bool {
    if trim_crlf(line) == b"." && line.ends_with(b"\n") {
        return true;
    }
    match line.strip_prefix(b".") {
        Some(rest) => out.extend_from_slice(rest),
        None => out.extend_from_slice(line),
    }
    false
}

/// How an `-ERR` answer to AUTH (or PASS) is best explained, from what
/// Exchange Online and Dovecot send.
pub fn explain_auth_refusal(reply: &str, token_expired: bool) -> String {
    let lower = reply.to_ascii_lowercase();
    if token_expired {
        "the access token had expired".into()
    } else if lower.contains("unknown user name or bad password") {
        "Exchange refused the token: it is invalid for this mailbox, or the app has no permission on the mailbox".into()
    } else if lower.contains("protocol error") {
        "the server rejected the AUTH exchange as malformed".into()
    } else if lower.contains("plaintext authentication disallowed") {
        "the server refuses passwords before TLS".into()
    } else {
        "the server refused the credentials (token invalid or expired, or no permission on the mailbox)".into()
    }
}

/// True for Exchange's `Protocol error. Connection is closed.` answer.
pub fn is_protocol_close(reply: &str) -> bool {
    let lower = reply.to_ascii_lowercase();
    lower.contains("protocol error") && lower.contains("connection is closed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_table() {
        let cases: &[(&[u8], Option<Reply>)] = &[
            (b"+OK\r\n", Some(Reply::Ok(String::new()))),
            (b"+OK Logged in.\r\n", Some(Reply::Ok("Logged in.".into()))),
            (b"+ok lower\r\n", Some(Reply::Ok("lower".into()))),
            (
                b"-ERR [AUTH] Authentication failed.\r\n",
                Some(Reply::Err("[AUTH] Authentication failed.".into())),
            ),
            (
                b"-ERR Protocol error. Connection is closed. 10\r\n",
                Some(Reply::Err(
                    "Protocol error. Connection is closed. 10".into(),
                )),
            ),
            (b"-ERR\r\n", Some(Reply::Err(String::new()))),
            (b"+ \r\n", Some(Reply::Continue(String::new()))),
            (b"+\r\n", Some(Reply::Continue(String::new()))),
            (
                b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n",
                Some(Reply::Continue("eyJzdGF0dXMiOiI0MDEifQ==".into())),
            ),
            (b"+OKAY\r\n", None),
            (b"* OK imap\r\n", None),
            (b"\r\n", None),
        ];
        for (line, expected) in cases {
            assert_eq!(
                &parse_reply(line),
                expected,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn capa_table() {
        let dovecot = Capabilities::parse(&[
            "CAPA",
            "TOP",
            "UIDL",
            "RESP-CODES",
            "PIPELINING",
            "AUTH-RESP-CODE",
            "USER",
            "SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER",
        ]);
        assert!(
            dovecot.has_sasl("xoauth2")
                && dovecot.pipelining
                && dovecot.uidl
                && dovecot.user
                && !dovecot.stls
        );
        let plain = Capabilities::parse(&["STLS", "UIDL", "SASL PLAIN"]);
        assert!(plain.stls && !plain.has_sasl("XOAUTH2") && !plain.pipelining);
        let exchange = Capabilities::parse(&["TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER"]);
        assert!(exchange.has_sasl("XOAUTH2") && !exchange.pipelining);
        assert_eq!(Capabilities::parse(&[]), Capabilities::default());
    }

    #[test]
    fn listing_table() {
        assert_eq!(parse_scan("1 120"), Some((1, 120)));
        assert_eq!(parse_scan("2 200 extra"), Some((2, 200)));
        assert_eq!(parse_scan("x 1"), None);
        assert_eq!(parse_scan("3"), None);
        assert_eq!(
            parse_uidl("1 whqtswO00WBw418f9t5JxYwZ"),
            Some((1, "whqtswO00WBw418f9t5JxYwZ".into()))
        );
        assert_eq!(
            parse_uidl("2 QhdPYR:00WBw1Ph7x7"),
            Some((2, "QhdPYR:00WBw1Ph7x7".into()))
        );
        assert_eq!(parse_uidl("3 "), None);
        assert_eq!(parse_uidl(&format!("4 {}", "a".repeat(71))), None);
        assert_eq!(parse_uidl("5 a b"), None);
    }

    /// Lines as on the wire, bytes expected, terminated.
    type MultilineCase = (&'static [&'static [u8]], &'static [u8], bool);

    #[test]
    fn multiline_unstuffing_table() {
        let cases: &[MultilineCase] = &[
            (
                &[b"Subject: x\r\n", b"\r\n", b"body\r\n", b".\r\n"],
                b"Subject: x\r\n\r\nbody\r\n",
                true,
            ),
            (&[b"..leading dot\r\n", b".\r\n"], b".leading dot\r\n", true),
            (&[b"...two\r\n", b".\r\n"], b"..two\r\n", true),
            (&[b"..\r\n", b".\r\n"], b".\r\n", true),
            (&[b"a.b\r\n", b" .\r\n", b".\r\n"], b"a.b\r\n .\r\n", true),
            (&[b".\r\n"], b"", true),
            (&[b"no end yet\r\n"], b"no end yet\r\n", false),
            (&[b"bare lf\n", b".\n"], b"bare lf\n", true),
            (
                &[b"\xff\xfe 8-bit\r\n", b".\r\n"],
                b"\xff\xfe 8-bit\r\n",
                true,
            ),
        ];
        for (lines, expected, terminated) in cases {
            let mut out = Vec::new();
            let mut done = false;
            for line in *lines {
                assert!(!done, "line after the terminator");
                done = push_multiline(&mut out, line);
            }
            assert_eq!(out, *expected);
            assert_eq!(done, *terminated);
        }
    }

    #[test]
    fn exchange_replies_get_clear_causes() {
        assert!(explain_auth_refusal(
            "Authentication failure: unknown user name or bad password.",
            false
        )
        .contains("no permission"));
        assert!(explain_auth_refusal("[AUTH] Authentication failed.", true).contains("expired"));
        assert!(is_protocol_close(
            "Protocol error. Connection is closed. 10"
        ));
        assert!(!is_protocol_close("[AUTH] Authentication failed."));
    }
}
