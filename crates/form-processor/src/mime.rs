//! The mail itself (§6): parsed with mail-parser within nesting and part
//! limits, reduced to what the CREATE action needs — subject, senders, the
//! trace headers (`Received`, `Authentication-Results`) in order, and the
//! `.xlsx` attachments.

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};

use crate::reject::{Checked, Reason, Rejection};

/// The xlsx media type.
pub const XLSX_TYPE: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

/// MIME guard-rail limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MimeLimits {
    /// Deepest nesting (the top-level part is depth 1).
    pub max_depth: u32,
    /// Most parts, nested messages included.
    pub max_parts: u32,
}

/// A workbook attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its file name, when given.
    pub name: Option<String>,
    /// The decoded bytes.
    pub bytes: Vec<u8>,
}

/// A top-level trace header, as [`crate::sender_auth`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceHeader {
    /// A `Received` header (its content is not needed, only its position).
    Received,
    /// An `Authentication-Results` value, whitespace runs folded to one
    /// space. (`ARC-Authentication-Results` and
    /// `Authentication-Results-Original` are not kept.)
    AuthenticationResults(String),
}

/// What the processor needs from a mail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mail {
    /// The subject (empty when absent).
    pub subject: String,
    /// Every From address, lowercased.
    pub from: Vec<String>,
    /// The Sender address, lowercased, when present.
    pub sender: Option<String>,
    /// The Message-ID, when present.
    pub message_id: Option<String>,
    /// The Date header, seconds since the epoch.
    pub date: Option<i64>,
    /// The top-level `Received` and `Authentication-Results` headers, in
    /// order from the top.
    pub trace: Vec<TraceHeader>,
    /// The `.xlsx` attachments.
    pub workbooks: Vec<Attachment>,
}

