//! The operations the benchmark measures, each as a [`Client`]: the gateway over HTTP/1.1 (one
//! keep-alive connection per task, written on hyper), and the raw JetStream baseline doing the
//! same work with async-nats.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway::config::RouteConfig;
use gateway::http::auth::DEFAULT_TENANT;
use gateway::operations::Submission;
use handlers::contract::{DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM, Subjects};
use handlers::jetstream::{CreateOutcome, create_if_absent, last_matching};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;

use crate::load::{Client, OpFuture, Outcome};

/// Operation ids collected during a run, for phases that read them back.
pub type Ids = Arc<Mutex<Vec<String>>>;

/// Keep at most this many ids per run.
const MAX_IDS: usize = 50_000;

fn remember(ids: &Option<Ids>, id: String) {
    if let Some(ids) = ids {
        let mut ids = ids.lock().unwrap();
        if ids.len() < MAX_IDS {
            ids.push(id);
        }
    }
}

/// One HTTP/1.1 keep-alive connection, reopened after an error.
pub struct Http {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    async fn connect(&mut self) -> std::io::Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just connected"))
    }

    /// Sends a request; returns status, whether `Retry-After` was present, and the body.
    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Option<(StatusCode, bool, Bytes)> {
        let sender = self.connect().await.ok()?;
        if sender.ready().await.is_err() {
            self.sender = None;
            return None;
        }
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response.headers().contains_key(hyper::header::RETRY_AFTER);
                let body = response.into_body().collect().await.ok()?.to_bytes();
                Some((status, retry_after, body))
            }
            Err(_) => {
                self.sender = None;
                None
            }
        }
    }
}

fn classify(status: StatusCode, retry_after: bool, expected: StatusCode) -> Outcome {
    if status == expected {
        Outcome::Ok
    } else if (status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS)
        && retry_after
    {
        Outcome::Shed
    } else {
        Outcome::Error
    }
}

fn id_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["id"].as_str().map(str::to_owned)
}

/// `POST` to `path` (`/orders` on the gateway) with a new key each time, or with keys used
/// before again (a client's retry: the same request, the same key).
pub struct Submit {
    pub http: Http,
    pub path: &'static str,
    pub body: Bytes,
    pub key_prefix: String,
    pub reuse: Option<Reuse>,
    pub ids: Option<Ids>,
}

impl Submit {
    /// New keys (`<prefix>-<n>`), each posting `body` to `path` on its own connection to `addr`;
    /// no ids kept.
    pub fn new(addr: SocketAddr, path: &'static str, key_prefix: &str, body: Bytes) -> Self {
        Self {
            http: Http::new(addr),
            path,
            body,
            key_prefix: key_prefix.to_owned(),
            reuse: None,
            ids: None,
        }
    }
}

/// Keys used again, in turn: those of sequence numbers `from..from + count`.
#[derive(Clone, Copy)]
pub struct Reuse {
    pub from: u64,
    pub count: u64,
}

fn submit_request(addr: SocketAddr, path: &str, key: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", format!("\"{key}\""))
        .body(Full::new(body))
        .expect("valid request")
}

impl Client for Submit {
    fn call(&mut self, seq: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let seq = self.reuse.map_or(seq, |r| r.from + seq % r.count);
            let key = format!("{}-{seq}", self.key_prefix);
            let request = submit_request(self.http.addr, self.path, &key, self.body.clone());
            let Some((status, retry_after, body)) = self.http.send(request).await else {
                return Outcome::Error;
            };
            let outcome = classify(status, retry_after, StatusCode::ACCEPTED);
            if outcome == Outcome::Ok
                && let Some(id) = id_of(&body)
            {
                remember(&self.ids, id);
            }
            outcome
        })
    }
}

/// `GET /operations/{id}` over known ids.
pub struct StatusGet {
    pub http: Http,
    pub ids: Arc<Vec<String>>,
}

impl Client for StatusGet {
    fn call(&mut self, seq: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let id = &self.ids[seq as usize % self.ids.len()];
            let request = Request::get(format!("/operations/{id}"))
                .header(hyper::header::HOST, self.http.addr.to_string())
                .body(Full::new(Bytes::new()))
                .expect("valid request");
            match self.http.send(request).await {
                Some((status, retry_after, _)) => classify(status, retry_after, StatusCode::OK),
                None => Outcome::Error,
            }
        })
    }
}

