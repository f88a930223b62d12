//! token-broker (§3) against the test identity provider and real Redis.

use std::time::{Duration, Instant};

use common::keys::Keys;
use common::token::{read_state, AccessToken, ProfileState, TokenClient};
use common::Component;
use mailagent_tests::env::Endpoints;
use mailagent_tests::harness::{profile_state, redis, token_client, Broker};
use mailagent_tests::harness::{wait_for, TestConfig};
use mailagent_tests::idp::{Failure, TestIdp};
use mailagent_tests::process;

const PROFILE: &str = "contoso";

/// Waits up to 15 s for a valid token of [`PROFILE`] (`what` names it in
/// the failure).
async fn first_token(client: &TokenClient, what: &str) -> AccessToken {
    wait_for(what, Duration::from_secs(15), || async {
        client.current(PROFILE).await.unwrap()
    })
    .await
}

/// Waits up to 15 s for [`PROFILE`] to be marked failing; its state.
async fn failing_state(env: &Endpoints, cfg: &TestConfig) -> ProfileState {
    wait_for("state failing", Duration::from_secs(15), || async {
        let s = state(env, cfg).await;
        (s.state == "failing").then_some(s)
    })
    .await
}

async fn state(env: &Endpoints, cfg: &TestConfig) -> ProfileState {
    profile_state(env, cfg, PROFILE).await
}

/// Fast schedules for tests: refresh at half-life, retry a failing profile every `slow` seconds.
fn fast(cfg: &mut TestConfig, slow: u64) {
    cfg.broker_setting("refresh-lead-min = 0")
        .broker_setting("refresh-lead-fraction = 0.5")
        .broker_setting("refresh-max-fraction = 0.5")
        .broker_setting("backoff-initial-ms = 300")
        .broker_setting("backoff-max = 5")
        .broker_setting(&format!("failing-retry-interval = {slow}"));
}

/// One test's world: the endpoints, a running test IdP, and a config whose
/// profile [`PROFILE`] is an app registered with it. The IdP stops when
/// dropped: a test that destructures a `World` binds `idp` (`idp: _idp`).
struct World {
    env: Endpoints,
    idp: TestIdp,
    cfg: TestConfig,
    app: String,
    secret: String,
}

impl World {
    async fn new() -> Self {
        let env = Endpoints::load();
        let (idp, app, secret) = TestIdp::start_with_app(&env).await;
        let mut cfg = TestConfig::new(&env);
        cfg.idp_profile(PROFILE, &idp.token_url(), &app, &secret);
        Self {
            env,
            idp,
            cfg,
            app,
            secret,
        }
    }

    /// Tokens that live `lifetime`, and the [`fast`] schedules.
    async fn fast(lifetime: Duration, slow: u64) -> Self {
        let mut w = Self::new().await;
        w.idp.set_lifetime(lifetime);
        fast(&mut w.cfg, slow);
        w
    }
}

#[tokio::test]
async fn token_is_stored_encrypted_and_readable_with_the_key() {
    let World { env, idp, cfg, .. } = World::new().await;
    let broker = Broker::start(&cfg);
    let client = token_client(&env, &cfg).await;
    let token = first_token(&client, "a token in Redis").await;
    let issued = idp.issued_tokens();
    assert_eq!(issued.len(), 1);
    assert_eq!(token.token.expose(), issued[0]);

    let raw: String = redis::AsyncCommands::get(
        &mut redis(&env).await,
        Keys::new(cfg.redis_prefix.clone()).token(PROFILE),
    )
    .await
    .unwrap();
    for window in issued[0].as_bytes().windows(16) {
        let w = std::str::from_utf8(window).unwrap();
        assert!(
            !raw.contains(w),
            "raw Redis value holds a 16-character piece of the token: {w}"
        );
    }
    // A separate client (another process would hold the same key file) reads it.
    let other = token_client(&env, &cfg).await;
    assert_eq!(
        other
            .current(PROFILE)
            .await
            .unwrap()
            .unwrap()
            .token
            .expose(),
        issued[0]
    );
    // The key expires with the token.
    let ttl: i64 = redis::cmd("TTL")
        .arg(Keys::new(cfg.redis_prefix.clone()).token(PROFILE))
        .query_async(&mut redis(&env).await)
        .await
        .unwrap();
    assert!(ttl > 3000 && ttl <= 3599, "ttl {ttl}");
    assert_eq!(state(&env, &cfg).await.state, "ok");
    broker.stop().await;
}

