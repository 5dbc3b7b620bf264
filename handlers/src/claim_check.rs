//! Claim checks: bodies too large for a message, kept in a JetStream Object Store bucket and
//! named by the message (`Gw-Body-Bucket`, `Gw-Body-Object`, `Gw-Body-Size`,
//! `Gw-Body-Digest`). The gateway stores large request bodies (wire contract 3); a worker
//! stores a large reply body in the bucket the request names (`Gw-Reply-Bucket`) before it
//! writes the terminal record that names it.
//!
//! A route's bucket keeps an object for the bucket's `max_age` (the route's retention, set by
//! the gateway) from when it was stored: a request body goes with its operation, a reply body
//! shortly after (by the time its worker took). Whoever stores an object that ends up named by
//! no record removes it: the gateway when a request is refused, a worker when its record loses
//! the result slot or its commit is refused. A writer that crashes in between leaves the object
//! to `max_age`, so no object outlives its route's retention by more than that.
//!
//! The Object Store is the NATS one (ADR-20): chunks on `$O.<bucket>.C.<nuid>`, the object's
//! meta on `$O.<bucket>.M.<name>`, and a SHA-256 digest of the whole that async-nats checks as
//! it reads the last chunk.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use sha2::Digest as _;

use crate::contract::{BodyObject, RequestHead, ResultRecord};

/// A body in the Object Store (a request's or a reply's) cannot be read or written, or is not
/// what its message says.
#[derive(Debug, thiserror::Error)]
pub enum ClaimCheckError {
    /// The object is not there (removed, or its bucket's `max_age` passed).
    #[error("the body {name} in bucket {bucket} is gone")]
    Gone { bucket: String, name: String },
    /// The object is not what the message says (its size or digest differs).
    #[error("the body {name} in bucket {bucket} is not the one named: {detail}")]
    Mismatch {
        bucket: String,
        name: String,
        detail: String,
    },
    /// JetStream could not be read or written.
    #[error("the body {name} in bucket {bucket}: {detail}")]
    Unavailable {
        bucket: String,
        name: String,
        detail: String,
    },
    /// As many body reads run in this process as it serves at once.
    #[error("as many body reads run as this process serves at once")]
    Busy,
}

impl ClaimCheckError {
    fn unavailable(object: &BodyObject, detail: impl ToString) -> Self {
        Self::Unavailable {
            bucket: object.bucket.clone(),
            name: object.name.clone(),
            detail: detail.to_string(),
        }
    }

    fn mismatch(object: &BodyObject, detail: String) -> Self {
        Self::Mismatch {
            bucket: object.bucket.clone(),
            name: object.name.clone(),
            detail,
        }
    }
}

/// Chunks a body read pulls at a time (128 KiB each by default): what a read holds in memory
/// beyond the one being sent. 16 (2 MiB a pull) read a 100 MiB object at about 0.75 of a raw
/// Object Store get with no RSS growth; 32 reached 0.6 with +15 MiB (`scripts/bench --quick`).
const READ_AHEAD: usize = 16;
/// How long one pull of chunks may wait for them: chunks are stored, so only an unreachable
/// server makes one wait at all.
const FETCH_WAIT: Duration = Duration::from_secs(5);
/// Chunks on their way from the server to this process for all reads at once (32 MiB): well
/// under the 64 MiB nats-server lets wait for one client before it cuts it off as a slow
/// consumer. A read waits its turn for a share.
static IN_TRANSIT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(256);
/// Body reads a process serves at once: each holds a JetStream consumer while it lasts, and
/// nats-server limits those. More are refused ([`ClaimCheckError::Busy`]), not queued.
static READERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(128);
/// Consecutive lost pulls (a consumer gone, a chunk missing) a read recovers from by starting a
/// new consumer after the last chunk it has.
const RECOVERIES: u32 = 3;

