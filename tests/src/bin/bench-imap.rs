//! The IMAP fetcher's benchmark (issue 4), against the servers of
//! `scripts/services`. In one run, on N messages of S bytes in one INBOX:
//!
//! - F: a raw single-connection `UID FETCH 1:* (BODY.PEEK[])` over IMAPS,
//!   the response read without parsing (only the tagged OK is looked for);
//! - P: a raw confirmed, persistent publish of the same bytes (lapin,
//!   confirm mode, a window of outstanding confirms) with the fetcher's
//!   envelope properties, to the exchange and durable queue it uses;
//! - R: imap-fetcher (in process) fetching, publishing with confirms and
//!   marking them `\Seen`, timed from its start until all N are in the
//!   queue and its checkpoint (written after the flags) is at the last UID;
//! - IDLE append→publish latency: one config in IDLE, M appends one after
//!   the other, each timed from sending APPEND to its arrival at a consumer;
//! - RSS of one `imap-fetcher` process (the release binary) holding K idle
//!   mail configs, each its own mailbox and TLS session.
//!
//! R is reported as a ratio of the serialized ceiling 1/(1/F + 1/P).
//!
//! ```sh
//! scripts/services up
//! cargo build --release -p imap-fetcher -p mailagent-tests --bin imap-fetcher --bin bench-imap
//! target/release/bench-imap --messages 10000 --size 8192
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use mailagent_tests::bench::{self, percentile, Figure};
use mailagent_tests::imap_support::{self as support, Fixture};
use mailagent_tests::mailclient;
use mailagent_tests::maildir;
use mailagent_tests::process::{self, rss_kb};

/// Measures F, P, R, IDLE latency and RSS (see the module documentation).
#[derive(Debug, Parser)]
struct Args {
    /// Amount and size of the mail, confirm window.
    #[command(flatten)]
    mail: bench::MailArgs,
    /// The fetcher's `batch-size` in R (its default unless given).
    #[arg(long, default_value_t = common::config::DEFAULT_BATCH_SIZE)]
    batch_size: u32,
    /// Appends for the IDLE latency (0 skips it).
    #[arg(long, default_value_t = 200)]
    appends: usize,
    /// Skip F, P and R (e.g. to measure only the RSS).
    #[arg(long)]
    skip_throughput: bool,
    /// Idle mail configs for the RSS figure (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle_configs: usize,
}

