//! Support for the IMAP fetcher's tests: a per-test fixture (mailbox, app
//! grant, token, AMQP and Redis prefixes, config file), mailbox seeding
//! (Maildir files for bulk, IMAP APPEND as the master user for single
//! messages), mailbox inspection (flags, folders) and queue draining.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::config::{Component, Config, LoadOptions, TokenEncryption};
use common::envelope::Envelope;
use common::keys::Keys;
use common::token::TokenClient;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};

use crate::env::{unique, Endpoints};
use crate::idp::Signer;
use crate::mailclient::{self, Conn};

/// The OAuth profile name every fixture config uses.
pub const PROFILE: &str = "test-profile";

/// One test's world: a mailbox granted to an app, and prefixes of its own.
pub struct Fixture {
    /// The servers.
    pub env: Endpoints,
    /// The application (client) id.
    pub app: String,
    /// The mailbox address (lowercase).
    pub mailbox: String,
    /// AMQP and Redis prefix.
    pub prefix: String,
    /// Holds the config files.
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// A fresh mailbox granted to a fresh app, with unique prefixes.
    pub fn new(label: &str) -> Self {
        let env = Endpoints::load();
        let app = uuid::Uuid::new_v4().to_string();
        let mailbox = format!("{}@example.com", unique(label));
        env.grant(&app, &mailbox);
        Self {
            env,
            app,
            mailbox,
            prefix: unique("t"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A token Dovecot accepts for this app.
    pub fn mint(&self, lifetime: Duration) -> String {
        let roles: Vec<String> = crate::idp::ROLES.iter().map(|r| r.to_string()).collect();
        Signer::trusted(&self.env).mint(&self.app, &roles, lifetime, 0)
    }

    /// Plants a token whose JWT expired an hour ago while Redis still holds
    /// it as current (as when it expires between polls); returns it as
    /// stored, the one a forced-refresh request names.
    pub async fn plant_expired_token(&self) -> common::token::AccessToken {
        let roles: Vec<String> = crate::idp::ROLES.iter().map(|r| r.to_string()).collect();
        let expired =
            Signer::trusted(&self.env).mint(&self.app, &roles, Duration::from_secs(60), -3600);
        self.tokens()
            .await
            .store(PROFILE, &expired, common::heartbeat::now_secs() + 600)
            .await
            .expect("store token")
    }

    /// Subscribed to the fetchers' forced-refresh requests, as the broker is.
    pub async fn refresh_requests(&self) -> redis::aio::PubSub {
        let client = redis::Client::open(self.env.redis_url()).expect("redis url");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub
            .subscribe(self.keys().token_refresh_channel())
            .await
            .expect("subscribe");
        pubsub
    }

    /// A Redis connection.
    pub async fn redis(&self) -> redis::aio::ConnectionManager {
        let client = redis::Client::open(self.env.redis_url()).expect("redis url");
        redis::aio::ConnectionManager::new(client)
            .await
            .expect("redis")
    }

    /// Redis key names under this test's prefix.
    pub fn keys(&self) -> Keys {
        Keys::new(self.prefix.clone())
    }

    /// The token client (tokens in clear, as configured by the fixture).
    pub async fn tokens(&self) -> TokenClient {
        TokenClient::new(self.redis().await, self.keys(), &TokenEncryption::None)
    }

    /// Plants a fresh valid token for the profile, as the broker would.
    pub async fn plant_token(&self) {
        let token = self.mint(Duration::from_secs(3600));
        let exp = common::heartbeat::now_secs() + 3500;
        self.tokens()
            .await
            .store(PROFILE, &token, exp)
            .await
            .expect("store token");
    }

    /// The TOML of a config with `mail` as `[[incoming-mail]]` tables (each
    /// a string of `key = value` lines).
    pub fn config_toml(&self, mail: &[String]) -> String {
        let mut s = format!(
            r#"[redis]
url = "{redis}"
prefix = "{prefix}"
[amqp]
url = "{amqp}"
prefix = "{prefix}"
[tls]
extra-ca-file = "{ca}"
[token-broker]
token-encryption = "none"
[admin]
listen = "127.0.0.1:0"
heartbeat-interval = 1

[[oauth-profiles]]
name = "{PROFILE}"
provider = "generic"
application-key = "{app}"
application-secret = "unused"
token-url = "http://127.0.0.1:9/token"
scope = "https://outlook.office365.com/.default"
allow-insecure = true
"#,
            redis = self.env.redis_url(),
            amqp = self.env.amqp_url(),
            prefix = self.prefix,
            ca = self.env.ca_file().display(),
            app = self.app,
        );
        for m in mail {
            s.push_str("\n[[incoming-mail]]\n");
            s.push_str(m);
            s.push('\n');
        }
        s
    }

    /// A mail config table for `mailbox` over IMAPS with XOAUTH2; `extra`
    /// lines are appended (they may override nothing already set).
    pub fn mail_table(&self, name: &str, mailbox: &str, extra: &str) -> String {
        let addr = self.env.mail_addr("IMAPS");
        format!(
            "name = \"{name}\"\nhost = \"localhost\"\nport = {port}\nmail-server-type = \"imaps\"\nusername = \"{mailbox}\"\noauth-profile = \"{PROFILE}\"\n{poll}{extra}",
            port = addr.port(),
            poll = if extra.contains("poll-interval") { "" } else { "poll-interval = 1\n" },
        )
    }

    /// Writes a config file, with the fetcher's least-privilege users
    /// (`crate::restricted`), and loads it as the fetcher would.
    pub fn config(&self, mail: &[String]) -> (Config, PathBuf) {
        let path = self.dir.path().join(format!("{}.toml", unique("cfg")));
        let toml = crate::restricted::restrict(&self.config_toml(mail), Component::ImapFetcher);
        std::fs::write(&path, toml).expect("write config");
        let config = common::config::load(
            &LoadOptions {
                path: Some(path.clone()),
                env: vec![],
            },
            Component::ImapFetcher,
        )
        .unwrap_or_else(|e| panic!("config: {e}"));
        (config, path)
    }

    /// The CREATE queue's name.
    pub fn queue(&self) -> String {
        format!("{}.create", self.prefix)
    }

    /// Opens an AMQP channel.
    pub async fn channel(&self) -> lapin::Channel {
        let conn =
            lapin::Connection::connect(self.env.amqp_url(), lapin::ConnectionProperties::default())
                .await
                .expect("amqp");
        let channel = conn.create_channel().await.expect("channel");
        // Declare the topology first, so draining works before the fetcher
        // has started.
        let (config, _) = self.config(&[]);
        common::topology::declare(&channel, &config.amqp, false)
            .await
            .expect("declare topology");
        channel
    }
}

/// A test message: unique Message-ID, `size` bytes or a little more.
pub fn message(tag: &str, i: usize, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.com\r\nTo: forms@example.com\r\nSubject: test {tag} {i}\r\nMessage-ID: <{tag}.{i}@test.example>\r\nDate: Thu, 01 Feb 2024 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    let line = format!("message {i} of {tag} padding padding padding padding padding\r\n");
    while m.len() < size {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// The Maildir of a mailbox.
pub fn maildir(env: &Endpoints, mailbox: &str) -> PathBuf {
    let layout = env
        .get("MAILAGENT_TEST_MAIL_LAYOUT")
        .replace("%u", &mailbox.to_lowercase());
    PathBuf::from(env.get("MAILAGENT_TEST_MAIL_ROOT")).join(layout)
}

fn owner_ids(env: &Endpoints) -> (u32, u32) {
    let user = env.get("MAILAGENT_TEST_MAIL_OWNER");
    let id = |flag: &str| -> u32 {
        let out = std::process::Command::new("id")
            .arg(flag)
            .arg(user)
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// Seeds INBOX by writing Maildir files directly (fast for thousands of
/// messages): `tmp/` then rename into `new/`, owned by the mail user.
/// Dovecot assigns UIDs when it next looks at the folder.
pub fn seed_maildir(env: &Endpoints, mailbox: &str, messages: &[Vec<u8>]) {
    let root = maildir(env, mailbox);
    let (uid, gid) = owner_ids(env);
    let home = root.parent().expect("home").to_path_buf();
    for dir in [
        &home,
        &root,
        &root.join("cur"),
        &root.join("new"),
        &root.join("tmp"),
    ] {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown dir");
    }
    let stamp = common::heartbeat::now_secs();
    for (i, m) in messages.iter().enumerate() {
        let name = format!("{stamp}.M{i:06}P{}.seed,S={}", std::process::id(), m.len());
        let tmp = root.join("tmp").join(&name);
        let mut f = std::fs::File::create(&tmp).expect("create");
        f.write_all(m).expect("write");
        drop(f);
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).expect("chown");
        std::fs::rename(&tmp, root.join("new").join(&name)).expect("rename");
    }
}

/// A master-user IMAP session on `mailbox` (for seeding and inspection).
pub async fn master(
    env: &Endpoints,
    mailbox: &str,
) -> Conn<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut c = mailclient::connect_tls(env.mail_addr("IMAPS"), &env.ca_file())
        .await
        .expect("connect");
    mailclient::imap_greeting(&mut c).await.expect("greeting");
    let login = format!(
        "LOGIN \"{mailbox}{sep}{user}\" \"{pw}\"",
        sep = env.get("MAILAGENT_TEST_MASTER_SEPARATOR"),
        user = env.get("MAILAGENT_TEST_MASTER_USER"),
        pw = env.get("MAILAGENT_TEST_MASTER_PASSWORD"),
    );
    let (_, tagged) = mailclient::imap_command(&mut c, "m0", &login)
        .await
        .expect("login");
    assert!(tagged.starts_with("m0 OK"), "master login: {tagged}");
    c
}

/// Appends one message to `folder` as the master user.
pub async fn append(env: &Endpoints, mailbox: &str, folder: &str, message: &[u8]) {
    let mut c = master(env, mailbox).await;
    mailclient::imap_append(&mut c, "m1", &format!("\"{folder}\""), message)
        .await
        .expect("append");
}

/// Creates a folder (name already in modified UTF-7 as needed).
pub async fn create_folder(env: &Endpoints, mailbox: &str, wire_name: &str) {
    let mut c = master(env, mailbox).await;
    let (_, tagged) = mailclient::imap_command(&mut c, "m1", &format!("CREATE \"{wire_name}\""))
        .await
        .expect("create");
    assert!(tagged.starts_with("m1 OK"), "{tagged}");
}

/// UID → flags of every message in a folder (wire name).
pub async fn flags(env: &Endpoints, mailbox: &str, folder: &str) -> BTreeMap<u32, String> {
    let mut c = master(env, mailbox).await;
    let (_, tagged) = mailclient::imap_command(&mut c, "m1", &format!("SELECT \"{folder}\""))
        .await
        .expect("select");
    assert!(tagged.starts_with("m1 OK"), "{tagged}");
    let (lines, tagged) = mailclient::imap_command(&mut c, "m2", "UID FETCH 1:* (UID FLAGS)")
        .await
        .expect("fetch");
    assert!(tagged.starts_with("m2 OK"), "{tagged}");
    let mut out = BTreeMap::new();
    for l in lines {
        let Some(i) = l.find("UID ") else { continue };
        let uid: u32 = l[i + 4..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let flags = l
            .find("FLAGS (")
            .map(|f| {
                let rest = &l[f + 7..];
                rest[..rest.find(')').unwrap_or(rest.len())].to_string()
            })
            .unwrap_or_default();
        out.insert(uid, flags);
    }
    out
}

/// Takes up to `count` envelopes from `queue` (acking them), polling until
/// `deadline` passes; returns what arrived.
pub async fn drain(
    channel: &lapin::Channel,
    queue: &str,
    count: usize,
    deadline: Duration,
) -> Vec<Envelope> {
    let end = Instant::now() + deadline;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < end {
        match channel
            .basic_get(queue, BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            Some(msg) => {
                let d = msg.delivery;
                let env = Envelope::from_amqp(&d.properties, d.data.clone()).expect("envelope");
                d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                out.push(env);
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    out
}

/// Ready messages in a queue (0 when it does not exist yet).
pub async fn depth(channel: &lapin::Channel, queue: &str) -> u32 {
    common::topology::queue_depth(channel, queue)
        .await
        .unwrap_or(0)
}

/// Empties a queue.
pub async fn purge(channel: &lapin::Channel, queue: &str) {
    let _ = channel
        .queue_purge(queue, QueuePurgeOptions::default())
        .await;
}

/// Polls `check` every 100 ms until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