/// Bytes `range` of a body kept in the Object Store, as a stream of chunks, once its object is
/// found to have the size and digest its message names. The chunks are pulled [`READ_AHEAD`] at
/// a time, one pull after the other, by an ephemeral pull consumer of the object's chunk
/// subject, created at the first poll (a stream dropped unpolled costs no consumer) and removed
/// when the read ends or is dropped. So a slow reader holds a few chunks, never the body (the
/// Object Store's own reader is a push consumer the server fills as fast as it can), and all
/// reads together have at most [`IN_TRANSIT`] chunks on the way.
///
/// Chunks are checked to come in order, none missing; a consumer lost meanwhile (a long pause
/// of the reader, a reconnection) is replaced by one starting after the last chunk read. A whole
/// read checks the SHA-256 at the end: other bytes end the stream with
/// [`ClaimCheckError::Mismatch`] instead of its last chunk. Reaching `range.start` reads and
/// drops the chunks before it (the Object Store has no index of an object's chunks).
///
/// Errors: [`ClaimCheckError::Busy`] when [`READERS`] reads run already; `Gone`, `Mismatch`,
/// `Unavailable` as their names say.
///
/// Hand-written glue: async-nats reads an object only whole, through a push consumer.
pub async fn read_body(
    js: &async_nats::jetstream::Context,
    object: &BodyObject,
    range: std::ops::Range<u64>,
) -> Result<impl Stream<Item = Result<Bytes, ClaimCheckError>> + Send + use<>, ClaimCheckError> {
    use async_nats::jetstream::object_store::InfoErrorKind;
    let reader = READERS.try_acquire().map_err(|_| ClaimCheckError::Busy)?;
    let store = js
        .get_object_store(&object.bucket)
        .await
        .map_err(|e| ClaimCheckError::unavailable(object, e))?;
    let info = match store.info(&object.name).await {
        Ok(info) if !info.deleted => info,
        Ok(_) => return Err(gone(object)),
        Err(e) if e.kind() == InfoErrorKind::NotFound => return Err(gone(object)),
        Err(e) => return Err(ClaimCheckError::unavailable(object, e)),
    };
    if info.size as u64 != object.size || info.digest.as_deref() != Some(&object.digest) {
        return Err(ClaimCheckError::mismatch(
            object,
            format!("{} bytes with digest {:?}", info.size, info.digest),
        ));
    }
    let whole = range.start == 0 && range.end >= object.size;
    let reading = Reading {
        js: js.clone(),
        filter: format!("$O.{}.C.{}", object.bucket, info.nuid),
        consumer: None,
        resume_after: 0,
        expected: 1,
        lost: 0,
        ready: std::collections::VecDeque::new(),
        object: object.clone(),
        left: if range.start >= range.end {
            0
        } else {
            info.chunks
        },
        at: 0,
        range,
        sha: whole.then(sha2::Sha256::new),
        _reader: reader,
    };
    Ok(futures::stream::try_unfold(reading, Reading::next))
}

/// Where a [`read_body`] stands.
struct Reading {
    js: async_nats::jetstream::Context,
    /// The object's chunk subject.
    filter: String,
    /// The consumer of the chunks, once the first is asked for.
    consumer: Option<ChunkConsumer>,
    /// The stream sequence of the last chunk read (0: none yet).
    resume_after: u64,
    /// The consumer sequence the next chunk must have.
    expected: u64,
    /// Pulls lost in a row.
    lost: u32,
    /// Chunks pulled, not read yet.
    ready: std::collections::VecDeque<Bytes>,
    object: BodyObject,
    /// Chunks not pulled yet.
    left: usize,
    /// The offset of the next chunk's first byte.
    at: u64,
    range: std::ops::Range<u64>,
    /// The digest so far, on a whole read.
    sha: Option<sha2::Sha256>,
    _reader: tokio::sync::SemaphorePermit<'static>,
}

