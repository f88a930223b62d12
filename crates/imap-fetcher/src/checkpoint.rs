//! The per-config checkpoint in Redis (§4): UIDVALIDITY and the last UID
//! handed over, plus the state of a scan in progress.
//!
//! Stored as a hash at `Keys::checkpoint(config)`, which shares its hash
//! tag with the lease, so every write is *fenced*: a Lua script writes only
//! while this replica still owns the lease. A replica that lost its lease
//! cannot move the checkpoint of the new owner.
//!
//! Rules (see docs/imap-fetcher.md):
//! - no checkpoint: a *scan* starts with the `start-from` criterion
//!   (`UNSEEN`, `ALL`; `now` just records UIDNEXT−1);
//! - UIDVALIDITY changed: a scan starts with a criterion chosen by
//!   after-fetch: `mark-seen` → `UNSEEN`, `move`/`delete` → `ALL` (the folder
//!   only holds what was not handed over), `keep` → `SINCE` the day before
//!   the last checkpoint write;
//! - a scan covers UIDs up to `scan_until` (UIDNEXT−1 when it began); after
//!   each batch `last_uid` advances; when done, `last_uid = scan_until` and
//!   normal operation (UIDs above `last_uid`) resumes;
//! - `last_uid` only moves over UIDs handed over (confirmed, or recorded as
//!   oversized) or gone from the server. A message not handed over (a FETCH
//!   reply without its body, say) holds it back; the UIDs handed over above
//!   it are kept in `ahead`, so the next pass retries just that message and
//!   publishes nothing twice.

use std::collections::{BTreeSet, HashMap, HashSet};

use common::keys::Keys;
use common::RedisHandle;
use redis::AsyncCommands;

use common::fetch::FetchError;

/// Write only while we hold the lease: `KEYS[1]` lease, `KEYS[2]` checkpoint,
/// `ARGV[1]` owner, then field/value pairs.
const FENCED_WRITE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 1";

/// A mailbox folder's progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// The folder's UIDVALIDITY.
    pub uidvalidity: u32,
    /// Every message with a UID up to this one was handed over (or skipped
    /// by the scan criterion).
    pub last_uid: u32,
    /// While scanning: the highest UID the scan covers.
    pub scan_until: u32,
    /// While scanning: the `UID SEARCH` criterion.
    pub scan_criterion: String,
    /// When this checkpoint was written (epoch seconds).
    pub saved_at: u64,
    /// UIDs above `last_uid` already handed over (a message below them was
    /// not, yet).
    pub ahead: BTreeSet<u32>,
    /// Within one pass (not stored): the message a batch left not handed
    /// over. A later batch of the pass must not move `last_uid` past it.
    pub hole: Option<u32>,
}

impl Checkpoint {
    /// True while a scan is in progress.
    pub fn scanning(&self) -> bool {
        self.scan_until > 0 && !self.scan_criterion.is_empty()
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("uidvalidity", self.uidvalidity.to_string()),
            ("last-uid", self.last_uid.to_string()),
            ("scan-until", self.scan_until.to_string()),
            ("scan-criterion", self.scan_criterion.clone()),
            ("saved-at", self.saved_at.to_string()),
            (
                "ahead",
                self.ahead
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]
    }

    /// Moves `last_uid` over the longest run of `chunk` (ascending UIDs above
    /// it) that is `handled` (handed over or recorded as oversized), already
    /// `ahead`, or not `present` on the server any more; what is handled
    /// beyond that run is remembered in `ahead`. Returns true when it
    /// changed.
    pub fn advance(
        &mut self,
        chunk: &[u32],
        handled: &HashSet<u32>,
        present: impl Fn(u32) -> bool,
    ) -> bool {
        let before = (self.last_uid, self.ahead.clone());
        let mut last = self.last_uid;
        for &uid in chunk {
            if self.hole.is_some_and(|h| uid > h) {
                break;
            }
            if handled.contains(&uid) || self.ahead.contains(&uid) || !present(uid) {
                last = last.max(uid);
                if self.hole == Some(uid) {
                    self.hole = None;
                }
            } else {
                self.hole = Some(uid);
                break;
            }
        }
        self.last_uid = last;
        self.ahead
            .extend(handled.iter().copied().filter(|u| *u > last));
        self.ahead.retain(|u| *u > last);
        (self.last_uid, &self.ahead) != (before.0, &before.1)
    }

    fn from_fields(map: &HashMap<String, String>) -> Option<Self> {
        let num = |k: &str| map.get(k).and_then(|v| v.parse::<u64>().ok());
        Some(Self {
            uidvalidity: num("uidvalidity")? as u32,
            last_uid: num("last-uid")? as u32,
            scan_until: num("scan-until").unwrap_or(0) as u32,
            scan_criterion: map.get("scan-criterion").cloned().unwrap_or_default(),
            saved_at: num("saved-at").unwrap_or(0),
            ahead: map
                .get("ahead")
                .map(|v| v.split(',').filter_map(|u| u.parse().ok()).collect())
                .unwrap_or_default(),
            hole: None,
        })
    }
}

