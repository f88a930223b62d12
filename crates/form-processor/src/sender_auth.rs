//! Sender authentication for `require-authenticated-sender` (§6, issue 12):
//! which `Authentication-Results` headers (RFC 8601) to believe, and whether
//! what they report authenticates the From domain.
//!
//! Trust is positional first. Every server prepends its trace headers, so
//! anything the sender wrote sits *below* the receiving side's headers. The
//! only candidates are the first group of `Authentication-Results` from the
//! top (after any `Received` headers the receiving side's internal hops
//! added), up to the next `Received`. Within that group a header counts when
//!
//! - it carries an authserv-id listed in `[form-processor]
//!   trusted-authserv-ids` (RFC 8601 §5: that server removes copies of its
//!   id that arrive from outside), or
//! - it carries no authserv-id — Exchange Online's form, `spf=pass (sender IP
//!   is …) smtp.mailfrom=…; dkim=… header.d=…; dmarc=… header.from=…;
//!   compauth=… reason=…` — the list contains `exchange-online`, and a
//!   `Received` header follows the group (Exchange writes it above the
//!   `Received` that records the hop from the sender).
//!
//! `ARC-Authentication-Results` and `Authentication-Results-Original` are
//! other header names and never read.
//!
//! A trusted header authenticates the From domain when it reports
//! `dmarc=pass` or `compauth=pass` with `header.from` equal to that domain,
//! `spf=pass` with `smtp.mailfrom` aligned with it, or `dkim=pass` with
//! `header.d` aligned with it. Alignment is [`aligned`]: equal, or one a
//! subdomain of the other. An explicit `dmarc=fail` or `compauth=fail` in any
//! trusted header overrides every pass. `bestguesspass`, `softpass` and any
//! other result are not a pass.

use crate::mime::TraceHeader;

/// The `trusted-authserv-ids` entry that trusts Exchange Online's id-less
/// header by its position.
pub const EXCHANGE_ONLINE: &str = "exchange-online";

/// What authenticated the sender (for the logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Who reported it: an authserv-id, or `exchange-online`.
    pub by: String,
    /// The method and the domain it vouched for, e.g. `dkim header.d=contoso.com`.
    pub how: String,
}

/// One `method=result` of a header, with its properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResInfo {
    /// The method, lowercased, without its version (`dkim/1` → `dkim`).
    pub method: String,
    /// The result, lowercased.
    pub result: String,
    /// `name=value` pairs after it: `smtp.mailfrom`, `header.d`,
    /// `header.from`, `reason`, Exchange's `action`… Names lowercased.
    pub props: Vec<(String, String)>,
}

impl ResInfo {
    /// The first value of property `name`.
    pub fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One parsed `Authentication-Results` value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthResults {
    /// The authserv-id; `None` in Exchange Online's id-less form.
    pub authserv_id: Option<String>,
    /// Its results, in order.
    pub results: Vec<ResInfo>,
}

/// A lexical item of a header value, comments and whitespace removed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A run of characters other than specials, or a quoted string's content.
    Word(String),
    /// `;`
    Semi,
    /// `=`
    Equals,
}

/// Splits a header value into words, `;` and `=`; comments (nested, with
/// quoted-pairs) and whitespace separate words and are dropped; quoted
/// strings become one word.
fn lex(value: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut chars = value.chars();
    let flush = |word: &mut String, tokens: &mut Vec<Token>| {
        if !word.is_empty() {
            tokens.push(Token::Word(std::mem::take(word)));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '(' => {
                flush(&mut word, &mut tokens);
                let mut depth = 1u32;
                while depth > 0 {
                    match chars.next() {
                        Some('\\') => {
                            chars.next();
                        }
                        Some('(') => depth += 1,
                        Some(')') => depth -= 1,
                        Some(_) => {}
                        None => break,
                    }
                }
            }
            '"' => {
                flush(&mut word, &mut tokens);
                let mut quoted = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => quoted.extend(chars.next()),
                        Some('"') | None => break,
                        Some(c) => quoted.push(c),
                    }
                }
                tokens.push(Token::Word(quoted));
            }
            ';' => {
                flush(&mut word, &mut tokens);
                tokens.push(Token::Semi);
            }
            '=' => {
                flush(&mut word, &mut tokens);
                tokens.push(Token::Equals);
            }
            c if c.is_whitespace() => flush(&mut word, &mut tokens),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut tokens);
    tokens
}

