//! The end-to-end benchmark (issue 7), against the servers of
//! `scripts/services`. In one run, on N valid, distinct form mails of about
//! S bytes (a lease workbook of 8 typed fields and 3 payment rows each, the
//! mail padded with a text body up to S) seeded into one fresh IMAP mailbox:
//!
//! - **F**: a raw single-connection `UID FETCH 1:* (BODY.PEEK[])` of that
//!   mailbox over IMAPS, read without parsing (after a warm-up so Dovecot
//!   has indexed the new Maildir files);
//! - **P**: a raw confirmed, persistent publish of the same bytes with the
//!   fetcher's envelope properties, to a private exchange and queue;
//! - **X**: the form-processor's own checks, `analyze::analyze` (MIME
//!   parse, routing, sender check, workbook and object map, validation —
//!   the call its consumer makes for each delivery), on every mail, one
//!   thread, in memory, no I/O;
//! - **E**: the release binaries as processes — `token-broker`,
//!   `form-processor` (`--processors` of them, on SQLite or, with
//!   `--store postgres`, a fresh PostgreSQL database) and `pop-fetcher`
//!   (with a small POP3 maildrop, so its RSS can be read too) started first
//!   and proven working, then `imap-fetcher` — on a fresh Redis prefix,
//!   AMQP prefix and store. E is timed from the first fetch — the instant
//!   the fetcher logs `selected folder` for the mailbox, right before its
//!   first `UID SEARCH` and `UID FETCH` — to the moment the store holds
//!   all N records (polled every 50 ms). The time from the fetcher's
//!   process spawn is printed too. E is reported as a ratio of the
//!   servers' serialized ceiling 1/(1/F + 1/P) (issue 15's goal: ≥ 50 %),
//!   and of 1/(1/F + 1/P + 1/X) as before;
//! - **IDLE** append→record latency: M form mails appended one after the
//!   other (master-user APPEND) to a second mailbox the same fetcher watches
//!   with IDLE, each timed from sending APPEND until its record is
//!   committed (its dedupe key found in the store, polled every 2 ms);
//! - peak RSS (`VmHWM`) and CPU time of each of the four binaries, read
//!   before they are stopped, and the CPU time every process on the host
//!   used during E (to see where E's time goes).
//!
//! ```sh
//! scripts/services up
//! cargo build --release --bins
//! target/release/bench-e2e --messages 10000 --size 8192 --appends 200
//! target/release/bench-e2e --messages 10000 --size 8192 --appends 0 --store postgres --processors 2
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use common::config::{Component, LoadOptions};
use common::envelope::dedupe_key;
use common::keys::Keys;
use form_processor::analyze;
use form_processor::store::{Known, Store};
use lapin::options::QueueDeleteOptions;
use mailagent_tests::bench::{self, percentile, Figure};
use mailagent_tests::env::{unique, Endpoints};
use mailagent_tests::forms::{lease_workbook, Lease};
use mailagent_tests::harness::{self, mail_table, TestConfig};
use mailagent_tests::idp::TestIdp;
use mailagent_tests::maildir;
use mailagent_tests::{imap_support, mailclient, process};
use tokio::process::Child;

/// Measures F, P, X, E, IDLE latency and RSS (see the module documentation).
#[derive(Debug, Parser)]
struct Args {
    /// Amount and size of the mail, confirm window.
    #[command(flatten)]
    mail: bench::MailArgs,
    /// Appends for the IDLE latency (0 skips it).
    #[arg(long, default_value_t = 200)]
    appends: usize,
    /// Form mails in the POP3 maildrop (processed before E starts).
    #[arg(long, default_value_t = 20)]
    pop_messages: usize,
    /// Keep the config, the logs, the metrics and the SQLite file.
    #[arg(long)]
    keep: bool,
    /// The record store: `sqlite` (a file in the run's directory) or
    /// `postgres` (a fresh database on the `scripts/services` server).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    store: String,
    /// How many form-processors consume the queue.
    #[arg(long, default_value_t = 1)]
    processors: usize,
}

/// The OAuth profile of the config.
const PROFILE: &str = "bench";
/// Mail config names.
const BULK: &str = "bulk";
const IDLE: &str = "idle";
const POP: &str = "pop";

