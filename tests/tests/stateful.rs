//! Stateful handlers against a real nats-server: state, marker and reply commit atomically, once
//! per operation, whatever duplicates and concurrent workers do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use gateway_tests::*;
use handlers::contract::Subjects;
use handlers::{Response, StateStore, StatefulContext};

const ROUTES: &str = "[[route]]\nname = \"count\"\nmethod = \"POST\"\npath = \"/count\"\n";

/// Starts a worker whose stateful handler increments one counter and replies with the new value.
async fn counting_worker(nats: &Nats, runs: Arc<AtomicU32>) -> TestWorker {
    let store = counter_store(nats).await;
    let handler = counting_handler(runs, 200);
    let config = handlers::WorkerConfig {
        max_deliver: 1000,
        ..worker_config()
    };
    TestWorker::start_with(nats, config, |w| w.stateful_route("count", store, handler)).await
}

/// Deliveries a worker finished: replied (committed or re-published) or skipped (already answered).
fn handled(worker: &TestWorker) -> u64 {
    let stats = worker.stats();
    stats.replied + stats.skipped
}

async fn counter(nats: &Nats) -> u64 {
    let m =
        handlers::jetstream::last_on_subject(&nats.client().await, "WK_COUNT", "wk.state.counter")
            .await
            .unwrap()
            .expect("counter stored");
    serde_json::from_slice(&m.payload).unwrap()
}

async fn reply_value(gw: &InProcessGateway, id: &str) -> u64 {
    poll_until_terminal(&gw.base, id, Duration::from_secs(30)).await;
    let r = get_result(&gw.base, id).await;
    json(r).await["counter"].as_u64().unwrap()
}

/// Two workers, twenty operations: the counter is 20 and the replies are exactly 1..=20, each
/// computed from the state its operation committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_changes_state_once_and_replies_with_what_it_committed() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let runs = Arc::new(AtomicU32::new(0));
    let _a = counting_worker(&nats, runs.clone()).await;
    let _b = counting_worker(&nats, runs.clone()).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            submit(&gw.base, "/count", &format!("c-{i}"))
                .accepted()
                .await,
        );
    }
    let mut replies = Vec::new();
    for id in &ids {
        replies.push(reply_value(&gw, id).await);
    }
    replies.sort_unstable();
    assert_eq!(replies, (1..=20).collect::<Vec<u64>>());
    assert_eq!(counter(&nats).await, 20);
    let js = nats.jetstream().await;
    assert_eq!(
        stream_messages(&js, "AUDIT").await,
        20,
        "one outgoing message per operation"
    );
    assert!(
        runs.load(Ordering::SeqCst) >= 20,
        "concurrent conflicts re-run, never double-commit"
    );
}

/// A duplicate of an operation that already committed does not run the handler; two concurrent
/// copies of a fresh operation commit once. The counter moves once per operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_never_commit_twice() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let runs = Arc::new(AtomicU32::new(0));
    let worker_a = counting_worker(&nats, runs.clone()).await;
    let worker_b = counting_worker(&nats, runs.clone()).await;

    let first = submit(&gw.base, "/count", "d-1").accepted().await;
    assert_eq!(reply_value(&gw, &first).await, 1);
    let runs_before = runs.load(Ordering::SeqCst);
    duplicate_request(&nats, "count", &first, "copy-of-d1").await;
    eventually(
        "the duplicate is acked",
        Duration::from_secs(10),
        || async {
            let handled = handled(&worker_a) + handled(&worker_b);
            (handled >= 2).then_some(())
        },
    )
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        runs_before,
        "the handler did not run again"
    );
    assert_eq!(counter(&nats).await, 1);

    // A fresh operation, published three times at once to two workers.
    let second = submit(&gw.base, "/count", "d-2").accepted().await;
    duplicate_request(&nats, "count", &second, "copy-a-of-d2").await;
    duplicate_request(&nats, "count", &second, "copy-b-of-d2").await;
    assert_eq!(reply_value(&gw, &second).await, 2);
    eventually(
        "all three copies handled",
        Duration::from_secs(15),
        || async {
            let handled = handled(&worker_a) + handled(&worker_b);
            (handled >= 5).then_some(())
        },
    )
    .await;
    assert_eq!(
        counter(&nats).await,
        2,
        "one state change for three deliveries"
    );

    // A crash between the commit and the reply's publish, made real: the stored reply is gone
    // from the results stream, the request comes again. The marker's outbox restores the same
    // reply and the handler does not run.
    let js = nats.jetstream().await;
    let results = js.get_stream("GW_OUTCOMES").await.unwrap();
    let stored = results
        .get_last_raw_message_by_subject(&Subjects::default().slots("count", &first).reply_subject)
        .await
        .unwrap();
    results.delete_message(stored.sequence).await.unwrap();
    let runs_before = runs.load(Ordering::SeqCst);
    duplicate_request(&nats, "count", &first, "redelivery-of-d1").await;
    assert_eq!(
        reply_value(&gw, &first).await,
        1,
        "the reply committed with the state, again"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        runs_before,
        "restored from the outbox, not re-run"
    );
    assert_eq!(counter(&nats).await, 2);
    // The outbox was published again with the same ids: JetStream dropped the copies.
    assert_eq!(
        stream_messages(&js, "AUDIT").await,
        2,
        "one outgoing message per operation"
    );
    let conflicts = worker_a.stats().conflicts + worker_b.stats().conflicts;
    assert_eq!(
        conflicts, 0,
        "every copy re-published the same committed reply"
    );
}

