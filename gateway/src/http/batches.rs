//! Batch submit: `POST /batches` (many requests to one route, accepted all together or not at
//! all) and `GET /batches/{id}` (where its operations stand).

use std::collections::{BTreeMap, HashSet};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::auth::Tenant;
use super::error::{ApiError, Problem};
use super::responses::{IDEMPOTENT_REPLAYED, header_value, set_no_store};
use super::state::AppState;
use super::submit::{forwarded, is_json, with_key};
use crate::config::RouteConfig;
use crate::operations::idempotency::{self, KeyError};
use crate::operations::{Batch, BatchAccepted, BatchSubmission, Links, Start, Status, Submission};

/// A batch submit's body (`application/json`).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The route every item is a request of.
    route: String,
    /// 1 to `GATEWAY_MAX_BATCH_ITEMS` (at most 999) requests.
    items: Vec<BatchItem>,
}

/// One request of a batch.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// The item's own key (as an `Idempotency-Key` header's value, at most 255 characters);
    /// unique in the batch. The same key sent alone later finds this item's operation.
    idempotency_key: String,
    /// The request path: the route's (the default, when it has no `{parameters}`), or one it
    /// matches.
    #[serde(default)]
    path: Option<String>,
    /// The query string, without `?`.
    #[serde(default)]
    query: Option<String>,
    /// A JSON body (sent as `application/json`, or `content_type` if it ends in `+json`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    body: Option<serde_json::Value>,
    /// A body of any type, base64 (RFC 4648 section 4); instead of `body`.
    #[serde(default)]
    body_base64: Option<String>,
    /// The body's media type.
    #[serde(default)]
    content_type: Option<String>,
}

/// A batch and its operations.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchView {
    id: String,
    route: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: time::OffsetDateTime,
    /// Operations by status (only on `GET`): `pending`, `succeeded`, ... and `gone` for one whose
    /// retention has ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    counts: Option<BTreeMap<&'static str, usize>>,
    /// The items' operations, in the order of the items.
    operations: Vec<BatchMember>,
    links: BatchLinks,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchMember {
    id: String,
    /// Only on `GET`.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    links: Links,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchLinks {
    #[serde(rename = "self")]
    this: String,
}

fn batch_path(id: &str) -> String {
    format!("/batches/{id}")
}

impl BatchView {
    fn of(batch: &Batch, statuses: Option<Vec<Option<Status>>>) -> Self {
        let status_name = |s: Option<Status>| s.map_or("gone", Status::name);
        let counts = statuses.as_ref().map(|statuses| {
            let mut counts = BTreeMap::new();
            for s in statuses {
                *counts.entry(status_name(*s)).or_default() += 1;
            }
            counts
        });
        Self {
            id: batch.id.clone(),
            route: batch.route.clone(),
            created_at: batch.created_at,
            counts,
            operations: batch
                .operations
                .iter()
                .enumerate()
                .map(|(i, id)| BatchMember {
                    id: id.clone(),
                    status: statuses.as_ref().map(|s| status_name(s[i])),
                    links: Links::of(id),
                })
                .collect(),
            links: BatchLinks {
                this: batch_path(&batch.id),
            },
        }
    }
}

