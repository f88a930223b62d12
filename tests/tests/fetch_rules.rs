//! The rules both fetchers share through the fetch kit (`common::fetch`),
//! each proven against the IMAP and the POP3 fetcher on real Dovecot,
//! RabbitMQ and Redis:
//!
//! - one heartbeat rule: a mailbox's success clears only its own error;
//! - one token-refusal path: a refused token is reported to the broker, and
//!   a graceful stop does not wait for its replacement;
//! - one "needs a person" rule: a message RabbitMQ cannot route is a
//!   topology problem, retried on the slow schedule, not hammered;
//! - the open-files limit is raised at start;
//! - a message the broker refuses for its size is left in the mailbox as
//!   oversized, and the mail after it is handed over (issue 12).

use std::time::{Duration, Instant};

use common::heartbeat::AgentStatus;
use common::keys::Keys;
use common::shutdown::CancellationToken;
use common::Config;
use futures::StreamExt;
use mailagent_tests::exchange_front::{ExchangeFront, Mode};
use mailagent_tests::fixture::{channel_with_topology, stop_task};
use mailagent_tests::maildir;
use mailagent_tests::{imap_support, pop_support};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Imap,
    Pop3,
}

/// One test's fixture for either fetcher.
enum Fx {
    Imap(imap_support::Fixture),
    Pop3(pop_support::Fixture),
}

impl Fx {
    fn new(proto: Proto, label: &str) -> Self {
        match proto {
            Proto::Imap => Self::Imap(imap_support::Fixture::new(label)),
            Proto::Pop3 => Self::Pop3(pop_support::Fixture::new(label)),
        }
    }

    /// A fixture with a valid token planted, the usual start.
    async fn with_token(proto: Proto, label: &str) -> Self {
        let fx = Self::new(proto, label);
        fx.plant_token().await;
        fx
    }

    fn proto(&self) -> Proto {
        match self {
            Self::Imap(_) => Proto::Imap,
            Self::Pop3(_) => Proto::Pop3,
        }
    }

    /// Runs this fixture's fetcher in-process with `config` and these
    /// backoff times.
    fn start(&self, config: Config, backoff_initial: Duration, backoff_max: Duration) -> Running {
        Running::start(self.proto(), config, options(backoff_initial, backoff_max))
    }

    /// Waits up to 30 s for the fetcher's heartbeat to satisfy `check`.
    async fn until_status(&self, what: &str, check: impl Fn(AgentStatus) -> bool) {
        until(what, Duration::from_secs(30), || async {
            self.heartbeat().await.is_some_and(&check)
        })
        .await;
    }

