//! The configuration of §2: one TOML file for every binary, environment
//! overrides for the single-valued sections, secrets by value or by file.
//!
//! Loading is two steps: [`load`] reads the file and the environment loosely
//! (figment into a tree of values), then [`parse`] walks that tree, applies
//! the defaults and validates everything, collecting *all* errors with their
//! key paths instead of stopping at the first.

mod error;
mod load;
mod reader;
mod schema;
mod section;

use serde::Serialize;

pub use error::{ConfigError, ConfigErrors};
pub use load::{load, load_text, LoadOptions, CONFIG_ENV};
pub use schema::admin::AdminConfig;
pub use schema::amqp::{
    AmqpConfig, Declare, QueueType, DEFAULT_BROKER_MAX_MESSAGE_BYTES, DEFAULT_DELIVERY_LIMIT,
};
pub use schema::form_processor::{FormProcessorConfig, SqliteSynchronous};
pub use schema::incoming_mail::{
    Action, AfterFetch, IncomingMail, MailAuth, Protocol, ServerType, StartFrom, DEFAULT_BATCH_SIZE,
};
pub use schema::oauth_profiles::{
    AccessType, AssertionAlgorithm, ClientAuth, Credential, OAuthProfile, Provider,
};
pub use schema::parse;
pub use schema::redis::{RedisConfig, RedisMode};
pub use schema::tls::TlsConfig;
pub use schema::token_broker::{EncryptionKey, TokenBrokerConfig, TokenEncryption};
pub use schema::topics::{SubjectMatcher, Topic};

/// Which binary is loading the configuration. It decides which secret files
/// are read (a container gets only the secrets it uses); everything else is
/// validated by every binary alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    /// `token-broker`: reads client secrets and token-encryption keys.
    TokenBroker,
    /// `imap-fetcher`: reads IMAP passwords and token-encryption keys.
    ImapFetcher,
    /// `pop-fetcher`: reads POP3 passwords and token-encryption keys.
    PopFetcher,
    /// `form-processor`: reads no mail or OAuth secret.
    FormProcessor,
    /// `mailagent`, the operator CLI: reads every secret.
    Cli,
    /// `mailagent setup`: declares the topology and prints or applies the
    /// users' rights; reads no mail or OAuth secret, so a deployment's
    /// one-off setup job needs none of them.
    Setup,
}

impl Component {
    /// The component name used for heartbeats, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::TokenBroker => "token-broker",
            Self::ImapFetcher => "imap-fetcher",
            Self::PopFetcher => "pop-fetcher",
            Self::FormProcessor => "form-processor",
            Self::Cli | Self::Setup => "mailagent",
        }
    }

    pub(crate) fn reads_client_secrets(self) -> bool {
        matches!(self, Self::TokenBroker | Self::Cli)
    }

    pub(crate) fn reads_token_keys(self) -> bool {
        matches!(
            self,
            Self::TokenBroker | Self::ImapFetcher | Self::PopFetcher | Self::Cli
        )
    }

    pub(crate) fn reads_mail_password(self, protocol: Protocol) -> bool {
        match self {
            Self::Cli => true,
            Self::ImapFetcher => protocol == Protocol::Imap,
            Self::PopFetcher => protocol == Protocol::Pop3,
            _ => false,
        }
    }
}

/// The whole configuration, validated, with defaults applied.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// `[redis]`
    pub redis: RedisConfig,
    /// `[amqp]`
    pub amqp: AmqpConfig,
    /// `[amqp] declare`: how the services declare the topology at start.
    pub amqp_declare: Declare,
    /// `[tls]`
    pub tls: TlsConfig,
    /// `[admin]`
    pub admin: AdminConfig,
    /// `[token-broker]`
    pub token_broker: TokenBrokerConfig,
    /// `[form-processor]`
    pub form_processor: FormProcessorConfig,
    /// `[[oauth-profiles]]`
    pub oauth_profiles: Vec<OAuthProfile>,
    /// `[[incoming-mail]]`
    pub incoming_mail: Vec<IncomingMail>,
    /// `[[topics]]`
    pub topics: Vec<Topic>,
}

