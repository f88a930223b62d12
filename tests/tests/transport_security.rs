//! Transport security (issue 8): `rediss://` with an ACL user and `amqps://`
//! with a user work against the TLS listeners `scripts/services` starts;
//! certificates are always verified, and each usual mistake — an untrusted
//! CA, plaintext to a TLS port, TLS to a plaintext port, a mail server's
//! expired, wrong-host or self-signed certificate — fails at once with an
//! error that says what happened and names the endpoint.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::keys::Keys;
use common::shutdown::CancellationToken;
use common::token::TokenClient;
use common::{Component, Config};
use mailagent_tests::env::Endpoints;
use mailagent_tests::fixture::{publish_confirmed, stop_task, take_one};
use mailagent_tests::harness::{wait_for, TestConfig};
use mailagent_tests::idp::TestIdp;

fn redis_tls_url(env: &Endpoints) -> &str {
    env.get("MAILAGENT_TEST_REDIS_TLS_URL")
}

fn amqps_url(env: &Endpoints) -> &str {
    env.get("MAILAGENT_TEST_AMQPS_URL")
}

/// A test config whose Redis and RabbitMQ URLs are replaced.
fn config_with(env: &Endpoints, redis: &str, amqp: &str) -> TestConfig {
    let mut cfg = TestConfig::new(env);
    cfg.toml = cfg
        .toml
        .replace(env.redis_url(), redis)
        .replace(env.amqp_url(), amqp);
    cfg
}

/// The same config trusting `ca` instead of the test CA.
fn trusting(cfg: &mut TestConfig, env: &Endpoints, ca: &Path) {
    cfg.toml = cfg.toml.replace(
        &format!("extra-ca-file = \"{}\"", env.ca_file().display()),
        &format!("extra-ca-file = \"{}\"", ca.display()),
    );
}

/// The password part of a URL, which no error may show.
fn password_of(url: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .password()
        .expect("URL with a password")
        .to_string()
}

/// Asserts a connection error is the non-retried kind, names the endpoint
/// (redacted) and says `what`.
fn assert_clear(err: &common::Error, url: &str, what: &str) {
    let text = err.to_string();
    assert!(
        matches!(err, common::Error::Connect { .. }),
        "expected a diagnosed connection error, got: {text}"
    );
    assert!(!err.is_transient(), "must not be retried: {text}");
    let port = url::Url::parse(url).unwrap().port().unwrap();
    assert!(
        text.contains(&format!("localhost:{port}")) || text.contains(&format!("127.0.0.1:{port}")),
        "names the endpoint: {text}"
    );
    assert!(
        !text.contains(&password_of(url)),
        "shows the password: {text}"
    );
    assert!(text.contains(what), "says {what:?}: {text}");
}

/// Asserts the TLS Redis and RabbitMQ both refuse `config` clearly for an
/// untrusted certificate.
async fn assert_both_untrusted(config: &Config, env: &Endpoints) {
    let err = common::connect::redis(config).await.expect_err("refused");
    assert_clear(&err, redis_tls_url(env), "untrusted certificate");
    let err = common::connect::amqp(config, "t")
        .await
        .expect_err("refused");
    assert_clear(&err, amqps_url(env), "untrusted certificate");
}

#[tokio::test]
async fn rediss_with_an_acl_user_and_the_extra_ca_works() {
    let env = Endpoints::load();
    let cfg = config_with(&env, redis_tls_url(&env), env.amqp_url());
    let config = cfg.load(Component::Cli);
    let mut redis = common::connect::redis(&config).await.expect("rediss");
    let key = format!("{}:probe", cfg.redis_prefix);
    let () = redis::AsyncCommands::set_ex(&mut redis, &key, "over tls", 60)
        .await
        .unwrap();
    let got: String = redis::AsyncCommands::get(&mut redis, &key).await.unwrap();
    assert_eq!(got, "over tls");
    let who: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(who, "mailagent-tls");
    // The pub/sub client (the broker's refresh requests) uses the same trust.
    let client = common::connect::redis_client(&config).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("rediss pub/sub");
    pubsub.subscribe(&key).await.unwrap();
}

#[tokio::test]
async fn amqps_with_a_user_and_the_extra_ca_carries_an_envelope() {
    let env = Endpoints::load();
    let cfg = config_with(&env, env.redis_url(), amqps_url(&env));
    let config = cfg.load(Component::Cli);
    let conn = common::connect::amqp(&config, "transport-test")
        .await
        .expect("amqps");
    let topology = common::service::declare_topology(&conn, &config)
        .await
        .unwrap();
    let confirm = publish_confirmed(&conn, &topology.exchange, b"over tls", true)
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let channel = conn.create_channel().await.unwrap();
    let got = take_one(&channel, &topology.create_queue, "the message on the queue").await;
    assert_eq!(got.delivery.data, b"over tls");
}

