//! The backstop that ends an operation whose every delivery was lost.
//!
//! A `handlers` worker ends an operation `failed` on its last attempt, and the consumer's one
//! spare delivery ends it if that attempt crashed or stalled. If the spare delivery is lost too,
//! JetStream gives up on the request and publishes a MAX_DELIVERIES advisory
//! (`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`, see
//! <https://docs.nats.io/reference/jetstream/advisory/max-deliver>). An advisory is a core NATS
//! message, lost if nobody listens, so the gateway keeps them in a stream
//! (`<requests stream>_ADVISORIES`) and every replica shares one durable consumer of it. For each
//! advisory the request is read by its stream sequence and, unless it already has a result,
//! ended `failed` through the same path as a gateway's expiry: on a stateful route that names its
//! state store, a tombstone on the processed marker (a commit that got there first is published
//! instead). An advisory is acked only once that is done, so a crash here retries it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use handlers::contract::{Outcome, ResultRecord};
use handlers::jetstream::ack;
use tokio_util::sync::CancellationToken;

use super::model::Operation;
use super::store::{ConsumeError, Early, Store, StoreError};
use crate::lifecycle::sleep_or_stop;

/// Name of the durable consumer every replica shares.
const CONSUMER: &str = "gateway-finalizer";

/// The finalizer loop of one gateway process.
pub struct Finalizer {
    store: Arc<Store>,
    /// The routes' worker consumers: only their advisories end operations (another durable on
    /// the requests stream, an audit or a canary, gives up on its own copy only).
    consumers: HashSet<String>,
}

/// The fields of a MAX_DELIVERIES advisory that matter here.
#[derive(serde::Deserialize)]
struct MaxDeliveries {
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
    #[serde(with = "time::serde::rfc3339")]
    timestamp: time::OffsetDateTime,
}

impl Finalizer {
    pub(super) fn new(store: Arc<Store>, consumers: HashSet<String>) -> Self {
        Self { store, consumers }
    }

    /// Finalizes until `stop`; (re)creates the shared consumer as needed.
    pub async fn run(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            if let Err(error) = self.consume(&stop).await {
                tracing::debug!(%error, "Finalizer not ready; retrying.");
            }
            sleep_or_stop(&stop, Duration::from_secs(1)).await;
        }
    }

    async fn consume(&self, stop: &CancellationToken) -> Result<(), ConsumeError> {
        let config = pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            // An advisory that cannot be finalized (a request that breaks the contract, a
            // state store that is gone) is not retried forever.
            max_deliver: 100,
            ..Default::default()
        };
        let messages = self
            .store
            .pull(&self.store.advisories_stream(), config)
            .await?;
        messages
            .take_until(stop.cancelled())
            .for_each_concurrent(8, |message| async move {
                if let Ok(message) = message {
                    let kind = match self.finalize(&message).await {
                        Ok(()) => AckKind::Ack,
                        Err(error) => {
                            tracing::warn!(%error, "Cannot finalize an operation now; retrying.");
                            AckKind::Nak(Some(Duration::from_secs(1)))
                        }
                    };
                    ack(&message, kind).await;
                }
            })
            .await;
        Ok(())
    }

    /// Ends the operation an advisory names, unless it has a result (or no longer exists).
    async fn finalize(&self, message: &jetstream::Message) -> Result<(), StoreError> {
        let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(&message.payload) else {
            tracing::warn!(subject = %message.subject, "Not a MAX_DELIVERIES advisory; dropped.");
            return Ok(());
        };
        if !self.consumers.contains(&advisory.consumer) {
            return Ok(());
        }
        let Some(request) = self.store.request_at(advisory.stream_seq).await? else {
            return Ok(());
        };
        // A request stored after the advisory sits at a reused sequence (the stream was
        // re-created): not the one that was given up on.
        if request.time > advisory.timestamp {
            return Ok(());
        }
        let mut operation = Operation::from_request(&request)?;
        match self.store.result(&operation, Early::NotRead).await {
            Ok(None) => {}
            // A result, or the delete marker of a removed one: the operation has its outcome.
            Ok(Some(_)) => return Ok(()),
            Err(e) if e.is_result_removed() => return Ok(()),
            Err(e) => return Err(e),
        }
        let detail = format!(
            "Every delivery of the request was lost ({} deliveries: the workers crashed or stalled).",
            advisory.deliveries
        );
        let failed = ResultRecord::problem(
            Outcome::Reply,
            operation.id(),
            500,
            "handler-failed",
            "Handler failed",
            &detail,
        );
        let stored = self.store.record_marker(&operation, failed).await?;
        let status = super::model::Status::of(&stored.record).name();
        operation.result = Some(stored);
        tracing::warn!(operation_id = %operation.id(), deliveries = advisory.deliveries, status, "Every delivery was lost; operation ended.");
        Ok(())
    }
}
