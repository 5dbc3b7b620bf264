//! The HTTP edge: the router assembled from the configured routes, the handlers of the gateway's
//! own endpoints, and the tower layers, all in one place.
//!
//! Handlers parse and validate, call `accept` or `operations`, and shape the answer. They never
//! touch async-nats; every error leaves them as an [`ApiError`] and becomes problem+json there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, get};
use handlers::contract::ResultRecord;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyDeadlineLayer;
use tower_http::trace::TraceLayer;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::accept::{Accepted, Submission, accept};
use crate::auth::{AuthError, Authenticator, PUBLIC_TENANT, RateLimits};
use crate::config::{ConfigError, RouteConfig};
use crate::error::{ApiError, Problem};
use crate::idempotency::{self, KeyError};
use crate::metrics::{ACCEPT_SECONDS, HTTP_REQUESTS, IDEMPOTENT_REPLAYS};
use crate::operations::{
    Cancellation, DEFAULT_TENANT, Links, Operation, OperationView, Status, WakeOn, cancel, lookup,
    lookup_when_changed, operation_path,
};
use crate::prefer;
use crate::retry_after::RetryAfter;
use crate::store::Store;
use crate::watch::Watch;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    /// Seconds in `Retry-After` on 503 and 429 answers.
    pub retry_after_secs: u64,
    /// `Retry-After` of pending operations, per route.
    pub retry_after: RetryAfter,
    /// Permits for requests doing JetStream work at once; none left means `503 overloaded`.
    /// Waiting (for a result, in a long poll or an event stream) holds no permit.
    pub in_flight: Arc<Semaphore>,
    /// Longest wait a client may ask for (`Prefer: wait`, `?wait=`).
    pub max_wait: Duration,
    /// Permits for open event streams; none left means `429` with `Retry-After`.
    pub event_streams: Arc<Semaphore>,
    /// Wakes waiters when results land.
    pub watch: Watch,
    /// URL prefixes a client's `Callback-Url` may start with.
    pub callback_allow: Arc<[String]>,
    /// Whether callbacks may reach loopback, private and other non-public addresses.
    pub callback_allow_private: bool,
    /// Credentials checker; `None`: every caller is the `default` tenant.
    pub auth: Option<Arc<Authenticator>>,
    /// Per-tenant request rates.
    pub rate_limits: RateLimits,
    /// Time a client has to send a whole request body.
    pub body_read_timeout: Duration,
    /// Headers a request may have, and bytes its headers may take.
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Request headers forwarded to workers.
    pub forward_headers: Arc<[HeaderName]>,
    /// Reply headers replayed from results.
    pub result_headers: Arc<[HeaderName]>,
    #[cfg(feature = "fault-injection")]
    pub abort_after_publish: bool,
}

