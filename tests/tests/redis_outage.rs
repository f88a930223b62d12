//! A Redis outage ends for the agents when Redis is back: the connection
//! every component uses (`common::connect::redis`: with one server, a `ConnectionManager`)
//! reconnects within seconds, however many commands were issued during the
//! outage. With redis 0.27's default reconnect pacing (1 s, then 60 s, then
//! 60 s, plus jitter) a command issued during a 10 s outage held every
//! later one for one to four minutes.

use std::time::{Duration, Instant};

use mailagent_tests::env::Endpoints;
use mailagent_tests::harness::TestConfig;
use mailagent_tests::relay::Relay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_succeed_within_seconds_after_a_10_s_redis_outage() {
    let env = Endpoints::load();
    let url: url::Url = env.redis_url().parse().unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
        .parse()
        .unwrap();
    let proxy = Relay::start(target).await;
    let mut via_proxy = url.clone();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    let mut cfg = TestConfig::new(&env);
    cfg.toml = cfg.toml.replace(env.redis_url(), via_proxy.as_str());
    let config = cfg.load(common::Component::FormProcessor);
    let redis = common::connect::redis(&config).await.expect("redis");
    let ping = |mut r: common::RedisHandle| async move {
        redis::cmd("PING").query_async::<String>(&mut r).await
    };
    assert_eq!(ping(redis.clone()).await.unwrap(), "PONG");

    proxy.down();
    // Commands during the outage, as the agents' heartbeats and leases send
    // them: they fail, and start the manager's reconnect.
    let during: Vec<_> = (0..4).map(|_| tokio::spawn(ping(redis.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(10)).await; // the outage itself
    proxy.up();
    let back = Instant::now();

    let deadline = Duration::from_secs(20);
    let recovered = tokio::time::timeout(deadline, async {
        loop {
            if let Ok(Ok(pong)) =
                tokio::time::timeout(Duration::from_secs(2), ping(redis.clone())).await
            {
                return pong;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(
        recovered.as_deref(),
        Ok("PONG"),
        "no PONG within {deadline:?} after Redis came back"
    );
    eprintln!(
        "Redis answered again {:?} after it came back",
        back.elapsed()
    );
    for d in during {
        let _ = tokio::time::timeout(Duration::from_secs(30), d).await;
    }
}
