//! The three JetStream primitives both sides build on: *create-if-absent* on a subject, *direct
//! get* of a subject's last message (exact or by wildcard), and the *first-writer-wins* result
//! write that sits on top of the first.
//!
//! Everything here is one round trip to the server. Nothing here keeps state between calls, so any
//! number of gateway replicas and workers can call it at once: JetStream's per-subject sequence
//! check is the only arbiter.

use std::time::Duration;

use std::future::Future;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::message::StreamMessage;
use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;

use crate::contract::{ContractError, ResultRecord, err_code};

// The reporter moved to `progress` with the report's shape; it stays reachable here.
pub use crate::progress::ProgressReporter;

/// Errors talking to JetStream. Every variant except `Contract` means "the outcome of this call
/// is unknown or it did not happen": a caller may retry the same call.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("publish failed ({kind}): {source}")]
    Publish {
        kind: PublishErrorKind,
        #[source]
        source: PublishError,
    },
    #[error("direct get from stream {stream} failed: {detail}")]
    Get { stream: String, detail: String },
    #[error("a stored message breaks the wire contract: {0}")]
    Contract(#[from] ContractError),
    #[error(transparent)]
    Body(#[from] crate::claim_check::ClaimCheckError),
    /// An atomic batch was refused (`code`: the JetStream error code), or its outcome is unknown
    /// (`code` `None`: no answer to the commit).
    #[error("atomic batch {batch} failed: {detail}")]
    Batch {
        batch: String,
        code: Option<u64>,
        detail: String,
    },
    /// An atomic batch's commit was never sent, so nothing of it was stored (the server drops
    /// an uncommitted batch; ADR-50): message `index` is over the server's `max_payload` with
    /// its headers (`too_large`), or the connection refused a message before the commit.
    #[error("atomic batch {batch} not sent at message {index}: {detail}")]
    BatchNotSent {
        batch: String,
        index: usize,
        too_large: bool,
        detail: String,
    },
}

impl JetStreamError {
    /// Whether the stream, the account or the server had no room (see [`store_full`]).
    pub fn is_store_full(&self) -> bool {
        match self {
            JetStreamError::Publish { source, .. } => store_full(source),
            JetStreamError::Batch {
                code: Some(code),
                detail,
                ..
            } => {
                *code == err_code::STORAGE_RESOURCES_EXCEEDED
                    || *code == err_code::INSUFFICIENT_RESOURCES
                    || (*code == err_code::MAX_MSGS_PER_SUBJECT && !detail.contains("per subject"))
            }
            _ => false,
        }
    }

    /// Whether a message was over the server's `max_payload`: refused before it was sent.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            JetStreamError::Publish {
                kind: PublishErrorKind::MaxPayloadExceeded,
                ..
            } | JetStreamError::BatchNotSent {
                too_large: true,
                ..
            }
        )
    }
}

/// What an atomic batch publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every message was stored, together.
    Committed,
    /// An expected-sequence check failed (a subject was taken, or a state key changed): nothing
    /// was stored.
    Refused,
}