const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the router: the configured routes, `/operations/…`, `/livez`, `/readyz`, and the layers.
pub fn router(state: AppState, routes: &[RouteConfig]) -> Result<Router, ConfigError> {
    let document = Bytes::from(crate::openapi::to_json(&crate::openapi::document(
        routes,
        state.auth.is_some(),
    )));
    let openapi_document = move || {
        let document = document.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], document) }
    };
    let mut by_path: BTreeMap<&str, MethodRouter<AppState>> = BTreeMap::new();
    let route_names: RouteNames = routes
        .iter()
        .map(|r| ((r.http_method(), r.path.clone()), r.name.clone()))
        .collect();
    for route in routes {
        let filter = MethodFilter::try_from(route.http_method())
            .map_err(|e| ConfigError::Invalid(format!("route {:?}: {e}", route.name)))?;
        let config = Arc::new(route.clone());
        let handler = move |State(state): State<AppState>, request: Request| {
            let config = config.clone();
            async move {
                let started = std::time::Instant::now();
                let name = config.name.clone();
                let answer = submit(state, config, request).await;
                metrics::histogram!(ACCEPT_SECONDS, "route" => name)
                    .record(started.elapsed().as_secs_f64());
                answer
            }
        };
        let methods = by_path.remove(route.path.as_str()).unwrap_or_default();
        by_path.insert(&route.path, methods.on(filter, handler));
    }
    let mut guarded = Router::new()
        .route(
            "/operations/{id}",
            get(get_operation).delete(cancel_operation),
        )
        .route("/operations/{id}/result", get(get_result))
        .route("/operations/{id}/events", get(operation_events));
    for (path, methods) in by_path {
        // axum rejects path patterns that conflict (e.g. `/a/{x}` beside `/a/{y}`) by panicking;
        // that is a configuration error, reported as such.
        guarded = std::panic::catch_unwind(AssertUnwindSafe(|| guarded.route(path, methods)))
            .map_err(|_| {
                ConfigError::Invalid(format!("path {path:?} conflicts with another route"))
            })?;
    }
    let access = Arc::new(Access {
        auth: state.auth.clone(),
        rate_limits: state.rate_limits.clone(),
        public: routes
            .iter()
            .filter(|r| r.public)
            .map(|r| (r.http_method(), r.path.clone()))
            .collect(),
    });
    // Health and the document are open to all; everything else knows its caller first.
    let app = guarded
        .route_layer(axum::middleware::from_fn_with_state(access, identify))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_document));
    Ok(app
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            add_retry_after,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_head,
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(RequestBodyDeadlineLayer::new(state.body_read_timeout))
                .map_request(|request: axum::http::Request<_>| request.map(Body::new)),
        )
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(route_names),
            count_request,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        // 5xx answers are expected operational states here (NATS down, outcome unknown, not
        // ready) and are logged, once, where they arise; ERROR is kept for data loss.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state))
}

/// Refuses requests with more headers, or larger ones, than configured (431 problem+json). hyper
/// cuts off heads at twice these caps before any of this runs.
async fn check_head(
    State(state): State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers.len() > state.max_headers || bytes > state.max_header_bytes {
        return Err(ApiError::HeadersTooLarge {
            max_headers: state.max_headers,
            max_bytes: state.max_header_bytes,
        });
    }
    Ok(next.run(request).await)
}

/// Every 503 and 429 carries `Retry-After`: the client is expected to retry, so say when.
async fn add_retry_after(State(state): State<AppState>, mut response: Response) -> Response {
    let retry = [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ];
    if retry.contains(&response.status()) && !response.headers().contains_key(header::RETRY_AFTER) {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(state.retry_after_secs),
        );
    }
    response
}

/// The body of a `202 Accepted` answer to a submission.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Accepted)]
pub(crate) struct AcceptedBody<'a> {
    id: &'a str,
    status: Status,
    idempotency_key: &'a str,
    links: Links,
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

/// The caller's tenant, set by [`identify`] on every route but health and the document.
#[derive(Debug, Clone)]
pub struct Tenant(pub Arc<str>);

/// What [`identify`] needs.
struct Access {
    auth: Option<Arc<Authenticator>>,
    rate_limits: RateLimits,
    /// Routes callable without credentials, by (method, path pattern).
    public: HashSet<(Method, String)>,
}

