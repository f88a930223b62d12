//! Benchmark, not a test (`#[ignore]`, never a timing assertion): records/s
//! of the form-processor binary for 10,000 queued form mails (8 fields, 3
//! children) on SQLite and PostgreSQL — one processor, and two on one
//! PostgreSQL database —, its peak RSS and where the host's CPU went
//! meanwhile; and X, the parse-only rate of `analyze::analyze` on one
//! thread over 10 KB form mails. Run with
//!
//! ```text
//! scripts/services up
//! cargo build --release --workspace --bins
//! cargo nextest run --release -p mailagent-tests --test form_processor_bench \
//!     --run-ignored only --no-capture
//! ```
//!
//! `FORM_BENCH_N` changes the number of mails. Figures go in docs/benchmarks.md.

use std::time::{Duration, Instant};

use form_processor::analyze;
use mailagent_tests::bench::{cpu_between, cpu_snapshot, load_average};
use mailagent_tests::forms::*;
use mailagent_tests::process::{launch, peak_rss_kib, stop};

async fn bench(kind: StoreKind, extra: &[&str]) {
    bench_with(kind, extra, 1).await;
}

/// `processors` form-processor binaries drain the same queue into the same
/// store.
async fn bench_with(kind: StoreKind, extra: &[&str], processors: usize) {
    let n: usize = std::env::var("FORM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut settings = vec!["prefetch = 256"];
    settings.extend_from_slice(extra);
    let h = Harness::new(kind, &settings).await;
    let started = Instant::now();
    h.publish_leases(n).await;
    let publish = started.elapsed();
    let store = h.store().await;
    let load_before = load_average();
    let cpu_before = cpu_snapshot();
    let mut children: Vec<_> = (0..processors)
        .map(|_| {
            launch("form-processor", &h.config_path)
                .log_level("warn")
                .spawn()
        })
        .collect();
    let pids: Vec<u32> = children.iter().map(|c| c.id().expect("pid")).collect();
    let started = Instant::now();
    let mut peak = vec![0; processors];
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        for (peak, pid) in peak.iter_mut().zip(&pids) {
            *peak = (*peak).max(peak_rss_kib(*pid));
        }
        let count = store.count_records().await.map_or(0, |c| c as usize);
        if count >= n {
            break;
        }
        assert!(Instant::now() < deadline, "not every record after 600 s");
        // The count scans the records table: asked every 20 ms all along,
        // it cost the store (and the two cores) a visible share of the
        // run. Every 200 ms until 95 % are in, then every 20 ms.
        let pause = if count * 20 < n * 19 { 200 } else { 20 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let took = started.elapsed();
    let cpu = cpu_between(&cpu_before, &cpu_snapshot());
    let load_after = load_average();
    for (peak, pid) in peak.iter_mut().zip(&pids) {
        *peak = (*peak).max(peak_rss_kib(*pid));
    }
    for child in &mut children {
        stop(child, Duration::from_secs(30)).await;
    }
    let peaks: Vec<String> = peak
        .iter()
        .map(|p| format!("{:.1} MiB", *p as f64 / 1024.0))
        .collect();
    println!(
        "form-processor bench {kind:?} {extra:?} x{processors}: {n} forms (8 fields, 3 children) in {:.2} s = {:.0} records/s; \
         peak RSS {}; (publishing took {:.2} s); load average {load_before} before, {load_after} after",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        peaks.join(", "),
        publish.as_secs_f64()
    );
    let available =
        took.as_secs_f64() * std::thread::available_parallelism().map_or(2, |c| c.get()) as f64;
    let used: f64 = cpu.iter().map(|(_, s)| s).sum();
    println!(
        "  CPU during the run: {used:.1} of {available:.1} CPU-seconds (by command, approximate):"
    );
    for (comm, secs) in cpu.iter().take(12) {
        println!(
            "    {comm:<20} {secs:>6.2} s  {:>5.1} %",
            100.0 * secs / available
        );
    }
}

#[tokio::test]
#[ignore = "benchmark: run with --run-ignored only"]
async fn bench_sqlite() {
    bench(StoreKind::Sqlite, &[]).await;
}

/// What `synchronous = FULL` (the default) costs: the same run with NORMAL.
#[tokio::test]
#[ignore = "benchmark: run with --run-ignored only"]
async fn bench_sqlite_synchronous_normal() {
    bench(StoreKind::Sqlite, &["sqlite-synchronous = \"normal\""]).await;
}

#[tokio::test]
#[ignore = "benchmark: run with --run-ignored only"]
async fn bench_postgres() {
    bench(StoreKind::Postgres, &[]).await;
}

/// Two processors on one PostgreSQL database, the same queue.
#[tokio::test]
#[ignore = "benchmark: run with --run-ignored only"]
async fn bench_postgres_two_processors() {
    bench_with(StoreKind::Postgres, &[], 2).await;
}

/// X: `analyze::analyze` — MIME, routing, sender check, workbook, object
/// map, validation: the consumer's whole per-delivery parse — on one
/// thread, in memory, over `FORM_BENCH_N` (10,000) 10 KB form mails, each
/// parsed once after a warm-up pass over the first 1,000.
#[tokio::test]
#[ignore = "benchmark: run with --run-ignored only"]
async fn bench_parse_only() {
    let n: usize = std::env::var("FORM_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let mails: Vec<Vec<u8>> = (0..n)
        .map(|i| mailagent_tests::bench::form_mail("X", i, 10 * 1024))
        .collect();
    let bytes: usize = mails.iter().map(Vec::len).sum();
    let config = h.config.clone();
    let (took, cpu, accepted) = tokio::task::spawn_blocking(move || {
        let parse = |m: &Vec<u8>| {
            analyze::analyze(m, &config.form_processor, &config.topics)
                .result
                .is_ok()
        };
        mails.iter().take(1000).for_each(|m| {
            parse(m);
        });
        let started = Instant::now();
        let cpu_started = thread_cpu();
        let accepted = mails.iter().filter(|m| parse(m)).count();
        (started.elapsed(), thread_cpu() - cpu_started, accepted)
    })
    .await
    .unwrap();
    assert_eq!(accepted, n, "every mail is an accepted form");
    println!(
        "X parse only (analyze, 1 thread): {n} mails of {:.1} KB in {:.3} s wall = {:.0} mails/s; \
         the thread was on a CPU {:.3} s = {:.0} mails per CPU-second, {:.1} µs/mail; load average {}",
        bytes as f64 / n as f64 / 1024.0,
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        cpu.as_secs_f64(),
        n as f64 / cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64,
        load_average()
    );
}

/// Time this thread has been on a CPU (`/proc/thread-self/schedstat`, ns):
/// what one core does, whatever else the shared host runs meanwhile.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}
