//! Every way to learn a result, against a real nats-server: wait-or-202 on submit, long polls,
//! server-sent events with Last-Event-ID, and cancellation racing completion.

use std::sync::Arc;
use std::time::Duration;

use gateway_tests::*;
use handlers::{Request, Response};

const ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"

[[route]]
name = "sync"
method = "POST"
path = "/sync"
wait = "5s"

[[route]]
name = "slow"
method = "POST"
path = "/slow"

[[route]]
name = "backlog"
method = "POST"
path = "/backlog"
consumer = "test-backlog"
"#;

/// A submission whose body names its key: `{"key":"<key>"}`.
fn submit_keyed(base: &str, path: &str, key: &str) -> Submit {
    submit(base, path, key).body(format!("{{\"key\":\"{key}\"}}"))
}

/// `Prefer: respond-async, wait=N`: the result itself when the worker is fast (with
/// Preference-Applied and Location), the usual 202 when it is slow; a sync route does the same
/// without any header; a retry with the same key and `Prefer: wait` waits on the same operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_answers_with_the_result_when_fast_and_202_when_slow() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let _fast = TestWorker::start(&nats, worker_config(), "orders", echo().status(201)).await;

    let r = submit_keyed(&gw.base, "/orders", "w-fast")
        .header("prefer", "respond-async, wait=10")
        .send()
        .await;
    assert_eq!(r.status(), 201, "the worker's own status");
    assert_eq!(r.headers()["preference-applied"], "wait=10");
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/operations/")
    );
    assert_eq!(r.headers()["idempotency-key"], "\"w-fast\"");
    assert_eq!(r.text().await.unwrap(), r#"{"key":"w-fast"}"#);

    // The same key again with a wait: a replay, answered with the same result.
    let again = submit_keyed(&gw.base, "/orders", "w-fast")
        .header("prefer", "wait=10")
        .send()
        .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");

    // A sync route waits without being asked.
    let _sync_worker = TestWorker::start(&nats, worker_config(), "sync", echo().status(201)).await;
    let r = submit_keyed(&gw.base, "/sync", "w-sync").send().await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["preference-applied"], "wait=5");

    // A slow worker: the wait runs out, the answer is the usual 202.
    let _slow_worker = TestWorker::start(
        &nats,
        worker_config(),
        "slow",
        echo().delay(Duration::from_millis(2500)),
    )
    .await;
    let r = submit_keyed(&gw.base, "/slow", "w-slow")
        .header("prefer", "respond-async, wait=1")
        .send()
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["preference-applied"], "respond-async");
    let id = id_of(r).await;
    // Attaching again with a longer wait gets the result.
    let r = submit_keyed(&gw.base, "/slow", "w-slow")
        .header("prefer", "wait=10")
        .send()
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.headers()["location"], format!("/operations/{id}"));
}

