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
/// come back even when the message is rejected, for the failures table.
pub fn analyze(
    raw: &[u8],
    config: &FormProcessorConfig,
    topics: &[Topic],
) -> (MailInfo, Checked<Accepted>) {
    let mime_limits = MimeLimits {
        max_depth: config.max_mime_depth,
        max_parts: config.max_mime_parts,
    };
    let mail = match mime::parse_mail(raw, &mime_limits) {
        Ok(mail) => mail,
        Err(r) => return (MailInfo::default(), Err(r)),
    };
    let info = MailInfo::from(&mail);
    let result = (|| {
        let topic = route::route(topics, &config.trusted_authserv_ids, &mail)?;
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
    (info, result)
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
}
