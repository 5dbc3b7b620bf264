//! Router tests without NATS: everything a request can get wrong is answered before JetStream
//! is touched, and a gateway that has no JetStream yet answers 503, never 202.

use axum::body::Body;
use http_body_util::BodyExt;
use tower::ServiceExt;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};

use super::{AppState, router};
use crate::config::{ByteSize, ConfigError, RouteConfig, Settings};
use crate::lifecycle::Lifecycle;
use crate::operations::{Operations, RetryAfter};

fn route(name: &str, method: &str, path: &str, require_key: bool) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        method: method.into(),
        path: path.into(),
        require_idempotency_key: require_key,
        public: false,
        retention: std::time::Duration::from_secs(60),
        timeout: std::time::Duration::from_secs(5),
        max_body: ByteSize(16),
        inline_max: None,
        wait: None,
        callback_url: None,
        consumer: None,
        state: None,
        request_schema: None,
        body_schema: None,
        retry: None,
        max_delay: None,
    }
}

/// A router whose store points at a port where nothing listens.
async fn app(routes: &[RouteConfig]) -> Result<Router, ConfigError> {
    Ok(app_with_limit(routes, 8).await?.0)
}

/// A router built the way `gateway::run` builds it (`AppState::new` from parsed settings), with
/// a store that points at a port where nothing listens.
async fn app_with_limit(
    routes: &[RouteConfig],
    max_in_flight: usize,
) -> Result<(Router, AppState), ConfigError> {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        settings: Settings,
    }
    let max_in_flight = format!("--max-in-flight={max_in_flight}");
    let settings = Args::parse_from([
        "gateway",
        "--config=unused.toml",
        "--nats-url=nats://127.0.0.1:1",
        "--retry-after-secs=7",
        "--max-wait=5s",
        "--max-event-streams=1",
        "--body-read-timeout=5s",
        "--forward-headers=",
        "--result-headers=",
        &max_in_flight,
    ])
    .settings;
    let lifecycle = Lifecycle::default();
    let retry_after = RetryAfter::new(settings.retry_after_secs, []);
    let ops = Operations::connect(
        &settings.jetstream,
        &[],
        retry_after,
        lifecycle.clone(),
        Default::default(),
    )
    .await
    .expect("connect returns at once");
    let state = AppState::new(&settings, ops, lifecycle, None)?;
    Ok((router(state.clone(), routes)?, state))
}

