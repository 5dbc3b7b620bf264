//! Accepting a request: exactly one JetStream message per (tenant, route, idempotency key).
//!
//! One write decides everything. The request is published on its key's subject with
//! `Nats-Expected-Last-Subject-Sequence: 0`, so the message *is* the idempotency record and no
//! second write, sweep or lock exists. (JetStream refuses a publish whose expected last subject
//! sequence does not match with error 10071, "wrong last sequence": see "Expected last subject
//! sequence" in https://docs.nats.io/nats-concepts/jetstream/headers.) If the subject is taken,
//! the stored request is read back and compared by fingerprint: the same request is a replay of
//! the same operation, another one is a key reused (422), as the IETF Idempotency-Key draft
//! asks (https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/, section
//! 2.7). Because the subject is freed only when the record's retention ends, this holds long after
//! JetStream's duplicate window, which only deduplicates by `Nats-Msg-Id` for a few minutes.
//!
//! A key this replica answered lately is likely a client's retry ([`RecentKeys`](super::recent_keys::RecentKeys)): its request is
//! read first, and only a miss goes on to the write. The stored request decides either way, as
//! after a refused write; reading first only spares the server the refused write.
//!
//! When the write's outcome is unknown (no ack in time, connection lost), the caller answers 503
//! and the client retries with the same key: the retry either creates the record or finds the one
//! the first attempt wrote, so it converges on one message.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use handlers::contract::{BodyObject, RequestHead, Subjects};
use handlers::jetstream::CreateOutcome;
use time::OffsetDateTime;

use super::idempotency::{RequestIdentity, format_key, key_token, new_operation_id};
use super::lookup::attach_result;
use super::model::Operation;
use super::quota::{QuotaExceeded, Quotas};
use super::store::{Store, StoreError};
use crate::config::RouteConfig;
use crate::metrics::DELAYED_ACCEPTED;

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
    /// The client's `Callback-Url` (already checked against the allow-list): where to POST the
    /// completion webhook instead of the route's `callback_url`. Part of the fingerprint.
    pub requested_callback_url: Option<String>,
    /// When it may start, as the client asked.
    pub start: Start,
    /// The failed operation this one redrives (`Gw-Redrive-Of`).
    pub redrive_of: Option<String>,
    /// Where the body is when it is too large for the message (a claim check in the Object
    /// Store): then `body` is empty, and the fingerprint binds the body's digest.
    pub body_object: Option<BodyObject>,
    pub body: Bytes,
}

/// When a submission may start, as the client asked (`Delay` or `Not-Before`, and `Start-By`),
/// checked against the route's `max_delay` at the edge.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// No handler starts before this; the deadline counts from it.
    pub not_before: Option<OffsetDateTime>,
    /// No handler starts from this on.
    pub start_by: Option<OffsetDateTime>,
    /// The headers as sent (`delay=5`, `not-before=…`, `start-by=…`), part of the fingerprint:
    /// the same `Delay` sent again is the same request.
    pub asked: Option<String>,
    /// Why a new operation cannot start as asked (a `Start-By` already past, a start beyond the
    /// route's `max_delay`): refused unless the key names this very request already, which is
    /// then a replay.
    pub refusal: Option<String>,
}

/// How a submission was accepted.
#[derive(Debug)]
pub enum Accepted {
    /// This call created the operation.
    New(Operation),
    /// The key already named an operation for the same request: that one.
    Replayed(Operation),
}

impl Accepted {
    /// The operation, and whether it was there already (a replay).
    pub fn into_operation(self) -> (Operation, bool) {
        match self {
            Accepted::New(op) => (op, false),
            Accepted::Replayed(op) => (op, true),
        }
    }
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("idempotency key already used for a different request (operation {operation_id})")]
    KeyReused { operation_id: String },
    /// The start asked for cannot be honoured for a new operation (see [`Start::refusal`]).
    #[error("cannot start as asked: {0}")]
    InvalidStart(String),
    /// The body could not be read to its end (the client stopped sending, or too slowly).
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    /// A body kept in the Object Store was larger than the route's `max_body`; nothing was
    /// accepted (and the stored part removed).
    #[error("the request body exceeds the route's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// Body and headers together exceed the NATS server's max_payload. Detected by the client
    /// before sending, so nothing was written.
    #[error("the request message would exceed the server's max_payload of {max_payload} bytes")]
    TooLarge { max_payload: usize },
    /// The tenant is at a quota and the key names no operation yet: nothing was written.
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often to retry when the key's record vanishes between the refused write and the read
/// back, or is past its retention but not yet removed: only a retention ending at that very
/// moment does that.
const RACE_RETRIES: usize = 3;
/// How long to wait for the server to remove a request whose retention has ended.
const RETENTION_END_WAIT: Duration = Duration::from_millis(400);

