//! The IMAP fetcher when the world misbehaves (spec §4, issue 4 "Must
//! show"): RabbitMQ down, publishers blocked by a resource alarm, a
//! UIDVALIDITY change, a token that expired between two sessions. Against
//! real Dovecot, RabbitMQ and Redis; outages are made with a per-test relay
//! or a private RabbitMQ node, so parallel tests are not disturbed.

use std::collections::BTreeSet;
use std::time::Duration;

use common::shutdown::CancellationToken;
use mailagent_tests::imap_support::stop;
use mailagent_tests::imap_support::{self as support, Fixture};
use mailagent_tests::maildir;
use mailagent_tests::private_rabbit::PrivateRabbit;
use mailagent_tests::relay::Relay;
use tokio::task::JoinHandle;

/// Waits until the fetcher has written its first checkpoint (it is up and
/// has looked at the folder once).
async fn wait_started(fx: &Fixture, config: &str) {
    let up = support::eventually(Duration::from_secs(30), || async {
        fx.checkpoint(config).await.contains_key("last-uid")
    })
    .await;
    assert!(up, "the fetcher did not start on {config}");
}

/// True once `rabbit` holds a publisher's connection blocked (it stops
/// reading from publishers under a resource alarm), within 20 s.
async fn publisher_blocked(rabbit: &PrivateRabbit) -> bool {
    support::eventually(Duration::from_secs(20), || async {
        rabbit
            .connection_states()
            .await
            .iter()
            .any(|s| s == "blocked")
    })
    .await
}

fn start(config: common::Config) -> (CancellationToken, JoinHandle<()>) {
    support::start(config, support::options())
}

