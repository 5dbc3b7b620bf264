//! The gateway's core loop against a real nats-server: idempotent accept, 202 + status resource,
//! correlated results, and the faults the issue names (gateway crash after publish, NATS down,
//! worker crash before reply, conflicting replies, deadlines).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway::operations::idempotency::key_token;
use gateway_tests::*;
use handlers::contract::{
    DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM, DEFAULT_RESULTS_STREAM, ResultRecord,
    Subjects, WireContract,
};
use handlers::jetstream::{ResultWrite, last_on_subject, publish_result};
use handlers::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");
const HANGING_WORKER_BIN: &str = env!("CARGO_BIN_EXE_hanging-worker");

async fn post_order(base: &str, key: &str, body: &str) -> reqwest::Response {
    submit(base, "/orders", key)
        .json_body(body.to_owned())
        .send()
        .await
}

/// The request message stored for a key on `orders`.
async fn stored_order(
    nats: &Nats,
    key: &str,
) -> Option<async_nats::jetstream::message::StreamMessage> {
    let subject = Subjects::default().request("orders", &key_token("default", "orders", key));
    last_on_subject(&nats.client().await, DEFAULT_REQUESTS_STREAM, &subject)
        .await
        .unwrap()
}

/// Happy path: 202 with the documented headers and body; the status resource exists at once and
/// stays pending with no worker; the worker's reply is replayed byte for byte with its status code,
/// content type and allow-listed headers; repeated reads are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_is_accepted_polled_and_its_result_replayed() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let http = http();

    let r = http
        .post(gw.url("/orders?tier=gold"))
        .header("content-type", "application/json")
        .header("accept-language", "de")
        .header("idempotency-key", "\"k-happy\"")
        .body(r#"{"sku":"tea"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = location(&r);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["idempotency-key"], "\"k-happy\"");
    assert!(r.headers().get("idempotent-replayed").is_none());
    let body = json(r).await;
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(loc, format!("/operations/{id}"));
    assert_eq!(body["status"], "pending");
    assert_eq!(body["idempotency_key"], "k-happy");
    assert_eq!(body["links"]["self"], loc);
    assert_eq!(body["links"]["result"], format!("{loc}/result"));

    // Visible at once (no 404 window), pending while no worker runs.
    let r = http.get(gw.url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["retry-after"], "1");
    let status = json(r).await;
    assert_eq!(status["status"], "pending");
    assert_eq!(status["route"], "orders");
    assert!(status.get("result").is_none());
    let r = http
        .get(gw.url(&format!("{loc}/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(location(&r), loc);
    assert!(r.headers().contains_key("retry-after"));

    let reply_body = Bytes::from_static(&[0, 159, 146, 150, b'\n', 255]);
    let seen: Arc<Mutex<Option<Request>>> = Arc::default();
    let (seen_in, reply) = (seen.clone(), reply_body.clone());
    let worker = TestWorker::start(&nats, worker_config(), "orders", move |r: Request| {
        let (seen, reply) = (seen_in.clone(), reply.clone());
        async move {
            *seen.lock().unwrap() = Some(r);
            Ok(Response {
                status: 201,
                content_type: Some("application/octet-stream".into()),
                headers: vec![
                    ("ETag".into(), "\"v1\"".into()),
                    ("X-Internal".into(), "secret".into()),
                ],
                body: reply,
                body_object: None,
            })
        }
    })
    .await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(10)).await;
    assert_monotonic(&statuses);
    assert_eq!(statuses.last().unwrap(), "succeeded");

    let delivered = seen.lock().unwrap().clone().expect("handler ran");
    assert_eq!(delivered.operation_id, id);
    assert_eq!(
        (delivered.method.as_str(), delivered.path.as_str()),
        ("POST", "/orders")
    );
    assert_eq!(delivered.query.as_deref(), Some("tier=gold"));
    assert_eq!(delivered.content_type.as_deref(), Some("application/json"));
    assert_eq!(&delivered.body[..], br#"{"sku":"tea"}"#);
    assert_eq!(
        handlers::contract::header_str(&delivered.headers, "accept-language"),
        Some("de")
    );

    let mut replays = Vec::new();
    for _ in 0..20 {
        let r = http
            .get(gw.url(&format!("{loc}/result")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
        assert_eq!(r.headers()["etag"], "\"v1\"");
        assert!(
            r.headers().get("x-internal").is_none(),
            "not on the result allow-list"
        );
        replays.push(r.bytes().await.unwrap());
    }
    assert!(
        replays.iter().all(|b| *b == reply_body),
        "replayed byte for byte, every time"
    );

    let status = json(http.get(gw.url(&loc)).send().await.unwrap()).await;
    assert_eq!(status["status"], "succeeded");
    assert_eq!(status["result"]["status_code"], 201);
    assert_eq!(status["result"]["content_type"], "application/octet-stream");
    assert_eq!(worker.stats().replied, 1);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );
}

/// A retry with the same key, after completion and after JetStream's duplicate window (1 s) has
/// passed, replays the same operation and writes no second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_replays_after_completion_and_after_the_duplicate_window() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES)
        .flags(["--duplicate-window", "1s"])
        .start()
        .await;
    let js = nats.jetstream().await;
    let stream = js.get_stream(DEFAULT_REQUESTS_STREAM).await.unwrap();
    assert_eq!(
        stream.cached_info().config.duplicate_window,
        Duration::from_secs(1)
    );
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo().json()).await;

    let first = post_order(&gw.base, "k-dup", "{}").await;
    assert_eq!(first.status(), 202);
    let loc = location(&first);
    let id = id_of(first).await;
    poll_until_terminal(&gw.base, &id, Duration::from_secs(10)).await;

    let again = post_order(&gw.base, "k-dup", "{}").await;
    assert_eq!(again.status(), 202);
    assert_eq!(location(&again), loc);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(json(again).await["status"], "succeeded");

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let late = post_order(&gw.base, "k-dup", "{}").await;
    assert_eq!(late.status(), 202);
    assert_eq!(location(&late), loc);
    assert_eq!(late.headers()["idempotent-replayed"], "true");
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 1);
    assert_eq!(stream_messages(&js, DEFAULT_OUTCOMES_STREAM).await, 1);
}

/// Same key, different body: 422 problem naming the first operation; only the first request is
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_with_another_body_is_422_and_nothing_is_written() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;

    let first = post_order(&gw.base, "k-422", r#"{"qty":1}"#).await;
    let id = id_of(first).await;

    let second = post_order(&gw.base, "k-422", r#"{"qty":2}"#).await;
    let problem = assert_problem(second, 422, "idempotency-key-reused").await;
    assert_eq!(problem["status"], 422);
    assert_eq!(problem["operation_id"], id);

    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );
    let stored = stored_order(&nats, "k-422").await.unwrap();
    assert_eq!(&stored.payload[..], br#"{"qty":1}"#);
}

/// 50 concurrent requests with one key, spread over two gateway processes: one message, one
/// creator, 49 replays, 50 identical Locations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_same_key_over_two_processes_writes_one_message() {
    let nats = Nats::start().await;
    let gateway = || TestGateway::builder(TEST_ROUTES).nats(&nats);
    let a = gateway().spawn(GATEWAY_BIN).await;
    let b = gateway().spawn(GATEWAY_BIN).await;

    let requests = (0..50).map(|i| {
        let base = if i % 2 == 0 {
            a.base.clone()
        } else {
            b.base.clone()
        };
        async move { post_order(&base, "k-race", r#"{"sku":"race"}"#).await }
    });
    let responses = futures::future::join_all(requests).await;
    let mut locations = HashSet::new();
    let mut replays = 0;
    for r in &responses {
        assert_eq!(r.status(), 202);
        locations.insert(location(r));
        replays += usize::from(r.headers().get("idempotent-replayed").is_some());
    }
    assert_eq!(locations.len(), 1, "one Location for all: {locations:?}");
    assert_eq!(replays, 49, "exactly one request created the operation");
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );
}

/// The gateway process dies after JetStream acked the request and before it answered. The client
/// sees no answer, retries with the same key on another gateway, and gets the operation the dead
/// gateway created: one message, same id, status not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_publish_and_answer_converges_on_retry() {
    let TestGateway {
        nats,
        gw: mut doomed,
    } = TestGateway::builder(TEST_ROUTES)
        .env("GATEWAY_FAULT_ABORT_AFTER_PUBLISH", "true")
        .spawn(GATEWAY_BIN)
        .await;
    let attempt = http()
        .post(doomed.url("/orders"))
        .header("idempotency-key", "\"k-crash\"")
        .body("{}")
        .send()
        .await;
    assert!(attempt.is_err(), "the client got no answer: {attempt:?}");
    assert!(doomed.wait_crashed().await, "the gateway process crashed");

    let stored = stored_order(&nats, "k-crash")
        .await
        .expect("the publish landed");
    let stored_id = handlers::contract::header_str(&stored.headers, "Gw-Operation-Id")
        .unwrap()
        .to_owned();

    let survivor = TestGateway::builder(TEST_ROUTES)
        .nats(&nats)
        .spawn(GATEWAY_BIN)
        .await;
    let retry = submit(&survivor.base, "/orders", "k-crash")
        .body("{}")
        .send()
        .await;
    assert_eq!(retry.status(), 202);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(location(&retry), format!("/operations/{stored_id}"));
    assert_eq!(json(retry).await["status"], "pending");
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );
}

