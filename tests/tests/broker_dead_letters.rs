//! What RabbitMQ dead-letters from `<prefix>.create` on its own (§7a), on
//! the single test node, with classic and with quorum queues: a form mail
//! whose per-message TTL ran out while no processor consumed (`x-death`
//! reason `expired`), and one a consumer rejected without requeueing
//! (`rejected`). Such a dead letter carries no `x-reason` and has no
//! failures row until `mailagent dead-letters` records it; then it is
//! listed once with RabbitMQ's reason, and its replay becomes exactly one
//! record. (RabbitMQ's own `delivery_limit` is proven on the cluster:
//! `cluster_rabbitmqs_own_delivery_limit_is_listed_and_replayable`.)
//!
//! Each test has its own queue prefix and SQLite store.

use std::time::Duration;

use common::envelope::Envelope;
use form_processor::store::Known;
use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::ShortString;
use mailagent_tests::forms::*;

const WAIT: Duration = Duration::from_secs(30);

/// The queue type `<prefix>.create` and `<prefix>.dead` are declared with.
#[derive(Clone, Copy)]
enum Queues {
    Classic,
    /// With `[amqp] delivery-limit = 2`, the least that exceeds the
    /// processor's `delivery-limit = 1`.
    Quorum,
}

async fn harness(queues: Queues) -> Harness {
    match queues {
        Queues::Classic => Harness::new(StoreKind::Sqlite, &[]).await,
        Queues::Quorum => {
            Harness::with_amqp(
                StoreKind::Sqlite,
                &["delivery-limit = 1"],
                &["queue-type = \"quorum\"", "delivery-limit = 2"],
            )
            .await
        }
    }
}

/// `mailagent ARGS` with the harness's CLI configuration: (success,
/// stdout and stderr).
async fn mailagent(h: &Harness, args: &[&str]) -> (bool, String) {
    let (out, text) =
        mailagent_tests::process::mailagent(&h.config_path_for(common::Component::Cli), args).await;
    (out.status.success(), text)
}

/// Ready messages in the dead-letter queue.
async fn dead_depth(h: &Harness) -> u32 {
    common::topology::queue_depth(&h.channel, &h.topology.dead_queue)
        .await
        .unwrap()
}

/// The part both reasons share. RabbitMQ has just been made to dead-letter
/// `e` from the create queue with `x-death` reason `reason`, and no
/// processor ran: the dead letter arrives alone; `dead-letters list`
/// records it as one failure with `reason` and lists it once (listing again
/// adds nothing); its replay puts it back into the create queue; and a
/// processor started then makes exactly one record of it, to which the
/// dedupe key now points, leaving both queues empty.
async fn listed_once_and_replayed_into_one_record(h: &Harness, e: &Envelope, reason: &str) {
    wait_for(
        &format!("RabbitMQ to dead-letter the message ({reason})"),
        WAIT,
        || async { (dead_depth(h).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(h.queue_depth().await, 0);
    let store = h.store().await;
    assert!(
        store.failures().await.unwrap().is_empty(),
        "no processor ran, so nothing recorded it yet"
    );

    let (ok, out) = mailagent(h, &["dead-letters", "list"]).await;
    assert!(ok, "{out}");
    let failures = store.failures().await.unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}\n{out}");
    let f = &failures[0];
    assert_eq!(f.reason, reason, "{out}");
    assert!(f.dead_lettered);
    assert_eq!(f.source.dedupe_key, e.dedupe_key);
    assert_eq!(f.source.subject, LEASE_SUBJECT);
    assert!(f.detail.contains(&h.topology.create_queue), "{}", f.detail);
    let line = format!("#{} {reason} dead-lettered=true ", f.id);
    assert_eq!(out.matches(&line).count(), 1, "{line:?} once in:\n{out}");
    let summary = format!(
        "1 failure(s); 1 message(s) waiting in {}",
        h.topology.dead_queue
    );
    assert!(out.contains(&summary), "{out}");

    // Listing again records nothing new and keeps the dead letter.
    let (ok, out) = mailagent(h, &["dead-letters", "list"]).await;
    assert!(ok, "{out}");
    assert_eq!(out.matches(&line).count(), 1, "{line:?} once in:\n{out}");
    assert!(out.contains(&summary), "{out}");
    assert_eq!(store.failures().await.unwrap().len(), 1, "{out}");
    assert_eq!(dead_depth(h).await, 1);

    let (ok, out) = mailagent(h, &["dead-letters", "replay", &f.id.to_string()]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("replayed failure #{} ({reason})", f.id)),
        "{out}"
    );
    assert_eq!(dead_depth(h).await, 0, "the replay took the dead letter");
    assert_eq!(h.queue_depth().await, 1, "the mail went back once");

    let p = h.start(Default::default());
    wait_records(&store, 1, WAIT).await;
    wait_for("the replay to be acked", WAIT, || async {
        (h.queue_depth().await == 0).then_some(())
    })
    .await;
    p.stop().await.unwrap();
    let records = store.records(&Default::default()).await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].source.dedupe_key, e.dedupe_key);
    // The dedupe key now names the record; the failure row stays as history.
    assert_eq!(
        store.lookup(&e.dedupe_key).await.unwrap(),
        Some(Known::Record(records[0].id))
    );
    assert_eq!(store.failures().await.unwrap().len(), 1);
    assert_eq!(h.queue_depth().await, 0);
    assert_eq!(dead_depth(h).await, 0);
    store.close().await;
}

/// (a) A form mail published with a 1 ms per-message TTL (AMQP
/// `expiration`) while no processor consumes: RabbitMQ dead-letters it
/// through the create queue's `x-dead-letter-exchange` with reason
/// `expired` (and drops `expiration`, so the replay does not expire again).
async fn expired_form_is_listed_and_replayable(queues: Queues) {
    let h = harness(queues).await;
    let e = lease_envelope("X-1");
    let confirm = h
        .channel
        .basic_publish(
            &h.topology.exchange,
            e.routing_key(),
            BasicPublishOptions::default(),
            &e.body,
            e.properties().with_expiration(ShortString::from("1")),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    listed_once_and_replayed_into_one_record(&h, &e, "expired").await;
}

/// (b) A consumer of the test's own takes the form mail from the create
/// queue and rejects it without requeueing: RabbitMQ dead-letters it with
/// reason `rejected`.
async fn rejected_form_is_listed_and_replayable(queues: Queues) {
    let h = harness(queues).await;
    let e = lease_envelope("R-1");
    h.publish(&e).await;
    let m = wait_for("the form in the create queue", WAIT, || async {
        h.channel
            .basic_get(&h.topology.create_queue, BasicGetOptions::default())
            .await
            .unwrap()
    })
    .await;
    assert_eq!(
        mailagent_tests::fixture::message_id(&m.properties),
        e.dedupe_key
    );
    m.acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    listed_once_and_replayed_into_one_record(&h, &e, "rejected").await;
}

#[tokio::test]
async fn classic_expired_form_is_listed_and_replayable_into_one_record() {
    expired_form_is_listed_and_replayable(Queues::Classic).await;
}

#[tokio::test]
async fn quorum_expired_form_is_listed_and_replayable_into_one_record() {
    expired_form_is_listed_and_replayable(Queues::Quorum).await;
}

#[tokio::test]
async fn classic_rejected_form_is_listed_and_replayable_into_one_record() {
    rejected_form_is_listed_and_replayable(Queues::Classic).await;
}

#[tokio::test]
async fn quorum_rejected_form_is_listed_and_replayable_into_one_record() {
    rejected_form_is_listed_and_replayable(Queues::Quorum).await;
}
