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
//! - `gw.res.<operation-id>`: the one terminal record of an operation: a worker's reply, or the
//!   gateway's `expired` or `cancelled` marker. The results stream keeps at most one message per subject and
//!   refuses later ones (`discard_new_per_subject`), so the first terminal record wins for good.

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
/// Default name of the stream holding terminal records (results).
pub const DEFAULT_RESULTS_STREAM: &str = "GW_RESULTS";

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
    /// Where the worker publishes its reply (a subject of the results stream).
    pub const REPLY_SUBJECT: &str = "Gw-Reply-Subject";
    /// RFC 3339 instant after which the operation counts as expired.
    pub const DEADLINE: &str = "Gw-Deadline";
    /// Seconds the gateway keeps the request, status and result; workers set the same TTL on replies.
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
    /// The stream refused to store a message for one of its limits: a second message on a
    /// subject under `discard_new_per_subject` ("maximum messages per subject exceeded"), or a
    /// full stream ("maximum bytes exceeded", "maximum messages exceeded").
    pub const MAX_MSGS_PER_SUBJECT: u64 = 10077;
    /// JetStream's storage resources (account or server) are used up.
    pub const STORAGE_RESOURCES_EXCEEDED: u64 = 10047;
}

/// Errors reading a message that does not follow the contract.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("header {0} is missing")]
    MissingHeader(&'static str),
    #[error("header {name} has an invalid value {value:?}")]
    InvalidHeader { name: &'static str, value: String },
    #[error("header {name:?} cannot be stored: {why}")]
    Unstorable { name: String, why: &'static str },
    /// The subject holds nats-server's delete marker: its record was removed (by TTL or
    /// `max_age`, the reason given) and the marker keeps the place, so it cannot be written anew.
    #[error("the record was removed ({reason}); a delete marker holds its place")]
    Removed { reason: String },
}

/// Builds every subject from one prefix, so gateway and workers cannot disagree.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// All request subjects (the requests stream's subject filter).
    pub fn all_requests(&self) -> String {
        format!("{}.req.>", self.prefix)
    }

    /// All result subjects (the results stream's subject filter).
    pub fn all_results(&self) -> String {
        format!("{}.res.>", self.prefix)
    }

    /// Progress reports, webhook delivery states and dead letters (the events stream's subjects).
    pub fn all_events(&self) -> [String; 3] {
        [
            self.all_progress(),
            format!("{}.cb.>", self.prefix),
            format!("{}.dlq.>", self.prefix),
        ]
    }

    /// All progress subjects.
    pub fn all_progress(&self) -> String {
        format!("{}.prog.>", self.prefix)
    }

    /// The latest progress report of an operation (the last message wins).
    pub fn progress(&self, operation_id: &str) -> String {
        format!("{}.prog.{operation_id}", self.prefix)
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

    /// The result subject of an operation.
    pub fn result(&self, operation_id: &str) -> String {
        format!("{}.res.{operation_id}", self.prefix)
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
    pub reply_subject: String,
    pub deadline: OffsetDateTime,
    /// How long the gateway keeps this operation; replies are stored with the same TTL.
    pub retention_secs: Option<u64>,
    /// The key's scope and binding, as the gateway wrote them (informational for workers).
    pub tenant: Option<String>,
    /// The idempotency key as an RFC 8941 sf-string (quoted, so no whitespace is lost on the wire).
    pub idempotency_key: Option<String>,
    pub fingerprint: Option<String>,
    /// The completion webhook's URL, if the client or the route set one.
    pub callback_url: Option<String>,
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
        let fields = [
            (header::OPERATION_ID, Some(self.operation_id.as_str())),
            (header::ROUTE, Some(self.route.as_str())),
            (header::METHOD, Some(self.method.as_str())),
            (header::PATH, Some(self.path.as_str())),
            (header::QUERY, self.query.as_deref()),
            (header::CONTENT_TYPE, self.content_type.as_deref()),
            (header::REPLY_SUBJECT, Some(self.reply_subject.as_str())),
            (header::DEADLINE, Some(deadline.as_str())),
            (header::RETENTION, retention.as_deref()),
            (header::TENANT, self.tenant.as_deref()),
            (header::IDEMPOTENCY_KEY, self.idempotency_key.as_deref()),
            (header::FINGERPRINT, self.fingerprint.as_deref()),
            (header::CALLBACK_URL, self.callback_url.as_deref()),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                h.insert(name, value);
            }
        }
        h
    }

    /// Reads the contract's fields of a request message. Names match in any case (a foreign
    /// writer may lowercase them); the six a worker needs are required.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ContractError> {
        let deadline = parse_time(header::DEADLINE, required(headers, header::DEADLINE)?)?;
        let retention_secs = match header_str(headers, header::RETENTION) {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| ContractError::InvalidHeader {
                name: header::RETENTION,
                value: v.to_owned(),
            })?),
        };
        let optional = |name| header_str(headers, name).map(str::to_owned);
        Ok(Self {
            operation_id: required(headers, header::OPERATION_ID)?.to_owned(),
            route: required(headers, header::ROUTE)?.to_owned(),
            method: required(headers, header::METHOD)?.to_owned(),
            path: required(headers, header::PATH)?.to_owned(),
            query: optional(header::QUERY),
            content_type: optional(header::CONTENT_TYPE),
            reply_subject: required(headers, header::REPLY_SUBJECT)?.to_owned(),
            deadline,
            retention_secs,
            tenant: optional(header::TENANT),
            idempotency_key: optional(header::IDEMPOTENCY_KEY),
            fingerprint: optional(header::FINGERPRINT),
            callback_url: optional(header::CALLBACK_URL),
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
    pub body: Bytes,
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
        };
        record.validate()?;
        Ok(record)
    }

    /// Reads a result from a stream message.
    pub fn from_stream_message(msg: &StreamMessage) -> Result<Self, ContractError> {
        Self::from_parts(&msg.headers, msg.payload.clone())
    }

    /// Two records are the same answer when status, content type, outcome and body agree.
    /// A repeated identical reply changes nothing; a different one is a conflict.
    pub fn same_answer(&self, other: &ResultRecord) -> bool {
        self.outcome == other.outcome
            && self.status == other.status
            && self.content_type == other.content_type
            && self.body == other.body
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
    fn subjects_follow_the_prefix() {
        let s = Subjects::new("acme");
        assert_eq!(s.request("orders", "k1"), "acme.req.orders.k1");
        assert_eq!(s.request_any_route("k1"), "acme.req.*.k1");
        assert_eq!(s.route_requests("orders"), "acme.req.orders.>");
        assert_eq!(s.result("op"), "acme.res.op");
    }
}
