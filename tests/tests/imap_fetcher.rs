//! The IMAP fetcher against real Dovecot, RabbitMQ and Redis (spec §4):
//! every message is published with confirms before it is flagged, the
//! checkpoint follows, after-fetch modes and start-from behave as
//! documented, IDLE picks up new mail, leases spread configs over replicas,
//! and permission problems are reported without a tight loop.

use std::collections::BTreeSet;
use std::time::Duration;

use mailagent_tests::harness::wait_for;
use mailagent_tests::imap_support::{self as support, Fixture};
use mailagent_tests::maildir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_500_seeded_messages_then_marks_them_seen() {
    let fx = Fixture::new("b500");
    let seeded: Vec<Vec<u8>> = (0..500)
        .map(|i| maildir::message(&fx.prefix, i, 2048, false))
        .collect();
    maildir::seed(&fx.env, &fx.mailbox, &seeded);
    fx.plant_token().await;
    let (config, _) = fx.config(&[fx.mail_table("m500", &fx.mailbox, "batch-size = 100")]);
    let (shutdown, task) = support::start(config, support::options());

    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 500, Duration::from_secs(90)).await;
    assert_eq!(got.len(), 500, "all 500 messages published");
    let published: BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
    let expected: BTreeSet<Vec<u8>> = seeded.iter().cloned().collect();
    assert_eq!(published.len(), 500, "no duplicates");
    assert!(published == expected, "bodies equal the mailbox's bytes");
    for e in &got {
        assert_eq!(e.mail_config, "m500");
        assert_eq!(e.mailbox, fx.mailbox);
        assert_eq!(
            e.dedupe_key,
            common::envelope::dedupe_key(&fx.mailbox, &e.body)
        );
    }

    // Flags and checkpoint follow the confirms of the last batch.
    let flagged = support::eventually(Duration::from_secs(20), || async {
        let flags = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
        flags.len() == 500 && flags.values().all(|f| f.contains("\\Seen"))
    })
    .await;
    assert!(flagged, "every message is \\Seen");
    let flags = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
    let last_uid = *flags.keys().max().expect("uids");
    let at_last = support::eventually(Duration::from_secs(10), || async {
        fx.checkpoint("m500").await.get("last-uid") == Some(&last_uid.to_string())
    })
    .await;
    assert!(
        at_last,
        "checkpoint at the last UID {last_uid}: {:?}",
        fx.checkpoint("m500").await
    );
    let extra = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "exactly 500 messages");
    support::stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_fetch_modes_move_delete_and_keep_behave_as_documented() {
    let fx = Fixture::new("afm");
    // Three mailboxes of the same app, one per mode.
    let boxes: Vec<String> = ["mv", "del", "keep"]
        .iter()
        .map(|m| format!("{m}-{}", fx.mailbox))
        .collect();
    for b in &boxes {
        fx.env.grant(&fx.app, b);
        let msgs: Vec<Vec<u8>> = (0..5).map(|i| maildir::message(b, i, 600, false)).collect();
        maildir::seed(&fx.env, b, &msgs);
    }
    // The move target has a non-ASCII name: modified UTF-7 on the wire.
    support::create_folder(&fx.env, &boxes[0], "Trait&AOk-s").await;
    fx.plant_token().await;
    let (config, _) = fx.config(&[
        fx.mail_table("mv", &boxes[0], "after-fetch = \"move:Traités\""),
        fx.mail_table("del", &boxes[1], "after-fetch = \"delete\""),
        fx.mail_table("keep", &boxes[2], "after-fetch = \"keep\""),
    ]);
    let (shutdown, task) = support::start(config, support::options());
    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 15, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 15);

    let moved = support::eventually(Duration::from_secs(15), || async {
        support::flags(&fx.env, &boxes[0], "INBOX").await.is_empty()
            && support::flags(&fx.env, &boxes[0], "Trait&AOk-s")
                .await
                .len()
                == 5
    })
    .await;
    assert!(moved, "move: INBOX empty, 5 in the target folder");
    let deleted = support::eventually(Duration::from_secs(15), || async {
        support::flags(&fx.env, &boxes[1], "INBOX").await.is_empty()
    })
    .await;
    assert!(deleted, "delete: INBOX empty");
    let kept = support::flags(&fx.env, &boxes[2], "INBOX").await;
    assert_eq!(kept.len(), 5, "keep: messages stay");
    assert!(
        kept.values().all(|f| !f.contains("\\Seen")),
        "keep: not flagged: {kept:?}"
    );
    // Keep does not republish on the next polls.
    let again = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(3)).await;
    assert!(again.is_empty(), "kept mail is not published twice");
    support::stop(shutdown, task).await;
}

