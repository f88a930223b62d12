//! The broker's Prometheus metrics.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Metrics of the token broker.
#[derive(Clone)]
pub struct Metrics {
    /// Token requests by profile and outcome (`success`, `throttled`, `transient`, `rejected`).
    pub refreshes: IntCounterVec,
    /// Seconds until the current token expires, per profile (negative: none).
    pub seconds_to_expiry: prometheus::GaugeVec,
    /// Seconds until the profile's credential (certificate `notAfter`, or
    /// `application-secret-expires`) expires; absent when unknown.
    pub credential_seconds_to_expiry: prometheus::GaugeVec,
    /// Token endpoint latency.
    pub endpoint_latency: HistogramVec,
    /// Forced-refresh requests by profile and what was done (`refreshed`, `stale`, `too-soon`).
    pub forced: IntCounterVec,
}

impl Metrics {
    /// Registers the metrics.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            refreshes: IntCounterVec::new(
                Opts::new(
                    "token_refreshes_total",
                    "Token endpoint requests by profile and outcome",
                ),
                &["profile", "outcome"],
            )?,
            seconds_to_expiry: prometheus::GaugeVec::new(
                Opts::new(
                    "token_seconds_to_expiry",
                    "Seconds until the profile's current token expires",
                ),
                &["profile"],
            )?,
            credential_seconds_to_expiry: prometheus::GaugeVec::new(
                Opts::new(
                    "token_credential_seconds_to_expiry",
                    "Seconds until the profile's credential (certificate notAfter or application-secret-expires) expires",
                ),
                &["profile"],
            )?,
            endpoint_latency: HistogramVec::new(
                HistogramOpts::new("token_endpoint_seconds", "Token endpoint request latency")
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["profile"],
            )?,
            forced: IntCounterVec::new(
                Opts::new(
                    "token_forced_refresh_requests_total",
                    "Forced-refresh requests from fetchers",
                ),
                &["profile", "result"],
            )?,
        };
        registry.register(Box::new(m.refreshes.clone()))?;
        registry.register(Box::new(m.seconds_to_expiry.clone()))?;
        registry.register(Box::new(m.credential_seconds_to_expiry.clone()))?;
        registry.register(Box::new(m.endpoint_latency.clone()))?;
        registry.register(Box::new(m.forced.clone()))?;
        Ok(m)
    }
}