/// Publishes `messages` as one JetStream atomic batch (nats-server 2.12+, a stream with
/// `allow_atomic`; ADR-50): all are stored or none, and each may carry its own expected-sequence
/// checks (a create-if-absent is `Nats-Expected-Last-Subject-Sequence: 0`), any of which failing
/// refuses the whole batch. nats-server 2.15.1 takes at most 1,000 messages in a batch
/// (error 10199 beyond). Every message goes to `client` as core NATS with `Nats-Batch-Id` and
/// `Nats-Batch-Sequence`; the last carries `Nats-Batch-Commit: 1` and its answer is the batch's.
///
/// Hand-written glue: async-nats 0.4x has no atomic batch publish.
///
/// Errors: [`JetStreamError::BatchNotSent`] when the commit was never sent (a message over
/// `max_payload`, checked before anything is sent; the connection refusing a message; no
/// responders for the commit): nothing was stored. [`JetStreamError::Batch`] for any other
/// refusal (its code says which: 10199 too large, a full stream...), or with no code when the
/// commit got no answer (outcome unknown: the batch was stored whole or not at all).
pub async fn publish_atomic_batch(
    client: &async_nats::Client,
    batch_id: &str,
    messages: Vec<(String, HeaderMap, Bytes)>,
) -> Result<BatchOutcome, JetStreamError> {
    let failed = |code: Option<u64>, detail: String| JetStreamError::Batch {
        batch: batch_id.to_owned(),
        code,
        detail,
    };
    let not_sent = |index: usize, too_large: bool, detail: String| JetStreamError::BatchNotSent {
        batch: batch_id.to_owned(),
        index,
        too_large,
        detail,
    };
    let max_payload = client.server_info().max_payload;
    if let Some(index) = messages
        .iter()
        .position(|(_, headers, payload)| !fits_in_batch(headers, payload, max_payload))
    {
        return Err(not_sent(
            index,
            true,
            format!("over the server's max_payload of {max_payload} bytes"),
        ));
    }
    let count = messages.len();
    for (index, (subject, mut headers, payload)) in messages.into_iter().enumerate() {
        headers.insert("Nats-Batch-Id", batch_id);
        headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
        if index + 1 < count {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| {
                    let too_large =
                        e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded;
                    not_sent(index, too_large, e.to_string())
                })?;
            continue;
        }
        headers.insert("Nats-Batch-Commit", "1");
        let answer = client
            .request_with_headers(subject, headers, payload)
            .await
            .map_err(|e| match e.kind() {
                // No stream listens on the subject: the commit reached nothing.
                RequestErrorKind::NoResponders => not_sent(index, false, e.to_string()),
                _ => failed(None, e.to_string()),
            })?;
        let v: serde_json::Value =
            serde_json::from_slice(&answer.payload).map_err(|e| failed(None, e.to_string()))?;
        return match v["error"]["err_code"].as_u64() {
            None if v["batch"].is_string() => Ok(BatchOutcome::Committed),
            Some(err_code::WRONG_LAST_SEQUENCE | err_code::WRONG_LAST_SEQUENCE_IN_FLIGHT) => {
                Ok(BatchOutcome::Refused)
            }
            // A subject's one message is there already (discard new per subject).
            Some(err_code::MAX_MSGS_PER_SUBJECT)
                if v["error"]["description"]
                    .as_str()
                    .is_some_and(|d| d.contains("per subject")) =>
            {
                Ok(BatchOutcome::Refused)
            }
            code => Err(failed(code, v["error"]["description"].to_string())),
        };
    }
    Err(failed(None, "an atomic batch needs a message".to_owned()))
}

impl From<PublishError> for JetStreamError {
    fn from(source: PublishError) -> Self {
        JetStreamError::Publish {
            kind: source.kind(),
            source,
        }
    }
}

/// What a create-if-absent write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// This call wrote the subject's first message.
    Created,
    /// The subject already held a message; nothing was written.
    AlreadyExists,
}

/// The JetStream error behind a publish's failure, if the server gave one.
fn server_error(err: &PublishError) -> Option<&async_nats::jetstream::Error> {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js);
        }
        source = e.source();
    }
    None
}

/// True when a publish was refused because the subject already holds a message: either the
/// expected-last-subject-sequence check (10071) or per-subject discard (10077 "maximum messages
/// per subject exceeded", which the server reports with code 503 although nothing is
/// unavailable). 10077 is the server's "stream store failed" for every limit, so its text says
/// which one: a full stream is not a taken subject (see [`store_full`]).
fn subject_taken(err: &PublishError) -> bool {
    if err.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    server_error(err).is_some_and(|js| {
        let code = js.error_code().0;
        code == err_code::WRONG_LAST_SEQUENCE
            || code == err_code::WRONG_LAST_SEQUENCE_IN_FLIGHT
            || (code == err_code::MAX_MSGS_PER_SUBJECT && js.to_string().contains("per subject"))
    })
}

/// True when a publish was refused because the stream, the account or the server has no room:
/// the stream's `max_bytes` or `max_msgs` with discard new (10077, "maximum bytes exceeded",
/// "maximum messages exceeded") or JetStream's storage resources (10047; 10023 when the server's
/// `max_file_store` is reached). Verified on nats-server 2.15.1. Nothing was written; writing
/// again succeeds once room is made.
pub fn store_full(err: &PublishError) -> bool {
    server_error(err).is_some_and(|js| {
        let code = js.error_code().0;
        code == err_code::STORAGE_RESOURCES_EXCEEDED
            || code == err_code::INSUFFICIENT_RESOURCES
            || (code == err_code::MAX_MSGS_PER_SUBJECT && !js.to_string().contains("per subject"))
    })
}

