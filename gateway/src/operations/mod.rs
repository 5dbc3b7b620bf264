//! THE CORE: operations read and written in JetStream. Never names axum, hyper or tower: what
//! comes in is a [`Submission`] or an operation id, what goes out is an [`Operation`] (the model)
//! or one of this module's errors, which the edge maps to problem+json.
//!
//! [`Operations`] is the one handle the edge holds: accept, find, wait, cancel, readiness. Below
//! it, by level:
//! - [`model`]: `Operation`, `Status`, stored results, progress and delivery states (data only);
//!   [`view`]: the one client-facing JSON of an operation;
//! - [`idempotency`]: key tokens, operation ids, fingerprints, the key's sf-string form (pure);
//! - `store`: the JetStream connection, provisioning, and the request path's reads and writes;
//!   `watch`: the waiter registry and the ordered consumers that wake it;
//!   `recent_keys`: the keys this replica answered lately (a hint that a submission is a retry);
//! - `accept` (create-if-absent, read back, compare) and `lookup` (read, settle expiry, wait,
//!   cancel);
//! - [`quota`]: per-tenant quotas, from a ledger every replica derives from the streams;
//! - [`webhooks`] (the delivery loop), `destination` (the SSRF guard), `retry_after` (backlog-based
//!   `Retry-After`).

mod accept;
mod batch;
mod destination;
mod finalizer;
pub mod idempotency;
mod lookup;
pub mod model;
pub mod quota;
mod recent_keys;
mod redrive;
mod retry_after;
mod schedules;
mod store;
pub mod view;
mod watch;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use accept::{AcceptError, Accepted, RequestMessage, Start, Submission};
pub use batch::{Batch, BatchAccepted, BatchError, BatchSubmission, MAX_BATCH_ITEMS};
pub use destination::{DestinationError, check_destination};
pub use lookup::{Cancellation, WakeOn};
pub use model::{
    DeliveryState, Operation, ProgressState, ResultBody, RetryView, Status, StoredResult,
};
pub use quota::{Limit, QuotaExceeded, QuotaLimits};
pub use redrive::{FailedPage, Redrive, RedriveError};
pub use retry_after::RetryAfter;
pub use store::{StoreError, StreamPlan};
pub use view::{Links, OperationView, operation_path};
pub use webhooks::{WebhookError, Webhooks};

use crate::config::{JetStreamSettings, RouteConfig, WebhookSettings};
use crate::lifecycle::{Lifecycle, sleep_or_stop};
use quota::Quotas;
use store::Store;
use watch::{Followed, Watch};

/// The edge's one handle on operations: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Operations {
    store: Arc<Store>,
    watch: Watch,
    retry_after: RetryAfter,
    /// Per-tenant quotas, when any is set.
    quotas: Option<Arc<Quotas>>,
    /// The routes, for redrives (which re-submit on an operation's route).
    routes: Arc<[RouteConfig]>,
}

/// The background work of [`Operations::start`]: the routes' worker consumers (for
/// `Retry-After`), and the webhook loop when webhooks are on.
pub struct Background {
    /// (route name, its workers' durable consumer).
    pub consumers: Vec<(String, String)>,
    /// Upper bound of a computed `Retry-After`, seconds.
    pub retry_after_max_secs: u64,
    pub webhooks: Option<Webhooks>,
}

impl Operations {
    /// Connects to JetStream in the background: the handle works once NATS is reachable and
    /// [`Operations::start`] has provisioned the streams; until then calls fail with
    /// [`StoreError::NotReady`].
    pub async fn connect(
        settings: &JetStreamSettings,
        routes: &[RouteConfig],
        retry_after: RetryAfter,
        lifecycle: Lifecycle,
        quotas: QuotaLimits,
    ) -> Result<Self, StoreError> {
        let stateful: Vec<_> = routes
            .iter()
            .filter_map(|r| Some((r.name.clone(), r.state.clone()?, r.retention)))
            .collect();
        Ok(Self {
            store: Arc::new(Store::connect(settings, &stateful).await?),
            watch: Watch::new(lifecycle),
            retry_after,
            quotas: Quotas::new(quotas),
            routes: routes.into(),
        })
    }

