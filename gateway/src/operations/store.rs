//! The gateway's JetStream: the connection, the three streams it provisions at start, and the few
//! reads and writes the HTTP side needs. The request path reaches JetStream only through here
//! (`watch` and `webhooks` run their own consumers).
//!
//! JetStream is the only source of truth. Nothing here caches an operation, so every replica
//! answers every request the same way, and a restarted replica has lost nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    Config, DirectGetErrorKind, DiscardPolicy, RetentionPolicy, StorageType,
};
use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use handlers::claim_check::ClaimCheckError;
use handlers::contract::{
    BodyObject, ContractError, Outcome, RequestHead, ResultRecord, Subjects, WireContract,
};
use handlers::jetstream::{
    Batcher, CreateOutcome, Grouping, JetStreamError, ResultWrite, create_if_absent, last_matching,
    last_on_subject, last_on_subject_from_leader,
};
use handlers::stateful::{Outbox, StateError, StateStore, project};
use time::OffsetDateTime;

use super::model::{BodyChunks, Operation, ProgressState, StoredResult};
use super::recent_keys::RecentKeys;
use crate::config::JetStreamSettings;
use crate::config::routes::StateStoreConfig;
use crate::metrics::RESULT_CONFLICTS;

/// Errors of the store. All of them leave the outcome of a write unknown or a read undone: the
/// HTTP edge answers 503 and the client retries with the same key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("JetStream is not set up yet (not connected, or streams not provisioned)")]
    NotReady,
    #[error("cannot connect to NATS: {0}")]
    Connect(#[source] async_nats::ConnectError),
    #[error(transparent)]
    Credentials(#[from] crate::config::ConfigError),
    #[error(transparent)]
    JetStream(#[from] JetStreamError),
    /// A body being stored could not be read from the client (it stopped sending, or too
    /// slowly); what was stored of it stays for the bucket's `max_age`.
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    /// As many bodies are read from the Object Store as this process serves at once.
    #[error("as many bodies are being read as this process serves at once")]
    BodyReadsBusy,
    /// A stateful route's state store (its marker, the arbiter) could not be read or written.
    #[error(transparent)]
    Arbiter(#[from] StateError),
    #[error("cannot create the webhook consumer on stream {stream}: {source}")]
    ProvisionConsumer {
        stream: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("cannot provision stream {stream}: {source}")]
    Provision {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(
        "route {route} allows bodies of {max_body} bytes, more than the server's max_payload of {max_payload}"
    )]
    PayloadLimit {
        route: String,
        max_body: usize,
        max_payload: usize,
    },
}

impl From<handlers::contract::ContractError> for StoreError {
    fn from(e: handlers::contract::ContractError) -> Self {
        StoreError::JetStream(e.into())
    }
}

impl StoreError {
    /// A stored message breaks the wire contract: retrying will not help.
    pub fn is_contract_violation(&self) -> bool {
        matches!(self, StoreError::JetStream(JetStreamError::Contract(e)) if !matches!(e, ContractError::Removed { .. }))
    }

    /// The operation's result was removed while its request lives: its slot holds nats-server's
    /// delete marker, which also keeps any other record from taking its place.
    pub fn is_result_removed(&self) -> bool {
        matches!(
            self,
            StoreError::JetStream(JetStreamError::Contract(ContractError::Removed { .. }))
        )
    }

    /// The message was too large for the server; it was refused before being sent.
    pub fn is_too_large(&self) -> bool {
        matches!(self, StoreError::JetStream(e) if e.is_too_large())
    }

    /// An atomic batch's commit was never sent (the connection refused a message first):
    /// nothing was written.
    pub fn is_batch_not_sent(&self) -> bool {
        matches!(
            self,
            StoreError::JetStream(JetStreamError::BatchNotSent { .. })
        )
    }

    /// The stream (or JetStream's storage) had no room: nothing was written.
    pub fn is_store_full(&self) -> bool {
        matches!(self, StoreError::JetStream(e) if e.is_store_full())
    }
}

/// A claim check's failure as the store reports it: a body gone is a removed record (410), one
/// other than named breaks the contract (502), the rest is JetStream being unreachable (503).
fn body_error(error: ClaimCheckError) -> StoreError {
    match error {
        ClaimCheckError::Gone { .. } => ContractError::Removed {
            reason: error.to_string(),
        }
        .into(),
        ClaimCheckError::Mismatch { .. } => ContractError::InvalidHeader {
            name: handlers::contract::header::BODY_DIGEST,
            value: error.to_string(),
        }
        .into(),
        ClaimCheckError::Unavailable { .. } => StoreError::JetStream(error.into()),
        ClaimCheckError::Busy => StoreError::BodyReadsBusy,
    }
}

/// Why a background consumer (the watches, the webhook loop) cannot run now; it retries.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot find the stream: {0}")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    #[error("cannot create the consumer: {0}")]
    Consumer(#[from] async_nats::jetstream::stream::ConsumerError),
    #[error("cannot read messages: {0}")]
    Messages(#[source] async_nats::Error),
}

/// Connection, stream names and subjects.
pub struct Store {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Request publishes go through the batcher: concurrent requests share writes to NATS.
    batcher: Batcher,
    subjects: Subjects,
    requests_stream: String,
    results_stream: String,
    events_stream: String,
    /// The prefix of the Object Store buckets of large request bodies, one per route.
    bodies_bucket: String,
    provisioned: AtomicBool,
    /// The streams have more than one replica: a direct get may come from a lagging follower.
    replicated: AtomicBool,
    /// The state stores of stateful routes, by route name: the arbiters of their outcomes.
    arbiters: HashMap<String, StateStore>,
    /// The skew allowance past a deadline (`GATEWAY_EXPIRY_GRACE`).
    expiry_grace: Duration,
    connections: tokio::sync::watch::Sender<u64>,
    /// Keys this replica answered lately: a submission with one is likely a retry.
    pub(super) recent_keys: RecentKeys,
}

/// What a wildcard read of an operation's slots on any route found, made along with the read of
/// its request, before the exact subject is known ([`Store::result_any_route`],
/// [`Store::progress_any_route`]).
#[derive(Debug)]
pub enum Early {
    /// No such read was made: the exact subject is read.
    NotRead,
    Read {
        stream: String,
        pattern: String,
        /// The last message on any subject `pattern` matches.
        found: Option<StreamMessage>,
    },
}

impl Early {
    /// What the read says about `subject` of `stream`: its last message, or that it has none,
    /// when the read covered it; `None` when the exact subject must be read (no read, another
    /// stream or pattern, or the last match was on another subject, which may hide this one's).
    fn of(self, stream: &str, subject: &str) -> Option<Option<StreamMessage>> {
        let Early::Read {
            stream: read,
            pattern,
            found,
        } = self
        else {
            return None;
        };
        if read != stream || !Subjects::covers(&pattern, subject) {
            return None;
        }
        match found {
            Some(message) if message.subject.as_str() == subject => Some(Some(message)),
            Some(_) => None,
            None => Some(None),
        }
    }
}

/// What provisioning needs to know about the routes.
pub struct StreamPlan {
    pub replicas: usize,
    pub duplicate_window: Duration,
    /// Longest route retention: the streams' `max_age` backstop (messages carry their own TTL).
    pub max_retention: Duration,
    /// (route name, max body) pairs, checked against the server's max_payload.
    pub body_limits: Vec<(String, usize)>,
    /// The routes that keep large bodies in the Object Store (each gets its bucket), with
    /// their retention (how long the bucket keeps an object).
    pub bodies: Vec<(String, Duration)>,
    /// Bytes the requests stream may hold (`max_bytes`; -1: no limit of its own).
    pub max_bytes: i64,
}

impl Store {
    /// Connects in the background: the returned store works once NATS is reachable and
    /// [`Store::provision`] has run. `stateful` names each stateful route's state store and
    /// retention.
    pub async fn connect(
        settings: &JetStreamSettings,
        stateful: &[(String, StateStoreConfig, Duration)],
    ) -> Result<Self, StoreError> {
        // Counts (re)connections, so that consumers that do not survive a server restart (the
        // watches' ordered consumers) are made again at once, not after missed heartbeats.
        let (connections, _) = tokio::sync::watch::channel(0u64);
        let on_event = connections.clone();
        let client = settings
            .nats
            .connect_options("gateway")
            .await?
            .event_callback(move |event| {
                let on_event = on_event.clone();
                async move {
                    if matches!(event, async_nats::Event::Connected) {
                        on_event.send_modify(|count| *count += 1);
                    }
                }
            })
            .retry_on_initial_connect()
            .request_timeout(Some(settings.nats_timeout))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .connect(settings.nats.server_addrs())
            .await
            .map_err(StoreError::Connect)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(settings.nats_timeout)
            .ack_timeout(settings.nats_timeout)
            .build(client.clone());
        let arbiters = stateful
            .iter()
            .map(|(route, state, retention)| {
                // Markers the gateway writes live as long as their operation's request (the
                // route's retention), and the store's stream must keep them that long.
                let store =
                    StateStore::attach(js.clone(), &state.stream, &state.prefix, *retention)
                        .with_replicas(settings.stream_replicas);
                (route.clone(), store)
            })
            .collect();
        Ok(Self {
            client,
            batcher: Batcher::spawn(
                js.clone(),
                if settings.group_commit {
                    Grouping::AtomicBatches
                } else {
                    Grouping::Publishes
                },
            ),
            js,
            subjects: Subjects::new(settings.nats.subject_prefix.clone())
                .with_contract(settings.wire_contract)
                .with_outcomes_stream(settings.nats.outcomes_stream.clone()),
            requests_stream: settings.nats.requests_stream.clone(),
            results_stream: settings.nats.results_stream.clone(),
            events_stream: settings.events_stream.clone(),
            bodies_bucket: settings.bodies_bucket.clone(),
            provisioned: AtomicBool::new(false),
            replicated: AtomicBool::new(false),
            recent_keys: RecentKeys::default(),
            arbiters,
            expiry_grace: settings.expiry_grace,
            connections,
        })
    }

    /// Changes each time the client (re)connects to NATS.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.subscribe()
    }

    /// The skew allowance expiry waits for (`GATEWAY_EXPIRY_GRACE`).
    pub fn expiry_grace(&self) -> Duration {
        self.expiry_grace
    }

    /// Whether an operation's retention has ended by this process's clock, allowing the same
    /// skew as expiry: a lagging replica may still hold its request, but it is gone.
    pub fn retention_ended(&self, operation: &Operation) -> bool {
        operation.retention().is_some_and(|retention| {
            operation.created_at + retention + self.expiry_grace < OffsetDateTime::now_utc()
        })
    }

    /// When an operation with no terminal record may be made `expired`: its deadline plus the
    /// skew allowance.
    pub fn expires_at(&self, operation: &Operation) -> OffsetDateTime {
        operation.deadline() + self.expiry_grace
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The messages of a durable pull consumer on `stream`, created (or found) with `config`: the
    /// start of each background loop (webhooks, finalizer).
    pub async fn pull(
        &self,
        stream: &str,
        config: async_nats::jetstream::consumer::pull::Config,
    ) -> Result<async_nats::jetstream::consumer::pull::Stream, ConsumeError> {
        self.js
            .get_stream(stream)
            .await?
            .create_consumer(config)
            .await?
            .messages()
            .await
            .map_err(|e| ConsumeError::Messages(e.into()))
    }

    /// The stream that keeps the workers' MAX_DELIVERIES advisories (see `finalizer`).
    pub fn advisories_stream(&self) -> String {
        format!("{}_ADVISORIES", self.requests_stream)
    }

    /// The request stored at `sequence` of the requests stream, if it is still there.
    pub async fn request_at(&self, sequence: u64) -> Result<Option<StreamMessage>, StoreError> {
        self.ensure_provisioned()?;
        let stream = self
            .js
            .get_stream_no_info(&self.requests_stream)
            .await
            .map_err(|e| StoreError::Provision {
                stream: self.requests_stream.clone(),
                source: e.into(),
            })?;
        match stream.direct_get(sequence).await {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::JetStream(JetStreamError::Get {
                stream: self.requests_stream.clone(),
                detail: e.to_string(),
            })),
        }
    }

    pub fn requests_stream(&self) -> &str {
        &self.requests_stream
    }

    pub fn results_stream(&self) -> &str {
        &self.results_stream
    }

    /// The streams of result slots, each with its subjects: contract 1's (`GW_RESULTS`) and
    /// contract 2's (`GW_OUTCOMES`). Whatever follows results follows both.
    pub fn result_streams(&self) -> [(&str, String); 2] {
        [
            (&self.results_stream, self.subjects.all_results()),
            (
                self.subjects.outcomes_stream(),
                self.subjects.all_outcomes(),
            ),
        ]
    }

    /// The stream of an operation's result slot: the one its request names, else contract 1's.
    fn slot_stream<'a>(&'a self, request: &'a RequestHead) -> &'a str {
        request.reply_stream_or(&self.results_stream)
    }

    /// A worker consumer's (backlog, acknowledged deliveries so far) on the requests stream.
    pub async fn consumer_progress(&self, consumer: &str) -> Result<(u64, u64), StoreError> {
        self.ensure_provisioned()?;
        let unavailable = |e: async_nats::Error| StoreError::Provision {
            stream: self.requests_stream.clone(),
            source: e,
        };
        let info = self
            .js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                consumer,
                &self.requests_stream,
            )
            .await
            .map_err(|e| unavailable(e.into()))?
            .info()
            .await
            .map_err(|e| unavailable(e.into()))?
            .clone();
        let in_progress = info.num_ack_pending as u64;
        let backlog = info.num_pending + in_progress;
        let acknowledged = info.delivered.consumer_sequence.saturating_sub(in_progress);
        Ok((backlog, acknowledged))
    }

    /// An operation's latest progress report, from the subject its request names.
    pub async fn progress(
        &self,
        operation: &Operation,
        early: Early,
    ) -> Result<Option<ProgressState>, StoreError> {
        self.ensure_provisioned()?;
        let subject = self.subjects.progress_of(&operation.request);
        let found = match early.of(&self.events_stream, &subject) {
            Some(found) => found,
            None => last_on_subject(&self.client, &self.events_stream, &subject).await?,
        };
        let Some(message) = found else {
            return Ok(None);
        };
        // A report that does not parse is ignored, not fatal: progress is advisory.
        Ok(
            handlers::Progress::from_payload(&message.payload).map(|p| ProgressState {
                percent: p.percent,
                message: p.message,
                updated_at: message.time,
                retry: p.retry.map(Into::into),
                seq: message.sequence,
            }),
        )
    }

    pub fn events_stream(&self) -> &str {
        &self.events_stream
    }

    /// The stored delivery state of an operation's webhook (opaque to the store).
    pub async fn callback_state(&self, operation_id: &str) -> Result<Option<Bytes>, StoreError> {
        self.ensure_provisioned()?;
        let subject = self.subjects.callback_state(operation_id);
        Ok(last_on_subject(&self.client, &self.events_stream, &subject)
            .await?
            .map(|m| m.payload))
    }

    /// Replaces the delivery state of an operation's webhook; waits for the ack.
    pub async fn put_callback_state(
        &self,
        operation_id: &str,
        state: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let subject = self.subjects.callback_state(operation_id);
        self.publish_acked(subject, HeaderMap::new(), state, ttl)
            .await
    }

    /// Adds a failed operation to the failure index of its route and tenant (an entry with no
    /// payload; writing it again only replaces it), for as long as the operation is kept.
    pub async fn index_failure(
        &self,
        route: &str,
        tenant_token: &str,
        operation_id: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let subject = self.subjects.failure(route, tenant_token, operation_id);
        self.publish_acked(subject, HeaderMap::new(), Bytes::new(), ttl)
            .await
    }

    /// The first failure index entry of `route` and the tenant at or after stream sequence
    /// `from`: its sequence and operation id; `None` past the last. One direct get.
    pub async fn next_failure(
        &self,
        route: &str,
        tenant_token: &str,
        from: u64,
    ) -> Result<Option<(u64, String)>, StoreError> {
        self.ensure_provisioned()?;
        let filter = self.subjects.failures(route, tenant_token);
        let stream = self
            .js
            .get_stream_no_info(&self.events_stream)
            .await
            .map_err(|e| StoreError::Provision {
                stream: self.events_stream.clone(),
                source: e.into(),
            })?;
        match stream
            .direct_get_next_for_subject(filter, Some(from.max(1)))
            .await
        {
            Ok(message) => Ok(Some((
                message.sequence,
                Subjects::operation_of(&message.subject).to_owned(),
            ))),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::JetStream(JetStreamError::Get {
                stream: self.events_stream.clone(),
                detail: e.to_string(),
            })),
        }
    }

    /// Keeps a webhook that could not be delivered, headers and body as they were sent.
    pub async fn dead_letter(
        &self,
        operation_id: &str,
        headers: HeaderMap,
        body: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let subject = self.subjects.webhook_dead_letter(operation_id);
        self.publish_acked(subject, headers, body, ttl).await
    }

    async fn publish_acked(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.ensure_provisioned()?;
        let mut message = PublishMessage::build().payload(payload).headers(headers);
        if let Some(ttl) = ttl {
            message = message.ttl(ttl.max(Duration::from_secs(1)));
        }
        self.js
            .send_publish(subject, message)
            .await
            .map_err(JetStreamError::from)?
            .await
            .map_err(JetStreamError::from)?;
        Ok(())
    }

    /// The largest message (headers and payload) the connected server accepts.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Creates or updates the streams. Requests: one message per subject (the idempotency
    /// record), refusing a second; results: the same, so the first terminal record wins; both
    /// refuse new messages when full rather than dropping accepted ones. Events: the last message
    /// per subject (progress, delivery state) wins.
    /// `webhook_consumer`, when webhooks are on, is created too.
    pub async fn provision(
        &self,
        plan: &StreamPlan,
        webhook_consumer: Option<&async_nats::jetstream::consumer::pull::Config>,
    ) -> Result<(), StoreError> {
        // max_payload is only known once connected.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(StoreError::NotReady);
        }
        let max_payload = self.max_payload();
        for (route, max_body) in &plan.body_limits {
            if *max_body > max_payload {
                return Err(StoreError::PayloadLimit {
                    route: route.clone(),
                    max_body: *max_body,
                    max_payload,
                });
            }
        }
        let base = Config {
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: plan.replicas,
            max_age: plan.max_retention,
            max_messages_per_subject: 1,
            discard: DiscardPolicy::New,
            discard_new_per_subject: true,
            allow_direct: true,
            allow_message_ttl: true,
            duplicate_window: plan.duplicate_window.min(plan.max_retention),
            ..Default::default()
        };
        // Only the requests stream takes a byte limit: it refuses new work when full (discard
        // new), which a client is told (507). Results and events follow from accepted requests
        // (one result and its marker, a few event records each), and a full results stream
        // would refuse replies to work already accepted; the events stream discards old
        // records, which a limit would evict.
        // Atomic batches: a batch submit is one (its requests and its record, all or none).
        let requests = Config {
            max_bytes: plan.max_bytes,
            allow_atomic_publish: true,
            ..base.clone()
        };
        // A result removed while its request lives (a worker's shorter `Nats-TTL`) leaves
        // nats-server's delete marker in its slot for as long as any request lives, so no second
        // terminal record can take its place: the slot reads "removed", never a new outcome
        // (ADR-43 subject delete markers; verified on 2.15.1: create-if-absent is refused while
        // only the marker is there).
        // A marker carries `Nats-Rollup: sub`, so the server turns rollups on for such a stream
        // whatever is asked: asked for here, so that the configuration says what is live.
        let results = Config {
            subject_delete_marker_ttl: Some(plan.max_retention.max(Duration::from_secs(1))),
            allow_rollup: true,
            ..base.clone()
        };
        // Contract 2's result slots, which workers write: no per-message TTL (nats-server refuses
        // a `Nats-TTL` here), no roll-ups (refuses `Nats-Rollup`), no delete markers (they would
        // force roll-ups on). So no writer can empty a slot or another route's slots: a record
        // stays for `max_age`, at least the longest retention, so never leaves before its
        // request. What that costs: a result of a route with a shorter retention stays (unread)
        // until the stream's `max_age`.
        let outcomes = Config {
            allow_message_ttl: false,
            ..base.clone()
        };
        // Delivery states change (attempt after attempt): the last message of a subject wins.
        let replaced = Config {
            discard: DiscardPolicy::Old,
            discard_new_per_subject: false,
            ..base.clone()
        };
        let streams = [
            (
                &self.requests_stream,
                vec![self.subjects.all_requests(), self.subjects.all_batches()],
                &requests,
                "Requests accepted by the HTTP gateway, one per idempotency key, and batch records.",
            ),
            (
                &self.results_stream,
                vec![self.subjects.all_results()],
                &results,
                "Terminal records of gateway operations accepted under wire contract 1, first writer wins.",
            ),
            (
                &self.subjects.outcomes_stream().to_owned(),
                vec![self.subjects.all_outcomes()],
                &outcomes,
                "Terminal records of gateway operations, first writer wins; no TTLs, no roll-ups.",
            ),
            (
                &self.events_stream,
                self.subjects.all_events().to_vec(),
                &replaced,
                "Progress reports, webhook delivery states and dead letters of gateway operations.",
            ),
        ];
        let mut replicas = plan.replicas;
        for (name, subjects, template, description) in streams {
            let mut config = Config {
                name: name.clone(),
                subjects,
                description: Some(description.to_owned()),
                ..template.clone()
            };
            // Replicas start with different routes files (a rolling deploy, a canary) and flags:
            // the stream keeps the largest retention, replica count and duplicate window any of
            // them asked for, so that no replica deletes what another accepted. (A smaller
            // `max_age` would remove live idempotency records: a message's `Nats-TTL` does not
            // outlive its stream's `max_age`, https://github.com/nats-io/nats-architecture-and-design/blob/main/adr/ADR-43.md.)
            if let Some(live) = self.live_config(name).await? {
                never_shrink(&mut config, &live);
            }
            replicas = replicas.max(config.num_replicas);
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(|e| StoreError::Provision {
                    stream: name.clone(),
                    source: e.into(),
                })?;
        }
        // Large bodies: an Object Store bucket per route, whose objects live for the route's
        // retention from when they are stored. A request body goes with its operation; a reply
        // body, stored later, outlives it by the time the worker took (at most the timeout),
        // unread: the operation is gone.
        for (route, retention) in &plan.bodies {
            let bucket = self.bodies_bucket(route);
            if self.js.get_object_store(&bucket).await.is_ok() {
                // Its objects must outlive the retention asked for, as requests do (a shorter
                // retention now leaves the longer one: operations accepted before still live).
                let stream = format!("OBJ_{bucket}");
                if let Some(mut live) = self.live_config(&stream).await?
                    && !live.max_age.is_zero()
                    && live.max_age < *retention
                {
                    live.max_age = *retention;
                    self.js
                        .update_stream(live)
                        .await
                        .map_err(|e| StoreError::Provision {
                            stream,
                            source: e.into(),
                        })?;
                }
                continue;
            }
            self.js
                .create_object_store(async_nats::jetstream::object_store::Config {
                    bucket: bucket.clone(),
                    description: Some(format!(
                        "Request and reply bodies of route {route} too large for a message (claim checks)."
                    )),
                    max_age: *retention,
                    storage: StorageType::File,
                    num_replicas: plan.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| StoreError::Provision {
                    stream: format!("OBJ_{bucket}"),
                    source: e.into(),
                })?;
        }
        // Stateful routes' state stores, where their outcomes are decided: created when no
        // worker has yet, checked (never changed) when one has.
        for arbiter in self.arbiters.values() {
            arbiter.provision().await?;
        }
        // MAX_DELIVERIES advisories of the workers' consumers, kept for the finalizer: an
        // advisory is a core NATS message, lost when nobody listens at that moment.
        let mut advisories = Config {
            name: self.advisories_stream(),
            subjects: vec![format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
                self.requests_stream
            )],
            description: Some(
                "MAX_DELIVERIES advisories of the gateway's requests, for its finalizer."
                    .to_owned(),
            ),
            ..replaced.clone()
        };
        advisories.max_messages_per_subject = 0;
        // The backstop is optional: an account that already captures these advisories in another
        // stream (subjects cannot overlap) still gets a working gateway, without the finalizer.
        let advisories_name = advisories.name.clone();
        let provisioned = async {
            if let Some(live) = self.live_config(&advisories_name).await? {
                never_shrink(&mut advisories, &live);
            }
            self.js
                .create_or_update_stream(advisories)
                .await
                .map_err(|e| StoreError::Provision {
                    stream: advisories_name.clone(),
                    source: e.into(),
                })
        }
        .await;
        if let Err(error) = provisioned {
            tracing::warn!(%error, "No stream for MAX_DELIVERIES advisories: operations whose every delivery is lost wait for a read past their deadline.");
        }
        // The webhook consumer exists before the gateway is ready, so that no result of an
        // accepted request can land before it (it starts from new messages).
        for (stream, _) in webhook_consumer
            .map(|_| self.result_streams())
            .into_iter()
            .flatten()
        {
            let consumer = webhook_consumer.expect("mapped from it");
            self.js
                .get_stream(stream)
                .await
                .map_err(|e| StoreError::Provision {
                    stream: stream.to_owned(),
                    source: e.into(),
                })?
                .create_consumer(consumer.clone())
                .await
                .map_err(|e| StoreError::ProvisionConsumer {
                    stream: stream.to_owned(),
                    source: e,
                })?;
        }
        self.replicated.store(replicas > 1, Ordering::Release);
        self.provisioned.store(true, Ordering::Release);
        Ok(())
    }

    /// The configuration of a live stream, `None` when it does not exist. Any other error stops
    /// provisioning (it retries): a stream that cannot be read must not be overwritten blind.
    async fn live_config(&self, name: &str) -> Result<Option<Config>, StoreError> {
        match self.js.get_stream(name).await {
            Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(e) => Err(StoreError::Provision {
                stream: name.to_owned(),
                source: e.into(),
            }),
        }
    }

    fn ensure_provisioned(&self) -> Result<(), StoreError> {
        if self.provisioned.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::NotReady)
        }
    }

    /// Readiness: connected, provisioned, and both streams answer.
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        self.ensure_provisioned()?;
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(StoreError::NotReady);
        }
        let [(results, _), (outcomes, _)] = self.result_streams();
        for stream in [self.requests_stream.as_str(), results, outcomes] {
            self.js
                .get_stream_no_info(stream)
                .await
                .map_err(|_| StoreError::NotReady)?
                .get_info()
                .await
                .map_err(|_| StoreError::NotReady)?;
        }
        Ok(())
    }

    /// Writes an accepted request on its key's subject unless the subject already holds one.
    pub async fn create_request(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Bytes,
        ttl: Duration,
    ) -> Result<CreateOutcome, StoreError> {
        self.ensure_provisioned()?;
        Ok(create_if_absent(&self.batcher, subject, headers, body, Some(ttl)).await?)
    }

    /// The request stored for a key on a known route: a direct get, asked again of the stream
    /// leader on a miss (see [`Store::confirm_miss`]), because this runs right after that request
    /// refused a write, so it must be found even when a replica lags. A hit needs no check: the
    /// subject holds that key's one request.
    pub async fn request_on_route(
        &self,
        route: &str,
        key_token: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        self.ensure_provisioned()?;
        let subject = self.subjects.request(route, key_token);
        let found = last_on_subject(&self.client, &self.requests_stream, &subject).await?;
        self.confirm_miss(found, &self.requests_stream, &subject)
            .await
    }

    /// The request stored for a key token on whatever route: one wildcard direct get (and a
    /// leader read if that misses on a replicated stream, see [`Store::confirm_miss`]).
    pub async fn request_by_key_token(
        &self,
        key_token: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        self.ensure_provisioned()?;
        let pattern = self.subjects.request_any_route(key_token);
        let found = last_matching(&self.client, &self.requests_stream, &pattern).await?;
        self.confirm_miss(found, &self.requests_stream, &pattern)
            .await
    }

    /// The record of a batch key token on whatever route, confirmed with the leader on a miss
    /// (as requests are).
    pub async fn batch_record(&self, key_token: &str) -> Result<Option<StreamMessage>, StoreError> {
        self.ensure_provisioned()?;
        let pattern = self.subjects.batch_any_route(key_token);
        let found = last_matching(&self.client, &self.requests_stream, &pattern).await?;
        self.confirm_miss(found, &self.requests_stream, &pattern)
            .await
    }

    /// Stores a request body in the bodies bucket under `name`, streamed in chunks (one chunk in
    /// memory at a time), reading at most `limit` + 1 bytes of `body`: the object's size tells
    /// the caller whether the body was larger. Returns where it is, its size and digest.
    pub async fn put_body(
        &self,
        route: &str,
        name: &str,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
        limit: u64,
    ) -> Result<handlers::contract::BodyObject, StoreError> {
        use tokio::io::AsyncReadExt as _;
        self.ensure_provisioned()?;
        let bucket_name = self.bodies_bucket(route);
        let failed = |detail: String| {
            StoreError::JetStream(JetStreamError::Body(ClaimCheckError::Unavailable {
                bucket: bucket_name.clone(),
                name: name.to_owned(),
                detail,
            }))
        };
        let bucket = self
            .js
            .get_object_store(&bucket_name)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let info = bucket
            .put(name, &mut body.take(limit + 1))
            .await
            .map_err(|e| {
                if e.kind() == async_nats::jetstream::object_store::PutErrorKind::ReadChunks {
                    StoreError::BodyRead(e.to_string())
                } else {
                    failed(e.to_string())
                }
            })?;
        Ok(handlers::contract::BodyObject {
            bucket: bucket_name.clone(),
            name: name.to_owned(),
            size: info.size as u64,
            digest: info.digest.unwrap_or_default(),
        })
    }

    /// Removes a body object nobody refers to (best effort: the bucket's `max_age` removes it
    /// anyway; see `handlers::claim_check::discard`).
    pub async fn delete_body(&self, object: &BodyObject) {
        handlers::claim_check::discard(&self.js, object).await;
    }

    /// Bytes `range` of the reply body `object` of `request`'s operation, streamed as read
    /// (see `handlers::claim_check::read_body`: a few chunks in memory, the digest checked on a
    /// whole read). The object must be where the request lets a worker put it
    /// ([`BodyObject::is_reply_of`]) and be what the record says.
    ///
    /// Errors (when opening, or as the stream's last item): the object is gone (the bucket's
    /// `max_age`, a removal): [`ContractError::Removed`], as a removed record; elsewhere or other
    /// than the record says: a contract violation; NATS unreachable: a JetStream error.
    pub async fn read_reply_body(
        &self,
        request: &RequestHead,
        object: &BodyObject,
        range: std::ops::Range<u64>,
    ) -> Result<BodyChunks, StoreError> {
        use futures::StreamExt as _;
        self.ensure_provisioned()?;
        if !object.is_reply_of(request) {
            return Err(ContractError::InvalidHeader {
                name: handlers::contract::header::BODY_OBJECT,
                value: format!(
                    "{}/{} is no reply body of {}",
                    object.bucket, object.name, request.operation_id
                ),
            }
            .into());
        }
        let chunks = handlers::claim_check::read_body(&self.js, object, range)
            .await
            .map_err(body_error)?;
        // A failure after the first bytes can only cut the body short (the client sees fewer
        // bytes than its Content-Length): an I/O error then, logged here.
        let operation_id = request.operation_id.clone();
        Ok(Box::pin(chunks.map(move |chunk| {
            chunk.map_err(|error| {
                tracing::warn!(%operation_id, %error, "A result's body was cut short.");
                std::io::Error::other(body_error(error))
            })
        })))
    }

    /// Where a worker may keep a large reply to a request of `route` (`Gw-Reply-Bucket`): the
    /// route's bodies bucket, when it has one (it sets `inline_max`) and requests are written
    /// under contract 2 or later (a worker of the first release could not have written one).
    pub fn reply_bucket(&self, route: &crate::config::RouteConfig) -> Option<String> {
        (route.inline_max.is_some() && self.subjects.contract() != WireContract::V1)
            .then(|| self.bodies_bucket(&route.name))
    }

    /// The bucket of route `route`'s large bodies: `<GATEWAY_BODIES_BUCKET>_<route>`.
    pub fn bodies_bucket(&self, route: &str) -> String {
        format!("{}_{route}", self.bodies_bucket)
    }

    /// Publishes `messages` (requests and a batch record) as one atomic batch on the requests
    /// stream (see `handlers::jetstream::publish_atomic_batch`).
    pub async fn publish_batch(
        &self,
        batch_id: &str,
        messages: Vec<(String, HeaderMap, Bytes)>,
    ) -> Result<handlers::jetstream::BatchOutcome, StoreError> {
        self.ensure_provisioned()?;
        Ok(handlers::jetstream::publish_atomic_batch(&self.client, batch_id, messages).await?)
    }

    /// The request stored for a key token on whatever route, read from the stream leader. For a
    /// hit that names another operation than expected: request subjects are reused once a key's
    /// retention ends, and a lagging replica (or a mirror serving direct gets) can still answer
    /// with the old request after the new one was acknowledged.
    pub async fn request_by_key_token_from_leader(
        &self,
        key_token: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        self.ensure_provisioned()?;
        let pattern = self.subjects.request_any_route(key_token);
        Ok(last_on_subject_from_leader(&self.js, &self.requests_stream, &pattern).await?)
    }

    /// The contract-2 result of an operation on whatever route, read before its request says
    /// where the result is: [`Store::result`] takes it only if it sits where the request says.
    pub async fn result_any_route(&self, operation_id: &str) -> Result<Early, StoreError> {
        self.ensure_provisioned()?;
        let pattern = self.subjects.result_any_route(operation_id);
        let stream = self.subjects.outcomes_stream();
        let found = last_matching(&self.client, stream, &pattern).await?;
        Ok(Early::Read {
            stream: stream.to_owned(),
            pattern,
            found,
        })
    }

    /// The last progress report on any route's progress subject of `operation_id` (contract 2),
    /// one wildcard direct get, to read along with the request (see [`Store::progress`]).
    pub async fn progress_any_route(&self, operation_id: &str) -> Result<Early, StoreError> {
        self.ensure_provisioned()?;
        let pattern = self.subjects.progress_any_route(operation_id);
        let found = last_matching(&self.client, &self.events_stream, &pattern).await?;
        Ok(Early::Read {
            stream: self.events_stream.clone(),
            pattern,
            found,
        })
    }

    /// The terminal record of an operation, if any, from the subject its request names (the
    /// one slot of the operation, whichever contract it was accepted under). `early`, a
    /// [`Store::result_any_route`] read, answers for that subject when it covered it (see
    /// [`Early`]; a record on any other subject was written by someone the request did not name);
    /// else the subject is read.
    pub async fn result(
        &self,
        operation: &Operation,
        early: Early,
    ) -> Result<Option<StoredResult>, StoreError> {
        self.ensure_provisioned()?;
        let subject = &operation.request.reply_subject;
        let stream = self.slot_stream(&operation.request);
        let found = match early.of(stream, subject) {
            Some(found) => found,
            None => last_on_subject(&self.client, stream, subject).await?,
        };
        let Some(message) = self.confirm_miss(found, stream, subject).await? else {
            return Ok(None);
        };
        let record = ResultRecord::from_stream_message(&message)?;
        Ok(Some(StoredResult {
            record,
            stored_at: message.time,
        }))
    }

    /// A direct get is answered by any replica, and a follower can lag behind writes that were
    /// already acknowledged: on nats-server 2.15.1, after a leader change, about 1 in 100 direct
    /// gets issued right after a publish's ack missed it (tests/tests/cluster.rs saw a 404 for an
    /// operation just accepted through the other gateway). So on a replicated stream a miss is
    /// asked again of the stream leader, and what one read has seen no later read misses: an
    /// accepted operation never 404s, a terminal one never reads `pending` again. A result hit
    /// needs no check (its subject names one operation, written once); a request hit that names
    /// another operation is checked by the caller, see [`Store::request_by_key_token_from_leader`].
    async fn confirm_miss(
        &self,
        found: Option<StreamMessage>,
        stream: &str,
        subject: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        if found.is_some() || !self.replicated.load(Ordering::Acquire) {
            return Ok(found);
        }
        Ok(last_on_subject_from_leader(&self.js, stream, subject).await?)
    }

    /// Ends an operation with a marker (expired, cancelled), unless it was decided first; returns
    /// the record that holds the result slot either way.
    ///
    /// On a stateful route the decision is taken where the workers commit: a create-if-absent
    /// tombstone on the operation's processed marker. If a commit (or another decision) holds the
    /// marker, that is what is published instead, so the outcome always agrees with the state.
    /// On a stateless route the result slot itself decides, first writer wins.
    pub async fn record_marker(
        &self,
        operation: &Operation,
        marker: ResultRecord,
    ) -> Result<StoredResult, StoreError> {
        self.ensure_provisioned()?;
        let id = operation.id();
        let ttl = operation.retention();
        let subject = &operation.request.reply_subject;
        let decided = match self.arbiters.get(operation.route()) {
            Some(arbiter) => arbiter.decide(id, &marker, ttl).await?,
            None => Outbox::decision(&marker),
        };
        let write = project(
            &self.js,
            &operation.request,
            &self.results_stream,
            &decided,
            Vec::new(),
        )
        .await?;
        let conflict =
            !decided.reply().same_answer(&marker) || matches!(write, ResultWrite::Conflict { .. });
        if conflict {
            let writer = match marker.outcome {
                Outcome::Cancelled => "cancel",
                _ => "expiry",
            };
            metrics::counter!(RESULT_CONFLICTS, "writer" => writer).increment(1);
        }
        // Read the slot back from the leader, whoever won it: every later read reports the
        // record with the stream's timestamp, so this answer must too (two reads of a terminal
        // operation are byte-identical). One read more, on the rare path that writes a marker.
        let stream = self.slot_stream(&operation.request);
        let stored = last_on_subject_from_leader(&self.js, stream, subject).await?;
        Ok(match stored {
            Some(message) => StoredResult {
                record: ResultRecord::from_stream_message(&message)?,
                stored_at: message.time,
            },
            // The record vanished at once (a purge, a TTL that just ended): report what was
            // written or found.
            None => StoredResult {
                record: match write {
                    ResultWrite::Conflict { existing } => existing,
                    ResultWrite::Stored | ResultWrite::AlreadyStored => decided.reply(),
                },
                stored_at: OffsetDateTime::now_utc(),
            },
        })
    }
}

