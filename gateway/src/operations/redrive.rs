//! Failed operations: the index that lists them by route and tenant, and redrive.
//!
//! **The index.** A request path must not scan the results to find failures, so failures are
//! indexed as they happen: every replica runs one shared durable consumer on the streams of
//! result slots, and for each record whose status is `failed` writes an entry
//! `gw.fail.<route>.<tenant-token>.<operation-id>` in the events stream, then acks. The entry is
//! written before the ack, so a crash in between writes it again (the same entry, harmless) and
//! no failure is left out; it lives as long as its operation. A list is then one direct get per
//! entry (`next by subject` from a stream sequence, which is also the cursor) plus the
//! operation's own reads, bounded by the page size whatever the stream holds. The index lags a
//! failure by the consumer's delay (milliseconds when replicas are up); the operation's own
//! status never lags.
//!
//! **Redrive.** A failed operation's status never changes. A redrive is a new operation, made
//! from the failed one's stored request (method, path, query, forwarded headers, body) with the
//! idempotency key `redrive:<operation-id>`: one create-if-absent write, so a repeated redrive,
//! through any replica, is a replay of the first, and the original key still names the
//! original operation. The new request carries `Gw-Redrive-Of: <operation-id>`; the original
//! finds its redrive by the derived key. A worker given the redrive of a stateful operation that
//! committed adopts the committed outbox (re-publishes it, the state unchanged) instead of
//! running the handler (see `handlers::stateful::run`). The protocol model checks both rules.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt;
use handlers::contract::{ResultRecord, Subjects, header};
use handlers::jetstream::ack;
use tokio_util::sync::CancellationToken;

use super::accept::{AcceptError, Accepted, Start, Submission, accept};
use super::idempotency::{key_token_of, redrive_key, tenant_token};
use super::lookup::{lookup, request_of};
use super::model::{Operation, Status};
use super::quota::Quotas;
use super::store::{Store, StoreError};
use crate::config::RouteConfig;
use crate::lifecycle::sleep_or_stop;
use crate::metrics::{FAILURES_INDEXED, REDRIVES};

/// The durable consumer every replica shares on each stream of result slots.
const CONSUMER: &str = "gateway-failures";
/// The most index entries one page reads, whatever it finds (entries of operations gone since).
const MAX_SCANNED_PER_ITEM: usize = 4;

/// Why an operation cannot be redriven.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// Only an operation that ended other than in success (failed, expired, cancelled) can be
    /// redriven: not one that succeeded, nor one still running.
    #[error("operation {id} is {}: only a failed, expired or cancelled operation can be redriven", status.name())]
    NotFailed { id: String, status: Status },
    /// The operation's route is no longer in the routes file.
    #[error("operation {id} is on route {route:?}, which this gateway no longer serves")]
    RouteGone { id: String, route: String },
    /// The failed operation's retention ends before a redrive could be sure to finish: on a
    /// stateful route the redrive reads the original's processed marker, which is kept for that
    /// long, so a redrive running after it could change the state a second time.
    #[error(
        "operation {id} is kept only until {ends_at}, sooner than a redrive's timeout from now: it can no longer be redriven"
    )]
    TooLate { id: String, ends_at: String },
    /// The original client's `Callback-Url` is no longer allowed.
    #[error("operation {id}'s Callback-Url is no longer allowed: {why}")]
    CallbackNotAllowed { id: String, why: String },
    #[error(transparent)]
    Accept(#[from] AcceptError),
}

impl From<StoreError> for RedriveError {
    fn from(error: StoreError) -> Self {
        Self::Accept(error.into())
    }
}

/// One page of failed operations, oldest failure first.
#[derive(Debug)]
pub struct FailedPage {
    /// Each operation with its entry's place in the index (a cursor that starts at it).
    pub operations: Vec<(u64, Operation)>,
    /// Where the next page starts (a stream sequence), when there may be more.
    pub next: Option<u64>,
}

