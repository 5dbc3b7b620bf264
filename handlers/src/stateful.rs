//! Stateful handlers with exactly-once state changes: the outbox pattern on JetStream.
//!
//! A stateful handler loads state under keys it chooses, changes it, and answers. The library
//! then commits, in **one atomic batch** on a stream the worker owns:
//! - each changed key on `<prefix>.state.<key>`, expecting the sequence it loaded (optimistic
//!   concurrency: a concurrent change makes the whole batch fail);
//! - the processed marker `<prefix>.done.<operation-id>`, expecting none (so two attempts at one
//!   operation cannot both commit), carrying the outbox: the reply and the emitted messages.
//!
//! Only after the commit is the reply published (first writer wins), and only after that is the
//! request acked. A delivery whose marker already exists (a redelivery after a crash, a duplicate
//! publish, a concurrent attempt that lost) does not run the handler: it re-publishes the stored
//! reply and acks. So each operation changes state at most once, and its one reply is computed
//! from the state it committed. In detail: a duplicate is recognised by its operation id, not by
//! JetStream's delivery; nothing is published before the commit; two concurrent attempts commit
//! at most once; a duplicate after the commit never runs the handler and re-publishes the stored
//! outbox unchanged (emitted messages with the same `Nats-Msg-Id`, derived from the operation id;
//! the reply on the same result subject, first writer wins); the reply travels through the
//! outbox and the results stream, never core request/reply; the request is acked last.
//!
//! Only the keys a handler saves are checked for concurrent changes: a key it only loads is not
//! (write skew is possible; save a loaded key back to make it part of the check).
//!
//! A redrive (`Gw-Redrive-Of`, a new operation made from a failed one) of an operation that
//! committed does not run the handler: it claims its own marker with a copy of the committed
//! outbox and publishes that (the emits with their original ids), so the state changes at most
//! once across an operation and its redrives. A redrive of one that did not commit runs as any
//! operation does.
//!
//! Markers are kept for `marker_ttl` (`Nats-TTL`), which must cover the longest redelivery or
//! re-drive horizon and the gateway's key retention; after that a re-driven duplicate would run
//! again. Handlers may still run more than once (only one run commits): side effects outside the
//! state and the reply are not protected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use async_nats::jetstream::message::PublishMessage;

use crate::contract::{BodyObject, Outcome, Request, RequestHead, ResultRecord};
use crate::handler::{BoxFuture, HandlerError, Response};
use crate::jetstream::{
    BatchOutcome, CreateOutcome, JetStreamError, ResultWrite, create_if_absent,
    last_on_subject_from_leader, publish_atomic_batch, publish_result,
};

/// The worker-owned stream that holds state and markers.
#[derive(Clone, Debug)]
pub struct StateStore {
    js: async_nats::jetstream::Context,
    stream: String,
    prefix: String,
    marker_ttl: Duration,
    /// Replicas the stream is created with when absent (1 unless [`StateStore::with_replicas`]).
    replicas: usize,
}

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create or read state stream {stream}: {detail}")]
    Provision { stream: String, detail: String },
    /// The live stream cannot hold this store (a configuration error: retrying will not help).
    #[error("state stream {stream} lacks {lacks}; it is left as it is")]
    Unsuitable { stream: String, lacks: String },
    #[error("state of {key} is not valid JSON for this type: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    JetStream(#[from] JetStreamError),
    #[error("atomic commit failed: {0}")]
    Commit(String),
    #[error("the marker of {0} is taken but cannot be read; try again")]
    Undecided(String),
}

impl StateStore {
    /// The store on stream `stream` for subjects `<prefix>.state.>` and `<prefix>.done.>`: the
    /// stream is created when absent; a live one is never changed (another worker, the gateway or
    /// an operator may have made it with more replicas or longer limits than this process would
    /// ask for), only checked: it must hold both subject spaces, allow atomic batches,
    /// per-message TTLs and direct gets, and never remove state or a marker before its time
    /// (limits retention, `max_age` 0, no message or byte cap with discard old). Every process that uses the store (each worker, each
    /// gateway replica with the route's `state`) calls this, so none depends on start order.
    ///
    /// Errors: [`StateError::Unsuitable`] naming what the live stream lacks;
    /// [`StateError::Provision`] when it cannot be read or created.
    pub async fn ensure(
        js: async_nats::jetstream::Context,
        stream: &str,
        prefix: &str,
        marker_ttl: Duration,
    ) -> Result<Self, StateError> {
        let store = Self::attach(js, stream, prefix, marker_ttl);
        store.provision().await?;
        Ok(store)
    }

