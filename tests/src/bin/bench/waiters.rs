//! The waiters phase: holds N concurrent waiters on one gateway process (a third each: long poll
//! on the result, `Prefer: wait` on the status, server-sent events), each on its own connection and
//! each on its own operation, and measures the gateway's memory per waiter; then starts a worker
//! and counts how many waiters get their answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::procstat;

/// How a waiter waits.
#[derive(Clone, Copy, Debug)]
enum Kind {
    LongPoll,
    PreferWait,
    Events,
}

/// Opens one connection, sends one waiting request, and returns once the answer is complete:
/// `true` when it carried the terminal state.
async fn wait_one(addr: SocketAddr, id: String, kind: Kind, sent: Arc<AtomicU64>) -> bool {
    let mut counted = false;
    // A burst of new streams can meet the in-flight limit (503 overloaded, with Retry-After):
    // retry as a client would.
    for _ in 0..50 {
        let Some((status, body)) = ask(addr, &id, kind, &sent, &mut counted).await else {
            return false;
        };
        if status == 503 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let body = String::from_utf8_lossy(&body);
        return match kind {
            Kind::LongPoll => status == 200,
            Kind::PreferWait => body.contains("\"succeeded\""),
            Kind::Events => body.contains("event: succeeded"),
        };
    }
    false
}

/// One connection, one waiting request; the answer's status and whole body.
async fn ask(
    addr: SocketAddr,
    id: &str,
    kind: Kind,
    sent: &AtomicU64,
    counted: &mut bool,
) -> Option<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = match kind {
        Kind::LongPoll => Request::get(format!("/operations/{id}/result?wait=300")),
        Kind::PreferWait => Request::get(format!("/operations/{id}")).header("prefer", "wait=300"),
        Kind::Events => Request::get(format!("/operations/{id}/events")),
    }
    .header(hyper::header::HOST, addr.to_string())
    .body(Full::new(Bytes::new()))
    .expect("valid request");
    let response = sender.send_request(request);
    if !std::mem::replace(counted, true) {
        sent.fetch_add(1, Ordering::Relaxed);
    }
    let response = response.await.ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

pub struct Measured {
    pub waiters: usize,
    pub rss_before: u64,
    pub rss_waiting: u64,
    pub answered: usize,
    pub answer_time: Duration,
}

/// Submits `n` operations, then opens `n` waiters on them; `start_worker` is called once all wait.
pub async fn measure<F, Fut>(
    addr: SocketAddr,
    pid: u32,
    path: &str,
    n: usize,
    start_worker: F,
) -> Measured
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut http = crate::clients::Http::new(addr);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let request = Request::post(path)
            .header(hyper::header::HOST, addr.to_string())
            .header("idempotency-key", format!("\"waiter-{i}\""))
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("valid request");
        let (_, _, body) = http.send(request).await.expect("submit");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = procstat::sample(pid).expect("gateway running").rss_bytes;

    let sent = Arc::new(AtomicU64::new(0));
    let kinds = [Kind::LongPoll, Kind::PreferWait, Kind::Events];
    let waiters: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| tokio::spawn(wait_one(addr, id, kinds[i % 3], sent.clone())))
        .collect();
    while sent.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the gateway read every request and park every waiter.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_waiting = procstat::sample(pid).expect("gateway running").rss_bytes;

    let start = Instant::now();
    start_worker().await;
    let answered = futures::stream::iter(waiters)
        .buffer_unordered(n)
        .filter(|r| std::future::ready(matches!(r, Ok(true))))
        .count()
        .await;
    Measured {
        waiters: n,
        rss_before,
        rss_waiting,
        answered,
        answer_time: start.elapsed(),
    }
}