/// `POST /batches`: many requests of one route, all accepted or none.
#[utoipa::path(
    post,
    path = "/batches",
    tag = "batches",
    summary = "Submit a batch",
    description = "Submits up to `GATEWAY_MAX_BATCH_ITEMS` (at most 999) requests to one route as one JetStream atomic batch: all are accepted or none is. Each item has its own idempotency key and becomes an ordinary operation; the batch has a key too (`Idempotency-Key`, assigned when absent), so a retried batch is a replay. An item whose key was used for another request makes the whole batch `422`, naming the item, with nothing written; an item accepted before with the same request is taken as it is. Items are checked as single submits are (size, schema); delayed starts and `Callback-Url` are not taken per item.",
    request_body(content = BatchRequest, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "The batch's key (assigned when absent).")),
    responses(
        (status = 202, description = "Accepted, all of it.", body = BatchView,
            headers(
                ("Location" = String, description = "The batch resource."),
                ("Idempotency-Key" = String, description = "The batch's key in effect."),
                ("Idempotent-Replayed" = String, description = "`true` when the key named this batch already."),
            )),
        (status = 400, description = "`bad-batch` (`errors` points at the item), or `idempotency-key-invalid`.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload-too-large`: over `GATEWAY_MAX_BATCH_BYTES`.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported-media-type`: not sent as JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`idempotency-key-reused`: an item's key (named in `errors`, its operation in `operation_id`) or the batch's key was used for something else; nothing was written.", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`quota-exceeded`.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`outcome-unknown`: retry with the same `Idempotency-Key`; the batch was stored whole or not at all.", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient-storage`: no room for the batch; nothing was stored.", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn submit_batch(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = match idempotency::parse_key(headers.get_all(idempotency::HEADER))? {
        Some(key) => key,
        None => idempotency::assign_key(),
    };
    let key_header = header_value(&idempotency::format_key(&key));
    let answer = accept(&state, &tenant, key, &headers, body).await;
    Ok(with_key(key_header, answer))
}

async fn accept(
    state: &AppState,
    tenant: &str,
    batch_key: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let arrival = state.arrive()?;
    if !headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json)
        || headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = state.limits.max_batch_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    let request: BatchRequest = serde_json::from_slice(&bytes).map_err(|e| {
        let mut detail = e.to_string();
        detail.truncate(300);
        bad("", detail)
    })?;
    let route = state
        .ops
        .route(&request.route)
        .filter(|_| request.route.len() <= 64)
        .ok_or_else(|| bad("/route", "there is no such route".to_owned()))?
        .clone();
    let max = state.limits.max_batch_items;
    if request.items.is_empty() || request.items.len() > max {
        return Err(bad(
            "/items",
            format!("a batch has 1 to {max} items, not {}", request.items.len()),
        ));
    }
    let items = read_items(&route, request.items)?;
    let forwarded = forwarded(state, headers);
    let method = route.http_method();
    let permit = state.admit_arrived(arrival)?;
    let submissions = items
        .iter()
        .map(|item| Submission {
            route: &route,
            tenant,
            idempotency_key: item.key.clone(),
            method: method.as_str(),
            path: &item.path,
            query: item.query.as_deref(),
            content_type: item.content_type.as_deref(),
            forwarded: forwarded.clone(),
            requested_callback_url: None,
            start: Start::default(),
            redrive_of: None,
            body_object: None,
            body: item.body.clone(),
        })
        .collect();
    let accepted = state
        .ops
        .accept_batch(BatchSubmission {
            route: &route,
            tenant,
            batch_key,
            items: submissions,
        })
        .await?;
    drop(permit);
    let (batch, replayed) = match accepted {
        BatchAccepted::New(batch) => (batch, false),
        BatchAccepted::Replayed(batch) => (batch, true),
    };
    let mut response = (StatusCode::ACCEPTED, Json(BatchView::of(&batch, None))).into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, header_value(&batch_path(&batch.id)));
    set_no_store(&mut response);
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// An item, read and checked.
struct ReadItem {
    key: String,
    path: String,
    query: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

fn bad(pointer: &str, detail: String) -> ApiError {
    ApiError::BadBatch {
        pointer: pointer.to_owned(),
        detail,
    }
}

/// Checks every item as a single submit to `route` is checked: its key, path, body size and
/// schema; keys unique in the batch. The first item that fails names the error.
fn read_items(route: &RouteConfig, items: Vec<BatchItem>) -> Result<Vec<ReadItem>, ApiError> {
    let mut keys = HashSet::new();
    let mut read = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = |field: &str| format!("/items/{i}/{field}");
        let key = match idempotency::parse_key([item.idempotency_key.as_bytes()]) {
            Ok(Some(key)) => key,
            Ok(None) => return Err(bad(&at("idempotency_key"), KeyError::Empty.to_string())),
            Err(e) => return Err(bad(&at("idempotency_key"), e.to_string())),
        };
        if !keys.insert(key.clone()) {
            return Err(bad(
                &at("idempotency_key"),
                "another item of the batch has this key".to_owned(),
            ));
        }
        let path = match item.path {
            Some(path) if matches_template(&route.path, &path) => path,
            Some(_) => {
                return Err(bad(
                    &at("path"),
                    format!(
                        "the path does not match route {:?}'s {:?}",
                        route.name, route.path
                    ),
                ));
            }
            None if !route.path.contains('{') => route.path.clone(),
            None => {
                return Err(bad(
                    &at("path"),
                    format!(
                        "route {:?}'s path has parameters: give each item its path",
                        route.name
                    ),
                ));
            }
        };
        let (content_type, body) = match (item.body, item.body_base64) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    &at("body"),
                    "send body or body_base64, not both".to_owned(),
                ));
            }
            (Some(json), None) => {
                let content_type = item
                    .content_type
                    .unwrap_or_else(|| "application/json".to_owned());
                if !is_json(&content_type) {
                    return Err(bad(
                        &at("content_type"),
                        "a JSON body is sent as application/json or a +json type".to_owned(),
                    ));
                }
                let bytes = serde_json::to_vec(&json).expect("a JSON value serializes");
                (Some(content_type), Bytes::from(bytes))
            }
            (None, Some(b64)) => {
                let bytes = data_encoding::BASE64
                    .decode(b64.as_bytes())
                    .map_err(|e| bad(&at("body_base64"), format!("not base64: {e}")))?;
                (item.content_type, Bytes::from(bytes))
            }
            (None, None) => (item.content_type, Bytes::new()),
        };
        if let Some(content_type) = &content_type
            && content_type.parse::<mime::Mime>().is_err()
        {
            return Err(bad(&at("content_type"), "not a media type".to_owned()));
        }
        // A batch's items travel in their messages: at most the route's inline_max where it
        // has one.
        let most = route.inline_max.unwrap_or(route.max_body).0;
        if body.len() > most {
            return Err(bad(
                &at("body"),
                format!("larger than the {most} bytes an item of this route may carry"),
            ));
        }
        if let Some(schema) = &route.body_schema {
            if !content_type.as_deref().is_some_and(is_json) {
                return Err(bad(&at("body"), "this route takes a JSON body".to_owned()));
            }
            if let Err(e) = schema.check(&body) {
                return Err(bad(&at("body"), e.to_string()));
            }
        }
        read.push(ReadItem {
            key,
            path,
            query: item.query,
            content_type,
            body,
        });
    }
    Ok(read)
}

