//! Routing and trust (§6): which topic a subject names, whether the sender
//! may submit it, and whether a trusted server authenticated the sender.

use common::config::Topic;

use crate::mime::Mail;
use crate::reject::{Checked, Reason, Rejection};

/// The first topic whose subject matches (case-insensitive exact, or regex).
pub fn find_topic<'a>(topics: &'a [Topic], subject: &str) -> Option<&'a Topic> {
    topics.iter().find(|t| t.matcher.matches(subject))
}

/// True when `address` is allowed by an allow-list of addresses, `@domain`
/// entries and `*`.
pub fn sender_allowed(allow: &[String], address: &str) -> bool {
    let address = address.trim().to_lowercase();
    let domain = address.rsplit_once('@').map(|(_, d)| d);
    allow.iter().any(|entry| {
        let entry = entry.trim().to_lowercase();
        if entry == "*" {
            true
        } else if let Some(d) = entry.strip_prefix('@') {
            domain == Some(d)
        } else {
            entry == address
        }
    })
}

/// Removes RFC 5322 comments (`(…)`, possibly nested) from a header value.
fn strip_comments(s: &str) -> String {
    let mut depth = 0u32;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// True when one `Authentication-Results` value (RFC 8601) comes from a
/// trusted authserv-id and reports `dmarc=pass` or `spf=pass`.
pub fn authenticated_by(header: &str, trusted: &[String]) -> bool {
    let value = strip_comments(header);
    let mut sections = value.split(';');
    let Some(id) = sections.next().and_then(|s| s.split_whitespace().next()) else {
        return false;
    };
    if !trusted.iter().any(|t| t.eq_ignore_ascii_case(id)) {
        return false;
    }
    sections.any(|resinfo| {
        let Some(first) = resinfo.split_whitespace().next() else {
            return false;
        };
        let Some((method, result)) = first.split_once('=') else {
            return false;
        };
        let method = method.trim().to_ascii_lowercase();
        let method = method.split('/').next().unwrap_or_default();
        (method == "dmarc" || method == "spf") && result.trim().eq_ignore_ascii_case("pass")
    })
}

/// Checks the topic the subject named ([`find_topic`]) and the sender, per
/// the topic's settings: the topic when the mail may submit it.
pub fn admit<'a>(topic: Option<&'a Topic>, trusted: &[String], mail: &Mail) -> Checked<&'a Topic> {
    let topic = topic.ok_or_else(|| {
        Rejection::new(
            Reason::NoTopic,
            format!("no topic matches the subject {:?}", mail.subject),
        )
    })?;
    if mail.from.is_empty() {
        return Err(Rejection::new(
            Reason::SenderNotAllowed,
            "the mail has no From address",
        ));
    }
    for address in mail.from.iter().chain(mail.sender.iter()) {
        if !sender_allowed(&topic.senders, address) {
            return Err(Rejection::new(
                Reason::SenderNotAllowed,
                format!("{address} may not submit {:?}", topic.subject),
            ));
        }
    }
    if topic.require_authenticated_sender
        && !mail
            .auth_results
            .iter()
            .any(|h| authenticated_by(h, trusted))
    {
        return Err(Rejection::new(
            Reason::UnauthenticatedSender,
            "no Authentication-Results from a trusted server reports dmarc=pass or spf=pass",
        ));
    }
    Ok(topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::config::SubjectMatcher;

    fn topic(subject: &str, matcher: SubjectMatcher, senders: &[&str], auth: bool) -> Topic {
        Topic {
            subject: subject.into(),
            matcher,
            module: "triContract".into(),
            business_object: "triLeaseAbstract".into(),
            required: vec![],
            unique: vec![],
            senders: senders.iter().map(|s| s.to_string()).collect(),
            require_authenticated_sender: auth,
        }
    }

    #[test]
    fn sender_allow_list_table() {
        let allow = vec!["@contoso.com".to_string(), "Boss@Fabrikam.com".to_string()];
        let cases = [
            ("ann@contoso.com", true),
            ("ANN@CONTOSO.COM", true),
            ("ann@evil-contoso.com", false),
            ("ann@sub.contoso.com", false),
            ("boss@fabrikam.com", true),
            ("other@fabrikam.com", false),
            ("contoso.com", false),
        ];
        for (addr, want) in cases {
            assert_eq!(sender_allowed(&allow, addr), want, "{addr}");
        }
        assert!(sender_allowed(&["*".to_string()], "anyone@anywhere"));
    }

    #[test]
    fn authentication_results_table() {
        let trusted = vec!["mx.contoso.com".to_string()];
        let cases = [
            ("mx.contoso.com; spf=pass smtp.mailfrom=contoso.com", true),
            (
                "MX.Contoso.com 1; dkim=fail; dmarc=pass action=none header.from=contoso.com",
                true,
            ),
            ("mx.contoso.com; spf=fail; dmarc=fail", false),
            (
                "mx.contoso.com; spf=softfail (sender says spf=pass) smtp.mailfrom=x",
                false,
            ),
            ("evil.example; spf=pass", false),
            ("mx.contoso.com (comment); dmarc=pass", true),
            ("mx.contoso.com; none", false),
            ("", false),
        ];
        for (header, want) in cases {
            assert_eq!(authenticated_by(header, &trusted), want, "{header}");
        }
    }

    #[test]
    fn routing_checks_topic_sender_and_authentication() {
        let topics = vec![
            topic(
                "LEASE ABSTRACT FORM",
                SubjectMatcher::Exact("lease abstract form".into()),
                &["@contoso.com"],
                false,
            ),
            topic(
                "/^PAY-\\d+$/",
                SubjectMatcher::Regex(regex::Regex::new("^PAY-\\d+$").unwrap()),
                &["@contoso.com"],
                true,
            ),
        ];
        let trusted = vec!["mx.contoso.com".to_string()];
        let route = |topics: &[Topic], trusted: &[String], mail: &Mail| {
            admit(find_topic(topics, &mail.subject), trusted, mail).map(|t| t.subject.clone())
        };
        let mail = |subject: &str, from: &str, sender: Option<&str>, auth: &[&str]| Mail {
            subject: subject.into(),
            from: vec![from.into()],
            sender: sender.map(str::to_string),
            auth_results: auth.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let ok = route(
            &topics,
            &trusted,
            &mail("lease abstract form", "a@contoso.com", None, &[]),
        )
        .unwrap();
        assert_eq!(ok, "LEASE ABSTRACT FORM");
        let cases = [
            (
                mail("something else", "a@contoso.com", None, &[]),
                Reason::NoTopic,
            ),
            (
                mail("Lease Abstract Form", "a@evil.com", None, &[]),
                Reason::SenderNotAllowed,
            ),
            (
                mail(
                    "Lease Abstract Form",
                    "a@contoso.com",
                    Some("x@evil.com"),
                    &[],
                ),
                Reason::SenderNotAllowed,
            ),
            (
                mail("PAY-12", "a@contoso.com", None, &[]),
                Reason::UnauthenticatedSender,
            ),
            (
                mail("PAY-12", "a@contoso.com", None, &["evil; spf=pass"]),
                Reason::UnauthenticatedSender,
            ),
        ];
        for (m, want) in cases {
            assert_eq!(
                route(&topics, &trusted, &m).unwrap_err().reason,
                want,
                "{m:?}"
            );
        }
        assert!(route(
            &topics,
            &trusted,
            &mail(
                "PAY-12",
                "a@contoso.com",
                None,
                &["mx.contoso.com; spf=pass"]
            )
        )
        .is_ok());
    }
}