/// NATS down: 503 with Retry-After and an "outcome unknown, retry" problem; readiness fails,
/// liveness does not. NATS back: the same retry succeeds, and there is one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_answers_503_and_the_retry_converges() {
    let TestGateway { mut nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    nats.kill().await;

    let r = post_order(&gw.base, "k-outage", r#"{"n":1}"#).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem = json(r).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("same Idempotency-Key")
    );
    let http = http();
    assert_eq!(
        http.get(gw.url("/readyz")).send().await.unwrap().status(),
        503
    );
    assert_eq!(
        http.get(gw.url("/livez")).send().await.unwrap().status(),
        200
    );

    nats.restart().await;
    let loc = eventually(
        "retry accepted after NATS is back",
        Duration::from_secs(20),
        || async {
            let r = post_order(&gw.base, "k-outage", r#"{"n":1}"#).await;
            (r.status() == 202).then(|| location(&r))
        },
    )
    .await;
    let again = post_order(&gw.base, "k-outage", r#"{"n":1}"#).await;
    assert_eq!(again.status(), 202);
    assert_eq!(location(&again), loc);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );
}

/// After nats-server is killed and restarted, a waiting client is woken by its result as soon as
/// the gateway says it is ready and the worker is back, not when its 30 s wait ends (before, the
/// results watch's consumer was gone until missed heartbeats told it, while `/readyz` already
/// said 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_right_after_a_nats_restart() {
    let routes =
        "[[route]]\nname = \"orders\"\nmethod = \"POST\"\npath = \"/orders\"\nwait = \"30s\"\n";
    let TestGateway { mut nats, gw } = TestGateway::builder(routes).start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    let first = post_order(&gw.base, "before", "{}").await;
    assert_eq!(first.status(), 200, "a sync answer while all is well");

    nats.restart().await;
    let http = http();
    eventually("ready again", Duration::from_secs(20), || async {
        let ready = http.get(gw.url("/readyz")).send().await.ok()?;
        (ready.status() == 200).then_some(())
    })
    .await;
    // The worker reconnects on its own: once a plain submit is answered, it is back.
    let warm_up = id_of(post_order_async(&gw.base, "warm-up").await).await;
    eventually("the worker is back", Duration::from_secs(30), || async {
        let op = json(get_operation(&gw.base, &warm_up).await).await;
        (op["status"] == "succeeded").then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let after = post_order(&gw.base, "after", "{}").await;
    let waited = started.elapsed();
    assert_eq!(after.status(), 200);
    eprintln!("the first sync answer after the restart took {waited:?}");
    // Not a speed target: a waiter that is not woken answers only when its 30 s wait ends.
    assert!(
        waited < Duration::from_secs(20),
        "woken by the result: {waited:?}"
    );
}

/// A submit that asks not to wait (`Prefer: wait=0`), whatever the route's own wait.
async fn post_order_async(base: &str, key: &str) -> reqwest::Response {
    submit(base, "/orders", key)
        .json_body("{}")
        .header("prefer", "wait=0")
        .send()
        .await
}

/// Small things real clients trip on: a replayed `202` of a finished operation says nothing about
/// retrying later (before: `Retry-After`); `GET /operations/{id}?wait=N` waits like `Prefer: wait`
/// (before: ignored); a cancellation's `202` is never cached (before: no `Cache-Control`); a bad
/// `?wait=` is explained in the gateway's words (before: the deserializer's text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_things_clients_trip_on_are_answered_plainly() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let http = http();

    // A finished operation's replay: 202 (no wait asked), no Retry-After.
    let worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    let done = id_of(post_order(&gw.base, "finished", "{}").await).await;
    poll_until_terminal(&gw.base, &done, Duration::from_secs(10)).await;
    let replay = post_order(&gw.base, "finished", "{}").await;
    assert_eq!(replay.status(), 202);
    assert!(
        !replay.headers().contains_key("retry-after"),
        "{:?}",
        replay.headers()
    );
    worker.stop().await;

    // ?wait on the status resource waits (the operation stays pending: no worker now).
    let pending = id_of(post_order(&gw.base, "pending", "{}").await).await;
    let started = std::time::Instant::now();
    let read = http
        .get(gw.url(&format!("/operations/{pending}?wait=2")))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited");

    let cancel = http
        .delete(gw.url(&format!("/operations/{pending}")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    assert_eq!(cancel.headers()["cache-control"], "no-store");

    for bad in ["-1", "soon", "3601"] {
        let r = http
            .get(gw.url(&format!("/operations/{pending}/result?wait={bad}")))
            .send()
            .await
            .unwrap();
        let problem = assert_problem(r, 400, "bad-query").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("whole number of seconds"),
            "{bad}: {detail}"
        );
    }
}

/// A full requests stream (its `max_bytes`, discard new) refuses new requests: the submit is
/// `507 insufficient-storage` with `Retry-After` and the key, nothing is stored, and the same
/// request keeps getting that answer, not a `202` and not "outcome unknown". (Before, the server's
/// "stream store failed" code, shared with per-subject discard, was read as "the key is taken",
/// and the submit ended `503 outcome-unknown` after reading back nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_answers_507_and_stores_nothing() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES)
        .flags(["--stream-max-bytes", "8192"])
        .start()
        .await;
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(1000));
    let mut stored = 0;
    let refused = loop {
        let r = post_order(&gw.base, &format!("fill-{stored}"), &body).await;
        if r.status() != 202 {
            break r;
        }
        stored += 1;
        assert!(
            stored < 20,
            "an 8 KiB stream takes fewer than 20 requests of 1 KiB"
        );
    };
    assert_refused_for_room(&gw.base, refused, &format!("fill-{stored}"), &body).await;
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        stored as u64,
        "nothing stored for the refused requests"
    );
}

