//! A Jepsen-style history of client calls, and the checker that judges it against what JetStream
//! holds once the faults have stopped and everything has drained.
//!
//! Every call a client makes is recorded twice: when it is invoked (what, through which gateway,
//! when) and when it completes, as one of
//! - `ok`: a definite success (a submit's `202`, a replay included; a read's `200`);
//! - `fail`: a definite failure, after which nothing was or will be written (a `4xx`, or a `503`
//!   whose problem says nothing was done: `overloaded`, `shutting-down`); for a read, a `404`;
//! - `unknown`: the outcome cannot be known (a `503 outcome-unknown`, a timeout, a broken or
//!   refused connection). The write may have happened, or may still happen later.
//!
//! Each logical request has its own idempotency key and its own payload; a client that got
//! `unknown` (or a `503` of any kind) may retry with the same key and payload, and every attempt is
//! recorded. A key is *acknowledged* when any attempt got a `202`.
//!
//! [`check`] then computes, from the history, the streams (`GW_REQUESTS`, `GW_RESULTS`, `GW_OUTCOMES`) and the
//! worker's effect log:
//! - **lost**: an acknowledged key whose request message is missing (or names another operation),
//!   or whose operation has no result, or does not read terminal through every gateway after
//!   healing and draining; also a request written by an `unknown` attempt that never got a result
//!   (JetStream holds it, so a worker must answer it);
//! - **unexpected**: a request message whose key or payload no client sent, a result for an
//!   operation that has no request, a request written although every attempt for its key failed
//!   definitely;
//! - **duplicates**: more than one request message per key (or per payload), more than one
//!   operation id answered for one key, more than one committed result per operation (the worker's
//!   effect, as the results stream holds it);
//! - **inconsistent results**: a committed result that is not the echo of its own request, or that
//!   no recorded handler execution of that operation produced;
//! - **regressions**: an operation read terminal (through any gateway) and later, by a read that
//!   started after that one ended, read `pending` or another terminal status; and reads that
//!   answered `404` for an operation after its `202`.
//!
//! Handler executions per operation are counted too, for information: delivery is at least once,
//! so a handler may run again after a crash, a lost ack or an AckWait expiry; only one result
//! per operation may ever be stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

/// What a client call does.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "f", rename_all = "kebab-case")]
pub enum Call {
    /// `POST` a request with an idempotency key (attempt 1, 2, ... of that key).
    Submit {
        key: String,
        payload: String,
        attempt: u32,
        via: String,
    },
    /// `GET /operations/{op}`.
    Read { op: String, via: String },
    /// `GET /operations/{op}/result`.
    ReadResult { op: String, via: String },
}

impl Call {
    pub fn via(&self) -> &str {
        match self {
            Call::Submit { via, .. } | Call::Read { via, .. } | Call::ReadResult { via, .. } => via,
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Outcome {
    /// A definite success: the operation id and the status the answer carried (and, for a
    /// result read, the result's body).
    Ok {
        http: u16,
        op: Option<String>,
        status: Option<String>,
        replayed: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
    },
    /// A definite failure: nothing was, or will be, written.
    Fail { http: u16, problem: Option<String> },
    /// Nobody can know whether it took effect.
    Unknown {
        http: Option<u16>,
        problem: Option<String>,
        error: Option<String>,
    },
}

impl Outcome {
    /// A short label for counting answers (`202`, `202 replayed`, `503 outcome-unknown`, ...).
    pub fn label(&self) -> String {
        match self {
            Outcome::Ok {
                http,
                replayed: true,
                ..
            } => format!("{http} replayed"),
            Outcome::Ok { http, .. } => http.to_string(),
            Outcome::Fail { http, problem } => match problem {
                Some(p) => format!("{http} {p}"),
                None => http.to_string(),
            },
            Outcome::Unknown {
                http: Some(http),
                problem,
                ..
            } => match problem {
                Some(p) => format!("{http} {p}"),
                None => http.to_string(),
            },
            Outcome::Unknown { error, .. } => {
                let e = error.as_deref().unwrap_or("error");
                if e.contains("timed out") || e.contains("timeout") {
                    "timeout".to_owned()
                } else {
                    "connection error".to_owned()
                }
            }
        }
    }

    /// `unknown`: no answer came, or not all of it (`http`: the status, when the head came).
    fn no_answer(http: Option<u16>, error: &dyn std::error::Error) -> Self {
        Outcome::Unknown {
            http,
            problem: None,
            error: Some(error_chain(error)),
        }
    }

    /// `unknown` from a whole answer: a status that leaves the outcome open (`503
    /// outcome-unknown`, a `5xx` from elsewhere), with its problem slug if it has one.
    fn unknown_answer(http: u16, body: &serde_json::Value) -> Self {
        Outcome::Unknown {
            http: Some(http),
            problem: problem_slug(body),
            error: None,
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }
}

/// One call, invoked and (once it returned) completed.
#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    pub id: u64,
    pub process: String,
    pub call: Call,
    pub invoked: Duration,
    pub completed: Option<Duration>,
    pub outcome: Option<Outcome>,
}

/// One line of the history file.
#[derive(Debug, Serialize)]
struct Event<'a> {
    t_us: u128,
    process: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    call: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    f: Option<&'a Call>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

/// The history of one run: every client call, and the nemesis' notes (faults injected, healing).
pub struct History {
    start: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<CallRecord>,
    notes: Vec<(Duration, String)>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            inner: Mutex::default(),
        }
    }

    /// Time since the history began.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records an invocation; returns the call's id for [`History::complete`].
    pub fn invoke(&self, process: &str, call: Call) -> u64 {
        let invoked = self.elapsed();
        let mut inner = self.inner.lock().unwrap();
        let id = inner.calls.len() as u64;
        inner.calls.push(CallRecord {
            id,
            process: process.to_owned(),
            call,
            invoked,
            completed: None,
            outcome: None,
        });
        id
    }

    /// Records how a call ended.
    pub fn complete(&self, id: u64, outcome: Outcome) {
        let completed = self.elapsed();
        let mut inner = self.inner.lock().unwrap();
        let record = &mut inner.calls[id as usize];
        record.completed = Some(completed);
        record.outcome = Some(outcome);
    }

    /// A nemesis note: a fault injected, a fault healed, a phase begun.
    pub fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let t = self.elapsed();
        eprintln!("[nemesis {:>8.3}s] {what}", t.as_secs_f64());
        self.inner.lock().unwrap().notes.push((t, what));
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn notes(&self) -> Vec<(Duration, String)> {
        self.inner.lock().unwrap().notes.clone()
    }

    /// Writes the history as JSON lines, in time order: `invoke`, then `ok`/`fail`/`unknown`
    /// (a call still running at the end has no completion), and the nemesis' `info` lines.
    pub fn write_jsonl(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let inner = self.inner.lock().unwrap();
        let mut lines: Vec<(Duration, u8, String)> = Vec::new();
        for c in &inner.calls {
            let invoke = Event {
                t_us: c.invoked.as_micros(),
                process: &c.process,
                kind: "invoke",
                call: Some(c.id),
                f: Some(&c.call),
                value: None,
                note: None,
            };
            lines.push((c.invoked, 1, serde_json::to_string(&invoke)?));
            if let (Some(t), Some(outcome)) = (c.completed, &c.outcome) {
                let kind = match outcome {
                    Outcome::Ok { .. } => "ok",
                    Outcome::Fail { .. } => "fail",
                    Outcome::Unknown { .. } => "unknown",
                };
                let done = Event {
                    t_us: t.as_micros(),
                    process: &c.process,
                    kind,
                    call: Some(c.id),
                    f: None,
                    value: Some(outcome),
                    note: None,
                };
                lines.push((t, 2, serde_json::to_string(&done)?));
            }
        }
        for (t, what) in &inner.notes {
            let info = Event {
                t_us: t.as_micros(),
                process: "nemesis",
                kind: "info",
                call: None,
                f: None,
                value: None,
                note: Some(what),
            };
            lines.push((*t, 0, serde_json::to_string(&info)?));
        }
        lines.sort_by_key(|(t, order, _)| (*t, *order));
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (_, _, line) in lines {
            writeln!(out, "{line}")?;
        }
        out.flush()
    }
}

/// The problem slug of a problem+json body (`outcome-unknown`, `overloaded`, ...).
pub fn problem_slug(body: &serde_json::Value) -> Option<String> {
    body["type"]
        .as_str()
        .and_then(|t| t.rsplit('/').next())
        .map(str::to_owned)
}

/// Sends one submit attempt and records it. `base` is the gateway's URL, `via` its name.
#[allow(clippy::too_many_arguments)]
pub async fn submit(
    history: &History,
    http: &reqwest::Client,
    process: &str,
    via: &str,
    base: &str,
    path: &str,
    key: &str,
    payload: &str,
    attempt: u32,
) -> Outcome {
    let call = Call::Submit {
        key: key.to_owned(),
        payload: payload.to_owned(),
        attempt,
        via: via.to_owned(),
    };
    let request = http
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("idempotency-key", format!("\"{key}\""))
        .body(payload.to_owned());
    record(history, process, call, request, |r| async move {
        let http = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(|l| l.trim_start_matches("/operations/").to_owned());
        let replayed = r.headers().contains_key("idempotent-replayed");
        match r.bytes().await {
            // The answer was cut off (a 202 included): the gateway decided, the client cannot
            // tell what.
            Err(e) => Outcome::no_answer(Some(http), &e),
            Ok(bytes) => {
                let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                classify_submit(http, location, replayed, &body)
            }
        }
    })
    .await
}

/// Records one call in the history: invokes it, sends `request`, and completes the call with
/// the outcome `classify` reads from the answer, or `unknown` when no answer came (a timeout, a
/// broken or refused connection). Every call kind records this way; only `classify` differs.
async fn record<F, Fut>(
    history: &History,
    process: &str,
    call: Call,
    request: reqwest::RequestBuilder,
    classify: F,
) -> Outcome
where
    F: FnOnce(reqwest::Response) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let id = history.invoke(process, call);
    let outcome = match request.send().await {
        Err(e) => Outcome::no_answer(None, &e),
        Ok(r) => classify(r).await,
    };
    history.complete(id, outcome.clone());
    outcome
}