    /// The webhook delivery loop, or `None` when no webhook can ever be asked for (no allow-list,
    /// no route `callback_url`, no tenant with its own receivers: `tenant_receivers`). Warns about
    /// each route whose retention can end before the last retry would be due (for a result that
    /// lands at the deadline): a notification still failing then is abandoned with its operation.
    pub fn webhooks(
        &self,
        settings: &WebhookSettings,
        routes: &[RouteConfig],
        tenant_receivers: bool,
    ) -> Result<Option<Webhooks>, WebhookError> {
        let other_receivers = tenant_receivers || routes.iter().any(|r| r.callback_url.is_some());
        let webhooks = Webhooks::new(self.store.clone(), settings, other_receivers)?;
        if let Some(webhooks) = &webhooks {
            // A result can land as late as the deadline (plus the skew allowance), and its
            // retries follow from there.
            let horizon = webhooks.retry_horizon();
            let grace = self.store.expiry_grace();
            let short = |r: &&RouteConfig| r.retention < r.timeout + grace + horizon;
            for route in routes.iter().filter(short) {
                tracing::warn!(
                    route = %route.name,
                    retention_secs = route.retention.as_secs(),
                    retry_horizon_secs = horizon.as_secs(),
                    "The route's retention ends before the webhook's last retry would be due; \
                     a notification still failing then is abandoned with its operation."
                );
            }
        }
        Ok(webhooks)
    }

    /// Starts what runs beside the requests until `stop`: the two watches that wake waiters,
    /// the `Retry-After` estimates, the webhook loop, and provisioning (retried while NATS is
    /// unreachable). The returned task ends with provisioning; a configuration the server cannot
    /// honour (a body limit above its max_payload) cancels `stop` and is its error.
    pub fn start(
        &self,
        plan: StreamPlan,
        background: Background,
        stop: CancellationToken,
    ) -> JoinHandle<Result<(), StoreError>> {
        let store = &self.store;
        let [results, outcomes] = store.result_streams();
        for ((stream, subjects), followed) in [
            (results, Followed::Results),
            (outcomes, Followed::Results),
            (
                (store.events_stream(), store.subjects().all_progress()),
                Followed::Progress,
            ),
        ] {
            tokio::spawn(self.watch.clone().follow(
                store.jetstream().clone(),
                store.connections(),
                stream.to_owned(),
                subjects,
                followed,
                stop.clone(),
            ));
        }
        let consumers = background
            .consumers
            .iter()
            .map(|(_, c)| c.clone())
            .collect();
        tokio::spawn(finalizer::Finalizer::new(store.clone(), consumers).run(stop.clone()));
        tokio::spawn(redrive::index_failures(store.clone(), stop.clone()));
        if let Some(quotas) = &self.quotas {
            tokio::spawn(quotas.clone().follow(store.clone(), stop.clone()));
        }
        tokio::spawn(self.retry_after.clone().follow(
            store.clone(),
            background.consumers,
            background.retry_after_max_secs,
            stop.clone(),
        ));
        let webhook_consumer = background.webhooks.map(|webhooks| {
            let consumer = webhooks.consumer_config();
            tokio::spawn(webhooks.run(stop.clone()));
            consumer
        });
        tokio::spawn(provision_until_done(
            store.clone(),
            plan,
            webhook_consumer,
            stop,
        ))
    }

    /// Runs the routes file's schedules until `stop`, each tick one operation (see
    /// [`schedules`]).
    pub fn run_schedules(
        &self,
        schedules: Vec<crate::config::ScheduleConfig>,
        routes: &[crate::config::RouteConfig],
        stop: CancellationToken,
    ) {
        for schedule in schedules {
            let route = routes
                .iter()
                .find(|r| r.name == schedule.route)
                .expect("validated: a schedule names a route")
                .clone();
            tokio::spawn(schedules::run(self.clone(), schedule, route, stop.clone()));
        }
    }

