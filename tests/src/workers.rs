//! Workers inside the test process, built on the `handlers` library: test settings (short
//! AckWait and back-off, so redeliveries happen within a test), a handle that stops the worker
//! when dropped and reads its counters as plain numbers, and the echo handler most tests need
//! when what the worker does is not the point.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handlers::{Handler, HandlerError, Request, Response, Worker, WorkerConfig, WorkerStats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::nats::Nats;

/// Worker settings for tests: short ack wait and retry delays; the expiry grace (the clocks'
/// allowance, as `GATEWAY_EXPIRY_GRACE` for gateways) from `WORKER_EXPIRY_GRACE_SECS`, which the
/// clock nemesis gives its worker processes (default none).
pub fn worker_config() -> WorkerConfig {
    let expiry_grace = std::env::var("WORKER_EXPIRY_GRACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    WorkerConfig {
        ack_wait: Duration::from_secs(2),
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        consumer_prefix: "test".to_owned(),
        expiry_grace,
        ..WorkerConfig::default()
    }
}

/// JetStream for a worker process on these NATS URLs (comma-separated, as the suite's worker
/// binaries take them), connecting in the background until a server answers and reconnecting
/// to any of them after.
pub async fn worker_jetstream(
    urls: &str,
) -> Result<async_nats::jetstream::Context, async_nats::ConnectError> {
    let servers: Vec<String> = urls.split(',').map(str::to_owned).collect();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(servers)
        .await?;
    Ok(async_nats::jetstream::new(client))
}

/// An in-process worker on one route.
pub struct TestWorker {
    stats: Arc<WorkerStats>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestWorker {
    pub async fn start(
        nats: &Nats,
        config: WorkerConfig,
        route: &str,
        handler: impl Handler,
    ) -> Self {
        Self::start_with(nats, config, |w| w.route(route, handler)).await
    }

    /// A worker with whatever routes `build` registers (stateful ones included).
    pub async fn start_with(
        nats: &Nats,
        config: WorkerConfig,
        build: impl FnOnce(Worker) -> Worker,
    ) -> Self {
        Self::start_on(nats.jetstream().await, config, build)
    }

    /// A worker on any JetStream connection (a cluster client, say), with whatever routes
    /// `build` registers.
    pub fn start_on(
        js: async_nats::jetstream::Context,
        config: WorkerConfig,
        build: impl FnOnce(Worker) -> Worker,
    ) -> Self {
        let worker = build(Worker::new(js, config));
        let stats = worker.stats();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            worker.run(token).await.expect("worker runs");
        });
        Self {
            stats,
            stop,
            task: Some(task),
        }
    }

    /// The worker's counters now.
    pub fn stats(&self) -> WorkerCounts {
        WorkerCounts::of(&self.stats)
    }

    /// Stops the worker the way a killed process stops: at once, without finishing, acking or
    /// extending the lease of any delivery it holds.
    pub fn crash(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A worker's counters at one moment, as plain numbers: [`WorkerStats`] as a test compares it
/// (`assert_eq!(worker.stats().replied, 1)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    pub replied: u64,
    pub skipped: u64,
    pub conflicts: u64,
    pub cancelled: u64,
    pub expired: u64,
    pub handler_errors: u64,
    pub failed: u64,
}

impl WorkerCounts {
    /// Reads every counter of `stats`.
    pub fn of(stats: &WorkerStats) -> Self {
        let read = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        Self {
            replied: read(&stats.replied),
            expired: read(&stats.expired),
            skipped: read(&stats.skipped),
            conflicts: read(&stats.conflicts),
            cancelled: read(&stats.cancelled),
            handler_errors: read(&stats.handler_errors),
            failed: read(&stats.failed),
        }
    }
}

/// The echo worker's handler: answers every request with its body. See [`echo`].
#[derive(Clone)]
pub struct Echo {
    status: u16,
    json: bool,
    delay: Duration,
    handled: Arc<Mutex<HashMap<String, u32>>>,
}

/// An echo handler: answers 200 with the request's body as `text/plain`. Options: another
/// [`status`](Echo::status), the body wrapped as JSON `{"echo": <body>}`
/// ([`json`](Echo::json)), a [`delay`](Echo::delay) before answering. It counts how often it
/// handled each operation ([`handled`](Echo::handled)); its clones share the count.
pub fn echo() -> Echo {
    Echo {
        status: 200,
        json: false,
        delay: Duration::ZERO,
        handled: Arc::default(),
    }
}

impl Echo {
    /// Answers with this status instead of 200.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Answers `{"echo": <body>}` as `application/json` instead of the body as text.
    pub fn json(mut self) -> Self {
        self.json = true;
        self
    }

    /// Waits this long before answering.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// How often each operation was handled so far, by operation id.
    pub fn handled(&self) -> HashMap<String, u32> {
        self.handled.lock().unwrap().clone()
    }

    fn reply(&self, body: &[u8]) -> Response {
        let body = String::from_utf8_lossy(body);
        if self.json {
            Response::json(self.status, &serde_json::json!({ "echo": body }))
        } else {
            Response::text(self.status, body)
        }
    }
}

impl Handler for Echo {
    fn call(
        &self,
        request: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, HandlerError>> + Send>> {
        *self
            .handled
            .lock()
            .unwrap()
            .entry(request.operation_id.clone())
            .or_default() += 1;
        let echo = self.clone();
        Box::pin(async move {
            if !echo.delay.is_zero() {
                tokio::time::sleep(echo.delay).await;
            }
            Ok(echo.reply(&request.body))
        })
    }
}

/// The state store of the counting workers (stream `WK_COUNT`, prefix `wk`), and the stream
/// `AUDIT` (`audit.>`) where their handlers emit.
pub async fn counter_store(nats: &Nats) -> handlers::StateStore {
    let js = nats.jetstream().await;
    js.create_or_update_stream(async_nats::jetstream::stream::Config {
        name: "AUDIT".into(),
        subjects: vec!["audit.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    handlers::StateStore::ensure(js, "WK_COUNT", "wk", Duration::from_secs(3600))
        .await
        .unwrap()
}

/// The counting workers' stateful handler: loads the counter, saves it plus one, emits the new
/// value to `audit.count`, and answers `status` with `{"counter": <new value>}`; `runs` counts
/// its runs (a run that does not commit counts too).
pub fn counting_handler(
    runs: Arc<std::sync::atomic::AtomicU32>,
    status: u16,
) -> impl handlers::stateful::StatefulHandler {
    move |ctx: Arc<handlers::StatefulContext>| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let value: u64 = ctx.load("counter").await?.unwrap_or(0);
            ctx.save("counter", &(value + 1));
            ctx.emit("audit.count", (value + 1).to_string());
            Ok(Response::json(
                status,
                &serde_json::json!({ "counter": value + 1 }),
            ))
        }
    }
}
