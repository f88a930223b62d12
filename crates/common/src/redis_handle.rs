//! [`RedisHandle`]: the one Redis connection type every service uses,
//! whichever form `[redis]` takes (§7a).
//!
//! - **One server** (`url`): redis-rs's `ConnectionManager`, which reconnects
//!   by itself.
//! - **Sentinel** (`sentinels` + `master-name`): the Sentinels name the
//!   primary (redis-rs's [`redis::sentinel::Sentinel`], which also checks the
//!   node's `ROLE`); commands go to it over one multiplexed connection. A
//!   connection error, a timeout or a `READONLY` reply (the node was demoted
//!   by a failover) drops that connection, and the next command asks the
//!   Sentinels again: a failover is followed without a restart. A `READONLY`
//!   command was not executed, so it is sent once more to the new primary;
//!   any other error is returned (the callers already retry, as they do with
//!   one server).
//! - **Cluster** (`cluster`): redis-rs's async cluster client, which routes
//!   each command by its key's hash slot and follows `MOVED`/`ASK` and
//!   failovers. Every operation keeps to one slot (keys that go together
//!   share a hash tag, [`crate::keys`]); scripts name their keys, so
//!   `EVALSHA` is routed to the slot's node, and `NOSCRIPT` on a node that
//!   never saw the script (a promoted replica) falls back to `SCRIPT LOAD`
//!   ([`redis::Script::invoke_async`]).
//!
//! Pub/sub needs a connection of its own: [`RedisHandle::pubsub`] opens one on
//! the server, the current primary (Sentinel) or the next Cluster node in
//! turn (a plain `PUBLISH` in a Cluster reaches every node); a caller that
//! loses it calls again and lands on whatever is alive.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};

/// How long asking the Sentinels and connecting to the primary may take.
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The response timeout of a Sentinel-followed or Cluster connection: a
/// node that stops answering (not closed) is given up on after this.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A cloneable Redis connection for every service: one server, a primary
/// followed through Sentinel, or a Redis Cluster. Implements
/// [`ConnectionLike`], so every redis-rs command and script takes it.
#[derive(Clone)]
pub struct RedisHandle {
    inner: Inner,
}

// The one-server variant is a ConnectionManager, as every service held
// before: cloned per call like the others, so its size costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Inner {
    Single {
        manager: ConnectionManager,
        client: Arc<redis::Client>,
    },
    Sentinel(Arc<SentinelFollower>),
    Cluster {
        connection: ClusterConnection,
        nodes: Arc<Vec<redis::Client>>,
        next: Arc<AtomicUsize>,
    },
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            Inner::Single { .. } => "single",
            Inner::Sentinel(_) => "sentinel",
            Inner::Cluster { .. } => "cluster",
        };
        f.debug_struct("RedisHandle").field("kind", &kind).finish()
    }
}

impl RedisHandle {
    /// One server through a connection manager; `client` opens pub/sub
    /// connections.
    pub fn single(manager: ConnectionManager, client: redis::Client) -> Self {
        Self {
            inner: Inner::Single {
                manager,
                client: Arc::new(client),
            },
        }
    }

    /// A primary found by `sentinels` under `master_name`. Data nodes are
    /// reached with `node` (password, TLS); `certs` adds a CA for
    /// `rediss://` data nodes. Connects once, so a wrong setting shows at
    /// start.
    pub async fn sentinel(
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
        node: SentinelNodeConnectionInfo,
        certs: Option<TlsCertificates>,
    ) -> RedisResult<Self> {
        let follower = SentinelFollower {
            sentinel: tokio::sync::Mutex::new(Sentinel::build(sentinels)?),
            master_name,
            node,
            certs,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
        };
        follower.connection().await?;
        Ok(Self {
            inner: Inner::Sentinel(Arc::new(follower)),
        })
    }

