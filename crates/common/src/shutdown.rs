//! Graceful shutdown (§7): one signal future, fanned out with a
//! [`CancellationToken`] that every loop selects on.

pub use tokio_util::sync::CancellationToken;

/// Completes on SIGTERM or SIGINT and logs which one arrived.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping only when killed");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}

/// A token cancelled when `signal` completes: hand clones to every task.
pub fn token_from(
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        signal.await;
        child.cancel();
    });
    token
}
