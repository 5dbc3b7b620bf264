//! A worker's reply (wire contract 2) from the intake into its operation's result slot: the one
//! step the copier takes for each reply, and the one a gateway takes before it decides an outcome
//! itself (a reply still waiting in the intake came first, and wins as it would have had the
//! copier been quicker).
//!
//! The copy is create-if-absent (first writer wins). What a worker sends is checked here, where
//! it becomes an outcome: a reply that breaks the wire contract, that is too large to store with
//! the record's own headers, or that claims an outcome only the gateway decides (`cancelled` on a
//! stateless route, `expired` before the deadline) ends the operation `failed` with a `502
//! bad-reply` problem saying why, rather than being retried forever or dropped unseen.

use async_nats::HeaderMap;
use bytes::Bytes;
use handlers::contract::{Outcome, ResultRecord, WireContract};
use handlers::jetstream::{ResultWrite, last_on_subject, publish_result};
use time::OffsetDateTime;

use super::model::Operation;
use super::store::{Store, StoreError};
use crate::metrics::REPLIES;

/// Bytes of a copy's headers beyond the record's own: `Nats-TTL`, the create-if-absent header,
/// and the message's protocol line, with room to spare.
const COPY_OVERHEAD: usize = 256;

/// What became of a reply.
#[derive(Debug)]
pub(super) enum Copied {
    /// Written into the slot, found there already, or refused by another outcome.
    Written(ResultWrite),
    /// Not this operation's reply (its request names another reply subject): nothing written.
    Stray,
    /// Unusable: the operation ended `failed` with a problem saying why (or had ended already).
    Unusable(String),
}

impl Copied {
    fn metric(&self) -> &'static str {
        match self {
            Copied::Written(ResultWrite::Stored) => "copied",
            Copied::Written(ResultWrite::AlreadyStored) => "duplicate",
            Copied::Written(ResultWrite::Conflict { .. }) => "conflict",
            Copied::Stray => "stray",
            Copied::Unusable(_) => "unusable",
        }
    }
}

/// Copies a reply that arrived on `subject` into `operation`'s result slot.
///
/// Errors: the store could not be reached (the caller retries).
pub(super) async fn copy(
    store: &Store,
    operation: &Operation,
    subject: &str,
    headers: &HeaderMap,
    payload: Bytes,
) -> Result<Copied, StoreError> {
    let copied = copy_checked(store, operation, subject, headers, payload).await?;
    metrics::counter!(REPLIES, "outcome" => copied.metric()).increment(1);
    match &copied {
        Copied::Stray => tracing::warn!(
            operation_id = %operation.id(),
            %subject,
            "A reply outside its operation's reply subject; dropped."
        ),
        Copied::Unusable(why) => tracing::warn!(
            operation_id = %operation.id(),
            %why,
            "A worker's reply is unusable; the operation ends failed."
        ),
        Copied::Written(_) => {}
    }
    Ok(copied)
}

async fn copy_checked(
    store: &Store,
    operation: &Operation,
    subject: &str,
    headers: &HeaderMap,
    payload: Bytes,
) -> Result<Copied, StoreError> {
    if operation.request.reply_subject != subject {
        return Ok(Copied::Stray);
    }
    let id = operation.id();
    let record = match ResultRecord::from_parts(headers, payload) {
        Ok(record) => record,
        Err(error) => {
            return unusable(
                store,
                operation,
                format!("it breaks the wire contract: {error}"),
            )
            .await;
        }
    };
    let gateway_only = match record.outcome {
        Outcome::Reply => None,
        // A stateful route's worker projects the tombstone the gateway decided through its
        // state store; a stateless route's worker never cancels.
        Outcome::Cancelled if !store.is_stateful(operation.route()) => {
            Some("it says `cancelled`, which only a client's cancellation decides")
        }
        Outcome::Expired if OffsetDateTime::now_utc() <= store.expires_at(operation) => {
            Some("it says `expired` before the operation's deadline")
        }
        Outcome::Cancelled | Outcome::Expired => None,
    };
    if let Some(why) = gateway_only {
        return unusable(store, operation, why.to_owned()).await;
    }
    let header_bytes: usize = record
        .to_headers(id)
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    let size = record.body.len() + header_bytes + COPY_OVERHEAD;
    if size > store.max_payload() {
        let why = format!(
            "at {size} bytes with its headers it is larger than the server's max_payload ({})",
            store.max_payload()
        );
        return unusable(store, operation, why).await;
    }
    let write = publish_result(
        store.jetstream(),
        store.results_stream(),
        &operation.request.result_subject,
        id,
        &record,
        operation.retention(),
    )
    .await?;
    Ok(Copied::Written(write))
}

/// Ends the operation `failed` because its worker's reply cannot be used (first writer wins: an
/// outcome already stored stays).
async fn unusable(store: &Store, operation: &Operation, why: String) -> Result<Copied, StoreError> {
    let detail = format!("The worker's reply cannot be used: {why}.");
    let failed = ResultRecord::problem(
        Outcome::Reply,
        operation.id(),
        502,
        "bad-reply",
        "Unusable reply",
        &detail,
    );
    publish_result(
        store.jetstream(),
        store.results_stream(),
        &operation.request.result_subject,
        operation.id(),
        &failed,
        operation.retention(),
    )
    .await?;
    Ok(Copied::Unusable(why))
}

/// Copies the reply waiting in `operation`'s intake, if there is one: what a gateway does before
/// it decides an outcome itself (cancel, expiry, failure), so that a copier that lags, or cannot
/// copy at all, changes when a reply is seen, never which outcome wins.
pub(super) async fn copy_waiting(store: &Store, operation: &Operation) -> Result<(), StoreError> {
    if operation.request.contract == WireContract::V1 {
        return Ok(());
    }
    let subject = &operation.request.reply_subject;
    let Some(waiting) = last_on_subject(store.client(), store.replies_stream(), subject).await?
    else {
        return Ok(());
    };
    copy(store, operation, subject, &waiting.headers, waiting.payload).await?;
    Ok(())
}
