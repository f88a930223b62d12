//! `[admin]`: the HTTP port with `/healthz`, `/readyz` and `/metrics`, and
//! the heartbeat.

use std::net::SocketAddr;
use std::time::Duration;

use figment::value::Dict;
use serde::Serialize;

use crate::config::reader::{join, Walker};
use crate::config::section::Section;

/// `[admin]`: the HTTP port with `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Address to listen on; port 0 picks any free port.
    pub listen: SocketAddr,
    /// Prefix of every metric name (`mailagent`).
    pub metrics_prefix: String,
    /// Seconds between heartbeats written to Redis.
    pub heartbeat_interval: Duration,
}

/// Reads `[admin]` from the top-level `tree`.
pub(super) fn parse(w: &mut Walker, tree: &Dict) -> AdminConfig {
    let t = w.section(tree, Section::Admin);
    let p = Section::Admin.key();
    w.unknown_keys(t, p, &["listen", "metrics-prefix", "heartbeat-interval"]);
    let listen_text = w
        .string(t, p, "listen")
        .unwrap_or_else(|| "127.0.0.1:9100".to_string());
    let listen = match listen_text.parse() {
        Ok(addr) => addr,
        Err(_) => {
            w.err(
                join(p, "listen"),
                format!(
                    "{listen_text:?} is not an address like 127.0.0.1:9100 (port 0: any free port)"
                ),
            );
            ([127, 0, 0, 1], 0).into()
        }
    };
    let metrics_prefix = w
        .string(t, p, "metrics-prefix")
        .unwrap_or_else(|| "mailagent".into());
    if !is_metric_name(&metrics_prefix) {
        w.err(
            join(p, "metrics-prefix"),
            "must be letters, digits and underscores, starting with a letter",
        );
    }
    let heartbeat_interval = w.secs(t, p, "heartbeat-interval", 1, 3600, 5);
    AdminConfig {
        listen,
        metrics_prefix,
        heartbeat_interval,
    }
}

/// A valid Prometheus metric name prefix.
fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
