//! `gateway dispatch` against a real nats-server and a real local HTTP app (axum): the original
//! request reaches the app, its answer becomes the result, 5xx and timeouts are retried, 4xx are
//! final, and concurrency is capped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::Parser;
use gateway::cli::dispatch::DispatchArgs;
use gateway_tests::*;
use tokio_util::sync::CancellationToken;

const ROUTES: &str = r#"
[[route]]
name = "echo"
method = "POST"
path = "/echo/{thing}"

[[route]]
name = "flaky"
method = "GET"
path = "/flaky"

[[route]]
name = "missing"
method = "POST"
path = "/missing"

[[route]]
name = "slow"
method = "POST"
path = "/slow"

[[route]]
name = "capped"
method = "POST"
path = "/capped"

[[route]]
name = "throttled"
method = "GET"
path = "/throttled"

[[route]]
name = "policed"
method = "GET"
path = "/policed"
retry = { attempts = 3, backoff = ["2s"], retry_on = ["500"] }

[[route]]
name = "mirror"
method = "POST"
path = "/mirror"
max_body = "8MiB"
inline_max = "64KiB"

[[route]]
name = "spent"
method = "GET"
path = "/spent"
retry = { attempts = 2, backoff = ["200ms"], jitter = 50, retry_on = ["5xx"] }
"#;

#[derive(Clone, Default)]
struct App {
    flaky_calls: Arc<AtomicU32>,
    throttled_calls: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    policed_calls: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    spent_calls: Arc<AtomicU32>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

async fn echo(
    Path(thing): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let echoed = serde_json::json!({
        "thing": thing,
        "query": query,
        "content_type": h("content-type"),
        "accept_language": h("accept-language"),
        "operation_id": h("gw-operation-id"),
        "body": body,
    });
    (
        StatusCode::CREATED,
        [("etag", "\"e1\"")],
        axum::Json(echoed),
    )
}

async fn flaky(State(app): State<App>) -> (StatusCode, &'static str) {
    if app.flaky_calls.fetch_add(1, Ordering::SeqCst) < 2 {
        (StatusCode::SERVICE_UNAVAILABLE, "not yet")
    } else {
        (StatusCode::OK, "ok now")
    }
}

/// 429, then 503, each asking for 3 s (`Retry-After`), then 200.
async fn throttled(State(app): State<App>) -> impl IntoResponse {
    let calls = {
        let mut calls = app.throttled_calls.lock().unwrap();
        calls.push(tokio::time::Instant::now());
        calls.len()
    };
    let status = match calls {
        1 => StatusCode::TOO_MANY_REQUESTS,
        2 => StatusCode::SERVICE_UNAVAILABLE,
        _ => return (StatusCode::OK, [("retry-after", "0")], "served"),
    };
    (status, [("retry-after", "3")], "later")
}

/// 500, then 503: the route retries 500 only, so the 503 is the result.
async fn policed(State(app): State<App>) -> (StatusCode, &'static str) {
    let mut calls = app.policed_calls.lock().unwrap();
    calls.push(tokio::time::Instant::now());
    match calls.len() {
        1 => (StatusCode::INTERNAL_SERVER_ERROR, "boom"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
    }
}

async fn capped(State(app): State<App>) -> &'static str {
    let now = app.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    app.most_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.in_flight.fetch_sub(1, Ordering::SeqCst);
    "done"
}

async fn start_app() -> (App, String) {
    let app = App::default();
    let router = axum::Router::new()
        .route("/echo/{thing}", post(echo))
        .route("/flaky", get(flaky))
        .route(
            "/missing",
            post(|| async { (StatusCode::NOT_FOUND, "no such thing") }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "too late"
            }),
        )
        .route("/capped", post(capped))
        // The body back, with its length: a large request makes a large reply.
        .route(
            "/mirror",
            post(|headers: HeaderMap, body: axum::body::Bytes| async move {
                let length = headers.get("content-length").cloned();
                let mut answer = body.into_response();
                if let Some(length) = length {
                    answer.headers_mut().insert("x-request-length", length);
                }
                answer
            })
            .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/throttled", get(throttled))
        .route("/policed", get(policed))
        .route(
            "/spent",
            get(|State(app): State<App>| async move {
                app.spent_calls.fetch_add(1, Ordering::SeqCst);
                (StatusCode::BAD_GATEWAY, "down")
            }),
        )
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (app, base)
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    dispatch: DispatchArgs,
}

fn start_dispatcher(nats: &Nats, upstream: &str) -> CancellationToken {
    let args = Args::parse_from([
        "dispatch",
        "--route",
        "echo,flaky,missing,slow,capped,throttled,policed,spent,mirror",
        "--upstream",
        upstream,
        "--nats-url",
        &nats.url(),
        "--consumer-prefix",
        "dispatch",
        "--admin-listen",
        "127.0.0.1:0",
        "--concurrency",
        "2",
        "--timeout",
        "1s",
        "--max-deliver",
        "3",
        "--retry-base",
        "100ms",
        "--retry-max",
        "200ms",
        "--ack-wait",
        "3s",
    ])
    .dispatch;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { gateway::cli::dispatch::run(args, token).await.unwrap() });
    stop
}

async fn wait_result(gw: &InProcessGateway, id: &str) -> reqwest::Response {
    let statuses = poll_until_terminal(&gw.base, id, Duration::from_secs(20)).await;
    assert_monotonic(&statuses);
    get_result(&gw.base, id).await
}

