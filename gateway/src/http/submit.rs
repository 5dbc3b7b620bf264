//! `POST /<route>` (or whatever method the route has): read and validate the request
//! ([`read_submission`]), accept it as exactly one JetStream message, and answer
//! ([`answer`]): `202` with the status resource, or the result itself when a wait was asked for
//! and the result came in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};

use super::auth::{PUBLIC_TENANT, Tenant};
use super::error::ApiError;
use super::extract::{OperationRef, Wait};
use super::prefer::{self, Preferences};
use super::reads::{note_operation, wait_for};
use super::responses::{
    IDEMPOTENT_REPLAYED, accepted, header_value, result_response, set_location,
    set_preference_applied,
};
use super::state::AppState;
use crate::config::RouteConfig;
use crate::config::callback;
use crate::metrics::IDEMPOTENT_REPLAYS;
use crate::operations::idempotency::{self, KeyError};
use crate::operations::{AcceptError, Operation, Start, Submission, WakeOn, check_destination};

/// Validates, accepts, answers. Holds a JetStream permit only while accepting, taken once the
/// whole body has arrived.
///
/// Every answer given once the key is known carries it (`Idempotency-Key`), errors included: a
/// client that sent none learns the key the gateway assigned, so that after a `503` (outcome
/// unknown), a `408` or a `413` its retry with that key converges on one message.
pub(super) async fn submit(
    state: AppState,
    route: Arc<RouteConfig>,
    tenant: Tenant,
    request: Request,
) -> Result<Response, ApiError> {
    // axum runs a GET route's handler for HEAD too; HEAD is safe (RFC 9110 section 9.3.2) and
    // must not start an operation.
    if request.method() == Method::HEAD && route.http_method() != Method::HEAD {
        let mut refused = ApiError::MethodNotAllowed.into_response();
        if let Ok(allow) = HeaderValue::from_str(route.http_method().as_str()) {
            refused.headers_mut().insert(header::ALLOW, allow);
        }
        return Ok(refused);
    }
    let key = match idempotency::parse_key(request.headers().get_all(idempotency::HEADER))? {
        Some(key) => key,
        None if route.require_idempotency_key => return Err(KeyError::Missing.into()),
        None => idempotency::assign_key(),
    };
    let key_header = header_value(&idempotency::format_key(&key));
    let answer = submit_with_key(state, route, tenant, key, request).await;
    Ok(with_key(key_header, answer))
}

/// An answer given once the key is known, errors included, with the key in effect
/// (`Idempotency-Key`): a client that sent none learns the one assigned, for its retry.
pub(super) fn with_key(key: HeaderValue, answer: Result<Response, ApiError>) -> Response {
    let mut response = answer.unwrap_or_else(IntoResponse::into_response);
    response
        .headers_mut()
        .insert(HeaderName::from_static(idempotency::HEADER), key);
    response
}