/// Something that stores JetStream publishes and says how each went: a
/// [`Context`](async_nats::jetstream::Context) sends each at once, a [`Batcher`] gathers them.
pub trait SendPublish: Sync {
    /// Stores one message (`headers` hold its checks and TTL) and waits for its ack.
    fn store(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

impl SendPublish for async_nats::jetstream::Context {
    async fn store(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        let message = PublishMessage::build().payload(payload).headers(headers);
        self.send_publish(subject, message).await?.await.map(drop)
    }
}

/// Sends publishes from many concurrent callers in batches, so that they leave in one write and,
/// with [`Grouping::AtomicBatches`], are stored with one fsync.
///
/// Hand-written glue: async-nats writes each publish as soon as its connection task runs, and
/// tokio runs that task right after each caller yields, so concurrent HTTP requests each cost
/// nats-server a read and an ack write of their own. The batcher's task yields once before
/// sending, which lets every request that is ready at that moment join the batch. A store with
/// no other under way (light load) skips the task and is sent at once.
#[derive(Clone, Debug)]
pub struct Batcher {
    jobs: tokio::sync::mpsc::Sender<PublishJob>,
    js: async_nats::jetstream::Context,
    /// Stores under way through this batcher (from the call until the ack).
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// One store under way, counted in [`Batcher::in_flight`] until dropped.
struct Underway<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Underway<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How a [`Batcher`] stores what it gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Grouping {
    /// Each message is its own publish (one write to NATS for all of them): JetStream stores and
    /// acknowledges each on its own. The right choice at JetStream's default durability.
    #[default]
    Publishes,
    /// Two or more messages gathered together go as one JetStream atomic batch (ADR-50), so a
    /// server with `sync_interval: always` stores them all with one fsync (nats-server 2.15.1
    /// measured 4 fsyncs per committed batch, against one per message). Fates stay apart: a
    /// batch the server refuses stored nothing (one taken subject refuses it whole, and the
    /// answer does not say which), so each of its messages is then published on its own and
    /// gets its own answer. Only a commit that gets no answer leaves all of them unknown, as a
    /// publish without an ack leaves one. Needs a stream with `allow_atomic`.
    AtomicBatches,
}

#[derive(Debug)]
struct PublishJob {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    sent: tokio::sync::oneshot::Sender<Sent>,
}

/// What the batcher's task did with a job.
#[derive(Debug)]
enum Sent {
    /// Published on its own: its ack is to come.
    Publish(Result<PublishAckFuture, PublishError>),
    /// Stored (or refused, or unknown) as part of an atomic batch.
    Batched(Result<(), PublishError>),
}

/// Atomic batches a [`Batcher`] with [`Grouping::AtomicBatches`] sent, by `outcome`:
/// `committed`, `refused` (each message then published on its own), `unknown` (no answer).
pub const GROUP_COMMITS: &str = "gateway_group_commits_total";

/// Most publishes gathered into one batch (nats-server 2.15.1 takes at most 1,000 messages in an
/// atomic batch and 50 batches in flight per stream).
const BATCH: usize = 256;

impl Batcher {
    /// Starts the batching task on the current runtime; it ends when every `Batcher` is dropped.
    pub fn spawn(js: async_nats::jetstream::Context, grouping: Grouping) -> Self {
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<PublishJob>(4 * BATCH);
        let batcher = Self {
            jobs,
            js: js.clone(),
            in_flight: Default::default(),
        };
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while queue.recv_many(&mut batch, BATCH).await > 0 {
                tokio::task::yield_now().await;
                while batch.len() < BATCH {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                // One batch at a time, as a database's group commit: whatever arrives while a
                // batch is being stored (its fsyncs) joins the next one, so batches grow with
                // the load instead of splitting it into many small ones.
                if grouping == Grouping::AtomicBatches && batch.len() > 1 {
                    let group = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    store_group(&js, group).await;
                    continue;
                }
                for job in batch.drain(..) {
                    publish_alone(&js, job).await;
                }
            }
        });
        batcher
    }
}

/// Sends one job's message as a publish of its own.
async fn publish_alone(js: &async_nats::jetstream::Context, job: PublishJob) {
    let message = PublishMessage::build()
        .payload(job.payload)
        .headers(job.headers);
    let sent = js.send_publish(job.subject, message).await;
    let _ = job.sent.send(Sent::Publish(sent));
}

/// Stores `group` as one atomic batch; when the server refuses it, publishes each message on its
/// own (see [`Grouping::AtomicBatches`]).
async fn store_group(js: &async_nats::jetstream::Context, group: Vec<PublishJob>) {
    // Two messages on one subject would refuse each other inside a batch: the first goes in it,
    // the others on their own after it (each then finds the subject taken, or free). A message
    // too large for the server goes on its own too, to be refused alone: in the batch, the
    // client's refusal to send it would leave the batch uncommitted, and every message in it
    // unanswered.
    let max_payload = js.client().server_info().max_payload;
    let mut subjects = std::collections::HashSet::with_capacity(group.len());
    let (batch, repeats): (Vec<_>, Vec<_>) = group.into_iter().partition(|job| {
        fits_in_batch(&job.headers, &job.payload, max_payload)
            && subjects.insert(job.subject.clone())
    });
    let alone = match batch.len() {
        0 | 1 => batch,
        _ => store_atomically(js, batch).await,
    };
    for job in alone.into_iter().chain(repeats) {
        publish_alone(js, job).await;
    }
}

/// Bytes the atomic batch headers add to a message, at most (`Nats-Batch-Id` of 32 characters,
/// `Nats-Batch-Sequence`, `Nats-Batch-Commit`), with room to spare.
const BATCH_HEADERS: usize = 128;

/// Whether a message with `headers` and `payload` stays within the server's `max_payload`
/// (bytes, from its INFO) once the atomic batch headers are added.
pub fn fits_in_batch(headers: &HeaderMap, payload: &Bytes, max_payload: usize) -> bool {
    message_size(headers, payload) + BATCH_HEADERS <= max_payload
}

/// A message's size as the server's `max_payload` counts it: its header block, as NATS writes it
/// (`NATS/1.0`, each `name: value`, a blank line), plus its payload.
fn message_size(headers: &HeaderMap, payload: &Bytes) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|value| name.len() + value.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n\r\n".len() + fields + payload.len()
}

/// Stores `batch` (at least two messages, each on its own subject) as one atomic batch and
/// answers its jobs; hands back those still to publish on their own (all of them, when the
/// server refused the batch).
async fn store_atomically(
    js: &async_nats::jetstream::Context,
    batch: Vec<PublishJob>,
) -> Vec<PublishJob> {
    let messages = batch
        .iter()
        .map(|job| {
            (
                job.subject.clone(),
                job.headers.clone(),
                job.payload.clone(),
            )
        })
        .collect();
    let batch_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let answer = |batch: Vec<PublishJob>, stored: fn() -> Result<(), PublishError>| {
        for job in batch {
            let _ = job.sent.send(Sent::Batched(stored()));
        }
        Vec::new()
    };
    match publish_atomic_batch(&js.client(), &batch_id, messages).await {
        Ok(BatchOutcome::Committed) => {
            metrics::counter!(GROUP_COMMITS, "outcome" => "committed").increment(1);
            answer(batch, || Ok(()))
        }
        // No answer to the commit: stored whole or not at all, unknown which.
        Err(JetStreamError::Batch { code: None, .. }) => {
            metrics::counter!(GROUP_COMMITS, "outcome" => "unknown").increment(1);
            answer(batch, || Err(PublishError::new(PublishErrorKind::TimedOut)))
        }
        // Refused, so nothing was stored: each message gets its own answer.
        Ok(BatchOutcome::Refused) | Err(_) => {
            metrics::counter!(GROUP_COMMITS, "outcome" => "refused").increment(1);
            batch
        }
    }
}

impl SendPublish for Batcher {
    async fn store(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        let before = self
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _underway = Underway(&self.in_flight);
        if before == 0 {
            // Nothing to gather it with: sent at once, sparing the batcher's hand-offs (two
            // task wake-ups), which are most of a lone request's cost at low rates.
            return self.js.store(subject, headers, payload).await;
        }
        let (sent, receive) = tokio::sync::oneshot::channel();
        let job = PublishJob {
            subject,
            headers,
            payload,
            sent,
        };
        let gone = || PublishError::new(PublishErrorKind::BrokenPipe);
        self.jobs.send(job).await.map_err(|_| gone())?;
        match receive.await.map_err(|_| gone())? {
            Sent::Publish(ack) => ack?.await.map(drop),
            Sent::Batched(stored) => stored,
        }
    }
}

/// Adds to `headers` what makes a publish create-if-absent (`Nats-Expected-Last-Subject-Sequence:
/// 0`) and, with `ttl`, its `Nats-TTL` (whole seconds, at least one): see "Headers" in
/// https://docs.nats.io/nats-concepts/jetstream/headers.
pub fn create_if_absent_headers(headers: &mut HeaderMap, ttl: Option<Duration>) {
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    if let Some(ttl) = ttl {
        headers.insert("Nats-TTL", ttl.as_secs().max(1).to_string().as_str());
    }
}

/// Writes `payload` to `subject` only if the subject holds no message yet.
///
/// With `ttl`, the message carries `Nats-TTL` and the subject frees itself when it expires.
pub async fn create_if_absent(
    js: &impl SendPublish,
    subject: String,
    mut headers: HeaderMap,
    payload: Bytes,
    ttl: Option<Duration>,
) -> Result<CreateOutcome, JetStreamError> {
    create_if_absent_headers(&mut headers, ttl);
    match js.store(subject, headers, payload).await {
        Ok(()) => Ok(CreateOutcome::Created),
        Err(e) if subject_taken(&e) => Ok(CreateOutcome::AlreadyExists),
        Err(e) => Err(e.into()),
    }
}

fn get_error(stream: &str, detail: impl ToString) -> JetStreamError {
    JetStreamError::Get {
        stream: stream.to_owned(),
        detail: detail.to_string(),
    }
}

/// Sends one direct-get request and reads its first answer: the message, or `None` when the
/// server says there is none (404, or an empty batch ending in 204 EOB).
async fn direct_get(
    client: &async_nats::Client,
    stream: &str,
    subject: String,
    payload: Bytes,
) -> Result<Option<StreamMessage>, JetStreamError> {
    let response = match client.request(subject, payload).await {
        Ok(response) => response,
        Err(e) if e.kind() == RequestErrorKind::NoResponders => {
            return Err(get_error(
                stream,
                "no responders: stream missing or JetStream down",
            ));
        }
        Err(e) => return Err(get_error(stream, e)),
    };
    match response.status.map(|s| s.as_u16()) {
        None | Some(200) => StreamMessage::try_from(response)
            .map(Some)
            .map_err(|e| get_error(stream, e)),
        // 404: no such message; 204: the end of an empty batch.
        Some(404) | Some(204) => Ok(None),
        Some(status) => Err(get_error(
            stream,
            format!(
                "status {status}: {}",
                response.description.as_deref().unwrap_or("")
            ),
        )),
    }
}

/// The last message on an exact subject, read from any replica.
pub async fn last_on_subject(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
) -> Result<Option<StreamMessage>, JetStreamError> {
    direct_get(
        client,
        stream,
        format!("$JS.API.DIRECT.GET.{stream}.{subject}"),
        Bytes::new(),
    )
    .await
}

/// The last message on an exact subject, read from the stream's leader. Slower than a direct get
/// but never stale: used right after a write was refused, when the message that refused it must be
/// found even if a replica has not caught up yet.
pub async fn last_on_subject_from_leader(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Option<StreamMessage>, JetStreamError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let handle = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| get_error(stream, e))?;
    match handle.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(Some(message)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(get_error(stream, e)),
    }
}

