//! One fetcher test's world, for either protocol: a fresh mailbox granted
//! to a fresh app, Redis and AMQP prefixes of its own, tokens planted as
//! the broker would, configs built with [`TestConfig`], and the queue
//! helpers (drain, depth, purge). [`crate::imap_support::Fixture`] and
//! [`crate::pop_support::Fixture`] are this fixture for IMAP and POP3.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::config::{Component, Config, TokenEncryption};
use common::envelope::Envelope;
use common::keys::Keys;
use common::token::TokenClient;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};

use crate::env::{unique, Endpoints};
use crate::harness::{mail_table, TestConfig};
use crate::idp::Signer;

/// What differs between the IMAP and the POP3 fixture.
pub trait Protocol {
    /// The fetcher the configs are loaded for.
    const COMPONENT: Component;
    /// The OAuth profile name every config of the fixture uses.
    const PROFILE: &'static str;
    /// First letter of the fixture's prefixes.
    const PREFIX: &'static str;
}

/// The IMAP fetcher's fixture.
pub struct Imap;

impl Protocol for Imap {
    const COMPONENT: Component = Component::ImapFetcher;
    const PROFILE: &'static str = "test-profile";
    const PREFIX: &'static str = "t";
}

/// The POP3 fetcher's fixture.
pub struct Pop;

impl Protocol for Pop {
    const COMPONENT: Component = Component::PopFetcher;
    const PROFILE: &'static str = "pop-profile";
    const PREFIX: &'static str = "p";
}

/// One test's world: a mailbox granted to an app, and prefixes of its own.
pub struct Fixture<P: Protocol> {
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
    protocol: PhantomData<P>,
}

impl<P: Protocol> Fixture<P> {
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
            prefix: unique(P::PREFIX),
            dir: tempfile::tempdir().expect("tempdir"),
            protocol: PhantomData,
        }
    }

    /// A token Dovecot accepts for this app; `offset_secs` shifts its
    /// validity window (negative: already expired).
    pub fn mint(&self, lifetime: Duration, offset_secs: i64) -> String {
        let roles: Vec<String> = crate::idp::ROLES.iter().map(|r| r.to_string()).collect();
        Signer::trusted(&self.env).mint(&self.app, &roles, lifetime, offset_secs)
    }

    /// A Redis connection.
    pub async fn redis(&self) -> common::RedisHandle {
        crate::harness::redis_at(self.env.redis_url()).await
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
            .store(P::PROFILE, token, exp)
            .await
            .expect("store token");
    }

    /// Plants a fresh valid token.
    pub async fn plant_token(&self) {
        self.plant(&self.mint(Duration::from_secs(3600), 0)).await;
    }

    /// Plants a token whose JWT expired an hour ago while Redis still holds
    /// it as current (as when it expires between polls); returns it as
    /// stored, the one a forced-refresh request names.
    pub async fn plant_expired_token(&self) -> common::token::AccessToken {
        let expired = self.mint(Duration::from_secs(60), -3600);
        self.tokens()
            .await
            .store(P::PROFILE, &expired, common::heartbeat::now_secs() + 600)
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

    /// A mail table for `mailbox` on `localhost:port` with the fixture's
    /// profile; `extra` lines are appended.
    pub fn mail_table_for(
        &self,
        name: &str,
        mailbox: &str,
        port: u16,
        server_type: &str,
        extra: &str,
    ) -> String {
        let auth = format!("oauth-profile = \"{}\"", P::PROFILE);
        mail_table(name, mailbox, port, server_type, &auth, extra)
    }

    /// The fixture's configuration with `mail` as `[[incoming-mail]]`
    /// tables: tokens in clear, and a profile whose token URL nobody
    /// serves (the tests plant the tokens).
    pub fn test_config(&self, mail: &[String]) -> TestConfig {
        let mut cfg = TestConfig::with_prefix(&self.env, &self.prefix);
        cfg.no_token_encryption().oauth_profile(
            P::PROFILE,
            &format!(
                r#"provider = "generic"
application-key = "{app}"
application-secret = "unused"
token-url = "http://127.0.0.1:9/token"
scope = "https://outlook.office365.com/.default"
allow-insecure = true
"#,
                app = self.app,
            ),
        );
        for m in mail {
            cfg.incoming_mail(m);
        }
        cfg
    }

    /// The TOML of [`Self::test_config`].
    pub fn config_toml(&self, mail: &[String]) -> String {
        self.test_config(mail).toml
    }

    /// Writes a config file, with the fetcher's least-privilege users
    /// (`crate::restricted`), and loads it as the fetcher would.
    pub fn config(&self, mail: &[String]) -> (Config, PathBuf) {
        let cfg = self.test_config(mail);
        let path = self.dir.path().join(format!("{}.toml", unique("cfg")));
        std::fs::copy(cfg.path_for(P::COMPONENT), &path).expect("write config");
        (cfg.load(P::COMPONENT), path)
    }

    /// The CREATE queue's name.
    pub fn queue(&self) -> String {
        format!("{}.create", self.prefix)
    }

    /// An AMQP channel, with the topology declared first, so draining works
    /// before the fetcher has started.
    pub async fn channel(&self) -> lapin::Channel {
        let (config, _) = self.config(&[]);
        channel_with_topology(self.env.amqp_url(), &config.amqp).await
    }

    /// Starts the fetcher binary with config `path` (short lease and
    /// backoff times), logging to `log` in the fixture's directory.
    pub fn spawn(&self, path: &std::path::Path, log: &str) -> tokio::process::Child {
        crate::process::launch(P::COMPONENT.name(), path)
            .fast_fetch(3)
            .log_level("info")
            .log(&self.dir.path().join(log))
            .spawn()
    }

    /// Current lease owners (instance ids) of the mail configs `configs`.
    pub async fn lease_owners(&self, configs: &[String]) -> HashMap<String, String> {
        use redis::AsyncCommands;
        let mut redis = self.redis().await;
        let keys = self.keys();
        let mut out = HashMap::new();
        for c in configs {
            let o: Option<String> = redis.get(keys.lease(c)).await.unwrap_or(None);
            if let Some(o) = o {
                out.insert(c.clone(), o);
            }
        }
        out
    }

    /// The mail config `config`'s checkpoint hash (empty before the first).
    pub async fn checkpoint(&self, config: &str) -> HashMap<String, String> {
        use redis::AsyncCommands;
        let mut r = self.redis().await;
        r.hgetall(self.keys().checkpoint(config))
            .await
            .expect("hgetall")
    }

    /// The last error in this prefix's heartbeats of the fetcher, if any.
    pub async fn last_error(&self) -> Option<String> {
        let mut redis = self.redis().await;
        common::heartbeat::list_agents(&mut redis, &self.keys())
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.component == P::COMPONENT.name())
            .find_map(|a| a.last_error)
    }

    /// A relay in front of RabbitMQ (cut it to take RabbitMQ "down" for
    /// this test alone), and the AMQP URL through it.
    pub async fn amqp_relay(&self) -> (crate::relay::Relay, common::secret::SecretUrl) {
        relay_to(self.env.amqp_url()).await
    }

    /// A relay in front of Redis (stall or cut it for this test alone), and
    /// the Redis URL through it.
    pub async fn redis_relay(&self) -> (crate::relay::Relay, common::secret::SecretUrl) {
        relay_to(self.env.redis_url()).await
    }

    /// Files in the mailbox's Maildir (`new` + `cur`): the maildrop's size.
    pub fn maildrop_len(&self) -> usize {
        crate::maildir::len(&self.env, &self.mailbox)
    }

    /// The maildrop size of any mailbox.
    pub fn maildrop_len_of(&self, mailbox: &str) -> usize {
        crate::maildir::len(&self.env, mailbox)
    }
}