impl Submission<'_> {
    /// The token naming this submission's request subject.
    pub fn key_token(&self) -> String {
        key_token(self.tenant, &self.route.name, &self.idempotency_key)
    }

    /// The fingerprint the key is bound to.
    pub fn fingerprint(&self) -> String {
        self.identity().fingerprint()
    }

    fn identity(&self) -> RequestIdentity<'_> {
        RequestIdentity {
            method: self.method,
            path: self.path,
            query: self.query,
            content_type: self.content_type,
            body: &self.body,
            body_digest: self.body_object.as_ref().map(|b| b.digest.as_str()),
            callback_url: self.requested_callback_url.as_deref(),
            start: self.start.asked.as_deref(),
        }
    }

    /// Whether `stored`, whose fingerprint differs, is still this request: one accepted before
    /// callback URLs were part of the fingerprint (by an older replica, during a rolling
    /// upgrade), with the same callback URL recorded.
    fn repeats_unbound_callback(&self, stored: &Operation) -> bool {
        let Some(url) = self.requested_callback_url.as_deref() else {
            return false;
        };
        let unbound = RequestIdentity {
            callback_url: None,
            ..self.identity()
        };
        stored.callback_url() == Some(url) && stored.fingerprint() == unbound.fingerprint()
    }

    /// The request message for a new operation on this submission. The benchmark's raw baseline
    /// publishes exactly these messages, so the two measure the same bytes.
    /// `reply_bucket`: where a large reply body may go (see [`Store::reply_bucket`]).
    pub fn message(
        &self,
        subjects: &Subjects,
        reply_bucket: Option<String>,
        key_token: &str,
        fingerprint: &str,
        now: OffsetDateTime,
    ) -> RequestMessage {
        let operation_id = new_operation_id(key_token);
        let slots = subjects.slots(&self.route.name, &operation_id);
        let head = RequestHead {
            contract: subjects.contract(),
            reply_subject: slots.reply_subject,
            reply_stream: slots.reply_stream,
            progress_subject: slots.progress_subject,
            operation_id,
            route: self.route.name.clone(),
            method: self.method.to_owned(),
            path: self.path.to_owned(),
            query: self.query.map(str::to_owned),
            content_type: self.content_type.map(str::to_owned),
            // A delayed operation's timeout runs from its start.
            deadline: self.start.not_before.unwrap_or(now).max(now) + self.route.timeout,
            not_before: self.start.not_before,
            start_by: self.start.start_by,
            retention_secs: Some(self.route.retention.as_secs().max(1)),
            tenant: Some(self.tenant.to_owned()),
            idempotency_key: Some(format_key(&self.idempotency_key)),
            fingerprint: Some(fingerprint.to_owned()),
            callback_url: self
                .requested_callback_url
                .clone()
                .or_else(|| self.route.callback_url.clone()),
            retry_policy: self.route.retry.clone(),
            redrive_of: self.redrive_of.clone(),
            body_object: self.body_object.clone(),
            reply_bucket,
        };
        RequestMessage {
            subject: subjects.request(&self.route.name, key_token),
            headers: head.to_headers(&self.forwarded),
            head,
            ttl: self.route.retention,
        }
    }
}

/// One request message, ready to publish with create-if-absent.
#[derive(Debug)]
pub struct RequestMessage {
    pub subject: String,
    /// The contract's fields, as written (the new operation is built from them).
    pub head: RequestHead,
    /// The message's headers: forwarded client headers, then the contract's from `head`.
    pub headers: HeaderMap,
    /// `Nats-TTL`: the route's retention.
    pub ttl: Duration,
}

/// Accepts a submission as exactly one request message, or finds the operation it repeats.
///
/// With quotas, room is reserved before the write and given back when nothing was written; a
/// tenant at its quota still gets its existing operations back (a retry is never refused for a
/// quota), and only a new key is refused.
pub async fn accept(
    store: &Store,
    quotas: Option<&Quotas>,
    s: Submission<'_>,
) -> Result<Accepted, AcceptError> {
    let key_token = s.key_token();
    let fingerprint = s.fingerprint();
    if let Some(why) = &s.start.refusal {
        // Only a replay may pass: nothing is written.
        let Some(stored) = store.request_on_route(&s.route.name, &key_token).await? else {
            return Err(AcceptError::InvalidStart(why.clone()));
        };
        let mut existing = Operation::from_request(&stored).map_err(StoreError::from)?;
        if existing.fingerprint() != fingerprint || store.retention_ended(&existing) {
            return Err(AcceptError::InvalidStart(why.clone()));
        }
        attach_result(store, &mut existing).await?;
        return Ok(Accepted::Replayed(existing));
    }

    let accepted = create_or_replay(store, quotas, &s, &key_token, &fingerprint).await;
    if accepted.is_ok() {
        store.recent_keys.insert(&key_token);
    }
    accepted
}