/// Knows the caller before anything else happens: its tenant from its credentials (401 if they
/// are wrong or missing where needed), then its rate (429 with `Retry-After` when over).
/// Anonymous callers may use public routes and read operations (of the `public` tenant) when
/// some route is public.
async fn identify(
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

/// `POST /<route>` (or whatever the route's method is): validate, accept, answer 202.
async fn submit(
    state: AppState,
    route: Arc<RouteConfig>,
    request: Request,
) -> Result<Response, ApiError> {
    let permit = admit(&state)?;
    let limit = route.max_body.0;
    let (parts, body) = request.into_parts();
    let Tenant(tenant) = parts
        .extensions
        .get::<Tenant>()
        .cloned()
        .expect("identify runs before every route");
    let prefs = prefer::parse(&parts.headers);
    if content_length(&parts.headers).is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let idempotency_key = match idempotency::parse_key(&parts.headers)? {
        Some(key) => key,
        None if route.require_idempotency_key => return Err(KeyError::Missing.into()),
        None => idempotency::assign_key(),
    };
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if caused_by::<http_body_util::LengthLimitError>(&e) {
            ApiError::PayloadTooLarge { limit }
        } else if caused_by::<tower_http::timeout::TimeoutError>(&e) {
            ApiError::BodyTimeout
        } else {
            ApiError::BadBody(e.to_string())
        }
    })?;
    let text_header = |name: &HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let callback_url = match parts.headers.get("callback-url") {
        Some(value) => Some(allowed_callback(&state, value).await?),
        None => route.callback_url.clone(),
    };
    // The worker continues this request's span: the trace crosses the async hop.
    let trace = handlers::trace::outgoing(&tracing::Span::current(), &parts.headers);
    let forwarded = state
        .forward_headers
        .iter()
        .filter(|name| !handlers::trace::TRACE_HEADERS.contains(&name.as_str()))
        .flat_map(|name| {
            parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(|v| (name.as_str().to_owned(), v.to_owned()))
        })
        .chain(trace)
        .collect();
    let accepted = accept(
        &state.store,
        Submission {
            route: &route,
            tenant: &tenant,
            idempotency_key,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            content_type: text_header(&header::CONTENT_TYPE),
            forwarded,
            callback_url,
            body,
        },
    )
    .await?;
    #[cfg(feature = "fault-injection")]
    if state.abort_after_publish && matches!(accepted, Accepted::New(_)) {
        tracing::warn!("Fault injection: aborting after the JetStream ack, before answering.");
        std::process::abort();
    }
    drop(permit);
    // `Prefer: wait=N`, or the route's own wait: answer with the result if it comes in time.
    let wait = prefs.wait.or(route.wait).map(|w| w.min(state.max_wait));
    let (operation, replayed) = match accepted {
        Accepted::New(op) => (op, false),
        Accepted::Replayed(op) => {
            metrics::counter!(IDEMPOTENT_REPLAYS, "route" => route.name.clone()).increment(1);
            (op, true)
        }
    };
    note_operation(&operation);
    let operation = match wait {
        Some(wait) if !wait.is_zero() && !operation.status().is_terminal() => {
            // The request is accepted whatever the wait finds: if reading it back fails, the
            // answer is still the 202 of the operation in hand, never an error a client would
            // retry with a new key.
            wait_for(&state, &tenant, &operation.id, Some(wait), WakeOn::Terminal)
                .await
                .unwrap_or(operation)
        }
        _ => operation,
    };
    let mut response = match (&operation.result, wait) {
        (Some(result), Some(wait)) => {
            let mut r = result_response(&state, &result.record);
            r.headers_mut().insert(
                header::LOCATION,
                header_value(&operation_path(&operation.id)),
            );
            r.headers_mut().insert(
                PREFERENCE_APPLIED,
                header_value(&format!("wait={}", wait.as_secs())),
            );
            r
        }
        _ => {
            let mut r = accepted_response(&state, &operation);
            if prefs.respond_async {
                r.headers_mut().insert(
                    PREFERENCE_APPLIED,
                    HeaderValue::from_static("respond-async"),
                );
            }
            r
        }
    };
    let h = response.headers_mut();
    h.insert(
        HeaderName::from_static(idempotency::HEADER),
        header_value(&idempotency::format_key(&operation.idempotency_key)),
    );
    if replayed {
        h.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// A client's `Callback-Url`, if it is an http(s) URL that starts with an allowed prefix.
async fn allowed_callback(state: &AppState, value: &HeaderValue) -> Result<String, ApiError> {
    let text = value
        .to_str()
        .map_err(|_| ApiError::CallbackNotAllowed("not text".to_owned()))?;
    let url = reqwest::Url::parse(text)
        .map_err(|e| ApiError::CallbackNotAllowed(format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ApiError::CallbackNotAllowed(
            "only http and https".to_owned(),
        ));
    }
    if !state
        .callback_allow
        .iter()
        .any(|prefix| text.starts_with(prefix.as_str()))
    {
        return Err(ApiError::CallbackNotAllowed(
            "it matches no allowed prefix (GATEWAY_CALLBACK_ALLOW)".to_owned(),
        ));
    }
    crate::webhooks::check_destination(&url, state.callback_allow_private)
        .await
        .map_err(ApiError::CallbackNotAllowed)?;
    Ok(text.to_owned())
}

/// A permit to do JetStream work now, or `503 overloaded` at once: never a queue. A draining
/// process takes no new work at all.
fn admit(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    if state.watch.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    state
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)
}

