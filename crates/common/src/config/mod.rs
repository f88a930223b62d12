//! The configuration of §2: one TOML file for every binary, environment
//! overrides for the single-valued sections, secrets by value or by file.
//!
//! Loading is two steps: [`load`] reads the file and the environment loosely
//! (figment into a tree of values), then [`parse`] walks that tree, applies
//! the defaults and validates everything, collecting *all* errors with their
//! key paths instead of stopping at the first.

mod error;
mod load;
mod parse;
mod reader;
mod section;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::secret::SecretUrl;

pub use error::{ConfigError, ConfigErrors};
pub use load::{load, load_text, LoadOptions, CONFIG_ENV};
pub use parse::parse;

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
            self.redis.url, self.redis.prefix
        ));
        out.push_str(&format!(
            "amqp: {} (prefix {}, queue type {}, declare {})\n",
            self.amqp.url,
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
            out.push_str(&format!(
                "oauth-profile {}: {} {}, client {}, secret [redacted], token-url {}, scope {}\n",
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
        out
    }
}

/// `[redis]`: where the shared state lives.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL (a secret when it holds a password).
    pub url: SecretUrl,
    /// Prefix of every key (`mailagent`), so tenants and tests can share a server.
    pub prefix: String,
}

/// `[amqp]`: the RabbitMQ connection and topology names.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL (a secret: it holds the password).
    pub url: SecretUrl,
    /// Prefix of exchange and queue names (`mailagent`).
    pub prefix: String,
    /// `classic` (default) or `quorum` (replicated, with a delivery limit).
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries before RabbitMQ dead-letters a message.
    pub delivery_limit: u32,
}

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

/// `[tls]`: trust settings shared by every outgoing TLS connection.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TlsConfig {
    /// PEM file of further CA certificates, added to the platform/webpki roots.
    pub extra_ca_file: Option<PathBuf>,
}

/// `[admin]`: the HTTP port with `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Address to listen on; port 0 picks any free port.
    pub listen: SocketAddr,
    /// Prefix of every metric name (`mailagent`).
    pub metrics_prefix: String,
    /// Seconds between heartbeats written to Redis.
    pub heartbeat_interval: Duration,
}

/// `[token-broker]`
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TokenBrokerConfig {
    /// How tokens are protected at rest in Redis.
    pub encryption: TokenEncryption,
    /// Refresh when less than max(this, `refresh-lead-fraction` × lifetime) remains.
    pub refresh_lead_min: Duration,
    /// Fraction of the lifetime used as refresh lead (0.2).
    pub refresh_lead_fraction: f64,
    /// The lead never exceeds this fraction of the lifetime (0.5).
    pub refresh_max_fraction: f64,
    /// A forced refresh is done at most this often per profile.
    pub forced_refresh_min_interval: Duration,
    /// Retry interval for a profile that is failing permanently (bad secret…).
    pub failing_retry_interval: Duration,
    /// First backoff step after a transient failure.
    pub backoff_initial: Duration,
    /// Largest backoff step after transient failures.
    pub backoff_max: Duration,
    /// TCP/TLS connect timeout of token requests.
    pub connect_timeout: Duration,
    /// Total timeout of one token request.
    pub request_timeout: Duration,
    /// Time-to-live of the per-profile refresh lock.
    pub lock_ttl: Duration,
}

/// Token protection at rest.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum TokenEncryption {
    /// `token-encryption = "none"`, configured in so many words.
    None,
    /// AES-256-GCM with the keys of these files: the first encrypts, any decrypts.
    Aead {
        /// Key files in order.
        key_files: Vec<PathBuf>,
        /// The keys, when this component reads them.
        #[serde(skip)]
        keys: Vec<EncryptionKey>,
    },
}

/// A 32-byte token-encryption key and its id (a fingerprint, not a secret).
#[derive(Clone)]
pub struct EncryptionKey {
    /// Short id stored beside each ciphertext.
    pub id: String,
    /// The key bytes.
    pub key: [u8; 32],
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .field("key", &crate::secret::REDACTED)
            .finish()
    }
}

/// `[form-processor]`
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FormProcessorConfig {
    /// `sqlite://path` (default) or `postgres://…` (a secret: may hold a password).
    pub store: SecretUrl,
    /// Messages in flight at once (AMQP prefetch).
    pub prefetch: u16,
    /// Deliveries of one dedupe key before it is dead-lettered unprocessed.
    pub delivery_limit: u32,
    /// authserv-ids whose `Authentication-Results` are trusted.
    pub trusted_authserv_ids: Vec<String>,
    /// Largest accepted workbook attachment, bytes.
    pub max_workbook_bytes: u64,
    /// Largest total decompressed size of a workbook's zip entries, bytes.
    pub max_decompressed_bytes: u64,
    /// Most worksheets in one workbook.
    pub max_sheets: u32,
    /// Most rows read from one worksheet.
    pub max_rows: u32,
    /// Most cells read from one workbook.
    pub max_cells: u64,
    /// Deepest MIME nesting accepted.
    pub max_mime_depth: u32,
    /// Most MIME parts accepted.
    pub max_mime_parts: u32,
}

