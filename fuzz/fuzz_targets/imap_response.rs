//! What imap-fetcher adds on top of async-imap: the greeting check
//! (`session::greeting`), the XOAUTH2 authenticator and its error
//! challenge (`session::XOAuth2`), then a pass as `mailbox.rs` runs it (UID
//! SEARCH, sizes by `UID FETCH (UID RFC822.SIZE)`, bodies by `UID FETCH (UID
//! BODY.PEEK[])` and their dedupe keys, the unsolicited responses),
//! reading the input as everything the server sends. Also modified UTF-7
//! folder names (`utf7::decode`, and `encode` back).
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use common::envelope::dedupe_key;
use futures::StreamExt;
use imap_fetcher::after_fetch::uid_set;
use imap_fetcher::session::{self, XOAuth2};
use imap_fetcher::utf7;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

async fn pass(server: &[u8]) -> Option<()> {
    let stream = tokio::io::join(server, tokio::io::sink());
    let mut client = async_imap::Client::new(stream);
    session::greeting(&mut client, "fuzz:143").await.ok()?;
    let mut auth = XOAuth2::new("user@example.com", "token");
    let mut s = client.authenticate("XOAUTH2", &mut auth).await.ok()?;
    let mut uids: Vec<u32> = s.uid_search("UID 1:*").await.ok()?.into_iter().collect();
    uids.sort_unstable();
    if uids.is_empty() {
        return None;
    }
    let mut sizes: HashMap<u32, u32> = HashMap::new();
    {
        let mut fetches = s
            .uid_fetch(uid_set(&uids), "(UID RFC822.SIZE)")
            .await
            .ok()?;
        while let Some(f) = fetches.next().await {
            let f = f.ok()?;
            if let (Some(uid), Some(size)) = (f.uid, f.size) {
                sizes.insert(uid, size);
            }
        }
    }
    let wanted: Vec<u32> = uids
        .iter()
        .copied()
        .filter(|u| sizes.get(u).is_some_and(|s| *s <= 1 << 20))
        .collect();
    if !wanted.is_empty() {
        let mut fetches = s
            .uid_fetch(uid_set(&wanted), "(UID BODY.PEEK[])")
            .await
            .ok()?;
        while let Some(f) = fetches.next().await {
            let f = f.ok()?;
            if let (Some(_), Some(body)) = (f.uid, f.body()) {
                let _ = dedupe_key("user@example.com", body);
            }
        }
    }
    while s.unsolicited_responses.try_recv().is_ok() {}
    s.logout().await.ok()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(name) = utf7::decode(text) {
            assert_eq!(utf7::decode(&utf7::encode(&name)).as_ref(), Some(&name));
        }
        assert_eq!(utf7::decode(&utf7::encode(text)).as_deref(), Some(text));
    }
    let _ = runtime().block_on(pass(data));
});