    /// Creates this store's stream when absent, or checks the live one (see [`StateStore::ensure`]).
    pub async fn provision(&self) -> Result<(), StateError> {
        let failed = |detail: String| StateError::Provision {
            stream: self.stream.clone(),
            detail,
        };
        let subjects = vec![
            format!("{}.state.>", self.prefix),
            format!("{}.done.>", self.prefix),
        ];
        let live = match self.js.get_stream(&self.stream).await {
            Ok(live) => live.cached_info().config.clone(),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                let config = Config {
                    name: self.stream.clone(),
                    subjects,
                    storage: StorageType::File,
                    max_messages_per_subject: 1,
                    discard: DiscardPolicy::Old,
                    allow_direct: true,
                    allow_message_ttl: true,
                    allow_atomic_publish: true,
                    num_replicas: self.replicas,
                    ..Default::default()
                };
                return match self.js.create_stream(config).await {
                    Ok(_) => Ok(()),
                    // Another process created it a moment ago with another configuration (the
                    // same one would have been accepted): check that one.
                    Err(e)
                        if matches!(e.kind(), CreateStreamErrorKind::JetStream(ref j)
                            if j.error_code() == ErrorCode::STREAM_NAME_EXIST) =>
                    {
                        Box::pin(self.provision()).await
                    }
                    Err(e) => Err(failed(e.to_string())),
                };
            }
            Err(e) => return Err(failed(e.to_string())),
        };
        let mut lacks: Vec<String> = subjects
            .iter()
            .filter(|wanted| {
                !live
                    .subjects
                    .iter()
                    .any(|have| subject_covers(have, wanted))
            })
            .map(|wanted| format!("subjects {wanted}"))
            .collect();
        for (allowed, what) in [
            (live.allow_atomic_publish, "allow_atomic_publish"),
            (live.allow_message_ttl, "allow_msg_ttl"),
            (live.allow_direct, "allow_direct"),
        ] {
            if !allowed {
                lacks.push(what.to_owned());
            }
        }
        // Nothing may remove a marker before its TTL: a redelivery that found it gone would run
        // the handler again.
        if live.retention != RetentionPolicy::Limits {
            lacks.push("limits retention (markers are never consumed away)".to_owned());
        }
        // State versions carry no TTL: a `max_age` would make a key untouched that long load as
        // absent, and a handler commit from the wrong base.
        if !live.max_age.is_zero() {
            lacks.push(format!(
                "max_age 0 (state must not age out; it has {:?})",
                live.max_age
            ));
        }
        let capped = live.max_messages > 0 || live.max_bytes > 0;
        if capped && live.discard == DiscardPolicy::Old {
            lacks.push(
                "discard new with its max_msgs/max_bytes (discard old would evict markers)"
                    .to_owned(),
            );
        }
        if lacks.is_empty() {
            Ok(())
        } else {
            Err(StateError::Unsuitable {
                stream: self.stream.clone(),
                lacks: lacks.join(", "),
            })
        }
    }

    /// The store of an existing stream, without creating or changing it (the gateway's view of a
    /// stateful route's arbiter).
    pub fn attach(
        js: async_nats::jetstream::Context,
        stream: &str,
        prefix: &str,
        marker_ttl: Duration,
    ) -> Self {
        Self {
            js,
            stream: stream.to_owned(),
            prefix: prefix.to_owned(),
            marker_ttl,
            replicas: 1,
        }
    }

    /// The store, creating its stream (when absent) with `replicas` (3 in a 3-node cluster, as
    /// the gateway's own streams: the markers decide outcomes, so they need the durability of
    /// the requests they decide). A live stream keeps its own count.
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// How long a marker lives: the store's `marker_ttl`, and never less than the operation's
    /// own retention, so that no redelivery or re-drive of a request that still exists can find
    /// its marker gone and run again.
    fn marker_ttl(&self, retention: Option<Duration>) -> Duration {
        self.marker_ttl
            .max(retention.unwrap_or_default())
            .max(Duration::from_secs(1))
    }

    fn state_subject(&self, key: &str) -> String {
        format!("{}.state.{key}", self.prefix)
    }

    fn marker_subject(&self, operation_id: &str) -> String {
        format!("{}.done.{operation_id}", self.prefix)
    }

    /// The operation's marker, if it was decided: a commit's outbox or a decision without one.
    pub async fn marker(&self, operation_id: &str) -> Result<Option<Outbox>, StateError> {
        let subject = self.marker_subject(operation_id);
        let Some(marker) = last_on_subject_from_leader(&self.js, &self.stream, &subject).await?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&marker.payload)
            .map(Some)
            .map_err(|source| StateError::Decode {
                key: subject,
                source,
            })
    }

    /// Decides an operation without a commit, unless it is decided already: a create-if-absent
    /// write of `record` as its marker. Returns the marker that holds the slot either way (this
    /// decision, or the commit or decision that got there first). This is the one arbiter of a
    /// stateful operation's outcome: the commit batch expects the marker absent too.
    pub async fn decide(
        &self,
        operation_id: &str,
        record: &ResultRecord,
        retention: Option<Duration>,
    ) -> Result<Outbox, StateError> {
        self.claim(operation_id, Outbox::decision(record), retention)
            .await
    }

    /// A create-if-absent write of `decision` as the operation's marker; the marker that holds
    /// the slot after it.
    async fn claim(
        &self,
        operation_id: &str,
        decision: Outbox,
        retention: Option<Duration>,
    ) -> Result<Outbox, StateError> {
        let mut headers = HeaderMap::new();
        headers.insert(crate::contract::header::OPERATION_ID, operation_id);
        let payload = Bytes::from(serde_json::to_vec(&decision).expect("a marker serializes"));
        // Refused, then not found: the holder's TTL ended in between (or a replicated store is
        // applying it). Try again rather than assume this decision won: only a stored marker is
        // an outcome.
        for _ in 0..3 {
            let written = create_if_absent(
                &self.js,
                self.marker_subject(operation_id),
                headers.clone(),
                payload.clone(),
                Some(self.marker_ttl(retention)),
            )
            .await?;
            if written == CreateOutcome::Created {
                return Ok(decision);
            }
            if let Some(marker) = self.marker(operation_id).await? {
                return Ok(marker);
            }
        }
        Err(StateError::Undecided(operation_id.to_owned()))
    }

    /// Loads a key's value and the sequence it was stored at (0: never stored).
    async fn load_raw(&self, key: &str) -> Result<(u64, Option<Bytes>), StateError> {
        let subject = self.state_subject(key);
        Ok(
            match last_on_subject_from_leader(&self.js, &self.stream, &subject).await? {
                Some(m) => (m.sequence, Some(m.payload)),
                None => (0, None),
            },
        )
    }

    /// Commits changed state and the marker (holding the reply) atomically. `Ok(false)`: the batch
    /// was refused by an expected-sequence check (a concurrent change or commit), nothing stored.
    async fn commit(
        &self,
        operation_id: &str,
        changes: Vec<(String, u64, Bytes)>,
        outbox: &Outbox,
        retention: Option<Duration>,
    ) -> Result<bool, StateError> {
        let client = self.js.client();
        let batch_id = format!(
            "{}-{}",
            &operation_id[..operation_id.len().min(40)],
            client.new_inbox().rsplit('.').next().unwrap_or("0")
        );
        let batch_id: String = batch_id.chars().take(64).collect();
        let mut messages: Vec<(String, HeaderMap, Bytes)> = changes
            .into_iter()
            .map(|(key, expected, value)| {
                let mut h = HeaderMap::new();
                h.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    expected.to_string().as_str(),
                );
                (self.state_subject(&key), h, value)
            })
            .collect();
        let mut marker = HeaderMap::new();
        marker.insert(crate::contract::header::OPERATION_ID, operation_id);
        marker.insert("Nats-Expected-Last-Subject-Sequence", "0");
        marker.insert(
            "Nats-TTL",
            self.marker_ttl(retention).as_secs().to_string().as_str(),
        );
        let outbox = serde_json::to_vec(outbox).expect("an outbox serializes");
        messages.push((
            self.marker_subject(operation_id),
            marker,
            Bytes::from(outbox),
        ));
        match publish_atomic_batch(&client, &batch_id, messages).await {
            Ok(BatchOutcome::Committed) => Ok(true),
            Ok(BatchOutcome::Refused) => Ok(false),
            Err(e) => Err(StateError::Commit(e.to_string())),
        }
    }
}