/// A refusal for lack of room: `507 insufficient-storage` with `Retry-After` and the key, and
/// the same request refused the same way again.
async fn assert_refused_for_room(base: &str, refused: reqwest::Response, key: &str, body: &str) {
    assert!(refused.headers().contains_key("retry-after"));
    assert!(refused.headers().contains_key("idempotency-key"));
    assert_problem(refused, 507, "insufficient-storage").await;
    let again = post_order(base, key, body).await;
    assert_problem(again, 507, "insufficient-storage").await;
}

/// The server's own store full (its `max_file_store`, filled here by another stream, as any
/// writer of the account could): a submit is `507 insufficient-storage`, not "outcome unknown",
/// and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_store_answers_507_and_stores_nothing() {
    let nats = Nats::start_with_config("jetstream { max_file_store: 1MB }").await;
    let gw = TestGateway::builder(TEST_ROUTES).nats(&nats).start().await;
    let js = nats.jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "FILL".into(),
        subjects: vec!["fill.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let chunk = bytes::Bytes::from(vec![b'x'; 60 * 1024]);
    let mut filled = 0;
    while let Ok(ack) = js.publish(format!("fill.{filled}"), chunk.clone()).await {
        if ack.await.is_err() {
            break;
        }
        filled += 1;
        assert!(
            filled < 100,
            "a 1 MB store takes fewer than 100 chunks of 60 KiB"
        );
    }
    let refused = post_order(&gw.base, "no-room", "{}").await;
    assert_refused_for_room(&gw.base, refused, "no-room", "{}").await;
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 0);
}

/// JetStream stores the request but its ack does not come in time (the server is frozen with
/// SIGSTOP for longer than the gateway's NATS timeout): 503 "outcome unknown". Once the server
/// thaws, the retry with the same key finds the stored request: a replay, one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_timeout_answers_503_and_the_retry_finds_the_stored_request() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;

    nats.pause();
    let r = post_order(&gw.base, "k-slow-ack", r#"{"n":2}"#).await;
    nats.resume();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let problem = json(r).await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("outcome-unknown"),
        "{problem}"
    );

    let stored = eventually(
        "the frozen publish is stored after the thaw",
        Duration::from_secs(10),
        || async { stored_order(&nats, "k-slow-ack").await },
    )
    .await;
    let stored_id = handlers::contract::header_str(&stored.headers, "Gw-Operation-Id")
        .unwrap()
        .to_owned();
    let retry = post_order(&gw.base, "k-slow-ack", r#"{"n":2}"#).await;
    assert_eq!(retry.status(), 202);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(location(&retry), format!("/operations/{stored_id}"));
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );
}

/// A client that sends no key learns the one the gateway assigned from every answer, the 503 of
/// an unconfirmed write included, so its retry converges on one message instead of leaving the
/// first as a ghost nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_request_learns_its_key_even_from_a_503_and_converges() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let http = http();
    let keyless = || {
        http.post(gw.url("/orders"))
            .header("content-type", "application/json")
            .body(r#"{"n":3}"#)
            .send()
    };

    nats.pause();
    let r = keyless().await.unwrap();
    nats.resume();
    assert_eq!(r.status(), 503);
    let key = r
        .headers()
        .get("idempotency-key")
        .expect("the assigned key comes with the 503")
        .to_str()
        .unwrap()
        .to_owned();
    assert_problem(r, 503, "outcome-unknown").await;

    let retry = eventually(
        "the retry with the assigned key",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let key = key.clone();
            let url = gw.url("/orders");
            async move {
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", key)
                    .body(r#"{"n":3}"#)
                    .send()
                    .await
                    .unwrap();
                (r.status() == 202).then_some(r)
            }
        },
    )
    .await;
    assert_eq!(retry.headers()["idempotency-key"].to_str().unwrap(), key);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1,
        "the retry found the frozen write, or made the only one"
    );

    // Errors after the key is known carry it too; errors about the key itself cannot.
    let too_large = http
        .post(gw.url("/orders"))
        .body(vec![b'x'; 65 * 1024])
        .send()
        .await
        .unwrap();
    assert!(too_large.headers().contains_key("idempotency-key"));
    assert_problem(too_large, 413, "payload-too-large").await;
    let bad_key = http
        .post(gw.url("/orders"))
        .header("idempotency-key", "\"unterminated")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(!bad_key.headers().contains_key("idempotency-key"));
    assert_problem(bad_key, 400, "idempotency-key-invalid").await;
}

