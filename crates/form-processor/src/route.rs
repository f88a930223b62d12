//! Routing and trust (§6): which topic a subject names, whether the sender
//! may submit it, and whether a trusted server authenticated the sender
//! ([`crate::sender_auth`]).

use common::config::Topic;
use tracing::debug;

use crate::mime::Mail;
use crate::reject::{Checked, Reason, Rejection};
use crate::sender_auth;

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
    if topic.require_authenticated_sender {
        match sender_auth::authenticate(&mail.trace, &mail.from, trusted) {
            Ok(pass) => debug!(by = %pass.by, how = %pass.how, "sender authenticated"),
            Err(why) => return Err(Rejection::new(Reason::UnauthenticatedSender, why)),
        }
    }
    Ok(topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mime::TraceHeader;
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
            trace: auth
                .iter()
                .map(|s| TraceHeader::AuthenticationResults(s.to_string()))
                .collect(),
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
            (
                mail(
                    "PAY-12",
                    "a@contoso.com",
                    None,
                    &["mx.contoso.com; spf=pass smtp.mailfrom=evil.com"],
                ),
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
                &["mx.contoso.com; spf=pass smtp.mailfrom=contoso.com"]
            )
        )
        .is_ok());
    }
}
