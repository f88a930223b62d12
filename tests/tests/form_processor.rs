//! The form processor's CREATE action (§6) against real RabbitMQ, Redis and
//! record stores (SQLite and PostgreSQL): typed records with children,
//! exactly-once under duplicate deliveries, unique values, and every
//! rejection reason ending in the failures table and the dead-letter queue
//! while the consumer keeps running.

use std::time::Duration;

use mailagent_tests::forms::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn creates_one_typed_record_with_three_children(kind: StoreKind) {
    let h = Harness::new(kind, &[]).await;
    let p = h.start(Default::default());
    let raw = mail(
        LEASE_SUBJECT,
        "Ann Lee <ann@contoso.com>",
        &[],
        &[Attachment::xlsx(lease_workbook(&Lease::default()))],
    );
    let e = envelope(raw);
    h.publish(&e).await;
    let store = h.store().await;
    let records = wait_records(&store, 1, WAIT).await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (r.module.as_str(), r.business_object.as_str()),
        ("triContract", "triLeaseAbstract")
    );
    assert_eq!(
        serde_json::Value::Object(r.fields.clone()),
        json!({
            "triIdTX": "L-1",
            "triNameTX": "Main Street 1",
            "triRentNU": 1200.5,
            "triAreaNU": 350,
            "triActiveBL": true,
            "triStartDA": "2024-03-01",
            "triEndDA": "2029-02-28",
            "triNotesTX": "corner unit",
        })
    );
    assert_eq!(r.children.len(), 3);
    for (i, c) in r.children.iter().enumerate() {
        assert_eq!(c.association, "Payments");
        assert_eq!(c.business_object, "triPaymentSchedule");
        assert_eq!(
            serde_json::Value::Object(c.fields.clone()),
            json!({"triSeqNU": i + 1, "triDueDA": format!("2024-0{}-01", 4 + i), "triAmountNU": 1200.5})
        );
    }
    assert_eq!(r.source.dedupe_key, e.dedupe_key);
    assert_eq!(r.source.mail_config, "lease-forms");
    assert_eq!(r.source.mailbox, "forms@contoso.com");
    assert_eq!(r.source.sender, "ann@contoso.com");
    assert_eq!(r.source.subject, LEASE_SUBJECT);
    assert!(r
        .source
        .message_id
        .as_deref()
        .is_some_and(|m| m.ends_with("@test.contoso.com")));
    assert_eq!(r.source.received_at, 1_764_000_000);
    assert_eq!(r.topic.as_deref(), Some(LEASE_SUBJECT));
    assert!(store.failures().await.unwrap().is_empty());
    p.stop().await.unwrap();
}

async fn duplicates_make_one_record(kind: StoreKind) {
    let h = Harness::new(kind, &[]).await;
    let p = h.start(Default::default());
    let form = |id: &str| {
        mail(
            LEASE_SUBJECT,
            "ann@contoso.com",
            &[],
            &[Attachment::xlsx(lease_workbook(&Lease {
                id,
                ..Default::default()
            }))],
        )
    };
    // The same envelope twice, then two different mails with one unique value.
    let twice = envelope(form("L-TWICE"));
    h.publish(&twice).await;
    h.publish(&twice).await;
    let first = envelope(form("L-SAME"));
    h.publish(&first).await;
    let store = h.store().await;
    wait_records(&store, 2, WAIT).await;
    let second = envelope(form("L-SAME"));
    h.publish(&second).await;
    let failures = wait_failures(&store, 1, WAIT).await;
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].reason, "duplicate");
    assert_eq!(failures[0].source.dedupe_key, second.dedupe_key);
    // Nothing left to process, and still exactly two records.
    wait_for("an empty queue", WAIT, || async {
        (h.queue_depth().await == 0).then_some(())
    })
    .await;
    let records = store.records(&Default::default()).await.unwrap();
    // Messages are processed concurrently: compare without order.
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| r.fields["triIdTX"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["L-SAME".to_string(), "L-TWICE".to_string()]);
    let same = records
        .iter()
        .find(|r| r.fields["triIdTX"] == "L-SAME")
        .unwrap();
    assert_eq!(same.source.dedupe_key, first.dedupe_key);
    let dead = h.drain_dead().await;
    assert_eq!(
        dead,
        vec![("duplicate".to_string(), second.dedupe_key.clone())]
    );
    // The rejected mail delivered again is acked at once: no second failure, no second dead letter.
    h.publish(&second).await;
    h.publish(&twice).await;
    wait_for("an empty queue", WAIT, || async {
        (h.queue_depth().await == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.failures().await.unwrap().len(), 1);
    assert_eq!(store.records(&Default::default()).await.unwrap().len(), 2);
    assert!(h.drain_dead().await.is_empty());
    assert!(p.running());
    p.stop().await.unwrap();
}

/// Publishes `raw`, and checks it ends as one failure with `reason` and one
/// dead letter with that `x-reason`, with the processor still running and
/// still creating records afterwards.
async fn rejected_with(kind: StoreKind, extra: &[&str], raw: Vec<u8>, reason: &str) {
    let h = Harness::new(kind, extra).await;
    let p = h.start(Default::default());
    let e = envelope(raw);
    h.publish(&e).await;
    let store = h.store().await;
    let failures = wait_failures(&store, 1, WAIT).await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].reason, reason, "{}", failures[0].detail);
    assert_eq!(failures[0].source.dedupe_key, e.dedupe_key);
    expect_one_dead_letter(&h, "the dead letter", WAIT, reason, &e.dedupe_key).await;
    assert!(p.running(), "the processor still runs");
    // And it still works.
    let good = mail(
        LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &[Attachment::xlsx(lease_workbook(&Lease::default()))],
    );
    h.publish(&envelope(good)).await;
    wait_records(&store, 1, WAIT).await;
    p.stop().await.unwrap();
}

