//! The production surface, end to end on real processes: draining on SIGTERM, Prometheus metrics
//! on the admin port, the W3C trace context across the async hop (with OTLP export to a local
//! collector), and JSON logs that carry request, operation and trace ids.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use gateway_tests::{
    Nats, TestGateway, TestWorker, echo, eventually, get_operation, http, id_of, json, log_field,
    poll_until_terminal, worker_config,
};
use handlers::contract::{DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM, Subjects};
use handlers::jetstream::last_matching;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");

const ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
timeout = "60s"
retention = "10m"

[[route]]
name = "parked"
method = "POST"
path = "/parked"
timeout = "60s"
retention = "10m"
"#;

/// SIGTERM: readiness turns false and new work gets `503 shutting-down` while an accept that was
/// in flight still finishes with 202 after its JetStream ack; a long poll answers at once with
/// what it has; then the process exits by itself, cleanly, well within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_answers_waiters() {
    let TestGateway { nats, mut gw } = TestGateway::builder(ROUTES)
        .env("GATEWAY_SHUTDOWN_GRACE", "15s")
        .spawn(GATEWAY_BIN)
        .await;
    let http = http();

    // A pending operation (no worker on `parked`) and a client long-polling its result.
    let accepted = http.post(gw.url("/parked")).body("x").send().await.unwrap();
    let id = id_of(accepted).await;
    let poll_url = gw.url(&format!("/operations/{id}/result?wait=30"));
    let long_poll = tokio::spawn({
        let http = http.clone();
        async move {
            let started = std::time::Instant::now();
            let r = http.get(poll_url).send().await.unwrap();
            (r.status(), started.elapsed())
        }
    });

    // An accept in flight: headers and half the body sent, the rest after SIGTERM.
    let mut in_flight = TcpStream::connect(gw.addr()).await.unwrap();
    let body = br#"{"n":"in-flight"}"#;
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         idempotency-key: \"drain-1\"\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(&body[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    gw.terminate();
    eventually("readiness false", Duration::from_secs(5), || async {
        let r = http.get(gw.url("/readyz")).send().await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    let refused = http
        .post(gw.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let problem = json(refused).await;
    assert!(
        problem["type"].as_str().unwrap().ends_with("shutting-down"),
        "{problem}"
    );

    let (status, waited) = long_poll.await.unwrap();
    assert_eq!(status, 202, "the waiter gets the operation as it stands");
    assert!(
        waited < Duration::from_secs(20),
        "the waiter was answered by the drain, not by its 30 s wait ({waited:?})"
    );

    in_flight.write_all(&body[5..]).await.unwrap();
    let mut answer = String::new();
    in_flight.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 202"),
        "the in-flight accept finished: {answer}"
    );
    let exit = gw.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.success(), "clean exit after draining: {exit:?}");

    // The 202 is backed by exactly one stored request with the in-flight body.
    let js = nats.jetstream().await;
    let stored = last_matching(
        &js.client(),
        DEFAULT_REQUESTS_STREAM,
        &Subjects::default().route_requests("orders"),
    )
    .await
    .unwrap()
    .expect("the in-flight request is stored");
    assert_eq!(stored.payload.as_ref(), body);
}

