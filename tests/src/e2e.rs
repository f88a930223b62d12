//! Support for the end-to-end tests (`tests/tests/e2e.rs`): the whole agent
//! as users run it — `token-broker`, three `imap-fetcher` replicas, one
//! `pop-fetcher` and one `form-processor`, each a separate process started
//! from the built binaries — against the real Redis, RabbitMQ and Dovecot
//! of `scripts/services`, with the test identity provider standing in for
//! Entra ID.
//!
//! Each [`Stack`] is one test's world: its own Redis and AMQP prefix, four
//! mailboxes (two IMAP, two POP3 mail configs) granted to its own app, its
//! own SQLite record store, and its own fault injectors:
//!
//! - a [`Relay`] (a cuttable TCP proxy) in front of RabbitMQ and another in front of Redis. Cutting
//!   one closes every connection through it and refuses new ones until it is
//!   restored: to the agent's clients that is exactly what a server restart
//!   looks like, while the shared servers — and every other test running in
//!   parallel — carry on. The data survives the "restart", as it does on a
//!   real broker with durable queues and persistent messages and on a Redis
//!   with AOF persistence (§4 requires one);
//! - an [`IdpFront`] before the identity provider that answers every token
//!   request with Entra's 503 `temporarily_unavailable` while it fails;
//! - process control: every process runs under a small supervisor that
//!   restarts it when it exits, as compose's `restart:` policy or systemd's
//!   `Restart=` does in production; [`Stack::kill_9`] sends SIGKILL and
//!   chooses whether and when it comes back.
//!
//! Mail is built once per batch and written straight into the Maildirs
//! (Dovecot picks it up, IMAP through IDLE, POP3 at the next poll). A batch
//! mixes valid forms with forms that must be rejected, so records *and*
//! rejections are checked exactly: see [`Batch`] and [`Stack::verify`].
//!
//! Logs (one JSON file per process start) and the config are kept when a
//! test fails, or always with `MAILAGENT_E2E_KEEP=1`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::envelope::dedupe_key;
use common::keys::Keys;
use form_processor::store::Store;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::env::{unique, Endpoints};
use crate::forms::{lease_workbook, mail, Attachment, Lease, LEASE_SUBJECT};
use crate::harness::{mail_table, TestConfig};
use crate::idp::TestIdp;
pub use crate::relay::Relay;

/// Form mails per batch (the issue's figure).
pub const BATCH: usize = 1000;

/// Lifetime of the tokens the identity provider issues. Short, so that the
/// broker refreshes several times per test and a broker or identity-provider
/// outage outlives the token in Redis.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(20);

/// The OAuth profile every mail config uses.
pub const PROFILE: &str = "e2e";

/// Which binary a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    /// `token-broker`.
    TokenBroker,
    /// `imap-fetcher`.
    ImapFetcher,
    /// `pop-fetcher`.
    PopFetcher,
    /// `form-processor`.
    FormProcessor,
}

impl Bin {
    /// The binary's (and component's) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::TokenBroker => "token-broker",
            Self::ImapFetcher => "imap-fetcher",
            Self::PopFetcher => "pop-fetcher",
            Self::FormProcessor => "form-processor",
        }
    }

    /// The component the binary loads its configuration as.
    pub fn component(self) -> common::Component {
        match self {
            Self::TokenBroker => common::Component::TokenBroker,
            Self::ImapFetcher => common::Component::ImapFetcher,
            Self::PopFetcher => common::Component::PopFetcher,
            Self::FormProcessor => common::Component::FormProcessor,
        }
    }
}

/// What the supervisor does after the process exits.
#[derive(Debug, Clone, Copy)]
enum Policy {
    /// Start it again after this delay (compose `restart: always`).
    Restart(Duration),
    /// Leave it down.
    Stay,
}

/// What a supervisor and its handle share.
#[derive(Clone)]
struct Shared {
    /// The running process's pid, if one runs.
    pid: Arc<Mutex<Option<u32>>>,
    /// What to do when it exits next.
    policy: Arc<Mutex<Policy>>,
    /// How often it was started.
    starts: Arc<AtomicUsize>,
    /// Stops the process and its supervisor.
    stop: CancellationToken,
}

