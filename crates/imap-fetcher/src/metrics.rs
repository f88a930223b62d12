//! The fetcher's Prometheus metrics (§7): the names both fetchers share,
//! labelled `protocol="imap"` ([`common::fetch_metrics`]).

pub use common::fetch_metrics::FetchMetrics as Metrics;
