//! Building configurations for tests: each test gets its own Redis and AMQP
//! prefix, a free admin port and a temporary directory for secret files, so
//! tests run in parallel against the shared test servers.

use std::path::{Path, PathBuf};

use common::config::{load, Component, Config, LoadOptions};

use crate::env::{unique, Endpoints};

/// A per-test configuration under construction: a TOML text plus files.
pub struct TestConfig {
    /// Temporary directory holding the config and secret files.
    pub dir: tempfile::TempDir,
    /// Redis key prefix of this test.
    pub redis_prefix: String,
    /// AMQP name prefix of this test.
    pub amqp_prefix: String,
    /// The TOML text.
    pub toml: String,
}

impl TestConfig {
    /// Base sections pointing at the test servers, with a fresh token key
    /// and a fresh prefix.
    pub fn new(env: &Endpoints) -> Self {
        Self::with_prefix(env, &unique("t"))
    }

    /// Base sections with `prefix` as the Redis and AMQP prefix.
    pub fn with_prefix(env: &Endpoints, prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mailagent-{prefix}-"))
            .tempdir()
            .expect("tempdir");
        let key: [u8; 32] = rand::random();
        use base64::Engine;
        std::fs::write(
            dir.path().join("token-key"),
            base64::engine::general_purpose::STANDARD.encode(key),
        )
        .expect("write key");
        let redis_prefix = prefix.to_string();
        let amqp_prefix = redis_prefix.clone();
        let toml = format!(
            r#"[redis]
url = "{redis}"
prefix = "{redis_prefix}"
[amqp]
url = "{amqp}"
prefix = "{amqp_prefix}"
[tls]
extra-ca-file = "{ca}"
[admin]
listen = "127.0.0.1:0"
heartbeat-interval = 1
[token-broker]
encryption-key-file = "{key}"
"#,
            redis = env.redis_url(),
            amqp = env.amqp_url(),
            ca = env.ca_file().display(),
            key = dir.path().join("token-key").display(),
        );
        Self {
            dir,
            redis_prefix,
            amqp_prefix,
            toml,
        }
    }

