//! The router: the configured routes, the gateway's own endpoints, and the tower layer stack, built
//! in one chain. Layers are listed innermost first: a request passes them bottom to top.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::handler::Handler as _;
use axum::http::header;
use axum::routing::{MethodFilter, MethodRouter, get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::{
    DeadlineBody, RequestBodyDeadlineLayer, RequestBodyTimeoutLayer, TimeoutBody,
};
use tower_http::trace::TraceLayer;

use super::auth::Tenant;
use super::batches::{get_batch, submit_batch};
use super::error::ApiError;
use super::events::operation_events;
use super::failed::{list_failed, redrive_failed, redrive_operation};
use super::health::{livez, readyz};
use super::layers::{
    Access, Edge, REQUEST_ID, RouteNames, edge, identify, method_not_allowed, request_span,
};
use super::openapi;
use super::reads::{cancel_operation, get_operation, get_result};
use super::state::AppState;
use super::submit::submit;
use crate::config::{ConfigError, RouteConfig};
use crate::metrics::ACCEPT_SECONDS;

/// Builds the router: the configured routes, `/operations/…`, `/livez`, `/readyz`, and the layers.
pub fn router(state: AppState, routes: &[RouteConfig]) -> Result<Router, ConfigError> {
    let document = Bytes::from(openapi::to_json(
        &openapi::document(routes, state.auth.is_some()),
        routes,
    ));
    let openapi_document = move || {
        let document = document.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], document) }
    };
    let mut by_path: BTreeMap<&str, MethodRouter<AppState>> = BTreeMap::new();
    let mut route_names = RouteNames::new();
    for r in routes {
        route_names
            .entry(r.path.clone())
            .or_default()
            .push((r.http_method(), r.name.clone()));
    }
    for route in routes {
        let filter = MethodFilter::try_from(route.http_method())
            .map_err(|e| ConfigError::Invalid(format!("route {:?}: {e}", route.name)))?;
        let config = Arc::new(route.clone());
        // The handle, looked up once: the macro builds its key and searches the registry.
        let accept_seconds = metrics::histogram!(ACCEPT_SECONDS, "route" => route.name.clone());
        let handler = move |State(state): State<AppState>, tenant: Tenant, request: Request| {
            let (config, accept_seconds) = (config.clone(), accept_seconds.clone());
            async move {
                let started = std::time::Instant::now();
                let answer = submit(state, config, tenant, request).await;
                accept_seconds.record(started.elapsed().as_secs_f64());
                answer
            }
        };
        // A body kept in the Object Store (a route with `inline_max`) may be gigabytes: only a
        // pause in it is limited, as nginx's `client_body_timeout` does. Any other body must
        // arrive whole within the limit (a slow sender holds a connection no longer).
        let limit = state.limits.body_read_timeout;
        let methods = by_path.remove(route.path.as_str()).unwrap_or_default();
        let methods = if route.inline_max.is_some() {
            methods.on(filter, handler.layer(no_pause_over(limit)))
        } else {
            methods.on(filter, handler.layer(whole_body_within(limit)))
        };
        by_path.insert(&route.path, methods);
    }
    let mut guarded = Router::new()
        .route("/batches", post(submit_batch))
        .route("/batches/{id}", get(get_batch))
        .route("/operations", get(list_failed))
        .route("/operations/redrive", post(redrive_failed))
        .route("/operations/{id}/redrive", post(redrive_operation))
        .route(
            "/operations/{id}",
            get(get_operation).delete(cancel_operation),
        )
        .route("/operations/{id}/result", get(get_result))
        .route("/operations/{id}/events", get(operation_events))
        .route_layer(whole_body_within(state.limits.body_read_timeout));
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
        auth_failures: state.auth_failures.clone(),
        public: routes
            .iter()
            .filter(|r| r.public)
            .map(|r| (r.http_method(), r.path.clone()))
            .collect(),
    });
    // Health and the document are open to all; everything else knows its caller first.
    let app = guarded
        .route_layer(axum::middleware::from_fn_with_state(
            access.clone(),
            identify,
        ))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_document));
    Ok(app
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(method_not_allowed(access))
        // Head caps, `Retry-After`, HTTP/1 framing and the count, in one layer (see `edge`). The
        // body observer sits outside the body limits (each route's, above).
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(Edge {
                max_headers: state.limits.max_headers,
                max_header_bytes: state.limits.max_header_bytes,
                retry_after_secs: state.limits.retry_after_secs,
                route_names,
            }),
            edge,
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
        // Outermost: a browser's preflight is answered before anything asks for credentials.
        .layer(tower::util::option_layer(state.cors.clone()))
        .with_state(state))
}

/// A body time limit as a layer whose inner service gets an axum body again.
type BodyLimit<L, B> = tower::ServiceBuilder<
    tower::layer::util::Stack<
        tower::util::MapRequestLayer<fn(axum::http::Request<B>) -> Request>,
        tower::layer::util::Stack<L, tower::layer::util::Identity>,
    >,
>;

/// The whole body within `limit` (tower-http's deadline: a slow sender is cut off).
fn whole_body_within(limit: Duration) -> BodyLimit<RequestBodyDeadlineLayer, DeadlineBody<Body>> {
    tower::ServiceBuilder::new()
        .layer(RequestBodyDeadlineLayer::new(limit))
        .map_request(axum_body as fn(_) -> _)
}

/// No pause in the body longer than `limit` (tower-http's timeout, reset by each frame).
fn no_pause_over(limit: Duration) -> BodyLimit<RequestBodyTimeoutLayer, TimeoutBody<Body>> {
    tower::ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(limit))
        .map_request(axum_body as fn(_) -> _)
}

fn axum_body<B>(request: axum::http::Request<B>) -> Request
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    request.map(Body::new)
}
