//! pop-fetcher against real Dovecot (POP3S and POP3+STLS), RabbitMQ and
//! Redis: every message handed over byte for byte, deleted only after the
//! confirm, kept mail not published twice, clear errors for refused logins,
//! nothing deleted while RabbitMQ is down.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::envelope::{dedupe_key, MessageRef};
use mailagent_tests::maildir::{message, seed as seed_maildir};
use mailagent_tests::pop_support::{self, drain, eventually, Fixture, InProcess};

/// Seeds `n` messages (every 7th with lines starting with "."), returns
/// them by Message-ID tag index.
fn seed(fx: &Fixture, n: usize, tag: &str) -> BTreeMap<String, Vec<u8>> {
    let msgs: Vec<Vec<u8>> = (0..n)
        .map(|i| message(tag, i, 2_000 + (i % 5) * 700, i % 7 == 0))
        .collect();
    seed_maildir(&fx.env, &fx.mailbox, &msgs);
    msgs.into_iter()
        .map(|m| (dedupe_key(&fx.mailbox, &m), m))
        .collect()
}

fn assert_all_identical(
    fx: &Fixture,
    seeded: &BTreeMap<String, Vec<u8>>,
    got: &[common::envelope::Envelope],
) {
    assert_eq!(got.len(), seeded.len(), "published count");
    let mut keys = HashSet::new();
    for e in got {
        assert!(
            keys.insert(e.dedupe_key.clone()),
            "published twice: {}",
            e.dedupe_key
        );
        let stored = seeded.get(&e.dedupe_key).expect("a seeded message");
        assert!(
            e.body == *stored,
            "body of {} differs from the stored message",
            e.dedupe_key
        );
        assert!(matches!(&e.message_ref, MessageRef::Pop3 { uidl } if !uidl.is_empty()));
        assert_eq!(e.mailbox, fx.mailbox);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3s_delete_hands_over_500_messages_byte_identical_and_empties_the_maildrop() {
    let fx = Fixture::new("popdel");
    let seeded = seed(&fx, 500, "del");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let (config, _) = fx.config(&[fx.mail_table("pd", "POP3S", "")]);
    let fetcher = InProcess::start(config);
    let got = drain(&channel, &fx.queue(), 500, Duration::from_secs(90)).await;
    assert_all_identical(&fx, &seeded, &got);
    assert!(
        eventually(Duration::from_secs(20), || async { fx.maildrop_len() == 0 }).await,
        "maildrop still holds {} messages",
        fx.maildrop_len()
    );
    // Nothing more arrives, and the UIDL set is bounded again.
    assert!(drain(&channel, &fx.queue(), 1, Duration::from_secs(3))
        .await
        .is_empty());
    let mut redis = fx.redis().await;
    let uidls: Vec<String> = redis::AsyncCommands::smembers(&mut redis, fx.keys().uidls("pd"))
        .await
        .unwrap();
    assert!(
        uidls.len() <= 1,
        "UIDL set not pruned: {} members",
        uidls.len()
    );
    fetcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_stls_keep_hands_over_500_once_and_later_polls_publish_nothing() {
    let fx = Fixture::new("popkeep");
    let seeded = seed(&fx, 500, "keep");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let (config, _) = fx.config(&[fx.mail_table("pk", "POP3", "after-fetch = \"keep\"\n")]);
    let fetcher = InProcess::start(config);
    let got = drain(&channel, &fx.queue(), 500, Duration::from_secs(90)).await;
    assert_all_identical(&fx, &seeded, &got);
    // Several more polls (poll-interval 1 s): nothing is published again,
    // and the mail stays.
    let mut redis = fx.redis().await;
    let polled_again = eventually(Duration::from_secs(15), || async {
        let agents = common::heartbeat::list_agents(&mut redis.clone(), &fx.keys())
            .await
            .unwrap_or_default();
        agents.iter().any(|a| {
            a.component == "pop-fetcher"
                && a.last_poll
                    .is_some_and(|t| t >= common::heartbeat::now_secs().saturating_sub(1))
        })
    })
    .await;
    assert!(polled_again);
    assert!(drain(&channel, &fx.queue(), 1, Duration::from_secs(4))
        .await
        .is_empty());
    assert_eq!(fx.maildrop_len(), 500);
    let uidls: Vec<String> = redis::AsyncCommands::smembers(&mut redis, fx.keys().uidls("pk"))
        .await
        .unwrap();
    assert_eq!(uidls.len(), 501, "500 UIDLs and the marker");
    fetcher.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_now_skips_existing_mail_and_fetches_new_mail() {
    let fx = Fixture::new("popnow");
    seed(&fx, 5, "old");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let (config, _) = fx.config(&[fx.mail_table("pn", "POP3S", "start-from = \"now\"\n")]);
    let fetcher = InProcess::start(config);
    let mut redis = fx.redis().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            let n: usize = redis::AsyncCommands::scard(&mut redis.clone(), fx.keys().uidls("pn"))
                .await
                .unwrap_or(0);
            n == 6
        })
        .await
    );
    let fresh = seed(&fx, 1, "new");
    let got = drain(&channel, &fx.queue(), 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert!(fresh.contains_key(&got[0].dedupe_key));
    assert_eq!(fx.maildrop_len(), 5);
    let _ = &mut redis;
    fetcher.stop().await.unwrap();
}

async fn error_for(fx: &Fixture, table: String) -> (String, u64) {
    let (config, _) = fx.config(&[table]);
    let fetcher = InProcess::start(config);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut err = None;
    while err.is_none() && std::time::Instant::now() < deadline {
        err = fx.last_error().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(err.is_some(), "no error reported");
    // Backoff, not a crash loop: over 3 s, few attempts.
    let before = errors(fx).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = errors(fx).await - before;
    fetcher.stop().await.unwrap();
    (err.unwrap(), attempts)
}

/// Errors counted by the fetcher's `/metrics`.
async fn errors(fx: &Fixture) -> u64 {
    let mut redis = fx.redis().await;
    let agents = common::heartbeat::list_agents(&mut redis, &fx.keys())
        .await
        .unwrap();
    let Some(admin) = agents
        .iter()
        .find(|a| a.component == "pop-fetcher")
        .and_then(|a| a.admin.clone())
    else {
        return 0;
    };
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.contains("fetcher_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_without_a_grant_gets_a_clear_permission_error_and_backoff() {
    let fx = Fixture::new("popnogrant");
    // A token of another app, which has no grant on this mailbox.
    let other = uuid::Uuid::new_v4().to_string();
    let roles: Vec<String> = mailagent_tests::idp::ROLES
        .iter()
        .map(|r| r.to_string())
        .collect();
    let token = mailagent_tests::idp::Signer::trusted(&fx.env).mint(
        &other,
        &roles,
        Duration::from_secs(3600),
        0,
    );
    fx.plant(&token).await;
    // A "broker" that answers the forced refresh with another token of that app.
    let tokens = fx.tokens().await;
    let refresher = tokio::spawn(async move {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = mailagent_tests::idp::Signer::trusted(&Endpoints::load()).mint(
                &other,
                &roles,
                Duration::from_secs(3600),
                0,
            );
            let _ = tokens
                .store(
                    pop_support::PROFILE,
                    &t,
                    common::heartbeat::now_secs() + 3500,
                )
                .await;
        }
    });
    let (err, attempts) = error_for(&fx, fx.mail_table("png", "POP3S", "")).await;
    refresher.abort();
    assert!(
        err.contains("no permission on mailbox") || err.contains("cannot log in"),
        "{err}"
    );
    assert!(err.contains(&fx.mailbox), "{err}");
    assert!(attempts <= 6, "{attempts} attempts in 3 s is a tight loop");
}

use mailagent_tests::env::Endpoints;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_gets_a_clear_error_and_backoff() {
    let fx = Fixture::new("popexp");
    // Expired an hour ago, though Redis still holds it as current.
    fx.plant(&fx.mint(Duration::from_secs(600), -7200)).await;
    let (err, attempts) = error_for(&fx, fx.mail_table("pex", "POP3S", "")).await;
    assert!(
        err.contains("cannot log in") && err.contains("XOAUTH2"),
        "{err}"
    );
    assert!(!err.contains("eyJ"), "a token leaked into the error: {err}");
    assert!(attempts <= 6, "{attempts} attempts in 3 s is a tight loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_in_redis_is_a_clear_error() {
    let fx = Fixture::new("popnotok");
    let (err, _) = error_for(&fx, fx.mail_table("pnt", "POP3S", "")).await;
    assert!(err.contains("no access token for oauth profile"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_rabbitmq_is_down_nothing_is_deleted_and_afterwards_all_arrive() {
    let fx = Fixture::new("popdown");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let (relay, amqp_via_relay) = fx.amqp_relay().await;
    let (mut config, _) = fx.config(&[fx.mail_table("pdn", "POP3S", "")]);
    config.amqp.set_url(amqp_via_relay);
    let fetcher = InProcess::start(config);
    // The fetcher is up (it polled the empty maildrop once), then RabbitMQ goes.
    let mut redis = fx.redis().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            let n: usize = redis::AsyncCommands::scard(&mut redis.clone(), fx.keys().uidls("pdn"))
                .await
                .unwrap_or(0);
            let agents = common::heartbeat::list_agents(&mut redis.clone(), &fx.keys())
                .await
                .unwrap_or_default();
            n == 0 && agents.iter().any(|a| a.last_poll.is_some())
        })
        .await
    );
    relay.down();
    let seeded = seed(&fx, 50, "down");
    // Several polls fail; nothing is deleted meanwhile.
    assert!(
        eventually(Duration::from_secs(20), || async {
            fx.last_error().await.is_some()
        })
        .await,
        "the outage was not noticed"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fx.maildrop_len(),
        50,
        "mail deleted while RabbitMQ was down"
    );
    relay.up();
    let got = drain(&channel, &fx.queue(), 50, Duration::from_secs(60)).await;
    assert_all_identical(&fx, &seeded, &got);
    assert!(eventually(Duration::from_secs(20), || async { fx.maildrop_len() == 0 }).await);
    fetcher.stop().await.unwrap();
    let _ = &mut redis;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_exchange_front_the_two_step_auth_works_and_no_one_line_auth_is_sent() {
    use mailagent_tests::exchange_front::{ExchangeFront, Mode, POP3_PROTOCOL_ERROR};
    let fx = Fixture::new("popexo");
    let front = ExchangeFront::start(&fx.env, Mode::Pop3).await;
    let seeded = seed(&fx, 40, "exo");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let (config, _) = fx.config(&[fx.mail_table_at("pxo", front.addr.port(), "pop3s", "")]);
    let fetcher = InProcess::start(config);
    let got = drain(&channel, &fx.queue(), 40, Duration::from_secs(60)).await;
    assert_all_identical(&fx, &seeded, &got);
    assert!(
        eventually(Duration::from_secs(20), || async { fx.maildrop_len() == 0 }).await,
        "maildrop still holds {} messages",
        fx.maildrop_len()
    );
    fetcher.stop().await.unwrap();
    assert!(
        front.two_step_auths() >= 1,
        "no two-step AUTH reached the front"
    );
    assert_eq!(front.one_line_auths(), 0, "a one-line AUTH was sent");

    // The front does catch a one-line AUTH: Exchange's protocol error, then
    // the connection is closed.
    let mut raw = mailagent_tests::mailclient::connect_tls(front.addr, &fx.env.ca_file())
        .await
        .unwrap();
    assert!(raw.read_line().await.unwrap().starts_with("+OK"));
    let payload = common::fetch::xoauth2::encoded_response(&fx.mailbox, "not-a-token");
    raw.send(&format!("AUTH XOAUTH2 {payload}")).await.unwrap();
    assert_eq!(raw.read_line().await.unwrap(), POP3_PROTOCOL_ERROR);
    assert!(raw.read_line().await.is_err(), "connection left open");
    assert_eq!(front.one_line_auths(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_without_permission_behind_the_exchange_front_is_reported_as_no_permission() {
    use mailagent_tests::exchange_front::{ExchangeFront, Mode};
    let fx = Fixture::new("popexd");
    let front = ExchangeFront::start(&fx.env, Mode::Pop3).await;
    front.deny(&fx.mailbox);
    seed(&fx, 3, "exd");
    fx.plant_token().await;
    // A broker that answers the forced refresh with a fresh (valid) token.
    let tokens = fx.tokens().await;
    let app = fx.app.clone();
    let refresher = tokio::spawn(async move {
        let roles: Vec<String> = mailagent_tests::idp::ROLES
            .iter()
            .map(|r| r.to_string())
            .collect();
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t = mailagent_tests::idp::Signer::trusted(&Endpoints::load()).mint(
                &app,
                &roles,
                Duration::from_secs(3600),
                0,
            );
            let _ = tokens
                .store(
                    pop_support::PROFILE,
                    &t,
                    common::heartbeat::now_secs() + 3500,
                )
                .await;
        }
    });
    let table = fx.mail_table_at("pxd", front.addr.port(), "pop3s", "");
    let (err, attempts) = error_for(&fx, table).await;
    refresher.abort();
    assert!(
        err.contains(&format!(
            "no permission on mailbox {} for app {}",
            fx.mailbox, fx.app
        )),
        "{err}"
    );
    assert!(
        err.contains("Authentication failure: unknown user name or bad password."),
        "Exchange's reply is quoted: {err}"
    );
    assert!(!err.contains("eyJ"), "a token leaked into the error: {err}");
    assert!(attempts <= 6, "{attempts} attempts in 3 s is a tight loop");
    assert_eq!(front.one_line_auths(), 0, "a one-line AUTH was sent");
    assert_eq!(fx.maildrop_len(), 3, "nothing deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_xoauth2_gets_a_clear_error_and_slow_retries() {
    use mailagent_tests::exchange_front::{ExchangeFront, Mode};
    let fx = Fixture::new("popnox");
    let front = ExchangeFront::start(&fx.env, Mode::Pop3).await;
    front.without_xoauth2();
    seed(&fx, 2, "nox");
    fx.plant_token().await;
    let table = fx.mail_table_at("pnx", front.addr.port(), "pop3s", "");
    let (err, attempts) = error_for(&fx, table).await;
    assert!(
        err.contains("does not offer SASL XOAUTH2 (CAPA SASL mechanisms: PLAIN)"),
        "{err}"
    );
    assert!(
        attempts <= 2,
        "{attempts} attempts in 3 s: not the slow schedule"
    );
    assert_eq!(front.two_step_auths() + front.one_line_auths(), 0);
    assert_eq!(fx.maildrop_len(), 2, "nothing deleted");
}
