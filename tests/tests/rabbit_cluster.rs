//! The RabbitMQ half of §7a on a real 3-node cluster with quorum queues
//! (`scripts/services up --cluster`): `[amqp] urls` fails over when the node
//! leading `<prefix>.create` is killed with SIGKILL, the processor's poison
//! guard acts before RabbitMQ's delivery limit, and what RabbitMQ
//! dead-letters on its own is still recorded, listed and replayable.
//!
//! Every test here is named `cluster_*`: nextest runs them one at a time
//! (.config/nextest.toml), since one of them kills a node the others use.
//! Each has its own queue prefix and record store.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::envelope::Envelope;
use common::fetch::publish::AmqpLink;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use mailagent_tests::cluster::Cluster;
use mailagent_tests::env::{bin_path, Endpoints};
use mailagent_tests::forms::*;

const WAIT: Duration = Duration::from_secs(60);

/// Forms sent through the cluster while its create-queue leader dies.
const FORMS: usize = 300;

fn cluster() -> Cluster {
    Cluster::load(&Endpoints::load())
}

/// `mailagent ARGS` with the harness's configuration (all cluster nodes).
fn mailagent(h: &Harness, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(bin_path("mailagent"))
        .arg("--config")
        .arg(h.config_path_for(common::Component::Cli))
        .args(args)
        .output()
        .expect("run mailagent");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Ready messages in the dead-letter queue.
async fn dead_depth(h: &Harness) -> u32 {
    common::topology::queue_depth(&h.channel, &h.topology.dead_queue)
        .await
        .unwrap()
}

/// Ready messages in `queue`, asked over a fresh connection to any node
/// (the harness's own may have gone with a killed node).
async fn depth_via_any_node(h: &Harness, queue: &str) -> Option<u32> {
    let conn = common::connect::amqp(&h.config, "test-check").await.ok()?;
    let channel = conn.create_channel().await.ok()?;
    let depth = common::topology::queue_depth(&channel, queue).await.ok();
    let _ = conn.close(200, "checked").await;
    depth
}

/// Publishes every envelope through the fetchers' publishing kit
/// ([`AmqpLink`] and its confirm-mode publisher) as a fetcher does:
/// whatever was not confirmed when the connection failed is published
/// again on a new connection (to any node that answers). Returns how
/// many publishes it took.
async fn publish_all(link: &AmqpLink, exchange: &str, envelopes: &[Envelope]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut left: Vec<usize> = (0..envelopes.len()).collect();
    let mut attempts = 0;
    while !left.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} forms still unconfirmed after 180 s",
            left.len()
        );
        let mut publisher = match link.publisher::<usize>(exchange, 64, 16 << 20).await {
            Ok(p) => p,
            Err(_) => {
                // Pacing between reconnect rounds (every node refused).
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut confirmed = Vec::new();
        let mut failed = false;
        for &i in &left {
            attempts += 1;
            if publisher
                .publish(&envelopes[i], &envelopes[i].body, i, &mut confirmed)
                .await
                .is_err()
            {
                failed = true;
                break;
            }
        }
        if !failed && publisher.flush(&mut confirmed).await.is_err() {
            failed = true;
        }
        let done: HashSet<usize> = confirmed.iter().map(|c| c.tag).collect();
        left.retain(|i| !done.contains(i));
        if failed {
            publisher.abandon();
        } else {
            publisher.close().await;
        }
    }
    attempts
}

