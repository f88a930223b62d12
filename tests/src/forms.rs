//! Support for the form-processor tests: offline-form workbooks built with
//! rust_xlsxwriter, mails carrying them, envelopes published to a real
//! RabbitMQ, a processor run in-process against its own prefix, Redis
//! prefix and store (a SQLite file or a fresh PostgreSQL database), and
//! polling helpers with deadlines.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use common::config::{Action, Component, Config};
use common::envelope::{dedupe_key, Envelope, MessageRef};
use common::shutdown::CancellationToken;
use common::topology::Topology;
use form_processor::store::{Store, StoredFailure, StoredRecord};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use rust_xlsxwriter::{ExcelDateTime, Format, Workbook};

use crate::env::{unique, Endpoints};
use crate::harness::TestConfig;
use crate::relay::Relay;

/// The object-map sheet name.
pub const MAP: &str = "Tririga Object Map";
/// The lease topic's subject.
pub const LEASE_SUBJECT: &str = "LEASE ABSTRACT FORM";
/// A topic that requires an authenticated sender.
pub const SECURE_SUBJECT: &str = "SECURE LEASE FORM";
/// The authserv-id the test config trusts.
pub const TRUSTED_AUTHSERV: &str = "mx.contoso.com";

/// Which record store a test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
    /// A fresh PostgreSQL database reached through a [`Relay`] the test
    /// can cut, to simulate a store outage.
    PostgresViaProxy,
}

/// The lease form's root fields: 8 fields of every type.
pub struct Lease<'a> {
    /// triIdTX (text, unique, required).
    pub id: &'a str,
    /// triNameTX (text).
    pub name: &'a str,
    /// triRentNU (number).
    pub rent: f64,
    /// triAreaNU (number).
    pub area: f64,
    /// triActiveBL (boolean).
    pub active: bool,
    /// triStartDA (date).
    pub start: (u16, u8, u8),
    /// triEndDA (date).
    pub end: (u16, u8, u8),
    /// triNotesTX (text; empty string = empty cell).
    pub notes: &'a str,
    /// Cells of 32,000 characters each, in a column the map does not
    /// name: they inflate the shared strings (about 32 KB each) while
    /// compressing to almost nothing.
    pub filler_cells: u32,
}

impl Default for Lease<'_> {
    fn default() -> Self {
        Self {
            id: "L-1",
            name: "Main Street 1",
            rent: 1200.5,
            area: 350.0,
            active: true,
            start: (2024, 3, 1),
            end: (2029, 2, 28),
            notes: "corner unit",
            filler_cells: 0,
        }
    }
}

/// How to build the map sheet (variations for rejection tests).
pub struct MapSpec<'a> {
    /// The root tag row (`Excel to Tririga`, module, business object, action).
    pub root: Vec<&'a str>,
    /// Extra rows inserted before the root's End.
    pub extra: Vec<Vec<&'a str>>,
    /// Whether to close the root with End.
    pub close_root: bool,
}

impl Default for MapSpec<'_> {
    fn default() -> Self {
        Self {
            root: vec![
                "Excel to Tririga",
                "triContract",
                "triLeaseAbstract",
                "CREATE",
            ],
            extra: Vec::new(),
            close_root: true,
        }
    }
}

/// A lease workbook: 8 typed root fields and 3 payment rows.
pub fn lease_workbook(lease: &Lease<'_>) -> Vec<u8> {
    lease_workbook_with(lease, &MapSpec::default())
}