/// Makes `wanted` keep what `current` (the live stream's configuration) has more of: retention
/// (`max_age`, where zero means unlimited), replicas, the duplicate window, the byte limit
/// (below zero: none) and the delete markers' lifetime. Logs each value
/// kept that this process did not ask for.
fn never_shrink(wanted: &mut Config, current: &Config) {
    let stream = wanted.name.clone();
    if current.max_age.is_zero() || current.max_age > wanted.max_age && !wanted.max_age.is_zero() {
        if current.max_age != wanted.max_age {
            tracing::warn!(%stream, kept = ?current.max_age, asked = ?wanted.max_age, "Stream keeps its longer max_age: other replicas' routes retain longer.");
        }
        wanted.max_age = current.max_age;
    }
    if current.num_replicas > wanted.num_replicas {
        tracing::warn!(%stream, kept = current.num_replicas, asked = wanted.num_replicas, "Stream keeps its replicas: GATEWAY_STREAM_REPLICAS is lower than the stream's.");
        wanted.num_replicas = current.num_replicas;
    }
    wanted.duplicate_window = wanted.duplicate_window.max(current.duplicate_window);
    // A byte limit of 0 or below is none (nats-server stores an unset one as -1): the larger
    // wins, as for retention.
    let none = |bytes: i64| bytes <= 0;
    if none(current.max_bytes) || (!none(wanted.max_bytes) && current.max_bytes > wanted.max_bytes)
    {
        if none(current.max_bytes) != none(wanted.max_bytes)
            || !none(wanted.max_bytes) && current.max_bytes != wanted.max_bytes
        {
            tracing::warn!(%stream, kept = current.max_bytes, asked = wanted.max_bytes, "Stream keeps its larger max_bytes: another replica asked for more.");
        }
        wanted.max_bytes = current.max_bytes;
    }
    if wanted.subject_delete_marker_ttl.is_some() {
        wanted.subject_delete_marker_ttl = wanted
            .subject_delete_marker_ttl
            .max(current.subject_delete_marker_ttl);
    }
    if !wanted.max_age.is_zero() {
        wanted.duplicate_window = wanted.duplicate_window.min(wanted.max_age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_age: u64, replicas: usize, window: u64) -> Config {
        Config {
            name: "GW_REQUESTS".to_owned(),
            max_age: Duration::from_secs(max_age),
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(window),
            ..Default::default()
        }
    }

    #[test]
    fn a_replica_never_shrinks_retention_replicas_or_the_duplicate_window() {
        let mut wanted = config(3, 1, 2);
        never_shrink(&mut wanted, &config(86_400, 3, 120));
        assert_eq!(
            (wanted.max_age, wanted.num_replicas, wanted.duplicate_window),
            (Duration::from_secs(86_400), 3, Duration::from_secs(120))
        );
    }

    #[test]
    fn unlimited_retention_is_the_longest() {
        let mut wanted = config(3600, 1, 120);
        never_shrink(&mut wanted, &config(0, 1, 120));
        assert_eq!(
            wanted.max_age,
            Duration::ZERO,
            "the live stream's unlimited max_age stays"
        );
        let mut wanted = config(0, 1, 120);
        never_shrink(&mut wanted, &config(3600, 1, 120));
        assert_eq!(
            wanted.max_age,
            Duration::ZERO,
            "an unlimited max_age is not shortened"
        );
    }

    #[test]
    fn a_larger_request_grows_the_stream() {
        let mut wanted = config(86_400, 3, 120);
        never_shrink(&mut wanted, &config(3600, 1, 60));
        assert_eq!(
            (wanted.max_age, wanted.num_replicas, wanted.duplicate_window),
            (Duration::from_secs(86_400), 3, Duration::from_secs(120))
        );
    }
}
