//! The malformed-mail corpus (issue 8, `tests/corpus/`, made by
//! `mailagent_tests::corpus`): every entry — broken MIME, hostile headers,
//! RFC 2047 abuse, huge headers and part counts, deep nesting, base64
//! garbage, fake and abusive workbooks, bad object maps — goes through the
//! real form processor and ends as the record or the rejection written
//! beside it in `tests/corpus/expected.tsv`; the processor never exits.
//!
//! The peak RSS of the processor as a process over the corpus is a
//! measurement, not a test (`#[ignore]`):
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo test --release -p mailagent-tests --test corpus -- --ignored --nocapture
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::envelope::Envelope;
use mailagent_tests::corpus::{self, Entry, Expect};
use mailagent_tests::forms::*;
use mailagent_tests::process::{self, peak_rss_kib};

const WAIT: Duration = Duration::from_secs(180);

/// Every entry: the checked-in files, then the large generated ones.
fn entries() -> Vec<Entry> {
    let dir = corpus::dir();
    let mut all: Vec<Entry> = corpus::small()
        .into_iter()
        .map(|mut e| {
            let path = dir.join(format!("{}.eml", e.name));
            e.raw = std::fs::read(&path)
                .unwrap_or_else(|err| panic!("{}: {err} (run gen-corpus)", path.display()));
            e
        })
        .collect();
    all.extend(corpus::large());
    all
}

#[test]
fn checked_in_corpus_is_what_the_generator_makes() {
    let dir = corpus::dir();
    let manifest = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let listed = corpus::parse_manifest(&manifest);
    let generated: Vec<Entry> = corpus::small().into_iter().chain(corpus::large()).collect();
    assert_eq!(
        listed,
        generated
            .iter()
            .map(|e| (e.name.to_string(), e.expect.clone()))
            .collect::<Vec<_>>(),
        "tests/corpus/expected.tsv is stale: cargo run -p mailagent-tests --bin gen-corpus"
    );
    for e in corpus::small() {
        let on_disk = std::fs::read(dir.join(format!("{}.eml", e.name))).unwrap();
        assert!(
            on_disk == e.raw,
            "tests/corpus/{}.eml is stale: cargo run -p mailagent-tests --bin gen-corpus",
            e.name
        );
    }
    let mut names: Vec<_> = listed.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), listed.len(), "entry names are unique");
}

/// What happened to one message: a record (its triIdTX) or a rejection.
fn outcomes_by_key(
    records: &[form_processor::store::StoredRecord],
    failures: &[form_processor::store::StoredFailure],
) -> HashMap<String, Expect> {
    let mut out = HashMap::new();
    for r in records {
        let id = r
            .fields
            .get("triIdTX")
            .and_then(|v| v.as_str())
            .unwrap_or("<no triIdTX>")
            .to_string();
        out.insert(r.source.dedupe_key.clone(), Expect::Record(id));
    }
    for f in failures {
        out.insert(
            f.source.dedupe_key.clone(),
            Expect::Rejected(f.reason.clone()),
        );
    }
    out
}

