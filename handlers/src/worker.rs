//! The worker API: register one async handler per route, then [`Worker::run`] consumes each route's
//! requests and answers them through the results stream.
//!
//! For every delivered request the worker, in this order:
//! 1. skips the handler when the operation already has a terminal record (a redelivery after a
//!    reply was stored, or a duplicate), and acks;
//! 2. writes the `expired` marker instead of running the handler when the deadline has passed;
//! 3. runs the handler; on error it naks with back-off, so JetStream redelivers later;
//! 4. writes the reply first-writer-wins ([`crate::jetstream::publish_result`]) and acks the
//!    request only after JetStream acknowledged the reply. A crash anywhere before that ack means
//!    a redelivery, and step 1 makes the redelivery cheap and harmless.
//!
//! A handler may run more than once for one operation (a crash after the handler, before the
//! reply's ack), but only one reply is ever stored and served: handlers with side effects outside
//! the reply must tolerate re-execution.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::contract::{
    ContractError, Outcome, Request, ResultRecord, Subjects, header, header_str,
};
// The handler API lived here before it had a file of its own; worker code that imports it from
// `handlers::worker` keeps working.
pub use crate::handler::{Handler, HandlerError, Permanent, Response, RetryAfter};
use crate::jetstream::{JetStreamError, ResultWrite, ack, last_on_subject};
use crate::progress::{Progress, ProgressReporter};
use crate::retry::{RetryState, retried_status};
use crate::stateful::{self, Committed, Decision, Outbox, StateError, StateStore, StatefulHandler};

/// Worker settings. The defaults match the gateway's defaults.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub subjects: Subjects,
    pub requests_stream: String,
    pub results_stream: String,
    /// Durable consumer name is `<consumer_prefix>-<route>`; workers sharing it share the work.
    pub consumer_prefix: String,
    /// How long a delivery may stay unacknowledged before JetStream redelivers it.
    pub ack_wait: Duration,
    /// Handler attempts per request. The consumer allows one delivery more
    /// (`max_deliver + 1` in JetStream): it never runs the handler, it only ends an operation
    /// whose every attempt crashed or stalled (`failed`), so that the last attempt's loss cannot
    /// leave it pending.
    pub max_deliver: i64,
    /// Requests handled at once per route.
    pub max_in_flight: usize,
    /// How long past a request's deadline this worker waits before deciding `expired` itself:
    /// the largest clock difference expected with the gateways (their `GATEWAY_EXPIRY_GRACE`).
    pub expiry_grace: Duration,
    /// First redelivery delay after a handler error; doubles per delivery up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// A reply body larger than this many bytes goes to the Object Store bucket its request
    /// names (`Gw-Reply-Bucket`), and the terminal record names the object; without a bucket
    /// it stays in the message, up to the server's `max_payload`.
    pub reply_inline_max: usize,
    /// Read a request body kept in the Object Store (contract 3) into `request.body` before the
    /// handler runs (the default). Off, the handler gets `request.body_object` and reads it
    /// itself, streamed ([`crate::claim_check::open_body`]), as `gateway dispatch` does.
    pub fetch_bodies: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            subjects: Subjects::default(),
            requests_stream: crate::contract::DEFAULT_REQUESTS_STREAM.to_owned(),
            results_stream: crate::contract::DEFAULT_RESULTS_STREAM.to_owned(),
            consumer_prefix: crate::contract::DEFAULT_CONSUMER_PREFIX.to_owned(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            max_in_flight: 16,
            expiry_grace: Duration::ZERO,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            reply_inline_max: DEFAULT_REPLY_INLINE_MAX,
            fetch_bodies: true,
        }
    }
}

/// Reply bodies above 512 KiB go to the Object Store where the request allows: half of
/// nats-server's default `max_payload` (1 MiB), which leaves room for the headers and, on a
/// stateful route, for the outbox's base64 (4/3 of the body) in the processed marker.
pub const DEFAULT_REPLY_INLINE_MAX: usize = 512 * 1024;

