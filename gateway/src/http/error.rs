//! The HTTP edge's one error type, and its one mapping to RFC 9457 `application/problem+json`.
//!
//! Module errors (`KeyError`, `AcceptError`, `StoreError`) convert into [`ApiError`]; handlers
//! return it with `?`; [`IntoResponse`] is the only place that picks a status code. A hand-written
//! `Problem` type is used rather than a crate: it is a few lines of glue, and the problem+json
//! crates on crates.io did not support this stack's axum and http versions when it was written.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use handlers::contract::PROBLEM_TYPE_BASE;
use serde::Serialize;

use crate::config::schema::BodyError;
use crate::metrics::{JETSTREAM_ERRORS, SHED};
use crate::operations::idempotency::KeyError;
use crate::operations::{
    AcceptError, BatchError, Operation, OperationView, QuotaExceeded, RedriveError, StoreError,
};

/// An RFC 9457 problem body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`tag:nats-http-gateway,2026:problem/<slug>`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// The operation as it ended, for a cancellation that came too late.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub operation: Option<serde_json::Value>,
    /// Where a body breaks its route's schema, as in RFC 9457 section 3's example: each with a
    /// JSON Pointer into the body as a URI fragment (`#/qty`) and what is wrong there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<ProblemDetail>>,
}

