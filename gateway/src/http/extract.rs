//! Extractors whose rejections are the gateway's own errors, so handlers never see axum's
//! rejection types: the permits a request needs ([`Admission`], [`EventStreamSlot`]), the
//! operation it names ([`OperationRef`]), and the wait it asks for ([`WaitQuery`], then [`Wait`],
//! capped once). Extractors run in the order of the handler's arguments, so that order is the
//! order in which a request's problems are reported: a full or draining gateway says so first.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;

use super::auth::Tenant;
use super::error::ApiError;
use super::slots::Slot;
use super::state::AppState;

/// A permit to do JetStream work now ([`AppState::admit`]), held until the handler returns.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

impl FromRequestParts<AppState> for Admission {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(Self {
            _permit: state.admit()?,
        })
    }
}

/// One of the event streams the gateway keeps open at once (`GATEWAY_MAX_EVENT_STREAMS`, and
/// `GATEWAY_MAX_EVENT_STREAMS_PER_TENANT` for the caller's tenant), held for the stream's life;
/// none left is `429` with `Retry-After`.
pub struct EventStreamSlot {
    _slot: Slot,
}

impl FromRequestParts<AppState> for EventStreamSlot {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Ok(Tenant(tenant)) = Tenant::from_request_parts(parts, state).await;
        let slot = state
            .limits
            .event_streams
            .try_take(&tenant)
            .ok_or(ApiError::TooManyStreams)?;
        Ok(Self { _slot: slot })
    }
}

/// The `{id}` of `/operations/{id}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct OperationId {
    /// The operation's id, as `Location` gave it.
    id: String,
}

/// The operation a request names, and whose asking: the caller's tenant and the path's `{id}`.
/// A malformed id answers like an unknown one (404): there is no operation by that name.
pub struct OperationRef {
    pub tenant: Arc<str>,
    pub id: String,
}

impl<S: Send + Sync> FromRequestParts<S> for OperationRef {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Ok(Tenant(tenant)) = Tenant::from_request_parts(parts, state).await;
        let Path(OperationId { id }) = Path::<OperationId>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::OperationNotFound)?;
        Ok(Self { tenant, id })
    }
}

/// How long a request may wait for news, as asked (`Prefer: wait=N`, `?wait=N`, a route's
/// `wait`) and capped by the gateway's maximum (`GATEWAY_MAX_WAIT`). `None`: answer at once.
#[derive(Debug, Clone, Copy)]
pub struct Wait(Option<Duration>);

impl Wait {
    /// Answer at once, with what there is.
    pub const AT_ONCE: Wait = Wait(None);

    pub fn capped(asked: Option<Duration>, max: Duration) -> Self {
        Self(asked.map(|wait| wait.min(max)))
    }

    /// The wait, when the client asked for one (zero included).
    pub fn asked(self) -> Option<Duration> {
        self.0
    }

    /// The wait, when there is one to do (not zero).
    pub fn to_do(self) -> Option<Duration> {
        self.0.filter(|wait| !wait.is_zero())
    }
}

/// `?wait=N` on a long poll.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    /// Seconds to wait for a result before answering (capped by the gateway's maximum).
    #[param(minimum = 0, maximum = 3600)]
    wait: Option<u64>,
}

impl WaitQuery {
    pub fn duration(&self) -> Option<Duration> {
        self.wait.map(Duration::from_secs)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WaitQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // `wait` is the only field, so any failure is about it: said in our words, not the
        // deserializer's.
        let bad = || {
            ApiError::BadQuery(format!(
                "wait must be a whole number of seconds from 0 to {MAX_WAIT_QUERY}"
            ))
        };
        let Query(query) = Query::<WaitQuery>::from_request_parts(parts, state)
            .await
            .map_err(|_| bad())?;
        if query.wait.is_some_and(|w| w > MAX_WAIT_QUERY) {
            return Err(bad());
        }
        Ok(query)
    }
}

/// The largest `?wait=` a client may write; the gateway's own cap (`GATEWAY_MAX_WAIT`) applies
/// below it.
const MAX_WAIT_QUERY: u64 = 3600;
