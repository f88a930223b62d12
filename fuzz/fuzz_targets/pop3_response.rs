//! The POP3 client's response handling: a whole poll session of
//! `pop3::Session` (greeting, CAPA, AUTH XOAUTH2 with its error challenge or
//! USER/PASS, UIDL, LIST, RETR with dot-unstuffing, DELE, QUIT) reading the
//! input as everything the server sends, and `uidls::join`/`uidls::plan` on
//! the listings, in the order `mailbox.rs` runs them. What the client sends
//! is discarded. Also the pure `wire` parsers on every input line.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use common::config::StartFrom;
use libfuzzer_sys::fuzz_target;
use pop_fetcher::error::Result;
use pop_fetcher::pop3::{wire, Session};
use pop_fetcher::uidls;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

async fn poll(server: &[u8]) -> Result<()> {
    let stream = tokio::io::join(server, tokio::io::sink());
    let mut s = Session::new(stream, "fuzz:110", Duration::from_secs(5));
    s.greeting().await?;
    s.capa().await?;
    let login = if s.capabilities.has_sasl("XOAUTH2") {
        s.auth_xoauth2("user@example.com", "token").await?
    } else {
        s.user_pass("user@example.com", "password").await?
    };
    if let Err(refusal) = login {
        let _ = wire::explain_auth_refusal(&refusal.reply, false);
        return Ok(());
    }
    let uidl = s.uidl().await?;
    let list = s.list().await?;
    let listed = uidls::join(&list, &uidl);
    let plan = uidls::plan(
        &listed,
        Some(&HashSet::new()),
        &HashSet::new(),
        StartFrom::All,
        true,
        1 << 20,
    );
    let fetch: Vec<(u32, u64)> = plan.fetch.iter().map(|l| (l.msg, l.size)).collect();
    let bodies = s.retr_many(&fetch).await?;
    let done: Vec<u32> = bodies
        .iter()
        .filter(|(_, b)| b.is_ok())
        .map(|(n, _)| *n)
        .collect();
    s.dele_many(&done).await?;
    s.quit().await
}

fuzz_target!(|data: &[u8]| {
    for line in data.split_inclusive(|&b| b == b'\n') {
        let _ = wire::parse_reply(line);
        let text = String::from_utf8_lossy(line);
        let _ = wire::parse_scan(&text);
        let _ = wire::parse_uidl(&text);
        let _ = wire::is_protocol_close(&text);
    }
    let _ = runtime().block_on(poll(data));
});
