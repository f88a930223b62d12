//! The Redis Sentinel and Redis Cluster of `scripts/services up --cluster`
//! (`scripts/services.d/redis-ha.sh`), seen from a test: which node is the
//! primary now, kill -9 a node, start it again, wait until a replica was
//! promoted or a node has caught up.
//!
//! Each node lives in `$MAILAGENT_TEST_REDIS_HA_DIR/node-<port>/` with its
//! pid file and a `start` script. The tests that use these run one at a time
//! (their names start with `cluster_`, see `.config/nextest.toml`), and each
//! leaves the topology healthy again: every node it killed is started and
//! has caught up with its primary.

use std::path::PathBuf;
use std::time::Duration;

use crate::e2e::poll_until;
use crate::env::Endpoints;

/// How long a failover (Sentinel or Cluster) may take.
pub const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

/// The Sentinels' URLs.
pub fn sentinels(env: &Endpoints) -> Vec<String> {
    split(env.get("MAILAGENT_TEST_SENTINELS"))
}

/// The Sentinels' name of the primary.
pub fn master_name(env: &Endpoints) -> String {
    env.get("MAILAGENT_TEST_SENTINEL_MASTER").to_string()
}

/// The Redis Cluster nodes' URLs.
pub fn cluster_nodes(env: &Endpoints) -> Vec<String> {
    split(env.get("MAILAGENT_TEST_REDIS_CLUSTER"))
}

fn split(list: &str) -> Vec<String> {
    list.split(',').map(str::to_string).collect()
}

fn node_dir(env: &Endpoints, port: u16) -> PathBuf {
    PathBuf::from(env.get("MAILAGENT_TEST_REDIS_HA_DIR")).join(format!("node-{port}"))
}

/// The port of a `redis://127.0.0.1:PORT` URL.
pub fn port_of(url: &str) -> u16 {
    url.parse::<url::Url>()
        .ok()
        .and_then(|u| u.port())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// One command to the node on `port`; `None` when it does not answer.
pub async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    tokio::time::timeout(Duration::from_secs(3), async {
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        cmd.query_async::<T>(&mut c).await.ok()
    })
    .await
    .ok()
    .flatten()
}

/// The primary's port as the first Sentinel that answers names it.
pub async fn sentinel_primary(env: &Endpoints) -> Option<u16> {
    for s in sentinels(env) {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("get-master-addr-by-name").arg(master_name(env));
        if let Some((_, port)) = query::<(String, u16)>(port_of(&s), &cmd).await {
            return Some(port);
        }
    }
    None
}

/// `INFO replication` of the node on `port` as `field → value`.
pub async fn replication(port: u16) -> Option<std::collections::HashMap<String, String>> {
    let info: String = query(port, redis::cmd("INFO").arg("replication")).await?;
    Some(
        info.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect(),
    )
}

/// kill -9 the node on `port` and waits until it is gone.
pub async fn kill_9(env: &Endpoints, port: u16) {
    let pid_file = node_dir(env, port).join("redis.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .expect("pid");
    assert!(crate::process::signal("KILL", pid), "kill -9 {pid}");
    eprintln!("[redis-ha] kill -9 redis node {port} (pid {pid})");
    poll_until(
        &format!("redis node {port} gone"),
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { query::<String>(port, &redis::cmd("PING")).await.is_none() },
    )
    .await;
}

/// Starts the node on `port` again (its own config: it rejoins as it was
/// told by Sentinel or the Cluster) and waits until it answers.
pub async fn start(env: &Endpoints, port: u16) {
    let script = node_dir(env, port).join("start");
    let status = std::process::Command::new(&script)
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(status.success(), "{} failed", script.display());
    poll_until(
        &format!("redis node {port} answering"),
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async { query::<String>(port, &redis::cmd("PING")).await.is_some() },
    )
    .await;
    eprintln!("[redis-ha] started redis node {port} again");
}

/// Waits until the node on `port` is a replica whose link to its primary is
/// up (it caught up after a restart).
pub async fn wait_replica_synced(port: u16, within: Duration) {
    poll_until(
        &format!("redis node {port} a replica in sync"),
        within,
        Duration::from_millis(200),
        || async {
            replication(port).await.is_some_and(|r| {
                r.get("role").map(String::as_str) == Some("slave")
                    && r.get("master_link_status").map(String::as_str) == Some("up")
                    && r.get("master_sync_in_progress").map(String::as_str) == Some("0")
            })
        },
    )
    .await;
}

/// Waits until every Sentinel names a primary other than `old` that says
/// it is a master; returns its port.
pub async fn wait_sentinel_failover(env: &Endpoints, old: u16) -> u16 {
    let new = std::cell::Cell::new(0);
    poll_until(
        &format!("Sentinel to promote a replica of {old}"),
        FAILOVER_DEADLINE,
        Duration::from_millis(200),
        || async {
            let mut named = Vec::new();
            for s in sentinels(env) {
                let mut cmd = redis::cmd("SENTINEL");
                cmd.arg("get-master-addr-by-name").arg(master_name(env));
                named.push(query::<(String, u16)>(port_of(&s), &cmd).await.map(|a| a.1));
            }
            let Some(Some(first)) = named.first().copied() else {
                return false;
            };
            if first == old || named.iter().any(|n| *n != Some(first)) {
                return false;
            }
            let master = replication(first)
                .await
                .is_some_and(|r| r.get("role").map(String::as_str) == Some("master"));
            new.set(first);
            master
        },
    )
    .await;
    let new = new.get();
    eprintln!("[redis-ha] Sentinel promoted {new} (was {old})");
    new
}

/// The Cluster's slot of `key`, asked of the node on `port`.
pub async fn key_slot(port: u16, key: &str) -> u16 {
    query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
        .await
        .expect("CLUSTER KEYSLOT")
}

/// The port of the Cluster primary serving `slot`, as the first node that
/// answers sees it (`None` while no live primary serves it).
pub async fn cluster_primary_of(env: &Endpoints, slot: u16) -> Option<u16> {
    for node in cluster_nodes(env) {
        let Some(nodes) = query::<String>(port_of(&node), redis::cmd("CLUSTER").arg("NODES")).await
        else {
            continue;
        };
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let addr = f[1].split('@').next().unwrap_or_default();
                return addr.rsplit(':').next().and_then(|p| p.parse().ok());
            }
        }
        return None;
    }
    None
}