/// Reads an operation, then waits (holding no permit) for what `wake_on` says, or until `wait`
/// passes.
async fn wait_for(
    state: &AppState,
    tenant: &str,
    id: &str,
    wait: Option<Duration>,
    wake_on: WakeOn,
) -> Result<Operation, ApiError> {
    let operation = match wait {
        Some(wait) if !wait.is_zero() => {
            let until = tokio::time::Instant::now() + wait.min(state.max_wait);
            let (store, watch) = (&state.store, &state.watch);
            lookup_when_changed(store, watch, tenant, id, until, wake_on).await?
        }
        _ => {
            let _permit = admit(state)?;
            lookup(&state.store, tenant, id).await?
        }
    };
    let operation = operation.ok_or(ApiError::OperationNotFound)?;
    note_operation(&operation);
    Ok(operation)
}

/// Names the operation in the request's span (so its logs carry `operation_id`) and links the
/// span to the one that accepted the request: a status read belongs to the original trace.
fn note_operation(operation: &Operation) {
    let span = tracing::Span::current();
    span.record("operation_id", operation.id.as_str());
    if let Some(accepted_in) = &operation.trace {
        span.add_link(accepted_in.clone());
    }
}

/// The span of one HTTP request: it continues the caller's trace (W3C `traceparent`), and its
/// fields are what every log line of the request carries.
fn request_span(request: &axum::http::Request<Body>) -> tracing::Span {
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
async fn count_request(
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
type RouteNames = HashMap<(Method, String), String>;

fn accepted_response(state: &AppState, operation: &Operation) -> Response {
    let body = AcceptedBody {
        id: &operation.id,
        status: operation.status(),
        idempotency_key: &operation.idempotency_key,
        links: Links::of(&operation.id),
    };
    still_running(state, operation, Json(body))
}

/// A 202 that points at the operation: `Location`, `Retry-After`, never cached.
fn still_running(state: &AppState, operation: &Operation, body: impl IntoResponse) -> Response {
    let mut response = (StatusCode::ACCEPTED, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::LOCATION,
        header_value(&operation_path(&operation.id)),
    );
    h.insert(
        header::RETRY_AFTER,
        HeaderValue::from(state.retry_after.seconds(&operation.route)),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("gateway-made header values are visible ASCII")
}

fn path_id(id: Result<Path<OperationId>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(path)| path.id)
        .map_err(|_| ApiError::OperationNotFound)
}

/// `?wait=N` on a long poll.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    /// Seconds to wait for a result before answering (capped by the gateway's maximum).
    #[param(minimum = 0, maximum = 3600)]
    wait: Option<u64>,
}

/// The largest `?wait=` a client may write; the gateway's own cap (`GATEWAY_MAX_WAIT`) applies
/// below it.
const MAX_WAIT_QUERY: u64 = 3600;

/// The `{id}` of `/operations/{id}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct OperationId {
    /// The operation's id, as `Location` gave it.
    id: String,
}

/// The `Prefer` request header (RFC 7240) as status reads use it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(
    dead_code,
    reason = "describes the header to OpenAPI; prefer::parse reads it"
)]
pub(crate) struct PreferHeader {
    /// `wait=N`: answer as soon as there is news, or after N seconds.
    #[param(rename = "Prefer")]
    prefer: Option<String>,
}

