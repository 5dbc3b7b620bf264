//! What every handler shares ([`AppState`]), built once from the settings by [`AppState::new`],
//! and admission: whether a request may start JetStream work now.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::auth::{AuthFailures, Authenticator, RateLimits};
use super::error::ApiError;
use super::slots::Slots;
use crate::config::callback::CallbackRule;
use crate::config::{ConfigError, Settings, header_allow_list};
use crate::lifecycle::Lifecycle;
use crate::operations::Operations;

/// What every handler shares: one allocation, so that the clones axum makes for each request
/// and layer cost one reference count.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct Shared {
    /// The core: accept, find, wait, cancel.
    pub ops: Operations,
    /// Draining and readiness.
    pub lifecycle: Lifecycle,
    pub limits: Limits,
    pub callbacks: Callbacks,
    /// Credentials checker; `None`: every caller is the `default` tenant.
    pub auth: Option<Arc<Authenticator>>,
    /// Per-tenant request rates.
    pub rate_limits: RateLimits,
    pub auth_failures: AuthFailures,
    /// Request headers forwarded to workers.
    pub forward_headers: Arc<[HeaderName]>,
    /// Reply headers replayed from results.
    pub result_headers: Arc<[HeaderName]>,
    /// The browser policy (`GATEWAY_CORS_ORIGINS`), when any origin is allowed.
    pub cors: Option<CorsLayer>,
    /// One permit per submission whose body is arriving (see [`AppState::arrive`]).
    pub receiving: Arc<Semaphore>,
    #[cfg(feature = "fault-injection")]
    pub abort_after_publish: bool,
}

/// How much of the gateway one request may take, and for how long.
#[derive(Clone)]
pub struct Limits {
    /// Permits for requests doing JetStream work at once; none left means `503 overloaded`.
    /// Waiting (for a result, in a long poll or an event stream) holds no permit.
    pub in_flight: Arc<Semaphore>,
    /// How many permits `in_flight` has.
    pub max_in_flight: u32,
    /// Longest wait a client may ask for (`Prefer: wait`, `?wait=`).
    pub max_wait: Duration,
    /// Open event streams, in all and per tenant; none left means `429` with `Retry-After`.
    pub event_streams: Slots,
    /// Waiters (long polls, `Prefer: wait`), in all and per tenant; none left: a read's wait is
    /// `429`, a submit's is skipped (`202`).
    pub waiters: Slots,
    /// Time a client has to send a whole request body.
    pub body_read_timeout: Duration,
    /// Headers a request may have, and bytes its headers may take.
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Seconds in `Retry-After` on 503 and 429 answers.
    pub retry_after_secs: u64,
    /// Items a batch submit may carry, and bytes its body may take.
    pub max_batch_items: usize,
    pub max_batch_bytes: usize,
}

/// Where a client's `Callback-Url` may point.
#[derive(Clone)]
pub struct Callbacks {
    /// The receivers a client's `Callback-Url` may name.
    pub allow: Arc<[CallbackRule]>,
    /// Whether callbacks may reach loopback, private and other non-public addresses.
    pub allow_private: bool,
}

impl AppState {
    /// The state of a gateway with these settings. Fails on a header allow-list that names a
    /// header the gateway cannot forward or replay.
    pub fn new(
        settings: &Settings,
        ops: Operations,
        lifecycle: Lifecycle,
        auth: Option<Arc<Authenticator>>,
    ) -> Result<Self, ConfigError> {
        let limits = &settings.limits;
        // A u32, as `Semaphore::acquire_many` counts (see `idle`).
        let max_in_flight = u32::try_from(limits.max_in_flight).map_err(|_| {
            ConfigError::Invalid(format!(
                "GATEWAY_MAX_IN_FLIGHT is at most {}, not {}",
                u32::MAX,
                limits.max_in_flight
            ))
        })?;
        Ok(Self(Arc::new(Shared {
            ops,
            lifecycle,
            limits: Limits {
                in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
                max_in_flight,
                max_wait: limits.max_wait,
                event_streams: Slots::new(
                    limits.max_event_streams,
                    limits.max_event_streams_per_tenant,
                ),
                waiters: Slots::new(limits.max_waiters, limits.max_waiters_per_tenant),
                body_read_timeout: limits.body_read_timeout,
                max_headers: limits.max_headers,
                max_header_bytes: limits.max_header_bytes,
                retry_after_secs: settings.retry_after_secs,
                max_batch_items: limits.max_batch_items.into(),
                max_batch_bytes: limits.max_batch_bytes.0,
            },
            callbacks: Callbacks {
                allow: settings.webhooks.callback_allow.clone().into(),
                allow_private: settings.webhooks.callback_allow_private,
            },
            auth,
            rate_limits: RateLimits::new(limits.tenant_rate, limits.tenant_burst),
            auth_failures: AuthFailures::new(limits.auth_failures_per_minute),
            forward_headers: header_allow_list(&settings.forward_headers)?.into(),
            result_headers: header_allow_list(&settings.result_headers)?.into(),
            cors: cors_policy(&settings.cors_origins)?,
            receiving: Arc::new(Semaphore::new(RECEIVING as usize)),
            #[cfg(feature = "fault-injection")]
            abort_after_publish: settings.fault_abort_after_publish,
        })))
    }

