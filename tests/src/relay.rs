//! A loopback TCP relay that a test can cut and restore, or stall, to
//! simulate an outage of a shared server (RabbitMQ, Redis, PostgreSQL,
//! Dovecot) without stopping it for the other tests. TLS passes through
//! untouched. The only
//! relay in test support: the e2e stack (also under its IdP front), the
//! form-processor harness and the fetcher tests all use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    stall: Arc<Stall>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Stalling open connections: a generation each one watches, and a one-shot
/// byte count that triggers it.
struct Stall {
    generation: tokio::sync::watch::Sender<u64>,
    /// Bytes the server may still send (summed over connections) before
    /// every open connection stalls; `u64::MAX` when not armed.
    budget: AtomicU64,
}

impl Stall {
    fn now(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Counts `n` bytes sent to a client; stalls when the armed budget is
    /// spent (once).
    fn count(&self, n: u64) {
        let spent = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                (left != u64::MAX).then(|| left.saturating_sub(n))
            });
        if let Ok(left) = spent {
            if left <= n {
                self.budget.store(u64::MAX, Ordering::SeqCst);
                self.now();
            }
        }
    }
}

/// Forwards one connection both ways until either side ends, the relay
/// cuts it, or it stalls: then neither direction moves, and both sockets
/// stay open (a NAT that lost its state, a hung server) until the relay
/// cuts it or is dropped.
async fn forward(
    inbound: TcpStream,
    outbound: TcpStream,
    mut cut: tokio::sync::watch::Receiver<u64>,
    stall: Arc<Stall>,
) {
    let mut stalled = stall.generation.subscribe();
    let (mut ci, mut co) = inbound.into_split();
    let (mut si, mut so) = outbound.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut ci, &mut so).await;
        let _ = so.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = si.read(&mut buf).await {
            if n == 0 || co.write_all(&buf[..n]).await.is_err() {
                break;
            }
            stall.count(n as u64);
        }
        let _ = co.shutdown().await;
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => return,
        _ = cut.changed() => return,
        _ = stalled.changed() => {}
    }
    // Stalled: hold the sockets, forward nothing.
    let _ = cut.changed().await;
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
        let stall = Arc::new(Stall {
            generation: tokio::sync::watch::channel(0u64).0,
            budget: AtomicU64::new(u64::MAX),
        });
        let (flag, divert, gen) = (Arc::clone(&up), Arc::clone(&diverted), generation.clone());
        let stalls = Arc::clone(&stall);
        let diversion: Diversion = Arc::new(diversion);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: refused while down
                }
                if divert.load(Ordering::SeqCst) {
                    diversion(inbound);
                    continue;
                }
                let cut = gen.subscribe();
                let stall = Arc::clone(&stalls);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    forward(inbound, outbound, cut, stall).await;
                });
            }
        });
        Self {
            addr,
            up,
            diverted,
            generation,
            stall,
            accepted,
            task,
        }
    }

    /// Connections accepted so far (forwarded, diverted or refused).
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
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

    /// Stalls every open connection: nothing is forwarded either way and
    /// nothing is closed. New connections are forwarded as usual.
    pub fn stall(&self) {
        self.stall.now();
    }

    /// Stalls every open connection (as [`Relay::stall`]) once the server
    /// has sent `bytes` more to the relay's clients: mid-reply, at a point
    /// the test chose.
    pub fn stall_after(&self, bytes: u64) {
        self.stall.budget.store(bytes.max(1), Ordering::SeqCst);
    }

    /// How many times open connections were stalled.
    pub fn stalls(&self) -> u64 {
        *self.stall.generation.borrow()
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
