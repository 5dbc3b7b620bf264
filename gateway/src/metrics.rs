//! Prometheus metrics: every metric name the gateway records, the recorder, and the admin HTTP
//! server that serves `/metrics` on its own port (so scraping never competes with, or is exposed
//! beside, client traffic).
//!
//! Code records through the `metrics` facade with the names below; nothing else names a metric.
//! The recorder is process-wide; several gateways in one process (tests) share it.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// HTTP requests answered, by `route` (a configured route's name, or the gateway endpoint) and
/// `status` (the HTTP status code).
pub const HTTP_REQUESTS: &str = "gateway_http_requests_total";
/// Seconds from a submission's arrival to its answer (202, or the result when waited for), by
/// `route`.
pub const ACCEPT_SECONDS: &str = "gateway_accept_duration_seconds";
/// Submissions answered from an existing operation (same key), by `route`.
pub const IDEMPOTENT_REPLAYS: &str = "gateway_idempotent_replays_total";
/// Terminal records the gateway saw land, by `status` (succeeded, failed, expired, cancelled),
/// counted by the replica's watch of the results stream (from just after readiness; results that
/// land while the watch reconnects are not counted). Every replica sees every result: aggregate
/// with `max`, not `sum`.
pub const RESULTS: &str = "gateway_results_total";
/// The gateway's own terminal markers refused because a result was stored first (an expiry or a
/// cancellation that lost the race), by `writer` (`expiry`, `cancel`). Workers' conflicting
/// replies are counted where they happen: `gateway_dispatch_replies_total{outcome="conflict"}`,
/// or `WorkerStats::conflicts` in a `handlers` worker.
pub const RESULT_CONFLICTS: &str = "gateway_result_conflicts_total";
/// Requests a route's workers have not finished (the workers' consumer's pending plus
/// unacknowledged messages), by `route`; absent while the consumer does not exist.
pub const PENDING_OPERATIONS: &str = "gateway_pending_operations";
/// JetStream calls that failed or timed out behind an HTTP answer, by `kind`
/// (`unavailable`, `outcome_unknown`).
pub const JETSTREAM_ERRORS: &str = "gateway_jetstream_errors_total";
/// Request writes grouped into JetStream atomic batches (`GATEWAY_GROUP_COMMIT`), by `outcome`
/// (`committed`; `refused`: each request then written on its own; `unknown`: no answer).
pub use handlers::jetstream::GROUP_COMMITS;
/// Operations some client is waiting on right now (long polls, `Prefer: wait`, event streams).
pub const WAITERS: &str = "gateway_waiters";
/// Webhook delivery attempts, by `outcome` (`delivered`, `failed`, `dead_lettered`, `abandoned`).
pub const WEBHOOK_DELIVERIES: &str = "gateway_webhook_deliveries_total";
/// Requests refused at once because `GATEWAY_MAX_IN_FLIGHT` requests were busy.
pub const SHED: &str = "gateway_shed_total";
/// 1 while the process is draining after SIGTERM.
pub const DRAINING: &str = "gateway_draining";
/// `gateway dispatch`: replies stored, by `outcome` (`replied`, `failed`, `conflict`,
/// `cancelled`, `expired`, `skipped`), mirrored from the worker library's counters.
pub const DISPATCH_REPLIES: &str = "gateway_dispatch_replies_total";
/// `gateway dispatch`: failed attempts offered again after their back-off (the route's retry
/// policy, or an upstream's `Retry-After`).
pub const DISPATCH_RETRIES: &str = "gateway_dispatch_retries_total";
/// Schedule ticks submitted by this replica, by `schedule` and `outcome` (`new`: this replica
/// created the tick's operation; `replayed`: another had; `failed`).
pub const SCHEDULE_TICKS: &str = "gateway_schedule_ticks_total";
/// Operations with a delayed start (`Delay`, `Not-Before`) this replica accepted, by `route`.
/// How many are still `scheduled` is not a replica's to know (they are not due by the cluster's
/// clock, and another replica may cancel one); they are part of `gateway_pending_operations`.
pub const DELAYED_ACCEPTED: &str = "gateway_delayed_accepted_total";
/// Redrives of failed operations asked of this replica, by `route` and `outcome` (`new`: a
/// redrive operation was made; `replayed`: an earlier redrive's was found).
pub const REDRIVES: &str = "gateway_redrives_total";
/// Failed operations this replica added to the failure index, by `route`.
pub const FAILURES_INDEXED: &str = "gateway_failures_indexed_total";

