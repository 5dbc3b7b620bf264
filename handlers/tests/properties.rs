//! Property tests for the wire contract's header parsers and writers (`handlers::contract`):
//! `Request::from_parts`, `ResultRecord::to_headers` / `from_parts` / `validate`, `Progress`.
//!
//! Public API only. Each property runs a bounded number of cases so the file takes about a second.
//! Failure persistence is off: a failure prints its shrunk input, which the test's comment or the
//! report should name.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use handlers::contract::{
    BodyObject, ContractError, Outcome, Request, RequestHead, ResultRecord, WireContract,
    format_time, header, header_str,
};
use handlers::progress::Progress;
use proptest::prelude::*;
use time::OffsetDateTime;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The contract's own header names (and JetStream's), which a record's extra headers never keep.
fn is_contract_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("gw-") || lower.starts_with("nats-") || lower == "content-type"
}

/// A header name async-nats can carry: printable ASCII without ':' (its own rule).
fn nats_header_name() -> impl Strategy<Value = String> {
    "[!-9;-~]{1,16}"
}

/// An extra (non-contract) header name.
fn extra_header_name() -> impl Strategy<Value = String> {
    nats_header_name().prop_filter("not a contract header", |n| !is_contract_name(n))
}

/// A header value async-nats can carry: anything but CR and LF.
fn nats_header_value() -> impl Strategy<Value = String> {
    "[^\r\n]{0,24}"
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Reply),
        Just(Outcome::Expired),
        Just(Outcome::Cancelled)
    ]
}

fn body() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn operation_id() -> impl Strategy<Value = String> {
    "[a-z2-7]{39}"
}

/// A record the contract can carry: status 200-599, values without CR/LF, extra headers that are
/// not contract headers.
fn carriable_record() -> impl Strategy<Value = ResultRecord> {
    (
        outcome(),
        200u16..=599,
        proptest::option::of(nats_header_value()),
        proptest::collection::vec((extra_header_name(), nats_header_value()), 0..6),
        body(),
        proptest::option::of(body_object()),
    )
        .prop_map(
            |(outcome, status, content_type, headers, body, body_object)| ResultRecord {
                outcome,
                status,
                content_type,
                headers,
                // A body is in the message or in an object, never both.
                body: if body_object.is_some() {
                    Bytes::new()
                } else {
                    body
                },
                body_object,
            },
        )
}

/// Where a body kept in the Object Store is: any bucket, name and size, a digest as the Object
/// Store writes it.
fn body_object() -> impl Strategy<Value = BodyObject> {
    (
        nats_header_value(),
        nats_header_value(),
        any::<u64>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(bucket, name, size, sha256)| BodyObject {
            bucket,
            name,
            size,
            digest: format!("SHA-256={}", data_encoding::BASE64URL.encode(&sha256)),
        })
}

/// Extra headers grouped by exact name, each name's values in order. Header order *across*
/// names is not kept by a NATS header map (a hash map), and HTTP gives it no meaning.
fn grouped(headers: &[(String, String)]) -> BTreeMap<&str, Vec<&str>> {
    let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (n, v) in headers {
        map.entry(n.as_str()).or_default().push(v.as_str());
    }
    map
}

/// Everything a request message carries, as the gateway writes it.
#[derive(Debug, Clone)]
struct RequestFields {
    operation_id: String,
    route: String,
    method: String,
    path: String,
    query: Option<String>,
    content_type: Option<String>,
    reply_subject: String,
    /// Present on a contract-2 request (which then says `Gw-Contract: 2`), absent on contract 1.
    progress_subject: Option<String>,
    /// Present exactly when `progress_subject` is.
    reply_stream: Option<String>,
    deadline: OffsetDateTime,
    retention_secs: Option<u64>,
    tenant: Option<String>,
    idempotency_key: Option<String>,
    fingerprint: Option<String>,
    callback_url: Option<String>,
    extra: Vec<(String, String)>,
}