async fn call(
    app: &Router,
    request: axum::http::Request<Body>,
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

fn get_request(path: &str) -> axum::http::Request<Body> {
    axum::http::Request::get(path).body(Body::empty()).unwrap()
}

fn post(path: &str) -> axum::http::request::Builder {
    axum::http::Request::post(path)
}

#[tokio::test]
async fn client_errors_are_problems_and_need_no_nats() {
    let app = app(&[route("jobs", "POST", "/jobs/{kind}", true)])
        .await
        .unwrap();
    let cases = [
        (
            post("/jobs/a").body(Body::empty()).unwrap(),
            400,
            "idempotency-key-missing",
        ),
        (
            post("/jobs/a")
                .header("idempotency-key", "\"unterminated")
                .body(Body::empty())
                .unwrap(),
            400,
            "idempotency-key-invalid",
        ),
        (
            post("/jobs/a")
                .header("idempotency-key", "\"k\"")
                .header("content-length", "17")
                .body(Body::from(vec![0u8; 17]))
                .unwrap(),
            413,
            "payload-too-large",
        ),
        (
            post("/elsewhere").body(Body::empty()).unwrap(),
            404,
            "not-found",
        ),
        (
            axum::http::Request::delete("/jobs/a")
                .body(Body::empty())
                .unwrap(),
            405,
            "method-not-allowed",
        ),
    ];
    for (request, status, slug) in cases {
        let uri = request.uri().clone();
        let (got, headers, problem) = call(&app, request).await;
        assert_eq!(got.as_u16(), status, "{uri}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(problem["status"], status);
        assert!(
            problem["type"].as_str().unwrap().ends_with(slug),
            "{problem}"
        );
    }
}

#[tokio::test]
async fn without_jetstream_a_valid_request_gets_503_with_retry_after() {
    let app = app(&[route("jobs", "POST", "/jobs/{kind}", true)])
        .await
        .unwrap();
    let request = post("/jobs/a")
        .header("idempotency-key", "\"k\"")
        .body(Body::from("{}"))
        .unwrap();
    let (status, headers, problem) = call(&app, request).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    assert!(problem["detail"].as_str().unwrap().contains("retry"));

    let (status, _, _) = call(&app, get_request("/livez")).await;
    assert_eq!(status, StatusCode::OK, "liveness never checks NATS");
    let (status, headers, _) = call(&app, get_request("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "7");
}

#[tokio::test]
async fn requests_beyond_the_limit_are_shed_at_once_but_health_is_not() {
    let (app, state) = app_with_limit(&[route("jobs", "POST", "/jobs/{kind}", true)], 1)
        .await
        .unwrap();
    // A request whose body never arrives holds no slot: it has done no work yet.
    let stalled = post("/jobs/a")
        .header("idempotency-key", "\"k\"")
        .body(Body::from_stream(futures::stream::pending::<
            Result<bytes::Bytes, std::io::Error>,
        >()))
        .unwrap();
    let stalled = tokio::spawn(app.clone().oneshot(stalled));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (status, _, _) = call(&app, get_request("/operations/x")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a slow body takes no slot");
    stalled.abort();

    // Work in progress holds the only slot: the next request is shed at once.
    let holder = state.admit().unwrap();
    let (status, headers, problem) = call(&app, get_request("/operations/x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    assert!(
        problem["type"].as_str().unwrap().ends_with("overloaded"),
        "{problem}"
    );
    let (status, _, _) = call(&app, get_request("/livez")).await;
    assert_eq!(status, StatusCode::OK);

    drop(holder);
    let (status, _, _) = call(&app, get_request("/operations/x")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the slot is free again");
}

#[tokio::test]
async fn conflicting_paths_are_a_configuration_error() {
    let routes = [
        route("a", "POST", "/a/{x}", false),
        route("b", "PUT", "/a/{y}", false),
    ];
    let err = app(&routes).await.expect_err("conflict detected");
    assert!(err.to_string().contains("conflicts"), "{err}");
    // Two methods on one path share it.
    let routes = [
        route("a", "POST", "/a/{x}", false),
        route("b", "PUT", "/a/{x}", false),
    ];
    assert!(app(&routes).await.is_ok());
}

/// A waiter's handler future is all it keeps while parked (10,000 waiters: 10,000 of them): the
/// reads it may make before or after waiting are boxed, not part of it. (Unboxed, the status
/// lookup alone made each one 8.6 KB.)
#[tokio::test]
async fn waiting_handlers_stay_small() {
    use axum::extract::State;
    let (_, state) = app_with_limit(&[route("orders", "POST", "/orders", false)], 8)
        .await
        .unwrap();
    let operation = || super::extract::OperationRef {
        tenant: "default".into(),
        id: "x".into(),
    };
    let query = || serde_json::from_str("{}").unwrap();
    const MAX: usize = 3 * 1024;
    let result = super::reads::get_result(
        State(state.clone()),
        query(),
        operation(),
        axum::http::Method::GET,
        HeaderMap::new(),
    );
    assert!(
        std::mem::size_of_val(&result) <= MAX,
        "{}",
        std::mem::size_of_val(&result)
    );
    let status =
        super::reads::get_operation(State(state.clone()), query(), operation(), HeaderMap::new());
    assert!(
        std::mem::size_of_val(&status) <= MAX,
        "{}",
        std::mem::size_of_val(&status)
    );
}
