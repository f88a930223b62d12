//! Support for the POP3 fetcher's tests: a per-test fixture (mailbox, app
//! grant, token, AMQP and Redis prefixes, config), Maildir seeding and
//! inspection, queue draining, and an in-process fetcher.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::config::{Component, Config, LoadOptions, TokenEncryption};
use common::envelope::Envelope;
use common::keys::Keys;
use common::shutdown::CancellationToken;
use common::token::TokenClient;
use lapin::options::{BasicAckOptions, BasicGetOptions};

use crate::env::{unique, Endpoints};
use crate::idp::Signer;

/// The OAuth profile name every fixture config uses.
pub const PROFILE: &str = "pop-profile";

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
    /// Holds config files.
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
            prefix: unique("p"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A token Dovecot accepts for this app; `offset_secs` shifts its
    /// validity window (negative: already expired).
    pub fn mint(&self, lifetime: Duration, offset_secs: i64) -> String {
        let roles: Vec<String> = crate::idp::ROLES.iter().map(|r| r.to_string()).collect();
        Signer::trusted(&self.env).mint(&self.app, &roles, lifetime, offset_secs)
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

    /// The token client (tokens in clear, as the fixture configures).
    pub async fn tokens(&self) -> TokenClient {
        TokenClient::new(self.redis().await, self.keys(), &TokenEncryption::None)
    }

    /// Stores `token` as the profile's current token, valid for an hour as
    /// far as Redis knows, as the broker would.
    pub async fn plant(&self, token: &str) {
        let exp = common::heartbeat::now_secs() + 3500;
        self.tokens()
            .await
            .store(PROFILE, token, exp)
            .await
            .expect("store token");
    }

    /// Plants a fresh valid token.
    pub async fn plant_token(&self) {
        self.plant(&self.mint(Duration::from_secs(3600), 0)).await;
    }

    /// A `[[incoming-mail]]` table: `listener` is `POP3S` or `POP3`; `extra`
    /// lines are appended.
    pub fn mail_table(&self, name: &str, listener: &str, extra: &str) -> String {
        let addr = self.env.mail_addr(listener);
        self.mail_table_at(
            name,
            addr.port(),
            if listener == "POP3" { "pop3" } else { "pop3s" },
            extra,
        )
    }

    /// A mail table for a server on `port` of `localhost`.
    pub fn mail_table_at(&self, name: &str, port: u16, server_type: &str, extra: &str) -> String {
        self.mail_table_for(name, &self.mailbox, port, server_type, extra)
    }

    /// A mail table for `mailbox` (another mailbox than the fixture's, e.g.
    /// one per config when several configs share a replica set).
    pub fn mail_table_for(
        &self,
        name: &str,
        mailbox: &str,
        port: u16,
        server_type: &str,
        extra: &str,
    ) -> String {
        format!(
            "name = \"{name}\"\nhost = \"localhost\"\nport = {port}\nmail-server-type = \"{server_type}\"\nusername = \"{mailbox}\"\noauth-profile = \"{PROFILE}\"\n{poll}{extra}",
            poll = if extra.contains("poll-interval") { "" } else { "poll-interval = 1\n" },
        )
    }

    /// The TOML of a config with `mail` as `[[incoming-mail]]` tables.
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

    /// Writes a config file, with the fetcher's least-privilege users
    /// (`crate::restricted`), and loads it as the fetcher would.
    pub fn config(&self, mail: &[String]) -> (Config, PathBuf) {
        let path = self.dir.path().join(format!("{}.toml", unique("cfg")));
        let toml = crate::restricted::restrict(&self.config_toml(mail), Component::PopFetcher);
        std::fs::write(&path, toml).expect("write config");
        let config = common::config::load(
            &LoadOptions {
                path: Some(path.clone()),
                env: vec![],
            },
            Component::PopFetcher,
        )
        .unwrap_or_else(|e| panic!("config: {e}"));
        (config, path)
    }

    /// The CREATE queue's name.
    pub fn queue(&self) -> String {
        format!("{}.create", self.prefix)
    }

    /// An AMQP channel, with the topology declared.
    pub async fn channel(&self) -> lapin::Channel {
        let conn =
            lapin::Connection::connect(self.env.amqp_url(), lapin::ConnectionProperties::default())
                .await
                .expect("amqp");
        let channel = conn.create_channel().await.expect("channel");
        let (config, _) = self.config(&[]);
        common::topology::declare(&channel, &config.amqp, false)
            .await
            .expect("declare topology");
        channel
    }

    /// Files in the mailbox's Maildir (`new` + `cur`): the maildrop's size.
    pub fn maildrop_len(&self) -> usize {
        self.maildrop_len_of(&self.mailbox)
    }

    /// The maildrop size of any mailbox.
    pub fn maildrop_len_of(&self, mailbox: &str) -> usize {
        let root = maildir(&self.env, mailbox);
        ["new", "cur"]
            .iter()
            .map(|d| {
                std::fs::read_dir(root.join(d))
                    .map(|r| r.count())
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// A fetcher running in this process until dropped or stopped.
pub struct InProcess {
    /// Cancels it.
    pub shutdown: CancellationToken,
    /// Its task.
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Starts `pop_fetcher::run` with short backoffs.
    pub fn start(config: Config) -> Self {
        let options = pop_fetcher::Options {
            lease_ttl: Duration::from_secs(3),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(3),
            token_wait: Duration::from_secs(1),
            ..Default::default()
        };
        Self::start_with(config, options)
    }

    /// Starts it with `options`.
    pub fn start_with(config: Config, options: pop_fetcher::Options) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(common::fetch::run(
            pop_fetcher::Pop3,
            config,
            options,
            shutdown.clone(),
        ));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// Graceful stop; returns the run's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("fetcher stops within 15 s")
            .expect("fetcher task")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A test message of about `size` bytes; `dots` adds lines that start with
/// "." (dot-stuffed on the wire).
pub fn message(tag: &str, i: usize, size: usize, dots: bool) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.com\r\nTo: forms@example.com\r\nSubject: pop {tag} {i}\r\nMessage-ID: <{tag}.{i}@pop.example>\r\nDate: Thu, 01 Feb 2024 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    if dots {
        m.extend_from_slice(b".leading dot\r\n..two dots\r\n.\r\n. dot space\r\n");
    }
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

/// Seeds the inbox by writing Maildir files (tmp/ then rename into new/),
/// owned by the mail user.
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
        let name = format!(
            "{stamp}.M{i:06}P{}R{:08x}.seed,S={}",
            std::process::id(),
            rand::random::<u32>(),
            m.len()
        );
        let tmp = root.join("tmp").join(&name);
        let mut f = std::fs::File::create(&tmp).expect("create");
        f.write_all(m).expect("write");
        drop(f);
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).expect("chown");
        std::fs::rename(&tmp, root.join("new").join(&name)).expect("rename");
    }
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

/// Polls `check` every 100 ms until it returns true or the deadline passes.
pub use crate::imap_support::eventually;

/// The last error in this prefix's pop-fetcher heartbeats, if any.
pub async fn last_error(fx: &Fixture) -> Option<String> {
    let mut redis = fx.redis().await;
    let agents = common::heartbeat::list_agents(&mut redis, &fx.keys())
        .await
        .ok()?;
    agents
        .into_iter()
        .filter(|a| a.component == "pop-fetcher")
        .find_map(|a| a.last_error)
}

pub use crate::relay::Relay;