/// The last message on the first subject matching a wildcard `pattern`, in one round trip
/// (a batched `multi_last` direct get; the server resolves the wildcard in its subject index).
pub async fn last_matching(
    client: &async_nats::Client,
    stream: &str,
    pattern: &str,
) -> Result<Option<StreamMessage>, JetStreamError> {
    let body = serde_json::json!({ "multi_last": [pattern], "batch": 1 });
    direct_get(
        client,
        stream,
        format!("$JS.API.DIRECT.GET.{stream}"),
        Bytes::from(body.to_string()),
    )
    .await
}

/// What happened to a terminal record written with [`publish_result`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultWrite {
    /// This record is now the operation's result.
    Stored,
    /// The same answer was already stored (a redelivery or a retry): nothing changed.
    AlreadyStored,
    /// Another, different terminal record won first; it stays, and this one is dropped.
    Conflict { existing: ResultRecord },
}

/// Writes an operation's terminal record, first writer wins.
///
/// When the subject is already taken, the stored record is read back (from the leader): the same
/// answer is [`ResultWrite::AlreadyStored`], a different one is [`ResultWrite::Conflict`] and
/// carries the record that won, so the caller can report it. A record that breaks the contract
/// (a status outside 200-599) is refused before anything is written.
pub async fn publish_result(
    js: &async_nats::jetstream::Context,
    results_stream: &str,
    subject: &str,
    operation_id: &str,
    record: &ResultRecord,
    ttl: Option<Duration>,
) -> Result<ResultWrite, JetStreamError> {
    record.validate()?;
    let outcome = create_if_absent(
        js,
        subject.to_owned(),
        record.to_headers(operation_id),
        record.body.clone(),
        ttl,
    )
    .await?;
    if outcome == CreateOutcome::Created {
        return Ok(ResultWrite::Stored);
    }
    let Some(stored) = read_back(js.client(), results_stream, subject).await? else {
        // Taken a moment ago, gone now: only a TTL expiry does that. Nothing to compare with,
        // and an expired operation takes no more results.
        discard_reply_body(js, operation_id, record).await;
        return Ok(ResultWrite::AlreadyStored);
    };
    let existing = match ResultRecord::from_stream_message(&stored) {
        // An outcome was stored and later removed (a delete marker holds the slot): the
        // operation took its one outcome; this one is not written.
        Err(ContractError::Removed { .. }) => {
            discard_reply_body(js, operation_id, record).await;
            return Ok(ResultWrite::AlreadyStored);
        }
        read => read?,
    };
    // This record lost: an object only it names is nobody's reply (the stored record may
    // name the same object, when this writer's own earlier write is what refused this one).
    if existing.body_object.as_ref().map(|o| &o.name)
        != record.body_object.as_ref().map(|o| &o.name)
    {
        discard_reply_body(js, operation_id, record).await;
    }
    if existing.same_answer(record) {
        Ok(ResultWrite::AlreadyStored)
    } else {
        Ok(ResultWrite::Conflict { existing })
    }
}