/// (a) Forms published through the fetch kit and processed by the form
/// processor, both on `[amqp] urls` of the 3-node cluster with quorum
/// queues, while the node leading `<prefix>.create` is killed with SIGKILL
/// and later started again: every form becomes exactly one record (counted
/// per dedupe key), none is lost, none is created twice, nothing is
/// rejected, and the queue ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_survive_kill_9_of_the_create_queue_leader() {
    let cluster = cluster();
    cluster.ensure_up().await;
    let h = Harness::on_nodes(
        StoreKind::Sqlite,
        &[],
        &["queue-type = \"quorum\""],
        &cluster.urls(),
    )
    .await;
    let store = h.store().await;
    let leader = cluster.wait_leader(&h.topology.create_queue, WAIT).await;
    let (_, members) = cluster.leader(&h.topology.create_queue).unwrap();
    assert_eq!(
        members.len(),
        3,
        "the quorum queue has a member on each node"
    );

    let envelopes: Vec<Envelope> = (0..FORMS)
        .map(|i| lease_envelope(&format!("C-{i}")))
        .collect();
    let keys: HashSet<String> = envelopes.iter().map(|e| e.dedupe_key.clone()).collect();
    assert_eq!(keys.len(), FORMS);

    let p = h.start(Default::default());
    // The publisher starts on the node that is about to die, so its
    // connection is lost mid-run; it reconnects through `[amqp] urls`.
    let config = Arc::new(h.config_for(common::Component::ImapFetcher));
    let leader_url = common::secret::SecretUrl::new(leader.url.clone());
    let conn = common::connect::amqp_node(&config, &leader_url, "test-fetcher")
        .await
        .expect("connect the publisher to the leader");
    let link = Arc::new(AmqpLink::new(config, "test-fetcher".into(), conn));
    let publishing = {
        let link = link.clone();
        let exchange = h.topology.exchange.clone();
        let envelopes = envelopes.clone();
        let store = store.clone();
        tokio::spawn(async move {
            // Chunks of 10, kept at most 60 forms ahead of the processor,
            // so that publishing lasts as long as processing does.
            let mut attempts = 0;
            let mut sent = 0;
            for chunk in envelopes.chunks(10) {
                wait_for("the processor to catch up", WAIT, || async {
                    let made = store.records(&Default::default()).await.ok()?.len();
                    (made + 60 >= sent).then_some(())
                })
                .await;
                attempts += publish_all(&link, &exchange, chunk).await;
                sent += chunk.len();
            }
            attempts
        })
    };

    // Mid-run: some forms are records, others are being published or wait
    // in the queue.
    wait_for("the first 100 records", WAIT, || async {
        let n = store.records(&Default::default()).await.ok()?.len();
        (n >= 100).then_some(())
    })
    .await;
    assert!(
        !publishing.is_finished(),
        "the kill comes while forms are being published"
    );
    cluster.kill_9(&leader).await;
    let new_leader = cluster
        .wait_new_leader(&h.topology.create_queue, &leader, WAIT)
        .await;

    let attempts = tokio::time::timeout(Duration::from_secs(200), publishing)
        .await
        .expect("publishing finishes")
        .expect("publisher task");
    assert!(attempts >= FORMS);
    cluster.start(&leader).await;

    let records = wait_records(&store, FORMS, Duration::from_secs(120)).await;
    // Quiet: nothing more arrives (a late duplicate would be acked as known).
    wait_for("an empty create queue", WAIT, || async {
        (depth_via_any_node(&h, &h.topology.create_queue).await? == 0).then_some(())
    })
    .await;
    let records = {
        let again = store.records(&Default::default()).await.unwrap();
        assert_eq!(again.len(), records.len().max(again.len()));
        again
    };
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *per_key.entry(r.source.dedupe_key.clone()).or_default() += 1;
    }
    let lost: Vec<_> = keys.iter().filter(|k| !per_key.contains_key(*k)).collect();
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    let strangers: Vec<_> = per_key.keys().filter(|k| !keys.contains(*k)).collect();
    assert!(lost.is_empty(), "{} form(s) lost", lost.len());
    assert!(twice.is_empty(), "created twice: {twice:?}");
    assert!(strangers.is_empty(), "unexpected records: {strangers:?}");
    assert_eq!(records.len(), FORMS);
    assert!(
        store.failures().await.unwrap().is_empty(),
        "no form was rejected"
    );
    assert_eq!(
        depth_via_any_node(&h, &h.topology.dead_queue).await,
        Some(0)
    );
    assert!(p.running(), "the processor survived the node's death");
    p.stop().await.unwrap();
    link.close().await;
    eprintln!(
        "{FORMS} forms, {attempts} publishes, leader {} killed, {} took over",
        leader.name, new_leader.name
    );
}