/// The loop of [`accept`]: reads first when the key is likely a retry's, else writes and reads
/// back only when the write was refused.
async fn create_or_replay(
    store: &Store,
    quotas: Option<&Quotas>,
    s: &Submission<'_>,
    key_token: &str,
    fingerprint: &str,
) -> Result<Accepted, AcceptError> {
    // A retry's key names its request already: reading it first spares the server a refused
    // write. A miss (the first attempt wrote nothing, or another replica's key shared the
    // table's slot) goes on to the write, which decides as ever.
    if store.recent_keys.contains(key_token)
        && let Some(stored) = store.request_on_route(&s.route.name, key_token).await?
        && let Some(replayed) = replay(store, s, &stored, fingerprint).await?
    {
        return Ok(replayed);
    }
    for _ in 0..RACE_RETRIES {
        let now = OffsetDateTime::now_utc();
        let RequestMessage {
            subject,
            head,
            headers,
            ttl,
        } = s.message(
            store.subjects(),
            store.reply_bucket(s.route),
            key_token,
            fingerprint,
            now,
        );
        let op = head.operation_id.as_str();
        let size = s
            .body_object
            .as_ref()
            .map_or(s.body.len() as u64, |object| object.size);
        let admitted = quotas.map(|q| q.admit(op, &head.reply_subject, s.tenant, size));
        let written = match admitted {
            Some(Err(exceeded)) => {
                if store
                    .request_on_route(&s.route.name, key_token)
                    .await?
                    .is_none()
                {
                    return Err(exceeded.into());
                }
                CreateOutcome::AlreadyExists
            }
            _ => match store
                .create_request(subject, headers, s.body.clone(), ttl)
                .await
            {
                Err(e) if e.is_too_large() => {
                    quotas.inspect(|q| q.release(op));
                    return Err(AcceptError::TooLarge {
                        max_payload: store.max_payload(),
                    });
                }
                // Refused for sure (a full stream, no JetStream yet): nothing was written.
                Err(e) if e.is_store_full() || matches!(e, StoreError::NotReady) => {
                    quotas.inspect(|q| q.release(op));
                    return Err(e.into());
                }
                // Written or not is unknown: the reservation stays until the request is seen,
                // or for a while.
                written => written?,
            },
        };
        if written == CreateOutcome::AlreadyExists
            && let Some(quotas) = quotas
        {
            quotas.release(op);
        }
        if written == CreateOutcome::Created {
            if head.not_before.is_some_and(|due| due > now) {
                metrics::counter!(DELAYED_ACCEPTED, "route" => s.route.name.clone()).increment(1);
            }
            return Ok(Accepted::New(Operation::accepted(
                head,
                s.idempotency_key.clone(),
                now,
            )));
        }
        let Some(stored) = store.request_on_route(&s.route.name, key_token).await? else {
            continue;
        };
        match replay(store, s, &stored, fingerprint).await? {
            Some(replayed) => return Ok(replayed),
            // Past its retention by this clock, which reads already answer as gone, but the
            // server's TTL timer has not removed it yet: wait for that rather than replay an
            // operation nobody can read (a last miss answers 503, and the retry creates).
            None => tokio::time::sleep(RETENTION_END_WAIT).await,
        }
    }
    Err(StoreError::NotReady.into())
}

/// What the request `stored` under the submission's key makes of it: a replay of that
/// operation (its result attached), `KeyReused` when it is another request, or `None` when its
/// retention has ended by this clock (it is gone at any moment; the key is free after that).
async fn replay(
    store: &Store,
    s: &Submission<'_>,
    stored: &StreamMessage,
    fingerprint: &str,
) -> Result<Option<Accepted>, AcceptError> {
    let mut existing = Operation::from_request(stored).map_err(StoreError::from)?;
    if store.retention_ended(&existing) {
        return Ok(None);
    }
    if existing.fingerprint() != fingerprint && !s.repeats_unbound_callback(&existing) {
        return Err(AcceptError::KeyReused {
            operation_id: existing.id().to_owned(),
        });
    }
    attach_result(store, &mut existing).await?;
    Ok(Some(Accepted::Replayed(existing)))
}