/// One supervised process.
struct Supervised {
    bin: Bin,
    name: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

/// Delay before the supervisor restarts a process that exited on its own.
const RESTART_DELAY: Duration = Duration::from_secs(1);

impl Supervised {
    fn start(bin: Bin, name: String, config: PathBuf, logs: PathBuf) -> Self {
        let shared = Shared {
            pid: Arc::new(Mutex::new(None)),
            policy: Arc::new(Mutex::new(Policy::Restart(RESTART_DELAY))),
            starts: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let task = tokio::spawn(supervise(bin, name.clone(), config, logs, shared.clone()));
        Self {
            bin,
            name,
            shared,
            task,
        }
    }

    fn pid(&self) -> Option<u32> {
        *self.shared.pid.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn supervise(bin: Bin, name: String, config: PathBuf, logs: PathBuf, shared: Shared) {
    let Shared {
        pid,
        policy,
        starts,
        stop,
    } = shared;
    loop {
        let n = starts.fetch_add(1, Ordering::SeqCst);
        let mut child = crate::process::launch(bin.name(), &config)
            .clean_env()
            .log_level("info")
            .fast_fetch(5)
            .env("MAILAGENT_POP3_TOKEN_WAIT_MS", "2000")
            .log(&logs.join(format!("{name}.{n}.log")))
            .spawn();
        *pid.lock().unwrap_or_else(|e| e.into_inner()) = child.id();
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop.cancelled() => {
                crate::process::stop(&mut child, Duration::from_secs(15)).await;
                *pid.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return;
            }
        };
        *pid.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let next = *policy.lock().unwrap_or_else(|e| e.into_inner());
        let Policy::Restart(delay) = next else {
            eprintln!("[e2e] {name} exited ({status:?}); left down");
            return;
        };
        eprintln!("[e2e] {name} exited ({status:?}); restarting in {delay:?}");
        *policy.lock().unwrap_or_else(|e| e.into_inner()) = Policy::Restart(RESTART_DELAY);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// An HTTP front before the test identity provider: it forwards token
/// requests while healthy, and while failing cuts every forwarded
/// connection and answers each request with Entra's 503
/// `temporarily_unavailable` body.
pub struct IdpFront {
    /// Where the broker sends token requests.
    pub addr: SocketAddr,
    relay: Relay,
    refused: Arc<AtomicUsize>,
}

impl Drop for IdpFront {
    fn drop(&mut self) {
        self.relay.stop();
    }
}

impl IdpFront {
    /// Starts a front forwarding to `target`: a [`Relay`] whose diversion
    /// answers 503.
    pub async fn start(target: SocketAddr) -> Self {
        let refused = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&refused);
        let relay = Relay::with_diversion(target, move |mut inbound| {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                if read_request(&mut inbound).await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = inbound.write_all(unavailable().as_bytes()).await;
                    let _ = inbound.shutdown().await;
                }
            });
        })
        .await;
        Self {
            addr: relay.addr,
            relay,
            refused,
        }
    }

    /// From now on every token request fails with 503.
    pub fn fail(&self) {
        self.relay.divert(true);
        self.relay.cut();
    }

    /// Token requests reach the identity provider again.
    pub fn heal(&self) {
        self.relay.divert(false);
    }

