//! `Retry-After` for pending operations, computed per route from the route's backlog and how fast
//! it is being worked off, bounded by configuration.
//!
//! A background task reads each route's worker consumer once a second (one consumer-info request
//! per route per replica): backlog = messages not yet delivered plus deliveries in progress;
//! completion rate = acknowledged deliveries per second, smoothed. The estimate is the backlog's
//! drain time, clamped to `[1, GATEWAY_RETRY_AFTER_MAX]`. Requests only read an atomic. With no
//! consumer (no worker ever started) or no data yet, the configured default applies.

use crate::metrics::PENDING_OPERATIONS;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::lifecycle::sleep_or_stop;

use super::store::Store;

/// Per-route estimates, shared by every request of the process.
#[derive(Clone)]
pub struct RetryAfter {
    default_secs: u64,
    routes: Arc<HashMap<String, AtomicU64>>,
}

impl RetryAfter {
    pub fn new(default_secs: u64, routes: impl IntoIterator<Item = String>) -> Self {
        Self {
            default_secs,
            routes: Arc::new(
                routes
                    .into_iter()
                    .map(|r| (r, AtomicU64::new(default_secs)))
                    .collect(),
            ),
        }
    }

    /// Seconds a client should wait before asking about an operation of `route` again.
    pub fn seconds(&self, route: &str) -> u64 {
        self.routes
            .get(route)
            .map_or(self.default_secs, |s| s.load(Ordering::Relaxed))
    }

    /// Refreshes the estimates every second until `stop`. `consumers` maps route to the name of
    /// its workers' durable consumer.
    pub async fn follow(
        self,
        store: Arc<Store>,
        consumers: Vec<(String, String)>,
        max_secs: u64,
        stop: CancellationToken,
    ) {
        let mut last: HashMap<String, (Instant, u64, f64)> = HashMap::new();
        while !stop.is_cancelled() {
            for (route, consumer) in &consumers {
                let Some(slot) = self.routes.get(route) else {
                    continue;
                };
                let Ok((backlog, completed)) = store.consumer_progress(consumer).await else {
                    slot.store(self.default_secs, Ordering::Relaxed);
                    continue;
                };
                metrics::gauge!(PENDING_OPERATIONS, "route" => route.clone()).set(backlog as f64);
                let now = Instant::now();
                let rate = match last.get(route) {
                    Some((at, before, rate)) => {
                        let elapsed = now.duration_since(*at).as_secs_f64().max(0.001);
                        let current = completed.saturating_sub(*before) as f64 / elapsed;
                        // Smooth over about five readings.
                        0.8 * rate + 0.2 * current
                    }
                    None => 0.0,
                };
                last.insert(route.clone(), (now, completed, rate));
                slot.store(
                    estimate(backlog, rate, self.default_secs, max_secs),
                    Ordering::Relaxed,
                );
            }
            sleep_or_stop(&stop, Duration::from_secs(1)).await;
        }
    }
}

/// The backlog's drain time at `rate` per second, in whole seconds within `[1, max]`.
fn estimate(backlog: u64, rate: f64, default: u64, max: u64) -> u64 {
    let max = max.max(1);
    if backlog == 0 {
        return default.clamp(1, max);
    }
    if rate < 0.01 {
        return max;
    }
    ((backlog as f64 / rate).ceil() as u64).clamp(1, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_is_drain_time_within_bounds() {
        assert_eq!(estimate(0, 10.0, 1, 60), 1, "nothing queued: the default");
        assert_eq!(estimate(100, 10.0, 1, 60), 10);
        assert_eq!(estimate(5, 10.0, 1, 60), 1, "never below one second");
        assert_eq!(estimate(10_000, 10.0, 1, 60), 60, "never above the maximum");
        assert_eq!(
            estimate(10, 0.0, 1, 60),
            60,
            "a backlog that does not move: the maximum"
        );
        assert_eq!(estimate(0, 0.0, 5, 60), 5);
    }

    #[test]
    fn unknown_routes_get_the_default() {
        let r = RetryAfter::new(3, ["orders".to_owned()]);
        assert_eq!(r.seconds("orders"), 3);
        assert_eq!(r.seconds("other"), 3);
    }
}
