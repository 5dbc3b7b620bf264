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
/// beyond the one being sent.
const READ_AHEAD: usize = 8;
/// How long one pull of chunks may wait for them: chunks are stored, so only an unreachable
/// server makes one wait at all.
const FETCH_WAIT: Duration = Duration::from_secs(5);

/// Bytes `range` of a body kept in the Object Store, as a stream of chunks, once its object is
/// found to have the size and digest its message names. The chunks are pulled [`READ_AHEAD`] at
/// a time, one pull after the other, by an ephemeral pull consumer of the object's chunk
/// subject, so a slow reader holds a few chunks, never the body (the Object Store's own reader
/// is a push consumer the server fills as fast as it can). A whole read checks the SHA-256 at the end: other bytes end the stream
/// with [`ClaimCheckError::Mismatch`] instead of its last chunk. Reaching `range.start` reads
/// and drops the chunks before it (the Object Store has no index of an object's chunks).
///
/// Hand-written glue: async-nats reads an object only whole, through a push consumer.
pub async fn read_body(
    js: &async_nats::jetstream::Context,
    object: &BodyObject,
    range: std::ops::Range<u64>,
) -> Result<impl Stream<Item = Result<Bytes, ClaimCheckError>> + Send + use<>, ClaimCheckError> {
    use async_nats::jetstream::object_store::InfoErrorKind;
    let store = js
        .get_object_store(&object.bucket)
        .await
        .map_err(|e| ClaimCheckError::unavailable(object, e))?;
    let info = match store.info(&object.name).await {
        Ok(info) if !info.deleted => info,
        Ok(_) => None.ok_or_else(|| gone(object))?,
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
    let chunks = if info.chunks == 0 || range.start >= range.end {
        None
    } else {
        let consumer = js
            .get_stream(format!("OBJ_{}", object.bucket))
            .await
            .map_err(|e| ClaimCheckError::unavailable(object, e))?
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: format!("$O.{}.C.{}", object.bucket, info.nuid),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                // Gone soon after a reader stops (a client that hangs up mid-body).
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .map_err(|e| ClaimCheckError::unavailable(object, e))?;
        Some(consumer)
    };
    let reading = Reading {
        chunks,
        fetched: None,
        progressed: false,
        object: object.clone(),
        left: info.chunks,
        at: 0,
        range,
        sha: whole.then(sha2::Sha256::new),
    };
    Ok(futures::stream::try_unfold(reading, Reading::next))
}

/// Where a [`read_body`] stands.
struct Reading {
    /// An ephemeral pull consumer of the object's chunks, in order, unacknowledged.
    chunks: Option<async_nats::jetstream::consumer::PullConsumer>,
    /// The last fetch, while it has chunks to give.
    fetched: Option<async_nats::jetstream::consumer::pull::Batch>,
    /// Whether the last fetch gave a chunk.
    progressed: bool,
    object: BodyObject,
    /// Chunks not read yet.
    left: usize,
    /// The offset of the next chunk's first byte.
    at: u64,
    range: std::ops::Range<u64>,
    /// The digest so far, on a whole read.
    sha: Option<sha2::Sha256>,
}

impl Reading {
    /// The next piece of the range, or `None` past its end.
    async fn next(mut self) -> Result<Option<(Bytes, Self)>, ClaimCheckError> {
        loop {
            if self.at >= self.range.end || self.left == 0 {
                self.check_digest()?;
                return Ok(None);
            }
            let Some(chunks) = self.chunks.as_ref() else {
                return Ok(None);
            };
            let fetched = match &mut self.fetched {
                Some(fetched) => fetched,
                None => {
                    // One pull at a time, of a few chunks: what the reader has not taken yet
                    // stays in the stream, not here.
                    let fetched = chunks
                        .fetch()
                        .max_messages(READ_AHEAD)
                        .expires(FETCH_WAIT)
                        .messages()
                        .await
                        .map_err(|e| ClaimCheckError::unavailable(&self.object, e))?;
                    self.progressed = false;
                    self.fetched.insert(fetched)
                }
            };
            let chunk = match fetched.next().await {
                Some(Ok(message)) => message.payload.clone(),
                Some(Err(e)) => return Err(ClaimCheckError::unavailable(&self.object, e)),
                // That pull is over: another, unless it brought nothing in its time.
                None if self.progressed => {
                    self.fetched = None;
                    continue;
                }
                None => {
                    let detail = format!("no chunk came in {FETCH_WAIT:?} ({} left)", self.left);
                    return Err(ClaimCheckError::unavailable(&self.object, detail));
                }
            };
            self.progressed = true;
            self.left -= 1;
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
            if self.at >= self.range.end || self.left == 0 {
                self.check_digest()?;
            }
            return Ok(Some((chunk.slice(from..to), self)));
        }
    }

    /// On a whole read that has read every chunk: the bytes must have the digest named.
    fn check_digest(&mut self) -> Result<(), ClaimCheckError> {
        if self.left > 0 {
            return Ok(());
        }
        let Some(sha) = self.sha.take() else {
            return Ok(());
        };
        let digest = format!(
            "SHA-256={}",
            data_encoding::BASE64URL.encode(&sha.finalize())
        );
        if digest != self.object.digest || self.at != self.object.size {
            let detail = format!("{} bytes with digest {digest}", self.at);
            return Err(ClaimCheckError::mismatch(&self.object, detail));
        }
        Ok(())
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