/// (b) A poison message (its processing panics) on quorum queues: the
/// processor's limit (`[form-processor] delivery-limit = 3`) fires before
/// RabbitMQ's (`[amqp] delivery-limit`, default 20): one failure row with
/// reason `poison`, one dead letter carrying it, and the replay brings the
/// mail back to a processor that now creates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_poison_on_quorum_queues_is_caught_by_our_limit_first() {
    let cluster = cluster();
    cluster.ensure_up().await;
    let h = Harness::on_nodes(
        StoreKind::Sqlite,
        &["delivery-limit = 3"],
        &["queue-type = \"quorum\""],
        &cluster.urls(),
    )
    .await;
    assert_eq!(h.config.amqp.delivery_limit, 20);
    let store = h.store().await;
    let p = h.start(form_processor::Hooks {
        panic_on_subject: Some(LEASE_SUBJECT.into()),
    });
    let e = lease_envelope("P-1");
    h.publish(&e).await;
    let failures = wait_failures(&store, 1, WAIT).await;
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].reason, "poison");
    assert_eq!(failures[0].source.dedupe_key, e.dedupe_key);
    p.stop().await.unwrap();

    let (ok, out) = mailagent(&h, &["dead-letters", "list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("#{} poison", failures[0].id)),
        "{out}"
    );
    assert!(out.contains("1 failure(s); 1 message(s) waiting"), "{out}");
    assert!(!out.contains("delivery_limit"), "{out}");

    let (ok, out) = mailagent(&h, &["dead-letters", "replay", &failures[0].id.to_string()]);
    assert!(ok, "{out}");
    let p = h.start(Default::default());
    let records = wait_records(&store, 1, WAIT).await;
    assert_eq!(records[0].source.dedupe_key, e.dedupe_key);
    assert_eq!(dead_depth(&h).await, 0);
    p.stop().await.unwrap();
}

/// (c) A message RabbitMQ dead-letters by its own delivery limit (a
/// consumer of the test's own rejects it with requeue until the quorum
/// queue's `x-delivery-limit` = 2 is spent): `mailagent dead-letters list`
/// records it as a failure with reason `delivery_limit` (once, however
/// often it is listed), and the replay makes it a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rabbitmqs_own_delivery_limit_is_listed_and_replayable() {
    let cluster = cluster();
    cluster.ensure_up().await;
    let h = Harness::on_nodes(
        StoreKind::Sqlite,
        &["delivery-limit = 1"],
        &["queue-type = \"quorum\"", "delivery-limit = 2"],
        &cluster.urls(),
    )
    .await;
    let store = h.store().await;
    let e = lease_envelope("D-1");
    h.publish(&e).await;

    // The test's own consumer: every delivery goes back to the queue.
    let channel = h.conn.create_channel().await.unwrap();
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            &h.topology.create_queue,
            "test-requeuer",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let requeuer = tokio::spawn(async move {
        let mut returned = 0;
        while let Some(Ok(d)) = consumer.next().await {
            d.acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            returned += 1;
        }
        returned
    });
    wait_for("RabbitMQ to dead-letter the message", WAIT, || async {
        (dead_depth(&h).await == 1).then_some(())
    })
    .await;
    let _ = channel.close(200, "done").await;
    let returned = requeuer.await.unwrap();
    assert!(returned >= 2, "returned {returned} times");
    assert_eq!(h.queue_depth().await, 0);
    assert!(
        store.failures().await.unwrap().is_empty(),
        "no processor ran"
    );

    let (ok, out) = mailagent(&h, &["dead-letters", "list"]);
    assert!(ok, "{out}");
    assert!(out.contains("delivery_limit"), "{out}");
    let failures = store.failures().await.unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let f = &failures[0];
    assert_eq!(f.reason, "delivery_limit");
    assert!(f.dead_lettered);
    assert_eq!(f.source.dedupe_key, e.dedupe_key);
    assert_eq!(f.source.subject, LEASE_SUBJECT);
    assert!(f.detail.contains(&h.topology.create_queue), "{}", f.detail);
    assert!(out.contains("1 failure(s); 1 message(s) waiting"), "{out}");

    // Listing again records nothing new.
    let (ok, out) = mailagent(&h, &["dead-letters", "list"]);
    assert!(ok, "{out}");
    assert_eq!(store.failures().await.unwrap().len(), 1, "{out}");
    assert_eq!(dead_depth(&h).await, 1);

    let (ok, out) = mailagent(&h, &["dead-letters", "replay", &f.id.to_string()]);
    assert!(ok, "{out}");
    assert!(out.contains("delivery_limit"), "{out}");
    let p = h.start(Default::default());
    let records = wait_records(&store, 1, WAIT).await;
    assert_eq!(records[0].source.dedupe_key, e.dedupe_key);
    assert_eq!(dead_depth(&h).await, 0);
    p.stop().await.unwrap();
}

