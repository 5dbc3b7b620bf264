//! A stateful counting worker process for the fault test: each operation adds one to a counter,
//! emits its operation id to `audit.count`, and replies with the value it committed. Built with the `handlers` crash points, so the test can
//! make it abort (`HANDLERS_CRASH_PERCENT`, `HANDLERS_CRASH_POINTS`); with `STALL_PERCENT` a handler
//! sometimes blocks its thread past AckWait, so the request is redelivered to another worker
//! while it still runs.
//!
//! Usage: stateful-worker <nats-urls, comma-separated> <route>

use std::sync::Arc;
use std::time::Duration;

use gateway_tests::exactly_once;
use handlers::{Response, StateStore, StatefulContext, Worker};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(route)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: stateful-worker <nats-urls> <route>");
    };
    let stall_percent: u64 = std::env::var("STALL_PERCENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let js = gateway_tests::worker_jetstream(&url).await?;
    let store = StateStore::ensure(
        js.clone(),
        exactly_once::STATE_STREAM,
        exactly_once::STATE_PREFIX,
        Duration::from_secs(3600),
    )
    .await?;
    // Every optimistic-concurrency conflict on the one counter spends a delivery: with several
    // workers racing, an operation can need many. Stateful consumers want a generous max_deliver.
    let config = handlers::WorkerConfig {
        max_deliver: 1000,
        ..gateway_tests::worker_config()
    };
    let stall = config.ack_wait * 3 / 2;
    let handler = move |ctx: Arc<StatefulContext>| async move {
        let value: u64 = ctx.load("counter").await?.unwrap_or(0);
        let roll = ctx
            .request()
            .operation_id
            .bytes()
            .map(u64::from)
            .sum::<u64>()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .subsec_nanos() as u64;
        if roll % 100 < stall_percent {
            // Block the thread (a CPU-bound handler): the lease stops too, AckWait runs out.
            std::thread::sleep(stall);
        }
        ctx.save("counter", &(value + 1));
        ctx.emit(
            exactly_once::AUDIT_SUBJECT,
            ctx.request().operation_id.as_bytes(),
        );
        Ok(Response::json(
            200,
            &serde_json::json!({ "counter": value + 1 }),
        ))
    };
    Worker::new(js, config)
        .stateful_route(route, store, handler)
        .run(CancellationToken::new())
        .await?;
    Ok(())
}