/// `[[oauth-profiles]]`: one app registration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OAuthProfile {
    /// Unique name, referenced by mail configs.
    pub name: String,
    /// `azure` or `generic`.
    pub provider: Provider,
    /// `application` (client credentials).
    pub access_type: AccessType,
    /// Free text.
    pub description: String,
    /// The Application (client) ID.
    pub application_key: String,
    /// The client secret *Value*; `None` when this component does not read it.
    pub application_secret: Option<crate::secret::Secret>,
    /// Authorization endpoint (kept for delegated flows).
    pub authorize_url: Option<url::Url>,
    /// Token endpoint.
    pub token_url: url::Url,
    /// Requested scope (`https://outlook.office365.com/.default` for azure).
    pub scope: String,
    /// How the client authenticates at the token endpoint.
    pub client_auth: ClientAuth,
    /// Allows an `http://` token URL (tests only).
    pub allow_insecure: bool,
}

/// OAuth provider flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// Microsoft Entra ID.
    Azure,
    /// Any RFC 6749 token endpoint.
    Generic,
}

impl Provider {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Azure => "azure",
            Self::Generic => "generic",
        }
    }
}

/// OAuth access type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessType {
    /// App-only, client-credentials grant.
    Application,
}

impl AccessType {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        "application"
    }
}

/// Client authentication at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (default).
    Body,
    /// HTTP Basic authentication.
    Basic,
}

/// `[[incoming-mail]]`: one mailbox folder to fetch.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IncomingMail {
    /// Unique name, used in queues, metrics and Redis keys.
    pub name: String,
    /// Mail server host name.
    pub host: String,
    /// Folder (IMAP only).
    pub folder: String,
    /// What to do with each message.
    pub action: Action,
    /// Mailbox address (the XOAUTH2 `user=`).
    pub username: String,
    /// How to log in.
    pub auth: MailAuth,
    /// `imaps`, `imap`, `pop3s`, `pop3`.
    pub server_type: ServerType,
    /// TCP port.
    pub port: u16,
    /// For `imap`/`pop3`: upgrade with STARTTLS/STLS (default true).
    pub starttls: bool,
    /// Allows plaintext (no TLS) for `imap`/`pop3` when `starttls = false`.
    pub allow_insecure: bool,
    /// What happens to a message after RabbitMQ confirmed it.
    pub after_fetch: AfterFetch,
    /// Seconds between polls when IDLE is unavailable or off.
    pub poll_interval: Duration,
    /// Larger messages are not published.
    pub max_message_bytes: u64,
    /// Use IMAP IDLE when offered.
    pub idle: bool,
    /// Where a mailbox without checkpoint starts.
    pub start_from: StartFrom,
    /// Messages fetched per batch.
    pub batch_size: u32,
}

impl IncomingMail {
    /// IMAP or POP3.
    pub fn protocol(&self) -> Protocol {
        self.server_type.protocol()
    }
}

/// How a mail config logs in.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum MailAuth {
    /// SASL XOAUTH2 with the token of this OAuth profile.
    OAuth {
        /// Profile name.
        profile: String,
    },
    /// Password login (servers without OAuth).
    Password {
        /// The password; `None` when this component does not read it.
        password: Option<crate::secret::Secret>,
    },
}

/// The mail protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// IMAP4rev1.
    Imap,
    /// POP3.
    Pop3,
}

impl Protocol {
    /// `imap` or `pop3`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Imap => "imap",
            Self::Pop3 => "pop3",
        }
    }

    /// Parses `imap` / `pop3`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "imap" => Some(Self::Imap),
            "pop3" => Some(Self::Pop3),
            _ => None,
        }
    }
}

/// `mail-server-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerType {
    /// IMAP over implicit TLS (993).
    Imaps,
    /// IMAP with STARTTLS (143).
    Imap,
    /// POP3 over implicit TLS (995).
    Pop3s,
    /// POP3 with STLS (110).
    Pop3,
}

impl ServerType {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Imaps => "imaps",
            Self::Imap => "imap",
            Self::Pop3s => "pop3s",
            Self::Pop3 => "pop3",
        }
    }

    /// The default port.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Imaps => 993,
            Self::Imap => 143,
            Self::Pop3s => 995,
            Self::Pop3 => 110,
        }
    }

    /// The protocol spoken.
    pub fn protocol(self) -> Protocol {
        match self {
            Self::Imaps | Self::Imap => Protocol::Imap,
            Self::Pop3s | Self::Pop3 => Protocol::Pop3,
        }
    }

    /// True when TLS starts at connect time.
    pub fn implicit_tls(self) -> bool {
        matches!(self, Self::Imaps | Self::Pop3s)
    }
}

/// The configured action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Create a record from the form.
    Create,
}

impl Action {
    /// `CREATE`
    pub fn as_str(self) -> &'static str {
        "CREATE"
    }

    /// The AMQP routing key and queue suffix (`create`).
    pub fn routing_key(self) -> &'static str {
        "create"
    }

    /// Parses `CREATE` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        s.eq_ignore_ascii_case("create").then_some(Self::Create)
    }
}

/// `after-fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterFetch {
    /// Set `\Seen` (IMAP default).
    MarkSeen,
    /// Move to that folder (IMAP).
    Move(String),
    /// Delete (POP3 default; IMAP: `\Deleted` + UID EXPUNGE).
    Delete,
    /// Leave the message as it is.
    Keep,
}

impl std::fmt::Display for AfterFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MarkSeen => f.write_str("mark-seen"),
            Self::Move(folder) => write!(f, "move:{folder}"),
            Self::Delete => f.write_str("delete"),
            Self::Keep => f.write_str("keep"),
        }
    }
}

/// `start-from`: where a mailbox without a checkpoint begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFrom {
    /// Unseen messages (default).
    Unseen,
    /// Every message.
    All,
    /// Only mail arriving from now on.
    Now,
}

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
    /// Require `dmarc=pass` or `spf=pass` from a trusted authserv-id.
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
