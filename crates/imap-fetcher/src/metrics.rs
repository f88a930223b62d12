//! The fetcher's Prometheus metrics (§7), registered in the admin registry
//! (names get the `[admin] metrics-prefix`).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of the IMAP fetcher.
#[derive(Clone)]
pub struct Metrics {
    /// Messages published and confirmed, by mail config.
    pub messages: IntCounterVec,
    /// Bytes published and confirmed, by mail config.
    pub bytes: IntCounterVec,
    /// Oversized messages skipped, by mail config.
    pub oversized: IntCounterVec,
    /// Errors by mail config and kind.
    pub errors: IntCounterVec,
    /// IDLE sessions ended by the server or by an error, by mail config.
    pub idle_reconnects: IntCounterVec,
    /// Lease changes by kind (acquired, lost, rebalanced, released).
    pub lease_changes: IntCounterVec,
    /// Leases held now.
    pub leases_held: IntGauge,
    /// Time to fetch one batch (seconds), by mail config.
    pub fetch_seconds: HistogramVec,
    /// Publish→confirm latency (seconds).
    pub confirm_seconds: Histogram,
}

impl Metrics {
    /// Creates and registers the metrics (already registered ones are kept).
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let messages = counter(
            "imap_messages_published_total",
            "Messages published and confirmed by RabbitMQ",
            &["config"],
        );
        let bytes = counter(
            "imap_bytes_published_total",
            "Bytes published and confirmed by RabbitMQ",
            &["config"],
        );
        let oversized = counter(
            "imap_oversized_total",
            "Messages over max-message-bytes, not published",
            &["config"],
        );
        let errors = counter("imap_errors_total", "Errors by kind", &["config", "kind"]);
        let idle_reconnects = counter(
            "imap_idle_reconnects_total",
            "IDLE sessions that ended by a server BYE or an error",
            &["config"],
        );
        let lease_changes = counter(
            "imap_lease_changes_total",
            "Lease changes by kind",
            &["change"],
        );
        let leases_held =
            IntGauge::new("imap_leases_held", "Mail configs this replica owns").expect("metric");
        let _ = registry.register(Box::new(leases_held.clone()));
        let buckets = vec![
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let fetch_seconds = HistogramVec::new(
            HistogramOpts::new("imap_fetch_batch_seconds", "Time to fetch one batch")
                .buckets(buckets.clone()),
            &["config"],
        )
        .expect("metric");
        let _ = registry.register(Box::new(fetch_seconds.clone()));
        let confirm_seconds = Histogram::with_opts(
            HistogramOpts::new("imap_confirm_seconds", "Publish to confirm latency")
                .buckets(buckets),
        )
        .expect("metric");
        let _ = registry.register(Box::new(confirm_seconds.clone()));
        Self {
            messages,
            bytes,
            oversized,
            errors,
            idle_reconnects,
            lease_changes,
            leases_held,
            fetch_seconds,
            confirm_seconds,
        }
    }
}