/// A bare UUID is a key as sent, whichever character it starts with (five in eight random UUIDs
/// start with a digit, which RFC 8941 alone reads as a number: before, 400), and it is the same key
/// as its sf-string form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_uuid_key_is_accepted_and_is_its_quoted_form() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let http = http();
    let post = |key: &'static str| {
        http.post(gw.url("/orders"))
            .header("idempotency-key", key)
            .body("{}")
            .send()
    };
    let first = post("8e03978e-40d5-43e8-bc93-6894a57f9324").await.unwrap();
    assert_eq!(first.status(), 202);
    let id = id_of(first).await;
    let quoted = post("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"")
        .await
        .unwrap();
    assert_eq!(quoted.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(quoted).await, id);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );
}

/// The client's `Callback-Url` is part of the request the key is bound to: a retry that adds one
/// is refused (422) rather than silently replayed without ever notifying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_adds_a_callback_url_is_another_request() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES)
        .flags([
            "--callback-allow",
            "http://127.0.0.1:9/",
            "--callback-allow-private",
        ])
        .flags(["--webhook-secret", "s3cret"])
        .start()
        .await;
    let first = post_order(&gw.base, "k-cb", r#"{"n":1}"#).await;
    let id = id_of(first).await;
    let with_callback = submit(&gw.base, "/orders", "k-cb")
        .json_body(r#"{"n":1}"#)
        .header("callback-url", "http://127.0.0.1:9/hook")
        .send()
        .await;
    let problem = assert_problem(with_callback, 422, "idempotency-key-reused").await;
    assert_eq!(problem["operation_id"], id);
    let again = post_order(&gw.base, "k-cb", r#"{"n":1}"#).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        1
    );

    // An operation an older replica accepted, before callback URLs were fingerprinted: its retry
    // with the same callback URL is still a replay (a rolling upgrade makes no 422s).
    let with_callback = || {
        submit(&gw.base, "/orders", "k-older")
            .json_body(r#"{"n":2}"#)
            .header("callback-url", "http://127.0.0.1:9/hook")
            .send()
    };
    let id = id_of(with_callback().await).await;
    let stored = stored_order(&nats, "k-older").await.unwrap();
    let mut headers = stored.headers.clone();
    let older = gateway::operations::idempotency::RequestIdentity {
        method: "POST",
        path: "/orders",
        query: None,
        content_type: Some("application/json"),
        body: br#"{"n":2}"#,
        body_digest: None,
        callback_url: None,
        start: None,
    }
    .fingerprint();
    headers.insert("Gw-Fingerprint", older.as_str());
    let js = nats.jetstream().await;
    js.get_stream(DEFAULT_REQUESTS_STREAM)
        .await
        .unwrap()
        .purge()
        .filter(stored.subject.as_str())
        .await
        .unwrap();
    js.publish_with_headers(stored.subject.clone(), headers, stored.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let retry = with_callback().await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(retry).await, id);
}

/// A replica serving direct gets can lag: it still answers with a key's old request after the key
/// was reused. The reader must not trust that hit (the new operation would 404 right after its
/// 202). The stale replica here is real: a mirror that serves direct gets for the requests stream
/// (`mirror_direct`) and stopped taking messages (full, discard new) after the old request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_hit_after_key_reuse_is_checked_with_the_leader() {
    let routes = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
retention = "4s"
timeout = "1s"
"#;
    // No skew allowance: the old operation is gone the moment its retention ends.
    let TestGateway { nats, gw } = TestGateway::builder(routes)
        .flags(["--expiry-grace", "0s"])
        .start()
        .await;
    let old = id_of(post_order(&gw.base, "k-reused", "{}").await).await;
    nats.jetstream()
        .await
        .create_stream(async_nats::jetstream::stream::Config {
            name: "STALE_REQUESTS".to_owned(),
            mirror: Some(async_nats::jetstream::stream::Source {
                name: DEFAULT_REQUESTS_STREAM.to_owned(),
                ..Default::default()
            }),
            mirror_direct: true,
            allow_direct: true,
            max_messages: 1,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually(
        "the mirror holds the old request",
        Duration::from_secs(10),
        || async {
            let mut info = nats
                .jetstream()
                .await
                .get_stream("STALE_REQUESTS")
                .await
                .unwrap();
            (info.info().await.unwrap().state.messages == 1).then_some(())
        },
    )
    .await;

    let new = eventually(
        "the key is reusable after retention",
        Duration::from_secs(15),
        || async {
            let r = post_order(&gw.base, "k-reused", "{}").await;
            (r.headers().get("idempotent-replayed").is_none() && r.status() == 202).then_some(r)
        },
    )
    .await;
    let new = id_of(new).await;
    let accepted = std::time::Instant::now();
    assert_ne!(new, old);
    // About one direct get in three is answered by the stale mirror. The new operation is
    // always found, and the old one is gone, whichever replica answers. (Read well within the
    // new operation's own retention, however slowly a loaded machine runs the loop.)
    let mut reads = 0;
    while reads < 30 && accepted.elapsed() < Duration::from_secs(2) {
        reads += 1;
        let read = get_operation(&gw.base, &new).await;
        assert_eq!(read.status(), 200);
        assert_eq!(json(read).await["id"], new.as_str());
        assert_problem(
            get_operation(&gw.base, &old).await,
            404,
            "operation-not-found",
        )
        .await;
    }
    assert!(reads >= 5, "only {reads} reads in 2 s");
}

const SHORT_DEADLINE_ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
retention = "1h"
timeout = "2s"
"#;

/// Under contract 2 no writer can remove a result before its request: the outcomes stream refuses
/// a reply with a `Nats-TTL` (a careless or foreign worker's shorter one) and a `Nats-Rollup`
/// (which would purge the slots of every route), so the operation keeps waiting for a proper
/// reply, which then stands past the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writer_can_remove_a_result_before_its_request() {
    let TestGateway { nats, gw } = TestGateway::builder(SHORT_DEADLINE_ROUTES).start().await;
    let js = nats.jetstream().await;
    let first = id_of(post_order(&gw.base, "k-rolled-up", "{}").await).await;
    let id = id_of(post_order(&gw.base, "k-short-ttl", "{}").await).await;
    let first_slot = Subjects::default().slots("orders", &first).reply_subject;
    let done = ResultRecord::reply(200, Some("text/plain".into()), Bytes::from_static(b"done"));
    let stored = publish_result(
        &js,
        DEFAULT_OUTCOMES_STREAM,
        &first_slot,
        &first,
        &done,
        None,
    )
    .await
    .unwrap();
    assert_eq!(stored, ResultWrite::Stored);

    let subject = Subjects::default().slots("orders", &id).reply_subject;
    let careless_ttl = Some(Duration::from_secs(1));
    let refused = publish_result(
        &js,
        DEFAULT_OUTCOMES_STREAM,
        &subject,
        &id,
        &done,
        careless_ttl,
    )
    .await
    .expect_err("a per-message TTL is refused");
    assert!(refused.to_string().contains("TTL"), "{refused}");
    let mut rollup = async_nats::HeaderMap::new();
    rollup.insert("Nats-Rollup", "all");
    rollup.insert("Gw-Status", "200");
    let rolled = js
        .publish_with_headers(subject.clone(), rollup, "purge".into())
        .await
        .unwrap()
        .await;
    assert!(rolled.is_err(), "a roll-up is refused: {rolled:?}");
    assert_eq!(
        json(get_operation(&gw.base, &id).await).await["status"],
        "pending"
    );
    assert_eq!(
        json(get_operation(&gw.base, &first).await).await["status"],
        "succeeded"
    );

    let stored = publish_result(&js, DEFAULT_OUTCOMES_STREAM, &subject, &id, &done, None)
        .await
        .unwrap();
    assert_eq!(stored, ResultWrite::Stored);
    // Past the deadline: both results stand.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for op in [&first, &id] {
        assert_eq!(
            json(get_operation(&gw.base, op).await).await["status"],
            "succeeded"
        );
    }
    assert_eq!(stream_messages(&js, DEFAULT_OUTCOMES_STREAM).await, 2);
}

/// Contract 1's results stream cannot refuse a per-message TTL: a result that vanishes there
/// before its request (a foreign worker stored it with a shorter `Nats-TTL` than the request's
/// retention) never lets a read decide the operation anew: the slot keeps nats-server's delete
/// marker, reads say `410 result-removed`, and no `expired` record is ever written after
/// `succeeded` was seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_1_result_removed_before_its_request_is_gone_not_expired() {
    let TestGateway { nats, gw } = TestGateway::builder(SHORT_DEADLINE_ROUTES)
        .flags(["--wire-contract", "1"])
        .start()
        .await;
    let id = id_of(post_order(&gw.base, "k-short-ttl", "{}").await).await;
    let js = nats.jetstream().await;
    let subject = Subjects::default()
        .with_contract(WireContract::V1)
        .slots("orders", &id)
        .reply_subject;
    let reply = ResultRecord::reply(200, Some("text/plain".into()), Bytes::from_static(b"done"));
    let careless_ttl = Some(Duration::from_secs(1));
    let w = publish_result(
        &js,
        DEFAULT_RESULTS_STREAM,
        &subject,
        &id,
        &reply,
        careless_ttl,
    )
    .await
    .unwrap();
    assert_eq!(w, ResultWrite::Stored);
    assert_eq!(
        json(get_operation(&gw.base, &id).await).await["status"],
        "succeeded"
    );

    // Past the reply's TTL and the operation's deadline.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for _ in 0..3 {
        assert_problem(get_operation(&gw.base, &id).await, 410, "result-removed").await;
        assert_problem(get_result(&gw.base, &id).await, 410, "result-removed").await;
    }
    let slot = last_on_subject(&nats.client().await, DEFAULT_RESULTS_STREAM, &subject)
        .await
        .unwrap()
        .expect("the slot keeps a marker");
    assert!(
        slot.headers.get("Nats-Marker-Reason").is_some(),
        "nothing but the server's delete marker took the slot: {:?}",
        slot.headers
    );
    // A late worker cannot give the operation a second outcome either.
    let late = ResultRecord::reply(201, None, Bytes::from_static(b"again"));
    let w = publish_result(&js, DEFAULT_RESULTS_STREAM, &subject, &id, &late, None)
        .await
        .unwrap();
    assert_eq!(w, ResultWrite::AlreadyStored);
}

