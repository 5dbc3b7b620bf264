//! The HTTP server loop: accepts connections up to a cap and serves each with hyper, with the
//! limits a front door needs against slow, idle or oversized clients, and drains on shutdown.
//!
//! Hand-written glue: `axum::serve` exposes none of hyper's connection settings, and hyper has no
//! idle deadline that starts at accept (its `header_read_timeout` starts with the first byte, and
//! the HTTP/1-or-2 detection before it waits forever). What it adds:
//! - at most `max_connections` connections at once. When all are taken and a client is waiting,
//!   every connection with no request in flight (and older than a moment) is closed, so idle
//!   sockets cannot hold the cap;
//! - a watchdog per connection that closes it when it has had no request in flight for
//!   `header_read_timeout` since accept (nothing or only part of a head sent: slowloris, a bare
//!   h2c preface) or for `keep_alive_timeout` since its last answer ended. (On HTTP/1, hyper
//!   also counts the wait for the next request as head time, so an idle keep-alive connection
//!   closes after the shorter of the two.);
//! - HTTP/2 keep-alive pings, so a peer that vanished is noticed;
//! - a backstop on header count and head size at twice the configured caps (hyper answers a bare
//!   `431`); the caps themselves are checked in [`crate::http`], which answers problem+json;
//! - `TCP_NODELAY`, so small exchanges on keep-alive connections are not held by Nagle;
//! - `Allow` only on a 405 (axum adds it to its method fallback's every answer, after the layers);
//! - graceful shutdown: stop accepting, let open requests finish, close idle connections.
//!
//! The body deadline is a tower layer in [`crate::http`], where its error becomes a `408`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::{AtEnd, carrying};

/// Limits on each client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// How long a new connection may take to send its first request's head.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight after an answer.
    pub keep_alive_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

/// How often a client waiting for a connection slot asks idle connections again to make room.
const PRESSURE_REPEAT: Duration = Duration::from_millis(250);
/// How old an idle connection must be before it makes room for another: a new client sends its
/// request within this, and should not lose its connection to the next one in line.
const YOUNG: Duration = Duration::from_millis(250);

/// How often an HTTP/2 connection is pinged, and how long the answer may take.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` resolves, then waits for the open connections to
/// finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers.saturating_mul(2))
        // hyper's read buffer bounds the head; it cannot go below 8 KiB.
        .max_buf_size(limits.max_header_bytes.saturating_mul(2).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_header_list_size(
            u32::try_from(limits.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        );
    let builder = Arc::new(builder);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    // Bumped when the cap is reached: every idle connection closes.
    let (pressure, _) = watch::channel(0u64);
    let stopping = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(%error, "Cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // A client is here and every slot is taken: idle connections make room, asked again
        // while it waits (one that was busy, or too young to judge, may be idle by then).
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => loop {
                pressure.send_modify(|generation| *generation += 1);
                tokio::select! {
                    permit = connections.clone().acquire_owned() => {
                        break permit.expect("the semaphore is never closed");
                    }
                    () = tokio::time::sleep(PRESSURE_REPEAT) => {}
                    () = &mut shutdown => {
                        drop(stream);
                        return drain(listener, stopping, tracker).await;
                    }
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "Cannot set TCP_NODELAY on a connection.");
        }
        let activity = Arc::new(Activity::new());
        let service = TowerToHyperService::new(Tracked {
            inner: app.clone(),
            activity: activity.clone(),
            peer,
        });
        let builder = builder.clone();
        let mut pressure = pressure.subscribe();
        let stopping = stopping.clone();
        tracker.spawn(async move {
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(%error, "Connection ended with an error.");
                    }
                }
                // No request in flight: dropping the connection closes the socket at once and
                // loses nothing (hyper's graceful close would wait for a partial head).
                () = activity.idle_too_long(limits, &mut pressure) => {}
                () = stopping.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    if let Err(error) = connection.as_mut().await {
                        tracing::debug!(%error, "Connection ended with an error while draining.");
                    }
                }
            }
            drop(permit);
        });
    }
    drain(listener, stopping, tracker).await;
}