/// A lease workbook with a varied map.
pub fn lease_workbook_with(lease: &Lease<'_>, spec: &MapSpec<'_>) -> Vec<u8> {
    let mut wb = Workbook::new();
    let date = Format::new().set_num_format("yyyy-mm-dd");
    let map = wb.add_worksheet();
    map.set_name(MAP).unwrap();
    let mut rows: Vec<Vec<&str>> = vec![spec.root.clone()];
    for (name, cell) in [
        ("triIdTX", "Lease!B1"),
        ("triNameTX", "Lease!B2"),
        ("triRentNU", "Lease!B3"),
        ("triAreaNU", "Lease!B4"),
        ("triActiveBL", "Lease!B5"),
        ("triStartDA", "Lease!B6"),
        ("triEndDA", "Lease!B7"),
        ("triNotesTX", "Lease!B8"),
    ] {
        rows.push(vec!["Field", name, cell]);
    }
    rows.push(vec![
        "Association",
        "Payments",
        "triContract",
        "triPaymentSchedule",
        "Payments!A2",
    ]);
    rows.push(vec!["Field", "triSeqNU", "A"]);
    rows.push(vec!["Field", "triDueDA", "B"]);
    rows.push(vec!["Field", "triAmountNU", "C"]);
    rows.push(vec!["End"]);
    rows.extend(spec.extra.iter().cloned());
    if spec.close_root {
        rows.push(vec!["End"]);
    }
    for (r, row) in rows.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            map.write_string(r as u32, c as u16, *v).unwrap();
        }
    }
    let sheet = wb.add_worksheet();
    sheet.set_name("Lease").unwrap();
    let labels = [
        "Lease ID", "Name", "Rent", "Area", "Active", "Start", "End", "Notes",
    ];
    for (r, l) in labels.iter().enumerate() {
        sheet.write_string(r as u32, 0, *l).unwrap();
    }
    if !lease.id.is_empty() {
        sheet.write_string(0, 1, lease.id).unwrap();
    }
    sheet.write_string(1, 1, lease.name).unwrap();
    sheet.write_number(2, 1, lease.rent).unwrap();
    sheet.write_number(3, 1, lease.area).unwrap();
    sheet.write_boolean(4, 1, lease.active).unwrap();
    let d = |(y, m, dd): (u16, u8, u8)| ExcelDateTime::from_ymd(y, m, dd).unwrap();
    sheet
        .write_datetime_with_format(5, 1, d(lease.start), &date)
        .unwrap();
    sheet
        .write_datetime_with_format(6, 1, d(lease.end), &date)
        .unwrap();
    if !lease.notes.is_empty() {
        sheet.write_string(7, 1, lease.notes).unwrap();
    }
    for i in 0..lease.filler_cells {
        let filler = format!("{i:05}{}", "x".repeat(31_995));
        sheet.write_string(i, 3, filler).unwrap();
    }
    let pay = wb.add_worksheet();
    pay.set_name("Payments").unwrap();
    pay.write_string(0, 0, "Seq").unwrap();
    pay.write_string(0, 1, "Due").unwrap();
    pay.write_string(0, 2, "Amount").unwrap();
    for i in 0..3u32 {
        pay.write_number(i + 1, 0, f64::from(i + 1)).unwrap();
        pay.write_datetime_with_format(i + 1, 1, d((2024, 4 + i as u8, 1)), &date)
            .unwrap();
        pay.write_number(i + 1, 2, 1200.5).unwrap();
    }
    wb.save_to_buffer().unwrap()
}

/// An attachment: file name, content type, bytes.
pub struct Attachment {
    /// File name.
    pub name: String,
    /// Media type.
    pub content_type: String,
    /// Content.
    pub bytes: Vec<u8>,
}

impl Attachment {
    /// An `.xlsx` attachment.
    pub fn xlsx(bytes: Vec<u8>) -> Self {
        Self {
            name: "form.xlsx".into(),
            content_type: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
                .into(),
            bytes,
        }
    }
}

