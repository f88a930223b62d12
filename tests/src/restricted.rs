//! Every component under test runs as its least-privilege users (issue 8:
//! "the whole suite runs with the restricted RabbitMQ and Redis users").
//!
//! [`restrict`] turns a test's configuration, written against the test
//! servers' administrator URLs, into the one a component gets in a
//! least-privilege deployment: its own RabbitMQ user (`scripts/services`
//! makes `mailagent-test-<role>` with the permissions of
//! `common::least_privilege` for any prefix without a dot), its own Redis
//! ACL user (`<prefix>-<role>`, created here with
//! `common::least_privilege::redis_rules` for the test's prefix), and
//! `[amqp] declare = "passive"`, after declaring the topology once with the
//! setup user, as `mailagent setup` does in a deployment. What the test
//! itself does (filling mailboxes, draining queues, reading Redis) stays
//! with the administrator URLs.
//!
//! `tests/tests/least_privilege.rs` checks the same rules from the other
//! side: what a component must not do is refused.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use common::least_privilege::{redis_rules, Role};
use common::{Component, Config};

use crate::env::Endpoints;

/// The role whose rights `component` runs with.
pub fn role(component: Component) -> Role {
    match component {
        Component::TokenBroker => Role::TokenBroker,
        Component::ImapFetcher => Role::ImapFetcher,
        Component::PopFetcher => Role::PopFetcher,
        Component::FormProcessor => Role::FormProcessor,
        Component::Cli => Role::Cli,
        Component::Setup => Role::Setup,
    }
}

/// `toml` as `component` runs it with least privilege: URLs equal to the
/// test servers' (`MAILAGENT_TEST_REDIS_URL`, `MAILAGENT_TEST_AMQP_URL`)
/// get the component's user; other URLs (TLS endpoints) stay as they are.
pub fn restrict(toml: &str, component: Component) -> String {
    let env = Endpoints::load();
    restrict_via(toml, component, env.redis_url(), env.amqp_url())
}

/// [`restrict`] for a configuration whose Redis and RabbitMQ URLs are
/// `redis_url` and `amqp_url` (the test servers seen through a relay: same
/// users, another port).
pub fn restrict_via(toml: &str, component: Component, redis_url: &str, amqp_url: &str) -> String {
    let env = Endpoints::load();
    let role = role(component);
    let config = load_as_setup(toml);
    prepare(&env, &config);
    let mut out = toml.replace(
        redis_url,
        &with_user(
            redis_url,
            &role.user(&config.redis.prefix),
            redis_password(),
        ),
    );
    let amqp_user: url::Url = env
        .get(&format!(
            "MAILAGENT_TEST_AMQP_URL_{}",
            role.name().to_uppercase().replace('-', "_")
        ))
        .parse()
        .expect("restricted AMQP URL");
    let mut amqp_restricted = out.contains(amqp_url);
    let amqp_password = amqp_user.password().expect("password");
    out = out.replace(
        amqp_url,
        &with_user(amqp_url, amqp_user.username(), amqp_password),
    );
    // The nodes of the test cluster (`scripts/services up --cluster`), when
    // the configuration lists them: the same users exist there.
    if let Some(nodes) = env.get_opt("MAILAGENT_TEST_CLUSTER_AMQP_URLS") {
        for node in nodes.split(',') {
            if !out.contains(node) {
                continue;
            }
            amqp_restricted = true;
            out = out.replace(node, &with_user(node, amqp_user.username(), amqp_password));
        }
    }
    if amqp_restricted && role != Role::Setup && !amqp_section_sets_declare(&out) {
        out = out.replacen("[amqp]\n", "[amqp]\ndeclare = \"passive\"\n", 1);
    }
    out
}

/// `url` with user name and password replaced.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let mut u: url::Url = url.parse().expect("server URL");
    u.set_username(user).expect("user name");
    u.set_password(Some(password)).expect("password");
    u.to_string()
}

/// This test process's password for every restricted Redis user it makes.
pub fn redis_password() -> &'static str {
    static PASSWORD: OnceLock<String> = OnceLock::new();
    PASSWORD.get_or_init(|| format!("{:032x}", rand::random::<u128>()))
}

fn amqp_section_sets_declare(toml: &str) -> bool {
    let Some(start) = toml.find("[amqp]\n") else {
        return false;
    };
    toml[start + 7..]
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .any(|l| l.trim_start().starts_with("declare"))
}

/// The configuration as `mailagent setup` reads it (no secret files).
fn load_as_setup(toml: &str) -> Config {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("setup.toml");
    std::fs::write(&path, toml).expect("write config");
    common::config::load(
        &common::config::LoadOptions {
            path: Some(path),
            env: vec![],
        },
        Component::Setup,
    )
    .unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"))
}

/// Once per prefix in this process: the Redis ACL users of every role and
/// the AMQP topology, declared by the setup user.
fn prepare(env: &Endpoints, config: &Config) {
    static DONE: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap();
    let done = done.get_or_insert_with(HashSet::new);

    let redis_key = format!("redis {}", config.redis.prefix);
    if !done.contains(&redis_key) {
        create_redis_users(env, &config.redis.prefix);
        done.insert(redis_key);
    }
    let amqp_key = format!("amqp {}", config.amqp.prefix);
    if !done.contains(&amqp_key) {
        declare_as_setup(env, config);
        done.insert(amqp_key);
    }
}

fn create_redis_users(env: &Endpoints, prefix: &str) {
    let client = redis::Client::open(env.redis_url()).expect("redis url");
    let mut conn = client.get_connection().expect("redis (administrator)");
    for role in Role::ALL {
        let Some(rules) = redis_rules(role, prefix) else {
            continue;
        };
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg(role.user(prefix))
            .arg("reset")
            .arg("on")
            .arg(format!(">{}", redis_password()));
        for rule in rules.split_whitespace() {
            cmd.arg(rule);
        }
        cmd.query::<()>(&mut conn)
            .unwrap_or_else(|e| panic!("ACL SETUSER {}: {e}", role.user(prefix)));
    }
}

/// Declares the topology of `config` as `mailagent setup` does, with the
/// setup user, on a thread of its own (callers may be inside a runtime).
fn declare_as_setup(env: &Endpoints, config: &Config) {
    let mut amqp = config.amqp.clone();
    amqp.set_url(common::secret::SecretUrl::new(
        env.get("MAILAGENT_TEST_AMQP_URL_SETUP").to_string(),
    ));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let conn = lapin::Connection::connect(
                amqp.url.expose(),
                lapin::ConnectionProperties::default(),
            )
            .await
            .expect("amqp (setup user)");
            let channel = conn.create_channel().await.expect("channel");
            common::topology::declare(&channel, &amqp, false)
                .await
                .expect("declare the topology as the setup user");
            let _ = conn.close(200, "declared").await;
        })
    })
    .join()
    .expect("declare thread");
}