    /// Token requests answered with 503 so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

/// Reads one HTTP/1.1 request (head and `Content-Length` body); false when
/// the peer went away first.
async fn read_request(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return true;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn unavailable() -> String {
    let body = r#"{"error":"temporarily_unavailable","error_description":"AADSTS50001: The service is temporarily unavailable.","error_codes":[50001]}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// What a batch must produce.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    /// Each `triIdTX` that must become exactly one record → the dedupe keys
    /// of the mails carrying it (two for a duplicated id: either may win,
    /// the other must be rejected as `duplicate`).
    pub ids: BTreeMap<String, Vec<String>>,
    /// Dedupe key → reason code, for mails that must be rejected whatever
    /// the order.
    pub rejected: BTreeMap<String, String>,
}

impl Expected {
    /// Adds another batch's expectations.
    pub fn extend(&mut self, other: &Expected) {
        self.ids
            .extend(other.ids.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.rejected
            .extend(other.rejected.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    /// Records that must exist.
    pub fn records(&self) -> usize {
        self.ids.len()
    }

    /// Rejections that must exist: the fixed ones and one per duplicated id.
    pub fn failures(&self) -> usize {
        self.rejected.len() + self.ids.values().filter(|k| k.len() == 2).count()
    }
}

/// One batch of form mails, by mailbox index (0, 1: IMAP; 2, 3: POP3).
pub struct Batch {
    /// Raw mails for each of the four mailboxes.
    pub mails: [Vec<Vec<u8>>; 4],
    /// What they must produce.
    pub expected: Expected,
}

/// Every 10th form comes from a sender the topic does not allow.
pub const BAD_SENDER_EVERY: usize = 10;
/// Every 25th form repeats the unique `triIdTX` of the form before it
/// (which went to another mailbox).
pub const DUPLICATE_EVERY: usize = 25;

/// Builds batch `tag` of `n` form mails spread round-robin over `mailboxes`:
/// form `i` (0-based) carries `triIdTX = <tag>-<i>`, except that
/// `i % 25 == 12` repeats the id of form `i - 1`; `i % 10 == 9` is sent by
/// `mallory@evil.example` (`sender-not-allowed`). Of 1,000: 860 records,
/// 100 senders refused, 40 duplicates.
pub fn batch(tag: &str, n: usize, mailboxes: &[String; 4]) -> Batch {
    let mut mails: [Vec<Vec<u8>>; 4] = Default::default();
    let mut expected = Expected::default();
    for i in 0..n {
        let b = i % 4;
        let duplicate = i % DUPLICATE_EVERY == DUPLICATE_EVERY / 2;
        let bad_sender = i % BAD_SENDER_EVERY == BAD_SENDER_EVERY - 1;
        let id = if duplicate {
            format!("{tag}-{}", i - 1)
        } else {
            format!("{tag}-{i}")
        };
        let name = format!("Lease {tag} {i}");
        let workbook = lease_workbook(&Lease {
            id: &id,
            name: &name,
            rent: 1000.0 + i as f64,
            ..Default::default()
        });
        let from = if bad_sender {
            "mallory@evil.example"
        } else {
            "ann@contoso.com"
        };
        let raw = mail(LEASE_SUBJECT, from, &[], &[Attachment::xlsx(workbook)]);
        let key = dedupe_key(&mailboxes[b], &raw);
        if bad_sender {
            expected
                .rejected
                .insert(key, "sender-not-allowed".to_string());
        } else {
            expected.ids.entry(id).or_default().push(key);
        }
        mails[b].push(raw);
    }
    Batch { mails, expected }
}

/// What the store and the dead-letter queue hold at the end.
#[derive(Debug)]
pub struct Outcome {
    /// Records created.
    pub records: usize,
    /// Rejections stored.
    pub failures: usize,
    /// Messages taken from the dead-letter queue.
    pub dead_letters: usize,
    /// Rejections whose dead letter was published more than once. A crash
    /// between the dead-letter confirm and the commit of the failure's
    /// `dead_lettered` flag republishes it on redelivery (same message-id):
    /// dead letters are at least once, the stored rejection exactly once.
    pub dead_lettered_twice: usize,
}

/// The shape of a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// IMAP configs wait with IDLE (else poll every second).
    pub imap_idle: bool,
    /// imap-fetcher replicas.
    pub imap_fetchers: usize,
    /// pop-fetcher replicas.
    pub pop_fetchers: usize,
    /// form-processor replicas.
    pub processors: usize,
    /// The record store.
    pub store: crate::forms::StoreKind,
    /// RabbitMQ nodes (`[amqp] urls`, quorum queues, administrator URLs),
    /// reached directly so that a node can be killed for real; empty: the
    /// single test server through a cuttable [`Relay`].
    pub amqp_nodes: Vec<String>,
    /// Redis.
    pub redis: RedisTarget,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            imap_idle: false,
            imap_fetchers: 3,
            pop_fetchers: 1,
            processors: 1,
            store: crate::forms::StoreKind::Sqlite,
            amqp_nodes: Vec::new(),
            redis: RedisTarget::Relayed,
        }
    }
}

/// The name of replica `i` of `n` of `bin`: the bare binary name when it
/// is the only one (`form-processor`), else numbered (`imap-fetcher-2`).
pub fn replica_name(bin: Bin, i: usize, n: usize) -> String {
    if n == 1 && bin != Bin::ImapFetcher {
        bin.name().to_string()
    } else {
        format!("{}-{i}", bin.name())
    }
}

/// Which Redis the agent's processes use.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// The plain test server, through the stack's relay, with each
    /// component's least-privilege ACL user.
    Relayed,
    /// The primary named by the Sentinels of `scripts/services up --cluster`
    /// (`[redis] sentinels`, `master-name`; the default user).
    Sentinel,
    /// The Redis Cluster of `scripts/services up --cluster`, its nodes
    /// listed in this order (`[redis] cluster`; the default user).
    Cluster(Vec<String>),
}

/// One test's running agent and everything around it.
pub struct Stack {
    /// The servers.
    pub env: Endpoints,
    /// Redis and AMQP prefix.
    pub prefix: String,
    /// The identity provider.
    pub idp: TestIdp,
    /// The front the broker talks to.
    pub idp_front: IdpFront,
    /// Relay between the agent and RabbitMQ.
    pub amqp_relay: Relay,
    /// Relay between the agent and Redis.
    pub redis_relay: Relay,
    /// Mailboxes: two IMAP, then two POP3.
    pub mailboxes: [String; 4],
    /// Mail config names, in the same order.
    pub configs: [String; 4],
    /// The record store (SQLite file or PostgreSQL database).
    pub store: Store,
    /// The configuration file every process reads.
    pub config_path: PathBuf,
    /// Direct (not relayed) Redis connection for the test's checks: to the
    /// plain server, or to the Sentinel-named primary or the Cluster as the
    /// agent reaches them.
    pub redis: common::RedisHandle,
    /// The whole configuration, as the CLI loads it.
    pub config: common::Config,
    /// AMQP channel for the test's checks (see [`Stack::channel`]).
    channel: tokio::sync::Mutex<lapin::Channel>,
    /// The RabbitMQ nodes the test's own channel may use.
    amqp_urls: Vec<String>,
    /// The shape it was started with.
    pub options: StackOptions,
    dir: Option<tempfile::TempDir>,
    procs: Vec<Supervised>,
    /// Message ids of every dead letter taken off the queue so far.
    dead_letters: Mutex<Vec<String>>,
}

fn relay_target(url: &str) -> (url::Url, SocketAddr) {
    let url: url::Url = url.parse().expect("server url");
    let host = url.host_str().expect("host").to_string();
    let port = url.port().expect("port");
    let addr = format!("{host}:{port}").parse().expect("loopback address");
    (url, addr)
}

fn via(mut url: url::Url, relay: &Relay) -> String {
    url.set_port(Some(relay.addr.port())).expect("port");
    url.to_string()
}

impl Stack {
    /// Prepares a stack (identity provider, relays, mailboxes, config,
    /// store) and starts the four binaries: one token-broker, three
    /// imap-fetcher replicas, one pop-fetcher, one form-processor. The IMAP
    /// configs wait with IDLE when `imap_idle`, else poll every second.
    pub async fn start(label: &str, imap_idle: bool) -> Self {
        Self::start_with(
            label,
            StackOptions {
                imap_idle,
                ..Default::default()
            },
        )
        .await
    }