/// With `after-fetch = "move:…"` a mail over `max-message-bytes` is moved
/// with the rest (§4: left in place, or moved when after-fetch moves), not
/// published, and recorded as oversized: the inbox ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_mail_is_moved_with_the_rest_when_after_fetch_moves() {
    use redis::AsyncCommands;
    let fx = Fixture::new("ovm");
    let tag = format!("{}ovm", fx.prefix);
    let mut msgs: Vec<Vec<u8>> = (0..3)
        .map(|i| maildir::message(&tag, i, 600, false))
        .collect();
    msgs.push(maildir::message(&tag, 9, 200_000, false));
    maildir::seed(&fx.env, &fx.mailbox, &msgs);
    support::create_folder(&fx.env, &fx.mailbox, "Done").await;
    fx.plant_token().await;
    let (config, _) = fx.config(&[fx.mail_table(
        "ovm",
        &fx.mailbox,
        "after-fetch = \"move:Done\"\nmax-message-bytes = 100000",
    )]);
    let (shutdown, task) = support::start(config, support::options());
    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 3, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 3, "the three small mails");
    let moved = support::eventually(Duration::from_secs(20), || async {
        support::flags(&fx.env, &fx.mailbox, "INBOX")
            .await
            .is_empty()
            && support::flags(&fx.env, &fx.mailbox, "Done").await.len() == 4
    })
    .await;
    assert!(moved, "the inbox is empty and all four are in Done");
    let extra = support::drain(&channel, &fx.queue(), 10, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "the big mail was not published");
    let mut redis = mailagent_tests::harness::redis(&fx.env).await;
    let recorded: Vec<String> = redis
        .hkeys(fx.keys().oversized("ovm"))
        .await
        .expect("hkeys");
    assert_eq!(recorded.len(), 1, "recorded as oversized");
    support::stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_now_skips_existing_mail_and_idle_publishes_new_mail() {
    let fx = Fixture::new("now");
    let old: Vec<Vec<u8>> = (0..3)
        .map(|i| maildir::message("old", i, 500, false))
        .collect();
    maildir::seed(&fx.env, &fx.mailbox, &old);
    fx.plant_token().await;
    let (config, _) = fx.config(&[fx.mail_table(
        "now",
        &fx.mailbox,
        "start-from = \"now\"\npoll-interval = 3600",
    )]);
    let (shutdown, task) = support::start(config, support::options());
    // Wait until the fetcher has recorded its starting point.
    let ready = support::eventually(Duration::from_secs(30), || async {
        fx.checkpoint("now").await.contains_key("last-uid")
    })
    .await;
    assert!(ready, "checkpoint written at start");
    // Give IDLE a moment to be in place is not needed: mail appended before
    // IDLE starts is found by the next pass anyway. Poll interval is an hour,
    // so only IDLE can deliver it in time.
    let new = maildir::message(&fx.prefix, 99, 700, false);
    support::append(&fx.env, &fx.mailbox, "INBOX", &new).await;
    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "only the new message is published");
    assert_eq!(got[0].body, new);
    let flags = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
    let unseen = flags.values().filter(|f| !f.contains("\\Seen")).count();
    assert_eq!(unseen, 3, "old mail untouched");
    support::stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_without_grant_gets_a_permission_error_and_no_tight_loop() {
    let fx = Fixture::new("nogrant");
    let ungranted = format!("ng-{}", fx.mailbox);
    fx.plant_token().await;
    let (config, _) = fx.config(&[fx.mail_table("ng", &ungranted, "")]);
    let (shutdown, task) = support::start(config, support::options());
    let error = wait_for(
        "an error reported in the heartbeat",
        Duration::from_secs(60),
        || fx.last_error(),
    )
    .await;
    assert!(
        error.contains(&format!(
            "no permission on mailbox {ungranted} for app {}",
            fx.app
        )),
        "{error}"
    );
    assert!(!error.contains("eyJ"), "no token in the error: {error}");
    // No tight loop: count logins in the Dovecot log for this mailbox over 5 s.
    let log = fx.env.get("MAILAGENT_TEST_DOVECOT_LOG").to_string();
    let count = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&ungranted) && l.contains("imap-login"))
            .count()
    };
    let before = count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = count() - before;
    assert!(
        during <= 8,
        "{during} login attempts in 5 s is a tight loop"
    );
    support::stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_is_refreshed_and_the_fetch_succeeds() {
    let fx = Fixture::new("tok");
    maildir::seed(
        &fx.env,
        &fx.mailbox,
        &[maildir::message(&fx.prefix, 1, 500, false)],
    );
    // A token whose JWT has expired although Redis still holds it as current
    // (it expired between polls).
    let failed = fx.plant_expired_token().await;
    // Act as the broker: wait for the fetcher's forced-refresh request for
    // exactly that token, then store a fresh one.
    let mut pubsub = fx.refresh_requests().await;
    let (config, _) = fx.config(&[fx.mail_table("tok", &fx.mailbox, "")]);
    let (shutdown, task) = support::start(config, support::options());
    let request: String = {
        use futures::StreamExt;
        let mut messages = pubsub.on_message();
        let msg = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("a refresh request within 30 s")
            .expect("message");
        msg.get_payload().expect("payload")
    };
    assert!(request.contains(&failed.fingerprint), "{request}");
    assert!(!request.contains("eyJ"), "no token in the request");
    fx.plant_token().await;
    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(40)).await;
    assert_eq!(got.len(), 1, "published after the refresh");
    support::stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_but_not_connected_is_reported_as_missing_permission() {
    use mailagent_tests::exchange_front::{ExchangeFront, Mode};
    let fx = Fixture::new("exo");
    let front = ExchangeFront::start(&fx.env, Mode::Imap).await;
    front.deny(&fx.mailbox);
    fx.plant_token().await;
    let table = fx.mail_table("exo", &fx.mailbox, "").replace(
        &format!("port = {}", fx.env.mail_addr("IMAPS").port()),
        &format!("port = {}", front.addr.port()),
    );
    let (config, _) = fx.config(&[table]);
    let (shutdown, task) = support::start(config, support::options());
    let error = wait_for(
        "an error reported in the heartbeat",
        Duration::from_secs(30),
        || fx.last_error(),
    )
    .await;
    assert!(
        error.contains(&format!(
            "no permission on mailbox {} for app {}",
            fx.mailbox, fx.app
        )),
        "{error}"
    );
    assert!(error.contains("authenticated but not connected"), "{error}");
    support::stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_front_relays_a_permitted_mailbox_to_dovecot() {
    use mailagent_tests::exchange_front::{ExchangeFront, Mode};
    let fx = Fixture::new("exok");
    let front = ExchangeFront::start(&fx.env, Mode::Imap).await;
    maildir::seed(
        &fx.env,
        &fx.mailbox,
        &[maildir::message(&fx.prefix, 1, 500, false)],
    );
    fx.plant_token().await;
    let (config, _) = fx.config(&[through_front(&fx, &front, "exok", &fx.mailbox, "")]);
    let (shutdown, task) = support::start(config, support::options());
    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "published through the front");
    support::stop(shutdown, task).await;
}