/// Builds `n` form mails on every core.
fn form_mails(tag: &str, n: usize, size: usize) -> Vec<Vec<u8>> {
    let threads = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(2);
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|from| {
                s.spawn(move || {
                    (from..(from + chunk).min(n))
                        .map(|i| bench::form_mail(tag, i, size))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("mail builder"))
            .collect()
    })
}

/// X: the form-processor's checks on every mail, on this one thread.
fn parse_all(mails: &[Vec<u8>], config: &common::Config) -> anyhow::Result<Figure> {
    let started = Instant::now();
    let mut accepted = Vec::with_capacity(mails.len());
    for (i, m) in mails.iter().enumerate() {
        let result = analyze::analyze(m, &config.form_processor, &config.topics).result;
        match result {
            Ok(a) => accepted.push(a),
            Err(r) => bail!("X: mail {i} rejected: {r:?}"),
        }
    }
    let elapsed = started.elapsed();
    let first = accepted.first().context("X: no mail")?;
    ensure!(
        first.form.fields.len() == 8 && first.form.children.len() == 3,
        "X: expected 8 fields and 3 children, got {} and {}",
        first.form.fields.len(),
        first.form.children.len()
    );
    Ok(Figure {
        name: "X  analyze (MIME, route, workbook, map, validate), 1 thread",
        messages: mails.len(),
        bytes: mails.iter().map(|m| m.len() as u64).sum(),
        elapsed,
    })
}

/// A free loopback port (bound, then released) for an admin endpoint.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One of the release binaries, running.
struct Proc {
    name: String,
    pid: u32,
    child: Child,
    admin: u16,
    log: PathBuf,
}