    fn component(&self) -> &'static str {
        match self {
            Self::Imap(_) => "imap-fetcher",
            Self::Pop3(_) => "pop-fetcher",
        }
    }

    fn env(&self) -> &mailagent_tests::env::Endpoints {
        match self {
            Self::Imap(f) => &f.env,
            Self::Pop3(f) => &f.env,
        }
    }

    fn prefix(&self) -> &str {
        match self {
            Self::Imap(f) => &f.prefix,
            Self::Pop3(f) => &f.prefix,
        }
    }

    fn keys(&self) -> Keys {
        Keys::new(self.prefix().to_string())
    }

    async fn redis(&self) -> common::RedisHandle {
        match self {
            Self::Imap(f) => f.redis().await,
            Self::Pop3(f) => f.redis().await,
        }
    }

    async fn plant_token(&self) {
        match self {
            Self::Imap(f) => f.plant_token().await,
            Self::Pop3(f) => f.plant_token().await,
        }
    }

    /// A token the mail server refuses (its JWT expired an hour ago) while
    /// Redis still holds it as current.
    async fn plant_refused_token(&self) {
        match self {
            Self::Imap(f) => {
                f.plant_expired_token().await;
            }
            Self::Pop3(f) => f.plant(&f.mint(Duration::from_secs(600), -7200)).await,
        }
    }

    /// Seeds `n` messages into the fixture's mailbox.
    fn seed(&self, n: usize) {
        let prefix = self.prefix().to_string();
        let messages: Vec<Vec<u8>> = (0..n)
            .map(|i| maildir::message(&prefix, i, 500, false))
            .collect();
        self.seed_messages(&messages);
    }

    /// Seeds these messages into the fixture's mailbox.
    fn seed_messages(&self, messages: &[Vec<u8>]) {
        let mailbox = match self {
            Self::Imap(f) => &f.mailbox,
            Self::Pop3(f) => &f.mailbox,
        };
        maildir::seed(self.env(), mailbox, messages);
    }

    /// The fixture's mailbox with each protocol's default after-fetch
    /// action (IMAP `mark-seen`, POP3 `delete`), as mail config `name`.
    fn default_table(&self, name: &str) -> String {
        self.table_with(name, "")
    }

    /// The fixture's mailbox with each protocol's default after-fetch and
    /// `extra` keys, as mail config `name`.
    fn table_with(&self, name: &str, extra: &str) -> String {
        match self {
            Self::Imap(f) => f.mail_table(name, &f.mailbox, extra),
            Self::Pop3(f) => f.mail_table(name, "POP3S", extra),
        }
    }

    /// The fixture's queue on the shared RabbitMQ, with a channel to it.
    async fn channel_and_queue(&self) -> (lapin::Channel, String) {
        match self {
            Self::Imap(f) => (f.channel().await, f.queue()),
            Self::Pop3(f) => (f.channel().await, f.queue()),
        }
    }

    /// Waits until the one big mail of a size test is all that is left
    /// for the fetcher: IMAP, the only unseen mail; POP3, the only one
    /// not deleted.
    async fn until_only_the_big_mail_is_left(&self) {
        match self {
            Fx::Imap(f) => {
                let flags = imap_support::flags(&f.env, &f.mailbox, "INBOX").await;
                let unseen: Vec<_> = flags.values().filter(|v| !v.contains("\\Seen")).collect();
                assert_eq!(unseen.len(), 1, "only the big mail stays unseen: {flags:?}");
            }
            Fx::Pop3(f) => {
                until(
                    "the small mails deleted, the big one left",
                    Duration::from_secs(20),
                    || async { f.maildrop_len() == 1 },
                )
                .await;
            }
        }
    }

    /// The fixture's mailbox on Dovecot, as mail config `name`.
    fn table(&self, name: &str) -> String {
        match self {
            Self::Imap(f) => f.mail_table(name, &f.mailbox, ""),
            Self::Pop3(f) => f.mail_table(name, "POP3S", "after-fetch = \"keep\"\n"),
        }
    }

    /// A mail config behind an Exchange front that makes every session fail
    /// with a problem only a person can fix: no permission on the mailbox
    /// (IMAP, another folder of the fixture's mailbox), no SASL XOAUTH2
    /// (POP3, another mailbox).
    async fn failing_table(&self, name: &str) -> (String, ExchangeFront) {
        let env = self.env();
        match self {
            Self::Imap(f) => {
                let front = ExchangeFront::start(env, Mode::Imap).await;
                front.deny(&f.mailbox);
                let table = f
                    .mail_table(name, &f.mailbox, "folder = \"Elsewhere\"\n")
                    .replace(
                        &format!("port = {}", env.mail_addr("IMAPS").port()),
                        &format!("port = {}", front.addr.port()),
                    );
                (table, front)
            }
            Self::Pop3(f) => {
                let front = ExchangeFront::start(env, Mode::Pop3).await;
                front.without_xoauth2();
                let other = format!("other-{}", f.mailbox);
                let port = front.addr.port();
                (f.mail_table_for(name, &other, port, "pop3s", ""), front)
            }
        }
    }

    fn config(&self, tables: &[String]) -> Config {
        match self {
            Self::Imap(f) => f.config(tables).0,
            Self::Pop3(f) => f.config(tables).0,
        }
    }

    /// This test's fetcher heartbeat, once there is one.
    async fn heartbeat(&self) -> Option<AgentStatus> {
        let mut redis = self.redis().await;
        common::heartbeat::list_agents(&mut redis, &self.keys())
            .await
            .ok()?
            .into_iter()
            .find(|a| a.component == self.component())
    }

    /// The sum of the fetcher's `fetcher_errors_total` series of `kind`.
    async fn errors(&self, kind: &str) -> u64 {
        self.metric_sum("fetcher_errors_total", &format!("kind=\"{kind}\""))
            .await
    }

    /// The sum of the fetcher's `metric` series with `label` (from its
    /// admin endpoint; 0 before there is one).
    async fn metric_sum(&self, metric: &str, label: &str) -> u64 {
        let Some(admin) = self.heartbeat().await.and_then(|a| a.admin) else {
            return 0;
        };
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let series = format!("{metric}{{");
        text.lines()
            .filter(|l| l.contains(&series) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

/// A fetcher running in this process.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn start(proto: Proto, config: Config, options: common::fetch::Options) -> Self {
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let task = match proto {
            Proto::Imap => tokio::spawn(common::fetch::run(imap_fetcher::Imap, config, options, s)),
            Proto::Pop3 => tokio::spawn(common::fetch::run(pop_fetcher::Pop3, config, options, s)),
        };
        Self { shutdown, task }
    }

    /// Graceful stop; returns how long it took.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        stop_task(
            &self.shutdown,
            self.task,
            Duration::from_secs(20),
            "fetcher",
        )
        .await
        .expect("fetcher run");
        started.elapsed()
    }
}

