//! Schedules: recurring submits from the routes file, each tick one ordinary operation.
//! Ticks are `every` apart (aligned to the Unix epoch) or where a cron expression matches the
//! wall clock of a time zone; either way a tick is an instant, so every replica computes the
//! same ticks whatever its own time zone.
//!
//! Every replica runs every schedule, and every replica submits every tick: the tick's
//! idempotency key, `schedule:<name>:<tick time>`, makes the replicas' submits one operation
//! (the first creates it, the others are replays), so a tick fires exactly once with no leader,
//! lock or extra record, and a replica that dies or lags changes nothing.
//!
//! Catch-up: a replica fires the latest tick at or before now when it starts, and when its clock
//! jumps or it was held up past a tick, the latest one then; earlier missed ticks are skipped. So
//! after an outage of every replica, the last tick missed fires once, at restart, unless it is
//! older than the route's retention (its key may be gone, so it could fire twice). A tick whose
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
use crate::config::{Cadence, RouteConfig, ScheduleConfig};
use crate::lifecycle::sleep_or_stop;
use crate::metrics::SCHEDULE_TICKS;

/// Runs `schedule` on `route` until `stop`.
pub async fn run(
    ops: Operations,
    schedule: ScheduleConfig,
    route: RouteConfig,
    stop: CancellationToken,
) {
    let mut tick = latest_tick(&schedule.cadence, OffsetDateTime::now_utc());
    loop {
        let now = OffsetDateTime::now_utc();
        let Some(next) = next_tick(&schedule.cadence, tick.unwrap_or(now)) else {
            tracing::warn!(schedule = %schedule.name, "The schedule has no more ticks.");
            return;
        };
        // A tick older than the route's retention may have fired and had its key expire since,
        // so firing it now could fire it twice: it is skipped (only a sparse cron schedule after
        // a long outage has one).
        if let Some(tick) = tick.filter(|&tick| now - tick < route.retention) {
            // Each tick on its own: one that meets a JetStream outage (a leader election) keeps
            // trying while the next ones fire on time.
            let give_up = tick + (next - tick).unsigned_abs().max(FIRE_PATIENCE);
            tokio::spawn({
                let (ops, schedule, route, stop) =
                    (ops.clone(), schedule.clone(), route.clone(), stop.clone());
                async move { fire(&ops, &schedule, &route, tick, give_up, &stop).await }
            });
        }
        let now = OffsetDateTime::now_utc();
        if next > now && sleep_or_stop(&stop, (next - now).unsigned_abs()).await {
            return;
        }
        if stop.is_cancelled() {
            return;
        }
        // Held up past more than one tick (a clock jump, a long pause): only the latest fires.
        tick = latest_tick(&schedule.cadence, OffsetDateTime::now_utc()).max(Some(next));
    }
}

/// The latest tick at or before `now`, if any.
fn latest_tick(cadence: &Cadence, now: OffsetDateTime) -> Option<OffsetDateTime> {
    match cadence {
        Cadence::Every(every) => {
            let every_ns = every.as_nanos().max(1) as i128;
            let now_ns = now.unix_timestamp_nanos();
            OffsetDateTime::from_unix_timestamp_nanos(now_ns - now_ns.rem_euclid(every_ns)).ok()
        }
        Cadence::Cron { cron, zone } => from_chrono(
            cron.find_previous_occurrence(&to_chrono(now, zone)?, true)
                .ok()?,
        ),
    }
}

/// The first tick after `after`, if any.
fn next_tick(cadence: &Cadence, after: OffsetDateTime) -> Option<OffsetDateTime> {
    match cadence {
        Cadence::Every(every) => latest_tick(cadence, after).map(|tick| tick + *every),
        Cadence::Cron { cron, zone } => from_chrono(
            cron.find_next_occurrence(&to_chrono(after, zone)?, false)
                .ok()?,
        ),
    }
}

