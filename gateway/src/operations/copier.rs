//! The copier: workers' replies (wire contract 2) from the intake stream into the result slots.
//! One durable consumer per route (`gateway-copier-<route>`, filtered to the route's reply
//! subjects), shared by every replica, so that one route's flood or stuck replies never hold up
//! another's.
//!
//! A worker never writes the results stream. That stream keeps nats-server's subject delete
//! markers, and nats-server turns roll-ups on for such a stream (ADR-43), so any publisher to it
//! could send `Nats-Rollup: all` and purge every route's results: NATS permissions are on
//! subjects, not headers. The intake (`<prefix>.rep.>`) allows no roll-ups and no purges, and a
//! worker may publish only under its route's subjects there. Every replica shares one durable
//! consumer of it; for each reply the copier reads the request its subject names and hands both to
//! [`super::reply::copy`] (checks, then create-if-absent into the request's result slot, first
//! writer wins). It acks only after that, so a crash copies again, which the slot refuses; a
//! store it cannot reach is retried with a growing delay, a bounded number of times (a reply left
//! in the intake is still copied by the gateway that decides the operation's outcome, see
//! `reply::copy_waiting`). The intake is a work queue: an acked reply is gone from it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use handlers::contract::Subjects;
use handlers::jetstream::ack;
use tokio_util::sync::CancellationToken;

use super::lookup::confirmed_request_of;
use super::reply;
use super::store::{ConsumeError, Store, StoreError};
use crate::lifecycle::sleep_or_stop;

/// Replies copied at once per route and process.
const CONCURRENCY: usize = 32;
/// Deliveries of one reply before the copier leaves it to `reply::copy_waiting`.
const MAX_DELIVER: i64 = 20;
/// Failed starts of a route's consumer before each is a warning.
const QUIET_FAILURES: u32 = 8;

/// The copier loops of one gateway process, one per route.
pub struct Copier {
    store: Arc<Store>,
    routes: Vec<String>,
}

impl Copier {
    pub(super) fn new(store: Arc<Store>, routes: Vec<String>) -> Self {
        Self { store, routes }
    }

    /// Copies every route's replies until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let loops = self.routes.iter().map(|route| {
            let (store, stop) = (self.store.clone(), stop.clone());
            async move {
                let mut failures = 0u32;
                while !stop.is_cancelled() {
                    match consume(&store, route, &stop).await {
                        Ok(()) => failures = 0,
                        Err(error) => {
                            failures += 1;
                            if failures > QUIET_FAILURES {
                                tracing::warn!(%route, %error, "Cannot copy the route's replies; retrying.");
                            } else {
                                tracing::debug!(%route, %error, "Copier not ready; retrying.");
                            }
                        }
                    }
                    sleep_or_stop(&stop, Duration::from_millis(250)).await;
                }
            }
        });
        futures::future::join_all(loops).await;
    }
}

async fn consume(store: &Store, route: &str, stop: &CancellationToken) -> Result<(), ConsumeError> {
    let config = pull::Config {
        durable_name: Some(format!("gateway-copier-{route}")),
        filter_subject: store.subjects().route_replies(route),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: MAX_DELIVER,
        max_ack_pending: (CONCURRENCY * 4) as i64,
        ..Default::default()
    };
    let messages = store.pull(store.replies_stream(), config).await?;
    messages
        .take_until(stop.cancelled())
        .for_each_concurrent(CONCURRENCY, |message| async move {
            if let Ok(message) = message {
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
                let kind = match copy(store, &message).await {
                    Ok(()) => AckKind::Ack,
                    Err(error) => {
                        tracing::warn!(%error, subject = %message.subject, delivered, "Cannot copy a reply now; retrying.");
                        let delay = Duration::from_millis(250 << delivered.clamp(1, 6));
                        AckKind::Nak(Some(delay))
                    }
                };
                ack(&message, kind).await;
            }
        })
        .await;
    Ok(())
}

/// Copies one reply of the intake; an error leaves it to be delivered again.
async fn copy(store: &Store, message: &jetstream::Message) -> Result<(), StoreError> {
    let id = Subjects::operation_of(&message.subject);
    let Some(operation) = confirmed_request_of(store, id).await? else {
        tracing::warn!(subject = %message.subject, "A reply for no live operation; dropped.");
        return Ok(());
    };
    let headers = message.headers.clone().unwrap_or_default();
    reply::copy(
        store,
        &operation,
        &message.subject,
        &headers,
        message.payload.clone(),
    )
    .await?;
    Ok(())
}