    /// A Redis Cluster from some of its `nodes`.
    pub async fn cluster(
        nodes: Vec<ConnectionInfo>,
        username: Option<String>,
        password: Option<String>,
        certs: Option<TlsCertificates>,
    ) -> RedisResult<Self> {
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
            .connection_timeout(DISCOVER_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(6)
            .min_retry_wait(100)
            .max_retry_wait(2_000);
        if let Some(user) = &username {
            builder = builder.username(user.clone());
        }
        if let Some(pw) = &password {
            builder = builder.password(pw.clone());
        }
        // redis-rs turns TLS on for every node when given certificates:
        // only for `rediss://` nodes.
        let tls = nodes
            .iter()
            .any(|i| matches!(i.addr, redis::ConnectionAddr::TcpTls { .. }));
        if let (Some(certs), true) = (&certs, tls) {
            builder = builder.certs(clone_certs(certs));
        }
        let connection =
            tokio::time::timeout(DISCOVER_TIMEOUT, builder.build()?.get_async_connection())
                .await
                .map_err(|_| timed_out("no Cluster node answered"))??;
        let mut clients = Vec::new();
        for mut info in nodes {
            if info.redis.password.is_none() {
                info.redis.username = username.clone();
                info.redis.password = password.clone();
            }
            clients.push(open_client(info, certs.as_ref())?);
        }
        Ok(Self {
            inner: Inner::Cluster {
                connection,
                nodes: Arc::new(clients),
                next: Arc::new(AtomicUsize::new(0)),
            },
        })
    }

    /// A connection for pub/sub: on the server, on the current primary
    /// (Sentinel, asked again on each call), or on the next Cluster node in
    /// turn (skipping nodes that do not answer).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match &self.inner {
            Inner::Single { client, .. } => client.get_async_pubsub().await,
            Inner::Sentinel(f) => {
                let (client, _) = f.discover().await?;
                bounded(client.get_async_pubsub()).await
            }
            Inner::Cluster { nodes, next, .. } => {
                let mut last = None;
                for _ in 0..nodes.len() {
                    let i = next.fetch_add(1, Ordering::Relaxed) % nodes.len();
                    match bounded(nodes[i].get_async_pubsub()).await {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| timed_out("no Cluster node")))
            }
        }
    }

    /// Where the data is, for `mailagent status`: the server, the primary the
    /// Sentinels name now, or every Cluster node with its role.
    pub async fn describe(&self) -> RedisResult<Vec<String>> {
        match &self.inner {
            Inner::Single { client, .. } => Ok(vec![format!(
                "server {}",
                addr_of(client.get_connection_info())
            )]),
            Inner::Sentinel(f) => {
                let (client, _) = f.discover().await?;
                Ok(vec![format!(
                    "sentinel master {}: primary {} (discovered)",
                    f.master_name,
                    addr_of(client.get_connection_info())
                )])
            }
            Inner::Cluster { connection, .. } => {
                let mut c = connection.clone();
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut c)
                    .await?;
                Ok(cluster_nodes_lines(&nodes))
            }
        }
    }
}

/// `host:port role[, slots]` per node of a `CLUSTER NODES` reply.
fn cluster_nodes_lines(reply: &str) -> Vec<String> {
    let mut out: Vec<String> = reply
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split('@').next().unwrap_or(f[1]);
            let flags: Vec<&str> = f[2]
                .split(',')
                .filter(|x| *x != "myself" && *x != "noflags")
                .collect();
            let role = flags.join(",").replace("slave", "replica");
            let slots = f[8..].join(" ");
            Some(if slots.is_empty() {
                format!("cluster node {addr} {role} ({})", f[7])
            } else {
                format!("cluster node {addr} {role} ({}) slots {slots}", f[7])
            })
        })
        .collect();
    out.sort();
    out
}

/// Rebuilds TLS material (redis-rs's type is not `Clone`).
fn clone_certs(c: &TlsCertificates) -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: c.root_cert.clone(),
    }
}

/// A client for `info`, trusting `certs` when given and the node uses TLS.
fn open_client(
    info: ConnectionInfo,
    certs: Option<&TlsCertificates>,
) -> RedisResult<redis::Client> {
    match (certs, &info.addr) {
        (Some(certs), redis::ConnectionAddr::TcpTls { .. }) => {
            redis::Client::build_with_tls(info, clone_certs(certs))
        }
        _ => redis::Client::open(info),
    }
}

fn addr_of(info: &ConnectionInfo) -> String {
    match &info.addr {
        redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (tls)"),
        other => format!("{other:?}"),
    }
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} within {} s", DISCOVER_TIMEOUT.as_secs()),
    ))
}

async fn bounded<T>(f: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(DISCOVER_TIMEOUT, f)
        .await
        .map_err(|_| timed_out("no answer"))?
}

/// Follows the primary the Sentinels name.
struct SentinelFollower {
    /// The Sentinels (one discovery at a time).
    sentinel: tokio::sync::Mutex<Sentinel>,
    master_name: String,
    node: SentinelNodeConnectionInfo,
    certs: Option<TlsCertificates>,
    /// The connection to the current primary, with its generation; `None`
    /// after an error, until the next command finds the primary again.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
}

impl SentinelFollower {
    /// Asks the Sentinels for the primary (checked by its `ROLE`).
    async fn discover(&self) -> RedisResult<(redis::Client, ConnectionInfo)> {
        let mut sentinel = self.sentinel.lock().await;
        self.discover_with(&mut sentinel).await
    }

    async fn discover_with(
        &self,
        sentinel: &mut Sentinel,
    ) -> RedisResult<(redis::Client, ConnectionInfo)> {
        let client =
            bounded(sentinel.async_master_for(&self.master_name, Some(&self.node))).await?;
        let info = client.get_connection_info().clone();
        Ok((open_client(info.clone(), self.certs.as_ref())?, info))
    }