/// `at` in `zone`, cut to the whole second: cron's finest unit, and croner keeps the fraction of
/// its input in what it finds, which would give each replica a tick (and key) of its own.
fn to_chrono(at: OffsetDateTime, zone: &chrono_tz::Tz) -> Option<chrono::DateTime<chrono_tz::Tz>> {
    use chrono::TimeZone as _;
    zone.timestamp_opt(at.unix_timestamp(), 0).single()
}

fn from_chrono(at: chrono::DateTime<chrono_tz::Tz>) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(at.timestamp()).ok()
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
/// the store is unavailable, until `give_up`.
async fn fire(
    ops: &Operations,
    schedule: &ScheduleConfig,
    route: &RouteConfig,
    tick: OffsetDateTime,
    give_up: OffsetDateTime,
    stop: &CancellationToken,
) {
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
            redrive_of: None,
            body_object: None,
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

    fn at(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(s).unwrap()
    }

    fn cron(pattern: &str, zone: &str) -> Cadence {
        Cadence::Cron {
            cron: Box::new(croner::parser::CronParser::new().parse(pattern).unwrap()),
            zone: zone.parse().unwrap(),
        }
    }

    /// The ticks from `from` (exclusive) up to `until`, in RFC 3339 UTC.
    fn ticks(cadence: &Cadence, from: &str, until: &str) -> Vec<String> {
        let parse = |t: &str| {
            OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
        };
        let (mut t, until) = (parse(from), parse(until));
        let mut out = Vec::new();
        while let Some(next) = next_tick(cadence, t).filter(|&n| n <= until) {
            out.push(handlers::contract::format_time(next));
            t = next;
        }
        out
    }

    #[test]
    fn ticks_are_aligned_to_the_epoch() {
        let every = Cadence::Every(Duration::from_secs(10));
        assert_eq!(
            latest_tick(&every, at(1_000_000_005)),
            Some(at(1_000_000_000))
        );
        assert_eq!(
            latest_tick(&every, at(1_000_000_010)),
            Some(at(1_000_000_010))
        );
        assert_eq!(latest_tick(&every, at(-5)), Some(at(-10)));
        assert_eq!(
            next_tick(&every, at(1_000_000_010)),
            Some(at(1_000_000_020))
        );
        assert_eq!(
            tick_key("nightly", at(1_000_000_000)),
            "schedule:nightly:2001-09-09T01:46:40Z"
        );
    }

    /// A cron schedule ticks on the wall clock of its zone: 02:30 in Berlin is 01:30 UTC in
    /// winter and 00:30 UTC in summer; on the spring-forward night 02:30 does not exist and the
    /// tick is at 03:00 local (01:00 UTC); on the fall-back night 02:30 happens twice and ticks
    /// once.
    #[test]
    fn cron_ticks_follow_the_wall_clock_of_their_zone_across_daylight_saving() {
        let nightly = cron("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            ticks(&nightly, "2026-03-27T12:00:00Z", "2026-03-31T12:00:00Z"),
            [
                "2026-03-28T01:30:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-30T00:30:00Z",
                "2026-03-31T00:30:00Z"
            ]
        );
        assert_eq!(
            ticks(&nightly, "2026-10-24T12:00:00Z", "2026-10-27T12:00:00Z"),
            [
                "2026-10-25T00:30:00Z",
                "2026-10-26T01:30:00Z",
                "2026-10-27T01:30:00Z"
            ]
        );
        // The latest tick at or before now, for catch-up; seconds in a sixth field; a tick is
        // a whole second whatever the fraction of now (replicas' clocks differ in it).
        let every_20s = cron("*/20 * * * * *", "UTC");
        let now = at(1_000_000_005) + Duration::from_nanos(123_456_789);
        assert_eq!(latest_tick(&every_20s, now), Some(at(1_000_000_000)));
        assert_eq!(next_tick(&every_20s, now), Some(at(1_000_000_020)));
        assert_eq!(
            latest_tick(&nightly, at(1_000_000_000)).map(handlers::contract::format_time),
            Some("2001-09-09T00:30:00Z".to_owned())
        );
    }
}