    /// Writes a file into the test directory and returns its path.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write file");
        path
    }

    /// Appends TOML (a profile, a mail config, a topic, more settings).
    pub fn push(&mut self, toml: &str) -> &mut Self {
        self.toml.push('\n');
        self.toml.push_str(toml);
        self
    }

    /// Adds a `[token-broker]`-section key (placed before any array table).
    pub fn broker_setting(&mut self, line: &str) -> &mut Self {
        self.section_line("token-broker", line)
    }

    /// Adds `line` (`key = value`) to `[section]`, adding the section
    /// before the first array table when it is missing. A key already in
    /// the section is replaced.
    pub fn section_line(&mut self, section: &str, line: &str) -> &mut Self {
        let header = format!("[{section}]\n");
        let start = match find_header(&self.toml, &header) {
            Some(at) => at + header.len(),
            None => {
                let at = self.toml.find("\n[[").map_or(self.toml.len(), |i| i + 1);
                self.toml.insert_str(at, &header);
                at + header.len()
            }
        };
        let end = self.toml[start..]
            .find("\n[")
            .map_or(self.toml.len(), |i| start + i + 1);
        let key = line.split('=').next().unwrap_or_default().trim();
        let existing = self.toml[start..end]
            .lines()
            .find(|l| l.split('=').next().unwrap_or_default().trim() == key)
            .map(str::to_string);
        match existing {
            Some(old) => {
                let at = start + self.toml[start..end].find(&old).expect("line");
                self.toml.replace_range(at..at + old.len(), line);
            }
            None => self.toml.insert_str(start, &format!("{line}\n")),
        }
        self
    }

    /// Removes `key` from `[section]` (e.g. `url`, where a list of nodes
    /// replaces it).
    pub fn remove_key(&mut self, section: &str, key: &str) -> &mut Self {
        let header = format!("[{section}]\n");
        let Some(at) = find_header(&self.toml, &header) else {
            return self;
        };
        let start = at + header.len();
        let end = self.toml[start..]
            .find("\n[")
            .map_or(self.toml.len(), |i| start + i + 1);
        let kept: String = self.toml[start..end]
            .lines()
            .filter(|l| l.split('=').next().unwrap_or_default().trim() != key)
            .map(|l| format!("{l}\n"))
            .collect();
        self.toml.replace_range(start..end, &kept);
        self
    }

    /// Points the config at other Redis and AMQP URLs (relays, other users).
    pub fn servers(&mut self, redis_url: &str, amqp_url: &str) -> &mut Self {
        self.section_line("redis", &format!("url = \"{redis_url}\""))
            .section_line("amqp", &format!("url = \"{amqp_url}\""))
    }

    /// Points `[amqp]` at several nodes: `urls = [...]` instead of `url`.
    pub fn amqp_urls(&mut self, urls: &[String]) -> &mut Self {
        let list = toml_list(urls.iter().map(String::as_str));
        self.remove_key("amqp", "url")
            .section_line("amqp", &format!("urls = {list}"))
    }

    /// Replaces `[redis] url` by the Sentinels of `scripts/services up
    /// --cluster` and their master name.
    pub fn redis_sentinel(&mut self, env: &Endpoints) -> &mut Self {
        let list = toml_list(env.get("MAILAGENT_TEST_SENTINELS").split(','));
        self.remove_key("redis", "url");
        self.section_line("redis", &format!("sentinels = {list}"))
            .section_line(
                "redis",
                &format!(
                    "master-name = \"{}\"",
                    env.get("MAILAGENT_TEST_SENTINEL_MASTER")
                ),
            )
    }

    /// Replaces `[redis] url` by the Redis Cluster `nodes` (in this order).
    pub fn redis_cluster(&mut self, nodes: &[String]) -> &mut Self {
        let list = toml_list(nodes.iter().map(String::as_str));
        self.remove_key("redis", "url");
        self.section_line("redis", &format!("cluster = {list}"))
    }

    /// Tokens in Redis in clear (`token-encryption = "none"`) instead of
    /// sealed with the generated key.
    pub fn no_token_encryption(&mut self) -> &mut Self {
        let line = format!(
            "encryption-key-file = \"{}\"\n",
            self.dir.path().join("token-key").display()
        );
        self.toml = self.toml.replacen(&line, "", 1);
        self.broker_setting("token-encryption = \"none\"")
    }

    /// Sets the form processor's record store.
    pub fn store(&mut self, url: &str) -> &mut Self {
        self.section_line("form-processor", &format!("store = \"{url}\""))
    }

    /// A SQLite record store in the test directory; returns its URL.
    pub fn sqlite_store(&mut self) -> String {
        let url = format!("sqlite://{}/records.db", self.dir.path().display());
        self.store(&url);
        url
    }

    /// Adds an `[[oauth-profiles]]` table: `name` and the `body` lines.
    pub fn oauth_profile(&mut self, name: &str, body: &str) -> &mut Self {
        self.push(&format!("[[oauth-profiles]]\nname = \"{name}\"\n{body}"))
    }

    /// Adds an OAuth profile for the test IdP (http token URL, allowed insecure).
    pub fn idp_profile(
        &mut self,
        name: &str,
        token_url: &str,
        client_id: &str,
        secret: &str,
    ) -> &mut Self {
        let secret_file = self.file(&format!("{name}-secret"), secret);
        self.oauth_profile(
            name,
            &format!(
                r#"provider = "azure"
application-key = "{client_id}"
application-secret-file = "{secret}"
token-url = "{token_url}"
allow-insecure = true
"#,
                secret = secret_file.display()
            ),
        )
    }

    /// Adds an `[[incoming-mail]]` table (see [`mail_table`]).
    pub fn incoming_mail(&mut self, table: &str) -> &mut Self {
        self.push(&format!("[[incoming-mail]]\n{table}\n"))
    }

    /// Adds a `[[topics]]` table for lease forms under `subject`: module
    /// `triContract`, business object `triLeaseAbstract`, then `body`.
    pub fn topic(&mut self, subject: &str, body: &str) -> &mut Self {
        self.push(&format!(
            "[[topics]]\nsubject = \"{subject}\"\nmodule = \"triContract\"\nbusiness-object = \"triLeaseAbstract\"\n{body}"
        ))
    }

    /// The usual lease topic: `triIdTX` required and unique, senders
    /// `@contoso.com`.
    pub fn lease_topic(&mut self) -> &mut Self {
        self.topic(
            crate::forms::LEASE_SUBJECT,
            "required = [\"triIdTX\"]\nunique = [\"triIdTX\"]\nsenders = [\"@contoso.com\"]\n",
        )
    }

    /// The config file path (written on each call).
    pub fn path(&self) -> PathBuf {
        self.file("config.toml", &self.toml)
    }

    /// The config file `component` runs with: this one with the
    /// component's least-privilege users (`crate::restricted`).
    pub fn path_for(&self, component: Component) -> PathBuf {
        self.file(
            &format!("config-{}.toml", component.name()),
            &crate::restricted::restrict(&self.toml, component),
        )
    }

    /// Loads and validates it for `component`, with the component's
    /// least-privilege users.
    pub fn load(&self, component: Component) -> Config {
        let options = LoadOptions {
            path: Some(self.path_for(component)),
            env: vec![],
        };
        load(&options, component)
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{}", self.toml))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Where `header` starts a line of `toml`.
fn find_header(toml: &str, header: &str) -> Option<usize> {
    if toml.starts_with(header) {
        return Some(0);
    }
    toml.find(&format!("\n{header}")).map(|i| i + 1)
}

/// The body of an `[[incoming-mail]]` table: `mailbox` on `localhost:port`
/// as `server_type` (`imaps`, `pop3s`, `pop3`…), then `auth` (an
/// `oauth-profile = …` or `password = …` line) and the `extra` lines; a
/// poll interval of 1 s unless `extra` sets one.
pub fn mail_table(
    name: &str,
    mailbox: &str,
    port: u16,
    server_type: &str,
    auth: &str,
    extra: &str,
) -> String {
    format!(
        "name = \"{name}\"\nhost = \"localhost\"\nport = {port}\nmail-server-type = \"{server_type}\"\nusername = \"{mailbox}\"\n{auth}\n{poll}{extra}",
        poll = if extra.contains("poll-interval") { "" } else { "poll-interval = 1\n" },
    )
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`
/// naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Polls `check` every `every` until it returns true (then true) or
/// `within` has passed (then false).
pub async fn poll<F, Fut>(
    within: std::time::Duration,
    every: std::time::Duration,
    mut check: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// The token broker running in this process on a test config.
pub struct Broker {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Broker {
    /// Starts `token_broker::run` on `cfg`'s broker config.
    pub fn start(cfg: &TestConfig) -> Self {
        let config = cfg.load(Component::TokenBroker);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(token_broker::run(config, shutdown.clone()));
        Self { shutdown, task }
    }

    /// Stops it gracefully within 10 s; panics if it does not exit cleanly.
    pub async fn stop(self) {
        crate::fixture::stop_task(
            &self.shutdown,
            self.task,
            std::time::Duration::from_secs(10),
            "broker",
        )
        .await
        .expect("broker exits cleanly");
    }
}

/// A TOML array of strings.
fn toml_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items.map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A Redis connection to the test server.
pub async fn redis(env: &Endpoints) -> common::RedisHandle {
    redis_at(env.redis_url()).await
}

/// A Redis handle (as the services hold it) to the one server at `url`.
pub async fn redis_at(url: &str) -> common::RedisHandle {
    let client = redis::Client::open(url).expect("redis url");
    let manager = redis::aio::ConnectionManager::new(client.clone())
        .await
        .expect("redis");
    common::RedisHandle::single(manager, client)
}

/// A token client as a fetcher on `cfg` reads tokens (its prefix and
/// encryption keys).
pub async fn token_client(env: &Endpoints, cfg: &TestConfig) -> common::token::TokenClient {
    let config = cfg.load(Component::ImapFetcher);
    common::token::TokenClient::new(
        redis(env).await,
        common::keys::Keys::new(cfg.redis_prefix.clone()),
        &config.token_broker.encryption,
    )
}

/// `profile`'s state as the broker wrote it under `cfg`'s prefix (default
/// when none yet).
pub async fn profile_state(
    env: &Endpoints,
    cfg: &TestConfig,
    profile: &str,
) -> common::token::ProfileState {
    common::token::read_state(
        &mut redis(env).await,
        &common::keys::Keys::new(cfg.redis_prefix.clone()),
        profile,
    )
    .await
    .unwrap()
    .unwrap_or_default()
}
