//! The process's lifecycle as the request path sees it: whether it is draining (a shutdown signal
//! came) and whether the results watch runs (readiness waits for it). One handle, cloned into the
//! HTTP state, the waiter registry and the readiness probe, so that "who decides we are draining"
//! has one answer: [`crate::run`], on the signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Shared lifecycle flags; cheap to clone.
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled when the process drains: new work is refused, every waiter answers with what it
    /// has.
    draining: CancellationToken,
    /// Whether the results watch runs now.
    watching_results: Arc<AtomicBool>,
}

impl Lifecycle {
    /// Starts draining, for good.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Completes when the process starts draining.
    pub async fn draining(&self) {
        self.draining.cancelled().await;
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Records whether results wake waiters (and are counted) right now.
    pub(crate) fn set_watching_results(&self, watching: bool) {
        self.watching_results.store(watching, Ordering::Relaxed);
    }

    /// Whether results wake waiters (and are counted) right now.
    pub fn is_watching_results(&self) -> bool {
        self.watching_results.load(Ordering::Relaxed)
    }
}

/// Sleeps for `pause`, or less if `stop` is cancelled meanwhile; `true` when stopped. The pause
/// of every retry and polling loop, so that none delays a shutdown.
pub async fn sleep_or_stop(stop: &CancellationToken, pause: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(pause) => stop.is_cancelled(),
    }
}
