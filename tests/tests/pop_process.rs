//! The POP3 fetcher as a process: kill -9 in the middle of a 2,000-message
//! maildrop and restart loses nothing (duplicates carry the same dedupe key
//! and bytes, the maildrop ends empty with `delete`), and two replicas share
//! six configs through leases, the survivor taking over a killed replica's
//! configs.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::envelope::dedupe_key;
use mailagent_tests::maildir;
use mailagent_tests::pop_support::{self as support, Fixture};
use mailagent_tests::process;
use tokio::process::Child;

/// SIGTERM, then a graceful exit 0 within 15 s.
async fn stop(mut child: Child) {
    let status = process::stop(&mut child, Duration::from_secs(15))
        .await
        .expect("exits within 15 s after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_maildrop_then_restart_loses_nothing_and_empties_the_maildrop() {
    let fx = Fixture::new("pk9");
    let seeded: Vec<Vec<u8>> = (0..2000)
        .map(|i| maildir::message(&fx.prefix, i, 1024, i % 11 == 0))
        .collect();
    maildir::seed(&fx.env, &fx.mailbox, &seeded);
    let by_key: HashMap<String, Vec<u8>> = seeded
        .iter()
        .map(|m| (dedupe_key(&fx.mailbox, m), m.clone()))
        .collect();
    assert_eq!(by_key.len(), 2000);
    fx.plant_token().await;
    let (_, path) = fx.config(&[fx.mail_table("pk9", "POP3S", "batch-size = 100\n")]);
    let channel = fx.channel().await;
    let mut child = fx.spawn(&path, "pk9.log");
    let started = support::eventually(Duration::from_secs(60), || async {
        support::depth(&channel, &fx.queue()).await >= 300
    })
    .await;
    assert!(started, "300 messages did not arrive in time");
    child.kill().await.expect("kill -9");
    let at_kill = support::depth(&channel, &fx.queue()).await;
    assert!(at_kill < 2000, "killed mid-maildrop ({at_kill} published)");
    // No QUIT, so the server deleted nothing, not even what was confirmed.
    assert_eq!(
        fx.maildrop_len(),
        2000,
        "deleted without QUIT after kill -9"
    );

    let child = fx.spawn(&path, "pk9b.log");
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut total = 0usize;
    let end = Instant::now() + Duration::from_secs(180);
    while (seen.len() < by_key.len() || fx.maildrop_len() > 0) && Instant::now() < end {
        for e in support::drain(&channel, &fx.queue(), 500, Duration::from_secs(2)).await {
            total += 1;
            let stored = by_key
                .get(&e.dedupe_key)
                .unwrap_or_else(|| panic!("unknown dedupe key {}", e.dedupe_key));
            assert!(
                &e.body == stored,
                "a delivery (first or duplicate) carries the bytes its dedupe key names"
            );
            *seen.entry(e.dedupe_key).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 2000, "every message published at least once");
    assert_eq!(fx.maildrop_len(), 0, "the maildrop ends empty (delete)");
    // Nothing more trickles in afterwards.
    let late = support::drain(&channel, &fx.queue(), 1, Duration::from_secs(3)).await;
    assert!(late.is_empty(), "published after the maildrop emptied");
    let dup = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "kill -9 at {at_kill} published; {total} deliveries in all for 2000 messages ({dup} duplicated, same dedupe key and bytes)"
    );
    stop(child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_six_configs_and_the_survivor_takes_over_a_killed_one() {
    let fx = Fixture::new("pls");
    let port = fx.env.mail_addr("POP3S").port();
    let boxes: Vec<String> = (0..6).map(|i| format!("r{i}-{}", fx.mailbox)).collect();
    for b in &boxes {
        fx.env.grant(&fx.app, b);
        maildir::seed(&fx.env, b, &[maildir::message(b, 0, 600, false)]);
    }
    fx.plant_token().await;
    let configs: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let tables: Vec<String> = boxes
        .iter()
        .zip(&configs)
        .map(|(b, c)| fx.mail_table_for(c, b, port, "pop3s", ""))
        .collect();
    let (_, path) = fx.config(&tables);
    let channel = fx.channel().await;
    let mut children: Vec<Child> = (0..2)
        .map(|i| fx.spawn(&path, &format!("r{i}.log")))
        .collect();
    let got = support::drain(&channel, &fx.queue(), 6, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 6, "one message per config");

    let spread = support::eventually(Duration::from_secs(30), || async {
        let map = fx.lease_owners(&configs).await;
        let mut per: HashMap<&String, usize> = HashMap::new();
        for o in map.values() {
            *per.entry(o).or_default() += 1;
        }
        map.len() == 6 && per.len() == 2 && per.values().all(|n| *n == 3)
    })
    .await;
    assert!(
        spread,
        "6 configs, 2 replicas, 3 each: {:?}",
        fx.lease_owners(&configs).await
    );
    // Exactly one owner per config: the lease value is one instance id.
    let before = fx.lease_owners(&configs).await;

    let mut victim = children.remove(0);
    let victim_pid = victim.id().expect("pid");
    let victims: BTreeSet<String> = before
        .iter()
        .filter(|(_, o)| o.contains(&format!("-{victim_pid}-")))
        .map(|(c, _)| c.clone())
        .collect();
    assert_eq!(victims.len(), 3, "the victim held three configs");
    victim.kill().await.expect("kill -9");
    let killed_at = Instant::now();
    let taken = support::eventually(Duration::from_secs(20), || async {
        let map = fx.lease_owners(&configs).await;
        let distinct: BTreeSet<&String> = map.values().collect();
        map.len() == 6
            && distinct.len() == 1
            && !distinct
                .iter()
                .any(|o| o.contains(&format!("-{victim_pid}-")))
    })
    .await;
    assert!(
        taken,
        "configs taken over: {:?}",
        fx.lease_owners(&configs).await
    );
    eprintln!(
        "{} configs of the killed replica taken over in {:?}",
        victims.len(),
        killed_at.elapsed()
    );

    // Nothing lost: new mail in every mailbox arrives, and every maildrop empties.
    for b in &boxes {
        maildir::seed(&fx.env, b, &[maildir::message(b, 1, 600, false)]);
    }
    let got = support::drain(&channel, &fx.queue(), 6, Duration::from_secs(30)).await;
    let configs_seen: BTreeSet<String> = got.iter().map(|e| e.mail_config.clone()).collect();
    assert_eq!(
        configs_seen.len(),
        6,
        "new mail of every config published after the take-over"
    );
    let empty = support::eventually(Duration::from_secs(20), || async {
        boxes.iter().all(|b| fx.maildrop_len_of(b) == 0)
    })
    .await;
    assert!(empty, "every maildrop empties");
    for c in children {
        stop(c).await;
    }
}