#[tokio::test]
async fn refreshes_ahead_of_expiry_so_a_valid_token_is_always_there() {
    let w = World::fast(Duration::from_secs(6), 300).await;
    let broker = Broker::start(&w.cfg);
    let client = token_client(&w.env, &w.cfg).await;
    first_token(&client, "the first token").await;

    // Sample every 100 ms over more than three lifetimes.
    let mut fingerprints = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let t = client.current(PROFILE).await.unwrap();
        let t = t.unwrap_or_else(|| panic!("no valid token at {:?}", started.elapsed()));
        if fingerprints.last() != Some(&t.fingerprint) {
            fingerprints.push(t.fingerprint);
        }
        if fingerprints.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fingerprints.len() >= 4,
        "saw {} tokens: fewer than three refreshes",
        fingerprints.len()
    );
    broker.stop().await;
}

#[tokio::test]
async fn two_replicas_make_one_request_per_refresh() {
    let World {
        env, idp, cfg, app, ..
    } = World::fast(Duration::from_secs(4), 300).await;
    let a = Broker::start(&cfg);
    let b = Broker::start(&cfg);
    let client = token_client(&env, &cfg).await;
    first_token(&client, "the first token").await;
    let started = Instant::now();
    let mut seen = std::collections::HashSet::new();
    while started.elapsed() < Duration::from_secs(12) {
        if let Some(t) = client.current(PROFILE).await.unwrap() {
            seen.insert(t.fingerprint);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
    let requests = idp.request_count(&app);
    // Three lifetimes at half-life refresh: about 7 refreshes. Two replicas
    // racing would make about twice as many requests as tokens seen.
    assert!(seen.len() >= 5, "only {} tokens seen", seen.len());
    assert!(
        requests <= seen.len() + 1,
        "{requests} token requests for {} tokens",
        seen.len()
    );
}

#[tokio::test]
async fn wrong_secret_marks_profile_failing_and_retries_slowly() {
    let env = Endpoints::load();
    let (idp, app, _) = TestIdp::start_with_app(&env).await;
    let mut cfg = TestConfig::new(&env);
    cfg.idp_profile(PROFILE, &idp.token_url(), &app, "not-the-secret");
    fast(&mut cfg, 3);
    let broker = Broker::start(&cfg);
    let s = failing_state(&env, &cfg).await;
    assert_eq!(s.error_code.as_deref(), Some("AADSTS7000215"));
    let reason = s.last_error.unwrap();
    assert!(
        reason.contains("AADSTS7000215") && reason.contains("Value"),
        "{reason}"
    );
    // Watch 7 s: at most one request per 3 s interval.
    tokio::time::sleep(Duration::from_secs(7)).await;
    broker.stop().await;
    let times: Vec<Instant> = idp.requests().iter().map(|r| r.at).collect();
    assert!(
        (2..=4).contains(&times.len()),
        "{} requests in ~7 s",
        times.len()
    );
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(2900),
            "requests {:?} apart",
            pair[1] - pair[0]
        );
    }
}

#[tokio::test]
async fn expired_secret_is_reported_as_expired() {
    let World {
        env, idp, cfg, app, ..
    } = World::new().await;
    idp.set_expired(&app, true);
    let broker = Broker::start(&cfg);
    let s = failing_state(&env, &cfg).await;
    assert_eq!(s.error_code.as_deref(), Some("AADSTS7000222"));
    assert!(s.last_error.unwrap().contains("expired"));
    broker.stop().await;
}

