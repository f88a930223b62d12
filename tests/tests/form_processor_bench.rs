//! Benchmark, not a test (`#[ignore]`, never a timing assertion): records/s
//! of the form-processor binary for 10,000 queued form mails (8 fields, 3
//! children) on SQLite and PostgreSQL, and its peak RSS. Run with
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

use mailagent_tests::forms::*;
use mailagent_tests::process::{launch, peak_rss_kib, stop};

async fn bench(kind: StoreKind, extra: &[&str]) {
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
    let mut child = launch("form-processor", &h.config_path)
        .log_level("warn")
        .spawn();
    let pid = child.id().expect("pid");
    let started = Instant::now();
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        peak = peak.max(peak_rss_kib(pid));
        if store.count_records().await.is_ok_and(|c| c as usize >= n) {
            break;
        }
        assert!(Instant::now() < deadline, "not every record after 600 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    peak = peak.max(peak_rss_kib(pid));
    stop(&mut child, Duration::from_secs(30)).await;
    println!(
        "form-processor bench {kind:?} {extra:?}: {n} forms (8 fields, 3 children) in {:.2} s = {:.0} records/s; \
         peak RSS {:.1} MiB; (publishing took {:.2} s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        peak as f64 / 1024.0,
        publish.as_secs_f64()
    );
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
