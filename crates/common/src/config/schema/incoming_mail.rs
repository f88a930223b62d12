//! `[[incoming-mail]]`: the mailbox folders to fetch, how to log in, and
//! what happens to a message once it is published.

use std::time::Duration;

use figment::value::Dict;
use serde::Serialize;

use super::oauth_profiles::OAuthProfile;
use crate::config::reader::Walker;

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
    /// Bytes of message bodies a mailbox's worker holds at most: a batch
    /// is fetched in windows of at most this many bytes (by the server's
    /// sizes); a single larger message goes alone.
    pub max_in_flight_bytes: u64,
    /// IMAP: time allowed for one command's answer, or for the next part
    /// of a long one (a FETCH counts progress, not the whole reply).
    pub command_timeout: Duration,
    /// IMAP: an IDLE is ended and re-issued after this long.
    pub idle_renew: Duration,
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

/// Reads one `[[incoming-mail]]` table at `path`; `profiles` are the
/// OAuth profiles it may name. `None` when it is unusable (its errors are
/// recorded).
/// Exchange Online's largest message: `max-message-bytes` by default when
/// the broker takes messages that large.
pub const EXCHANGE_MAX_MESSAGE_BYTES: u64 = 35 << 20;

/// `max-in-flight-bytes` by default: 64 MiB of bodies per mailbox worker.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;

/// `batch-size` by default. Each batch boundary costs the fetchers a few
/// round trips (flags, checkpoint, sizes) in which nothing is fetched: at
/// 200 the IMAP fetcher ran at 63–68 % of 1/(1/F+1/P), at 500 at 86–87 %
/// (`bench-imap --batch-size`, docs/benchmarks.md). Memory stays bounded by
/// `max-in-flight-bytes`, not by this.
pub const DEFAULT_BATCH_SIZE: u32 = 500;