async fn submit_with_key(
    state: AppState,
    route: Arc<RouteConfig>,
    Tenant(tenant): Tenant,
    idempotency_key: String,
    request: Request,
) -> Result<Response, ApiError> {
    let arrival = state.arrive()?;
    let (parts, body) = request.into_parts();
    // The body first, then a permit: a client that sends slowly holds only its own connection,
    // never the capacity other clients' reads and submits need.
    let read = read_submission(&state, &route, &tenant, &parts, body).await?;
    let (body, large) = match read.body {
        ReadBody::Inline(body) => (body, None),
        ReadBody::Large { prefix, rest } => (Bytes::new(), Some((prefix, rest))),
    };
    let submission = Submission {
        route: &route,
        tenant: &tenant,
        idempotency_key,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        content_type: read.content_type.as_deref(),
        forwarded: read.forwarded,
        requested_callback_url: read.callback_url,
        start: read.start,
        redrive_of: None,
        body_object: None,
        body,
    };
    let (accepted, permit) = match large {
        None => {
            let permit = state.admit_arrived(arrival)?;
            (state.ops.accept(submission).await, Some(permit))
        }
        // Streamed on into the Object Store: what was read, then the rest as it arrives; that
        // may take long, so the permit comes after, for accepting the request only.
        Some((prefix, rest)) => {
            use futures::TryStreamExt as _;
            use tokio::io::AsyncReadExt as _;
            // The core sees an I/O error; which one it was (a pause too long) is known here.
            let paused = Arc::new(AtomicBool::new(false));
            let pausing = paused.clone();
            let rest =
                tokio_util::io::StreamReader::new(rest.into_data_stream().map_err(move |e| {
                    if matches!(body_error(&e, 0), ApiError::BodyTimeout) {
                        pausing.store(true, Ordering::Relaxed);
                    }
                    std::io::Error::other(e)
                }));
            let mut body = std::io::Cursor::new(prefix).chain(rest);
            let limit = route.max_body.0 as u64;
            let mut submission = submission;
            match state
                .ops
                .upload_large(&mut submission, &mut body, limit)
                .await
            {
                Err(AcceptError::BodyRead(_)) if paused.load(Ordering::Relaxed) => {
                    return Err(ApiError::BodyTimeout);
                }
                Err(e) => (Err(e), None),
                Ok(Some(replayed)) => (Ok(replayed), None),
                Ok(None) => match state.admit_arrived(arrival) {
                    Ok(permit) => (state.ops.accept_uploaded(submission).await, Some(permit)),
                    Err(refused) => {
                        state.ops.forget_upload(&submission).await;
                        return Err(refused);
                    }
                },
            }
        }
    };
    let accepted = accepted.map_err(|e| match ApiError::from(e) {
        ApiError::KeyReused { .. } if &*tenant == PUBLIC_TENANT => {
            ApiError::KeyReused { operation_id: None }
        }
        // Room comes back as the route's operations end: its backlog's estimate.
        ApiError::QuotaExceeded { exceeded, .. } => ApiError::QuotaExceeded {
            exceeded,
            retry_after_secs: state.ops.retry_after(&route.name),
        },
        other => other,
    })?;
    #[cfg(feature = "fault-injection")]
    if state.abort_after_publish && matches!(accepted, crate::operations::Accepted::New(_)) {
        tracing::warn!("Fault injection: aborting after the JetStream ack, before answering.");
        std::process::abort();
    }
    drop(permit);
    let (operation, replayed) = accepted.into_operation();
    if replayed {
        metrics::counter!(IDEMPOTENT_REPLAYS, "route" => route.name.clone()).increment(1);
    }
    note_operation(&operation);
    // `Prefer: wait=N`, or the route's own wait: answer with the result if it comes in time.
    let wait = Wait::capped(read.preferences.wait.or(route.wait), state.limits.max_wait);
    answer(&state, tenant, operation, replayed, wait, &read.preferences).await
}

/// What a submission carries besides its method, path and tenant, read and checked.
struct ReadSubmission {
    preferences: Preferences,
    /// The `Content-Type` as sent, checked to be a media type.
    content_type: Option<String>,
    body: ReadBody,
    /// The client's `Callback-Url`, allowed.
    callback_url: Option<String>,
    /// When it may start (`Delay`, `Not-Before`, `Start-By`), within the route's bounds.
    start: Start,
    /// Request headers on the forward allow-list, plus the trace context to continue.
    forwarded: Vec<(String, String)>,
}

/// Reads and validates a submission: `Prefer`, the body's size (before and while reading it),
/// the `Callback-Url`, and the headers to forward. Nothing is written for a request that fails here.
async fn read_submission(
    state: &AppState,
    route: &RouteConfig,
    tenant: &str,
    parts: &Parts,
    body: axum::body::Body,
) -> Result<ReadSubmission, ApiError> {
    let limit = route.max_body.0;
    let preferences = prefer::parse(&parts.headers);
    let start = read_start(&parts.headers, route, time::OffsetDateTime::now_utc())?;
    let content_type = content_type(&parts.headers)?;
    if content_length(&parts.headers).is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let body = match route.inline_max {
        None => ReadBody::Inline(
            axum::body::to_bytes(body, limit)
                .await
                .map_err(|e| body_error(&e, limit))?,
        ),
        Some(inline) => read_up_to(body, inline.0, limit).await?,
    };
    if let (Some(schema), ReadBody::Inline(body)) = (&route.body_schema, &body) {
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::UnsupportedMediaType);
        }
        schema.check(body).map_err(ApiError::InvalidBody)?;
    }
    let callback_url = match parts.headers.get("callback-url") {
        // The route's receiver is the operator's: a client cannot divert its notifications.
        Some(_) if route.callback_url.is_some() => {
            return Err(ApiError::CallbackNotAllowed(
                "this route notifies its own receiver (its callback_url); a Callback-Url cannot \
                 replace it"
                    .to_owned(),
            ));
        }
        Some(value) => Some(allowed_callback(state, tenant, value).await?),
        None => None,
    };
    let forwarded = forwarded(state, &parts.headers);
    Ok(ReadSubmission {
        preferences,
        content_type,
        body,
        callback_url,
        start,
        forwarded,
    })
}

