//! Failed operations and redrive: `GET /operations?route=R&status=failed` (a page of the
//! caller's failed operations on a route, with a cursor), `POST /operations/{id}/redrive` (one),
//! `POST /operations/redrive` (a page of them, by a required filter).

use std::collections::HashMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::auth::Tenant;
use super::error::{ApiError, Problem};
use super::extract::{Admission, OperationId, OperationRef};
use super::reads::note_operation;
use super::responses::{AcceptedBody, IDEMPOTENT_REPLAYED, accepted, set_no_store};
use super::state::AppState;
use super::submit::{allowed_callback, is_json};
use crate::operations::{Accepted, Operation, OperationView};

/// Default and largest page size of a list or a bulk redrive.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 100;

/// A page of failed operations.
#[derive(Serialize, utoipa::ToSchema)]
pub struct FailedList<'a> {
    /// Oldest failure first.
    operations: Vec<OperationView<'a>>,
    /// The next page (also in the `Link` header, `rel="next"`); absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// What a bulk redrive did, per failed operation of the page.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BulkRedrive {
    /// Each failed operation and its redrive (`replayed`: an earlier call made it).
    redriven: Vec<Redriven>,
    /// Failed operations that cannot be redriven, and why (`not-redrivable`'s reasons).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    skipped: Vec<Skipped>,
    /// Why the call stopped before the end of its page (a quota, a full stream, JetStream
    /// unreachable): `next_cursor` then starts at the operation it stopped at.
    #[serde(skip_serializing_if = "Option::is_none")]
    stopped: Option<Problem>,
    /// Where the next page of failed operations starts: send it as `cursor` to go on.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Skipped {
    operation: String,
    reason: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Redriven {
    operation: String,
    redrive: String,
    replayed: bool,
}

/// The filter and page of a bulk redrive, a JSON object. `route` is required: a redrive of
/// everything that failed everywhere is refused.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    route: Option<String>,
    /// Where to start (a previous answer's `next_cursor`); default the first failure.
    #[serde(default)]
    cursor: Option<u64>,
    /// Failed operations to redrive, 1 to 100 (default 50).
    #[serde(default)]
    limit: Option<usize>,
}

/// Query parameters of the list.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(
    dead_code,
    reason = "describes the query to OpenAPI; `list_failed` reads it"
)]
pub(crate) struct ListQuery {
    /// The route whose operations to list (required).
    route: String,
    /// `failed` (required): only failed operations are indexed.
    status: String,
    /// Where to start: a previous page's cursor (in its `next` link).
    cursor: Option<u64>,
    /// Page size, 1 to 100 (default 50).
    limit: Option<usize>,
}

/// A route name as the routes file allows it (it becomes a subject token).
fn route_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn limit(asked: Option<usize>) -> Result<usize, String> {
    match asked {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(format!("limit {n} is not from 1 to {MAX_LIMIT}")),
    }
}