/// Two different replies for one operation: the first stays, the second is refused and counted as
/// a conflict; an identical repeat changes nothing; a careless raw publish is refused by the
/// stream itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_result_wins_and_a_conflicting_one_is_counted() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let js = nats.jetstream().await;

    // The handler plays two workers racing on one request: a rival reply lands first.
    let rival_js = js.clone();
    let worker = TestWorker::start(&nats, worker_config(), "orders", move |r: Request| {
        let js = rival_js.clone();
        async move {
            let rival =
                ResultRecord::reply(200, Some("text/plain".into()), Bytes::from_static(b"first"));
            let w = publish_result(
                &js,
                DEFAULT_OUTCOMES_STREAM,
                &r.reply_subject,
                &r.operation_id,
                &rival,
                None,
            )
            .await
            .unwrap();
            assert_eq!(w, ResultWrite::Stored);
            Ok(Response::text(200, "second"))
        }
    })
    .await;
    let r = post_order(&gw.base, "k-conflict", "{}").await;
    let id = id_of(r).await;
    poll_until_terminal(&gw.base, &id, Duration::from_secs(10)).await;
    eventually("conflict counted", Duration::from_secs(5), || async {
        (worker.stats().conflicts == 1).then_some(())
    })
    .await;

    let result = get_result(&gw.base, &id).await;
    assert_eq!(result.text().await.unwrap(), "first");

    let subject = Subjects::default().slots("orders", &id).reply_subject;
    let same = ResultRecord::reply(200, Some("text/plain".into()), Bytes::from_static(b"first"));
    let w = publish_result(&js, DEFAULT_OUTCOMES_STREAM, &subject, &id, &same, None)
        .await
        .unwrap();
    assert_eq!(w, ResultWrite::AlreadyStored);

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Gw-Status", "500");
    let raw = js
        .publish_with_headers(subject, headers, "third".into())
        .await
        .unwrap()
        .await;
    assert!(
        raw.is_err(),
        "the results stream refuses a second message per subject"
    );

    let result = get_result(&gw.base, &id).await;
    assert_eq!(result.status(), 200);
    assert_eq!(result.text().await.unwrap(), "first");
    assert_eq!(stream_messages(&js, DEFAULT_OUTCOMES_STREAM).await, 1);
}

