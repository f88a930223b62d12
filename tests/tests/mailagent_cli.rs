//! The operator CLI against the real servers: `mailagent test-connection`
//! names the failing step and its cause for the usual mistakes, and
//! `mailagent status` shows live agents and token state.

use std::process::Output;
use std::time::Duration;

use common::shutdown::CancellationToken;
use common::Component;
use mailagent_tests::env::{unique, Endpoints};
use mailagent_tests::harness::{wait_for, TestConfig};
use mailagent_tests::idp::TestIdp;

/// Runs the CLI without blocking the runtime (the test IdP answers from it).
async fn mailagent(cfg: &TestConfig, args: &[&str]) -> (Output, String) {
    mailagent_tests::process::mailagent(&cfg.path_for(Component::Cli), args).await
}

/// A config with one IMAPS and one POP3S mail config for `mailbox` through
/// the test IdP profile `app`/`secret`.
fn config(
    env: &Endpoints,
    idp: &TestIdp,
    app: &str,
    secret: &str,
    mailbox: &str,
    host: &str,
    trust_ca: bool,
) -> TestConfig {
    let mut cfg = TestConfig::new(env);
    if !trust_ca {
        cfg.toml = cfg.toml.replacen(
            &format!("extra-ca-file = \"{}\"", env.ca_file().display()),
            "",
            1,
        );
    }
    cfg.idp_profile("p", &idp.token_url(), app, secret);
    for (name, listener, server_type) in [
        ("box-imap", "IMAPS", "imaps"),
        ("box-pop", "POP3S", "pop3s"),
    ] {
        cfg.push(&format!(
            r#"[[incoming-mail]]
name = "{name}"
host = "{host}"
port = {port}
mail-server-type = "{server_type}"
username = "{mailbox}"
oauth-profile = "p"
"#,
            port = env.mail_addr(listener).port(),
        ));
    }
    cfg
}

/// A fresh mailbox granted to `app`.
fn granted_mailbox(env: &Endpoints, app: &str) -> String {
    let mailbox = format!("{}@example.com", unique("cli"));
    env.grant(app, &mailbox);
    mailbox
}

#[tokio::test]
async fn test_connection_passes_every_step_for_a_granted_app() {
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    let mailbox = granted_mailbox(&env, &app);
    let cfg = config(&env, &idp, &app, &secret, &mailbox, "localhost", true);
    for name in ["box-imap", "box-pop"] {
        let (out, text) = mailagent(&cfg, &["test-connection", name]).await;
        assert!(out.status.success(), "{name}:\n{text}");
        assert!(text.contains("all steps passed"), "{text}");
        assert!(!text.contains(&secret), "secret printed");
    }
}

/// (what, how to break it, step that must fail, words the cause must contain)
#[tokio::test]
async fn test_connection_names_the_cause_of_each_usual_failure() {
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    let mailbox = granted_mailbox(&env, &app);
    let (expired_app, expired_secret) = idp.register_app();
    idp.set_expired(&expired_app, true);
    env.grant(&expired_app, &mailbox);
    let (ungranted_app, ungranted_secret) = idp.register_app();
    let secret_id = idp.secret_id(&app).unwrap();

    let cases: Vec<(&str, TestConfig, &str, &str)> = vec![
        (
            "secret ID instead of its value",
            config(&env, &idp, &app, &secret_id, &mailbox, "localhost", true),
            "[FAIL] token",
            "not its Secret ID",
        ),
        (
            "expired secret",
            config(
                &env,
                &idp,
                &expired_app,
                &expired_secret,
                &mailbox,
                "localhost",
                true,
            ),
            "[FAIL] token",
            "expired",
        ),
        (
            "app without a mailbox grant",
            config(
                &env,
                &idp,
                &ungranted_app,
                &ungranted_secret,
                &mailbox,
                "localhost",
                true,
            ),
            "[FAIL]",
            "Add-MailboxPermission",
        ),
        (
            "wrong host",
            config(
                &env,
                &idp,
                &app,
                &secret,
                &mailbox,
                "no-such-host.invalid",
                true,
            ),
            "[FAIL] resolve",
            "wrong host",
        ),
        (
            "untrusted certificate",
            config(&env, &idp, &app, &secret, &mailbox, "localhost", false),
            "[FAIL] tls",
            "untrusted certificate",
        ),
    ];
    for (what, cfg, step, cause) in cases {
        for name in ["box-imap", "box-pop"] {
            let (out, text) = mailagent(&cfg, &["test-connection", name]).await;
            assert_eq!(
                out.status.code(),
                Some(1),
                "{what} / {name}: expected exit 1:\n{text}"
            );
            assert!(
                text.contains(step),
                "{what} / {name}: step {step:?} not named:\n{text}"
            );
            assert!(
                text.contains(cause),
                "{what} / {name}: cause {cause:?} not named:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn status_lists_live_agents_and_token_state() {
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    let cfg = config(
        &env,
        &idp,
        &app,
        &secret,
        "nobody@example.com",
        "localhost",
        true,
    );
    let shutdown = CancellationToken::new();
    let broker = tokio::spawn(token_broker::run(
        cfg.load(Component::TokenBroker),
        shutdown.clone(),
    ));
    let report = wait_for(
        "status to show the broker and its token",
        Duration::from_secs(20),
        || async {
            let (out, text) = mailagent(&cfg, &["status", "--json"]).await;
            assert!(out.status.success(), "{text}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let has_broker = v["agents"]
                .as_array()?
                .iter()
                .any(|a| a["component"] == "token-broker");
            let ok = v["profiles"][0]["state"] == "ok";
            (has_broker && ok).then_some(v)
        },
    )
    .await;
    assert!(report["profiles"][0]["expires-in-s"].as_i64().unwrap() > 3000);
    assert_eq!(report["mail-configs"].as_array().unwrap().len(), 2);
    let (_, table) = mailagent(&cfg, &["status"]).await;
    assert!(
        table.contains("AGENTS")
            && table.contains("token-broker")
            && table.contains("OAUTH PROFILES"),
        "{table}"
    );
    shutdown.cancel();
    broker.await.unwrap().unwrap();
    // A stopped agent leaves the list.
    let (out, _) = mailagent(&cfg, &["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["agents"].as_array().unwrap().is_empty(), "{v}");
}
