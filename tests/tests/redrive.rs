//! Failed operations and redrive against a real nats-server: failures are listed per route and
//! tenant with a cursor; a redrive is a new operation linked both ways while the failed one keeps
//! its status; repeating it is a replay; a bulk redrive needs a filter and goes a page at a time;
//! a stateful redrive of an operation that committed re-publishes its outbox and never changes
//! the state a second time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use gateway_tests::*;
use handlers::Response;
use handlers::contract::DEFAULT_REQUESTS_STREAM;

const ROUTES: &str = r#"
[[route]]
name = "flaky"
method = "POST"
path = "/flaky"

[[route]]
name = "count"
method = "POST"
path = "/count"

[[route]]
name = "idle"
method = "POST"
path = "/idle"

[[route]]
name = "brief"
method = "POST"
path = "/brief"
retention = "3s"
timeout = "1s"
"#;

const WAIT: Duration = Duration::from_secs(30);

/// Messages a stream holds.
async fn status_of(base: &str, id: &str) -> serde_json::Value {
    poll_until_terminal(base, id, WAIT).await;
    json(get_operation(base, id).await).await
}

/// The ids a list of failed operations shows, following its `next` links.
async fn failed_ids(base: &str, route: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut url = format!("{base}/operations?route={route}&status=failed&limit=2");
    loop {
        let page = json(http().get(&url).send().await.unwrap()).await;
        for op in page["operations"].as_array().unwrap() {
            assert_eq!(op["status"], "failed", "{op}");
            ids.push(op["id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => url = format!("{base}{next}"),
            None => return ids,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_operation_is_listed_and_redriven_once_linked_both_ways() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let broken = Arc::new(AtomicBool::new(true));
    let handler = {
        let broken = broken.clone();
        move |_request: handlers::Request| {
            let broken = broken.load(Ordering::SeqCst);
            async move {
                Ok(if broken {
                    Response::json(422, &serde_json::json!({"error": "upstream refused"}))
                } else {
                    Response::json(200, &serde_json::json!({"ok": true}))
                })
            }
        }
    };
    let _worker = TestWorker::start(&nats, worker_config(), "flaky", handler).await;
    let base = &gw.base;

    let id = submit(base, "/flaky", "k1")
        .json_body("{\"n\":1}")
        .accepted()
        .await;
    assert_eq!(status_of(base, &id).await["status"], "failed");
    eventually("the failure in the list", WAIT, || async {
        failed_ids(base, "flaky").await.contains(&id).then_some(())
    })
    .await;

    // Refused without writing: a bulk redrive without a filter, a client key in the gateway's
    // own space, a list without `status=failed`.
    let before = stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await;
    let r = http()
        .post(format!("{base}/operations/redrive"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_problem(r, 422, "filter-required").await;
    let r = submit(base, "/flaky", &format!("redrive:{id}"))
        .send()
        .await;
    assert_problem(r, 400, "idempotency-key-invalid").await;
    for query in [
        "route=flaky",
        "route=flaky&status=failed&route=idle",
        "route=nowhere&status=failed",
        "route=flaky&status=failed&limit=101",
    ] {
        let r = http()
            .get(format!("{base}/operations?{query}"))
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "bad-query").await;
    }
    let bulk = |content_type: &'static str, body: String| {
        http()
            .post(format!("{base}/operations/redrive"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    for (content_type, body, status, slug) in [
        (
            "text/plain",
            r#"{"route":"flaky"}"#.to_owned(),
            415,
            "unsupported-media-type",
        ),
        (
            "application/json",
            r#"["flaky",0,1]"#.to_owned(),
            400,
            "bad-filter",
        ),
        (
            "application/json",
            r#"{"route":"nowhere"}"#.to_owned(),
            400,
            "bad-filter",
        ),
        (
            "application/json",
            r#"{"route":"flaky","x":1}"#.to_owned(),
            400,
            "bad-filter",
        ),
        (
            "application/json",
            format!(r#"{{"route":"{}"}}"#, "a".repeat(5000)),
            413,
            "payload-too-large",
        ),
    ] {
        assert_problem(bulk(content_type, body).await.unwrap(), status, slug).await;
    }
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        before
    );

    // The redrive: a new operation, linked both ways; again, the same one.
    broken.store(false, Ordering::SeqCst);
    let redrive = || async {
        http()
            .post(format!("{base}/operations/{id}/redrive"))
            .send()
            .await
            .unwrap()
    };
    let first = redrive().await;
    assert!(first.headers().get("idempotent-replayed").is_none());
    let again_location = location(&first);
    let redriven = id_of(first).await;
    assert_ne!(redriven, id);
    assert_eq!(again_location, format!("/operations/{redriven}"));
    let again = redrive().await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        id_of(again).await,
        redriven,
        "a repeated redrive is a replay"
    );
    let new = status_of(base, &redriven).await;
    assert_eq!(new["status"], "succeeded");
    assert_eq!(new["redrive_of"], id.as_str());
    let old = json(get_operation(base, &id).await).await;
    assert_eq!(old["status"], "failed", "a status never goes back");
    assert_eq!(old["redriven_by"], redriven.as_str());
    // The original key still names the original operation.
    let r = submit(base, "/flaky", "k1")
        .json_body("{\"n\":1}")
        .send()
        .await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(r).await, id);
    // A succeeded operation is not redriven.
    let r = http()
        .post(format!("{base}/operations/{redriven}/redrive"))
        .send()
        .await
        .unwrap();
    assert_problem(r, 409, "not-redrivable").await;

    // In bulk, a page at a time: three more failures, redriven two and one.
    broken.store(true, Ordering::SeqCst);
    let mut failed = Vec::new();
    for i in 2..5 {
        let id = submit(base, "/flaky", &format!("k{i}")).accepted().await;
        assert_eq!(status_of(base, &id).await["status"], "failed");
        failed.push(id);
    }
    eventually("three more failures in the list", WAIT, || async {
        let listed = failed_ids(base, "flaky").await;
        failed.iter().all(|id| listed.contains(id)).then_some(())
    })
    .await;
    broken.store(false, Ordering::SeqCst);
    let mut cursor = 0;
    let mut redrives = Vec::new();
    loop {
        let r = http()
            .post(format!("{base}/operations/redrive"))
            .json(&serde_json::json!({"route": "flaky", "limit": 2, "cursor": cursor}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = json(r).await;
        for item in body["redriven"].as_array().unwrap() {
            redrives.push((
                item["operation"].as_str().unwrap().to_owned(),
                item["redrive"].as_str().unwrap().to_owned(),
                item["replayed"].as_bool().unwrap(),
            ));
        }
        match body["next_cursor"].as_u64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    // The first failure was redriven before (a replay); the three are new.
    for id in &failed {
        let (_, redrive, replayed) = redrives.iter().find(|(op, ..)| op == id).expect("redriven");
        assert!(!replayed);
        assert_eq!(status_of(base, redrive).await["status"], "succeeded");
    }
    assert!(
        redrives
            .iter()
            .any(|(op, r, replayed)| *op == id && *r == redriven && *replayed)
    );
    assert_eq!(redrives.len(), 4, "{redrives:?}");
}

/// A redrive must be able to finish before the failed operation's retention ends (on a
/// stateful route it reads the original's marker, kept that long): 3 s of retention and a 1 s
/// timeout leave 2 s to ask; after that it is refused and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_too_close_to_the_end_of_the_retention_is_refused() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let handler =
        |_request: handlers::Request| async { Ok(Response::json(500, &serde_json::json!("down"))) };
    let config = handlers::WorkerConfig {
        max_deliver: 1,
        ..worker_config()
    };
    let _worker = TestWorker::start(&nats, config, "brief", handler).await;
    let base = &gw.base;
    let id = submit(base, "/brief", "b1").accepted().await;
    let failed = status_of(base, &id).await;
    assert_eq!(failed["status"], "failed");
    let created = time::OffsetDateTime::parse(
        failed["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let closes = created + Duration::from_secs(2);
    let left = closes - time::OffsetDateTime::now_utc();
    tokio::time::sleep(left.unsigned_abs() + Duration::from_millis(200)).await;
    let before = stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await;
    let r = http()
        .post(format!("{base}/operations/{id}/redrive"))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(r, 409, "not-redrivable").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("kept only until"),
        "{problem}"
    );
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        before
    );
}

/// A stateful handler that commits (the counter goes up, an audit message is emitted) and
/// answers 422: the operation failed *after* changing state. Its redrive adopts the committed
/// outbox: the same reply, the audit message again with its id, the counter unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_redrive_of_a_committed_operation_changes_the_state_once() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let store = counter_store(&nats).await;
    let runs = Arc::new(AtomicU32::new(0));
    let handler = counting_handler(runs.clone(), 422);
    let _worker = TestWorker::start_with(&nats, worker_config(), |w| {
        w.stateful_route("count", store, handler)
    })
    .await;
    let base = &gw.base;
    let id = submit(base, "/count", "c1").accepted().await;
    assert_eq!(status_of(base, &id).await["status"], "failed");
    let r = http()
        .post(format!("{base}/operations/{id}/redrive"))
        .send()
        .await
        .unwrap();
    let redriven = id_of(r).await;
    assert_eq!(status_of(base, &redriven).await["status"], "failed");
    let reply = json(get_result(base, &redriven).await).await;
    assert_eq!(
        reply["counter"], 1,
        "the committed reply, not a second run's"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    let counter =
        handlers::jetstream::last_on_subject(&nats.client().await, "WK_COUNT", "wk.state.counter")
            .await
            .unwrap()
            .expect("counter stored");
    assert_eq!(serde_json::from_slice::<u64>(&counter.payload).unwrap(), 1);
    // Re-published with the original id: JetStream's duplicate window keeps one.
    assert_eq!(stream_messages(&nats.jetstream().await, "AUDIT").await, 1);
}

/// A redrive that is cancelled (or expires) does not end the story: the cancelled operation is
/// redriven in turn, a chain linked both ways; redriving the original again answers its first
/// redrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_operation_and_a_cancelled_redrive_are_redriven_in_turn() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(ROUTES).start().await;
    let base = &gw.base;
    let post =
        |path: String| async move { http().post(format!("{base}{path}")).send().await.unwrap() };
    let cancel = |id: String| async move {
        let r = http()
            .delete(format!("{base}/operations/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    };
    // No worker serves `idle`: each operation waits until cancelled.
    let original = submit(base, "/idle", "i1").accepted().await;
    let r = post(format!("/operations/{original}/redrive")).await;
    assert_problem(r, 409, "not-redrivable").await;
    cancel(original.clone()).await;
    let first = id_of(post(format!("/operations/{original}/redrive")).await).await;
    cancel(first.clone()).await;
    let again = post(format!("/operations/{original}/redrive")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(again).await, first);
    let second = id_of(post(format!("/operations/{first}/redrive")).await).await;
    let view = json(get_operation(base, &first).await).await;
    assert_eq!(view["status"], "cancelled");
    assert_eq!(view["redrive_of"], original.as_str());
    assert_eq!(view["redriven_by"], second.as_str());
    assert_eq!(
        json(get_operation(base, &second).await).await["status"],
        "pending"
    );
}
