//! Credentials as Entra ID recommends (issue 13): certificate assertions
//! (PS256 and RS256) and federated assertion files against the test IdP,
//! which verifies them as Entra does; rotation without a restart; the
//! credential-expiry gauge; check-config errors; the IdP's AADSTS codes; and
//! no token stall after a token-key change.

use std::path::Path;
use std::time::Duration;

use common::config::{AssertionAlgorithm, Component, LoadOptions};
use common::credential::Certificate;
use common::keys::Keys;
use common::token::{ProfileState, TokenClient};
use mailagent_tests::certs::{replace, TestCert};
use mailagent_tests::env::{unique, Endpoints};
use mailagent_tests::harness::{profile_state, redis, token_client, Broker};
use mailagent_tests::harness::{wait_for, TestConfig};
use mailagent_tests::idp::{RequestRecord, TestIdp, FEDERATED_AUDIENCE};
use mailagent_tests::mailclient::{self, AuthOutcome};
use mailagent_tests::process;

const PROFILE: &str = "contoso";

/// What `mailagent status` prints for `cfg`.
fn status(cfg: &TestConfig) -> String {
    let path = cfg.path_for(Component::Cli);
    let out = std::process::Command::new(mailagent_tests::env::bin_path("mailagent"))
        .args(["status", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn state(env: &Endpoints, cfg: &TestConfig) -> ProfileState {
    profile_state(env, cfg, PROFILE).await
}

/// A profile of the test IdP with a certificate credential (no secret).
fn cert_profile(cfg: &mut TestConfig, idp: &TestIdp, app: &str, extra: &str) {
    let (cert, key) = (cfg.dir().join("app.crt"), cfg.dir().join("app.key"));
    cfg.oauth_profile(
        PROFILE,
        &format!(
            "provider = \"azure\"\napplication-key = \"{app}\"\napplication-certificate-file = \"{}\"\napplication-certificate-key-file = \"{}\"\ntoken-url = \"{}\"\nallow-insecure = true\n{extra}",
            cert.display(),
            key.display(),
            idp.token_url()
        ),
    );
}

/// Fast forced refreshes (for tests that make several requests).
fn fast(cfg: &mut TestConfig) {
    cfg.broker_setting("forced-refresh-min-interval = 0")
        .broker_setting("failing-retry-interval = 1")
        .broker_setting("backoff-initial-ms = 200")
        .broker_setting("backoff-max = 1");
}

/// Waits until the IdP has answered `n` requests of `app` with 200, and returns those requests.
async fn successes(idp: &TestIdp, app: &str, n: usize) -> Vec<RequestRecord> {
    wait_for(
        &format!("{n} successful token requests"),
        Duration::from_secs(20),
        || async {
            let ok: Vec<RequestRecord> = idp
                .requests()
                .into_iter()
                .filter(|r| r.client_id.as_deref() == Some(app) && r.status == 200)
                .collect();
            (ok.len() >= n).then_some(ok)
        },
    )
    .await
}

/// Asks the broker for a forced refresh of the current token and waits for
/// the `n`th successful request.
async fn force_refresh(
    env: &Endpoints,
    cfg: &TestConfig,
    idp: &TestIdp,
    app: &str,
    n: usize,
) -> Vec<RequestRecord> {
    let client = token_client(env, cfg).await;
    let current = wait_for("a token", Duration::from_secs(15), || async {
        client.current(PROFILE).await.unwrap()
    })
    .await;
    client.report_failure(PROFILE, &current).await.unwrap();
    let records = successes(idp, app, n).await;
    let replaced = wait_for("the token replaced", Duration::from_secs(15), || async {
        client
            .current(PROFILE)
            .await
            .unwrap()
            .filter(|t| t.fingerprint != current.fingerprint)
    })
    .await;
    assert_ne!(replaced.fingerprint, current.fingerprint);
    records
}

/// Posts a client-credentials request with `assertion` for `app` straight
/// to the IdP; returns the status and the JSON answer.
async fn post_assertion(idp: &TestIdp, app: &str, assertion: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(idp.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", app),
            ("client_assertion_type", common::credential::JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", "https://outlook.office365.com/.default"),
        ])
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Runs `mailagent <args>` on `cfg` without blocking the runtime (the test
/// IdP answers from it); returns the exit status and stdout and stderr.
async fn mailagent(cfg: &TestConfig, args: &[&str]) -> (std::process::ExitStatus, String) {
    let (out, text) =
        mailagent_tests::process::mailagent(&cfg.path_for(Component::Cli), args).await;
    (out.status, text)
}

/// A line from the middle of a PEM private key: what a leaked key would show.
fn key_body_line(key_pem: &str) -> &str {
    let lines: Vec<&str> = key_pem.lines().collect();
    lines[lines.len() / 2]
}

#[tokio::test]
async fn certificate_profile_logs_into_imap_and_pop3_with_ps256_and_rs256() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    for (setting, alg) in [
        ("", jsonwebtoken::Algorithm::PS256),
        (
            "assertion-algorithm = \"RS256\"\n",
            jsonwebtoken::Algorithm::RS256,
        ),
    ] {
        let cert = TestCert::new(365);
        let app = idp.register_cert_app(&cert.der);
        let user = format!("{}@example.com", unique("certbox"));
        env.grant(&app, &user);
        let mut cfg = TestConfig::new(&env);
        fast(&mut cfg);
        cert.write(cfg.dir(), "app");
        cert_profile(&mut cfg, &idp, &app, setting);
        assert!(
            !cfg.toml.contains("secret"),
            "no secret anywhere in the config:\n{}",
            cfg.toml
        );
        let broker = Broker::start(&cfg);
        let client = token_client(&env, &cfg).await;
        let token = wait_for("a token", Duration::from_secs(15), || async {
            client.current(PROFILE).await.unwrap()
        })
        .await;

        let first = &successes(&idp, &app, 1).await[0];
        assert!(!first.had_secret, "the IdP saw a client secret");
        let header = first.assertion_header().expect("an assertion");
        assert_eq!(header.alg, alg);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.x5t_s256.as_deref(), Some(cert.x5t_s256().as_str()));
        let claims = first.assertion_claims().unwrap();
        assert_eq!(claims["aud"], idp.token_url());
        assert_eq!(claims["iss"], app);
        assert_eq!(claims["sub"], app);
        let s = state(&env, &cfg).await;
        assert_eq!(s.credential.as_deref(), Some("certificate"));
        assert_eq!(
            s.credential_used,
            Some(format!("certificate {}", cert.thumbprint()))
        );

        // The token logs into IMAP and POP3.
        let mut imap = mailclient::connect_tls(env.mail_addr("IMAPS"), &env.ca_file())
            .await
            .unwrap();
        mailclient::imap_greeting(&mut imap).await.unwrap();
        let outcome = mailclient::imap_xoauth2(&mut imap, &user, token.token.expose())
            .await
            .unwrap();
        assert!(matches!(outcome, AuthOutcome::Accepted(_)), "{outcome:?}");
        let mut pop = mailclient::connect_tls(env.mail_addr("POP3S"), &env.ca_file())
            .await
            .unwrap();
        let greeting = pop.read_line().await.unwrap();
        assert!(greeting.starts_with("+OK"), "{greeting}");
        let outcome = mailclient::pop3_xoauth2(&mut pop, &user, token.token.expose())
            .await
            .unwrap();
        assert!(matches!(outcome, AuthOutcome::Accepted(_)), "{outcome:?}");

        // A second request carries a different jti.
        let records = force_refresh(&env, &cfg, &idp, &app, 2).await;
        let jtis: Vec<String> = records
            .iter()
            .map(|r| r.assertion_claims().unwrap()["jti"].to_string())
            .collect();
        assert_ne!(jtis[0], jtis[1], "two requests with the same jti");
        broker.stop().await;
    }
}

#[tokio::test]
async fn rotated_certificate_is_used_at_the_next_refresh_without_restart() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let (old, new) = (TestCert::new(20), TestCert::new(400));
    let app = idp.register_cert_app(&old.der);
    idp.add_certificate(&app, &new.der);
    let mut cfg = TestConfig::new(&env);
    fast(&mut cfg);
    old.write(cfg.dir(), "app");
    cert_profile(&mut cfg, &idp, &app, "");
    let broker = Broker::start(&cfg);
    let first = successes(&idp, &app, 1).await;
    assert_eq!(
        first[0].assertion_header().unwrap().x5t_s256,
        Some(old.x5t_s256())
    );

    new.write(cfg.dir(), "app");
    let records = force_refresh(&env, &cfg, &idp, &app, 2).await;
    assert_eq!(
        records[1].assertion_header().unwrap().x5t_s256,
        Some(new.x5t_s256())
    );
    assert!(records.iter().all(|r| r.status == 200));
    let s = wait_for(
        "state names the new thumbprint",
        Duration::from_secs(10),
        || async {
            let s = state(&env, &cfg).await;
            (s.credential_used == Some(format!("certificate {}", new.thumbprint()))).then_some(s)
        },
    )
    .await;
    assert_eq!(s.state, "ok");
    assert_eq!(s.credential_expires_at, Some(new.not_after));
    broker.stop().await;
}

/// A PKCS#1 private key (`-----BEGIN RSA PRIVATE KEY-----`, as older
/// tooling and many PKI exports write it) serves as well as PKCS#8: its
/// assertions pass the IdP's checks with PS256 and RS256, and the broker
/// gets a token with it.
#[tokio::test]
async fn a_pkcs1_rsa_private_key_signs_assertions_the_idp_accepts() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let cert = TestCert::new(100).with_pkcs1_key();
    assert!(cert.key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let app = idp.register_cert_app(&cert.der);
    let mut cfg = TestConfig::new(&env);
    let (crt, key) = cert.write(cfg.dir(), "app");

    let read = Certificate::read(&crt, &key).expect("a PKCS#1 key is read");
    assert_eq!(read.thumbprint, cert.thumbprint());
    for alg in [AssertionAlgorithm::Ps256, AssertionAlgorithm::Rs256] {
        let assertion = read.assertion(&app, &idp.token_url(), alg);
        let (status, body) = post_assertion(&idp, &app, assertion.expose()).await;
        assert_eq!(status, 200, "{alg:?}: {body}");
    }

    cert_profile(&mut cfg, &idp, &app, "");
    let broker = Broker::start(&cfg);
    let client = token_client(&env, &cfg).await;
    wait_for("a token", Duration::from_secs(15), || async {
        client.current(PROFILE).await.unwrap()
    })
    .await;
    let requests = successes(&idp, &app, 3).await;
    let by_broker = requests.last().unwrap();
    assert!(!by_broker.had_secret);
    assert_eq!(
        by_broker.assertion_header().unwrap().x5t_s256,
        Some(cert.x5t_s256())
    );
    assert_eq!(
        state(&env, &cfg).await.credential_used,
        Some(format!("certificate {}", cert.thumbprint()))
    );
    broker.stop().await;
}

/// `mailagent test-connection` says which credential its token request
/// used — the certificate's thumbprint, or "secret" — and prints neither
/// the secret nor the key.
#[tokio::test]
async fn test_connection_names_the_credential_it_used_never_its_value() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let cert = TestCert::new(100);
    let cert_app = idp.register_cert_app(&cert.der);
    let (secret_app, secret) = idp.register_app();
    let (cert_box, secret_box) = (
        format!("{}@example.com", unique("credcert")),
        format!("{}@example.com", unique("credsecret")),
    );
    env.grant(&cert_app, &cert_box);
    env.grant(&secret_app, &secret_box);
    let mut cfg = TestConfig::new(&env);
    cert.write(cfg.dir(), "app");
    cert_profile(&mut cfg, &idp, &cert_app, "");
    cfg.idp_profile("with-secret", &idp.token_url(), &secret_app, &secret);
    let imaps = env.mail_addr("IMAPS").port();
    let pop3s = env.mail_addr("POP3S").port();
    for (name, mailbox, port, server_type, profile) in [
        ("cert-imap", &cert_box, imaps, "imaps", PROFILE),
        ("cert-pop", &cert_box, pop3s, "pop3s", PROFILE),
        ("secret-imap", &secret_box, imaps, "imaps", "with-secret"),
    ] {
        cfg.incoming_mail(&mailagent_tests::harness::mail_table(
            name,
            mailbox,
            port,
            server_type,
            &format!("oauth-profile = \"{profile}\""),
            "",
        ));
    }
    let by_certificate = format!("with the certificate {}", cert.thumbprint());
    for (name, used) in [
        ("cert-imap", by_certificate.as_str()),
        ("cert-pop", by_certificate.as_str()),
        ("secret-imap", "with the secret"),
    ] {
        let (status, text) = mailagent(&cfg, &["test-connection", name]).await;
        assert!(status.success(), "{name}:\n{text}");
        let token_step = text
            .lines()
            .find(|l| l.contains("[ok]   token"))
            .unwrap_or_else(|| panic!("{name}: no token step:\n{text}"));
        assert!(token_step.contains(used), "{name}: {token_step}");
        assert!(!text.contains(&secret), "{name}: the secret was printed");
        assert!(
            !text.contains(key_body_line(&cert.key_pem)),
            "{name}: the key was printed"
        );
    }
}

/// The broker's log says which credential each request used: the
/// certificate's thumbprint (what the portal lists), never the key.
#[tokio::test]
async fn the_broker_log_names_the_certificate_thumbprint_it_used() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let cert = TestCert::new(100);
    let app = idp.register_cert_app(&cert.der);
    let mut cfg = TestConfig::new(&env);
    cert.write(cfg.dir(), "app");
    cert_profile(&mut cfg, &idp, &app, "");
    let log = cfg.dir().join("broker.log");
    let mut child = process::launch("token-broker", &cfg.path_for(Component::TokenBroker))
        .log_level("info")
        .log(&log)
        .spawn();
    successes(&idp, &app, 1).await;
    wait_for("the token stored", Duration::from_secs(15), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("stored a new token").then_some(())
    })
    .await;
    let status = process::stop(&mut child, Duration::from_secs(30))
        .await
        .expect("broker stops on SIGTERM");
    assert!(status.success(), "broker exited {status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let used = format!("certificate {}", cert.thumbprint());
    for message in ["requesting a token", "stored a new token"] {
        let line = text
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no {message:?} in the log:\n{text}"));
        assert!(line.contains(&used), "{message}: {line}");
    }
    assert!(
        !text.contains(key_body_line(&cert.key_pem)),
        "the key is in the log"
    );
}

