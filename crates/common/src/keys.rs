//! Every Redis key name, in one place (§7a).
//!
//! Keys that one operation touches together share a hash tag (`{…}`), so
//! every operation works on Redis Cluster: the token, state and lock of a
//! profile are tagged `{tok.<profile>}`; the lease, checkpoint and UIDL set of
//! a mail config are tagged `{mail.<name>}`. Names are validated by the config
//! (letters, digits, `-_.@`), so they never contain braces.

/// Builds key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (`[redis] prefix`, default `mailagent`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn profile(&self, profile: &str, what: &str) -> String {
        format!("{}:{{tok.{profile}}}:{what}", self.prefix)
    }

    fn mail(&self, config: &str, what: &str) -> String {
        format!("{}:{{mail.{config}}}:{what}", self.prefix)
    }

    /// The encrypted current token of an OAuth profile.
    pub fn token(&self, profile: &str) -> String {
        self.profile(profile, "token")
    }

    /// The profile's state (ok / refreshing / failing, last error, expiry).
    pub fn token_state(&self, profile: &str) -> String {
        self.profile(profile, "state")
    }

    /// The refresh lock that lets exactly one broker replica refresh.
    pub fn token_lock(&self, profile: &str) -> String {
        self.profile(profile, "lock")
    }

    /// Pub/sub channel on which fetchers ask for a forced refresh.
    pub fn token_refresh_channel(&self) -> String {
        format!("{}:token-refresh", self.prefix)
    }

    /// The lease naming which fetcher owns a mail config.
    pub fn lease(&self, config: &str) -> String {
        self.mail(config, "lease")
    }

    /// IMAP checkpoint: UIDVALIDITY and last UID handed over.
    pub fn checkpoint(&self, config: &str) -> String {
        self.mail(config, "checkpoint")
    }

    /// POP3: the set of UIDLs handed over.
    pub fn uidls(&self, config: &str) -> String {
        self.mail(config, "uidls")
    }

    /// Oversized messages seen in a mail config, for `mailagent status`.
    pub fn oversized(&self, config: &str) -> String {
        self.mail(config, "oversized")
    }

    /// One agent instance's heartbeat.
    pub fn heartbeat(&self, component: &str, instance: &str) -> String {
        format!("{}:agent:{component}:{instance}", self.prefix)
    }

    /// Sorted set of heartbeat keys by last beat, for listing agents.
    pub fn agents(&self) -> String {
        format!("{}:agents", self.prefix)
    }

    /// Fetcher replicas present, for spreading leases evenly.
    pub fn fetchers(&self, protocol: &str) -> String {
        format!("{}:fetchers:{protocol}", self.prefix)
    }

    /// Delivery count of a dedupe key at the form processor (poison guard).
    pub fn deliveries(&self, dedupe_key: &str) -> String {
        format!("{}:{{dlv.{dedupe_key}}}:count", self.prefix)
    }
}

/// The hash tag of a key: the text between the first `{` and the next `}`.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')? + open + 1;
    (close > open + 1).then(|| &key[open + 1..close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_go_together_share_a_hash_tag() {
        let k = Keys::new("t1");
        let profile = [k.token("p"), k.token_state("p"), k.token_lock("p")];
        assert!(profile.iter().all(|key| hash_tag(key) == Some("tok.p")));
        let mail = [
            k.lease("m"),
            k.checkpoint("m"),
            k.uidls("m"),
            k.oversized("m"),
        ];
        assert!(mail.iter().all(|key| hash_tag(key) == Some("mail.m")));
        assert!(k.token("p").starts_with("t1:"));
        assert_ne!(hash_tag(&k.token("p")), hash_tag(&k.token("q")));
    }
}
