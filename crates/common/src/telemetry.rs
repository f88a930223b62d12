//! Logs and traces (§7): tracing to stdout (JSON when stdout is not a
//! terminal), OpenTelemetry over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set, and the W3C `traceparent` that carries a trace from fetch to record.

use std::collections::HashMap;
use std::io::IsTerminal;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Libraries whose debug output could include request bytes: held at `info`
/// unless `RUST_LOG` names them explicitly.
const QUIET: &[&str] = &[
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
    "tokio_rustls",
    "lapin",
    "amq_protocol",
    "pinky_swear",
    "redis",
    // async-imap traces every command it encodes, LOGIN's password included
    // (tests/tests/secret_scan.rs).
    "async_imap",
    "imap_proto",
];

/// Keeps the OTLP exporter alive; flushes it when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::TracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// The log filter: `RUST_LOG` (default `info`), with the noisy transport
/// crates capped at `info` unless named.
pub fn filter() -> EnvFilter {
    let requested = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let mut directives = requested.clone();
    for krate in QUIET {
        if !requested.contains(krate) {
            directives.push_str(&format!(",{krate}=info"));
        }
    }
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber for `service`. Call once, inside the tokio
/// runtime, before anything logs.
pub fn init(service: &str) -> TelemetryGuard {
    let json = !std::io::stdout().is_terminal();
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(std::io::stdout)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stdout)
            .boxed()
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = otlp_provider(service);
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_string())));
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(fmt)
        .with(otel)
        .try_init();
    TelemetryGuard { provider }
}

fn otlp_provider(service: &str) -> Option<opentelemetry_sdk::trace::TracerProvider> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot set up OTLP export to {endpoint}: {e}; traces are not exported");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::new(vec![opentelemetry::KeyValue::new(
        "service.name",
        service.to_string(),
    )]);
    let provider = opentelemetry_sdk::trace::TracerProvider::builder()
        .with_batch_exporter(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Some(provider)
}

/// The `traceparent` of the current span, when it is being traced.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span named by `traceparent`.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let mut carrier: HashMap<String, String> = HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    let cx = TraceContextPropagator::new().extract(&carrier);
    span.set_parent(cx);
}

/// Opens the fetcher's span for one message handed over (`fetched message`,
/// with its mail config and UID/UIDL) and returns its `traceparent`, so the
/// form processor's spans continue the same trace.
pub fn fetched_message_trace(mail_config: &str, reference: &str) -> Option<String> {
    let span = tracing::info_span!("fetched message", mail_config, reference);
    let _entered = span.enter();
    current_traceparent()
}