/// Deliveries past the handler's attempts that only end the operation.
const FINALIZING_DELIVERIES: i64 = 1;

/// How long a request of a newer wire contract waits before it is offered again.
const UNKNOWN_CONTRACT_DELAY: Duration = Duration::from_secs(30);

impl WorkerConfig {
    /// The durable consumer of `route`'s requests: `<consumer_prefix>-<route>`.
    fn consumer_config(&self, route: &str) -> pull::Config {
        pull::Config {
            durable_name: Some(format!("{}-{route}", self.consumer_prefix)),
            filter_subject: self.subjects.route_requests(route),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver.saturating_add(FINALIZING_DELIVERIES),
            // No more deliveries outstanding than can be handled at once, so none waits in a
            // buffer while its AckWait runs out.
            max_ack_pending: i64::try_from(self.max_in_flight).unwrap_or(i64::MAX),
            ..Default::default()
        }
    }

    fn retry_delay(&self, delivered: i64) -> Duration {
        let exponent = u32::try_from(delivered.saturating_sub(1))
            .unwrap_or(0)
            .min(16);
        self.retry_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.retry_max)
    }
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot open stream {stream}: {detail}")]
    Stream { stream: String, detail: String },
    #[error("cannot create consumer {consumer}: {detail}")]
    Consumer { consumer: String, detail: String },
    #[error("max_deliver must be at least 1 (the handler's attempts), not {0}")]
    MaxDeliver(i64),
}

/// Counters a worker keeps; tests and operators read them.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Replies this worker stored.
    pub replied: AtomicU64,
    /// Deliveries acked without running the handler: the operation already had a result.
    pub skipped: AtomicU64,
    /// Replies refused because a different result had won first.
    pub conflicts: AtomicU64,
    /// Deliveries whose operation was cancelled (the reply dropped, or the cancellation
    /// published).
    pub cancelled: AtomicU64,
    /// Operations this worker found past their deadline and ended `expired`.
    pub expired: AtomicU64,
    /// Handler errors (panics and unreplayable replies included).
    pub handler_errors: AtomicU64,
    /// Failed attempts offered again later (a nak with the back-off delay).
    pub retried: AtomicU64,
    /// Operations this worker ended `failed`: a [`Permanent`] error, an error on the last
    /// delivery, or attempts used up (counted once the decision is published).
    pub failed: AtomicU64,
}

/// A set of route handlers sharing one JetStream connection.
pub struct Worker {
    js: jetstream::Context,
    config: Arc<WorkerConfig>,
    routes: Vec<(String, RouteHandler)>,
    stats: Arc<WorkerStats>,
}

impl Worker {
    pub fn new(js: jetstream::Context, config: WorkerConfig) -> Self {
        Self {
            js,
            config: Arc::new(config),
            routes: Vec::new(),
            stats: Arc::default(),
        }
    }

    /// Registers the handler of a route.
    pub fn route(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.routes
            .push((name.into(), RouteHandler::Stateless(Arc::new(handler))));
        self
    }

    /// Registers a stateful handler (see [`crate::stateful`]): state changes and the reply commit
    /// atomically in `store`, at most once per operation.
    pub fn stateful_route(
        mut self,
        name: impl Into<String>,
        store: StateStore,
        handler: impl StatefulHandler,
    ) -> Self {
        self.routes.push((
            name.into(),
            RouteHandler::Stateful(Arc::new(store), Arc::new(handler)),
        ));
        self
    }

