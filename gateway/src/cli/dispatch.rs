//! `gateway dispatch`: the worker-side sidecar. Consumes a route's requests (as a `handlers`
//! worker) and calls a local HTTP app with the original method, path, query, headers and body;
//! the app's response becomes the operation's result. So a service in any language becomes the
//! worker behind the gateway without a NATS client.
//!
//! Upstream 5xx answers, timeouts and connection errors are retried with the worker's back-off
//! (and end `failed` after the last delivery); 1xx-4xx answers are final results. Concurrency is
//! the worker's `max_in_flight`. The app receives `Gw-Operation-Id`, so it can deduplicate the
//! rare re-delivery after a crash between its answer and the result's write.

use std::time::Duration;

use crate::config::{AdminArgs, NatsArgs};
use crate::lifecycle::sleep_or_stop;
use crate::metrics::{DISPATCH_REPLIES, DISPATCH_RETRIES};
use bytes::Bytes;
use futures::StreamExt as _;
use handlers::contract::is_contract_header;
use handlers::{
    HandlerError, Permanent, Request, Response, RetryAfter, Worker, WorkerConfig, WorkerStats,
};
use tokio_util::sync::CancellationToken;

/// Flags of `gateway dispatch`.
#[derive(Debug, Clone, clap::Args)]
pub struct DispatchArgs {
    /// Route(s) whose requests this sidecar handles (repeat the flag for several).
    #[arg(
        long = "route",
        env = "GATEWAY_DISPATCH_ROUTES",
        value_delimiter = ',',
        required = true
    )]
    pub routes: Vec<String>,
    /// Base URL of the local app, e.g. http://127.0.0.1:3000.
    #[arg(long, env = "GATEWAY_DISPATCH_UPSTREAM")]
    pub upstream: reqwest::Url,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Durable consumer name prefix (`<prefix>-<route>`); the gateway's computed Retry-After reads
    /// `worker-<route>` unless the route says otherwise.
    #[arg(
        long,
        env = "GATEWAY_DISPATCH_CONSUMER_PREFIX",
        default_value = handlers::contract::DEFAULT_CONSUMER_PREFIX
    )]
    pub consumer_prefix: String,
    /// Upstream calls in flight at once, per route.
    #[arg(long, env = "GATEWAY_DISPATCH_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// How long one upstream call may take before it counts as failed (and is retried).
    #[arg(long, env = "GATEWAY_DISPATCH_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Attempts per request before the operation ends `failed` (the consumer allows one delivery
    /// more, which only ends it).
    #[arg(long, env = "GATEWAY_DISPATCH_MAX_DELIVER", default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub max_deliver: i64,
    /// First retry delay after a failed call; doubles per delivery.
    #[arg(long, env = "GATEWAY_DISPATCH_RETRY_BASE", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub retry_base: Duration,
    /// Longest retry delay: the doubling stops here.
    #[arg(long, env = "GATEWAY_DISPATCH_RETRY_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_max: Duration,
    /// AckWait of the consumer (the worker keeps the lease alive while a call runs).
    #[arg(long, env = "GATEWAY_DISPATCH_ACK_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ack_wait: Duration,
    /// How long past a request's deadline before this worker decides `expired` itself: the
    /// largest clock difference expected with the gateways (same as their setting).
    #[arg(long, env = "GATEWAY_EXPIRY_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub expiry_grace: Duration,
}

/// Why the dispatcher stopped.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Worker(#[from] handlers::worker::WorkerError),
    #[error(transparent)]
    Admin(#[from] crate::metrics::MetricsError),
}