/// The contract's reading of a submit's answer.
fn classify_submit(
    http: u16,
    location: Option<String>,
    replayed: bool,
    body: &serde_json::Value,
) -> Outcome {
    match http {
        202 => Outcome::Ok {
            http,
            op: location.or_else(|| body["id"].as_str().map(str::to_owned)),
            status: body["status"].as_str().map(str::to_owned),
            replayed,
            body: None,
        },
        503 => {
            let problem = problem_slug(body);
            match problem.as_deref() {
                // Refused before any work: nothing was written.
                Some("overloaded" | "shutting-down") => Outcome::Fail { http, problem },
                _ => Outcome::Unknown {
                    http: Some(http),
                    problem,
                    error: None,
                },
            }
        }
        // No room in JetStream (a full stream, JetStream's storage limit): nothing was written,
        // and a retry after `Retry-After` may find room.
        507 if problem_slug(body).as_deref() == Some("insufficient-storage") => Outcome::Fail {
            http,
            problem: problem_slug(body),
        },
        // Every client error is refused before anything is published (docs/http-api.md, "Problems").
        400..=499 => Outcome::Fail {
            http,
            problem: problem_slug(body),
        },
        _ => Outcome::unknown_answer(http, body),
    }
}

/// Reads an operation's status through one gateway and records it.
pub async fn read_status(
    history: &History,
    http: &reqwest::Client,
    process: &str,
    via: &str,
    base: &str,
    op: &str,
) -> Outcome {
    let call = Call::Read {
        op: op.to_owned(),
        via: via.to_owned(),
    };
    let request = http.get(format!("{base}/operations/{op}"));
    record(history, process, call, request, |r| async move {
        let http = r.status().as_u16();
        let body: serde_json::Value = match r.bytes().await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        match http {
            200 if body["status"].is_string() => Outcome::Ok {
                http,
                op: Some(op.to_owned()),
                status: body["status"].as_str().map(str::to_owned),
                replayed: false,
                body: None,
            },
            404 => Outcome::Fail {
                http,
                problem: problem_slug(&body),
            },
            _ => Outcome::unknown_answer(http, &body),
        }
    })
    .await
}

/// Reads an operation's result through one gateway and records it: `ok` with the pending status
/// (a `202` with the status body) or with the replayed result (its status code and body).
pub async fn read_result(
    history: &History,
    http: &reqwest::Client,
    process: &str,
    via: &str,
    base: &str,
    op: &str,
) -> Outcome {
    let call = Call::ReadResult {
        op: op.to_owned(),
        via: via.to_owned(),
    };
    let request = http.get(format!("{base}/operations/{op}/result"));
    record(history, process, call, request, |r| async move {
        let http = r.status().as_u16();
        let from_gateway = r
            .headers()
            .get("content-type")
            .is_some_and(|t| t.as_bytes().starts_with(b"application/problem+json"));
        match r.bytes().await {
            Err(e) => Outcome::no_answer(Some(http), &e),
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let pending = http == 202 && json["status"] == "pending";
                match http {
                    _ if pending => Outcome::Ok {
                        http,
                        op: Some(op.to_owned()),
                        status: Some("pending".to_owned()),
                        replayed: false,
                        body: None,
                    },
                    404 if from_gateway => Outcome::Fail {
                        http,
                        problem: problem_slug(&json),
                    },
                    503 if from_gateway => Outcome::unknown_answer(http, &json),
                    _ => Outcome::Ok {
                        http,
                        op: Some(op.to_owned()),
                        status: None,
                        replayed: false,
                        body: Some(text),
                    },
                }
            }
        }
    })
    .await
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A request message as `GW_REQUESTS` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRequest {
    pub seq: u64,
    pub subject: String,
    pub op: String,
    /// The idempotency key, unquoted.
    pub key: String,
    pub payload: String,
    /// `Gw-Deadline`, in seconds since the Unix epoch: written by the accepting gateway's clock.
    pub deadline_s: Option<f64>,
    /// When nats-server stored it (its clock), in seconds since the Unix epoch.
    pub stored_s: f64,
}