/// Waits until a primary other than `old` serves `slot` and the Cluster
/// says `cluster_state:ok`; returns its port.
pub async fn wait_cluster_failover(env: &Endpoints, slot: u16, old: u16) -> u16 {
    let new = std::cell::Cell::new(0);
    poll_until(
        &format!("the Cluster to promote the replica of {old}"),
        FAILOVER_DEADLINE,
        Duration::from_millis(200),
        || async {
            match cluster_primary_of(env, slot).await {
                Some(p) if p != old => {
                    let info: Option<String> = query(p, redis::cmd("CLUSTER").arg("INFO")).await;
                    new.set(p);
                    info.is_some_and(|i| i.contains("cluster_state:ok"))
                }
                _ => false,
            }
        },
    )
    .await;
    let new = new.get();
    eprintln!("[redis-ha] Cluster promoted {new} for slot {slot} (was {old})");
    new
}

/// Makes both topologies whole again before a test kills anything: every
/// node that does not answer (one a failed test killed and did not start
/// again) is started, then this waits until the Sentinels name a live
/// primary with a replica in sync and the Cluster has three primaries with
/// a replica each and says `cluster_state:ok`.
pub async fn ensure_up(env: &Endpoints) {
    let data = split(env.get("MAILAGENT_TEST_SENTINEL_DATA_NODES"));
    let nodes: Vec<String> = sentinels(env)
        .into_iter()
        .chain(data.iter().cloned())
        .chain(cluster_nodes(env))
        .collect();
    for node in &nodes {
        let port = port_of(node);
        if query::<String>(port, &redis::cmd("PING")).await.is_none() {
            eprintln!("[redis-ha] node {port} is down: starting it");
            start(env, port).await;
        }
    }
    poll_until(
        "the Sentinel primary with a replica in sync",
        FAILOVER_DEADLINE * 2,
        Duration::from_millis(250),
        || async {
            let Some(primary) = sentinel_primary(env).await else {
                return false;
            };
            let synced = |r: Option<std::collections::HashMap<String, String>>| {
                r.is_some_and(|r| {
                    r.get("role").map(String::as_str) == Some("slave")
                        && r.get("master_link_status").map(String::as_str) == Some("up")
                        && r.get("master_port").and_then(|p| p.parse().ok()) == Some(primary)
                })
            };
            for node in data.iter().filter(|n| port_of(n) != primary) {
                if !synced(replication(port_of(node)).await) {
                    return false;
                }
            }
            replication(primary)
                .await
                .is_some_and(|r| r.get("role").map(String::as_str) == Some("master"))
        },
    )
    .await;
    poll_until(
        "the Redis Cluster with three primaries, a replica each, state ok",
        FAILOVER_DEADLINE * 2,
        Duration::from_millis(250),
        || async {
            let mut replicas = 0;
            for node in cluster_nodes(env) {
                let port = port_of(&node);
                let ok: Option<String> = query(port, redis::cmd("CLUSTER").arg("INFO")).await;
                if !ok.is_some_and(|i| i.contains("cluster_state:ok")) {
                    return false;
                }
                let r = replication(port).await.unwrap_or_default();
                if r.get("role").map(String::as_str) == Some("slave") {
                    if r.get("master_link_status").map(String::as_str) != Some("up") {
                        return false;
                    }
                    replicas += 1;
                }
            }
            replicas == 3
        },
    )
    .await;
}