fn seed(fx: &Fixture, tag: &str, n: usize) -> BTreeSet<Vec<u8>> {
    let msgs: Vec<Vec<u8>> = (0..n)
        .map(|i| maildir::message(&format!("{}{tag}", fx.prefix), i, 1500, false))
        .collect();
    maildir::seed(&fx.env, &fx.mailbox, &msgs);
    msgs.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_rabbitmq_is_down_nothing_is_deleted_and_afterwards_all_arrive() {
    let fx = Fixture::new("down");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let (relay, amqp_via_relay) = fx.amqp_relay().await;
    let (mut config, _) =
        fx.config(&[fx.mail_table("dn", &fx.mailbox, "after-fetch = \"delete\"\nidle = false")]);
    config.amqp.set_url(amqp_via_relay);
    let (shutdown, task) = start(config);
    wait_started(&fx, "dn").await;

    relay.down();
    let seeded = seed(&fx, "dn", 40);
    let noticed = support::eventually(Duration::from_secs(20), || async {
        fx.last_error()
            .await
            .is_some_and(|e| e.contains("RabbitMQ"))
    })
    .await;
    assert!(
        noticed,
        "the outage was not reported: {:?}",
        fx.last_error().await
    );
    // Several sessions fail meanwhile (backoff ≤ 2 s); nothing is deleted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let inbox = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
    assert_eq!(inbox.len(), 40, "mail deleted while RabbitMQ was down");
    assert!(
        inbox.values().all(|f| !f.contains("\\Deleted")),
        "mail flagged \\Deleted while RabbitMQ was down: {inbox:?}"
    );

    relay.up();
    let got = support::drain(&channel, &fx.queue(), 40, Duration::from_secs(60)).await;
    let bodies: BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
    assert!(bodies == seeded, "every message arrives after the outage");
    let emptied = support::eventually(Duration::from_secs(20), || async {
        support::flags(&fx.env, &fx.mailbox, "INBOX")
            .await
            .is_empty()
    })
    .await;
    assert!(emptied, "delete applies once confirmed");
    stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_publishers_are_blocked_by_a_resource_alarm_nothing_is_flagged_then_each_arrives_once(
) {
    // A resource alarm blocks every publisher of a node: this test gets a
    // node of its own, so the shared broker is never blocked.
    let rabbit = PrivateRabbit::start().await;
    let fx = Fixture::new("alarm");
    fx.plant_token().await;
    let (mut config, _) = fx.config(&[fx.mail_table("al", &fx.mailbox, "idle = false")]);
    let channel = rabbit.channel_with_topology(&mut config.amqp).await;
    let (shutdown, task) = start(config);
    wait_started(&fx, "al").await;

    rabbit.set_disk_alarm().await;
    let seeded = seed(&fx, "al", 50);
    // The fetcher fetched and published: RabbitMQ holds its connection
    // blocked (it stops reading from publishers under an alarm).
    let blocked = publisher_blocked(&rabbit).await;
    assert!(
        blocked,
        "no blocked publisher: {:?}",
        rabbit.connection_states().await
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let flags = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
    assert_eq!(flags.len(), 50);
    assert!(
        flags.values().all(|f| !f.contains("\\Seen")),
        "mail flagged while the publisher was blocked: {flags:?}"
    );
    assert_eq!(support::depth(&channel, &fx.queue()).await, 0);
    assert_eq!(
        fx.checkpoint("al")
            .await
            .get("last-uid")
            .map(String::as_str),
        Some("0"),
        "checkpoint advanced while blocked"
    );

    rabbit.clear_disk_alarm().await;
    let got = support::drain(&channel, &fx.queue(), 50, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 50, "all arrive once the alarm clears");
    let bodies: BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
    assert_eq!(bodies.len(), 50, "no duplicates");
    assert!(bodies == seeded, "bodies equal the mailbox's bytes");
    let seen = support::eventually(Duration::from_secs(20), || async {
        support::flags(&fx.env, &fx.mailbox, "INBOX")
            .await
            .values()
            .all(|f| f.contains("\\Seen"))
    })
    .await;
    assert!(seen, "flagged once confirmed");
    // Several more polls: nothing was republished.
    let extra = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(3)).await;
    assert!(extra.is_empty(), "republished: exactly once each");
    stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_change_rescans_unseen_mail_without_replaying_handed_over_mail() {
    let fx = Fixture::new("uv");
    let old = seed(&fx, "old", 5);
    fx.plant_token().await;
    let channel = fx.channel().await;
    let (config, _) = fx.config(&[fx.mail_table("uv", &fx.mailbox, "idle = false")]);
    let (shutdown, task) = start(config.clone());
    let got = support::drain(&channel, &fx.queue(), 5, Duration::from_secs(30)).await;
    let bodies: BTreeSet<Vec<u8>> = got.into_iter().map(|e| e.body).collect();
    assert!(bodies == old);
    let seen = support::eventually(Duration::from_secs(15), || async {
        let f = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
        f.len() == 5 && f.values().all(|f| f.contains("\\Seen"))
    })
    .await;
    assert!(seen);
    let before = support::eventually(Duration::from_secs(10), || async {
        fx.checkpoint("uv")
            .await
            .get("last-uid")
            .map(String::as_str)
            == Some("5")
    })
    .await;
    assert!(before, "{:?}", fx.checkpoint("uv").await);
    let old_validity = fx.checkpoint("uv").await["uidvalidity"].clone();
    stop(shutdown, task).await;

    // The mailbox is rebuilt (as after a restore or a server migration):
    // Dovecot forgets its UID list and index and assigns a new UIDVALIDITY
    // and new UIDs; the \Seen flags stay (Maildir keeps them in file names).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dir = maildir::maildir(&fx.env, &fx.mailbox);
    for entry in std::fs::read_dir(&dir).expect("maildir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "dovecot-uidlist" || name.starts_with("dovecot.index") {
            std::fs::remove_file(&path).expect("remove");
        }
    }
    let new = seed(&fx, "new", 2);

    let (shutdown, task) = start(config);
    let got = support::drain(&channel, &fx.queue(), 2, Duration::from_secs(30)).await;
    let bodies: BTreeSet<Vec<u8>> = got.into_iter().map(|e| e.body).collect();
    assert!(
        bodies == new,
        "the unseen mail is published after the change"
    );
    let changed = support::eventually(Duration::from_secs(15), || async {
        let cp = fx.checkpoint("uv").await;
        cp.get("uidvalidity") != Some(&old_validity)
            && cp.get("scan-until").is_none_or(|s| s == "0")
    })
    .await;
    assert!(
        changed,
        "checkpoint follows the new UIDVALIDITY (was {old_validity}): {:?}",
        fx.checkpoint("uv").await
    );
    let extra = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(3)).await;
    assert!(
        extra.is_empty(),
        "mail handed over before the change is not replayed"
    );
    let flags = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
    assert_eq!(flags.len(), 7);
    assert!(flags.values().all(|f| f.contains("\\Seen")), "{flags:?}");
    stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expired_between_sessions_is_refreshed_and_the_next_session_succeeds() {
    let fx = Fixture::new("exp");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let relay = Relay::start(fx.env.mail_addr("IMAPS")).await;
    let table = fx.mail_table("exp", &fx.mailbox, "").replace(
        &format!("port = {}", fx.env.mail_addr("IMAPS").port()),
        &format!("port = {}", relay.addr.port()),
    );
    let (config, _) = fx.config(&[table]);
    let (shutdown, task) = start(config);
    wait_started(&fx, "exp").await;
    let first = maildir::message(&fx.prefix, 1, 600, false);
    support::append(&fx.env, &fx.mailbox, "INBOX", &first).await;
    let got = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "published with the first token");

    // The token expires while the session idles: Redis still holds it as
    // current (the broker has not refreshed yet) but the server refuses it.
    let failed = fx.plant_expired_token().await;
    let mut pubsub = fx.refresh_requests().await;
    // The server drops the connection; the next session logs in again.
    relay.cut();
    let request: String = {
        use futures::StreamExt;
        let mut messages = pubsub.on_message();
        let msg = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("a forced-refresh request within 30 s")
            .expect("message");
        msg.get_payload().expect("payload")
    };
    assert!(
        request.contains(&failed.fingerprint),
        "refresh of the refused token: {request}"
    );
    let second = maildir::message(&fx.prefix, 2, 600, false);
    support::append(&fx.env, &fx.mailbox, "INBOX", &second).await;
    // Act as the broker: the refreshed token.
    fx.plant_token().await;
    let got = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(40)).await;
    assert_eq!(got.len(), 1, "published after the refresh");
    assert_eq!(got[0].body, second);
    stop(shutdown, task).await;
}

