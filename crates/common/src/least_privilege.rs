//! The rights each component needs on RabbitMQ and Redis, under one name
//! prefix (issue 8, least privilege). `mailagent setup` prints and applies
//! them; `deploy/rabbitmq/definitions.json` and `deploy/redis/users.acl`
//! are the same rules for the default prefix `mailagent`.
//!
//! RabbitMQ: with the topology declared once by `mailagent setup` (the
//! `setup` role), the services run with `[amqp] declare = "passive"` and
//! need no configure permission. A passive declare needs no permission at
//! all. Publishing needs write on the exchange, consuming and `basic.get`
//! need read on the queue.
//!
//! Redis: the key patterns follow [`crate::keys::Keys`]; the commands are
//! the ones each component sends, scripts included (`redis::Script` sends
//! EVALSHA, and SCRIPT LOAD after a NOSCRIPT; every command a script runs is
//! checked against the same rules).

use crate::keys::Keys;

/// A set of rights: one per component, plus the one-off `setup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `mailagent setup`: declares exchanges, queues and bindings.
    Setup,
    /// `token-broker`.
    TokenBroker,
    /// `imap-fetcher`.
    ImapFetcher,
    /// `pop-fetcher`.
    PopFetcher,
    /// `form-processor`.
    FormProcessor,
    /// `mailagent` (status, records, dead-letters).
    Cli,
}

impl Role {
    /// Every role, in the order they are printed.
    pub const ALL: [Role; 6] = [
        Role::Setup,
        Role::TokenBroker,
        Role::ImapFetcher,
        Role::PopFetcher,
        Role::FormProcessor,
        Role::Cli,
    ];

    /// The role's name: the component name, `cli` or `setup`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::TokenBroker => "token-broker",
            Self::ImapFetcher => "imap-fetcher",
            Self::PopFetcher => "pop-fetcher",
            Self::FormProcessor => "form-processor",
            Self::Cli => "cli",
        }
    }

    /// The user name under `prefix`: `<prefix>-<role>`
    /// (`mailagent-imap-fetcher`, as in `deploy/`).
    pub fn user(self, prefix: &str) -> String {
        format!("{prefix}-{}", self.name())
    }
}

/// RabbitMQ permissions of one user: three regular expressions on exchange
/// and queue names, as `rabbitmqctl set_permissions` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpPermissions {
    /// Declare and delete.
    pub configure: String,
    /// Publish to an exchange; bind a queue (write on the queue).
    pub write: String,
    /// Consume or get from a queue; bind (read on the exchange).
    pub read: String,
}

/// What `role` may do on the topology named by `prefix` (`[amqp] prefix`).
pub fn amqp_permissions(role: Role, prefix: &str) -> AmqpPermissions {
    let p = regex::escape(prefix);
    let none = || "^$".to_string();
    let only = |names: &str| format!("^{p}\\.{names}$");
    let (configure, write, read) = match role {
        Role::Setup => {
            let all = only("(incoming|create|dead)");
            (all.clone(), all.clone(), all)
        }
        Role::TokenBroker => (none(), none(), none()),
        Role::ImapFetcher | Role::PopFetcher => (none(), only("incoming"), none()),
        // Consumes its queue; publishes rejected mail to the dead-letter exchange.
        Role::FormProcessor => (none(), only("dead"), only("create")),
        // Lists and replays dead letters: reads the dead queue, republishes
        // the replayed one and puts the others back through the dead-letter
        // exchange.
        Role::Cli => (none(), only("(incoming|dead)"), only("dead")),
    };
    AmqpPermissions {
        configure,
        write,
        read,
    }
}

