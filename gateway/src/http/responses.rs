//! How answers about an operation look: the `202` that points at it, the replayed result, and
//! the headers they carry (`Location`, `Retry-After`, `Cache-Control`, `Preference-Applied`), each
//! set in one place.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use handlers::contract::ResultRecord;
use serde::Serialize;

use super::state::AppState;
use crate::operations::{Links, Operation, Status, operation_path};

/// RFC 7240, section 3.
const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");
/// The IETF Idempotency-Key draft's mark of a replayed answer.
pub(super) const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The body of a `202 Accepted` answer to a submission.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Accepted)]
pub(crate) struct AcceptedBody<'a> {
    id: &'a str,
    status: Status,
    idempotency_key: &'a str,
    links: Links,
}

/// The `202` answer to a submission: the operation's id, status and key, and where to look.
pub(super) fn accepted(state: &AppState, operation: &Operation) -> Response {
    let body = AcceptedBody {
        id: operation.id(),
        status: operation.status(),
        idempotency_key: &operation.idempotency_key,
        links: Links::of(operation.id()),
    };
    pending(state, operation, Json(body))
}

/// A 202 that points at the operation: `Location`, never cached, and `Retry-After` while the
/// operation is pending (a replay of a finished one has nothing to wait for).
pub(super) fn pending(
    state: &AppState,
    operation: &Operation,
    body: impl IntoResponse,
) -> Response {
    let mut response = (StatusCode::ACCEPTED, body).into_response();
    set_location(&mut response, operation);
    if !operation.status().is_terminal() {
        set_retry_after(&mut response, state, operation);
    }
    set_no_store(&mut response);
    response
}

/// `Location`: the operation's status resource.
pub(super) fn set_location(response: &mut Response, operation: &Operation) {
    response.headers_mut().insert(
        header::LOCATION,
        header_value(&operation_path(operation.id())),
    );
}

/// `Retry-After`: when a read of this pending operation is worth repeating (its route's
/// backlog), and for a delayed start not before it is due.
pub(super) fn set_retry_after(response: &mut Response, state: &AppState, operation: &Operation) {
    let mut secs = state.ops.retry_after(operation.route());
    // A delayed start says nothing new before it is due: not before then.
    if let Some(due) = operation.request.not_before {
        let left = (due - time::OffsetDateTime::now_utc()).whole_seconds();
        if left > 0 {
            secs = secs.max(u64::try_from(left).unwrap_or(0) + 1);
        }
    }
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
}

/// `Cache-Control: no-store`: an operation's state changes, no cache may keep it.
pub(super) fn set_no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// `Preference-Applied` (RFC 7240, section 3): which preference the answer honoured.
pub(super) fn set_preference_applied(response: &mut Response, preference: &str) {
    response
        .headers_mut()
        .insert(PREFERENCE_APPLIED, header_value(preference));
}

pub(super) fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("gateway-made header values are visible ASCII")
}

/// A stored terminal record replayed as an HTTP response: its status, content type, body, and
/// the headers on the result allow-list.
pub(super) fn result_response(state: &AppState, record: &ResultRecord) -> Response {
    let status = StatusCode::from_u16(record.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(Body::from(record.body.clone()));
    *response.status_mut() = status;
    let h = response.headers_mut();
    if let Some(ct) = record
        .content_type
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        h.insert(header::CONTENT_TYPE, ct);
    }
    for (name, value) in &record.headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if !state.result_headers.contains(&name) {
            continue;
        }
        if let Ok(value) = HeaderValue::from_str(value) {
            h.append(name, value);
        }
    }
    response
}