/// Stops accepting and lets the open connections finish their requests.
async fn drain(listener: TcpListener, stopping: CancellationToken, tracker: TaskTracker) {
    drop(listener);
    stopping.cancel();
    tracker.close();
    tracker.wait().await;
}

/// What a connection is doing, as its watchdog sees it. Requests only update counters and a
/// timestamp; nothing wakes the watchdog per request (it looks when its own timer fires), so a
/// busy keep-alive connection costs no extra task wake-up or timer change per request.
struct Activity {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// When the last answer ended, in nanoseconds since `accepted`; `u64::MAX` while no request
    /// has ever arrived (then `header_read_timeout` applies, else `keep_alive_timeout`).
    last_end: AtomicU64,
}

/// `last_end` of a connection that has not had a request yet.
const NEVER: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(NEVER),
        }
    }

    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self) {
        let since = self.accepted.elapsed().as_nanos();
        self.last_end
            .store(u64::try_from(since).unwrap_or(NEVER - 1), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// When the connection will have been idle for its limit, if nothing starts before then;
    /// `None` while a request is in flight.
    fn idle_deadline(&self, limits: ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match self.last_end.load(Ordering::Acquire) {
            NEVER => self.accepted + limits.header_read_timeout,
            ended => self.accepted + Duration::from_nanos(ended) + limits.keep_alive_timeout,
        })
    }

    /// Resolves when the connection has had no request in flight for its limit, or when the
    /// connection cap is reached while it has none. It looks every `step`, the shorter limit: an
    /// answer that ends after one look leaves the connection idle until at least its end plus
    /// `keep_alive_timeout`, which is no earlier than the next look, so no deadline is missed.
    async fn idle_too_long(&self, limits: ConnectionLimits, pressure: &mut watch::Receiver<u64>) {
        let step = limits.header_read_timeout.min(limits.keep_alive_timeout);
        let mut wake = self.accepted + step;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    wake = match self.idle_deadline(limits) {
                        Some(deadline) if deadline <= now => return,
                        Some(deadline) => deadline.min(now + step),
                        None => now + step,
                    };
                }
                changed = pressure.changed() => {
                    // A busy connection makes no room: a call for room now is not one for later.
                    let idle = self.idle_deadline(limits).is_some();
                    if changed.is_ok() && idle && self.accepted.elapsed() >= YOUNG {
                        return;
                    }
                }
            }
        }
    }
}

/// The router, counting the connection's requests in flight: from the head's arrival until the
/// answer's body has been sent (or dropped), so that a long poll or an event stream is never
/// taken for idleness.
#[derive(Clone)]
struct Tracked {
    inner: Router,
    activity: Arc<Activity>,
    /// The client's address, for per-address limits (`ConnectInfo`, as `axum::serve` gives it).
    peer: SocketAddr,
}

impl tower::Service<Request<hyper::body::Incoming>> for Tracked {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Request>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: Request<hyper::body::Incoming>) -> Self::Future {
        let guard = InFlight::new(self.activity.clone());
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let answer = tower::Service::call(&mut self.inner, request);
        Box::pin(async move {
            let mut response = answer.await?;
            // axum puts `Allow` on whatever its method fallback answers, after every layer, a
            // 401 included, which would tell an anonymous caller a guarded path's methods: only
            // a 405 keeps it.
            if response.status() != axum::http::StatusCode::METHOD_NOT_ALLOWED {
                response.headers_mut().remove(axum::http::header::ALLOW);
            }
            Ok(response.map(|body| carrying(body, guard)))
        })
    }
}

/// One request in flight on a connection, until dropped (with its answer's body).
struct InFlight(Arc<Activity>);

impl AtEnd for InFlight {}

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.begin();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}
