//! The wire contract between the gateway and its workers: stream and subject names, header names,
//! and the two message shapes (an accepted request, a stored result).
//!
//! This module is the only place that knows how a request or a result looks on the wire. A worker
//! written in another language follows the same rules with a plain NATS client;
//! docs/wire-contract.md spells them out for that reader.
//!
//! Subjects (prefix `gw` by default):
//! - `gw.req.<route>.<key-token>`: one accepted request. The key token is derived from
//!   (tenant, route, idempotency key), so the subject *is* the idempotency record: the gateway
//!   writes it with `Nats-Expected-Last-Subject-Sequence: 0` and a second write is refused.
//! - `gw.out.<route>.<operation-id>`, in the outcomes stream (`GW_OUTCOMES`): the one terminal
//!   record of an operation: a worker's reply, or the gateway's `expired` or `cancelled` marker.
//!   The stream keeps at most one message per subject and refuses later ones
//!   (`discard_new_per_subject`), so the first terminal record wins for good; it refuses
//!   per-message TTLs and roll-ups too, so no writer can remove a record before its stream's
//!   `max_age`, which is at least every request's retention.
//! - `gw.prog.<route>.<operation-id>`: an operation's latest progress report.
//!
//! The route in the result and progress subjects is what lets NATS permissions confine a worker
//! to its route: publish to `gw.out.<route>.>` and `gw.prog.<route>.>`, nothing else of the
//! gateway's. A request names both subjects and the reply's stream (`Gw-Reply-Subject`,
//! `Gw-Reply-Stream`, `Gw-Progress-Subject`), and every writer and reader follows the request,
//! never a subject it builds itself: the slot of an operation is fixed when it is accepted. That
//! is [`WireContract::V2`]; operations accepted under [`WireContract::V1`] (the first release:
//! `gw.res.<operation-id>` in `GW_RESULTS`, `gw.prog.<operation-id>`, no `Gw-Contract` header)
//! are read and answered where their requests say, so both layouts live side by side during an
//! upgrade.

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

// A progress report is a wire shape too; it lives in `progress` with its reporter, and stays
// reachable here, where it was first defined.
pub use crate::progress::Progress;

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "gw";
/// Default name of the stream holding accepted requests.
pub const DEFAULT_REQUESTS_STREAM: &str = "GW_REQUESTS";
/// Default first part of a route's worker consumer name, `<prefix>-<route>`: the gateway reads
/// that consumer's backlog for `Retry-After`, so both sides must agree on it.
pub const DEFAULT_CONSUMER_PREFIX: &str = "worker";
/// Default name of the stream holding contract 1's terminal records (`<prefix>.res.>`), and where
/// a worker looks for a reply slot its request does not place (no `Gw-Reply-Stream`).
pub const DEFAULT_RESULTS_STREAM: &str = "GW_RESULTS";
/// Default name of the stream holding contract 2's terminal records (`<prefix>.out.>`).
pub const DEFAULT_OUTCOMES_STREAM: &str = "GW_OUTCOMES";

/// Which layout of result and progress subjects a request was accepted under; a request says it
/// in `Gw-Contract` (absent: 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireContract {
    /// `<prefix>.res.<operation-id>` and `<prefix>.prog.<operation-id>`: no route, so NATS
    /// permissions cannot keep one route's worker off another's results. Gateways of the first
    /// release read and write only these (they compute the subject from the id), so a gateway
    /// writes this layout while any such replica still runs.
    V1,
    /// `<prefix>.out.<route>.<operation-id>` (in the stream the request names, without
    /// `Nats-TTL`) and `<prefix>.prog.<route>.<operation-id>`, all named in the request.
    #[default]
    V2,
    /// Contract 2's layout, and the request's body is in a JetStream Object Store
    /// ([`BodyObject`], `Gw-Body-*`) instead of the message. Only such requests are written
    /// as 3, so workers of the release before serve every other request, and leave these
    /// (an unknown contract) for a worker that can fetch the body.
    V3,
}

impl WireContract {
    /// The newest layout new operations are written in (a request with its body in the
    /// Object Store is written as [`WireContract::V3`], which has this layout).
    pub const LATEST: WireContract = WireContract::V2;

    /// The version number as `Gw-Contract` carries it.
    pub fn number(self) -> u8 {
        match self {
            WireContract::V1 => 1,
            WireContract::V2 => 2,
            WireContract::V3 => 3,
        }
    }

    /// The version `Gw-Contract` (or a setting) names, written as its digits only; `None` for
    /// one this library does not know (a newer release's) or that is not a number.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1" => Some(WireContract::V1),
            "2" => Some(WireContract::V2),
            "3" => Some(WireContract::V3),
            _ => None,
        }
    }
}

/// Prefix of every RFC 9457 problem `type` the gateway emits (a tag URI, RFC 4151: an identifier,
/// not a page). docs/http-api.md ("Problems") lists each problem type.
pub const PROBLEM_TYPE_BASE: &str = "tag:nats-http-gateway,2026:problem/";