fn options(backoff_initial: Duration, backoff_max: Duration) -> common::fetch::Options {
    common::fetch::Options {
        lease_ttl: Duration::from_secs(3),
        backoff_initial,
        backoff_max,
        token_wait: Duration::from_secs(60),
        ..Default::default()
    }
}

/// Waits for `check` to hold, up to `timeout`.
async fn until<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        imap_support::eventually(timeout, check).await,
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// For each `$rule`, two tests running it against each fetcher, named
/// `$imap` and `$pop3` (spelled out, so a test is found by its name).
macro_rules! both_protocols {
    ($($rule:ident: $imap:ident, $pop3:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $imap() {
            $rule(Proto::Imap).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pop3() {
            $rule(Proto::Pop3).await;
        }
    )*};
}

// ---------------------------------------------------------------- heartbeat

/// Mailbox `bad` fails on every session; mailbox `good` starts only once
/// `bad`'s error is in the heartbeat (its lease is held by another owner
/// until then). `good`'s successful pass must leave `bad`'s error there.
async fn a_mailboxs_success_clears_only_its_own_error(proto: Proto) {
    let fx = Fx::with_token(proto, "hbrule").await;
    let (bad_table, _front) = fx.failing_table("bad").await;
    let config = fx.config(&[fx.table("good"), bad_table]);
    let mut redis = fx.redis().await;
    let lease = fx.keys().lease("good");
    let () = redis::cmd("SET")
        .arg(&lease)
        .arg("another-replica")
        .arg("PX")
        .arg(120_000)
        .query_async(&mut redis)
        .await
        .expect("hold the lease");
    // Long waits after a failure: the bad mailbox does not retry (and set
    // its error again) while the good one passes.
    let fetcher = fx.start(config, Duration::from_secs(3), Duration::from_secs(60));
    fx.until_status("the bad mailbox's error", |a| {
        a.last_error.is_some_and(|e| e.starts_with("bad: "))
    })
    .await;
    let () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut redis)
        .await
        .expect("release the lease");
    fx.until_status("a pass of the good mailbox", |a| a.last_poll.is_some())
        .await;
    let status = fx.heartbeat().await.expect("heartbeat");
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.starts_with("bad: "),
        "the good mailbox's pass cleared the bad mailbox's error: {error:?}"
    );
    fetcher.stop().await;
}