/// A mail with a unique Message-ID, the given headers and attachments.
pub fn mail(
    subject: &str,
    from: &str,
    extra_headers: &[&str],
    attachments: &[Attachment],
) -> Vec<u8> {
    // A counter as well as the random part: among the 10,000 mails of a
    // benchmark, two random 32-bit ids collide about once in a hundred
    // runs, and the second mail is then (rightly) a duplicate.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("<{}.{n}@test.contoso.com>", unique("m"));
    let mut m = format!(
        "From: {from}\r\nTo: forms@contoso.com\r\nSubject: {subject}\r\nMessage-ID: {id}\r\nDate: Fri, 01 Mar 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    );
    for h in extra_headers {
        m.push_str(h);
        m.push_str("\r\n");
    }
    m.push_str("Content-Type: multipart/mixed; boundary=\"=b=\"\r\n\r\n--=b=\r\nContent-Type: text/plain\r\n\r\nPlease find the form attached.\r\n");
    for a in attachments {
        m.push_str(&format!(
            "--=b=\r\nContent-Type: {}; name=\"{}\"\r\nContent-Disposition: attachment; filename=\"{}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n",
            a.content_type, a.name, a.name
        ));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&a.bytes);
        for chunk in b64.as_bytes().chunks(76) {
            m.push_str(std::str::from_utf8(chunk).unwrap());
            m.push_str("\r\n");
        }
    }
    m.push_str("--=b=--\r\n");
    m.into_bytes()
}

/// A mail whose MIME parts nest `levels` deep.
pub fn nested_mail(levels: usize) -> Vec<u8> {
    let mut m = format!(
        "From: ann@contoso.com\r\nSubject: {LEASE_SUBJECT}\r\nMessage-ID: <{}@x>\r\nMIME-Version: 1.0\r\n",
        unique("n")
    );
    for i in 0..levels {
        m.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    m.push_str("Content-Type: text/plain\r\n\r\nhi\r\n");
    for i in (0..levels).rev() {
        m.push_str(&format!("--b{i}--\r\n"));
    }
    m.into_bytes()
}

/// A zip of a few KB that inflates to `inflated` bytes of zeros.
pub fn zip_bomb(inflated: usize) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(&mut out));
        let opts = zip::write::SimpleFileOptions::default().compression_level(Some(9));
        z.start_file("xl/worksheets/sheet1.xml", opts).unwrap();
        let chunk = vec![0u8; 1 << 20];
        let mut left = inflated;
        while left > 0 {
            let n = left.min(chunk.len());
            z.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        z.finish().unwrap();
    }
    out
}

/// A distinct, valid lease form from ann@contoso.com (`triIdTX` = `id`),
/// as its envelope.
pub fn lease_envelope(id: &str) -> Envelope {
    let wb = lease_workbook(&Lease {
        id,
        ..Default::default()
    });
    envelope(mail(
        LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &[Attachment::xlsx(wb)],
    ))
}

/// An envelope for a raw mail, as a fetcher would publish it.
pub fn envelope(raw: Vec<u8>) -> Envelope {
    let mailbox = "forms@contoso.com";
    Envelope {
        dedupe_key: dedupe_key(mailbox, &raw),
        body: raw,
        timestamp: 1_764_000_000,
        mail_config: "lease-forms".into(),
        mailbox: mailbox.into(),
        message_ref: MessageRef::Imap {
            uid: rand::random::<u32>() >> 1,
            uidvalidity: 1,
        },
        action: Action::Create,
        fetcher: "test".into(),
        traceparent: None,
    }
}

/// One test's world: its own AMQP and Redis prefixes and store.
pub struct Harness {
    /// The endpoints.
    pub env: Endpoints,
    /// The processor's configuration.
    pub config: Config,
    /// Exchange and queue names.
    pub topology: Topology,
    /// A publishing channel in confirm mode.
    pub channel: Channel,
    /// The AMQP connection.
    pub conn: Connection,
    /// The store URL.
    pub store_url: String,
    /// The configuration file (for the binaries).
    pub config_path: PathBuf,
    /// The proxy in front of the store ([`StoreKind::PostgresViaProxy`]).
    pub proxy: Option<Relay>,
    _dir: tempfile::TempDir,
    _cfg: TestConfig,
}