/// Reads one `;`-separated section as a resinfo: `method[/version] = result`
/// then `name = value` pairs. `None` when it does not start that way (`none`,
/// an authserv-id, garbage). Words without `=` are skipped.
fn resinfo(section: &[Token]) -> Option<ResInfo> {
    // The method may be written `dkim/1`, `dkim /1` or `dkim / 1`.
    let eq = section.iter().position(|t| *t == Token::Equals)?;
    let mut method = String::new();
    for t in &section[..eq] {
        match t {
            Token::Word(w) => method.push_str(w),
            _ => return None,
        }
    }
    // Several words before `=` are one method only when split at its `/`.
    if eq > 1 && !method.contains('/') {
        return None;
    }
    let method = method.split('/').next()?.trim().to_ascii_lowercase();
    let Some(Token::Word(result)) = section.get(eq + 1) else {
        return None;
    };
    if method.is_empty() || eq > 3 {
        return None;
    }
    let mut info = ResInfo {
        method,
        result: result.to_ascii_lowercase(),
        props: Vec::new(),
    };
    let rest = &section[eq + 2..];
    let mut i = 0;
    while i < rest.len() {
        match (&rest[i], rest.get(i + 1), rest.get(i + 2)) {
            (Token::Word(name), Some(Token::Equals), Some(Token::Word(value))) => {
                info.props
                    .push((name.to_ascii_lowercase(), value.trim().to_string()));
                i += 3;
            }
            _ => i += 1,
        }
    }
    Some(info)
}

/// Parses one `Authentication-Results` value (RFC 8601, and Exchange
/// Online's form without an authserv-id). Lenient: a section that is not a
/// resinfo is skipped, so it can only lose a result, never invent one.
pub fn parse(value: &str) -> AuthResults {
    let tokens = lex(value);
    let mut sections = tokens.split(|t| *t == Token::Semi);
    let mut out = AuthResults::default();
    let Some(first) = sections.next() else {
        return out;
    };
    // An authserv-id is a token or quoted string, never followed by `=`; a
    // first section with `=` is already a resinfo (Exchange's form).
    if first.contains(&Token::Equals) {
        out.results.extend(resinfo(first));
    } else if let Some(Token::Word(id)) = first.first() {
        out.authserv_id = Some(id.to_ascii_lowercase());
    }
    out.results.extend(sections.filter_map(resinfo));
    out
}

/// The domain of an address or domain value (`user@Contoso.COM.` →
/// `contoso.com`), lowercased, without angle brackets or a final dot.
pub fn domain_of(value: &str) -> String {
    let v = value.trim().trim_start_matches('<').trim_end_matches('>');
    let d = v.rsplit_once('@').map_or(v, |(_, d)| d);
    d.trim().trim_end_matches('.').to_lowercase()
}

/// Relaxed alignment without the Public Suffix List: the two domains are
/// equal, or one is a subdomain of the other (`bounce.contoso.com` and
/// `contoso.com`). Sibling subdomains (`a.contoso.com`, `b.contoso.com`) do
/// not align — stricter than DMARC's organisational domain, which needs the
/// list. A single-label domain aligns with nothing but itself.
pub fn aligned(a: &str, b: &str) -> bool {
    let (a, b) = (domain_of(a), domain_of(b));
    if a.is_empty() || b.is_empty() || !a.contains('.') || !b.contains('.') {
        return false;
    }
    a == b || a.ends_with(&format!(".{b}")) || b.ends_with(&format!(".{a}"))
}

/// The candidate headers: the first group of `Authentication-Results` from
/// the top, and whether a `Received` follows it.
fn topmost_group(trace: &[TraceHeader]) -> (Vec<&str>, bool) {
    let mut group = Vec::new();
    let mut iter = trace
        .iter()
        .skip_while(|h| matches!(h, TraceHeader::Received));
    for h in iter.by_ref() {
        match h {
            TraceHeader::AuthenticationResults(v) => group.push(v.as_str()),
            TraceHeader::Received => return (group, true),
        }
    }
    (group, false)
}

