//! From raw mail bytes to a validated form (§6), as one pure, synchronous
//! function: parse the MIME, route, check the sender, read the one workbook,
//! validate against the topic. The store's checks (dedupe, unique values)
//! come after.

use common::config::{FormProcessorConfig, Topic};

use crate::mime::{self, Mail, MimeLimits};
use crate::objectmap::Form;
use crate::reject::{Checked, Reason, Rejection};
use crate::route;
use crate::store::{NewRecord, Source};
use crate::workbook::{self, Limits};

/// What the mail says about itself, kept with a record or a rejection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailInfo {
    /// Subject.
    pub subject: String,
    /// First From address (or empty).
    pub sender: String,
    /// Message-ID header.
    pub message_id: Option<String>,
    /// Date header, epoch seconds.
    pub date: Option<i64>,
}

impl From<&Mail> for MailInfo {
    fn from(m: &Mail) -> Self {
        Self {
            subject: m.subject.clone(),
            sender: m.from.first().cloned().unwrap_or_default(),
            message_id: m.message_id.clone(),
            date: m.date,
        }
    }
}

/// A form that passed every check that does not need the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The topic's configured subject.
    pub topic: String,
    /// The form's record.
    pub form: Form,
    /// (field, canonical value) of the topic's unique fields that are present.
    pub unique: Vec<(String, String)>,
}

impl Accepted {
    /// The record to create for this form, from `source`.
    pub fn into_record(self, source: Source) -> NewRecord {
        NewRecord {
            topic: self.topic,
            form: self.form,
            unique: self.unique,
            source,
        }
    }
}

/// What the checks found: the mail's own details and the topic its subject
/// names (both kept with a rejection too), and the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// What the mail says about itself (empty when it could not be parsed).
    pub info: MailInfo,
    /// The configured subject of the topic the mail's subject names, if any.
    pub topic: Option<String>,
    /// The accepted form, or why the message is rejected.
    pub result: Checked<Accepted>,
}

/// Checks a form against its topic: business object, action, required fields.
pub fn validate(topic: &Topic, form: Form) -> Checked<Accepted> {
    if form.module != topic.module || form.business_object != topic.business_object {
        return Err(Rejection::new(
            Reason::WrongBusinessObject,
            format!(
                "the form creates {}/{}, topic {:?} expects {}/{}",
                form.module,
                form.business_object,
                topic.subject,
                topic.module,
                topic.business_object
            ),
        ));
    }
    if let Some(action) = &form.action {
        if !action.eq_ignore_ascii_case("CREATE") {
            return Err(Rejection::new(
                Reason::UnsupportedAction,
                format!("the form asks for action {action:?}; only CREATE is supported"),
            ));
        }
    }
    for name in &topic.required {
        match form.field(name) {
            Some(v) if !v.is_blank() => {}
            _ => {
                return Err(Rejection::new(
                    Reason::RequiredFieldEmpty,
                    format!("required field {name} is empty"),
                ))
            }
        }
    }
    let unique = topic
        .unique
        .iter()
        .filter_map(|name| form.field(name).map(|v| (name.clone(), v.canonical())))
        .collect();
    Ok(Accepted {
        topic: topic.subject.clone(),
        form,
        unique,
    })
}