/// Header names. Lookups in received messages must use these constants, never a string typed
/// elsewhere, so that both sides agree on spelling.
pub mod header {
    /// The operation this message belongs to.
    pub const OPERATION_ID: &str = "Gw-Operation-Id";
    /// The route name (also the third subject token of a request).
    pub const ROUTE: &str = "Gw-Route";
    /// HTTP method of the original request.
    pub const METHOD: &str = "Gw-Method";
    /// HTTP path of the original request.
    pub const PATH: &str = "Gw-Path";
    /// Raw query string of the original request, without `?`; absent when there was none.
    pub const QUERY: &str = "Gw-Query";
    /// Where the worker publishes its reply (a subject of the reply stream).
    pub const REPLY_SUBJECT: &str = "Gw-Reply-Subject";
    /// The stream that holds `Gw-Reply-Subject` (contract 2), where a worker reads the slot back.
    /// Its presence also says: publish the reply without `Nats-TTL` (the stream refuses
    /// per-message TTLs). Absent under contract 1: the results stream, with `Nats-TTL`.
    pub const REPLY_STREAM: &str = "Gw-Reply-Stream";
    /// Where the worker publishes progress reports (contract 2; under contract 1 there is no
    /// header and the subject is `<prefix>.prog.<operation-id>`).
    pub const PROGRESS_SUBJECT: &str = "Gw-Progress-Subject";
    /// The wire contract version a request was written under, `2`; absent on contract 1.
    pub const CONTRACT: &str = "Gw-Contract";
    /// RFC 3339 instant after which the operation counts as expired.
    pub const DEADLINE: &str = "Gw-Deadline";
    /// RFC 3339 instant before which no handler may start (a delayed start); a worker that gets
    /// the request earlier offers it back (nak) with the delay left.
    pub const NOT_BEFORE: &str = "Gw-Not-Before";
    /// RFC 3339 instant from which the request may no longer start: a worker that gets it then
    /// ends it `expired` without running it.
    pub const START_BY: &str = "Gw-Start-By";
    /// The route's retry policy, JSON ([`crate::retry::RetryPolicy`]); absent: the worker's own.
    pub const RETRY_POLICY: &str = "Gw-Retry-Policy";
    /// The id of the failed operation this one redrives. A stateful worker reads that
    /// operation's processed marker first: if it committed, this one re-publishes its outbox
    /// instead of running the handler (the state never changes twice).
    pub const REDRIVE_OF: &str = "Gw-Redrive-Of";
    /// Where the request's body is when it is not in the message (contract 3): the Object Store
    /// bucket and the object's name; `Gw-Body-Size` and `Gw-Body-Digest` (`SHA-256=<base64url>`,
    /// as the Object Store writes digests) say what a reader must find there.
    pub const BODY_BUCKET: &str = "Gw-Body-Bucket";
    pub const BODY_OBJECT: &str = "Gw-Body-Object";
    pub const BODY_SIZE: &str = "Gw-Body-Size";
    pub const BODY_DIGEST: &str = "Gw-Body-Digest";
    /// The Object Store bucket where a worker may keep a reply body too large for its message
    /// (a result's claim check, named by the `Gw-Body-*` headers of the terminal record). Only
    /// requests of routes that keep large bodies name one; a worker that ignores it replies
    /// inline, as before.
    pub const REPLY_BUCKET: &str = "Gw-Reply-Bucket";
    /// Seconds the gateway keeps the request, status and result; under contract 1 workers set the
    /// same TTL on replies.
    pub const RETENTION: &str = "Gw-Retention";
    /// Tenant that owns the operation.
    pub const TENANT: &str = "Gw-Tenant";
    /// The idempotency key in effect (client-sent or gateway-assigned), as an RFC 8941 sf-string.
    pub const IDEMPOTENCY_KEY: &str = "Gw-Idempotency-Key";
    /// Hex SHA-256 fingerprint of (method, path, query, content type, body).
    pub const FINGERPRINT: &str = "Gw-Fingerprint";
    /// Where the gateway POSTs the signed completion notification (absent: no webhook).
    pub const CALLBACK_URL: &str = "Gw-Callback-Url";
    /// On a result: the HTTP status code to replay (200..=599).
    pub const STATUS: &str = "Gw-Status";
    /// On a result: `reply` (a worker's answer, the default when absent) or `expired`.
    pub const OUTCOME: &str = "Gw-Outcome";
    /// Content type of the body, on requests and results alike.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// W3C trace context, forwarded when the HTTP request carried it.
    pub const TRACEPARENT: &str = "traceparent";
    /// Set by nats-server (not by us) on the subject delete marker it leaves where a message's
    /// TTL or the stream's `max_age` removed a subject's last message, when the stream has
    /// `subject_delete_marker_ttl` (ADR-43, server 2.11+). The marker has no body.
    pub const MARKER_REASON: &str = "Nats-Marker-Reason";
}

/// JetStream API error codes the contract relies on.
pub mod err_code {
    /// `Nats-Expected-Last-Subject-Sequence` did not match: the subject already holds a message.
    pub const WRONG_LAST_SEQUENCE: u64 = 10071;
    /// The same, said by a clustered stream's leader while another write to the subject is in
    /// flight (nats-server `server/jetstream_batching.go`, "wrong last sequence", 2.12+): the
    /// subject is being taken.
    pub const WRONG_LAST_SEQUENCE_IN_FLIGHT: u64 = 10164;
    /// The stream refused to store a message for one of its limits: a second message on a
    /// subject under `discard_new_per_subject` ("maximum messages per subject exceeded"), or a
    /// full stream ("maximum bytes exceeded", "maximum messages exceeded").
    pub const MAX_MSGS_PER_SUBJECT: u64 = 10077;
    /// JetStream's storage resources (account or server) are used up.
    pub const STORAGE_RESOURCES_EXCEEDED: u64 = 10047;
    /// "insufficient resources": the server's store (`max_file_store`) is full when it writes.
    pub const INSUFFICIENT_RESOURCES: u64 = 10023;
}

/// Errors reading a message that does not follow the contract.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("header {0} is missing")]
    MissingHeader(&'static str),
    #[error("header {name} has an invalid value {value:?}")]
    InvalidHeader { name: &'static str, value: String },
    /// The request was written under a contract version this library does not know: a newer
    /// worker must handle it.
    #[error("wire contract version {0} is newer than this library reads")]
    UnknownContract(String),
    #[error("header {name:?} cannot be stored: {why}")]
    Unstorable { name: String, why: &'static str },
    /// The subject holds nats-server's delete marker: its record was removed (by TTL or
    /// `max_age`, the reason given) and the marker keeps the place, so it cannot be written anew.
    #[error("the record was removed ({reason}); a delete marker holds its place")]
    Removed { reason: String },
}

/// Builds every subject from one prefix, so gateway and workers cannot disagree; new operations'
/// result and progress subjects follow the [`WireContract`] it was given.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    contract: WireContract,
    /// The stream of contract 2's result subjects, named in its requests.
    outcomes_stream: String,
}

/// Where a new operation's outcome and progress reports go: what its request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    pub reply_subject: String,
    /// `None` under contract 1.
    pub reply_stream: Option<String>,
    /// `None` under contract 1.
    pub progress_subject: Option<String>,
}