/// The processed marker's content: what decided the operation, and what is published for it.
/// Either a commit's outbox (the reply and the outgoing messages, stored with the state change),
/// or a decision taken without a commit (`cancelled`, `expired`, `failed`: its record, nothing to
/// emit). Whoever publishes a marker publishes the same bytes with the same ids.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Outbox {
    status: u16,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
    /// Base64.
    body: String,
    /// Where the body is when it was too large for a message (then `body` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_object: Option<BodyObject>,
    pub emits: Vec<Emit>,
    /// Absent: a commit. Present: the decision that ended the operation without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decided: Option<Decision>,
}

/// An operation's end without a state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Cancelled,
    Expired,
    Failed,
}

impl Outbox {
    fn new(reply: &ResultRecord, emits: Vec<Emit>) -> Self {
        Self {
            status: reply.status,
            content_type: reply.content_type.clone(),
            headers: reply.headers.clone(),
            body: data_encoding::BASE64.encode(&reply.body),
            body_object: reply.body_object.clone(),
            emits,
            decided: None,
        }
    }

    /// A stateless handler's answer, published like a marker (nothing to emit).
    pub(crate) fn reply_of(record: &ResultRecord) -> Self {
        Self::new(record, Vec::new())
    }

    /// A decision without a commit, carrying `record` (a marker's, or a failure's problem).
    pub fn decision(record: &ResultRecord) -> Self {
        let decided = match record.outcome {
            Outcome::Cancelled => Decision::Cancelled,
            Outcome::Expired => Decision::Expired,
            Outcome::Reply => Decision::Failed,
        };
        Self {
            decided: Some(decided),
            ..Self::new(record, Vec::new())
        }
    }

