//! The form processor and the `mailagent records` CLI as real processes:
//! kill -9 with messages in flight loses and doubles nothing (one processor
//! on SQLite, two on one PostgreSQL database), and the CLI prints the records
//! as §7's JSON lines.

use std::process::Command;
use std::time::Duration;

use mailagent_tests::env::bin_path;
use mailagent_tests::forms::*;
use mailagent_tests::process;
use tokio::process::Child;

fn spawn_processor(h: &Harness) -> Child {
    process::launch("form-processor", &h.config_path)
        .log_level("warn")
        .spawn()
}

#[tokio::test]
async fn kill_9_with_messages_in_flight_loses_none_and_doubles_none() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let n = 1000;
    h.publish_leases(n).await;
    let store = h.store().await;
    let mut child = spawn_processor(&h);
    wait_for("the first records", Duration::from_secs(60), || async {
        let r = store.records(&Default::default()).await.ok()?;
        (r.len() >= 50).then_some(())
    })
    .await;
    child.kill().await.unwrap(); // SIGKILL, and reaped
    let before = store.records(&Default::default()).await.unwrap().len();
    assert!(before < n, "killed before the end ({before} records)");
    let mut child = spawn_processor(&h);
    let records = wait_records(&store, n, Duration::from_secs(120)).await;
    // Let any straggler redelivery settle, then count again.
    wait_for("an empty queue", Duration::from_secs(30), || async {
        (h.queue_depth().await == 0).then_some(())
    })
    .await;
    let records_after = store.records(&Default::default()).await.unwrap();
    assert_eq!(records_after.len(), n, "exactly {n} records");
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| r.fields["triIdTX"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "none twice");
    assert!(
        store.failures().await.unwrap().is_empty(),
        "nothing rejected"
    );
    assert!(h.drain_dead().await.is_empty(), "nothing dead-lettered");
    let status = process::stop(&mut child, Duration::from_secs(30))
        .await
        .expect("form-processor did not stop on SIGTERM");
    assert!(status.success(), "graceful stop exits 0, got {status}");
}

#[tokio::test]
async fn records_cli_prints_one_json_object_a_line() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let p = h.start(Default::default());
    h.publish_leases(2).await;
    let store = h.store().await;
    wait_records(&store, 2, Duration::from_secs(30)).await;
    p.stop().await.unwrap();
    let out = Command::new(bin_path("mailagent"))
        .arg("records")
        .arg("--json")
        .arg("--config")
        .arg(&h.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    // Mails are parsed side by side: either may be committed first.
    let r = lines
        .iter()
        .find(|l| l["fields"]["triIdTX"] == "L-0")
        .unwrap_or_else(|| panic!("no record of L-0 in {lines:?}"));
    for key in [
        "id",
        "module",
        "business-object",
        "fields",
        "children",
        "source",
        "created-at",
    ] {
        assert!(r.get(key).is_some(), "{key} missing from {r}");
    }
    assert_eq!(r["fields"]["triActiveBL"], true);
    assert_eq!(r["children"].as_array().unwrap().len(), 3);
    assert_eq!(r["children"][0]["association"], "Payments");
    assert_eq!(r["source"]["mail-config"], "lease-forms");
    let filtered = Command::new(bin_path("mailagent"))
        .args(["records", "--json", "--topic", "NO SUCH TOPIC", "--config"])
        .arg(&h.config_path)
        .output()
        .unwrap();
    assert!(filtered.status.success());
    assert!(filtered.stdout.is_empty());
}

/// §7a: several processors on one PostgreSQL database. Every mail is
/// delivered twice (as a fetcher's redelivery would), two processors take
/// them at once, and each is killed with SIGKILL in turn while messages are
/// in flight: every dedupe key still gives exactly one record, nothing is
/// rejected and nothing dead-lettered.
#[tokio::test]
async fn two_processors_on_postgres_killed_in_turn_make_one_record_per_dedupe_key() {
    let h = Harness::new(StoreKind::Postgres, &[]).await;
    let n = 600;
    let envelopes: Vec<_> = (0..n).map(|i| lease_envelope(&format!("L-{i}"))).collect();
    for e in envelopes.iter().chain(envelopes.iter()) {
        h.publish(e).await;
    }
    let store = h.store().await;
    let count = || async { store.records(&Default::default()).await.unwrap().len() };
    let mut a = spawn_processor(&h);
    let mut b = spawn_processor(&h);
    for (victim, at) in [(&mut a, n / 5), (&mut b, n / 2)] {
        wait_for(
            &format!("{at} records"),
            Duration::from_secs(120),
            || async { (count().await >= at).then_some(()) },
        )
        .await;
        victim.kill().await.unwrap(); // SIGKILL, and reaped
        *victim = spawn_processor(&h);
    }
    assert!(count().await < n, "both were killed before the end");
    wait_records(&store, n, Duration::from_secs(180)).await;
    wait_for("an empty queue", Duration::from_secs(60), || async {
        (h.queue_depth().await == 0).then_some(())
    })
    .await;
    // Both stop gracefully: what they held unacked is settled before exit.
    for child in [&mut a, &mut b] {
        let status = process::stop(child, Duration::from_secs(30))
            .await
            .expect("form-processor did not stop on SIGTERM");
        assert!(status.success(), "graceful stop exits 0, got {status}");
    }
    let records = store.records(&Default::default()).await.unwrap();
    let mut keys: Vec<&str> = records
        .iter()
        .map(|r| r.source.dedupe_key.as_str())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(records.len(), n, "exactly {n} records");
    assert_eq!(keys.len(), n, "one record per dedupe key");
    assert!(
        store.failures().await.unwrap().is_empty(),
        "nothing rejected"
    );
    assert!(h.drain_dead().await.is_empty(), "nothing dead-lettered");
}