    /// [`Stack::start`] on the RabbitMQ cluster of `scripts/services up
    /// --cluster` (`nodes`): `[amqp] urls`, quorum queues, no relay
    /// between the binaries and the nodes (a node is killed for real).
    pub async fn start_on_nodes(label: &str, nodes: &[String]) -> Self {
        Self::start_with(
            label,
            StackOptions {
                amqp_nodes: nodes.to_vec(),
                ..Default::default()
            },
        )
        .await
    }

    /// [`Stack::start`] in the shape `options` gives.
    pub async fn start_with(label: &str, options: StackOptions) -> Self {
        let imap_idle = options.imap_idle;
        let env = Endpoints::load();
        let prefix = unique(label);
        let idp = TestIdp::start(&env).await;
        idp.set_lifetime(TOKEN_LIFETIME);
        let (app, secret) = idp.register_app();
        let idp_front = IdpFront::start(idp.addr).await;
        let token_url = idp
            .token_url()
            .replace(&idp.addr.to_string(), &idp_front.addr.to_string());

        let (amqp_url, amqp_addr) = relay_target(env.amqp_url());
        let (redis_url, redis_addr) = relay_target(env.redis_url());
        let amqp_relay = Relay::start(amqp_addr).await;
        let redis_relay = Relay::start(redis_addr).await;

        let mailboxes: [String; 4] =
            std::array::from_fn(|i| format!("{prefix}-{i}@contoso.com").to_lowercase());
        for m in &mailboxes {
            env.grant(&app, m);
        }
        let configs: [String; 4] = ["imap-a", "imap-b", "pop-a", "pop-b"].map(String::from);

        // Each binary reaches the servers through the relays.
        let redis_via = via(redis_url, &redis_relay);
        let amqp_via = via(amqp_url, &amqp_relay);
        let mut cfg = TestConfig::with_prefix(&env, &prefix);
        cfg.servers(&redis_via, &amqp_via);
        match &options.redis {
            RedisTarget::Relayed => {}
            RedisTarget::Sentinel => {
                cfg.redis_sentinel(&env);
            }
            RedisTarget::Cluster(nodes) => {
                cfg.redis_cluster(nodes);
            }
        }
        let amqp_urls = if options.amqp_nodes.is_empty() {
            vec![env.amqp_url().to_string()]
        } else {
            cfg.amqp_urls(&options.amqp_nodes)
                .section_line("amqp", "queue-type = \"quorum\"");
            options.amqp_nodes.clone()
        };
        for line in [
            "refresh-lead-min = 0",
            "forced-refresh-min-interval = 1",
            "failing-retry-interval = 5",
            "backoff-initial-ms = 200",
            "backoff-max = 2",
            "request-timeout = 5",
            "lock-ttl = 5",
        ] {
            cfg.broker_setting(line);
        }
        let store_url = match options.store {
            crate::forms::StoreKind::Sqlite => cfg.sqlite_store(),
            _ => {
                let url = crate::forms::create_database(env.postgres_url(), &prefix).await;
                cfg.store(&url);
                url
            }
        };
        cfg.section_line("form-processor", "prefetch = 32")
            .idp_profile(PROFILE, &token_url, &app, &secret)
            .lease_topic();
        let imaps = env.mail_addr("IMAPS").port();
        let pop3s = env.mail_addr("POP3S").port();
        let auth = format!("oauth-profile = \"{PROFILE}\"");
        for (i, (name, mailbox)) in configs.iter().zip(&mailboxes).enumerate() {
            let extra = if i < 2 {
                format!("after-fetch = \"mark-seen\"\nidle = {imap_idle}\n")
            } else {
                "after-fetch = \"delete\"\n".to_string()
            };
            let (port, kind) = if i < 2 {
                (imaps, "imaps")
            } else {
                (pop3s, "pop3s")
            };
            cfg.incoming_mail(&mail_table(name, mailbox, port, kind, &auth, &extra));
        }
        let config_path = cfg.file("mailagent.toml", &cfg.toml);
        let logs = cfg.dir().join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");

        // The store exists (schema applied) before the processor starts.
        let store = Store::open(&store_url, None).await.expect("open store");
        let config = cfg.load(common::Component::Cli);
        let redis = match options.redis {
            RedisTarget::Relayed => crate::harness::redis_at(env.redis_url()).await,
            _ => common::connect::redis(&config).await.expect("redis (HA)"),
        };
        let channel = open_channel(&amqp_urls).await;
        // Declared as the administrator, as `mailagent setup` does.
        let mut amqp_config = config.amqp.clone();
        amqp_config.urls = amqp_urls
            .iter()
            .map(|u| common::secret::SecretUrl::new(u.clone()))
            .collect();
        amqp_config.url = amqp_config.urls[0].clone();
        common::topology::declare(&channel, &amqp_config, false)
            .await
            .expect("declare topology");

        // Each binary runs as its least-privilege users (crate::restricted),
        // through the same relays.
        let bin_config = |bin: Bin| {
            let toml =
                crate::restricted::restrict_via(&cfg.toml, bin.component(), &redis_via, &amqp_via);
            cfg.file(&format!("{}.toml", bin.name()), &toml)
        };
        let configs_by_bin: HashMap<&'static str, PathBuf> = [
            Bin::TokenBroker,
            Bin::ImapFetcher,
            Bin::PopFetcher,
            Bin::FormProcessor,
        ]
        .into_iter()
        .map(|bin| (bin.name(), bin_config(bin)))
        .collect();
        let mut procs = Vec::new();
        let mut add = |bin: Bin, name: &str| {
            procs.push(Supervised::start(
                bin,
                name.to_string(),
                configs_by_bin[bin.name()].clone(),
                logs.clone(),
            ));
        };
        add(Bin::TokenBroker, "token-broker");
        for (bin, n) in [
            (Bin::ImapFetcher, options.imap_fetchers),
            (Bin::PopFetcher, options.pop_fetchers),
            (Bin::FormProcessor, options.processors),
        ] {
            for i in 0..n {
                add(bin, &replica_name(bin, i, n));
            }
        }

