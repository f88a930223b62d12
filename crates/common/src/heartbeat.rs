//! Agent heartbeats in Redis (§7): every instance writes its status under
//! its component name with a time-to-live, so `mailagent status` lists the
//! live agents and a dead one disappears on its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::redis_handle::RedisHandle;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A process-unique instance id: host name, pid and a random suffix.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// What one agent instance reports about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct AgentStatus {
    /// `token-broker`, `imap-fetcher`, `pop-fetcher` or `form-processor`.
    pub component: String,
    /// Instance id.
    pub instance: String,
    /// Process id.
    pub pid: u32,
    /// Program version.
    pub version: String,
    /// Start time (epoch seconds).
    pub started_at: u64,
    /// Time of this beat (epoch seconds).
    pub last_beat: u64,
    /// Mail configs (or profiles, for the broker) this instance owns now.
    pub owns: Vec<String>,
    /// Last completed poll (epoch seconds).
    pub last_poll: Option<u64>,
    /// Last error, if the latest attempt failed.
    pub last_error: Option<String>,
    /// Messages (or tokens) handled since start.
    pub handled: u64,
    /// The admin endpoint, when known.
    pub admin: Option<String>,
}

/// A shared, updatable status, beaten into Redis by [`Heartbeat::spawn`].
#[derive(Clone)]
pub struct Heartbeat {
    status: Arc<Mutex<AgentStatus>>,
}

impl Heartbeat {
    /// A status for a new instance of `component`.
    pub fn new(component: &str, instance: &str) -> Self {
        let status = AgentStatus {
            component: component.to_string(),
            instance: instance.to_string(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: now_secs(),
            ..Default::default()
        };
        Self {
            status: Arc::new(Mutex::new(status)),
        }
    }

    /// Changes the status; the next beat publishes it.
    pub fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> AgentStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Writes the status every `interval` (time-to-live: three intervals)
    /// until `shutdown`, then removes it.
    pub fn spawn(
        &self,
        mut redis: RedisHandle,
        keys: Keys,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let snapshot = this.snapshot();
            let key = keys.heartbeat(&snapshot.component, &snapshot.instance);
            let ttl = (interval.as_secs() * 3).max(3);
            loop {
                this.update(|s| s.last_beat = now_secs());
                let status = this.snapshot();
                if let Ok(json) = serde_json::to_string(&status) {
                    let set: redis::RedisResult<()> = redis.set_ex(&key, json, ttl).await;
                    let index: redis::RedisResult<()> =
                        redis.zadd(keys.agents(), &key, status.last_beat).await;
                    if let Err(e) = set.and(index) {
                        tracing::warn!(error = %e, "cannot write heartbeat to Redis");
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            let _: redis::RedisResult<()> = redis.del(&key).await;
            let _: redis::RedisResult<()> = redis.zrem(keys.agents(), &key).await;
        })
    }
}

/// Every live agent, oldest beat first. Index entries whose key expired are
/// dropped from the index on the way.
pub async fn list_agents(
    redis: &mut RedisHandle,
    keys: &Keys,
) -> redis::RedisResult<Vec<AgentStatus>> {
    let members: Vec<String> = redis.zrange(keys.agents(), 0, -1).await?;
    let mut out = Vec::new();
    for key in members {
        let value: Option<String> = redis.get(&key).await?;
        match value.and_then(|v| serde_json::from_str::<AgentStatus>(&v).ok()) {
            Some(status) => out.push(status),
            None => {
                let _: () = redis.zrem(keys.agents(), &key).await?;
            }
        }
    }
    Ok(out)
}
