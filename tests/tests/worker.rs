//! The worker library's failure handling and leases, against a real nats-server: a handler that
//! always fails ends `failed` after the last delivery, a permanent failure ends it at once, and a
//! handler that outlives AckWait keeps its lease instead of being run twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use gateway_tests::*;
use handlers::{Permanent, Request, Response, WorkerConfig};

const ROUTES: &str =
    "[[route]]\nname = \"jobs\"\nmethod = \"POST\"\npath = \"/jobs\"\nconsumer = \"test-jobs\"\n";

fn counting(calls: &Arc<AtomicU32>) -> Arc<AtomicU32> {
    calls.clone()
}

/// A gateway, a request on `jobs`, and a worker that died holding its only attempt
/// (`max_deliver = 1`).
struct Lost {
    nats: Nats,
    gw: InProcessGateway,
    id: String,
    /// The workers' settings (one attempt).
    config: WorkerConfig,
    /// Handler calls so far (the lost attempt's: 1).
    calls: Arc<AtomicU32>,
}

async fn lose_the_only_attempt(key: &str) -> Lost {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let config = WorkerConfig {
        max_deliver: 1,
        ..worker_config()
    };
    let calls = Arc::new(AtomicU32::new(0));
    let worker = hanging_worker(&nats, config.clone(), &calls).await;
    let id = submit(&gw.base, "/jobs", key).body("{}").accepted().await;
    eventually(
        "the only attempt started",
        Duration::from_secs(10),
        || async { (calls.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    worker.crash();
    Lost {
        nats,
        gw,
        id,
        config,
        calls,
    }
}

/// A worker on `jobs` whose handler counts its call in `calls`, then never returns (it holds the
/// delivery until the worker is stopped or crashed).
async fn hanging_worker(nats: &Nats, config: WorkerConfig, calls: &Arc<AtomicU32>) -> TestWorker {
    let hanging = counting(calls);
    TestWorker::start(nats, config, "jobs", move |_r: Request| {
        hanging.fetch_add(1, Ordering::SeqCst);
        async move {
            std::future::pending::<()>().await;
            Ok(Response::new(200))
        }
    })
    .await
}

/// Every delivery fails: after the last one the operation is `failed` with a 500 problem naming
/// the last error, never left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_always_fails_ends_failed_after_the_last_delivery() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let seen = counting(&calls);
    let config = WorkerConfig {
        max_deliver: 3,
        ..worker_config()
    };
    let worker = TestWorker::start(&nats, config, "jobs", move |_r: Request| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move { Err::<Response, _>("the database is down".into()) }
    })
    .await;
    let id = submit(&gw.base, "/jobs", "always-fails")
        .body("{}")
        .accepted()
        .await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await;
    assert_monotonic(&statuses);
    assert_eq!(statuses.last().unwrap(), "failed");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "one call per delivery");
    let result = get_result(&gw.base, &id).await;
    assert_eq!(result.status(), 500);
    assert_eq!(result.headers()["content-type"], "application/problem+json");
    let problem = json(result).await;
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("handler-failed")
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("the database is down")
    );
    assert_eq!(worker.stats().failed, 1);
}

/// A permanent failure ends the operation at once with the handler's problem; no retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_ends_the_operation_at_once() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let seen = counting(&calls);
    let _worker = TestWorker::start(&nats, worker_config(), "jobs", move |_r: Request| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            Err::<Response, _>(Permanent::new(422, "Unknown customer", "No customer 42.").into())
        }
    })
    .await;
    let id = submit(&gw.base, "/jobs", "permanent")
        .body("{}")
        .accepted()
        .await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(10)).await;
    assert_eq!(statuses.last().unwrap(), "failed");
    let result = get_result(&gw.base, &id).await;
    assert_eq!(result.status(), 422);
    let problem = json(result).await;
    assert_eq!(problem["title"], "Unknown customer");
    assert_eq!(problem["detail"], "No customer 42.");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "terminated, never redelivered"
    );
}

/// A handler that runs for 2.5 times AckWait, with a second worker on the same consumer waiting
/// for work: the lease is kept alive, so the handler runs once and nothing is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_lease() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let seen = counting(&calls);
        workers.push(
            TestWorker::start(&nats, worker_config(), "jobs", move |_r: Request| {
                seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(Response::text(200, "slow but once"))
                }
            })
            .await,
        );
    }
    let id = submit(&gw.base, "/jobs", "long")
        .body("{}")
        .accepted()
        .await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(20)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "AckWait is 2 s; the handler took 5 s, once"
    );
}