#[tokio::test]
async fn client_assertion_file_is_sent_as_it_is_and_reread_for_each_request() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let (app, _) = idp.register_app();
    let issuer = "https://kubernetes.example/issuer";
    let subject = "system:serviceaccount:mail:mailagent";
    idp.add_federated(&app, issuer, subject);
    let platform_token = |n: u32| {
        let claims = serde_json::json!({
            "iss": issuer, "sub": subject, "aud": FEDERATED_AUDIENCE,
            "exp": common::heartbeat::now_secs() + 3600, "n": n,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"platform"),
        )
        .unwrap()
    };
    // Each token is made once: `exp` moves with the clock.
    let (token1, token2) = (platform_token(1), platform_token(2));
    let mut cfg = TestConfig::new(&env);
    fast(&mut cfg);
    let file = cfg.file("azure-identity-token", &token1);
    cfg.oauth_profile(
        PROFILE,
        &format!(
            "application-key = \"{app}\"\nclient-assertion-file = \"{}\"\ntoken-url = \"{}\"\nallow-insecure = true\n",
            file.display(),
            idp.token_url()
        ),
    );
    let broker = Broker::start(&cfg);
    let first = successes(&idp, &app, 1).await;
    assert_eq!(first[0].assertion.as_deref(), Some(token1.as_str()));
    assert!(!first[0].had_secret);

    replace(&file, &token2);
    let records = force_refresh(&env, &cfg, &idp, &app, 2).await;
    assert_eq!(records[1].assertion.as_deref(), Some(token2.as_str()));
    assert_eq!(
        state(&env, &cfg).await.credential.as_deref(),
        Some("assertion-file")
    );
    broker.stop().await;
}