    /// Accepts a submission as exactly one request message, or finds the operation it repeats.
    pub async fn accept(&self, submission: Submission<'_>) -> Result<Accepted, AcceptError> {
        accept::accept(&self.store, self.quotas.as_deref(), submission).await
    }

    /// Stores the body of a submission too large for a message, read from `body` (at most
    /// `limit` bytes), in the Object Store; `Some` when the key names a request already (a
    /// replay; nothing stored). Then [`Operations::accept_uploaded`] accepts it, or
    /// [`Operations::forget_upload`] removes the body (see [`accept::upload_large`]).
    pub async fn upload_large(
        &self,
        submission: &mut Submission<'_>,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
        limit: u64,
    ) -> Result<Option<Accepted>, AcceptError> {
        accept::upload_large(&self.store, submission, body, limit).await
    }

    /// Accepts a submission whose body [`Operations::upload_large`] stored.
    pub async fn accept_uploaded(
        &self,
        submission: Submission<'_>,
    ) -> Result<Accepted, AcceptError> {
        accept::accept_uploaded(&self.store, self.quotas.as_deref(), submission).await
    }

    /// Removes the body [`Operations::upload_large`] stored for a submission refused after all.
    pub async fn forget_upload(&self, submission: &Submission<'_>) {
        accept::forget_upload(&self.store, submission).await;
    }

    /// Accepts a batch of submissions as one atomic write, all or none, or finds the batch it
    /// repeats (see [`batch`]).
    pub async fn accept_batch(
        &self,
        batch: BatchSubmission<'_>,
    ) -> Result<BatchAccepted, BatchError> {
        batch::accept_batch(&self.store, self.quotas.as_deref(), batch).await
    }

    /// The batch `id` of `tenant`; `None` when there is none (or no longer, or another
    /// tenant's).
    pub async fn find_batch(&self, tenant: &str, id: &str) -> Result<Option<Batch>, StoreError> {
        batch::find_batch(&self.store, tenant, id).await
    }

    /// The operation `id` of `tenant`, with expiry settled; `None` when there is no such
    /// operation, no longer one (retention), or it is another tenant's.
    pub async fn find(&self, tenant: &str, id: &str) -> Result<Option<Operation>, StoreError> {
        lookup::lookup(&self.store, tenant, id).await
    }

    /// Bytes `range` of the body of `operation`'s result (`range` within its size, see
    /// [`StoredResult::representation`]): from the message, or read from the Object Store as
    /// it is sent (see the store's `read_reply_body` for its errors). `None` when it has no
    /// result.
    pub async fn result_body(
        &self,
        operation: &Operation,
        range: std::ops::Range<u64>,
    ) -> Result<Option<ResultBody>, StoreError> {
        let Some(result) = &operation.result else {
            return Ok(None);
        };
        let body = match &result.record.body_object {
            Some(object) => ResultBody::Streamed(
                self.store
                    .read_reply_body(&operation.request, object, range)
                    .await?,
            ),
            None => {
                let (start, end) = (range.start as usize, range.end as usize);
                ResultBody::Inline(result.record.body.slice(start..end))
            }
        };
        Ok(Some(body))
    }

    /// Like [`Operations::find`], then waits until `wake_on` is met or `until` passes, or the
    /// process drains; holds nothing but a waiter registration meanwhile.
    pub async fn wait(
        &self,
        tenant: &str,
        id: &str,
        until: Instant,
        wake_on: WakeOn,
    ) -> Result<Option<Operation>, StoreError> {
        lookup::lookup_when_changed(&self.store, &self.watch, tenant, id, until, wake_on).await
    }

    /// The failed operations of `tenant` on `route`, oldest failure first, from cursor `from`
    /// (0: the start), at most `limit` (see [`redrive`] for the index behind it).
    pub async fn failed(
        &self,
        tenant: &str,
        route: &str,
        from: u64,
        limit: usize,
    ) -> Result<FailedPage, StoreError> {
        redrive::list_failed(&self.store, tenant, route, from, limit).await
    }