/// `mailagent status` with `[amqp] urls` shows each node: reachable, and
/// the deployment's queues as seen through it; a killed node shows as
/// unreachable while the others still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_shows_every_node() {
    let cluster = cluster();
    cluster.ensure_up().await;
    let h = Harness::on_nodes(
        StoreKind::Sqlite,
        &[],
        &["queue-type = \"quorum\""],
        &cluster.urls(),
    )
    .await;
    h.publish(&lease_envelope("S-1")).await;
    let (ok, out) = mailagent(&h, &["status", "--json"]);
    assert!(ok, "{out}");
    let json_start = out.find('{').expect("json");
    let report: serde_json::Value = serde_json::from_str(&out[json_start..]).expect("status json");
    let nodes = report["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{out}");
    for n in nodes {
        assert_eq!(n["reachable"], true, "{n}");
        let create = n["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == h.topology.create_queue.as_str())
            .expect("create queue");
        assert_eq!(create["ready"], 1, "{n}");
    }
    assert!(
        !out.contains("guest:guest"),
        "passwords are redacted: {out}"
    );

    let victim = cluster.nodes[2].clone();
    cluster.kill_9(&victim).await;
    let (ok, out) = mailagent(&h, &["status"]);
    cluster.start(&victim).await;
    assert!(ok, "{out}");
    assert!(out.contains("RABBITMQ NODES"), "{out}");
    assert_eq!(out.matches("unreachable").count(), 1, "{out}");
}

/// Mails in the end-to-end cluster test's batch (the figure).
const E2E_BATCH: usize = mailagent_tests::e2e::BATCH;

/// (a, end to end) The whole agent as users run it — token broker, three
/// imap-fetchers, a pop-fetcher and the form processor as processes —
/// on `[amqp] urls` of the 3-node cluster with quorum queues: a batch of
/// 1,000 form mails is fetched from IMAP and POP3 mailboxes and processed
/// while the node leading `<prefix>.create` is killed with SIGKILL and
/// started again. Every form becomes exactly one record or one rejection
/// with its reason (0 lost, 0 twice: `Stack::verify`), every IMAP message
/// ends `\Seen` and the POP3 maildrops empty, and no process died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_e2e_mail_survives_kill_9_of_the_create_queue_leader() {
    use mailagent_tests::e2e::{batch, Stack};
    let cluster = cluster();
    cluster.ensure_up().await;
    let started = std::time::Instant::now();
    let stack = Stack::start_on_nodes("cle2e", &cluster.urls()).await;
    let leader = cluster.wait_leader(&stack.create_queue(), WAIT).await;

    let b = batch("K", E2E_BATCH, &stack.mailboxes);
    let total = b.expected.records() + b.expected.failures();
    stack.seed(&b);
    stack
        .wait_settled(E2E_BATCH / 5, Duration::from_secs(180))
        .await;
    let at_kill = stack.settled().await;
    cluster.kill_9(&leader).await;
    assert!(
        at_kill < total,
        "the kill came after the batch was done ({at_kill} of {total})"
    );
    let new_leader = cluster
        .wait_new_leader(&stack.create_queue(), &leader, WAIT)
        .await;
    cluster.start(&leader).await;
    // (The stack's own check channel reopens on a live node by itself.)

    let outcome = stack.verify(&b.expected, Duration::from_secs(240)).await;
    stack
        .wait_mailboxes_done([E2E_BATCH / 4, E2E_BATCH / 4], Duration::from_secs(60))
        .await;
    let restarted: Vec<String> = [
        "token-broker",
        "imap-fetcher-0",
        "imap-fetcher-1",
        "imap-fetcher-2",
        "pop-fetcher",
        "form-processor",
    ]
    .iter()
    .filter(|n| stack.starts(n) != 1)
    .map(|n| format!("{n} started {} times", stack.starts(n)))
    .collect();
    assert!(
        restarted.is_empty(),
        "a node's death killed a process: {restarted:?}"
    );
    eprintln!(
        "[cluster] {E2E_BATCH} mails, leader {} killed at {at_kill} of {total} settled, {} took over: {outcome:?} in {:?}",
        leader.name,
        new_leader.name,
        started.elapsed()
    );
    stack.shutdown().await;
}