#[tokio::test]
async fn token_broker_runs_over_rediss_and_amqps() {
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    let mut cfg = config_with(&env, redis_tls_url(&env), amqps_url(&env));
    cfg.idp_profile("contoso", &idp.token_url(), &app, &secret);
    let shutdown = CancellationToken::new();
    let broker = tokio::spawn(token_broker::run(
        cfg.load(Component::TokenBroker),
        shutdown.clone(),
    ));
    let reader = cfg.load(Component::ImapFetcher);
    let client = TokenClient::new(
        common::connect::redis(&reader).await.unwrap(),
        Keys::new(cfg.redis_prefix.clone()),
        &reader.token_broker.encryption,
    );
    let token = wait_for("a token over rediss", Duration::from_secs(20), || async {
        client.current("contoso").await.unwrap()
    })
    .await;
    assert_eq!(token.token.expose(), idp.issued_tokens()[0]);
    stop_task(&shutdown, broker, Duration::from_secs(10), "broker")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_wrong_ca_fails_at_once_naming_the_endpoint() {
    let env = Endpoints::load();
    // A certificate that did not sign the servers' certificates.
    let wrong_ca = env.get("MAILAGENT_TEST_CERT_SELF_SIGNED").to_string();
    let mut cfg = config_with(&env, redis_tls_url(&env), amqps_url(&env));
    trusting(&mut cfg, &env, Path::new(&wrong_ca));
    let config = cfg.load(Component::Cli);

    let started = Instant::now();
    assert_both_untrusted(&config, &env).await;
    assert!(started.elapsed() < Duration::from_secs(15));

    // A service stops on it instead of retrying for ever.
    let shutdown = CancellationToken::new();
    let start = tokio::time::timeout(
        Duration::from_secs(30),
        common::service::start(&config, Component::FormProcessor, &shutdown),
    )
    .await
    .expect("start gives up at once");
    match start {
        Err(common::service::StartError::Fatal(e)) => {
            assert!(e.to_string().contains("untrusted certificate"), "{e}")
        }
        Err(e) => panic!("expected a fatal error, got {e}"),
        Ok(_) => panic!("started with a wrong CA"),
    }
}

#[tokio::test]
async fn without_the_extra_ca_the_test_servers_are_untrusted() {
    let env = Endpoints::load();
    let mut cfg = config_with(&env, redis_tls_url(&env), amqps_url(&env));
    cfg.toml = cfg.toml.replace(
        &format!("[tls]\nextra-ca-file = \"{}\"\n", env.ca_file().display()),
        "",
    );
    let config = cfg.load(Component::Cli);
    assert!(config.tls.extra_ca_file.is_none());
    assert_both_untrusted(&config, &env).await;
}

#[tokio::test]
async fn plaintext_to_a_tls_port_and_tls_to_a_plaintext_port_fail_clearly_and_quickly() {
    let env = Endpoints::load();
    let plain_redis = redis_tls_url(&env).replacen("rediss://", "redis://", 1);
    let plain_amqp = amqps_url(&env).replacen("amqps://", "amqp://", 1);
    let tls_amqp = env.amqp_url().replacen("amqp://", "amqps://", 1);
    let cfg = config_with(&env, &plain_redis, &plain_amqp);
    let config: Config = cfg.load(Component::Cli);

    let started = Instant::now();
    let err = common::connect::redis(&config).await.expect_err("refused");
    assert_clear(&err, &plain_redis, "speaks TLS: use rediss://");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let err = common::connect::amqp(&config, "t")
        .await
        .expect_err("refused");
    assert_clear(&err, &plain_amqp, "speaks TLS: use amqps://");
    assert!(started.elapsed() < Duration::from_secs(15));

    let cfg = config_with(&env, env.redis_url(), &tls_amqp);
    let err = common::connect::amqp(&cfg.load(Component::Cli), "t")
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("does not speak TLS"),
        "amqps:// to the plaintext port: {err}"
    );
}

#[tokio::test]
async fn certificate_verification_cannot_be_turned_off() {
    let env = Endpoints::load();
    let cfg = config_with(
        &env,
        &format!("{}#insecure", redis_tls_url(&env)),
        env.amqp_url(),
    );
    let errors = common::config::load(
        &common::config::LoadOptions {
            path: Some(cfg.path()),
            env: vec![],
        },
        Component::Cli,
    )
    .unwrap_err()
    .to_string();
    assert!(errors.contains("redis.url: #insecure"), "{errors}");
    assert!(!errors.contains(&password_of(redis_tls_url(&env))));
}

