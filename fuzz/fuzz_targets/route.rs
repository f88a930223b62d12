//! The subject router and the trust checks: `SubjectMatcher::from_subject`,
//! `route::find_topic`, `route::sender_allowed`, `route::authenticated_by`
//! and `route::admit`.
//!
//! Input: text lines — the topic's configured subject (exact or `/regex/`),
//! its senders (comma-separated), the trusted authserv-ids
//! (comma-separated), the mail's subject, its From addresses
//! (comma-separated), its Sender, then one `Authentication-Results` value a
//! line.
#![no_main]

use common::config::{SubjectMatcher, Topic};
use form_processor::mime::Mail;
use form_processor::route;
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
        auth_results: lines.map(str::to_string).collect(),
        ..Mail::default()
    };
    let topic = route::find_topic(&topics, &mail.subject);
    for address in mail.from.iter().chain(mail.sender.iter()) {
        let _ = route::sender_allowed(&topics[0].senders, address);
    }
    for header in &mail.auth_results {
        let _ = route::authenticated_by(header, &trusted);
    }
    let _ = route::admit(topic, &trusted, &mail);
});
