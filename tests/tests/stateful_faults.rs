//! The randomized fault test of exactly-once processing: state and output stay consistent, with no
//! loss, no duplicate state change and no ghost message, under crashes at every step, and under
//! cancellations and deadlines racing the commits.
//!
//! 1,000 operations go through the gateway to three stateful counting worker processes that abort
//! at random at every step (before the commit, between commit and publish, between publish and
//! ack), sometimes block past AckWait (so a second worker gets the same request while the first
//! still runs), and are restarted by a supervisor. 100 requests are also published a second
//! time, a tenth of the operations are cancelled at a random moment, and the route's 30 s timeout
//! makes the slowest (the tail of the queue) expire, some while a worker commits them. The route names the workers' state store, so the gateway decides
//! cancellations and expiries through the processed marker. Once every operation is terminal, the
//! oracles, per operation:
//! - it ended, and its statuses never went back;
//! - it has one processed marker, and its status agrees with it: `succeeded` exactly when the marker
//!   is a commit, and then its reply is the value it committed and its outgoing message exists;
//!   `cancelled`, `expired` or `failed` exactly when the marker is a decision without a commit.
//!
//! And over all of them:
//! - at most one state change per operation and nothing lost: the counter equals the number of
//!   `succeeded` operations, and their replies are exactly 1..=that number;
//! - no ghosts, no duplicates: one outgoing message per `succeeded` operation and none for the
//!   others; one result per operation.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_tests::exactly_once::{self, StatefulWorkers, WorkerSpec};
use gateway_tests::history::read_gateway_streams;
use gateway_tests::*;