        let stack = Self {
            env,
            prefix,
            idp,
            idp_front,
            amqp_relay,
            redis_relay,
            mailboxes,
            configs,
            store,
            config_path,
            redis,
            config,
            channel: tokio::sync::Mutex::new(channel),
            amqp_urls,
            options,
            dir: Some(cfg.dir),
            procs,
            dead_letters: Mutex::new(Vec::new()),
        };
        stack.wait_ready().await;
        stack
    }

    /// Redis key names of this stack.
    pub fn keys(&self) -> Keys {
        Keys::new(self.prefix.clone())
    }

    /// The CREATE queue.
    pub fn create_queue(&self) -> String {
        format!("{}.create", self.prefix)
    }

    /// The dead-letter queue.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// `mailagent status` (text) against the stack, as its operator runs it.
    pub async fn status(&self) -> String {
        let out = tokio::process::Command::new(crate::env::bin_path("mailagent"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("status")
            .output()
            .await
            .expect("run mailagent status");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "mailagent status failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// The test's AMQP channel, opened again (on the first node that
    /// answers) when a node kill or a relay cut closed it.
    pub async fn channel(&self) -> lapin::Channel {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() {
            *channel = open_channel(&self.amqp_urls).await;
        }
        channel.clone()
    }

    /// Messages ready in `queue` (`u32::MAX` while RabbitMQ cannot say).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        common::topology::queue_depth(&self.channel().await, queue)
            .await
            .unwrap_or(u32::MAX)
    }

    /// Where the logs are.
    pub fn logs(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join("logs"))
            .unwrap_or_default()
    }

    /// Waits until every process beats, a token is in Redis and each of the
    /// four mail configs is leased.
    async fn wait_ready(&self) {
        poll_until(
            "every process up, a token in Redis and all four configs leased",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || async {
                let agents = self.agents().await;
                let count = |c: &str| agents.iter().filter(|a| a.0 == c).count();
                let o = &self.options;
                let up = count("token-broker") == 1
                    && count("imap-fetcher") == o.imap_fetchers
                    && count("pop-fetcher") == o.pop_fetchers
                    && count("form-processor") == o.processors;
                let token = self.exists(&self.keys().token(PROFILE)).await;
                let leased = self.lease_owners().await.len() == 4;
                up && token && leased
            },
        )
        .await;
    }

    async fn exists(&self, key: &str) -> bool {
        let mut r = self.redis.clone();
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut r)
            .await
            .unwrap_or(0)
            == 1
    }

