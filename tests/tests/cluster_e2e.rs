//! The whole agent beyond one machine (§7a, issue 14), on every
//! replicated engine at once: quorum queues on the 3-node RabbitMQ cluster,
//! Redis through Sentinel (or a Redis Cluster), and two form-processors on
//! one PostgreSQL database, with three imap-fetchers and two pop-fetchers —
//! every process a separate binary, as users run them.
//!
//! Two batches of 1,000 forms each (the e2e mix of `mailagent_tests::e2e`:
//! valid forms, refused senders, repeated unique ids). During the first,
//! the RabbitMQ node leading `<prefix>.create` and the Redis primary are
//! killed with SIGKILL (the queue elects a new leader, Sentinel promotes the
//! replica) and brought back; during the second, one processor and one
//! fetcher are killed with SIGKILL. After each batch the checks of
//! `Stack::verify` hold exactly: every form is one record or one rejection
//! (counted per dedupe key), 0 lost, 0 twice.
//!
//! The servers are those of `scripts/services up --cluster`; the tests are
//! named `cluster_*`, so nextest runs them one at a time
//! (`.config/nextest.toml`): they kill shared nodes, and start again what
//! they killed.

use std::time::{Duration, Instant};

use mailagent_tests::cluster::Cluster;
use mailagent_tests::e2e::{batch, Expected, RedisTarget, Stack, StackOptions, BATCH};
use mailagent_tests::env::Endpoints;
use mailagent_tests::forms::StoreKind;
use mailagent_tests::redis_ha::{self, port_of};

/// How long the processing of one batch may take.
const BATCH_DEADLINE: Duration = Duration::from_secs(300);

/// How long a quorum leader election or a node restart may take.
const NODE_WAIT: Duration = Duration::from_secs(60);

/// Every process of the stack: what `kill_9` names.
const PROCESSES: [&str; 8] = [
    "token-broker",
    "imap-fetcher-0",
    "imap-fetcher-1",
    "imap-fetcher-2",
    "pop-fetcher-0",
    "pop-fetcher-1",
    "form-processor-0",
    "form-processor-1",
];

/// The stack of this file on `redis`: 3 imap-fetchers, 2 pop-fetchers, 2
/// processors on PostgreSQL, quorum queues on the RabbitMQ cluster.
async fn start(label: &str, rabbit: &Cluster, redis: RedisTarget) -> Stack {
    rabbit.ensure_up().await;
    redis_ha::ensure_up(&Endpoints::load()).await;
    Stack::start_with(
        label,
        StackOptions {
            imap_fetchers: 3,
            pop_fetchers: 2,
            processors: 2,
            store: StoreKind::Postgres,
            amqp_nodes: rabbit.urls(),
            redis,
            ..Default::default()
        },
    )
    .await
}

/// Batch 1 with the node kills: once a tenth of it is settled, the
/// RabbitMQ node leading the create queue and the Redis primary `primary`
/// (killed by `kill_redis`, which waits for its replacement and returns
/// it) die at once; then both come back. Returns the batch's expectations.
async fn first_batch_with_node_kills<F, Fut>(
    stack: &Stack,
    rabbit: &Cluster,
    primary: u16,
    kill_redis: F,
) -> Expected
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let env = Endpoints::load();
    let queue = stack.create_queue();
    // Looked up before the mail arrives: rabbitmqctl takes a second or two.
    let leader = rabbit.wait_leader(&queue, NODE_WAIT).await;
    let first = batch("A", BATCH, &stack.mailboxes);
    stack.seed(&first);
    stack.wait_settled(BATCH / 10, BATCH_DEADLINE).await;
    rabbit.kill_9(&leader).await;
    let at = stack.settled().await;
    let promoted = kill_redis().await;
    assert!(
        at < BATCH,
        "the kills landed during the batch ({at} settled)"
    );
    let next = rabbit.wait_new_leader(&queue, &leader, NODE_WAIT).await;
    eprintln!(
        "[cluster-e2e] at {at} settled: killed {} (leader of {queue}; {} leads now) and Redis primary {primary} ({promoted} took over)",
        leader.name, next.name
    );
    rabbit.start(&leader).await;
    redis_ha::start(&env, primary).await;
    let outcome = stack.verify(&first.expected, BATCH_DEADLINE).await;
    eprintln!("[cluster-e2e] batch 1 with node kills: {outcome:?}");
    first.expected
}

