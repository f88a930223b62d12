//! Redis leases on mail configs (§4, §7a), shared by both fetchers.
//!
//! Each mail config is owned by at most one fetcher replica at a time: the
//! owner holds `Keys::lease(config)` = its owner id, with a time-to-live
//! (default [`DEFAULT_TTL`], at most 30 s), renews it every third of that,
//! and releases it (owner-checked, in Lua) when it stops. A replica that
//! cannot renew stops the config *before* the lease can expire: the local
//! deadline is counted from the moment the renew was sent, and the work is
//! stopped as soon as a renew fails or the deadline nears.
//!
//! Fair spreading: every replica registers in the sorted set
//! `Keys::fetchers(protocol)` with its last beat as score; members silent
//! for longer than the TTL are dropped. With N live replicas and M configs a
//! replica holds at most ⌈M/N⌉ leases: when a replica joins, the others see
//! a smaller quota and release their surplus (stopping that work first);
//! when one leaves, its leases expire and the others' larger quota lets them
//! take the configs over. Each replica tries the configs in an order
//! rotated by a hash of its id, so simultaneous starters rarely collide.
//!
//! Every command touches one key, so this works on Redis Cluster.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;

/// Default lease time-to-live.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// The longest lease time-to-live allowed (§4).
pub const MAX_TTL: Duration = Duration::from_secs(30);

/// Renew only if we still own it: `KEYS[1]` lease, `ARGV[1]` owner, `ARGV[2]` ttl ms.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Delete only if we still own it: `KEYS[1]` lease, `ARGV[1]` owner.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// What the lease loop asks of the fetcher: start work on a config it now
/// owns, and stop work on one it is about to lose or give up. `stop` must
/// return only once the work has stopped (in-flight confirms finished or
/// abandoned), because the lease is released right after.
pub trait LeaseHolder {
    /// The lease on `config` was acquired: start fetching it.
    fn start(&mut self, config: &str) -> impl Future<Output = ()> + Send;
    /// Stop fetching `config` and return when it has stopped.
    fn stop(&mut self, config: &str) -> impl Future<Output = ()> + Send;
    /// The lease on `config` is lost: stop at once, without finishing.
    /// Defaults to [`LeaseHolder::stop`].
    fn lost(&mut self, config: &str) -> impl Future<Output = ()> + Send {
        self.stop(config)
    }
    /// Stop several configs (shutdown); an implementation may stop them in
    /// parallel. Defaults to [`LeaseHolder::stop`] one after the other.
    fn stop_all(&mut self, configs: &[String]) -> impl Future<Output = ()> + Send
    where
        Self: Send,
    {
        async move {
            for c in configs {
                self.stop(c).await;
            }
        }
    }
}

/// Why a lease changed hands, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// Acquired a free lease.
    Acquired,
    /// Released to rebalance (more replicas than before).
    Rebalanced,
    /// Lost: renewal failed or another owner holds it.
    Lost,
    /// Released at shutdown.
    Released,
}

impl LeaseChange {
    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acquired => "acquired",
            Self::Rebalanced => "rebalanced",
            Self::Lost => "lost",
            Self::Released => "released",
        }
    }
}

/// A callback on lease changes.
type ChangeHook = Box<dyn Fn(&str, LeaseChange) + Send + Sync>;

/// The leases of one replica over a set of mail configs.
pub struct Leases {
    redis: ConnectionManager,
    keys: Keys,
    protocol: String,
    owner: String,
    ttl: Duration,
    configs: Vec<String>,
    /// Configs held, with the local deadline before which work must stop.
    held: HashMap<String, Instant>,
    on_change: Option<ChangeHook>,
}

