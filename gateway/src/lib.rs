//! The HTTP edge of the sync-async gateway: turns an HTTP request into exactly one JetStream message,
//! answers `202 Accepted` with a status resource, and later serves the worker's reply, from any
//! replica.
//!
//! # Layout
//! - [`config`]: process settings (flags, `GATEWAY_*` env) and the routes file; validation.
//! - [`auth`]: API keys and JWTs mapped to tenants; per-tenant rate limits.
//! - [`server`]: the HTTP server loop: connection cap, header timeout and size caps, draining.
//! - [`http`]: the router, the handlers and the tower layers, assembled in one place.
//! - [`idempotency`]: Idempotency-Key parsing, key tokens, operation ids, fingerprints (pure).
//! - [`accept`]: one request in, exactly one message per key written, or the existing operation found.
//! - [`operations`]: reading an operation back and deriving its status; settling expiry;
//!   waiting for the end; cancelling.
//! - [`watch`]: one results consumer per process waking in-process waiters (no subscription
//!   per waiter).
//! - [`prefer`]: the `Prefer` header (`wait=N`, `respond-async`).
//! - [`store`]: the JetStream connection and streams; the request path's JetStream work (the
//!   HTTP handlers never call async-nats).
//! - [`openapi`]: the OpenAPI 3.1 document (the handlers' annotations plus the configured routes).
//! - [`metrics`]: every metric name, the Prometheus recorder, the admin server.
//! - [`telemetry`]: the process's logs (text or JSON) and OpenTelemetry spans.
//! - [`retry_after`]: `Retry-After` of pending operations from each route's backlog.
//! - [`webhooks`]: signed completion webhooks.
//! - [`error`]: the one HTTP error type and its problem+json mapping.
//! - [`dev`]: `gateway dev`, the one-command local setup (nats-server child + example worker).
//! - [`dispatch`]: `gateway dispatch`, the worker-side sidecar that calls a local HTTP app.
//! - [`cli`]: the binary's entry point.
//!
//! The wire contract (subjects, headers, message shapes) is not here: it lives in the `handlers`
//! crate, which workers use too.

