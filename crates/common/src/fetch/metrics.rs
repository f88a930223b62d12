//! The Prometheus metrics of both fetchers (§4, §7): one set of names, every
//! series labelled `protocol="imap"` or `protocol="pop3"`, so one dashboard
//! panel shows both fetchers and `sum by (protocol)` splits them.
//!
//! Names get the `[admin] metrics-prefix` from the admin registry:
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `fetcher_messages_published_total` | config | published and confirmed |
//! | `fetcher_bytes_published_total` | config | bytes of those |
//! | `fetcher_messages_deleted_total` | config | deleted on the server after their confirm |
//! | `fetcher_oversized_total` | config | over `max-message-bytes`, not published |
//! | `fetcher_errors_total` | config, kind | session errors by kind |
//! | `fetcher_idle_reconnects_total` | config | IDLE ended by BYE or an error (IMAP) |
//! | `fetcher_lease_changes_total` | change | acquired, lost, rebalanced, released |
//! | `fetcher_leases_held` | — | mail configs this replica owns |
//! | `fetcher_lease_fenced_total` | config | sessions cut off / mailbox changes refused as the lease ran out |
//! | `fetcher_poll_seconds` | config | one pass over the mailbox (IMAP) / one poll session (POP3) |
//! | `fetcher_fetch_batch_seconds` | config | fetching and publishing one batch |
//! | `fetcher_confirm_seconds` | — | publish → confirm latency |
//!
//! `protocol` is a constant label of each collector, so both fetchers may
//! register into the same registry (as in tests) without clashing.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::config::Protocol;

/// Histogram buckets (seconds) shared by every fetcher histogram.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// Every metric of one fetcher, all labelled with its protocol.
#[derive(Clone)]
pub struct FetchMetrics {
    /// Messages published and confirmed, by mail config.
    pub messages: IntCounterVec,
    /// Bytes published and confirmed, by mail config.
    pub bytes: IntCounterVec,
    /// Messages deleted on the server after their confirm, by mail config.
    pub deleted: IntCounterVec,
    /// Oversized messages not published, by mail config.
    pub oversized: IntCounterVec,
    /// Errors by mail config and kind.
    pub errors: IntCounterVec,
    /// IDLE sessions ended by the server or by an error, by mail config.
    pub idle_reconnects: IntCounterVec,
    /// Lease changes by kind (acquired, lost, rebalanced, released).
    pub lease_changes: IntCounterVec,
    /// Sessions cut off or changes to the mailbox refused because the lease
    /// was running out or gone, by mail config.
    pub fenced: IntCounterVec,
    /// Leases held now.
    pub leases_held: IntGauge,
    /// One pass (IMAP) or poll session (POP3), by mail config.
    pub poll_seconds: HistogramVec,
    /// Fetching and publishing one batch, by mail config.
    pub fetch_seconds: HistogramVec,
    /// Publish→confirm latency (no variable label: `with_label_values(&[])`).
    pub confirm_seconds: HistogramVec,
}

impl FetchMetrics {
    /// Creates the metrics of `protocol`'s fetcher and registers them in
    /// `registry` (a collector already registered there is kept).
    pub fn new(registry: &Registry, protocol: Protocol) -> Self {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("protocol", protocol.as_str())
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::from(opts(name, help)).buckets(BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric");
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        let leases_held = IntGauge::with_opts(opts(
            "fetcher_leases_held",
            "Mail configs this replica owns",
        ))
        .expect("valid metric");
        let _ = registry.register(Box::new(leases_held.clone()));
        Self {
            messages: counter(
                "fetcher_messages_published_total",
                "Messages published and confirmed by RabbitMQ",
                &["config"],
            ),
            bytes: counter(
                "fetcher_bytes_published_total",
                "Bytes published and confirmed by RabbitMQ",
                &["config"],
            ),
            deleted: counter(
                "fetcher_messages_deleted_total",
                "Messages deleted on the server after their confirm",
                &["config"],
            ),
            oversized: counter(
                "fetcher_oversized_total",
                "Messages over max-message-bytes, not published",
                &["config"],
            ),
            errors: counter(
                "fetcher_errors_total",
                "Errors by kind",
                &["config", "kind"],
            ),
            idle_reconnects: counter(
                "fetcher_idle_reconnects_total",
                "IDLE sessions that ended by a server BYE or an error",
                &["config"],
            ),
            lease_changes: counter(
                "fetcher_lease_changes_total",
                "Lease changes by kind",
                &["change"],
            ),
            fenced: counter(
                "fetcher_lease_fenced_total",
                "Sessions cut off or mailbox changes refused because the lease ran out",
                &["config"],
            ),
            leases_held,
            poll_seconds: histogram(
                "fetcher_poll_seconds",
                "Time of one pass over the mailbox (one poll session)",
                &["config"],
            ),
            fetch_seconds: histogram(
                "fetcher_fetch_batch_seconds",
                "Time to fetch and publish one batch",
                &["config"],
            ),
            confirm_seconds: histogram(
                "fetcher_confirm_seconds",
                "Publish to confirm latency",
                &[],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn exposition(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .expect("encode");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn both_protocols_share_names_in_one_registry() {
        let registry = Registry::new_custom(Some("mailagent".into()), None).expect("registry");
        let imap = FetchMetrics::new(&registry, Protocol::Imap);
        let pop = FetchMetrics::new(&registry, Protocol::Pop3);
        imap.messages.with_label_values(&["a"]).inc();
        pop.messages.with_label_values(&["b"]).inc_by(2);
        imap.errors.with_label_values(&["a", "auth"]).inc();
        pop.errors.with_label_values(&["b", "auth"]).inc();
        pop.confirm_seconds.with_label_values(&[]).observe(0.01);
        let text = exposition(&registry);
        for line in [
            r#"mailagent_fetcher_messages_published_total{config="a",protocol="imap"} 1"#,
            r#"mailagent_fetcher_messages_published_total{config="b",protocol="pop3"} 2"#,
            r#"mailagent_fetcher_errors_total{config="a",kind="auth",protocol="imap"} 1"#,
            r#"mailagent_fetcher_errors_total{config="b",kind="auth",protocol="pop3"} 1"#,
            r#"mailagent_fetcher_confirm_seconds_count{protocol="pop3"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("mailagent_imap_"), "{text}");
    }

    #[test]
    fn registering_the_same_protocol_twice_keeps_the_first() {
        let registry = Registry::new();
        let first = FetchMetrics::new(&registry, Protocol::Imap);
        let _second = FetchMetrics::new(&registry, Protocol::Imap);
        first.leases_held.set(3);
        assert!(exposition(&registry).contains(r#"fetcher_leases_held{protocol="imap"} 3"#));
    }
}