    /// The worker's counters.
    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// Consumes every registered route until `shutdown` is cancelled. Deliveries in flight at
    /// shutdown are finished first.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        // JetStream reads 0 and -1 as "unlimited": no attempt would ever be the last.
        if self.config.max_deliver < 1 {
            return Err(WorkerError::MaxDeliver(self.config.max_deliver));
        }
        // No stream info: a worker confined by NATS permissions to its route need not read the
        // stream's state (a missing stream fails the consumer's creation instead).
        let stream = self
            .js
            .get_stream_no_info(&self.config.requests_stream)
            .await
            .map_err(|e| WorkerError::Stream {
                stream: self.config.requests_stream.clone(),
                detail: e.to_string(),
            })?;
        let mut tasks = tokio::task::JoinSet::new();
        for (route, handler) in self.routes {
            let route_worker = RouteWorker {
                js: self.js.clone(),
                stream: stream.clone(),
                consumer_config: self.config.consumer_config(&route),
                config: self.config.clone(),
                handler,
                stats: self.stats.clone(),
            };
            let consumer = route_worker.create_consumer().await?;
            tasks.spawn(route_worker.consume(consumer, shutdown.clone()));
        }
        while let Some(finished) = tasks.join_next().await {
            if let Err(error) = finished {
                tracing::error!(%error, "A route's consumer task ended abnormally.");
            }
        }
        Ok(())
    }
}

struct RouteWorker {
    js: jetstream::Context,
    /// The requests stream, and this route's durable consumer on it: created at start, and
    /// created again whenever it disappears (deleted by an operator, or its stream re-created).
    stream: jetstream::stream::Stream<()>,
    consumer_config: pull::Config,
    config: Arc<WorkerConfig>,
    handler: RouteHandler,
    stats: Arc<WorkerStats>,
}

/// A delivery's attempt number, for the retry state (1 is the first).
fn attempt_number(delivered: i64) -> u32 {
    u32::try_from(delivered.max(1)).unwrap_or(u32::MAX)
}

impl RouteWorker {
    /// Where the operation's progress reports (and retry states) go, kept as long as it.
    fn reporter(&self, request: &Request) -> ProgressReporter {
        ProgressReporter::new(
            self.js.clone(),
            self.config.subjects.progress_of(request),
            request.retention_secs.map(Duration::from_secs),
        )
    }

    fn consumer_name(&self) -> &str {
        self.consumer_config
            .durable_name
            .as_deref()
            .unwrap_or_default()
    }

