//! How answers about an operation look: the `202` that points at it, the replayed result, and
//! the headers they carry (`Location`, `Retry-After`, `Cache-Control`, `Preference-Applied`), each
//! set in one place.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use headers::{AcceptRanges, ContentRange, ETag, HeaderMapExt as _, IfMatch, IfNoneMatch, IfRange};
use serde::Serialize;

use super::error::ApiError;
use super::state::AppState;
use crate::operations::{Links, Operation, ResultBody, Status, StoredResult, operation_path};

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
/// the headers on the result allow-list. A body in the Object Store is streamed as it is read,
/// with its `Content-Length`.
///
/// A `200` result is a representation with a strong `ETag` (its SHA-256: a result never
/// changes once stored) and byte ranges: given the request's headers (`GET` only, `None` for a
/// submission's answer), `If-Match` that names another tag is 412 and `If-None-Match` that
/// names this one is 304 (RFC 9110 section 13), and one satisfiable byte range of `Range`
/// (with no `If-Range`, or one naming this tag) is 206 with `Content-Range`, none is 416
/// (section 14). Several ranges are answered with the whole body, as section 14.2 allows.
/// Other statuses are replayed as they are: conditions and ranges apply to a `200` (section
/// 14.2).
pub(super) async fn result_response(
    state: &AppState,
    operation: &Operation,
    result: &StoredResult,
    conditions: Option<&HeaderMap>,
) -> Result<Response, ApiError> {
    let record = &result.record;
    let status = StatusCode::from_u16(record.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    if let Some(ct) = record
        .content_type
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    for (name, value) in &record.headers {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if !state.result_headers.contains(&name) {
            continue;
        }
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.append(name, value);
        }
    }
    let size = record.body_size();
    let (mut status, mut range) = (status, 0..size);
    if status == StatusCode::OK {
        let (_, sha256) = result.representation();
        let etag: ETag = format!("\"{sha256}\"")
            .parse()
            .expect("base64url is entity-tag text");
        headers.typed_insert(etag.clone());
        headers.typed_insert(AcceptRanges::bytes());
        if let Some(asked) = conditions {
            if asked
                .typed_get::<IfMatch>()
                .is_some_and(|m| !m.precondition_passes(&etag))
            {
                return Err(ApiError::PreconditionFailed);
            }
            if asked
                .typed_get::<IfNoneMatch>()
                .is_some_and(|m| !m.precondition_passes(&etag))
            {
                // RFC 9110 section 15.4.5: a 304 carries the validator and no body.
                headers.remove(header::CONTENT_TYPE);
                let mut response = StatusCode::NOT_MODIFIED.into_response();
                response.headers_mut().extend(headers);
                return Ok(response);
            }
            let current = asked
                .typed_get::<IfRange>()
                .is_none_or(|r| !r.is_modified(Some(&etag), None));
            if let Some(asked_range) = asked.get(header::RANGE).and_then(|v| v.to_str().ok())
                && current
            {
                match http_range_header::parse_range_header(asked_range)
                    .map(|parsed| parsed.validate(size))
                {
                    // Not a byte range this server understands: ignored (section 14.2).
                    Err(_) => {}
                    Ok(Err(_)) => return Err(ApiError::RangeNotSatisfiable { size }),
                    Ok(Ok(ranges)) if ranges.len() == 1 => {
                        let (first, last) = (*ranges[0].start(), *ranges[0].end());
                        headers.typed_insert(
                            ContentRange::bytes(first..=last, size).expect("a valid range"),
                        );
                        status = StatusCode::PARTIAL_CONTENT;
                        range = first..last + 1;
                    }
                    Ok(Ok(_)) => {}
                }
            }
        }
    }
    let length = range.end - range.start;
    let body = match state.ops.result_body(operation, range).await? {
        Some(ResultBody::Inline(bytes)) => Body::from(bytes),
        Some(ResultBody::Streamed(chunks)) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            Body::from_stream(chunks)
        }
        None => Body::empty(),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    Ok(response)
}
