//! `[amqp]`: the RabbitMQ connection, topology names and how the topology
//! is declared.

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::{join, Walker};
use crate::config::section::Section;
use crate::secret::SecretUrl;

/// `[amqp]`: the RabbitMQ connection and topology names.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL (a secret: it holds the password): the
    /// first of [`AmqpConfig::urls`].
    pub url: SecretUrl,
    /// Every node to connect to, in configuration order: `[amqp] urls`, or
    /// the one `[amqp] url`. Never empty.
    pub urls: Vec<SecretUrl>,
    /// Prefix of exchange and queue names (`mailagent`).
    pub prefix: String,
    /// `classic` (default) or `quorum` (replicated, with a delivery limit).
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries before RabbitMQ dead-letters a message
    /// itself (default 20, RabbitMQ 4's; must exceed `[form-processor]
    /// delivery-limit` so that the processor's poison guard acts first).
    pub delivery_limit: u32,
    /// The broker's configured `max_message_size` (RabbitMQ 4: 16 MiB):
    /// larger mails are recorded as oversized instead of being published.
    pub broker_max_message_bytes: u64,
}

/// `[amqp] delivery-limit` when not set: RabbitMQ 4's default for quorum queues.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

impl AmqpConfig {
    /// Points at one node: `url` and `urls` both (what `[amqp] url` gives).
    pub fn set_url(&mut self, url: SecretUrl) {
        self.urls = vec![url.clone()];
        self.url = url;
    }

    /// The configured node(s), redacted, for logs and errors: the one URL,
    /// or the list in brackets.
    pub fn endpoints(&self) -> String {
        match self.urls.as_slice() {
            [one] => one.redacted(),
            many => format!(
                "[{}]",
                many.iter()
                    .map(SecretUrl::redacted)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// RabbitMQ 4's default `max_message_size`.
pub const DEFAULT_BROKER_MAX_MESSAGE_BYTES: u64 = 16 << 20;

/// `[amqp] declare`: what a service does with the topology at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Declare {
    /// Declare exchanges, queues and bindings (idempotent); needs configure
    /// permission on them. The default.
    Full,
    /// Only check that they exist (`mailagent setup` declared them), so the
    /// RabbitMQ user needs no configure permission (least privilege).
    Passive,
}

impl Declare {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Passive => "passive",
        }
    }
}

/// RabbitMQ queue type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueType {
    /// A classic queue (single node).
    Classic,
    /// A quorum queue (replicated across a cluster).
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// Reads `[amqp]` from the top-level `tree`: the connection and, apart,
/// its `declare` mode.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> (AmqpConfig, Declare) {
    let t = w.section(tree, Section::Amqp);
    let p = Section::Amqp.key();
    w.unknown_keys(
        t,
        p,
        &[
            "url",
            "url-file",
            "urls",
            "urls-file",
            "prefix",
            "queue-type",
            "delivery-limit",
            "broker-max-message-bytes",
            "declare",
        ],
    );
    let urls = parse_urls(w, t, p);
    let url = urls[0].clone();
    let prefix = w
        .name(t, p, "prefix", Some("mailagent"))
        .unwrap_or_default();
    let queue_type = match w.string(t, p, "queue-type").as_deref() {
        None | Some("classic") => QueueType::Classic,
        Some("quorum") => QueueType::Quorum,
        Some(other) => {
            w.err(
                join(p, "queue-type"),
                format!("unknown queue type {other:?}: expected \"classic\" or \"quorum\""),
            );
            QueueType::Classic
        }
    };
    let delivery_limit = w.int_in(
        t,
        p,
        "delivery-limit",
        1,
        1000,
        u64::from(DEFAULT_DELIVERY_LIMIT),
    ) as u32;
    // RabbitMQ accepts at most 512 MiB.
    let broker_max_message_bytes = w.int_in(
        t,
        p,
        "broker-max-message-bytes",
        1024,
        512 << 20,
        DEFAULT_BROKER_MAX_MESSAGE_BYTES,
    );
    let declare = match w.string(t, p, "declare").as_deref() {
        None | Some("full") => Declare::Full,
        Some("passive") => Declare::Passive,
        Some(other) => {
            w.err(
                join(p, "declare"),
                format!("unknown mode {other:?}: expected \"full\" (default) or \"passive\""),
            );
            Declare::Full
        }
    };
    (
        AmqpConfig {
            url,
            urls,
            prefix,
            queue_type,
            delivery_limit,
            broker_max_message_bytes,
        },
        declare,
    )
}

/// The default node when neither `url` nor `urls` is set.
const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The schemes `[amqp]` URLs may use.
const SCHEMES: &[&str] = &["amqp", "amqps"];