/// Every client error is a problem+json with the right status, and nothing is published for any of
/// them. A keyless request on a route that does not require a key gets an assigned key, which
/// makes its retry safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_get_problems_and_write_nothing() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let http = http();
    let too_big = vec![b'x'; 64 * 1024 + 1];

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http.post(gw.url("/orders")).body(too_big.clone()),
            413,
            "payload-too-large",
        ),
        // Within the route's 1 MiB, but with the gateway's headers over the server's max_payload.
        (
            http.post(gw.url("/jobs/build"))
                .header("idempotency-key", "\"big\"")
                .body(vec![b'x'; 1 << 20]),
            413,
            "payload-too-large",
        ),
        (
            http.post(gw.url("/jobs/build")).body("{}"),
            400,
            "idempotency-key-missing",
        ),
        (
            http.post(gw.url("/jobs/build"))
                .header("idempotency-key", "\"\""),
            400,
            "idempotency-key-invalid",
        ),
        (
            http.post(gw.url("/jobs/build"))
                .header("idempotency-key", "caf\u{e9}"),
            400,
            "idempotency-key-invalid",
        ),
        (
            http.post(gw.url("/jobs/build"))
                .header("idempotency-key", "\"unterminated"),
            400,
            "idempotency-key-invalid",
        ),
        (
            http.post(gw.url("/jobs/build"))
                .header("idempotency-key", quoted(&"k".repeat(256))),
            400,
            "idempotency-key-invalid",
        ),
        (
            http.post(gw.url("/jobs/build"))
                .header("idempotency-key", "\"a\"")
                .header("idempotency-key", "\"b\""),
            400,
            "idempotency-key-invalid",
        ),
        (http.post(gw.url("/nowhere")), 404, "not-found"),
        (http.get(gw.url("/orders")), 405, "method-not-allowed"),
        (
            http.get(gw.url("/operations/not-an-id")),
            404,
            "operation-not-found",
        ),
        (
            http.get(gw.url(&format!("/operations/{}", "a".repeat(39)))),
            404,
            "operation-not-found",
        ),
        (
            http.get(gw.url(&format!("/operations/{}/result", "a".repeat(39)))),
            404,
            "operation-not-found",
        ),
    ];
    for (request, status, slug) in cases {
        let problem = assert_problem(request.send().await.unwrap(), status, slug).await;
        assert_eq!(problem["status"], status);
        assert!(!problem["title"].as_str().unwrap().is_empty());
        assert!(!problem["detail"].as_str().unwrap().is_empty());
    }

    // Over the limit without a Content-Length (chunked): still 413, found while reading.
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut raw =
        format!("POST /orders HTTP/1.1\r\nhost: {addr}\r\ntransfer-encoding: chunked\r\n\r\n")
            .into_bytes();
    for chunk in too_big.chunks(8192) {
        raw.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend(chunk);
        raw.extend(b"\r\n");
    }
    raw.extend(b"0\r\n\r\n");
    tcp.write_all(&raw).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains('}') {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the answer was complete");
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    assert!(answer.contains("payload-too-large"), "{answer}");

    let js = nats.jetstream().await;
    assert_eq!(
        stream_messages(&js, DEFAULT_REQUESTS_STREAM).await,
        0,
        "nothing published"
    );

    let first = http
        .post(gw.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let assigned = first.headers()["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        assigned.starts_with('"') && assigned.len() == 38,
        "a quoted UUID: {assigned}"
    );
    let retry = http
        .post(gw.url("/orders"))
        .header("idempotency-key", &assigned)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(location(&retry), location(&first));
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 1);
}