/// Removes the object holding `record`'s body, if it has one and it is this operation's own (a
/// redrive's record may name the reply it adopted from the operation it redrives, which that
/// operation's record still names; see [`crate::claim_check::discard`]).
async fn discard_reply_body(
    js: &async_nats::jetstream::Context,
    operation_id: &str,
    record: &ResultRecord,
) {
    if let Some(object) = &record.body_object
        && object.name.starts_with(&format!("{operation_id}.result."))
    {
        crate::claim_check::discard(js, object).await;
    }
}

/// The record that refused a write, by direct get (the one read a worker confined by NATS
/// permissions to its route's subjects may do: `$JS.API.DIRECT.GET.<stream>.<subject>`), asked
/// again for a moment while a lagging replica has not caught up with it. `None` when it never
/// shows: removed meanwhile, which only a TTL expiry does.
async fn read_back(
    client: async_nats::Client,
    stream: &str,
    subject: &str,
) -> Result<Option<StreamMessage>, JetStreamError> {
    for pause in [10, 20, 40, 80, 160] {
        if let Some(stored) = last_on_subject(&client, stream, subject).await? {
            return Ok(Some(stored));
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    last_on_subject(&client, stream, subject).await
}

/// Acknowledges a delivery (or naks or terms it, per `kind`). A failure is only logged: an
/// unacknowledged delivery comes back after AckWait, and every consumer here treats a
/// redelivery as harmless (the result check, the webhook's stored state).
pub async fn ack(message: &async_nats::jetstream::Message, kind: async_nats::jetstream::AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        tracing::debug!(subject = %message.subject, %error, "Cannot acknowledge a delivery.");
    }
}