/// The second batch, with one processor and one fetcher killed while it is
/// being processed (both restarted after a second, as compose would).
async fn second_batch_with_process_kills(stack: &Stack, first: &Expected) -> Expected {
    let second = batch("B", BATCH, &stack.mailboxes);
    let mut all = Expected::default();
    all.extend(first);
    all.extend(&second.expected);
    let before = stack.settled().await;
    stack.seed(&second);
    stack
        .wait_settled(before + BATCH / 10, BATCH_DEADLINE)
        .await;
    stack.kill_9("form-processor-0", Some(Duration::from_secs(1)));
    stack.wait_settled(before + BATCH / 4, BATCH_DEADLINE).await;
    stack.kill_9("imap-fetcher-1", Some(Duration::from_secs(1)));
    let at = stack.settled().await - before;
    assert!(
        at < BATCH,
        "the kills landed during the batch ({at} settled)"
    );
    let outcome = stack.verify(&all, BATCH_DEADLINE).await;
    eprintln!("[cluster-e2e] batch 2 with a processor and a fetcher killed: {outcome:?}");
    all
}

/// Batch 2 (a processor and a fetcher die), then the mailboxes are
/// checked empty or `\Seen`, only the killed processes restarted, the
/// Redis node `killed` caught up again, and the stack shut down.
async fn second_batch_and_end(
    stack: Stack,
    first: &Expected,
    killed: u16,
    label: &str,
    started: Instant,
) {
    second_batch_with_process_kills(&stack, first).await;
    stack
        .wait_mailboxes_done([BATCH / 2, BATCH / 2], Duration::from_secs(60))
        .await;
    assert_only_killed_restarted(&stack);
    redis_ha::wait_replica_synced(killed, Duration::from_secs(30)).await;
    stack.shutdown().await;
    eprintln!("[cluster-e2e] {label} run: {:?}", started.elapsed());
}

/// Asserts that only the processes this file kills were started again:
/// node failovers are followed in process.
fn assert_only_killed_restarted(stack: &Stack) {
    for name in PROCESSES {
        let expected = match name {
            "form-processor-0" | "imap-fetcher-1" => 2,
            _ => 1,
        };
        assert_eq!(
            stack.starts(name),
            expected,
            "{name} started {} times (logs in {})",
            stack.starts(name),
            stack.logs().display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_e2e_on_rabbitmq_cluster_sentinel_and_postgres_survives_every_kill() {
    let started = Instant::now();
    let env = Endpoints::load();
    let rabbit = Cluster::load(&env);
    let stack = start("cle2e-s", &rabbit, RedisTarget::Sentinel).await;

    // Status against the cluster: every node's queues, the discovered primary.
    let primary = redis_ha::sentinel_primary(&env).await.expect("a primary");
    let report = stack.status().await;
    assert!(report.contains("RABBITMQ NODES"), "{report}");
    for node in &rabbit.nodes {
        let port = port_of(&node.url);
        assert!(
            report.contains(&format!("127.0.0.1:{port}")),
            "status shows node {}:\n{report}",
            node.name
        );
    }
    assert!(
        report.contains(&format!("primary 127.0.0.1:{primary} (discovered)")),
        "status names the Sentinel-discovered primary:\n{report}"
    );

    // Batch 1: the create queue's leader node and the Redis primary die.
    let first = first_batch_with_node_kills(&stack, &rabbit, primary, || async {
        redis_ha::kill_9(&env, primary).await;
        redis_ha::wait_sentinel_failover(&env, primary).await
    })
    .await;
    let promoted = redis_ha::sentinel_primary(&env).await.expect("a primary");
    assert!(
        stack
            .status()
            .await
            .contains(&format!("primary 127.0.0.1:{promoted} (discovered)")),
        "status names the promoted primary"
    );

    second_batch_and_end(stack, &first, primary, "sentinel", started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_e2e_on_rabbitmq_cluster_and_redis_cluster_survives_every_kill() {
    let started = Instant::now();
    let env = Endpoints::load();
    let rabbit = Cluster::load(&env);
    let nodes = redis_ha::cluster_nodes(&env);
    // The primary serving this stack's leases and checkpoints for the
    // first IMAP config is the one killed.
    let stack = start("cle2e-c", &rabbit, RedisTarget::Cluster(nodes.clone())).await;
    let key = stack.keys().lease(&stack.configs[0]);
    let slot = redis_ha::key_slot(port_of(&nodes[0]), &key).await;
    let primary = redis_ha::cluster_primary_of(&env, slot)
        .await
        .expect("a primary for the lease slot");

    // Batch 1: the create queue's leader node and a Redis primary die.
    let first = first_batch_with_node_kills(&stack, &rabbit, primary, || async {
        redis_ha::kill_9(&env, primary).await;
        redis_ha::wait_cluster_failover(&env, slot, primary).await
    })
    .await;

    second_batch_and_end(stack, &first, primary, "redis cluster", started).await;
}
