//! Operations: what the gateway knows about one accepted request, read back from JetStream, and
//! the status derived from it.
//!
//! An operation is two stream messages at most: its request (on the key's subject) and its
//! terminal record (on `gw.res.<id>`). Status is a function of those two and the clock:
//!
//! | terminal record                  | status      |
//! |----------------------------------|-------------|
//! | none, deadline ahead             | `pending`   |
//! | a reply with a 2xx or 3xx status | `succeeded` |
//! | a reply with a 4xx or 5xx status | `failed`    |
//! | the `expired` marker             | `expired`   |
//! | the `cancelled` marker           | `cancelled` |
//!
//! "None, deadline passed" is not a status: the first reader to see it writes the `expired`
//! marker (first writer wins, see `handlers::jetstream::publish_result`) and reports whatever
//! record won. So a status, once terminal, never changes, on any replica: a late reply after the
//! marker is refused by the results stream; a reply that beat the marker is what everyone sees.

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use handlers::contract::{ContractError, Outcome, Request, ResultRecord, header};
use serde::Serialize;
use time::OffsetDateTime;

use tokio::time::Instant;

use crate::idempotency::{decode_key, key_token_of};
use crate::store::{Store, StoreError, StoredResult};
use crate::watch::{RECHECK, Watch};
use crate::webhooks::{DeliveryState, decode_state};

/// The tenant every request belongs to until authentication maps callers to tenants. It is part of
/// every key's scope already, so adding tenants changes no stored data.
pub const DEFAULT_TENANT: &str = "default";

/// Status of an operation, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl Status {
    /// The status a terminal record gives its operation.
    pub fn of(record: &ResultRecord) -> Status {
        match record.outcome {
            Outcome::Expired => Status::Expired,
            Outcome::Cancelled => Status::Cancelled,
            Outcome::Reply if record.status < 400 => Status::Succeeded,
            Outcome::Reply => Status::Failed,
        }
    }

    /// The status as clients see it in bodies and event names.
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        self != Status::Pending
    }
}

/// The path of an operation's status resource.
pub fn operation_path(id: &str) -> String {
    format!("/operations/{id}")
}

/// Links from an operation to its resources.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Links {
    #[serde(rename = "self")]
    this: String,
    result: String,
    events: String,
}

impl Links {
    pub fn of(id: &str) -> Self {
        let this = operation_path(id);
        Self {
            result: format!("{this}/result"),
            events: format!("{this}/events"),
            this,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ResultSummary<'a> {
    /// The HTTP status code `/result` replays.
    status_code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
}

/// An operation as clients see it: the status resource's body, an SSE event's data, a webhook's
/// `data`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Operation)]
pub struct OperationView<'a> {
    id: &'a str,
    route: &'a str,
    status: Status,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<ResultSummary<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<&'a ProgressState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback: Option<&'a DeliveryState>,
    links: Links,
}

impl<'a> OperationView<'a> {
    pub fn of(op: &'a Operation) -> Self {
        Self {
            id: &op.id,
            route: &op.route,
            status: op.status(),
            created_at: op.created_at,
            updated_at: op.updated_at(),
            result: op.result.as_ref().map(|r| ResultSummary {
                status_code: r.record.status,
                content_type: r.record.content_type.as_deref(),
            }),
            progress: op.progress.as_ref(),
            callback: op.callback.as_ref(),
            links: Links::of(&op.id),
        }
    }
}

/// A worker's latest progress report, as the status resource shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Progress)]
pub struct ProgressState {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    pub message: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Stream sequence of the report: orders reports, and names SSE `progress-<seq>` events.
    #[serde(skip)]
    pub seq: u64,
}

/// One operation as read from JetStream.
#[derive(Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub route: String,
    pub tenant: String,
    pub idempotency_key: String,
    pub fingerprint: String,
    pub created_at: OffsetDateTime,
    pub deadline: OffsetDateTime,
    pub retention: Option<Duration>,
    pub result: Option<StoredResult>,
    /// The latest progress report, while pending.
    pub progress: Option<ProgressState>,
    /// The completion webhook's URL, if any.
    pub callback_url: Option<String>,
    /// Where the webhook stands (read by `lookup` when there is a callback URL).
    pub callback: Option<DeliveryState>,
    /// The span that accepted the request (its `traceparent`), which reads link to.
    pub trace: Option<opentelemetry::trace::SpanContext>,
}

impl Operation {
    /// Reads an operation's request message (its result is attached separately). The message is
    /// parsed by the contract; only the fields a worker may ignore are required here.
    pub fn from_request(message: &StreamMessage) -> Result<Self, ContractError> {
        let request = Request::from_parts(message.headers.clone(), message.payload.clone())?;
        let trace = handlers::trace::remote_span(&message.headers);
        let required = |value: Option<String>, name: &'static str| {
            value.ok_or(ContractError::MissingHeader(name))
        };
        let stored_key = required(request.idempotency_key, header::IDEMPOTENCY_KEY)?;
        let idempotency_key =
            decode_key(stored_key.as_bytes()).map_err(|_| ContractError::InvalidHeader {
                name: header::IDEMPOTENCY_KEY,
                value: stored_key.clone(),
            })?;
        Ok(Self {
            id: request.operation_id,
            route: request.route,
            tenant: required(request.tenant, header::TENANT)?,
            idempotency_key,
            fingerprint: required(request.fingerprint, header::FINGERPRINT)?,
            created_at: message.time,
            deadline: request.deadline,
            retention: request.retention_secs.map(Duration::from_secs),
            result: None,
            progress: None,
            callback_url: request.callback_url,
            callback: None,
            trace,
        })
    }

    pub fn status(&self) -> Status {
        self.result
            .as_ref()
            .map_or(Status::Pending, |r| Status::of(&r.record))
    }

    pub fn updated_at(&self) -> OffsetDateTime {
        self.result
            .as_ref()
            .map_or(self.created_at, |r| r.stored_at)
    }
}

