//! One trace from fetch to record (§7): the IMAP fetcher's span, the AMQP
//! `traceparent` header and the form processor's span, exported over OTLP by
//! the real binaries and received here by an in-process OTLP/HTTP endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use mailagent_tests::forms::{lease_workbook, mail, Attachment, Lease, LEASE_SUBJECT};
use mailagent_tests::harness::wait_for;
use mailagent_tests::imap_support::{append, Fixture};
use mailagent_tests::process;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// A span as received: (service, name, trace id, span id, parent span id).
type Received = Arc<Mutex<Vec<(String, String, String, String, String)>>>;

async fn receive(State(spans): State<Received>, body: Bytes) -> &'static str {
    if let Ok(req) = ExportTraceServiceRequest::decode(body) {
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.lock().unwrap().push((
                        service.clone(),
                        s.name,
                        hex::encode(s.trace_id),
                        hex::encode(s.span_id),
                        hex::encode(s.parent_span_id),
                    ));
                }
            }
        }
    }
    ""
}

#[tokio::test]
async fn a_trace_runs_from_the_fetcher_to_the_record() {
    let spans: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let fx = Fixture::new("trace");
    fx.plant_token().await;
    let store = fx.dir.path().join("records.db");
    let mut cfg = fx.test_config(&[fx.mail_table("traced", &fx.mailbox, "start-from = \"all\"\n")]);
    cfg.store(&format!("sqlite://{}", store.display()))
        .topic(LEASE_SUBJECT, "senders = [\"@contoso.com\"]\n");
    let config = cfg.path();

    let mut children = Vec::new();
    for bin in ["imap-fetcher", "form-processor"] {
        let child = process::launch(bin, &config)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .log_level("info")
            .spawn();
        children.push(child);
    }
    let message = mail(
        LEASE_SUBJECT,
        "ann@contoso.com",
        &[],
        &[Attachment::xlsx(lease_workbook(&Lease::default()))],
    );
    append(&fx.env, &fx.mailbox, "INBOX", &message).await;

    // The processor's span must be a child of the fetcher's span, in one trace.
    let linked = wait_for(
        "the fetch and processing spans in one trace",
        Duration::from_secs(60),
        || async {
            let spans = spans.lock().unwrap().clone();
            let fetch: HashMap<String, (String, String)> = spans
                .iter()
                .filter(|s| s.0.contains("imap-fetcher") && s.1 == "fetched message")
                .map(|s| (s.3.clone(), (s.2.clone(), s.0.clone())))
                .collect();
            spans
                .iter()
                .filter(|s| s.0.contains("form-processor") && s.1 == "form")
                .find_map(|s| {
                    fetch
                        .get(&s.4)
                        .filter(|(trace, _)| *trace == s.2)
                        .map(|_| s.2.clone())
                })
        },
    )
    .await;
    assert_eq!(linked.len(), 32, "trace id {linked}");
    for mut child in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
