//! Workers inside the test process, built on the `handlers` library: test settings (short
//! AckWait and back-off, so redeliveries happen within a test) and a handle that stops the worker
//! when dropped.

use std::sync::Arc;
use std::time::Duration;

use handlers::{Handler, Worker, WorkerConfig, WorkerStats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::nats::Nats;

/// Worker settings for tests: short ack wait and retry delays.
pub fn worker_config() -> WorkerConfig {
    WorkerConfig {
        ack_wait: Duration::from_secs(2),
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        consumer_prefix: "test".to_owned(),
        ..WorkerConfig::default()
    }
}

/// An in-process worker on one route.
pub struct TestWorker {
    pub stats: Arc<WorkerStats>,
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