// ---------------------------------------------------------- token refusal

/// A refused token is reported to the broker by its fingerprint; while the
/// fetcher waits for the replacement (up to a minute here), a graceful
/// stop ends it at once instead of after the wait or the stop grace.
async fn a_refused_token_is_reported_and_a_stop_does_not_wait_for_its_replacement(proto: Proto) {
    let fx = Fx::new(proto, "tokpath");
    fx.plant_refused_token().await;
    let client = redis::Client::open(fx.env().redis_url()).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(fx.keys().token_refresh_channel())
        .await
        .expect("subscribe");
    let config = fx.config(&[fx.table("tok")]);
    let fetcher = fx.start(config, Duration::from_millis(300), Duration::from_secs(2));
    let request: String = tokio::time::timeout(Duration::from_secs(30), pubsub.on_message().next())
        .await
        .expect("a refresh request within 30 s")
        .expect("message")
        .get_payload()
        .expect("payload");
    assert!(request.contains("\"profile\""), "{request}");
    assert!(
        !request.contains("eyJ"),
        "no token in the request: {request}"
    );
    assert!(
        fx.errors("auth").await >= 1,
        "the refused token is counted as an auth error"
    );
    // The worker now waits for the replacement.
    let took = fetcher.stop().await;
    assert!(
        took < Duration::from_secs(4),
        "the stop waited {took:?} for a token replacement"
    );
}

// --------------------------------------------------------- needs a person

/// With the CREATE queue unbound, every publish comes back unroutable: a
/// topology problem a person must fix. It is reported in the heartbeat and
/// retried on the slow schedule (never sooner than 8 × the first backoff),
/// not at the transient pace.
async fn an_unroutable_message_needs_a_person_and_is_retried_slowly(proto: Proto) {
    let fx = Fx::with_token(proto, "unroute").await;
    fx.seed(1);
    let config = fx.config(&[fx.table("un")]);
    let topology = common::topology::Topology::new(&config.amqp.prefix);
    let channel = channel_with_topology(fx.env().amqp_url(), &config.amqp).await;
    channel
        .queue_unbind(
            &topology.create_queue,
            &topology.exchange,
            common::config::Action::Create.routing_key(),
            Default::default(),
        )
        .await
        .expect("unbind");
    // First backoff 500 ms: a person-problem waits at least 4 s between
    // attempts; a transient one would come back within 0.5–2 s.
    let fetcher = fx.start(config, Duration::from_millis(500), Duration::from_secs(2));
    fx.until_status("the unroutable error", |a| {
        a.last_error
            .is_some_and(|e| e.contains("routed it to no queue"))
    })
    .await;
    let before = fx.errors("unroutable").await;
    let window = Instant::now();
    until("a window of 6 s", Duration::from_secs(10), || async {
        window.elapsed() >= Duration::from_secs(6)
    })
    .await;
    let attempts = fx.errors("unroutable").await - before;
    assert!(
        attempts <= 2,
        "{attempts} unroutable attempts in 6 s: retried at the transient pace"
    );
    fetcher.stop().await;
}

// ------------------------------------------------------------ open files

/// Started with a low open-files soft limit, the fetcher raises it to the
/// hard limit (each mail config holds a TLS connection).
async fn the_open_files_limit_is_raised_at_start(proto: Proto) {
    use rlimit::Resource;
    let (_, hard) = Resource::NOFILE.get().expect("getrlimit");
    let low = 256.min(hard);
    Resource::NOFILE
        .set(low, hard)
        .expect("lower the soft limit");
    let fx = Fx::with_token(proto, "nofile").await;
    let config = fx.config(&[fx.table("nf")]);
    let fetcher = fx.start(config, Duration::from_millis(300), Duration::from_secs(2));
    fx.until_status("the fetcher's heartbeat", |_| true).await;
    let (soft, _) = Resource::NOFILE.get().expect("getrlimit");
    fetcher.stop().await;
    assert_eq!(soft, hard, "the soft limit stayed at {soft} (hard {hard})");
}

