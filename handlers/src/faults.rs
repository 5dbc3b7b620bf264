//! Crash points for fault-injection tests: with the `fault-injection` feature, the process aborts
//! at a named point with the probability `HANDLERS_CRASH_PERCENT` (0-100) when the point is listed
//! in `HANDLERS_CRASH_POINTS` (comma-separated). Without the feature every point is a no-op, so
//! release builds carry nothing of this.
//!
//! Points: `before-commit`, `after-commit` (state committed, reply not yet published),
//! `after-publish` (reply published, request not yet acked).
//!
//! Pause points are the same places for in-process tests: [`hold`] arms a point, the next run
//! that reaches it reports so and waits until the test releases it, so a test can put a cancel or
//! a deadline exactly between two steps. Without the feature a pause point is a no-op too.

#[cfg(feature = "fault-injection")]
mod active {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Plan {
        percent: u64,
        points: Vec<String>,
    }

    fn plan() -> &'static Plan {
        static PLAN: OnceLock<Plan> = OnceLock::new();
        PLAN.get_or_init(|| Plan {
            percent: std::env::var("HANDLERS_CRASH_PERCENT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            points: std::env::var("HANDLERS_CRASH_POINTS")
                .unwrap_or_default()
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
        })
    }

    /// A different pseudo-random number on every call, seeded per process.
    fn roll() -> u64 {
        static STATE: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = STATE.get_or_init(Default::default).build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.finish() % 100
    }

    /// An armed pause point: the run that reaches it signals `reached`, then waits for `release`.
    pub struct Gate {
        pub reached: tokio::sync::Notify,
        pub release: tokio::sync::Notify,
    }

    /// Armed points, `<point>@<route>`, each with its gate.
    type Armed = std::sync::Mutex<Vec<(String, std::sync::Arc<Gate>)>>;

    fn armed() -> &'static Armed {
        static ARMED: OnceLock<Armed> = OnceLock::new();
        ARMED.get_or_init(Default::default)
    }

    pub fn hold(name: &str, route: &str) -> std::sync::Arc<Gate> {
        let name = format!("{name}@{route}");
        let gate = std::sync::Arc::new(Gate {
            reached: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        });
        armed()
            .lock()
            .expect("pause points")
            .push((name, gate.clone()));
        gate
    }

    pub async fn pause_point(name: &str, route: &str) {
        let name = format!("{name}@{route}");
        let gate = {
            let mut armed = armed().lock().expect("pause points");
            let index = armed.iter().position(|(n, _)| *n == name);
            index.map(|i| armed.remove(i).1)
        };
        if let Some(gate) = gate {
            gate.reached.notify_one();
            gate.release.notified().await;
        }
    }

    pub fn crash_point(name: &str) {
        let plan = plan();
        if plan.percent > 0 && plan.points.iter().any(|p| p == name) && roll() < plan.percent {
            eprintln!("fault injection: crashing at {name}");
            std::process::abort();
        }
    }
}

/// Aborts the process here, if this test build is told to.
#[cfg(feature = "fault-injection")]
pub fn crash_point(name: &str) {
    active::crash_point(name);
}

/// Aborts the process here, if this test build is told to (never, without the feature).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// Arms pause point `name` for the next run of `route` that reaches it (per route, so that tests
/// running side by side do not take each other's pauses); the returned gate says when one did
/// (`reached`) and lets it go on (`release`).
#[cfg(feature = "fault-injection")]
pub fn hold(name: &str, route: &str) -> std::sync::Arc<active::Gate> {
    active::hold(name, route)
}

/// Waits here while a test holds this point for this route.
#[cfg(feature = "fault-injection")]
pub async fn pause_point(name: &str, route: &str) {
    active::pause_point(name, route).await;
}

/// Waits here while a test holds this point (never, without the feature).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn pause_point(_name: &str, _route: &str) {}
