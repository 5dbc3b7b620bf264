//! Schedules: recurring submits from the routes file, each tick one ordinary operation.
//!
//! Every replica runs every schedule, and every replica submits every tick: the tick's
//! idempotency key, `schedule:<name>:<tick time>`, makes the replicas' submits one operation
//! (the first creates it, the others are replays), so a tick fires exactly once with no leader,
//! lock or extra record, and a replica that dies or lags changes nothing. Ticks are `every`
//! apart, aligned to the Unix epoch, so all replicas agree on them whatever their time zone.
//!
//! Catch-up: a replica fires the latest tick at or before now when it starts, and when its clock
//! jumps or it was held up past a tick, the latest one then; earlier missed ticks are skipped. So
//! after an outage of every replica, the last tick missed fires once, at restart. A tick whose
//! submit meets a JetStream outage is tried again for a minute (or a period), on its own task.
//!
//! Why not JetStream's message schedules (`Nats-Schedule`, nats-server 2.12+, verified on 2.15.1):
//! a stream with `allow_msg_schedules` must discard old messages and has roll-ups forced on,
//! while the requests stream discards new ones (that is what makes a request its idempotency
//! record) and must refuse roll-ups.

use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{AcceptError, Accepted, Operations, Start, Submission};
use crate::config::{RouteConfig, ScheduleConfig};
use crate::lifecycle::sleep_or_stop;
use crate::metrics::SCHEDULE_TICKS;

/// Runs `schedule` on `route` until `stop`.
pub async fn run(
    ops: Operations,
    schedule: ScheduleConfig,
    route: RouteConfig,
    stop: CancellationToken,
) {
    let mut tick = latest_tick(OffsetDateTime::now_utc(), schedule.every);
    loop {
        // Each tick on its own: one that meets a JetStream outage (a leader election) keeps
        // trying while the next ones fire on time.
        tokio::spawn({
            let (ops, schedule, route, stop) =
                (ops.clone(), schedule.clone(), route.clone(), stop.clone());
            async move { fire(&ops, &schedule, &route, tick, &stop).await }
        });
        let next = tick + schedule.every;
        let now = OffsetDateTime::now_utc();
        if next > now && sleep_or_stop(&stop, (next - now).unsigned_abs()).await {
            return;
        }
        if stop.is_cancelled() {
            return;
        }
        // Held up past more than one tick (a clock jump, a long pause): only the latest fires.
        tick = latest_tick(OffsetDateTime::now_utc(), schedule.every).max(next);
    }
}

/// The latest tick at or before `now`: a multiple of `every` since the Unix epoch.
fn latest_tick(now: OffsetDateTime, every: Duration) -> OffsetDateTime {
    let every_ns = every.as_nanos().max(1) as i128;
    let now_ns = now.unix_timestamp_nanos();
    OffsetDateTime::from_unix_timestamp_nanos(now_ns - now_ns.rem_euclid(every_ns)).unwrap_or(now)
}

/// The idempotency key of `schedule`'s tick at `tick`.
pub fn tick_key(schedule: &str, tick: OffsetDateTime) -> String {
    format!(
        "schedule:{schedule}:{}",
        handlers::contract::format_time(tick)
    )
}

/// How long a tick's submit is tried again while JetStream cannot take it (at least a period).
const FIRE_PATIENCE: Duration = Duration::from_secs(60);

/// Submits one tick, trying again (with the same key, so it converges on one operation) while
/// the store is unavailable, for [`FIRE_PATIENCE`] or a period, whichever is longer.
async fn fire(
    ops: &Operations,
    schedule: &ScheduleConfig,
    route: &RouteConfig,
    tick: OffsetDateTime,
    stop: &CancellationToken,
) {
    let give_up = tick + schedule.every.max(FIRE_PATIENCE);
    let method = route.http_method();
    loop {
        let submission = Submission {
            route,
            tenant: &schedule.tenant,
            idempotency_key: tick_key(&schedule.name, tick),
            method: method.as_str(),
            path: schedule.path(route),
            query: None,
            content_type: schedule.content_type.as_deref(),
            forwarded: Vec::new(),
            requested_callback_url: None,
            start: Start::default(),
            body: schedule.body.clone().into(),
        };
        let outcome = match ops.accept(submission).await {
            Ok(Accepted::New(op)) => {
                tracing::info!(schedule = %schedule.name, operation_id = %op.id(), tick = %handlers::contract::format_time(tick), "Schedule tick fired.");
                "new"
            }
            // Another replica fired it first.
            Ok(Accepted::Replayed(_)) => "replayed",
            Err(AcceptError::Store(error)) if OffsetDateTime::now_utc() < give_up => {
                tracing::warn!(schedule = %schedule.name, %error, "Cannot fire the tick yet; trying again.");
                if sleep_or_stop(stop, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
            Err(error) => {
                tracing::error!(schedule = %schedule.name, %error, tick = %handlers::contract::format_time(tick), "Schedule tick not fired.");
                "failed"
            }
        };
        metrics::counter!(SCHEDULE_TICKS, "schedule" => schedule.name.clone(), "outcome" => outcome)
            .increment(1);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_aligned_to_the_epoch() {
        let at = |s: i64| OffsetDateTime::from_unix_timestamp(s).unwrap();
        let every = Duration::from_secs(10);
        assert_eq!(latest_tick(at(1_000_000_005), every), at(1_000_000_000));
        assert_eq!(latest_tick(at(1_000_000_010), every), at(1_000_000_010));
        assert_eq!(latest_tick(at(-5), every), at(-10));
        assert_eq!(
            tick_key("nightly", at(1_000_000_000)),
            "schedule:nightly:2001-09-09T01:46:40Z"
        );
    }
}
