//! Waiting for something to become true. Everything in these tests is asynchronous (a worker
//! replies later, a cluster elects a leader later), so tests poll with a deadline instead of
//! sleeping for a guessed time.

use std::future::Future;
use std::time::Duration;

/// Retries `probe` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
