//! The tower layers of the router (assembled in [`super::router`]): say `Connection: close` when
//! an HTTP/1 body is left unread, identify the caller, check
//! the head's size, name the request's span, count the answer, and put `Retry-After` on every 503
//! and 429.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::Response;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::auth::{AuthError, Authenticator, DEFAULT_TENANT, PUBLIC_TENANT, RateLimits, Tenant};
use super::error::ApiError;
use super::state::AppState;
use crate::metrics::HTTP_REQUESTS;

/// The header that carries each request's id (set when the client sent none, echoed back).
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Refuses requests with more headers, or larger ones, than configured (431 problem+json). hyper
/// cuts off heads at twice these caps before any of this runs.
pub(super) async fn check_head(
    State(state): State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers.len() > state.limits.max_headers || bytes > state.limits.max_header_bytes {
        return Err(ApiError::HeadersTooLarge {
            max_headers: state.limits.max_headers,
            max_bytes: state.limits.max_header_bytes,
        });
    }
    Ok(next.run(request).await)
}

/// An HTTP/1 answer given before the request's body was read to its end (a `413` on its
/// `Content-Length`, a `401`, a `408`) says `Connection: close`: the server will not read the rest,
/// so it closes the connection (RFC 9112 section 9.6). (A request with both `Transfer-Encoding`
/// and `Content-Length` never gets here with both: hyper reads it by `Transfer-Encoding` alone and
/// closes the connection after answering, as RFC 9112 section 6.3 requires.)
///
/// HTTP/2 frames its messages itself and forbids `Connection`: untouched.
pub(super) async fn frame_message(request: Request, next: axum::middleware::Next) -> Response {
    if request.version() > Version::HTTP_11 {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let finished = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = Body::new(ObservedBody {
        body,
        finished: finished.clone(),
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !finished.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end.
struct ObservedBody {
    body: Body,
    finished: Arc<AtomicBool>,
}

impl HttpBody for ObservedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.finished.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Every 503 and 429 carries `Retry-After`: the client is expected to retry, so say when.
pub(super) async fn add_retry_after(
    State(state): State<AppState>,
    mut response: Response,
) -> Response {
    let retry = [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ];
    if retry.contains(&response.status()) && !response.headers().contains_key(header::RETRY_AFTER) {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(state.limits.retry_after_secs),
        );
    }
    response
}

/// What [`identify`] needs.
pub(super) struct Access {
    pub auth: Option<Arc<Authenticator>>,
    pub rate_limits: RateLimits,
    /// Routes callable without credentials, by (method, path pattern).
    pub public: HashSet<(Method, String)>,
}

/// Knows the caller before anything else happens: its tenant from its credentials (401 if they
/// are wrong or missing where needed), then its rate (429 with `Retry-After` when over).
/// Anonymous callers may use public routes and read operations (of the `public` tenant) when
/// some route is public.
pub(super) async fn identify(
    State(access): State<Arc<Access>>,
    mut request: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let tenant = match &access.auth {
        None => DEFAULT_TENANT.to_owned(),
        Some(auth) => match auth.tenant(request.headers())? {
            Some(tenant) => tenant,
            None => {
                let pattern = request
                    .extensions()
                    .get::<MatchedPath>()
                    .map(|p| p.as_str())
                    .unwrap_or_default();
                let public_route = access
                    .public
                    .contains(&(request.method().clone(), pattern.to_owned()));
                let public_read = pattern.starts_with("/operations/") && !access.public.is_empty();
                if !(public_route || public_read) {
                    return Err(AuthError::Missing.into());
                }
                PUBLIC_TENANT.to_owned()
            }
        },
    };
    access
        .rate_limits
        .check(&tenant)
        .map_err(|wait| ApiError::RateLimited {
            retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        })?;
    tracing::Span::current().record("tenant", tenant.as_str());
    request.extensions_mut().insert(Tenant(tenant.into()));
    Ok(next.run(request).await)
}

/// The span of one HTTP request: it continues the caller's trace (W3C `traceparent`), and its
/// fields are what every log line of the request carries.
pub(super) fn request_span(request: &axum::http::Request<Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id,
        operation_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    handlers::trace::continue_trace(&span, request.headers());
    // The span's own trace when OpenTelemetry tracks it, else the caller's.
    let trace_id = handlers::trace::trace_id(&span).or_else(|| {
        handlers::trace::remote_span(request.headers()).map(|s| s.trace_id().to_string())
    });
    if let Some(trace_id) = trace_id {
        span.record("trace_id", trace_id);
    }
    span
}

/// Counts every answer by route and status. Configured routes are labelled with their names,
/// the gateway's own endpoints with their path patterns; the label set stays bounded.
pub(super) async fn count_request(
    State(names): State<Arc<RouteNames>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| {
            names
                .get(&(request.method().clone(), path.as_str().to_owned()))
                .cloned()
                .unwrap_or_else(|| path.as_str().to_owned())
        })
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    // The access line: inside the request's span, so it carries request, operation and trace ids.
    tracing::debug!(%route, status, "Answered.");
    metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
    response
}

/// Route names by (method, path pattern).
pub(super) type RouteNames = HashMap<(Method, String), String>;
