//! Step two: walk the loose tree, apply defaults, validate, and collect every
//! error with its key path.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use figment::value::Dict;
use sha2::Digest;

use super::error::ConfigErrors;
use super::reader::{join, Walker};
use super::section::Section;
use super::*;

/// Builds the typed configuration from the loose tree, reading the secret
/// files `component` uses.
pub fn parse(tree: &Dict, component: Component) -> Result<Config, ConfigErrors> {
    let mut w = Walker {
        errors: Vec::new(),
        component,
    };
    let sections: Vec<&str> = Section::ALL.iter().map(|s| s.key()).collect();
    w.unknown_keys(tree, "", &sections);
    let empty = Dict::new();
    let redis = {
        let p = Section::Redis.key();
        let t = w.section(tree, p).unwrap_or(&empty);
        w.unknown_keys(t, p, &["url", "url-file", "prefix"]);
        let url = w.secret_url(
            t,
            p,
            "url",
            "redis://127.0.0.1:6379/0",
            &["redis", "rediss"],
        );
        let prefix = w
            .name(t, p, "prefix", Some("mailagent"))
            .unwrap_or_default();
        RedisConfig { url, prefix }
    };
    let amqp = {
        let p = Section::Amqp.key();
        let t = w.section(tree, p).unwrap_or(&empty);
        w.unknown_keys(
            t,
            p,
            &[
                "url",
                "url-file",
                "prefix",
                "queue-type",
                "delivery-limit",
                "declare",
            ],
        );
        let url = w.secret_url(
            t,
            p,
            "url",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            &["amqp", "amqps"],
        );
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
        let delivery_limit = w.int_in(t, p, "delivery-limit", 1, 1000, 5) as u32;
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
                prefix,
                queue_type,
                delivery_limit,
            },
            declare,
        )
    };
    let (amqp, amqp_declare) = amqp;
    let tls = {
        let p = Section::Tls.key();
        let t = w.section(tree, p).unwrap_or(&empty);
        w.unknown_keys(t, p, &["extra-ca-file"]);
        let extra_ca_file = w.string(t, p, "extra-ca-file").map(PathBuf::from);
        if let Some(path) = &extra_ca_file {
            w.check_ca_file(path, &join(p, "extra-ca-file"));
        }
        TlsConfig { extra_ca_file }
    };
    let admin = {
        let p = Section::Admin.key();
        let t = w.section(tree, p).unwrap_or(&empty);
        w.unknown_keys(t, p, &["listen", "metrics-prefix", "heartbeat-interval"]);
        let listen_text = w
            .string(t, p, "listen")
            .unwrap_or_else(|| "127.0.0.1:9100".to_string());
        let listen = match listen_text.parse() {
            Ok(addr) => addr,
            Err(_) => {
                w.err(
                    join(p, "listen"),
                    format!("{listen_text:?} is not an address like 127.0.0.1:9100 (port 0: any free port)"),
                );
                ([127, 0, 0, 1], 0).into()
            }
        };
        let metrics_prefix = w
            .string(t, p, "metrics-prefix")
            .unwrap_or_else(|| "mailagent".into());
        if !is_metric_name(&metrics_prefix) {
            w.err(
                join(p, "metrics-prefix"),
                "must be letters, digits and underscores, starting with a letter",
            );
        }
        let heartbeat_interval = w.secs(t, p, "heartbeat-interval", 1, 3600, 5);
        AdminConfig {
            listen,
            metrics_prefix,
            heartbeat_interval,
        }
    };
    let token_broker = {
        let t = w
            .section(tree, Section::TokenBroker.key())
            .unwrap_or(&empty);
        parse_token_broker(&mut w, t)
    };
    let form_processor = {
        let p = Section::FormProcessor.key();
        let t = w.section(tree, p).unwrap_or(&empty);
        w.unknown_keys(
            t,
            p,
            &[
                "store",
                "store-file",
                "prefetch",
                "delivery-limit",
                "trusted-authserv-ids",
                "max-workbook-bytes",
                "max-decompressed-bytes",
                "max-sheets",
                "max-rows",
                "max-cells",
                "max-mime-depth",
                "max-mime-parts",
            ],
        );
        let store = w.secret_url(
            t,
            p,
            "store",
            "sqlite://data/records.db",
            &["sqlite", "postgres", "postgresql"],
        );
        FormProcessorConfig {
            store,
            prefetch: w.int_in(t, p, "prefetch", 1, 65535, 64) as u16,
            delivery_limit: w.int_in(t, p, "delivery-limit", 1, 1000, 5) as u32,
            trusted_authserv_ids: w.string_list(t, p, "trusted-authserv-ids"),
            max_workbook_bytes: w.int_in(t, p, "max-workbook-bytes", 1024, 1 << 34, 10 << 20),
            max_decompressed_bytes: w.int_in(
                t,
                p,
                "max-decompressed-bytes",
                1024,
                1 << 36,
                100 << 20,
            ),
            max_sheets: w.int_in(t, p, "max-sheets", 1, 10_000, 64) as u32,
            max_rows: w.int_in(t, p, "max-rows", 1, 10_000_000, 200_000) as u32,
            max_cells: w.int_in(t, p, "max-cells", 1, 1 << 32, 2_000_000),
            max_mime_depth: w.int_in(t, p, "max-mime-depth", 1, 1000, 20) as u32,
            max_mime_parts: w.int_in(t, p, "max-mime-parts", 1, 100_000, 500) as u32,
        }
    };

    let oauth_profiles: Vec<OAuthProfile> = w
        .tables(tree, Section::OAuthProfiles.key())
        .into_iter()
        .filter_map(|(path, t)| parse_profile(&mut w, &path, t))
        .collect();
    let incoming_mail: Vec<IncomingMail> = w
        .tables(tree, Section::IncomingMail.key())
        .into_iter()
        .filter_map(|(path, t)| parse_mail(&mut w, &path, t, &oauth_profiles))
        .collect();
    let topics: Vec<Topic> = w
        .tables(tree, Section::Topics.key())
        .into_iter()
        .filter_map(|(path, t)| parse_topic(&mut w, &path, t))
        .collect();

    w.duplicates(
        Section::OAuthProfiles.key(),
        oauth_profiles.iter().map(|p| p.name.clone()),
        "name",
    );
    w.duplicates(
        Section::IncomingMail.key(),
        incoming_mail.iter().map(|m| m.name.clone()),
        "name",
    );
    w.duplicates(
        Section::Topics.key(),
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

fn parse_token_broker(w: &mut Walker, t: &Dict) -> TokenBrokerConfig {
    let p = Section::TokenBroker.key();
    w.unknown_keys(
        t,
        p,
        &[
            "encryption-key-file",
            "encryption-key-files",
            "token-encryption",
            "refresh-lead-min",
            "refresh-lead-fraction",
            "refresh-max-fraction",
            "forced-refresh-min-interval",
            "failing-retry-interval",
            "backoff-initial-ms",
            "backoff-max",
            "connect-timeout",
            "request-timeout",
            "lock-ttl",
        ],
    );
    let mode = w.string(t, p, "token-encryption");
    let mut key_files: Vec<PathBuf> = Vec::new();
    if let Some(f) = w.string(t, p, "encryption-key-file") {
        key_files.push(PathBuf::from(f));
    }
    key_files.extend(
        w.string_list(t, p, "encryption-key-files")
            .into_iter()
            .map(PathBuf::from),
    );
    let encryption = match mode.as_deref() {
        Some("none") => {
            if !key_files.is_empty() {
                w.err(
                    join(p, "token-encryption"),
                    "is \"none\" but encryption key files are also set: choose one",
                );
            }
            TokenEncryption::None
        }
        None | Some("aes-256-gcm") => {
            if key_files.is_empty() {
                w.err(
                    join(p, "encryption-key-file"),
                    "missing: tokens are encrypted in Redis with this key (base64 of 32 bytes); set token-encryption = \"none\" to store them in clear",
                );
            }
            let mut keys = Vec::new();
            if w.component.reads_token_keys() {
                let mut ids = HashSet::new();
                for (i, file) in key_files.iter().enumerate() {
                    let path = if i == 0 && t.contains_key("encryption-key-file") {
                        join(p, "encryption-key-file")
                    } else {
                        format!("{} ({})", join(p, "encryption-key-files"), file.display())
                    };
                    if let Some(key) = read_key(w, file, &path) {
                        if !ids.insert(key.id.clone()) {
                            w.err(path, "the same key is configured twice");
                        }
                        keys.push(key);
                    }
                }
            }
            TokenEncryption::Aead { key_files, keys }
        }
        Some(other) => {
            w.err(
                join(p, "token-encryption"),
                format!("unknown mode {other:?}: expected \"aes-256-gcm\" (default) or \"none\""),
            );
            TokenEncryption::None
        }
    };
    let lead_fraction = w.fraction(t, p, "refresh-lead-fraction", 0.2);
    let max_fraction = w.fraction(t, p, "refresh-max-fraction", 0.5);
    if lead_fraction > max_fraction {
        w.err(
            join(p, "refresh-lead-fraction"),
            "is larger than refresh-max-fraction",
        );
    }
    TokenBrokerConfig {
        encryption,
        refresh_lead_min: w.secs(t, p, "refresh-lead-min", 0, 86_400, 300),
        refresh_lead_fraction: lead_fraction,
        refresh_max_fraction: max_fraction,
        forced_refresh_min_interval: w.secs(t, p, "forced-refresh-min-interval", 0, 86_400, 30),
        failing_retry_interval: w.secs(t, p, "failing-retry-interval", 1, 86_400, 300),
        backoff_initial: Duration::from_millis(w.int_in(
            t,
            p,
            "backoff-initial-ms",
            1,
            600_000,
            1000,
        )),
        backoff_max: w.secs(t, p, "backoff-max", 1, 86_400, 300),
        connect_timeout: w.secs(t, p, "connect-timeout", 1, 600, 10),
        request_timeout: w.secs(t, p, "request-timeout", 1, 600, 30),
        lock_ttl: w.secs(t, p, "lock-ttl", 1, 3600, 30),
    }
}

/// Reads a token-encryption key file: base64 of 32 bytes, whitespace ignored.
fn read_key(w: &mut Walker, file: &PathBuf, path: &str) -> Option<EncryptionKey> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            w.err(
                path,
                format!("cannot read key file {}: {}", file.display(), e.kind()),
            );
            return None;
        }
    };
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
        Ok(b) => b,
        Err(_) => {
            w.err(path, format!("key file {} is not base64", file.display()));
            return None;
        }
    };
    let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        w.err(
            path,
            format!(
                "key file {} holds {} bytes; expected 32 (e.g. `openssl rand -base64 32`)",
                file.display(),
                bytes.len()
            ),
        );
        return None;
    };
    let id = hex::encode(&sha2::Sha256::digest(key)[..4]);
    Some(EncryptionKey { id, key })
}

