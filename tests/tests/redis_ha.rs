//! The whole agent on replicated Redis (§7a, issue 14): through Sentinel and
//! on a Redis Cluster, each with a primary killed (kill -9) while mail is
//! being handed over. The processes — token-broker, three imap-fetchers, a
//! pop-fetcher and a form-processor, from the built binaries — follow the
//! failover without a restart, and the e2e checks hold exactly: every record
//! once per dedupe key, every rejection once, 0 lost.
//!
//! The servers are those of `scripts/services up --cluster`
//! (`scripts/services.d/redis-ha.sh`): a primary + replica with three
//! Sentinels, and a 3-primary Redis Cluster with a replica each. Every test
//! here is named `cluster_*`, so nextest runs them one at a time
//! (`.config/nextest.toml`): they kill shared nodes. Each one starts the
//! nodes it killed again and waits until they caught up. (The password test
//! runs a private primary and Sentinel of its own: the shared ones have no
//! passwords.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::envelope::dedupe_key;
use common::token::TokenClient;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use mailagent_tests::e2e::{
    batch, poll_until, Expected, RedisTarget, Stack, StackOptions, PROFILE,
};
use mailagent_tests::env::Endpoints;
use mailagent_tests::redis_ha::{self, port_of};

/// Forms per run: enough that the kill lands while mail is in flight.
const FORMS: usize = 400;

/// How long the processing of one batch may take.
const BATCH_DEADLINE: Duration = Duration::from_secs(240);

/// Every process of a stack.
const PROCESSES: [&str; 6] = [
    "token-broker",
    "imap-fetcher-0",
    "imap-fetcher-1",
    "imap-fetcher-2",
    "pop-fetcher",
    "form-processor",
];

/// Asserts that no process of `stack` was restarted: they followed the
/// failover by themselves.
fn assert_no_restart(stack: &Stack) {
    for name in PROCESSES {
        assert_eq!(
            stack.starts(name),
            1,
            "{name} was restarted (logs in {})",
            stack.logs().display()
        );
    }
}

