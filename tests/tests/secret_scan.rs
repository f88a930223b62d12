//! No secret anywhere (spec §8, issue 8): the four binaries run as processes
//! at `RUST_LOG=trace` through a demo-like cycle — the test IdP issues
//! tokens, forms are mailed into an IMAP mailbox (XOAUTH2), a POP3 mailbox
//! (XOAUTH2) and an IMAP mailbox reached with a password, records and a
//! rejection are made — then every byte they left behind is scanned for the
//! client secret, the token-encryption key (base64 and raw), the mail
//! password and every access token the IdP issued: their output, every
//! Redis value under the test's prefix, every AMQP message left (the
//! dead-letter queue included) and the record store's files.
//!
//! The `Debug` of every exported config and error type holding a secret is
//! checked the same way, without processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use common::Component;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use mailagent_tests::env::{unique, Endpoints};
use mailagent_tests::forms::{self, Attachment, Lease};
use mailagent_tests::harness::{mail_table, wait_for, TestConfig};
use mailagent_tests::idp::TestIdp;
use mailagent_tests::maildir;
use mailagent_tests::process;
use tokio::process::Child;

/// What must never appear, by name.
struct Secrets(Vec<(String, Vec<u8>)>);

impl Secrets {
    fn add(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let v = value.as_ref().to_vec();
        assert!(v.len() >= 8, "{name} is too short to scan for");
        self.0.push((name.to_string(), v));
    }

    /// The names of the secrets found in `hay`.
    fn found_in(&self, hay: &[u8]) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, s)| hay.windows(s.len()).any(|w| w == s.as_slice()))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

fn form(id: &str) -> Vec<u8> {
    forms::mail(
        forms::LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &[Attachment::xlsx(forms::lease_workbook(&Lease {
            id,
            ..Default::default()
        }))],
    )
}

/// Every Redis key under `prefix` with its value(s) as bytes.
async fn redis_dump(env: &Endpoints, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let client = redis::Client::open(env.redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        // The command that reads a key of this type whole, and its arguments.
        let (read, args): (&str, &[&str]) = match kind.as_str() {
            "string" => ("GET", &[]),
            "hash" => ("HGETALL", &[]),
            "list" => ("LRANGE", &["0", "-1"]),
            "set" => ("SMEMBERS", &[]),
            "zset" => ("ZRANGE", &["0", "-1"]),
            "stream" => ("XRANGE", &["-", "+"]),
            other => panic!("key {k} of unexpected type {other}"),
        };
        let value: redis::Value = redis::cmd(read)
            .arg(&k)
            .arg(args)
            .query_async(&mut c)
            .await
            .unwrap();
        let parts: Vec<Vec<u8>> = match kind.as_str() {
            "stream" => vec![format!("{value:?}").into_bytes()],
            "string" => vec![redis::from_redis_value(&value).unwrap()],
            _ => redis::from_redis_value(&value).unwrap(),
        };
        out.insert(format!("{k} ({kind})"), parts.concat());
    }
    out
}

/// Takes every message left in `queue`: body, then properties and headers in Debug form.
async fn amqp_dump(channel: &lapin::Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue, BasicGetOptions::default())
        .await
        .unwrap()
    {
        let mut blob = m.data.clone();
        blob.extend_from_slice(format!("{:?}", m.properties).as_bytes());
        m.acker.ack(BasicAckOptions::default()).await.unwrap();
        out.push(blob);
    }
    out
}