impl Config {
    /// The OAuth profile of that name.
    pub fn profile(&self, name: &str) -> Option<&OAuthProfile> {
        self.oauth_profiles.iter().find(|p| p.name == name)
    }

    /// The incoming-mail config of that name.
    pub fn mail_config(&self, name: &str) -> Option<&IncomingMail> {
        self.incoming_mail.iter().find(|m| m.name == name)
    }

    /// A short, redacted, human-readable summary (for `--check-config`).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        out.push_str("configuration is valid\n");
        out.push_str(&format!(
            "redis: {} (prefix {})\n",
            self.redis.endpoint(),
            self.redis.prefix
        ));
        out.push_str(&format!(
            "amqp: {} (prefix {}, queue type {}, declare {})\n",
            self.amqp.endpoints(),
            self.amqp.prefix,
            self.amqp.queue_type.as_str(),
            self.amqp_declare.as_str()
        ));
        if let Some(ca) = &self.tls.extra_ca_file {
            out.push_str(&format!("tls: extra CA {}\n", ca.display()));
        }
        out.push_str(&format!("admin: {}\n", self.admin.listen));
        out.push_str(&format!(
            "token-broker: token encryption {}\n",
            match &self.token_broker.encryption {
                TokenEncryption::None => "none (tokens stored in clear)".to_string(),
                TokenEncryption::Aead { key_files, .. } =>
                    format!("AES-256-GCM, {} key file(s)", key_files.len()),
            }
        ));
        out.push_str(&format!(
            "form-processor: store {}\n",
            self.form_processor.store
        ));
        for p in &self.oauth_profiles {
            let credential = match &p.credential {
                Credential::Secret { expires_at, .. } => match expires_at {
                    Some(e) => {
                        format!("secret [redacted] expiring {}", crate::credential::date(*e))
                    }
                    None => "secret [redacted]".to_string(),
                },
                Credential::Certificate {
                    certificate_file,
                    algorithm,
                    ..
                } => format!("certificate {} ({algorithm:?})", certificate_file.display()),
                Credential::AssertionFile { path } => {
                    format!("client assertion file {}", path.display())
                }
            };
            out.push_str(&format!(
                "oauth-profile {}: {} {}, client {}, {credential}, token-url {}, scope {}\n",
                p.name,
                p.provider.as_str(),
                p.access_type.as_str(),
                p.application_key,
                p.token_url,
                p.scope
            ));
        }
        for m in &self.incoming_mail {
            let auth = match &m.auth {
                MailAuth::OAuth { profile } => format!("oauth profile {profile}"),
                MailAuth::Password { .. } => "password [redacted]".to_string(),
            };
            out.push_str(&format!(
                "incoming-mail {}: {} {}:{} {} folder {}, {}, action {}, after-fetch {}\n",
                m.name,
                m.server_type.as_str(),
                m.host,
                m.port,
                m.username,
                m.folder,
                auth,
                m.action.as_str(),
                m.after_fetch
            ));
        }
        for t in &self.topics {
            out.push_str(&format!(
                "topic {}: {}/{} required {:?} unique {:?} senders {:?}\n",
                t.subject, t.module, t.business_object, t.required, t.unique, t.senders
            ));
        }
        for w in self.warnings() {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }

    /// What is valid but probably not meant: each fetcher logs these at
    /// start, and `--check-config` prints them.
    pub fn warnings(&self) -> Vec<String> {
        let broker = self.amqp.broker_max_message_bytes;
        self.incoming_mail
            .iter()
            .filter(|m| m.max_message_bytes > broker)
            .map(|m| {
                format!(
                    "incoming-mail {}: max-message-bytes {} exceeds [amqp] broker-max-message-bytes {broker}; mails between the two are recorded as oversized, not published (raise RabbitMQ's max_message_size and broker-max-message-bytes together)",
                    m.name, m.max_message_bytes
                )
            })
            .collect()
    }
}