impl Reading {
    /// The next piece of the range, or `None` past its end.
    async fn next(mut self) -> Result<Option<(Bytes, Self)>, ClaimCheckError> {
        loop {
            let done = self.at >= self.range.end || (self.left == 0 && self.ready.is_empty());
            if done {
                self.check_digest()?;
                self.consumer = None;
                if self.at < self.range.end {
                    let detail = format!("its chunks end at byte {}", self.at);
                    return Err(ClaimCheckError::mismatch(&self.object, detail));
                }
                return Ok(None);
            }
            let Some(chunk) = self.ready.pop_front() else {
                self.pull().await?;
                continue;
            };
            let start = self.at;
            self.at += chunk.len() as u64;
            if let Some(sha) = self.sha.as_mut() {
                sha.update(&chunk);
            }
            if self.at <= self.range.start {
                continue;
            }
            let from = self.range.start.saturating_sub(start) as usize;
            let to = (self.range.end.min(self.at) - start) as usize;
            if self.at >= self.range.end {
                self.check_digest()?;
            }
            return Ok(Some((chunk.slice(from..to), self)));
        }
    }

    /// Pulls the next chunks into `ready`: all of one pull, which then frees its share of
    /// [`IN_TRANSIT`]. A pull that fails or brings a chunk out of order drops the consumer,
    /// and the next pull starts a new one after the last chunk read.
    async fn pull(&mut self) -> Result<(), ClaimCheckError> {
        let want = self.left.min(READ_AHEAD);
        let _share = IN_TRANSIT
            .acquire_many(want as u32)
            .await
            .expect("never closed");
        let pulled = self.pull_from_consumer(want).await;
        match pulled {
            Ok(chunks) if !chunks.is_empty() => {
                self.lost = 0;
                self.left -= chunks.len();
                self.ready.extend(chunks);
                Ok(())
            }
            failed => {
                self.consumer = None;
                self.lost += 1;
                if self.lost > RECOVERIES {
                    let detail = match failed {
                        Err(e) => e,
                        Ok(_) => format!("no chunk came in {FETCH_WAIT:?}"),
                    };
                    return Err(ClaimCheckError::unavailable(&self.object, detail));
                }
                Ok(())
            }
        }
    }

    /// Up to `want` chunks in order from the consumer (made if there is none): those before a
    /// gap, or an error when the pull fails.
    async fn pull_from_consumer(&mut self, want: usize) -> Result<Vec<Bytes>, String> {
        if self.consumer.is_none() {
            self.consumer = Some(self.new_consumer().await.map_err(|e| e.to_string())?);
            self.expected = 1;
        }
        let consumer = &self.consumer.as_ref().expect("made above").consumer;
        let mut fetched = consumer
            .fetch()
            .max_messages(want)
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut chunks = Vec::with_capacity(want);
        while let Some(message) = fetched.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let info = message.info().map_err(|e| e.to_string())?;
            if info.consumer_sequence != self.expected {
                // One went missing on the way (a reconnection): what came before it stands.
                self.consumer = None;
                break;
            }
            self.expected += 1;
            self.resume_after = info.stream_sequence;
            chunks.push(message.payload.clone());
        }
        Ok(chunks)
    }

    /// A consumer of the object's chunks from the one after the last read.
    async fn new_consumer(&self) -> Result<ChunkConsumer, async_nats::Error> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let stream = self
            .js
            .get_stream(format!("OBJ_{}", self.object.bucket))
            .await?;
        let deliver_policy = match self.resume_after {
            0 => DeliverPolicy::All,
            after => DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
        };
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                filter_subject: self.filter.clone(),
                deliver_policy,
                ack_policy: AckPolicy::None,
                // Removed when the read ends; this is for a process that dies meanwhile.
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await?;
        let name = consumer.cached_info().name.clone();
        Ok(ChunkConsumer {
            consumer,
            stream,
            name,
        })
    }

    /// On a whole read that has read up to the size: every chunk, and the digest named.
    fn check_digest(&mut self) -> Result<(), ClaimCheckError> {
        let Some(sha) = self.sha.take() else {
            return Ok(());
        };
        let digest = format!(
            "SHA-256={}",
            data_encoding::BASE64URL.encode(&sha.finalize())
        );
        let complete = self.left == 0 && self.ready.is_empty() && self.at == self.object.size;
        if !complete || digest != self.object.digest {
            let detail = format!("{} bytes with digest {digest}", self.at);
            return Err(ClaimCheckError::mismatch(&self.object, detail));
        }
        Ok(())
    }
}

/// An ephemeral consumer of an object's chunks, removed when dropped.
struct ChunkConsumer {
    consumer: async_nats::jetstream::consumer::PullConsumer,
    stream: async_nats::jetstream::stream::Stream,
    name: String,
}

