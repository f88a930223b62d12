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
//! Fencing: renewals run in a task of their own, so nothing the lease loop
//! waits for (registering the replica, a worker finishing its batch while
//! its lease is shed) holds them up. Each held lease's local deadline is a
//! [`LeaseClock`] the work reads: the worker is cut off once less than the
//! clock's margin is left without a renewal, and every flag, move, delete
//! or POP3 QUIT is preceded by [`fence`], which checks the clock and, in one
//! Redis step, that this replica still owns the lease with more than the
//! margin to live. A renewal that does not answer before the deadline
//! counts as failed.
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::redis_handle::RedisHandle;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
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

/// How long `ARGV[1]` still owns `KEYS[1]`, in ms; -1 when it does not.
const OWNED_FOR: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PTTL', KEYS[1])
end
return -1";

/// Delete only if we still own it: `KEYS[1]` lease, `ARGV[1]` owner.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// The local deadline of one held lease, as the work it fences sees it:
/// moved on by each renewal, counted from the moment that renewal was sent
/// (so it never lies beyond the lease's expiry in Redis), and pulled to
/// "now" when a renewal fails. Work that changes the mailbox needs more
/// than the margin left.
#[derive(Clone, Debug)]
pub struct LeaseClock {
    deadline: watch::Receiver<Instant>,
    margin: Duration,
}

impl LeaseClock {
    fn new(deadline: watch::Receiver<Instant>, ttl: Duration) -> Self {
        Self {
            deadline,
            margin: margin(ttl),
        }
    }

    /// The local deadline now.
    pub fn deadline(&self) -> Instant {
        *self.deadline.borrow()
    }

    /// How much of the lease must be left for work that changes the mailbox.
    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// True once the lease loop gave the lease up (released or lost).
    pub fn given_up(&self) -> bool {
        self.deadline.has_changed().is_err()
    }

    /// True while more than the margin is left.
    pub fn valid(&self) -> bool {
        Instant::now() + self.margin < self.deadline()
    }