/// Checks that the receiving side authenticated every From domain. `Err`
/// says why not, in terms an operator can check against the headers.
pub fn authenticate(
    trace: &[TraceHeader],
    from: &[String],
    trusted_ids: &[String],
) -> Result<Pass, String> {
    let exchange = trusted_ids
        .iter()
        .any(|t| t.trim().eq_ignore_ascii_case(EXCHANGE_ONLINE));
    let (group, received_below) = topmost_group(trace);
    if group.is_empty() {
        return Err("the mail has no Authentication-Results header".into());
    }
    let mut trusted: Vec<(String, AuthResults)> = Vec::new();
    let mut distrusted = Vec::new();
    for value in group {
        let header = parse(value);
        match &header.authserv_id {
            Some(id)
                if !id.eq_ignore_ascii_case(EXCHANGE_ONLINE)
                    && trusted_ids
                        .iter()
                        .any(|t| t.trim().eq_ignore_ascii_case(id)) =>
            {
                trusted.push((id.clone(), header));
            }
            Some(id) => distrusted.push(format!("authserv-id {id:?} is not trusted")),
            None if exchange && received_below => {
                trusted.push((EXCHANGE_ONLINE.to_string(), header));
            }
            None if exchange => distrusted
                .push("an id-less (Exchange Online) header with no Received below it".into()),
            None => distrusted.push(format!(
                "an id-less (Exchange Online) header, and {EXCHANGE_ONLINE:?} is not trusted"
            )),
        }
    }
    if trusted.is_empty() {
        return Err(format!(
            "no trusted Authentication-Results in the topmost block: {}",
            distrusted.join("; ")
        ));
    }
    for (by, header) in &trusted {
        if let Some(r) = header
            .results
            .iter()
            .find(|r| (r.method == "dmarc" || r.method == "compauth") && r.result == "fail")
        {
            return Err(format!("{by} reports {}=fail", r.method));
        }
    }
    let mut pass = None;
    for address in from {
        let domain = domain_of(address);
        match trusted
            .iter()
            .find_map(|(by, h)| vouches(h, &domain).map(|how| (by, how)))
        {
            Some((by, how)) => {
                pass.get_or_insert(Pass {
                    by: by.clone(),
                    how,
                });
            }
            None => {
                let seen: Vec<String> = trusted
                    .iter()
                    .flat_map(|(by, h)| h.results.iter().map(move |r| summary(by, r)))
                    .collect();
                return Err(format!(
                    "nothing trusted authenticates the From domain {domain:?}: {}",
                    if seen.is_empty() {
                        "no results".to_string()
                    } else {
                        seen.join(", ")
                    }
                ));
            }
        }
    }
    pass.ok_or_else(|| "the mail has no From address".into())
}

/// How `header` vouches for `domain`, if it does.
fn vouches(header: &AuthResults, domain: &str) -> Option<String> {
    let header_from = header
        .results
        .iter()
        .find_map(|r| r.prop("header.from"))
        .map(domain_of);
    for r in header.results.iter().filter(|r| r.result == "pass") {
        let how = match r.method.as_str() {
            "dmarc" | "compauth" => r
                .prop("header.from")
                .map(domain_of)
                .or_else(|| header_from.clone())
                .filter(|d| d == domain)
                .map(|d| format!("{}=pass header.from={d}", r.method)),
            "spf" => r
                .prop("smtp.mailfrom")
                .filter(|d| aligned(d, domain))
                .map(|d| format!("spf=pass smtp.mailfrom={}", domain_of(d))),
            "dkim" => r
                .prop("header.d")
                .filter(|d| aligned(d, domain))
                .map(|d| format!("dkim=pass header.d={}", domain_of(d))),
            _ => None,
        };
        if how.is_some() {
            return how;
        }
    }
    None
}