/// The mail table of config `name` on `mailbox` with `extra` settings,
/// connecting through `front` instead of straight to Dovecot.
fn through_front(
    fx: &Fixture,
    front: &mailagent_tests::exchange_front::ExchangeFront,
    name: &str,
    mailbox: &str,
    extra: &str,
) -> String {
    fx.mail_table(name, mailbox, extra).replace(
        &format!("port = {}", fx.env.mail_addr("IMAPS").port()),
        &format!("port = {}", front.addr.port()),
    )
}

/// Waits until the checkpoint of `config` (on `fx.mailbox`'s INBOX) stands
/// at the folder's last UID.
async fn checkpoint_reaches_the_last_uid(fx: &Fixture, config: &str) {
    let last_uid = *support::flags(&fx.env, &fx.mailbox, "INBOX")
        .await
        .keys()
        .max()
        .expect("uids");
    let at_last = support::eventually(Duration::from_secs(10), || async {
        fx.checkpoint(config).await.get("last-uid") == Some(&last_uid.to_string())
    })
    .await;
    assert!(
        at_last,
        "checkpoint at {last_uid}: {:?}",
        fx.checkpoint(config).await
    );
}

/// A pass of several batches flags (or moves) each confirmed half batch
/// over a second session while the first fetches the next: every mail is
/// published once, flagged or moved, the checkpoint reaches the last UID,
/// and each mailbox had two sessions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pass_settles_over_a_second_session_while_the_first_fetches() {
    use mailagent_tests::exchange_front::{ExchangeFront, Mode};
    let fx = Fixture::new("fl2");
    let front = ExchangeFront::start(&fx.env, Mode::Imap).await;
    let moved = format!("mv-{}", fx.mailbox);
    fx.env.grant(&fx.app, &moved);
    for b in [&fx.mailbox, &moved] {
        let msgs: Vec<Vec<u8>> = (0..300)
            .map(|i| maildir::message(b, i, 1024, false))
            .collect();
        maildir::seed(&fx.env, b, &msgs);
    }
    support::create_folder(&fx.env, &moved, "Done").await;
    fx.plant_token().await;
    let (config, _) = fx.config(&[
        through_front(&fx, &front, "fl2seen", &fx.mailbox, "batch-size = 60"),
        through_front(
            &fx,
            &front,
            "fl2move",
            &moved,
            "batch-size = 60\nafter-fetch = \"move:Done\"",
        ),
    ]);
    let (shutdown, task) = support::start(config, support::options());
    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 600, Duration::from_secs(90)).await;
    assert_eq!(got.len(), 600, "every mail published");
    let keys: BTreeSet<&str> = got.iter().map(|e| e.dedupe_key.as_str()).collect();
    assert_eq!(keys.len(), 600, "each once");

    let settled = support::eventually(Duration::from_secs(20), || async {
        let seen = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
        seen.len() == 300
            && seen.values().all(|f| f.contains("\\Seen"))
            && support::flags(&fx.env, &moved, "INBOX").await.is_empty()
            && support::flags(&fx.env, &moved, "Done").await.len() == 300
    })
    .await;
    assert!(settled, "all 300 \\Seen; all 300 moved to Done");
    checkpoint_reaches_the_last_uid(&fx, "fl2seen").await;
    assert_eq!(
        front.peak_sessions(&fx.mailbox),
        2,
        "mark-seen: a second session"
    );
    assert_eq!(front.peak_sessions(&moved), 2, "move: a second session");
    let extra = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "nothing published twice");
    support::stop(shutdown, task).await;
}