    /// How the operation ended without a commit; `None` for a commit (or a stateless reply).
    pub fn decided(&self) -> Option<Decision> {
        self.decided
    }

    /// Whether the operation's state changed (this is a commit's outbox).
    pub fn is_commit(&self) -> bool {
        self.decided.is_none()
    }

    /// The record the results stream gets.
    pub fn reply(&self) -> ResultRecord {
        let body = data_encoding::BASE64
            .decode(self.body.as_bytes())
            .unwrap_or_default();
        let mut record =
            ResultRecord::reply(self.status, self.content_type.clone(), Bytes::from(body));
        record.outcome = match self.decided {
            Some(Decision::Cancelled) => Outcome::Cancelled,
            Some(Decision::Expired) => Outcome::Expired,
            Some(Decision::Failed) | None => Outcome::Reply,
        };
        record.headers = self.headers.clone();
        record.body_object = self.body_object.clone();
        record
    }
}

/// Whether stream subject `filter` matches every subject of `subject` (itself a filter), by NATS
/// wildcard rules (`*` one token, `>` the rest). Hand-written: async-nats has no subject matcher.
fn subject_covers(filter: &str, subject: &str) -> bool {
    let mut have = filter.split('.');
    let mut want = subject.split('.');
    loop {
        match (have.next(), want.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(w)) if w != ">" => {}
            (Some(h), Some(w)) if h == w => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Publishes a decided marker of `request`: a commit's outgoing messages first (each with its
/// deterministic `Nats-Msg-Id`), then the record in the slot the request names, first writer
/// wins, with `extra` headers (trace context). `results_stream` is where a contract-1 request's
/// slot is (it names none). Every publisher of one marker publishes the same, so repeating it (a
/// redelivery, the gateway, the finalizer) is harmless.
pub async fn project(
    js: &async_nats::jetstream::Context,
    request: &RequestHead,
    results_stream: &str,
    marker: &Outbox,
    extra: Vec<(String, String)>,
) -> Result<ResultWrite, JetStreamError> {
    for emit in &marker.emits {
        let message = PublishMessage::build()
            .payload(emit.payload())
            .message_id(&emit.id);
        js.send_publish(emit.subject.clone(), message)
            .await
            .map_err(JetStreamError::from)?
            .await
            .map_err(JetStreamError::from)?;
    }
    let mut record = marker.reply();
    record.headers.extend(extra);
    publish_result(
        js,
        request.reply_stream_or(results_stream),
        &request.reply_subject,
        &request.operation_id,
        &record,
        request.reply_ttl(),
    )
    .await
}

/// An outgoing message of a stateful handler: published after the commit with
/// `Nats-Msg-Id: <id>` (derived from the operation id), so that a re-publish is a duplicate
/// JetStream drops within its window, and one a downstream handler can recognise after it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Emit {
    pub subject: String,
    pub id: String,
    /// Base64.
    payload: String,
}

impl Emit {
    pub fn payload(&self) -> Bytes {
        Bytes::from(
            data_encoding::BASE64
                .decode(self.payload.as_bytes())
                .unwrap_or_default(),
        )
    }
}

/// What a stateful handler works with: the request, state to load and save, outgoing messages,
/// deterministic ids.
pub struct StatefulContext {
    request: Request,
    store: StateStore,
    loaded: Mutex<HashMap<String, u64>>,
    saved: Mutex<Vec<(String, Bytes)>>,
    emits: Mutex<Vec<Emit>>,
    next_id: Mutex<u64>,
}

impl StatefulContext {
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Loads a key's state (`None` if never saved). The first version this run read of a key is
    /// what a later `save` of it expects to replace.
    pub async fn load<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        let (seq, bytes) = self.store.load_raw(key).await?;
        // The commit expects the *first* version this run read: a value computed from it must
        // not commit over a change that a later read of the same key happened to see.
        self.loaded
            .lock()
            .expect("context lock")
            .entry(key.to_owned())
            .or_insert(seq);
        bytes
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|source| StateError::Decode {
                key: key.to_owned(),
                source,
            })
    }

    /// Stages a new value for a key (committed with the reply, or not at all). Keys are subject
    /// tokens: letters, digits, `-` and `_`.
    pub fn save<T: Serialize>(&self, key: &str, value: &T) {
        let bytes = serde_json::to_vec(value).expect("state serializes");
        self.saved
            .lock()
            .expect("context lock")
            .push((key.to_owned(), Bytes::from(bytes)));
    }

    /// Stages an outgoing message to `subject` (a JetStream subject), published after the commit
    /// with a deterministic id; returns that id.
    pub fn emit(&self, subject: impl Into<String>, payload: impl AsRef<[u8]>) -> String {
        let id = self.new_id();
        self.emits.lock().expect("context lock").push(Emit {
            subject: subject.into(),
            id: id.clone(),
            payload: data_encoding::BASE64.encode(payload.as_ref()),
        });
        id
    }

    /// An id derived from the operation id: the same on every run of this operation.
    pub fn new_id(&self) -> String {
        let mut n = self.next_id.lock().expect("context lock");
        *n += 1;
        format!("{}-{}", self.request.operation_id, *n)
    }
}

