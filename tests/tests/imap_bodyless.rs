//! Issue 12 item 7: a FETCH reply without `BODY[]` is logged and retried,
//! never skipped. A front in front of Dovecot
//! ([`mailagent_tests::fetch_rewrite`]) withholds one message's body for as
//! long as the test says; meanwhile the checkpoint waits below that message
//! (the mail handed over above it is remembered as `ahead`, not published
//! again) and the message is fetched again on every pass; once the body
//! comes through, the mail is handed over and the checkpoint moves on. Once
//! during a scan (mail there before the first start), once in normal
//! operation (mail that arrives later).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::envelope::{dedupe_key, Envelope};
use mailagent_tests::fetch_rewrite::FetchRewriter;
use mailagent_tests::imap_support::{self as support, stop, Fixture};
use mailagent_tests::maildir;

/// The message whose body is withheld, of six (UIDs 1–6).
const WITHHELD: u32 = 3;

/// Six mails appended in order: UID n holds `mails[n - 1]`.
async fn append_six(fx: &Fixture) -> Vec<Vec<u8>> {
    let mut mails = Vec::new();
    for i in 1..=6 {
        let m = maildir::message(&fx.prefix, i, 800, false);
        support::append(&fx.env, &fx.mailbox, "INBOX", &m).await;
        mails.push(m);
    }
    mails
}

/// Takes what the fetcher published meanwhile (acking it) into `got`.
async fn collect(fx: &Fixture, channel: &lapin::Channel, got: &mut Vec<Envelope>) {
    let queue = fx.queue();
    got.extend(support::drain(channel, &queue, usize::MAX, Duration::from_millis(300)).await);
}

/// The checkpoint's fields that matter here, absent ones as "".
async fn checkpoint(fx: &Fixture, config: &str) -> (String, String, String) {
    let cp = fx.checkpoint(config).await;
    let field = |k: &str| cp.get(k).cloned().unwrap_or_default();
    let scan = field("scan-until");
    let scan = if scan == "0" { String::new() } else { scan };
    (field("last-uid"), scan, field("ahead"))
}

/// True when the checkpoint holds UIDs 1–6 as handed over, with no scan
/// left: `last-uid` 6, or below it with the rest `ahead` (outside a scan
/// `ahead` is folded into `last-uid` only when later mail comes).
fn covers_all_six((last, scan_until, ahead): &(String, String, String)) -> bool {
    let Ok(last) = last.parse::<u32>() else {
        return false;
    };
    let ahead: BTreeSet<u32> = ahead.split(',').filter_map(|u| u.parse().ok()).collect();
    scan_until.is_empty() && (1..=6).all(|uid| uid <= last || ahead.contains(&uid))
}

/// UID → whether it is `\Seen`.
async fn seen(fx: &Fixture) -> BTreeMap<u32, bool> {
    support::flags(&fx.env, &fx.mailbox, "INBOX")
        .await
        .into_iter()
        .map(|(uid, flags)| (uid, flags.contains("\\Seen")))
        .collect()
}

