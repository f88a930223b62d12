//! What was handed over, by UIDL (§4): one Redis set per mail config
//! (`Keys::uidls`), and the plan of a poll computed from it.
//!
//! - A UIDL enters the set once RabbitMQ confirmed its message, *before*
//!   the DELE; so a session that dies before QUIT (deletions not committed)
//!   leaves messages the next session recognises and deletes without
//!   publishing them again.
//! - The set is bounded: UIDLs no longer on the server are dropped at every
//!   poll (and at once after a committed QUIT).
//! - A marker member (`" init"`, impossible as a UIDL, which has no space)
//!   tells a mailbox seen before from a new one, for `start-from = now`.
//! - `start-from = now` records the UIDLs present at first contact as
//!   *skipped* (`" skip:<uidl>"`): never published, and never deleted
//!   either — they were not handed over.

use std::collections::HashSet;

use common::config::StartFrom;
use common::RedisHandle;
use redis::AsyncCommands;

use crate::error::{Error, Result};

/// The marker member of an initialised set.
pub const INIT: &str = " init";

/// Prefix of the members recording UIDLs skipped by `start-from = now`.
pub const SKIP: &str = " skip:";

/// The set member recording that `uidl` was skipped.
pub fn skipped(uidl: &str) -> String {
    format!("{SKIP}{uidl}")
}

/// One message as listed by LIST and UIDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Message number in this session.
    pub msg: u32,
    /// Size from LIST, octets.
    pub size: u64,
    /// Unique id.
    pub uidl: String,
}

/// What one poll does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// First contact with `start-from = now`: record these UIDLs as
    /// skipped, fetch nothing.
    pub init: Option<Vec<String>>,
    /// New messages to RETR and publish, in message order.
    pub fetch: Vec<Listed>,
    /// Handed over before but still on the server (`delete`): DELE again,
    /// without publishing.
    pub redelete: Vec<Listed>,
    /// Over `max-message-bytes` and not reported yet.
    pub oversized: Vec<Listed>,
    /// UIDLs in the set that are no longer on the server.
    pub prune: Vec<String>,
}

/// Joins LIST and UIDL by message number (messages missing from either
/// listing are skipped: they were deleted in between by another session).
pub fn join(list: &[(u32, u64)], uidl: &[(u32, String)]) -> Vec<Listed> {
    let sizes: std::collections::HashMap<u32, u64> = list.iter().copied().collect();
    let mut out: Vec<Listed> = uidl
        .iter()
        .filter_map(|(msg, id)| {
            sizes.get(msg).map(|&size| Listed {
                msg: *msg,
                size,
                uidl: id.clone(),
            })
        })
        .collect();
    out.sort_by_key(|l| l.msg);
    out
}

/// Plans a poll. `handed` is `None` when the set does not exist yet.
pub fn plan(
    listed: &[Listed],
    handed: Option<&HashSet<String>>,
    known_oversized: &HashSet<String>,
    start_from: StartFrom,
    delete: bool,
    max_bytes: u64,
) -> Plan {
    let mut plan = Plan::default();
    let empty = HashSet::new();
    let handed = match handed {
        None if start_from == StartFrom::Now => {
            plan.init = Some(listed.iter().map(|l| l.uidl.clone()).collect());
            return plan;
        }
        None => &empty,
        Some(h) => h,
    };
    for l in listed {
        if handed.contains(&skipped(&l.uidl)) {
            continue;
        }
        if handed.contains(&l.uidl) {
            if delete {
                plan.redelete.push(l.clone());
            }
        } else if l.size > max_bytes {
            if !known_oversized.contains(&l.uidl) {
                plan.oversized.push(l.clone());
            }
        } else {
            plan.fetch.push(l.clone());
        }
    }
    let present: HashSet<&str> = listed.iter().map(|l| l.uidl.as_str()).collect();
    let mut prune: Vec<String> = handed
        .iter()
        .filter(|u| u.as_str() != INIT && !present.contains(u.strip_prefix(SKIP).unwrap_or(u)))
        .cloned()
        .collect();
    prune.sort();
    plan.prune = prune;
    plan
}

/// The UIDL set of one mail config in Redis.
pub struct UidlSet {
    redis: RedisHandle,
    key: String,
}

fn redis_err(action: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |source| common::fetch::FetchError::Redis { action, source }.into()
}

impl UidlSet {
    /// The set at `key` (`Keys::uidls(config)`).
    pub fn new(redis: RedisHandle, key: String) -> Self {
        Self { redis, key }
    }