    /// Live agents from the heartbeats: (component, pid).
    pub async fn agents(&self) -> Vec<(String, u32)> {
        let mut r = self.redis.clone();
        let now = common::heartbeat::now_secs();
        common::heartbeat::list_agents(&mut r, &self.keys())
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.last_beat + 5 >= now)
            .map(|a| (a.component, a.pid))
            .collect()
    }

    /// Mail config → lease owner (an instance id containing `-<pid>-`).
    pub async fn lease_owners(&self) -> HashMap<String, String> {
        let mut r = self.redis.clone();
        let mut out = HashMap::new();
        for c in &self.configs {
            let owner: Option<String> = redis::cmd("GET")
                .arg(self.keys().lease(c))
                .query_async(&mut r)
                .await
                .unwrap_or(None);
            if let Some(o) = owner {
                out.insert(c.clone(), o);
            }
        }
        out
    }

    /// Writes a batch into the mailboxes' Maildirs.
    pub fn seed(&self, batch: &Batch) {
        for (mailbox, mails) in self.mailboxes.iter().zip(&batch.mails) {
            crate::maildir::seed(&self.env, mailbox, mails);
        }
    }

    /// Records plus stored rejections.
    pub async fn settled(&self) -> usize {
        let records = self.store.count_records().await.unwrap_or(0) as usize;
        let failures = self.store.failures().await.map(|f| f.len()).unwrap_or(0);
        records + failures
    }

    /// Waits until at least `n` messages are settled (record or rejection).
    pub async fn wait_settled(&self, n: usize, within: Duration) {
        poll_until(
            &format!("{n} messages settled"),
            within,
            Duration::from_millis(250),
            || async { self.settled().await >= n },
        )
        .await;
    }