fn parse_profile(w: &mut Walker, path: &str, t: &Dict) -> Option<OAuthProfile> {
    w.unknown_keys(
        t,
        path,
        &[
            "name",
            "provider",
            "access-type",
            "description",
            "application-key",
            "application-secret",
            "application-secret-file",
            "authorize-url",
            "token-url",
            "scope",
            "client-auth",
            "allow-insecure",
        ],
    );
    let name = w.name(t, path, "name", None);
    let provider = match w
        .string(t, path, "provider")
        .map(|s| s.to_lowercase())
        .as_deref()
    {
        None | Some("azure") => Provider::Azure,
        Some("generic") => Provider::Generic,
        Some(other) => {
            w.err(
                format!("{path}.provider"),
                format!("unknown provider {other:?}: expected \"azure\" or \"generic\""),
            );
            Provider::Generic
        }
    };
    let access_type = match w
        .string(t, path, "access-type")
        .map(|s| s.to_lowercase())
        .as_deref()
    {
        None | Some("application") => AccessType::Application,
        Some("delegated") => {
            w.err(
                format!("{path}.access-type"),
                "\"delegated\" is not supported yet: use \"application\" (client credentials)",
            );
            AccessType::Application
        }
        Some(other) => {
            w.err(
                format!("{path}.access-type"),
                format!("unknown access type {other:?}: expected \"application\""),
            );
            AccessType::Application
        }
    };
    let description = w.string(t, path, "description").unwrap_or_default();
    let application_key = w.string(t, path, "application-key").unwrap_or_default();
    if application_key.trim().is_empty() {
        w.err(
            format!("{path}.application-key"),
            "missing: the Application (client) ID of the app registration",
        );
    }
    let secret = w.secret(
        t,
        path,
        "application-secret",
        w.component.reads_client_secrets(),
        true,
    );
    let allow_insecure = w.boolean(t, path, "allow-insecure", false);
    let token_url = w.url(t, path, "token-url", allow_insecure, true);
    let authorize_url = w.url(t, path, "authorize-url", allow_insecure, false);
    let scope = match (w.string(t, path, "scope"), provider) {
        (Some(s), _) if !s.trim().is_empty() => s,
        (_, Provider::Azure) => "https://outlook.office365.com/.default".to_string(),
        (_, Provider::Generic) => {
            w.err(
                format!("{path}.scope"),
                "missing: required for provider \"generic\"",
            );
            String::new()
        }
    };
    if provider == Provider::Azure && !scope.ends_with("/.default") {
        w.err(
            format!("{path}.scope"),
            format!("{scope:?}: the client-credentials grant on Entra ID needs a \"/.default\" scope, e.g. https://outlook.office365.com/.default"),
        );
    }
    let client_auth = match w.string(t, path, "client-auth").as_deref() {
        None | Some("body") => ClientAuth::Body,
        Some("basic") => ClientAuth::Basic,
        Some(other) => {
            w.err(
                format!("{path}.client-auth"),
                format!("unknown client authentication {other:?}: expected \"body\" or \"basic\""),
            );
            ClientAuth::Body
        }
    };
    Some(OAuthProfile {
        name: name?,
        provider,
        access_type,
        description,
        application_key,
        application_secret: secret,
        authorize_url,
        token_url: token_url?,
        scope,
        client_auth,
        allow_insecure,
    })
}

fn parse_mail(
    w: &mut Walker,
    path: &str,
    t: &Dict,
    profiles: &[OAuthProfile],
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
    let max_message_bytes = w.int_in(t, path, "max-message-bytes", 1024, 1 << 34, 35 << 20);
    let idle = w.boolean(t, path, "idle", true);
    let batch_size = w.int_in(t, path, "batch-size", 1, 10_000, 200) as u32;
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
    })
}

fn parse_topic(w: &mut Walker, path: &str, t: &Dict) -> Option<Topic> {
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

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
