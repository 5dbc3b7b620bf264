//! Reading and cancelling an operation: `GET /operations/{id}`, `GET /operations/{id}/result`,
//! `DELETE /operations/{id}`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::error::{ApiError, Problem};
use super::extract::{Admission, OperationId, OperationRef, Wait, WaitQuery};
use super::prefer;
use super::responses::{
    pending, result_response, set_location, set_no_store, set_preference_applied, set_retry_after,
};
use super::state::AppState;
use crate::operations::{Cancellation, Operation, OperationView, WakeOn};

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

/// The request headers a result read honours (RFC 9110 sections 13 and 14).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(
    dead_code,
    reason = "describes the headers to OpenAPI; responses::result_response reads them"
)]
pub(crate) struct ResultHeaders {
    /// `bytes=first-last`, `bytes=first-` or `bytes=-suffix`: one range of a `200` result's body.
    #[param(rename = "Range")]
    range: Option<String>,
    /// Serve the range only while the result has this entity tag; else the whole body.
    #[param(rename = "If-Range")]
    if_range: Option<String>,
    /// `304` when the result has one of these entity tags (or any, `*`).
    #[param(rename = "If-None-Match")]
    if_none_match: Option<String>,
    /// `412` unless the result has one of these entity tags (or any, `*`).
    #[param(rename = "If-Match")]
    if_match: Option<String>,
}