/// Runs every check that needs only the message. The mail's own details
/// and its topic come back even when the message is rejected, for the
/// failures table.
pub fn analyze(raw: &[u8], config: &FormProcessorConfig, topics: &[Topic]) -> Analysis {
    let mime_limits = MimeLimits {
        max_depth: config.max_mime_depth,
        max_parts: config.max_mime_parts,
    };
    let mail = match mime::parse_mail(raw, &mime_limits) {
        Ok(mail) => mail,
        Err(r) => {
            return Analysis {
                info: MailInfo::default(),
                topic: None,
                result: Err(r),
            }
        }
    };
    let topic = route::find_topic(topics, &mail.subject);
    let result = (|| {
        let topic = route::admit(topic, &config.trusted_authserv_ids, &mail)?;
        let attachment = match mail.workbooks.as_slice() {
            [] => {
                return Err(Rejection::new(
                    Reason::NoWorkbook,
                    "the mail has no .xlsx attachment",
                ))
            }
            [one] => one,
            more => {
                return Err(Rejection::new(
                    Reason::SeveralWorkbooks,
                    format!(
                        "the mail has {} .xlsx attachments; exactly one is expected",
                        more.len()
                    ),
                ))
            }
        };
        let form = workbook::read_form(&attachment.bytes, &Limits::from(config))?;
        validate(topic, form)
    })();
    Analysis {
        info: MailInfo::from(&mail),
        topic: topic.map(|t| t.subject.clone()),
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;
    use common::config::SubjectMatcher;

    fn topic() -> Topic {
        Topic {
            subject: "LEASE".into(),
            matcher: SubjectMatcher::Exact("lease".into()),
            module: "triContract".into(),
            business_object: "triLeaseAbstract".into(),
            required: vec!["id".into()],
            unique: vec!["id".into()],
            senders: vec!["*".into()],
            require_authenticated_sender: false,
        }
    }

    fn form(bo: &str, action: Option<&str>, id: Option<Value>) -> Form {
        Form {
            module: "triContract".into(),
            business_object: bo.into(),
            action: action.map(str::to_string),
            fields: id.map(|v| vec![("id".to_string(), v)]).unwrap_or_default(),
            children: vec![],
        }
    }

    #[test]
    fn validation_table() {
        let id = || Some(Value::Text(" L-1 ".into()));
        let cases = [
            (form("triLeaseAbstract", None, id()), None),
            (form("triLeaseAbstract", Some("create"), id()), None),
            (
                form("triBuilding", None, id()),
                Some(Reason::WrongBusinessObject),
            ),
            (
                form("triLeaseAbstract", Some("DELETE"), id()),
                Some(Reason::UnsupportedAction),
            ),
            (
                form("triLeaseAbstract", None, None),
                Some(Reason::RequiredFieldEmpty),
            ),
            (
                form("triLeaseAbstract", None, Some(Value::Text("   ".into()))),
                Some(Reason::RequiredFieldEmpty),
            ),
        ];
        for (f, want) in cases {
            let got = validate(&topic(), f.clone());
            match want {
                None => assert_eq!(
                    got.unwrap().unique,
                    vec![("id".to_string(), "L-1".to_string())]
                ),
                Some(r) => assert_eq!(got.unwrap_err().reason, r, "{f:?}"),
            }
        }
    }

    fn config() -> FormProcessorConfig {
        FormProcessorConfig {
            store: common::secret::SecretUrl::new("sqlite::memory:"),
            prefetch: 1,
            delivery_limit: 5,
            trusted_authserv_ids: vec![],
            max_workbook_bytes: 1 << 20,
            max_decompressed_bytes: 1 << 20,
            max_sheets: 10,
            max_rows: 100,
            max_cells: 1000,
            max_mime_depth: 10,
            max_mime_parts: 10,
            sqlite_synchronous: Default::default(),
        }
    }

    #[test]
    fn a_rejection_keeps_the_topic_its_subject_named() {
        let mut allow_one = topic();
        allow_one.senders = vec!["@contoso.com".into()];
        let cases = [
            (
                "ann@contoso.com",
                "lease",
                Some("LEASE"),
                Reason::NoWorkbook,
            ),
            (
                "eve@evil.com",
                "lease",
                Some("LEASE"),
                Reason::SenderNotAllowed,
            ),
            ("ann@contoso.com", "other", None, Reason::NoTopic),
        ];
        for (from, subject, want, reason) in cases {
            let raw = format!("From: {from}\r\nSubject: {subject}\r\n\r\nno attachment\r\n");
            let analysis = analyze(raw.as_bytes(), &config(), std::slice::from_ref(&allow_one));
            assert_eq!(analysis.topic.as_deref(), want, "{subject} from {from}");
            assert_eq!(analysis.info.subject, subject);
            assert_eq!(
                analysis.result.unwrap_err().reason,
                reason,
                "{subject} from {from}"
            );
        }
    }
}
