//! Step two: walk the loose tree, apply defaults, validate, and collect every
//! error with its key path.
//!
//! Each section has a module of its own holding its types and its walk
//! (which keys it has, their defaults and rules); this module walks the top
//! level and checks what spans sections (duplicate names, two configs
//! reading one mailbox).

pub(super) mod admin;
pub(super) mod amqp;
pub(super) mod form_processor;
pub(super) mod incoming_mail;
pub(super) mod oauth_profiles;
pub(super) mod redis;
pub(super) mod tls;
pub(super) mod token_broker;
pub(super) mod topics;

use std::collections::HashSet;

use figment::value::Dict;

use super::error::ConfigErrors;
use super::reader::Walker;
use super::section::Section;
use super::{Component, Config, IncomingMail, OAuthProfile, Topic};

/// Builds the typed configuration from the loose tree, reading the secret
/// files `component` uses.
pub fn parse(tree: &Dict, component: Component) -> Result<Config, ConfigErrors> {
    let mut w = Walker {
        errors: Vec::new(),
        component,
    };
    let sections: Vec<&str> = Section::ALL.iter().map(|s| s.key()).collect();
    w.unknown_keys(tree, "", &sections);
    let redis = redis::parse(&mut w, tree);
    let (amqp, amqp_declare) = amqp::parse(&mut w, tree);
    let tls = tls::parse(&mut w, tree);
    let admin = admin::parse(&mut w, tree);
    let token_broker = token_broker::parse(&mut w, tree);
    let form_processor = form_processor::parse(&mut w, tree);

    let oauth_profiles: Vec<OAuthProfile> = w
        .tables(tree, Section::OAuthProfiles)
        .into_iter()
        .filter_map(|(path, t)| oauth_profiles::parse(&mut w, &path, t))
        .collect();
    let incoming_mail: Vec<IncomingMail> = w
        .tables(tree, Section::IncomingMail)
        .into_iter()
        .filter_map(|(path, t)| {
            incoming_mail::parse(
                &mut w,
                &path,
                t,
                &oauth_profiles,
                amqp.broker_max_message_bytes,
            )
        })
        .collect();
    let topics: Vec<Topic> = w
        .tables(tree, Section::Topics)
        .into_iter()
        .filter_map(|(path, t)| topics::parse(&mut w, &path, t))
        .collect();

    w.duplicates(
        Section::OAuthProfiles,
        oauth_profiles.iter().map(|p| p.name.clone()),
        "name",
    );
    w.duplicates(
        Section::IncomingMail,
        incoming_mail.iter().map(|m| m.name.clone()),
        "name",
    );
    w.duplicates(
        Section::Topics,
        topics.iter().map(|t| t.subject.to_lowercase()),
        "subject",
    );
    {
        // Two configs reading the same folder of the same mailbox would publish
        // each message twice and race on its flags.
        let mut seen = HashSet::new();
        for (i, m) in incoming_mail.iter().enumerate() {
            let key = (
                m.host.to_lowercase(),
                m.username.to_lowercase(),
                m.protocol(),
                m.folder.clone(),
            );
            if !seen.insert(key) {
                w.err(
                    format!("{}[{i}]", Section::IncomingMail.key()),
                    format!(
                        "{} reads the same mailbox and folder as an earlier config",
                        m.name
                    ),
                );
            }
        }
    }

    if amqp.queue_type == super::QueueType::Quorum
        && amqp.delivery_limit <= form_processor.delivery_limit
    {
        // RabbitMQ would dead-letter a poison message itself, without a
        // reason, before the processor's guard records it (§7a).
        w.err(
            format!("{}.delivery-limit", Section::Amqp.key()),
            format!(
                "{} must exceed [form-processor] delivery-limit ({}) with queue-type = \"quorum\", \
                 so that the processor's poison guard acts before RabbitMQ's delivery limit \
                 (form-processor.delivery-limit)",
                amqp.delivery_limit, form_processor.delivery_limit
            ),
        );
    }

    if form_processor.trusted_authserv_ids.is_empty() {
        // Nothing would be trusted: every mail of such a topic is rejected.
        for (i, t) in topics.iter().enumerate() {
            if t.require_authenticated_sender {
                w.err(
                    format!(
                        "{}[{i}].require-authenticated-sender",
                        Section::Topics.key()
                    ),
                    "needs [form-processor] trusted-authserv-ids: list the receiving server's \
                     authserv-id, or \"exchange-online\" for an Exchange Online mailbox",
                );
            }
        }
    }

    if w.errors.is_empty() {
        Ok(Config {
            redis,
            amqp,
            amqp_declare,
            tls,
            admin,
            token_broker,
            form_processor,
            oauth_profiles,
            incoming_mail,
            topics,
        })
    } else {
        Err(ConfigErrors(w.errors))
    }
}

#[cfg(test)]
mod tests {
    use figment::providers::{Format, Toml};

    use super::*;

