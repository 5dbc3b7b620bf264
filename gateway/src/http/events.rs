//! `GET /operations/{id}/events`: an operation's state changes as server-sent events.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, Problem};
use super::extract::{EventStreamSlot, OperationId, OperationRef, Wait};
use super::reads::wait_for;
use super::state::AppState;
use crate::operations::{Operation, OperationView, WakeOn};

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
    stream_permit: EventStreamSlot,
    operation: OperationRef,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let first = wait_for(&state, &operation, Wait::AT_ONCE, WakeOn::Terminal).await?;
    let OperationRef { tenant, id } = operation;
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
    let deadline = state.ops.expires_at(&first);
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
                    let op = state
                        .ops
                        .wait(&tenant, &id, until, wake_on)
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