/// A request body as read: whole, or (above the route's `inline_max`) what was read so far and
/// the rest, still arriving, for the Object Store.
enum ReadBody {
    Inline(Bytes),
    Large {
        prefix: Bytes,
        rest: axum::body::Body,
    },
}

/// Reads a body until it is known to fit in `inline` bytes (whole, then), or not.
async fn read_up_to(
    mut body: axum::body::Body,
    inline: usize,
    limit: usize,
) -> Result<ReadBody, ApiError> {
    use http_body_util::BodyExt as _;
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e, limit))?;
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
            if read.len() > inline {
                return Ok(ReadBody::Large {
                    prefix: read.freeze(),
                    rest: body,
                });
            }
        }
    }
    Ok(ReadBody::Inline(read.freeze()))
}

/// What a failure to read a body is: over the limit, too slow, or broken.
fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    if caused_by::<http_body_util::LengthLimitError>(e) {
        ApiError::PayloadTooLarge { limit }
    } else if caused_by::<tower_http::timeout::TimeoutError>(e) {
        ApiError::BodyTimeout
    } else {
        ApiError::BadBody(e.to_string())
    }
}

/// The request headers on the forward allow-list, plus the trace context: the worker continues
/// this request's span, so the trace crosses the async hop.
pub(super) fn forwarded(state: &AppState, headers: &HeaderMap) -> Vec<(String, String)> {
    let trace = handlers::trace::outgoing(&tracing::Span::current(), headers);
    state
        .forward_headers
        .iter()
        .filter(|name| !handlers::trace::TRACE_HEADERS.contains(&name.as_str()))
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(|v| (name.as_str().to_owned(), v.to_owned()))
        })
        .chain(trace)
        .collect()
}

/// When a submission may start: `Delay` (delta-seconds, as `Retry-After`'s, RFC 9110 section
/// 10.2.3) or `Not-Before` (an HTTP-date, RFC 9110 section 5.6.7, or RFC 3339), at most the
/// route's `max_delay` ahead; and `Start-By` (the same forms), after the start and no later than
/// its deadline (the start plus the route's timeout). Each at most once.
fn read_start(
    headers: &HeaderMap,
    route: &RouteConfig,
    now: time::OffsetDateTime,
) -> Result<Start, ApiError> {
    let invalid = |why: String| ApiError::InvalidStart(why);
    let one = |name: &'static str| -> Result<Option<&str>, ApiError> {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => v
                .to_str()
                .map(|s| Some(s.trim()))
                .map_err(|_| invalid(format!("{name} is not text"))),
            (Some(_), Some(_)) => Err(invalid(format!("{name} is sent more than once"))),
        }
    };
    let (delay, not_before, by) = (one("delay")?, one("not-before")?, one("start-by")?);
    if delay.is_none() && not_before.is_none() && by.is_none() {
        return Ok(Start::default());
    }
    let due = match (delay, not_before) {
        (Some(_), Some(_)) => return Err(invalid("send Delay or Not-Before, not both".into())),
        (Some(seconds), None) => {
            let secs: u32 = seconds
                .parse()
                .ok()
                .filter(|_| seconds.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| invalid(format!("Delay {seconds:?} is not a number of seconds")))?;
            Some(now + Duration::from_secs(secs.into()))
        }
        (None, Some(at)) => Some(instant("Not-Before", at)?),
        (None, None) => None,
    };
    // Bounds that depend on the clock refuse a new operation only: a retry of an accepted one
    // (same key, same headers) is a replay however late it comes (`Start::refusal`).
    let mut refusal = None;
    if let Some(due) = due {
        let Some(max_delay) = route.max_delay else {
            return Err(invalid(
                "this route takes no delayed starts (it sets no max_delay)".into(),
            ));
        };
        if due > now + max_delay {
            refusal = Some(format!(
                "this route starts requests at most {} ahead",
                humantime::format_duration(max_delay)
            ));
        }
    }
    let start = due.map_or(now, |due| due.max(now));
    let start_by = by.map(|at| instant("Start-By", at)).transpose()?;
    if let Some(by) = start_by {
        if by <= start {
            refusal.get_or_insert("Start-By must come after the start".into());
        } else if by > start + route.timeout {
            refusal.get_or_insert(
                "Start-By must come before the deadline (the start plus the route's timeout)"
                    .into(),
            );
        }
    }
    let asked = [
        ("delay", delay),
        ("not-before", not_before),
        ("start-by", by),
    ]
    .iter()
    .filter_map(|(name, value)| value.map(|v| format!("{name}={v}")))
    .collect::<Vec<_>>()
    .join(";");
    Ok(Start {
        // A time already past starts at once, like no delay.
        not_before: due.filter(|due| *due > now),
        start_by,
        asked: Some(asked),
        refusal,
    })
}

