//! The copier: workers' replies (wire contract 2) from the intake stream into the result slots.
//!
//! A worker never writes the results stream. That stream keeps nats-server's subject delete
//! markers, and nats-server turns roll-ups on for such a stream (ADR-43), so any publisher to it
//! could send `Nats-Rollup: all` and purge every route's results: NATS permissions are on
//! subjects, not headers. The intake (`<prefix>.rep.>`) allows no roll-ups and no purges, and a
//! worker may publish only under its route's subjects there. Every replica shares one durable
//! consumer of it; for each reply the copier reads the request its subject names, checks that
//! the request names this very subject for its replies, and writes the record into the request's
//! result slot create-if-absent (first writer wins, as a worker's own write did before), with
//! the request's retention as its TTL. It acks only after that, so a crash copies again, which
//! the slot refuses. The intake is a work queue: an acked reply is gone from it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use handlers::contract::{ContractError, ResultRecord, Subjects};
use handlers::jetstream::{ResultWrite, ack, publish_result};
use tokio_util::sync::CancellationToken;

use super::lookup::confirmed_request_of;
use super::store::{ConsumeError, Store, StoreError};
use crate::lifecycle::sleep_or_stop;
use crate::metrics::RESULT_CONFLICTS;

/// Name of the durable consumer every replica shares.
const CONSUMER: &str = "gateway-copier";
/// Replies copied at once per process.
const CONCURRENCY: usize = 64;

/// The copier loop of one gateway process.
pub struct Copier {
    store: Arc<Store>,
}

impl Copier {
    pub(super) fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// Copies until `stop`; (re)creates the shared consumer as needed.
    pub async fn run(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            if let Err(error) = self.consume(&stop).await {
                tracing::debug!(%error, "Copier not ready; retrying.");
            }
            sleep_or_stop(&stop, Duration::from_millis(250)).await;
        }
    }

    async fn consume(&self, stop: &CancellationToken) -> Result<(), ConsumeError> {
        let config = pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: (CONCURRENCY * 4) as i64,
            ..Default::default()
        };
        let messages = self.store.pull(self.store.replies_stream(), config).await?;
        messages
            .take_until(stop.cancelled())
            .for_each_concurrent(CONCURRENCY, |message| async move {
                if let Ok(message) = message {
                    let kind = match self.copy(&message).await {
                        Ok(kind) => kind,
                        Err(error) => {
                            tracing::warn!(%error, subject = %message.subject, "Cannot copy a reply now; retrying.");
                            AckKind::Nak(Some(Duration::from_millis(500)))
                        }
                    };
                    ack(&message, kind).await;
                }
            })
            .await;
        Ok(())
    }

    /// Copies one reply into its operation's result slot; what to tell the intake.
    async fn copy(&self, message: &jetstream::Message) -> Result<AckKind, StoreError> {
        let id = Subjects::operation_of(&message.subject);
        let Some(operation) = confirmed_request_of(&self.store, id).await? else {
            tracing::warn!(subject = %message.subject, "A reply for no live operation; dropped.");
            return Ok(AckKind::Term);
        };
        if operation.request.reply_subject != message.subject.as_str() {
            // Another route's worker (or anyone allowed some reply subjects) wrote it: the
            // operation's request names another subject for its replies.
            tracing::warn!(
                operation_id = %id,
                subject = %message.subject,
                "A reply outside its operation's reply subject; dropped."
            );
            return Ok(AckKind::Term);
        }
        let headers = message.headers.clone().unwrap_or_default();
        let record = match ResultRecord::from_parts(&headers, message.payload.clone()) {
            Ok(record) => record,
            Err(
                error @ (ContractError::InvalidHeader { .. } | ContractError::MissingHeader(_)),
            )
            | Err(error @ ContractError::Unstorable { .. }) => {
                tracing::error!(operation_id = %id, %error, "A reply breaks the wire contract; dropped.");
                return Ok(AckKind::Term);
            }
            Err(error) => return Err(error.into()),
        };
        let ttl = operation.retention();
        let write = publish_result(
            self.store.jetstream(),
            self.store.results_stream(),
            &operation.request.result_subject,
            id,
            &record,
            ttl,
        )
        .await?;
        if let ResultWrite::Conflict { .. } = write {
            metrics::counter!(RESULT_CONFLICTS, "writer" => "reply").increment(1);
        }
        Ok(AckKind::Ack)
    }
}
