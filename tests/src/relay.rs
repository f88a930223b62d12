//! A loopback TCP relay that a test can cut and restore, to simulate an
//! outage of a shared server (RabbitMQ, Redis, PostgreSQL, Dovecot) without
//! stopping it for the other tests. TLS passes through untouched. The only
//! relay in test support: the e2e stack (also under its IdP front), the
//! form-processor harness and the fetcher tests all use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;

/// What a diverted connection is handed to (see [`Relay::with_diversion`]).
type Diversion = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// A relay from a free loopback port to `target`.
pub struct Relay {
    /// The relay's address.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    diverted: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts a relay to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        Self::with_diversion(target, |_| {}).await
    }

    /// Starts a relay to `target` that, while [`Relay::divert`]ed, hands
    /// each new connection to `diversion` instead of forwarding it.
    pub async fn with_diversion(
        target: SocketAddr,
        diversion: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let diverted = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (flag, divert, gen) = (Arc::clone(&up), Arc::clone(&diverted), generation.clone());
        let diversion: Diversion = Arc::new(diversion);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused while down
                }
                if divert.load(Ordering::SeqCst) {
                    diversion(inbound);
                    continue;
                }
                let mut cut = gen.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            diverted,
            generation,
            task,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Cuts every open connection but keeps accepting new ones (the server
    /// dropped its clients, e.g. a restart or a network blip).
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// While `on`, new connections go to the relay's diversion instead of
    /// the target (open ones are not touched: [`Relay::cut`] them).
    pub fn divert(&self, on: bool) {
        self.diverted.store(on, Ordering::SeqCst);
    }

    /// Stops accepting; open connections run on until they end.
    pub fn stop(&self) {
        self.task.abort();
    }
}
