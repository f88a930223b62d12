//! Connections to RabbitMQ and Redis from the configuration, with errors that
//! name the (redacted) endpoint.
//!
//! `amqps://` and `rediss://` are verified against the platform roots plus
//! `[tls] extra-ca-file`; verification cannot be turned off. When a
//! connection fails, a trial TLS handshake ([`crate::tls::probe`]) tells the
//! usual operator mistakes apart — an untrusted, expired or wrong-host
//! certificate, `redis://` to a TLS-only port, `amqps://` to a plaintext
//! one — and the error says which ([`Error::Connect`], not retried).

use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};
use redis::aio::ConnectionManager;

use crate::config::{Config, RedisMode};
use crate::error::{Error, Result};
use crate::redis_handle::{connection_infos, RedisHandle};
use crate::tls::Probe;

/// TCP keepalive on mail connections: the first probe after this long idle,
/// then every [`KEEPALIVE_INTERVAL`]. A NAT or firewall that dropped the
/// connection's state without a reset is then noticed by the kernel, not
/// only by a command timeout.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Turns TCP keepalive on for a mail server connection (both fetchers).
/// A failure is logged, not fatal: the command timeouts still apply.
pub fn keepalive(tcp: &tokio::net::TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(4);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&params) {
        tracing::warn!(error = %e, "cannot turn on TCP keepalive");
    }
}

/// How long the diagnosing handshake may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a first Redis connection may take: TCP, TLS, AUTH and the
/// connection manager's own retries. redis-rs's connection timeout covers
/// only TCP, and a TLS-only Redis given plaintext waits silently for the
/// rest of a TLS record, so without this bound `redis://` to a TLS port
/// would hang for ever.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most one node may take to accept an AMQP connection (TCP, TLS,
/// AMQP handshake) before the next configured node is tried.
const AMQP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Which configured node the next connection tries first: each connection
/// of a process starts one node further, so a process's connections (and a
/// reconnect after a node died) spread over the cluster. Each process
/// starts at a random node, so that replicas spread too.
static NEXT_NODE: std::sync::OnceLock<std::sync::atomic::AtomicUsize> = std::sync::OnceLock::new();

/// Opens an AMQP connection to one of the configured nodes (`[amqp] urls`,
/// or the one `url`): each is tried in turn, starting one node further on
/// each call, until one accepts. `amqps://` is verified against the
/// platform roots plus `[tls] extra-ca-file`; the connection is driven by
/// the current tokio runtime.
///
/// When every node fails, the error is transient ([`Error::Amqp`], retry
/// later) if any node was merely unreachable, and otherwise the first
/// diagnosed configuration problem ([`Error::Connect`]).
pub async fn amqp(config: &Config, connection_name: &str) -> Result<Connection> {
    let urls = &config.amqp.urls;
    let first = NEXT_NODE
        .get_or_init(|| std::sync::atomic::AtomicUsize::new(rand::random::<u16>() as usize))
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut transient: Option<Error> = None;
    let mut permanent: Option<Error> = None;
    for i in 0..urls.len() {
        let url = &urls[(first + i) % urls.len()];
        match amqp_node(config, url, connection_name).await {
            Ok(conn) => {
                if urls.len() > 1 {
                    tracing::debug!(node = %url, connection = connection_name, "connected to RabbitMQ");
                }
                return Ok(conn);
            }
            Err(e) => {
                if urls.len() > 1 {
                    tracing::warn!(node = %url, error = %e, "cannot connect to this RabbitMQ node; trying the next");
                }
                let slot = if e.is_transient() {
                    &mut transient
                } else {
                    &mut permanent
                };
                slot.get_or_insert(e);
            }
        }
    }
    Err(transient.or(permanent).expect("[amqp] urls is never empty"))
}

/// Opens an AMQP connection to the node at `url` only (one of
/// `[amqp] urls`; `mailagent status` looks at each node in turn).
pub async fn amqp_node(
    config: &Config,
    url: &crate::secret::SecretUrl,
    connection_name: &str,
) -> Result<Connection> {
    let endpoint = url.redacted();
    let mut props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(connection_name.to_string().into());
    props.client_properties.insert(
        "product".into(),
        lapin::types::AMQPValue::LongString("mailagent".into()),
    );
    let tls = OwnedTLSConfig {
        identity: None::<OwnedIdentity>,
        cert_chain: match &config.tls.extra_ca_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|source| Error::Io {
                action: format!("read CA file {}", path.display()),
                source,
            })?),
            None => None,
        },
    };
    let attempt = tokio::time::timeout(
        AMQP_CONNECT_TIMEOUT,
        Connection::connect_with_config(url.expose(), props, tls),
    )
    .await
    .unwrap_or_else(|_| {
        Err(lapin::Error::IOError(std::sync::Arc::new(
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", AMQP_CONNECT_TIMEOUT.as_secs()),
            ),
        )))
    });
    match attempt {
        Ok(conn) => Ok(conn),
        Err(source) => {
            let unreachable = matches!(&source, lapin::Error::IOError(e)
                if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut));
            let known = if unreachable {
                None
            } else {
                diagnose(config, url.expose(), "amqps", 5671, 5672).await
            };
            Err(match known {
                Some(problem) => Error::Connect {
                    service: "RabbitMQ",
                    endpoint,
                    problem,
                    detail: source.to_string(),
                },
                None => Error::Amqp {
                    action: "connect",
                    endpoint,
                    source,
                },
            })
        }
    }
}