/// A worker process is killed while handling a request. JetStream redelivers it after AckWait to
/// another worker; exactly one result is stored, and polls never go from terminal back to pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_before_replying_is_redelivered_and_answered_once() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;

    let mut doomed = tokio::process::Command::new(HANGING_WORKER_BIN)
        .args([nats.url(), "orders".to_owned()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let r = post_order(&gw.base, "k-worker-crash", r#"{"n":7}"#).await;
    let id = id_of(r).await;
    let mut lines = BufReader::new(doomed.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the worker picked the request up")
        .unwrap()
        .unwrap();
    assert_eq!(line, format!("handling {id}"));
    doomed.kill().await.unwrap();

    let mut statuses = Vec::new();
    for _ in 0..5 {
        let s = json(get_operation(&gw.base, &id).await).await;
        statuses.push(s["status"].as_str().unwrap().to_owned());
    }
    assert!(statuses.iter().all(|s| s == "pending"));

    let survivor = TestWorker::start(&nats, worker_config(), "orders", echo().json()).await;
    statuses.extend(poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await);
    for _ in 0..10 {
        let s = json(get_operation(&gw.base, &id).await).await;
        statuses.push(s["status"].as_str().unwrap().to_owned());
    }
    assert_monotonic(&statuses);
    assert_eq!(statuses.last().unwrap(), "succeeded");
    assert_eq!(survivor.stats().replied, 1);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_OUTCOMES_STREAM).await,
        1
    );
    let body = get_result(&gw.base, &id).await;
    assert_eq!(json(body).await["echo"], r#"{"n":7}"#);
}

/// No result before the route's timeout: the operation is `expired` on every replica, for good; a
/// late reply is refused, and a worker that picks the request up later skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_without_result_before_timeout_expires_for_good() {
    let nats = Nats::start().await;
    let gateway = || TestGateway::builder(TEST_ROUTES).nats(&nats);
    let (a, b) = (gateway().start().await, gateway().start().await);
    let http = http();

    let id = submit(&a.base, "/jobs/build", "k-expire").accepted().await;
    let op = format!("/operations/{id}");
    assert_eq!(
        json(http.get(b.url(&op)).send().await.unwrap()).await["status"],
        "pending"
    );

    tokio::time::sleep(Duration::from_millis(2300)).await;
    for gw in [&a, &b, &a, &b] {
        let s = json(http.get(gw.url(&op)).send().await.unwrap()).await;
        assert_eq!(s["status"], "expired");
        assert_eq!(s["result"]["status_code"], 504);
    }
    let result = http
        .get(b.url(&format!("{op}/result")))
        .send()
        .await
        .unwrap();
    assert_problem(result, 504, "expired").await;

    let js = nats.jetstream().await;
    let late = ResultRecord::reply(200, None, Bytes::from_static(b"too late"));
    let subject = Subjects::default().slots("jobs", &id).reply_subject;
    let w = publish_result(&js, DEFAULT_OUTCOMES_STREAM, &subject, &id, &late, None)
        .await
        .unwrap();
    assert!(matches!(w, ResultWrite::Conflict { ref existing } if existing.status == 504));

    let worker = TestWorker::start(&nats, worker_config(), "jobs", echo().json()).await;
    eventually(
        "late worker skips the expired request",
        Duration::from_secs(10),
        || async { (worker.stats().skipped == 1).then_some(()) },
    )
    .await;
    assert_eq!(worker.stats().replied, 0);
    assert_eq!(
        json(http.get(a.url(&op)).send().await.unwrap()).await["status"],
        "expired"
    );
}

/// With a skew allowance (`GATEWAY_EXPIRY_GRACE`), no replica expires an operation before its
/// deadline plus the allowance, so a replica whose clock runs that much ahead cannot end an
/// operation that another replica (or a worker) still sees as running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_waits_for_the_skew_allowance() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(TEST_ROUTES)
        .flag("--expiry-grace=2s")
        .start()
        .await;
    let id = submit(&gw.base, "/jobs/build", "k-grace").accepted().await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let status = json(get_operation(&gw.base, &id).await).await;
    assert_eq!(
        status["status"], "pending",
        "past the 2 s timeout, within the 2 s allowance"
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let status = json(get_operation(&gw.base, &id).await).await;
    assert_eq!(status["status"], "expired", "past deadline and allowance");
}

/// Reads of a terminal operation are byte-identical, the read that wrote the `expired` marker
/// included: every one reports the record with the stream's own timestamp, on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_terminal_operation_are_byte_identical() {
    let nats = Nats::start().await;
    let gateway = || TestGateway::builder(TEST_ROUTES).nats(&nats);
    let (a, b) = (gateway().start().await, gateway().start().await);
    let http = http();
    let id = submit(&a.base, "/jobs/build", "k-identical")
        .accepted()
        .await;
    let op = format!("/operations/{id}");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let mut bodies = Vec::new();
    for gw in [&a, &a, &b] {
        let r = http.get(gw.url(&op)).send().await.unwrap();
        bodies.push(r.text().await.unwrap());
    }
    assert!(bodies[0].contains(r#""status":"expired""#), "{}", bodies[0]);
    assert_eq!(
        bodies[0], bodies[1],
        "the read that wrote the marker, then the next"
    );
    assert_eq!(bodies[1], bodies[2], "the other replica");
}

/// A replica that starts with shorter retention (a canary, a rolling deploy) does not shorten
/// the streams under the others: a key accepted on a route kept for a day is still the same
/// operation after the newcomer's whole retention has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_shorter_retention_does_not_shrink_the_streams() {
    const SHORT: &str = "[[route]]\nname = \"brief\"\nmethod = \"POST\"\npath = \"/brief\"\nretention = \"2s\"\ntimeout = \"1s\"\n";
    let nats = Nats::start().await;
    let a = TestGateway::builder(TEST_ROUTES).nats(&nats).start().await;
    let id = submit(&a.base, "/orders", "k-kept")
        .body("{}")
        .accepted()
        .await;
    let _b = TestGateway::builder(SHORT).nats(&nats).start().await;
    let js = nats.jetstream().await;
    for stream in [
        DEFAULT_REQUESTS_STREAM,
        DEFAULT_RESULTS_STREAM,
        DEFAULT_OUTCOMES_STREAM,
    ] {
        let max_age = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .max_age;
        assert_eq!(max_age, Duration::from_secs(24 * 3600), "{stream}");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = http()
        .get(a.url(&format!("/operations/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        status.status(),
        200,
        "the operation outlives the other replica's retention"
    );
    let again = submit(&a.base, "/orders", "k-kept").body("{}").send().await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        id_of(again).await,
        id,
        "the key still names the same operation"
    );
}

/// A handler that panics, fails, or returns a status HTTP cannot replay does not end the route and
/// stores nothing; the request is redelivered with back-off until a valid reply is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handlers_are_retried_until_a_valid_reply_is_stored() {
    let TestGateway { nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = attempts.clone();
    let worker = TestWorker::start(&nats, worker_config(), "orders", move |_r: Request| {
        let attempt = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        async move {
            match attempt {
                1 => panic!("handler bug on the first delivery"),
                2 => Err("a transient failure".into()),
                3 => Ok(Response::new(600)),
                _ => Ok(Response::text(200, "finally")),
            }
        }
    })
    .await;
    let r = post_order(&gw.base, "k-flaky", "{}").await;
    let id = id_of(r).await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await;
    assert_monotonic(&statuses);
    assert_eq!(statuses.last().unwrap(), "succeeded");
    let result = get_result(&gw.base, &id).await;
    assert_eq!(result.text().await.unwrap(), "finally");
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert_eq!(worker.stats().handler_errors, 3);
    assert_eq!(worker.stats().replied, 1);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_OUTCOMES_STREAM).await,
        1
    );
}

/// NATS trims header values; a key with outer spaces still round-trips exactly, so retrying with the
/// key the gateway echoed finds the same operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_outer_spaces_round_trips_exactly() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let first = post_order(&gw.base, " padded key ", "{}").await;
    assert_eq!(first.headers()["idempotency-key"], "\" padded key \"");
    let echoed = first.headers()["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    let replay = http()
        .post(gw.url("/orders"))
        .header("content-type", "application/json")
        .header("idempotency-key", &echoed)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["idempotency-key"], "\" padded key \"");
    assert_eq!(location(&replay), location(&first));
    assert_eq!(json(replay).await["idempotency_key"], " padded key ");
}

