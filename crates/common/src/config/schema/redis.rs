//! `[redis]`: where the shared state lives — one server (`url`), a primary
//! found through Sentinels (`sentinels` + `master-name`), or a Redis Cluster
//! (`cluster`). Exactly one of the three.

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::{join, Walker};
use crate::config::section::Section;
use crate::secret::{Secret, SecretUrl};

/// The default `[redis] url`.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379/0";

/// `[redis]`: where the shared state lives.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL of one server (a secret when it holds a
    /// password). Its default when Sentinels or a Cluster are configured
    /// instead, and then unused.
    pub url: SecretUrl,
    /// Sentinels (`redis://host:26379`, …) that name the primary of
    /// [`RedisConfig::master_name`]; empty unless Sentinel is used.
    pub sentinels: Vec<SecretUrl>,
    /// The Sentinels' name of the monitored primary (`sentinel monitor <name> …`).
    pub master_name: Option<String>,
    /// Password of the Sentinels themselves (`requirepass` in sentinel.conf),
    /// when their URLs carry none.
    #[serde(skip)]
    pub sentinel_password: Option<Secret>,
    /// ACL user of the data nodes (primary and replicas, or Cluster nodes)
    /// when their URLs name none: each component's own user, as with `url`.
    pub username: Option<String>,
    /// Password of the data nodes (primary and replicas, or Cluster nodes)
    /// when it is not in their URLs.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// Nodes of a Redis Cluster (a few are enough: the rest are discovered);
    /// empty unless Cluster is used.
    pub cluster: Vec<SecretUrl>,
    /// Prefix of every key (`mailagent`), so tenants and tests can share a server.
    pub prefix: String,
}

/// Which form of `[redis]` is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One server: `url`.
    Single,
    /// A primary found through Sentinels: `sentinels` + `master-name`.
    Sentinel,
    /// A Redis Cluster: `cluster`.
    Cluster,
}

impl RedisConfig {
    /// Which of the three forms this is.
    pub fn mode(&self) -> RedisMode {
        if !self.sentinels.is_empty() {
            RedisMode::Sentinel
        } else if !self.cluster.is_empty() {
            RedisMode::Cluster
        } else {
            RedisMode::Single
        }
    }

    /// Where the shared state is, safe to print (passwords redacted).
    pub fn endpoint(&self) -> String {
        let list = |urls: &[SecretUrl]| {
            urls.iter()
                .map(SecretUrl::redacted)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self.mode() {
            RedisMode::Single => self.url.redacted(),
            RedisMode::Sentinel => format!(
                "sentinel master {} via {}",
                self.master_name.as_deref().unwrap_or("?"),
                list(&self.sentinels)
            ),
            RedisMode::Cluster => format!("cluster {}", list(&self.cluster)),
        }
    }
}

/// Reads `[redis]` from the top-level `tree`.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> RedisConfig {
    let t = w.section(tree, Section::Redis);
    let p = Section::Redis.key();
    w.unknown_keys(
        t,
        p,
        &[
            "url",
            "url-file",
            "prefix",
            "sentinels",
            "master-name",
            "sentinel-password",
            "sentinel-password-file",
            "username",
            "password",
            "password-file",
            "cluster",
        ],
    );
    let url = w.secret_url(t, p, "url", DEFAULT_URL, &["redis", "rediss"]);
    let sentinels = url_list(w, t, p, "sentinels");
    let cluster = url_list(w, t, p, "cluster");