/// Upper bounds of the accept-latency histogram, in seconds.
const ACCEPT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on the admin address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The process's recorder, installed on first use.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ACCEPT_SECONDS.to_owned()), ACCEPT_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder (an embedding application's) wins; this one then stays empty.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route and status code."
    );
    describe_histogram!(
        ACCEPT_SECONDS,
        Unit::Seconds,
        "Time from a submission's arrival to its answer, by route."
    );
    describe_counter!(
        IDEMPOTENT_REPLAYS,
        "Submissions answered from an existing operation."
    );
    describe_counter!(RESULTS, "Terminal records seen, by status.");
    describe_counter!(
        DELAYED_ACCEPTED,
        "Operations with a delayed start accepted, by route."
    );
    describe_counter!(
        REDRIVES,
        "Redrives of failed operations, by route and outcome (new, replayed)."
    );
    describe_counter!(
        FAILURES_INDEXED,
        "Failed operations added to the failure index, by route."
    );
    describe_counter!(
        RESULT_CONFLICTS,
        "Results refused because another was stored first."
    );
    describe_gauge!(
        PENDING_OPERATIONS,
        "Requests the route's workers have not finished."
    );
    describe_counter!(
        JETSTREAM_ERRORS,
        "JetStream failures behind an HTTP answer."
    );
    describe_gauge!(WAITERS, "Operations clients are waiting on.");
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook delivery attempts, by outcome.");
    describe_counter!(SHED, "Requests refused at once for lack of capacity.");
    describe_gauge!(DRAINING, "1 while draining after SIGTERM.");
    describe_counter!(DISPATCH_REPLIES, "Dispatcher replies, by outcome.");
    describe_counter!(
        SCHEDULE_TICKS,
        "Schedule ticks submitted, by schedule and outcome (new, replayed, failed)."
    );
    describe_counter!(
        DISPATCH_RETRIES,
        "Dispatcher attempts that failed and were offered again after their back-off."
    );
}

/// Puts every series whose labels are known at start at zero, so that dashboards and alerts
/// (`rate(...)`, `absent(...)`) see them before their first event rather than nothing. Counters
/// are only touched (`increment(0)`): another gateway in the same process keeps its counts.
pub fn start_at_zero(routes: &[String]) {
    use metrics::{counter, gauge};
    // The recorder first: touches before it would go nowhere.
    handle();
    counter!(SHED).increment(0);
    gauge!(DRAINING).set(0.0);
    gauge!(WAITERS).increment(0.0);
    for outcome in ["delivered", "failed", "dead_lettered", "abandoned"] {
        counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).increment(0);
    }
    for kind in ["unavailable", "outcome_unknown"] {
        counter!(JETSTREAM_ERRORS, "kind" => kind).increment(0);
    }
    for status in ["succeeded", "failed", "expired", "cancelled"] {
        counter!(RESULTS, "status" => status).increment(0);
    }
    for writer in ["expiry", "cancel"] {
        counter!(RESULT_CONFLICTS, "writer" => writer).increment(0);
    }
    for route in routes {
        counter!(IDEMPOTENT_REPLAYS, "route" => route.clone()).increment(0);
    }
}

/// Binds the admin server's address (port 0 picks one).
pub async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `/metrics` (Prometheus text format) and `/livez` until `stop`, and keeps the
/// recorder's upkeep: a histogram keeps each recorded sample until it is drained into its
/// buckets, which only a scrape or `run_upkeep` does, so without it the gateway's memory grew
/// by every request's latency sample until the next scrape (metrics-exporter-prometheus,
/// `PrometheusBuilder::build_recorder`: "the caller is responsible for ensuring that upkeep is
/// run periodically").
pub async fn serve_admin(listener: TcpListener, stop: CancellationToken) {
    let handle = handle();
    let upkeep = handle.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        loop {
            tokio::select! {
                _ = every.tick() => upkeep.run_upkeep(),
                () = upkeep_stop.cancelled() => return,
            }
        }
    });
    let app = Router::new()
        .route("/metrics", get(move || async move { handle.render() }))
        .route("/livez", get(|| async { "ok" }));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(admin_listen = %addr, "Admin server listening.");
    }
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "Admin server stopped.");
    }
}