#[tokio::test]
async fn unregistered_certificate_marks_the_profile_failing_with_aadsts700027() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let registered = TestCert::new(100);
    let app = idp.register_cert_app(&registered.der);
    let mut cfg = TestConfig::new(&env);
    fast(&mut cfg);
    TestCert::new(100).write(cfg.dir(), "app"); // not the registered one
    cert_profile(&mut cfg, &idp, &app, "");
    let broker = Broker::start(&cfg);
    let s = wait_for("state failing", Duration::from_secs(15), || async {
        let s = state(&env, &cfg).await;
        (s.state == "failing").then_some(s)
    })
    .await;
    assert_eq!(s.error_code.as_deref(), Some("AADSTS700027"), "{s:?}");
    assert!(
        s.last_error
            .as_deref()
            .unwrap_or("")
            .contains("not registered"),
        "{s:?}"
    );
    broker.stop().await;

    // `mailagent status` shows the code.
    let text = status(&cfg);
    assert!(text.contains("AADSTS700027"), "{text}");
    assert!(text.contains("certificate"), "{text}");
}

/// The test IdP answers Entra's codes for bad assertions.
#[tokio::test]
async fn idp_refuses_bad_assertions_with_entras_codes() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let dir = tempfile::tempdir().unwrap();
    let good = TestCert::new(100);
    let now = common::heartbeat::now_secs() as i64;
    let expired = TestCert::with_key(&good.key_pem, now - 86_400 * 10, now - 86_400);
    let app = idp.register_cert_app(&good.der);
    idp.add_certificate(&app, &expired.der);
    let (gc, gk) = good.write(dir.path(), "good");
    let (ec, ek) = expired.write(dir.path(), "expired");
    let (uc, uk) = TestCert::new(100).write(dir.path(), "unregistered");
    let read = |c: &Path, k: &Path| Certificate::read(c, k).unwrap();
    let url = idp.token_url();
    let ps = AssertionAlgorithm::Ps256;
    let late = {
        // Signed by the right key, but its window ended an hour ago.
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
        header.x5t_s256 = Some(good.x5t_s256());
        let claims = serde_json::json!({"aud": url, "iss": app, "sub": app, "jti": "j",
            "nbf": now - 7200, "iat": now - 7200, "exp": now - 3600});
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(good.key_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let cases: Vec<(&str, String, u32)> = vec![
        (
            "good",
            read(&gc, &gk).assertion(&app, &url, ps).expose().into(),
            0,
        ),
        (
            "unregistered",
            read(&uc, &uk).assertion(&app, &url, ps).expose().into(),
            700027,
        ),
        (
            "expired",
            read(&ec, &ek).assertion(&app, &url, ps).expose().into(),
            700027,
        ),
        (
            "wrong aud",
            read(&gc, &gk)
                .assertion(&app, "https://login.example/t/token", ps)
                .expose()
                .into(),
            700023,
        ),
        (
            "wrong iss",
            read(&gc, &gk)
                .assertion("someone-else", &url, ps)
                .expose()
                .into(),
            700021,
        ),
        ("outside window", late, 700024),
    ];
    for (what, assertion, code) in cases {
        let (status, body) = post_assertion(&idp, &app, &assertion).await;
        if code == 0 {
            assert_eq!(status, 200, "{what}: {body}");
        } else {
            assert_eq!(body["error_codes"][0], code, "{what}: {body}");
        }
    }
}

#[tokio::test]
async fn credential_expiry_gauge_matches_the_certificate_and_status_shows_days_left() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let cert = TestCert::new(12);
    let app = idp.register_cert_app(&cert.der);
    let mut cfg = TestConfig::new(&env);
    cert.write(cfg.dir(), "app");
    cert_profile(&mut cfg, &idp, &app, "");
    let broker = Broker::start(&cfg);
    successes(&idp, &app, 1).await;
    let admin = wait_for(
        "the broker's admin address",
        Duration::from_secs(15),
        || async {
            common::heartbeat::list_agents(
                &mut redis(&env).await,
                &Keys::new(cfg.redis_prefix.clone()),
            )
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|a| a.component == "token-broker")
            .and_then(|a| a.admin)
        },
    )
    .await;
    let (value, at) = wait_for("the gauge", Duration::from_secs(15), || async {
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let at = common::heartbeat::now_secs() as i64;
        text.lines()
            .find(|l| {
                l.starts_with("mailagent_token_credential_seconds_to_expiry{")
                    && l.contains(&format!("profile=\"{PROFILE}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| (v, at))
    })
    .await;
    let expected = (cert.not_after - at) as f64;
    // The broker sets the gauge at most a second before the scrape, in whole
    // seconds: it may lag the scrape's clock by up to two.
    assert!(
        (0.0..=2.0).contains(&(value - expected)),
        "gauge {value}, notAfter says {expected}"
    );
    broker.stop().await;

    let text = status(&cfg);
    let row = text
        .lines()
        .find(|l| l.starts_with(PROFILE))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains(&cert.thumbprint()), "{row}");
    assert!(
        row.contains(" 11 ") || row.contains(" 12 "),
        "days left: {row}"
    );
}

/// Writes a profile's credential files; returns its credential lines.
type ProfileBody<'a> = Box<dyn Fn(&TestConfig) -> String + 'a>;

#[test]
fn check_config_names_the_credential_key_and_exits_2() {
    let env = Endpoints::load();
    let cert = TestCert::new(100);
    let now = common::heartbeat::now_secs() as i64;
    let expired = TestCert::with_key(&cert.key_pem, now - 86_400 * 10, now - 86_400);
    let other = TestCert::new(100);
    let cases: Vec<(&str, ProfileBody, &str)> = vec![
        (
            "secret and certificate",
            Box::new(|c: &TestConfig| {
                let (crt, key) = cert.write(c.dir(), "a");
                format!("application-secret = \"x\"\napplication-certificate-file = \"{}\"\napplication-certificate-key-file = \"{}\"\n", crt.display(), key.display())
            }),
            "oauth-profiles[0].application-certificate-file",
        ),
        (
            "secret and client assertion file",
            Box::new(|c: &TestConfig| {
                let file = c.file("assertion", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln");
                format!(
                    "application-secret = \"x\"\nclient-assertion-file = \"{}\"\n",
                    file.display()
                )
            }),
            "oauth-profiles[0].client-assertion-file",
        ),
        (
            "certificate and client assertion file",
            Box::new(|c: &TestConfig| {
                let (crt, key) = cert.write(c.dir(), "a");
                let file = c.file("assertion", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln");
                format!("application-certificate-file = \"{}\"\napplication-certificate-key-file = \"{}\"\nclient-assertion-file = \"{}\"\n", crt.display(), key.display(), file.display())
            }),
            "oauth-profiles[0].client-assertion-file",
        ),
        (
            "key of another certificate",
            Box::new(|c: &TestConfig| {
                let (crt, _) = cert.write(c.dir(), "a");
                let (_, key) = other.write(c.dir(), "b");
                format!("application-certificate-file = \"{}\"\napplication-certificate-key-file = \"{}\"\n", crt.display(), key.display())
            }),
            "oauth-profiles[0].application-certificate-key-file",
        ),
        (
            "expired certificate",
            Box::new(|c: &TestConfig| {
                let (crt, key) = expired.write(c.dir(), "a");
                format!("application-certificate-file = \"{}\"\napplication-certificate-key-file = \"{}\"\n", crt.display(), key.display())
            }),
            "oauth-profiles[0].application-certificate-file",
        ),
        (
            "missing key file",
            Box::new(|c: &TestConfig| {
                let (crt, _) = cert.write(c.dir(), "a");
                format!("application-certificate-file = \"{}\"\napplication-certificate-key-file = \"/nonexistent/k.pem\"\n", crt.display())
            }),
            "oauth-profiles[0].application-certificate-key-file",
        ),
        (
            "no credential",
            Box::new(|_: &TestConfig| String::new()),
            "oauth-profiles[0].application-secret",
        ),
        (
            "bad secret expiry date",
            Box::new(|_: &TestConfig| {
                "application-secret = \"x\"\napplication-secret-expires = \"next year\"\n".into()
            }),
            "oauth-profiles[0].application-secret-expires",
        ),
    ];
    for (what, body, key) in cases {
        let mut cfg = TestConfig::new(&env);
        let body = body(&cfg);
        cfg.oauth_profile(
            PROFILE,
            &format!("application-key = \"app\"\ntoken-url = \"https://login.microsoftonline.com/t/oauth2/v2.0/token\"\n{body}"),
        );
        let out = std::process::Command::new(mailagent_tests::env::bin_path("mailagent"))
            .args(["check-config", "--config", cfg.path().to_str().unwrap()])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{what}: {text}");
        assert!(text.contains(key), "{what}: expected {key} in {text}");
        assert!(!text.contains("PRIVATE KEY"), "{what}: {text}");
    }
    // A bare TOML date is accepted for application-secret-expires.
    let mut cfg = TestConfig::new(&env);
    cfg.oauth_profile(
        PROFILE,
        "application-key = \"app\"\ntoken-url = \"https://login.microsoftonline.com/t/oauth2/v2.0/token\"\napplication-secret = \"x\"\napplication-secret-expires = 2027-06-30\n",
    );
    let config = common::config::load(
        &LoadOptions {
            path: Some(cfg.path()),
            env: vec![],
        },
        Component::Cli,
    )
    .unwrap();
    match &config.profile(PROFILE).unwrap().credential {
        common::config::Credential::Secret { expires_at, .. } => {
            assert_eq!(*expires_at, Some(1_814_313_600))
        }
        other => panic!("{other:?}"),
    }
}

/// The token key was replaced (not added): the stored token, sealed with
/// the old key, looks valid by its metadata; the broker replaces it at once,
/// and so it does a token in clear while keys are configured.
#[tokio::test]
async fn unopenable_stored_token_is_replaced_at_once() {
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    for case in ["old key", "kid none"] {
        let mut cfg = TestConfig::new(&env);
        cfg.idp_profile(PROFILE, &idp.token_url(), &app, &secret);
        let planted = idp.mint(&app, Duration::from_secs(3600));
        let exp = common::heartbeat::now_secs() + 3500;
        let sealer = match case {
            "old key" => {
                let mut old = TestConfig::with_prefix(&env, &cfg.redis_prefix);
                old.idp_profile(PROFILE, &idp.token_url(), &app, &secret);
                token_client(&env, &old).await
            }
            _ => TokenClient::new(
                redis(&env).await,
                Keys::new(cfg.redis_prefix.clone()),
                &common::config::TokenEncryption::None,
            ),
        };
        let old = sealer.store(PROFILE, &planted, exp).await.unwrap();
        let client = token_client(&env, &cfg).await;
        assert!(client.current(PROFILE).await.is_err(), "{case}: opens?");
        // `mailagent status` names the key problem.
        let path = cfg.path_for(Component::Cli);
        let out = std::process::Command::new(mailagent_tests::env::bin_path("mailagent"))
            .args(["status", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let expected = if case == "old key" {
            "is not configured"
        } else {
            "stored in clear"
        };
        assert!(text.contains(expected), "{case}: {text}");
        let started = std::time::Instant::now();
        let broker = Broker::start(&cfg);
        let fresh = wait_for(
            &format!("{case}: a token that opens"),
            Duration::from_secs(10),
            || async { client.current(PROFILE).await.ok().flatten() },
        )
        .await;
        assert_ne!(fresh.fingerprint, old.fingerprint, "{case}");
        eprintln!("{case}: replaced in {:?}", started.elapsed());
        broker.stop().await;
    }
}

/// The token key was replaced while a token sealed with the old one sits in
/// Redis: the fetcher, which cannot open it, asks for a refresh of exactly
/// that token; the broker (restarted with only the new key) replaces it at
/// once, and the fetcher hands over mail within 30 s — not at the old
/// token's expiry an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_change_the_fetcher_hands_over_mail_within_30_s() {
    use futures::StreamExt;
    use mailagent_tests::{fixture, imap_support, maildir};
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    let mailbox = format!("{}@example.com", unique("keychange"));
    env.grant(&app, &mailbox);
    let mut cfg = TestConfig::new(&env);
    cfg.idp_profile(PROFILE, &idp.token_url(), &app, &secret);
    cfg.incoming_mail(&mailagent_tests::harness::mail_table(
        "kc",
        &mailbox,
        env.mail_addr("IMAPS").port(),
        "imaps",
        &format!("oauth-profile = \"{PROFILE}\""),
        "",
    ));
    // The token the broker stored before the key file was replaced.
    let mut before = TestConfig::with_prefix(&env, &cfg.redis_prefix);
    before.idp_profile(PROFILE, &idp.token_url(), &app, &secret);
    let old = token_client(&env, &before)
        .await
        .store(
            PROFILE,
            &idp.mint(&app, Duration::from_secs(3600)),
            common::heartbeat::now_secs() + 3500,
        )
        .await
        .unwrap();

    let config = cfg.load(Component::ImapFetcher);
    let channel = fixture::channel_with_topology(env.amqp_url(), &config.amqp).await;
    let queue = format!("{}.create", cfg.redis_prefix);
    let mut pubsub = redis::Client::open(env.redis_url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .subscribe(Keys::new(cfg.redis_prefix.clone()).token_refresh_channel())
        .await
        .unwrap();
    let (shutdown, task) = imap_support::start(config, imap_support::options());
    let request: String = {
        let mut messages = pubsub.on_message();
        let msg = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("the fetcher asks for a refresh within 30 s")
            .expect("message");
        msg.get_payload().unwrap()
    };
    assert!(request.contains(&old.fingerprint), "{request}");

    let restarted = std::time::Instant::now();
    let broker = Broker::start(&cfg);
    let mail = maildir::message(&cfg.redis_prefix, 1, 600, false);
    imap_support::append(&env, &mailbox, "INBOX", &mail).await;
    let got = fixture::drain(&channel, &queue, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "mail handed over after the key change");
    assert!(restarted.elapsed() < Duration::from_secs(30));
    eprintln!(
        "mail handed over {:?} after the broker restarted with the new key",
        restarted.elapsed()
    );
    imap_support::stop(shutdown, task).await;
    broker.stop().await;
}

/// A certificate replaced by an expired one (still registered) is never
/// sent: the profile is marked failing with the reason, and the token in
/// Redis stays in use.
#[tokio::test]
async fn an_expired_certificate_is_not_sent_and_the_profile_says_why() {
    let env = Endpoints::load();
    let idp = TestIdp::start(&env).await;
    let good = TestCert::new(100);
    let now = common::heartbeat::now_secs() as i64;
    let expired = TestCert::with_key(&good.key_pem, now - 86_400 * 10, now - 86_400);
    let app = idp.register_cert_app(&good.der);
    idp.add_certificate(&app, &expired.der);
    let mut cfg = TestConfig::new(&env);
    fast(&mut cfg);
    good.write(cfg.dir(), "app");
    cert_profile(&mut cfg, &idp, &app, "");
    let broker = Broker::start(&cfg);
    successes(&idp, &app, 1).await;
    expired.write(cfg.dir(), "app");
    let client = token_client(&env, &cfg).await;
    let current = client.current(PROFILE).await.unwrap().unwrap();
    client.report_failure(PROFILE, &current).await.unwrap();
    let s = wait_for("state failing", Duration::from_secs(15), || async {
        let s = state(&env, &cfg).await;
        (s.state == "failing").then_some(s)
    })
    .await;
    let reason = s.last_error.clone().unwrap_or_default();
    assert!(reason.contains("expired on"), "{reason}");
    assert!(reason.contains(&expired.thumbprint()), "{reason}");
    assert_eq!(idp.requests().len(), 1, "the expired certificate was sent");
    assert!(client.current(PROFILE).await.unwrap().is_some());
    broker.stop().await;
}

/// The secret file is read for each request: a wrong secret fixed in the
/// file is used at the next attempt, without a restart, and the secret's
/// configured expiry reaches the gauge's source (the state).
#[tokio::test]
async fn a_secret_file_fixed_while_running_is_used_at_the_next_attempt() {
    let env = Endpoints::load();
    let (idp, app, secret) = TestIdp::start_with_app(&env).await;
    let mut cfg = TestConfig::new(&env);
    fast(&mut cfg);
    cfg.idp_profile(PROFILE, &idp.token_url(), &app, "not-the-secret");
    cfg.push("application-secret-expires = \"2030-01-01\"\n");
    let broker = Broker::start(&cfg);
    let s = wait_for("state failing", Duration::from_secs(15), || async {
        let s = state(&env, &cfg).await;
        (s.state == "failing").then_some(s)
    })
    .await;
    assert_eq!(s.error_code.as_deref(), Some("AADSTS7000215"));
    replace(&cfg.dir().join(format!("{PROFILE}-secret")), &secret);
    let s = wait_for("state ok", Duration::from_secs(15), || async {
        let s = state(&env, &cfg).await;
        (s.state == "ok").then_some(s)
    })
    .await;
    assert_eq!(s.credential_used.as_deref(), Some("secret"));
    assert_eq!(s.credential_expires_at, Some(1_893_456_000));
    broker.stop().await;
}