impl Subjects {
    /// Subjects under `prefix`, new operations on the latest contract.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            contract: WireContract::LATEST,
            outcomes_stream: DEFAULT_OUTCOMES_STREAM.to_owned(),
        }
    }

    /// The same subjects, new operations on `contract` (an upgrade's first step writes
    /// [`WireContract::V1`]).
    pub fn with_contract(self, contract: WireContract) -> Self {
        Self { contract, ..self }
    }

    /// The same subjects, contract 2's results in the stream `name`.
    pub fn with_outcomes_stream(self, name: impl Into<String>) -> Self {
        Self {
            outcomes_stream: name.into(),
            ..self
        }
    }

    /// The stream of contract 2's result subjects.
    pub fn outcomes_stream(&self) -> &str {
        &self.outcomes_stream
    }

    /// The contract new operations are written under.
    pub fn contract(&self) -> WireContract {
        self.contract
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// All request subjects (the requests stream's subject filter).
    pub fn all_requests(&self) -> String {
        format!("{}.req.>", self.prefix)
    }

    /// All contract-1 result subjects (the results stream's subject filter).
    pub fn all_results(&self) -> String {
        format!("{}.res.>", self.prefix)
    }

    /// All contract-2 result subjects (the outcomes stream's subject filter).
    pub fn all_outcomes(&self) -> String {
        format!("{}.out.>", self.prefix)
    }

    /// Progress reports, webhook delivery states, dead letters and the failure index (the events
    /// stream's subjects).
    pub fn all_events(&self) -> [String; 4] {
        [
            self.all_progress(),
            format!("{}.cb.>", self.prefix),
            format!("{}.dlq.>", self.prefix),
            format!("{}.fail.>", self.prefix),
        ]
    }

    /// The failure index's entry of a failed operation (written by the gateway, read to list
    /// failed operations by route and tenant; `tenant_token` names the tenant as a subject token).
    pub fn failure(&self, route: &str, tenant_token: &str, operation_id: &str) -> String {
        format!("{}.fail.{route}.{tenant_token}.{operation_id}", self.prefix)
    }

    /// The failure index's entries of one route and tenant.
    pub fn failures(&self, route: &str, tenant_token: &str) -> String {
        format!("{}.fail.{route}.{tenant_token}.*", self.prefix)
    }

    /// All progress subjects.
    pub fn all_progress(&self) -> String {
        format!("{}.prog.>", self.prefix)
    }

    /// Where a new operation's result and progress reports go, under this contract.
    pub fn slots(&self, route: &str, operation_id: &str) -> Slots {
        let p = &self.prefix;
        match self.contract {
            WireContract::V1 => Slots {
                reply_subject: format!("{p}.res.{operation_id}"),
                reply_stream: None,
                progress_subject: None,
            },
            WireContract::V2 | WireContract::V3 => Slots {
                reply_subject: format!("{p}.out.{route}.{operation_id}"),
                reply_stream: Some(self.outcomes_stream.clone()),
                progress_subject: Some(format!("{p}.prog.{route}.{operation_id}")),
            },
        }
    }

    /// Where an accepted request's progress reports go: the subject it names, or contract 1's.
    pub fn progress_of(&self, request: &RequestHead) -> String {
        match &request.progress_subject {
            Some(subject) => subject.clone(),
            None => format!("{}.prog.{}", self.prefix, request.operation_id),
        }
    }

    /// A route's result subjects (contract 2): what its workers may publish replies to.
    pub fn route_results(&self, route: &str) -> String {
        format!("{}.out.{route}.>", self.prefix)
    }

    /// A route's progress subjects (contract 2): what its workers may publish reports to.
    pub fn route_progress(&self, route: &str) -> String {
        format!("{}.prog.{route}.>", self.prefix)
    }

    /// An operation's result under contract 2 on whatever route: one direct get by wildcard,
    /// issued before the request says the route. Any route's writer could fill such a subject,
    /// so a hit counts only where it is the subject the request names.
    pub fn result_any_route(&self, operation_id: &str) -> String {
        format!("{}.out.*.{operation_id}", self.prefix)
    }

    /// Progress subjects of an operation on any route (contract 2), for one wildcard direct get.
    pub fn progress_any_route(&self, operation_id: &str) -> String {
        format!("{}.prog.*.{operation_id}", self.prefix)
    }

    /// Whether `pattern`, a subject with `*` wildcards (one token each), matches `subject`
    /// (NATS subject matching, https://docs.nats.io/nats-concepts/subjects#wildcards; `>` is not
    /// used here).
    pub fn covers(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (None, None) => return true,
                (Some(p), Some(s)) if p == "*" || p == s => {}
                _ => return false,
            }
        }
    }

    /// The operation id a result or progress subject (either contract) belongs to: its last token.
    pub fn operation_of(subject: &str) -> &str {
        subject.rsplit('.').next().unwrap_or(subject)
    }

    /// The delivery state of an operation's webhook (the last message wins).
    pub fn callback_state(&self, operation_id: &str) -> String {
        format!("{}.cb.{operation_id}", self.prefix)
    }

    /// Where a webhook that could not be delivered ends up.
    pub fn webhook_dead_letter(&self, operation_id: &str) -> String {
        format!("{}.dlq.webhook.{operation_id}", self.prefix)
    }

    /// A route's requests: the filter of that route's worker consumer.
    pub fn route_requests(&self, route: &str) -> String {
        format!("{}.req.{route}.>", self.prefix)
    }

    /// The request subject of one idempotency key on one route.
    pub fn request(&self, route: &str, key_token: &str) -> String {
        format!("{}.req.{route}.{key_token}", self.prefix)
    }

    /// The request subject of a key token on whatever route: one direct get finds it by wildcard.
    pub fn request_any_route(&self, key_token: &str) -> String {
        format!("{}.req.*.{key_token}", self.prefix)
    }

    /// All batch records (the requests stream's second subject filter). A batch record is
    /// written by the gateway in the same atomic batch as its requests; workers never read it.
    pub fn all_batches(&self) -> String {
        format!("{}.batch.>", self.prefix)
    }

    /// The record of the batch of key token `key_token` on `route`.
    pub fn batch(&self, route: &str, key_token: &str) -> String {
        format!("{}.batch.{route}.{key_token}", self.prefix)
    }

    /// The record of a batch key token on whatever route.
    pub fn batch_any_route(&self, key_token: &str) -> String {
        format!("{}.batch.*.{key_token}", self.prefix)
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

/// Reads a header as text. NATS header names are case-sensitive on the wire, but a worker in
/// another language may well write `content-type`: an exact match is tried first, then any case.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    if let Some(v) = headers.get(name) {
        return Some(v.as_str());
    }
    headers.iter().find_map(|(n, values)| {
        let n: &str = n.as_ref();
        n.eq_ignore_ascii_case(name)
            .then(|| values.first().map(|v| v.as_str()))
            .flatten()
    })
}