/// Runs until `shutdown`, retrying while the streams do not exist yet.
pub async fn run(args: DispatchArgs, shutdown: CancellationToken) -> Result<(), DispatchError> {
    crate::tls::install_crypto_provider();
    let admin = crate::metrics::bind_admin(args.admin.admin_listen).await?;
    tokio::spawn(crate::metrics::serve_admin(admin, shutdown.clone()));
    let http = reqwest::Client::builder()
        .timeout(args.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| DispatchError::Client(e.to_string()))?;
    let client = args
        .nats
        .connect_options("gateway-dispatch")
        .await?
        .retry_on_initial_connect()
        .connect(args.nats.server_addrs())
        .await?;
    let js = async_nats::jetstream::new(client);
    let config = WorkerConfig {
        // Bodies in the Object Store are streamed to the app, not read into memory first.
        fetch_bodies: false,
        ack_wait: args.ack_wait,
        max_deliver: args.max_deliver,
        max_in_flight: args.concurrency,
        retry_base: args.retry_base,
        retry_max: args.retry_max,
        expiry_grace: args.expiry_grace,
        ..args.nats.worker_config(&args.consumer_prefix)
    };
    tracing::info!(routes = ?args.routes, upstream = %args.upstream, "Dispatching to the local app.");
    while !shutdown.is_cancelled() {
        let mut worker = Worker::new(js.clone(), config.clone());
        for route in &args.routes {
            let app = App {
                http: http.clone(),
                upstream: args.upstream.clone(),
                js: js.clone(),
                reply_inline_max: config.reply_inline_max,
            };
            worker = worker.route(route.clone(), move |request: Request| {
                forward(app.clone(), request)
            });
        }
        let mirroring = shutdown.child_token();
        tokio::spawn(mirror_stats(worker.stats(), mirroring.clone()));
        let ran = worker.run(shutdown.clone()).await;
        mirroring.cancel();
        match ran {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::info!(%error, "Waiting for the gateway's streams.");
                if sleep_or_stop(&shutdown, Duration::from_secs(1)).await {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Mirrors the worker library's counters into the dispatcher's metrics, once a second.
async fn mirror_stats(stats: std::sync::Arc<WorkerStats>, stop: CancellationToken) {
    use std::sync::atomic::Ordering::Relaxed;
    while !stop.is_cancelled() {
        for (outcome, count) in [
            ("replied", &stats.replied),
            ("failed", &stats.failed),
            ("conflict", &stats.conflicts),
            ("cancelled", &stats.cancelled),
            ("expired", &stats.expired),
            ("skipped", &stats.skipped),
        ] {
            metrics::counter!(DISPATCH_REPLIES, "outcome" => outcome).absolute(count.load(Relaxed));
        }
        metrics::counter!(DISPATCH_RETRIES).absolute(stats.retried.load(Relaxed));
        sleep_or_stop(&stop, Duration::from_secs(1)).await;
    }
}

/// The app's URL for a request: the upstream's own path prefix, then the request's path and
/// query. A path with `.` or `..` segments is refused for good (a URL library would resolve them
/// and reach another path of the app than the route named).
fn upstream_url(
    upstream: &reqwest::Url,
    path: &str,
    query: Option<&str>,
) -> Result<reqwest::Url, HandlerError> {
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(Permanent::new(400, "Bad path", "The path has dot segments.").into());
    }
    let mut url = upstream.clone();
    let wanted = format!("{}{path}", upstream.path().trim_end_matches('/'));
    url.set_path(&wanted);
    // Encoded dot segments (`%2e%2e`) are resolved by the URL parser too: what it made must be
    // what was asked for.
    if url.path() != wanted {
        return Err(Permanent::new(400, "Bad path", "The path has dot segments.").into());
    }
    url.set_query(query);
    Ok(url)
}

/// Where and how requests are replayed: the app, and the JetStream context that reads and writes
/// bodies kept in the Object Store.
#[derive(Clone)]
struct App {
    http: reqwest::Client,
    upstream: reqwest::Url,
    js: async_nats::jetstream::Context,
    /// A reply body above this many bytes (by its `Content-Length`) is streamed into the bucket
    /// the request names.
    reply_inline_max: usize,
}

/// One request, replayed against the app. A body kept in the Object Store is streamed to the
/// app with its `Content-Length`, and an answer larger than `reply_inline_max` (by its
/// `Content-Length`) is streamed into the bucket the request names: neither is held whole here.
/// (An answer without a length is read whole; the worker then stores it if it is large.)
async fn forward(app: App, request: Request) -> Result<Response, HandlerError> {
    let url = upstream_url(&app.upstream, &request.path, request.query.as_deref())?;
    let method = reqwest::Method::from_bytes(request.method.as_bytes())?;
    let body = match &request.body_object {
        Some(object) => reqwest::Body::wrap_stream(
            handlers::claim_check::read_body(&app.js, object, 0..object.size).await?,
        ),
        None => reqwest::Body::from(request.body.clone()),
    };
    let mut call = app
        .http
        .request(method, url)
        .header("gw-operation-id", &request.operation_id)
        .body(body);
    if let Some(object) = &request.body_object {
        call = call.header(reqwest::header::CONTENT_LENGTH, object.size);
    }
    // The app continues the worker's span, which continues the HTTP request's.
    for (name, value) in handlers::trace::outgoing(&tracing::Span::current(), &request.headers) {
        call = call.header(name, value);
    }
    for (name, values) in request.headers.iter() {
        let name: &str = name.as_ref();
        if is_contract_header(name) || handlers::trace::TRACE_HEADERS.contains(&name) {
            continue;
        }
        for value in values {
            call = call.header(name, value.as_str());
        }
    }
    if let Some(ct) = &request.content_type {
        call = call.header("content-type", ct);
    }
    let answer = tokio::select! {
        answer = call.send() => answer?,
        () = request.cancellation.cancelled() => return Err("cancelled by the client".into()),
    };
    let status = answer.status();
    // 429 and 503 ask for a later attempt, and Retry-After says when (RFC 9110 sections 10.2.3
    // and 15.6.4, RFC 6585 section 4): not before then.
    let busy = status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::SERVICE_UNAVAILABLE;
    // Which answers are retried: the route's policy says, else every 5xx and 429.
    let retried = match &request.retry_policy {
        Some(policy) => policy.retries_status(status.as_u16()),
        None => status.is_server_error() || busy,
    };
    if retried
        && busy
        && let Some(delay) = retry_after(answer.headers(), std::time::SystemTime::now())
    {
        return Err(RetryAfter::new(delay, format!("upstream answered {status}")).into());
    }
    if retried {
        return Err(format!("upstream answered {status}").into());
    }
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let headers = answer
        .headers()
        .iter()
        // Framing and the contract's own headers are not the app's to store.
        .filter(|(name, _)| {
            !is_contract_header(name.as_str())
                && !matches!(
                    name.as_str(),
                    "content-length" | "transfer-encoding" | "connection" | "date"
                )
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let large = answer
        .content_length()
        .is_some_and(|length| length > app.reply_inline_max as u64);
    let (body, body_object) = if large && request.reply_bucket.is_some() {
        let stream = answer
            .bytes_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other));
        let mut reader = tokio_util::io::StreamReader::new(stream);
        let object =
            handlers::claim_check::store_reply_from(&app.js, &request, &mut reader).await?;
        (Bytes::new(), Some(object))
    } else {
        (answer.bytes().await?, None)
    };
    Ok(Response {
        status: status.as_u16(),
        content_type,
        headers,
        body,
        body_object,
    })
}

/// An answer's `Retry-After` as a wait from `now`: delay-seconds or an HTTP-date (RFC 9110
/// section 10.2.3); a date in the past is no wait. `None` when absent or unreadable.
fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let of = |value: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
            retry_after(&h, now)
        };
        assert_eq!(of("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            of("Sun, 06 Nov 1994 08:49:40 GMT"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(of("Sun, 06 Nov 1994 08:49:00 GMT"), Some(Duration::ZERO));
        assert_eq!(of("-1"), None);
        assert_eq!(of("soon"), None);
        assert_eq!(retry_after(&reqwest::header::HeaderMap::new(), now), None);
    }

    #[test]
    fn upstream_urls_keep_the_prefix_and_refuse_dot_segments() {
        let base = reqwest::Url::parse("http://127.0.0.1:3000/api/").unwrap();
        let url = upstream_url(&base, "/orders/7", Some("a=1")).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:3000/api/orders/7?a=1");
        let bare = reqwest::Url::parse("http://127.0.0.1:3000").unwrap();
        assert_eq!(
            upstream_url(&bare, "/x", None).unwrap().as_str(),
            "http://127.0.0.1:3000/x"
        );
        assert!(upstream_url(&base, "/orders/../admin", None).is_err());
        assert!(upstream_url(&base, "/./x", None).is_err());
        assert!(upstream_url(&base, "/files/%2e%2e/%2E%2e/admin", None).is_err());
        assert!(upstream_url(&base, "/files/.%2e/admin", None).is_err());
    }
}