/// Stores the body of a submission too large for a message, read from `body` (at most `limit`
/// bytes), in the Object Store (a claim check, wire contract 3), for [`accept_uploaded`] to
/// accept the request naming it; or finds the request its key names already.
///
/// A key that names a request already is checked without storing anything: the body is only
/// hashed on its way through, and compared by fingerprint like any replay, so a retried upload is
/// never stored twice: `Some` replay (or a refusal). Otherwise the body is stored (streamed, one
/// chunk in memory at a time; the Object Store computes its SHA-256 on the way) and `s` names it:
/// `None`. A body over `limit` is removed and refused. The two steps are apart so that a slow
/// upload holds no JetStream permit of the edge's.
pub async fn upload_large(
    store: &Store,
    s: &mut Submission<'_>,
    body: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: u64,
) -> Result<Option<Accepted>, AcceptError> {
    // Contract 1 has no way to name a body elsewhere (a replica of that release reads only
    // bodies in messages).
    if store.subjects().contract() == handlers::contract::WireContract::V1 {
        return Err(AcceptError::BodyTooLarge {
            limit: s.route.inline_max.map_or(limit, |inline| inline.0 as u64),
        });
    }
    let key_token = s.key_token();
    if let Some(stored) = store.request_on_route(&s.route.name, &key_token).await? {
        // Only a replay (or a refusal) can come of this: the body is hashed on its way
        // through, stored nowhere, and compared here, never written as a new request (which
        // would name a body that is not stored).
        let mut existing = Operation::from_request(&stored).map_err(StoreError::from)?;
        let (size, digest) = hash(body, limit).await?;
        s.body_object = Some(BodyObject {
            bucket: store.bodies_bucket(&s.route.name),
            name: existing
                .request
                .body_object
                .as_ref()
                .map_or_else(String::new, |b| b.name.clone()),
            size,
            digest,
        });
        if store.retention_ended(&existing) {
            // Gone at any moment: the retry stores the body and creates anew.
            return Err(StoreError::NotReady.into());
        }
        if existing.fingerprint() != s.fingerprint() {
            return Err(AcceptError::KeyReused {
                operation_id: existing.id().to_owned(),
            });
        }
        attach_result(store, &mut existing).await?;
        return Ok(Some(Accepted::Replayed(existing)));
    }
    let name = format!("{key_token}.{}", uuid::Uuid::new_v4().simple());
    let route = s.route.name.clone();
    let object = match store.put_body(&route, &name, body, limit).await {
        Err(StoreError::BodyRead(why)) => return Err(AcceptError::BodyRead(why)),
        other => other?,
    };
    if object.size > limit {
        store.delete_body(&object).await;
        return Err(AcceptError::BodyTooLarge { limit });
    }
    s.body_object = Some(object);
    Ok(None)
}

/// Accepts a submission whose body [`upload_large`] stored, naming it; an object no request took
/// (a replay found meanwhile, a refusal) is removed. One the gateway could not tell the fate of
/// (the request's write timed out) stays for the bucket's `max_age`, the route's retention.
pub async fn accept_uploaded(
    store: &Store,
    quotas: Option<&Quotas>,
    s: Submission<'_>,
) -> Result<Accepted, AcceptError> {
    let stored = s.body_object.clone();
    let accepted = accept(store, quotas, s).await;
    let unknown = matches!(&accepted, Err(AcceptError::Store(e))
        if !(e.is_store_full() || matches!(e, StoreError::NotReady)));
    if !matches!(accepted, Ok(Accepted::New(_)))
        && !unknown
        && let Some(object) = stored
    {
        store.delete_body(&object).await;
    }
    accepted
}

/// Removes the body [`upload_large`] stored for a submission that will not be accepted after
/// all (the edge refused it meanwhile).
pub async fn forget_upload(store: &Store, s: &Submission<'_>) {
    if let Some(object) = &s.body_object {
        store.delete_body(object).await;
    }
}

/// The size and Object Store digest (`SHA-256=` and base64url) of `body`, read to its end or
/// past `limit`, stored nowhere.
async fn hash(
    body: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: u64,
) -> Result<(u64, String), AcceptError> {
    use sha2::Digest as _;
    use tokio::io::AsyncReadExt as _;
    let mut sha = sha2::Sha256::new();
    let mut buffer = vec![0; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = body
            .read(&mut buffer)
            .await
            .map_err(|e| AcceptError::BodyRead(e.to_string()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > limit {
            return Err(AcceptError::BodyTooLarge { limit });
        }
        sha.update(&buffer[..n]);
    }
    let digest = format!(
        "SHA-256={}",
        data_encoding::BASE64URL.encode(&sha.finalize())
    );
    Ok((size, digest))
}