/// An upstream that answers 429 and then 503 with `Retry-After: 3` is not called again before
/// then (the back-off alone would retry after 100-200 ms); the third call's answer is the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_retry_after_is_honoured() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let (app, upstream) = start_app().await;
    let _stop = start_dispatcher(&nats, &upstream);
    let id = id_of(http().get(gw.url("/throttled")).send().await.unwrap()).await;
    let result = wait_result(&gw, &id).await;
    assert_eq!(result.status(), 200);
    assert_eq!(result.text().await.unwrap(), "served");
    let calls = app.throttled_calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    for pair in calls.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_secs(3), "called again after {gap:?}");
        eprintln!("attempts {gap:?} apart");
    }
}

/// A route's retry policy, carried in each request, steers the dispatcher: only the answers it
/// names are retried (500 here; the 503 that follows is the result), after its back-off (2 s,
/// where the dispatcher's own settings say 100-200 ms), for its attempts (2, where the
/// dispatcher's consumer allows 3). Meanwhile the status resource says where the retries stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_retry_policy_steers_the_worker_and_shows_in_the_status() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let (app, upstream) = start_app().await;
    let _stop = start_dispatcher(&nats, &upstream);
    let id = id_of(http().get(gw.url("/policed")).send().await.unwrap()).await;
    let retry = eventually("the retry state", Duration::from_secs(10), || async {
        let status = json(get_operation(&gw.base, &id).await).await;
        let retry = status["progress"]["retry"].clone();
        (retry["attempts"] == 1).then_some(retry)
    })
    .await;
    let seen_at = time::OffsetDateTime::now_utc();
    assert!(
        retry["last_error"].as_str().unwrap().contains("500"),
        "{retry}"
    );
    let next = time::OffsetDateTime::parse(
        retry["next_attempt_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let due_in = next - seen_at;
    assert!(
        due_in <= time::Duration::seconds(2) && due_in > time::Duration::seconds(-1),
        "next attempt due in {due_in}"
    );
    let result = wait_result(&gw, &id).await;
    assert_eq!(result.status(), 503);
    assert_eq!(result.text().await.unwrap(), "busy");
    let calls = app.policed_calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let gap = calls[1] - calls[0];
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    eprintln!("policy back-off 2s: attempts {gap:?} apart");

    let id = id_of(http().get(gw.url("/spent")).send().await.unwrap()).await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(20)).await;
    assert_eq!(statuses.last().unwrap(), "failed");
    assert_eq!(app.spent_calls.load(Ordering::SeqCst), 2);
    let failed = json(get_result(&gw.base, &id).await).await;
    assert!(
        failed["detail"].as_str().unwrap().contains("502"),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_calls_the_local_app_and_stores_its_answers() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let (app, upstream) = start_app().await;
    let _stop = start_dispatcher(&nats, &upstream);
    let http = http();

    // The original method, path, query, headers and body reach the app; its answer comes back.
    let r = http
        .post(gw.url("/echo/widget?colour=blue"))
        .header("content-type", "text/plain")
        .header("accept-language", "fr")
        .body("hello")
        .send()
        .await
        .unwrap();
    let id = id_of(r).await;
    let result = wait_result(&gw, &id).await;
    assert_eq!(result.status(), 201);
    assert_eq!(result.headers()["etag"], "\"e1\"");
    let echoed = json(result).await;
    assert_eq!(echoed["thing"], "widget");
    assert_eq!(echoed["query"], "colour=blue");
    assert_eq!(echoed["content_type"], "text/plain");
    assert_eq!(echoed["accept_language"], "fr");
    assert_eq!(echoed["operation_id"], id);
    assert_eq!(echoed["body"], "hello");

    // 503 twice, then 200: retried with back-off until it works.
    let id = id_of(http.get(gw.url("/flaky")).send().await.unwrap()).await;
    let result = wait_result(&gw, &id).await;
    assert_eq!(result.status(), 200);
    assert_eq!(result.text().await.unwrap(), "ok now");
    assert_eq!(app.flaky_calls.load(Ordering::SeqCst), 3);

    // 404 is a final answer, stored as is.
    let id = id_of(http.post(gw.url("/missing")).send().await.unwrap()).await;
    let result = wait_result(&gw, &id).await;
    assert_eq!(result.status(), 404);
    assert_eq!(result.text().await.unwrap(), "no such thing");

    // Always too slow: each call times out, and after the last delivery the operation fails.
    let id = id_of(http.post(gw.url("/slow")).send().await.unwrap()).await;
    let status = poll_until_terminal(&gw.base, &id, Duration::from_secs(30)).await;
    assert_eq!(status.last().unwrap(), "failed");

    // Concurrency is capped: ten requests, never more than two at once in the app.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(id_of(http.post(gw.url("/capped")).send().await.unwrap()).await);
    }
    for id in &ids {
        assert_eq!(wait_result(&gw, id).await.status(), 200);
    }
    let most = app.most_in_flight.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "at most 2 in flight, saw {most}");
}

/// A request body kept in the Object Store is streamed to the app with its length, and the app's
/// large answer is streamed into the route's bucket: the client gets back what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_streams_large_bodies_both_ways() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--result-headers", "x-request-length"])
        .start()
        .await;
    let (_app, upstream) = start_app().await;
    let _stop = start_dispatcher(&nats, &upstream);
    let body: Vec<u8> = (0..3 << 20).map(|i| (i % 239) as u8).collect();
    let r = http()
        .post(gw.url("/mirror"))
        .header("idempotency-key", "\"mirror-1\"")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let id = id_of(r).await;
    let result = wait_result(&gw, &id).await;
    assert_eq!(result.status(), 200);
    assert_eq!(
        result.headers()["x-request-length"],
        body.len().to_string().as_str(),
        "the app got the body with its length"
    );
    assert!(
        result.bytes().await.unwrap() == body,
        "the body came back whole"
    );
    let record = stored_outcome(&nats.client().await, "mirror", &id).await;
    assert_eq!(
        record.body_object.map(|o| o.size),
        Some(body.len() as u64),
        "the answer went to the Object Store"
    );
}
