//! The form processor's Prometheus metrics (§7), registered in the admin
//! server's registry (names get the `[admin] metrics-prefix`).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric the processor reports.
#[derive(Clone)]
pub struct Metrics {
    /// Messages settled, by outcome (`created`, `rejected`, `already-known`,
    /// `poison`) and reason code (empty for created).
    pub messages: IntCounterVec,
    /// Seconds from delivery to ack.
    pub processing: Histogram,
    /// Seconds per store transaction (one batch).
    pub store: Histogram,
    /// Messages per store transaction.
    pub batch_size: Histogram,
    /// Store operations retried after a transient failure.
    pub store_retries: IntCounter,
    /// Deliveries being processed now.
    pub in_flight: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics (already-registered ones are
    /// tolerated, so tests may start several processors in one process).
    pub fn new(registry: &Registry) -> Self {
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = Self {
            messages: IntCounterVec::new(
                Opts::new(
                    "form_processor_messages_total",
                    "Messages settled by the form processor, by outcome and reason",
                ),
                &["outcome", "reason"],
            )
            .expect("valid metric"),
            processing: Histogram::with_opts(
                HistogramOpts::new(
                    "form_processor_processing_seconds",
                    "Seconds from delivery to ack",
                )
                .buckets(buckets.clone()),
            )
            .expect("valid metric"),
            store: Histogram::with_opts(
                HistogramOpts::new(
                    "form_processor_store_seconds",
                    "Seconds per record store transaction",
                )
                .buckets(buckets),
            )
            .expect("valid metric"),
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "form_processor_store_batch_messages",
                    "Messages per record store transaction",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )
            .expect("valid metric"),
            store_retries: IntCounter::new(
                "form_processor_store_retries_total",
                "Store operations retried after a transient failure",
            )
            .expect("valid metric"),
            in_flight: IntGauge::new("form_processor_in_flight", "Deliveries being processed")
                .expect("valid metric"),
        };
        let _ = registry.register(Box::new(m.messages.clone()));
        let _ = registry.register(Box::new(m.processing.clone()));
        let _ = registry.register(Box::new(m.store.clone()));
        let _ = registry.register(Box::new(m.batch_size.clone()));
        let _ = registry.register(Box::new(m.store_retries.clone()));
        let _ = registry.register(Box::new(m.in_flight.clone()));
        m
    }
}