/// A handler with state: `async fn(Arc<StatefulContext>) -> Result<Response, HandlerError>`.
pub trait StatefulHandler: Send + Sync + 'static {
    fn call(&self, ctx: Arc<StatefulContext>) -> BoxFuture<Result<Response, HandlerError>>;
}

impl<F, Fut> StatefulHandler for F
where
    F: Fn(Arc<StatefulContext>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response, HandlerError>> + Send + 'static,
{
    fn call(&self, ctx: Arc<StatefulContext>) -> BoxFuture<Result<Response, HandlerError>> {
        Box::pin(self(ctx))
    }
}

/// What a stateful run produced: the marker to publish, from this run's commit, or the decision
/// that came first (an earlier commit, a cancellation, an expiry, a failure; then nothing of this
/// run was committed).
pub enum Committed {
    Now(Outbox),
    Before(Outbox),
}

/// Runs a stateful handler for one request under the commit protocol above. `Err` with a
/// `HandlerError` means: nothing was committed, retry later.
///
/// `commit_by` is when the request stops existing (its publish time plus its retention, less the
/// clock allowance): a run still going then commits nothing, because every marker that could
/// refuse its commit (a cancellation, an expiry) is only kept that long.
pub async fn run(
    store: &StateStore,
    handler: &dyn StatefulHandler,
    request: Request,
    commit_by: Option<time::OffsetDateTime>,
    reply_inline_max: usize,
) -> Result<Committed, HandlerError> {
    let op = request.operation_id.clone();
    let retention = request.retention_secs.map(Duration::from_secs);
    if let Some(marker) = store.marker(&op).await? {
        return Ok(Committed::Before(marker));
    }
    // The redrive of an operation that committed: its outbox again (the same reply, the same
    // emits with the same ids), never a second state change. Its marker is final (the original
    // ended), so this read cannot race the original's commit.
    if let Some(original) = &request.redrive_of
        && let Some(marker) = store.marker(original).await?
        && marker.is_commit()
    {
        let adopted = store.claim(&op, marker, retention).await?;
        return Ok(Committed::Before(adopted));
    }
    let ctx = Arc::new(StatefulContext {
        request,
        store: store.clone(),
        loaded: Mutex::default(),
        saved: Mutex::default(),
        emits: Mutex::default(),
        next_id: Mutex::new(0),
    });
    let response = handler.call(ctx.clone()).await?;
    let record = response.into_record();
    record.validate()?;
    crate::retry::retried_status(ctx.request.retry_policy.as_ref(), record.status)?;
    let changes = {
        let loaded = ctx.loaded.lock().expect("context lock");
        let mut changes: Vec<(String, u64, Bytes)> = Vec::new();
        for (key, value) in ctx.saved.lock().expect("context lock").drain(..) {
            // A key saved without being loaded expects to be new.
            let expected = loaded.get(&key).copied().unwrap_or(0);
            changes.retain(|(k, _, _)| *k != key);
            changes.push((key, expected, value));
        }
        changes
    };
    let emits = std::mem::take(&mut *ctx.emits.lock().expect("context lock"));
    // A large reply body is stored before the commit that names it; whatever stops the commit
    // from naming it after all removes it.
    let record =
        crate::claim_check::store_reply(&store.js, &ctx.request.head, record, reply_inline_max)
            .await?;
    let outbox = Outbox::new(&record, emits);
    let unused = async || {
        if let Some(object) = &record.body_object {
            crate::claim_check::discard(&store.js, object).await;
        }
    };
    // A client cancelled while the handler ran (the worker watches for the cancelled result):
    // commit nothing. A cancellation landing after this check is decided by the marker all the
    // same: the gateway claims it before it writes `cancelled`, so then this commit is refused.
    if ctx.request.cancellation.is_cancelled() {
        unused().await;
        return Err("the operation was cancelled; nothing was committed".into());
    }
    if commit_by.is_some_and(|by| time::OffsetDateTime::now_utc() >= by) {
        unused().await;
        return Err("the operation's retention ended while it ran; nothing was committed".into());
    }
    crate::faults::crash_point("before-commit");
    // A commit whose outcome is unknown (an error) may have stored the outbox: its object stays.
    if store.commit(&op, changes, &outbox, retention).await? {
        crate::faults::crash_point("after-commit");
        crate::faults::pause_point("after-commit", &ctx.request.route).await;
        return Ok(Committed::Now(outbox));
    }
    unused().await;
    // Refused: either the operation was decided meanwhile (a commit of another run, or a
    // cancellation, expiry or failure: publish that), or the state changed under us (run again
    // later, against the new state).
    match store.marker(&op).await? {
        Some(marker) => Ok(Committed::Before(marker)),
        None => Err("state changed concurrently; the operation will run again".into()),
    }
}