// ------------------------------------------------------- broker size limit

/// RabbitMQ refuses a message over its `max_message_size` with 406 and
/// closes the channel. A private node with a 1 MiB limit gets ten small
/// mails with a 2 MiB one between them: every small one is published (at
/// most a handful twice, those whose confirms the closed channel lost), the
/// big one stays in the mailbox (IMAP: unseen; POP3: not deleted) and is
/// recorded as oversized, and the fetcher keeps going: a mail that arrives
/// later is published too.
async fn a_message_the_broker_refuses_for_size_is_left_and_the_rest_goes_on(proto: Proto) {
    use redis::AsyncCommands;
    let rabbit = mailagent_tests::private_rabbit::PrivateRabbit::start().await;
    let limit = "application:set_env(rabbit, max_message_size, 1048576).";
    rabbit.eval(limit, "set max_message_size").await;
    let fx = Fx::with_token(proto, "toolarge").await;
    let tag = format!("{}big", fx.prefix());
    let small = |i: usize| maildir::message(&tag, i, 2_000, false);
    let mut messages: Vec<Vec<u8>> = (0..5).map(small).collect();
    messages.push(maildir::message(&tag, 99, 2 * 1024 * 1024, false));
    messages.extend((5..10).map(small));
    fx.seed_messages(&messages);
    let mut config = fx.config(&[fx.default_table("big")]);
    let channel = rabbit.channel_with_topology(&mut config.amqp).await;
    let queue = common::topology::Topology::new(&config.amqp.prefix).create_queue;
    let fetcher = fx.start(config, Duration::from_millis(300), Duration::from_secs(2));

    let wanted: std::collections::BTreeSet<Vec<u8>> = (0..10).map(small).collect();
    let mut got = imap_support::drain(&channel, &queue, 10, Duration::from_secs(60)).await;
    got.extend(imap_support::drain(&channel, &queue, 100, Duration::from_secs(3)).await);
    let bodies: std::collections::BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
    assert!(
        bodies == wanted,
        "{} of 10 small mails published ({} publishes)",
        bodies.intersection(&wanted).count(),
        got.len()
    );
    assert!(
        got.len() <= 10 + 5,
        "{} publishes for 10 mails: more than a handful republished: {:?}",
        got.len(),
        got.iter()
            .map(
                |e| String::from_utf8_lossy(&e.body[..120.min(e.body.len())])
                    .lines()
                    .nth(2)
                    .unwrap_or_default()
                    .to_string()
            )
            .collect::<Vec<_>>()
    );
    let mut redis = fx.redis().await;
    let recorded: Vec<String> = redis
        .hkeys(fx.keys().oversized("big"))
        .await
        .expect("hkeys");
    assert_eq!(
        recorded.len(),
        1,
        "the refused mail is recorded as oversized"
    );
    fx.until_only_the_big_mail_is_left().await;
    // The mailbox is not stuck: a later mail comes through.
    let later = maildir::message(&tag, 100, 2_000, false);
    fx.seed_messages(std::slice::from_ref(&later));
    let next = imap_support::drain(&channel, &queue, 1, Duration::from_secs(30)).await;
    assert!(
        next.iter().any(|e| e.body == later),
        "the mail after the refused one was not published"
    );
    fetcher.stop().await;
}

// ------------------------------------------------------ max-message-bytes