/// `GET /operations/{id}`: the status resource. With `Prefer: wait=N`, answers as soon as the
/// operation is terminal, or after N seconds.
#[utoipa::path(
    get,
    path = "/operations/{id}",
    tag = "operations",
    summary = "Status of an operation",
    description = "The operation's status resource, from any gateway replica. With `Prefer: wait=N` the answer comes as soon as the operation is terminal (or has new progress), or after N seconds.",
    params(OperationId, PreferHeader),
    responses(
        (status = 200, description = "The operation.", body = OperationView<'static>,
            headers(
                ("Retry-After" = u64, description = "While pending: seconds until a status read is worth repeating."),
                ("Preference-Applied" = String, description = "`wait=N` when `Prefer: wait` was honoured."),
            )),
        (status = 404, description = "No such operation (or not yours).", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_operation(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    id: Result<Path<OperationId>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let wait = prefer::parse(&headers).wait;
    let wake_on = WakeOn::TerminalOrProgressAfter(None);
    let operation = wait_for(&state, &tenant, &path_id(id)?, wait, wake_on).await?;
    let mut response = Json(OperationView::of(&operation)).into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !operation.status().is_terminal() {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(state.retry_after.seconds(&operation.route)),
        );
    }
    if let Some(wait) = wait {
        h.insert(
            PREFERENCE_APPLIED,
            header_value(&format!("wait={}", wait.min(state.max_wait).as_secs())),
        );
    }
    Ok(response)
}

/// `GET /operations/{id}/result`: the stored reply replayed, or 202 while there is none. With
/// `?wait=N` (or `Prefer: wait=N`) a long poll: answers as soon as there is a result, or after N.
#[utoipa::path(
    get,
    path = "/operations/{id}/result",
    tag = "operations",
    summary = "Result of an operation",
    description = "The worker's reply, replayed byte for byte (status, content type, allow-listed headers, body), or `202` with the status resource while there is none. An expired operation answers `504`, a cancelled one `410` (problem+json). With `?wait=N` or `Prefer: wait=N`, a long poll.",
    params(OperationId, WaitQuery, PreferHeader),
    responses(
        (status = 202, description = "No result yet.", body = OperationView<'static>,
            headers(
                ("Location" = String, description = "The status resource."),
                ("Retry-After" = u64, description = "Seconds until a read is worth repeating."),
            )),
        (status = "2XX", description = "The worker's reply (any content type).", content_type = "*/*"),
        (status = 404, description = "No such operation (or not yours).", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "The worker's reply, when it was a client error; or `400` for a bad query; or `410` (problem+json) when the operation was cancelled.", content_type = "*/*"),
        (status = "5XX", description = "The worker's reply, when it was a server error; or `504` (problem+json) when the operation expired.", content_type = "*/*"),
    )
)]
pub(crate) async fn get_result(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    id: Result<Path<OperationId>, PathRejection>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadQuery(e.body_text()))?;
    if query.wait.is_some_and(|w| w > MAX_WAIT_QUERY) {
        return Err(ApiError::BadQuery(format!(
            "wait is at most {MAX_WAIT_QUERY} seconds"
        )));
    }
    let wait = query
        .wait
        .map(Duration::from_secs)
        .or(prefer::parse(&headers).wait);
    let operation = wait_for(&state, &tenant, &path_id(id)?, wait, WakeOn::Terminal).await?;
    match &operation.result {
        Some(result) => Ok(result_response(&state, &result.record)),
        None => {
            let body = Json(OperationView::of(&operation));
            Ok(still_running(&state, &operation, body))
        }
    }
}