fn required<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, ContractError> {
    header_str(headers, name).ok_or(ContractError::MissingHeader(name))
}

/// Formats an instant the way the contract writes times (RFC 3339, UTC).
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .expect("an OffsetDateTime always formats as RFC 3339")
}

fn parse_time(name: &'static str, value: &str) -> Result<OffsetDateTime, ContractError> {
    OffsetDateTime::parse(value, &Rfc3339).map_err(|_| ContractError::InvalidHeader {
        name,
        value: value.to_owned(),
    })
}

/// The contract's part of a request message: every field the gateway writes as a `Gw-*` header
/// (plus `Content-Type`), and every reader parses. [`RequestHead::to_headers`] is the one writer,
/// [`RequestHead::from_headers`] the one reader; a property test holds them to each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub operation_id: String,
    pub route: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    /// The contract the request was written under (`Gw-Contract`).
    pub contract: WireContract,
    pub reply_subject: String,
    /// The stream of `reply_subject`; `None` under contract 1 (see [`RequestHead::reply_stream_or`]).
    pub reply_stream: Option<String>,
    /// Where progress reports go; `None` under contract 1 (see [`Subjects::progress_of`]).
    pub progress_subject: Option<String>,
    pub deadline: OffsetDateTime,
    /// No handler starts before this (a delayed start; `deadline` counts from it).
    pub not_before: Option<OffsetDateTime>,
    /// No handler starts from this on: the operation ends `expired` unrun.
    pub start_by: Option<OffsetDateTime>,
    /// How long the gateway keeps this operation.
    pub retention_secs: Option<u64>,
    /// The key's scope and binding, as the gateway wrote them (informational for workers).
    pub tenant: Option<String>,
    /// The idempotency key as an RFC 8941 sf-string (quoted, so no whitespace is lost on the wire).
    pub idempotency_key: Option<String>,
    pub fingerprint: Option<String>,
    /// The completion webhook's URL, if the client or the route set one.
    pub callback_url: Option<String>,
    /// How the route retries its operations; `None`: as the worker's settings say.
    pub retry_policy: Option<crate::retry::RetryPolicy>,
    /// The failed operation this one redrives (`Gw-Redrive-Of`).
    pub redrive_of: Option<String>,
    /// Where the body is when it is not in the message (contract 3).
    pub body_object: Option<BodyObject>,
    /// Where a reply body too large for its message may go (`Gw-Reply-Bucket`).
    pub reply_bucket: Option<String>,
}

/// A request body kept in a JetStream Object Store (a claim check): the bucket, the object's
/// name, its size in bytes and its digest as the Object Store writes it (`SHA-256=` and the
/// base64url of the SHA-256 of the bytes, RFC 4648 section 5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BodyObject {
    pub bucket: String,
    pub name: String,
    pub size: u64,
    pub digest: String,
}

impl BodyObject {
    /// The name of a reply body of operation `operation_id`: the operation's id, `.result.`,
    /// and a part unique to the writer, so that two attempts racing to answer never write the
    /// same object (the one whose record loses removes its own).
    pub fn reply_name(operation_id: &str) -> String {
        format!("{operation_id}.result.{}", unique_token())
    }

    /// Whether this object can be the reply body of `request`'s operation: in the bucket the
    /// request names, and named for the operation (or for the operation it redrives, whose
    /// committed reply a redrive adopts). A reader checks it before serving a result's object,
    /// so that a worker cannot point a result at another operation's body.
    pub fn is_reply_of(&self, request: &RequestHead) -> bool {
        let named_for = |id: &str| {
            self.name
                .strip_prefix(id)
                .is_some_and(|rest| rest.starts_with(".result."))
        };
        request.reply_bucket.as_deref() == Some(self.bucket.as_str())
            && (named_for(&request.operation_id)
                || request.redrive_of.as_deref().is_some_and(named_for))
    }

    /// The SHA-256 of the bytes, base64url (RFC 4648 section 5), without the `SHA-256=` label.
    pub fn sha256(&self) -> &str {
        self.digest.strip_prefix("SHA-256=").unwrap_or(&self.digest)
    }

    /// The `Gw-Body-*` headers that name this object.
    fn write_headers(&self, h: &mut HeaderMap) {
        h.insert(header::BODY_BUCKET, self.bucket.as_str());
        h.insert(header::BODY_OBJECT, self.name.as_str());
        h.insert(header::BODY_SIZE, self.size.to_string().as_str());
        h.insert(header::BODY_DIGEST, self.digest.as_str());
    }

    /// Reads the `Gw-Body-*` headers: `None` when there are none, an error when some are missing
    /// or the size is not a number.
    fn read_headers(headers: &HeaderMap) -> Result<Option<Self>, ContractError> {
        let names = [
            header::BODY_BUCKET,
            header::BODY_OBJECT,
            header::BODY_SIZE,
            header::BODY_DIGEST,
        ];
        if names.iter().all(|n| header_str(headers, n).is_none()) {
            return Ok(None);
        }
        let size = required(headers, header::BODY_SIZE)?;
        let digest = required(headers, header::BODY_DIGEST)?;
        // `SHA-256=` and the base64url of 32 bytes: nothing else is a digest (and nothing else
        // may reach an entity tag made of it).
        let sha256 = digest
            .strip_prefix("SHA-256=")
            .and_then(|b64| data_encoding::BASE64URL.decode(b64.as_bytes()).ok());
        if sha256.is_none_or(|bytes| bytes.len() != 32) {
            return Err(ContractError::InvalidHeader {
                name: header::BODY_DIGEST,
                value: digest.to_owned(),
            });
        }
        Ok(Some(BodyObject {
            bucket: required(headers, header::BODY_BUCKET)?.to_owned(),
            name: required(headers, header::BODY_OBJECT)?.to_owned(),
            size: size.parse().map_err(|_| ContractError::InvalidHeader {
                name: header::BODY_SIZE,
                value: size.to_owned(),
            })?,
            digest: digest.to_owned(),
        }))
    }
}