// ------------------------------------------------------------ mail servers

/// A TLS server on loopback presenting `name`.pem (from the test CA dir)
/// that answers an IMAP/POP3 greeting, for as long as the test runs.
async fn tls_server(env: &Endpoints, name: &str, greeting: &'static str) -> u16 {
    let dir = env.ca_file().parent().unwrap().to_path_buf();
    let certs = common::tls::read_certs(&dir.join(format!("{name}.pem"))).unwrap();
    let key_pem = std::fs::read(dir.join(format!("{name}.key"))).unwrap();
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .unwrap()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls.write_all(greeting.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            });
        }
    });
    port
}

/// A TLS server presenting certificate `name` with the greeting of
/// `server_type` (`imaps`, `pop3s`), and a config with one mail config for
/// it: its port and the config.
async fn certificate_server(env: &Endpoints, name: &str, server_type: &str) -> (u16, Config) {
    let greeting = match server_type {
        "imaps" => "* OK ready\r\n",
        _ => "+OK ready\r\n",
    };
    let port = tls_server(env, name, greeting).await;
    (port, mail_config(env, server_type, port))
}

fn mail_config(env: &Endpoints, server_type: &str, port: u16) -> Config {
    let mut cfg = TestConfig::new(env);
    cfg.push(&format!(
        r#"[[incoming-mail]]
name = "certs"
host = "localhost"
username = "box@example.com"
password = "not-used"
mail-server-type = "{server_type}"
port = {port}
"#
    ));
    cfg.load(Component::Cli)
}

/// What each bad certificate must be reported as.
const BAD_CERTIFICATES: [(&str, &str); 3] = [
    ("expired", "the server's certificate has expired"),
    (
        "wronghost",
        "the server's certificate is not valid for this host name",
    ),
    // UnknownIssuer, or BadSignature where a trusted root carries the same
    // name (Debian's ssl-cert snakeoil root is "CN=localhost").
    ("selfsigned", "untrusted certificate"),
];

#[tokio::test]
async fn imap_fetcher_refuses_expired_wrong_host_and_self_signed_certificates() {
    let env = Endpoints::load();
    // The control: the CA-signed certificate passes the handshake.
    let (good, config) = certificate_server(&env, "server", "imaps").await;
    let tls = common::tls::client_config(config.tls.extra_ca_file.as_deref()).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", good))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the test CA's server certificate verifies");

    for (name, cause) in BAD_CERTIFICATES {
        let (port, config) = certificate_server(&env, name, "imaps").await;
        let err = imap_fetcher::session::open(
            &config.incoming_mail[0],
            &tls,
            imap_fetcher::session::Credentials::Password {
                password: "not-used",
            },
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{name}: logged in"));
        let connect_error = matches!(err, imap_fetcher::error::Error::Connect { .. });
        assert_tls_cause(name, cause, &err, connect_error);
        assert!(
            err.to_string().contains(&format!("localhost:{port}")),
            "{err}"
        );
    }
}

/// Asserts `err` is a connect error (`connect_error`, the variant of the
/// fetcher's error type) whose TLS handshake failure is reported as `cause`
/// (for certificate `name`).
fn assert_tls_cause(name: &str, cause: &str, err: &dyn std::error::Error, connect_error: bool) {
    assert!(connect_error, "{name}: expected a connect error, got {err}");
    let source = err
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .unwrap_or_else(|| panic!("{name}: no I/O cause in {err}"));
    let said = common::tls::handshake_cause(source)
        .unwrap_or_else(|| panic!("{name}: no TLS cause in {err}"));
    assert!(said.starts_with(cause), "{name}: {said}");
}

#[tokio::test]
async fn pop_fetcher_refuses_expired_wrong_host_and_self_signed_certificates() {
    let env = Endpoints::load();
    for (name, cause) in BAD_CERTIFICATES {
        let (_, config) = certificate_server(&env, name, "pop3s").await;
        let tls = common::tls::client_config(config.tls.extra_ca_file.as_deref()).unwrap();
        let connect =
            pop_fetcher::pop3::connect(&config.incoming_mail[0], tls, Duration::from_secs(10));
        let err = connect
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: connected"));
        let connect_error = matches!(err, pop_fetcher::error::Error::Connect { .. });
        assert_tls_cause(name, cause, &err, connect_error);
    }
}
