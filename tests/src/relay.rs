//! A loopback TCP relay that a test can cut and restore, to simulate an
//! outage of a shared server (RabbitMQ, Redis, PostgreSQL, Dovecot) without
//! stopping it for the other tests. TLS passes through untouched. The only
//! relay in test support: the e2e stack, the form-processor harness and the
//! fetcher tests all use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A relay from a free loopback port to `target`.
pub struct Relay {
    /// The relay's address.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    /// Starts a relay to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let flag = Arc::clone(&up);
        let gen = generation.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused while down
                }
                let mut cut = gen.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
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
            generation,
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
}