/// A random 128-bit token in lowercase hex (32 characters).
fn unique_token() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl RequestHead {
    /// The NATS headers of a request message: `forwarded` (client headers on the allow-list) first,
    /// then the contract's own, so that no forwarded header can shadow a contract header.
    pub fn to_headers(&self, forwarded: &[(String, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in forwarded {
            h.append(name.as_str(), value.as_str());
        }
        let retention = self.retention_secs.map(|secs| secs.to_string());
        let deadline = format_time(self.deadline);
        let not_before = self.not_before.map(format_time);
        let start_by = self.start_by.map(format_time);
        // Contract 1 had no version header: a request of it is written as that release wrote it.
        let written = match (&self.body_object, self.contract) {
            (Some(_), _) => WireContract::V3,
            (None, contract) => contract,
        };
        let contract = (written != WireContract::V1).then(|| written.number().to_string());
        let retry_policy = self.retry_policy.as_ref().map(|p| p.to_header());
        let fields = [
            (header::OPERATION_ID, Some(self.operation_id.as_str())),
            (header::ROUTE, Some(self.route.as_str())),
            (header::METHOD, Some(self.method.as_str())),
            (header::PATH, Some(self.path.as_str())),
            (header::QUERY, self.query.as_deref()),
            (header::CONTENT_TYPE, self.content_type.as_deref()),
            (header::CONTRACT, contract.as_deref()),
            (header::REPLY_SUBJECT, Some(self.reply_subject.as_str())),
            (header::REPLY_STREAM, self.reply_stream.as_deref()),
            (header::PROGRESS_SUBJECT, self.progress_subject.as_deref()),
            (header::DEADLINE, Some(deadline.as_str())),
            (header::NOT_BEFORE, not_before.as_deref()),
            (header::START_BY, start_by.as_deref()),
            (header::RETENTION, retention.as_deref()),
            (header::TENANT, self.tenant.as_deref()),
            (header::IDEMPOTENCY_KEY, self.idempotency_key.as_deref()),
            (header::FINGERPRINT, self.fingerprint.as_deref()),
            (header::CALLBACK_URL, self.callback_url.as_deref()),
            (header::RETRY_POLICY, retry_policy.as_deref()),
            (header::REDRIVE_OF, self.redrive_of.as_deref()),
            (header::REPLY_BUCKET, self.reply_bucket.as_deref()),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                h.insert(name, value);
            }
        }
        if let Some(object) = &self.body_object {
            object.write_headers(&mut h);
        }
        h
    }

    /// The stream that holds the reply slot: the one the request names, else `results_stream`
    /// (contract 1's).
    pub fn reply_stream_or<'a>(&'a self, results_stream: &'a str) -> &'a str {
        self.reply_stream.as_deref().unwrap_or(results_stream)
    }

    /// How long a reply to this request is stored with `Nats-TTL`: the retention under contract 1;
    /// never where the request names the reply's stream (that stream refuses per-message TTLs and
    /// keeps every record for at least the longest retention).
    pub fn reply_ttl(&self) -> Option<std::time::Duration> {
        match self.reply_stream {
            Some(_) => None,
            None => self.retention_secs.map(std::time::Duration::from_secs),
        }
    }

    /// Reads the contract's fields of a request message. Names match in any case (a foreign
    /// writer may lowercase them); the six a worker needs are required, and under contract 2 the
    /// reply stream and progress subject too. A version this library does not know is
    /// [`ContractError::UnknownContract`], read before anything else.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ContractError> {
        let contract = match header_str(headers, header::CONTRACT) {
            None => WireContract::V1,
            Some(v) => WireContract::parse(v)
                .ok_or_else(|| ContractError::UnknownContract(v.to_owned()))?,
        };
        let (reply_stream, progress_subject) = match contract {
            WireContract::V1 => (None, None),
            WireContract::V2 | WireContract::V3 => (
                Some(required(headers, header::REPLY_STREAM)?.to_owned()),
                Some(required(headers, header::PROGRESS_SUBJECT)?.to_owned()),
            ),
        };
        let deadline = parse_time(header::DEADLINE, required(headers, header::DEADLINE)?)?;
        let instant = |name| {
            header_str(headers, name)
                .map(|v| parse_time(name, v))
                .transpose()
        };
        let (not_before, start_by) = (instant(header::NOT_BEFORE)?, instant(header::START_BY)?);
        let retention_secs = match header_str(headers, header::RETENTION) {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| ContractError::InvalidHeader {
                name: header::RETENTION,
                value: v.to_owned(),
            })?),
        };
        let retry_policy = match header_str(headers, header::RETRY_POLICY) {
            None => None,
            Some(v) => Some(crate::retry::RetryPolicy::from_header(v).map_err(|_| {
                ContractError::InvalidHeader {
                    name: header::RETRY_POLICY,
                    value: v.to_owned(),
                }
            })?),
        };
        let optional = |name| header_str(headers, name).map(str::to_owned);
        let body_object = match contract {
            WireContract::V3 => Some(
                BodyObject::read_headers(headers)?
                    .ok_or(ContractError::MissingHeader(header::BODY_OBJECT))?,
            ),
            _ => None,
        };
        // A request's layout: contract 3 is contract 2's, with the body elsewhere.
        let contract = match contract {
            WireContract::V3 => WireContract::V2,
            other => other,
        };
        Ok(Self {
            operation_id: required(headers, header::OPERATION_ID)?.to_owned(),
            route: required(headers, header::ROUTE)?.to_owned(),
            method: required(headers, header::METHOD)?.to_owned(),
            path: required(headers, header::PATH)?.to_owned(),
            query: optional(header::QUERY),
            content_type: optional(header::CONTENT_TYPE),
            contract,
            reply_subject: required(headers, header::REPLY_SUBJECT)?.to_owned(),
            reply_stream,
            progress_subject,
            deadline,
            not_before,
            start_by,
            retention_secs,
            tenant: optional(header::TENANT),
            idempotency_key: optional(header::IDEMPOTENCY_KEY),
            fingerprint: optional(header::FINGERPRINT),
            callback_url: optional(header::CALLBACK_URL),
            retry_policy,
            redrive_of: optional(header::REDRIVE_OF),
            body_object,
            reply_bucket: optional(header::REPLY_BUCKET),
        })
    }
}

