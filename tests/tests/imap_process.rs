//! The IMAP fetcher as a process: kill -9 in the middle of a big mailbox
//! loses nothing, SIGTERM mid-batch exits 0 quickly with exactly the
//! published messages flagged, and three replicas share nine configs and
//! take over a killed replica's configs within the lease time.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use mailagent_tests::imap_support::{self as support, Fixture};
use mailagent_tests::maildir;
use mailagent_tests::process;
use tokio::process::Child;

async fn wait_depth(channel: &lapin::Channel, queue: &str, at_least: u32, deadline: Duration) {
    let ok = support::eventually(deadline, || async {
        support::depth(channel, queue).await >= at_least
    })
    .await;
    assert!(ok, "{at_least} messages did not arrive in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_mailbox_then_restart_publishes_every_message_at_least_once() {
    let fx = Fixture::new("k9");
    let seeded: Vec<Vec<u8>> = (0..2000)
        .map(|i| maildir::message(&fx.prefix, i, 1024, false))
        .collect();
    maildir::seed(&fx.env, &fx.mailbox, &seeded);
    fx.plant_token().await;
    let (_, path) = fx.config(&[fx.mail_table("k9", &fx.mailbox, "batch-size = 100")]);
    let channel = fx.channel().await;
    let mut child = fx.spawn(&path, "k9.log");
    wait_depth(&channel, &fx.queue(), 300, Duration::from_secs(60)).await;
    child.kill().await.expect("kill -9");
    let at_kill = support::depth(&channel, &fx.queue()).await;
    assert!(at_kill < 2000, "killed mid-mailbox ({at_kill} published)");
    let mut child = fx.spawn(&path, "k9b.log");
    let expected: HashSet<String> = seeded
        .iter()
        .map(|m| common::envelope::dedupe_key(&fx.mailbox, m))
        .collect();
    let mut seen: HashMap<String, Vec<u8>> = HashMap::new();
    let end = Instant::now() + Duration::from_secs(120);
    let mut total = 0;
    while seen.len() < expected.len() && Instant::now() < end {
        for e in support::drain(&channel, &fx.queue(), 500, Duration::from_secs(2)).await {
            total += 1;
            if let Some(body) = seen.get(&e.dedupe_key) {
                assert_eq!(
                    body, &e.body,
                    "a duplicate carries the same dedupe key and bytes"
                );
            }
            seen.insert(e.dedupe_key.clone(), e.body);
        }
    }
    let keys: HashSet<String> = seen.keys().cloned().collect();
    assert_eq!(keys, expected, "every message published at least once");
    eprintln!("{total} deliveries for 2000 messages after kill -9 at {at_kill}");
    process::stop(&mut child, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_exits_0_and_flags_exactly_what_was_published() {
    let fx = Fixture::new("term");
    let seeded: Vec<Vec<u8>> = (0..2000)
        .map(|i| maildir::message(&fx.prefix, i, 1024, false))
        .collect();
    maildir::seed(&fx.env, &fx.mailbox, &seeded);
    fx.plant_token().await;
    let (_, path) = fx.config(&[fx.mail_table("term", &fx.mailbox, "batch-size = 400")]);
    let channel = fx.channel().await;
    let mut child = fx.spawn(&path, "term.log");
    wait_depth(&channel, &fx.queue(), 150, Duration::from_secs(60)).await;
    assert!(process::sigterm(child.id().expect("pid")));
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within 10 s")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");
    eprintln!("stopped in {:?}", started.elapsed());
    let n = support::depth(&channel, &fx.queue()).await as usize;
    assert!(n < 2000, "stopped mid-mailbox ({n} published)");
    let published: BTreeSet<u32> =
        support::drain(&channel, &fx.queue(), n, Duration::from_secs(20))
            .await
            .iter()
            .map(|e| match e.message_ref {
                common::envelope::MessageRef::Imap { uid, .. } => uid,
                _ => panic!("imap ref"),
            })
            .collect();
    assert_eq!(published.len(), n);
    let flags = support::flags(&fx.env, &fx.mailbox, "INBOX").await;
    let seen: BTreeSet<u32> = flags
        .iter()
        .filter(|(_, f)| f.contains("\\Seen"))
        .map(|(u, _)| *u)
        .collect();
    assert_eq!(seen, published, "flagged exactly the published messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_nine_configs_and_take_over_a_killed_one() {
    use redis::AsyncCommands;
    let fx = Fixture::new("ls");
    let boxes: Vec<String> = (0..9).map(|i| format!("l{i}-{}", fx.mailbox)).collect();
    for b in &boxes {
        fx.env.grant(&fx.app, b);
        maildir::seed(&fx.env, b, &[maildir::message(b, 0, 400, false)]);
    }
    fx.plant_token().await;
    let tables: Vec<String> = boxes
        .iter()
        .enumerate()
        .map(|(i, b)| fx.mail_table(&format!("c{i}"), b, ""))
        .collect();
    let (_, path) = fx.config(&tables);
    let channel = fx.channel().await;
    let mut children: Vec<Child> = (0..3)
        .map(|i| fx.spawn(&path, &format!("r{i}.log")))
        .collect();
    let got = support::drain(&channel, &fx.queue(), 9, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 9, "one message per config");

    let mut redis = fx.redis().await;
    let keys = fx.keys();
    let configs: Vec<String> = (0..9).map(|i| format!("c{i}")).collect();
    let spread = support::eventually(Duration::from_secs(30), || {
        let configs = &configs;
        let fx = &fx;
        async move {
            let map = fx.lease_owners(configs).await;
            let mut per: HashMap<String, usize> = HashMap::new();
            for o in map.values() {
                *per.entry(o.clone()).or_default() += 1;
            }
            map.len() == 9 && per.len() == 3 && per.values().all(|n| *n == 3)
        }
    })
    .await;
    assert!(
        spread,
        "9 configs, 3 replicas, 3 each: {:?}",
        fx.lease_owners(&configs).await
    );

    // kill -9 one replica; its configs are taken over within the lease time.
    let victim = children.remove(0);
    let victim_pid = victim.id().expect("pid");
    let mut victim = victim;
    victim.kill().await.expect("kill -9");
    let killed_at = Instant::now();
    let taken = support::eventually(Duration::from_secs(20), || {
        let configs = &configs;
        let fx = &fx;
        async move {
            let map = fx.lease_owners(configs).await;
            let distinct: BTreeSet<&String> = map.values().collect();
            map.len() == 9
                && distinct.len() == 2
                && !distinct
                    .iter()
                    .any(|o| o.contains(&format!("-{victim_pid}-")))
        }
    })
    .await;
    assert!(
        taken,
        "configs taken over: {:?}",
        fx.lease_owners(&configs).await
    );
    eprintln!("taken over in {:?}", killed_at.elapsed());
    // Nothing lost: new mail in every mailbox arrives.
    for b in &boxes {
        support::append(&fx.env, b, "INBOX", &maildir::message(b, 1, 400, false)).await;
    }
    let got = support::drain(&channel, &fx.queue(), 9, Duration::from_secs(30)).await;
    assert_eq!(
        got.len(),
        9,
        "new mail of every config published after take-over"
    );
    let _: () = redis.del(keys.fetchers("imap")).await.unwrap_or(());
    for c in &children {
        assert!(process::sigterm(c.id().expect("pid")));
    }
    for mut c in children {
        process::wait_exit(&mut c, Duration::from_secs(15)).await;
    }
}