    /// Resolves once no more than the margin is left (renewals that come
    /// meanwhile move it on), or the lease was given up.
    pub async fn running_out(&self) {
        let mut rx = self.deadline.clone();
        loop {
            let deadline = *rx.borrow_and_update();
            let at = deadline.checked_sub(self.margin).unwrap_or(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {
                    if *rx.borrow() == deadline {
                        return;
                    }
                }
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Resolves once more than the margin is left again (a late renewal
    /// came through); never, when the lease was given up.
    pub async fn renewed(&self) {
        let mut rx = self.deadline.clone();
        loop {
            if Instant::now() + self.margin < *rx.borrow_and_update() {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The part of the lease kept back from work that changes the mailbox: a
/// fifth of the time-to-live, so a flag sent just before it still lands
/// inside the lease, while one renewal (every third) may come late without
/// stopping anything.
fn margin(ttl: Duration) -> Duration {
    ttl / 5
}

/// Fences a change to the mailbox of `config` (flags, moves, deletes, a
/// POP3 QUIT): true only while `clock` has more than its margin left *and*
/// Redis says, in one step, that `owner` still holds the lease with more
/// than the margin to live. The Redis check is bounded by the local
/// deadline: no answer by then is a no.
pub async fn fence(
    redis: &mut RedisHandle,
    keys: &Keys,
    config: &str,
    owner: &str,
    clock: &LeaseClock,
) -> redis::RedisResult<bool> {
    if !clock.valid() {
        return Ok(false);
    }
    let script = redis::Script::new(OWNED_FOR);
    let mut invocation = script.key(keys.lease(config));
    invocation.arg(owner);
    let check = invocation.invoke_async::<i64>(redis);
    let until = clock.deadline().checked_sub(clock.margin);
    let ms = match until {
        Some(at) => match tokio::time::timeout_at(at.into(), check).await {
            Ok(r) => r?,
            Err(_) => return Ok(false),
        },
        None => return Ok(false),
    };
    Ok(ms > clock.margin.as_millis() as i64 && clock.valid())
}

/// What the lease loop asks of the fetcher: start work on a config it now
/// owns, and stop work on one it is about to lose or give up. `stop` must
/// return only once the work has stopped (in-flight confirms finished or
/// abandoned), because the lease is released right after.
pub trait LeaseHolder {
    /// The lease on `config` was acquired: start fetching it, fenced by
    /// `clock`.
    fn start(&mut self, config: &str, clock: LeaseClock) -> impl Future<Output = ()> + Send;
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

/// Configs held, each with the sender of its [`LeaseClock`]: shared by the
/// lease loop (which adds and removes) and the renewer (which moves the
/// deadlines on).
type Held = Arc<Mutex<HashMap<String, watch::Sender<Instant>>>>;

/// The leases of one replica over a set of mail configs.
pub struct Leases {
    redis: RedisHandle,
    keys: Keys,
    protocol: String,
    owner: String,
    ttl: Duration,
    configs: Vec<String>,
    held: Held,
    on_change: Option<ChangeHook>,
}

impl Leases {
    /// Leases on `configs` for replica `owner` of `protocol` (`imap`/`pop3`),
    /// with time-to-live `ttl` (clamped to 3 s..=30 s).
    pub fn new(
        redis: RedisHandle,
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
            held: Held::default(),
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
        self.with_held(|h| h.keys().cloned().collect::<BTreeSet<_>>())
            .into_iter()
            .collect()
    }

    fn with_held<T>(&self, f: impl FnOnce(&mut HashMap<String, watch::Sender<Instant>>) -> T) -> T {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut held)
    }

    fn holds(&self, config: &str) -> bool {
        self.with_held(|h| h.contains_key(config))
    }

    fn count(&self) -> usize {
        self.with_held(|h| h.len())
    }

    /// Forgets `config`: its clock's work sees the lease given up.
    fn forget(&self, config: &str) {
        self.with_held(|h| h.remove(config));
    }

    fn notify(&self, config: &str, change: LeaseChange) {
        tracing::info!(config, owner = %self.owner, change = change.as_str(), "lease changed");
        if let Some(f) = &self.on_change {
            f(config, change);
        }
    }

    /// Runs the lease loop until `shutdown`: registers this replica, keeps
    /// its fair share of leases, and starts/stops work through `holder`,
    /// while a renewer of its own keeps the held leases alive. At shutdown
    /// stops all work (still renewing meanwhile), releases every lease and
    /// deregisters.
    pub async fn run<H: LeaseHolder + Send>(mut self, holder: &mut H, shutdown: CancellationToken) {
        let tick = self.ttl / 3;
        let (lost_tx, mut lost) = mpsc::unbounded_channel();
        let renewing = CancellationToken::new();
        let renewer = tokio::spawn(
            Renewer {
                redis: self.redis.clone(),
                keys: self.keys.clone(),
                owner: self.owner.clone(),
                ttl: self.ttl,
                held: Arc::clone(&self.held),
                lost: lost_tx,
            }
            .run(renewing.clone()),
        );
        loop {
            while let Ok(config) = lost.try_recv() {
                self.lose(holder, &config).await;
            }
            self.round(holder).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
                Some(config) = lost.recv() => self.lose(holder, &config).await,
            }
        }
        let held = self.held();
        holder.stop_all(&held).await;
        renewing.cancel();
        let _ = renewer.await;
        for config in &held {
            self.release(config).await;
            self.forget(config);
            self.notify(config, LeaseChange::Released);
        }
        let fetchers = self.keys.fetchers(&self.protocol);
        let deregister = self.redis.zrem::<_, _, ()>(fetchers, &self.owner);
        let _ = bounded(self.ttl / 3, deregister).await;
    }

    /// The renewer could not renew `config`: its work stops at once.
    async fn lose<H: LeaseHolder + Send>(&mut self, holder: &mut H, config: &str) {
        if !self.holds(config) {
            return; // given up meanwhile
        }
        holder.lost(config).await;
        self.forget(config);
        self.notify(config, LeaseChange::Lost);
    }

    /// One round: beat, shed surplus, acquire up to the quota. (Renewals
    /// run apart, in the renewer.)
    pub async fn round<H: LeaseHolder + Send>(&mut self, holder: &mut H) {
        let replicas = match self.beat().await {
            Ok(n) => n.max(1),
            Err(e) => {
                // Without Redis nothing can be renewed either: the renewer
                // reports those leases lost before they expire.
                tracing::warn!(error = %e, "cannot register fetcher replica in Redis");
                return;
            }
        };
        let quota = quota(self.configs.len(), replicas);
        // Shed surplus (a replica joined). The renewer keeps the lease alive
        // while its work finishes.
        while self.count() > quota {
            let Some(config) = self.held().pop() else {
                break;
            };
            holder.stop(&config).await;
            self.release(&config).await;
            self.forget(&config);
            self.notify(&config, LeaseChange::Rebalanced);
        }
        // Acquire up to the quota.
        let candidates: Vec<String> = self.configs.clone();
        for config in candidates {
            if self.count() >= quota {
                break;
            }
            if self.holds(&config) {
                continue;
            }
            let sent = Instant::now();
            match self.try_acquire(&config).await {
                Ok(true) => {
                    let (tx, rx) = watch::channel(sent + self.ttl);
                    self.with_held(|h| h.insert(config.clone(), tx));
                    self.notify(&config, LeaseChange::Acquired);
                    holder.start(&config, LeaseClock::new(rx, self.ttl)).await;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(config, error = %e, "cannot take lease");
                    break;
                }
            }
        }
    }

    /// Registers this replica and returns the number of live replicas;
    /// an error when Redis does not answer within a third of the TTL (the
    /// loop must come back to the leases it may have lost).
    async fn beat(&mut self) -> redis::RedisResult<usize> {
        let limit = self.ttl / 3;
        bounded(limit, self.beat_once()).await
    }

    async fn beat_once(&mut self) -> redis::RedisResult<usize> {
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
        let limit = self.ttl / 3;
        bounded(limit, self.try_acquire_once(config)).await
    }

    async fn try_acquire_once(&mut self, config: &str) -> redis::RedisResult<bool> {
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
        renew(&mut self.redis, &self.keys, config, &self.owner, self.ttl).await
    }

    async fn release(&mut self, config: &str) {
        let script = redis::Script::new(RELEASE);
        let mut invocation = script.key(self.keys.lease(config));
        invocation.arg(&self.owner);
        let release = invocation.invoke_async::<i64>(&mut self.redis);
        let r = bounded(self.ttl / 3, release).await;
        if let Err(e) = r {
            tracing::warn!(config, error = %e, "cannot release lease; it expires by itself");
        }
    }
}

/// `f`, or a timeout error when Redis does not answer within `limit`.
async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "no answer from Redis in time",
        ))),
    }
}

/// Renews `config`'s lease if `owner` still holds it.
async fn renew(
    redis: &mut RedisHandle,
    keys: &Keys,
    config: &str,
    owner: &str,
    ttl: Duration,
) -> redis::RedisResult<bool> {
    let n: i64 = redis::Script::new(RENEW)
        .key(keys.lease(config))
        .arg(owner)
        .arg(ttl.as_millis() as u64)
        .invoke_async(redis)
        .await?;
    Ok(n == 1)
}

/// Keeps the held leases alive, every third of the time-to-live, apart
/// from the lease loop. Each renewal is sent with the lease's current
/// deadline as its time limit; one that fails, is refused or comes too
/// late pulls the clock to now (the work sees it at once) and is reported
/// lost.
struct Renewer {
    redis: RedisHandle,
    keys: Keys,
    owner: String,
    ttl: Duration,
    held: Held,
    lost: mpsc::UnboundedSender<String>,
}

impl Renewer {
    async fn run(self, stop: CancellationToken) {
        let tick = self.ttl / 3;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let held: Vec<(String, watch::Sender<Instant>)> = {
                let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                held.iter().map(|(c, tx)| (c.clone(), tx.clone())).collect()
            };
            let this = &self;
            let renewals = held.into_iter().map(|(config, clock)| async move {
                let sent = Instant::now();
                let deadline = *clock.borrow();
                let mut redis = this.redis.clone();
                let renewal = renew(&mut redis, &this.keys, &config, &this.owner, this.ttl);
                match tokio::time::timeout_at(deadline.into(), renewal).await {
                    Ok(Ok(true)) => {
                        clock.send_if_modified(|d| {
                            let later = sent + this.ttl;
                            (*d < later).then(|| *d = later).is_some()
                        });
                    }
                    outcome => {
                        match outcome {
                            Ok(Ok(_)) => tracing::warn!(config, "lease taken by another replica"),
                            Ok(Err(e)) => tracing::warn!(config, error = %e, "cannot renew lease"),
                            Err(_) => tracing::warn!(
                                config,
                                "lease renewal unanswered until its deadline"
                            ),
                        }
                        clock.send_replace(Instant::now());
                        let _ = this.lost.send(config);
                    }
                }
            });
            futures::future::join_all(renewals).await;
        }
    }
}

/// Who owns `config` now, if anyone.
pub async fn owner_of(
    redis: &mut RedisHandle,
    keys: &Keys,
    config: &str,
) -> redis::RedisResult<Option<String>> {
    redis.get(keys.lease(config)).await
}

/// True when `owner` holds the lease on `config` right now.
pub async fn is_owner(
    redis: &mut RedisHandle,
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