/// An instant as HTTP sends dates (an HTTP-date, RFC 9110 section 5.6.7) or as RFC 3339 does,
/// in UTC between the years 1 and 9999 (what the contract can write).
fn instant(name: &str, text: &str) -> Result<time::OffsetDateTime, ApiError> {
    httpdate::parse_http_date(text)
        .ok()
        .map(time::OffsetDateTime::from)
        .or_else(|| {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
        })
        .and_then(|t| t.checked_to_offset(time::UtcOffset::UTC))
        .filter(|t| (1..=9999).contains(&t.year()))
        .ok_or_else(|| {
            ApiError::InvalidStart(format!(
                "{name} {text:?} is neither an HTTP-date nor an RFC 3339 time"
            ))
        })
}

/// The answer to an accepted submission: after waiting (holding no permit) when asked to, the
/// result if there is one, else `202`; with `Idempotent-Replayed` when the key named an existing
/// operation.
async fn answer(
    state: &AppState,
    tenant: Arc<str>,
    operation: Operation,
    replayed: bool,
    wait: Wait,
    preferences: &Preferences,
) -> Result<Response, ApiError> {
    let operation = match wait.to_do() {
        Some(_) if !operation.status().is_terminal() => {
            // The request is accepted whatever the wait finds: if reading it back fails, the
            // answer is still the 202 of the operation in hand, never an error a client would
            // retry with a new key.
            let named = OperationRef {
                tenant,
                id: operation.id().to_owned(),
            };
            wait_for(state, &named, wait, WakeOn::Terminal)
                .await
                .unwrap_or(operation)
        }
        _ => operation,
    };
    // A result whose body cannot be read now (its object unreachable) leaves the 202.
    let replayed_result = match (&operation.result, wait.asked()) {
        (Some(result), Some(wait)) => result_response(state, &operation, result, None)
            .await
            .ok()
            .map(|r| (r, wait)),
        _ => None,
    };
    let mut response = match replayed_result {
        Some((mut r, wait)) => {
            set_location(&mut r, &operation);
            set_preference_applied(&mut r, &format!("wait={}", wait.as_secs()));
            r
        }
        None => {
            let mut r = accepted(state, &operation);
            if preferences.respond_async {
                set_preference_applied(&mut r, "respond-async");
            }
            r
        }
    };
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// A client's `Callback-Url`, parsed and matched against the allow-list, leading to a public
/// address (unless private ones are allowed); normalized (see [`callback::CallbackUrl`]).
pub(super) async fn allowed_callback(
    state: &AppState,
    tenant: &str,
    value: &HeaderValue,
) -> Result<String, ApiError> {
    let text = value
        .to_str()
        .map_err(|_| ApiError::CallbackNotAllowed("it is not text".to_owned()))?;
    // A tenant with its own receivers notifies only those (`[auth.tenant.<name>]`).
    let own = state
        .auth
        .as_ref()
        .and_then(|auth| auth.callback_allow(tenant));
    let rules = own.as_deref().unwrap_or(&state.callbacks.allow);
    let url =
        callback::allowed(text, rules).map_err(|e| ApiError::CallbackNotAllowed(e.to_string()))?;
    check_destination(url.url(), state.callbacks.allow_private)
        .await
        .map_err(|e| ApiError::CallbackNotAllowed(e.to_string()))?;
    Ok(url.as_str().to_owned())
}

/// The request's `Content-Type`, if any, as sent (it is part of the fingerprint and reaches the
/// worker byte for byte), refused unless it is one media type (RFC 9110 section 8.3): a value
/// that cannot be read would otherwise be dropped from both without a word.
fn content_type(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadContentType("sent more than once".to_owned()));
    }
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadContentType("not ASCII".to_owned()))?;
    text.parse::<mime::Mime>()
        .map_err(|e| ApiError::BadContentType(e.to_string()))?;
    Ok(Some(text.to_owned()))
}

/// Whether a media type is JSON: `application/json`, or any `+json` structured syntax suffix
/// (RFC 6839 section 3.1), parameters aside.
pub(super) fn is_json(content_type: &str) -> bool {
    content_type.parse::<mime::Mime>().is_ok_and(|m| {
        (m.type_() == mime::APPLICATION && m.subtype() == mime::JSON)
            || m.suffix() == Some(mime::JSON)
    })
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether an error of type `E` is somewhere in `error`'s chain of causes.
fn caused_by<E: std::error::Error + 'static>(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<E>() {
            return true;
        }
        source = e.source();
    }
    false
}
