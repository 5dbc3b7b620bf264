//! The tower layers of the router (assembled in [`super::router`]): the edge (check the head's
//! size, say `Connection: close` when an HTTP/1 body is left unread, put `Retry-After` on every
//! 503, 429 and 507, count the answer), identify the caller, and name the request's span.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse as _, Response};
use hyper::body::Body as HttpBody;

use super::auth::{
    API_KEY_HEADER, AuthError, AuthFailures, Authenticator, DEFAULT_TENANT, PUBLIC_TENANT,
    RateLimits, Tenant,
};
use super::body::{AtEnd, carrying};
use super::error::ApiError;
use crate::metrics::HTTP_REQUESTS;

/// The header that carries each request's id (set when the client sent none, echoed back).
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What [`edge`] needs: the head caps, the `Retry-After` seconds, and the route names.
pub(super) struct Edge {
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub retry_after_secs: u64,
    pub route_names: RouteNames,
}

/// The checks every request passes and every answer gets, in one layer (an axum `from_fn` layer
/// clones and boxes the service below it for each request, so four would cost four times that):
/// - a head with more headers, or larger ones, than configured is refused (`431` problem+json);
///   hyper cuts off heads at twice these caps before any of this runs;
/// - every `503`, `429` and `507` carries `Retry-After`: the client is expected to retry, so
///   say when;
/// - an HTTP/1 answer given before the request's body was read to its end (a `413` on its
///   `Content-Length`, a `401`, a `408`, a `431`) says `Connection: close`: the server will not
///   read the rest, so it closes the connection (RFC 9112 section 9.6). (A request with both
///   `Transfer-Encoding` and `Content-Length` never gets here with both: hyper reads it by
///   `Transfer-Encoding` alone and closes the connection after answering, as RFC 9112 section
///   6.3 requires.) HTTP/2 frames its messages itself and forbids `Connection`: untouched;
/// - every answer is counted by route and status. Configured routes are labelled with their
///   names, the gateway's own endpoints with their path patterns; the label set stays bounded.
pub(super) async fn edge(
    State(edge): State<Arc<Edge>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => edge
            .route_names
            .get(path.as_str())
            .and_then(|methods| methods.iter().find(|(m, _)| m == request.method()))
            .map_or_else(|| path.as_str().to_owned(), |(_, name)| name.clone()),
        None => "unmatched".to_owned(),
    };
    let (request, finished) = if request.version() > Version::HTTP_11 {
        (request, None)
    } else {
        let (parts, body) = request.into_parts();
        let finished = Arc::new(AtomicBool::new(body.is_end_stream()));
        let body = carrying(body, Finished(finished.clone()));
        (Request::from_parts(parts, body), Some(finished))
    };
    let headers = request.headers();
    let head_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let mut response = if headers.len() > edge.max_headers || head_bytes > edge.max_header_bytes {
        drop(request);
        ApiError::HeadersTooLarge {
            max_headers: edge.max_headers,
            max_bytes: edge.max_header_bytes,
        }
        .into_response()
    } else {
        let mut response = next.run(request).await;
        let retry = [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::INSUFFICIENT_STORAGE,
        ];
        if retry.contains(&response.status())
            && !response.headers().contains_key(header::RETRY_AFTER)
        {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(edge.retry_after_secs),
            );
        }
        response
    };
    if finished.is_some_and(|finished| !finished.load(Ordering::Acquire)) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = response.status().as_u16();
    // The access line: inside the request's span, so it carries request, operation and trace ids.
    tracing::debug!(%route, status, "Answered.");
    metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
    response
}

/// Read to its end: what [`edge`] carries along a request body.
struct Finished(Arc<AtomicBool>);

impl AtEnd for Finished {
    fn ended(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What [`identify`] needs.
pub(super) struct Access {
    pub auth: Option<Arc<Authenticator>>,
    pub rate_limits: RateLimits,
    pub auth_failures: AuthFailures,
    /// Routes callable without credentials, by (method, path pattern).
    pub public: HashSet<(Method, String)>,
}

impl Access {
    /// The caller's tenant from its credentials: `401` when they are wrong, or missing where
    /// needed (`anonymous_ok`: the request may be made without them); `429` while its address has
    /// failed too often (see [`AuthFailures`]).
    fn tenant_of(&self, request: &Request, anonymous_ok: bool) -> Result<String, ApiError> {
        let Some(auth) = &self.auth else {
            return Ok(DEFAULT_TENANT.to_owned());
        };
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let presents = request.headers().contains_key(API_KEY_HEADER)
            || request.headers().contains_key(header::AUTHORIZATION);
        if let Some(ip) = peer.filter(|_| presents) {
            self.auth_failures.check(ip).map_err(rate_limited)?;
        }
        match auth.tenant(request.headers()) {
            Ok(Some(tenant)) => Ok(tenant),
            Ok(None) if anonymous_ok => Ok(PUBLIC_TENANT.to_owned()),
            Ok(None) => Err(AuthError::Missing.into()),
            Err(refused) => {
                tracing::info!(reason = refused.reason(), peer = ?peer, "Credentials refused.");
                if let Some(ip) = peer.filter(|_| refused.is_failed_attempt()) {
                    self.auth_failures.record(ip).map_err(rate_limited)?;
                }
                Err(refused.into())
            }
        }
    }

    /// Whether a request to this path pattern with this method may come without credentials:
    /// public routes, and reads of operations (of the `public` tenant) when some route is public.
    fn anonymous_ok(&self, method: &Method, pattern: &str) -> bool {
        self.public.iter().any(|(m, p)| m == method && p == pattern)
            || (pattern.starts_with("/operations/") && !self.public.is_empty())
    }

    /// Whether any method of this path pattern may be called without credentials.
    fn any_anonymous(&self, pattern: &str) -> bool {
        self.public.iter().any(|(_, p)| p == pattern)
            || (pattern.starts_with("/operations/") && !self.public.is_empty())
    }
}

fn rate_limited(wait: Duration) -> ApiError {
    ApiError::RateLimited {
        retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
    }
}

/// Knows the caller before anything else happens: its tenant from its credentials (401 if they
/// are wrong or missing where needed), then its rate (429 with `Retry-After` when over).
pub(super) async fn identify(
    State(access): State<Arc<Access>>,
    mut request: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let pattern = request.extensions().get::<MatchedPath>().cloned();
    let pattern = pattern.as_ref().map_or("", MatchedPath::as_str);
    let anonymous_ok = access.anonymous_ok(request.method(), pattern);
    let tenant = access.tenant_of(&request, anonymous_ok)?;
    access.rate_limits.check(&tenant).map_err(rate_limited)?;
    tracing::Span::current().record("tenant", tenant.as_str());
    request.extensions_mut().insert(Tenant(tenant.into()));
    Ok(next.run(request).await)
}

/// The answer to a known path with a method it does not have: `405`, but only to a caller who
/// may use the path at all, so that an anonymous caller learns nothing about a guarded route's
/// methods (`401` first).
pub(super) fn method_not_allowed(
    access: Arc<Access>,
) -> impl Fn(Request) -> std::future::Ready<Result<Response, ApiError>> + Clone {
    move |request: Request| {
        let pattern = request
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| request.uri().path().to_owned());
        let answer = access
            .tenant_of(&request, access.any_anonymous(&pattern))
            .and(Err(ApiError::MethodNotAllowed));
        std::future::ready(answer)
    }
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

/// Route names by path pattern, then method.
pub(super) type RouteNames = HashMap<String, Vec<(Method, String)>>;