#[tokio::test]
async fn throttling_waits_for_retry_after() {
    let World { env, idp, cfg, .. } = World::new().await;
    idp.fail_next(1, Failure::TooManyRequests { retry_after: 2 });
    let broker = Broker::start(&cfg);
    let client = token_client(&env, &cfg).await;
    first_token(&client, "a token after the 429").await;
    broker.stop().await;
    let r = idp.requests();
    assert_eq!(r[0].status, 429);
    assert_eq!(r[1].status, 200);
    assert!(
        r[1].at - r[0].at >= Duration::from_secs(2),
        "retried after {:?}",
        r[1].at - r[0].at
    );
}

#[tokio::test]
async fn server_errors_back_off_then_succeed() {
    let World {
        env, idp, mut cfg, ..
    } = World::new().await;
    idp.fail_next(3, Failure::Status(503));
    fast(&mut cfg, 300);
    let broker = Broker::start(&cfg);
    let client = token_client(&env, &cfg).await;
    let mut ceilings: Vec<u64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = state(&env, &cfg).await;
        if let Some(c) = s.backoff_ceiling_ms {
            if ceilings.last() != Some(&c) {
                ceilings.push(c);
            }
        }
        if client.current(PROFILE).await.unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no token after three 503s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.stop().await;
    let r = idp.requests();
    assert_eq!(
        r.iter().map(|x| x.status).collect::<Vec<_>>(),
        vec![503, 503, 503, 200]
    );
    // Full jitter: each wait is at most its ceiling, and the ceilings grow
    // (300 ms, 600 ms, 1200 ms).
    for (i, pair) in r.windows(2).enumerate() {
        let ceiling = Duration::from_millis(300 << i);
        assert!(
            pair[1].at - pair[0].at <= ceiling + Duration::from_millis(400),
            "wait {i} {:?} > {ceiling:?}",
            pair[1].at - pair[0].at
        );
    }
    assert!(
        ceilings.windows(2).all(|w| w[1] > w[0]),
        "ceilings did not grow: {ceilings:?}"
    );
}