/// A mail table for `fx`'s mailbox through `relay`.
fn table_via(fx: &Fixture, relay: &Relay, name: &str, extra: &str) -> String {
    let port = relay.addr.port();
    fx.mail_table_for(name, &fx.mailbox, port, "imaps", extra)
}

/// Issue 12: a connection that goes silent mid-FETCH (the relay stops
/// forwarding after 1 MiB, both ways, and keeps the socket open) ends on
/// the default `command-timeout`; the fetcher reconnects and every one of
/// 3,000 mails arrives within 3 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_goes_silent_mid_fetch_times_out_and_every_mail_arrives() {
    let fx = Fixture::new("stallf");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let seeded = seed(&fx, "sf", 3000);
    let relay = Relay::start(fx.env.mail_addr("IMAPS")).await;
    relay.stall_after(1 << 20);
    let (config, _) = fx.config(&[table_via(&fx, &relay, "sf", "")]);
    let (shutdown, task) = start(config);
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while got.len() < seeded.len() && tokio::time::Instant::now() < deadline {
        for e in support::drain(&channel, &fx.queue(), 3000, Duration::from_secs(2)).await {
            got.insert(e.body);
        }
    }
    assert_eq!(relay.stalls(), 1, "the connection stalled mid-mailbox");
    assert!(
        got == seeded,
        "{} of 3000 mails arrived within 3 minutes of a stalled FETCH",
        got.intersection(&seeded).count()
    );
    stop(shutdown, task).await;
}

/// Issue 12: a connection that goes silent during IDLE: with
/// `idle-renew = 15` and `command-timeout = 10` the IDLE is ended, the
/// unanswered DONE times out, and a mail that arrived after the stall is
/// published within 60 s on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_goes_silent_during_idle_is_renewed_and_new_mail_arrives() {
    let fx = Fixture::new("stalli");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let relay = Relay::start(fx.env.mail_addr("IMAPS")).await;
    let extra = "idle-renew = 15\ncommand-timeout = 10";
    let (config, _) = fx.config(&[table_via(&fx, &relay, "si", extra)]);
    let (shutdown, task) = start(config);
    wait_started(&fx, "si").await;
    let first = maildir::message(&fx.prefix, 1, 600, false);
    support::append(&fx.env, &fx.mailbox, "INBOX", &first).await;
    let got = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "the first mail is published");
    // Flagged: the pass is over and the session goes back to IDLE.
    let flagged = support::eventually(Duration::from_secs(20), || async {
        support::flags(&fx.env, &fx.mailbox, "INBOX")
            .await
            .values()
            .all(|f| f.contains("\\Seen"))
    })
    .await;
    assert!(flagged, "the first mail was not flagged");

    relay.stall();
    let second = maildir::message(&fx.prefix, 2, 600, false);
    support::append(&fx.env, &fx.mailbox, "INBOX", &second).await;
    let got = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(60)).await;
    assert_eq!(
        got.iter().map(|e| &e.body).collect::<Vec<_>>(),
        vec![&second],
        "the mail after the stall is published within 60 s"
    );
    stop(shutdown, task).await;
}