    /// The current primary's connection, found and opened when there is
    /// none. One caller at a time looks for it (the others wait for its
    /// result), so an outage costs one discovery per attempt, not one per
    /// waiting command.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.current.lock().expect("lock").clone() {
            return Ok(c);
        }
        let mut sentinel = self.sentinel.lock().await;
        if let Some(c) = self.current.lock().expect("lock").clone() {
            return Ok(c);
        }
        let (client, info) = self.discover_with(&mut sentinel).await?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(DISCOVER_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let conn = bounded(client.get_multiplexed_async_connection_with_config(&config)).await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(master = %self.master_name, primary = %addr_of(&info), "connected to the Redis primary named by Sentinel");
        *self.current.lock().expect("lock") = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Drops the connection of `generation` (not a newer one).
    fn forget(&self, generation: u64, error: &RedisError) {
        let mut current = self.current.lock().expect("lock");
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(master = %self.master_name, %error, "lost the Redis primary; asking the Sentinels again");
            *current = None;
        }
    }

    /// Runs `op` on the primary; follows a failover (see the module docs).
    async fn run<'a, T, F>(&self, op: F) -> RedisResult<T>
    where
        F: Fn(MultiplexedConnection) -> RedisFuture<'a, T>,
    {
        for attempt in 0..2 {
            let (generation, conn) = self.connection().await?;
            match op(conn).await {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == ErrorKind::ReadOnly && attempt == 0 => {
                    self.forget(generation, &e);
                }
                Err(e) => {
                    if lost_primary(&e) {
                        self.forget(generation, &e);
                    }
                    return Err(e);
                }
            }
        }
        unreachable!("the loop returns")
    }
}

/// Whether `e` means the connection or the node's role is gone: the
/// primary must be found again.
fn lost_primary(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown)
}

impl ConnectionLike for RedisHandle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Single { manager, .. } => manager.req_packed_command(cmd),
            Inner::Cluster { connection, .. } => connection.req_packed_command(cmd),
            Inner::Sentinel(f) => {
                let f = f.clone();
                Box::pin(async move {
                    f.run(|mut c| Box::pin(async move { c.req_packed_command(cmd).await }))
                        .await
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Single { manager, .. } => manager.req_packed_commands(cmd, offset, count),
            Inner::Cluster { connection, .. } => connection.req_packed_commands(cmd, offset, count),
            Inner::Sentinel(f) => {
                let f = f.clone();
                Box::pin(async move {
                    f.run(|mut c| {
                        Box::pin(async move { c.req_packed_commands(cmd, offset, count).await })
                    })
                    .await
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single { manager, .. } => manager.get_db(),
            Inner::Sentinel(_) | Inner::Cluster { .. } => 0,
        }
    }
}

/// Connection details of each URL in `urls`, with `password` where a URL
/// has none.
pub fn connection_infos<'a>(
    urls: impl IntoIterator<Item = &'a str>,
    password: Option<&str>,
) -> RedisResult<Vec<ConnectionInfo>> {
    urls.into_iter()
        .map(|u| {
            let mut info = u.into_connection_info()?;
            if info.redis.password.is_none() {
                info.redis.password = password.map(str::to_string);
            }
            Ok(info)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_reply_becomes_one_line_per_node() {
        let reply = "\
07c37dfeb2352 127.0.0.1:30004@31004 slave e7d1eecce10fd 0 1426238317239 4 connected
67ed2db8d677e 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1eecce10fd 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
6ec23923021cf 127.0.0.1:30005@31005 master,fail - 1426238316232 1426238316232 5 disconnected
";
        assert_eq!(
            cluster_nodes_lines(reply),
            vec![
                "cluster node 127.0.0.1:30001 master (connected) slots 0-5460",
                "cluster node 127.0.0.1:30002 master (connected) slots 5461-10922",
                "cluster node 127.0.0.1:30004 replica (connected)",
                "cluster node 127.0.0.1:30005 master,fail (disconnected)",
            ]
        );
    }

    #[test]
    fn the_configured_password_fills_in_only_where_a_url_has_none() {
        let infos = connection_infos(
            ["redis://127.0.0.1:26379", "redis://:own@127.0.0.1:26380"],
            Some("configured"),
        )
        .unwrap();
        assert_eq!(infos[0].redis.password.as_deref(), Some("configured"));
        assert_eq!(infos[1].redis.password.as_deref(), Some("own"));
        assert!(connection_infos(["redis://127.0.0.1:1"], None).unwrap()[0]
            .redis
            .password
            .is_none());
    }

    #[test]
    fn a_demoted_or_unreachable_primary_is_looked_up_again() {
        let readonly = RedisError::from((ErrorKind::ReadOnly, "READONLY"));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let wrongtype = RedisError::from((ErrorKind::TypeError, "WRONGTYPE"));
        assert!(lost_primary(&readonly));
        assert!(lost_primary(&io));
        assert!(!lost_primary(&wrongtype));
    }
}