fn lease_mail(
    subject: &str,
    from: &str,
    headers: &[&str],
    lease: &Lease<'_>,
    spec: &MapSpec<'_>,
) -> Vec<u8> {
    mail(
        subject,
        from,
        headers,
        &[Attachment::xlsx(lease_workbook_with(lease, spec))],
    )
}

fn good_lease(subject: &str, from: &str, headers: &[&str]) -> Vec<u8> {
    lease_mail(
        subject,
        from,
        headers,
        &Lease::default(),
        &MapSpec::default(),
    )
}

fn with_map(spec: MapSpec<'_>) -> Vec<u8> {
    lease_mail(
        LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &Lease::default(),
        &spec,
    )
}

fn with_attachments(attachments: &[Attachment]) -> Vec<u8> {
    mail(LEASE_SUBJECT, "ann@contoso.com", &[], attachments)
}

macro_rules! rejection {
    ($name:ident, $reason:expr, $raw:expr) => {
        rejection!($name, $reason, &[], $raw);
    };
    ($name:ident, $reason:expr, $extra:expr, $raw:expr) => {
        #[tokio::test]
        async fn $name() {
            rejected_with(StoreKind::Sqlite, $extra, $raw, $reason).await;
        }
    };
}

rejection!(
    rejects_no_topic,
    "no-topic",
    good_lease("HELLO THERE", "ann@contoso.com", &[])
);
rejection!(
    rejects_sender_not_allowed,
    "sender-not-allowed",
    good_lease(LEASE_SUBJECT, "mallory@evil.example", &[])
);
rejection!(
    rejects_unauthenticated_sender,
    "unauthenticated-sender",
    good_lease(
        SECURE_SUBJECT,
        "ann@contoso.com",
        &["Authentication-Results: evil.example; spf=pass"]
    )
);
rejection!(rejects_no_workbook, "no-workbook", with_attachments(&[]));
rejection!(
    rejects_several_workbooks,
    "several-workbooks",
    with_attachments(&[
        Attachment::xlsx(lease_workbook(&Lease::default())),
        Attachment::xlsx(lease_workbook(&Lease::default()))
    ])
);
rejection!(
    rejects_not_a_workbook,
    "not-a-workbook",
    with_attachments(&[Attachment::xlsx(b"Lease ID;L-1\n".to_vec())])
);
rejection!(rejects_no_object_map, "no-object-map", {
    let mut wb = rust_xlsxwriter::Workbook::new();
    wb.add_worksheet().write_string(0, 0, "just data").unwrap();
    with_attachments(&[Attachment::xlsx(wb.save_to_buffer().unwrap())])
});
rejection!(
    rejects_unknown_tag,
    "malformed-map",
    with_map(MapSpec {
        extra: vec![vec!["Feild", "triX", "Lease!B1"]],
        ..Default::default()
    })
);
rejection!(
    rejects_unclosed_root,
    "malformed-map",
    with_map(MapSpec {
        close_root: false,
        ..Default::default()
    })
);
rejection!(
    rejects_bad_cell_reference,
    "malformed-map",
    with_map(MapSpec {
        extra: vec![vec!["Field", "triX", "B1"]],
        ..Default::default()
    })
);
rejection!(
    rejects_required_field_empty,
    "required-field-empty",
    lease_mail(
        LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &Lease {
            id: "",
            ..Default::default()
        },
        &MapSpec::default()
    )
);
rejection!(
    rejects_wrong_business_object,
    "wrong-business-object",
    with_map(MapSpec {
        root: vec!["Excel to Tririga", "triLocation", "triBuilding"],
        ..Default::default()
    })
);
rejection!(
    rejects_unsupported_action,
    "unsupported-action",
    with_map(MapSpec {
        root: vec![
            "Excel to Tririga",
            "triContract",
            "triLeaseAbstract",
            "DELETE"
        ],
        ..Default::default()
    })
);
rejection!(
    rejects_a_zip_bomb,
    "decompressed-too-large",
    with_attachments(&[Attachment::xlsx(zip_bomb(60 << 20))])
);
rejection!(rejects_a_truncated_workbook, "malformed-workbook", {
    let wb = lease_workbook(&Lease::default());
    with_attachments(&[Attachment::xlsx(wb[..wb.len() * 2 / 3].to_vec())])
});
rejection!(rejects_60_level_nesting, "mime-too-deep", nested_mail(60));
rejection!(rejects_a_20_mb_attachment, "workbook-too-large", {
    let mut big = b"PK\x03\x04".to_vec();
    big.extend((0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    with_attachments(&[Attachment::xlsx(big)])
});

/// A small mail is parsed on the consumer's own worker with a lowered
/// decompression limit; a workbook that inflates past it (here about
/// 640 KB of shared strings in a 10 KB mail) is parsed again on the
/// blocking pool under the configured limit, and becomes its record.
#[tokio::test]
async fn a_small_mail_whose_workbook_inflates_past_the_inline_limit_still_creates_its_record() {
    use form_processor::consumer::{INLINE_DECOMPRESSED_MAX, INLINE_MAIL_MAX};
    let lease = Lease {
        id: "L-INFLATES",
        filler_cells: 20,
        ..Default::default()
    };
    let raw = lease_mail(
        LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &lease,
        &MapSpec::default(),
    );
    assert!(
        raw.len() <= INLINE_MAIL_MAX,
        "a small mail: {} bytes",
        raw.len()
    );
    const { assert!(20 * 32_000 > INLINE_DECOMPRESSED_MAX) };
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let p = h.start(Default::default());
    h.publish(&envelope(raw)).await;
    let store = h.store().await;
    let records = wait_records(&store, 1, WAIT).await;
    assert_eq!(records[0].fields["triIdTX"], "L-INFLATES");
    assert!(store.failures().await.unwrap().is_empty());
    p.stop().await.unwrap();
}

#[tokio::test]
async fn postgres_rejection_is_stored_and_dead_lettered() {
    rejected_with(
        StoreKind::Postgres,
        &[],
        good_lease("HELLO THERE", "ann@contoso.com", &[]),
        "no-topic",
    )
    .await;
}

#[tokio::test]
async fn authenticated_sender_from_a_trusted_server_is_accepted() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let p = h.start(Default::default());
    let header = format!(
        "Authentication-Results: {TRUSTED_AUTHSERV}; dkim=none; spf=pass smtp.mailfrom=contoso.com"
    );
    h.publish(&envelope(good_lease(
        SECURE_SUBJECT,
        "ann@contoso.com",
        &[&header],
    )))
    .await;
    let store = h.store().await;
    let records = wait_records(&store, 1, WAIT).await;
    assert_eq!(
        records[0].topic.as_deref(),
        Some(format!("/^{SECURE_SUBJECT}$/").as_str())
    );
    p.stop().await.unwrap();
}

/// Exchange Online's verdict on mail from contoso.com that passed every check.
const EXO_PASS: &str = "Authentication-Results: spf=pass (sender IP is 40.107.22.54)\r\n smtp.mailfrom=contoso.com; dkim=pass (signature was verified)\r\n header.d=contoso.com;dmarc=pass action=none\r\n header.from=contoso.com;compauth=pass reason=100";

/// Exchange Online's hops above its verdict, and the hop from the sender
/// below it (with the Received-SPF line Exchange writes in between).
fn exchange_trace(verdict: &str, sender_ip: &str, below: &[&str]) -> Vec<String> {
    let mut h = vec![
        "Received: from AM4PEPF00027A5F.eurprd04.prod.outlook.com (2603:10a6:208:c0::35)\r\n by AS8PR04MB8165.eurprd04.prod.outlook.com with HTTPS; Fri, 1 Mar 2024 10:00:03 +0000".to_string(),
        "Received: from AM0PR02CA0131.eurprd02.prod.outlook.com (2603:10a6:20b:28c::28)\r\n by AM4PEPF00027A5F.outlook.office365.com (2603:10a6:208:c0::35) with Microsoft\r\n SMTP Server (version=TLS1_2, cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id\r\n 15.20.7339.20 via Frontend Transport; Fri, 1 Mar 2024 10:00:02 +0000".to_string(),
        verdict.to_string(),
        format!("Received-SPF: Pass (protection.outlook.com: domain of contoso.com designates\r\n {sender_ip} as permitted sender) receiver=protection.outlook.com;\r\n client-ip={sender_ip}; helo=mail.example.net; pr=C"),
        format!("Received: from mail.example.net ({sender_ip}) by\r\n AM0PR02CA0131.mail.protection.outlook.com (10.167.16.73) with Microsoft SMTP\r\n Server (version=TLS1_2, cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id\r\n 15.20.7339.20 via Frontend Transport; Fri, 1 Mar 2024 10:00:01 +0000"),
    ];
    h.extend(below.iter().map(|s| s.to_string()));
    h
}

#[tokio::test]
async fn a_pass_forged_below_exchanges_header_is_rejected_and_the_genuine_one_creates_a_record() {
    let h = Harness::new(
        StoreKind::Sqlite,
        &["trusted-authserv-ids = [\"exchange-online\"]"],
    )
    .await;
    let p = h.start(Default::default());
    // Exchange saw an SPF pass for the attacker's own envelope domain only;
    // the attacker wrote a perfect verdict of their own, below Exchange's
    // Received from them.
    let spoofed = exchange_trace(
        "Authentication-Results: spf=pass (sender IP is 203.0.113.7)\r\n smtp.mailfrom=mailer.evil.example; dkim=none (message not signed)\r\n header.d=none;dmarc=none action=none header.from=contoso.com;compauth=softpass\r\n reason=201",
        "203.0.113.7",
        &[
            EXO_PASS,
            "Received: from [10.0.0.5] by mailer.evil.example; Fri, 1 Mar 2024 10:00:00 +0000",
        ],
    );
    let spoofed: Vec<&str> = spoofed.iter().map(String::as_str).collect();
    let e = envelope(good_lease(SECURE_SUBJECT, "ann@contoso.com", &spoofed));
    h.publish(&e).await;
    let store = h.store().await;
    let failures = wait_failures(&store, 1, WAIT).await;
    assert_eq!(failures[0].reason, "unauthenticated-sender");
    assert!(
        failures[0]
            .detail
            .contains("exchange-online: spf=pass smtp.mailfrom=mailer.evil.example"),
        "{}",
        failures[0].detail
    );
    expect_one_dead_letter(
        &h,
        "the dead letter",
        WAIT,
        "unauthenticated-sender",
        &e.dedupe_key,
    )
    .await;

    let genuine = exchange_trace(EXO_PASS, "40.107.22.54", &[]);
    let genuine: Vec<&str> = genuine.iter().map(String::as_str).collect();
    h.publish(&envelope(good_lease(
        SECURE_SUBJECT,
        "ann@contoso.com",
        &genuine,
    )))
    .await;
    let records = wait_records(&store, 1, WAIT).await;
    assert_eq!(
        records[0].topic.as_deref(),
        Some(format!("/^{SECURE_SUBJECT}$/").as_str())
    );
    assert_eq!(store.failures().await.unwrap().len(), 1);
    p.stop().await.unwrap();
}

#[tokio::test]
async fn a_message_that_panics_processing_is_dead_lettered_after_the_delivery_limit() {
    let h = Harness::new(StoreKind::Sqlite, &["delivery-limit = 3"]).await;
    let p = h.start(form_processor::Hooks {
        panic_on_subject: Some("PANIC".into()),
    });
    let e = envelope(good_lease("LEASE PANIC FORM", "ann@contoso.com", &[]));
    h.publish(&e).await;
    let store = h.store().await;
    let failures = wait_failures(&store, 1, WAIT).await;
    assert_eq!(failures[0].reason, "poison");
    assert_eq!(
        h.drain_dead().await,
        vec![("poison".to_string(), e.dedupe_key.clone())]
    );
    assert!(p.running());
    h.publish(&envelope(good_lease(LEASE_SUBJECT, "ann@contoso.com", &[])))
        .await;
    wait_records(&store, 1, WAIT).await;
    p.stop().await.unwrap();
}

/// Coalesced acks (`acks.rs`): one delivery requeued again and again (it
/// panics until the poison guard dead-letters it) while forty behind it in
/// the prefetch window settle. No `multiple` ack covers it while it is in
/// progress — that would ack it unsettled, and its requeue would then fail
/// on the channel and the mail be lost —, so it still ends as a poison
/// rejection with its dead letter; the forty are records; and once the
/// processor stops, nothing is back in the queue: every settled delivery
/// was acked, the ones held behind the slow one included.
#[tokio::test]
async fn coalesced_acks_never_cover_a_delivery_in_progress_and_leave_nothing_unacked() {
    let h = Harness::new(StoreKind::Sqlite, &["delivery-limit = 3"]).await;
    let panicking = envelope(good_lease("LEASE PANIC FORM", "ann@contoso.com", &[]));
    h.publish(&panicking).await;
    h.publish_leases(40).await;
    let p = h.start(form_processor::Hooks {
        panic_on_subject: Some("PANIC".into()),
    });
    let store = h.store().await;
    let failures = wait_failures(&store, 1, WAIT).await;
    assert_eq!(failures[0].reason, "poison");
    assert_eq!(failures[0].source.dedupe_key, panicking.dedupe_key);
    wait_records(&store, 40, WAIT).await;
    assert_eq!(
        h.drain_dead().await,
        vec![("poison".to_string(), panicking.dedupe_key.clone())]
    );
    assert!(p.running(), "the processor kept its session");
    p.stop().await.unwrap();
    assert_eq!(
        h.queue_depth().await,
        0,
        "no settled delivery was left unacked"
    );
    assert_eq!(store.count_records().await.unwrap(), 40);
}

#[tokio::test]
async fn a_bad_envelope_is_dead_lettered() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let p = h.start(Default::default());
    let confirm = h
        .channel
        .basic_publish(
            &h.topology.exchange,
            "create",
            Default::default(),
            b"Subject: x\r\n\r\nno headers",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let store = h.store().await;
    let failures = wait_failures(&store, 1, WAIT).await;
    assert_eq!(failures[0].reason, "bad-envelope");
    let dead = h.drain_dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "bad-envelope");
    p.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_restart_in_the_middle_of_a_run_loses_nothing_and_doubles_nothing() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let n = 300;
    for i in 0..n {
        let id = format!("L-{i}");
        let raw = lease_mail(
            LEASE_SUBJECT,
            "ann@contoso.com",
            &[],
            &Lease {
                id: &id,
                ..Default::default()
            },
            &MapSpec::default(),
        );
        h.publish(&envelope(raw)).await;
    }
    let store = h.store().await;
    let p = h.start(Default::default());
    wait_for("some records", WAIT, || async {
        let r = store.records(&Default::default()).await.ok()?;
        (r.len() >= 20).then_some(())
    })
    .await;
    p.stop().await.unwrap();
    let p = h.start(Default::default());
    let records = wait_records(&store, n, Duration::from_secs(60)).await;
    assert_eq!(records.len(), n);
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| r.fields["triIdTX"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no record twice");
    assert!(store.failures().await.unwrap().is_empty());
    p.stop().await.unwrap();
}

#[tokio::test]
async fn a_10_second_store_outage_delays_messages_and_dead_letters_none() {
    let h = Harness::new(StoreKind::PostgresViaProxy, &[]).await;
    let proxy = h.proxy.as_ref().unwrap();
    let n = 200;
    h.publish_leases(n).await;
    let store = h.store().await;
    let p = h.start(Default::default());
    wait_for("the first records", WAIT, || async {
        let r = store.records(&Default::default()).await.ok()?;
        (r.len() >= 10).then_some(())
    })
    .await;
    let before = store.records(&Default::default()).await.unwrap().len();
    proxy.down();
    assert!(
        before < n,
        "the outage starts before the run ends ({before} records)"
    );
    // The outage lasts 10 s: the processor must wait and retry meanwhile.
    nothing_dead_lettered_for(&h, &p, Duration::from_secs(10), "during the outage").await;
    proxy.up();
    let records = wait_records(&store, n, Duration::from_secs(90)).await;
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| r.fields["triIdTX"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (records.len(), ids.len()),
        (n, n),
        "every record exists once"
    );
    assert!(store.failures().await.unwrap().is_empty());
    assert!(h.drain_dead().await.is_empty());
    p.stop().await.unwrap();
}

/// For `window`, checks every half second that nothing reaches the
/// dead-letter queue and the processor keeps running (a store outage).
async fn nothing_dead_lettered_for(h: &Harness, p: &Processor, window: Duration, when: &str) {
    let end = std::time::Instant::now() + window;
    while std::time::Instant::now() < end {
        assert!(
            h.drain_dead().await.is_empty(),
            "a form was dead-lettered {when}"
        );
        assert!(p.running());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sets `default_transaction_read_only` of the harness's database and ends
/// its sessions, so that every new connection gets the setting (what a
/// failover to a standby looks like to the processor).
async fn set_read_only(h: &Harness, on: bool) {
    use sqlx::Connection as _;
    let db = url::Url::parse(&h.store_url).unwrap().path()[1..].to_string();
    let mut admin = sqlx::PgConnection::connect(h.env.postgres_url())
        .await
        .expect("connect to PostgreSQL");
    let value = if on { "on" } else { "off" };
    sqlx::query(&format!(
        "ALTER DATABASE {db} SET default_transaction_read_only = {value}"
    ))
    .execute(&mut admin)
    .await
    .expect("alter database");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&db)
        .execute(&mut admin)
        .await
        .expect("end the database's sessions");
    let _ = admin.close().await;
}

/// A store that refuses writes (SQLSTATE 25006, a standby or a failover)
/// is an outage, not bad data: no form is dead-lettered or stored as a
/// failure while it lasts, and every record is created once it is writable
/// again (§6).
#[tokio::test]
async fn a_read_only_postgres_delays_forms_and_dead_letters_none() {
    let h = Harness::new(StoreKind::Postgres, &[]).await;
    let store = h.store().await; // the schema is in place
    set_read_only(&h, true).await;
    let n = 20;
    h.publish_leases(n).await;
    let p = h.start(Default::default());
    nothing_dead_lettered_for(
        &h,
        &p,
        Duration::from_secs(8),
        "while the store was read-only",
    )
    .await;
    assert!(store.records(&Default::default()).await.unwrap().is_empty());
    set_read_only(&h, false).await;
    let records = wait_records(&store, n, Duration::from_secs(90)).await;
    assert_eq!(records.len(), n);
    assert!(store.failures().await.unwrap().is_empty());
    assert!(h.drain_dead().await.is_empty());
    p.stop().await.unwrap();
}

/// With the dead-letter queue deleted, RabbitMQ returns the dead letter
/// (it is published `mandatory`): the rejected mail is never acked away and
/// its failure not marked dead-lettered. Once the topology is declared
/// again it is dead-lettered, exactly once.
#[tokio::test]
async fn with_the_dead_letter_queue_gone_a_rejection_waits_and_is_dead_lettered_once_it_is_back() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let store = h.store().await;
    // Started first: it declares the topology (the dead-letter queue too).
    let p = h.start(Default::default());
    let e = reject_after(&h, &store, async {
        h.channel
            .queue_delete(&h.topology.dead_queue, Default::default())
            .await
            .expect("delete the dead-letter queue");
    })
    .await;
    never_marked_for(&store, &p, Duration::from_secs(4), "no dead-letter queue").await;
    redeclare_and_expect_the_dead_letter(&h, &store, &e).await;
    // Exactly once: nothing more arrives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(h.drain_dead().await.is_empty(), "dead-lettered twice");
    p.stop().await.unwrap();
}

/// Issue 12 item 3: the dead-letter channel is reopened after a channel
/// error. With the dead-letter exchange deleted, the `mandatory` publish of
/// a rejection is answered with a channel close (404): the publisher marks
/// itself broken, the consuming session ends and its unacked mail goes back
/// to the queue, and reconnecting waits for the topology. Once it is
/// declared again the rejection is dead-lettered, exactly once, over a new
/// channel; the mail is never acked away meanwhile and the processor never
/// exits.
#[tokio::test]
async fn after_a_dead_letter_channel_error_a_new_channel_dead_letters_the_rejection_once() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let store = h.store().await;
    let p = h.start(Default::default());
    let e = reject_after(&h, &store, async {
        h.channel
            .exchange_delete(&h.topology.dead_exchange, Default::default())
            .await
            .expect("delete the dead-letter exchange");
    })
    .await;
    // The session ended on the channel error: the mail is back in the
    // queue, not acked away, while no session can start without the
    // exchange.
    wait_for("the rejected mail back in the queue", WAIT, || async {
        (h.queue_depth().await == 1).then_some(())
    })
    .await;
    never_marked_for(
        &store,
        &p,
        Duration::from_secs(3),
        "no dead-letter exchange",
    )
    .await;
    redeclare_and_expect_the_dead_letter(&h, &store, &e).await;
    wait_for("the rejection settled", WAIT, || async {
        (settled_as(&h, "already-known").await >= 1).then_some(())
    })
    .await;
    assert!(p.running(), "the processor exited");
    p.stop().await.unwrap();
    // Stopped: whatever was not acked would be back in the queue now.
    assert_eq!(h.queue_depth().await, 0, "the rejected mail was not acked");
    assert!(h.drain_dead().await.is_empty(), "dead-lettered twice");
    assert_eq!(store.failures().await.unwrap().len(), 1);
}