/// Submit through one gateway, then poll the result through another until it is there.
pub struct EndToEnd {
    pub submit: Http,
    pub read: Http,
    pub body: Bytes,
    pub key_prefix: String,
}

impl Client for EndToEnd {
    fn call(&mut self, seq: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let key = format!("{}-{seq}", self.key_prefix);
            let request = submit_request(self.submit.addr, "/e2e", &key, self.body.clone());
            let Some((StatusCode::ACCEPTED, _, body)) = self.submit.send(request).await else {
                return Outcome::Error;
            };
            let Some(id) = id_of(&body) else {
                return Outcome::Error;
            };
            for _ in 0..5_000 {
                let request = Request::get(format!("/operations/{id}/result"))
                    .header(hyper::header::HOST, self.read.addr.to_string())
                    .body(Full::new(Bytes::new()))
                    .expect("valid request");
                match self.read.send(request).await {
                    Some((StatusCode::OK, _, _)) => return Outcome::Ok,
                    Some((StatusCode::ACCEPTED, _, _)) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    _ => return Outcome::Error,
                }
            }
            Outcome::Error
        })
    }
}

/// The baseline of `Submit`: the same request message, published by async-nats with the same
/// create-if-absent condition and TTL, awaiting the ack.
pub struct RawPublish {
    pub js: async_nats::jetstream::Context,
    pub subjects: Subjects,
    pub route: RouteConfig,
    pub body: Bytes,
    pub key_prefix: String,
    pub ids: Option<Ids>,
}

impl Client for RawPublish {
    fn call(&mut self, seq: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let key = format!("{}-{seq}", self.key_prefix);
            let written =
                publish_as_gateway(&self.js, &self.subjects, &self.route, key, &self.body).await;
            match written {
                Some(id) => {
                    remember(&self.ids, id);
                    Outcome::Ok
                }
                None => Outcome::Error,
            }
        })
    }
}

/// The one write the gateway makes for a new `POST /orders` with key `key` and body `body`:
/// the request message `Submission::message` builds, published create-if-absent with its TTL.
/// The operation's id when it was created; `None` when refused or failed.
pub async fn publish_as_gateway(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    route: &RouteConfig,
    key: String,
    body: &Bytes,
) -> Option<String> {
    let submission = Submission {
        route,
        tenant: DEFAULT_TENANT,
        idempotency_key: key,
        method: "POST",
        path: "/orders",
        query: None,
        content_type: Some("application/json"),
        forwarded: Vec::new(),
        requested_callback_url: None,
        start: Default::default(),
        redrive_of: None,
        body_object: None,
        body: body.clone(),
    };
    let message = submission.message(
        subjects,
        None,
        &submission.key_token(),
        &submission.fingerprint(),
        OffsetDateTime::now_utc(),
    );
    let id = message.head.operation_id.clone();
    let written = create_if_absent(
        js,
        message.subject,
        message.headers,
        body.clone(),
        Some(message.ttl),
    )
    .await;
    matches!(written, Ok(CreateOutcome::Created)).then_some(id)
}

/// The baseline of `StatusGet`: the two direct gets a status lookup makes, issued together.
pub struct RawLookup {
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub ids: Arc<Vec<String>>,
}

impl Client for RawLookup {
    fn call(&mut self, seq: u64) -> OpFuture<'_> {
        Box::pin(async move {
            let id = &self.ids[seq as usize % self.ids.len()];
            let key_token =
                gateway::operations::idempotency::key_token_of(id).expect("gateway-made id");
            let request_pattern = self.subjects.request_any_route(key_token);
            let result_pattern = self.subjects.result_any_route(id);
            let (request, result) = tokio::join!(
                last_matching(&self.client, DEFAULT_REQUESTS_STREAM, &request_pattern),
                last_matching(&self.client, DEFAULT_OUTCOMES_STREAM, &result_pattern)
            );
            match (request, result) {
                (Ok(Some(_)), Ok(_)) => Outcome::Ok,
                _ => Outcome::Error,
            }
        })
    }
}