    /// Processes of one binary that are running now: (name, pid).
    pub fn running(&self, bin: Bin) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .filter(|p| p.bin == bin)
            .filter_map(|p| p.pid().map(|pid| (p.name.clone(), pid)))
            .collect()
    }

    /// How often a process has been started (1 = never restarted).
    pub fn starts(&self, name: &str) -> usize {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.shared.starts.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Sends SIGKILL to process `name`; the supervisor starts it again after
    /// `restart_after`, or never when `None`.
    pub fn kill_9(&self, name: &str, restart_after: Option<Duration>) {
        let p = self
            .procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        *p.shared.policy.lock().unwrap_or_else(|e| e.into_inner()) = match restart_after {
            Some(d) => Policy::Restart(d),
            None => Policy::Stay,
        };
        let pid = p.pid().unwrap_or_else(|| panic!("{name} is not running"));
        crate::process::signal("KILL", pid);
        eprintln!("[e2e] kill -9 {name} (pid {pid})");
    }

    /// Waits until the batch's mail has left the mailboxes: every IMAP
    /// message `\Seen`, every POP3 maildrop empty. `imap_total` is the number
    /// of messages each IMAP mailbox holds by now.
    pub async fn wait_mailboxes_done(&self, imap_total: [usize; 2], within: Duration) {
        poll_until(
            "the POP3 maildrops empty and every IMAP message \\Seen",
            within,
            Duration::from_secs(1),
            || async {
                for m in &self.mailboxes[2..] {
                    if crate::maildir::len(&self.env, m) != 0 {
                        return false;
                    }
                }
                for (m, total) in self.mailboxes[..2].iter().zip(imap_total) {
                    let flags = crate::imap_support::flags(&self.env, m, "INBOX").await;
                    let seen = flags.values().filter(|f| f.contains("\\Seen")).count();
                    if flags.len() != total || seen != total {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    /// Waits for `expected` to be reached and to stay put (queue empty,
    /// every stored rejection dead-lettered, nothing settling for 3 s), then
    /// checks it exactly: every expected
    /// record once, every expected rejection once with its reason, marked
    /// dead-lettered and on the dead-letter queue (at least once: see
    /// [`Outcome::dead_lettered_twice`]), nothing else. Pass the expectations of every
    /// batch so far: the store and the dead letters are checked as a whole.
    pub async fn verify(&self, expected: &Expected, within: Duration) -> Outcome {
        let total = expected.records() + expected.failures();
        self.wait_settled(total, within).await;
        // Stable: nothing more arrives and nothing is queued or in flight.
        // A rejection is stored before its dead-letter publish is confirmed
        // and marked, and a delivery held unacked meanwhile (a confirm
        // delayed by a quorum leader election, a settle retry pausing)
        // counts in no queue depth: so also every stored rejection is
        // dead-lettered. What is still missing after a minute is reported
        // by the checks below.
        let last = std::cell::Cell::new((usize::MAX, Instant::now()));
        let stable = crate::harness::poll(
            Duration::from_secs(60),
            Duration::from_millis(250),
            || async {
                let now = self.settled().await;
                let depth = self.queue_depth(&self.create_queue()).await;
                let undead = match self.store.failures().await {
                    Ok(f) => f.iter().filter(|f| !f.dead_lettered).count(),
                    Err(_) => usize::MAX,
                };
                let (before, since) = last.get();
                if now != before || depth != 0 || undead != 0 {
                    last.set((now, Instant::now()));
                    return false;
                }
                since.elapsed() >= Duration::from_secs(3)
            },
        )
        .await;

        let records = self
            .store
            .records(&Default::default())
            .await
            .expect("records");
        let failures = self.store.failures().await.expect("failures");
        let mut problems = Vec::new();
        if !stable {
            problems.push(
                "not stable within 60 s: the queue not empty, a rejection not dead-lettered, or settling went on".to_string(),
            );
        }

        // Records: each expected id once, from one of its mails.
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut record_keys = BTreeSet::new();
        for r in &records {
            let id = r
                .fields
                .get("triIdTX")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let key = r.source.dedupe_key.clone();
            if !record_keys.insert(key.clone()) {
                problems.push(format!("created twice: dedupe key {key} ({id})"));
            }
            match expected.ids.get(id) {
                Some(keys) if keys.contains(&key) => {
                    if owner.insert(id.to_string(), key.clone()).is_some() {
                        problems.push(format!("created twice: {id}"));
                    }
                }
                Some(_) => problems.push(format!("record {id} from an unexpected mail {key}")),
                None => problems.push(format!("unexpected record {id:?} ({key})")),
            }
            if r.children.len() != 3 {
                problems.push(format!("record {id} has {} children", r.children.len()));
            }
        }
        let lost: Vec<&String> = expected
            .ids
            .keys()
            .filter(|id| !owner.contains_key(*id))
            .collect();
        if !lost.is_empty() {
            problems.push(format!(
                "{} expected records missing (lost), e.g. {:?}",
                lost.len(),
                &lost[..lost.len().min(5)]
            ));
        }

        // Rejections: the fixed ones with their reason, and for each
        // duplicated id the mail that did not make the record.
        let pair_of: HashMap<&String, &String> = expected
            .ids
            .iter()
            .filter(|(_, k)| k.len() == 2)
            .flat_map(|(id, keys)| keys.iter().map(move |k| (k, id)))
            .collect();
        let mut failure_keys = BTreeSet::new();
        for f in &failures {
            let key = &f.source.dedupe_key;
            if !failure_keys.insert(key.clone()) {
                problems.push(format!("rejected twice: {key}"));
            }
            if record_keys.contains(key) {
                problems.push(format!("{key} is both a record and a rejection"));
            }
            if !f.dead_lettered {
                problems.push(format!("rejection {key} ({}) not dead-lettered", f.reason));
            }
            if let Some(reason) = expected.rejected.get(key) {
                if &f.reason != reason {
                    problems.push(format!(
                        "{key} rejected as {} instead of {reason}",
                        f.reason
                    ));
                }
            } else if let Some(id) = pair_of.get(key) {
                if f.reason != "duplicate" {
                    problems.push(format!(
                        "{key} ({id}) rejected as {} instead of duplicate",
                        f.reason
                    ));
                }
            } else {
                problems.push(format!(
                    "unexpected rejection of {key}: {} ({})",
                    f.reason, f.detail
                ));
            }
        }
        let missing_rejections = expected
            .rejected
            .keys()
            .chain(
                pair_of
                    .keys()
                    .copied()
                    .filter(|k| !record_keys.contains(*k)),
            )
            .filter(|k| !failure_keys.contains(*k))
            .count();
        if missing_rejections > 0 {
            problems.push(format!("{missing_rejections} expected rejections missing"));
        }

        // Dead letters: one per rejection (those of earlier checks included).
        let dead = {
            let fresh = self.drain_dead().await;
            let mut all = self.dead_letters.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(fresh);
            all.clone()
        };
        let mut dead_count: BTreeMap<&String, usize> = BTreeMap::new();
        for d in &dead {
            *dead_count.entry(d).or_default() += 1;
        }
        for k in dead_count.keys() {
            if !failure_keys.contains(*k) {
                problems.push(format!("dead letter without a stored rejection: {k}"));
            }
        }
        let undead = failure_keys
            .iter()
            .filter(|k| !dead_count.contains_key(k))
            .count();
        if undead > 0 {
            problems.push(format!("{undead} rejections without a dead letter"));
        }
        let dead_twice = dead_count.values().filter(|n| **n > 1).count();

        assert!(
            problems.is_empty(),
            "{} problems (logs in {}):\n{}",
            problems.len(),
            self.logs().display(),
            problems[..problems.len().min(40)].join("\n")
        );
        assert_eq!(records.len(), expected.records());
        assert_eq!(failures.len(), expected.failures());
        Outcome {
            records: records.len(),
            failures: failures.len(),
            dead_letters: dead.len(),
            dead_lettered_twice: dead_twice,
        }
    }

    /// Takes every message off the dead-letter queue; returns their message
    /// ids (dedupe keys).
    async fn drain_dead(&self) -> Vec<String> {
        let mut out = Vec::new();
        let channel = self.channel().await;
        while let Some(m) = channel
            .basic_get(&self.dead_queue(), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            let id = crate::fixture::message_id(&m.properties);
            m.acker.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(id);
        }
        out
    }

    /// Stops every process with SIGTERM and removes what the stack left in
    /// the shared servers (queues, Redis keys, mailboxes).
    pub async fn shutdown(mut self) {
        self.stop_processes().await;
        let channel = self.channel().await;
        for q in [self.create_queue(), self.dead_queue()] {
            let _ = channel
                .queue_delete(&q, QueueDeleteOptions::default())
                .await;
        }
        let mut r = self.redis.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut r)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query_async(&mut r).await;
        }
        for m in &self.mailboxes {
            crate::maildir::remove(&self.env, m);
        }
    }

    async fn stop_processes(&mut self) {
        for p in &self.procs {
            p.shared.stop.cancel();
        }
        for p in self.procs.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(20), p.task).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Processes die with their supervisor tasks (kill_on_drop).
        for p in &self.procs {
            p.task.abort();
        }
        if std::thread::panicking() || std::env::var_os("MAILAGENT_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("[e2e] logs and config kept in {}", kept.display());
            }
        }
    }
}

/// A channel on the first of `urls` that accepts a connection, trying
/// them in turn for up to a minute (a cluster node may be down).
async fn open_channel(urls: &[String]) -> lapin::Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for url in urls {
            let props = lapin::ConnectionProperties::default();
            if let Ok(conn) = lapin::Connection::connect(url, props).await {
                if let Ok(channel) = conn.create_channel().await {
                    return channel;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no RabbitMQ node of {} answers",
            urls.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls `check` every `every` until it is true; panics naming `what`
/// after `within`.
pub async fn poll_until<F, Fut>(what: &str, within: Duration, every: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        crate::harness::poll(within, every, check).await,
        "timed out after {within:?} waiting for {what}"
    );
}
