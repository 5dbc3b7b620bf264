//! A TCP proxy on loopback, to put real network faults between a client (the gateway) and a
//! server (nats-server) without touching either: it forwards bytes both ways, and on command it
//! stalls (keeps every socket open but forwards nothing, like a network that black-holes
//! packets), drops every connection at once (RST, like a middlebox or a peer that vanished), or
//! refuses connections (each new one is reset at once, the old ones are dropped).
//!
//! Nothing is simulated: the gateway's NATS client sees real sockets that hang, break and fail
//! to connect, and the server sees real clients go away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Pass,
    /// Forward nothing, keep every socket open (new connections too): bytes already read wait
    /// in the proxy and go through when the mode changes back.
    Stall,
    /// Drop every connection (RST) and reset each new one right after accepting it.
    Refuse,
}

/// Counters of what the proxy did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ProxyStats {
    pub accepted: u64,
    pub refused: u64,
    pub dropped: u64,
}

struct Shared {
    mode: watch::Sender<ProxyMode>,
    /// Bumped by [`TcpProxy::drop_all`]: every connection older than the bump is dropped.
    generation: watch::Sender<u64>,
    accepted: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    stop: CancellationToken,
}

/// A TCP proxy from an ephemeral loopback port to `upstream`. Stopped when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl TcpProxy {
    /// Listens on 127.0.0.1 (ephemeral port) and forwards to `upstream`, in [`ProxyMode::Pass`].
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(ProxyMode::Pass),
            generation: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Self { addr, shared }
    }

    /// Forwards to the NATS server at this `nats://host:port` URL.
    pub async fn to_nats(nats_url: &str) -> Self {
        let hostport = nats_url.trim_start_matches("nats://");
        Self::start(hostport.parse().expect("nats URL is host:port")).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy as a NATS URL (`nats://127.0.0.1:PORT`).
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn mode(&self) -> ProxyMode {
        *self.shared.mode.borrow()
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.shared.mode.send_replace(mode);
    }

    /// Drops (RST) every connection open now; new ones are served according to the mode.
    pub fn drop_all(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            () = shared.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        let _ = client.set_nodelay(true);
        // Closing a zero-linger socket sends RST: a drop is abrupt, as a crash would be.
        let _ = client.set_zero_linger();
        if *shared.mode.borrow() == ProxyMode::Refuse {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            let generation = *shared.generation.borrow();
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let _ = server.set_zero_linger();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let mut generations = shared.generation.subscribe();
            let mut modes = shared.mode.subscribe();
            let dropped = async {
                tokio::select! {
                    _ = generations.wait_for(|&g| g != generation) => {}
                    _ = modes.wait_for(|&m| m == ProxyMode::Refuse) => {}
                }
            };
            tokio::select! {
                () = shared.stop.cancelled() => {}
                () = dropped => { shared.dropped.fetch_add(1, Ordering::Relaxed); }
                _ = async {
                    tokio::join!(
                        forward(client_read, server_write, shared.mode.subscribe()),
                        forward(server_read, client_write, shared.mode.subscribe()),
                    )
                } => {}
            }
            // Both sockets close here (RST).
        });
    }
}

/// Copies one direction, holding the bytes while the proxy stalls.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if mode.wait_for(|&m| m != ProxyMode::Stall).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
