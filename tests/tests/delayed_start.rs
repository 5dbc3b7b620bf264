//! Delayed starts and start-by deadlines against a real nats-server: a request asked to start in
//! 5 s is `scheduled` until then and handled then, not before; one cancelled before it is due is
//! never handled; one that no worker took by its `Start-By` ends `expired` without running; and
//! every malformed or out-of-bounds ask is a 400 problem that writes nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::*;
use handlers::contract::DEFAULT_REQUESTS_STREAM;
use handlers::{Request, Response};

const ROUTES: &str = r#"
[[route]]
name = "jobs"
method = "POST"
path = "/jobs"
timeout = "30s"
max_delay = "1m"

[[route]]
name = "now"
method = "POST"
path = "/now"

[[route]]
name = "flaky"
method = "POST"
path = "/flaky"
retry = { attempts = 3, backoff = ["2s"] }
"#;

/// A worker on `jobs` that notes when each call came and answers at once.
async fn noting_worker(nats: &Nats, calls: &Arc<Mutex<Vec<Instant>>>) -> TestWorker {
    let calls = calls.clone();
    TestWorker::start(nats, worker_config(), "jobs", move |_r: Request| {
        calls.lock().unwrap().push(Instant::now());
        async { Ok(Response::text(200, "done")) }
    })
    .await
}

async fn status_of(gw: &InProcessGateway, id: &str) -> serde_json::Value {
    json(get_operation(&gw.base, id).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_start_is_scheduled_then_handled_when_due() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let _worker = noting_worker(&nats, &calls).await;
    let sent = Instant::now();
    let accepted = submit(&gw.base, "/jobs", "in-five")
        .header("delay", "5")
        .body("{}")
        .send()
        .await;
    // Nothing to see before it is due.
    let retry_after: u64 = accepted.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 5, "Retry-After: {retry_after}");
    let id = id_of(accepted).await;
    let status = status_of(&gw, &id).await;
    assert_eq!(status["status"], "scheduled", "{status}");
    assert!(status["not_before"].is_string(), "{status}");
    // The same request again is a replay of it; another delay under the key is another request.
    let again = submit(&gw.base, "/jobs", "in-five")
        .header("delay", "5")
        .body("{}")
        .accepted()
        .await;
    assert_eq!(again, id);
    let other = submit(&gw.base, "/jobs", "in-five")
        .header("delay", "7")
        .body("{}")
        .send()
        .await;
    assert_problem(other, 422, "idempotency-key-reused").await;

    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded");
    assert_monotonic(&statuses);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let started = calls[0] - sent;
    eprintln!("asked to start in 5 s: handled after {started:?}");
    assert!(
        started >= Duration::from_secs(5) && started <= Duration::from_millis(6500),
        "handled after {started:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_before_it_is_due_it_never_runs() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let worker = noting_worker(&nats, &calls).await;
    let id = submit(&gw.base, "/jobs", "cancel-me")
        .header("delay", "3")
        .body("{}")
        .accepted()
        .await;
    let cancel = http()
        .delete(format!("{}/operations/{id}", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    assert_eq!(status_of(&gw, &id).await["status"], "cancelled");
    eventually(
        "the due delivery is skipped",
        Duration::from_secs(10),
        || async { (worker.stats().skipped >= 1).then_some(()) },
    )
    .await;
    assert!(calls.lock().unwrap().is_empty(), "the handler ran");
    assert_eq!(status_of(&gw, &id).await["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_started_by_its_start_by_ends_expired_unrun() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let by = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let by = by
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let id = submit(&gw.base, "/jobs", "late")
        .header("start-by", &by)
        .body("{}")
        .accepted()
        .await;
    assert_eq!(status_of(&gw, &id).await["start_by"], by.as_str());
    // No worker until the start-by has passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let _worker = noting_worker(&nats, &calls).await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(10)).await;
    assert_eq!(statuses.last().unwrap(), "expired");
    assert_problem(get_result(&gw.base, &id).await, 504, "not-started").await;
    assert!(calls.lock().unwrap().is_empty(), "the handler ran");
}

/// A start-by binds the first attempt only: one that started in time and failed is retried past
/// it (it did run); and the same request sent again after its start-by is a replay, not a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_by_binds_the_first_attempt_and_never_a_replay() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = calls.clone();
    let _worker = TestWorker::start(&nats, worker_config(), "flaky", move |_r: Request| {
        let first = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        async move {
            if first {
                Err("not yet".into())
            } else {
                Ok(Response::text(200, "done"))
            }
        }
    })
    .await;
    let by = (time::OffsetDateTime::now_utc() + time::Duration::seconds(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let send = || {
        submit(&gw.base, "/flaky", "retried-late")
            .header("start-by", &by)
            .body("{}")
    };
    let id = send().accepted().await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let replay = send().send().await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(json(replay).await["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_start_asks_are_refused_and_write_nothing() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let soon = |secs: i64| {
        (time::OffsetDateTime::now_utc() + time::Duration::seconds(secs))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("/now", vec![("delay", "5".into())]),
        ("/jobs", vec![("delay", "61".into())]),
        ("/jobs", vec![("delay", "-1".into())]),
        ("/jobs", vec![("delay", "5s".into())]),
        (
            "/jobs",
            vec![("delay", "5".into()), ("not-before", soon(5))],
        ),
        ("/jobs", vec![("not-before", "tomorrow".into())]),
        ("/jobs", vec![("not-before", soon(120))]),
        ("/jobs", vec![("delay", "10".into()), ("start-by", soon(5))]),
        ("/jobs", vec![("start-by", soon(-5))]),
        ("/jobs", vec![("start-by", soon(45))]),
        ("/jobs", vec![("delay", "1".into()), ("delay", "2".into())]),
        // In UTC before the year 1.
        (
            "/jobs",
            vec![("not-before", "0000-01-01T00:00:00+23:59".into())],
        ),
    ];
    for (n, (path, headers)) in cases.into_iter().enumerate() {
        let mut request = submit(&gw.base, path, &format!("bad-{n}")).body("{}");
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        let refused = request.send().await;
        let problem = assert_problem(refused, 400, "invalid-start").await;
        eprintln!("{path} {headers:?}: {}", problem["detail"]);
    }
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        0
    );
}
