//! The operation model: what the gateway knows of one accepted request, and the states clients
//! see. Data only: nothing here reads or writes JetStream, so every room above can use these
//! types without a loop back (the store returns them, lookups fill them, views show them).
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
//! marker (see [`super::lookup`]).

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use handlers::contract::{ContractError, Outcome, RequestHead, ResultRecord, header};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::idempotency::decode_key;

/// Status of an operation, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A delayed start that is not due yet (`Not-Before`, `Delay`): no handler runs before then.
    Scheduled,
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
            Status::Scheduled => "scheduled",
            Status::Pending => "pending",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Scheduled | Status::Pending)
    }

    /// Whether an operation in this status may be redriven: it ended, and not in success.
    pub fn is_redrivable(self) -> bool {
        self.is_terminal() && self != Status::Succeeded
    }
}

/// A result as stored: the record and when it was stored.
#[derive(Debug, Clone)]
pub struct StoredResult {
    pub record: ResultRecord,
    pub stored_at: OffsetDateTime,
}

impl StoredResult {
    /// The body's size in bytes and its SHA-256 (base64url with padding, RFC 4648 section 5, as
    /// the Object Store writes digests): what identifies the representation (a result never
    /// changes once stored, so this is a strong validator).
    pub fn representation(&self) -> (u64, String) {
        use sha2::Digest as _;
        match &self.record.body_object {
            Some(object) => (object.size, object.sha256().to_owned()),
            None => (
                self.record.body.len() as u64,
                data_encoding::BASE64URL.encode(&sha2::Sha256::digest(&self.record.body)),
            ),
        }
    }
}

/// A result's body, or the part of it asked for.
pub enum ResultBody {
    /// In the record's message.
    Inline(Bytes),
    /// Read from the Object Store as it is sent (a few chunks in memory at a time).
    Streamed(BodyChunks),
}

/// A body read from the Object Store, chunk by chunk; an error ends it early.
pub type BodyChunks = std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A worker's latest progress report, as the status resource shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Progress)]
pub struct ProgressState {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    pub message: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Where retries stand, when the operation's worker has retried it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryView>,
    /// Stream sequence of the report: orders reports, and names SSE `progress-<seq>` events.
    #[serde(skip)]
    pub seq: u64,
}

/// Where a pending operation's retries stand, as its worker last reported: after a failed
/// attempt, its number, its error and when the next is due; while a retry runs, its number.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Retry)]
pub struct RetryView {
    /// Attempts made or running (1 is the first).
    pub attempts: u32,
    /// The last failed attempt's error (at most 500 characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is due (RFC 3339); absent while an attempt runs.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl From<handlers::RetryState> for RetryView {
    fn from(state: handlers::RetryState) -> Self {
        Self {
            attempts: state.attempts,
            last_error: state.last_error,
            next_attempt_at: state.next_attempt_at,
        }
    }
}

/// One operation as read from JetStream.
#[derive(Debug, Clone)]
pub struct Operation {
    /// The request message's contract fields, as the gateway wrote them; `tenant` and
    /// `fingerprint` are always present (checked when read).
    pub request: RequestHead,
    /// The idempotency key in effect, decoded from the message's sf-string.
    pub idempotency_key: String,
    /// When JetStream stored the request.
    pub created_at: OffsetDateTime,
    pub result: Option<StoredResult>,
    /// The latest progress report, while pending.
    pub progress: Option<ProgressState>,
    /// Where the webhook stands (read by the lookup when there is a callback URL).
    pub callback: Option<DeliveryState>,
    /// The span that accepted the request (its `traceparent`), which reads link to.
    pub trace: Option<opentelemetry::trace::SpanContext>,
    /// The operation that redrives this failed one, if any (read by the lookup).
    pub redriven_by: Option<String>,
}

impl Operation {
    /// A new operation, as its request message was just written.
    pub(super) fn accepted(
        request: RequestHead,
        idempotency_key: String,
        created_at: OffsetDateTime,
    ) -> Self {
        Self {
            request,
            idempotency_key,
            created_at,
            result: None,
            progress: None,
            callback: None,
            trace: None,
            redriven_by: None,
        }
    }

    /// Reads an operation's request message (its result is attached separately). The message is
    /// parsed by the contract; the fields a worker may ignore but the gateway needs are required
    /// here.
    pub fn from_request(message: &StreamMessage) -> Result<Self, ContractError> {
        let request = RequestHead::from_headers(&message.headers)?;
        let stored_key = request
            .idempotency_key
            .as_deref()
            .ok_or(ContractError::MissingHeader(header::IDEMPOTENCY_KEY))?;
        let idempotency_key =
            decode_key(stored_key.as_bytes()).map_err(|_| ContractError::InvalidHeader {
                name: header::IDEMPOTENCY_KEY,
                value: stored_key.to_owned(),
            })?;
        for (value, name) in [
            (&request.tenant, header::TENANT),
            (&request.fingerprint, header::FINGERPRINT),
        ] {
            if value.is_none() {
                return Err(ContractError::MissingHeader(name));
            }
        }
        let mut operation = Self::accepted(request, idempotency_key, message.time);
        operation.trace = handlers::trace::remote_span(&message.headers);
        Ok(operation)
    }

    pub fn id(&self) -> &str {
        &self.request.operation_id
    }

    pub fn route(&self) -> &str {
        &self.request.route
    }

    pub fn tenant(&self) -> &str {
        self.request.tenant.as_deref().unwrap_or_default()
    }

    /// The fingerprint the key is bound to.
    pub fn fingerprint(&self) -> &str {
        self.request.fingerprint.as_deref().unwrap_or_default()
    }

    /// After this instant, an operation with no terminal record is `expired`.
    pub fn deadline(&self) -> OffsetDateTime {
        self.request.deadline
    }

    /// How long JetStream keeps the operation's messages.
    pub fn retention(&self) -> Option<Duration> {
        self.request.retention_secs.map(Duration::from_secs)
    }

    /// The completion webhook's URL, if any.
    pub fn callback_url(&self) -> Option<&str> {
        self.request.callback_url.as_deref()
    }

    /// The status now: a terminal record's, else `scheduled` until a delayed start is due (by
    /// this replica's clock), then `pending`.
    pub fn status(&self) -> Status {
        match &self.result {
            Some(r) => Status::of(&r.record),
            None if self
                .request
                .not_before
                .is_some_and(|due| due > OffsetDateTime::now_utc()) =>
            {
                Status::Scheduled
            }
            None => Status::Pending,
        }
    }

    pub fn updated_at(&self) -> OffsetDateTime {
        self.result
            .as_ref()
            .map_or(self.created_at, |r| r.stored_at)
    }
}

/// Where a webhook stands, as stored on `gw.cb.<id>` and shown by the status resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Callback)]
pub struct DeliveryState {
    pub url: String,
    /// `pending` (not yet delivered; more attempts to come), `delivered`, or `failed` (dead-lettered).
    pub state: String,
    pub attempts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Reads a stored delivery state.
pub fn decode_state(bytes: &[u8]) -> Option<DeliveryState> {
    serde_json::from_slice(bytes).ok()
}