const WORKER_BIN: &str = env!("CARGO_BIN_EXE_stateful-worker");
const OPERATIONS: usize = 1000;
const DUPLICATES: usize = 100;
const CANCELLED: usize = 100;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_duplicates_and_stalls_never_break_exactly_once_processing() {
    let TestGateway { nats, gw } = TestGateway::builder(&exactly_once::route("30s"))
        .start()
        .await;
    exactly_once::create_audit_stream(&nats.jetstream().await, 1).await;
    let workers = StatefulWorkers::supervise(WorkerSpec {
        bin: WORKER_BIN.to_owned(),
        nats_url: nats.url(),
        count: 3,
        env: [
            ("HANDLERS_CRASH_PERCENT", "1"),
            (
                "HANDLERS_CRASH_POINTS",
                "before-commit,after-commit,after-publish",
            ),
            ("STALL_PERCENT", "1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec(),
        prefix: Arc::new(|_| Vec::new()),
    });

    let http = http();
    let ids: Vec<String> = futures::stream::iter(0..OPERATIONS)
        .map(|i| {
            let (http, url) = (http.clone(), gw.url("/count"));
            async move {
                let r = http
                    .post(url)
                    .header("idempotency-key", format!("\"op-{i}\""))
                    .send()
                    .await
                    .unwrap();
                id_of(r).await
            }
        })
        .buffered(32)
        .collect()
        .await;
    for (n, id) in ids.iter().step_by(OPERATIONS / DUPLICATES).enumerate() {
        duplicate_request(&nats, "count", id, &format!("dup-{n}")).await;
    }
    // Cancels at spread-out moments, racing the workers' commits and the deadlines.
    let cancels = futures::stream::iter(ids.iter().skip(3).step_by(OPERATIONS / CANCELLED))
        .enumerate()
        .map(|(n, id)| {
            let (http, url) = (http.clone(), gw.url(&format!("/operations/{id}")));
            async move {
                tokio::time::sleep(Duration::from_millis((n as u64 * 37) % 2500)).await;
                let status = http.delete(url).send().await.unwrap().status().as_u16();
                assert!(matches!(status, 202 | 409), "cancel answered {status}");
                (id.clone(), status.to_string())
            }
        })
        .buffer_unordered(CANCELLED)
        .collect::<Vec<(String, String)>>();
    let cancels = cancels.await;

    let mut outcomes = Vec::with_capacity(OPERATIONS);
    for id in &ids {
        let statuses = poll_until_terminal(&gw.base, id, Duration::from_secs(240)).await;
        assert_monotonic(&statuses);
        let status = statuses.last().unwrap().clone();
        let r = http
            .get(gw.url(&format!("/operations/{id}/result")))
            .send()
            .await
            .unwrap();
        let reply = (status == "succeeded").then_some(());
        let value = match reply {
            Some(()) => Some(json(r).await["counter"].as_u64().unwrap()),
            None => None,
        };
        outcomes.push((id.clone(), status, value));
    }
    let restarted = workers.restarts();
    workers.stop().await;

    let count = |s: &str| outcomes.iter().filter(|(_, status, _)| status == s).count();
    let succeeded = count("succeeded");
    eprintln!(
        "{OPERATIONS} operations, {DUPLICATES} duplicates, {CANCELLED} cancels, {restarted} worker crashes: {succeeded} succeeded, {} cancelled, {} expired, {} failed",
        count("cancelled"),
        count("expired"),
        count("failed")
    );
    assert!(
        restarted >= 3,
        "the faults must actually happen ({restarted} crashes)"
    );
    assert!(count("cancelled") > 0, "some cancels must win");
    // How many succeed depends on the machine's speed (the tail of the queue expires): the oracles
    // below hold whatever the split, as long as both worlds occur.
    assert!(succeeded > 0, "some operations commit");

    // The exactly-once oracles, per operation and over all of them.
    let js = nats.jetstream().await;
    let (requests, results) = read_gateway_streams(&js).await.unwrap();
    let verdict = exactly_once::check(&js, &requests, &results, &cancels).await;
    assert!(verdict.violations().is_empty(), "{verdict:#?}");
    assert_eq!(
        verdict.counter, succeeded as u64,
        "the commits the gateway reports are the state changes"
    );
    let markers = js
        .get_stream("WK_COUNT")
        .await
        .unwrap()
        .info_with_subjects("wk.done.>")
        .await
        .unwrap()
        .count()
        .await;
    assert_eq!(markers, OPERATIONS, "one processed marker per operation");
    assert_eq!(
        stream_messages(&js, "GW_OUTCOMES").await,
        OPERATIONS as u64,
        "one result per operation"
    );
}

/// The oracles' own control, on real streams: a clean run checks clean; then an outgoing message
/// for an operation that did not commit (a ghost) and a state change no operation made (the
/// counter moved once more) are both counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracles_see_a_ghost_and_a_state_change_no_commit_made() {
    let TestGateway { nats, gw } = TestGateway::builder(&exactly_once::route("30s"))
        .start()
        .await;
    let js = nats.jetstream().await;
    let workers = exactly_once::start_workers(&js, WORKER_BIN, &nats.url(), 1, Vec::new()).await;
    let http = http();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = http
            .post(gw.url("/count"))
            .header("idempotency-key", format!("\"c-{i}\""))
            .send()
            .await
            .unwrap();
        ids.push(id_of(r).await);
    }
    for id in &ids {
        poll_until_terminal(&gw.base, id, Duration::from_secs(30)).await;
    }
    workers.stop().await;
    let (requests, results) = read_gateway_streams(&js).await.unwrap();
    let clean = exactly_once::check(&js, &requests, &results, &[]).await;
    assert!(clean.violations().is_empty(), "{clean:#?}");
    assert_eq!(clean.counter, 5);

    js.publish(exactly_once::AUDIT_SUBJECT, "no-such-operation".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let subject = format!("{}.state.counter", exactly_once::STATE_PREFIX);
    js.publish(subject, "6".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let tampered = exactly_once::check(&js, &requests, &results, &[]).await;
    assert_eq!(tampered.ghosts, 1, "{tampered:#?}");
    assert_eq!(tampered.duplicate_state_changes, 1, "{tampered:#?}");
}