impl Proc {
    /// Starts `target/release/<bin> --config <config>` as `name`, logging
    /// to `dir`.
    fn start(bin: &str, name: &str, config: &Path, dir: &Path) -> anyhow::Result<Self> {
        let admin = free_port()?;
        let log = dir.join(format!("{name}.log"));
        let child = process::launch(bin, config)
            .clean_env()
            .log_level("info")
            .env("MAILAGENT_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .log(&log)
            .try_spawn()?;
        let pid = child.id().context("pid")?;
        Ok(Self {
            name: name.to_string(),
            pid,
            child,
            admin,
            log,
        })
    }

    /// Fails when the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// Its Prometheus metrics, as text.
    async fn metrics(&self, http: &reqwest::Client) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        match http.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// SIGTERM by pid, then waits (SIGKILL after 20 s).
    async fn stop(mut self) -> Option<std::process::ExitStatus> {
        let status = process::stop(&mut self.child, Duration::from_secs(20)).await;
        if status.is_none() {
            eprintln!(
                "{} did not stop within 20 s of SIGTERM; killed it",
                self.name
            );
        }
        status
    }
}

/// Polls `check` every `every` until it returns true; fails naming `what`
/// after `within`, or as soon as one of `procs` has exited.
async fn wait_for<F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    procs: &mut [Proc],
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut exited = None;
    let done = harness::poll(within, every, || {
        let fut = check();
        if exited.is_none() {
            exited = procs.iter_mut().find_map(|p| p.check_alive().err());
        }
        let stop = exited.is_some();
        async move { stop || fut.await }
    })
    .await;
    if let Some(e) = exited {
        return Err(e);
    }
    ensure!(done, "timed out after {within:?} waiting for {what}");
    Ok(())
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing's JSON
/// logs write it (`2026-11-28T17:01:02.345678Z`).
fn rfc3339_secs(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// When the fetcher logged `selected folder` for config `name` (epoch s).
fn selected_at(log: &Path, name: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        let fields = v.get("fields")?;
        if fields.get("message")?.as_str()? != "selected folder"
            || fields.get("config")?.as_str()? != name
        {
            return None;
        }
        rfc3339_secs(v.get("timestamp")?.as_str()?)
    })
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The 1-minute load average, sampled every second while the run lasts.
#[derive(Clone, Default)]
struct LoadSamples(Arc<Mutex<Vec<f64>>>);

impl LoadSamples {
    fn start(&self) -> tokio::task::JoinHandle<()> {
        let samples = self.0.clone();
        tokio::spawn(async move {
            loop {
                if let Some(one) = bench::load_average()
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                {
                    samples.lock().unwrap_or_else(|e| e.into_inner()).push(one);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    /// (min, mean, max) of the samples since index `from`.
    fn summary(&self, from: usize) -> (f64, f64, f64) {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let s = &s[from.min(s.len())..];
        if s.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let min = s.iter().copied().fold(f64::MAX, f64::min);
        let max = s.iter().copied().fold(f64::MIN, f64::max);
        (min, s.iter().sum::<f64>() / s.len() as f64, max)
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The configuration every process reads: the lease topic, a SQLite
/// store in the run's directory, the IdP's app, and the three mailboxes.
fn configure(
    cfg: &mut TestConfig,
    env: &Endpoints,
    store: &str,
    (app, secret, token_url): (&str, &str, &str),
    [bulk, idle, pop]: [&String; 3],
) {
    let imaps = env.mail_addr("IMAPS").port();
    let pop3s = env.mail_addr("POP3S").port();
    let auth = format!("oauth-profile = \"{PROFILE}\"");
    cfg.store(store)
        .idp_profile(PROFILE, token_url, app, secret)
        .lease_topic()
        .incoming_mail(&mail_table(
            BULK,
            bulk,
            imaps,
            "imaps",
            &auth,
            "poll-interval = 60\n",
        ))
        .incoming_mail(&mail_table(
            IDLE,
            idle,
            imaps,
            "imaps",
            &auth,
            "poll-interval = 60\nstart-from = \"now\"\n",
        ))
        .incoming_mail(&mail_table(
            POP,
            pop,
            pop3s,
            "pop3s",
            &auth,
            "after-fetch = \"delete\"\n",
        ));
}

fn load_config(path: &Path, component: Component) -> anyhow::Result<common::Config> {
    common::config::load(
        &LoadOptions {
            path: Some(path.to_path_buf()),
            env: vec![],
        },
        component,
    )
    .map_err(|e| anyhow::anyhow!("config: {e}"))
}

/// What the end-to-end phase measured.
struct EndToEnd {
    /// From the fetcher's first fetch to the last commit.
    from_fetch: Figure,
    /// From the fetcher's process spawn to the last commit.
    from_spawn: Duration,
    /// From spawn to the first fetch.
    startup: Duration,
    /// From spawn to the first of the N records.
    first_record: Duration,
    /// CPU seconds used during E, by command name.
    cpu: Vec<(String, f64)>,
}

/// E: starts the imap-fetcher and waits for every record.
async fn end_to_end(
    args: &Args,
    procs: &mut Vec<Proc>,
    store: &Store,
    config_path: &Path,
    dir: &Path,
    bytes: u64,
) -> anyhow::Result<EndToEnd> {
    let (already, n) = (args.pop_messages, args.mail.messages);
    let before = bench::cpu_snapshot();
    let spawned_wall = SystemTime::now();
    let spawned = Instant::now();
    procs.push(Proc::start(
        "imap-fetcher",
        "imap-fetcher",
        config_path,
        dir,
    )?);
    let target = (already + n) as i64;
    let first_record = std::cell::Cell::new(None);
    let within = Duration::from_secs(600.max(n as u64 / 10));
    wait_for(
        &format!("{n} records from the IMAP mailbox"),
        within,
        Duration::from_millis(50),
        procs,
        || async {
            let count = store.count_records().await.unwrap_or(0);
            if first_record.get().is_none() && count > already as i64 {
                first_record.set(Some(spawned.elapsed()));
            }
            count >= target
        },
    )
    .await?;
    let from_spawn = spawned.elapsed();
    let done_wall = SystemTime::now();
    let after = bench::cpu_snapshot();
    let fetcher = procs.last().context("fetcher")?;
    let selected = selected_at(&fetcher.log, BULK)
        .context("the fetcher's `selected folder` log line for the bulk mailbox")?;
    let spawn_s = epoch_secs(spawned_wall);
    let startup = Duration::from_secs_f64((selected - spawn_s).max(0.0));
    let from_fetch = Duration::from_secs_f64(epoch_secs(done_wall) - selected);
    Ok(EndToEnd {
        from_fetch: Figure {
            name: match (args.store.as_str(), args.processors) {
                ("postgres", 1) => "E  imap-fetcher → RabbitMQ → form-processor → PostgreSQL",
                ("postgres", _) => "E  imap-fetcher → RabbitMQ → form-processors → PostgreSQL",
                (_, 1) => "E  imap-fetcher → RabbitMQ → form-processor → SQLite",
                _ => "E  imap-fetcher → RabbitMQ → form-processors → SQLite",
            },
            messages: n,
            bytes,
            elapsed: from_fetch,
        },
        from_spawn,
        startup,
        first_record: first_record.get().unwrap_or_default(),
        cpu: bench::cpu_between(&before, &after),
    })
}

/// IDLE: `appends` form mails appended one after the other; each timed from
/// sending APPEND until its record is committed.
async fn idle_latency(
    env: &Endpoints,
    store: &Store,
    redis: &redis::aio::ConnectionManager,
    keys: &Keys,
    procs: &mut [Proc],
    mailbox: &str,
    args: &Args,
) -> anyhow::Result<Vec<Duration>> {
    let (appends, size) = (args.appends, args.mail.size);
    let checkpoint = keys.checkpoint(IDLE);
    wait_for(
        "the IDLE config's first pass",
        Duration::from_secs(60),
        Duration::from_millis(100),
        procs,
        || async {
            redis::AsyncCommands::hexists(&mut redis.clone(), &checkpoint, "last-uid")
                .await
                .unwrap_or(false)
        },
    )
    .await?;
    // The checkpoint is written at the end of the first pass; IDLE follows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = imap_support::master(env, mailbox).await;
    let mut latencies = Vec::with_capacity(appends);
    for i in 0..appends {
        let m = bench::form_mail("idle", i, size);
        let key = dedupe_key(mailbox, &m);
        let t0 = Instant::now();
        mailclient::imap_append(&mut conn, &format!("a{i}"), "INBOX", &m).await?;
        let deadline = t0 + Duration::from_secs(30);
        loop {
            match store.lookup(&key).await? {
                Some(Known::Record(_)) => break,
                Some(Known::Failure { reason, detail, .. }) => {
                    bail!("IDLE: append {i} was rejected: {reason} ({detail})")
                }
                None => {}
            }
            ensure!(
                Instant::now() < deadline,
                "IDLE: no record within 30 s of append {i}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

/// Removes what the run left in the shared servers.
async fn clean_up(env: &Endpoints, prefixes: &[&str], mailboxes: &[&str]) {
    if let Ok(conn) =
        lapin::Connection::connect(env.amqp_url(), lapin::ConnectionProperties::default()).await
    {
        if let Ok(channel) = conn.create_channel().await {
            for p in prefixes {
                for q in ["create", "dead"] {
                    let _ = channel
                        .queue_delete(&format!("{p}.{q}"), QueueDeleteOptions::default())
                        .await;
                }
            }
        }
        let _ = conn.close(200, "done").await;
    }
    if let Ok(client) = redis::Client::open(env.redis_url()) {
        if let Ok(mut r) = client.get_multiplexed_async_connection().await {
            for p in prefixes {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{p}:*"))
                    .query_async(&mut r)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: redis::RedisResult<i64> =
                        redis::cmd("DEL").arg(&keys).query_async(&mut r).await;
                }
            }
        }
    }
    for m in mailboxes {
        maildir::remove(env, m);
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = Endpoints::load();
    let prefix = unique("e2eb");
    let private = unique("e2ep");
    let mut cfg = TestConfig::with_prefix(&env, &prefix);
    let load = LoadSamples::default();
    let sampler = load.start();
    let started_at = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let bulk = format!("{prefix}-bulk@contoso.com");
    let idle = format!("{prefix}-idle@contoso.com");
    let pop = format!("{prefix}-pop@contoso.com");

    let result = run(
        &args,
        &env,
        &prefix,
        &private,
        &mut cfg,
        &load,
        [&bulk, &idle, &pop],
    )
    .await;
    sampler.abort();
    if !args.keep {
        clean_up(&env, &[&prefix, &private], &[&bulk, &idle, &pop]).await;
        if args.store == "postgres" {
            mailagent_tests::forms::drop_database(env.postgres_url(), &prefix).await;
        }
    }
    match result {
        Ok(()) => {
            println!(
                "run started {started_at}; load average at the end {}",
                bench::load_average()
            );
            if args.keep {
                println!(
                    "config, logs, metrics and records.db kept in {}",
                    cfg.dir.keep().display()
                );
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("logs and config kept in {}", cfg.dir.keep().display());
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &Args,
    env: &Endpoints,
    prefix: &str,
    private: &str,
    cfg: &mut TestConfig,
    load: &LoadSamples,
    [bulk, idle, pop]: [&String; 3],
) -> anyhow::Result<()> {
    println!(
        "bench-e2e: {} form mails of ~{} bytes, {} appends, {} POP3 mails; prefix {prefix}; load average {}",
        args.mail.messages,
        args.mail.size,
        args.appends,
        args.pop_messages,
        bench::load_average()
    );

    // The identity provider, the app and its grants, the config.
    let idp = TestIdp::start(env).await;
    let (app, secret) = idp.register_app();
    let store_url = match args.store.as_str() {
        "postgres" => mailagent_tests::forms::create_database(env.postgres_url(), prefix).await,
        _ => format!("sqlite://{}/records.db", cfg.dir().display()),
    };
    bench::grant_all(
        env,
        &app,
        &[bulk.to_string(), idle.to_string(), pop.to_string()],
    )?;
    configure(
        cfg,
        env,
        &store_url,
        (&app, &secret, &idp.token_url()),
        [bulk, idle, pop],
    );
    let dir = cfg.dir().to_path_buf();
    let dir = dir.as_path();
    let config_path = cfg.file("mailagent.toml", &cfg.toml);
    let processor_config = load_config(&config_path, Component::FormProcessor)?;
    let mut publish_config = load_config(&config_path, Component::ImapFetcher)?;
    publish_config.amqp.prefix = private.to_string();

    // The mails.
    let t = Instant::now();
    let mails = form_mails(prefix, args.mail.messages, args.mail.size);
    let bytes: u64 = mails.iter().map(|m| m.len() as u64).sum();
    let workbook = lease_workbook(&Lease::default()).len();
    println!(
        "   (built {} form mails in {:.1} s; {:.0} bytes on average, {} to {}; the workbook alone {workbook} bytes)",
        mails.len(),
        t.elapsed().as_secs_f64(),
        bytes as f64 / mails.len().max(1) as f64,
        mails.iter().map(Vec::len).min().unwrap_or(0),
        mails.iter().map(Vec::len).max().unwrap_or(0),
    );
    maildir::seed(env, bulk, &mails);
    let pop_mails = form_mails(&format!("{prefix}p"), args.pop_messages, args.mail.size);
    maildir::seed(env, pop, &pop_mails);
    // The IDLE mailbox exists before the fetcher logs in; this message is
    // not a form and is skipped (`start-from = "now"`).
    imap_support::append(
        env,
        idle,
        "INBOX",
        &maildir::message("idle-warm", 0, 300, false),
    )
    .await;
    let warm = bench::warm_up(env, bulk).await?;
    println!(
        "   (Dovecot indexed the mailbox in {:.2} s)",
        warm.as_secs_f64()
    );

    // F, P, X.
    let f = bench::raw_fetch(env, bulk, args.mail.messages).await?;
    f.print();
    let p = bench::raw_publish(&publish_config, bulk, &mails, args.mail.window).await?;
    p.print();
    let x = {
        let mails = &mails;
        let config = &processor_config;
        std::thread::scope(|s| s.spawn(|| parse_all(mails, config)).join())
            .map_err(|_| anyhow::anyhow!("X panicked"))??
    };
    x.print();
    let servers = bench::ceiling(&[&f, &p]);
    let ceiling = bench::ceiling(&[&f, &p, &x]);
    println!(
        "ceiling 1/(1/F+1/P) = {servers:.0} msg/s; with X, 1/(1/F+1/P+1/X) = {ceiling:.0} msg/s"
    );

    // The agent: broker, processor, POP3 fetcher first, proven working.
    let store = Store::open(processor_config.form_processor.store.expose(), None)
        .await
        .context("open the record store")?;
    let redis_client = redis::Client::open(env.redis_url())?;
    let redis = redis::aio::ConnectionManager::new(redis_client).await?;
    let keys = Keys::new(prefix.to_string());
    let http = reqwest::Client::new();
    let mut procs: Vec<Proc> = Vec::new();
    let outcome = async {
        procs.push(Proc::start("token-broker", "token-broker", &config_path, dir)?);
        let token_key = keys.token(PROFILE);
        wait_for(
            "a token in Redis",
            Duration::from_secs(60),
            Duration::from_millis(100),
            &mut procs,
            || async {
                redis::AsyncCommands::exists(&mut redis.clone(), &token_key)
                    .await
                    .unwrap_or(false)
            },
        )
        .await?;
        for i in 0..args.processors.max(1) {
            let name = match i {
                0 => "form-processor".to_string(),
                i => format!("form-processor-{}", i + 1),
            };
            procs.push(Proc::start("form-processor", &name, &config_path, dir)?);
        }
        procs.push(Proc::start("pop-fetcher", "pop-fetcher", &config_path, dir)?);
        let pop_n = args.pop_messages as i64;
        wait_for(
            "the POP3 mails' records",
            Duration::from_secs(120),
            Duration::from_millis(100),
            &mut procs,
            || async { store.count_records().await.unwrap_or(0) >= pop_n },
        )
        .await?;

        let load_from = load.len();
        let e = end_to_end(
            args,
            &mut procs,
            &store,
            &config_path,
            dir,
            bytes,
        )
        .await?;
        let e_load = load.summary(load_from);
        let failures = store.failures().await.map(|f| f.len()).unwrap_or(0);
        e.from_fetch.print();
        println!(
            "   (from the fetcher's spawn: {:.2} s = {:.0} msg/s; its first fetch {:.0} ms after spawn; first record {:.2} s after spawn; {failures} rejections)",
            e.from_spawn.as_secs_f64(),
            args.mail.messages as f64 / e.from_spawn.as_secs_f64(),
            e.startup.as_secs_f64() * 1e3,
            e.first_record.as_secs_f64(),
        );
        let ratio = e.from_fetch.rate() / servers;
        println!(
            "E / 1/(1/F+1/P) = {:.0} / {servers:.0} = {:.0} % (goal ≥ 50 %: {}); E / 1/(1/F+1/P+1/X) = {:.0} %",
            e.from_fetch.rate(),
            100.0 * ratio,
            if ratio >= 0.5 { "met" } else { "NOT met" },
            100.0 * e.from_fetch.rate() / ceiling,
        );
        println!(
            "   load average (1 min) during E: min {:.2}, mean {:.2}, max {:.2}",
            e_load.0, e_load.1, e_load.2
        );
        println!("   CPU seconds used during E ({:.2} s wall), by command:", e.from_spawn.as_secs_f64());
        for (comm, secs) in e.cpu.iter().take(12) {
            println!("     {comm:<28} {secs:>7.2} s");
        }
        let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(2);
        println!(
            "     {:<28} {:>7.2} s of {:.2} s available on {cores} cores",
            "all processes",
            e.cpu.iter().map(|c| c.1).sum::<f64>(),
            e.from_spawn.as_secs_f64() * cores as f64
        );

        if args.appends > 0 {
            let l = idle_latency(
                env,
                &store,
                &redis,
                &keys,
                &mut procs,
                idle,
                args,
            )
            .await?;
            let p99 = percentile(&l, 0.99);
            println!(
                "IDLE append→record over {} appends: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 < 1 s: {})",
                l.len(),
                percentile(&l, 0.50).as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                l.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                if p99 < Duration::from_secs(1) { "met" } else { "NOT met" }
            );
        }

        println!("{:<16} {:>12} {:>12} {:>14}", "binary", "peak RSS", "RSS now", "CPU total");
        for p in procs.iter_mut() {
            p.check_alive()?;
            let (rss, hwm) = process::rss_kb(p.pid).context("read /proc/<pid>/status")?;
            let cpu = bench::cpu_ticks(p.pid).map(|c| c.1).unwrap_or(0);
            println!(
                "{:<16} {:>9.1} MB {:>9.1} MB {:>12.2} s",
                p.name,
                hwm as f64 / 1024.0,
                rss as f64 / 1024.0,
                cpu as f64 / bench::TICKS_PER_SEC
            );
            let metrics = p.metrics(&http).await;
            std::fs::write(dir.join(format!("{}.metrics", p.name)), metrics)?;
        }
        anyhow::Ok(())
    }
    .await;

    // Stop every child (SIGTERM by pid) in the reverse of their start
    // order: the fetchers first, the token broker last.
    while let Some(p) = procs.pop() {
        let name = p.name.clone();
        let status = p.stop().await;
        if outcome.is_ok() && !status.is_some_and(|s| s.success()) {
            eprintln!("{name} stopped with {status:?}");
        }
    }
    store.close().await;
    drop(idp);
    outcome
}
