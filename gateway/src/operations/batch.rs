//! Atomic batch submit: many requests accepted all together or not at all.
//!
//! A batch is one JetStream atomic batch (nats-server 2.12+, `allow_atomic` on the requests
//! stream; ADR-50) of every item's request message, each create-if-absent on its key's subject
//! exactly as a single submit writes it, plus the batch's own record on
//! `gw.batch.<route>.<batch-key-token>`, create-if-absent too. The server stores all of them or
//! none: one taken subject refuses the whole batch (error 10071, verified on 2.15.1), and a
//! crash or a leader change mid-batch leaves nothing. So there is no partial batch to clean up,
//! and the batch's own key makes a retried batch a replay, like a retried submit.
//!
//! When the batch is refused, the gateway reads back what is taken. The batch record: the same
//! batch (its fingerprint over every item's key and fingerprint) is a replay, another one is a
//! reused batch key. An item's key: the same request is an item accepted before (on its own, or
//! by an earlier batch that named it), which the batch then takes as it is and writes the rest;
//! another request makes the whole batch `422`, naming the item, with nothing written.
//!
//! nats-server 2.15.1 takes at most 1,000 messages in one batch (error 10199 beyond), the
//! record included, so a batch has at most 999 items.

use bytes::Bytes;
use handlers::contract::header;
use handlers::jetstream::create_if_absent_headers;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::accept::{RequestMessage, Submission};
use super::idempotency::{key_token, key_token_of, new_operation_id};
use super::model::Operation;
use super::quota::{QuotaExceeded, Quotas};
use super::store::{Store, StoreError};
use crate::config::RouteConfig;

/// The most items a batch can have: nats-server's limit of 1,000 messages, less the record.
pub const MAX_BATCH_ITEMS: usize = 999;

/// A batch, ready to accept: its route, tenant and key, and its items (each a whole submission,
/// validated as a single submit would be).
pub struct BatchSubmission<'a> {
    pub route: &'a RouteConfig,
    pub tenant: &'a str,
    pub batch_key: String,
    pub items: Vec<Submission<'a>>,
}

/// The stored record of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub route: String,
    pub tenant: String,
    /// SHA-256 over every item's idempotency key and fingerprint, in order.
    pub fingerprint: String,
    /// The items' operation ids, in the order of the items.
    pub operations: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// How a batch was accepted.
#[derive(Debug)]
pub enum BatchAccepted {
    /// This call wrote it.
    New(Batch),
    /// The batch key named this batch already.
    Replayed(Batch),
}

