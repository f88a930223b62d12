//! Support for the IMAP fetcher's tests: the fixture
//! ([`crate::fixture::Fixture`] for IMAP), and mailbox seeding and
//! inspection as Dovecot's master user (APPEND, CREATE, flags). Bulk
//! seeding writes Maildir files ([`crate::maildir`]).

use std::collections::BTreeMap;
use std::time::Duration;

use common::shutdown::CancellationToken;
use tokio::task::JoinHandle;

use crate::env::Endpoints;
use crate::mailclient::{self, Conn};

pub use crate::fixture::{depth, drain, eventually, purge, Imap};

/// The OAuth profile name every fixture config uses.
pub const PROFILE: &str = <Imap as crate::fixture::Protocol>::PROFILE;

/// One IMAP test's world.
pub type Fixture = crate::fixture::Fixture<Imap>;

/// Short lease and backoff times for an in-process fetcher.
pub fn options() -> imap_fetcher::Options {
    imap_fetcher::Options {
        lease_ttl: Duration::from_secs(3),
        backoff_initial: Duration::from_millis(300),
        backoff_max: Duration::from_secs(2),
        ..imap_fetcher::Options::default()
    }
}

/// Starts the IMAP fetcher in this process; the task panics when the run
/// fails. Stop it with [`stop`].
pub fn start(
    config: common::Config,
    options: imap_fetcher::Options,
) -> (CancellationToken, JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move {
        common::fetch::run(imap_fetcher::Imap, config, options, s)
            .await
            .expect("fetcher run");
    });
    (shutdown, task)
}

/// Graceful stop of a fetcher from [`start`], within 15 s.
pub async fn stop(shutdown: CancellationToken, task: JoinHandle<()>) {
    crate::fixture::stop_task(&shutdown, task, Duration::from_secs(15), "fetcher").await;
}

impl Fixture {
    /// A mail config table for `mailbox` over IMAPS with XOAUTH2; `extra`
    /// lines are appended (they may override nothing already set).
    pub fn mail_table(&self, name: &str, mailbox: &str, extra: &str) -> String {
        let port = self.env.mail_addr("IMAPS").port();
        self.mail_table_for(name, mailbox, port, "imaps", extra)
    }
}

/// A master-user IMAP session on `mailbox` (for seeding and inspection).
pub async fn master(
    env: &Endpoints,
    mailbox: &str,
) -> Conn<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut c = mailclient::connect_tls(env.mail_addr("IMAPS"), &env.ca_file())
        .await
        .expect("connect");
    mailclient::imap_greeting(&mut c).await.expect("greeting");
    let login = format!(
        "LOGIN \"{mailbox}{sep}{user}\" \"{pw}\"",
        sep = env.get("MAILAGENT_TEST_MASTER_SEPARATOR"),
        user = env.get("MAILAGENT_TEST_MASTER_USER"),
        pw = env.get("MAILAGENT_TEST_MASTER_PASSWORD"),
    );
    let (_, tagged) = mailclient::imap_command(&mut c, "m0", &login)
        .await
        .expect("login");
    assert!(tagged.starts_with("m0 OK"), "master login: {tagged}");
    c
}

/// Appends one message to `folder` as the master user.
pub async fn append(env: &Endpoints, mailbox: &str, folder: &str, message: &[u8]) {
    let mut c = master(env, mailbox).await;
    mailclient::imap_append(&mut c, "m1", &format!("\"{folder}\""), message)
        .await
        .expect("append");
}

/// Creates a folder (name already in modified UTF-7 as needed).
pub async fn create_folder(env: &Endpoints, mailbox: &str, wire_name: &str) {
    let mut c = master(env, mailbox).await;
    let (_, tagged) = mailclient::imap_command(&mut c, "m1", &format!("CREATE \"{wire_name}\""))
        .await
        .expect("create");
    assert!(tagged.starts_with("m1 OK"), "{tagged}");
}

/// UID → flags of every message in a folder (wire name).
pub async fn flags(env: &Endpoints, mailbox: &str, folder: &str) -> BTreeMap<u32, String> {
    let mut c = master(env, mailbox).await;
    let (_, tagged) = mailclient::imap_command(&mut c, "m1", &format!("SELECT \"{folder}\""))
        .await
        .expect("select");
    assert!(tagged.starts_with("m1 OK"), "{tagged}");
    let (lines, tagged) = mailclient::imap_command(&mut c, "m2", "UID FETCH 1:* (UID FLAGS)")
        .await
        .expect("fetch");
    assert!(tagged.starts_with("m2 OK"), "{tagged}");
    let mut out = BTreeMap::new();
    for l in lines {
        let Some(i) = l.find("UID ") else { continue };
        let uid: u32 = l[i + 4..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        let flags = l
            .find("FLAGS (")
            .map(|f| {
                let rest = &l[f + 7..];
                rest[..rest.find(')').unwrap_or(rest.len())].to_string()
            })
            .unwrap_or_default();
        out.insert(uid, flags);
    }
    out
}