/// `[amqp] url` (one node) or `[amqp] urls` (several: an array, a
/// comma-separated string from the environment, or `urls-file` with one
/// URL a line). Exactly one of the two; never an empty list.
fn parse_urls(w: &mut Walker, t: &Dict, p: &str) -> Vec<SecretUrl> {
    let single = t.contains_key("url") || t.contains_key("url-file");
    let inline = t.contains_key("urls");
    let file = t.contains_key("urls-file");
    if !inline && !file {
        return vec![w.secret_url(t, p, "url", DEFAULT_URL, SCHEMES)];
    }
    if single {
        let (one, many) = (
            if t.contains_key("url") {
                "url"
            } else {
                "url-file"
            },
            if inline { "urls" } else { "urls-file" },
        );
        w.err(
            join(p, many),
            format!("set either {one} (one node) or {many} (several nodes), not both"),
        );
    }
    let listed: Vec<String> = if inline && file {
        w.err(join(p, "urls"), "set either urls or urls-file, not both");
        Vec::new()
    } else if inline {
        w.string_list(t, p, "urls")
    } else {
        match w.string(t, p, "urls-file") {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => text
                    .split(['\n', ','])
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect(),
                Err(e) => {
                    w.err(
                        join(p, "urls-file"),
                        format!("cannot read file {path}: {}", e.kind()),
                    );
                    Vec::new()
                }
            },
            None => Vec::new(),
        }
    };
    let key = if file && !inline { "urls-file" } else { "urls" };
    if listed.is_empty() {
        if !(inline && file) {
            w.err(
                join(p, key),
                "is empty: list at least one amqp:// or amqps:// URL",
            );
        }
        return vec![SecretUrl::new(DEFAULT_URL)];
    }
    let urls: Vec<SecretUrl> = listed.into_iter().map(SecretUrl::new).collect();
    let mut seen = std::collections::HashSet::new();
    for (i, u) in urls.iter().enumerate() {
        let at = format!("{}[{i}]", join(p, key));
        w.check_url(&at, u, SCHEMES);
        if !seen.insert(u.expose()) {
            w.err(at, format!("{} is listed twice", u.redacted()));
        }
    }
    urls
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Component;

    fn urls_of(toml: &str) -> (Vec<String>, Vec<String>) {
        use figment::providers::{Format, Toml};
        let t: Dict = figment::Figment::from(Toml::string(toml))
            .extract()
            .unwrap();
        let mut w = Walker {
            errors: Vec::new(),
            component: Component::Cli,
        };
        let urls = parse_urls(&mut w, &t, "amqp");
        (
            urls.iter().map(|u| u.redacted()).collect(),
            w.errors.iter().map(|e| e.path.clone()).collect(),
        )
    }

    #[test]
    fn url_or_urls_exactly_one_never_empty() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("", &["amqp://guest:[redacted]@127.0.0.1:5672/%2f"], &[]),
            (
                "url = \"amqp://a:pw@n1/%2f\"",
                &["amqp://a:[redacted]@n1/%2f"],
                &[],
            ),
            (
                "urls = [\"amqp://a:pw@n1/%2f\", \"amqps://n2:5671/%2f\"]",
                &["amqp://a:[redacted]@n1/%2f", "amqps://n2:5671/%2f"],
                &[],
            ),
            // From the environment: comma-separated.
            (
                "urls = \"amqp://n1/%2f, amqp://n2/%2f\"",
                &["amqp://n1/%2f", "amqp://n2/%2f"],
                &[],
            ),
            (
                "urls = []",
                &["amqp://guest:[redacted]@127.0.0.1:5672/%2f"],
                &["amqp.urls"],
            ),
            (
                "url = \"amqp://n0/%2f\"\nurls = [\"amqp://n1/%2f\"]",
                &["amqp://n1/%2f"],
                &["amqp.urls"],
            ),
            (
                "urls = [\"amqp://n1/%2f\", \"redis://n2/0\"]",
                &["amqp://n1/%2f", "redis://n2/0"],
                &["amqp.urls[1]"],
            ),
            (
                "urls = [\"amqp://n1/%2f\", \"amqp://n1/%2f\"]",
                &["amqp://n1/%2f", "amqp://n1/%2f"],
                &["amqp.urls[1]"],
            ),
        ];
        for (toml, want, errors) in cases {
            let (urls, errs) = urls_of(toml);
            assert_eq!(urls, *want, "{toml}");
            assert_eq!(errs, *errors, "{toml}");
        }
    }

    #[test]
    fn endpoints_are_redacted() {
        let config = |urls: &[&str]| AmqpConfig {
            url: SecretUrl::new(urls[0]),
            urls: urls.iter().map(|u| SecretUrl::new(*u)).collect(),
            prefix: "p".into(),
            queue_type: QueueType::Quorum,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            broker_max_message_bytes: DEFAULT_BROKER_MAX_MESSAGE_BYTES,
        };
        assert_eq!(
            config(&["amqp://u:pw@n1/%2f"]).endpoints(),
            "amqp://u:[redacted]@n1/%2f"
        );
        let two = config(&["amqp://u:pw@n1/%2f", "amqp://u:pw@n2/%2f"]).endpoints();
        assert_eq!(
            two,
            "[amqp://u:[redacted]@n1/%2f, amqp://u:[redacted]@n2/%2f]"
        );
        assert!(!two.contains("pw"));
    }
}
