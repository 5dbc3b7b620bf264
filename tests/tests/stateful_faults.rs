//! The randomized fault test of exactly-once processing: state and output stay consistent, with no
//! loss, no duplicate state change and no ghost message, under crashes at every step.
//!
//! 1,000 operations go through the gateway to three stateful counting worker processes that abort
//! at random at every step (before the commit, between commit and publish, between publish and
//! ack), sometimes block past AckWait (so a second worker gets the same request while the first
//! still runs), and are restarted by a supervisor. 100 requests are also published a second
//! time. Once every operation is terminal, the oracles:
//! - no loss: every operation `succeeded`;
//! - at most one state change per operation, and nothing lost: the counter equals 1,000;
//! - one distinct result per operation, consistent with the committed state: the replies are
//!   exactly 1..=1000, each the value its operation committed;
//! - no ghosts: one processed marker per operation, one result per operation;
//! - monotonic statuses on every poll.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use gateway_tests::*;
use tokio_util::sync::CancellationToken;

const WORKER_BIN: &str = env!("CARGO_BIN_EXE_stateful-worker");
const OPERATIONS: usize = 1000;
const DUPLICATES: usize = 100;
const ROUTES: &str =
    "[[route]]\nname = \"count\"\nmethod = \"POST\"\npath = \"/count\"\ntimeout = \"10m\"\n";

/// Keeps `n` worker processes running, restarting any that crash, until `stop`.
fn supervise(
    nats_url: String,
    n: usize,
    stop: CancellationToken,
    restarts: Arc<AtomicU32>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let spawn = || {
            tokio::process::Command::new(WORKER_BIN)
                .args([nats_url.as_str(), "count"])
                .env("HANDLERS_CRASH_PERCENT", "1")
                .env(
                    "HANDLERS_CRASH_POINTS",
                    "before-commit,after-commit,after-publish",
                )
                .env("STALL_PERCENT", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start a worker process")
        };
        let mut workers: Vec<_> = (0..n).map(|_| spawn()).collect();
        while !stop.is_cancelled() {
            for w in workers.iter_mut() {
                if let Ok(Some(_)) = w.try_wait() {
                    restarts.fetch_add(1, Ordering::Relaxed);
                    *w = spawn();
                }
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        for mut w in workers {
            let _ = w.kill().await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_duplicates_and_stalls_never_break_exactly_once_processing() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let stop = CancellationToken::new();
    let restarts = Arc::new(AtomicU32::new(0));
    let supervisor = supervise(nats.url(), 3, stop.clone(), restarts.clone());

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

    let mut replies = Vec::with_capacity(OPERATIONS);
    for id in &ids {
        let statuses = poll_until_terminal(&gw.base, id, Duration::from_secs(240)).await;
        assert_monotonic(&statuses);
        assert_eq!(statuses.last().unwrap(), "succeeded", "{id}: {statuses:?}");
        let r = http
            .get(gw.url(&format!("/operations/{id}/result")))
            .send()
            .await
            .unwrap();
        replies.push(json(r).await["counter"].as_u64().unwrap());
    }
    stop.cancel();
    supervisor.await.unwrap();

    let restarted = restarts.load(Ordering::Relaxed);
    eprintln!("{OPERATIONS} operations, {DUPLICATES} duplicates, {restarted} worker crashes");
    assert!(
        restarted >= 3,
        "the faults must actually happen ({restarted} crashes)"
    );

    replies.sort_unstable();
    assert_eq!(
        replies,
        (1..=OPERATIONS as u64).collect::<Vec<_>>(),
        "each reply is the value its operation committed"
    );
    let client = nats.client().await;
    let counter = handlers::jetstream::last_on_subject(&client, "WK_COUNT", "wk.state.counter")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<u64>(&counter.payload).unwrap(),
        OPERATIONS as u64,
        "one state change per operation"
    );
    let js = nats.jetstream().await;
    let markers = js
        .get_stream("WK_COUNT")
        .await
        .unwrap()
        .info_with_subjects("wk.done.>")
        .await
        .unwrap()
        .count()
        .await;
    assert_eq!(
        markers, OPERATIONS,
        "one processed marker per operation, no ghosts"
    );
    assert_eq!(
        stream_messages(&js, "GW_RESULTS").await,
        OPERATIONS as u64,
        "one result per operation"
    );
}