impl StoredRequest {
    /// The route of the request: its subject is `<prefix>.req.<route>.<key token>`.
    pub fn route(&self) -> &str {
        self.subject.split('.').nth(2).unwrap_or_default()
    }
}

/// A result as `GW_RESULTS` or `GW_OUTCOMES` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct StoredResult {
    pub seq: u64,
    pub op: String,
    pub status: u16,
    pub outcome: Option<String>,
    pub body: String,
    /// When nats-server stored it (its clock, the cluster's), in seconds since the Unix epoch.
    pub stored_s: f64,
}

/// One execution of the test handler: which operation, a nonce unique to the execution, and the
/// payload it saw. The handler puts the nonce into its reply, so the stored result names the
/// execution that produced it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Effect {
    pub op: String,
    pub exec: String,
    pub payload: String,
}

/// The reply body the test handlers give: the echo of the request's payload and the nonce of the
/// execution.
pub fn effect_reply(effect: &Effect) -> serde_json::Value {
    serde_json::json!({ "echo": effect.payload, "exec": effect.exec })
}

/// Every message of a stream, read with an ordered consumer from the first sequence on.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<jetstream::Message>, String> {
    use async_nats::jetstream::consumer::DeliverPolicy;
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    let mut stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    let total = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .messages;
    let mut out = Vec::with_capacity(total as usize);
    if total == 0 {
        return Ok(out);
    }
    let mut messages = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| format!("no message within 10 s after {} of {total}", out.len()))?;
        let Some(message) = next else { break };
        let message = message.map_err(|e| e.to_string())?;
        let pending = message.info().map_err(|e| e.to_string())?.pending;
        out.push(message);
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

fn header(message: &jetstream::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
}

/// The requests and results the streams hold now.
pub async fn read_gateway_streams(
    js: &jetstream::Context,
) -> Result<(Vec<StoredRequest>, Vec<StoredResult>), String> {
    use handlers::contract::{
        DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM, DEFAULT_RESULTS_STREAM, header as h,
    };
    let requests = read_stream(js, DEFAULT_REQUESTS_STREAM)
        .await?
        .iter()
        .map(|m| StoredRequest {
            seq: m.info().map(|i| i.stream_sequence).unwrap_or(0),
            subject: m.subject.to_string(),
            op: header(m, h::OPERATION_ID).unwrap_or_default(),
            key: header(m, h::IDEMPOTENCY_KEY)
                .map(|k| k.trim_matches('"').to_owned())
                .unwrap_or_default(),
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            deadline_s: header(m, h::DEADLINE).and_then(|d| unix_seconds(&d)),
            stored_s: stored_at(m),
        })
        .collect();
    // Both streams of result slots: contract 1's and contract 2's.
    let mut stored = read_stream(js, DEFAULT_RESULTS_STREAM).await?;
    stored.extend(read_stream(js, DEFAULT_OUTCOMES_STREAM).await?);
    let results = stored
        .iter()
        // nats-server's delete markers where expired results were: not records.
        .filter(|m| header(m, h::MARKER_REASON).is_none())
        .map(|m| StoredResult {
            seq: m.info().map(|i| i.stream_sequence).unwrap_or(0),
            op: m.subject.rsplit('.').next().unwrap_or_default().to_owned(),
            status: header(m, h::STATUS)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            outcome: header(m, h::OUTCOME),
            body: String::from_utf8_lossy(&m.payload).into_owned(),
            stored_s: stored_at(m),
        })
        .collect();
    Ok((requests, results))
}

/// When nats-server stored a message (its `Nats-Time-Stamp`), in seconds since the Unix epoch.
fn stored_at(m: &jetstream::Message) -> f64 {
    m.info()
        .map(|i| i.published.unix_timestamp_nanos() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// An RFC 3339 time in seconds since the Unix epoch.
fn unix_seconds(text: &str) -> Option<f64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// How far the processes' clocks may be from the cluster's. Two rules follow:
/// - the documented one: an expiry's decider read its clock past `deadline + grace`
///   (`GATEWAY_EXPIRY_GRACE`, a worker's `expiry_grace`), so by nats-server's clock no expiry
///   may be stored before `deadline + grace - ahead`, where `deadline` is what the accepting
///   gateway wrote and `ahead` the most any decider's clock ran ahead;
/// - by the cluster's clock alone, where the grace covers every two clocks' difference and
///   requests are stored promptly ([`ClockAllowance::timeouts`]): no expiry stored before the
///   request's own store time plus its route's timeout, less `publish_within`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ClockAllowance {
    /// The smallest grace of any process that may decide an expiry.
    pub grace: Duration,
    /// The most any such process's clock ran ahead of the cluster's.
    pub ahead: Duration,
    /// The routes' timeouts, for the cluster-clock rule (empty: that rule is off, as where a
    /// write may be stored long after its gateway took its deadline: a stalled or partitioned
    /// connection delivers it late).
    pub timeouts: Vec<(String, Duration)>,
    /// How long after its gateway read the clock a request is stored, at most.
    pub publish_within: Duration,
}

/// What the checker needs besides the history.
pub struct Observed<'a> {
    pub requests: &'a [StoredRequest],
    pub results: &'a [StoredResult],
    /// Every handler execution, when the worker recorded them.
    pub effects: Option<&'a [Effect]>,
    /// The gateways (by name) through which every operation must read terminal at the end.
    pub gateways: &'a [String],
    /// The process name of the final reads (one per operation per gateway, after draining).
    pub final_process: &'a str,
    /// A route of stateful operations: any terminal status may be right for them (a cancel or
    /// the deadline may win), and their results are not echoes; the exactly-once oracles
    /// (`crate::exactly_once`) judge those. Every other check applies to them as to any.
    pub stateful_route: Option<&'a str>,
    /// The clocks' allowance an expiry is judged by.
    pub clocks: ClockAllowance,
}

/// The checker's counts. The fields under "must be zero" are the anomalies.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    /// Logical requests (distinct keys) and their attempts.
    pub requests: usize,
    pub attempts: usize,
    /// Keys with a `202` / with only definite failures / with neither (indeterminate).
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    /// Indeterminate keys whose request JetStream does hold.
    pub unknown_took_effect: usize,
    /// Acknowledged keys that needed more than one attempt.
    pub acknowledged_after_retry: usize,
    /// Acknowledged keys whose 202 was a replay after an attempt with an unknown outcome: that
    /// attempt had written, and the retry converged on its message.
    pub replayed_after_unknown: usize,
    /// Must be zero.
    pub lost: usize,
    pub unexpected: usize,
    pub duplicates: usize,
    pub duplicate_requests: usize,
    pub duplicate_effects: usize,
    pub inconsistent_results: usize,
    pub regressions: usize,
    pub not_found_after_ack: usize,
    pub not_succeeded: usize,
    pub unexpected_answers: usize,
    /// Expiries stored before the deadline plus the allowance ([`ClockAllowance`]).
    pub expired_early: usize,
    /// Information.
    pub handler_executions: usize,
    pub ops_executed_more_than_once: usize,
    pub max_executions_per_op: usize,
    pub status_reads: usize,
    pub status_reads_unavailable: usize,
    pub result_reads: usize,
    pub result_reads_unavailable: usize,
    pub request_messages: usize,
    pub result_messages: usize,
    /// Operations that ended `expired`.
    pub expired: usize,
    /// Submit attempts by answer (`202`, `202 replayed`, `503 outcome-unknown`, `timeout`, ...).
    pub answers: BTreeMap<String, usize>,
}