/// Extra `[form-processor]` lines for a harness.
pub type ExtraConfig<'a> = &'a [&'a str];

impl Harness {
    /// A fresh world; `extra` lines go into `[form-processor]`.
    pub async fn new(kind: StoreKind, extra: ExtraConfig<'_>) -> Self {
        Self::with_amqp(kind, extra, &[]).await
    }

    /// A fresh world; `extra` lines go into `[form-processor]`, `amqp`
    /// lines into `[amqp]` (a quorum topology, say).
    pub async fn with_amqp(kind: StoreKind, extra: ExtraConfig<'_>, amqp: &[&str]) -> Self {
        Self::build(kind, extra, amqp, None).await
    }

    /// A fresh world on several RabbitMQ nodes (`[amqp] urls`):
    /// `extra` lines go into `[form-processor]`, `amqp` lines into `[amqp]`.
    /// The harness's own connection goes to the first node that answers.
    pub async fn on_nodes(
        kind: StoreKind,
        extra: ExtraConfig<'_>,
        amqp: &[&str],
        urls: &[String],
    ) -> Self {
        Self::build(kind, extra, amqp, Some(urls)).await
    }

    async fn build(
        kind: StoreKind,
        extra: ExtraConfig<'_>,
        amqp: &[&str],
        urls: Option<&[String]>,
    ) -> Self {
        let env = Endpoints::load();
        let dir = tempfile::tempdir().unwrap();
        let prefix = unique("fp");
        let mut proxy = None;
        let store_url = match kind {
            StoreKind::Sqlite => format!("sqlite://{}/records.db", dir.path().display()),
            StoreKind::Postgres => create_database(env.postgres_url(), &prefix).await,
            StoreKind::PostgresViaProxy => {
                let direct = create_database(env.postgres_url(), &prefix).await;
                let mut url = url::Url::parse(&direct).unwrap();
                let target = url.socket_addrs(|| Some(5432)).unwrap()[0];
                let p = Relay::start(target).await;
                url.set_port(Some(p.addr.port())).unwrap();
                proxy = Some(p);
                url.to_string()
            }
        };
        let mut cfg = TestConfig::with_prefix(&env, &prefix);
        cfg.no_token_encryption()
            .store(&store_url)
            .lease_topic()
            .topic(
                &format!("/^{SECURE_SUBJECT}$/"),
                "required = [\"triIdTX\"]\nsenders = [\"@contoso.com\"]\nrequire-authenticated-sender = true\n",
            );
        for line in form_processor_settings(extra) {
            cfg.section_line("form-processor", &line);
        }
        for line in amqp {
            cfg.section_line("amqp", line);
        }
        if let Some(urls) = urls {
            cfg.amqp_urls(urls);
        }
        let path = cfg.path_for(Component::FormProcessor);
        let config = cfg.load(Component::FormProcessor);
        let conn = match urls {
            None => Connection::connect(env.amqp_url(), ConnectionProperties::default())
                .await
                .unwrap(),
            Some(urls) => {
                // The harness itself connects as the administrator; the
                // processor's config has its least-privilege user.
                let mut admin = config.clone();
                admin.amqp.urls = urls
                    .iter()
                    .map(|u| common::secret::SecretUrl::new(u.clone()))
                    .collect();
                admin.amqp.url = admin.amqp.urls[0].clone(); // the first node, for logs
                common::connect::amqp(&admin, "test-harness").await.unwrap()
            }
        };
        let channel = conn.create_channel().await.unwrap();
        let topology = common::topology::declare(&channel, &config.amqp, false)
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            env,
            config,
            topology,
            channel,
            conn,
            store_url,
            config_path: path,
            proxy,
            _dir: dir,
            _cfg: cfg,
        }
    }

    /// Starts a processor in this process; cancel the token to stop it.
    pub fn start(&self, hooks: form_processor::Hooks) -> Processor {
        let token = CancellationToken::new();
        let task = tokio::spawn(form_processor::run_with(
            self.config.clone(),
            token.clone(),
            hooks,
        ));
        Processor { token, task }
    }

    /// Publishes an envelope (confirmed) to the incoming exchange.
    pub async fn publish(&self, e: &Envelope) {
        let confirm = self
            .channel
            .basic_publish(
                &self.topology.exchange,
                e.routing_key(),
                BasicPublishOptions::default(),
                &e.body,
                e.properties(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// Publishes `n` distinct lease forms with ids `L-0`… `L-<n-1>`.
    pub async fn publish_leases(&self, n: usize) {
        let wb = |id: &str| {
            lease_workbook(&Lease {
                id,
                ..Default::default()
            })
        };
        for i in 0..n {
            let id = format!("L-{i}");
            let raw = mail(
                LEASE_SUBJECT,
                "ann@contoso.com",
                &[],
                &[Attachment::xlsx(wb(&id))],
            );
            self.publish(&envelope(raw)).await;
        }
    }

    /// Opens the store (as the CLI would).
    pub async fn store(&self) -> Store {
        Store::open(&self.store_url, None).await.unwrap()
    }

    /// Takes every message now in the dead-letter queue: (x-reason, message-id).
    pub async fn drain_dead(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(&self.topology.dead_queue, BasicGetOptions::default())
            .await
            .unwrap()
        {
            let reason = m
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(common::envelope::headers::REASON).cloned())
                .and_then(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            let id = crate::fixture::message_id(&m.properties);
            m.acker.ack(BasicAckOptions::default()).await.unwrap();
            out.push((reason, id));
        }
        out
    }

    /// This world's configuration as `component` loads it (its own
    /// least-privilege users).
    pub fn config_for(&self, component: Component) -> Config {
        self._cfg.load(component)
    }

    /// This world's configuration file as `component` reads it (its own
    /// least-privilege users), e.g. for the `mailagent` CLI.
    pub fn config_path_for(&self, component: Component) -> PathBuf {
        self._cfg.path_for(component)
    }

    /// Messages ready in the create queue.
    pub async fn queue_depth(&self) -> u32 {
        common::topology::queue_depth(&self.channel, &self.topology.create_queue)
            .await
            .unwrap()
    }
}

/// The `[form-processor]` lines: the test defaults and `extra` (an
/// `extra` line replaces the default of its key).
fn form_processor_settings(extra: &[&str]) -> Vec<String> {
    [
        "prefetch = 32".to_string(),
        format!("trusted-authserv-ids = [\"{TRUSTED_AUTHSERV}\"]"),
        "max-decompressed-bytes = 20000000".to_string(),
        "max-workbook-bytes = 5000000".to_string(),
    ]
    .into_iter()
    .chain(extra.iter().map(|l| l.to_string()))
    .collect()
}

/// A processor running in this process.
pub struct Processor {
    /// Cancelling it is SIGTERM.
    pub token: CancellationToken,
    /// The run task.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Processor {
    /// True while it runs.
    pub fn running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops it gracefully and returns its result.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the processor stops within 30 s")
            .expect("the processor task does not panic")
    }
}

/// Creates a database named after `prefix` and returns its URL.
pub async fn create_database(admin_url: &str, prefix: &str) -> String {
    use sqlx::Connection as _;
    let name = prefix.replace(['-', '.'], "_").to_lowercase();
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    let mut url = url::Url::parse(admin_url).unwrap();
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// Drops the database [`create_database`] made for `prefix`, if it is
/// there (a benchmark's clean-up; errors are ignored).
pub async fn drop_database(admin_url: &str, prefix: &str) {
    use sqlx::Connection as _;
    let name = prefix.replace(['-', '.'], "_").to_lowercase();
    if let Ok(mut conn) = sqlx::PgConnection::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}

/// Polls `check` until it returns `Some`, or panics after the deadline.
pub use crate::harness::wait_for;

/// Waits until the store holds `n` root records, and returns them.
pub async fn wait_records(store: &Store, n: usize, within: Duration) -> Vec<StoredRecord> {
    wait_for(&format!("{n} records"), within, || async {
        let r = store.records(&Default::default()).await.ok()?;
        (r.len() >= n).then_some(r)
    })
    .await
}

/// Waits until the store holds `n` failures, and returns them.
pub async fn wait_failures(store: &Store, n: usize, within: Duration) -> Vec<StoredFailure> {
    wait_for(&format!("{n} failures"), within, || async {
        let f = store.failures().await.ok()?;
        (f.len() >= n && f.iter().all(|f| f.dead_lettered)).then_some(f)
    })
    .await
}
