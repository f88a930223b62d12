//! The admin HTTP server of §7: `/healthz` (alive), `/readyz` (connected and
//! working), `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// What the admin endpoints report.
#[derive(Clone)]
pub struct AdminState {
    /// The process's metrics.
    pub registry: Registry,
    /// Set when the binary is ready to work (connected, topology declared).
    pub ready: Arc<AtomicBool>,
}

impl AdminState {
    /// A fresh registry whose metric names start with `prefix_`, not ready.
    pub fn new(prefix: &str) -> Self {
        let registry = Registry::new_custom(Some(prefix.to_string()), None).unwrap_or_default();
        Self {
            registry,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the binary ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// A running admin server.
pub struct AdminServer {
    /// The bound address (resolves port 0).
    pub addr: SocketAddr,
    /// Completes when the server stopped.
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `listen` and serves until `shutdown` is cancelled.
pub async fn serve(
    listen: SocketAddr,
    state: AdminState,
    shutdown: CancellationToken,
) -> Result<AdminServer> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Io {
            action: format!("listen on admin address {listen}"),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Io {
        action: "read admin address".into(),
        source,
    })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    tracing::info!(%addr, "admin endpoints at http://{addr}/metrics, /healthz, /readyz");
    Ok(AdminServer { addr, task })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&state.registry.gather(), &mut buf) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            e.to_string().into_bytes(),
        );
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, encoder.format_type().to_string())],
        buf,
    )
}