impl Counts {
    /// The anomalies that are not zero, by name.
    pub fn violations(&self) -> Vec<(&'static str, usize)> {
        [
            ("lost", self.lost),
            ("unexpected", self.unexpected),
            ("duplicates", self.duplicates),
            ("inconsistent_results", self.inconsistent_results),
            ("regressions", self.regressions),
            ("not_found_after_ack", self.not_found_after_ack),
            ("not_succeeded", self.not_succeeded),
            ("unexpected_answers", self.unexpected_answers),
            ("expired_early", self.expired_early),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// The checker's verdict: counts, and up to ten examples per anomaly, as evidence.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Verdict {
    pub counts: Counts,
    pub examples: BTreeMap<String, Vec<String>>,
}

impl Verdict {
    fn example(&mut self, category: &str, text: String) {
        let list = self.examples.entry(category.to_owned()).or_default();
        if list.len() < 10 {
            list.push(text);
        }
    }
}

const TERMINAL: [&str; 4] = ["succeeded", "failed", "expired", "cancelled"];

/// One thing a client learned about an operation's status, with when it asked and when it knew.
#[derive(Debug, Clone)]
struct Observation {
    invoked: Duration,
    completed: Duration,
    via: String,
    /// `Some(status)`, or `None` for a 404.
    status: Option<String>,
}

/// Judges a history against what the streams hold. See the module documentation.
pub fn check(calls: &[CallRecord], observed: &Observed<'_>) -> Verdict {
    let mut v = Verdict::default();
    let c = &mut v.counts;

    // What the clients sent and learned, per key.
    #[derive(Default)]
    struct KeyHistory {
        payload: String,
        attempts: usize,
        ops: Vec<String>,
        first_ok: Option<Duration>,
        any_unknown: bool,
        /// The first 202 was a replay after an attempt whose outcome was unknown: that attempt's
        /// write had landed, and the retry converged on it.
        replay_after_unknown: bool,
    }
    let mut keys: HashMap<&str, KeyHistory> = HashMap::new();
    let mut observations: HashMap<String, Vec<Observation>> = HashMap::new();
    let mut final_reads: HashMap<(&str, &str), Option<String>> = HashMap::new();
    // Results served by `GET …/result`: (operation, gateway, when asked, status code, body).
    let mut served: Vec<(&str, &str, Duration, u16, &String)> = Vec::new();
    let mut examples: Vec<(&'static str, String)> = Vec::new();
    for call in calls {
        let Some(outcome) = &call.outcome else {
            // Still running when the run ended: an open call, indeterminate.
            if let Call::Submit { key, payload, .. } = &call.call {
                let k = keys.entry(key).or_default();
                k.payload.clone_from(payload);
                k.attempts += 1;
                k.any_unknown = true;
            }
            continue;
        };
        let completed = call.completed.unwrap_or_default();
        match &call.call {
            Call::Submit {
                key, payload, via, ..
            } => {
                let k = keys.entry(key).or_default();
                if !k.payload.is_empty() && k.payload != *payload {
                    examples.push((
                        "unexpected",
                        format!("client bug: key {key} sent with two payloads"),
                    ));
                }
                k.payload.clone_from(payload);
                k.attempts += 1;
                *c.answers.entry(outcome.label()).or_default() += 1;
                match outcome {
                    Outcome::Ok {
                        op,
                        status,
                        replayed,
                        ..
                    } => {
                        if k.first_ok.is_none() && k.any_unknown && *replayed {
                            k.replay_after_unknown = true;
                        }
                        if let Some(op) = op {
                            if !k.ops.contains(op) {
                                k.ops.push(op.clone());
                            }
                            observations
                                .entry(op.clone())
                                .or_default()
                                .push(Observation {
                                    invoked: call.invoked,
                                    completed,
                                    via: via.clone(),
                                    status: status.clone(),
                                });
                        }
                        k.first_ok = Some(k.first_ok.map_or(completed, |t| t.min(completed)));
                    }
                    Outcome::Fail { http, problem } => {
                        if !matches!(http, 503 | 507) {
                            c.unexpected_answers += 1;
                            examples.push((
                                "unexpected_answers",
                                format!("submit {key} via {via} answered {http} {problem:?}"),
                            ));
                        }
                    }
                    Outcome::Unknown { http, problem, .. } => {
                        k.any_unknown = true;
                        if let Some(http) = http.filter(|&h| h != 503) {
                            c.unexpected_answers += 1;
                            examples.push((
                                "unexpected_answers",
                                format!("submit {key} via {via} answered {http} {problem:?}"),
                            ));
                        }
                    }
                }
            }
            Call::Read { op, via } => {
                c.status_reads += 1;
                match outcome {
                    Outcome::Ok { status, .. } => {
                        observations
                            .entry(op.clone())
                            .or_default()
                            .push(Observation {
                                invoked: call.invoked,
                                completed,
                                via: via.clone(),
                                status: status.clone(),
                            });
                    }
                    Outcome::Fail { http: 404, .. } => {
                        observations
                            .entry(op.clone())
                            .or_default()
                            .push(Observation {
                                invoked: call.invoked,
                                completed,
                                via: via.clone(),
                                status: None,
                            });
                    }
                    Outcome::Fail { .. } | Outcome::Unknown { .. } => {
                        c.status_reads_unavailable += 1;
                    }
                }
                if call.process == observed.final_process {
                    let status = match outcome {
                        Outcome::Ok { status, .. } => status.clone(),
                        _ => None,
                    };
                    final_reads.insert((op.as_str(), via.as_str()), status);
                }
            }
            Call::ReadResult { op, via } => {
                c.result_reads += 1;
                let status = match outcome {
                    Outcome::Ok {
                        status: Some(pending),
                        ..
                    } => Some(Some(pending.clone())),
                    Outcome::Ok {
                        http,
                        body: Some(body),
                        ..
                    } => {
                        served.push((op.as_str(), via.as_str(), call.invoked, *http, body));
                        let slug = serde_json::from_str::<serde_json::Value>(body)
                            .ok()
                            .and_then(|b| problem_slug(&b));
                        Some(Some(
                            match (http, slug.as_deref()) {
                                (200..=399, _) => "succeeded",
                                (_, Some("expired")) => "expired",
                                (_, Some("cancelled")) => "cancelled",
                                _ => "failed",
                            }
                            .to_owned(),
                        ))
                    }
                    Outcome::Fail { http: 404, .. } => Some(None),
                    _ => {
                        c.result_reads_unavailable += 1;
                        None
                    }
                };
                if let Some(status) = status {
                    observations
                        .entry(op.clone())
                        .or_default()
                        .push(Observation {
                            invoked: call.invoked,
                            completed,
                            via: via.clone(),
                            status,
                        });
                }
            }
        }
    }
    for (category, text) in examples {
        if category == "unexpected" {
            v.counts.unexpected += 1;
        }
        v.example(category, text);
    }
    let c = &mut v.counts;
    c.requests = keys.len();
    c.attempts = keys.values().map(|k| k.attempts).sum();
    c.acknowledged_after_retry = keys
        .values()
        .filter(|k| k.first_ok.is_some() && k.attempts > 1)
        .count();
    c.replayed_after_unknown = keys.values().filter(|k| k.replay_after_unknown).count();
    c.request_messages = observed.requests.len();
    c.result_messages = observed.results.len();

    // The streams, indexed.
    let mut by_key: HashMap<&str, Vec<&StoredRequest>> = HashMap::new();
    let mut by_payload: HashMap<&str, Vec<&StoredRequest>> = HashMap::new();
    let mut request_ops: HashSet<&str> = HashSet::new();
    for r in observed.requests {
        by_key.entry(&r.key).or_default().push(r);
        by_payload.entry(&r.payload).or_default().push(r);
        request_ops.insert(&r.op);
    }
    let mut results: HashMap<&str, Vec<&StoredResult>> = HashMap::new();
    for r in observed.results {
        results.entry(&r.op).or_default().push(r);
    }
    let mut effects: HashMap<&str, Vec<&Effect>> = HashMap::new();
    if let Some(list) = observed.effects {
        for e in list {
            effects.entry(&e.op).or_default().push(e);
        }
    }
    // Findings: (category, subject, evidence). A category counts distinct subjects (a key, an
    // operation, a message), so one lost key with several symptoms counts once.
    let mut later: Vec<(&'static str, String, String)> = Vec::new();

    // Unexpected: messages nobody sent, results of nothing.
    for r in observed.requests {
        let subject = format!("request seq {}", r.seq);
        match keys.get(r.key.as_str()) {
            None => later.push((
                "unexpected",
                subject,
                format!(
                    "request seq {} key {:?}: no client sent this key",
                    r.seq, r.key
                ),
            )),
            Some(k) if k.payload != r.payload => later.push((
                "unexpected",
                subject,
                format!(
                    "request seq {} key {}: payload {:?} was never sent (sent: {:?})",
                    r.seq, r.key, r.payload, k.payload
                ),
            )),
            Some(_) => {}
        }
    }
    for r in observed.results {
        if !request_ops.contains(r.op.as_str()) {
            later.push((
                "unexpected",
                format!("result seq {}", r.seq),
                format!(
                    "result seq {} for operation {} that has no request",
                    r.seq, r.op
                ),
            ));
        }
    }

    // Expiries: none before the deadline its writer's clock set, plus the grace, less how far
    // the deciding clock may have run ahead (delayed starts' `not-started` is another rule).
    let request_of: HashMap<&str, &StoredRequest> = observed
        .requests
        .iter()
        .map(|r| (r.op.as_str(), r))
        .collect();
    let clocks = &observed.clocks;
    let allowance = clocks.grace.as_secs_f64() - clocks.ahead.as_secs_f64();
    for r in observed.results {
        if r.outcome.as_deref() != Some("expired") || !r.body.contains("problem/expired") {
            continue;
        }
        v.counts.expired += 1;
        let request = request_of.get(r.op.as_str());
        let timeout = request.and_then(|q| {
            clocks
                .timeouts
                .iter()
                .find(|(route, _)| route == q.route())
                .map(|(_, t)| t.as_secs_f64())
        });
        if let (Some(q), Some(timeout)) = (request, timeout) {
            let earliest = q.stored_s + timeout - clocks.publish_within.as_secs_f64();
            if r.stored_s < earliest {
                later.push((
                    "expired_early",
                    r.op.clone(),
                    format!(
                        "operation {}: expired {:.3}s before its timeout passed by the cluster's clock",
                        r.op,
                        earliest - r.stored_s
                    ),
                ));
                continue;
            }
        }
        let Some(Some(deadline)) = request.map(|q| q.deadline_s) else {
            later.push((
                "expired_early",
                r.op.clone(),
                format!(
                    "operation {}: expired, and its request has no deadline",
                    r.op
                ),
            ));
            continue;
        };
        if r.stored_s < deadline + allowance {
            later.push((
                "expired_early",
                r.op.clone(),
                format!(
                    "operation {}: expired, stored {:.3}s before its deadline plus the allowance ({:+.1}s)",
                    r.op,
                    deadline + allowance - r.stored_s,
                    allowance
                ),
            ));
        }
    }

    // Duplicates: per key, per payload, per operation (committed results).
    for (key, list) in &by_key {
        if list.len() > 1 {
            later.push((
                "duplicate_requests",
                (*key).to_owned(),
                format!(
                    "key {key}: {} request messages (seqs {:?})",
                    list.len(),
                    list.iter().map(|r| r.seq).collect::<Vec<_>>()
                ),
            ));
        }
    }
    for (payload, list) in &by_payload {
        let distinct_keys: HashSet<&str> = list.iter().map(|r| r.key.as_str()).collect();
        if list.len() > 1 && distinct_keys.len() > 1 {
            later.push((
                "duplicate_requests",
                (*payload).to_owned(),
                format!("payload {payload:?} in {} messages", list.len()),
            ));
        }
    }
    for (op, list) in &results {
        if list.len() > 1 {
            later.push((
                "duplicate_effects",
                (*op).to_owned(),
                format!(
                    "operation {op}: {} committed results (seqs {:?})",
                    list.len(),
                    list.iter().map(|r| r.seq).collect::<Vec<_>>()
                ),
            ));
        }
    }

    // Every result a gateway served is the one the stream holds, byte for byte.
    for (op, via, asked, http, body) in &served {
        match results.get(op).and_then(|l| l.first()) {
            None => later.push((
                "inconsistent_results",
                (*op).to_owned(),
                format!(
                    "operation {op}: {via} served a result ({http}) at {:.3}s that the stream does not hold: {body:?}",
                    asked.as_secs_f64()
                ),
            )),
            Some(stored) if stored.status != *http || stored.body != **body => later.push((
                "inconsistent_results",
                (*op).to_owned(),
                format!(
                    "operation {op}: {via} served {http} {body:?}, the stream holds {} {:?}",
                    stored.status, stored.body
                ),
            )),
            Some(_) => {}
        }
    }

    // Per key: acknowledged ones must be in the stream, answered and terminal everywhere.
    let mut sorted_keys: Vec<(&&str, &KeyHistory)> = keys.iter().collect();
    sorted_keys.sort_by_key(|(k, _)| **k);
    for (key, k) in sorted_keys {
        let subject = (*key).to_owned();
        let stored = by_key.get(*key).and_then(|l| l.first());
        if let Some(first_ok) = k.first_ok {
            v.counts.ok += 1;
            if k.ops.len() > 1 {
                later.push((
                    "duplicate_requests",
                    subject.clone(),
                    format!("key {key}: answered with operations {:?}", k.ops),
                ));
            }
            let op = k.ops.first().cloned().unwrap_or_default();
            let Some(stored) = stored else {
                later.push((
                    "lost",
                    subject,
                    format!(
                        "key {key}: 202 (operation {op}) at {:.3}s, no request message",
                        first_ok.as_secs_f64()
                    ),
                ));
                continue;
            };
            if stored.op != op {
                later.push((
                    "lost",
                    subject,
                    format!(
                        "key {key}: 202 named operation {op}, the stream holds {}",
                        stored.op
                    ),
                ));
                continue;
            }
        } else if k.any_unknown {
            v.counts.unknown += 1;
            if stored.is_none() {
                continue;
            }
            v.counts.unknown_took_effect += 1;
        } else {
            v.counts.fail += 1;
            if let Some(stored) = stored {
                later.push((
                    "unexpected",
                    subject,
                    format!(
                        "key {key}: every attempt failed definitely, yet request seq {} exists",
                        stored.seq
                    ),
                ));
            }
            continue;
        }
        // The operation is in JetStream (acknowledged, or an indeterminate write that landed):
        // it must have exactly one result, the echo of its own request, terminal everywhere.
        let Some(stored) = stored else { continue };
        let op = stored.op.as_str();
        let acked = if k.first_ok.is_some() {
            "acknowledged"
        } else {
            "indeterminate but written"
        };
        match results.get(op).and_then(|l| l.first()) {
            None => later.push((
                "lost",
                subject.clone(),
                format!("key {key} ({acked}): operation {op} has no result"),
            )),
            Some(_) if observed.stateful_route == Some(stored.route()) => {}
            Some(result) => {
                if !(200..300).contains(&result.status) || result.outcome.is_some() {
                    later.push((
                        "not_succeeded",
                        subject.clone(),
                        format!(
                            "key {key}: operation {op} ended {} {:?}: {}",
                            result.status, result.outcome, result.body
                        ),
                    ));
                } else {
                    let reply: serde_json::Value =
                        serde_json::from_str(&result.body).unwrap_or_default();
                    if reply["echo"].as_str() != Some(stored.payload.as_str()) {
                        later.push((
                            "inconsistent_results",
                            subject.clone(),
                            format!(
                                "operation {op}: result {:?} is not the echo of {:?}",
                                result.body, stored.payload
                            ),
                        ));
                    } else if observed.effects.is_some() {
                        let exec = reply["exec"].as_str().unwrap_or_default();
                        let known = effects
                            .get(op)
                            .is_some_and(|l| l.iter().any(|e| e.exec == exec));
                        if !known {
                            later.push((
                                "inconsistent_results",
                                subject.clone(),
                                format!(
                                    "operation {op}: result names execution {exec:?}, which no handler run of it recorded"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        for gw in observed.gateways {
            let status = final_reads.get(&(op, gw.as_str()));
            let terminal = status
                .and_then(|s| s.as_deref())
                .is_some_and(|s| TERMINAL.contains(&s));
            if !terminal {
                later.push((
                    "lost",
                    subject.clone(),
                    format!(
                        "key {key} ({acked}): operation {op} does not read terminal via {gw} after draining (last final read: {status:?})"
                    ),
                ));
            }
        }
    }

    // Regressions: once any read (or replay) showed a terminal status, every read that began
    // after it ended must show the same status, through every gateway; and no operation that was
    // acknowledged may read 404.
    let mut ops: Vec<(&String, &mut Vec<Observation>)> = observations.iter_mut().collect();
    ops.sort_by_key(|(op, _)| op.as_str());
    for (op, obs) in ops {
        obs.sort_by_key(|o| o.completed);
        if let Some(nf) = obs.iter().find(|o| o.status.is_none()) {
            v.counts.not_found_after_ack += 1;
            v.example(
                "not_found_after_ack",
                format!(
                    "operation {op}: 404 via {} (read {:.3}s-{:.3}s) after its 202",
                    nf.via,
                    nf.invoked.as_secs_f64(),
                    nf.completed.as_secs_f64()
                ),
            );
        }
        let first_terminal = obs
            .iter()
            .find(|o| o.status.as_deref().is_some_and(|s| TERMINAL.contains(&s)));
        let Some(first) = first_terminal else {
            continue;
        };
        let bad: Vec<&Observation> =
            obs.iter()
                .filter(|o| {
                    let conflicting_terminal = o.status.as_deref().is_some_and(|s| {
                        TERMINAL.contains(&s) && Some(s) != first.status.as_deref()
                    });
                    let went_back = o.invoked > first.completed && o.status != first.status;
                    conflicting_terminal || went_back
                })
                .collect();
        if let Some(b) = bad.first() {
            v.counts.regressions += 1;
            let sequence: Vec<String> = obs
                .iter()
                .map(|o| {
                    format!(
                        "{:.3}-{:.3}s {} {}",
                        o.invoked.as_secs_f64(),
                        o.completed.as_secs_f64(),
                        o.via,
                        o.status.as_deref().unwrap_or("404")
                    )
                })
                .collect();
            v.example(
                "regressions",
                format!(
                    "operation {op}: {:?} via {} at {:.3}s, then {:?} via {} (read began {:.3}s); all reads: {sequence:?}",
                    first.status,
                    first.via,
                    first.completed.as_secs_f64(),
                    b.status,
                    b.via,
                    b.invoked.as_secs_f64()
                ),
            );
        }
    }

    let mut counted: HashSet<(&'static str, String)> = HashSet::new();
    for (category, subject, text) in later {
        if counted.insert((category, subject)) {
            let c = &mut v.counts;
            match category {
                "lost" => c.lost += 1,
                "unexpected" => c.unexpected += 1,
                "duplicate_requests" => c.duplicate_requests += 1,
                "duplicate_effects" => c.duplicate_effects += 1,
                "inconsistent_results" => c.inconsistent_results += 1,
                "not_succeeded" => c.not_succeeded += 1,
                "expired_early" => c.expired_early += 1,
                _ => {}
            }
        }
        v.example(category, text);
    }
    let c = &mut v.counts;
    c.duplicates = c.duplicate_requests + c.duplicate_effects;

    // Handler executions (information: delivery is at least once).
    c.handler_executions = observed.effects.map_or(0, <[Effect]>::len);
    c.ops_executed_more_than_once = effects.values().filter(|l| l.len() > 1).count();
    c.max_executions_per_op = effects.values().map(Vec::len).max().unwrap_or(0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    /// A run's raw material, built up by each test and then checked.
    struct Case {
        calls: Vec<CallRecord>,
        requests: Vec<StoredRequest>,
        results: Vec<StoredResult>,
        effects: Vec<Effect>,
        clocks: ClockAllowance,
    }

    impl Case {
        /// Two keys acknowledged, stored, answered and read `succeeded` through both gateways.
        fn healthy() -> Self {
            let mut case = Case {
                calls: Vec::new(),
                requests: Vec::new(),
                results: Vec::new(),
                effects: Vec::new(),
                clocks: ClockAllowance::default(),
            };
            for (i, key) in ["k1", "k2"].iter().enumerate() {
                let op = format!("o{}", i + 1);
                case.submit(key, 0.1, 0.2, ok(&op, false));
                case.store(key, &op);
                case.answer(&op, &format!("p-{key}"), "e1");
                case.read(&op, "g0", 1.0, 1.1, Some("pending"), "poller");
                case.read(&op, "g0", 5.0, 5.1, Some("succeeded"), "final");
                case.read(&op, "g1", 5.0, 5.1, Some("succeeded"), "final");
            }
            case
        }

        fn submit(&mut self, key: &str, t0: f64, t1: f64, outcome: Outcome) {
            self.calls.push(CallRecord {
                id: self.calls.len() as u64,
                process: "lane-0".to_owned(),
                call: Call::Submit {
                    key: key.to_owned(),
                    payload: format!("p-{key}"),
                    attempt: 1,
                    via: "g0".to_owned(),
                },
                invoked: s(t0),
                completed: Some(s(t1)),
                outcome: Some(outcome),
            });
        }

        fn read(
            &mut self,
            op: &str,
            via: &str,
            t0: f64,
            t1: f64,
            status: Option<&str>,
            process: &str,
        ) {
            let outcome = match status {
                Some(status) => Outcome::Ok {
                    http: 200,
                    op: Some(op.to_owned()),
                    status: Some(status.to_owned()),
                    replayed: false,
                    body: None,
                },
                None => Outcome::Fail {
                    http: 404,
                    problem: None,
                },
            };
            self.calls.push(CallRecord {
                id: self.calls.len() as u64,
                process: process.to_owned(),
                call: Call::Read {
                    op: op.to_owned(),
                    via: via.to_owned(),
                },
                invoked: s(t0),
                completed: Some(s(t1)),
                outcome: Some(outcome),
            });
        }

        fn read_result(&mut self, op: &str, via: &str, t0: f64, outcome: Outcome) {
            self.calls.push(CallRecord {
                id: self.calls.len() as u64,
                process: "poller".to_owned(),
                call: Call::ReadResult {
                    op: op.to_owned(),
                    via: via.to_owned(),
                },
                invoked: s(t0),
                completed: Some(s(t0 + 0.1)),
                outcome: Some(outcome),
            });
        }

        fn store(&mut self, key: &str, op: &str) {
            self.requests.push(StoredRequest {
                seq: self.requests.len() as u64 + 1,
                subject: format!("gw.req.orders.{key}"),
                op: op.to_owned(),
                key: key.to_owned(),
                payload: format!("p-{key}"),
                deadline_s: Some(100.0),
                stored_s: 95.0,
            });
        }

        fn answer(&mut self, op: &str, payload: &str, exec: &str) {
            let effect = Effect {
                op: op.to_owned(),
                exec: exec.to_owned(),
                payload: payload.to_owned(),
            };
            self.results.push(StoredResult {
                seq: self.results.len() as u64 + 1,
                op: op.to_owned(),
                status: 200,
                outcome: None,
                body: effect_reply(&effect).to_string(),
                stored_s: 1.0,
            });
            self.effects.push(effect);
        }

        fn check(&self) -> Verdict {
            let gateways = ["g0".to_owned(), "g1".to_owned()];
            check(
                &self.calls,
                &Observed {
                    requests: &self.requests,
                    results: &self.results,
                    effects: Some(&self.effects),
                    gateways: &gateways,
                    final_process: "final",
                    stateful_route: None,
                    clocks: self.clocks.clone(),
                },
            )
        }
    }

    fn ok(op: &str, replayed: bool) -> Outcome {
        Outcome::Ok {
            http: 202,
            op: Some(op.to_owned()),
            status: Some("pending".to_owned()),
            replayed,
            body: None,
        }
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            http: Some(503),
            problem: Some("outcome-unknown".to_owned()),
            error: None,
        }
    }

    #[test]
    fn a_healthy_run_has_no_anomaly() {
        let v = Case::healthy().check();
        assert!(v.counts.violations().is_empty(), "{v:#?}");
        assert_eq!((v.counts.requests, v.counts.ok), (2, 2));
        assert_eq!(v.counts.handler_executions, 2);
    }

    #[test]
    fn an_acknowledged_request_missing_from_the_stream_is_lost() {
        let mut case = Case::healthy();
        case.requests.remove(0);
        let v = case.check();
        assert_eq!(v.counts.lost, 1, "{v:#?}");
        // Its result now answers an operation that has no request.
        assert_eq!(v.counts.unexpected, 1, "{v:#?}");
    }

    #[test]
    fn no_result_or_no_terminal_read_is_lost_once_per_key() {
        let mut case = Case::healthy();
        case.results.remove(0);
        case.read("o1", "g1", 6.0, 6.1, Some("pending"), "final");
        case.read("o2", "g1", 6.0, 6.1, Some("pending"), "final");
        let v = case.check();
        assert_eq!(v.counts.lost, 2, "{v:#?}");
        // The late `pending` reads after `succeeded` are regressions too.
        assert_eq!(v.counts.regressions, 2, "{v:#?}");
    }

    #[test]
    fn messages_nobody_sent_and_writes_after_a_definite_failure_are_unexpected() {
        let mut case = Case::healthy();
        case.requests.push(StoredRequest {
            seq: 9,
            subject: "gw.req.orders.x".to_owned(),
            op: "ox".to_owned(),
            key: "stranger".to_owned(),
            payload: "?".to_owned(),
            deadline_s: None,
            stored_s: 0.0,
        });
        case.submit(
            "k3",
            0.3,
            0.4,
            Outcome::Fail {
                http: 503,
                problem: Some("overloaded".to_owned()),
            },
        );
        case.store("k3", "o3");
        let v = case.check();
        assert_eq!(v.counts.unexpected, 2, "{v:#?}");
        assert_eq!(v.counts.fail, 1);
    }

    #[test]
    fn duplicate_requests_and_committed_results_are_counted() {
        let mut case = Case::healthy();
        case.store("k1", "o1");
        case.answer("o2", "p-k2", "e2");
        let v = case.check();
        assert_eq!(v.counts.duplicate_requests, 1, "{v:#?}");
        assert_eq!(v.counts.duplicate_effects, 1, "{v:#?}");
        assert_eq!(v.counts.duplicates, 2);
    }

    #[test]
    fn a_key_answered_with_two_operations_is_a_duplicate() {
        let mut case = Case::healthy();
        case.submit("k1", 0.3, 0.4, ok("o9", true));
        let v = case.check();
        assert_eq!(v.counts.duplicate_requests, 1, "{v:#?}");
    }

    #[test]
    fn pending_after_terminal_is_a_regression_only_if_the_read_began_later() {
        let mut case = Case::healthy();
        case.read("o1", "g0", 2.0, 2.2, Some("succeeded"), "poller");
        // Overlaps the terminal read: may linearize before it.
        case.read("o1", "g1", 2.1, 2.5, Some("pending"), "poller");
        assert_eq!(case.check().counts.regressions, 0);
        // Began after it ended, through the other gateway.
        case.read("o1", "g1", 2.3, 2.4, Some("pending"), "poller");
        let v = case.check();
        assert_eq!(v.counts.regressions, 1, "{v:#?}");
        assert!(v.examples["regressions"][0].contains("g1"));
    }

    #[test]
    fn two_terminal_states_are_a_regression() {
        let mut case = Case::healthy();
        case.read("o2", "g1", 3.0, 3.1, Some("failed"), "poller");
        assert_eq!(case.check().counts.regressions, 1);
    }

    #[test]
    fn a_404_after_the_202_is_counted() {
        let mut case = Case::healthy();
        case.read("o1", "g1", 1.0, 1.1, None, "poller");
        assert_eq!(case.check().counts.not_found_after_ack, 1);
    }

    #[test]
    fn a_result_from_no_recorded_execution_or_for_another_payload_is_inconsistent() {
        let mut case = Case::healthy();
        case.results[0].body = effect_reply(&Effect {
            op: "o1".to_owned(),
            exec: "ghost".to_owned(),
            payload: "p-k1".to_owned(),
        })
        .to_string();
        case.results[1].body = r#"{"echo":"p-k1","exec":"e1"}"#.to_owned();
        assert_eq!(case.check().counts.inconsistent_results, 2);
    }

    #[test]
    fn a_served_result_must_be_the_stored_one_and_never_pending_again() {
        let mut case = Case::healthy();
        let served = |body: &str| Outcome::Ok {
            http: 200,
            op: Some("o1".to_owned()),
            status: None,
            replayed: false,
            body: Some(body.to_owned()),
        };
        let stored = case.results[0].body.clone();
        case.read_result("o1", "g1", 2.0, served(&stored));
        assert!(case.check().counts.violations().is_empty());
        case.read_result("o1", "g0", 2.5, served(r#"{"echo":"p-k1","exec":"other"}"#));
        assert_eq!(case.check().counts.inconsistent_results, 1);
        let mut case = Case::healthy();
        case.read_result("o1", "g1", 2.0, served(&stored));
        case.read_result(
            "o1",
            "g0",
            2.5,
            Outcome::Ok {
                http: 202,
                op: Some("o1".to_owned()),
                status: Some("pending".to_owned()),
                replayed: false,
                body: None,
            },
        );
        assert_eq!(case.check().counts.regressions, 1);
    }

    #[test]
    fn an_indeterminate_write_that_landed_must_be_processed() {
        let mut case = Case::healthy();
        case.submit("k3", 0.3, 2.3, unknown());
        case.store("k3", "o3");
        let v = case.check();
        assert_eq!((v.counts.unknown, v.counts.unknown_took_effect), (1, 1));
        assert_eq!(v.counts.lost, 1, "written but never answered: {v:#?}");
        case.answer("o3", "p-k3", "e3");
        case.read("o3", "g0", 5.0, 5.1, Some("succeeded"), "final");
        case.read("o3", "g1", 5.0, 5.1, Some("succeeded"), "final");
        assert!(case.check().counts.violations().is_empty());
    }

    #[test]
    fn a_replay_after_an_unknown_attempt_is_counted() {
        let mut case = Case::healthy();
        case.submit("k3", 0.3, 2.3, unknown());
        case.submit("k3", 2.5, 2.6, ok("o3", true));
        case.store("k3", "o3");
        case.answer("o3", "p-k3", "e3");
        case.read("o3", "g0", 5.0, 5.1, Some("succeeded"), "final");
        case.read("o3", "g1", 5.0, 5.1, Some("succeeded"), "final");
        let v = case.check();
        assert!(v.counts.violations().is_empty(), "{v:#?}");
        assert_eq!(
            (
                v.counts.acknowledged_after_retry,
                v.counts.replayed_after_unknown
            ),
            (1, 1)
        );
        assert_eq!(v.counts.answers["503 outcome-unknown"], 1);
        assert_eq!(v.counts.answers["202 replayed"], 1);
    }

    #[test]
    fn answers_outside_the_contract_are_counted() {
        let mut case = Case::healthy();
        case.submit(
            "k3",
            0.3,
            0.4,
            Outcome::Fail {
                http: 422,
                problem: Some("idempotency-key-reused".to_owned()),
            },
        );
        assert_eq!(case.check().counts.unexpected_answers, 1);
    }

    #[test]
    fn answers_are_classified_by_the_contract() {
        let body = |slug: &str| serde_json::json!({ "type": format!("tag:nats-http-gateway,2026:problem/{slug}") });
        assert!(matches!(
            classify_submit(503, None, false, &body("outcome-unknown")),
            Outcome::Unknown { .. }
        ));
        assert!(matches!(
            classify_submit(503, None, false, &body("overloaded")),
            Outcome::Fail { .. }
        ));
        assert!(matches!(
            classify_submit(503, None, false, &body("shutting-down")),
            Outcome::Fail { .. }
        ));
        assert!(matches!(
            classify_submit(507, None, false, &body("insufficient-storage")),
            Outcome::Fail { http: 507, .. }
        ));
        assert!(matches!(
            classify_submit(507, None, false, &body("something-else")),
            Outcome::Unknown { .. }
        ));
        assert!(matches!(
            classify_submit(502, None, false, &body("bad-stored-message")),
            Outcome::Unknown { .. }
        ));
        assert_eq!(
            classify_submit(
                202,
                Some("o1".to_owned()),
                true,
                &serde_json::json!({"status": "succeeded"})
            ),
            Outcome::Ok {
                http: 202,
                op: Some("o1".to_owned()),
                status: Some("succeeded".to_owned()),
                replayed: true,
                body: None,
            }
        );
    }

    #[test]
    fn an_expiry_before_the_deadline_plus_the_allowance_is_early() {
        let mut case = Case::healthy();
        // o1 (deadline 100 s) expired at 99 s: early with no allowance; o2 at 100.5 s: on time.
        for (op, stored_s) in [("o1", 99.0), ("o2", 100.5)] {
            let result = case.results.iter_mut().find(|r| r.op == op).unwrap();
            result.outcome = Some("expired".to_owned());
            result.status = 504;
            result.body = r#"{"type":"tag:nats-http-gateway,2026:problem/expired"}"#.to_owned();
            result.stored_s = stored_s;
        }
        let v = case.check();
        assert_eq!((v.counts.expired, v.counts.expired_early), (2, 1), "{v:#?}");
        // A grace of 5 s, with clocks up to 2 s ahead: no expiry before 103 s.
        case.clocks = ClockAllowance {
            grace: Duration::from_secs(5),
            ahead: Duration::from_secs(2),
            ..Default::default()
        };
        assert_eq!(case.check().counts.expired_early, 2);
        // Deciders that wait 5 s past deadlines but may run 6 s ahead: none before 99 s.
        case.clocks.ahead = Duration::from_secs(6);
        assert_eq!(case.check().counts.expired_early, 0);
        // By the cluster's clock: requests stored at 95 s with a 5 s timeout, stored within
        // 0.5 s of their gateway's reading, end no earlier than 99.5 s.
        case.clocks.timeouts = vec![("orders".to_owned(), Duration::from_secs(5))];
        case.clocks.publish_within = Duration::from_millis(500);
        assert_eq!(case.check().counts.expired_early, 1);
    }
}