/// With `GATEWAY_GROUP_COMMIT`, requests that arrive together are stored as one atomic batch, and
/// a batch the server refuses (one of its keys is taken) falls back to one publish each: every
/// request still gets its own answer. New keys are created once, a retry of a key taken through
/// another replica is a replay, another request on it is 422, two requests sharing a new key make
/// one operation, and each key holds one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_keeps_each_requests_fate_its_own() {
    let nats = Nats::start_with_config("jetstream { sync_interval: always }").await;
    let other = TestGateway::builder(TEST_ROUTES)
        .nats(&nats)
        .spawn(GATEWAY_BIN)
        .await;
    let gw = TestGateway::builder(TEST_ROUTES)
        .nats(&nats)
        .env("GATEWAY_GROUP_COMMIT", "true")
        .spawn(GATEWAY_BIN)
        .await;
    // Keys taken through the other replica: this one does not recall them, so it writes them
    // and the server refuses the batches they are in.
    const ROUNDS: usize = 5;
    let mut taken = Vec::new();
    for i in 0..ROUNDS * 10 {
        taken.push(
            id_of(post_order(&other.base, &format!("g-taken-{i}"), r#"{"qty":1}"#).await).await,
        );
    }
    let taken = &taken;

    // Rounds of 60 at once, so that requests meet in the batcher (how many do depends on
    // timing; `the_batcher_stores_what_meets_as_one_batch` shows both batch outcomes for sure).
    for round in 0..ROUNDS {
        let requests = (0..60).map(|i| {
            let base = gw.base.clone();
            async move {
                let (key, body) = match i % 6 {
                    0 => (format!("g-taken-{}", round * 10 + i / 6), r#"{"qty":1}"#),
                    1 => (format!("g-taken-{}", round * 10 + i / 6), r#"{"qty":2}"#),
                    2 => (format!("g-shared-{round}"), r#"{"qty":3}"#),
                    _ => (format!("g-new-{round}-{i}"), r#"{"qty":4}"#),
                };
                (i, post_order(&base, &key, body).await)
            }
        });
        let mut shared = (0, 0);
        for (i, answer) in futures::future::join_all(requests).await {
            let replayed = answer.headers().get("idempotent-replayed").is_some();
            let taken_id = &taken[round * 10 + i / 6];
            match i % 6 {
                0 => {
                    assert_eq!(answer.status(), 202);
                    assert!(replayed);
                    assert_eq!(&id_of(answer).await, taken_id);
                }
                1 => {
                    let problem = assert_problem(answer, 422, "idempotency-key-reused").await;
                    assert_eq!(&problem["operation_id"], taken_id);
                }
                2 => {
                    assert_eq!(answer.status(), 202);
                    if replayed {
                        shared.1 += 1;
                    } else {
                        shared.0 += 1;
                    }
                }
                _ => {
                    assert_eq!(answer.status(), 202);
                    assert!(!replayed, "a new key is created, not replayed");
                }
            }
        }
        assert_eq!(
            shared,
            (1, 9),
            "one request creates a shared key, the rest replay"
        );
    }
    // The taken keys, a shared key per round, and 30 new keys per round.
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        (ROUNDS * 10 + ROUNDS + ROUNDS * 30) as u64
    );
}

/// The batcher with `Grouping::AtomicBatches`, against a real server, its stores polled together
/// in one task so that all but the first (sent at once: nothing to gather it with) meet in one
/// gathering: a batch with a taken subject is refused and each store then gets its own answer;
/// a subject twice in a gathering is stored once; a message over the server's `max_payload` is
/// refused alone; a batch of new subjects is committed whole.
#[tokio::test]
async fn the_batcher_stores_what_meets_as_one_batch() {
    use async_nats::jetstream::stream;
    use handlers::jetstream::{Batcher, CreateOutcome, Grouping, create_if_absent};
    let metrics = gateway::metrics::handle();
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    js.create_stream(stream::Config {
        name: "G".into(),
        subjects: vec!["g.>".into()],
        allow_atomic_publish: true,
        allow_message_ttl: true,
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let batcher = Batcher::spawn(js.clone(), Grouping::AtomicBatches);
    let create = |subject: String| {
        let batcher = &batcher;
        async move {
            let ttl = Some(Duration::from_secs(60));
            let payload = Bytes::from_static(b"x");
            create_if_absent(batcher, subject, async_nats::HeaderMap::new(), payload, ttl)
                .await
                .unwrap()
        }
    };
    let count = |outcome: &str| {
        let line = format!("gateway_group_commits_total{{outcome=\"{outcome}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(|n| n.parse::<u64>().unwrap()))
            .unwrap_or(0)
    };
    assert_eq!(create("g.taken".into()).await, CreateOutcome::Created);

    let subjects: Vec<String> = (0..40)
        .map(|i| match i % 10 {
            1 => "g.taken".to_owned(),
            2 => "g.twice".to_owned(),
            _ => format!("g.new.{i}"),
        })
        .collect();
    // And one message too large for the server, in the same gathering: refused on its own.
    let too_large = create_if_absent(
        &batcher,
        "g.big".into(),
        async_nats::HeaderMap::new(),
        Bytes::from(vec![0u8; 1 << 20]),
        None,
    );
    let (outcomes, too_large) = tokio::join!(
        futures::future::join_all(subjects.iter().cloned().map(create)),
        too_large
    );
    assert!(
        matches!(&too_large, Err(handlers::jetstream::JetStreamError::Publish { kind, .. })
            if *kind == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded),
        "{too_large:?}"
    );
    assert_eq!(
        count("refused"),
        1,
        "the gathering's batch holds a taken subject"
    );
    let of = |wanted: &str| {
        subjects
            .iter()
            .zip(&outcomes)
            .filter(|(s, _)| *s == wanted)
            .map(|(_, o)| *o)
            .collect::<Vec<_>>()
    };
    assert_eq!(of("g.taken"), vec![CreateOutcome::AlreadyExists; 4]);
    let twice = of("g.twice");
    assert_eq!(
        twice
            .iter()
            .filter(|o| **o == CreateOutcome::Created)
            .count(),
        1,
        "{twice:?}"
    );
    for (subject, outcome) in subjects.iter().zip(&outcomes) {
        if subject.starts_with("g.new.") {
            assert_eq!(*outcome, CreateOutcome::Created, "{subject}");
        }
    }

    let fresh = (0..40).map(|i| create(format!("g.fresh.{i}")));
    let outcomes = futures::future::join_all(fresh).await;
    assert!(outcomes.iter().all(|o| *o == CreateOutcome::Created));
    assert_eq!(count("committed"), 1, "39 new subjects, one batch");
    let info = stream_messages(&js, "G").await;
    assert_eq!(info, 1 + 1 + 32 + 40);

    // An atomic batch with a message over max_payload is refused before anything is sent: a
    // definite refusal naming the message, where a half-sent batch would leave its commit's
    // fate to a timeout.
    let messages = vec![
        (
            "g.half.0".to_owned(),
            async_nats::HeaderMap::new(),
            Bytes::from_static(b"x"),
        ),
        (
            "g.half.1".to_owned(),
            async_nats::HeaderMap::new(),
            Bytes::from(vec![0u8; 1 << 20]),
        ),
    ];
    let refused = handlers::jetstream::publish_atomic_batch(&js.client(), "half", messages).await;
    assert!(
        matches!(&refused, Err(e @ handlers::jetstream::JetStreamError::BatchNotSent { index: 1, .. }) if e.is_too_large()),
        "{refused:?}"
    );
    let stored = stream_messages(&js, "G").await;
    assert_eq!(stored, info, "nothing of the refused batch is stored");
}