/// `by: method=result name=domain` for a rejection's detail.
fn summary(by: &str, r: &ResInfo) -> String {
    let key = match r.method.as_str() {
        "spf" => "smtp.mailfrom",
        "dkim" => "header.d",
        _ => "header.from",
    };
    match r.prop(key) {
        Some(v) => format!("{by}: {}={} {key}={}", r.method, r.result, domain_of(v)),
        None => format!("{by}: {}={}", r.method, r.result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TraceHeader::{AuthenticationResults as Ar, Received};

    /// Exchange Online's header for mail from contoso.com that passed
    /// everything (a real sample, IP and reason as Exchange writes them).
    const EXO_PASS: &str = "spf=pass (sender IP is 40.107.22.54) smtp.mailfrom=contoso.com; dkim=pass (signature was verified) header.d=contoso.com;dmarc=pass action=none header.from=contoso.com;compauth=pass reason=100";

    fn ar(v: &str) -> TraceHeader {
        Ar(v.to_string())
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_rfc_8601_and_exchange_forms() {
        let h = parse(EXO_PASS);
        assert_eq!(h.authserv_id, None);
        let got: Vec<_> = h
            .results
            .iter()
            .map(|r| (r.method.as_str(), r.result.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("spf", "pass"),
                ("dkim", "pass"),
                ("dmarc", "pass"),
                ("compauth", "pass")
            ]
        );
        assert_eq!(h.results[0].prop("smtp.mailfrom"), Some("contoso.com"));
        assert_eq!(h.results[2].prop("header.from"), Some("contoso.com"));
        assert_eq!(h.results[3].prop("reason"), Some("100"));

        let h = parse(
            "mx.contoso.com 1 (comment; with = specials);dkim/1 = pass (2048-bit key; \"unprotected\") header.d=\"contoso.com\" header.s=sel1;spf=pass smtp.mailfrom=\"ann@contoso.com\"",
        );
        assert_eq!(h.authserv_id.as_deref(), Some("mx.contoso.com"));
        assert_eq!(h.results.len(), 2);
        assert_eq!(h.results[0].method, "dkim");
        assert_eq!(h.results[0].prop("header.d"), Some("contoso.com"));
        assert_eq!(h.results[1].prop("smtp.mailfrom"), Some("ann@contoso.com"));

        assert_eq!(parse("mx.contoso.com; none").results, vec![]);
        assert_eq!(parse("").authserv_id, None);
        assert_eq!(parse("(unclosed").results, vec![]);
        assert_eq!(parse("\"unclosed").authserv_id.as_deref(), Some("unclosed"));
        // A comment cannot smuggle a result in.
        assert_eq!(
            parse("mx.contoso.com; spf=fail (dmarc=pass)").results.len(),
            1
        );
    }

    #[test]
    fn alignment_table() {
        let cases = [
            ("contoso.com", "contoso.com", true),
            ("Contoso.COM.", "contoso.com", true),
            ("bounce.contoso.com", "contoso.com", true),
            ("contoso.com", "sales.contoso.com", true),
            ("ann@bounce.contoso.com", "contoso.com", true),
            ("a.contoso.com", "b.contoso.com", false),
            ("evilcontoso.com", "contoso.com", false),
            ("contoso.com.evil.net", "contoso.com", false),
            ("com", "contoso.com", false),
            ("", "contoso.com", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(aligned(a, b), want, "{a} vs {b}");
        }
    }

    /// (name, trace from the top, trusted ids, From addresses, passes?)
    type Case<'a> = (&'a str, Vec<TraceHeader>, &'a Vec<String>, &'a str, bool);

    #[test]
    fn sender_authentication_table() {
        let exo = ids(&["exchange-online"]);
        let mx = ids(&["mx.contoso.com"]);
        let both = ids(&["mx.contoso.com", "Exchange-Online"]);
        let cases: Vec<Case<'_>> = vec![
            (
                "genuine Exchange Online pass, internal hops above",
                vec![Received, Received, ar(EXO_PASS), Received],
                &exo,
                "ann@contoso.com",
                true,
            ),
            (
                "forged pass below Exchange's fail",
                vec![
                    Received,
                    ar("spf=fail (sender IP is 203.0.113.7) smtp.mailfrom=contoso.com; dkim=none (message not signed) header.d=none;dmarc=fail action=oreject header.from=contoso.com;compauth=fail reason=000"),
                    Received,
                    ar(EXO_PASS),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                false,
            ),
            (
                "forged pass below Exchange's none",
                vec![
                    ar("spf=none (sender IP is 203.0.113.7) smtp.mailfrom=evil.example; dkim=none (message not signed) header.d=none;dmarc=none action=none header.from=contoso.com;compauth=none reason=905"),
                    Received,
                    ar(EXO_PASS),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                false,
            ),
            (
                "unaligned SPF pass",
                vec![
                    ar("spf=pass (sender IP is 203.0.113.7) smtp.mailfrom=mailer.evil.example; dkim=none (message not signed) header.d=none;dmarc=none action=none header.from=contoso.com"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                false,
            ),
            (
                "aligned DKIM pass, SPF through a forwarder",
                vec![
                    ar("spf=fail (sender IP is 198.51.100.9) smtp.mailfrom=lists.fabrikam.com; dkim=pass (signature was verified) header.d=contoso.com;dmarc=none action=none header.from=contoso.com"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                true,
            ),
            (
                "aligned SPF pass from a bounce subdomain",
                vec![
                    ar("spf=pass (sender IP is 40.107.22.54) smtp.mailfrom=bounce.contoso.com; dkim=none (message not signed) header.d=none;dmarc=none action=none header.from=contoso.com"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                true,
            ),
            (
                "dmarc fail overrides an aligned SPF pass",
                vec![
                    ar("spf=pass (sender IP is 40.107.22.54) smtp.mailfrom=contoso.com; dkim=fail (body hash did not verify) header.d=contoso.com;dmarc=fail action=quarantine header.from=contoso.com;compauth=fail reason=000"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                false,
            ),
            (
                "bestguesspass does not count",
                vec![
                    ar("spf=none (sender IP is 203.0.113.7) smtp.mailfrom=contoso.com; dkim=none (message not signed) header.d=none;dmarc=bestguesspass action=none header.from=contoso.com;compauth=softpass reason=201"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                false,
            ),
            (
                "compauth=pass for another From domain",
                vec![
                    ar("spf=none smtp.mailfrom=fabrikam.com;dmarc=none action=none header.from=fabrikam.com;compauth=pass reason=109"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                false,
            ),
            (
                "compauth=pass for the From domain",
                vec![
                    ar("spf=none (sender IP is 203.0.113.7) smtp.mailfrom=contoso.com; dkim=none (message not signed) header.d=none;dmarc=none action=none header.from=contoso.com;compauth=pass reason=109"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                true,
            ),
            (
                "Exchange header not trusted unless exchange-online is listed",
                vec![ar(EXO_PASS), Received],
                &mx,
                "ann@contoso.com",
                false,
            ),
            (
                "Exchange header with no Received below it",
                vec![Received, ar(EXO_PASS)],
                &exo,
                "ann@contoso.com",
                false,
            ),
            (
                "id-bearing header from a configured authserv-id",
                vec![
                    Received,
                    ar("mx.contoso.com; spf=pass smtp.mailfrom=contoso.com; dkim=none"),
                    Received,
                ],
                &mx,
                "ann@contoso.com",
                true,
            ),
            (
                "id-bearing header from an unknown authserv-id",
                vec![
                    ar("mx.evil.example; dmarc=pass header.from=contoso.com"),
                    Received,
                ],
                &mx,
                "ann@contoso.com",
                false,
            ),
            (
                "the literal id exchange-online is not Exchange",
                vec![ar("exchange-online; dmarc=pass header.from=contoso.com")],
                &both,
                "ann@contoso.com",
                false,
            ),
            (
                "configured id above the Received",
                vec![
                    ar("mx.contoso.com; dmarc=pass header.from=contoso.com"),
                    Received,
                    ar("mx.contoso.com; dmarc=fail header.from=contoso.com"),
                ],
                &mx,
                "ann@contoso.com",
                true,
            ),
            (
                "configured id only below the Received",
                vec![
                    ar("mx.evil.example; none"),
                    Received,
                    ar("mx.contoso.com; dmarc=pass header.from=contoso.com"),
                ],
                &mx,
                "ann@contoso.com",
                false,
            ),
            (
                "both trusted in one block, one passes",
                vec![
                    ar("mx.contoso.com; spf=neutral smtp.mailfrom=contoso.com"),
                    ar(EXO_PASS),
                    Received,
                ],
                &both,
                "ann@contoso.com",
                true,
            ),
            (
                "no Authentication-Results at all",
                vec![Received, Received],
                &both,
                "ann@contoso.com",
                false,
            ),
            (
                "every From domain must pass",
                vec![ar(EXO_PASS), Received],
                &exo,
                "ann@contoso.com,eve@evil.example",
                false,
            ),
            (
                "missing spaces and odd case",
                vec![
                    ar("SPF=Pass smtp.mailfrom=Contoso.Com;DKIM=none;DMARC=Pass action=none header.from=Contoso.Com"),
                    Received,
                ],
                &exo,
                "ann@contoso.com",
                true,
            ),
        ];
        for (name, trace, trusted, from, want) in cases {
            let from: Vec<String> = from.split(',').map(str::to_string).collect();
            let got = authenticate(&trace, &from, trusted);
            assert_eq!(got.is_ok(), want, "{name}: {got:?}");
        }
    }

    #[test]
    fn a_rejection_says_why() {
        let exo = ids(&["exchange-online"]);
        let unaligned = [
            ar("spf=pass (sender IP is 203.0.113.7) smtp.mailfrom=evil.example;dmarc=none action=none header.from=contoso.com"),
            Received,
        ];
        let err = authenticate(&unaligned, &ids(&["ann@contoso.com"]), &exo).unwrap_err();
        assert!(
            err.contains("\"contoso.com\"") && err.contains("spf=pass smtp.mailfrom=evil.example"),
            "{err}"
        );
        let err = authenticate(
            &[ar("mx.evil.example; dmarc=pass header.from=contoso.com")],
            &ids(&["ann@contoso.com"]),
            &exo,
        )
        .unwrap_err();
        assert!(err.contains("\"mx.evil.example\" is not trusted"), "{err}");
        let pass = authenticate(&[ar(EXO_PASS), Received], &ids(&["ann@contoso.com"]), &exo);
        assert_eq!(
            pass,
            Ok(Pass {
                by: "exchange-online".into(),
                how: "spf=pass smtp.mailfrom=contoso.com".into()
            })
        );
    }
}
