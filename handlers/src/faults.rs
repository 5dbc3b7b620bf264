//! Crash points for fault-injection tests: with the `fault-injection` feature, the process aborts
//! at a named point with the probability `HANDLERS_CRASH_PERCENT` (0-100) when the point is listed
//! in `HANDLERS_CRASH_POINTS` (comma-separated). Without the feature every point is a no-op, so
//! release builds carry nothing of this.
//!
//! Points: `before-commit`, `after-commit` (state committed, reply not yet published),
//! `after-publish` (reply published, request not yet acked).

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