    /// A permit to do JetStream work now, or `503 overloaded` at once: never a queue. A draining
    /// process takes no new work at all.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if self.lifecycle.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        self.limits
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded)
    }

    /// A submission has arrived and its body is on its way: it holds no JetStream permit (a
    /// slow client must not hold capacity), but a drain lets it finish. `503 shutting-down` once
    /// draining.
    pub fn arrive(&self) -> Result<Arrival, ApiError> {
        if self.lifecycle.is_draining() {
            return Err(ApiError::ShuttingDown);
        }
        self.receiving
            .clone()
            .try_acquire_owned()
            .map(|permit| Arrival { _permit: permit })
            .map_err(|_| ApiError::Overloaded)
    }

    /// The JetStream permit of a submission that arrived before any drain: taken even while
    /// draining, since [`AppState::idle`] waits for arrivals before it takes the permits.
    pub fn admit_arrived(&self, arrival: Arrival) -> Result<OwnedSemaphorePermit, ApiError> {
        let permit = self
            .limits
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded);
        drop(arrival);
        permit
    }

    /// Completes when no submission is arriving and no request holds a JetStream permit any more.
    /// Only while draining, when `arrive` and `admit` hand out none: it waits for the arrivals
    /// first (each becomes a permit or an answer), then takes every permit as it comes back.
    pub(crate) async fn idle(&self) {
        let _arrivals = self.receiving.acquire_many(RECEIVING).await;
        let _all = self
            .limits
            .in_flight
            .acquire_many(self.limits.max_in_flight)
            .await;
    }
}

/// Submissions that may be receiving their bodies at once: more than connections can carry.
const RECEIVING: u32 = 1 << 24;

/// A submission receiving its body, until it is admitted or answered.
pub struct Arrival {
    _permit: OwnedSemaphorePermit,
}

/// The CORS policy for these origins (Fetch standard, "CORS protocol"): preflights answered for
/// the methods and request headers the API uses, and the response headers a page needs to follow
/// an operation exposed. No cookies are involved (credentials travel in `Authorization` and
/// `X-API-Key`), so `*` is safe to allow. `None` for no origins.
fn cors_policy(origins: &[String]) -> Result<Option<CorsLayer>, ConfigError> {
    use axum::http::{HeaderValue, Method, header};
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Ok(None);
    }
    let allow_origin = if origins == ["*"] {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|origin| {
                let url = url::Url::parse(origin).ok().filter(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.path() == "/"
                        && !origin.ends_with('/')
                });
                url.and_then(|_| HeaderValue::from_str(origin).ok()).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "GATEWAY_CORS_ORIGINS: {origin:?} is not an origin (scheme://host[:port], no path) or *"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    let name = HeaderName::from_static;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                name("idempotency-key"),
                name("prefer"),
                name("callback-url"),
                name("x-api-key"),
                name("last-event-id"),
                name("traceparent"),
                name("tracestate"),
                name("x-request-id"),
                // A result read by parts, or revalidated.
                header::RANGE,
                header::IF_RANGE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                header::ETAG,
                header::CONTENT_RANGE,
                header::ACCEPT_RANGES,
                name("idempotency-key"),
                name("idempotent-replayed"),
                name("preference-applied"),
                name("x-request-id"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    ))
}