/// SIGTERM to every child, then each must exit 0 within 30 s.
async fn sigterm(children: Vec<(String, Child)>) {
    for (_, c) in &children {
        process::sigterm(c.id().expect("pid"));
    }
    for (name, mut c) in children {
        let status = process::wait_exit(&mut c, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("{name} did not stop on SIGTERM"));
        assert!(status.success(), "{name} exited {status} on SIGTERM");
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trace_level_demo_cycle_leaves_no_secret_in_logs_redis_amqp_or_the_store() {
    let env = Endpoints::load();
    let (idp, app, client_secret) = TestIdp::start_with_app(&env).await;
    let imap_mailbox = format!("{}@contoso.com", unique("scan-imap"));
    let pop_mailbox = format!("{}@contoso.com", unique("scan-pop"));
    let pw_mailbox = format!("{}@contoso.com", unique("scan-pw"));
    env.grant(&app, &imap_mailbox);
    env.grant(&app, &pop_mailbox);
    let mail_password = env.get("MAILAGENT_TEST_MASTER_PASSWORD").to_string();
    let login = format!(
        "{pw_mailbox}{}{}",
        env.get("MAILAGENT_TEST_MASTER_SEPARATOR"),
        env.get("MAILAGENT_TEST_MASTER_USER")
    );

    let mut cfg = TestConfig::new(&env);
    cfg.idp_profile("scan", &idp.token_url(), &app, &client_secret);
    let store_dir = cfg.dir().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let imaps = env.mail_addr("IMAPS").port();
    let pop3s = env.mail_addr("POP3S").port();
    let oauth = "oauth-profile = \"scan\"";
    let password = format!("password = \"{mail_password}\"");
    let imap_rules = "after-fetch = \"mark-seen\"\nstart-from = \"all\"\n";
    cfg.store(&format!("sqlite://{}/records.db", store_dir.display()))
        .incoming_mail(&mail_table(
            "scan-imap",
            &imap_mailbox,
            imaps,
            "imaps",
            oauth,
            imap_rules,
        ))
        .incoming_mail(&mail_table(
            "scan-pop",
            &pop_mailbox,
            pop3s,
            "pop3s",
            oauth,
            "after-fetch = \"delete\"\n",
        ))
        .incoming_mail(&mail_table(
            "scan-password",
            &login,
            imaps,
            "imaps",
            &password,
            imap_rules,
        ))
        .lease_topic();
    let key_b64 = std::fs::read_to_string(cfg.dir().join("token-key")).unwrap();
    let key_raw = base64::engine::general_purpose::STANDARD
        .decode(key_b64.trim())
        .unwrap();

    // Mail in: a valid form in each mailbox, and one rejected (no workbook).
    maildir::seed(&env, &imap_mailbox, &[form("S-IMAP")]);
    maildir::seed(
        &env,
        &pop_mailbox,
        &[
            form("S-POP"),
            forms::mail(forms::LEASE_SUBJECT, "ann@contoso.com", &[], &[]),
        ],
    );
    maildir::seed(&env, &pw_mailbox, &[form("S-PASSWORD")]);

    let logs = cfg.dir().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // Each binary with its least-privilege Redis and RabbitMQ users, whose
    // passwords are scanned for too.
    let children: Vec<(String, Child)> = [
        Component::TokenBroker,
        Component::ImapFetcher,
        Component::PopFetcher,
        Component::FormProcessor,
    ]
    .into_iter()
    .map(|c| {
        let name = c.name();
        let child = process::launch(name, &cfg.path_for(c))
            .log_level("trace")
            .log(&logs.join(format!("{name}.log")))
            .spawn();
        (name.to_string(), child)
    })
    .collect();

    let store_url = format!("sqlite://{}/records.db", store_dir.display());
    let outcome = tokio::time::timeout(Duration::from_secs(90), async {
        wait_for(
            "3 records and 1 rejection",
            Duration::from_secs(90),
            || async {
                let store = form_processor::store::Store::open(&store_url, None)
                    .await
                    .ok()?;
                let records = store.count_records().await.ok()?;
                let failures = store.failures().await.ok()?;
                store.close().await;
                (records >= 3 && failures.iter().filter(|f| f.dead_lettered).count() >= 1)
                    .then_some(())
            },
        )
        .await
    })
    .await;
    // Let one more token refresh cycle and heartbeat be logged either way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigterm(children).await;
    if outcome.is_err() {
        let tails: Vec<String> = files_under(&logs)
            .iter()
            .map(|p| {
                let t = std::fs::read_to_string(p).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(15).collect();
                format!(
                    "== {}\n{}",
                    p.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        panic!("the cycle did not complete:\n{}", tails.join("\n"));
    }

    let mut secrets = Secrets(Vec::new());
    secrets.add("client secret", &client_secret);
    secrets.add("token key (base64)", key_b64.trim());
    secrets.add("token key (raw)", &key_raw);
    secrets.add("mail password", &mail_password);
    secrets.add(
        "restricted Redis users' password",
        mailagent_tests::restricted::redis_password(),
    );
    let amqp_user: url::Url = env
        .get("MAILAGENT_TEST_AMQP_URL_IMAP_FETCHER")
        .parse()
        .unwrap();
    secrets.add(
        "restricted RabbitMQ users' password",
        amqp_user.password().unwrap(),
    );
    let tokens = idp.issued_tokens();
    assert!(!tokens.is_empty(), "the IdP issued no token");
    for (i, t) in tokens.iter().enumerate() {
        secrets.add(&format!("access token {i}"), t);
        secrets.add(
            &format!("access token {i} signature"),
            t.rsplit('.').next().unwrap(),
        );
    }

    let mut leaks = Vec::new();
    let mut scanned = 0usize;
    // 1. Process output.
    for p in files_under(&logs) {
        let bytes = std::fs::read(&p).unwrap();
        scanned += bytes.len();
        for s in secrets.found_in(&bytes) {
            leaks.push(format!("{s} in {}", p.display()));
        }
        // Show where (the secret masked), so a leak names its source.
        for line in String::from_utf8_lossy(&bytes).lines() {
            let mut masked = line.to_string();
            for (name, v) in &secrets.0 {
                let v = String::from_utf8_lossy(v);
                masked = masked.replace(v.as_ref(), &format!("<{name}>"));
            }
            if masked != line {
                leaks.push(format!(
                    "  {}",
                    masked.chars().take(400).collect::<String>()
                ));
            }
        }
    }
    for name in [
        "token-broker",
        "imap-fetcher",
        "pop-fetcher",
        "form-processor",
    ] {
        let verbose = std::fs::read_to_string(logs.join(format!("{name}.log")))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"level\":\"TRACE\"") || l.contains("\"level\":\"DEBUG\""))
            .count();
        assert!(
            verbose > 0,
            "{name} logged nothing below info: the scan proves nothing"
        );
    }
    // 2. Redis.
    let dump = redis_dump(&env, &cfg.redis_prefix).await;
    assert!(
        !dump.is_empty(),
        "nothing in Redis under {}",
        cfg.redis_prefix
    );
    for (k, v) in &dump {
        scanned += v.len();
        for s in secrets.found_in(v) {
            leaks.push(format!("{s} in Redis key {k}"));
        }
    }
    // 3. AMQP: the dead-letter queue and anything left in the create queue.
    let conn = lapin::Connection::connect(env.amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut dead_letters = 0;
    for q in ["dead", "create"] {
        let queue = format!("{}.{q}", cfg.amqp_prefix);
        for m in amqp_dump(&channel, &queue).await {
            if q == "dead" {
                dead_letters += 1;
            }
            scanned += m.len();
            for s in secrets.found_in(&m) {
                leaks.push(format!("{s} in an AMQP message on {queue}"));
            }
        }
    }
    assert!(
        dead_letters >= 1,
        "the rejection is on the dead-letter queue"
    );
    // 4. The record store, every file of it (WAL included).
    for p in files_under(&store_dir) {
        let bytes = std::fs::read(&p).unwrap();
        scanned += bytes.len();
        for s in secrets.found_in(&bytes) {
            leaks.push(format!("{s} in {}", p.display()));
        }
    }
    eprintln!(
        "scanned {scanned} bytes ({} Redis keys, {} secrets incl. {} tokens)",
        dump.len(),
        secrets.0.len(),
        tokens.len()
    );
    assert!(leaks.is_empty(), "secrets found:\n{}", leaks.join("\n"));
}

const DBG_CLIENT_SECRET: &str = "Zq8~DebugClientSecret.NeverPrinted";
const DBG_MAIL_PASSWORD: &str = "mail-DebugP4ss-never-printed";
const DBG_REDIS_PASSWORD: &str = "redis-DebugPw-never-printed";
const DBG_AMQP_PASSWORD: &str = "amqp-DebugPw-never-printed";
const DBG_PG_PASSWORD: &str = "pg-DebugPw-never-printed";
const DBG_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJkZWJ1ZyJ9.DebugTokenSignatureNeverPrinted";

fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "{what} shows a secret:\n{text}");
    }
}

/// `Debug` (and `Display` where there is one) of the exported config and
/// error types, built from inputs that hold every kind of secret.
#[tokio::test]
async fn debug_of_configs_tokens_and_errors_shows_no_secret() {
    // Servers, store and mail hosts that do not exist: only the config
    // is needed, with a password in every place one can be.
    let mut cfg = TestConfig::new(&Endpoints::load());
    let key_b64 = std::fs::read_to_string(cfg.dir().join("token-key")).unwrap();
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_b64.trim())
        .unwrap();
    let legacy = |name: &str, host: &str, server_type: &str| {
        format!(
            "name = \"{name}\"\nhost = \"{host}\"\nusername = \"forms@example.net\"\npassword = \"{DBG_MAIL_PASSWORD}\"\nmail-server-type = \"{server_type}\"\n"
        )
    };
    cfg.servers(
        &format!("redis://agent:{DBG_REDIS_PASSWORD}@127.0.0.1:1/0"),
        &format!("amqp://agent:{DBG_AMQP_PASSWORD}@127.0.0.1:1/%2f"),
    )
    .store(&format!("postgres://agent:{DBG_PG_PASSWORD}@127.0.0.1:1/records"))
    .oauth_profile(
        "contoso",
        &format!(
            r#"provider = "azure"
application-key = "00000000-0000-0000-0000-000000000000"
application-secret = "{DBG_CLIENT_SECRET}"
token-url = "https://login.microsoftonline.com/t/oauth2/v2.0/token"
"#
        ),
    )
    .incoming_mail(
        "name = \"oauth\"\nhost = \"outlook.office365.com\"\nusername = \"forms@contoso.com\"\nmail-server-type = \"imaps\"\noauth-profile = \"contoso\"\n",
    )
    .incoming_mail(&legacy("legacy-pop", "pop.example.net", "pop3s"))
    .incoming_mail(&legacy("legacy-imap", "imap.example.net", "imaps"))
    .topic("LEASE ABSTRACT FORM", "senders = [\"@contoso.com\"]\n");
    let path = cfg.path();
    let key_b64 = key_b64.trim().to_string();
    let key_text = String::from_utf8_lossy(&key).to_string();
    let secrets = [
        DBG_CLIENT_SECRET,
        DBG_MAIL_PASSWORD,
        DBG_REDIS_PASSWORD,
        DBG_AMQP_PASSWORD,
        DBG_PG_PASSWORD,
        key_b64.as_str(),
        DBG_TOKEN,
        "DebugTokenSignatureNeverPrinted",
    ];
    use common::config::{load, Component, LoadOptions};
    let mut last = None;
    for component in [
        Component::TokenBroker,
        Component::ImapFetcher,
        Component::PopFetcher,
        Component::FormProcessor,
        Component::Cli,
    ] {
        let config = load(
            &LoadOptions {
                path: Some(path.clone()),
                env: vec![],
            },
            component,
        )
        .unwrap_or_else(|e| panic!("{component:?}: {e}"));
        let text = format!("{config:?}\n{config:#?}");
        assert_clean(&format!("Config for {component:?}"), &text, &secrets);
        assert!(!text.contains(&key_text));
        for (i, m) in config.incoming_mail.iter().enumerate() {
            assert_clean(&format!("incoming-mail[{i}]"), &format!("{m:?}"), &secrets);
        }
        last = Some(config);
    }
    let config = last.unwrap();

    // Tokens: the cipher, a sealed and an opened token, a failed open.
    let broker = load(
        &LoadOptions {
            path: Some(path.clone()),
            env: vec![],
        },
        Component::TokenBroker,
    )
    .unwrap();
    let cipher = common::token::TokenCipher::from_config(&broker.token_broker.encryption);
    let sealed = cipher.seal("contoso", DBG_TOKEN, 1, u64::MAX / 2);
    let opened = cipher.open("contoso", &sealed).unwrap();
    assert_eq!(opened.token.expose(), DBG_TOKEN);
    let mut tampered = sealed.clone();
    tampered.nonce = base64::engine::general_purpose::STANDARD.encode([0u8; 12]);
    let failed = cipher.open("contoso", &tampered).unwrap_err();
    for (what, text) in [
        ("TokenCipher", format!("{cipher:?}")),
        ("StoredToken", format!("{sealed:?}")),
        ("AccessToken", format!("{opened:?}")),
        ("TokenError", format!("{failed:?} {failed}")),
    ] {
        assert_clean(what, &text, &secrets);
    }

    // Errors from connecting with password-bearing URLs (nothing listens on port 1).
    let within = Duration::from_secs(20);
    if let Ok(Err(e)) = tokio::time::timeout(within, common::connect::amqp(&config, "scan")).await {
        assert_clean("connect::amqp error", &format!("{e:?} {e} {e:#}"), &secrets);
    } else {
        panic!("connecting to AMQP on port 1 did not fail");
    }
    if let Ok(Err(e)) = tokio::time::timeout(within, common::connect::redis(&config)).await {
        assert_clean("connect::redis error", &format!("{e:?} {e}"), &secrets);
    } else {
        panic!("connecting to Redis on port 1 did not fail");
    }
    let store_url = format!("postgres://agent:{DBG_PG_PASSWORD}@127.0.0.1:1/records");
    match tokio::time::timeout(within, form_processor::store::Store::open(&store_url, None)).await {
        Ok(Err(e)) => assert_clean("store::Error", &format!("{e:?} {e}"), &secrets),
        _ => panic!("opening a store on port 1 did not fail"),
    }
}