/// Why a batch was not accepted. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Item `index`'s key names an operation of another request.
    #[error(
        "item {index}'s Idempotency-Key was used for a different request (operation {operation_id})"
    )]
    ItemKeyReused { index: usize, operation_id: String },
    /// The batch key names another batch.
    #[error("the batch's Idempotency-Key was used for a different batch ({batch_id})")]
    KeyReused { batch_id: String },
    /// Item `index`, with the headers the gateway adds, is over nats-server's `max_payload`
    /// (bytes): it cannot travel in a message.
    #[error(
        "item {index} is larger, with its headers, than the {max_payload} bytes nats-server takes in one message"
    )]
    ItemTooLarge { index: usize, max_payload: usize },
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often a batch is written again after items turned out to exist already (each round
/// takes at least one more item as existing, or ends).
const ROUNDS: usize = 3;

/// The fingerprint a batch key is bound to.
fn fingerprint(items: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (key, item_fingerprint) in items {
        for part in [key.as_bytes(), item_fingerprint.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    data_encoding::HEXLOWER.encode(&h.finalize())
}

/// The key token of a batch key: in its own space (a route name cannot contain `/`), so a batch
/// key and an item key never name each other.
fn batch_key_token(tenant: &str, route: &str, key: &str) -> String {
    key_token(tenant, &format!("batch/{route}"), key)
}

/// Accepts a batch as one atomic write, or finds the batch it repeats.
pub async fn accept_batch(
    store: &Store,
    quotas: Option<&Quotas>,
    b: BatchSubmission<'_>,
) -> Result<BatchAccepted, BatchError> {
    let route = b.route;
    let prints: Vec<(String, String)> = b
        .items
        .iter()
        .map(|s| (s.idempotency_key.clone(), s.fingerprint()))
        .collect();
    let batch_print = fingerprint(&prints);
    let batch_token = batch_key_token(b.tenant, &route.name, &b.batch_key);
    if let Some(found) = stored_batch(store, b.tenant, &batch_token).await? {
        return replay(found, &batch_print);
    }
    let tokens: Vec<String> = b.items.iter().map(Submission::key_token).collect();
    // Items found accepted already (the same request): index → its operation id.
    let mut existing: Vec<Option<String>> = vec![None; b.items.len()];
    for _ in 0..ROUNDS {
        let now = OffsetDateTime::now_utc();
        let batch_id = new_operation_id(&batch_token);
        let mut messages = Vec::new();
        let mut operations = Vec::new();
        let mut reserved = Vec::new();
        for (index, item) in b.items.iter().enumerate() {
            if let Some(id) = &existing[index] {
                operations.push(id.clone());
                continue;
            }
            let RequestMessage {
                subject,
                head,
                mut headers,
                ttl,
            } = item.message(
                store.subjects(),
                store.reply_bucket(item.route),
                &tokens[index],
                &prints[index].1,
                now,
            );
            if let Some(quotas) = quotas {
                let admitted = quotas.admit(
                    &head.operation_id,
                    &head.reply_subject,
                    b.tenant,
                    item.body.len() as u64,
                );
                if let Err(exceeded) = admitted {
                    release(quotas, &reserved);
                    return Err(exceeded.into());
                }
                reserved.push(head.operation_id.clone());
            }
            create_if_absent_headers(&mut headers, Some(ttl));
            let max_payload = store.max_payload();
            if !handlers::jetstream::fits_in_batch(&headers, &item.body, max_payload) {
                if let Some(quotas) = quotas {
                    release(quotas, &reserved);
                }
                return Err(BatchError::ItemTooLarge { index, max_payload });
            }
            operations.push(head.operation_id.clone());
            messages.push((subject, headers, item.body.clone()));
        }
        let batch = Batch {
            id: batch_id.clone(),
            route: route.name.clone(),
            tenant: b.tenant.to_owned(),
            fingerprint: batch_print.clone(),
            operations,
            created_at: now,
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(header::OPERATION_ID, batch_id.as_str());
        create_if_absent_headers(&mut headers, Some(route.retention));
        messages.push((
            store.subjects().batch(&route.name, &batch_token),
            headers,
            Bytes::from(serde_json::to_vec(&batch).expect("a batch serializes")),
        ));
        let written = store.publish_batch(&batch_id, messages).await;
        // Refused for sure: the room is given back. An unknown outcome keeps it until the
        // ledger sees the requests or not (as a single submit's does).
        let refused = match &written {
            Ok(outcome) => *outcome == handlers::jetstream::BatchOutcome::Refused,
            Err(e) => e.is_store_full() || e.is_batch_not_sent(),
        };
        if let Some(quotas) = quotas
            && refused
        {
            release(quotas, &reserved);
        }
        match written? {
            handlers::jetstream::BatchOutcome::Committed => return Ok(BatchAccepted::New(batch)),
            handlers::jetstream::BatchOutcome::Refused => {}
        }
        // Something is taken: the batch (a concurrent or earlier attempt of it), or items.
        if let Some(found) = stored_batch(store, b.tenant, &batch_token).await? {
            return replay(found, &batch_print);
        }
        let mut progressed = false;
        for index in 0..b.items.len() {
            if existing[index].is_some() {
                continue;
            }
            let Some(message) = store.request_on_route(&route.name, &tokens[index]).await? else {
                continue;
            };
            let stored = Operation::from_request(&message).map_err(StoreError::from)?;
            if store.retention_ended(&stored) {
                // Its key is about to be free: the client's retry writes the batch.
                return Err(StoreError::NotReady.into());
            }
            if stored.fingerprint() != prints[index].1 {
                return Err(BatchError::ItemKeyReused {
                    index,
                    operation_id: stored.id().to_owned(),
                });
            }
            existing[index] = Some(stored.id().to_owned());
            progressed = true;
        }
        if !progressed {
            // Refused, yet nothing is taken now: a subject freed meanwhile (a retention ended).
            continue;
        }
    }
    Err(StoreError::NotReady.into())
}

fn release(quotas: &Quotas, reserved: &[String]) {
    for id in reserved {
        quotas.release(id);
    }
}

fn replay(found: Batch, fingerprint: &str) -> Result<BatchAccepted, BatchError> {
    if found.fingerprint == fingerprint {
        Ok(BatchAccepted::Replayed(found))
    } else {
        Err(BatchError::KeyReused { batch_id: found.id })
    }
}

/// The batch of key token `token` if it is `tenant`'s.
async fn stored_batch(
    store: &Store,
    tenant: &str,
    token: &str,
) -> Result<Option<Batch>, StoreError> {
    let Some(message) = store.batch_record(token).await? else {
        return Ok(None);
    };
    let batch: Batch = serde_json::from_slice(&message.payload).map_err(|e| {
        StoreError::from(handlers::contract::ContractError::InvalidHeader {
            name: "batch record",
            value: e.to_string(),
        })
    })?;
    Ok((batch.tenant == tenant).then_some(batch))
}

/// The batch `id` of `tenant`; `None` when there is none (or no longer, or another tenant's).
pub async fn find_batch(
    store: &Store,
    tenant: &str,
    id: &str,
) -> Result<Option<Batch>, StoreError> {
    let Some(token) = key_token_of(id) else {
        return Ok(None);
    };
    Ok(stored_batch(store, tenant, token)
        .await?
        .filter(|batch| batch.id == id))
}