/// Finds an operation by id for a tenant, settling expiry on the way. `None` for ids that do not
/// exist, no longer exist (retention), or belong to another tenant.
///
/// Costs two direct gets, issued together. A reader that finds the deadline passed with no result
/// also writes the `expired` marker (and reads the slot back from the leader if it lost the race).
pub async fn lookup(
    store: &Store,
    tenant: &str,
    operation_id: &str,
) -> Result<Option<Operation>, StoreError> {
    let Some(key_token) = key_token_of(operation_id) else {
        return Ok(None);
    };
    let (request, result) = tokio::join!(
        store.request_by_key_token(key_token),
        store.result(operation_id)
    );
    let Some(request) = request? else {
        return Ok(None);
    };
    let mut operation = Operation::from_request(&request)?;
    if operation.id != operation_id || operation.tenant != tenant {
        return Ok(None);
    }
    operation.result = result?;
    settle(store, &mut operation).await?;
    if operation.result.is_none() {
        operation.progress = store.progress(operation_id).await?;
    }
    if let Some(url) = &operation.callback_url {
        // Before the first attempt there is no stored state: the webhook is pending.
        operation.callback = Some(
            store
                .callback_state(operation_id)
                .await?
                .and_then(|bytes| decode_state(&bytes))
                .unwrap_or_else(|| DeliveryState {
                    url: url.clone(),
                    state: "pending".to_owned(),
                    attempts: 0,
                    last_status: None,
                    last_error: None,
                }),
        );
    }
    Ok(Some(operation))
}

/// What a waiter waits for.
#[derive(Debug, Clone, Copy)]
pub enum WakeOn {
    /// The operation's end.
    Terminal,
    /// The end, or a progress report newer than this sequence (`None`: newer than what the first
    /// read finds).
    TerminalOrProgressAfter(Option<u64>),
}

/// Reads an operation, and if it is still pending, waits until it is terminal (or, per `wake_on`,
/// has new progress) or `until` passes, woken by the process's [`Watch`] and re-reading at least
/// every [`RECHECK`]. What it returns was read from JetStream last, so it is as true as any lookup.
pub async fn lookup_when_changed(
    store: &Store,
    watch: &Watch,
    tenant: &str,
    operation_id: &str,
    until: Instant,
    wake_on: WakeOn,
) -> Result<Option<Operation>, StoreError> {
    let registration = watch.register(operation_id);
    let mut progress_after = match wake_on {
        WakeOn::Terminal => None,
        WakeOn::TerminalOrProgressAfter(seen) => Some(seen),
    };
    loop {
        let notified = registration.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Boxed, so that a parked waiter keeps only the small wait state, not the lookup's.
        let Some(operation) = Box::pin(lookup(store, tenant, operation_id)).await? else {
            return Ok(None);
        };
        let now = Instant::now();
        let progress = operation.progress.as_ref().map(|p| p.seq);
        let new_progress = match progress_after {
            Some(Some(seen)) => progress.is_some_and(|p| p > seen),
            Some(None) => {
                // The first read sets what "new" means.
                progress_after = Some(Some(progress.unwrap_or(0)));
                false
            }
            None => false,
        };
        let done = operation.status().is_terminal() || new_progress;
        if done || now >= until || watch.is_draining() {
            return Ok(Some(operation));
        }
        // Wake at the deadline too: that is when the operation turns `expired`.
        let to_deadline = (operation.deadline - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        let next = until
            .min(now + RECHECK)
            .min(now + to_deadline + Duration::from_millis(10));
        tokio::select! {
            () = notified => {}
            () = watch.draining() => {}
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Attaches the current result to an operation whose request was just read, settling expiry.
pub async fn attach_result(store: &Store, operation: &mut Operation) -> Result<(), StoreError> {
    operation.result = store.result(&operation.id).await?;
    settle(store, operation).await
}

/// Past its deadline with no terminal record, an operation is made `expired` for good; if a reply
/// or another replica's marker won the slot a moment earlier, that one is reported instead.
async fn settle(store: &Store, operation: &mut Operation) -> Result<(), StoreError> {
    if operation.result.is_some() || OffsetDateTime::now_utc() <= operation.deadline {
        return Ok(());
    }
    let marker = ResultRecord::expired(&operation.id, operation.deadline);
    let winner = store
        .record_marker(&operation.id, marker, operation.retention)
        .await?;
    operation.result = Some(winner);
    Ok(())
}

/// What a cancellation found.
#[derive(Debug)]
pub enum Cancellation {
    /// The operation is cancelled (by this request or an earlier one).
    Recorded(Operation),
    /// A result (or expiry) won first; the operation as it ended.
    TooLate(Operation),
}

/// Cancels an operation that has no terminal record yet. The `cancelled` marker competes for the
/// same result slot as a worker's reply, first writer wins, so exactly one of them is the outcome
/// and every replica reports the same one.
pub async fn cancel(
    store: &Store,
    tenant: &str,
    operation_id: &str,
) -> Result<Option<Cancellation>, StoreError> {
    let Some(mut operation) = lookup(store, tenant, operation_id).await? else {
        return Ok(None);
    };
    if operation.result.is_none() {
        let marker = ResultRecord::cancelled(operation_id);
        let winner = store
            .record_marker(operation_id, marker, operation.retention)
            .await?;
        operation.result = Some(winner);
    }
    Ok(Some(if operation.status() == Status::Cancelled {
        Cancellation::Recorded(operation)
    } else {
        Cancellation::TooLate(operation)
    }))
}