/// Issue 12, §7a: a replica whose lease renewal is held up past its
/// time-to-live (its Redis went silent) changes nothing in the mailbox after
/// the deadline, even when the confirms of the batch it had in flight come
/// in afterwards; once Redis answers again it takes the lease back and
/// finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_lease_renewal_is_held_past_its_ttl_flags_nothing_after_the_deadline() {
    let rabbit = PrivateRabbit::start().await;
    let fx = Fixture::new("fence");
    fx.plant_token().await;
    let (redis, redis_via_relay) = fx.redis_relay().await;
    let (mut config, _) = fx.config(&[fx.mail_table("fc", &fx.mailbox, "idle = false")]);
    config.redis.url = redis_via_relay;
    let channel = rabbit.channel_with_topology(&mut config.amqp).await;
    let (shutdown, task) = start(config);
    wait_started(&fx, "fc").await;

    // A batch in flight whose confirms are held back (a resource alarm).
    rabbit.set_disk_alarm().await;
    let seeded = seed(&fx, "fc", 30);
    let blocked = publisher_blocked(&rabbit).await;
    assert!(blocked, "the batch is not in flight");

    // Redis goes silent: no renewal answers. The last one was sent before
    // this, so the lease's deadline is at most one TTL away.
    let stalled_at = std::time::Instant::now();
    redis.stall();
    let past_deadline = stalled_at + support::options().lease_ttl + Duration::from_secs(1);
    tokio::time::sleep_until(past_deadline.into()).await; // the fault's timeline

    // The confirms may come now, after the deadline (the session was cut
    // off, so some or all of the batch may be lost with its channel): the
    // replica must not act on any of them.
    rabbit.clear_disk_alarm().await;
    let got = support::drain(&channel, &fx.queue(), 30, Duration::from_secs(10)).await;
    let flagged_late = support::eventually(Duration::from_secs(5), || async {
        support::flags(&fx.env, &fx.mailbox, "INBOX")
            .await
            .values()
            .any(|f| f.contains("\\Seen"))
    })
    .await;
    assert!(!flagged_late, "mail flagged after the lease deadline");

    // Redis answers again: the lease is taken back and every mail is
    // flagged (handed over again, at most once more each).
    redis.cut();
    let seen = support::eventually(Duration::from_secs(60), || async {
        let f = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
        f.len() == 30 && f.values().all(|f| f.contains("\\Seen"))
    })
    .await;
    assert!(seen, "the replica did not recover once Redis answered");
    let again = support::drain(&channel, &fx.queue(), 30, Duration::from_secs(10)).await;
    let bodies: BTreeSet<Vec<u8>> = got.iter().chain(&again).map(|e| e.body.clone()).collect();
    assert!(bodies == seeded, "every mail handed over");
    stop(shutdown, task).await;
}

