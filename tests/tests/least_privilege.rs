//! Least privilege (issue 8): `mailagent setup` declares the topology with
//! the setup user and creates each component's Redis ACL user; the
//! components then run with `[amqp] declare = "passive"`, their own RabbitMQ
//! user (`scripts/services` makes `mailagent-test-<role>` with the
//! permissions of `common::least_privilege` for any prefix) and their own
//! Redis user — and what a component must not do is refused.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::least_privilege::Role;
use common::shutdown::CancellationToken;
use common::{Component, Config};
use lapin::options::BasicGetOptions;
use mailagent_tests::env::{bin_path, Endpoints};
use mailagent_tests::fixture::{publish_confirmed, stop_task, take_one};
use mailagent_tests::harness::{wait_for, TestConfig};
use mailagent_tests::idp::TestIdp;
use mailagent_tests::imap_support::{self as support, Fixture};
use mailagent_tests::maildir;
use redis::AsyncCommands;

/// Each role's Redis and RabbitMQ URLs under one prefix.
struct Users {
    redis: HashMap<&'static str, String>,
    amqp: HashMap<&'static str, String>,
    _dir: tempfile::TempDir,
}

/// Runs `mailagent setup --redis-acl --apply` with `setup_toml` (whose
/// `[amqp] url` is replaced by the setup user's, `[redis] url` stays the
/// administrator's) and returns every role's URLs.
fn setup(env: &Endpoints, prefix: &str, setup_toml: &str) -> Users {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    std::fs::create_dir(&passwords).unwrap();
    let mut redis = HashMap::new();
    let mut amqp = HashMap::new();
    for role in Role::ALL {
        let password = format!("{:032x}", rand::random::<u128>());
        std::fs::write(passwords.join(role.user(prefix)), format!("{password}\n")).unwrap();
        let mut url = url::Url::parse(env.redis_url()).unwrap();
        url.set_username(&role.user(prefix)).unwrap();
        url.set_password(Some(&password)).unwrap();
        redis.insert(role.name(), url.to_string());
        let key = format!(
            "MAILAGENT_TEST_AMQP_URL_{}",
            role.name().to_uppercase().replace('-', "_")
        );
        amqp.insert(role.name(), env.get(&key).to_string());
    }
    let config = dir.path().join("setup.toml");
    std::fs::write(&config, setup_toml.replace(env.amqp_url(), &amqp["setup"])).unwrap();
    let out = Command::new(bin_path("mailagent"))
        .arg("--config")
        .arg(&config)
        .args(["setup", "--redis-acl", "--apply", "--password-dir"])
        .arg(&passwords)
        .output()
        .expect("run mailagent setup");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mailagent setup failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("declared on RabbitMQ at amqp://mailagent-test-setup:[redacted]@"),
        "{stdout}"
    );
    assert!(stdout.contains("applied 5 Redis users"), "{stdout}");
    Users {
        redis,
        amqp,
        _dir: dir,
    }
}

/// `toml` with `role`'s URLs and `[amqp] declare = "passive"`.
fn restricted(toml: &str, env: &Endpoints, users: &Users, role: Role) -> String {
    toml.replace(env.redis_url(), &users.redis[role.name()])
        .replace(env.amqp_url(), &users.amqp[role.name()])
        .replacen("[amqp]\n", "[amqp]\ndeclare = \"passive\"\n", 1)
}