/// A forced-refresh request (pub/sub, §3) reaches the broker: a token
/// issued a moment ago is replaced within seconds of the request, long
/// before its scheduled refresh (lifetime 20 s, lead 4 s). The request is
/// repeated until then: one published while the broker re-subscribes is
/// lost, as with one server.
async fn assert_refresh_request_served(stack: &Stack) {
    let tokens = TokenClient::new(
        stack.redis.clone(),
        stack.keys(),
        &stack.config.token_broker.encryption,
    );
    poll_until(
        "a token issued within the last second",
        Duration::from_secs(40),
        Duration::from_millis(100),
        || async {
            let now = common::heartbeat::now_secs();
            tokens
                .stored(PROFILE)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| now.saturating_sub(s.issued_at) <= 1)
        },
    )
    .await;
    let failed = tokens
        .current(PROFILE)
        .await
        .expect("token")
        .expect("a current token");
    let asked = Instant::now();
    poll_until(
        "the broker to replace the token on request",
        Duration::from_secs(8),
        Duration::from_millis(500),
        || async {
            let _ = tokens.report_failure(PROFILE, &failed).await;
            tokens
                .current(PROFILE)
                .await
                .ok()
                .flatten()
                .is_some_and(|t| t.fingerprint != failed.fingerprint)
        },
    )
    .await;
    eprintln!(
        "[redis-ha] forced refresh served {:?} after the request",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_sentinel_failover_is_followed_without_restart() {
    let started = Instant::now();
    let env = Endpoints::load();
    redis_ha::ensure_up(&env).await;
    let stack = Stack::start_with(
        "rha-sentinel",
        StackOptions {
            redis: RedisTarget::Sentinel,
            ..Default::default()
        },
    )
    .await;
    let old = redis_ha::sentinel_primary(&env).await.expect("a primary");
    assert!(
        stack
            .status()
            .await
            .contains(&format!("primary 127.0.0.1:{old} (discovered)")),
        "status names the primary"
    );

    let forms = batch("A", FORMS, &stack.mailboxes);
    stack.seed(&forms);
    stack.wait_settled(FORMS / 5, BATCH_DEADLINE).await;
    redis_ha::kill_9(&env, old).await;
    let at_kill = stack.settled().await;
    eprintln!("[redis-ha] primary killed with {at_kill} of {FORMS} forms settled");
    assert!(
        at_kill < FORMS,
        "the kill landed while forms were in flight"
    );
    let new = redis_ha::wait_sentinel_failover(&env, old).await;
    redis_ha::start(&env, old).await;

    let outcome = stack.verify(&forms.expected, BATCH_DEADLINE).await;
    eprintln!("[redis-ha] sentinel: {outcome:?}");
    assert_refresh_request_served(&stack).await;
    assert_no_restart(&stack);
    assert!(
        stack
            .status()
            .await
            .contains(&format!("primary 127.0.0.1:{new} (discovered)")),
        "status names the new primary"
    );

    redis_ha::wait_replica_synced(old, Duration::from_secs(30)).await;
    stack.shutdown().await;
    eprintln!("[redis-ha] sentinel failover run: {:?}", started.elapsed());
}

/// A checkpoint written to the primary and lost in the failover (the
/// replica never received it) makes the fetchers hand the same mail over
/// again — duplicates the processor absorbs — and never skips mail.
///
/// The replica is cut off first: the primary refuses it `PSYNC` (an ACL
/// rule) and its link is killed, so nothing written after that reaches it.
/// A second batch is then handed over completely (checkpoints advanced on
/// the primary only), the primary is killed, Sentinel promotes the stale
/// replica, and a third batch arrives after the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_sentinel_lost_checkpoint_redelivers_never_skips() {
    let env = Endpoints::load();
    redis_ha::ensure_up(&env).await;
    let stack = Stack::start_with(
        "rha-lost",
        StackOptions {
            redis: RedisTarget::Sentinel,
            ..Default::default()
        },
    )
    .await;
    let keys = stack.keys();

    // Every publish, also to a queue of the test's own.
    let audit = format!("{}.audit", stack.prefix);
    let channel = stack.channel().await;
    channel
        .queue_declare(
            &audit,
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the audit queue");
    channel
        .queue_bind(
            &audit,
            &format!("{}.incoming", stack.prefix),
            common::config::Action::Create.routing_key(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the audit queue");

    let first = batch("A", 40, &stack.mailboxes);
    stack.seed(&first);
    stack.verify(&first.expected, BATCH_DEADLINE).await;

    let primary = redis_ha::sentinel_primary(&env).await.expect("a primary");
    let replica = env
        .get("MAILAGENT_TEST_SENTINEL_DATA_NODES")
        .split(',')
        .map(port_of)
        .find(|p| *p != primary)
        .expect("a replica");
    let last_uid = |port: u16, config: &str| {
        let key = keys.checkpoint(config);
        async move {
            let cp: HashMap<String, String> =
                redis_ha::query(port, redis::cmd("HGETALL").arg(&key))
                    .await
                    .unwrap_or_default();
            cp.get("last-uid")
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        }
    };
    redis_ha::wait_replica_synced(replica, Duration::from_secs(10)).await;
    let synced = last_uid(replica, &stack.configs[0]).await;
    assert!(synced > 0, "the replica holds the first batch's checkpoint");

    // Cut the replica off.
    let _: Option<String> = redis_ha::query(
        primary,
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("-psync")
            .arg("-sync"),
    )
    .await;
    let _: Option<i64> = redis_ha::query(
        primary,
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
    )
    .await;
    poll_until(
        "the replica's link down",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            redis_ha::replication(replica)
                .await
                .is_some_and(|r| r.get("master_link_status").map(String::as_str) == Some("down"))
        },
    )
    .await;

    let second = batch("B", 16, &stack.mailboxes);
    stack.seed(&second);
    let mut all = Expected::default();
    all.extend(&first.expected);
    all.extend(&second.expected);
    let total = all.records() + all.failures();
    stack.wait_settled(total, BATCH_DEADLINE).await;
    // Handed over completely: the checkpoints reached the batch's last UID.
    for (b, config) in stack.configs[..2].iter().enumerate() {
        let top = (first.mails[b].len() + second.mails[b].len()) as u32;
        poll_until(
            "the IMAP checkpoints past the second batch on the primary",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async { last_uid(primary, config).await >= top },
        )
        .await;
    }
    let on_replica = last_uid(replica, &stack.configs[0]).await;
    assert_eq!(on_replica, synced, "the replica missed the new checkpoint");

    redis_ha::kill_9(&env, primary).await;
    let new = redis_ha::wait_sentinel_failover(&env, primary).await;
    assert_eq!(new, replica, "Sentinel promoted the stale replica");
    redis_ha::start(&env, primary).await;

    let third = batch("C", 16, &stack.mailboxes);
    stack.seed(&third);
    all.extend(&third.expected);
    let outcome = stack.verify(&all, BATCH_DEADLINE).await;
    eprintln!("[redis-ha] lost checkpoint: {outcome:?}");

    // The second batch's IMAP mail was handed over again.
    let mut published: HashMap<String, usize> = HashMap::new();
    while let Some(m) = channel
        .basic_get(&audit, BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        *published
            .entry(mailagent_tests::fixture::message_id(&m.properties))
            .or_default() += 1;
        m.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let mailboxes = &stack.mailboxes;
    let imap_second: Vec<String> = (0..2)
        .flat_map(|b| {
            second.mails[b]
                .iter()
                .map(move |raw| dedupe_key(&mailboxes[b], raw))
        })
        .collect();
    let redelivered = imap_second
        .iter()
        .filter(|k| published.get(*k).copied().unwrap_or(0) >= 2)
        .count();
    assert_eq!(
        redelivered,
        imap_second.len(),
        "every IMAP mail whose checkpoint was lost is published again"
    );
    for b in 0..4 {
        for raw in third.mails[b].iter().chain(&first.mails[b]) {
            let key = dedupe_key(&stack.mailboxes[b], raw);
            assert!(published.contains_key(&key), "{key} never published");
        }
    }
    assert_no_restart(&stack);

    redis_ha::wait_replica_synced(primary, Duration::from_secs(30)).await;
    let _ = channel.queue_delete(&audit, Default::default()).await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_whole_agent_on_redis_cluster_survives_a_primary_kill() {
    let started = Instant::now();
    let env = Endpoints::load();
    redis_ha::ensure_up(&env).await;
    let nodes = redis_ha::cluster_nodes(&env);
    // The primary serving the tokens (hash tag `{tok.e2e}`, whatever the
    // prefix) is listed first: the broker's refresh subscription starts on
    // it, so its kill also moves the subscription to another node.
    let slot = redis_ha::key_slot(port_of(&nodes[0]), &format!("{{tok.{PROFILE}}}")).await;
    let old = redis_ha::cluster_primary_of(&env, slot)
        .await
        .expect("a primary for the token slot");
    let mut ordered: Vec<String> = nodes
        .iter()
        .filter(|n| port_of(n) == old)
        .cloned()
        .collect();
    ordered.extend(nodes.iter().filter(|n| port_of(n) != old).cloned());
    let stack = Stack::start_with(
        "rha-cluster",
        StackOptions {
            redis: RedisTarget::Cluster(ordered),
            ..Default::default()
        },
    )
    .await;

    let channel = stack.keys().token_refresh_channel();
    let subscribers = || async {
        let (_, n): (String, i64) =
            redis_ha::query(old, redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel))
                .await
                .unwrap_or_default();
        n
    };
    poll_until(
        "the broker subscribed on the first node",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { subscribers().await == 1 },
    )
    .await;
    let report = stack.status().await;
    assert_eq!(
        report.matches("cluster node 127.0.0.1:").count(),
        6,
        "status lists every Cluster node:\n{report}"
    );

    let forms = batch("A", FORMS, &stack.mailboxes);
    stack.seed(&forms);
    stack.wait_settled(FORMS / 5, BATCH_DEADLINE).await;
    redis_ha::kill_9(&env, old).await;
    let at_kill = stack.settled().await;
    eprintln!("[redis-ha] primary killed with {at_kill} of {FORMS} forms settled");
    assert!(
        at_kill < FORMS,
        "the kill landed while forms were in flight"
    );
    let new = redis_ha::wait_cluster_failover(&env, slot, old).await;
    redis_ha::start(&env, old).await;

    let outcome = stack.verify(&forms.expected, BATCH_DEADLINE).await;
    eprintln!("[redis-ha] cluster: {outcome:?} (token slot {slot} now on {new})");
    // A script the slot's node does not know (flushed everywhere, as on a
    // promoted replica that never saw it): NOSCRIPT, then SCRIPT LOAD, then
    // EVALSHA on the key's node — as the lease and checkpoint scripts run.
    for node in &nodes {
        let _: Option<String> =
            redis_ha::query(port_of(node), redis::cmd("SCRIPT").arg("FLUSH")).await;
    }
    let key = format!("{}:{{mail.probe}}:k", stack.prefix);
    let echoed: String = redis::Script::new("return KEYS[1]")
        .key(&key)
        .invoke_async(&mut stack.redis.clone())
        .await
        .expect("script after NOSCRIPT on the Cluster");
    assert_eq!(echoed, key);
    // The poison guard's MULTI/INCR/EXPIRE/EXEC goes to the key's node (a
    // failure there is only a warning in the processor): as it sends it.
    let key = stack.keys().deliveries("probe");
    let mut r = stack.redis.clone();
    for expected in 1..=2u64 {
        let (n, _): (u64, bool) = redis::pipe()
            .atomic()
            .incr(&key, 1u64)
            .expire(&key, 60)
            .query_async(&mut r)
            .await
            .expect("MULTI/EXEC on the Cluster");
        assert_eq!(n, expected);
    }
    assert_refresh_request_served(&stack).await;
    assert_no_restart(&stack);

    redis_ha::wait_replica_synced(old, Duration::from_secs(30)).await;
    stack.shutdown().await;
    eprintln!("[redis-ha] cluster failover run: {:?}", started.elapsed());
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `[redis] sentinel-password` and `password` reach the Sentinel and the
/// data node, and neither shows in the summary or in an error. Runs a
/// private password-protected primary and Sentinel (the shared topology
/// has no passwords).
#[tokio::test]
async fn cluster_sentinel_with_passwords_uses_both_and_prints_neither() {
    const NODE_PW: &str = "node-pw-never-printed";
    const SENTINEL_PW: &str = "sentinel-pw-never-printed";
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, sentinel) = (free_port(), free_port());
    let spawn = |args: Vec<String>| {
        tokio::process::Command::new("redis-server")
            .args(args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server")
    };
    let _node = spawn(
        [
            "--bind",
            "127.0.0.1",
            "--port",
            &node.to_string(),
            "--save",
            "",
            "--requirepass",
            NODE_PW,
        ]
        .map(String::from)
        .to_vec(),
    );
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "bind 127.0.0.1\nport {sentinel}\ndir {}\nrequirepass {SENTINEL_PW}\n\
             sentinel monitor pw 127.0.0.1 {node} 1\nsentinel auth-pass pw {NODE_PW}\n",
            dir.path().display()
        ),
    )
    .expect("sentinel.conf");
    let _sentinel = spawn(vec![conf.display().to_string(), "--sentinel".into()]);

    let env = Endpoints::load();
    let mut cfg = mailagent_tests::harness::TestConfig::new(&env);
    cfg.toml = cfg.toml.replacen(
        &format!("url = \"{}\"\n", env.redis_url()),
        &format!(
            "sentinels = [\"redis://127.0.0.1:{sentinel}\"]\nmaster-name = \"pw\"\n\
             sentinel-password = \"{SENTINEL_PW}\"\npassword = \"{NODE_PW}\"\n"
        ),
        1,
    );
    let config = cfg.load(common::Component::Cli);
    assert!(
        !config.summary().contains(NODE_PW) && !config.summary().contains(SENTINEL_PW),
        "{}",
        config.summary()
    );
    assert!(!format!("{config:?}").contains(NODE_PW));

    // The primary is found (the Sentinel may need a moment to reach it).
    let handle = std::sync::Mutex::new(None);
    poll_until(
        "the primary found through the password-protected Sentinel",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let opened = common::connect::redis(&config).await.ok();
            let ok = opened.is_some();
            *handle.lock().unwrap() = opened;
            ok
        },
    )
    .await;
    let mut r = handle.into_inner().unwrap().expect("handle");
    let () = redis::cmd("SET")
        .arg("pw-probe")
        .arg("v")
        .query_async(&mut r)
        .await
        .expect("SET through the handle");
    let direct: Option<String> =
        redis::Client::open(format!("redis://:{NODE_PW}@127.0.0.1:{node}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("direct")
            .send_packed_command(redis::cmd("GET").arg("pw-probe"))
            .await
            .ok()
            .and_then(|v| redis::from_redis_value(&v).ok());
    assert_eq!(direct.as_deref(), Some("v"), "the write reached the node");
    assert_eq!(
        r.describe().await.expect("describe"),
        vec![format!(
            "sentinel master pw: primary 127.0.0.1:{node} (discovered)"
        )]
    );

    // A wrong Sentinel password: refused, and no password in the error.
    let mut wrong = config.clone();
    wrong.redis.sentinel_password = Some(common::Secret::new("wrong-pw-never-printed"));
    let err = common::connect::redis(&wrong)
        .await
        .expect_err("a wrong Sentinel password is refused");
    let text = format!("{err} {err:?}");
    for pw in [NODE_PW, SENTINEL_PW, "wrong-pw-never-printed"] {
        assert!(!text.contains(pw), "{text}");
    }
}