impl Leases {
    /// Leases on `configs` for replica `owner` of `protocol` (`imap`/`pop3`),
    /// with time-to-live `ttl` (clamped to 3 s..=30 s).
    pub fn new(
        redis: ConnectionManager,
        keys: Keys,
        protocol: &str,
        owner: &str,
        configs: Vec<String>,
        ttl: Duration,
    ) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(3), MAX_TTL);
        let configs = rotate(&configs, owner);
        Self {
            redis,
            keys,
            protocol: protocol.to_string(),
            owner: owner.to_string(),
            ttl,
            configs,
            held: HashMap::new(),
            on_change: None,
        }
    }

    /// Calls `f` on every change (for logs, metrics and heartbeats).
    pub fn on_change(mut self, f: impl Fn(&str, LeaseChange) + Send + Sync + 'static) -> Self {
        self.on_change = Some(Box::new(f));
        self
    }

    /// The time-to-live in use.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Configs currently held, sorted.
    pub fn held(&self) -> Vec<String> {
        self.held
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn notify(&self, config: &str, change: LeaseChange) {
        tracing::info!(config, owner = %self.owner, change = change.as_str(), "lease changed");
        if let Some(f) = &self.on_change {
            f(config, change);
        }
    }

    /// Runs the lease loop until `shutdown`: registers this replica, keeps
    /// its fair share of leases, renews them, and starts/stops work through
    /// `holder`. At shutdown stops all work, releases every lease and
    /// deregisters.
    pub async fn run<H: LeaseHolder + Send>(mut self, holder: &mut H, shutdown: CancellationToken) {
        let tick = self.ttl / 3;
        loop {
            self.round(holder).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
        }
        let held = self.held();
        holder.stop_all(&held).await;
        for config in &held {
            self.release(config).await;
            self.held.remove(config);
            self.notify(config, LeaseChange::Released);
        }
        let _: redis::RedisResult<()> = self
            .redis
            .zrem(self.keys.fetchers(&self.protocol), &self.owner)
            .await;
    }

    /// One round: beat, renew, shed surplus, acquire up to the quota.
    pub async fn round<H: LeaseHolder + Send>(&mut self, holder: &mut H) {
        let replicas = match self.beat().await {
            Ok(n) => n.max(1),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register fetcher replica in Redis");
                // Without Redis nothing can be renewed either; fall through so
                // renewals fail and work stops before the leases expire.
                usize::MAX
            }
        };
        // Renew what we hold; stop what we lost.
        for config in self.held() {
            let sent = Instant::now();
            let renewed = self.renew(&config).await;
            match renewed {
                Ok(true) => {
                    self.held.insert(config, sent + self.ttl);
                }
                Ok(false) | Err(_) => {
                    if let Err(e) = &renewed {
                        tracing::warn!(config, error = %e, "cannot renew lease");
                    }
                    holder.lost(&config).await;
                    self.held.remove(&config);
                    self.notify(&config, LeaseChange::Lost);
                }
            }
        }
        if replicas == usize::MAX {
            return;
        }
        let quota = quota(self.configs.len(), replicas);
        // Shed surplus (a replica joined).
        while self.held.len() > quota {
            let Some(config) = self.held().pop() else {
                break;
            };
            holder.stop(&config).await;
            self.release(&config).await;
            self.held.remove(&config);
            self.notify(&config, LeaseChange::Rebalanced);
        }
        // Acquire up to the quota.
        let candidates: Vec<String> = self.configs.clone();
        for config in candidates {
            if self.held.len() >= quota {
                break;
            }
            if self.held.contains_key(&config) {
                continue;
            }
            let sent = Instant::now();
            match self.try_acquire(&config).await {
                Ok(true) => {
                    self.held.insert(config.clone(), sent + self.ttl);
                    self.notify(&config, LeaseChange::Acquired);
                    holder.start(&config).await;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(config, error = %e, "cannot take lease");
                    break;
                }
            }
        }
    }

    /// Registers this replica and returns the number of live replicas.
    async fn beat(&mut self) -> redis::RedisResult<usize> {
        let key = self.keys.fetchers(&self.protocol);
        let now = now_ms();
        let _: () = self.redis.zadd(&key, &self.owner, now).await?;
        let stale = now.saturating_sub(self.ttl.as_millis() as u64);
        let _: () = self
            .redis
            .zrembyscore(&key, "-inf", format!("({stale}"))
            .await?;
        let n: usize = self.redis.zcard(&key).await?;
        Ok(n)
    }

    async fn try_acquire(&mut self, config: &str) -> redis::RedisResult<bool> {
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(self.ttl.as_millis() as u64));
        let set: Option<String> = self
            .redis
            .set_options(self.keys.lease(config), &self.owner, opts)
            .await?;
        if set.is_some() {
            return Ok(true);
        }
        // Ours already (e.g. a restart with the same id)? Renew it.
        self.renew(config).await
    }

    async fn renew(&mut self, config: &str) -> redis::RedisResult<bool> {
        let n: i64 = redis::Script::new(RENEW)
            .key(self.keys.lease(config))
            .arg(&self.owner)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut self.redis)
            .await?;
        Ok(n == 1)
    }

    async fn release(&mut self, config: &str) {
        let r: redis::RedisResult<i64> = redis::Script::new(RELEASE)
            .key(self.keys.lease(config))
            .arg(&self.owner)
            .invoke_async(&mut self.redis)
            .await;
        if let Err(e) = r {
            tracing::warn!(config, error = %e, "cannot release lease; it expires by itself");
        }
    }
}

/// Who owns `config` now, if anyone.
pub async fn owner_of(
    redis: &mut ConnectionManager,
    keys: &Keys,
    config: &str,
) -> redis::RedisResult<Option<String>> {
    redis.get(keys.lease(config)).await
}

/// True when `owner` holds the lease on `config` right now.
pub async fn is_owner(
    redis: &mut ConnectionManager,
    keys: &Keys,
    config: &str,
    owner: &str,
) -> redis::RedisResult<bool> {
    Ok(owner_of(redis, keys, config).await?.as_deref() == Some(owner))
}

/// The fair share: at most ⌈M/N⌉ configs per replica.
pub fn quota(configs: usize, replicas: usize) -> usize {
    configs.div_ceil(replicas.max(1))
}

/// `configs` sorted, then rotated by a hash of `owner`, so replicas start
/// their acquisition attempts at different configs.
fn rotate(configs: &[String], owner: &str) -> Vec<String> {
    let mut sorted: Vec<String> = configs.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.is_empty() {
        return sorted;
    }
    let digest = Sha256::digest(owner.as_bytes());
    let start =
        u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8])) as usize % sorted.len();
    sorted.rotate_left(start);
    sorted
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_table() {
        let cases = [
            (9, 3, 3),
            (10, 3, 4),
            (1, 3, 1),
            (0, 2, 0),
            (9, 1, 9),
            (9, 0, 9),
            (1000, 7, 143),
        ];
        for (m, n, q) in cases {
            assert_eq!(quota(m, n), q, "quota({m}, {n})");
        }
    }

    #[test]
    fn rotation_keeps_every_config_once() {
        let configs: Vec<String> = (0..9).map(|i| format!("c{i}")).collect();
        for owner in ["a", "b", "host-1-2-abcd"] {
            let mut r = rotate(&configs, owner);
            assert_eq!(r.len(), 9);
            r.sort();
            assert_eq!(r, configs);
        }
        let starts: BTreeSet<String> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|o| rotate(&configs, o)[0].clone())
            .collect();
        assert!(starts.len() > 1, "owners should start at different configs");
    }
}