fn load(dir: &std::path::Path, toml: &str, component: Component) -> Config {
    let path = dir.join(format!("{}.toml", component.name()));
    std::fs::write(&path, toml).unwrap();
    common::config::load(
        &common::config::LoadOptions {
            path: Some(path),
            env: vec![],
        },
        component,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A config per role, for the harness's test prefix.
struct World {
    cfg: TestConfig,
    users: Users,
}

impl World {
    fn new(env: &Endpoints) -> Self {
        let cfg = TestConfig::new(env);
        let users = setup(env, &cfg.redis_prefix, &cfg.toml);
        Self { cfg, users }
    }

    fn config(&self, env: &Endpoints, role: Role, component: Component) -> Config {
        load(
            self.cfg.dir(),
            &restricted(&self.cfg.toml, env, &self.users, role),
            component,
        )
    }
}

fn is_access_refused(e: &lapin::Error) -> bool {
    matches!(e, lapin::Error::ProtocolError(err) if err.get_id() == 403)
}

#[tokio::test]
async fn an_envelope_published_by_a_fetcher_user_reaches_the_processors_queue() {
    let env = Endpoints::load();
    let world = World::new(&env);
    let fetcher = world.config(&env, Role::ImapFetcher, Component::ImapFetcher);
    assert_eq!(fetcher.amqp_declare, common::config::Declare::Passive);
    let conn = common::connect::amqp(&fetcher, "lp-fetcher").await.unwrap();
    // A passive declare needs no permission.
    let topology = common::service::declare_topology(&conn, &fetcher)
        .await
        .expect("the fetcher user finds the topology setup declared");
    let confirm = publish_confirmed(&conn, &topology.exchange, b"from a fetcher", true)
        .await
        .unwrap();
    assert!(confirm.is_ack());
    assert!(confirm.take_message().is_none(), "returned unroutable");

    let processor = world.config(&env, Role::FormProcessor, Component::FormProcessor);
    let pconn = common::connect::amqp(&processor, "lp-processor")
        .await
        .unwrap();
    let pchannel = pconn.create_channel().await.unwrap();
    let got = take_one(
        &pchannel,
        &topology.create_queue,
        "the envelope on the queue",
    )
    .await;
    assert_eq!(got.delivery.data, b"from a fetcher");
}

#[tokio::test]
async fn a_fetcher_user_can_neither_read_the_queue_nor_declare() {
    let env = Endpoints::load();
    let world = World::new(&env);
    let fetcher = world.config(&env, Role::ImapFetcher, Component::ImapFetcher);
    let conn = common::connect::amqp(&fetcher, "lp-fetcher").await.unwrap();
    let topology = common::topology::Topology::new(&fetcher.amqp.prefix);

    let channel = conn.create_channel().await.unwrap();
    let err = channel
        .basic_get(&topology.create_queue, BasicGetOptions { no_ack: true })
        .await
        .expect_err("a fetcher reads the queue");
    assert!(is_access_refused(&err), "{err}");

    let channel = conn.create_channel().await.unwrap();
    let err = common::topology::declare(&channel, &fetcher.amqp, false)
        .await
        .expect_err("a fetcher declares");
    assert!(is_access_refused(&err), "{err}");
    // …which is why a service with declare = "full" says what to change.
    let mut full = fetcher.clone();
    full.amqp_declare = common::config::Declare::Full;
    let err = common::service::declare_topology(&conn, &full)
        .await
        .expect_err("full declare");
    assert!(err.to_string().contains("declare = \"passive\""), "{err}");
}

#[tokio::test]
async fn the_processor_user_cannot_publish_to_incoming_but_can_dead_letter() {
    let env = Endpoints::load();
    let world = World::new(&env);
    let processor = world.config(&env, Role::FormProcessor, Component::FormProcessor);
    let conn = common::connect::amqp(&processor, "lp-processor")
        .await
        .unwrap();
    let topology = common::service::declare_topology(&conn, &processor)
        .await
        .unwrap();
    let publish = |exchange: String| {
        let conn = &conn;
        async move { publish_confirmed(conn, &exchange, b"x", false).await }
    };
    let err = publish(topology.exchange.clone())
        .await
        .expect_err("the processor published to incoming");
    assert!(is_access_refused(&err), "{err}");
    let confirm = publish(topology.dead_exchange.clone()).await.unwrap();
    assert!(confirm.is_ack());
}

#[tokio::test]
async fn a_redis_fetcher_user_keeps_to_its_own_keys() {
    let env = Endpoints::load();
    let world = World::new(&env);
    let prefix = world.cfg.redis_prefix.clone();
    let mut admin =
        redis::aio::ConnectionManager::new(redis::Client::open(env.redis_url()).unwrap())
            .await
            .unwrap();
    let other = format!("other{prefix}");
    let () = admin
        .set_ex(format!("{other}:{{tok.p}}:token"), "someone else's", 60)
        .await
        .unwrap();
    let () = admin
        .set_ex(format!("{prefix}:{{tok.p}}:token"), "ours", 60)
        .await
        .unwrap();

    let fetcher = world.config(&env, Role::ImapFetcher, Component::ImapFetcher);
    let mut redis = common::connect::redis(&fetcher).await.unwrap();
    let noperm = |r: redis::RedisResult<Option<String>>| match r {
        Err(e) => e.code() == Some("NOPERM"),
        Ok(_) => false,
    };
    // Another deployment's keys: refused.
    assert!(noperm(redis.get(format!("{other}:{{tok.p}}:token")).await));
    // Its own token: readable, not writable.
    let own: Option<String> = redis
        .get(format!("{prefix}:{{tok.p}}:token"))
        .await
        .unwrap();
    assert_eq!(own.as_deref(), Some("ours"));
    assert!(noperm(
        redis
            .set(format!("{prefix}:{{tok.p}}:token"), "forged")
            .await
            .map(|()| None)
    ));
    // Its own lease: writable.
    let () = redis
        .set_ex(format!("{prefix}:{{mail.m}}:lease"), "me", 60)
        .await
        .unwrap();
    // Commands outside its list: refused.
    let keys: redis::RedisResult<Vec<String>> =
        redis::cmd("KEYS").arg("*").query_async(&mut redis).await;
    assert_eq!(keys.unwrap_err().code(), Some("NOPERM"));
}

#[tokio::test]
async fn the_token_broker_runs_with_its_restricted_users() {
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    let mut cfg = TestConfig::new(&env);
    cfg.idp_profile("contoso", &idp.token_url(), &app, &secret)
        .broker_setting("forced-refresh-min-interval = 0");
    let users = setup(&env, &cfg.redis_prefix, &cfg.toml);
    let broker = load(
        cfg.dir(),
        &restricted(&cfg.toml, &env, &users, Role::TokenBroker),
        Component::TokenBroker,
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(token_broker::run(broker, shutdown.clone()));
    // A fetcher reads the token with its own user.
    let fetcher = load(
        cfg.dir(),
        &restricted(&cfg.toml, &env, &users, Role::ImapFetcher),
        Component::ImapFetcher,
    );
    let client = common::token::TokenClient::new(
        common::connect::redis(&fetcher).await.unwrap(),
        common::keys::Keys::new(cfg.redis_prefix.clone()),
        &fetcher.token_broker.encryption,
    );
    let token = wait_for("a token", Duration::from_secs(20), || async {
        client.current("contoso").await.unwrap()
    })
    .await;
    assert_eq!(token.token.expose(), idp.issued_tokens()[0]);
    // The fetcher's forced-refresh request (PUBLISH) reaches the broker.
    client.report_failure("contoso", &token).await.unwrap();
    wait_for("a forced refresh", Duration::from_secs(20), || async {
        (idp.issued_tokens().len() >= 2).then_some(())
    })
    .await;
    stop_task(&shutdown, task, Duration::from_secs(10), "broker")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_fetcher_and_form_processor_run_with_their_restricted_users() {
    let fx = Fixture::new("lp");
    let env = fx.env.clone();
    let seeded: Vec<Vec<u8>> = (0..5)
        .map(|i| maildir::message(&fx.prefix, i, 512, false))
        .collect();
    maildir::seed(&env, &fx.mailbox, &seeded);
    fx.plant_token().await;
    let toml = fx.config_toml(&[fx.mail_table("m", &fx.mailbox, "")]);
    // The observer first: the fixture's config (which it loads) makes the
    // suite's restricted users for the prefix; `setup` then replaces them
    // with those of `mailagent setup --redis-acl --apply`, which this test
    // is about.
    let observer = fx.channel().await;
    let users = setup(&env, &fx.prefix, &toml);

    let shutdown = CancellationToken::new();
    let fetcher = load(
        fx.dir.path(),
        &restricted(&toml, &env, &users, Role::ImapFetcher),
        Component::ImapFetcher,
    );
    let fetch = tokio::spawn(common::fetch::run(
        imap_fetcher::Imap,
        fetcher,
        imap_fetcher::Options::default(),
        shutdown.clone(),
    ));
    assert!(
        support::eventually(Duration::from_secs(30), || async {
            support::depth(&observer, &fx.queue()).await == 5
        })
        .await,
        "the restricted fetcher published the 5 messages"
    );

    // The processor consumes them; none is a form, so each is dead-lettered:
    // its consume (read) and dead-letter publish (write) rights both work.
    let store = fx.dir.path().join("records.db");
    let processor_toml = restricted(&toml, &env, &users, Role::FormProcessor).replacen(
        "[token-broker]\n",
        &format!(
            "[form-processor]\nstore = \"sqlite://{}\"\n[token-broker]\n",
            store.display()
        ),
        1,
    );
    let processor = load(fx.dir.path(), &processor_toml, Component::FormProcessor);
    let process = tokio::spawn(form_processor::run(processor, shutdown.clone()));
    let dead = format!("{}.dead", fx.prefix);
    assert!(
        support::eventually(Duration::from_secs(30), || async {
            support::depth(&observer, &fx.queue()).await == 0
                && support::depth(&observer, &dead).await == 5
        })
        .await,
        "the restricted processor consumed and dead-lettered the 5 messages"
    );
    stop_task(&shutdown, fetch, Duration::from_secs(15), "fetcher")
        .await
        .unwrap();
    stop_task(&shutdown, process, Duration::from_secs(15), "processor")
        .await
        .unwrap();
}