/// One `[[incoming-mail]]` table; `broker_max` is `[amqp]
/// broker-max-message-bytes`, which caps the default `max-message-bytes`.
pub(super) fn parse(
    w: &mut Walker,
    path: &str,
    t: &Dict,
    profiles: &[OAuthProfile],
    broker_max: u64,
) -> Option<IncomingMail> {
    w.unknown_keys(
        t,
        path,
        &[
            "name",
            "host",
            "folder",
            "action",
            "username",
            "password",
            "password-file",
            "mail-server-type",
            "port",
            "oauth-profile",
            "after-fetch",
            "poll-interval",
            "max-message-bytes",
            "allow-insecure",
            "starttls",
            "idle",
            "start-from",
            "batch-size",
            "max-in-flight-bytes",
            "command-timeout",
            "idle-renew",
        ],
    );
    let name = w.name(t, path, "name", None);
    let host = w.string(t, path, "host").unwrap_or_default();
    if host.trim().is_empty() || host.contains(char::is_whitespace) || host.contains('/') {
        w.err(
            format!("{path}.host"),
            "missing or not a host name, e.g. outlook.office365.com",
        );
    }
    let server_type = match w
        .string(t, path, "mail-server-type")
        .map(|s| s.to_lowercase())
        .as_deref()
    {
        Some("imaps") => Some(ServerType::Imaps),
        Some("imap") => Some(ServerType::Imap),
        Some("pop3s") => Some(ServerType::Pop3s),
        Some("pop3") => Some(ServerType::Pop3),
        Some(other) => {
            w.err(
                format!("{path}.mail-server-type"),
                format!("unknown type {other:?}: expected imaps, pop3s, imap or pop3"),
            );
            None
        }
        None => {
            w.err(
                format!("{path}.mail-server-type"),
                "missing: imaps, pop3s, imap or pop3",
            );
            None
        }
    };
    let default_port = server_type.map(ServerType::default_port).unwrap_or(0);
    let port = w.int_in(t, path, "port", 1, 65535, default_port as u64) as u16;
    let folder = w
        .string(t, path, "folder")
        .unwrap_or_else(|| "INBOX".into());
    if folder.trim().is_empty() {
        w.err(format!("{path}.folder"), "must not be empty");
    }
    let action = match w.string(t, path, "action") {
        None => Action::Create,
        Some(a) => Action::parse(&a).unwrap_or_else(|| {
            w.err(
                format!("{path}.action"),
                format!("unsupported action {a:?}: the only action is CREATE"),
            );
            Action::Create
        }),
    };
    let username = w.string(t, path, "username").unwrap_or_default();
    if username.trim().is_empty() {
        w.err(format!("{path}.username"), "missing: the mailbox address");
    }
    let protocol = server_type
        .map(ServerType::protocol)
        .unwrap_or(Protocol::Imap);
    let profile = w.string(t, path, "oauth-profile");
    let has_password = t.contains_key("password") || t.contains_key("password-file");
    let auth = match profile {
        Some(profile) => {
            if !profiles.iter().any(|p| p.name == profile) {
                w.err(
                    format!("{path}.oauth-profile"),
                    format!("names no oauth profile: {profile:?}"),
                );
            }
            if has_password {
                w.err(
                    format!("{path}.password"),
                    "set either oauth-profile or password, not both",
                );
            }
            MailAuth::OAuth { profile }
        }
        None => {
            let password = w.secret(
                t,
                path,
                "password",
                w.component.reads_mail_password(protocol),
                true,
            );
            MailAuth::Password { password }
        }
    };
    let allow_insecure = w.boolean(t, path, "allow-insecure", false);
    let starttls = w.boolean(t, path, "starttls", true);
    if let Some(st) = server_type {
        if st.implicit_tls() && t.contains_key("starttls") {
            w.err(
                format!("{path}.starttls"),
                format!("does not apply to {}: TLS starts at connect", st.as_str()),
            );
        }
        if !st.implicit_tls() && !starttls && !allow_insecure {
            w.err(
                format!("{path}.starttls"),
                format!("{} without TLS sends the credentials in clear: set allow-insecure = true to do so anyway", st.as_str()),
            );
        }
    }
    let after_fetch = match w.string(t, path, "after-fetch") {
        None => match protocol {
            Protocol::Imap => AfterFetch::MarkSeen,
            Protocol::Pop3 => AfterFetch::Delete,
        },
        Some(s) => match (s.as_str(), protocol) {
            ("mark-seen", Protocol::Imap) => AfterFetch::MarkSeen,
            ("delete", _) => AfterFetch::Delete,
            ("keep", _) => AfterFetch::Keep,
            (m, Protocol::Imap) if m.starts_with("move:") && m.len() > 5 => {
                let target = m[5..].to_string();
                if target == folder {
                    w.err(
                        format!("{path}.after-fetch"),
                        "moves to the folder it reads from",
                    );
                }
                AfterFetch::Move(target)
            }
            ("mark-seen", Protocol::Pop3) => {
                w.err(
                    format!("{path}.after-fetch"),
                    "POP3 has no flags: use delete or keep",
                );
                AfterFetch::Keep
            }
            (m, Protocol::Pop3) if m.starts_with("move:") => {
                w.err(
                    format!("{path}.after-fetch"),
                    "POP3 has no folders: use delete or keep",
                );
                AfterFetch::Keep
            }
            (other, _) => {
                w.err(
                    format!("{path}.after-fetch"),
                    format!("unknown value {other:?}: expected mark-seen, move:<folder>, delete or keep"),
                );
                AfterFetch::Keep
            }
        },
    };
    let start_from = match w.string(t, path, "start-from").as_deref() {
        None if protocol == Protocol::Pop3 => StartFrom::All,
        None | Some("unseen") => StartFrom::Unseen,
        Some("all") => StartFrom::All,
        Some("now") => StartFrom::Now,
        Some(other) => {
            w.err(
                format!("{path}.start-from"),
                format!("unknown value {other:?}: expected unseen, all or now"),
            );
            StartFrom::Unseen
        }
    };
    if protocol == Protocol::Pop3 {
        if start_from == StartFrom::Unseen && t.contains_key("start-from") {
            w.err(
                format!("{path}.start-from"),
                "POP3 has no unseen flag: use all or now",
            );
        }
        if t.contains_key("folder") && folder != "INBOX" {
            w.err(format!("{path}.folder"), "POP3 reads only the inbox");
        }
    }
    let poll_interval = w.secs(t, path, "poll-interval", 1, 86_400, 60);
    let max_message_bytes = w.int_in(
        t,
        path,
        "max-message-bytes",
        1024,
        1 << 34,
        EXCHANGE_MAX_MESSAGE_BYTES.min(broker_max),
    );
    let idle = w.boolean(t, path, "idle", true);
    let batch_size = w.int_in(t, path, "batch-size", 1, 10_000, DEFAULT_BATCH_SIZE.into()) as u32;
    let max_in_flight_bytes = w.int_in(
        t,
        path,
        "max-in-flight-bytes",
        1 << 20,
        1 << 36,
        DEFAULT_MAX_IN_FLIGHT_BYTES,
    );
    let command_timeout = w.secs(t, path, "command-timeout", 1, 3_600, 60);
    // Below the 29 minutes of RFC 2177 and Exchange Online's IDLE limit.
    let idle_renew = w.secs(t, path, "idle-renew", 5, 1_740, 300);
    Some(IncomingMail {
        name: name?,
        host,
        folder,
        action,
        username,
        auth,
        server_type: server_type?,
        port,
        starttls: server_type.is_some_and(|s| !s.implicit_tls()) && starttls,
        allow_insecure,
        after_fetch,
        poll_interval,
        max_message_bytes,
        idle,
        start_from,
        batch_size,
        max_in_flight_bytes,
        command_timeout,
        idle_renew,
    })
}