/// A handler that loads a key twice computes from its first read, and the commit checks that read:
/// an operation that committed in between makes the slow one run again against the new state (no
/// lost update), however many times the slow one loads the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_load_does_not_hide_a_concurrent_change() {
    use std::sync::atomic::AtomicBool;
    use tokio::sync::Notify;
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let store = StateStore::ensure(
        nats.jetstream().await,
        "WK_TWICE",
        "tw",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let (loaded, release, held) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(AtomicBool::new(false)),
    );
    let handler = {
        let (loaded, release, held) = (loaded.clone(), release.clone(), held.clone());
        move |ctx: Arc<StatefulContext>| {
            let (loaded, release, held) = (loaded.clone(), release.clone(), held.clone());
            async move {
                let first: u64 = ctx.load("counter").await?.unwrap_or(0);
                // The slow operation's first run waits here until the other has committed.
                if ctx.request().body.as_ref() == b"slow" && !held.swap(true, Ordering::SeqCst) {
                    loaded.notify_one();
                    release.notified().await;
                }
                let _again: Option<u64> = ctx.load("counter").await?;
                ctx.save("counter", &(first + 1));
                Ok(Response::json(
                    200,
                    &serde_json::json!({ "counter": first + 1 }),
                ))
            }
        }
    };
    let config = handlers::WorkerConfig {
        max_deliver: 1000,
        ..worker_config()
    };
    let _worker =
        TestWorker::start_with(&nats, config, |w| w.stateful_route("count", store, handler)).await;
    let slow = submit(&gw.base, "/count", "twice-slow")
        .body("slow")
        .accepted()
        .await;
    loaded.notified().await;
    let fast = submit(&gw.base, "/count", "twice-fast")
        .body("fast")
        .accepted()
        .await;
    assert_eq!(reply_value(&gw, &fast).await, 1);
    release.notify_one();
    assert_eq!(
        reply_value(&gw, &slow).await,
        2,
        "computed from the state after the other's commit"
    );
    let m =
        handlers::jetstream::last_on_subject(&nats.client().await, "WK_TWICE", "tw.state.counter")
            .await
            .unwrap()
            .expect("counter stored");
    assert_eq!(
        serde_json::from_slice::<u64>(&m.payload).unwrap(),
        2,
        "no update lost"
    );
}

/// A stateful route whose handler commits a deposit and emits it to a ledger; its state store is
/// named in the routes file, so the gateway decides cancellations and expiries through it.
const DEPOSITS: &str = r#"
[[route]]
name = "deposit"
method = "POST"
path = "/deposit"
timeout = "2s"
retention = "1m"
state = { stream = "WK_DEPOSITS", prefix = "dep" }

[[route]]
name = "transfer"
method = "POST"
path = "/transfer"
state = { stream = "WK_DEPOSITS", prefix = "dep" }

[[route]]
name = "refund"
method = "POST"
path = "/refund"
state = { stream = "WK_DEPOSITS", prefix = "dep" }
"#;

/// A worker for both deposit routes: loads `alice`, waits `pause` (the slow deposit), saves
/// `alice + 10`, emits `+10` to the ledger and replies with the balance.
async fn deposit_worker(nats: &Nats, route: &'static str, pause: Duration) -> TestWorker {
    deposit_worker_with(nats, route, pause, Duration::from_secs(3600)).await
}

