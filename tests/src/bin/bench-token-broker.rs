//! Benchmark: token-endpoint requests per profile-hour while 10 simulated
//! fetchers read the token every second, (a) with no failures and (b) with
//! all 10 reporting the same refused token at once every 10 minutes.
//!
//! Time is scaled down 60×: one real second stands for one minute, so a
//! 75-minute Entra token lives 75 s and the 5-minute refresh floor is 5 s.
//! Needs the test servers (`scripts/services up`).
//!
//! `cargo run --release -p mailagent-tests --bin bench-token-broker [-- --hours 3]`

use std::time::{Duration, Instant};

use clap::Parser;
use common::keys::Keys;
use common::shutdown::CancellationToken;
use common::token::TokenClient;
use common::Component;
use mailagent_tests::env::Endpoints;
use mailagent_tests::harness::TestConfig;
use mailagent_tests::idp::TestIdp;

/// Options.
#[derive(Debug, Parser)]
struct Args {
    /// Scaled hours to run each case for (one scaled hour = 60 real seconds).
    #[arg(long, default_value_t = 3)]
    hours: u64,
}

const SCALE: u64 = 60;
const FETCHERS: usize = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = Endpoints::load();
    println!("token broker benchmark: time scaled {SCALE}x (1 s = 1 min), token lifetime 75 min, {FETCHERS} fetchers reading every second");
    for (label, event_every) in [
        ("(a) no failures", None),
        (
            "(b) 10 fetchers report the same refused token every 10 min",
            Some(10),
        ),
    ] {
        let per_hour = run_case(&env, args.hours, event_every).await?;
        println!(
            "{label}: {:.2} token requests per profile-hour{}",
            per_hour.0, per_hour.1
        );
    }
    Ok(())
}

async fn run_case(
    env: &Endpoints,
    hours: u64,
    event_every_min: Option<u64>,
) -> anyhow::Result<(f64, String)> {
    let idp = TestIdp::start(env).await;
    idp.set_lifetime(Duration::from_secs(75 * 60 / SCALE));
    let (app, secret) = idp.register_app();
    let mut cfg = TestConfig::new(env);
    cfg.idp_profile("p", &idp.token_url(), &app, &secret)
        .broker_setting(&format!("refresh-lead-min = {}", 300 / SCALE))
        .broker_setting("forced-refresh-min-interval = 0");
    let config = cfg.load(Component::TokenBroker);
    let shutdown = CancellationToken::new();
    let broker = tokio::spawn(token_broker::run(config.clone(), shutdown.clone()));
    let redis = mailagent_tests::harness::redis_at(env.redis_url()).await;
    let client = TokenClient::new(
        redis,
        Keys::new(cfg.redis_prefix.clone()),
        &config.token_broker.encryption,
    );
    // Wait for the first token, then count from there.
    while client.current("p").await?.is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let baseline = idp.request_count(&app);
    let run_for = Duration::from_secs(hours * 3600 / SCALE);
    let started = Instant::now();
    let mut readers = Vec::new();
    for _ in 0..FETCHERS {
        let client = client.clone();
        readers.push(tokio::spawn(async move {
            let mut missing = 0u64;
            while started.elapsed() < run_for {
                if client.current("p").await.ok().flatten().is_none() {
                    missing += 1;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            missing
        }));
    }
    let mut events = 0u64;
    if let Some(every) = event_every_min {
        let period = Duration::from_secs(every * 60 / SCALE);
        let mut next = started + period;
        while started.elapsed() < run_for {
            tokio::time::sleep_until(next.into()).await;
            next += period;
            if let Some(current) = client.current("p").await? {
                for _ in 0..FETCHERS {
                    client.report_failure("p", &current).await?;
                }
                events += 1;
            }
        }
    } else {
        tokio::time::sleep(run_for).await;
    }
    let mut missing = 0;
    for r in readers {
        missing += r.await?;
    }
    let requests = idp.request_count(&app) - baseline;
    shutdown.cancel();
    let _ = broker.await;
    let scaled_hours = started.elapsed().as_secs_f64() * SCALE as f64 / 3600.0;
    let detail = format!(
        " ({requests} requests in {scaled_hours:.1} scaled hours; {events} failure events; reads without a valid token: {missing})"
    );
    Ok((requests as f64 / scaled_hours, detail))
}
