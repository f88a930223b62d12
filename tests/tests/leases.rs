//! The fetch kit's leases against real Redis (spec §4, §7a, issue 12):
//! renewals run apart from the lease loop, so a worker that takes long to
//! finish its batch while its lease is shed holds up no renewal, and the
//! work sees its lease's local deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fetch::lease::{LeaseClock, LeaseHolder, Leases};
use common::shutdown::CancellationToken;
use mailagent_tests::imap_support::{eventually, Fixture};
use redis::AsyncCommands;

/// Work that takes `stop_takes` to finish its batch when asked to stop,
/// and records what the lease loop asked of it.
#[derive(Clone, Default)]
struct SlowWork {
    stop_takes: Duration,
    events: Arc<Mutex<Vec<String>>>,
    clocks: Arc<Mutex<Vec<(String, LeaseClock)>>>,
}

impl SlowWork {
    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    fn clock(&self, config: &str) -> Option<LeaseClock> {
        let clocks = self.clocks.lock().unwrap();
        clocks
            .iter()
            .rev()
            .find(|(c, _)| c == config)
            .map(|(_, k)| k.clone())
    }
}

impl LeaseHolder for SlowWork {
    async fn start(&mut self, config: &str, clock: LeaseClock) {
        self.events.lock().unwrap().push(format!("start {config}"));
        self.clocks
            .lock()
            .unwrap()
            .push((config.to_string(), clock));
    }

    async fn stop(&mut self, config: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("stopping {config}"));
        tokio::time::sleep(self.stop_takes).await; // the batch finishing
        self.events
            .lock()
            .unwrap()
            .push(format!("stopped {config}"));
    }

    async fn lost(&mut self, config: &str) {
        self.events.lock().unwrap().push(format!("lost {config}"));
    }
}

/// A replica that takes 3 × its lease TTL to finish the batch of a config
/// it sheds (a second replica joined) keeps both leases alive meanwhile:
/// the one it keeps and the one whose work is still finishing. With
/// renewals in the lease loop, both expired behind the shedding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_go_on_while_a_shed_lease_finishes_its_batch() {
    let fx = Fixture::new("lease-shed");
    let keys = fx.keys();
    let mut redis = fx.redis().await;
    let ttl = Duration::from_secs(3);
    let configs = vec!["a".to_string(), "b".to_string()];
    let work = SlowWork {
        stop_takes: ttl * 3,
        ..SlowWork::default()
    };
    let leases = Leases::new(redis.clone(), keys.clone(), "imap", "one", configs, ttl);
    let shutdown = CancellationToken::new();
    let mut holder = work.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { leases.run(&mut holder, stop).await });
    let both = eventually(Duration::from_secs(10), || async {
        work.events()
            .iter()
            .filter(|e| e.starts_with("start"))
            .count()
            == 2
    })
    .await;
    assert!(both, "the replica took both leases: {:?}", work.events());

    // A second replica joins (its beat in the set of fetchers): the first
    // sheds one config, whose batch takes 9 s to finish.
    let fetchers = keys.fetchers("imap");
    let beat = |mut r: common::RedisHandle, key: String| async move {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let _: () = r.zadd(key, "two", now).await.unwrap();
    };
    beat(redis.clone(), fetchers.clone()).await;
    let shedding = eventually(Duration::from_secs(10), || async {
        work.events().iter().any(|e| e.starts_with("stopping"))
    })
    .await;
    assert!(shedding, "no config shed: {:?}", work.events());
    let shed = work
        .events()
        .iter()
        .find_map(|e| e.strip_prefix("stopping ").map(str::to_string))
        .unwrap();
    let kept = if shed == "a" { "b" } else { "a" };

    // While that batch finishes, both leases stay owned and alive.
    let finishing_until = tokio::time::Instant::now() + ttl * 3;
    while tokio::time::Instant::now() < finishing_until {
        beat(redis.clone(), fetchers.clone()).await;
        for config in [kept, shed.as_str()] {
            let owner: Option<String> = redis.get(keys.lease(config)).await.unwrap();
            assert_eq!(
                owner.as_deref(),
                Some("one"),
                "the lease on {config} expired while {shed} was finishing: {:?}",
                work.events()
            );
        }
        let clock = work.clock(kept).unwrap();
        assert!(clock.valid(), "the kept lease's clock ran out");
        tokio::time::sleep(Duration::from_millis(250)).await; // sampling
    }
    assert!(
        !work.events().iter().any(|e| e.starts_with("lost")),
        "a lease was lost: {:?}",
        work.events()
    );
    let released = eventually(Duration::from_secs(10), || async {
        let owner: Option<String> = fx
            .redis()
            .await
            .get(keys.lease(&shed))
            .await
            .unwrap_or(None);
        owner.is_none() && work.events().contains(&format!("stopped {shed}"))
    })
    .await;
    assert!(released, "the shed lease was not released after its batch");
    let clock = work.clock(&shed).unwrap();
    let gone = eventually(Duration::from_secs(5), || async { !clock.valid() }).await;
    assert!(gone, "the released lease's clock still runs");

    let _: () = redis.zrem(&fetchers, "two").await.unwrap();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("lease loop stops")
        .unwrap();
}

/// The clock of a lease whose renewals stop answering runs out before the
/// lease could expire in Redis, and the loop reports the lease lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_renewals_go_unanswered_runs_out_before_it_expires() {
    let fx = Fixture::new("lease-stall");
    let (relay, via_relay) = fx.redis_relay().await;
    let redis = mailagent_tests::harness::redis_at(via_relay.expose()).await;
    let keys = fx.keys();
    let ttl = Duration::from_secs(3);
    let work = SlowWork::default();
    let leases = Leases::new(redis, keys.clone(), "imap", "one", vec!["a".into()], ttl);
    let shutdown = CancellationToken::new();
    let mut holder = work.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { leases.run(&mut holder, stop).await });
    let started = eventually(Duration::from_secs(10), || async {
        work.clock("a").is_some()
    })
    .await;
    assert!(started);
    let clock = work.clock("a").unwrap();

    let mut direct = fx.redis().await;
    relay.stall();
    let stalled_at = std::time::Instant::now();
    // When Redis will let the lease expire, read at once past the relay.
    let pttl: i64 = direct.pttl(keys.lease("a")).await.unwrap();
    assert!(pttl > 0, "the lease had no time to live left: {pttl}");
    let expires_at = stalled_at + Duration::from_millis(pttl as u64);
    let ran_out = tokio::time::timeout(ttl * 2, clock.running_out()).await;
    assert!(ran_out.is_ok(), "the clock did not run out");
    let ran_out_at = std::time::Instant::now();
    assert!(
        ran_out_at < expires_at,
        "the clock ran out {:?} after the stall, after the lease expired in Redis ({pttl} ms)",
        ran_out_at - stalled_at
    );
    let lost = eventually(Duration::from_secs(10), || async {
        work.events().contains(&"lost a".to_string())
    })
    .await;
    assert!(lost, "the lease was not reported lost: {:?}", work.events());

    relay.cut();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("lease loop stops")
        .unwrap();
}