/// `/metrics` on the admin port counts requests by route and status, replays, accept latency,
/// results by status and waiters, with the names of `gateway::metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_replays_results_and_latency() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).spawn(GATEWAY_BIN).await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    let http = http();
    let admin = gw.admin_base().await;
    let scrape = || {
        let url = format!("{admin}/metrics");
        let http = http.clone();
        async move { http.get(url).send().await.ok()?.text().await.ok() }
    };
    use gateway::metrics::*;
    // Before any event, the series with known labels are there at zero (alerts on `absent` or
    // `rate` see them from the start).
    let at_start = scrape().await.unwrap();
    for expected in [
        format!("{SHED} 0"),
        format!("{WEBHOOK_DELIVERIES}{{outcome=\"abandoned\"}} 0"),
        format!("{JETSTREAM_ERRORS}{{kind=\"outcome_unknown\"}} 0"),
        format!("{RESULTS}{{status=\"cancelled\"}} 0"),
        format!("{IDEMPOTENT_REPLAYS}{{route=\"orders\"}} 0"),
    ] {
        assert!(
            at_start.contains(&expected),
            "missing {expected:?} in\n{at_start}"
        );
    }
    // A clean start warns about nothing (before: one "cannot provision streams yet").
    let warnings: Vec<String> = gw
        .logs()
        .into_iter()
        .filter(|line| line.contains("WARN"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    let submit = || {
        http.post(gw.url("/orders"))
            .header("idempotency-key", "\"m-1\"")
            .body("{}")
            .send()
    };
    let first = json(submit().await.unwrap()).await;
    assert_eq!(submit().await.unwrap().status(), 202);
    let id = first["id"].as_str().unwrap();
    poll_until_terminal(&gw.base, id, Duration::from_secs(20)).await;
    // Results are counted by each replica's watch of the results stream, which starts just after
    // readiness: this one lands while it certainly runs.
    let second = http
        .post(gw.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    let second = json(second).await;
    poll_until_terminal(
        &gw.base,
        second["id"].as_str().unwrap(),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        http.get(gw.url("/operations/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // A long poll on a finished operation: a waiter comes and goes.
    let waited = http
        .get(gw.url(&format!("/operations/{id}/result?wait=5")))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), 200);
    let metrics = eventually("results counted", Duration::from_secs(10), || async {
        let text = scrape().await?;
        let counted = format!("{RESULTS}{{status=\"succeeded\"}} ");
        let succeeded = text
            .lines()
            .find_map(|line| line.strip_prefix(counted.as_str()))?;
        (succeeded != "0").then_some(text)
    })
    .await;
    for expected in [
        format!("{HTTP_REQUESTS}{{route=\"orders\",status=\"202\"}} 3"),
        format!("{HTTP_REQUESTS}{{route=\"/operations/{{id}}\",status=\"404\"}} 1"),
        format!("{IDEMPOTENT_REPLAYS}{{route=\"orders\"}} 1"),
        format!("{ACCEPT_SECONDS}_count{{route=\"orders\"}} 3"),
        format!("{WAITERS} 0"),
    ] {
        assert!(
            metrics.contains(&expected),
            "missing {expected:?} in\n{metrics}"
        );
    }
}

/// One collector on loopback that keeps every OTLP/HTTP export it receives.
async fn otlp_collector() -> (String, Arc<Mutex<Vec<Bytes>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            kept.lock().unwrap().push(body);
            async { "" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn exports_naming(exports: &Mutex<Vec<Bytes>>, trace_id: &[u8]) -> usize {
    exports
        .lock()
        .unwrap()
        .iter()
        .filter(|body| body.windows(trace_id.len()).any(|w| w == trace_id))
        .count()
}

/// The client's `traceparent` continues through the gateway (a span of its own, exported over
/// OTLP), into the request message, through the worker, onto the result; a later status read,
/// in a trace of its own, links back to it; JSON log lines carry request, operation and trace ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_crosses_the_async_hop_and_reads_link_back_to_it() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let nats = Nats::start().await;
    let (collector, exports) = otlp_collector().await;
    let env = [
        ("GATEWAY_LOG_FORMAT", "json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        // The access line of each request is at DEBUG.
        ("RUST_LOG", "warn,gateway=debug"),
    ];
    let gw = TestGateway::builder(ROUTES)
        .nats(&nats)
        .envs(env)
        .spawn(GATEWAY_BIN)
        .await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    let http = http();

    let accepted = http
        .post(gw.url("/orders"))
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .header("x-request-id", "req-trace-1")
        .body("{}")
        .send()
        .await
        .unwrap();
    let id = id_of(accepted).await;
    poll_until_terminal(&gw.base, &id, Duration::from_secs(20)).await;

    // The request message carries the trace, with the gateway's own span as the parent.
    let js = nats.jetstream().await;
    let subjects = Subjects::default();
    let request = last_matching(
        &js.client(),
        DEFAULT_REQUESTS_STREAM,
        &subjects.route_requests("orders"),
    )
    .await
    .unwrap()
    .unwrap();
    let sent = request
        .headers
        .get("traceparent")
        .unwrap()
        .as_str()
        .to_owned();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[1], TRACE, "same trace: {sent}");
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "the gateway's span is the parent: {sent}"
    );
    // The worker (no OpenTelemetry in this process) passes the context on to the result.
    let result = last_matching(
        &js.client(),
        DEFAULT_OUTCOMES_STREAM,
        &subjects.slots("orders", &id).reply_subject,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        result.headers.get("traceparent").map(|v| v.as_str()),
        Some(sent.as_str())
    );

    // The gateway's span was exported to the collector.
    eventually("span exported", Duration::from_secs(10), || async {
        (exports_naming(&exports, &trace_bytes) > 0).then_some(())
    })
    .await;
    // A later read, in a new trace, links to the accepting span: a new export names the trace.
    let before = exports_naming(&exports, &trace_bytes);
    let read = get_operation(&gw.base, &id).await;
    assert_eq!(read.status(), 200);
    eventually("read span linked", Duration::from_secs(10), || async {
        (exports_naming(&exports, &trace_bytes) > before).then_some(())
    })
    .await;

    // JSON logs of the submission carry its request, operation and trace ids.
    let logs = gw.logs();
    assert!(
        logs.iter().any(|line| {
            log_field(line, "request_id").as_deref() == Some("req-trace-1")
                && log_field(line, "trace_id").as_deref() == Some(TRACE)
                && log_field(line, "operation_id").as_deref() == Some(id.as_str())
        }),
        "no log line with request_id, trace_id and operation_id:\n{}",
        logs.join("\n")
    );
}