/// A server that allows one session per mailbox refuses the second: the
/// first then flags between its fetches, and nothing is lost or left
/// unflagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_a_second_session_gets_every_mail_flagged_by_the_first() {
    use mailagent_tests::exchange_front::{ExchangeFront, Mode};
    let fx = Fixture::new("fl1");
    let front = ExchangeFront::start(&fx.env, Mode::Imap).await;
    front.limit_sessions(1);
    let msgs: Vec<Vec<u8>> = (0..300)
        .map(|i| maildir::message(&fx.prefix, i, 1024, false))
        .collect();
    maildir::seed(&fx.env, &fx.mailbox, &msgs);
    fx.plant_token().await;
    let (config, _) = fx.config(&[through_front(
        &fx,
        &front,
        "fl1",
        &fx.mailbox,
        "batch-size = 60",
    )]);
    let (shutdown, task) = support::start(config, support::options());
    let channel = fx.channel().await;
    let got = support::drain(&channel, &fx.queue(), 300, Duration::from_secs(90)).await;
    assert_eq!(got.len(), 300, "every mail published");
    let flagged = support::eventually(Duration::from_secs(20), || async {
        let flags = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
        flags.len() == 300 && flags.values().all(|f| f.contains("\\Seen"))
    })
    .await;
    assert!(flagged, "every mail \\Seen");
    checkpoint_reaches_the_last_uid(&fx, "fl1").await;
    assert_eq!(front.peak_sessions(&fx.mailbox), 1, "one session at a time");
    assert!(
        front.refused_sessions(&fx.mailbox) >= 1,
        "the second was asked for and refused"
    );
    let extra = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "nothing published twice");
    support::stop(shutdown, task).await;
}