pub mod accept;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dev;
pub mod dispatch;
pub mod error;
pub mod http;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod operations;
pub mod prefer;
pub mod retry_after;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod watch;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, RoutesFile, Settings, header_allow_list};
use crate::http::AppState;
use crate::retry_after::RetryAfter;
use crate::store::{Store, StoreError, StreamPlan};
use crate::watch::{Followed, Watch};
use crate::webhooks::{WebhookError, Webhooks};

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Webhooks(#[from] WebhookError),
    #[error(transparent)]
    Admin(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthConfigError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Runs the gateway on `listener` until `shutdown` resolves, then drains.
///
/// The listener opens at once; JetStream is connected and the streams provisioned in the
/// background (retrying), and until then `/readyz` says not ready and submissions get 503.
///
/// Draining, when `shutdown` resolves: `/readyz` answers 503 and new requests get
/// `503 shutting-down` at once; waiters (`Prefer: wait`, long polls, event streams) answer at once
/// with the state they have; requests in flight finish (an accept answers 202 only after its
/// JetStream ack, as always); then the listener closes and idle connections with it. Whatever is
/// still open when `GATEWAY_SHUTDOWN_GRACE` has passed is dropped.
pub async fn run(
    settings: Settings,
    config: RoutesFile,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let RoutesFile { routes, auth } = config;
    let authenticator = auth
        .as_ref()
        .map(crate::auth::Authenticator::new)
        .transpose()?
        .map(Arc::new);
    let admin = crate::metrics::bind_admin(settings.admin.admin_listen).await?;
    let store = Arc::new(Store::connect(&settings).await?);
    let watch = Watch::default();
    let waiters = watch.clone();
    let retry_after = RetryAfter::new(
        settings.retry_after_secs,
        routes.iter().map(|r| r.name.clone()),
    );
    let state = AppState {
        store: store.clone(),
        retry_after_secs: settings.retry_after_secs,
        retry_after: retry_after.clone(),
        in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
        max_wait: settings.max_wait,
        event_streams: Arc::new(Semaphore::new(settings.max_event_streams)),
        watch: watch.clone(),
        callback_allow: settings.callback_allow.clone().into(),
        callback_allow_private: settings.callback_allow_private,
        auth: authenticator,
        rate_limits: crate::auth::RateLimits::new(settings.tenant_rate, settings.tenant_burst),
        body_read_timeout: settings.body_read_timeout,
        max_headers: settings.max_headers,
        max_header_bytes: settings.max_header_bytes,
        forward_headers: header_allow_list(&settings.forward_headers)?.into(),
        result_headers: header_allow_list(&settings.result_headers)?.into(),
        #[cfg(feature = "fault-injection")]
        abort_after_publish: settings.fault_abort_after_publish,
    };
    let state_in_flight = state.in_flight.clone();
    let app = http::router(state, &routes)?;
    let any_route_callback = routes.iter().any(|r| r.callback_url.is_some());
    let webhooks = Webhooks::new(store.clone(), &settings, any_route_callback)?;
    let plan = StreamPlan {
        webhook_consumer: webhooks.as_ref().map(Webhooks::consumer_config),
        replicas: settings.stream_replicas,
        duplicate_window: settings.duplicate_window,
        max_retention: routes.iter().map(|r| r.retention).max().unwrap_or_default(),
        body_limits: routes
            .iter()
            .map(|r| (r.name.clone(), r.max_body.0))
            .collect(),
    };

    let stop = CancellationToken::new();
    // Waiters wake on results and on progress reports.
    tokio::spawn(watch.clone().follow(
        store.jetstream().clone(),
        store.results_stream().to_owned(),
        store.subjects().all_results(),
        Followed::Results,
        stop.clone(),
    ));
    tokio::spawn(watch.follow(
        store.jetstream().clone(),
        store.events_stream().to_owned(),
        store.subjects().all_progress(),
        Followed::Progress,
        stop.clone(),
    ));
    tokio::spawn(
        retry_after.follow(
            store.clone(),
            routes
                .iter()
                .map(|r| (r.name.clone(), r.consumer_name()))
                .collect(),
            settings.retry_after_max_secs,
            stop.clone(),
        ),
    );
    if let Some(webhooks) = webhooks {
        tokio::spawn(webhooks.run(stop.clone()));
    }
    tokio::spawn(crate::metrics::serve_admin(admin, stop.clone()));
    let provisioning = tokio::spawn(provision_until_done(store, plan, stop.clone()));
    let draining = CancellationToken::new();
    let on_signal = (draining.clone(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            // A fatal provisioning error stops the gateway without a signal.
            () = on_signal.1.cancelled() => {}
        }
        tracing::info!("Draining: not ready, taking no new requests, finishing those in flight.");
        ::metrics::gauge!(crate::metrics::DRAINING).set(1.0);
        waiters.drain();
        on_signal.0.cancel();
    });
    tracing::info!(listen = %listener.local_addr()?, routes = routes.len(), "Gateway listening.");

    let (in_flight, capacity) = (state_in_flight, settings.max_in_flight);
    let drained = draining.clone();
    let limits = crate::server::ConnectionLimits {
        max_connections: settings.max_connections,
        header_read_timeout: settings.header_read_timeout,
        max_headers: settings.max_headers,
        max_header_bytes: settings.max_header_bytes,
    };
    let server = crate::server::serve(listener, app, limits, async move {
        drained.cancelled().await;
        // The listener stays open while accepts are in flight: a request arriving meanwhile gets
        // a `503 shutting-down` it can act on, not a refused connection.
        while in_flight.available_permits() < capacity {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let grace = settings.shutdown_grace;
    tokio::select! {
        () = server => {}
        () = async { draining.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "Grace period over; dropping requests still open.");
        }
    }
    stop.cancel();
    match provisioning.await {
        Ok(Err(fatal)) => Err(fatal.into()),
        _ => Ok(()),
    }
}

/// Provisions the streams, retrying while NATS is unreachable. A configuration the server cannot
/// honour (a body limit above its max_payload) stops the gateway.
async fn provision_until_done(
    store: Arc<Store>,
    plan: StreamPlan,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    loop {
        match store.provision(&plan).await {
            Ok(()) => {
                tracing::info!("JetStream streams provisioned; gateway ready.");
                return Ok(());
            }
            Err(fatal @ StoreError::PayloadLimit { .. }) => {
                tracing::error!(error = %fatal, "Configuration does not fit the NATS server; stopping.");
                stop.cancel();
                return Err(fatal);
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot provision streams yet; retrying.");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