/// R: the fetcher, in process, until everything is published, flagged and
/// checkpointed.
async fn measure_fetcher(
    fx: &Fixture,
    config: common::Config,
    n: usize,
    bytes: u64,
    last_uid: u32,
) -> anyhow::Result<Figure> {
    use redis::AsyncCommands;
    let channel = fx.channel().await;
    let mut redis = fx.redis().await;
    let key = fx.keys().checkpoint("bench-r");
    let shutdown = common::shutdown::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(common::fetch::run(
        imap_fetcher::Imap,
        config,
        imap_fetcher::Options::default(),
        shutdown.clone(),
    ));
    let deadline = started + Duration::from_secs(600);
    let mut published_at = None;
    loop {
        ensure!(Instant::now() < deadline, "R did not finish in 10 min");
        if published_at.is_none() && support::depth(&channel, &fx.queue()).await as usize >= n {
            published_at = Some(started.elapsed());
        }
        let last: Option<String> = redis.hget(&key, "last-uid").await?;
        if published_at.is_some() && last == Some(last_uid.to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "   (R: all {n} in the queue after {:.2} s; flagged and checkpointed after {:.2} s)",
        published_at.unwrap_or_default().as_secs_f64(),
        elapsed.as_secs_f64()
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    let depth = support::depth(&channel, &fx.queue()).await as usize;
    ensure!(depth == n, "R published {depth} messages, expected {n}");
    support::purge(&channel, &fx.queue()).await;
    Ok(Figure {
        name: "R  imap-fetcher: fetch, publish+confirm, \\Seen, checkpoint",
        messages: n,
        bytes,
        elapsed,
    })
}

/// IDLE append→publish latency over `appends` appends.
async fn measure_idle(fx: &Fixture, appends: usize) -> anyhow::Result<Vec<Duration>> {
    let mailbox = format!("idle-{}", fx.mailbox);
    fx.env.grant(&fx.app, &mailbox);
    // Create the mailbox (first login) before the fetcher starts.
    support::append(
        &fx.env,
        &mailbox,
        "INBOX",
        &maildir::message("idle-warm", 0, 300, false),
    )
    .await;
    let (config, _) = fx.config(&[fx.mail_table(
        "bench-idle",
        &mailbox,
        "start-from = \"now\"\npoll-interval = 3600",
    )]);
    let channel = fx.channel().await;
    support::purge(&channel, &fx.queue()).await;
    let mut consumer = channel
        .basic_consume(
            &fx.queue(),
            "bench-idle",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    let shutdown = common::shutdown::CancellationToken::new();
    let task = tokio::spawn(common::fetch::run(
        imap_fetcher::Imap,
        config,
        imap_fetcher::Options::default(),
        shutdown.clone(),
    ));
    let redis = fx.redis().await;
    let key = fx.keys().checkpoint("bench-idle");
    let up = support::eventually(Duration::from_secs(30), || async {
        redis::AsyncCommands::hexists(&mut redis.clone(), &key, "last-uid")
            .await
            .unwrap_or(false)
    })
    .await;
    ensure!(up, "IDLE fetcher did not start");
    // Let the first pass end and IDLE begin.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = support::master(&fx.env, &mailbox).await;
    let mut latencies = Vec::with_capacity(appends);
    for i in 0..appends {
        let m = maildir::message("idle", i + 1, 2048, false);
        let t0 = Instant::now();
        mailclient::imap_append(&mut conn, &format!("a{i}"), "INBOX", &m).await?;
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .context("no publish within 30 s of an append")?
            .context("consumer ended")??;
        latencies.push(t0.elapsed());
        ensure!(delivery.data == m, "IDLE: unexpected message");
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    latencies.sort();
    Ok(latencies)
}

/// RSS of the release binary holding `k` idle configs.
async fn measure_rss(fx: &Fixture, k: usize) -> anyhow::Result<(u64, u64, Duration)> {
    let mailboxes: Vec<String> = (0..k).map(|i| format!("rss{i}-{}", fx.mailbox)).collect();
    // One write for all grants (Env::grant waits a second per line).
    bench::grant_all(&fx.env, &fx.app, &mailboxes)?;
    let tables: Vec<String> = mailboxes
        .iter()
        .enumerate()
        .map(|(i, m)| fx.mail_table(&format!("rss{i}"), m, "poll-interval = 3600"))
        .collect();
    let (_, path) = fx.config(&tables);
    // The release binary next to this one (target/release/).
    let mut child = process::launch("imap-fetcher", &path)
        .log_level("warn")
        .log(&fx.dir.path().join("rss.log"))
        .try_spawn()?;
    let pid = child.id().context("pid")?;
    let started = Instant::now();
    let mut redis = fx.redis().await;
    let keys = fx.keys();
    let names: Vec<String> = (0..k)
        .map(|i| keys.checkpoint(&format!("rss{i}")))
        .collect();
    loop {
        let mut pipe = redis::pipe();
        for n in &names {
            pipe.exists(n);
        }
        let present: Vec<bool> = pipe.query_async(&mut redis).await?;
        let up = present.iter().filter(|p| **p).count();
        if up == k {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("only {up} of {k} configs came up in 5 min");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ready = started.elapsed();
    // Settled: every config in IDLE.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, hwm) = rss_kb(pid).context("read /proc status")?;
    // SIGTERM to this one positive pid, then wait for the graceful exit.
    process::stop(&mut child, Duration::from_secs(20)).await;
    Ok((rss, hwm, ready))
}

/// F, P and R, and R's ratio to the serialized ceiling.
async fn throughput(
    fx: &Fixture,
    args: &Args,
    bodies: &[Vec<u8>],
    total: u64,
) -> anyhow::Result<()> {
    maildir::seed(&fx.env, &fx.mailbox, bodies);
    // Warm-up: Dovecot indexes the new Maildir files once (not measured as F).
    let warm = bench::warm_up(&fx.env, &fx.mailbox).await?;
    println!(
        "   (Dovecot indexed the mailbox in {:.2} s)",
        warm.as_secs_f64()
    );

    let f = bench::raw_fetch(&fx.env, &fx.mailbox, args.mail.messages).await?;
    f.print();
    let (config, _) = fx.config(&[fx.mail_table(
        "bench-r",
        &fx.mailbox,
        &format!("batch-size = {}\npoll-interval = 3600", args.batch_size),
    )]);
    // P declares the topology, which the fetcher's least-privilege user (if
    // the fixture gives it one) may not do: P connects as the servers' admin.
    let mut p_config = config.clone();
    p_config.amqp.set_url(common::secret::SecretUrl::new(
        fx.env.amqp_url().to_string(),
    ));
    let p = bench::raw_publish(&p_config, &fx.mailbox, bodies, args.mail.window).await?;
    p.print();
    let r = measure_fetcher(
        fx,
        config,
        args.mail.messages,
        total,
        args.mail.messages as u32,
    )
    .await?;
    r.print();
    let ceiling = bench::ceiling(&[&f, &p]);
    println!(
        "ceiling 1/(1/F+1/P) = {:.0} msg/s; R = {:.0} msg/s = {:.0} % of the ceiling (goal ≥ 80 %)",
        ceiling,
        r.rate(),
        100.0 * r.rate() / ceiling
    );

    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs only when asked for (RUST_LOG=imap_fetcher=debug …).
    let _telemetry = std::env::var_os("RUST_LOG").map(|_| common::telemetry::init("bench-imap"));
    let fx = Fixture::new("bench");
    println!(
        "bench-imap: {} messages of {} bytes, window {}, batch-size {}; mailbox {}",
        args.mail.messages, args.mail.size, args.mail.window, args.batch_size, fx.mailbox
    );
    let bodies: Vec<Vec<u8>> = (0..args.mail.messages)
        .map(|i| {
            let mut m = maildir::message(&fx.prefix, i, args.mail.size, false);
            m.truncate(args.mail.size.max(200));
            m
        })
        .collect();
    let total: u64 = bodies.iter().map(|b| b.len() as u64).sum();
    fx.plant_token().await;
    if !args.skip_throughput {
        throughput(&fx, &args, &bodies, total).await?;
    }

    if args.appends > 0 {
        let l = measure_idle(&fx, args.appends).await?;
        println!(
            "IDLE append→publish over {} appends: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 < 1 s)",
            l.len(),
            percentile(&l, 0.50).as_secs_f64() * 1e3,
            percentile(&l, 0.99).as_secs_f64() * 1e3,
            l.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }
    if args.idle_configs > 0 {
        let (rss, hwm, ready) = measure_rss(&fx, args.idle_configs).await?;
        println!(
            "RSS of one imap-fetcher holding {} idle configs: {:.1} MB (peak {:.1} MB); all up after {:.1} s (goal < 100 MB)",
            args.idle_configs,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            ready.as_secs_f64()
        );
    }
    Ok(())
}
