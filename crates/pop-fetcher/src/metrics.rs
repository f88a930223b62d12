//! The fetcher's Prometheus metrics (§7): the names both fetchers share,
//! labelled `protocol="pop3"` ([`common::fetch_metrics`]), so dashboards
//! put both fetchers side by side.

pub use common::fetch_metrics::FetchMetrics as Metrics;