/// Reads the checkpoint of `config`; `None` when there is none (or it is
/// unreadable, which is treated as none).
pub async fn load(
    redis: &mut RedisHandle,
    keys: &Keys,
    config: &str,
) -> Result<Option<Checkpoint>, FetchError> {
    let map: HashMap<String, String> =
        redis
            .hgetall(keys.checkpoint(config))
            .await
            .map_err(|source| FetchError::Redis {
                action: "read the checkpoint",
                source,
            })?;
    Ok(Checkpoint::from_fields(&map))
}

/// Writes the checkpoint if `owner` still holds the lease of `config`.
/// Returns [`FetchError::LeaseLost`] otherwise.
pub async fn save(
    redis: &mut RedisHandle,
    keys: &Keys,
    config: &str,
    owner: &str,
    checkpoint: &Checkpoint,
) -> Result<(), FetchError> {
    let mut cp = checkpoint.clone();
    cp.saved_at = common::heartbeat::now_secs();
    let script = redis::Script::new(FENCED_WRITE);
    let mut script = script.prepare_invoke();
    script
        .key(keys.lease(config))
        .key(keys.checkpoint(config))
        .arg(owner);
    for (k, v) in cp.fields() {
        script.arg(k).arg(v);
    }
    let written: i64 = script
        .invoke_async(redis)
        .await
        .map_err(|source| FetchError::Redis {
            action: "write the checkpoint",
            source,
        })?;
    if written == 1 {
        Ok(())
    } else {
        Err(FetchError::LeaseLost(config.to_string()))
    }
}

/// The `UID SEARCH` criterion of a re-scan after a UIDVALIDITY change.
pub fn rescan_criterion(after_fetch: &common::config::AfterFetch, previous_save: u64) -> String {
    use common::config::AfterFetch;
    match after_fetch {
        AfterFetch::MarkSeen => "UNSEEN".to_string(),
        AfterFetch::Move(_) | AfterFetch::Delete => "ALL".to_string(),
        AfterFetch::Keep => format!("SINCE {}", imap_date(previous_save.saturating_sub(86_400))),
    }
}

/// An IMAP date (`7-Mar-2024`) of an epoch time, UTC.
pub fn imap_date(epoch: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = (epoch / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{d}-{}-{y}", MONTHS[(m - 1) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::config::AfterFetch;

    #[test]
    fn imap_date_table() {
        let cases = [
            (0, "1-Jan-1970"),
            (951_782_400, "29-Feb-2000"),
            (1_709_769_600, "7-Mar-2024"),
            (1_735_689_599, "31-Dec-2024"),
        ];
        for (epoch, date) in cases {
            assert_eq!(imap_date(epoch), date, "{epoch}");
        }
    }

    #[test]
    fn rescan_rule_follows_after_fetch() {
        let day = 1_709_769_600 + 86_400;
        assert_eq!(rescan_criterion(&AfterFetch::MarkSeen, day), "UNSEEN");
        assert_eq!(rescan_criterion(&AfterFetch::Delete, day), "ALL");
        assert_eq!(rescan_criterion(&AfterFetch::Move("x".into()), day), "ALL");
        assert_eq!(rescan_criterion(&AfterFetch::Keep, day), "SINCE 7-Mar-2024");
    }

    #[test]
    fn fields_round_trip() {
        let cp = Checkpoint {
            uidvalidity: 7,
            last_uid: 4_000_000_000,
            scan_until: 12,
            scan_criterion: "UNSEEN".into(),
            saved_at: 99,
            ahead: BTreeSet::from([13, 15]),
            hole: None,
        };
        let map: HashMap<String, String> = cp
            .fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(Checkpoint::from_fields(&map), Some(cp));
        assert_eq!(Checkpoint::from_fields(&HashMap::new()), None);
    }

    #[test]
    fn a_message_not_handed_over_holds_the_checkpoint_and_what_follows_waits_ahead() {
        let mut cp = Checkpoint {
            last_uid: 10,
            ..Default::default()
        };
        let present = |_| true;
        // 12 came without its body: 11 is passed, 13 and 14 wait ahead.
        let handled = HashSet::from([11, 13, 14]);
        assert!(cp.advance(&[11, 12, 13, 14], &handled, present));
        assert_eq!(cp.last_uid, 11);
        assert_eq!(cp.ahead, BTreeSet::from([13, 14]));
        // The next pass hands over 12 (and new 15): all of it is passed.
        assert!(cp.advance(&[12, 15], &HashSet::from([12, 15]), present));
        assert_eq!(cp.last_uid, 15);
        assert!(cp.ahead.is_empty());
        // A message gone from the server does not hold it back.
        assert!(cp.advance(&[16, 17], &HashSet::from([17]), |u| u != 16));
        assert_eq!(cp.last_uid, 17);
        assert!(!cp.advance(&[], &HashSet::new(), present));
    }

    #[test]
    fn a_later_batch_of_the_pass_does_not_pass_a_message_left_behind() {
        let mut cp = Checkpoint {
            last_uid: 10,
            ..Default::default()
        };
        let present = |_| true;
        // 12 came without its body in one batch; the next batch of the same
        // pass is handed over whole: it waits ahead, 12 holds the checkpoint.
        cp.advance(&[11, 12, 13], &HashSet::from([11, 13]), present);
        cp.advance(&[14, 15], &HashSet::from([14, 15]), present);
        assert_eq!(cp.last_uid, 11);
        assert_eq!(cp.ahead, BTreeSet::from([13, 14, 15]));
    }
}