    let forms: Vec<&str> = [
        (t.contains_key("url") || t.contains_key("url-file")).then_some("url"),
        t.contains_key("sentinels").then_some("sentinels"),
        t.contains_key("cluster").then_some("cluster"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if forms.len() > 1 {
        for form in &forms[1..] {
            w.err(
                join(p, form),
                format!(
                    "set exactly one of redis.url, redis.sentinels or redis.cluster, not {}",
                    forms.join(" and ")
                ),
            );
        }
    }
    if t.contains_key("sentinels") && sentinels.is_empty() {
        w.err(join(p, "sentinels"), "is empty: name at least one Sentinel");
    }
    if t.contains_key("cluster") && cluster.is_empty() {
        w.err(
            join(p, "cluster"),
            "is empty: name at least one Cluster node",
        );
    }
    for (i, node) in cluster.iter().enumerate() {
        if let Ok(u) = url::Url::parse(node.expose()) {
            let db = u.path().trim_matches('/');
            if !db.is_empty() && db != "0" {
                w.err(
                    format!("{}[{i}]", join(p, "cluster")),
                    format!("database {db}: a Redis Cluster has only database 0"),
                );
            }
        }
    }

    let master_name = if t.contains_key("master-name") {
        let name = w.name(t, p, "master-name", None);
        if !t.contains_key("sentinels") {
            w.err(join(p, "master-name"), "is only used with redis.sentinels");
        }
        name
    } else {
        if t.contains_key("sentinels") {
            w.err(
                join(p, "master-name"),
                "missing: redis.sentinels needs the master name the Sentinels monitor",
            );
        }
        None
    };
    let has_secret = |k: &str| t.contains_key(k) || t.contains_key(&format!("{k}-file"));
    let sentinel_password = w.secret(t, p, "sentinel-password", true, false);
    if has_secret("sentinel-password") && !t.contains_key("sentinels") {
        w.err(
            join(p, "sentinel-password"),
            "is only used with redis.sentinels",
        );
    }
    let username = w.string(t, p, "username").filter(|u| !u.is_empty());
    if username.is_some() && !t.contains_key("sentinels") && !t.contains_key("cluster") {
        w.err(
            join(p, "username"),
            "is only used with redis.sentinels or redis.cluster (put a single server's user in redis.url)",
        );
    }
    let password = w.secret(t, p, "password", true, false);
    if has_secret("password") && !t.contains_key("sentinels") && !t.contains_key("cluster") {
        w.err(
            join(p, "password"),
            "is only used with redis.sentinels or redis.cluster (put a single server's password in redis.url)",
        );
    }

    let prefix = w
        .name(t, p, "prefix", Some("mailagent"))
        .unwrap_or_default();
    RedisConfig {
        url,
        sentinels,
        master_name,
        sentinel_password,
        username,
        password,
        cluster,
        prefix,
    }
}

/// A list of `redis://`/`rediss://` URLs (an array, or comma-separated from
/// the environment), each checked like `url`, all of one scheme.
fn url_list(w: &mut Walker, t: &Dict, p: &str, key: &str) -> Vec<SecretUrl> {
    let mut out = Vec::new();
    let mut schemes = Vec::new();
    for (i, text) in w.string_list(t, p, key).into_iter().enumerate() {
        let at = format!("{}[{i}]", join(p, key));
        let url = SecretUrl::new(text.trim());
        match url::Url::parse(url.expose()) {
            Ok(u) if u.fragment() == Some("insecure") => w.err(
                at,
                "#insecure would turn certificate verification off, which is not supported: remove it and trust the server's CA with [tls] extra-ca-file",
            ),
            Ok(u) if matches!(u.scheme(), "redis" | "rediss") => {
                if u.host_str().is_none_or(str::is_empty) {
                    w.err(at, format!("no host: {}", url.redacted()));
                } else {
                    schemes.push(u.scheme().to_string());
                    out.push(url);
                }
            }
            Ok(u) => w.err(
                at,
                format!(
                    "scheme {:?} not supported: expected redis or rediss",
                    u.scheme()
                ),
            ),
            Err(e) => w.err(at, format!("not a valid URL ({e}): {}", url.redacted())),
        }
    }
    schemes.sort();
    schemes.dedup();
    if schemes.len() > 1 {
        w.err(
            join(p, key),
            "mixes redis:// and rediss://: use one scheme for every node",
        );
    }
    out
}
