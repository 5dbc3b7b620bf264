//! The HTTP edge of the sync-async gateway: turns an HTTP request into exactly one JetStream message,
//! answers `202 Accepted` with a status resource, and later serves the worker's reply, from any
//! replica.
//!
//! # Layout
//! Three wings, imports only downward (`scripts/check-layers` checks it):
//! - [`cli`]: the binary's subcommands (`serve`, `dev`, `dispatch`, `openapi`);
//! - this file: [`run`], which wires one gateway process together and drains it;
//! - [`http`]: THE EDGE: router, layers, handlers, problem+json; never names async-nats;
//! - [`operations`]: THE CORE: operations read and written in JetStream; never names axum, hyper
//!   or tower;
//! - below them all, the `handlers` crate: the wire contract and the JetStream primitives.
//!
//! Leaves anyone may use: [`config`] (settings and the routes file), [`metrics`], [`telemetry`],
//! [`lifecycle`] (draining and readiness flags), [`tls`] (the process-wide crypto provider).

pub mod cli;
pub mod config;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod operations;
pub mod telemetry;
pub mod tls;

pub use tls::install_crypto_provider;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::routes::AuthConfig;
use crate::config::{ConfigError, RoutesFile, Settings};
use crate::http::AppState;
use crate::http::auth::{AuthConfigError, Authenticator};
use crate::lifecycle::Lifecycle;
use crate::operations::{
    Background, Limit, Operations, QuotaLimits, RetryAfter, StoreError, StreamPlan, WebhookError,
};

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Webhooks(#[from] WebhookError),
    #[error(transparent)]
    Admin(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
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
/// Each tenant's quotas: its own from `[auth.tenant.<name>]`, else the settings'.
fn quota_limits(settings: &Settings, auth: Option<&AuthConfig>) -> QuotaLimits {
    let default = Limit {
        max_pending: settings.limits.tenant_max_pending,
        max_bytes: settings.limits.tenant_max_bytes.0 as u64,
    };
    let tenants = auth
        .map(|auth| &auth.tenants)
        .into_iter()
        .flatten()
        .map(|(name, tenant)| {
            let limit = Limit {
                max_pending: tenant.max_pending.unwrap_or(default.max_pending),
                max_bytes: tenant.max_bytes.map_or(default.max_bytes, |b| b.0 as u64),
            };
            (name.clone(), limit)
        })
        .collect();
    QuotaLimits { default, tenants }
}

pub async fn run(
    settings: Settings,
    config: RoutesFile,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let RoutesFile {
        routes,
        auth,
        schedules,
    } = config;
    let authenticator = auth
        .as_ref()
        .map(Authenticator::new)
        .transpose()?
        .map(Arc::new);
    install_crypto_provider();
    let admin = crate::metrics::bind_admin(settings.admin.admin_listen).await?;
    let names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    crate::metrics::start_at_zero(&names);
    let lifecycle = Lifecycle::default();
    let retry_after = RetryAfter::new(
        settings.retry_after_secs,
        routes.iter().map(|r| r.name.clone()),
    );
    let quotas = quota_limits(&settings, auth.as_ref());
    let ops = Operations::connect(
        &settings.jetstream,
        &routes,
        retry_after,
        lifecycle.clone(),
        quotas,
    )
    .await?;
    let tenant_receivers = authenticator
        .as_ref()
        .is_some_and(|auth| auth.any_callback_allow());
    let state = AppState::new(&settings, ops.clone(), lifecycle.clone(), authenticator)?;
    let app = http::router(state.clone(), &routes)?;
    let webhooks = ops.webhooks(&settings.webhooks, &routes, tenant_receivers)?;

    let stop = CancellationToken::new();
    let plan = StreamPlan {
        replicas: settings.jetstream.stream_replicas,
        duplicate_window: settings.jetstream.duplicate_window,
        max_retention: routes.iter().map(|r| r.retention).max().unwrap_or_default(),
        // What travels in a message: a body up to `inline_max` where a route has one.
        body_limits: routes
            .iter()
            .map(|r| (r.name.clone(), r.inline_max.unwrap_or(r.max_body).0))
            .collect(),
        bodies: routes
            .iter()
            .filter(|r| r.inline_max.is_some())
            .map(|r| (r.name.clone(), r.retention))
            .collect(),
        max_bytes: settings.jetstream.stream_max_bytes,
    };
    let background = Background {
        consumers: routes
            .iter()
            .map(|r| (r.name.clone(), r.consumer_name()))
            .collect(),
        retry_after_max_secs: settings.retry_after_max_secs,
        webhooks,
    };
    let provisioning = ops.start(plan, background, stop.clone());
    ops.run_schedules(schedules, &routes, stop.clone());
    tokio::spawn(crate::metrics::serve_admin(admin, stop.clone()));
    let (signalled, fatal) = (lifecycle.clone(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            // A fatal provisioning error stops the gateway without a signal.
            () = fatal.cancelled() => {}
        }
        tracing::info!("Draining: not ready, taking no new requests, finishing those in flight.");
        ::metrics::gauge!(crate::metrics::DRAINING).set(1.0);
        signalled.drain();
    });
    tracing::info!(listen = %listener.local_addr()?, routes = routes.len(), "Gateway listening.");

    let limits = crate::http::server::ConnectionLimits {
        max_connections: settings.limits.max_connections,
        header_read_timeout: settings.limits.header_read_timeout,
        keep_alive_timeout: settings.limits.keep_alive_timeout,
        max_headers: settings.limits.max_headers,
        max_header_bytes: settings.limits.max_header_bytes,
    };
    let drained = lifecycle.clone();
    let server = crate::http::server::serve(listener, app, limits, async move {
        drained.draining().await;
        // The listener stays open while accepts are in flight: a request arriving meanwhile gets
        // a `503 shutting-down` it can act on, not a refused connection.
        state.idle().await;
    });
    let grace = settings.shutdown_grace;
    tokio::select! {
        () = server => {}
        () = async { lifecycle.draining().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "Grace period over; dropping requests still open.");
        }
    }
    stop.cancel();
    match provisioning.await {
        Ok(Err(fatal)) => Err(fatal.into()),
        _ => Ok(()),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("Shutdown signal received; draining.");
}
