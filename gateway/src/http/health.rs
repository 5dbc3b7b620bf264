//! Health: liveness (the process answers) and readiness (JetStream, streams, results watch).

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;

use super::error::{ApiError, Problem};
use super::state::AppState;

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
    if state.lifecycle.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    // Probes repeat every few seconds: not being ready is an answer, not an event to log.
    state
        .ops
        .check_ready()
        .await
        .map_err(|_| ApiError::NotReady)?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}