/// Long polls return as soon as the state changes: `?wait=N` on the result and `Prefer: wait=N`
/// on the status; with nothing to report within N they answer as a plain read would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_return_when_the_result_lands() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let id = submit_keyed(&gw.base, "/orders", "lp").accepted().await;
    let http = http();

    let r = http
        .get(gw.url(&format!("/operations/{id}/result?wait=1")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "nothing within 1 s without a worker");

    let poll_result = tokio::spawn({
        let url = gw.url(&format!("/operations/{id}/result?wait=20"));
        async move { http.get(url).send().await.unwrap() }
    });
    let poll_status = tokio::spawn({
        let url = gw.url(&format!("/operations/{id}"));
        async move {
            reqwest::Client::new()
                .get(url)
                .header("prefer", "wait=20")
                .send()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo().status(201)).await;
    let result = poll_result.await.unwrap();
    assert_eq!(result.status(), 201);
    assert_eq!(result.text().await.unwrap(), r#"{"key":"lp"}"#);
    let status = poll_status.await.unwrap();
    assert_eq!(status.headers()["preference-applied"], "wait=20");
    assert_eq!(json(status).await["status"], "succeeded");

    let bad = reqwest::get(gw.url(&format!("/operations/{id}/result?wait=soon")))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
}

/// Reads server-sent events until the stream ends; returns (id, event, status) triples.
async fn read_events(response: reqwest::Response) -> Vec<(String, String, String)> {
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = tokio::time::timeout(Duration::from_secs(20), response.text())
        .await
        .expect("the stream ends after the terminal event")
        .unwrap();
    text.split("\n\n")
        .filter(|block| block.contains("data:"))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            let data: serde_json::Value = serde_json::from_str(&field("data:")).unwrap();
            (
                field("id:"),
                field("event:"),
                data["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// SSE: `accepted`, then the terminal state, then the end. A client that saw `accepted` and
/// reconnects with `Last-Event-ID: accepted` while the operation finishes gets exactly the
/// terminal event; one that saw everything gets nothing more. A per-process cap answers 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_every_transition_and_resume_after_last_event_id() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--max-event-streams", "2"])
        .start()
        .await;
    let id = submit_keyed(&gw.base, "/orders", "sse").accepted().await;
    let url = gw.url(&format!("/operations/{id}/events"));

    // First connection: read the `accepted` event, then drop the connection while pending.
    let mut first = http().get(&url).send().await.unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(5), first.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let chunk = String::from_utf8_lossy(&chunk).into_owned();
    assert!(
        chunk.contains("id: accepted") && chunk.contains("event: accepted"),
        "{chunk}"
    );
    drop(first);

    // The cap: two streams open, the third is refused.
    let hold_a = http().get(&url).send().await.unwrap();
    let hold_b = http().get(&url).send().await.unwrap();
    let refused = http().get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    drop((hold_a, hold_b));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Resume while still pending, then the worker finishes.
    let resumed = http()
        .get(&url)
        .header("last-event-id", "accepted")
        .send()
        .await
        .unwrap();
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo().status(201)).await;
    let events = read_events(resumed).await;
    assert_eq!(
        events,
        vec![("terminal".into(), "succeeded".into(), "succeeded".into())]
    );

    // A fresh client after the end gets the whole history at once; one that saw it all, nothing.
    let all = read_events(http().get(&url).send().await.unwrap()).await;
    let names: Vec<_> = all
        .iter()
        .map(|(id, ev, _)| (id.as_str(), ev.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![("accepted", "accepted"), ("terminal", "succeeded")]
    );
    // A client that saw the end is told there is nothing more: 204, so EventSource stops.
    let done = http()
        .get(&url)
        .header("last-event-id", "terminal")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 204);

    let unknown = http()
        .get(gw.url(&format!("/operations/{}/events", "a".repeat(39))))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

/// DELETE before any result: 202, `cancelled` everywhere, the result is a 410 problem, a repeat is
/// harmless; a worker that picks the request up afterwards skips it; a handler already running
/// sees the cancellation; after completion DELETE is a 409 that shows the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_before_a_result_wins_and_after_it_is_refused() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let http = http();

    let id = submit_keyed(&gw.base, "/orders", "c-queued")
        .accepted()
        .await;
    let op = gw.url(&format!("/operations/{id}"));
    let r = http.delete(&op).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(json(r).await["status"], "cancelled");
    assert_eq!(
        http.delete(&op).send().await.unwrap().status(),
        202,
        "DELETE repeats harmlessly"
    );
    assert_eq!(
        json(http.get(&op).send().await.unwrap()).await["status"],
        "cancelled"
    );
    let result = http.get(format!("{op}/result")).send().await.unwrap();
    assert_eq!(result.status(), 410);
    assert!(
        json(result).await["type"]
            .as_str()
            .unwrap()
            .ends_with("cancelled")
    );

    let worker = TestWorker::start(&nats, worker_config(), "orders", echo().status(201)).await;
    eventually(
        "the queued request is skipped",
        Duration::from_secs(10),
        || async { (worker.stats().skipped == 1).then_some(()) },
    )
    .await;
    assert_eq!(worker.stats().replied, 0);
    worker.stop().await;

    // A handler that is running when the cancellation lands observes it.
    let observed = Arc::new(tokio::sync::Notify::new());
    let seen = observed.clone();
    let running = TestWorker::start(&nats, worker_config(), "orders", move |r: Request| {
        let seen = seen.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), r.cancellation.cancelled())
                .await
                .map_err(|_| "never cancelled")?;
            seen.notify_one();
            Ok(Response::text(200, "finished anyway"))
        }
    })
    .await;
    let id = submit_keyed(&gw.base, "/orders", "c-running")
        .accepted()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = http
        .delete(gw.url(&format!("/operations/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::timeout(Duration::from_secs(10), observed.notified())
        .await
        .expect("handler saw it");
    eventually(
        "the late reply is dropped as cancelled",
        Duration::from_secs(10),
        || async { (running.stats().cancelled == 1).then_some(()) },
    )
    .await;
    running.stop().await;

    // After completion: 409 with the outcome.
    let _w = TestWorker::start(&nats, worker_config(), "orders", echo().status(201)).await;
    let r = submit_keyed(&gw.base, "/orders", "c-done")
        .header("prefer", "wait=10")
        .send()
        .await;
    let id = location(&r).trim_start_matches("/operations/").to_owned();
    let r = http
        .delete(gw.url(&format!("/operations/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem = json(r).await;
    assert_eq!(problem["operation"]["status"], "succeeded");
    assert_eq!(problem["operation"]["result"]["status_code"], 201);
}

/// Cancel racing completion, 200 times: exactly one of {cancelled, result} wins each time, the
/// DELETE's answer agrees with it, and two gateway processes report the same winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_completion_has_one_winner_seen_by_every_replica() {
    const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");
    let nats = Nats::start().await;
    let gateway = || TestGateway::builder(ROUTES).nats(&nats);
    let a = gateway().spawn(GATEWAY_BIN).await;
    let b = gateway().spawn(GATEWAY_BIN).await;
    // The worker takes 0-6 ms and the DELETE leaves 0-6 ms after the 202, so that both sides win
    // some races.
    let _worker = TestWorker::start(&nats, worker_config(), "slow", |r: Request| async move {
        let spread = r.operation_id.bytes().map(u64::from).sum::<u64>() % 13;
        tokio::time::sleep(Duration::from_micros(spread * 500)).await;
        Ok(Response::text(201, "done"))
    })
    .await;
    let http = http();
    let (mut cancelled, mut completed) = (0, 0);
    for i in 0..200u64 {
        let id = submit_keyed(&a.base, "/slow", &format!("race-{i}"))
            .accepted()
            .await;
        tokio::time::sleep(Duration::from_micros((i * 7 % 13) * 500)).await;
        let delete = http
            .delete(b.url(&format!("/operations/{id}")))
            .send()
            .await
            .unwrap();
        let winner = match delete.status().as_u16() {
            202 => "cancelled",
            409 => "succeeded",
            other => panic!("DELETE answered {other}"),
        };
        let mut seen = Vec::new();
        for gw in [&a, &b] {
            let s = json(
                http.get(gw.url(&format!("/operations/{id}")))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            seen.push(s["status"].as_str().unwrap().to_owned());
        }
        assert!(
            seen.iter().all(|s| s == winner),
            "race {i}: DELETE says {winner}, replicas say {seen:?}"
        );
        if winner == "cancelled" {
            cancelled += 1;
        } else {
            completed += 1;
        }
    }
    eprintln!("200 races: {cancelled} cancelled first, {completed} completed first");
    assert!(
        cancelled > 0 && completed > 0,
        "both sides must win some races to test the race"
    );
}

/// `Retry-After` of pending operations follows the route's backlog and completion rate, within
/// the configured maximum; a route with no workers' consumer gets the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_follows_the_backlog_within_bounds() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--retry-after-max-secs", "8"])
        .start()
        .await;
    // One slow worker: about three completions a second.
    let config = handlers::WorkerConfig {
        max_in_flight: 1,
        ..worker_config()
    };
    let _worker = TestWorker::start(
        &nats,
        config,
        "backlog",
        echo().delay(Duration::from_millis(300)),
    )
    .await;
    let mut last = String::new();
    for i in 0..40 {
        last = submit_keyed(&gw.base, "/backlog", &format!("b-{i}"))
            .accepted()
            .await;
    }
    let retry_after = |r: &reqwest::Response| -> u64 {
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let seconds = eventually(
        "an estimate from the backlog",
        Duration::from_secs(15),
        || async {
            let r = get_operation(&gw.base, &last).await;
            let s = retry_after(&r);
            (s > 1).then_some(s)
        },
    )
    .await;
    assert!(
        seconds <= 8,
        "bounded by GATEWAY_RETRY_AFTER_MAX: {seconds}"
    );

    // No worker has ever consumed `orders`: the configured default.
    let r = submit_keyed(&gw.base, "/orders", "b-default").send().await;
    assert_eq!(retry_after(&r), 1);
}

/// Reads the next complete server-sent event from a streaming response: (id, event, data).
async fn next_event(
    response: &mut reqwest::Response,
    buffer: &mut String,
) -> Option<(String, String, serde_json::Value)> {
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if !block.contains("data:") {
                continue; // a keep-alive comment
            }
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            let data = serde_json::from_str(&field("data:")).unwrap();
            return Some((field("id:"), field("event:"), data));
        }
        let chunk = tokio::time::timeout(Duration::from_secs(15), response.chunk())
            .await
            .ok()?
            .ok()??;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// A worker reports progress: the status resource shows it, a `Prefer: wait` long poll on the
/// status returns when it changes, SSE streams it as `progress-<seq>` events, and a reconnect with
/// the last progress id gets only newer reports, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_reach_the_status_long_polls_and_events() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let step = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = step.clone();
    let _worker = TestWorker::start(&nats, worker_config(), "orders", move |r: Request| {
        let gate = gate.clone();
        async move {
            r.progress.report(Some(25), "step 1").await?;
            gate.acquire().await?.forget();
            r.progress.report(Some(75), "step 2").await?;
            gate.acquire().await?.forget();
            Ok(Response::text(200, "all steps done"))
        }
    })
    .await;
    let id = submit_keyed(&gw.base, "/orders", "progress")
        .accepted()
        .await;
    let url = gw.url(&format!("/operations/{id}/events"));

    let mut events = http().get(&url).send().await.unwrap();
    let mut buffer = String::new();
    let (ev_id, name, _) = next_event(&mut events, &mut buffer).await.unwrap();
    assert_eq!((ev_id.as_str(), name.as_str()), ("accepted", "accepted"));
    let (first_progress, name, data) = next_event(&mut events, &mut buffer).await.unwrap();
    assert_eq!(name, "progress");
    assert!(first_progress.starts_with("progress-"), "{first_progress}");
    assert_eq!(data["progress"]["percent"], 25);
    assert_eq!(data["status"], "pending");
    drop(events);

    let status = json(get_operation(&gw.base, &id).await).await;
    assert_eq!(status["progress"]["message"], "step 1");

    // A long poll on the status returns when the progress changes.
    let poll = tokio::spawn({
        let url = gw.url(&format!("/operations/{id}"));
        async move {
            http()
                .get(url)
                .header("prefer", "wait=20")
                .send()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    step.add_permits(1);
    let changed = json(poll.await.unwrap()).await;
    assert_eq!(changed["status"], "pending");
    assert_eq!(changed["progress"]["percent"], 75);

    // Resume after the first progress event: only the newer report, then the end.
    let mut resumed = http()
        .get(&url)
        .header("last-event-id", &first_progress)
        .send()
        .await
        .unwrap();
    let mut buffer = String::new();
    let (second_progress, name, data) = next_event(&mut resumed, &mut buffer).await.unwrap();
    assert_eq!(name, "progress");
    assert_ne!(second_progress, first_progress);
    assert_eq!(data["progress"]["message"], "step 2");
    step.add_permits(1);
    let (ev_id, name, data) = next_event(&mut resumed, &mut buffer).await.unwrap();
    assert_eq!((ev_id.as_str(), name.as_str()), ("terminal", "succeeded"));
    assert!(
        data.get("progress").is_none(),
        "progress is shown while pending only"
    );
    assert!(
        next_event(&mut resumed, &mut buffer).await.is_none(),
        "the stream ends"
    );
}