impl Drop for ChunkConsumer {
    fn drop(&mut self) {
        let (stream, name) = (self.stream.clone(), std::mem::take(&mut self.name));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = stream.delete_consumer(&name).await {
                    tracing::debug!(%error, name, "Cannot remove a body read's consumer; its inactivity will.");
                }
            });
        }
    }
}

fn gone(object: &BodyObject) -> ClaimCheckError {
    ClaimCheckError::Gone {
        bucket: object.bucket.clone(),
        name: object.name.clone(),
    }
}

/// Reads a body kept in the Object Store (see [`read_body`]) into memory, so that a worker never
/// runs on another body than the one its message names.
pub async fn fetch_body(
    js: &async_nats::jetstream::Context,
    object: &BodyObject,
) -> Result<Bytes, ClaimCheckError> {
    let size = usize::try_from(object.size)
        .map_err(|_| ClaimCheckError::unavailable(object, "too large for memory"))?;
    let mut body = Vec::with_capacity(size);
    let mut chunks = std::pin::pin!(read_body(js, object, 0..object.size).await?);
    while let Some(chunk) = chunks.next().await {
        body.extend_from_slice(&chunk?);
    }
    Ok(Bytes::from(body))
}

/// Moves a reply body larger than `inline_max` bytes into the Object Store bucket `request`
/// names (`Gw-Reply-Bucket`, see [`store_reply_from`]): the record returned names it and
/// carries no body. A request that names no bucket, a body that fits, or a record that names an
/// object already, leaves the record as it is.
///
/// Errors: [`ClaimCheckError`] when the object cannot be written (the caller retries the
/// delivery, as for any write).
pub async fn store_reply(
    js: &async_nats::jetstream::Context,
    request: &RequestHead,
    mut record: ResultRecord,
    inline_max: usize,
) -> Result<ResultRecord, ClaimCheckError> {
    if request.reply_bucket.is_none()
        || record.body.len() <= inline_max
        || record.body_object.is_some()
    {
        return Ok(record);
    }
    let body = std::mem::take(&mut record.body);
    record.body_object = Some(store_reply_from(js, request, &mut body.as_ref()).await?);
    Ok(record)
}

/// Stores a reply body read from `body` (streamed: one chunk in memory at a time) in the bucket
/// `request` names (`Gw-Reply-Bucket`), under a name of the operation's own
/// ([`BodyObject::reply_name`]), and says where it is, for a record to name.
///
/// Errors: [`ClaimCheckError`] when the request names no bucket, or the object cannot be
/// written (a part written stays for the bucket's `max_age`).
pub async fn store_reply_from(
    js: &async_nats::jetstream::Context,
    request: &RequestHead,
    body: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<BodyObject, ClaimCheckError> {
    let name = BodyObject::reply_name(&request.operation_id);
    let bucket_name = request.reply_bucket.clone().unwrap_or_default();
    let failed = |detail: String| ClaimCheckError::Unavailable {
        bucket: bucket_name.clone(),
        name: name.clone(),
        detail,
    };
    if bucket_name.is_empty() {
        return Err(failed("the request names no bucket for replies".to_owned()));
    }
    let bucket = js
        .get_object_store(&bucket_name)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let info = bucket
        .put(name.as_str(), body)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(BodyObject {
        bucket: bucket_name.clone(),
        name: name.clone(),
        size: info.size as u64,
        digest: info.digest.ok_or_else(|| failed("no digest".to_owned()))?,
    })
}

/// Removes an object no record names (best effort: the bucket's `max_age` removes it anyway).
pub async fn discard(js: &async_nats::jetstream::Context, object: &BodyObject) {
    let deleted = async {
        js.get_object_store(&object.bucket)
            .await?
            .delete(&object.name)
            .await?;
        Ok::<_, async_nats::Error>(())
    }
    .await;
    if let Err(error) = deleted {
        tracing::warn!(%error, bucket = %object.bucket, name = %object.name, "Cannot remove an unused body object; the bucket's max_age will.");
    }
}
