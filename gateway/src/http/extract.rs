//! Extractors whose rejections are the gateway's own errors, so handlers never see axum's
//! rejection types: the operation a request names ([`OperationRef`]) and the wait it asks for
//! ([`Wait`], capped once).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use serde::Deserialize;

use super::auth::Tenant;
use super::error::ApiError;

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