/// Publishes every entry and waits until each has an outcome (a record,
/// or a failure confirmed on the dead-letter exchange).
async fn run_corpus(h: &Harness, entries: &[Entry], alive: impl Fn() -> bool) -> Vec<Envelope> {
    let envelopes: Vec<Envelope> = entries.iter().map(|e| envelope(e.raw.clone())).collect();
    for e in &envelopes {
        h.publish(e).await;
    }
    let store = h.store().await;
    let n = entries.len();
    wait_for("an outcome for every corpus entry", WAIT, || async {
        if !alive() {
            return Some(());
        }
        let records = store.count_records().await.ok()? as usize;
        let failures = store.failures().await.ok()?;
        let settled = failures.iter().filter(|f| f.dead_lettered).count();
        (records + settled >= n).then_some(())
    })
    .await;
    envelopes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_corpus_entry_gets_its_expected_outcome_and_the_processor_keeps_running() {
    let entries = entries();
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let mut p = h.start(Default::default());
    let token = p.token.clone();
    let started = Instant::now();
    let watch = tokio::spawn(async move {
        let result = (&mut p.task).await;
        (p, result)
    });
    let envelopes = run_corpus(&h, &entries, || !watch.is_finished()).await;
    let took = started.elapsed();
    if watch.is_finished() {
        let (_, result) = watch.await.unwrap();
        panic!("the form processor exited: {result:?}");
    }
    let store = h.store().await;
    let records = store.records(&Default::default()).await.unwrap();
    let failures = store.failures().await.unwrap();
    let got = outcomes_by_key(&records, &failures);
    let mut wrong = Vec::new();
    for (e, env) in entries.iter().zip(&envelopes) {
        let outcome = got.get(&env.dedupe_key);
        if outcome != Some(&e.expect) {
            let detail = failures
                .iter()
                .find(|f| f.source.dedupe_key == env.dedupe_key)
                .map(|f| f.detail.clone())
                .unwrap_or_default();
            wrong.push(format!(
                "{}: expected {}, got {} {detail}",
                e.name,
                e.expect,
                outcome.map_or("nothing".to_string(), |o| o.to_string())
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} entries differ:\n{}",
        wrong.len(),
        entries.len(),
        wrong.join("\n")
    );
    // Each rejection was dead-lettered exactly once, with its reason.
    let mut dead = h.drain_dead().await;
    dead.sort();
    let mut want: Vec<(String, String)> = entries
        .iter()
        .zip(&envelopes)
        .filter_map(|(e, env)| match &e.expect {
            Expect::Rejected(r) => Some((r.clone(), env.dedupe_key.clone())),
            Expect::Record(_) => None,
        })
        .collect();
    want.sort();
    assert_eq!(dead, want);
    // The 100,000-field map made one record with every field.
    let big = records
        .iter()
        .find(|r| r.fields.get("triIdTX").and_then(|v| v.as_str()) == Some("C-100KF"))
        .expect("the 100,000-field record");
    assert_eq!(big.fields.len(), 100_005);
    assert!(!watch.is_finished(), "the processor is still running");
    eprintln!("{} corpus entries settled in {took:?}", entries.len());
    token.cancel();
    let (_, result) = tokio::time::timeout(Duration::from_secs(30), watch)
        .await
        .expect("the processor stops within 30 s")
        .unwrap();
    result.unwrap().unwrap();
}

/// Measurement: the form-processor binary's peak RSS (VmHWM) over the whole
/// corpus (one round; raise the round count for more traffic). Prints the
/// figure for docs/benchmarks.md. Its stderr goes to
/// `$TMPDIR/corpus-rss-processor.log`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn peak_rss_of_the_processor_process_over_the_corpus() {
    let entries = entries();
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let mut child = process::launch("form-processor", &h.config_path)
        .log_level("warn")
        .log(&std::env::temp_dir().join("corpus-rss-processor.log"))
        .spawn();
    let pid = child.id().expect("pid");
    let started = Instant::now();
    let mut all = Vec::new();
    for round in 0..1 {
        // A different Received header per round: new messages, new dedupe keys.
        let round_entries: Vec<Entry> = entries
            .iter()
            .map(|e| {
                let mut e = e.clone();
                let mut raw = format!("X-Corpus-Round: {round}\r\n").into_bytes();
                raw.extend_from_slice(&e.raw);
                e.raw = raw;
                e
            })
            .collect();
        all.extend(round_entries);
    }
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            let now = peak_rss_kib(pid);
            if now == 0 {
                return peak;
            }
            peak = peak.max(now);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // Running, and not a zombie waiting to be reaped.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
    };
    run_corpus(&h, &all, alive).await;
    assert!(alive(), "the form processor exited");
    let hwm = peak_rss_kib(pid);
    let took = started.elapsed();
    let status = process::stop(&mut child, Duration::from_secs(30))
        .await
        .expect("the form processor stops on SIGTERM");
    let sampled = sampler.await.unwrap();
    println!(
        "corpus: {} messages ({} entries), settled in {took:?}; form-processor VmHWM = {} KiB ({:.1} MiB), sampled peak {} KiB; exit {status}",
        all.len(),
        entries.len(),
        hwm,
        hwm as f64 / 1024.0,
        sampled
    );
    assert!(status.success());
}