/// A mail over `max-message-bytes` (here 100,000 bytes) is never fetched
/// in full (§4): the ten small mails around it are published, each once;
/// the big one is left in the mailbox (IMAP: unseen; POP3: not deleted),
/// recorded as oversized with its size, and counted in
/// `fetcher_oversized_total`; and the mailbox is not stuck on it.
async fn a_message_over_max_message_bytes_is_left_recorded_and_the_rest_goes_on(proto: Proto) {
    use redis::AsyncCommands;
    let fx = Fx::with_token(proto, "maxbytes").await;
    let tag = format!("{}mx", fx.prefix());
    let small = |i: usize| maildir::message(&tag, i, 2_000, false);
    let big = maildir::message(&tag, 99, 200_000, false);
    let mut messages: Vec<Vec<u8>> = (0..5).map(small).collect();
    messages.push(big.clone());
    messages.extend((5..10).map(small));
    fx.seed_messages(&messages);
    let config = fx.config(&[fx.table_with("mx", "max-message-bytes = 100000\n")]);
    let (channel, queue) = fx.channel_and_queue().await;
    let fetcher = fx.start(config, Duration::from_millis(300), Duration::from_secs(2));

    let wanted: std::collections::BTreeSet<Vec<u8>> = (0..10).map(small).collect();
    let mut got = imap_support::drain(&channel, &queue, 10, Duration::from_secs(60)).await;
    got.extend(imap_support::drain(&channel, &queue, 100, Duration::from_secs(3)).await);
    let bodies: std::collections::BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
    assert_eq!(bodies, wanted, "the ten small mails and nothing else");
    assert_eq!(got.len(), 10, "each small mail published once");

    let mut redis = fx.redis().await;
    let recorded: std::collections::HashMap<String, String> = redis
        .hgetall(fx.keys().oversized("mx"))
        .await
        .expect("hgetall");
    assert_eq!(recorded.len(), 1, "one oversized record: {recorded:?}");
    let record: serde_json::Value =
        serde_json::from_str(recorded.values().next().unwrap()).expect("JSON record");
    let bytes = record["bytes"].as_u64().expect("bytes");
    assert!(
        (200_000..=210_000).contains(&bytes),
        "the record keeps the mail's size: {record}"
    );
    fx.until_only_the_big_mail_is_left().await;
    let counted = fx
        .metric_sum("fetcher_oversized_total", "config=\"mx\"")
        .await;
    assert!(
        counted >= 1,
        "fetcher_oversized_total counts it ({counted})"
    );
    // Not stuck on it: a later mail comes through, the big one still not.
    let later = small(10);
    fx.seed_messages(std::slice::from_ref(&later));
    let next = imap_support::drain(&channel, &queue, 1, Duration::from_secs(30)).await;
    assert!(
        next.iter().any(|e| e.body == later),
        "the mail after the big one was not published"
    );
    assert!(
        next.iter().all(|e| e.body != big),
        "the big mail was published"
    );
    fetcher.stop().await;
}

both_protocols! {
    a_message_over_max_message_bytes_is_left_recorded_and_the_rest_goes_on: imap_a_message_over_max_message_bytes_is_left_recorded_and_the_rest_goes_on, pop3_a_message_over_max_message_bytes_is_left_recorded_and_the_rest_goes_on;
    a_mailboxs_success_clears_only_its_own_error: imap_a_mailboxs_success_clears_only_its_own_error, pop3_a_mailboxs_success_clears_only_its_own_error;
    a_refused_token_is_reported_and_a_stop_does_not_wait_for_its_replacement: imap_a_refused_token_is_reported_and_a_stop_does_not_wait_for_its_replacement, pop3_a_refused_token_is_reported_and_a_stop_does_not_wait_for_its_replacement;
    an_unroutable_message_needs_a_person_and_is_retried_slowly: imap_an_unroutable_message_needs_a_person_and_is_retried_slowly, pop3_an_unroutable_message_needs_a_person_and_is_retried_slowly;
    the_open_files_limit_is_raised_at_start: imap_the_open_files_limit_is_raised_at_start, pop3_the_open_files_limit_is_raised_at_start;
    a_message_the_broker_refuses_for_size_is_left_and_the_rest_goes_on: imap_a_message_the_broker_refuses_for_size_is_left_and_the_rest_goes_on, pop3_a_message_the_broker_refuses_for_size_is_left_and_the_rest_goes_on;
}