impl RequestFields {
    fn contract(&self) -> WireContract {
        match self.progress_subject {
            Some(_) => WireContract::V2,
            None => WireContract::V1,
        }
    }
}

/// Instants RFC 3339 can write (years 0000-9999), to the nanosecond.
fn instant() -> impl Strategy<Value = OffsetDateTime> {
    let min = OffsetDateTime::parse(
        "0000-01-01T00:00:00Z",
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp_nanos();
    let max = OffsetDateTime::parse(
        "9999-12-31T23:59:59.999999999Z",
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp_nanos();
    (min..=max).prop_map(|n| OffsetDateTime::from_unix_timestamp_nanos(n).unwrap())
}

fn request_fields() -> impl Strategy<Value = RequestFields> {
    let value = nats_header_value;
    (
        (
            operation_id(),
            "[a-z0-9_-]{1,16}",
            prop_oneof![
                Just("GET"),
                Just("POST"),
                Just("PUT"),
                Just("PATCH"),
                Just("DELETE")
            ],
            "/[!-~]{0,24}",
            proptest::option::of(value()),
            proptest::option::of(value()),
            value(),
        ),
        (
            instant(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(value()),
            proptest::option::of(value()),
            proptest::option::of("[0-9a-f]{64}"),
            proptest::option::of(value()),
            proptest::collection::vec((extra_header_name(), value()), 0..5),
            proptest::option::of((value(), value())),
        ),
    )
        .prop_map(
            |(
                (operation_id, route, method, path, query, content_type, reply_subject),
                (
                    deadline,
                    retention_secs,
                    tenant,
                    idempotency_key,
                    fingerprint,
                    callback_url,
                    extra,
                    contract_2,
                ),
            )| RequestFields {
                operation_id,
                route,
                method: method.to_owned(),
                path,
                query,
                content_type,
                reply_subject,
                progress_subject: contract_2.as_ref().map(|(p, _)| p.clone()),
                reply_stream: contract_2.map(|(_, s)| s),
                deadline,
                retention_secs,
                tenant,
                idempotency_key,
                fingerprint,
                callback_url,
                extra,
            },
        )
}

/// The contract's headers of `f`, in `case` (exact names, or all lowercase as a foreign client
/// may write them), leaving out `skip`.
fn request_headers(f: &RequestFields, lowercase: bool, skip: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in &f.extra {
        h.append(n.as_str(), v.as_str());
    }
    let retention = f.retention_secs.map(|r| r.to_string());
    let deadline = format_time(f.deadline);
    let contract = f.progress_subject.as_ref().map(|_| "2");
    let pairs: [(&str, Option<&str>); 16] = [
        (header::CONTRACT, contract),
        (header::PROGRESS_SUBJECT, f.progress_subject.as_deref()),
        (header::REPLY_STREAM, f.reply_stream.as_deref()),
        (header::OPERATION_ID, Some(&f.operation_id)),
        (header::ROUTE, Some(&f.route)),
        (header::METHOD, Some(&f.method)),
        (header::PATH, Some(&f.path)),
        (header::QUERY, f.query.as_deref()),
        (header::CONTENT_TYPE, f.content_type.as_deref()),
        (header::REPLY_SUBJECT, Some(&f.reply_subject)),
        (header::DEADLINE, Some(&deadline)),
        (header::RETENTION, retention.as_deref()),
        (header::TENANT, f.tenant.as_deref()),
        (header::IDEMPOTENCY_KEY, f.idempotency_key.as_deref()),
        (header::FINGERPRINT, f.fingerprint.as_deref()),
        (header::CALLBACK_URL, f.callback_url.as_deref()),
    ];
    for (name, value) in pairs {
        if Some(name) == skip {
            continue;
        }
        if let Some(v) = value {
            if lowercase {
                h.insert(name.to_ascii_lowercase().as_str(), v);
            } else {
                h.insert(name, v);
            }
        }
    }
    h
}

const REQUIRED_REQUEST_HEADERS: [&str; 6] = [
    header::DEADLINE,
    header::OPERATION_ID,
    header::ROUTE,
    header::METHOD,
    header::PATH,
    header::REPLY_SUBJECT,
];

fn assert_request_matches(r: &Request, f: &RequestFields, body: &Bytes) {
    assert_eq!(r.operation_id, f.operation_id);
    assert_eq!(r.route, f.route);
    assert_eq!(r.method, f.method);
    assert_eq!(r.path, f.path);
    assert_eq!(r.query, f.query);
    assert_eq!(r.content_type, f.content_type);
    assert_eq!(r.reply_subject, f.reply_subject);
    assert_eq!(r.progress_subject, f.progress_subject);
    assert_eq!(r.reply_stream, f.reply_stream);
    assert_eq!(r.contract, f.contract());
    assert_eq!(r.deadline, f.deadline);
    assert_eq!(r.retention_secs, f.retention_secs);
    assert_eq!(r.tenant, f.tenant);
    assert_eq!(r.idempotency_key, f.idempotency_key);
    assert_eq!(r.fingerprint, f.fingerprint);
    assert_eq!(r.callback_url, f.callback_url);
    assert_eq!(&r.body, body);
    // Forwarded headers stay readable on the request.
    for (n, values) in grouped(&f.extra) {
        let got: Vec<&str> = r.headers.get_all(n).map(|v| v.as_str()).collect();
        assert_eq!(got, values, "forwarded header {n:?}");
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// A record the contract can carry survives `to_headers` + `from_parts`: the same answer,
    /// the same record, extra headers kept (grouped by name, in order within a name).
    #[test]
    fn result_record_round_trips(record in carriable_record(), op in operation_id()) {
        prop_assert!(record.validate().is_ok());
        let headers = record.to_headers(&op);
        prop_assert_eq!(header_str(&headers, header::OPERATION_ID), Some(op.as_str()));
        let back = ResultRecord::from_parts(&headers, record.body.clone()).unwrap();
        prop_assert!(back.same_answer(&record), "{:?} came back as {:?}", record, back);
        prop_assert!(record.same_answer(&back));
        prop_assert_eq!(back.outcome, record.outcome);
        prop_assert_eq!(back.status, record.status);
        prop_assert_eq!(&back.content_type, &record.content_type);
        prop_assert_eq!(&back.body, &record.body);
        prop_assert_eq!(grouped(&back.headers), grouped(&record.headers));
    }

    /// Fixed (was a bug found here): `to_headers` copies a record's extra headers verbatim,
    /// contract names included, and `from_parts` then reads them as contract headers (its
    /// lookups fall back to any case). So a reply whose extra headers name `Gw-Outcome` or
    /// `Content-Type` comes back as another answer. Shrunk input:
    ///   ResultRecord { outcome: Reply, status: 200, content_type: None,
    ///                  headers: [("Gw-Outcome", "expired")], body: b"" }
    /// reads back as `outcome: Expired`, and `headers: [("content-type", "")]` reads back as
    /// `content_type: Some("")`. (`gateway dispatch` copies every upstream response header except
    /// content-type/-length, transfer-encoding, connection and date into such a record, so an
    /// upstream answer's `Gw-Outcome: cancelled` turns a 200 into a stored "cancelled".)
    /// Correct behaviour asserted: whatever extra headers a valid record has, it reads back as
    /// the same answer.
    #[test]
    fn result_record_extra_headers_cannot_change_the_answer(
        record in carriable_record(),
        contract_extras in proptest::collection::vec(
            (
                prop_oneof![
                    Just(header::OUTCOME.to_owned()),
                    Just("gw-outcome".to_owned()),
                    Just("content-type".to_owned()),
                    Just("CONTENT-TYPE".to_owned()),
                    Just("gw-status".to_owned()),
                    Just("Nats-Msg-Id".to_owned()),
                    "[Gg][Ww]-[!-9;-~]{0,8}",
                ],
                prop_oneof![
                    Just("expired".to_owned()),
                    Just("cancelled".to_owned()),
                    Just("reply".to_owned()),
                    Just("201".to_owned()),
                    nats_header_value(),
                ],
            ),
            1..3,
        ),
        op in operation_id(),
    ) {
        let mut record = record;
        record.headers.extend(contract_extras);
        if record.validate().is_err() {
            // Refused before anything is written: nothing can be read back differently.
            return Ok(());
        }
        let back = ResultRecord::from_parts(&record.to_headers(&op), record.body.clone());
        let back = match back {
            Ok(back) => back,
            Err(e) => return Err(TestCaseError::fail(format!("{record:?} no longer reads: {e}"))),
        };
        prop_assert!(back.same_answer(&record), "{:?} came back as {:?}", record, back);
    }

    /// Fixed (was a bug found here): `validate()` accepts records that async-nats cannot
    /// put in a header map, and `to_headers` then panics: async-nats asserts that header names
    /// are printable ASCII without ':' and that values hold no CR or LF. `publish_result`
    /// validates and then calls `to_headers` outside the handler's catch_unwind, so in
    /// `handlers::Worker` a `Response` such as
    /// `Response::text(200, "ok").with_header("X-Note", "a\nb")` panics the route's consumer
    /// task, which then stops consuming that route. Shrunk input:
    ///   ResultRecord { outcome: Reply, status: 200, content_type: None,
    ///                  headers: [(":", "")], body: b"" }
    /// (likewise `content_type: Some("\n")`, or a header name " ").
    /// Correct behaviour asserted: a record `validate()` accepts can be turned into headers.
    /// The check uses async-nats's fallible parsers, so a failure prints no panic backtraces;
    /// a record that passes them is then written for real.
    #[test]
    fn validated_records_can_be_written(
        outcome in outcome(),
        status in 200u16..=599,
        content_type in proptest::option::of(".{0,8}"),
        headers in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..3),
        body in body(),
    ) {
        let record = ResultRecord { outcome, status, content_type, headers, body, body_object: None };
        if record.validate().is_ok() {
            let values = record.content_type.iter().chain(record.headers.iter().map(|(_, v)| v));
            let carriable = record.headers.iter().all(|(n, _)| n.parse::<HeaderName>().is_ok())
                && values.into_iter().all(|v| v.parse::<HeaderValue>().is_ok());
            prop_assert!(
                carriable,
                "validate() accepted {:?}, which to_headers panics on (async-nats refuses it)",
                record
            );
            let written = catch_unwind(AssertUnwindSafe(|| record.to_headers("op")));
            prop_assert!(written.is_ok(), "to_headers panicked on {:?}", record);
        }
    }

    /// `validate` (and so `from_parts`) accepts exactly the statuses 200-599.
    #[test]
    fn status_range_is_enforced(status in any::<u16>(), outcome in outcome()) {
        let record = ResultRecord { outcome, status, content_type: None, headers: vec![], body: Bytes::new(), body_object: None };
        let valid = (200..=599).contains(&status);
        prop_assert_eq!(record.validate().is_ok(), valid);
        let read = ResultRecord::from_parts(&record.to_headers("op"), Bytes::new());
        match read {
            Ok(r) => {
                prop_assert!(valid);
                prop_assert_eq!(r.status, status);
            }
            Err(ContractError::InvalidHeader { name, value }) => {
                prop_assert!(!valid);
                prop_assert_eq!(name, header::STATUS);
                prop_assert_eq!(value, status.to_string());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
        }
    }

    /// `Gw-Status` text: exactly three digits making 200-599 read, anything else (`+200`,
    /// `0200`, ` 200`) is an invalid header (never a panic, never another error).
    #[test]
    fn status_header_text(text in prop_oneof![
        "[0-9]{1,6}",
        "[+-]?[0-9]{1,4}",
        "0[2-5][0-9]{2}",
        nats_header_value(),
    ]) {
        let mut h = HeaderMap::new();
        h.insert(header::STATUS, text.as_str());
        let three_digits = text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit());
        let expected = text
            .parse::<u16>()
            .ok()
            .filter(|s| three_digits && (200..=599).contains(s));
        match ResultRecord::from_parts(&h, Bytes::new()) {
            Ok(r) => {
                prop_assert_eq!(Some(r.status), expected);
                prop_assert_eq!(r.outcome, Outcome::Reply);
            }
            Err(ContractError::InvalidHeader { name, .. }) => {
                prop_assert_eq!(expected, None);
                prop_assert_eq!(name, header::STATUS);
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
        }
    }

    /// `Gw-Outcome`: absent or `reply`, `expired`, `cancelled` read; any other value is an
    /// invalid header.
    #[test]
    fn outcome_header_text(text in prop_oneof![
        Just("reply".to_owned()),
        Just("expired".to_owned()),
        Just("cancelled".to_owned()),
        nats_header_value(),
    ]) {
        let mut h = HeaderMap::new();
        h.insert(header::STATUS, "200");
        h.insert(header::OUTCOME, text.as_str());
        let expected = match text.as_str() {
            "reply" => Some(Outcome::Reply),
            "expired" => Some(Outcome::Expired),
            "cancelled" => Some(Outcome::Cancelled),
            _ => None,
        };
        match ResultRecord::from_parts(&h, Bytes::new()) {
            Ok(r) => prop_assert_eq!(Some(r.outcome), expected),
            Err(ContractError::InvalidHeader { name, value }) => {
                prop_assert_eq!(expected, None);
                prop_assert_eq!(name, header::OUTCOME);
                prop_assert_eq!(value, text);
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
        }
    }

    /// Any header map (names drawn from the contract's, in any case, and random ones; values
    /// anything a NATS header can hold) gives `Ok` or a `ContractError`, never a panic. A result
    /// without `Gw-Status` (in any case) is `MissingHeader(Gw-Status)`.
    #[test]
    fn arbitrary_header_maps_never_panic(
        entries in proptest::collection::vec(
            (
                prop_oneof![
                    3 => proptest::sample::select(vec![
                        header::OPERATION_ID, header::ROUTE, header::METHOD, header::PATH,
                        header::QUERY, header::REPLY_SUBJECT, header::DEADLINE,
                        header::RETENTION, header::TENANT, header::IDEMPOTENCY_KEY,
                        header::FINGERPRINT, header::CALLBACK_URL, header::STATUS,
                        header::OUTCOME, header::CONTENT_TYPE, header::TRACEPARENT,
                        header::CONTRACT, header::PROGRESS_SUBJECT, header::REPLY_STREAM,
                    ]).prop_flat_map(|n| prop_oneof![
                        Just(n.to_owned()),
                        Just(n.to_ascii_lowercase()),
                        Just(n.to_ascii_uppercase()),
                    ]),
                    1 => nats_header_name(),
                ],
                prop_oneof![
                    Just("2026-01-01T00:00:00Z".to_owned()),
                    Just("200".to_owned()),
                    Just("expired".to_owned()),
                    "[0-9]{1,21}",
                    nats_header_value(),
                ],
            ),
            0..12,
        ),
        body in body(),
    ) {
        let mut h = HeaderMap::new();
        for (n, v) in &entries {
            h.append(n.as_str(), v.as_str());
        }
        let _ = Request::from_parts(h.clone(), body.clone());
        let result = ResultRecord::from_parts(&h, body);
        let has_status = entries.iter().any(|(n, _)| n.eq_ignore_ascii_case(header::STATUS));
        if !has_status {
            prop_assert!(
                matches!(result, Err(ContractError::MissingHeader(header::STATUS))),
                "{:?}", result
            );
        }
        if let Ok(r) = result {
            prop_assert!(r.validate().is_ok());
            prop_assert!(r.headers.iter().all(|(n, _)| !is_contract_name(n)));
        }
    }

    /// A request message the way the gateway writes it reads back field for field, whether the
    /// names come in the contract's case or all lowercase (a foreign client's spelling).
    #[test]
    fn request_round_trips(f in request_fields(), lowercase in any::<bool>(), body in body()) {
        let r = Request::from_parts(request_headers(&f, lowercase, None), body.clone()).unwrap();
        assert_request_matches(&r, &f, &body);
    }

    /// The contract's writer and reader agree: what `RequestHead::to_headers` writes,
    /// `Request::from_parts` reads back field for field, with the forwarded headers beside it; a
    /// request whose body is in the Object Store is written as contract 3 and reads back with it.
    #[test]
    fn written_requests_read_back(
        f in request_fields(),
        body in body(),
        object in proptest::option::of(body_object()),
        reply_bucket in proptest::option::of(nats_header_value()),
    ) {
        let body_object = object.filter(|_| f.contract() == WireContract::V2);
        let head = RequestHead {
            operation_id: f.operation_id.clone(),
            route: f.route.clone(),
            method: f.method.clone(),
            path: f.path.clone(),
            query: f.query.clone(),
            content_type: f.content_type.clone(),
            contract: f.contract(),
            reply_subject: f.reply_subject.clone(),
            reply_stream: f.reply_stream.clone(),
            progress_subject: f.progress_subject.clone(),
            deadline: f.deadline,
            retention_secs: f.retention_secs,
            tenant: f.tenant.clone(),
            idempotency_key: f.idempotency_key.clone(),
            fingerprint: f.fingerprint.clone(),
            callback_url: f.callback_url.clone(),
            retry_policy: None,
            not_before: None,
            start_by: None,
            redrive_of: None,
            body_object,
            reply_bucket,
        };
        let written = head.to_headers(&f.extra);
        if head.body_object.is_some() {
            prop_assert_eq!(header_str(&written, header::CONTRACT), Some("3"));
        }
        let r = Request::from_parts(written, body.clone()).unwrap();
        prop_assert_eq!(&r.head, &head);
        assert_request_matches(&r, &f, &body);
    }

    /// Leaving out any one required header gives `MissingHeader` naming exactly that header.
    #[test]
    fn request_missing_header_is_named(
        f in request_fields(),
        which in proptest::sample::select(REQUIRED_REQUEST_HEADERS.to_vec()),
        lowercase in any::<bool>(),
    ) {
        let result = Request::from_parts(request_headers(&f, lowercase, Some(which)), Bytes::new());
        prop_assert!(
            matches!(result, Err(ContractError::MissingHeader(name)) if name == which),
            "without {}: {:?}", which, result.map(|r| r.head.operation_id)
        );
    }

    /// A `Gw-Deadline` that is not RFC 3339, or a `Gw-Retention` that is not a whole number of
    /// seconds, is an invalid header carrying the value; never a panic, never accepted.
    #[test]
    fn request_bad_deadline_or_retention(
        f in request_fields(),
        bad in nats_header_value(),
        field in prop_oneof![Just(header::DEADLINE), Just(header::RETENTION)],
    ) {
        let invalid = if field == header::DEADLINE {
            OffsetDateTime::parse(&bad, &time::format_description::well_known::Rfc3339).is_err()
        } else {
            bad.parse::<u64>().is_err()
        };
        prop_assume!(invalid);
        let mut h = request_headers(&f, false, Some(field));
        h.insert(field, bad.as_str());
        match Request::from_parts(h, Bytes::new()) {
            Err(ContractError::InvalidHeader { name, value }) => {
                prop_assert_eq!(name, field);
                prop_assert_eq!(value, bad);
            }
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }

    /// `format_time` writes every instant the contract can express (years 0000-9999 in UTC), in
    /// whatever offset it is held, as UTC RFC 3339 that reads back exactly, to the nanosecond.
    #[test]
    fn deadlines_round_trip(t in instant(), offset_secs in -86_399i32..=86_399) {
        let offset = time::UtcOffset::from_whole_seconds(offset_secs).unwrap();
        let Some(held) = t.checked_to_offset(offset) else {
            return Ok(()); // not representable in that offset (beyond year 9999 locally)
        };
        let text = format_time(held);
        prop_assert!(text.ends_with('Z'), "{}", text);
        let back = OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).unwrap();
        prop_assert_eq!(back, t);
    }

    /// Progress reports round-trip through JSON; `percent` and `retry` are left out when unknown.
    #[test]
    fn progress_round_trips(
        percent in proptest::option::of(any::<u8>()),
        message in ".{0,40}",
        retry in proptest::option::of((1u32..100, proptest::option::of(".{0,40}"), proptest::option::of(0i64..4_000_000_000))),
    ) {
        let retry = retry.map(|(attempts, last_error, next)| handlers::RetryState {
            attempts,
            last_error,
            next_attempt_at: next.map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap()),
        });
        let p = Progress { percent, message, retry };
        let json = serde_json::to_string(&p).unwrap();
        prop_assert_eq!(json.contains("\"percent\""), p.percent.is_some());
        prop_assert_eq!(json.contains("\"retry\""), p.retry.is_some());
        let back: Progress = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, p);
    }

    /// Problem markers carry an RFC 9457 body that states their status and operation, whatever
    /// the title and detail say.
    #[test]
    fn problem_bodies_are_json(
        status in 200u16..=599,
        title in ".{0,20}",
        detail in ".{0,40}",
        slug in "[a-z-]{1,12}",
        op in operation_id(),
        outcome in outcome(),
    ) {
        let record = ResultRecord::problem(outcome, &op, status, &slug, &title, &detail);
        let back = ResultRecord::from_parts(&record.to_headers(&op), record.body.clone()).unwrap();
        prop_assert!(back.same_answer(&record));
        let body: serde_json::Value = serde_json::from_slice(&back.body).unwrap();
        prop_assert_eq!(&body["status"], status);
        prop_assert_eq!(&body["title"], title.as_str());
        prop_assert_eq!(&body["detail"], detail.as_str());
        prop_assert_eq!(&body["operation_id"], op.as_str());
        prop_assert_eq!(
            body["type"].as_str().unwrap(),
            format!("{}{slug}", handlers::contract::PROBLEM_TYPE_BASE)
        );
    }
}

#[test]
fn progress_json_defaults() {
    let p: Progress = serde_json::from_str("{}").unwrap();
    assert_eq!(
        p,
        Progress {
            percent: None,
            message: String::new(),
            retry: None,
        }
    );
    assert!(serde_json::from_str::<Progress>(r#"{"percent":256,"message":"x"}"#).is_err());
    assert!(serde_json::from_str::<Progress>(r#"{"percent":-1,"message":"x"}"#).is_err());
}

/// What another language's worker may store is read bounded: a percentage over 100 as 100, a
/// message over the limit cut with an ellipsis.
#[test]
fn stored_progress_is_read_bounded() {
    let long = "m".repeat(100_000);
    let payload = serde_json::json!({"percent": 250, "message": long}).to_string();
    let read = Progress::from_payload(payload.as_bytes()).unwrap();
    assert_eq!(read.percent, Some(100));
    assert_eq!(
        read.message.chars().count(),
        handlers::progress::MAX_PROGRESS_MESSAGE
    );
    assert!(read.message.ends_with('…'));
    assert_eq!(Progress::from_payload(b"not json"), None);
    // Past what a byte holds, or below zero: still a report, bounded.
    let huge = Progress::from_payload(br#"{"percent":500,"message":"x"}"#).unwrap();
    assert_eq!(huge.percent, Some(100));
    let negative = Progress::from_payload(br#"{"percent":-3,"message":"x"}"#).unwrap();
    assert_eq!(negative.percent, Some(0));
    let short = Progress::from_payload(br#"{"percent":42,"message":"half"}"#).unwrap();
    assert_eq!(short, Progress::new(Some(42), "half"));
}