fn address_list(addr: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    addr.map(|a| {
        a.clone()
            .into_list()
            .into_iter()
            .filter_map(|x| x.address.map(|s| s.trim().to_lowercase()))
            .filter(|s| !s.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

fn is_workbook(part: &mail_parser::MessagePart<'_>) -> bool {
    if matches!(part.body, PartType::Multipart(_) | PartType::Message(_)) {
        return false;
    }
    let by_type = part.content_type().is_some_and(|ct| {
        ct.ctype().eq_ignore_ascii_case("application")
            && ct.subtype().is_some_and(|s| {
                s.eq_ignore_ascii_case("vnd.openxmlformats-officedocument.spreadsheetml.sheet")
            })
    });
    let by_name = part
        .attachment_name()
        .is_some_and(|n| n.trim().to_ascii_lowercase().ends_with(".xlsx"));
    by_type || by_name
}

/// Walks every part (nested messages too) without recursion, enforcing the
/// limits, and collects the workbooks.
fn walk(message: &Message<'_>, limits: &MimeLimits) -> Checked<Vec<Attachment>> {
    let mut workbooks = Vec::new();
    let mut parts: u32 = 0;
    // (message, part index, depth)
    let mut stack: Vec<(&Message<'_>, usize, u32)> = vec![(message, 0, 1)];
    while let Some((msg, idx, depth)) = stack.pop() {
        if depth > limits.max_depth {
            return Err(Rejection::new(
                Reason::MimeTooDeep,
                format!(
                    "MIME parts are nested deeper than the limit of {}",
                    limits.max_depth
                ),
            ));
        }
        parts += 1;
        if parts > limits.max_parts {
            return Err(Rejection::new(
                Reason::TooManyParts,
                format!("the mail has more than {} MIME parts", limits.max_parts),
            ));
        }
        let Some(part) = msg.parts.get(idx) else {
            continue;
        };
        match &part.body {
            PartType::Multipart(children) => {
                for child in children.iter().rev() {
                    stack.push((msg, *child as usize, depth + 1));
                }
            }
            PartType::Message(inner) => stack.push((inner, 0, depth + 1)),
            _ if is_workbook(part) => workbooks.push(Attachment {
                name: part.attachment_name().map(str::to_string),
                bytes: part.contents().to_vec(),
            }),
            _ => {}
        }
    }
    Ok(workbooks)
}

/// Parses a raw RFC 5322 message.
pub fn parse_mail(raw: &[u8], limits: &MimeLimits) -> Checked<Mail> {
    let message = MessageParser::default().parse(raw).ok_or_else(|| {
        Rejection::new(
            Reason::UnparseableMail,
            "the message cannot be parsed as RFC 5322",
        )
    })?;
    let workbooks = walk(&message, limits)?;
    let trace = message
        .headers_raw()
        .filter_map(|(name, value)| {
            if name.eq_ignore_ascii_case("Received") {
                Some(TraceHeader::Received)
            } else if name.eq_ignore_ascii_case("Authentication-Results") {
                Some(TraceHeader::AuthenticationResults(
                    value.split_whitespace().collect::<Vec<_>>().join(" "),
                ))
            } else {
                None
            }
        })
        .collect();
    Ok(Mail {
        subject: message.subject().unwrap_or_default().trim().to_string(),
        from: address_list(message.from()),
        sender: address_list(message.sender()).into_iter().next(),
        message_id: message.message_id().map(str::to_string),
        date: message.date().map(|d| d.to_timestamp()),
        trace,
        workbooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MimeLimits = MimeLimits {
        max_depth: 20,
        max_parts: 50,
    };

    fn nested(levels: usize) -> Vec<u8> {
        let mut m = String::from("From: a@contoso.com\r\nSubject: deep\r\nMIME-Version: 1.0\r\n");
        for i in 0..levels {
            m.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
            ));
        }
        m.push_str("Content-Type: text/plain\r\n\r\nhi\r\n");
        for i in (0..levels).rev() {
            m.push_str(&format!("--b{i}--\r\n"));
        }
        m.into_bytes()
    }

    #[test]
    fn reads_headers_senders_and_the_workbook() {
        let raw = b"Received: from a by b; Fri, 01 Mar 2024 10:00:02 +0000\r\nAuthentication-Results: spf=pass (sender IP is 192.0.2.1)\r\n smtp.mailfrom=contoso.com;dmarc=pass action=none header.from=contoso.com\r\nARC-Authentication-Results: i=1; mx.microsoft.com 1; spf=pass\r\nReceived: from c by a; Fri, 01 Mar 2024 10:00:01 +0000\r\nFrom: \"Ann\" <Ann@Contoso.com>\r\nSender: ops@contoso.com\r\nSubject:  Lease Abstract Form \r\nMessage-ID: <m1@x>\r\nDate: Fri, 01 Mar 2024 10:00:00 +0000\r\nAuthentication-Results: mx.contoso.com;\r\n spf=pass smtp.mailfrom=contoso.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--x\r\nContent-Type: application/octet-stream; name=\"Form.XLSX\"\r\nContent-Disposition: attachment; filename=\"Form.XLSX\"\r\nContent-Transfer-Encoding: base64\r\n\r\nUEsDBA==\r\n--x--\r\n";
        let mail = parse_mail(raw, &LIMITS).unwrap();
        assert_eq!(mail.subject, "Lease Abstract Form");
        assert_eq!(mail.from, vec!["ann@contoso.com".to_string()]);
        assert_eq!(mail.sender.as_deref(), Some("ops@contoso.com"));
        assert_eq!(mail.message_id.as_deref(), Some("m1@x"));
        assert_eq!(mail.date, Some(1_709_287_200));
        assert_eq!(
            mail.trace,
            vec![
                TraceHeader::Received,
                TraceHeader::AuthenticationResults(
                    "spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=contoso.com;dmarc=pass action=none header.from=contoso.com".into()
                ),
                TraceHeader::Received,
                TraceHeader::AuthenticationResults(
                    "mx.contoso.com; spf=pass smtp.mailfrom=contoso.com".into()
                ),
            ]
        );
        assert_eq!(mail.workbooks.len(), 1);
        assert_eq!(mail.workbooks[0].bytes, b"PK\x03\x04");
    }

    #[test]
    fn nesting_and_part_limits() {
        assert!(parse_mail(&nested(5), &LIMITS).is_ok());
        assert_eq!(
            parse_mail(&nested(60), &LIMITS).unwrap_err().reason,
            Reason::MimeTooDeep
        );
        let few = MimeLimits {
            max_depth: 100,
            max_parts: 3,
        };
        assert_eq!(
            parse_mail(&nested(5), &few).unwrap_err().reason,
            Reason::TooManyParts
        );
    }
}