/// Whether `path` is one `template` (a route path, `{name}` a segment's parameter) matches:
/// the same segments, a parameter matching any non-empty one.
fn matches_template(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return path.starts_with('/'),
            (Some(param), Some(segment)) if param.starts_with('{') && param.ends_with('}') => {
                if segment.is_empty() {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// `GET /batches/{id}`: the batch and where each of its operations stands.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    tag = "batches",
    summary = "A batch",
    description = "The batch's operations, in the order of its items, each with its status, and the counts by status.",
    params(("id" = String, Path, description = "The batch id.")),
    responses(
        (status = 200, description = "The batch.", body = BatchView),
        (status = 404, description = "`batch-not-found`: no such batch (or not yours, or past its retention).", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_batch(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let _permit = state.admit()?;
    let batch = state
        .ops
        .find_batch(&tenant, &id)
        .await?
        .ok_or(ApiError::BatchNotFound)?;
    let statuses: Vec<Option<Status>> = futures::stream::iter(batch.operations.clone())
        .map(|op| {
            let (ops, tenant) = (state.ops.clone(), tenant.clone());
            async move { ops.find(&tenant, &op).await.map(|o| o.map(|o| o.status())) }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let mut response = Json(BatchView::of(&batch, Some(statuses))).into_response();
    set_no_store(&mut response);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::matches_template;

    #[test]
    fn paths_match_their_route_template_segment_by_segment() {
        assert!(matches_template("/orders", "/orders"));
        assert!(matches_template("/orders/{id}", "/orders/7"));
        assert!(matches_template("/a/{x}/b", "/a/1/b"));
        assert!(!matches_template("/orders/{id}", "/orders/"));
        assert!(!matches_template("/orders/{id}", "/orders/7/8"));
        assert!(!matches_template("/orders", "/other"));
        assert!(!matches_template("/orders/{id}", "/orders"));
    }
}