/// The consumer configuration (provisioning creates it before the gateway is ready, so that no
/// failure lands unseen). It starts from the first record, so a gateway upgraded to this release
/// indexes the failures already stored once.
pub fn consumer_config() -> pull::Config {
    pull::Config {
        durable_name: Some(CONSUMER.to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 256,
        ..Default::default()
    }
}

/// Indexes failures until `stop`, from every stream of result slots.
pub async fn index_failures(store: Arc<Store>, stop: CancellationToken) {
    let streams = store.result_streams().map(|(stream, _)| stream.to_owned());
    futures::future::join_all(streams.iter().map(|stream| {
        let (store, stop) = (&store, &stop);
        async move {
            while !stop.is_cancelled() {
                match store.pull(stream, consumer_config()).await {
                    Ok(messages) => {
                        messages
                            .take_until(stop.cancelled())
                            .for_each_concurrent(32, |message| async move {
                                if let Ok(message) = message {
                                    let kind = match index(store, &message).await {
                                        Ok(()) => AckKind::Ack,
                                        Err(error) => {
                                            tracing::warn!(%error, subject = %message.subject, "Cannot index a result now.");
                                            AckKind::Nak(Some(Duration::from_secs(1)))
                                        }
                                    };
                                    ack(&message, kind).await;
                                }
                            })
                            .await
                    }
                    Err(error) => {
                        tracing::debug!(%error, stream, "Failure index consumer not ready; retrying.")
                    }
                }
                sleep_or_stop(stop, Duration::from_secs(1)).await;
            }
        }
    }))
    .await;
}

/// Indexes one result if it is a failure. A result whose operation is gone (retention) or whose
/// record cannot be read is skipped: there is nothing to list.
async fn index(store: &Store, message: &async_nats::jetstream::Message) -> Result<(), StoreError> {
    let Some(headers) = message.headers.as_ref() else {
        return Ok(());
    };
    if headers.get(header::MARKER_REASON).is_some() {
        // nats-server's delete marker where a result expired.
        return Ok(());
    }
    let Ok(record) = ResultRecord::from_parts(headers, message.payload.clone()) else {
        return Ok(());
    };
    if Status::of(&record) != Status::Failed {
        return Ok(());
    }
    let id = Subjects::operation_of(&message.subject);
    let operation = match request_of(store, id).await {
        Ok(Some(operation)) => operation,
        Ok(None) => return Ok(()),
        // A request nobody can read is nothing to list; trying again would not change it.
        Err(error) if error.is_contract_violation() => {
            tracing::warn!(operation_id = %id, %error, "A failed operation's request is unreadable; not indexed.");
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    store
        .index_failure(
            operation.route(),
            &tenant_token(operation.tenant()),
            id,
            operation.retention(),
        )
        .await?;
    metrics::counter!(FAILURES_INDEXED, "route" => operation.route().to_owned()).increment(1);
    Ok(())
}

/// The failed operations of `tenant` on `route` from cursor `from` (0: the first), at most
/// `limit`. Entries whose operation is gone are skipped; a page reads at most
/// [`MAX_SCANNED_PER_ITEM`] × `limit` entries and then ends with a cursor.
pub async fn list_failed(
    store: &Store,
    tenant: &str,
    route: &str,
    from: u64,
    limit: usize,
) -> Result<FailedPage, StoreError> {
    let token = tenant_token(tenant);
    let mut operations = Vec::new();
    let mut next = from;
    for _ in 0..limit.max(1) * MAX_SCANNED_PER_ITEM {
        if operations.len() == limit {
            return Ok(FailedPage {
                operations,
                next: Some(next),
            });
        }
        let Some((sequence, id)) = store.next_failure(route, &token, next).await? else {
            return Ok(FailedPage {
                operations,
                next: None,
            });
        };
        next = sequence + 1;
        if let Some(operation) = lookup(store, tenant, &id).await?
            && operation.status() == Status::Failed
        {
            operations.push((sequence, operation));
        }
    }
    Ok(FailedPage {
        operations,
        next: Some(next),
    })
}

/// A redrive, checked and ready to submit ([`submit`]). The edge re-checks what the original
/// request carried against its current settings first: the forwarded headers (`forwarded`, to
/// keep only those the allow-list still names) and the client's `Callback-Url`.
#[derive(Debug)]
pub struct Redrive {
    pub original: Operation,
    route: RouteConfig,
    /// The original's forwarded client headers (no `Gw-*`, `Nats-*` or trace context).
    pub forwarded: Vec<(String, String)>,
    /// The original client's `Callback-Url` (not the route's `callback_url`, which applies anyway).
    pub callback_url: Option<String>,
    body: bytes::Bytes,
}

/// Checks that failed operation `id` of `tenant` can be redriven, and reads what a redrive
/// resubmits. `Ok(None)` when there is no such operation.
pub async fn prepare(
    store: &Store,
    routes: &[RouteConfig],
    tenant: &str,
    id: &str,
) -> Result<Option<Redrive>, RedriveError> {
    match lookup(store, tenant, id).await? {
        Some(operation) => prepare_found(store, routes, operation).await,
        None => Ok(None),
    }
}

/// [`prepare`] for an operation already read (a page of a bulk redrive).
pub async fn prepare_found(
    store: &Store,
    routes: &[RouteConfig],
    original: Operation,
) -> Result<Option<Redrive>, RedriveError> {
    let route = original.route().to_owned();
    let prepared = prepare_checked(store, routes, original).await;
    if let Err(
        RedriveError::NotFailed { .. }
        | RedriveError::RouteGone { .. }
        | RedriveError::TooLate { .. },
    ) = &prepared
    {
        metrics::counter!(REDRIVES, "route" => route, "outcome" => "refused").increment(1);
    }
    prepared
}

async fn prepare_checked(
    store: &Store,
    routes: &[RouteConfig],
    original: Operation,
) -> Result<Option<Redrive>, RedriveError> {
    let id = original.id().to_owned();
    let status = original.status();
    if !status.is_redrivable() {
        return Err(RedriveError::NotFailed { id, status });
    }
    let Some(route) = routes.iter().find(|r| r.name == original.route()) else {
        return Err(RedriveError::RouteGone {
            route: original.route().to_owned(),
            id,
        });
    };
    // The redrive must end (by its deadline) while the original's marker is still kept, which
    // is at least the original's retention. A repeated redrive is a replay and needs no time.
    let ends_at = original.created_at + original.retention().unwrap_or_default();
    let latest_end = time::OffsetDateTime::now_utc() + route.timeout + store.expiry_grace();
    if original.redriven_by.is_none() && ends_at <= latest_end {
        return Err(RedriveError::TooLate {
            id,
            ends_at: handlers::contract::format_time(ends_at),
        });
    }
    let token = key_token_of(&id).expect("a found operation's id is well formed");
    let Some(message) = store.request_on_route(&route.name, token).await? else {
        // Its retention ended since the lookup.
        return Ok(None);
    };
    if handlers::contract::header_str(&message.headers, header::OPERATION_ID) != Some(id.as_str()) {
        // The key names another operation now (reused after the retention ended).
        return Ok(None);
    }
    // The client's headers as forwarded then, not the contract's or the trace's: the redrive
    // is a new operation with a trace of its own.
    let forwarded = message
        .headers
        .iter()
        .filter(|(name, _)| {
            let name = name.to_string().to_ascii_lowercase();
            !(name.starts_with("gw-")
                || name.starts_with("nats-")
                || name == "traceparent"
                || name == "tracestate")
        })
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), value.as_str().to_owned()))
        })
        .collect();
    let callback_url = original
        .callback_url()
        .filter(|url| route.callback_url.as_deref() != Some(*url))
        .map(str::to_owned);
    Ok(Some(Redrive {
        original,
        route: route.clone(),
        forwarded,
        callback_url,
        body: message.payload,
    }))
}

/// Submits a prepared redrive: a new operation, or the one an earlier redrive made.
pub async fn submit(
    store: &Store,
    quotas: Option<&Quotas>,
    redrive: Redrive,
) -> Result<Accepted, RedriveError> {
    let Redrive {
        original,
        route,
        forwarded,
        callback_url,
        body,
    } = redrive;
    let head = &original.request;
    let submission = Submission {
        route: &route,
        tenant: original.tenant(),
        idempotency_key: redrive_key(original.id()),
        method: &head.method,
        path: &head.path,
        query: head.query.as_deref(),
        content_type: head.content_type.as_deref(),
        forwarded,
        requested_callback_url: callback_url,
        start: Start::default(),
        redrive_of: Some(original.id().to_owned()),
        // A body in the Object Store is the original's object: it outlives the original's
        // retention, by which the redrive ends (see `prepare`).
        body_object: head.body_object.clone(),
        body,
    };
    let accepted = accept(store, quotas, submission).await?;
    let outcome = match accepted {
        Accepted::New(_) => "new",
        Accepted::Replayed(_) => "replayed",
    };
    metrics::counter!(REDRIVES, "route" => route.name.clone(), "outcome" => outcome).increment(1);
    Ok(accepted)
}