/// With the processor running: one good form becomes a record (the
/// session is up), then `breaking` breaks the dead-letter topology, then a
/// form without a workbook is published; returned once its rejection is
/// stored.
async fn reject_after(
    h: &Harness,
    store: &form_processor::store::Store,
    breaking: impl std::future::Future<Output = ()>,
) -> common::envelope::Envelope {
    h.publish(&envelope(good_lease(LEASE_SUBJECT, "ann@contoso.com", &[])))
        .await;
    wait_records(store, 1, WAIT).await;
    breaking.await;
    let e = envelope(with_attachments(&[]));
    h.publish(&e).await;
    let failures = wait_for("the stored rejection", WAIT, || async {
        let f = store.failures().await.ok()?;
        (!f.is_empty()).then_some(f)
    })
    .await;
    assert_eq!(failures[0].reason, "no-workbook");
    e
}

/// For `window`, checks every 250 ms that the stored rejection is not
/// marked dead-lettered (its copy cannot have been confirmed: `missing`)
/// and the processor keeps running.
async fn never_marked_for(
    store: &form_processor::store::Store,
    p: &Processor,
    window: Duration,
    missing: &str,
) {
    let until = std::time::Instant::now() + window;
    while std::time::Instant::now() < until {
        let failures = store.failures().await.unwrap();
        assert!(
            !failures[0].dead_lettered,
            "marked dead-lettered with {missing}"
        );
        assert!(p.running(), "the processor exited");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Declares the topology again, then expects `e`'s dead letter (once) and
/// its failure marked dead-lettered.
async fn redeclare_and_expect_the_dead_letter(
    h: &Harness,
    store: &form_processor::store::Store,
    e: &common::envelope::Envelope,
) {
    common::topology::declare(&h.channel, &h.config.amqp, false)
        .await
        .expect("declare the topology again");
    expect_one_dead_letter(
        h,
        "the dead letter",
        Duration::from_secs(60),
        "no-workbook",
        &e.dedupe_key,
    )
    .await;
    wait_for("the failure marked", WAIT, || async {
        let f = store.failures().await.ok()?;
        f[0].dead_lettered.then_some(())
    })
    .await;
}

/// How many deliveries the harness's running processor settled with
/// `outcome`, by its `/metrics` (0 before its first heartbeat).
async fn settled_as(h: &Harness, outcome: &str) -> u64 {
    let mut redis = mailagent_tests::harness::redis_at(h.env.redis_url()).await;
    let keys = common::keys::Keys::new(h.config.redis.prefix.clone());
    let agents = common::heartbeat::list_agents(&mut redis, &keys)
        .await
        .unwrap_or_default();
    let Some(admin) = agents
        .iter()
        .find(|a| a.component == "form-processor")
        .and_then(|a| a.admin.clone())
    else {
        return 0;
    };
    let Ok(reply) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return 0;
    };
    let text = reply.text().await.unwrap_or_default();
    let label = format!("outcome=\"{outcome}\"");
    text.lines()
        .filter(|l| l.contains("messages_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Issue 12 item 5, §6: a rejection whose COMMIT succeeded but whose answer
/// was lost. The store holds what the writer committed — the failure row
/// and the dedupe key, `dead_lettered = 0` — and nothing reached the
/// dead-letter queue. The mail delivered again as a first delivery (parsed
/// at once, settled by the insert, which finds the key) is dead-lettered
/// exactly once, with its dedupe key, and the failure marked; delivered
/// once more, it is acked with no second copy. One failure row throughout.
async fn a_rejection_whose_commit_answer_was_lost_is_dead_lettered_once(kind: StoreKind) {
    use form_processor::reject::{Reason, Rejection};
    use form_processor::store::{Known, NewFailure, Source, Stored};
    let h = Harness::new(kind, &[]).await;
    let store = h.store().await;
    let e = envelope(with_attachments(&[]));
    let committed = store
        .reject(NewFailure {
            rejection: Rejection::new(Reason::NoWorkbook, "the mail carries no workbook"),
            topic: None,
            source: Source {
                dedupe_key: e.dedupe_key.clone(),
                mail_config: e.mail_config.clone(),
                mailbox: e.mailbox.clone(),
                received_at: e.timestamp as i64,
                ..Default::default()
            },
        })
        .await
        .expect("store the rejection");
    assert!(matches!(committed, Stored::Failure(_)), "{committed:?}");
    let known = store.lookup(&e.dedupe_key).await.unwrap();
    assert!(
        matches!(
            known,
            Some(Known::Failure {
                dead_lettered: false,
                ..
            })
        ),
        "{known:?}"
    );
    let p = h.start(Default::default());
    h.publish(&e).await;
    expect_one_dead_letter(
        &h,
        "the dead letter of the unsettled rejection",
        WAIT,
        "no-workbook",
        &e.dedupe_key,
    )
    .await;
    wait_for("the failure marked", WAIT, || async {
        let f = store.failures().await.ok()?;
        f.iter().all(|f| f.dead_lettered).then_some(())
    })
    .await;
    wait_for("the first delivery settled", WAIT, || async {
        (settled_as(&h, "already-known").await >= 1).then_some(())
    })
    .await;

    // Delivered again: already dead-lettered, so acked at once.
    h.publish(&e).await;
    wait_for("the second delivery settled", WAIT, || async {
        (settled_as(&h, "already-known").await >= 2).then_some(())
    })
    .await;
    assert!(p.running(), "the processor exited");
    p.stop().await.unwrap();
    assert!(h.drain_dead().await.is_empty(), "dead-lettered twice");
    // Stopped: whatever was not acked would be back in the queue now.
    assert_eq!(h.queue_depth().await, 0, "a delivery was not acked");
    let failures = store.failures().await.unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].dead_lettered);
    assert_eq!(failures[0].source.dedupe_key, e.dedupe_key);
    assert_eq!(failures[0].reason, "no-workbook");
}

/// Waits up to `within` for what reaches the dead-letter queue and checks
/// it is exactly one message, of `reason` and dedupe key `key`.
async fn expect_one_dead_letter(
    h: &Harness,
    what: &str,
    within: Duration,
    reason: &str,
    key: &str,
) {
    let dead = wait_for(what, within, || async {
        let d = h.drain_dead().await;
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(dead, vec![(reason.to_string(), key.to_string())]);
}

/// A mail without a workbook, published, rejected and marked
/// dead-lettered by a processor that keeps running: the envelope, its
/// stored failure and the processor.
async fn a_dead_lettered_rejection(
    h: &Harness,
    store: &form_processor::store::Store,
) -> (
    common::envelope::Envelope,
    form_processor::store::StoredFailure,
    Processor,
) {
    let e = envelope(with_attachments(&[]));
    h.publish(&e).await;
    let p = h.start(Default::default());
    let failures = wait_failures(store, 1, WAIT).await;
    wait_for("the failure marked", WAIT, || async {
        let f = store.failures().await.ok()?;
        f[0].dead_lettered.then_some(())
    })
    .await;
    (e, failures[0].clone(), p)
}

/// Runs `mailagent ARGS` with the harness's CLI config.
fn mailagent(h: &Harness, args: &[&str]) -> std::process::Output {
    std::process::Command::new(mailagent_tests::env::bin_path("mailagent"))
        .arg("--config")
        .arg(h.config_path_for(common::Component::Cli))
        .args(args)
        .output()
        .expect("run mailagent")
}

/// `mailagent dead-letters replay` with the CREATE queue's binding removed:
/// the replay reaches no queue, the command fails, and the dead-letter copy
/// and the failure stay. With the binding back, the replay is processed
/// afresh (a record) and the copy is gone.
#[tokio::test]
async fn a_replay_that_reaches_no_queue_keeps_the_dead_letter_copy() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let store = h.store().await;
    // A mail without a workbook: replayed, it is rejected again, which
    // shows that the replay was processed afresh.
    let (e, failure, p) = a_dead_lettered_rejection(&h, &store).await;
    let id = failure.id.to_string();
    h.channel
        .queue_unbind(
            &h.topology.create_queue,
            &h.topology.exchange,
            "create",
            Default::default(),
        )
        .await
        .expect("unbind");
    let replay = || mailagent(&h, &["dead-letters", "replay", &id]);
    let out = replay();
    assert!(!out.status.success(), "the replay reached no queue");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reached no queue"), "{stderr}");
    assert_eq!(store.failures().await.unwrap().len(), 1, "failure kept");
    common::topology::declare(&h.channel, &h.config.amqp, false)
        .await
        .expect("bind again");
    let out = replay();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Processed afresh: rejected again (no workbook), dead-lettered again;
    // the old copy was consumed by the replay.
    expect_one_dead_letter(
        &h,
        "the new dead letter",
        WAIT,
        "no-workbook",
        &e.dedupe_key,
    )
    .await;
    p.stop().await.unwrap();
}

/// Two copies of one rejected mail in the dead-letter queue (two
/// processors took copies of it at once and each dead-lettered its own):
/// `dead-letters list` names one failure, and its replay takes every copy
/// out of the dead-letter queue, so the mail comes back once, not twice.
#[tokio::test]
async fn a_replay_takes_every_dead_letter_copy_of_the_mail() {
    let h = Harness::new(StoreKind::Sqlite, &[]).await;
    let store = h.store().await;
    let (e, failure, p) = a_dead_lettered_rejection(&h, &store).await;
    // The other processor's copy, as it dead-lettered it.
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        common::envelope::headers::REASON.into(),
        lapin::types::AMQPValue::LongString("no-workbook".into()),
    );
    let copy = lapin::BasicProperties::default()
        .with_message_id(e.dedupe_key.clone().into())
        .with_headers(headers);
    h.channel
        .basic_publish(
            "",
            &h.topology.dead_queue,
            Default::default(),
            &e.body,
            copy,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("two copies waiting", WAIT, || async {
        let n = common::topology::queue_depth(&h.channel, &h.topology.dead_queue)
            .await
            .ok()?;
        (n == 2).then_some(())
    })
    .await;
    let ok = |args: &[&str]| {
        let out = mailagent(&h, args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = ok(&["dead-letters", "list"]);
    assert!(
        listed.contains("1 failure(s); 2 message(s) waiting"),
        "{listed}"
    );
    // The processor stopped, so the queues show what the replay did.
    p.stop().await.unwrap();
    let id = failure.id.to_string();
    let replayed = ok(&["dead-letters", "replay", &id]);
    assert!(replayed.contains("1 more copy"), "{replayed}");
    let dead_left = common::topology::queue_depth(&h.channel, &h.topology.dead_queue)
        .await
        .unwrap();
    assert_eq!(
        dead_left, 0,
        "a copy of the replayed mail stayed dead-lettered"
    );
    assert_eq!(h.queue_depth().await, 1, "the mail went back once");
    // Processed afresh once: rejected again, one new dead letter.
    let p = h.start(Default::default());
    expect_one_dead_letter(
        &h,
        "the new dead letter",
        WAIT,
        "no-workbook",
        &e.dedupe_key,
    )
    .await;
    p.stop().await.unwrap();
}

/// On quorum queues (`queue-type = "quorum"`, here with `[amqp]
/// delivery-limit = 2` on the dead-letter queue too, the least that exceeds
/// `[form-processor] delivery-limit = 1`), a replay looks at the dead
/// letters ahead of its own without counting a delivery for them: it puts
/// them back instead of returning them unacked. Returned, the last one
/// would be dropped by RabbitMQ after the three replays that passed over it.
#[tokio::test]
async fn replays_on_quorum_queues_never_use_up_the_other_dead_letters_deliveries() {
    let h = Harness::with_amqp(
        StoreKind::Sqlite,
        &["delivery-limit = 1"],
        &["queue-type = \"quorum\"", "delivery-limit = 2"],
    )
    .await;
    let store = h.store().await;
    let mails: Vec<_> = (0..4).map(|_| envelope(with_attachments(&[]))).collect();
    for e in &mails {
        h.publish(e).await;
    }
    let p = h.start(Default::default());
    wait_for("four dead letters", WAIT, || async {
        let f = store.failures().await.ok()?;
        (f.len() == 4 && f.iter().all(|f| f.dead_lettered)).then_some(())
    })
    .await;
    p.stop().await.unwrap();
    let failures = store.failures().await.unwrap();
    // Replay them one by one, the last one last: each earlier replay passed
    // over it.
    let last = &mails[3].dedupe_key;
    let mut order: Vec<_> = failures
        .iter()
        .filter(|f| &f.source.dedupe_key != last)
        .collect();
    order.extend(failures.iter().filter(|f| &f.source.dedupe_key == last));
    for (before, f) in order.into_iter().enumerate() {
        let out = mailagent(&h, &["dead-letters", "replay", &f.id.to_string()]);
        assert!(
            out.status.success(),
            "replay of #{} ({before} replayed before it): {}",
            f.id,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(h.queue_depth().await, 4, "every mail went back");
    let dead_left = common::topology::queue_depth(&h.channel, &h.topology.dead_queue)
        .await
        .unwrap();
    assert_eq!(dead_left, 0);
}

/// For each `$run`, two tests running it against each record store, named
/// `$sqlite` and `$postgres` (spelled out, so a test is found by its name).
macro_rules! both_stores {
    ($($run:ident: $sqlite:ident, $postgres:ident;)*) => {$(
        #[tokio::test]
        async fn $sqlite() {
            $run(StoreKind::Sqlite).await;
        }

        #[tokio::test]
        async fn $postgres() {
            $run(StoreKind::Postgres).await;
        }
    )*};
}

both_stores! {
    creates_one_typed_record_with_three_children:
        sqlite_creates_one_typed_record_with_three_children,
        postgres_creates_one_typed_record_with_three_children;
    duplicates_make_one_record:
        sqlite_duplicates_make_one_record_and_one_rejection,
        postgres_duplicates_make_one_record_and_one_rejection;
    a_rejection_whose_commit_answer_was_lost_is_dead_lettered_once:
        sqlite_a_rejection_whose_commit_answer_was_lost_is_dead_lettered_once,
        postgres_a_rejection_whose_commit_answer_was_lost_is_dead_lettered_once;
}

/// Group commit on PostgreSQL: forty creates waiting at once are written in
/// one transaction. The batch is tried first without savepoints; two of
/// its creates cannot become records — a unique value another one of the
/// batch took, a dedupe key another one of the batch claimed — so it is
/// rolled back and written again with each create in its savepoint: the
/// other 38 are committed, the clash is stored as a failure, and nothing
/// of the first attempt remains.
#[tokio::test]
async fn postgres_batch_with_a_clash_is_written_again_with_savepoints_and_the_rest_commits() {
    use form_processor::objectmap::{Child, Form};
    use form_processor::store::{BatchObserver, Created, NewRecord, Source, Store};
    use form_processor::value::Value;
    use std::sync::{Arc, Mutex};

    let h = Harness::new(StoreKind::Postgres, &[]).await;
    let record = |key: &str, id: &str| NewRecord {
        topic: "lease".into(),
        form: Form {
            module: "triContract".into(),
            business_object: "triRealEstateContract".into(),
            action: None,
            fields: vec![("triIdTX".into(), Value::Text(id.into()))],
            children: vec![Child {
                association: "Payments".into(),
                module: "triPayment".into(),
                business_object: "triPaymentSchedule".into(),
                fields: vec![("triAmountNU".into(), Value::Number(1.0))],
            }],
        },
        unique: vec![("triIdTX".into(), id.into())],
        source: Source {
            dedupe_key: key.into(),
            ..Default::default()
        },
    };
    let batches = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&batches);
    let observe: BatchObserver = Arc::new(move |n, _| seen.lock().unwrap().push(n));
    let store = Store::open(&h.store_url, Some(observe)).await.unwrap();
    let mut records: Vec<NewRecord> = (0..38)
        .map(|i| record(&format!("key-{i}"), &format!("L-{i}")))
        .collect();
    records.insert(10, record("key-unique-clash", "L-0"));
    records.insert(20, record("key-1", "L-other"));
    // On this test's single-threaded runtime every create is queued before
    // the writer task runs, so all forty meet in one batch.
    let results = futures::future::join_all(records.into_iter().map(|r| store.create(r))).await;
    assert_eq!(*batches.lock().unwrap(), vec![40], "one batch");
    let results: Vec<Created> = results.into_iter().map(|r| r.unwrap()).collect();
    assert!(
        matches!(&results[10], Created::Duplicate(_, r) if r.reason.code() == "duplicate"),
        "{:?}",
        results[10]
    );
    assert_eq!(results[20], Created::AlreadyKnown);
    let created = results
        .iter()
        .filter(|r| matches!(r, Created::Record(_)))
        .count();
    assert_eq!(created, 38);
    let stored = store.records(&Default::default()).await.unwrap();
    assert_eq!(stored.len(), 38);
    assert!(stored.iter().all(|r| r.children.len() == 1));
    let failures = store.failures().await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].source.dedupe_key, "key-unique-clash");

    // The writer goes on: a later batch without clashes is committed whole.
    let results = futures::future::join_all(
        (38..48).map(|i| store.create(record(&format!("key-{i}"), &format!("L-{i}")))),
    )
    .await;
    assert!(results.iter().all(|r| matches!(r, Ok(Created::Record(_)))));
    assert_eq!(store.count_records().await.unwrap(), 48);
    store.close().await;
}
