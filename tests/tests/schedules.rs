//! Schedules against a real nats-server: a schedule (an interval, and a cron expression in a time
//! zone) run by three gateway replicas fires each tick exactly once (one operation per tick, none
//! missing), and after an outage of every replica
//! the latest missed tick fires once at restart while earlier ones are skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use gateway_tests::*;
use handlers::contract::{DEFAULT_REQUESTS_STREAM, header, header_str};
use time::OffsetDateTime;

const ROUTES: &str = r#"
[[route]]
name = "ticks"
method = "POST"
path = "/ticks"
retention = "1h"

[[schedule]]
name = "every-ten"
route = "ticks"
every = "10s"
body = '{"report": "daily"}'
content_type = "application/json"

# The same ticks from a cron expression, read on a wall clock 5:45 ahead of UTC.
[[schedule]]
name = "cron-ten"
route = "ticks"
cron = "*/10 * * * * *"
time_zone = "Asia/Kathmandu"
"#;

const EVERY: i64 = 10;

/// Operations per tick (its Unix second) of schedule `name`, from the requests stream.
async fn ticks(nats: &Nats, name: &str) -> BTreeMap<i64, usize> {
    let js = nats.jetstream().await;
    let mut ticks = BTreeMap::new();
    for message in gateway_tests::history::read_stream(&js, DEFAULT_REQUESTS_STREAM)
        .await
        .unwrap()
    {
        let key = header_str(message.headers.as_ref().unwrap(), header::IDEMPOTENCY_KEY)
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let Some(at) = key.strip_prefix(&format!("schedule:{name}:")) else {
            assert!(key.starts_with("schedule:"), "only schedules submit: {key}");
            continue;
        };
        let at = OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp();
        assert_eq!(at % EVERY, 0, "ticks are aligned to the epoch: {key}");
        *ticks.entry(at).or_default() += 1;
    }
    ticks
}

/// Sleeps until `at` (a Unix second) by the wall clock.
async fn sleep_until(at: i64) {
    let left = at as f64 - OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9;
    if left > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(left)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_fire_each_tick_once_and_catch_up_the_latest_missed() {
    let nats = Nats::start().await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(TestGateway::builder(ROUTES).nats(&nats).start().await);
    }
    // A minute of ticks, from the next boundary on.
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let first = now - now.rem_euclid(EVERY) + EVERY;
    let last = first + 60 - EVERY;
    sleep_until(last + 2).await;
    for name in ["every-ten", "cron-ten"] {
        let seen = ticks(&nats, name).await;
        let window: Vec<(i64, usize)> = seen.range(first..=last).map(|(at, n)| (*at, *n)).collect();
        eprintln!("{name}: ticks in the minute from {first}: {window:?}");
        assert_eq!(window.len(), 6, "one operation per tick: {window:?}");
        assert!(window.iter().all(|(_, n)| *n == 1), "{window:?}");
        assert!(
            seen.values().all(|n| *n == 1),
            "no tick fired twice: {seen:?}"
        );
    }

    // Every replica down for two and a half ticks; one comes back.
    for replica in replicas {
        replica.stop().await;
    }
    let down_at = OffsetDateTime::now_utc().unix_timestamp();
    let before = ticks(&nats, "every-ten").await;
    let last_fired = *before.keys().next_back().unwrap();
    sleep_until(down_at + 25).await;
    let back = TestGateway::builder(ROUTES).nats(&nats).start().await;
    let restarted = OffsetDateTime::now_utc().unix_timestamp();
    let latest = restarted - restarted.rem_euclid(EVERY);
    let after = eventually("the latest missed tick", Duration::from_secs(5), || async {
        let after = ticks(&nats, "every-ten").await;
        after.contains_key(&latest).then_some(after)
    })
    .await;
    let caught_up: Vec<i64> = after
        .keys()
        .filter(|at| **at > last_fired && **at <= latest)
        .copied()
        .collect();
    eprintln!("down from {down_at}, back at {restarted}: fired {caught_up:?}");
    assert_eq!(
        caught_up,
        [latest],
        "only the latest missed tick fires, once"
    );
    assert!(after.values().all(|n| *n == 1), "{after:?}");
    back.stop().await;
}