/// Runs a fetcher through a front that withholds UID 3's body, with the
/// six mails appended before the start (`scan`) or after it. Checks, while
/// the body is withheld, that UID 3 was fetched again on later passes and
/// not published, that the five others were published once each and
/// flagged, and that the checkpoint stands below UID 3 with 4–6 `ahead`;
/// then, with the body back, that every mail is handed over with its
/// dedupe key and the checkpoint passes UID 6.
async fn withheld_then_released(label: &str, scan: bool) {
    let fx = Fixture::new(label);
    fx.plant_token().await;
    let channel = fx.channel().await;
    let front = FetchRewriter::start(&fx.env).await;
    front.withhold(WITHHELD);
    let mails = if scan {
        append_six(&fx).await
    } else {
        Vec::new()
    };
    // One message per half batch: the hole is crossed by later batches of
    // the same pass, not only by later messages of one FETCH.
    let table = fx.mail_table_for(
        "bl",
        &fx.mailbox,
        front.addr.port(),
        "imaps",
        "idle = false\nbatch-size = 2",
    );
    let (config, _) = fx.config(&[table]);
    let (shutdown, task) = support::start(config, support::options());
    let mails = if scan {
        mails
    } else {
        let up = support::eventually(Duration::from_secs(30), || async {
            fx.checkpoint("bl").await.contains_key("last-uid")
        })
        .await;
        assert!(up, "the fetcher did not start");
        append_six(&fx).await
    };
    let target = mails[WITHHELD as usize - 1].clone();
    let others: BTreeSet<Vec<u8>> = mails.iter().filter(|m| **m != target).cloned().collect();

    // The five others are handed over, and UID 3 is asked for again on two
    // more passes (a body-less reply is retried, not skipped).
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        collect(&fx, &channel, &mut got).await;
        let bodies: BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
        if bodies == others && front.withheld() >= 3 {
            break;
        }
    }
    // What later passes would publish again is in the queue by now.
    collect(&fx, &channel, &mut got).await;
    let bodies: BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
    assert!(
        front.withheld() >= 3,
        "UID {WITHHELD} was not fetched again after its body-less reply ({} body-less replies)",
        front.withheld()
    );
    assert!(!bodies.contains(&target), "the withheld mail was published");
    assert!(
        bodies == others,
        "{} of the 5 other mails were handed over",
        bodies.intersection(&others).count()
    );
    assert_eq!(
        got.len(),
        5,
        "mail above the withheld one was published again on a later pass"
    );
    let (last, scan_until, ahead) = checkpoint(&fx, "bl").await;
    let expected_scan = if scan { "6" } else { "" };
    assert_eq!(
        (last.as_str(), scan_until.as_str(), ahead.as_str()),
        ("2", expected_scan, "4,5,6"),
        "the checkpoint (last-uid, scan-until, ahead) moved past UID {WITHHELD} before it was handed over"
    );
    let flags = seen(&fx).await;
    assert_eq!(
        flags,
        (1..=6).map(|uid| (uid, uid != WITHHELD)).collect(),
        "only mail handed over is flagged"
    );

    // The body comes through again: the mail is handed over on a later
    // pass, and the checkpoint moves over all six.
    front.release();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline && !got.iter().any(|e| e.body == target) {
        collect(&fx, &channel, &mut got).await;
    }
    assert!(
        got.iter().any(|e| e.body == target),
        "the withheld mail was never handed over once its body came through"
    );
    let done = support::eventually(Duration::from_secs(20), || async {
        covers_all_six(&checkpoint(&fx, "bl").await)
    })
    .await;
    assert!(
        done,
        "the checkpoint did not move over UID 6: {:?}",
        checkpoint(&fx, "bl").await
    );
    let all_seen = support::eventually(Duration::from_secs(20), || async {
        seen(&fx).await.values().filter(|s| **s).count() == 6
    })
    .await;
    assert!(all_seen, "not all flagged: {:?}", seen(&fx).await);
    collect(&fx, &channel, &mut got).await;
    // Every mail at least once, each copy with its own dedupe key, and
    // exactly the six expected keys.
    let bodies: BTreeSet<Vec<u8>> = got.iter().map(|e| e.body.clone()).collect();
    assert!(
        bodies == mails.iter().cloned().collect(),
        "not every mail was handed over"
    );
    for e in &got {
        assert_eq!(e.dedupe_key, dedupe_key(&fx.mailbox, &e.body));
    }
    let keys: BTreeSet<&str> = got.iter().map(|e| e.dedupe_key.as_str()).collect();
    let expected: BTreeSet<String> = mails.iter().map(|m| dedupe_key(&fx.mailbox, m)).collect();
    assert_eq!(
        keys,
        expected.iter().map(String::as_str).collect(),
        "the dedupe keys"
    );
    eprintln!(
        "{} body-less replies of UID {WITHHELD}; {} envelopes for 6 mails",
        front.withheld(),
        got.len()
    );
    stop(shutdown, task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodyless_fetch_reply_during_a_scan_holds_the_scan_until_the_mail_is_handed_over() {
    withheld_then_released("blscan", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodyless_fetch_reply_of_new_mail_holds_the_checkpoint_and_is_fetched_again() {
    withheld_then_released("blnew", false).await;
}