/// A worker whose durable consumer is deleted under it (an operator's reset, a restored stream)
/// creates it again and keeps serving: a request sent after the deletion still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_consumer_is_deleted_creates_it_again() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let worker = TestWorker::start(&nats, worker_config(), "jobs", echo()).await;
    let first = submit(&gw.base, "/jobs", "before-delete")
        .body("{}")
        .accepted()
        .await;
    let statuses = poll_until_terminal(&gw.base, &first, Duration::from_secs(10)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded");
    nats.jetstream()
        .await
        .delete_consumer_from_stream("test-jobs", handlers::contract::DEFAULT_REQUESTS_STREAM)
        .await
        .expect("the durable exists");
    let after = submit(&gw.base, "/jobs", "after-delete")
        .body("{}")
        .accepted()
        .await;
    let statuses = poll_until_terminal(&gw.base, &after, Duration::from_secs(15)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded", "{statuses:?}");
    assert_eq!(worker.stats().replied, 2);
}

/// The worker dies while it holds the only attempt (`max_deliver = 1`): the consumer's spare
/// delivery does not run the handler again, it ends the operation `failed`. (Before, nothing
/// redelivered it and the operation stayed pending until its deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_on_the_last_attempt_still_ends_the_operation_failed() {
    let Lost {
        nats,
        gw,
        id,
        config,
        calls,
    } = lose_the_only_attempt("dies-holding-it").await;
    let seen = counting(&calls);
    let _second = TestWorker::start(&nats, config, "jobs", move |_r: Request| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move { Ok(Response::new(200)) }
    })
    .await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await;
    assert_eq!(statuses.last().unwrap(), "failed", "{statuses:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the spare delivery does not run the handler"
    );
    let problem = assert_problem(get_result(&gw.base, &id).await, 500, "handler-failed").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("attempts were used up")
    );
}

/// Every delivery of a request is lost (the only attempt and the spare delivery both die with
/// their workers): JetStream's MAX_DELIVERIES advisory, which the gateway keeps in a stream, ends
/// the operation `failed` without any reader or worker. (Before, it stayed pending until a read
/// past its deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_whose_every_delivery_is_lost_ends_failed() {
    let Lost {
        nats,
        gw,
        id,
        config,
        ..
    } = lose_the_only_attempt("all-lost").await;
    // The spare delivery goes to a consumer that dies without acking it, as a worker would.
    let consumer: async_nats::jetstream::consumer::PullConsumer = nats
        .jetstream()
        .await
        .get_consumer_from_stream("test-jobs", handlers::contract::DEFAULT_REQUESTS_STREAM)
        .await
        .unwrap();
    let spare = eventually("the spare delivery", Duration::from_secs(10), || async {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .ok()?;
        futures::StreamExt::next(&mut batch).await?.ok()
    })
    .await;
    assert_eq!(
        spare.info().unwrap().delivered,
        2,
        "the attempt and the spare"
    );
    drop(spare);
    // A worker that is still around keeps pulling, so the server notices the exhausted request
    // (it checks expired deliveries when it serves a pull) and publishes the advisory.
    let _survivor = TestWorker::start(&nats, config, "jobs", echo()).await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(20)).await;
    assert_eq!(statuses.last().unwrap(), "failed", "{statuses:?}");
    let problem = assert_problem(get_result(&gw.base, &id).await, 500, "handler-failed").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Every delivery")
    );
}

/// Workers with different `max_deliver` share one durable consumer, which keeps the setting of the
/// last one that started: the handler's attempts follow the consumer, not each process's own
/// setting. (Before, a process configured with more attempts ran the handler on the consumer's
/// spare delivery too, and the operation ended only through the backstop.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attempts_follow_the_shared_consumer_not_the_local_setting() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let failing = counting(&calls);
    let generous = WorkerConfig {
        max_deliver: 1000,
        ..worker_config()
    };
    let _a = TestWorker::start(&nats, generous, "jobs", move |_r: Request| {
        failing.fetch_add(1, Ordering::SeqCst);
        async move { Err::<Response, _>("the database is down".into()) }
    })
    .await;
    let js = nats.jetstream().await;
    let consumer_max = || async {
        let mut c: async_nats::jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream("test-jobs", handlers::contract::DEFAULT_REQUESTS_STREAM)
            .await
            .ok()?;
        Some(c.info().await.ok()?.config.max_deliver)
    };
    eventually(
        "worker A created the consumer",
        Duration::from_secs(10),
        || async { (consumer_max().await == Some(1001)).then_some(()) },
    )
    .await;
    let strict = WorkerConfig {
        max_deliver: 2,
        ..worker_config()
    };
    let b = TestWorker::start(&nats, strict, "jobs", echo()).await;
    eventually("worker B updated it", Duration::from_secs(10), || async {
        (consumer_max().await == Some(3)).then_some(())
    })
    .await;
    b.stop().await;
    let id = submit(&gw.base, "/jobs", "shared-consumer")
        .body("{}")
        .accepted()
        .await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await;
    assert_eq!(statuses.last().unwrap(), "failed", "{statuses:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the consumer's two attempts, no more"
    );
}
