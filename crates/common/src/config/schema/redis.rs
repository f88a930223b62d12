//! `[redis]`: where the shared state lives.

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::Walker;
use crate::config::section::Section;
use crate::secret::SecretUrl;

/// `[redis]`: where the shared state lives.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL (a secret when it holds a password).
    pub url: SecretUrl,
    /// Prefix of every key (`mailagent`), so tenants and tests can share a server.
    pub prefix: String,
}

/// Reads `[redis]` from the top-level `tree`.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> RedisConfig {
    let t = w.section(tree, Section::Redis);
    let p = Section::Redis.key();
    w.unknown_keys(t, p, &["url", "url-file", "prefix"]);
    let url = w.secret_url(
        t,
        p,
        "url",
        "redis://127.0.0.1:6379/0",
        &["redis", "rediss"],
    );
    let prefix = w
        .name(t, p, "prefix", Some("mailagent"))
        .unwrap_or_default();
    RedisConfig { url, prefix }
}