/// An accepted request as a worker sees it: the contract's fields (reachable as fields of the
/// request itself, `request.route`, through `Deref`), all headers, the body, and the handles a
/// running handler uses.
#[derive(Debug, Clone)]
pub struct Request {
    pub head: RequestHead,
    /// All headers of the message, forwarded HTTP headers included.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Cancelled when a client cancels the operation while a worker handles it
    /// (`handlers::Worker` watches for that; a long handler may check it and stop early).
    pub cancellation: tokio_util::sync::CancellationToken,
    /// Reports progress that the status resource and event streams show (set by
    /// `handlers::Worker`; a request read elsewhere reports nowhere).
    pub progress: crate::progress::ProgressReporter,
}

impl Request {
    /// Reads a request message (payload = HTTP body).
    pub fn from_parts(headers: HeaderMap, body: Bytes) -> Result<Self, ContractError> {
        Ok(Self {
            head: RequestHead::from_headers(&headers)?,
            headers,
            body,
            cancellation: tokio_util::sync::CancellationToken::new(),
            progress: crate::progress::ProgressReporter::detached(),
        })
    }
}

impl std::ops::Deref for Request {
    type Target = RequestHead;

    fn deref(&self) -> &RequestHead {
        &self.head
    }
}

/// What a terminal record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A worker answered.
    Reply,
    /// Nobody answered before the deadline; written by the gateway (or a worker that finds the
    /// deadline passed) so that every reader sees the same terminal state.
    Expired,
    /// A client cancelled the operation before any result; written by the gateway.
    Cancelled,
}

impl Outcome {
    fn as_header(self) -> Option<&'static str> {
        match self {
            Outcome::Reply => None,
            Outcome::Expired => Some("expired"),
            Outcome::Cancelled => Some("cancelled"),
        }
    }
}

/// A terminal record: what `GET /operations/{id}/result` replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRecord {
    pub outcome: Outcome,
    pub status: u16,
    pub content_type: Option<String>,
    /// Response headers the worker set (the gateway replays those on its allow-list).
    pub headers: Vec<(String, String)>,
    /// The body, when it is in the message (empty when `body_object` names it).
    pub body: Bytes,
    /// Where the body is when it was too large for the message: an object the request's
    /// `Gw-Reply-Bucket` holds (`Gw-Body-*` headers, as a contract-3 request names its body).
    pub body_object: Option<BodyObject>,
}

impl ResultRecord {
    /// A worker's reply.
    pub fn reply(status: u16, content_type: Option<String>, body: Bytes) -> Self {
        Self {
            outcome: Outcome::Reply,
            status,
            content_type,
            headers: Vec::new(),
            body,
            body_object: None,
        }
    }

    /// The marker that ends an operation nobody answered in time: an RFC 9457 problem, 504.
    pub fn expired(operation_id: &str, deadline: OffsetDateTime) -> Self {
        let detail = format!(
            "No result arrived before the operation's deadline ({}).",
            format_time(deadline)
        );
        let title = "Operation expired";
        Self::problem(
            Outcome::Expired,
            operation_id,
            504,
            "expired",
            title,
            &detail,
        )
    }

    /// The marker that ends an operation no worker started by its start-by deadline: `expired`,
    /// an RFC 9457 problem, 504 (`not-started`).
    pub fn not_started(operation_id: &str, start_by: OffsetDateTime) -> Self {
        let detail = format!(
            "No worker started the operation by its start-by deadline ({}); it did not run.",
            format_time(start_by)
        );
        Self::problem(
            Outcome::Expired,
            operation_id,
            504,
            "not-started",
            "Operation not started in time",
            &detail,
        )
    }

    /// The marker that ends an operation a client cancelled: an RFC 9457 problem, 410 (the
    /// result will never exist).
    pub fn cancelled(operation_id: &str) -> Self {
        let detail = "The operation was cancelled before any result; none will be stored.";
        let title = "Operation cancelled";
        Self::problem(
            Outcome::Cancelled,
            operation_id,
            410,
            "cancelled",
            title,
            detail,
        )
    }

    /// A terminal record whose body is an RFC 9457 problem (`type` ends in `slug`).
    pub fn problem(
        outcome: Outcome,
        operation_id: &str,
        status: u16,
        slug: &str,
        title: &str,
        detail: &str,
    ) -> Self {
        let body = serde_json::json!({
            "type": format!("{PROBLEM_TYPE_BASE}{slug}"),
            "title": title,
            "status": status,
            "detail": detail,
            "operation_id": operation_id,
        });
        Self {
            outcome,
            status,
            content_type: Some("application/problem+json".to_owned()),
            headers: Vec::new(),
            body: Bytes::from(body.to_string()),
            body_object: None,
        }
    }

    /// The NATS headers that carry this record (without JetStream control headers).
    pub fn to_headers(&self, operation_id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in &self.headers {
            h.append(name.as_str(), value.as_str());
        }
        h.insert(header::OPERATION_ID, operation_id);
        h.insert(header::STATUS, self.status.to_string().as_str());
        if let Some(ct) = &self.content_type {
            h.insert(header::CONTENT_TYPE, ct.as_str());
        }
        if let Some(outcome) = self.outcome.as_header() {
            h.insert(header::OUTCOME, outcome);
        }
        if let Some(object) = &self.body_object {
            object.write_headers(&mut h);
        }
        h
    }