/// [`deposit_worker`] with the store's `marker_ttl` chosen.
async fn deposit_worker_with(
    nats: &Nats,
    route: &'static str,
    pause: Duration,
    marker_ttl: Duration,
) -> TestWorker {
    let js = nats.jetstream().await;
    js.create_or_update_stream(async_nats::jetstream::stream::Config {
        name: "LEDGER".into(),
        subjects: vec!["ledger.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let store = StateStore::ensure(js, "WK_DEPOSITS", "dep", marker_ttl)
        .await
        .unwrap();
    let handler = move |ctx: Arc<StatefulContext>| async move {
        let balance: u64 = ctx.load("alice").await?.unwrap_or(0);
        tokio::time::sleep(pause).await;
        ctx.save("alice", &(balance + 10));
        ctx.emit("ledger.deposits", "+10");
        Ok(Response::json(
            200,
            &serde_json::json!({ "balance": balance + 10 }),
        ))
    };
    TestWorker::start_with(nats, worker_config(), |w| {
        w.stateful_route(route, store, handler)
    })
    .await
}

/// What the operation changed: `alice`'s balance (if ever saved) and the ledger's messages.
async fn deposited(nats: &Nats) -> (Option<u64>, u64) {
    let client = nats.client().await;
    let alice = handlers::jetstream::last_on_subject(&client, "WK_DEPOSITS", "dep.state.alice")
        .await
        .unwrap()
        .map(|m| serde_json::from_slice(&m.payload).unwrap());
    (
        alice,
        stream_messages(&nats.jetstream().await, "LEDGER").await,
    )
}

/// A handler that outlives its operation's deadline (2 s timeout, 3 s of work) while a client
/// long-polls the result: whichever way it ends, outcome, state and output agree. Expired means no
/// deposit and no ledger message; succeeded means one of each. (Before the gateway decided through
/// the state store, the client got 504 expired while the deposit and its ledger message went
/// through.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_racing_a_slow_commit_leaves_state_and_outcome_agreeing() {
    let TestGateway { nats, gw } = TestGateway::builder(DEPOSITS).start().await;
    let worker = deposit_worker(&nats, "deposit", Duration::from_secs(3)).await;
    let id = submit(&gw.base, "/deposit", "slow-deposit")
        .accepted()
        .await;
    let result = http()
        .get(gw.url(&format!("/operations/{id}/result?wait=10")))
        .send()
        .await
        .unwrap();
    let status = result.status().as_u16();
    // The handler finishes (and tries to commit) a second after the deadline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (alice, ledger) = deposited(&nats).await;
    match status {
        504 => assert_eq!(
            (alice, ledger),
            (None, 0),
            "expired: nothing may have changed"
        ),
        200 => assert_eq!(
            (alice, ledger),
            (Some(10), 1),
            "succeeded: one deposit, one message"
        ),
        other => panic!("unexpected {other}"),
    }
    let again = get_result(&gw.base, &id).await;
    assert_eq!(
        again.status().as_u16(),
        status,
        "the outcome does not change afterwards"
    );
    // The worker counts what the arbiter decided, not what its handler tried.
    let stats = eventually("the worker publishes", Duration::from_secs(10), || async {
        let stats = worker.stats();
        (stats.replied + stats.expired > 0).then_some(stats)
    })
    .await;
    let counted = (stats.replied, stats.expired);
    assert_eq!(counted, if status == 200 { (1, 0) } else { (0, 1) });
}

/// A cancellation that arrives after the commit, before the reply is published, cannot undo the
/// commit: it finds the operation finished (409) and the deposit is the outcome. (Before, the
/// client got 202 cancelled while the deposit and its ledger message went through.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_commit_finds_the_operation_finished() {
    let TestGateway { nats, gw } = TestGateway::builder(DEPOSITS).start().await;
    let gate = handlers::faults::hold("after-commit", "transfer");
    let _worker = deposit_worker(&nats, "transfer", Duration::ZERO).await;
    let id = submit(&gw.base, "/transfer", "cancel-late")
        .accepted()
        .await;
    tokio::time::timeout(Duration::from_secs(10), gate.reached.notified())
        .await
        .expect("the worker committed and paused");
    let cancel = http()
        .delete(gw.url(&format!("/operations/{id}")))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(cancel, 409, "already-finished").await;
    assert_eq!(problem["operation"]["status"], "succeeded");
    gate.release.notify_one();
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(10)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded");
    assert_eq!(
        deposited(&nats).await,
        (Some(10), 1),
        "one deposit, one ledger message"
    );
}

/// A store configured with a marker TTL shorter than the route's retention still keeps each
/// marker as long as its request: a worker that committed and died before publishing is
/// redelivered after the configured TTL, and the redelivery publishes the commit instead of
/// running the handler again. (Before, the marker was gone and the deposit happened twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_marker_ttl_cannot_let_a_redelivery_commit_twice() {
    let TestGateway { nats, gw } = TestGateway::builder(DEPOSITS).start().await;
    let gate = handlers::faults::hold("after-commit", "refund");
    let first = deposit_worker_with(&nats, "refund", Duration::ZERO, Duration::from_secs(1)).await;
    let id = submit(&gw.base, "/refund", "commit-then-die")
        .accepted()
        .await;
    tokio::time::timeout(Duration::from_secs(10), gate.reached.notified())
        .await
        .expect("the worker committed");
    first.crash();
    // Well past the configured marker TTL (1 s) and AckWait (2 s): the request comes back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _second =
        deposit_worker_with(&nats, "refund", Duration::ZERO, Duration::from_secs(1)).await;
    let statuses = poll_until_terminal(&gw.base, &id, Duration::from_secs(15)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded");
    assert_eq!(
        deposited(&nats).await,
        (Some(10), 1),
        "one deposit, one ledger message"
    );
}

/// A state store's stream is created when absent and otherwise only checked, never changed: an
/// operator's stream with its own limits (here a byte cap, a description and one covering subject)
/// keeps them when a worker starts (before, every start overwrote it with the worker's defaults);
/// a stream that cannot hold the store is refused with what it lacks, and left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_state_stream_is_checked_never_changed() {
    use async_nats::jetstream::stream::Config;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    let operators = Config {
        name: "WK_LIVE".to_owned(),
        subjects: vec!["live.>".to_owned()],
        description: Some("sized by the operator".to_owned()),
        max_bytes: 1 << 30,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        max_messages_per_subject: 1,
        allow_direct: true,
        allow_message_ttl: true,
        allow_atomic_publish: true,
        ..Default::default()
    };
    js.create_stream(operators.clone()).await.unwrap();
    StateStore::ensure(js.clone(), "WK_LIVE", "live", Duration::from_secs(60))
        .await
        .unwrap();
    let live = js
        .get_stream("WK_LIVE")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(
        (live.subjects, live.description, live.max_bytes),
        (
            operators.subjects,
            operators.description,
            operators.max_bytes
        )
    );

    js.create_stream(Config {
        name: "WK_BARE".to_owned(),
        subjects: vec!["bare.state.>".to_owned()],
        ..Default::default()
    })
    .await
    .unwrap();
    let Err(refused) =
        StateStore::ensure(js.clone(), "WK_BARE", "bare", Duration::from_secs(60)).await
    else {
        panic!("a stream that cannot hold the store is refused");
    };
    let text = refused.to_string();
    for lack in [
        "bare.done.>",
        "allow_atomic_publish",
        "allow_msg_ttl",
        "allow_direct",
    ] {
        assert!(text.contains(lack), "{text}");
    }
    let bare = js
        .get_stream("WK_BARE")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(
        bare.subjects,
        vec!["bare.state.>".to_owned()],
        "left as it is"
    );

    // A stream that would drop state or markers before their time is refused too.
    js.create_stream(Config {
        name: "WK_SHORT".to_owned(),
        subjects: vec!["short.>".to_owned()],
        max_age: Duration::from_secs(60),
        allow_direct: true,
        allow_message_ttl: true,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let Err(refused) =
        StateStore::ensure(js.clone(), "WK_SHORT", "short", Duration::from_secs(3600)).await
    else {
        panic!("a max_age, which would age state out, is refused");
    };
    assert!(refused.to_string().contains("max_age"), "{refused}");

    // Absent: created, usable at once by a second process too.
    StateStore::ensure(js.clone(), "WK_NEW", "new", Duration::from_secs(60))
        .await
        .unwrap();
    StateStore::ensure(js.clone(), "WK_NEW", "new", Duration::from_secs(60))
        .await
        .unwrap();
}
