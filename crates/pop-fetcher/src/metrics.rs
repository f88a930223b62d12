//! The fetcher's Prometheus metrics (§7), registered in the admin registry
//! (names get the `[admin] metrics-prefix`). Every series carries
//! `protocol="pop3"`, so dashboards can put both fetchers side by side.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of the POP3 fetcher.
#[derive(Clone)]
pub struct Metrics {
    /// Messages published and confirmed, by mail config.
    pub messages: IntCounterVec,
    /// Bytes published and confirmed, by mail config.
    pub bytes: IntCounterVec,
    /// Messages deleted after their confirm (DELE committed by QUIT), by mail config.
    pub deleted: IntCounterVec,
    /// Oversized messages left on the server, by mail config.
    pub oversized: IntCounterVec,
    /// Errors by mail config and kind.
    pub errors: IntCounterVec,
    /// Lease changes by kind (acquired, lost, rebalanced, released).
    pub lease_changes: IntCounterVec,
    /// Leases held now.
    pub leases_held: IntGauge,
    /// Time of one poll session (seconds), by mail config.
    pub poll_seconds: HistogramVec,
    /// Publish→confirm latency (seconds).
    pub confirm_seconds: HistogramVec,
}

impl Metrics {
    /// Creates and registers the metrics (already registered ones are kept).
    pub fn new(registry: &Registry) -> Self {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("protocol", "pop3");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let messages = counter(
            "fetcher_messages_published_total",
            "Messages published and confirmed by RabbitMQ",
            &["config"],
        );
        let bytes = counter(
            "fetcher_bytes_published_total",
            "Bytes published and confirmed by RabbitMQ",
            &["config"],
        );
        let deleted = counter(
            "fetcher_messages_deleted_total",
            "Messages deleted on the server after their confirm",
            &["config"],
        );
        let oversized = counter(
            "fetcher_oversized_total",
            "Messages over max-message-bytes, not published",
            &["config"],
        );
        let errors = counter(
            "fetcher_errors_total",
            "Errors by kind",
            &["config", "kind"],
        );
        let lease_changes = counter(
            "fetcher_lease_changes_total",
            "Lease changes by kind",
            &["change"],
        );
        let leases_held = IntGauge::with_opts(opts(
            "fetcher_leases_held",
            "Mail configs this replica owns",
        ))
        .expect("metric");
        let _ = registry.register(Box::new(leases_held.clone()));
        let buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
        ];
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::from(opts(name, help)).buckets(buckets.clone()),
                labels,
            )
            .expect("metric");
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        let poll_seconds = histogram(
            "fetcher_poll_seconds",
            "Time of one poll session",
            &["config"],
        );
        let confirm_seconds =
            histogram("fetcher_confirm_seconds", "Publish to confirm latency", &[]);
        Self {
            messages,
            bytes,
            deleted,
            oversized,
            errors,
            lease_changes,
            leases_held,
            poll_seconds,
            confirm_seconds,
        }
    }
}