    /// Whether the routes file has route `name`.
    pub fn has_route(&self, name: &str) -> bool {
        self.route(name).is_some()
    }

    /// Route `name` as the routes file says.
    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// Checks that failed operation `id` of `tenant` can be redriven and reads what its redrive
    /// resubmits (`operation`: the operation, when already read); `None` when there is no such
    /// operation. Then [`Operations::redrive`].
    pub async fn prepare_redrive(
        &self,
        tenant: &str,
        id: &str,
        operation: Option<Operation>,
    ) -> Result<Option<Redrive>, RedriveError> {
        match operation {
            Some(operation) => redrive::prepare_found(&self.store, &self.routes, operation).await,
            None => redrive::prepare(&self.store, &self.routes, tenant, id).await,
        }
    }

    /// Submits a prepared redrive: a new operation linked both ways, or the one an earlier
    /// redrive made (a replay).
    pub async fn redrive(&self, redrive: Redrive) -> Result<Accepted, RedriveError> {
        redrive::submit(&self.store, self.quotas.as_deref(), redrive).await
    }

    /// Cancels an operation that has no terminal record yet; `None` when there is no such
    /// operation for `tenant`.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<Option<Cancellation>, StoreError> {
        lookup::cancel(&self.store, tenant, id).await
    }

    /// Ready for requests: JetStream connected, streams in place, the results watch running
    /// (so waiters are woken from the first request on), and with quotas, their ledger caught up
    /// with the streams once (so the first requests are counted against what is stored).
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        self.store.check_ready().await?;
        if !self.watch.lifecycle().is_watching_results() {
            return Err(StoreError::NotReady);
        }
        if self.quotas.as_ref().is_some_and(|q| !q.is_ready()) {
            return Err(StoreError::NotReady);
        }
        Ok(())
    }

    /// When `operation`, still without a terminal record, turns `expired`: its deadline plus the
    /// skew allowance.
    pub fn expires_at(&self, operation: &Operation) -> time::OffsetDateTime {
        self.store.expires_at(operation)
    }

    /// Seconds a client should wait before asking about a pending operation of `route` again.
    pub fn retry_after(&self, route: &str) -> u64 {
        self.retry_after.seconds(route)
    }
}

/// Provisions the streams, retrying while NATS is unreachable. A configuration the server cannot
/// honour (a body limit above its max_payload) stops the gateway.
/// How long provisioning retries quietly at start before each failure is a warning.
const PROVISION_QUIET: Duration = Duration::from_secs(5);

async fn provision_until_done(
    store: Arc<Store>,
    plan: StreamPlan,
    webhook_consumer: Option<async_nats::jetstream::consumer::pull::Config>,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    // The client connects in the background, so a clean start's first attempt or two find no
    // connection yet: not worth a warning unless it lasts.
    let started = Instant::now();
    loop {
        match store.provision(&plan, webhook_consumer.as_ref()).await {
            Ok(()) => {
                tracing::info!("JetStream streams provisioned; gateway ready.");
                return Ok(());
            }
            Err(
                fatal @ (StoreError::PayloadLimit { .. }
                | StoreError::Arbiter(handlers::stateful::StateError::Unsuitable { .. })),
            ) => {
                tracing::error!(error = %fatal, "Configuration does not fit the NATS server; stopping.");
                stop.cancel();
                return Err(fatal);
            }
            Err(error) if started.elapsed() < PROVISION_QUIET => {
                tracing::debug!(%error, "Cannot provision streams yet; retrying.");
                if sleep_or_stop(&stop, Duration::from_millis(250)).await {
                    return Ok(());
                }
            }
            Err(error) => {
                tracing::warn!(%error, "Cannot provision streams yet; retrying.");
                if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                    return Ok(());
                }
            }
        }
    }
}