/// Issue 13: a session does not outlive its token. A token that lives 40 s
/// opens an IDLE session; the broker (here: the test) stores the next token;
/// the fetcher ends that session and opens a new one before the first token
/// expires, and mail that arrives afterwards is published within the IDLE
/// latency goal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_renewed_before_its_token_expires() {
    // The session ends a quarter of the token's life before it expires:
    // 10 s of margin, enough on a loaded CI host.
    const LIFE: Duration = Duration::from_secs(40);
    let fx = Fixture::new("renew");
    let short = fx.mint(LIFE, 0);
    let started = std::time::Instant::now();
    let expires = common::heartbeat::now_secs() + LIFE.as_secs();
    fx.tokens()
        .await
        .store(support::PROFILE, &short, expires)
        .await
        .expect("store token");
    let channel = fx.channel().await;
    let relay = Relay::start(fx.env.mail_addr("IMAPS")).await;
    let (config, _) = fx.config(&[table_via(&fx, &relay, "renew", "")]);
    let (shutdown, task) = start(config);
    wait_started(&fx, "renew").await;
    assert_eq!(relay.connections(), 1, "one session so far");
    // The broker's next token, stored well before the first one expires.
    fx.plant_token().await;
    let renewed = support::eventually(LIFE, || async { relay.connections() >= 2 }).await;
    assert!(renewed, "no new session before the token expired");
    let at = started.elapsed();
    assert!(
        at < LIFE,
        "the session was renewed only after its token expired ({at:?})"
    );
    // Past the first token's expiry: new mail still arrives promptly.
    let past = support::eventually(Duration::from_secs(30), || async {
        common::heartbeat::now_secs() > expires
    })
    .await;
    assert!(past);
    let mail = maildir::message(&fx.prefix, 1, 600, false);
    let appended = std::time::Instant::now();
    support::append(&fx.env, &fx.mailbox, "INBOX", &mail).await;
    let got = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "published after the renewal");
    eprintln!(
        "renewed after {at:?}; mail published {:?} after APPEND",
        appended.elapsed()
    );
    stop(shutdown, task).await;
}

/// Issue 13: the server ends the session mid-batch with a `BYE` (Dovecot's
/// `doveadm kick` stands in for Exchange's `BYE … AccessTokenExpired`): the
/// fetcher reconnects and every mail arrives. What was published but not
/// yet flagged when the BYE came is fetched again — at most one and a half
/// batches (three half batches under way; `batch-size`, 500 by default),
/// each copy with its first delivery's dedupe key, so the form processor
/// creates nothing twice (docs/imap-fetcher.md).
/// Sessions renewed before token expiry avoid this cost altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bye_mid_batch_reconnects_and_every_mail_arrives_with_one_dedupe_key() {
    let fx = Fixture::new("bye");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let seeded = seed(&fx, "by", 2000);
    let (config, _) = fx.config(&[fx.mail_table("by", &fx.mailbox, "")]);
    let (shutdown, task) = start(config);
    let mut got: Vec<(String, Vec<u8>)> = Vec::new();
    // Mid-batch: some mail handed over, most not yet.
    while got.len() < 50 {
        let batch = support::drain(&channel, &fx.queue(), 50, Duration::from_secs(30)).await;
        assert!(!batch.is_empty(), "nothing published within 30 s");
        got.extend(batch.into_iter().map(|e| (e.dedupe_key, e.body)));
    }
    let conf = std::path::Path::new(&fx.env.get("MAILAGENT_TEST_DOVECOT_LOG"))
        .with_file_name("dovecot.conf");
    let kick = std::process::Command::new("doveadm")
        .arg("-c")
        .arg(&conf)
        .args(["kick", &fx.mailbox])
        .output()
        .expect("run doveadm kick");
    let kicked = String::from_utf8_lossy(&kick.stdout).to_string();
    assert!(kicked.contains(&fx.mailbox), "kicked mid-batch: {kicked}");
    let arrived = |got: &Vec<(String, Vec<u8>)>| {
        got.iter()
            .map(|(_, b)| b.clone())
            .collect::<BTreeSet<Vec<u8>>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while arrived(&got) != seeded && tokio::time::Instant::now() < deadline {
        for e in support::drain(&channel, &fx.queue(), 2000, Duration::from_secs(2)).await {
            got.push((e.dedupe_key, e.body));
        }
    }
    for e in support::drain(&channel, &fx.queue(), 2000, Duration::from_secs(3)).await {
        got.push((e.dedupe_key, e.body));
    }
    let unique = arrived(&got);
    assert!(
        unique == seeded,
        "{} of {} mails arrived",
        unique.intersection(&seeded).count(),
        seeded.len()
    );
    let again = got.len() - seeded.len();
    let in_flight = (common::config::DEFAULT_BATCH_SIZE as usize).div_ceil(2) * 3;
    assert!(
        again <= in_flight,
        "{again} mails published again: more than the {in_flight} in flight"
    );
    let mut keys: std::collections::HashMap<Vec<u8>, String> = Default::default();
    for (key, body) in &got {
        let first = keys.entry(body.clone()).or_insert_with(|| key.clone());
        assert_eq!(first, key, "a copy with another dedupe key");
    }
    eprintln!("BYE mid-batch: {again} of 2000 mails published a second time (same dedupe key)");
    stop(shutdown, task).await;
}