    /// Checks what a writer controls: the status must be one HTTP can replay for a finished
    /// operation (200-599), and the content type and extra headers must be storable as NATS
    /// headers without touching the contract's own (a reply cannot set `Gw-Outcome`).
    pub fn validate(&self) -> Result<(), ContractError> {
        if !(200..=599).contains(&self.status) {
            return Err(ContractError::InvalidHeader {
                name: header::STATUS,
                value: self.status.to_string(),
            });
        }
        let unstorable = |name: &str, why: &'static str| {
            Err(ContractError::Unstorable {
                name: name.to_owned(),
                why,
            })
        };
        if let Some(ct) = &self.content_type
            && ct.parse::<async_nats::HeaderValue>().is_err()
        {
            return unstorable(header::CONTENT_TYPE, "its value is not a header value");
        }
        if self.body_object.is_some() && !self.body.is_empty() {
            return unstorable(header::BODY_OBJECT, "the body is in the message too");
        }
        for (name, value) in &self.headers {
            if is_contract_header(name) {
                return unstorable(name, "the contract owns it");
            }
            if name.parse::<async_nats::HeaderName>().is_err() {
                return unstorable(name, "it is not a header name");
            }
            if value.parse::<async_nats::HeaderValue>().is_err() {
                return unstorable(name, "its value is not a header value");
            }
        }
        Ok(())
    }

    /// Reads a stored result message. A delete marker in the slot is [`ContractError::Removed`].
    pub fn from_parts(headers: &HeaderMap, body: Bytes) -> Result<Self, ContractError> {
        if let Some(reason) = header_str(headers, header::MARKER_REASON) {
            return Err(ContractError::Removed {
                reason: reason.to_owned(),
            });
        }
        let raw_status = required(headers, header::STATUS)?;
        // Exactly three digits, as an HTTP status code is written (RFC 9110 section 15): `+200`
        // or `0200` would parse as numbers, and are not status codes.
        let invalid = || ContractError::InvalidHeader {
            name: header::STATUS,
            value: raw_status.to_owned(),
        };
        if raw_status.len() != 3 || !raw_status.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let status = raw_status.parse::<u16>().map_err(|_| invalid())?;
        let outcome = match header_str(headers, header::OUTCOME) {
            None | Some("reply") => Outcome::Reply,
            Some("expired") => Outcome::Expired,
            Some("cancelled") => Outcome::Cancelled,
            Some(other) => {
                return Err(ContractError::InvalidHeader {
                    name: header::OUTCOME,
                    value: other.to_owned(),
                });
            }
        };
        let mut extra = Vec::new();
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            if is_contract_header(name) {
                continue;
            }
            for v in values {
                extra.push((name.to_owned(), v.as_str().to_owned()));
            }
        }
        let record = Self {
            outcome,
            status,
            content_type: header_str(headers, header::CONTENT_TYPE).map(str::to_owned),
            headers: extra,
            body,
            body_object: BodyObject::read_headers(headers)?,
        };
        record.validate()?;
        Ok(record)
    }

    /// Reads a result from a stream message.
    pub fn from_stream_message(msg: &StreamMessage) -> Result<Self, ContractError> {
        Self::from_parts(&msg.headers, msg.payload.clone())
    }

    /// Two records are the same answer when status, content type, outcome and body agree (a
    /// body in an object by its size and digest: two attempts store the same bytes under
    /// names of their own). A repeated identical reply changes nothing; a different one is a
    /// conflict.
    pub fn same_answer(&self, other: &ResultRecord) -> bool {
        let same_object = match (&self.body_object, &other.body_object) {
            (None, None) => true,
            (Some(a), Some(b)) => a.size == b.size && a.digest == b.digest,
            _ => false,
        };
        self.outcome == other.outcome
            && self.status == other.status
            && self.content_type == other.content_type
            && self.body == other.body
            && same_object
    }

    /// The body's size in bytes, wherever it is.
    pub fn body_size(&self) -> u64 {
        self.body_object
            .as_ref()
            .map_or(self.body.len() as u64, |object| object.size)
    }
}