/// `GET /operations/{id}`: the status resource. With `?wait=N` or `Prefer: wait=N`, answers as
/// soon as the operation is terminal (or has new progress), or after N seconds.
#[utoipa::path(
    get,
    path = "/operations/{id}",
    tag = "operations",
    summary = "Status of an operation",
    description = "The operation's status resource, from any gateway replica. With `?wait=N` or `Prefer: wait=N` the answer comes as soon as the operation is terminal (or has new progress), or after N seconds.",
    params(OperationId, WaitQuery, PreferHeader),
    responses(
        (status = 200, description = "The operation.", body = OperationView<'static>,
            headers(
                ("Retry-After" = u64, description = "While pending: seconds until a status read is worth repeating."),
                ("Preference-Applied" = String, description = "`wait=N` when `Prefer: wait` was honoured."),
            )),
        (status = 400, description = "`bad-query`: `wait` is not a whole number of seconds from 0 to 3600.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such operation (or not yours).", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`result-removed`: the operation's result was removed before its retention ended; its outcome can no longer be read.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`too-many-waiters` (only when asked to wait): as many clients wait already as allowed, in all or for the tenant; read without waiting, or after `Retry-After`.", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until a retry is worth it."))),
    )
)]
pub(crate) async fn get_operation(
    State(state): State<AppState>,
    query: WaitQuery,
    operation: OperationRef,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let asked = query.duration().or(prefer::parse(&headers).wait);
    let wait = Wait::capped(asked, state.limits.max_wait);
    let wake_on = WakeOn::TerminalOrProgressAfter(None);
    let operation = wait_for(&state, &operation, wait, wake_on).await?;
    let mut response = Json(OperationView::of(&operation)).into_response();
    set_no_store(&mut response);
    if !operation.status().is_terminal() {
        set_retry_after(&mut response, &state, &operation);
    }
    if let Some(wait) = wait.asked() {
        set_preference_applied(&mut response, &format!("wait={}", wait.as_secs()));
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
    description = "The worker's reply, replayed byte for byte (status, content type, allow-listed headers, body), or `202` with the status resource while there is none. A body kept in the Object Store is streamed with its `Content-Length`. A `200` reply has a strong `ETag` (its SHA-256) and byte ranges: `Range` (206, 416), `If-Range`, `If-None-Match` (304), `If-Match` (412), as RFC 9110 sections 13 and 14 say. An expired operation answers `504`, a cancelled one `410` (problem+json). With `?wait=N` or `Prefer: wait=N`, a long poll.",
    params(OperationId, WaitQuery, PreferHeader, ResultHeaders),
    responses(
        (status = 202, description = "No result yet.", body = OperationView<'static>,
            headers(
                ("Location" = String, description = "The status resource."),
                ("Retry-After" = u64, description = "Seconds until a read is worth repeating."),
            )),
        (status = 200, description = "The worker's reply, when its status was 200 (any content type, as bytes).", content_type = "*/*",
            headers(
                ("ETag" = String, description = "The body's SHA-256, base64url, quoted: a strong entity tag."),
                ("Accept-Ranges" = String, description = "`bytes`."),
            )),
        (status = 206, description = "One byte range of a 200 reply's body (`Range`).", content_type = "*/*",
            headers(
                ("Content-Range" = String, description = "`bytes first-last/size`."),
                ("ETag" = String, description = "The whole body's entity tag."),
            )),
        (status = 304, description = "The reply has the entity tag `If-None-Match` names: no body.",
            headers(("ETag" = String, description = "The body's entity tag."))),
        (status = 412, description = "`precondition-failed`: `If-Match` names none of the reply's entity tags.", body = Problem, content_type = "application/problem+json"),
        (status = 416, description = "`range-not-satisfiable`: no range of `Range` is within the body.", body = Problem, content_type = "application/problem+json",
            headers(("Content-Range" = String, description = "`bytes */size`."))),
        (status = "2XX", description = "The worker's reply (any content type).", content_type = "*/*"),
        (status = 404, description = "No such operation (or not yours).", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`result-removed`: the operation's result was removed before its retention ended; its outcome can no longer be read.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`too-many-waiters` (only when asked to wait): as many clients wait already as allowed, in all or for the tenant; read without waiting, or after `Retry-After`.", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until a retry is worth it."))),
        (status = "4XX", description = "The worker's reply, when it was a client error; or `400` for a bad query; or `410` (problem+json) when the operation was cancelled (type `cancelled`) or its result was removed (type `result-removed`).", content_type = "*/*"),
        (status = "5XX", description = "The worker's reply, when it was a server error; or `504` (problem+json) when the operation expired.", content_type = "*/*"),
    )
)]
pub(crate) async fn get_result(
    State(state): State<AppState>,
    query: WaitQuery,
    operation: OperationRef,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let asked = query.duration().or(prefer::parse(&headers).wait);
    let wait = Wait::capped(asked, state.limits.max_wait);
    let operation = wait_for(&state, &operation, wait, WakeOn::Terminal).await?;
    match &operation.result {
        Some(result) => {
            Box::pin(result_response(
                &state,
                &operation,
                result,
                Some((&method, &headers)),
            ))
            .await
        }
        None => {
            let body = Json(OperationView::of(&operation));
            Ok(pending(&state, &operation, body))
        }
    }
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
        (status = 410, description = "`result-removed`: the operation's result was removed before its retention ended; its outcome can no longer be read.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished; `operation` shows how.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cancel_operation(
    State(state): State<AppState>,
    _admitted: Admission,
    OperationRef { tenant, id }: OperationRef,
) -> Result<Response, ApiError> {
    let cancellation = state
        .ops
        .cancel(&tenant, &id)
        .await?
        .ok_or(ApiError::OperationNotFound)?;
    let (Cancellation::Recorded(operation) | Cancellation::TooLate(operation)) = &cancellation;
    note_operation(operation);
    match cancellation {
        Cancellation::Recorded(operation) => {
            let mut response =
                (StatusCode::ACCEPTED, Json(OperationView::of(&operation))).into_response();
            set_location(&mut response, &operation);
            set_no_store(&mut response);
            Ok(response)
        }
        Cancellation::TooLate(operation) => Err(ApiError::AlreadyFinished(Box::new(operation))),
    }
}

/// Reads an operation, then waits (holding no permit, only a waiter's slot: none left is
/// [`ApiError::TooManyWaiters`]) for what `wake_on` says, or until `wait` passes.
pub(super) async fn wait_for(
    state: &AppState,
    OperationRef { tenant, id }: &OperationRef,
    wait: Wait,
    wake_on: WakeOn,
) -> Result<Operation, ApiError> {
    let operation = match wait.to_do() {
        Some(wait) => {
            let _slot = state
                .limits
                .waiters
                .try_take(tenant)
                .ok_or(ApiError::TooManyWaiters)?;
            let until = tokio::time::Instant::now() + wait;
            state.ops.wait(tenant, id, until, wake_on).await?
        }
        None => {
            let _permit = state.admit()?;
            // Boxed: inline, the lookup's state (about 6.5 KB) would be part of every waiter's
            // future, parked for as long as it waits.
            Box::pin(state.ops.find(tenant, id)).await?
        }
    };
    let operation = operation.ok_or(ApiError::OperationNotFound)?;
    note_operation(&operation);
    Ok(operation)
}

/// Names the operation in the request's span (so its logs carry `operation_id`) and links the
/// span to the one that accepted the request: a status read belongs to the original trace.
pub(super) fn note_operation(operation: &Operation) {
    let span = tracing::Span::current();
    span.record("operation_id", operation.id());
    if let Some(accepted_in) = &operation.trace {
        span.add_link(accepted_in.clone());
    }
}