/// A stored terminal record replayed as an HTTP response: its status, content type, body, and
/// the headers on the result allow-list.
fn result_response(state: &AppState, record: &ResultRecord) -> Response {
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

/// `DELETE /operations/{id}`: cancels an operation that has no result yet (202), or reports the
/// outcome that won first (409). Repeating it is harmless.
#[utoipa::path(
    delete,
    path = "/operations/{id}",
    tag = "operations",
    summary = "Cancel an operation",
    description = "Records `cancelled` as the operation's outcome unless a result is already stored; the first outcome written wins, whoever writes it. Repeating it is harmless.",
    params(OperationId),
    responses(
        (status = 202, description = "Cancelled (now or before).", body = OperationView<'static>,
            headers(("Location" = String, description = "The status resource."))),
        (status = 404, description = "No such operation (or not yours).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished; `operation` shows how.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cancel_operation(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    id: Result<Path<OperationId>, PathRejection>,
) -> Result<Response, ApiError> {
    let _permit = admit(&state)?;
    let cancellation = cancel(&state.store, &tenant, &path_id(id)?)
        .await?
        .ok_or(ApiError::OperationNotFound)?;
    let (Cancellation::Recorded(operation) | Cancellation::TooLate(operation)) = &cancellation;
    note_operation(operation);
    match cancellation {
        Cancellation::Recorded(operation) => {
            let mut response =
                (StatusCode::ACCEPTED, Json(OperationView::of(&operation))).into_response();
            response.headers_mut().insert(
                header::LOCATION,
                header_value(&operation_path(&operation.id)),
            );
            Ok(response)
        }
        Cancellation::TooLate(operation) => Err(ApiError::AlreadyFinished {
            operation: serde_json::to_value(OperationView::of(&operation))
                .expect("an operation body serializes"),
        }),
    }
}

/// `GET /operations/{id}/events`: server-sent events of the operation's state changes:
/// `accepted` (id `accepted`), `progress` each time a worker reports it (id `progress-<seq>`), then
/// the terminal state (id `terminal`), and the stream ends. A client reconnecting with
/// `Last-Event-ID` gets only what it has not seen (progress: only reports newer than its last).
#[utoipa::path(
    get,
    path = "/operations/{id}/events",
    tag = "operations",
    summary = "Server-sent events of an operation",
    description = "`accepted`, then `progress` events as a worker reports them, then the terminal event (`succeeded`, `failed`, `expired` or `cancelled`), each with the operation as JSON data; then the stream ends. Reconnect with `Last-Event-ID` to get only what was not seen.",
    params(OperationId,
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received (`accepted`, `progress-<n>`, `terminal`).")),
    responses(
        (status = 200, description = "An event stream; each event's data is the operation.", content_type = "text/event-stream", body = OperationEvent),
        (status = 204, description = "`Last-Event-ID: terminal`: nothing more will come."),
        (status = 404, description = "No such operation (or not yours).", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many event streams open; retry after `Retry-After`.", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub(crate) async fn operation_events(
    State(state): State<AppState>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    id: Result<Path<OperationId>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let stream_permit = state
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyStreams)?;
    let id = path_id(id)?;
    let first = wait_for(&state, &tenant, &id, None, WakeOn::Terminal).await?;
    let seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if seen == "terminal" {
        // Nothing more will ever come; 204 tells EventSource not to reconnect.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let start = match seen {
        "accepted" => EventStep::Watching { after: 0 },
        other => match other.strip_prefix("progress-").and_then(|n| n.parse().ok()) {
            Some(after) => EventStep::Watching { after },
            None => EventStep::Accepted(Box::new(first.clone())),
        },
    };
    let deadline = first.deadline;
    let events = futures::stream::unfold(
        (start, state, (tenant, id), stream_permit),
        move |(step, state, (tenant, id), permit)| async move {
            let (event, next) = match step {
                EventStep::Done => return None,
                EventStep::Accepted(op) => (
                    operation_event("accepted".into(), "accepted", &op),
                    EventStep::Watching { after: 0 },
                ),
                EventStep::Watching { after } => {
                    // The deadline bounds the wait: past it the operation turns `expired`.
                    let left = (deadline - time::OffsetDateTime::now_utc())
                        .try_into()
                        .unwrap_or(Duration::ZERO);
                    let until = tokio::time::Instant::now() + left + Duration::from_secs(1);
                    let wake_on = WakeOn::TerminalOrProgressAfter(Some(after));
                    let (store, watch) = (&state.store, &state.watch);
                    let op = lookup_when_changed(store, watch, &tenant, &id, until, wake_on)
                        .await
                        .ok()
                        .flatten()?;
                    match (&op.progress, op.status().is_terminal()) {
                        (_, true) => (
                            operation_event("terminal".into(), op.status().name(), &op),
                            EventStep::Done,
                        ),
                        (Some(p), false) if p.seq > after => (
                            operation_event(format!("progress-{}", p.seq), "progress", &op),
                            EventStep::Watching { after: p.seq },
                        ),
                        _ => return None,
                    }
                }
            };
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (next, state, (tenant, id), permit),
            ))
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

enum EventStep {
    Accepted(Box<Operation>),
    /// Waiting for the end, or for progress newer than `after`.
    Watching {
        after: u64,
    },
    Done,
}

/// One server-sent event of an operation, as the OpenAPI document describes it.
#[derive(utoipa::ToSchema)]
pub(crate) struct OperationEvent {
    /// `accepted`, `progress-<n>` or `terminal`: what `Last-Event-ID` resumes after.
    id: String,
    /// `accepted`, `progress`, or the terminal status.
    #[schema(value_type = String, pattern = "^(accepted|progress|succeeded|failed|expired|cancelled)$")]
    event: &'static str,
    /// The operation (the status resource's body), as JSON.
    #[schema(content_media_type = "application/json")]
    data: String,
}

impl From<OperationEvent> for Event {
    fn from(e: OperationEvent) -> Self {
        Event::default().id(e.id).event(e.event).data(e.data)
    }
}

fn operation_event(id: String, event: &'static str, operation: &Operation) -> Event {
    let data =
        serde_json::to_string(&OperationView::of(operation)).expect("an operation body serializes");
    OperationEvent { id, event, data }.into()
}

/// Liveness: the process answers. Never checks NATS, so a NATS outage cannot restart the gateway.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "health",
    summary = "Liveness",
    responses((status = 200, description = "The process answers.", body = Object)),
)]
pub(crate) async fn livez() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: JetStream reachable, both streams in place, and the results watch running (so
/// waiters are woken from the first request on).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    summary = "Readiness",
    responses(
        (status = 200, description = "JetStream reachable, streams in place.", body = Object),
        (status = 503, description = "Not ready (JetStream unreachable, streams missing, or shutting down).", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    ),
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if state.watch.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    // Probes repeat every few seconds: not being ready is an answer, not an event to log.
    state
        .store
        .check_ready()
        .await
        .map_err(|_| ApiError::NotReady)?;
    if !state.watch.is_watching_results() {
        return Err(ApiError::NotReady);
    }
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

#[cfg(test)]
mod tests {
    //! Router tests without NATS: everything a request can get wrong is answered before JetStream
    //! is touched, and a gateway that has no JetStream yet answers 503, never 202.

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::config::{ByteSize, Settings};

    fn route(name: &str, method: &str, path: &str, require_key: bool) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            method: method.into(),
            path: path.into(),
            require_idempotency_key: require_key,
            public: false,
            retention: std::time::Duration::from_secs(60),
            timeout: std::time::Duration::from_secs(5),
            max_body: ByteSize(16),
            wait: None,
            callback_url: None,
            consumer: None,
        }
    }

    /// A router whose store points at a port where nothing listens.
    async fn app(routes: &[RouteConfig]) -> Result<Router, ConfigError> {
        app_with_limit(routes, 8).await
    }

    async fn app_with_limit(
        routes: &[RouteConfig],
        max_in_flight: usize,
    ) -> Result<Router, ConfigError> {
        app_with_access(routes, max_in_flight, None, RateLimits::new(0, 0)).await
    }

    async fn app_with_access(
        routes: &[RouteConfig],
        max_in_flight: usize,
        auth: Option<Authenticator>,
        rate_limits: RateLimits,
    ) -> Result<Router, ConfigError> {
        use clap::Parser;
        #[derive(Parser)]
        struct Args {
            #[command(flatten)]
            settings: Settings,
        }
        let settings = Args::parse_from([
            "gateway",
            "--config",
            "unused.toml",
            "--nats-url",
            "nats://127.0.0.1:1",
        ])
        .settings;
        let store = Store::connect(&settings)
            .await
            .expect("connect returns at once");
        let state = AppState {
            store: Arc::new(store),
            retry_after_secs: 7,
            retry_after: RetryAfter::new(7, []),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_wait: Duration::from_secs(5),
            event_streams: Arc::new(Semaphore::new(1)),
            watch: Watch::default(),
            callback_allow: Arc::from([]),
            callback_allow_private: false,
            auth: auth.map(Arc::new),
            rate_limits,
            body_read_timeout: Duration::from_secs(5),
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            forward_headers: Arc::from([]),
            result_headers: Arc::from([]),
            #[cfg(feature = "fault-injection")]
            abort_after_publish: false,
        };
        router(state, routes)
    }

    async fn call(
        app: &Router,
        request: axum::http::Request<Body>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let response = app.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, json)
    }

    fn get_request(path: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(path).body(Body::empty()).unwrap()
    }

    fn post(path: &str) -> axum::http::request::Builder {
        axum::http::Request::post(path)
    }

    #[tokio::test]
    async fn client_errors_are_problems_and_need_no_nats() {
        let app = app(&[route("jobs", "POST", "/jobs/{kind}", true)])
            .await
            .unwrap();
        let cases = [
            (
                post("/jobs/a").body(Body::empty()).unwrap(),
                400,
                "idempotency-key-missing",
            ),
            (
                post("/jobs/a")
                    .header("idempotency-key", "?1")
                    .body(Body::empty())
                    .unwrap(),
                400,
                "idempotency-key-invalid",
            ),
            (
                post("/jobs/a")
                    .header("idempotency-key", "\"k\"")
                    .header("content-length", "17")
                    .body(Body::from(vec![0u8; 17]))
                    .unwrap(),
                413,
                "payload-too-large",
            ),
            (
                post("/elsewhere").body(Body::empty()).unwrap(),
                404,
                "not-found",
            ),
            (
                axum::http::Request::delete("/jobs/a")
                    .body(Body::empty())
                    .unwrap(),
                405,
                "method-not-allowed",
            ),
        ];
        for (request, status, slug) in cases {
            let uri = request.uri().clone();
            let (got, headers, problem) = call(&app, request).await;
            assert_eq!(got.as_u16(), status, "{uri}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
            assert_eq!(problem["status"], status);
            assert!(
                problem["type"].as_str().unwrap().ends_with(slug),
                "{problem}"
            );
        }
    }

    #[tokio::test]
    async fn without_jetstream_a_valid_request_gets_503_with_retry_after() {
        let app = app(&[route("jobs", "POST", "/jobs/{kind}", true)])
            .await
            .unwrap();
        let request = post("/jobs/a")
            .header("idempotency-key", "\"k\"")
            .body(Body::from("{}"))
            .unwrap();
        let (status, headers, problem) = call(&app, request).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "7");
        assert!(problem["detail"].as_str().unwrap().contains("retry"));

        let (status, _, _) = call(&app, get_request("/livez")).await;
        assert_eq!(status, StatusCode::OK, "liveness never checks NATS");
        let (status, headers, _) = call(&app, get_request("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "7");
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_are_shed_at_once_but_health_is_not() {
        let app = app_with_limit(&[route("jobs", "POST", "/jobs/{kind}", true)], 1)
            .await
            .unwrap();
        // A request whose body never arrives holds the only slot.
        let stalled = post("/jobs/a")
            .header("idempotency-key", "\"k\"")
            .body(Body::from_stream(futures::stream::pending::<
                Result<bytes::Bytes, std::io::Error>,
            >()))
            .unwrap();
        let holder = tokio::spawn(app.clone().oneshot(stalled));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;

        let (status, headers, problem) = call(&app, get_request("/operations/x")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "7");
        assert!(
            problem["type"].as_str().unwrap().ends_with("overloaded"),
            "{problem}"
        );
        let (status, _, _) = call(&app, get_request("/livez")).await;
        assert_eq!(status, StatusCode::OK);

        holder.abort();
        let _ = holder.await;
        let (status, _, _) = call(&app, get_request("/operations/x")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "the slot is free again");
    }

    #[tokio::test]
    async fn conflicting_paths_are_a_configuration_error() {
        let routes = [
            route("a", "POST", "/a/{x}", false),
            route("b", "PUT", "/a/{y}", false),
        ];
        let err = app(&routes).await.expect_err("conflict detected");
        assert!(err.to_string().contains("conflicts"), "{err}");
        // Two methods on one path share it.
        let routes = [
            route("a", "POST", "/a/{x}", false),
            route("b", "PUT", "/a/{x}", false),
        ];
        assert!(app(&routes).await.is_ok());
    }
}