/// `GET /operations?route=R&status=failed`: the caller's failed operations on route R.
#[utoipa::path(
    get,
    path = "/operations",
    tag = "operations",
    summary = "List failed operations",
    description = "The caller's failed operations on a route, oldest failure first, a page at a time (`next`, and `Link: <…>; rel=\"next\"`). Failures are indexed as they happen, so a page costs reads in proportion to its size, never to what the streams hold; the index lags a failure by moments.",
    params(ListQuery),
    responses(
        (status = 200, description = "A page.", body = FailedList<'static>),
        (status = 400, description = "`bad-query`: no `route` or an unknown one, `status` other than `failed`, a bad cursor or limit.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_failed(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let _permit = state.admit()?;
    let bad = |why: &str| ApiError::BadQuery(why.to_owned());
    let mut query = HashMap::new();
    for (name, value) in pairs {
        if !["route", "status", "cursor", "limit"].contains(&name.as_str()) {
            return Err(bad("the parameters are route, status, cursor and limit"));
        }
        if query.insert(name, value).is_some() {
            return Err(bad("each parameter is sent once"));
        }
    }
    let route = query
        .get("route")
        .filter(|r| route_name(r))
        .ok_or_else(|| bad("`route` names the route to list (a-z, 0-9, '-', '_')"))?;
    if !state.ops.has_route(route) {
        return Err(bad(&format!("there is no route {route:?}")));
    }
    if query.get("status").map(String::as_str) != Some("failed") {
        return Err(bad(
            "`status=failed` is required: only failed operations are listed",
        ));
    }
    let number = |name: &str| {
        query
            .get(name)
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| bad(&format!("`{name}` is a whole number")))
    };
    let cursor = number("cursor")?.unwrap_or(0);
    let limit = limit(number("limit")?.map(|n| n as usize)).map_err(|why| bad(&why))?;
    let page = state.ops.failed(&tenant, route, cursor, limit).await?;
    let next = page
        .next
        .map(|at| format!("/operations?route={route}&status=failed&cursor={at}&limit={limit}"));
    let body = FailedList {
        operations: page
            .operations
            .iter()
            .map(|(_, op)| OperationView::of(op))
            .collect(),
        next: next.clone(),
    };
    let mut response = Json(body).into_response();
    set_no_store(&mut response);
    if let Some(next) = next
        && let Ok(link) = HeaderValue::try_from(format!("<{next}>; rel=\"next\""))
    {
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

/// `POST /operations/{id}/redrive`: a failed operation again, as a new operation.
#[utoipa::path(
    post,
    path = "/operations/{id}/redrive",
    tag = "operations",
    summary = "Redrive an operation that failed, expired or was cancelled",
    description = "Submits the operation's request again as a new operation (its `redrive_of` names the old one, whose `redriven_by` names the new one; the old one keeps its status). Repeating it, through any replica, answers the same new operation (`Idempotent-Replayed: true`). On a stateful route, the redrive of an operation that committed re-publishes its outbox instead of running again, so the state never changes twice.",
    params(OperationId),
    responses(
        (status = 202, description = "The redrive (new, or found), as a submit answers.", body = AcceptedBody<'static>,
            headers(
                ("Location" = String, description = "The redrive's status resource."),
                ("Idempotent-Replayed" = String, description = "`true` when an earlier redrive made it."),
            )),
        (status = 404, description = "No such operation (or not yours).", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`not-redrivable`: the operation is pending or succeeded, its route is gone, its retention ends within the route's timeout (a redrive could outlive what it reads), or its `Callback-Url` is no longer allowed.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`quota-exceeded`: the tenant is at a quota.", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient-storage`: the requests stream is full.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn redrive_operation(
    State(state): State<AppState>,
    _admitted: Admission,
    OperationRef { tenant, id }: OperationRef,
) -> Result<Response, ApiError> {
    let (operation, replayed) = redrive(&state, &tenant, &id, None).await?.into_operation();
    note_operation(&operation);
    let mut response = accepted(&state, &operation);
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Redrives failed operation `id` (`operation`: when already read), after checking what its
/// request carried against the current settings: forwarded headers the allow-list no longer
/// names are left out; a client `Callback-Url` no longer allowed makes it `not-redrivable`.
async fn redrive(
    state: &AppState,
    tenant: &str,
    id: &str,
    operation: Option<Operation>,
) -> Result<Accepted, ApiError> {
    let mut redrive = state
        .ops
        .prepare_redrive(tenant, id, operation)
        .await?
        .ok_or(ApiError::OperationNotFound)?;
    redrive.forwarded.retain(|(name, _)| {
        state
            .forward_headers
            .iter()
            .any(|allowed| allowed.as_str().eq_ignore_ascii_case(name))
    });
    if let Some(url) = &redrive.callback_url {
        let still_allowed = match HeaderValue::from_str(url) {
            Ok(value) => allowed_callback(state, tenant, &value).await.map(drop),
            Err(e) => Err(ApiError::CallbackNotAllowed(e.to_string())),
        };
        still_allowed.map_err(|e| {
            ApiError::NotRedrivable(format!(
                "operation {id}'s Callback-Url is no longer allowed: {e}"
            ))
        })?;
    }
    Ok(state.ops.redrive(redrive).await?)
}

/// `POST /operations/redrive`: every failed operation of a page, by a required filter.
#[utoipa::path(
    post,
    path = "/operations/redrive",
    tag = "operations",
    summary = "Redrive failed operations in bulk",
    description = "Redrives the caller's failed operations on `route` (required: a redrive of everything is refused), a page at a time: up to `limit` from `cursor`, oldest failure first; send `next_cursor` to go on. Each is redriven as by `POST /operations/{id}/redrive`: one already redriven is reported as `replayed`, not redriven again (a failed redrive is a failed operation of its own, redriven by a later call). Operations that cannot be redriven are listed in `skipped`; a quota, a full stream or an unreachable JetStream ends the call early (`stopped`, with `next_cursor` at the operation it stopped at).",
    request_body(content = BulkFilter, content_type = "application/json"),
    responses(
        (status = 200, description = "What was redriven.", body = BulkRedrive),
        (status = 400, description = "`bad-filter`: not a JSON object, an unknown field or route, or a bad `cursor` or `limit`.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload-too-large`: a filter over 4 KiB.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported-media-type`: the filter is not sent as JSON (or is content-coded).", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`filter-required`: no `route`.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn redrive_failed(
    State(state): State<AppState>,
    _admitted: Admission,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let filter = read_filter(&headers, body).await?;
    let route = filter.route.filter(|r| !r.is_empty()).ok_or_else(|| {
        ApiError::FilterRequired(
            "name the `route` whose failed operations to redrive; a redrive of every route at once is refused".to_owned(),
        )
    })?;
    if !route_name(&route) {
        return Err(ApiError::BadFilter(
            "`route` is a route name: 1-64 of a-z, 0-9, '-', '_'".to_owned(),
        ));
    }
    if !state.ops.has_route(&route) {
        return Err(ApiError::BadFilter(format!("there is no route {route:?}")));
    }
    let limit = limit(filter.limit).map_err(ApiError::BadFilter)?;
    let page = state
        .ops
        .failed(&tenant, &route, filter.cursor.unwrap_or(0), limit)
        .await?;
    let (mut redriven, mut skipped, mut stopped) = (Vec::new(), Vec::new(), None);
    let mut next_cursor = page.next;
    for (sequence, operation) in page.operations {
        let id = operation.id().to_owned();
        let (redrive, replayed) = match redrive(&state, &tenant, &id, Some(operation)).await {
            Ok(accepted) => accepted.into_operation(),
            // Gone since the page was read: nothing to redrive.
            Err(ApiError::OperationNotFound) => continue,
            Err(ApiError::NotRedrivable(reason)) => {
                skipped.push(Skipped {
                    operation: id,
                    reason,
                });
                continue;
            }
            // What was done stays reported; the next call starts where this one stopped.
            Err(error) => {
                stopped = Some(error.problem());
                next_cursor = Some(sequence);
                break;
            }
        };
        redriven.push(Redriven {
            operation: id,
            redrive: redrive.id().to_owned(),
            replayed,
        });
    }
    let body = BulkRedrive {
        redriven,
        skipped,
        stopped,
        next_cursor,
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// The longest filter a bulk redrive reads; a filter is a few short fields.
const MAX_FILTER_BYTES: usize = 4096;

/// Reads a bulk redrive's filter: a JSON object (`application/json` or a `+json` type, no
/// content coding) of at most [`MAX_FILTER_BYTES`]. Errors name what is wrong without echoing
/// what was sent at length.
async fn read_filter(headers: &HeaderMap, body: Body) -> Result<BulkFilter, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json);
    let coded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if !json || coded {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = axum::body::to_bytes(body, MAX_FILTER_BYTES)
        .await
        .map_err(|_| ApiError::PayloadTooLarge {
            limit: MAX_FILTER_BYTES,
        })?;
    let short = |e: serde_json::Error| {
        let mut why = e.to_string();
        why.truncate(200);
        ApiError::BadFilter(why)
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(short)?;
    if !value.is_object() {
        return Err(ApiError::BadFilter(
            "the filter is a JSON object: {\"route\": ..., \"cursor\": ..., \"limit\": ...}"
                .to_owned(),
        ));
    }
    serde_json::from_value(value).map_err(short)
}