/// What a JSON Pointer must percent-encode to be a URI fragment (RFC 6901 section 6, RFC 3986
/// section 3.5): controls, and the characters a fragment cannot hold as they are. Non-ASCII is
/// always encoded.
const FRAGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// One of a problem's `errors`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProblemDetail {
    pub pointer: String,
    pub detail: String,
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no route serves this path")]
    RouteNotFound,
    #[error("this path does not accept the method")]
    MethodNotAllowed,
    /// A `Content-Type` that is not a media type (RFC 9110 section 8.3).
    #[error("the Content-Type is not a media type: {0}")]
    BadContentType(String),
    #[error("no operation with this id")]
    OperationNotFound,
    #[error("request body exceeds the route's limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error(
        "request body and the gateway's message headers exceed the NATS server's max_payload of {max_payload} bytes"
    )]
    MessageTooLarge { max_payload: usize },
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// A body that breaks the route's `request_schema`.
    #[error("{0}")]
    InvalidBody(BodyError),
    /// A body of a route with a `request_schema` sent as something other than JSON.
    #[error("this route takes a JSON body (application/json, or a type ending in +json)")]
    UnsupportedMediaType,
    #[error("bad query string: {0}")]
    BadQuery(String),
    #[error("this Callback-Url is not allowed: {0}")]
    CallbackNotAllowed(String),
    /// `Delay`, `Not-Before` or `Start-By` unreadable, or outside what the route allows.
    #[error("cannot start this request as asked: {0}")]
    InvalidStart(String),
    #[error("too many event streams are open; retry later")]
    TooManyStreams,
    #[error("too many clients are waiting; read without waiting, or retry later")]
    TooManyWaiters,
    #[error("the operation already finished; it cannot be cancelled")]
    AlreadyFinished(Box<Operation>),
    /// A redrive of an operation that did not fail (or whose route is gone).
    #[error("{0}")]
    NotRedrivable(String),
    /// A bulk redrive without the filter it requires.
    #[error("{0}")]
    FilterRequired(String),
    /// A batch submit's body breaks a rule; `pointer` (a JSON Pointer) says where.
    #[error("{detail}")]
    BadBatch { pointer: String, detail: String },
    /// Item `index` of a batch reuses a key of another request; nothing was written.
    #[error("item {index}'s Idempotency-Key was already used for a different request")]
    BatchItemKeyReused { index: usize, operation_id: String },
    /// The batch's key names another batch.
    #[error("the batch's Idempotency-Key was already used for a different batch")]
    BatchKeyReused { batch_id: String },
    #[error("no batch with this id")]
    BatchNotFound,
    /// A bulk redrive's filter that cannot be read (not a JSON object, an unknown field or
    /// route, a bad page).
    #[error("{0}")]
    BadFilter(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    /// `operation_id` names the first request's operation, for callers who may read it (not the
    /// anonymous `public` tenant, whose callers share one key space: a guessed key must not hand
    /// out another caller's operation).
    #[error("idempotency key already used for a different request")]
    KeyReused { operation_id: Option<String> },
    /// A submission whose write may or may not have happened.
    #[error("JetStream did not confirm the request: {0}")]
    OutcomeUnknown(StoreError),
    /// More requests in flight than configured: refused before any work.
    #[error("the gateway is at its limit of requests in flight")]
    Overloaded,
    /// Credentials missing where needed, or not valid.
    #[error(transparent)]
    Unauthorized(#[from] super::auth::AuthError),
    /// The tenant is over its request rate.
    #[error("this tenant is over its request rate; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// The tenant holds as much as its quota allows; nothing was written.
    #[error("{exceeded}")]
    QuotaExceeded {
        exceeded: QuotaExceeded,
        retry_after_secs: u64,
    },
    /// More headers, or larger ones, than `GATEWAY_MAX_HEADERS` / `GATEWAY_MAX_HEADER_BYTES`.
    #[error(
        "the request has more than {max_headers} headers or more than {max_bytes} bytes of them"
    )]
    HeadersTooLarge {
        max_headers: usize,
        max_bytes: usize,
    },
    /// The body did not arrive within `GATEWAY_BODY_READ_TIMEOUT`.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// The process is draining after SIGTERM: it takes no new work.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// Readiness: JetStream not reachable, streams not provisioned, results not watched yet, or
    /// the quota ledger still reading the streams.
    #[error(
        "not ready: JetStream is not reachable or not provisioned yet, results are not watched yet, or the quota ledger is still reading the streams"
    )]
    NotReady,
    /// A read that could not be done.
    #[error("JetStream unavailable: {0}")]
    Unavailable(StoreError),
    /// JetStream has no room for the request (the stream's `max_bytes`, or storage limits):
    /// nothing was written.
    #[error("JetStream has no room for the request: {0}")]
    StoreFull(StoreError),
    /// The operation's result was removed before its request (a worker wrote it with a shorter
    /// `Nats-TTL` than the request's retention; nats-server left its delete marker): its outcome
    /// cannot be read any more, and no new one can take its place.
    #[error("the operation's result was removed before the operation's retention ended")]
    ResultRemoved,
    /// `If-Match` names no tag the result has (RFC 9110 section 13.1.1).
    #[error("the result's entity tag is none of those If-Match names")]
    PreconditionFailed,
    /// No range of `Range` is within the result's `size` bytes (RFC 9110 section 15.5.17).
    #[error("no range asked for is within the result's {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// A stored message the gateway cannot read: a worker broke the wire contract.
    #[error("a stored message breaks the wire contract: {0}")]
    BadStoredMessage(StoreError),
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::KeyReused { operation_id } => ApiError::KeyReused {
                operation_id: Some(operation_id),
            },
            AcceptError::TooLarge { max_payload } => ApiError::MessageTooLarge { max_payload },
            AcceptError::BodyTooLarge { limit } => ApiError::PayloadTooLarge {
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            },
            AcceptError::BodyRead(why) => ApiError::BadBody(why),
            AcceptError::InvalidStart(why) => ApiError::InvalidStart(why),
            // The route's own Retry-After is set where the route is known (submit).
            AcceptError::Quota(exceeded) => ApiError::QuotaExceeded {
                exceeded,
                retry_after_secs: 1,
            },
            AcceptError::Store(e) if e.is_result_removed() => ApiError::ResultRemoved,
            AcceptError::Store(e) if e.is_store_full() => ApiError::StoreFull(e),
            AcceptError::Store(e) if e.is_contract_violation() => ApiError::BadStoredMessage(e),
            // Refused before the commit: nothing was written, so the outcome is known.
            AcceptError::Store(e) if e.is_batch_not_sent() => ApiError::Unavailable(e),
            AcceptError::Store(e) => ApiError::OutcomeUnknown(e),
        }
    }
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::ItemKeyReused {
                index,
                operation_id,
            } => ApiError::BatchItemKeyReused {
                index,
                operation_id,
            },
            BatchError::KeyReused { batch_id } => ApiError::BatchKeyReused { batch_id },
            BatchError::ItemTooLarge { index, .. } => ApiError::BadBatch {
                pointer: format!("/items/{index}/body"),
                detail: e.to_string(),
            },
            BatchError::Quota(exceeded) => AcceptError::Quota(exceeded).into(),
            BatchError::Store(e) => AcceptError::Store(e).into(),
        }
    }
}

