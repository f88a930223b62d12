//! The subject router and the trust checks: `SubjectMatcher::from_subject`,
//! `route::find_topic`, `route::sender_allowed`, `sender_auth::parse`,
//! `sender_auth::authenticate` and `route::admit`.
//!
//! Input: text lines — the topic's configured subject (exact or `/regex/`),
//! its senders (comma-separated), the trusted authserv-ids
//! (comma-separated), the mail's subject, its From addresses
//! (comma-separated), its Sender, then the trace headers from the top, one
//! a line: an empty line is a `Received`, any other line an
//! `Authentication-Results` value.
#![no_main]

use common::config::{SubjectMatcher, Topic};
use form_processor::mime::{Mail, TraceHeader};
use form_processor::{route, sender_auth};
use libfuzzer_sys::fuzz_target;

fn list(line: &str) -> Vec<String> {
    line.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let mut next = || lines.next().unwrap_or_default();
    let subject = next().to_string();
    let Ok(matcher) = SubjectMatcher::from_subject(&subject) else {
        return;
    };
    let topics = [Topic {
        subject,
        matcher,
        module: "triContract".into(),
        business_object: "triLeaseAbstract".into(),
        required: Vec::new(),
        unique: Vec::new(),
        senders: list(next()),
        require_authenticated_sender: true,
    }];
    let trusted = list(next());
    let mail_subject = next().to_string();
    let from = list(next());
    let sender = next();
    let mail = Mail {
        subject: mail_subject,
        from,
        sender: (!sender.is_empty()).then(|| sender.to_string()),
        trace: lines
            .map(|l| match l {
                "" => TraceHeader::Received,
                v => TraceHeader::AuthenticationResults(v.to_string()),
            })
            .collect(),
        ..Mail::default()
    };
    let topic = route::find_topic(&topics, &mail.subject);
    for address in mail.from.iter().chain(mail.sender.iter()) {
        let _ = route::sender_allowed(&topics[0].senders, address);
    }
    for header in &mail.trace {
        if let TraceHeader::AuthenticationResults(v) = header {
            let _ = sender_auth::parse(v);
        }
    }
    let _ = sender_auth::authenticate(&mail.trace, &mail.from, &trusted);
    let _ = route::admit(topic, &trusted, &mail);
});
