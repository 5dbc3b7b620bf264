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
use handlers::contract::{Subjects, format_time, header};
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
    /// Where to POST the completion webhook (already checked against the allow-list).
    pub callback_url: Option<String>,
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

impl Submission<'_> {
    /// The token naming this submission's request subject.
    pub fn key_token(&self) -> String {
        key_token(self.tenant, &self.route.name, &self.idempotency_key)
    }

    /// The fingerprint the key is bound to.
    pub fn fingerprint(&self) -> String {
        RequestIdentity {
            method: self.method,
            path: self.path,
            query: self.query,
            content_type: self.content_type,
            body: &self.body,
        }
        .fingerprint()
    }

    /// The request message for a new operation on this submission. The benchmark's raw baseline
    /// publishes exactly these messages, so the two measure the same bytes.
    pub fn message(
        &self,
        subjects: &Subjects,
        key_token: &str,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> RequestMessage {
        let operation_id = new_operation_id(key_token);
        let deadline = now + self.route.timeout;
        let mut h = HeaderMap::new();
        // Forwarded client headers first, so that none can shadow a contract header.
        for (name, value) in &self.forwarded {
            h.append(name.as_str(), value.as_str());
        }
        h.insert(header::OPERATION_ID, operation_id.as_str());
        h.insert(header::ROUTE, self.route.name.as_str());
        h.insert(header::METHOD, self.method);
        h.insert(header::PATH, self.path);
        if let Some(q) = self.query {
            h.insert(header::QUERY, q);
        }
        if let Some(ct) = self.content_type {
            h.insert(header::CONTENT_TYPE, ct);
        }
        h.insert(
            header::REPLY_SUBJECT,
            subjects.result(&operation_id).as_str(),
        );
        h.insert(header::DEADLINE, format_time(deadline).as_str());
        h.insert(
            header::RETENTION,
            self.route.retention.as_secs().max(1).to_string().as_str(),
        );
        h.insert(header::TENANT, self.tenant);
        h.insert(
            header::IDEMPOTENCY_KEY,
            format_key(&self.idempotency_key).as_str(),
        );
        h.insert(header::FINGERPRINT, fingerprint);
        if let Some(url) = &self.callback_url {
            h.insert(header::CALLBACK_URL, url.as_str());
        }
        RequestMessage {
            subject: subjects.request(&self.route.name, key_token),
            operation_id,
            deadline,
            headers: h,
            ttl: self.route.retention,
        }
    }
}

/// One request message, ready to publish with create-if-absent.
#[derive(Debug)]
pub struct RequestMessage {
    pub subject: String,
    pub operation_id: String,
    pub deadline: OffsetDateTime,
    pub headers: HeaderMap,
    /// `Nats-TTL`: the route's retention.
    pub ttl: Duration,
}

/// Accepts a submission as exactly one request message, or finds the operation it repeats.
pub async fn accept(store: &Store, s: Submission<'_>) -> Result<Accepted, AcceptError> {
    let route = s.route;
    let key_token = s.key_token();
    let fingerprint = s.fingerprint();

    for _ in 0..RACE_RETRIES {
        let now = OffsetDateTime::now_utc();
        let message = s.message(store.subjects(), &key_token, &fingerprint, now);
        let (operation_id, deadline) = (message.operation_id.clone(), message.deadline);
        let written = match store.create_request(message, s.body.clone()).await {
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
                progress: None,
                callback_url: s.callback_url.clone(),
                callback: None,
                trace: None,
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
