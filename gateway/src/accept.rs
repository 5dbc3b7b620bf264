//! Accepting a request: exactly one JetStream message per (tenant, route, idempotency key).
//!
//! One write decides everything. The request is published on its key's subject with
//! `Nats-Expected-Last-Subject-Sequence: 0`, so the message *is* the idempotency record and no
//! second write, sweep or lock exists (../shared/reference/jetstream-facts.md, "create-if-absent";
//! exactly-once.md's note on G5-G8). If the subject is taken, the stored request is read back and
//! compared by fingerprint: the same request is a replay of the same operation, another one is a
//! key reused (422). Because the subject is freed only when the record's retention ends, this holds
//! long after JetStream's duplicate window (G9).
//!
//! When the write's outcome is unknown (no ack in time, connection lost), the caller answers 503
//! and the client retries with the same key: the retry either creates the record or finds the one
//! the first attempt wrote, so it converges on one message (G7, G13).

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use handlers::contract::{format_time, header};
use handlers::jetstream::CreateOutcome;
use time::OffsetDateTime;

use crate::config::RouteConfig;
use crate::idempotency::{RequestIdentity, format_key, key_token, new_operation_id};
use crate::operations::{Operation, attach_result};
use crate::store::{Store, StoreError};

/// A validated request, ready to be accepted.
#[derive(Debug)]
pub struct Submission<'a> {
    pub route: &'a RouteConfig,
    pub tenant: &'a str,
    pub idempotency_key: String,
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// Request headers on the forward allow-list, plus `traceparent`.
    pub forwarded: Vec<(String, String)>,
    pub body: Bytes,
}

/// How a submission was accepted.
#[derive(Debug)]
pub enum Accepted {
    /// This call created the operation.
    New(Operation),
    /// The key already named an operation for the same request: that one.
    Replayed(Operation),
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("idempotency key already used for a different request (operation {operation_id})")]
    KeyReused { operation_id: String },
    /// Body and headers together exceed the NATS server's max_payload. Detected by the client
    /// before sending, so nothing was written.
    #[error("the request message would exceed the server's max_payload of {max_payload} bytes")]
    TooLarge { max_payload: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often to retry when the key's record vanishes between the refused write and the read
/// back: only a retention expiry at that very moment does that.
const RACE_RETRIES: usize = 3;

/// Accepts a submission as exactly one request message, or finds the operation it repeats.
pub async fn accept(store: &Store, s: Submission<'_>) -> Result<Accepted, AcceptError> {
    let route = s.route;
    let key_token = key_token(s.tenant, &route.name, &s.idempotency_key);
    let fingerprint = RequestIdentity {
        method: s.method,
        path: s.path,
        query: s.query,
        content_type: s.content_type,
        body: &s.body,
    }
    .fingerprint();

    for _ in 0..RACE_RETRIES {
        let operation_id = new_operation_id(&key_token);
        let now = OffsetDateTime::now_utc();
        let deadline = now + route.timeout;
        let headers = request_headers(store, &s, &operation_id, &fingerprint, deadline);
        let written = match store
            .create_request(
                &route.name,
                &key_token,
                headers,
                s.body.clone(),
                route.retention,
            )
            .await
        {
            Err(e) if e.is_too_large() => {
                return Err(AcceptError::TooLarge {
                    max_payload: store.max_payload(),
                });
            }
            written => written?,
        };
        if written == CreateOutcome::Created {
            return Ok(Accepted::New(Operation {
                id: operation_id,
                route: route.name.clone(),
                tenant: s.tenant.to_owned(),
                idempotency_key: s.idempotency_key,
                fingerprint,
                created_at: now,
                deadline,
                retention: Some(route.retention),
                result: None,
            }));
        }
        let Some(stored) = store.request_on_route(&route.name, &key_token).await? else {
            continue;
        };
        let mut existing = Operation::from_request(&stored).map_err(StoreError::from)?;
        if existing.fingerprint != fingerprint {
            return Err(AcceptError::KeyReused {
                operation_id: existing.id,
            });
        }
        attach_result(store, &mut existing).await?;
        return Ok(Accepted::Replayed(existing));
    }
    Err(StoreError::NotReady.into())
}

fn request_headers(
    store: &Store,
    s: &Submission<'_>,
    operation_id: &str,
    fingerprint: &str,
    deadline: OffsetDateTime,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    // Forwarded client headers first, so that none can shadow a contract header.
    for (name, value) in &s.forwarded {
        h.append(name.as_str(), value.as_str());
    }
    h.insert(header::OPERATION_ID, operation_id);
    h.insert(header::ROUTE, s.route.name.as_str());
    h.insert(header::METHOD, s.method);
    h.insert(header::PATH, s.path);
    if let Some(q) = s.query {
        h.insert(header::QUERY, q);
    }
    if let Some(ct) = s.content_type {
        h.insert(header::CONTENT_TYPE, ct);
    }
    h.insert(
        header::REPLY_SUBJECT,
        store.subjects().result(operation_id).as_str(),
    );
    h.insert(header::DEADLINE, format_time(deadline).as_str());
    h.insert(
        header::RETENTION,
        retention_secs(s.route.retention).to_string().as_str(),
    );
    h.insert(header::TENANT, s.tenant);
    h.insert(
        header::IDEMPOTENCY_KEY,
        format_key(&s.idempotency_key).as_str(),
    );
    h.insert(header::FINGERPRINT, fingerprint);
    h
}

fn retention_secs(retention: Duration) -> u64 {
    retention.as_secs().max(1)
}
