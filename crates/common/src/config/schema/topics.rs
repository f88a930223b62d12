//! `[[topics]]`: the offline forms, how their subjects are matched and who
//! may send them.

use figment::value::Dict;
use serde::Serialize;

use super::incoming_mail::Action;
use crate::config::reader::Walker;

/// `[[topics]]`: one offline form.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Topic {
    /// The subject as configured (exact, or `/regex/`).
    pub subject: String,
    /// How the subject is matched.
    #[serde(skip)]
    pub matcher: SubjectMatcher,
    /// Module of the business object.
    pub module: String,
    /// The business object the form must create.
    pub business_object: String,
    /// Fields that must be present and non-empty.
    pub required: Vec<String>,
    /// Fields whose value must be unique across records of this object.
    pub unique: Vec<String>,
    /// Allowed senders: addresses, `@domain`, or `*`.
    pub senders: Vec<String>,
    /// Require the receiving side to have authenticated the From domain
    /// (`form_processor::sender_auth`; `[form-processor] trusted-authserv-ids`).
    pub require_authenticated_sender: bool,
}

/// How a topic's subject is matched.
#[derive(Debug, Clone)]
pub enum SubjectMatcher {
    /// Case-insensitive exact match (stored lowercased, trimmed).
    Exact(String),
    /// A regular expression (`/…/` in the file).
    Regex(regex::Regex),
}

impl Default for SubjectMatcher {
    fn default() -> Self {
        Self::Exact(String::new())
    }
}

impl SubjectMatcher {
    /// The matcher of a configured subject: `/regex/` (case-insensitive,
    /// compiled within a size limit) or exact text.
    pub fn from_subject(subject: &str) -> Result<Self, regex::Error> {
        if subject.len() >= 2 && subject.starts_with('/') && subject.ends_with('/') {
            regex::RegexBuilder::new(&subject[1..subject.len() - 1])
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map(Self::Regex)
        } else {
            Ok(Self::Exact(subject.trim().to_lowercase()))
        }
    }

    /// True when the subject matches.
    pub fn matches(&self, subject: &str) -> bool {
        match self {
            Self::Exact(s) => subject.trim().to_lowercase() == *s,
            Self::Regex(re) => re.is_match(subject.trim()),
        }
    }
}

/// Reads one `[[topics]]` table at `path`; `None` when it is unusable (its
/// errors are recorded).
pub(super) fn parse(w: &mut Walker, path: &str, t: &Dict) -> Option<Topic> {
    w.unknown_keys(
        t,
        path,
        &[
            "subject",
            "module",
            "business-object",
            "required",
            "unique",
            "senders",
            "require-authenticated-sender",
            "action",
        ],
    );
    let subject = w.string(t, path, "subject").unwrap_or_default();
    let matcher = if subject.trim().is_empty() {
        w.err(
            format!("{path}.subject"),
            "missing: the subject of the form's mails",
        );
        None
    } else {
        match SubjectMatcher::from_subject(&subject) {
            Ok(m) => Some(m),
            Err(e) => {
                w.err(
                    format!("{path}.subject"),
                    format!("invalid regular expression: {e}"),
                );
                None
            }
        }
    };
    let module = w.string(t, path, "module").unwrap_or_default();
    if module.trim().is_empty() {
        w.err(format!("{path}.module"), "missing: e.g. triContract");
    }
    let business_object = w.string(t, path, "business-object").unwrap_or_default();
    if business_object.trim().is_empty() {
        w.err(
            format!("{path}.business-object"),
            "missing: e.g. triLeaseAbstract",
        );
    }
    if let Some(a) = w.string(t, path, "action") {
        if Action::parse(&a).is_none() {
            w.err(
                format!("{path}.action"),
                format!("unsupported action {a:?}: the only action is CREATE"),
            );
        }
    }
    let required = w.string_list(t, path, "required");
    let unique = w.string_list(t, path, "unique");
    let senders = w.string_list(t, path, "senders");
    if senders.is_empty() {
        w.err(
            format!("{path}.senders"),
            "missing: list the addresses or @domains allowed to send this form (\"*\" allows anyone)",
        );
    }
    for (i, s) in senders.iter().enumerate() {
        let ok = s == "*"
            || (s.starts_with('@') && s.len() > 1 && !s[1..].contains('@'))
            || (s.matches('@').count() == 1 && !s.starts_with('@') && !s.ends_with('@'));
        if !ok || s.contains(char::is_whitespace) {
            w.err(
                format!("{path}.senders[{i}]"),
                format!("{s:?} is neither an address, an @domain nor \"*\""),
            );
        }
    }
    let require_authenticated_sender = w.boolean(t, path, "require-authenticated-sender", false);
    Some(Topic {
        subject,
        matcher: matcher?,
        module,
        business_object,
        required,
        unique,
        senders,
        require_authenticated_sender,
    })
}