    /// The UIDLs handed over; `None` when the set was never initialised.
    pub async fn load(&mut self) -> Result<Option<HashSet<String>>> {
        let members: HashSet<String> = self
            .redis
            .smembers(&self.key)
            .await
            .map_err(redis_err("read the UIDL set"))?;
        Ok((!members.is_empty()).then_some(members))
    }

    /// Adds UIDLs (and the marker) to the set.
    pub async fn add(&mut self, uidls: &[String]) -> Result<()> {
        let mut members: Vec<&str> = uidls.iter().map(String::as_str).collect();
        members.push(INIT);
        let _: i64 = self
            .redis
            .sadd(&self.key, members)
            .await
            .map_err(redis_err("record handed-over UIDLs"))?;
        Ok(())
    }

    /// Drops UIDLs that are no longer on the server.
    pub async fn remove(&mut self, uidls: &[String]) -> Result<()> {
        if uidls.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .redis
            .srem(&self.key, uidls)
            .await
            .map_err(redis_err("prune the UIDL set"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(msg: u32, size: u64, uidl: &str) -> Listed {
        Listed {
            msg,
            size,
            uidl: uidl.into(),
        }
    }

    fn set(items: &[&str]) -> HashSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn join_skips_messages_missing_from_a_listing() {
        let joined = join(
            &[(2, 20), (1, 10), (3, 30)],
            &[(1, "a".into()), (3, "c".into()), (4, "d".into())],
        );
        assert_eq!(joined, vec![l(1, 10, "a"), l(3, 30, "c")]);
    }

    #[test]
    fn plan_table() {
        let listed = vec![l(1, 10, "a"), l(2, 5000, "big"), l(3, 30, "c")];
        struct Case {
            name: &'static str,
            handed: Option<HashSet<String>>,
            oversized: HashSet<String>,
            start: StartFrom,
            delete: bool,
            fetch: Vec<&'static str>,
            redelete: Vec<&'static str>,
            over: Vec<&'static str>,
            prune: Vec<&'static str>,
            init: Option<Vec<&'static str>>,
        }
        let cases = vec![
            Case {
                name: "first poll, all",
                handed: None,
                oversized: set(&[]),
                start: StartFrom::All,
                delete: true,
                fetch: vec!["a", "c"],
                redelete: vec![],
                over: vec!["big"],
                prune: vec![],
                init: None,
            },
            Case {
                name: "first poll, now",
                handed: None,
                oversized: set(&[]),
                start: StartFrom::Now,
                delete: true,
                fetch: vec![],
                redelete: vec![],
                over: vec![],
                prune: vec![],
                init: Some(vec!["a", "big", "c"]),
            },
            Case {
                name: "now, but seen before",
                handed: Some(set(&[INIT])),
                oversized: set(&[]),
                start: StartFrom::Now,
                delete: false,
                fetch: vec!["a", "c"],
                redelete: vec![],
                over: vec!["big"],
                prune: vec![],
                init: None,
            },
            Case {
                name: "keep: handed stay, nothing refetched",
                handed: Some(set(&[INIT, "a", "c"])),
                oversized: set(&["big"]),
                start: StartFrom::All,
                delete: false,
                fetch: vec![],
                redelete: vec![],
                over: vec![],
                prune: vec![],
                init: None,
            },
            Case {
                name: "delete: handed but not deleted (lost before QUIT)",
                handed: Some(set(&[INIT, "a"])),
                oversized: set(&["big"]),
                start: StartFrom::All,
                delete: true,
                fetch: vec!["c"],
                redelete: vec!["a"],
                over: vec![],
                prune: vec![],
                init: None,
            },
            Case {
                name: "bounded: gone UIDLs are pruned",
                handed: Some(set(&[INIT, "gone1", "gone2", "c"])),
                oversized: set(&[]),
                start: StartFrom::All,
                delete: false,
                fetch: vec!["a"],
                redelete: vec![],
                over: vec!["big"],
                prune: vec!["gone1", "gone2"],
                init: None,
            },
        ];
        for c in cases {
            let p = plan(
                &listed,
                c.handed.as_ref(),
                &c.oversized,
                c.start,
                c.delete,
                1000,
            );
            let ids = |v: &[Listed]| v.iter().map(|l| l.uidl.clone()).collect::<Vec<_>>();
            assert_eq!(ids(&p.fetch), c.fetch, "{}: fetch", c.name);
            assert_eq!(ids(&p.redelete), c.redelete, "{}: redelete", c.name);
            assert_eq!(ids(&p.oversized), c.over, "{}: oversized", c.name);
            assert_eq!(p.prune, c.prune, "{}: prune", c.name);
            assert_eq!(
                p.init,
                c.init
                    .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>()),
                "{}: init",
                c.name
            );
        }
    }
}