/// Opens the Redis handle every service uses: one server, the primary that
/// `[redis] sentinels` name, or `[redis] cluster` ([`RedisHandle`]).
pub async fn redis(config: &Config) -> Result<RedisHandle> {
    let r = &config.redis;
    let endpoint = r.endpoint();
    let open_err = |source| Error::Redis {
        action: "connect",
        endpoint: endpoint.clone(),
        source,
    };
    let certs = match &config.tls.extra_ca_file {
        Some(ca) => Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(crate::tls::roots_pem(ca)?),
        }),
        None => None,
    };
    match r.mode() {
        RedisMode::Single => {
            let manager = redis_single(config).await?;
            Ok(RedisHandle::single(manager, redis_client(config)?))
        }
        RedisMode::Sentinel => {
            let sentinels = connection_infos(
                r.sentinels.iter().map(|u| u.expose()),
                r.sentinel_password.as_ref().map(|s| s.expose()),
            )
            .map_err(open_err)?;
            let tls = sentinels
                .iter()
                .any(|i| matches!(i.addr, redis::ConnectionAddr::TcpTls { .. }));
            let node = redis::sentinel::SentinelNodeConnectionInfo {
                tls_mode: tls.then_some(redis::TlsMode::Secure),
                redis_connection_info: Some(redis::RedisConnectionInfo {
                    username: r.username.clone(),
                    password: r.password.as_ref().map(|s| s.expose().to_string()),
                    ..Default::default()
                }),
            };
            let master = r.master_name.clone().unwrap_or_default();
            RedisHandle::sentinel(sentinels, master, node, certs)
                .await
                .map_err(open_err)
        }
        RedisMode::Cluster => {
            let nodes =
                connection_infos(r.cluster.iter().map(|u| u.expose()), None).map_err(open_err)?;
            let password = r.password.as_ref().map(|s| s.expose().to_string());
            RedisHandle::cluster(nodes, r.username.clone(), password, certs)
                .await
                .map_err(open_err)
        }
    }
}

/// Opens a Redis connection manager to `[redis] url` (reconnects by itself
/// after errors).
async fn redis_single(config: &Config) -> Result<ConnectionManager> {
    let endpoint = config.redis.url.redacted();
    let client = redis_client(config)?;
    // Reconnect pacing. redis 0.27 hands `factor` to backon as the
    // multiplier between attempts (first delay 1 s, then ×factor, capped at
    // max-delay, each plus up to 100 % jitter). Its default factor of 100
    // meant 1 s, then 60 s, then 60 s (+ jitter): after a Redis restart
    // every command waited up to ~4 minutes. Here: 1 s, 2 s, 2 s (+ jitter),
    // then the command fails and the next one starts a new round.
    let mgr_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(10))
        .set_response_timeout(Duration::from_secs(10))
        .set_number_of_retries(3)
        .set_factor(2)
        .set_max_delay(2_000);
    // One plain attempt first: the manager retries a refused handshake with
    // backoff until its budget is spent, which hides a certificate error
    // behind a timeout. This connection is dropped once it has answered.
    let first = client.clone();
    let attempt = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, async move {
        let probe_config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
            .set_response_timeout(REDIS_CONNECT_TIMEOUT);
        drop(
            first
                .get_multiplexed_async_connection_with_config(&probe_config)
                .await?,
        );
        ConnectionManager::new_with_config(client, mgr_config).await
    })
    .await
    .unwrap_or_else(|_| {
        Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer within {} s (connect, TLS, AUTH)",
                REDIS_CONNECT_TIMEOUT.as_secs()
            ),
        )))
    });
    match attempt {
        Ok(mgr) => Ok(mgr),
        Err(source) => {
            let known = if source.is_connection_refusal() {
                None
            } else {
                diagnose(config, config.redis.url.expose(), "rediss", 6379, 6379).await
            };
            Err(match known {
                Some(problem) => Error::Connect {
                    service: "Redis",
                    endpoint,
                    problem,
                    detail: source.to_string(),
                },
                None => Error::Redis {
                    action: "connect",
                    endpoint,
                    source,
                },
            })
        }
    }
}

/// A client of `[redis] url` (one server; [`RedisHandle::pubsub`] opens
/// pub/sub connections in every form). `rediss://` trusts the platform
/// roots, plus `[tls] extra-ca-file` when set.
pub fn redis_client(config: &Config) -> Result<redis::Client> {
    let url = config.redis.url.expose();
    let open_err = |source| Error::Redis {
        action: "open client",
        endpoint: config.redis.url.redacted(),
        source,
    };
    match (&config.tls.extra_ca_file, url.starts_with("rediss:")) {
        (Some(ca), true) => {
            let root_cert = crate::tls::roots_pem(ca)?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .map_err(open_err)
        }
        _ => redis::Client::open(url).map_err(open_err),
    }
}

/// Explains a failed connection to `url` with a trial handshake, or `None`
/// when the handshake tells nothing (the server is down, say: retry).
async fn diagnose(
    config: &Config,
    url: &str,
    tls_scheme: &str,
    tls_port: u16,
    plain_port: u16,
) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let host = parsed
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let tls = parsed.scheme() == tls_scheme;
    let port = parsed
        .port()
        .unwrap_or(if tls { tls_port } else { plain_port });
    let probe = crate::tls::probe(
        host,
        port,
        config.tls.extra_ca_file.as_deref(),
        PROBE_TIMEOUT,
    )
    .await;
    let plain_scheme = tls_scheme.strip_suffix('s').unwrap_or(tls_scheme);
    match (tls, probe) {
        (true, Probe::Refused(cause)) => Some(cause),
        (true, Probe::NotTls) => Some(format!(
            "the server does not speak TLS on port {port}: use {plain_scheme}:// or the server's TLS port"
        )),
        (false, Probe::Verified | Probe::Refused(_)) => Some(format!(
            "port {port} speaks TLS: use {tls_scheme}:// (plaintext {plain_scheme}:// cannot work there)"
        )),
        _ => None,
    }
}
