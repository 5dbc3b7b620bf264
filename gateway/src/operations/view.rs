//! The one client-facing JSON shape of an operation: the status resource's body, an SSE event's
//! data, and a webhook's `data` all serialize [`OperationView`], so the three edges cannot drift.

use serde::Serialize;
use time::OffsetDateTime;

use super::model::{DeliveryState, Operation, ProgressState, Status};

/// The path of an operation's status resource.
pub fn operation_path(id: &str) -> String {
    format!("/operations/{id}")
}

/// Links from an operation to its resources.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Links {
    #[serde(rename = "self")]
    this: String,
    result: String,
    events: String,
}

impl Links {
    pub fn of(id: &str) -> Self {
        let this = operation_path(id);
        Self {
            result: format!("{this}/result"),
            events: format!("{this}/events"),
            this,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ResultSummary<'a> {
    /// The HTTP status code `/result` replays.
    status_code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
}

/// An operation as clients see it: the status resource's body, an SSE event's data, a webhook's
/// `data`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Operation)]
pub struct OperationView<'a> {
    id: &'a str,
    route: &'a str,
    status: Status,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    /// A delayed start: no handler runs before this (the status is `scheduled` until then).
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    not_before: Option<OffsetDateTime>,
    /// A start-by deadline: an operation no worker started by then ends `expired`, unrun.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    start_by: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<ResultSummary<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<&'a ProgressState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback: Option<&'a DeliveryState>,
    /// The failed operation this one redrives.
    #[serde(skip_serializing_if = "Option::is_none")]
    redrive_of: Option<&'a str>,
    /// The operation that redrives this failed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    redriven_by: Option<&'a str>,
    links: Links,
}

impl<'a> OperationView<'a> {
    pub fn of(op: &'a Operation) -> Self {
        Self {
            id: op.id(),
            route: op.route(),
            status: op.status(),
            created_at: op.created_at,
            updated_at: op.updated_at(),
            not_before: op.request.not_before,
            start_by: op.request.start_by,
            result: op.result.as_ref().map(|r| ResultSummary {
                status_code: r.record.status,
                content_type: r.record.content_type.as_deref(),
            }),
            progress: op.progress.as_ref(),
            callback: op.callback.as_ref(),
            redrive_of: op.request.redrive_of.as_deref(),
            redriven_by: op.redriven_by.as_deref(),
            links: Links::of(op.id()),
        }
    }
}
