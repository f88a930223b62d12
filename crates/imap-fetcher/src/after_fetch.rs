//! What happens to a message on the server once RabbitMQ confirmed it:
//! `\Seen`, `\Deleted` + EXPUNGE, MOVE (or COPY + delete), or nothing.

use common::config::AfterFetch;

use crate::error::Result;
use crate::session::ImapSession;
use crate::utf7;
use crate::worker::{Caps, Worker};

impl Worker<'_> {
    /// Applies `action` to the confirmed messages `uids`.
    pub(crate) async fn after_fetch(
        &self,
        session: &mut ImapSession,
        uids: &[u32],
        action: &AfterFetch,
        caps: Caps,
    ) -> Result<()> {
        if uids.is_empty() || matches!(action, AfterFetch::Keep) {
            return Ok(());
        }
        // Only while this replica still holds the lease (§7a).
        self.mb.fence().await?;
        let set = uid_set(uids);
        match action {
            AfterFetch::Keep => Ok(()),
            AfterFetch::MarkSeen => self.store(session, &set, "+FLAGS.SILENT (\\Seen)").await,
            AfterFetch::Delete => {
                self.store(session, &set, "+FLAGS.SILENT (\\Deleted)")
                    .await?;
                self.expunge(session, &set, caps).await?;
                self.mb
                    .kit
                    .metrics
                    .deleted
                    .with_label_values(&[&self.mb.cfg.name])
                    .inc_by(uids.len() as u64);
                Ok(())
            }
            AfterFetch::Move(folder) => {
                let target = utf7::encode(folder);
                if caps.mv {
                    self.cmd("UID MOVE", session.uid_mv(&set, &target)).await
                } else {
                    self.cmd("UID COPY", session.uid_copy(&set, quote(&target)))
                        .await?;
                    self.store(session, &set, "+FLAGS.SILENT (\\Deleted)")
                        .await?;
                    self.expunge(session, &set, caps).await
                }
            }
        }
    }

    async fn store(&self, session: &mut ImapSession, set: &str, what: &str) -> Result<()> {
        let mut stream = self.cmd("UID STORE", session.uid_store(set, what)).await?;
        while self.next("UID STORE", &mut stream).await?.is_some() {}
        Ok(())
    }

    async fn expunge(&self, session: &mut ImapSession, set: &str, caps: Caps) -> Result<()> {
        if caps.uidplus {
            let mut stream = std::pin::pin!(self.cmd("EXPUNGE", session.uid_expunge(set)).await?);
            while self.next("EXPUNGE", &mut stream).await?.is_some() {}
        } else {
            // Without UIDPLUS, EXPUNGE also removes other \Deleted messages.
            let mut stream = std::pin::pin!(self.cmd("EXPUNGE", session.expunge()).await?);
            while self.next("EXPUNGE", &mut stream).await?.is_some() {}
        }
        Ok(())
    }
}

/// A quoted IMAP string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A compact UID set of ascending UIDs: `1:3,7,9:10`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_set_table() {
        let cases: [(&[u32], &str); 5] = [
            (&[], ""),
            (&[5], "5"),
            (&[1, 2, 3], "1:3"),
            (&[1, 2, 3, 7, 9, 10], "1:3,7,9:10"),
            (&[4_000_000_000, 4_000_000_001], "4000000000:4000000001"),
        ];
        for (uids, set) in cases {
            assert_eq!(uid_set(uids), set);
        }
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
