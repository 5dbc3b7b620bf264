//! How answers about an operation look: the `202` that points at it, the replayed result, and
//! the headers they carry (`Location`, `Retry-After`, `Cache-Control`, `Preference-Applied`), each
//! set in one place.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
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
/// with its `Content-Length`; a `HEAD` reads none of it.
///
/// A `200` result is a representation with a strong `ETag` (its SHA-256: a result never
/// changes once stored) and byte ranges. Given the read's headers (`None` for a submission's
/// answer), `If-Match` naming another tag is 412, `If-None-Match` naming this one is 304 (RFC
/// 9110 section 13.2.2 orders them), and one satisfiable byte range (section 14.1.2) of one
/// `Range` field, with no `If-Range` or one naming this tag (section 13.1.5), is 206 with
/// `Content-Range`; none satisfiable is 416. Several ranges, or a `Range` this server cannot
/// read, are answered with the whole body, as section 14.2 allows. Other statuses are replayed
/// as they are: conditions and ranges apply to a `200`. A body kept elsewhere than its
/// operation's place, or gone, is 502 or 410 whatever the conditions.
pub(super) async fn result_response(
    state: &AppState,
    operation: &Operation,
    result: &StoredResult,
    read: Option<(&Method, &HeaderMap)>,
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
    let mut asked = Asked::Whole;
    if status == StatusCode::OK {
        let (_, sha256) = result.representation();
        let etag: ETag = format!("\"{sha256}\"")
            .parse()
            .map_err(|_| ApiError::BadStoredMessage(bad_digest(&sha256)))?;
        headers.typed_insert(etag.clone());
        headers.typed_insert(AcceptRanges::bytes());
        if let Some((_, conditions)) = read {
            asked = Asked::of(conditions, &etag, size);
        }
    }
    let range = match &asked {
        Asked::Whole => 0..size,
        Asked::Part(range) => range.clone(),
        Asked::NotModified | Asked::Refused(_) => 0..0,
    };
    // Opened (and checked) whatever is asked, read only if sent.
    let body = state.ops.result_body(operation, range.clone()).await?;
    let (status, length) = match asked {
        Asked::Refused(error) => return Err(error),
        Asked::NotModified => {
            // RFC 9110 section 15.4.5: the validator, no body; a length only as the 200's.
            headers.remove(header::CONTENT_TYPE);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            response.headers_mut().extend(headers);
            return Ok(response);
        }
        Asked::Part(range) => {
            headers.typed_insert(
                ContentRange::bytes(range.start..range.end, size).expect("a range within size"),
            );
            (StatusCode::PARTIAL_CONTENT, range.end - range.start)
        }
        Asked::Whole => (status, size),
    };
    let head = read.is_some_and(|(method, _)| method == Method::HEAD);
    // The length is the body's own, unless hyper cannot know it: streamed, or not sent (HEAD).
    // A 204 or 304 replayed carries none (RFC 9110 section 8.6).
    let told = head || matches!(body, Some(ResultBody::Streamed(_)));
    if told && status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    let body = match body {
        _ if head => Body::empty(),
        Some(ResultBody::Inline(bytes)) => Body::from(bytes),
        Some(ResultBody::Streamed(chunks)) => Body::from_stream(chunks),
        None => Body::empty(),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    Ok(response)
}

/// What a read's conditional and range headers ask of a `200` result.
enum Asked {
    Whole,
    Part(std::ops::Range<u64>),
    NotModified,
    Refused(ApiError),
}

impl Asked {
    fn of(conditions: &HeaderMap, etag: &ETag, size: u64) -> Self {
        // An If-Match that cannot be read matches nothing.
        if conditions.contains_key(header::IF_MATCH)
            && !conditions
                .typed_get::<IfMatch>()
                .is_some_and(|m| m.precondition_passes(etag))
        {
            return Asked::Refused(ApiError::PreconditionFailed);
        }
        if conditions
            .typed_get::<IfNoneMatch>()
            .is_some_and(|m| !m.precondition_passes(etag))
        {
            return Asked::NotModified;
        }
        let mut ranges = conditions.get_all(header::RANGE).iter();
        let (Some(range), None) = (ranges.next(), ranges.next()) else {
            return Asked::Whole;
        };
        // An If-Range that cannot be read, or names a date (a result has none), is not current.
        let current = !conditions.contains_key(header::IF_RANGE)
            || conditions
                .typed_get::<IfRange>()
                .is_some_and(|r| !r.is_modified(Some(etag), None));
        match range
            .to_str()
            .ok()
            .filter(|_| current)
            .map(|r| byte_range(r, size))
        {
            None | Some(Ok(None)) => Asked::Whole,
            Some(Ok(Some(range))) => Asked::Part(range),
            Some(Err(())) => Asked::Refused(ApiError::RangeNotSatisfiable { size }),
        }
    }
}

/// The one byte range `Range: bytes=…` asks of `size` bytes (RFC 9110 section 14.1.2): `Some`
/// when exactly one of its ranges is satisfiable, `None` when several are or the field cannot
/// be read (the whole body then), `Err` when none is (416). A suffix longer than the body is the
/// whole body; an end past it, the last byte. http-range-header parses; it refuses suffixes
/// longer than the body, which the RFC satisfies, so the satisfiable ranges are worked out here.
fn byte_range(value: &str, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    use http_range_header::{EndPosition, StartPosition};
    let Ok(parsed) = http_range_header::parse_range_header(value) else {
        return Ok(None);
    };
    // A last position before its first makes the field invalid (section 14.1.1): ignored.
    let reversed = |r: &&http_range_header::SyntacticallyCorrectRange| matches!((r.start, r.end), (StartPosition::Index(first), EndPosition::Index(end)) if end < first);
    if parsed.ranges.iter().any(|r| reversed(&r)) {
        return Ok(None);
    }
    let mut satisfiable = parsed.ranges.iter().filter_map(|r| {
        let last = size.checked_sub(1)?;
        let (first, end) = match (r.start, r.end) {
            (StartPosition::FromLast(0), _) => return None,
            (StartPosition::FromLast(n), _) => (size.saturating_sub(n), last),
            (StartPosition::Index(first), _) if first > last => return None,
            (StartPosition::Index(first), EndPosition::Index(end)) => (first, end.min(last)),
            (StartPosition::Index(first), EndPosition::LastByte) => (first, last),
        };
        Some(first..end + 1)
    });
    match (satisfiable.next(), satisfiable.next()) {
        (Some(one), None) => Ok(Some(one)),
        (Some(_), Some(_)) => Ok(None),
        (None, _) => Err(()),
    }
}

/// A digest no entity tag can carry: the record breaks the contract.
fn bad_digest(sha256: &str) -> crate::operations::StoreError {
    handlers::contract::ContractError::InvalidHeader {
        name: handlers::contract::header::BODY_DIGEST,
        value: sha256.to_owned(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        let size = 3000;
        for (asked, want) in [
            ("bytes=0-0", Ok(Some(0..1))),
            ("bytes=100-", Ok(Some(100..3000))),
            ("bytes=2999-5000", Ok(Some(2999..3000))),
            ("bytes=-10", Ok(Some(2990..3000))),
            // A suffix longer than the body is all of it (section 14.1.3).
            ("bytes=-99999999", Ok(Some(0..3000))),
            // A zero-length suffix is unsatisfiable by the RFC; http-range-header cannot read
            // it, so it is ignored (the whole body), as an unreadable Range is.
            ("bytes=-0", Ok(None)),
            ("bytes=3000-", Err(())),
            ("bytes=3000-4000,5000-", Err(())),
            // One satisfiable range among unsatisfiable ones is that one.
            ("bytes=5000-,10-19", Ok(Some(10..20))),
            // Several (overlapping or not): the whole body.
            ("bytes=0-10,5-15", Ok(None)),
            ("bytes=0-1,5-6", Ok(None)),
            // Not a byte range this server reads: ignored.
            ("lines=1-2", Ok(None)),
            ("bytes=", Ok(None)),
            ("bytes=5-1", Ok(None)),
        ] {
            assert_eq!(byte_range(asked, size), want, "{asked}");
        }
        assert_eq!(
            byte_range("bytes=0-", 0),
            Err(()),
            "an empty body has no bytes"
        );
    }
}