impl From<RedriveError> for ApiError {
    fn from(e: RedriveError) -> Self {
        match e {
            RedriveError::Accept(e) => e.into(),
            not @ (RedriveError::NotFailed { .. }
            | RedriveError::RouteGone { .. }
            | RedriveError::TooLate { .. }
            | RedriveError::CallbackNotAllowed { .. }) => ApiError::NotRedrivable(not.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if matches!(e, StoreError::BodyReadsBusy) {
            ApiError::Overloaded
        } else if e.is_result_removed() {
            ApiError::ResultRemoved
        } else if e.is_contract_violation() {
            ApiError::BadStoredMessage(e)
        } else {
            ApiError::Unavailable(e)
        }
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::RouteNotFound | ApiError::OperationNotFound | ApiError::BatchNotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } | ApiError::MessageTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BadBody(_)
            | ApiError::InvalidBody(_)
            | ApiError::BadContentType(_)
            | ApiError::BadQuery(_)
            | ApiError::Key(_)
            | ApiError::CallbackNotAllowed(_)
            | ApiError::BadFilter(_)
            | ApiError::BadBatch { .. }
            | ApiError::InvalidStart(_) => StatusCode::BAD_REQUEST,
            ApiError::TooManyStreams
            | ApiError::TooManyWaiters
            | ApiError::RateLimited { .. }
            | ApiError::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::AlreadyFinished(_) | ApiError::NotRedrivable(_) => StatusCode::CONFLICT,
            ApiError::FilterRequired(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::KeyReused { .. }
            | ApiError::BatchItemKeyReused { .. }
            | ApiError::BatchKeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::OutcomeUnknown(_)
            | ApiError::Unavailable(_)
            | ApiError::Overloaded
            | ApiError::ShuttingDown
            | ApiError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadStoredMessage(_) => StatusCode::BAD_GATEWAY,
            ApiError::ResultRemoved => StatusCode::GONE,
            ApiError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            // RFC 4918 section 11.5: the server cannot store what the request needs stored.
            ApiError::StoreFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    fn slug_and_title(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::RouteNotFound => ("not-found", "Not found"),
            ApiError::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            ApiError::BadContentType(_) => ("bad-content-type", "Invalid Content-Type"),
            ApiError::OperationNotFound => ("operation-not-found", "Operation not found"),
            ApiError::PayloadTooLarge { .. } | ApiError::MessageTooLarge { .. } => {
                ("payload-too-large", "Request body too large")
            }
            ApiError::BadBody(_) => ("bad-body", "Unreadable request body"),
            ApiError::InvalidBody(_) => ("invalid-body", "Body does not match the route's schema"),
            ApiError::UnsupportedMediaType => ("unsupported-media-type", "Unsupported media type"),
            ApiError::BadQuery(_) => ("bad-query", "Bad query string"),
            ApiError::CallbackNotAllowed(_) => {
                ("callback-url-not-allowed", "Callback-Url not allowed")
            }
            ApiError::InvalidStart(_) => ("invalid-start", "Cannot start the request as asked"),
            ApiError::TooManyStreams => ("too-many-streams", "Too many event streams"),
            ApiError::TooManyWaiters => ("too-many-waiters", "Too many waiting clients"),
            ApiError::Unauthorized(_) => ("unauthorized", "Unauthorized"),
            ApiError::RateLimited { .. } => ("rate-limited", "Too many requests"),
            ApiError::QuotaExceeded { .. } => ("quota-exceeded", "Tenant quota reached"),
            ApiError::BodyTimeout => ("body-timeout", "Request body too slow"),
            ApiError::HeadersTooLarge { .. } => {
                ("headers-too-large", "Request header fields too large")
            }
            ApiError::AlreadyFinished(_) => ("already-finished", "Operation already finished"),
            ApiError::NotRedrivable(_) => ("not-redrivable", "Operation cannot be redriven"),
            ApiError::FilterRequired(_) => ("filter-required", "A bulk redrive needs a filter"),
            ApiError::BadFilter(_) => ("bad-filter", "Invalid redrive filter"),
            ApiError::BadBatch { .. } => ("bad-batch", "Invalid batch"),
            ApiError::BatchItemKeyReused { .. } | ApiError::BatchKeyReused { .. } => (
                "idempotency-key-reused",
                "Idempotency-Key reused with a different request",
            ),
            ApiError::BatchNotFound => ("batch-not-found", "Batch not found"),
            ApiError::Key(KeyError::Missing) => {
                ("idempotency-key-missing", "Idempotency-Key required")
            }
            ApiError::Key(_) => ("idempotency-key-invalid", "Invalid Idempotency-Key"),
            ApiError::KeyReused { .. } => (
                "idempotency-key-reused",
                "Idempotency-Key reused with a different request",
            ),
            ApiError::OutcomeUnknown(_) => ("outcome-unknown", "Outcome unknown, retry"),
            ApiError::Unavailable(_) => ("unavailable", "Service unavailable"),
            ApiError::Overloaded => ("overloaded", "Too many requests in flight"),
            ApiError::ShuttingDown => ("shutting-down", "Shutting down"),
            ApiError::NotReady => ("not-ready", "Not ready"),
            ApiError::BadStoredMessage(_) => ("bad-stored-message", "Unreadable stored message"),
            ApiError::ResultRemoved => ("result-removed", "Result no longer kept"),
            ApiError::PreconditionFailed => ("precondition-failed", "Precondition failed"),
            ApiError::RangeNotSatisfiable { .. } => {
                ("range-not-satisfiable", "Range not satisfiable")
            }
            ApiError::StoreFull(_) => ("insufficient-storage", "No room to store the request"),
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::OutcomeUnknown(_) => "JetStream did not confirm the request in time. It may \
                or may not have been accepted: retry the same request with the same \
                Idempotency-Key, which will find it or accept it exactly once."
                .to_owned(),
            ApiError::Unavailable(_) => {
                "JetStream is not reachable right now; retry after the Retry-After delay."
                    .to_owned()
            }
            ApiError::Overloaded => "The gateway is handling as many requests as it is \
                configured to; nothing was done with this one. Retry after the Retry-After delay."
                .to_owned(),
            ApiError::ShuttingDown => "This gateway process is stopping and takes no new \
                requests; nothing was done with this one. Retry (another replica will answer)."
                .to_owned(),
            ApiError::BadStoredMessage(_) => "A worker stored a message this gateway cannot \
                read (it breaks the wire contract). Retrying will not help; the operator has \
                been told in the logs."
                .to_owned(),
            ApiError::StoreFull(_) => "JetStream has no room for this request right now (the \
                gateway's stream limit or the server's storage is reached); nothing was stored. \
                Retry after the Retry-After delay, with the same Idempotency-Key."
                .to_owned(),
            ApiError::ResultRemoved => "The operation's result was removed from JetStream \
                before the operation's retention ended (a worker stored it with a shorter \
                Nats-TTL than the request's Gw-Retention, or its body object outlived the \
                bucket's max_age). Its outcome can no longer be read, and it will not change."
                .to_owned(),
            ApiError::QuotaExceeded { exceeded, .. } => format!(
                "{}{}. Nothing was written: retry after the Retry-After delay, when some of the \
                 tenant's operations have ended. (A retry of a request already accepted is \
                 answered as before, quota or not.)",
                exceeded.to_string()[..1].to_uppercase(),
                &exceeded.to_string()[1..]
            ),
            ApiError::KeyReused { .. } => "This Idempotency-Key was first used for a request \
                with another method, path, query, content type, body or Callback-Url. Use a new key \
                for a new request."
                .to_owned(),
            other => {
                let mut s = other.to_string();
                if let Some(first) = s.get_mut(0..1) {
                    first.make_ascii_uppercase();
                }
                s.push('.');
                s
            }
        }
    }

    pub fn problem(&self) -> Problem {
        let (slug, title) = self.slug_and_title();
        Problem {
            kind: format!("{PROBLEM_TYPE_BASE}{slug}"),
            title,
            status: self.status().as_u16(),
            detail: self.detail(),
            operation_id: match self {
                ApiError::KeyReused { operation_id } => operation_id.clone(),
                ApiError::BatchItemKeyReused { operation_id, .. } => Some(operation_id.clone()),
                _ => None,
            },
            operation: match self {
                ApiError::AlreadyFinished(operation) => Some(
                    serde_json::to_value(OperationView::of(operation))
                        .expect("an operation body serializes"),
                ),
                _ => None,
            },
            errors: match self {
                ApiError::InvalidBody(BodyError::Violations(violations)) => Some(
                    violations
                        .iter()
                        .map(|v| ProblemDetail {
                            pointer: format!(
                                "#{}",
                                percent_encoding::utf8_percent_encode(&v.pointer, FRAGMENT)
                            ),
                            detail: v.detail.clone(),
                        })
                        .collect(),
                ),
                ApiError::BadBatch { pointer, detail } => Some(vec![ProblemDetail {
                    pointer: format!(
                        "#{}",
                        percent_encoding::utf8_percent_encode(pointer, FRAGMENT)
                    ),
                    detail: detail.clone(),
                }]),
                ApiError::BatchItemKeyReused { index, .. } => Some(vec![ProblemDetail {
                    pointer: format!("#/items/{index}/idempotency_key"),
                    detail: "used before for a different request".to_owned(),
                }]),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    /// 503 answers get their `Retry-After` from the router's `retry_after` layer, which knows the
    /// configured value.
    fn into_response(self) -> Response {
        match &self {
            ApiError::OutcomeUnknown(cause) => {
                tracing::warn!(error = %cause, "Answering 503; the client may retry.");
                metrics::counter!(JETSTREAM_ERRORS, "kind" => "outcome_unknown").increment(1);
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "Answering 503; the client may retry.");
                metrics::counter!(JETSTREAM_ERRORS, "kind" => "unavailable").increment(1);
            }
            ApiError::Overloaded => metrics::counter!(SHED).increment(1),
            ApiError::BadStoredMessage(cause) => {
                tracing::error!(error = %cause, "A stored message breaks the wire contract.");
            }
            ApiError::StoreFull(cause) => {
                tracing::warn!(error = %cause, "JetStream is full; answering 507.");
                metrics::counter!(JETSTREAM_ERRORS, "kind" => "store_full").increment(1);
            }
            ApiError::ResultRemoved => {
                tracing::error!(
                    "An operation's result was removed while its request lives: a worker writes results with a shorter Nats-TTL than Gw-Retention, or the result's body object was removed."
                );
            }
            _ => {}
        }
        let mut response = (self.status(), problem_json(&self.problem())).into_response();
        let h = response.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"nats-http-gateway\""),
                );
            }
            ApiError::RateLimited { retry_after_secs }
            | ApiError::QuotaExceeded {
                retry_after_secs, ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }

            ApiError::RangeNotSatisfiable { size } => {
                // RFC 9110 section 14.4: a 416 says the representation's length.
                h.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("digits"),
                );
            }
            ApiError::BodyTimeout => {
                // The rest of the body may still be on its way: do not read it.
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// A problem as a response body with the right content type.
pub fn problem_json(problem: &Problem) -> impl IntoResponse + use<> {
    let body = serde_json::to_vec(problem).expect("a Problem always serializes");
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::Violation;

    /// A pointer into the body is written as a URI fragment (RFC 6901 section 6).
    #[test]
    fn body_pointers_are_uri_fragments() {
        let error = ApiError::InvalidBody(BodyError::Violations(vec![Violation {
            pointer: "/sp ace/%/ü/a~1b".to_owned(),
            detail: "no".to_owned(),
        }]));
        let errors = error.problem().errors.unwrap();
        assert_eq!(errors[0].pointer, "#/sp%20ace/%25/%C3%BC/a~1b");
    }
}