    /// Creates the route's durable consumer, or finds it (creating an existing durable with the
    /// same configuration is a no-op).
    async fn create_consumer(
        &self,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, WorkerError> {
        self.stream
            .create_consumer(self.consumer_config.clone())
            .await
            .map_err(|e| WorkerError::Consumer {
                consumer: self.consumer_name().to_owned(),
                detail: e.to_string(),
            })
    }

    async fn consume(
        self,
        mut consumer: jetstream::consumer::Consumer<pull::Config>,
        shutdown: CancellationToken,
    ) {
        let this = Arc::new(self);
        while !shutdown.is_cancelled() {
            match consumer.messages().await {
                Ok(messages) => {
                    messages
                        .take_until(shutdown.cancelled())
                        // A consumer that is gone never delivers again: stop and re-create it.
                        .take_while(|delivery| {
                            let gone = matches!(delivery, Err(error) if matches!(
                                error.kind(),
                                MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders
                            ));
                            std::future::ready(!gone)
                        })
                        .for_each_concurrent(this.config.max_in_flight, |delivery| {
                            let this = this.clone();
                            async move {
                                match delivery {
                                    Ok(message) => this.process(message).await,
                                    Err(error) => tracing::debug!(%error, "Pull stream hiccup."),
                                }
                            }
                        })
                        .await;
                }
                Err(error) => tracing::warn!(%error, "Cannot pull requests; retrying."),
            }
            if shutdown.is_cancelled() {
                break;
            }
            tracing::warn!(
                consumer = this.consumer_name(),
                "The route's consumer is gone or unreachable; creating it again."
            );
            loop {
                match this.create_consumer().await {
                    Ok(created) => {
                        consumer = created;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Cannot create the route's consumer yet; retrying.");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        }
    }

    async fn process(&self, message: jetstream::Message) {
        let info = message.info().ok();
        let headers = message.headers.clone().unwrap_or_default();
        let request = match Request::from_parts(headers, message.payload.clone()) {
            Ok(request) => request,
            Err(error @ ContractError::UnknownContract(_)) => {
                // A newer gateway wrote it: left for a worker of that release (redelivered after
                // the delay, until one takes it or the consumer's max_deliver ends it).
                tracing::error!(%error, subject = %message.subject, "Request written under a newer wire contract; upgrade this worker.");
                ack(&message, AckKind::Nak(Some(UNKNOWN_CONTRACT_DELAY))).await;
                return;
            }
            Err(error) => {
                tracing::error!(%error, subject = %message.subject, "Request breaks the wire contract; terminating it.");
                ack(&message, AckKind::Term).await;
                return;
            }
        };
        let mut request = request;
        let op = request.operation_id.clone();
        let now = OffsetDateTime::now_utc();
        if let Some(due) = request.not_before
            && now < due
        {
            // A delayed start, delivered early: offered back when due. JetStream holds a
            // nak'ed message for the delay asked (the ACK protocol's `-NAK {"delay": ns}`).
            let wait = (due - now).unsigned_abs();
            tracing::debug!(operation_id = %op, due_in = ?wait, "Not due yet; offered back when due.");
            ack(&message, AckKind::Nak(Some(wait))).await;
            return;
        }
        // A body in the Object Store: read before anything runs (a read that fails is tried
        // again; the deliveries it spends are bounded by max_deliver, as a handler's are).
        if let Some(object) = request.body_object.clone()
            && self.config.fetch_bodies
        {
            match crate::claim_check::fetch_body(&self.js, &object).await {
                Ok(body) => request.body = body,
                Err(error) => {
                    tracing::warn!(operation_id = %op, %error, "Cannot read the request's body yet; trying again.");
                    ack(&message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    return;
                }
            }
        }
        // Attempts, not deliveries: a delayed request's first delivery came before it was due
        // and ran nothing. (A second early delivery, after a crash before the nak, costs one.)
        let early = request
            .not_before
            .zip(info.as_ref().map(|i| i.published))
            .is_some_and(|(due, published)| due > published);
        let delivered = info
            .as_ref()
            .map(|i| i.delivered)
            .unwrap_or(1)
            .saturating_sub(i64::from(early))
            .max(1);
        let policy = request.retry_policy.clone();
        let reporter = self.reporter(&request);
        // The span continues the trace the gateway started for the HTTP request, so the handler's
        // work and the reply belong to it.
        let span =
            tracing::info_span!("handle", route = %request.route, operation_id = %op, delivered);
        crate::trace::continue_trace(&span, &request.headers);
        let answered = self
            .answer(&message, request, delivered)
            .instrument(span.clone())
            .await;
        match answered {
            Ok(Answered::Replied {
                write,
                terminate,
                decided,
            }) => {
                let stateful = matches!(self.handler, RouteHandler::Stateful(..));
                match &write {
                    // A commit's outbox loses the results slot only when something wrote it
                    // without the arbiter: state changed, outcome says otherwise.
                    ResultWrite::Conflict { existing } if stateful && decided.is_none() => {
                        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(operation_id = %op, stored_status = existing.status, stored_outcome = ?existing.outcome, "A committed stateful operation's outcome was decided without its state store: every gateway replica must declare the route's `state`, and other writers must go through the store.");
                    }
                    ResultWrite::Conflict { existing }
                        if existing.outcome == Outcome::Cancelled =>
                    {
                        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(operation_id = %op, "Operation was cancelled while handled; reply dropped.");
                    }
                    ResultWrite::Conflict { existing } => {
                        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(operation_id = %op, stored_status = existing.status, "A different result was already stored; this reply is dropped.");
                    }
                    // Counted by what was published, which is what the arbiter decided: a
                    // failure decided here may have lost to a commit, and the other way round.
                    ResultWrite::Stored | ResultWrite::AlreadyStored => {
                        let counter = match decided {
                            None => &self.stats.replied,
                            Some(Decision::Failed) => &self.stats.failed,
                            Some(Decision::Cancelled) => &self.stats.cancelled,
                            Some(Decision::Expired) => &self.stats.expired,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                crate::faults::crash_point("after-publish");
                let kind = if terminate {
                    AckKind::Term
                } else {
                    AckKind::Ack
                };
                ack(&message, kind).await;
            }
            Ok(Answered::AlreadyDone) => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                ack(&message, AckKind::Ack).await;
            }
            Err(Failure::Handler(error)) => {
                let backoff = match &policy {
                    Some(policy) => policy.delay(attempt_number(delivered), fastrand::f64()),
                    None => self.config.retry_delay(delivered),
                };
                // Asked to wait (an upstream's Retry-After): not before then.
                let delay = match error.downcast_ref::<RetryAfter>() {
                    Some(asked) => asked.delay.min(RetryAfter::MAX).max(backoff),
                    None => backoff,
                };
                tracing::warn!(operation_id = %op, delivered, retry_in = ?delay, %error, "Handler failed; request will be redelivered.");
                // Where retries stand, for the status resource. Advisory: a lost report costs
                // information, and the nak below goes out whatever happens to it.
                let next = OffsetDateTime::now_utc() + delay;
                let state = RetryState::failed(attempt_number(delivered), &error.to_string(), next);
                if let Err(error) = reporter
                    .publish(Progress::new(None, "").with_retry(Some(state)))
                    .await
                {
                    tracing::debug!(operation_id = %op, %error, "Retry state not reported.");
                }
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                ack(&message, AckKind::Nak(Some(delay))).await;
            }
            Err(Failure::JetStream(error)) => {
                let delay = self.config.retry_delay(delivered);
                tracing::warn!(operation_id = %op, delivered, %error, "Cannot store the reply; request will be redelivered.");
                ack(&message, AckKind::Nak(Some(delay))).await;
            }
        }
    }

    async fn answer(
        &self,
        message: &jetstream::Message,
        request: Request,
        delivered: i64,
    ) -> Result<Answered, Failure> {
        let client = self.js.client();
        let results = &self.config.results_stream;
        // Watch before looking, so that a cancellation landing in between is not missed.
        let _watching =
            watch_cancellation(&client, &request.reply_subject, &request.cancellation).await;
        let slot_stream = request.reply_stream_or(results);
        if last_on_subject(&client, slot_stream, &request.reply_subject)
            .await?
            .is_some()
        {
            return Ok(Answered::AlreadyDone);
        }
        // What the operation keeps lives as long as its request (progress reports, the
        // processed marker); the reply's own lifetime is the request's business (`project`).
        let ttl = request.retention_secs.map(Duration::from_secs);
        let head = request.head.clone();
        let op = head.operation_id.clone();
        let trace = crate::trace::outgoing(&tracing::Span::current(), &request.headers);
        let publish = |marker: Outbox, terminate| {
            let (head, trace) = (&head, trace.clone());
            async move {
                let write = stateful::project(&self.js, head, results, &marker, trace).await?;
                Ok(Answered::Replied {
                    write,
                    terminate,
                    decided: marker.decided(),
                })
            }
        };
        // A stateful operation that was decided already (committed, or cancelled, expired or
        // failed without a commit) is published as decided and never decided again: a committed
        // outbox rolls forward, deadline or not.
        if let Some(marker) = self.marker(&op).await? {
            return publish(marker, false).await;
        }
        // The route's policy may allow fewer attempts than the consumer; never more.
        let attempts = match &request.retry_policy {
            Some(policy) => self
                .attempts(delivered)
                .await
                .min(i64::from(policy.attempts)),
            None => self.attempts(delivered).await,
        };
        let (record, terminate) = if delivered > attempts {
            // Past the handler's attempts: its earlier deliveries crashed or stalled. This one
            // only ends the operation.
            let detail = format!(
                "The handler's {attempts} attempts were used up without an answer (crashed or stalled)."
            );
            (handler_failed(&op, &detail), false)
        } else if OffsetDateTime::now_utc() > request.deadline + self.config.expiry_grace {
            tracing::info!(operation_id = %op, delivered, "Deadline passed before handling; marking the operation expired.");
            (ResultRecord::expired(&op, request.deadline), false)
        } else if let Some(start_by) = request.start_by
            && delivered == 1
            && OffsetDateTime::now_utc() >= start_by
        {
            // Judged before the first attempt only (a retry continues what started), by this
            // worker's clock, with no allowance: a handler never starts after its start-by by
            // that clock.
            tracing::info!(operation_id = %op, delivered, "Start-by passed before handling; marking the operation expired, unrun.");
            (ResultRecord::not_started(&op, start_by), false)
        } else {
            let mut request = request;
            request.progress = self.reporter(&request);
            if delivered > 1 {
                // A retry: its reports say which attempt they come from.
                request.progress = request.progress.in_attempt(attempt_number(delivered));
            }
            match self.run_handler(message, request).await {
                Ok(marker) => return publish(marker, false).await,
                Err(error) => {
                    self.stats.handler_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(p) = error.downcast_ref::<Permanent>() {
                        let status = p.status.clamp(400, 599);
                        let problem = ResultRecord::problem(
                            Outcome::Reply,
                            &op,
                            status,
                            "handler-rejected",
                            &p.title,
                            &p.detail,
                        );
                        (problem, true)
                    } else if delivered >= attempts {
                        // The last attempt: end the operation `failed` rather than leave it
                        // pending until it expires.
                        let detail = format!(
                            "The handler failed on all {delivered} deliveries; the last error: {error}"
                        );
                        (handler_failed(&op, &detail), false)
                    } else {
                        return Err(Failure::Handler(error));
                    }
                }
            }
        };
        // Every decision goes through the arbiter: on a stateful route a create-if-absent marker,
        // so it cannot overrule a commit (what won is published instead); on a stateless route
        // the result slot itself, first writer wins.
        let marker = match &self.handler {
            RouteHandler::Stateless(_) => Outbox::decision(&record),
            RouteHandler::Stateful(store, _) => store
                .decide(&op, &record, ttl)
                .await
                .map_err(state_failure)?,
        };
        publish(marker, terminate).await
    }

    /// The handler's attempts on this route: what the durable consumer allows, less the spare
    /// delivery. Processes with other settings may have updated the shared consumer since this one
    /// created it, so a redelivery asks the consumer. (A first delivery is taken to be within the
    /// attempts; should the consumer allow only one, its spare delivery finalizes.)
    async fn attempts(&self, delivered: i64) -> i64 {
        if delivered <= 1 {
            return self.config.max_deliver;
        }
        match self.stream.consumer_info(self.consumer_name()).await {
            Ok(info) if info.config.max_deliver > FINALIZING_DELIVERIES => {
                let attempts = info.config.max_deliver - FINALIZING_DELIVERIES;
                if attempts != self.config.max_deliver {
                    tracing::debug!(
                        consumer = self.consumer_name(),
                        attempts,
                        configured = self.config.max_deliver,
                        "The shared consumer allows a different number of attempts than configured here; following the consumer."
                    );
                }
                attempts
            }
            _ => self.config.max_deliver,
        }
    }

    /// The marker of a stateful route's operation (`None` on stateless routes).
    async fn marker(&self, op: &str) -> Result<Option<Outbox>, Failure> {
        match &self.handler {
            RouteHandler::Stateless(_) => Ok(None),
            RouteHandler::Stateful(store, _) => store.marker(op).await.map_err(state_failure),
        }
    }

    /// Runs the handler, keeping the delivery's lease alive (`+WPI` every third of AckWait), and
    /// turns its answer into a record. A panic or a reply the contract cannot carry is an error
    /// like any other.
    async fn run_handler(
        &self,
        message: &jetstream::Message,
        request: Request,
    ) -> Result<Outbox, HandlerError> {
        let work = async {
            match &self.handler {
                RouteHandler::Stateless(handler) => {
                    let policy = request.retry_policy.clone();
                    let head = request.head.clone();
                    let record = handler.call(request).await?.into_record();
                    record.validate()?;
                    retried_status(policy.as_ref(), record.status)?;
                    let record = crate::claim_check::store_reply(
                        &self.js,
                        &head,
                        record,
                        self.config.reply_inline_max,
                    )
                    .await?;
                    Ok(Outbox::reply_of(&record))
                }
                RouteHandler::Stateful(store, handler) => {
                    // The request (and every marker that could refuse this commit) lives until
                    // its publish time plus its retention.
                    let commit_by =
                        message
                            .info()
                            .ok()
                            .zip(request.retention_secs)
                            .map(|(info, secs)| {
                                info.published + Duration::from_secs(secs)
                                    - self.config.expiry_grace
                            });
                    let inline_max = self.config.reply_inline_max;
                    match stateful::run(store, handler.as_ref(), request, commit_by, inline_max)
                        .await?
                    {
                        Committed::Now(marker) | Committed::Before(marker) => Ok(marker),
                    }
                }
            }
        };
        let handler = AssertUnwindSafe(work).catch_unwind();
        tokio::pin!(handler);
        let mut lease = tokio::time::interval(self.config.ack_wait / 3);
        lease.tick().await;
        let outcome = loop {
            tokio::select! {
                outcome = &mut handler => break outcome,
                _ = lease.tick() => ack(message, AckKind::Progress).await,
            }
        };
        outcome.map_err(|_| HandlerError::from("the handler panicked"))?
    }
}

/// A route's handler: stateless, or stateful with the store it commits to.
#[derive(Clone)]
enum RouteHandler {
    Stateless(Arc<dyn Handler>),
    Stateful(Arc<StateStore>, Arc<dyn StatefulHandler>),
}

enum Answered {
    /// A terminal record was written (or found); `terminate` ends the delivery with +TERM;
    /// `decided` is how the published marker ended the operation (`None`: a reply or a commit).
    Replied {
        write: ResultWrite,
        terminate: bool,
        decided: Option<Decision>,
    },
    AlreadyDone,
}

enum Failure {
    Handler(HandlerError),
    JetStream(JetStreamError),
}

/// The `failed` record of an operation the handler could not answer: a 500 `handler-failed`
/// problem saying why.
fn handler_failed(operation_id: &str, detail: &str) -> ResultRecord {
    ResultRecord::problem(
        Outcome::Reply,
        operation_id,
        500,
        "handler-failed",
        "Handler failed",
        detail,
    )
}

/// A state store that cannot be read or written now: like a JetStream error, the delivery is
/// retried.
fn state_failure(error: StateError) -> Failure {
    Failure::JetStream(JetStreamError::Get {
        stream: "state".to_owned(),
        detail: error.to_string(),
    })
}

impl From<JetStreamError> for Failure {
    fn from(e: JetStreamError) -> Self {
        Failure::JetStream(e)
    }
}

/// Cancels `token` when the operation's `cancelled` marker is published, until the returned guard
/// is dropped. One core subscription per delivery in flight; without one (NATS unreachable), the
/// handler simply runs to the end and its reply loses to the marker.
async fn watch_cancellation(
    client: &async_nats::Client,
    result_subject: &str,
    token: &CancellationToken,
) -> Option<AbortOnDrop> {
    let mut subscription = client.subscribe(result_subject.to_owned()).await.ok()?;
    let token = token.clone();
    let task = tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            let headers = message.headers.unwrap_or_default();
            if header_str(&headers, header::OUTCOME) == Some("cancelled") {
                token.cancel();
                break;
            }
        }
    });
    Some(AbortOnDrop(task))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let c = WorkerConfig {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..Default::default()
        };
        assert_eq!(c.retry_delay(1), Duration::from_millis(100));
        assert_eq!(c.retry_delay(2), Duration::from_millis(200));
        assert_eq!(c.retry_delay(4), Duration::from_millis(800));
        assert_eq!(c.retry_delay(5), Duration::from_secs(1));
        assert_eq!(c.retry_delay(1000), Duration::from_secs(1));
    }
}