/// A relay to the server of `url`, and `url` through it.
async fn relay_to(url: &str) -> (crate::relay::Relay, common::secret::SecretUrl) {
    let mut url: url::Url = url.parse().expect("server url");
    let target = format!(
        "{}:{}",
        url.host_str().expect("host"),
        url.port().expect("port")
    )
    .parse()
    .expect("loopback address");
    let relay = crate::relay::Relay::start(target).await;
    url.set_port(Some(relay.addr.port())).expect("port");
    (relay, common::secret::SecretUrl::new(url.to_string()))
}

/// Cancels `shutdown` and waits up to `within` for `task`, a component
/// running in this process; its result. Panics, naming `what`, when the
/// task does not end in time or panicked.
pub async fn stop_task<T>(
    shutdown: &common::shutdown::CancellationToken,
    task: tokio::task::JoinHandle<T>,
    within: Duration,
    what: &str,
) -> T {
    shutdown.cancel();
    tokio::time::timeout(within, task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not stop within {within:?}"))
        .unwrap_or_else(|e| panic!("{what} task: {e}"))
}

/// A channel on the broker at `url` with `amqp`'s topology declared, so a
/// test can drain queues before (or without) a component declaring it.
pub async fn channel_with_topology(url: &str, amqp: &common::config::AmqpConfig) -> lapin::Channel {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    common::topology::declare(&channel, amqp, false)
        .await
        .expect("declare topology");
    channel
}

/// Publishes `body` with routing key `create` to `exchange` on a new
/// confirm-mode channel of `conn` (`mandatory`: returned when unroutable);
/// the broker's confirmation, or the error it refused the publish with.
pub async fn publish_confirmed(
    conn: &lapin::Connection,
    exchange: &str,
    body: &[u8],
    mandatory: bool,
) -> lapin::Result<lapin::publisher_confirm::Confirmation> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    let options = lapin::options::BasicPublishOptions {
        mandatory,
        ..Default::default()
    };
    channel
        .basic_publish(
            exchange,
            "create",
            options,
            body,
            lapin::BasicProperties::default(),
        )
        .await?
        .await
}

/// Waits up to 10 s for a message on `queue` (`what`, in the failure) and
/// takes it without an ack.
pub async fn take_one(
    channel: &lapin::Channel,
    queue: &str,
    what: &str,
) -> lapin::message::BasicGetMessage {
    crate::harness::wait_for(what, Duration::from_secs(10), || async {
        channel
            .basic_get(queue, BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    })
    .await
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

/// The message-id property of a delivery ("" when it has none).
pub fn message_id(properties: &lapin::BasicProperties) -> String {
    properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_default()
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
pub async fn eventually<F, Fut>(deadline: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    crate::harness::poll(deadline, Duration::from_millis(100), check).await
}
