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

use bytes::Bytes;

use crate::contract::{BodyObject, RequestHead, ResultRecord};

/// A body in the Object Store (a request's or a reply's) cannot be read or written, or is not
/// what its message says.
#[derive(Debug, thiserror::Error)]
#[error("the body {name} in bucket {bucket}: {detail}")]
pub struct ClaimCheckError {
    pub bucket: String,
    pub name: String,
    pub detail: String,
}

/// Reads a request body kept in the Object Store (contract 3) into memory, checking that it has
/// the size and the SHA-256 digest the request names, so that a worker never runs on another
/// body than the one the gateway accepted.
pub async fn fetch_body(
    js: &async_nats::jetstream::Context,
    object: &BodyObject,
) -> Result<Bytes, ClaimCheckError> {
    use sha2::Digest as _;
    use tokio::io::AsyncReadExt as _;
    let failed = |detail: String| ClaimCheckError {
        bucket: object.bucket.clone(),
        name: object.name.clone(),
        detail,
    };
    let store = js
        .get_object_store(&object.bucket)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut reader = store
        .get(&object.name)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let size = usize::try_from(object.size).map_err(|_| failed("too large".to_owned()))?;
    let mut body = Vec::with_capacity(size);
    (&mut reader)
        .take(object.size + 1)
        .read_to_end(&mut body)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if body.len() != size {
        return Err(failed(format!("{} bytes, not {size}", body.len())));
    }
    let digest = format!(
        "SHA-256={}",
        data_encoding::BASE64URL.encode(&sha2::Sha256::digest(&body))
    );
    if digest != object.digest {
        return Err(failed(format!("digest {digest}, not {}", object.digest)));
    }
    Ok(Bytes::from(body))
}

/// Moves a reply body larger than `inline_max` bytes into the Object Store bucket `request`
/// names (`Gw-Reply-Bucket`), under a name of the operation's own
/// ([`BodyObject::reply_name`]): the record returned names it and carries no body. A request
/// that names no bucket, or a body that fits, leaves the record as it is.
///
/// Errors: [`ClaimCheckError`] when the object cannot be written (the caller retries the
/// delivery, as for any write).
pub async fn store_reply(
    js: &async_nats::jetstream::Context,
    request: &RequestHead,
    mut record: ResultRecord,
    inline_max: usize,
) -> Result<ResultRecord, ClaimCheckError> {
    let Some(bucket_name) = &request.reply_bucket else {
        return Ok(record);
    };
    if record.body.len() <= inline_max || record.body_object.is_some() {
        return Ok(record);
    }
    let name = BodyObject::reply_name(&request.operation_id);
    let failed = |detail: String| ClaimCheckError {
        bucket: bucket_name.clone(),
        name: name.clone(),
        detail,
    };
    let bucket = js
        .get_object_store(bucket_name)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let info = bucket
        .put(name.as_str(), &mut record.body.as_ref())
        .await
        .map_err(|e| failed(e.to_string()))?;
    record.body_object = Some(BodyObject {
        bucket: bucket_name.clone(),
        name: name.clone(),
        size: info.size as u64,
        digest: info.digest.ok_or_else(|| failed("no digest".to_owned()))?,
    });
    record.body = Bytes::new();
    Ok(record)
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