/// Headers that belong to the contract or to JetStream, never to a forwarded request or a
/// replayed HTTP response (`Content-Type` travels in its own field).
pub fn is_contract_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("gw-") || lower.starts_with("nats-") || lower == "content-type"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_round_trips_through_headers() {
        let mut record = ResultRecord::reply(
            201,
            Some("application/json".into()),
            Bytes::from_static(b"{}"),
        );
        record.headers.push(("ETag".into(), "\"v1\"".into()));
        let headers = record.to_headers("op1");
        let back = ResultRecord::from_parts(&headers, record.body.clone()).unwrap();
        assert_eq!(back, record);
        assert!(back.same_answer(&record));
    }

    #[test]
    fn a_reply_body_is_served_only_from_where_its_request_allows() {
        let mut request = RequestHead::from_headers(&{
            let mut h = HeaderMap::new();
            for (name, value) in [
                (header::OPERATION_ID, "op1"),
                (header::ROUTE, "orders"),
                (header::METHOD, "POST"),
                (header::PATH, "/orders"),
                (header::REPLY_SUBJECT, "gw.out.orders.op1"),
                (header::DEADLINE, "2026-01-01T00:00:00Z"),
                (header::REPLY_BUCKET, "GW_BODIES_orders"),
            ] {
                h.insert(name, value);
            }
            h
        })
        .unwrap();
        let object = |bucket: &str, name: &str| BodyObject {
            bucket: bucket.to_owned(),
            name: name.to_owned(),
            size: 1,
            digest: "SHA-256=x".to_owned(),
        };
        let own = object("GW_BODIES_orders", &BodyObject::reply_name("op1"));
        assert!(own.is_reply_of(&request));
        // Another route's bucket, another operation's reply, a request body, a bare prefix.
        assert!(!object("GW_BODIES_invoices", &own.name).is_reply_of(&request));
        assert!(!object("GW_BODIES_orders", &BodyObject::reply_name("op2")).is_reply_of(&request));
        assert!(!object("GW_BODIES_orders", "op1key.0123").is_reply_of(&request));
        assert!(!object("GW_BODIES_orders", "op1.result").is_reply_of(&request));
        // A redrive serves the reply it adopted from the operation it redrives.
        let original = object("GW_BODIES_orders", &BodyObject::reply_name("op0"));
        assert!(!original.is_reply_of(&request));
        request.redrive_of = Some("op0".to_owned());
        assert!(original.is_reply_of(&request));
        // A request that names no bucket takes no reply body from any.
        request.reply_bucket = None;
        assert!(!own.is_reply_of(&request));
        // Two names of one operation never collide: racing writers each remove their own.
        assert_ne!(BodyObject::reply_name("op1"), BodyObject::reply_name("op1"));
    }

    #[test]
    fn a_record_names_its_body_object_or_carries_its_body_never_both() {
        let digest = |byte: u8| format!("SHA-256={}", data_encoding::BASE64URL.encode(&[byte; 32]));
        let mut record = ResultRecord::reply(200, None, Bytes::new());
        record.body_object = Some(BodyObject {
            bucket: "GW_BODIES_orders".into(),
            name: BodyObject::reply_name("op1"),
            size: 3 << 20,
            digest: digest(1),
        });
        let back = ResultRecord::from_parts(&record.to_headers("op1"), Bytes::new()).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.body_size(), 3 << 20);
        // The same bytes under another writer's name are the same answer.
        let mut other = record.clone();
        other.body_object.as_mut().unwrap().name = BodyObject::reply_name("op1");
        assert!(other.same_answer(&record));
        other.body_object.as_mut().unwrap().digest = digest(2);
        assert!(!other.same_answer(&record));
        // A digest is `SHA-256=` and the base64url of 32 bytes, nothing else (it becomes an
        // entity tag: a quote in it must not get that far).
        for bad in ["SHA-256=a\"b", "SHA-256=abc=", "sha256=x", ""] {
            let mut h = other.to_headers("op1");
            h.insert(header::BODY_DIGEST, bad);
            assert!(
                matches!(
                    ResultRecord::from_parts(&h, Bytes::new()),
                    Err(ContractError::InvalidHeader {
                        name: header::BODY_DIGEST,
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        record.body = Bytes::from_static(b"and inline");
        assert!(record.validate().is_err());
        // Some of the four headers but not all: broken.
        let mut partial = ResultRecord::reply(200, None, Bytes::new()).to_headers("op1");
        partial.insert(header::BODY_OBJECT, "op1.result.x");
        assert!(matches!(
            ResultRecord::from_parts(&partial, Bytes::new()),
            Err(ContractError::MissingHeader(_))
        ));
    }

    #[test]
    fn expired_marker_is_a_504_problem() {
        let record = ResultRecord::expired("op1", OffsetDateTime::UNIX_EPOCH);
        let back =
            ResultRecord::from_parts(&record.to_headers("op1"), record.body.clone()).unwrap();
        assert_eq!(back.outcome, Outcome::Expired);
        assert_eq!(back.status, 504);
        let body: serde_json::Value = serde_json::from_slice(&back.body).unwrap();
        assert_eq!(body["status"], 504);
    }

    #[test]
    fn result_status_outside_2xx_to_5xx_is_rejected() {
        let mut h = HeaderMap::new();
        h.insert(header::STATUS, "100");
        assert!(ResultRecord::from_parts(&h, Bytes::new()).is_err());
        h.insert(header::STATUS, "abc");
        assert!(ResultRecord::from_parts(&h, Bytes::new()).is_err());
    }

    #[test]
    fn header_lookup_matches_what_the_server_sends_back() {
        // The server may send header names back in another case or as a standard name;
        // lookups go through the same constants either way.
        let mut h = HeaderMap::new();
        h.insert("gw-status", "200");
        assert_eq!(header_str(&h, header::STATUS), Some("200"));
    }

    #[test]
    fn a_request_says_its_contract_and_both_layouts_read() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            (header::OPERATION_ID, "op"),
            (header::ROUTE, "orders"),
            (header::METHOD, "POST"),
            (header::PATH, "/orders"),
            (header::REPLY_SUBJECT, "gw.res.op"),
            (header::DEADLINE, "2026-01-01T00:00:00Z"),
        ] {
            h.insert(name, value);
        }
        // The first release's request: no version, no progress subject.
        let v1 = RequestHead::from_headers(&h).unwrap();
        assert_eq!(v1.contract, WireContract::V1);
        assert_eq!(Subjects::default().progress_of(&v1), "gw.prog.op");
        assert!(v1.to_headers(&[]).get(header::CONTRACT).is_none());
        assert_eq!(v1.reply_stream_or("GW_RESULTS"), "GW_RESULTS");
        assert_eq!(v1.reply_ttl(), None);
        h.insert(header::RETENTION, "60");
        let v1 = RequestHead::from_headers(&h).unwrap();
        assert_eq!(v1.reply_ttl(), Some(std::time::Duration::from_secs(60)));
        // Contract 2 names the reply's stream and where progress goes.
        h.insert(header::CONTRACT, "2");
        assert!(matches!(
            RequestHead::from_headers(&h),
            Err(ContractError::MissingHeader(header::REPLY_STREAM))
        ));
        h.insert(header::REPLY_STREAM, "GW_OUTCOMES");
        assert!(matches!(
            RequestHead::from_headers(&h),
            Err(ContractError::MissingHeader(header::PROGRESS_SUBJECT))
        ));
        h.insert(header::PROGRESS_SUBJECT, "gw.prog.orders.op");
        let v2 = RequestHead::from_headers(&h).unwrap();
        assert_eq!(Subjects::default().progress_of(&v2), "gw.prog.orders.op");
        assert_eq!(v2.reply_stream_or("GW_RESULTS"), "GW_OUTCOMES");
        // That stream refuses per-message TTLs: the reply carries none.
        assert_eq!(v2.reply_ttl(), None);
        assert_eq!(RequestHead::from_headers(&v2.to_headers(&[])).unwrap(), v2);
        // A newer release's request is not read as if it were this one's.
        for unknown in ["4", "0", "two", "+2"] {
            h.insert(header::CONTRACT, unknown);
            assert!(matches!(
                RequestHead::from_headers(&h),
                Err(ContractError::UnknownContract(_))
            ));
        }
    }

    #[test]
    fn subjects_follow_the_prefix() {
        let s = Subjects::new("acme");
        assert_eq!(s.request("orders", "k1"), "acme.req.orders.k1");
        assert_eq!(s.request_any_route("k1"), "acme.req.*.k1");
        assert_eq!(s.route_requests("orders"), "acme.req.orders.>");
        assert_eq!(
            s.clone().with_outcomes_stream("ACME").slots("orders", "op"),
            Slots {
                reply_subject: "acme.out.orders.op".into(),
                reply_stream: Some("ACME".into()),
                progress_subject: Some("acme.prog.orders.op".into()),
            }
        );
        assert_eq!(s.route_results("orders"), "acme.out.orders.>");
        assert_eq!(s.result_any_route("op"), "acme.out.*.op");
        assert_eq!(s.progress_any_route("op"), "acme.prog.*.op");
        assert!(Subjects::covers("acme.out.*.op", "acme.out.orders.op"));
        assert!(!Subjects::covers("acme.out.*.op", "acme.res.op"));
        assert!(!Subjects::covers("acme.out.*.op", "acme.out.orders.op.x"));
        assert!(!Subjects::covers("acme.out.*.op", "acme.out.orders.other"));
        let s = s.with_contract(WireContract::V1);
        assert_eq!(
            s.slots("orders", "op"),
            Slots {
                reply_subject: "acme.res.op".into(),
                reply_stream: None,
                progress_subject: None,
            }
        );
        assert_eq!(Subjects::operation_of("acme.res.orders.op"), "op");
        assert_eq!(Subjects::operation_of("acme.res.op"), "op");
    }
}