/// The Redis ACL rules of `role` under `prefix` (`[redis] prefix`), without
/// the user name, `on` and password: `resetkeys resetchannels -@all ~… +…`.
/// `None` for `setup`, which needs no Redis user.
pub fn redis_rules(role: Role, prefix: &str) -> Option<String> {
    let k = Keys::new(prefix);
    let heartbeat = |component: &str| format!("~{}", k.heartbeat(component, "*"));
    let agents = format!("~{}", k.agents());
    let channel = format!("&{}", k.token_refresh_channel());
    let fetcher = |component: &str, protocol: &str, extra: &str| {
        [
            format!("%R~{}", k.token("*")),
            format!("%R~{}", k.token_state("*")),
            format!("~{prefix}:{{mail.*}}:*"),
            format!("~{}", k.fetchers(protocol)),
            heartbeat(component),
            agents.clone(),
            channel.clone(),
            format!(
                "+ping +get +set +setex +del +pexpire +pttl +hgetall +hset {extra}+zadd +zrem +zremrangebyscore +zcard +evalsha +eval +script|load +publish"
            ),
        ]
        .join(" ")
    };
    let rules = match role {
        Role::Setup => return None,
        Role::TokenBroker => [
            format!("~{prefix}:{{tok.*}}:*"),
            heartbeat("token-broker"),
            agents,
            channel,
            "+ping +get +set +setex +del +evalsha +eval +script|load +subscribe +unsubscribe +zadd +zrem".into(),
        ]
        .join(" "),
        Role::ImapFetcher => fetcher("imap-fetcher", "imap", ""),
        Role::PopFetcher => fetcher("pop-fetcher", "pop3", "+smembers +sadd +srem +hkeys "),
        Role::FormProcessor => [
            format!("~{}", k.deliveries("*")),
            heartbeat("form-processor"),
            agents,
            // The delivery count is INCRBY + EXPIRE in one MULTI/EXEC.
            "+ping +multi +exec +incrby +expire +del +setex +zadd +zrem".into(),
        ]
        .join(" "),
        // Reads every key of the deployment; may only prune stale agents.
        Role::Cli => [
            format!("%R~{prefix}:*"),
            agents,
            "+ping +get +mget +hget +hgetall +hlen +scard +smembers +zrange +zrangebyscore +zcard +exists +ttl +pttl +type +zrem +cluster|nodes".into(),
        ]
        .join(" "),
    };
    // ROLE: a client that found the primary through Sentinel checks it;
    // CLUSTER SLOTS: a Cluster client learns which node serves which slot.
    Some(format!(
        "resetkeys resetchannels -@all {rules} +role +cluster|slots"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_permissions_follow_the_prefix_and_the_role() {
        let cases = [
            (Role::ImapFetcher, "^$", "^mailagent\\.incoming$", "^$"),
            (Role::PopFetcher, "^$", "^mailagent\\.incoming$", "^$"),
            (
                Role::FormProcessor,
                "^$",
                "^mailagent\\.dead$",
                "^mailagent\\.create$",
            ),
            (Role::TokenBroker, "^$", "^$", "^$"),
            (
                Role::Cli,
                "^$",
                "^mailagent\\.(incoming|dead)$",
                "^mailagent\\.dead$",
            ),
        ];
        for (role, configure, write, read) in cases {
            let p = amqp_permissions(role, "mailagent");
            assert_eq!(
                (p.configure.as_str(), p.write.as_str(), p.read.as_str()),
                (configure, write, read),
                "{role:?}"
            );
        }
        let setup = amqp_permissions(Role::Setup, "t.1");
        assert_eq!(setup.configure, "^t\\.1\\.(incoming|create|dead)$");
        assert_eq!(setup.configure, setup.read);
    }

    #[test]
    fn redis_rules_cover_each_components_keys_only() {
        let fetcher = redis_rules(Role::ImapFetcher, "p1").unwrap();
        assert!(fetcher.starts_with("resetkeys resetchannels -@all "));
        assert!(fetcher.contains("%R~p1:{tok.*}:token "));
        assert!(fetcher.contains("~p1:{mail.*}:* "));
        assert!(fetcher.contains("~p1:fetchers:imap "));
        assert!(fetcher.contains("~p1:agent:imap-fetcher:* "));
        assert!(fetcher.contains("&p1:token-refresh "));
        assert!(!fetcher.contains("+sadd"), "UIDL sets are POP3's");
        assert!(redis_rules(Role::PopFetcher, "p1")
            .unwrap()
            .contains("+sadd"));
        let processor = redis_rules(Role::FormProcessor, "p1").unwrap();
        assert!(processor.contains("~p1:{dlv.*}:count "));
        assert!(!processor.contains("tok."));
        assert!(redis_rules(Role::Setup, "p1").is_none());
        assert_eq!(
            Role::FormProcessor.user("mailagent"),
            "mailagent-form-processor"
        );
    }

    #[test]
    fn deploy_redis_acl_file_holds_the_same_rules() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/redis/users.acl");
        let text = std::fs::read_to_string(path).expect("deploy/redis/users.acl");
        for role in Role::ALL {
            let Some(rules) = redis_rules(role, "mailagent") else {
                continue;
            };
            let start = format!("user {} on #PASSWORD_SHA256 ", role.user("mailagent"));
            let line = text
                .lines()
                .find(|l| l.starts_with(&start))
                .unwrap_or_else(|| panic!("no line for {role:?} in {path}"));
            assert_eq!(&line[start.len()..], rules, "{role:?}");
        }
    }

    #[test]
    fn deploy_rabbitmq_definitions_grant_the_same_permissions() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/rabbitmq/definitions.json"
        );
        let text = std::fs::read_to_string(path).expect("deploy/rabbitmq/definitions.json");
        let defs: serde_json::Value = serde_json::from_str(&text).expect("definitions.json");
        let permissions = defs["permissions"].as_array().expect("permissions");
        for role in Role::ALL {
            let user = role.user("mailagent");
            let granted = permissions
                .iter()
                .find(|p| p["user"] == user.as_str())
                .unwrap_or_else(|| panic!("no permissions for {user} in {path}"));
            let want = amqp_permissions(role, "mailagent");
            assert_eq!(
                (
                    granted["configure"].as_str(),
                    granted["write"].as_str(),
                    granted["read"].as_str()
                ),
                (
                    Some(want.configure.as_str()),
                    Some(want.write.as_str()),
                    Some(want.read.as_str())
                ),
                "{user}"
            );
        }
    }
}