    fn errors(toml: &str) -> Vec<String> {
        let tree: Dict = figment::Figment::from(Toml::string(toml))
            .extract()
            .unwrap();
        match parse(&tree, Component::FormProcessor) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn every_section_is_a_known_top_level_key() {
        let mut toml = String::new();
        for s in Section::ALL.into_iter().filter(|s| !s.is_single()) {
            toml.push_str(&format!("{} = []\n", s.key()));
        }
        for s in Section::ALL.into_iter().filter(|s| s.is_single()) {
            toml.push_str(&format!("[{}]\n", s.key()));
            if s == Section::TokenBroker {
                toml.push_str("token-encryption = \"none\"\n");
            }
        }
        assert_eq!(errors(&toml), Vec::<String>::new(), "{toml}");
    }

    #[test]
    fn top_level_mistakes_name_the_section() {
        let topic = |subject: &str| {
            format!(
                "[[topics]]\nsubject = {subject:?}\nmodule = \"m\"\n\
                 business-object = \"b\"\nsenders = [\"*\"]\n"
            )
        };
        let cases = [
            (
                "incoming_mail = 1".to_string(),
                "incoming_mail: unknown key (did you mean \"incoming-mail\"?)",
            ),
            (
                "redis = 1".to_string(),
                "redis: must be a table, found a number",
            ),
            (
                "topics = 1".to_string(),
                "topics: must be an array of tables ([[topics]]), found a number",
            ),
            (
                topic("Same") + &topic("same"),
                "topics[1].subject: duplicate subject \"same\"",
            ),
        ];
        for (toml, want) in cases {
            let toml = format!("{toml}\n[token-broker]\ntoken-encryption = \"none\"\n");
            assert_eq!(errors(&toml), [want], "{toml}");
        }
    }

    #[test]
    fn trusted_authserv_ids_are_validated_and_needed_by_authenticated_topics() {
        let toml = |ids: &str, auth: bool| {
            format!(
                "[token-broker]\ntoken-encryption = \"none\"\n[form-processor]\n{ids}\n\
                 [[topics]]\nsubject = \"s\"\nmodule = \"m\"\nbusiness-object = \"b\"\n\
                 senders = [\"*\"]\nrequire-authenticated-sender = {auth}\n"
            )
        };
        let needs = "topics[0].require-authenticated-sender: needs [form-processor] \
                     trusted-authserv-ids: list the receiving server's authserv-id, or \
                     \"exchange-online\" for an Exchange Online mailbox";
        let cases: Vec<(String, Vec<&str>)> = vec![
            (toml("", false), vec![]),
            (toml("", true), vec![needs]),
            (toml("trusted-authserv-ids = []", true), vec![needs]),
            (
                toml("trusted-authserv-ids = [\"exchange-online\"]", true),
                vec![],
            ),
            (
                toml(
                    "trusted-authserv-ids = [\"mx.contoso.com\", \"Exchange-Online\"]",
                    true,
                ),
                vec![],
            ),
            (
                toml(
                    "trusted-authserv-ids = [\"mx.contoso.com; spf=pass\"]",
                    true,
                ),
                vec!["form-processor.trusted-authserv-ids[0]: \"mx.contoso.com; spf=pass\" is not an authserv-id: expected the receiving server's host name as it opens its Authentication-Results headers (e.g. \"mx.contoso.com\"), or \"exchange-online\""],
            ),
        ];
        for (toml, want) in cases {
            assert_eq!(errors(&toml), want, "{toml}");
        }
    }

    fn config(toml: &str) -> Config {
        let tree: Dict = figment::Figment::from(Toml::string(toml))
            .extract()
            .unwrap();
        parse(&tree, Component::ImapFetcher).expect("valid")
    }

    #[test]
    fn max_message_bytes_follows_the_brokers_limit_and_a_larger_one_is_warned_about() {
        let mail = |extra: &str| {
            format!(
                "[token-broker]\ntoken-encryption = \"none\"\n{extra}\n[[incoming-mail]]\nname = \"m\"\nhost = \"mail.example.com\"\nusername = \"forms@example.com\"\nmail-server-type = \"imaps\"\npassword = \"p\"\n"
            )
        };
        // Defaults: RabbitMQ 4's 16 MiB caps Exchange's 35 MiB.
        let c = config(&mail(""));
        assert_eq!(c.amqp.broker_max_message_bytes, 16 << 20);
        assert_eq!(c.incoming_mail[0].max_message_bytes, 16 << 20);
        assert!(c.warnings().is_empty());
        // A broker that takes more: Exchange's limit.
        let c = config(&mail("[amqp]\nbroker-max-message-bytes = 40000000\n"));
        assert_eq!(c.incoming_mail[0].max_message_bytes, 35 << 20);
        // Set above the broker's limit: valid, with a warning naming both keys.
        let mut text = mail("");
        text.push_str("max-message-bytes = 20000000\n");
        let c = config(&text);
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains(
            "max-message-bytes 20000000 exceeds [amqp] broker-max-message-bytes 16777216"
        ));
        assert!(c.summary().contains("warning: incoming-mail m:"));
    }
}