async fn wait_subscribed(env: &Endpoints, cfg: &TestConfig, replicas: i64) {
    let channel = Keys::new(cfg.redis_prefix.clone()).token_refresh_channel();
    wait_for(
        "the broker to subscribe",
        Duration::from_secs(10),
        || async {
            let (_, n): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut redis(env).await)
                .await
                .unwrap();
            (n >= replicas).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn twenty_forced_requests_for_one_token_cause_one_refresh() {
    let World {
        env,
        idp,
        mut cfg,
        app,
        ..
    } = World::new().await;
    cfg.broker_setting("forced-refresh-min-interval = 0");
    let broker = Broker::start(&cfg);
    let client = token_client(&env, &cfg).await;
    let first = first_token(&client, "the first token").await;
    wait_subscribed(&env, &cfg, 1).await;
    for _ in 0..20 {
        client.report_failure(PROFILE, &first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let second = client
        .wait_for_replacement(PROFILE, &first, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("a new token");
    // Requests naming the replaced token change nothing.
    for _ in 0..5 {
        client.report_failure(PROFILE, &first).await.unwrap();
    }
    // Watch for 2 s that nothing more happens.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(
            idp.request_count(&app),
            2,
            "forced requests caused extra token requests"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        client.current(PROFILE).await.unwrap().unwrap().fingerprint,
        second.fingerprint
    );
    broker.stop().await;
}

#[tokio::test]
async fn forced_refresh_respects_the_minimum_interval() {
    // The default minimum interval: 30 s.
    let World {
        env, idp, cfg, app, ..
    } = World::new().await;
    let broker = Broker::start(&cfg);
    let client = token_client(&env, &cfg).await;
    let first = first_token(&client, "the first token").await;
    wait_subscribed(&env, &cfg, 1).await;
    client.report_failure(PROFILE, &first).await.unwrap();
    assert!(client
        .wait_for_replacement(PROFILE, &first, Duration::from_secs(2))
        .await
        .unwrap()
        .is_none());
    assert_eq!(idp.request_count(&app), 1);
    broker.stop().await;
}

#[tokio::test]
async fn rotated_key_reads_old_tokens_and_writes_under_the_new_id() {
    let mut w = World::fast(Duration::from_secs(4), 300).await;
    let broker = Broker::start(&w.cfg);
    let old_client = token_client(&w.env, &w.cfg).await;
    let old = first_token(&old_client, "a token under the first key").await;
    broker.stop().await;
    let old_kid = old_client.stored(PROFILE).await.unwrap().unwrap().kid;

    // A new key in front; the old one kept for decryption.
    use base64::Engine;
    let new_key = w.cfg.file(
        "token-key-2",
        &base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>()),
    );
    let old_key = w.cfg.dir().join("token-key");
    w.cfg.toml = w.cfg.toml.replacen(
        &format!("encryption-key-file = \"{}\"", old_key.display()),
        &format!(
            "encryption-key-file = \"{}\"\nencryption-key-files = [\"{}\"]",
            new_key.display(),
            old_key.display()
        ),
        1,
    );
    let rotated = token_client(&w.env, &w.cfg).await;
    assert_eq!(
        rotated.current(PROFILE).await.unwrap().unwrap().token,
        old.token,
        "old token unreadable after rotation"
    );
    let new_kid = rotated.cipher().current_key_id().to_string();
    assert_ne!(new_kid, old_kid);
    let broker = Broker::start(&w.cfg);
    wait_for(
        "a token under the new key",
        Duration::from_secs(15),
        || async {
            let s = rotated.stored(PROFILE).await.unwrap()?;
            (s.kid == new_kid).then_some(())
        },
    )
    .await;
    broker.stop().await;
    // The old key alone cannot read it: the error names the key id.
    let err = old_client.current(PROFILE).await.unwrap_err().to_string();
    assert!(err.contains(&new_kid), "{err}");
}

#[tokio::test]
async fn debug_logs_of_the_broker_process_hold_no_secret_or_token() {
    let World {
        env,
        idp,
        mut cfg,
        secret,
        ..
    } = World::fast(Duration::from_secs(4), 2).await;
    // A second profile with a wrong secret, to log failures too.
    let (bad_app, bad_secret) = idp.register_app();
    idp.register(&bad_app, "something-else");
    cfg.idp_profile("failing", &idp.token_url(), &bad_app, &bad_secret);
    let log = cfg.dir().join("broker.log");
    let mut child = process::launch("token-broker", &cfg.path_for(Component::TokenBroker))
        .log_level("debug")
        .log(&log)
        .spawn();
    let client = token_client(&env, &cfg).await;
    let first = first_token(&client, "a token").await;
    client
        .wait_for_replacement(PROFILE, &first, Duration::from_secs(10))
        .await
        .unwrap()
        .expect("a refresh");
    wait_for("the failing profile", Duration::from_secs(10), || async {
        let s = read_state(
            &mut redis(&env).await,
            &Keys::new(cfg.redis_prefix.clone()),
            "failing",
        )
        .await
        .unwrap()?;
        (s.state == "failing").then_some(())
    })
    .await;
    let status = process::stop(&mut child, Duration::from_secs(30))
        .await
        .expect("broker stops on SIGTERM");
    assert!(status.success(), "broker exited {status:?} on SIGTERM");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stored a new token"),
        "log too quiet to prove anything:\n{text}"
    );
    assert!(text.contains("AADSTS7000215"));
    for s in [secret.as_str(), bad_secret.as_str()] {
        assert!(!text.contains(s), "client secret in the log");
    }
    for token in idp.issued_tokens() {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "a token in the log");
    }
}
