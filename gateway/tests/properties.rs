//! Property tests for the gateway's parsers: the Idempotency-Key header and what is derived from
//! keys (`idempotency`), the `Prefer` header (`prefer`), the routes file (`config`), and the
//! request message a validated route produces (`accept::Submission::message`, read back with the
//! `handlers` contract).
//!
//! Public API only. Each property runs a bounded number of cases (256 or fewer) so the file takes
//! a few seconds. Failure persistence is off: a failure prints its shrunk input.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use gateway::config::{ByteSize, ConfigError, RouteConfig, header_allow_list, load_routes};
use gateway::http::prefer::{self, Preferences};
use gateway::operations::Submission;
use gateway::operations::idempotency::{
    self, KEY_TOKEN_LEN, KeyError, MAX_KEY_LEN, OPERATION_ID_LEN, RequestIdentity, decode_key,
    format_key, key_token, key_token_of, new_operation_id, parse_key,
};
use handlers::contract::{Request, Subjects, header};
use proptest::prelude::*;
use time::OffsetDateTime;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn headers(name: &'static str, values: &[Vec<u8>]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(
            name,
            HeaderValue::from_bytes(v).expect("a valid header value"),
        );
    }
    h
}

fn is_base32_lower(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

// ------------------------------------------------------------------------------------------------
// Idempotency-Key
// ------------------------------------------------------------------------------------------------

/// Any key the gateway can accept: 1-255 characters of printable ASCII, biased towards the
/// characters sf-strings escape or that NATS would trim.
fn acceptable_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[ -~]{1,255}",
        1 => "[ \"\\\\a]{1,12}",
        1 => "[ -~]{250,255}",
    ]
}

/// RFC 8941 sf-tokens: `( ALPHA / "*" ) *( tchar / ":" / "/" )`.
fn sf_token(len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> {
    let (lo, hi) = (*len.start() - 1, *len.end() - 1);
    (
        "[A-Za-z*]",
        proptest::collection::vec(
            proptest::char::ranges(
                vec![
                    '0'..='9',
                    'A'..='Z',
                    'a'..='z',
                    '!'..='!',
                    '#'..='\'',
                    '*'..='+',
                ]
                .into_iter()
                .chain(['-'..='/', ':'..=':', '^'..='`', '|'..='|', '~'..='~'])
                .collect::<Vec<_>>()
                .into(),
            ),
            lo..=hi,
        ),
    )
        .prop_map(|(first, rest)| first + &rest.into_iter().collect::<String>())
}

/// Header values that are sf-items but neither a string nor a token, or not sf-items at all.
fn malformed_key_value() -> impl Strategy<Value = String> {
    prop_oneof![
        // Strings that do not close, or carry what sf-strings cannot hold.
        "\"[a-z ]{0,10}",
        "\"[a-z]{0,5}\\\\[a-z]\"",
        "\"[a-z]{0,5}\t[a-z]{0,5}\"",
        // Two items, or trailing garbage after a string.
        "\"[a-z]{1,5}\", ?\"[a-z]{1,5}\"",
        "\"[a-z]{1,5}\"[a-z]{1,5}",
        // Parameters that are not parameters.
        "\"[a-z]{1,5}\";",
        "\"[a-z]{1,5}\";[A-Z]{1,3}",
        // Bare values with bytes outside printable ASCII.
        "[a-z]{1,5}\t[a-z]{1,5}",
    ]
}

/// Bare values RFC 8941 reads as something other than a string or token, or not at all.
fn bare_key_value() -> impl Strategy<Value = String> {
    prop_oneof![
        // Integers and decimals (a UUID starting with a digit begins like one).
        "-?[0-9]{1,15}",
        "-?[0-9]{1,12}\\.[0-9]{1,3}",
        "[0-9]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        // Booleans, byte sequences, inner lists.
        Just("?0".to_owned()),
        Just("?1".to_owned()),
        "\\:[A-Za-z0-9+/]{0,8}={0,2}\\:",
        "\\([a-z]{0,5}( [a-z]{1,5})?\\)",
        // Two tokens, or what is not a token.
        "[a-z]{1,5} [a-z]{1,5}",
        "[0-9][a-z]{1,5}",
        "[-.#$%&'+^_`|~][a-z]{0,5}",
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// Every key the gateway accepts survives `format_key` (the response header and the stored
    /// `Gw-Idempotency-Key`) and `decode_key` / `parse_key` exactly: spaces, quotes, backslashes.
    #[test]
    fn formatted_keys_round_trip(key in acceptable_key()) {
        let formatted = format_key(&key);
        prop_assert!(formatted.starts_with('"') && formatted.ends_with('"'), "{}", formatted);
        prop_assert_eq!(decode_key(formatted.as_bytes()), Ok(key.clone()));
        let h = headers(idempotency::HEADER, &[formatted.into_bytes()]);
        prop_assert_eq!(parse_key(h.get_all(idempotency::HEADER)), Ok(Some(key)));
    }

    /// Any header bytes: no panic; an accepted key is 1-255 characters of printable ASCII and
    /// is a fixed point of format-then-decode. `parse_key` over one header says the same.
    #[test]
    fn any_header_bytes_are_safe(value in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        "\"[ -~]{0,40}\"(;[a-z]{1,3}(=[a-z0-9]{1,3})?)?".prop_map(String::into_bytes),
    ]) {
        let decoded = decode_key(&value);
        if let Ok(key) = &decoded {
            let n = key.chars().count();
            prop_assert!((1..=MAX_KEY_LEN).contains(&n), "{} characters", n);
            prop_assert!(key.bytes().all(|b| (b' '..=b'~').contains(&b)), "{:?}", key);
            prop_assert_eq!(decode_key(format_key(key).as_bytes()), Ok(key.clone()));
        }
        if let Ok(hv) = HeaderValue::from_bytes(&value) {
            let mut h = HeaderMap::new();
            h.insert(idempotency::HEADER, hv);
            prop_assert_eq!(parse_key(h.get_all(idempotency::HEADER)), decoded.map(Some));
        }
    }

    /// Bare sf-tokens are keys as they stand.
    #[test]
    fn tokens_are_keys(token in sf_token(1..=255)) {
        prop_assert_eq!(decode_key(token.as_bytes()), Ok(token.clone()));
    }

    /// Over 255 characters, as a string or a token: `TooLong` with the character count.
    #[test]
    fn long_keys_are_too_long(key in "[ -~]{256,400}", token in sf_token(256..=400)) {
        let n = key.chars().count();
        prop_assert_eq!(decode_key(format_key(&key).as_bytes()), Err(KeyError::TooLong(n)));
        prop_assert_eq!(decode_key(token.as_bytes()), Err(KeyError::TooLong(token.len())));
    }

    /// The empty sf-string, with or without parameters or surrounding spaces: `Empty`.
    #[test]
    fn empty_strings_are_empty(
        lead in " {0,3}",
        params in "(;[a-z]{1,3}(=([a-z][a-z0-9]{0,2}|[0-9]{1,3}|\"[ !#-\\[\\]-~]{0,3}\"|\\?[01]))?){0,2}",
        trail in " {0,3}",
    ) {
        let value = format!("{lead}\"\"{params}{trail}");
        prop_assert_eq!(decode_key(value.as_bytes()), Err(KeyError::Empty));
    }

    /// A broken sf-string (starting with `"`) or a value with bytes outside printable ASCII:
    /// `Malformed`.
    #[test]
    fn malformed_values_are_malformed(value in malformed_key_value()) {
        let result = decode_key(value.as_bytes());
        prop_assert!(matches!(result, Err(KeyError::Malformed(_))), "{:?}: {:?}", value, result);
    }

    /// A bare printable value that is neither an sf-string nor an sf-token is the key itself.
    #[test]
    fn bare_values_are_keys(value in bare_key_value()) {
        prop_assert_eq!(decode_key(value.as_bytes()), Ok(value.clone()));
    }

    /// Two or more Idempotency-Key headers: `Repeated`, whatever they hold.
    #[test]
    fn repeated_headers_are_refused(
        values in proptest::collection::vec("[ -~]{0,20}".prop_map(String::into_bytes), 2..5),
    ) {
        prop_assert_eq!(parse_key(headers(idempotency::HEADER, &values).get_all(idempotency::HEADER)), Err(KeyError::Repeated));
    }

    /// The key token is deterministic, 26 characters of lowercase base32, and two different
    /// (tenant, route, key) triples get different tokens, including ones that only move the
    /// boundary between parts (length prefixes).
    #[test]
    fn key_tokens_are_stable_and_scoped(
        a in ("[ -~]{0,12}", "[a-z0-9_-]{0,12}", "[ -~]{0,20}"),
        b in ("[ -~]{0,12}", "[a-z0-9_-]{0,12}", "[ -~]{0,20}"),
        joined in "[a-z]{0,30}",
        cuts in (0usize..=30, 0usize..=30, 0usize..=30, 0usize..=30),
    ) {
        let t = key_token(&a.0, &a.1, &a.2);
        prop_assert_eq!(t.len(), KEY_TOKEN_LEN);
        prop_assert!(is_base32_lower(&t), "{}", t);
        prop_assert_eq!(&t, &key_token(&a.0, &a.1, &a.2));
        if a != b {
            prop_assert_ne!(&t, &key_token(&b.0, &b.1, &b.2));
        }
        // The same bytes split into three parts two ways.
        let n = joined.len();
        let split = |i: usize, j: usize| {
            let (i, j) = (i.min(n), j.min(n));
            let (i, j) = (i.min(j), i.max(j));
            (&joined[..i], &joined[i..j], &joined[j..])
        };
        let x = split(cuts.0, cuts.1);
        let y = split(cuts.2, cuts.3);
        if x != y {
            prop_assert_ne!(key_token(x.0, x.1, x.2), key_token(y.0, y.1, y.2), "{:?} vs {:?}", x, y);
        }
    }

    /// An operation id made from a token is 39 characters, carries that token, and differs
    /// from the next one made from it.
    #[test]
    fn operation_ids_carry_their_token(parts in ("[a-z]{1,10}", "[a-z]{1,10}", "[ -~]{1,40}")) {
        let token = key_token(&parts.0, &parts.1, &parts.2);
        let id = new_operation_id(&token);
        prop_assert_eq!(id.len(), OPERATION_ID_LEN);
        prop_assert_eq!(key_token_of(&id), Some(token.as_str()));
        prop_assert_ne!(&id, &new_operation_id(&token));
    }

    /// `key_token_of` accepts exactly 39 characters of lowercase base32: a right-length string
    /// with one character from elsewhere, or a wrong length, is not an operation id; any text
    /// gives an answer without panicking.
    #[test]
    fn key_token_of_checks_the_alphabet(
        good in "[a-z2-7]{39}",
        at in 0usize..39,
        bad in "[A-Z0-189!-/:-@\\[-`{-~ ]|[^\\x00-\\x7f]",
        other_len in "[a-z2-7]{0,80}",
        anything in "\\PC{0,45}",
    ) {
        prop_assert_eq!(key_token_of(&good), Some(&good[..KEY_TOKEN_LEN]));
        let mut chars: Vec<char> = good.chars().collect();
        chars[at] = bad.chars().next().unwrap();
        let broken: String = chars.into_iter().collect();
        prop_assert_eq!(key_token_of(&broken), None, "{:?}", broken);
        if other_len.len() != OPERATION_ID_LEN {
            prop_assert_eq!(key_token_of(&other_len), None);
        }
        if let Some(t) = key_token_of(&anything) {
            prop_assert!(anything.starts_with(t) && t.len() == KEY_TOKEN_LEN && is_base32_lower(&anything));
        }
    }

    /// Fingerprints: 64 hex digits, deterministic, and different for requests that differ in
    /// any part (an absent query or content type counts as an empty one).
    #[test]
    fn fingerprints_separate_requests(
        a in ("[A-Z]{1,7}", "/[ -~]{0,12}", proptest::option::of("[ -~]{0,8}"),
              proptest::option::of("[ -~]{0,8}"), proptest::collection::vec(any::<u8>(), 0..16)),
        b in ("[A-Z]{1,7}", "/[ -~]{0,12}", proptest::option::of("[ -~]{0,8}"),
              proptest::option::of("[ -~]{0,8}"), proptest::collection::vec(any::<u8>(), 0..16)),
    ) {
        let id = |p: &(String, String, Option<String>, Option<String>, Vec<u8>)| {
            RequestIdentity {
                method: &p.0,
                path: &p.1,
                query: p.2.as_deref(),
                content_type: p.3.as_deref(),
                body: &p.4,
                body_digest: None,
                callback_url: None,
                start: None,
            }
            .fingerprint()
        };
        let fa = id(&a);
        prop_assert_eq!(fa.len(), 64);
        prop_assert!(fa.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        prop_assert_eq!(&fa, &id(&a));
        let norm = |p: &(String, String, Option<String>, Option<String>, Vec<u8>)| {
            (p.0.clone(), p.1.clone(), p.2.clone().unwrap_or_default(),
             p.3.clone().unwrap_or_default(), p.4.clone())
        };
        prop_assert_eq!(fa == id(&b), norm(&a) == norm(&b));
    }
}

/// Collision sanity: 5,000 distinct keys on one (tenant, route) give 5,000 distinct tokens, and
/// so do the same keys under another tenant and another route.
#[test]
fn key_tokens_do_not_collide_on_samples() {
    let mut seen = HashSet::new();
    for scope in [
        ("default", "orders"),
        ("acme", "orders"),
        ("default", "reports"),
    ] {
        for i in 0..5_000 {
            assert!(seen.insert(key_token(scope.0, scope.1, &format!("key-{i}"))));
        }
    }
    assert_ne!(key_token("ab", "c", "k"), key_token("a", "bc", "k"));
    assert_ne!(key_token("a", "b", "ck"), key_token("a", "bc", "k"));
}

// ------------------------------------------------------------------------------------------------
// Prefer (RFC 7240)
// ------------------------------------------------------------------------------------------------

fn random_case(word: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), word.len()).prop_map(move |upper| {
        word.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

/// Optional whitespace (RFC 7230 OWS/BWS).
fn ows() -> impl Strategy<Value = String> {
    "[ \t]{0,2}"
}

/// An RFC 7230 quoted-string of visible ASCII, commas and semicolons included.
fn quoted_string() -> impl Strategy<Value = String> {
    "[ -~]{0,12}".prop_map(|s| {
        let mut q = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    })
}

/// A preference the gateway does not know, with optional value and parameters.
fn other_preference() -> impl Strategy<Value = String> {
    let token = "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,10}";
    (
        token.prop_filter("not a known preference", |n| {
            !n.eq_ignore_ascii_case("wait") && !n.eq_ignore_ascii_case("respond-async")
        }),
        proptest::option::of(prop_oneof![
            token.prop_map(|t| t.to_owned()),
            quoted_string()
        ]),
        proptest::collection::vec(
            (
                token,
                proptest::option::of(prop_oneof![
                    token.prop_map(|t| t.to_owned()),
                    quoted_string()
                ]),
            ),
            0..2,
        ),
        ows(),
    )
        .prop_map(|(name, value, params, sp)| {
            let mut p = name;
            if let Some(v) = value {
                p = format!("{p}{sp}={sp}{v}");
            }
            for (n, v) in params {
                p.push_str(&format!("{sp};{sp}{n}"));
                if let Some(v) = v {
                    p.push_str(&format!("={v}"));
                }
            }
            p
        })
}

/// `wait=N` in any spelling RFC 7240 allows: any case, BWS around '=', a quoted value,
/// parameters after it.
fn wait_preference(value: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (
        random_case("wait"),
        ows(),
        any::<bool>(),
        value,
        proptest::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?"),
    )
        .prop_map(|(name, sp, quoted, v, param)| {
            let v = if quoted { format!("\"{v}\"") } else { v };
            let param = param.map(|p| format!("; {p}")).unwrap_or_default();
            format!("{name}{sp}={sp}{v}{param}")
        })
}

fn respond_async_preference() -> impl Strategy<Value = String> {
    (
        random_case("respond-async"),
        proptest::option::of("[a-z]{1,5}(=[a-z0-9]{1,5})?"),
    )
        .prop_map(|(name, param)| match param {
            Some(p) => format!("{name}; {p}"),
            None => name,
        })
}

/// Joins preferences with commas and OWS, split across `headers` Prefer headers at preference
/// boundaries (cut points taken modulo the list length).
fn prefer_headers(prefs: &[String], cuts: &[usize], sp: &str) -> HeaderMap {
    let mut boundaries: Vec<usize> = cuts.iter().map(|c| c % (prefs.len() + 1)).collect();
    boundaries.push(0);
    boundaries.push(prefs.len());
    boundaries.sort_unstable();
    boundaries.dedup();
    let mut h = HeaderMap::new();
    for w in boundaries.windows(2) {
        let value = prefs[w[0]..w[1]].join(&format!("{sp},{sp}"));
        h.append(
            "prefer",
            HeaderValue::from_str(&value).expect("visible ASCII"),
        );
    }
    h
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary Prefer headers (any bytes a header value may hold, several of them) never
    /// panic the parser.
    #[test]
    fn prefer_never_panics(values in proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            "[ -~]{0,60}".prop_map(String::into_bytes),
            "((wait|respond-async|\"|,|;|=|\\\\| |[0-9]{1,25}|[a-z]{1,4}))*".prop_map(String::into_bytes),
        ],
        0..4,
    )) {
        let mut h = HeaderMap::new();
        for v in &values {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                h.append("prefer", v);
            }
        }
        let _ = prefer::parse(&h);
    }

    /// `wait=N` for any u64 N is N seconds, in any spelling, alone or among preferences the
    /// gateway does not know, in one header or several.
    #[test]
    fn wait_reads_any_u64(
        (n, wait) in any::<u64>().prop_flat_map(|n| (Just(n), wait_preference(Just(n.to_string())))),
        before in proptest::collection::vec(other_preference(), 0..3),
        after in proptest::collection::vec(other_preference(), 0..3),
        cuts in proptest::collection::vec(any::<usize>(), 0..3),
        sp in ows(),
    ) {
        let mut prefs = before;
        prefs.push(wait);
        prefs.extend(after);
        let parsed = prefer::parse(&prefer_headers(&prefs, &cuts, &sp));
        prop_assert_eq!(parsed, Preferences { wait: Some(Duration::from_secs(n)), respond_async: false });
    }

    /// A wait the parser cannot read (beyond u64, negative, fractional, a word) is ignored, as
    /// prefer.rs documents; nothing panics, and respond-async still counts.
    #[test]
    fn unreadable_waits_are_ignored(
        value in prop_oneof![
            "[1-9][0-9]{20,40}",
            Just("18446744073709551616".to_owned()),
            "-[0-9]{1,5}",
            "[0-9]{1,3}\\.[0-9]{1,3}",
            "[a-z]{1,8}",
            Just(String::new()),
        ],
        wait in random_case("wait"),
        with_async in any::<bool>(),
    ) {
        let mut value = format!("{wait}={value}");
        if with_async {
            value.push_str(", respond-async");
        }
        let h = headers("prefer", &[value.into_bytes()]);
        prop_assert_eq!(prefer::parse(&h), Preferences { wait: None, respond_async: with_async });
    }

    /// respond-async is found in any case, with parameters, at any position among other
    /// preferences (whose quoted values may hold commas, semicolons and the word itself), in
    /// one Prefer header or across several.
    #[test]
    fn respond_async_is_found_anywhere(
        others in proptest::collection::vec(other_preference(), 0..5),
        at in any::<prop::sample::Index>(),
        pref in respond_async_preference(),
        cuts in proptest::collection::vec(any::<usize>(), 0..3),
        sp in ows(),
    ) {
        let mut prefs = others.clone();
        prefs.insert(at.index(others.len() + 1), pref);
        let parsed = prefer::parse(&prefer_headers(&prefs, &cuts, &sp));
        prop_assert_eq!(parsed, Preferences { wait: None, respond_async: true });
        // Without it, nothing is found: not even "respond-async" inside a quoted value.
        let mut quoted = others;
        quoted.push("note=\"respond-async, wait=5\"".to_owned());
        let parsed = prefer::parse(&prefer_headers(&quoted, &cuts, &sp));
        prop_assert_eq!(parsed, Preferences::default());
    }

    /// Several Prefer headers say what one header with their values joined by commas says
    /// (RFC 7230 3.2.2): the split never matters.
    #[test]
    fn prefer_headers_combine(
        prefs in proptest::collection::vec(
            prop_oneof![
                2 => other_preference(),
                1 => wait_preference("[0-9]{1,4}|[a-z]{1,3}"),
                1 => respond_async_preference(),
            ],
            0..6,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
        sp in ows(),
    ) {
        let one = prefer::parse(&prefer_headers(&prefs, &[], &sp));
        let many = prefer::parse(&prefer_headers(&prefs, &cuts, &sp));
        prop_assert_eq!(one, many);
        prop_assert_eq!(
            one.respond_async,
            prefs.iter().any(|p| p.to_ascii_lowercase().starts_with("respond-async"))
        );
    }

    /// Fixed (was a bug found here), minor: RFC 7240 section 2 says that of a preference
    /// given more than once "only the first instance is to be considered", and prefer.rs says
    /// "The first `wait` wins, as for any repeated preference". But a first `wait` whose value
    /// cannot be read does not count as the first: the parser keeps looking and takes a later
    /// one. Shrunk input: `Prefer: wait=a, wait=0` gives `wait: Some(0s)`; by the RFC (the first
    /// instance, unreadable, is ignored) it is `None`. Same across headers
    /// (`Prefer: wait=a` then `Prefer: wait=0`).
    /// Correct behaviour asserted: the wait is what the first `wait` instance says.
    #[test]
    fn only_the_first_wait_counts(
        waits in proptest::collection::vec(prop_oneof!["[0-9]{1,4}", "[a-z]{1,3}", "-[0-9]"], 1..4),
        cuts in proptest::collection::vec(any::<usize>(), 0..3),
    ) {
        let prefs: Vec<String> = waits.iter().map(|w| format!("wait={w}")).collect();
        let parsed = prefer::parse(&prefer_headers(&prefs, &cuts, ""));
        let first = waits[0].parse::<u64>().ok().map(Duration::from_secs);
        prop_assert_eq!(parsed.wait, first, "Prefer: {}", prefs.join(", "));
    }
}

// ------------------------------------------------------------------------------------------------
// Routes file
// ------------------------------------------------------------------------------------------------

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
const RESERVED: [&str; 4] = ["/operations", "/livez", "/readyz", "/openapi.json"];

fn is_reserved(path: &str) -> bool {
    RESERVED
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// Writes `text` as the routes file in `dir` and loads it.
fn load(dir: &Path, text: &str) -> Result<Vec<RouteConfig>, ConfigError> {
    let path = dir.join("routes.toml");
    std::fs::write(&path, text).unwrap();
    load_routes(&path)
}

/// One route as the generator writes it (TOML via serde, so every string is escaped right).
#[derive(Debug, Clone, serde::Serialize)]
struct RouteToml {
    name: String,
    method: String,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    require_idempotency_key: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body: Option<toml::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait: Option<String>,
}

/// A generated route and what loading it must give.
#[derive(Debug, Clone)]
struct GenRoute {
    toml: RouteToml,
    retention: Duration,
    timeout: Duration,
    max_body: usize,
    wait: Option<Duration>,
}

#[derive(Debug, serde::Serialize)]
struct FileToml {
    route: Vec<RouteToml>,
}

fn to_toml(routes: &[RouteToml]) -> String {
    toml::to_string(&FileToml {
        route: routes.to_vec(),
    })
    .unwrap()
}

fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn valid_path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        3 => "[A-Za-z0-9._~-]{1,10}",
        1 => "[a-z_][a-z0-9_]{0,8}".prop_map(|p| format!("{{{p}}}")),
    ];
    (
        proptest::collection::vec(segment, 0..4),
        proptest::option::of("[a-z]{1,6}"),
    )
        .prop_map(|(segments, rest)| {
            let mut path = format!("/{}", segments.join("/"));
            if let Some(rest) = rest {
                if !path.ends_with('/') {
                    path.push('/');
                }
                path.push_str(&format!("{{*{rest}}}"));
            }
            path
        })
        .prop_filter("not reserved", |p| !is_reserved(p))
}

/// A duration up to `max_ms`, at least 1 ms.
fn duration(max_ms: u64) -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1..=max_ms).prop_map(Duration::from_millis),
        (1..=max_ms / 1000).prop_map(Duration::from_secs),
    ]
}

fn max_body() -> impl Strategy<Value = (toml::Value, usize)> {
    prop_oneof![
        (1i64..=1 << 40).prop_map(|n| (toml::Value::Integer(n), n as usize)),
        (
            1usize..=1 << 30,
            " {0,2}",
            prop_oneof![
                Just(("", 1usize)),
                Just(("B", 1)),
                Just(("KiB", 1024)),
                Just(("MiB", 1 << 20)),
                Just(("GiB", 1 << 30))
            ]
        )
            .prop_map(|(n, sp, (unit, factor))| (
                toml::Value::String(format!("{n}{sp}{unit}")),
                n * factor
            )),
    ]
}

fn valid_route() -> impl Strategy<Value = GenRoute> {
    (
        (
            "[a-z0-9_-]{1,64}",
            proptest::sample::select(METHODS.to_vec()).prop_flat_map(random_case),
            valid_path(),
            proptest::option::of(any::<bool>()),
        ),
        (
            proptest::option::of(duration(30 * 86_400_000)),
            proptest::option::of(duration(400 * 86_400_000)),
            proptest::option::of(max_body()),
            proptest::option::of("[A-Za-z0-9_-]{1,20}"),
            proptest::option::of("https?://[a-z]{1,10}\\.example(:[0-9]{2,4})?/[a-z0-9/]{0,10}"),
            proptest::option::of(duration(120_000)),
        ),
    )
        .prop_filter_map(
            "retention must be longer than timeout",
            |(
                (name, method, path, require),
                (timeout, retention, body, consumer, callback, wait),
            )| {
                let eff_timeout = timeout.unwrap_or(Duration::from_secs(300));
                let eff_retention = retention.unwrap_or(Duration::from_secs(86_400));
                if eff_retention <= eff_timeout || eff_retention < Duration::from_secs(1) {
                    return None;
                }
                Some(GenRoute {
                    toml: RouteToml {
                        name,
                        method,
                        path,
                        require_idempotency_key: require,
                        retention: retention.map(duration_text),
                        timeout: timeout.map(duration_text),
                        max_body: body.as_ref().map(|b| b.0.clone()),
                        consumer,
                        callback_url: callback,
                        wait: wait.map(duration_text),
                    },
                    retention: eff_retention,
                    timeout: eff_timeout,
                    max_body: body.map_or(1 << 20, |b| b.1),
                    wait,
                })
            },
        )
}

fn valid_routes() -> impl Strategy<Value = Vec<GenRoute>> {
    proptest::collection::vec(valid_route(), 1..5).prop_filter("unique names and endpoints", |rs| {
        let names: HashSet<_> = rs.iter().map(|r| &r.toml.name).collect();
        let endpoints: HashSet<_> = rs
            .iter()
            .map(|r| (r.toml.method.to_ascii_uppercase(), &r.toml.path))
            .collect();
        names.len() == rs.len() && endpoints.len() == rs.len()
    })
}

/// One way to break a valid route, and the error loading must then give.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Rejected by validation (`ConfigError::Invalid`).
    Invalid,
    /// Rejected while deserializing (`ConfigError::Parse`).
    Parse,
}

fn breakage() -> impl Strategy<Value = (String, toml::Value, Expect)> {
    use toml::Value::{Integer, String as S};
    let s = |strategy: &'static str| strategy.prop_map(S);
    prop_oneof![
        // Names: empty, too long, or with a character a subject token cannot hold.
        Just(("name".to_owned(), S(String::new()), Expect::Invalid)),
        "[a-z]{65,80}".prop_map(|n| ("name".to_owned(), S(n), Expect::Invalid)),
        "[a-z]{0,5}[A-Z. *>/\u{e9}][a-z]{0,5}".prop_map(|n| (
            "name".to_owned(),
            S(n),
            Expect::Invalid
        )),
        // Methods outside GET, POST, PUT, PATCH, DELETE.
        "[A-Za-z]{1,8}"
            .prop_filter("not a known method", |m| !METHODS
                .contains(&m.to_ascii_uppercase().as_str()))
            .prop_map(|m| ("method".to_owned(), S(m), Expect::Invalid)),
        // Paths: relative, reserved, or with a malformed parameter.
        "([a-z{}.][a-z{}/]{0,8})?".prop_map(|p| ("path".to_owned(), S(p), Expect::Invalid)),
        (
            proptest::sample::select(RESERVED.to_vec()),
            "(/[a-z{}*]{0,6}){0,2}"
        )
            .prop_map(|(r, rest)| (
                "path".to_owned(),
                S(format!("{r}{rest}")),
                Expect::Invalid
            )),
        prop_oneof![
            s("/[a-z]{0,4}\\{[a-z]{0,4}"),
            s("/[a-z]{0,4}\\}[a-z]{0,4}"),
            Just(S("/a/{}".to_owned())),
            Just(S("/a/{*}".to_owned())),
            s("/[a-z]{1,4}\\{[a-z]{1,4}\\}"),
            s("/\\{[a-z]{1,4}\\}[a-z]{1,4}"),
            s("/\\{\\{[a-z]{1,4}\\}\\}"),
            s("/\\{[a-z]{1,4}\\}\\{[a-z]{1,4}\\}"),
        ]
        .prop_map(|p| ("path".to_owned(), p, Expect::Invalid)),
        // Durations that are not durations; a zero timeout; retention not above timeout.
        (
            prop_oneof![Just("timeout"), Just("retention"), Just("wait")],
            prop_oneof![
                s("[a-z]{1,6}"),
                s("-[0-9]{1,3}s"),
                s("[1-9][0-9]{0,2}"), // "0" alone is zero to humantime: refused as Invalid
                s("[0-9]{1,3} ?(fortnights|parsecs)"),
                Just(Integer(5))
            ],
        )
            .prop_map(|(f, v)| (f.to_owned(), v, Expect::Parse)),
        prop_oneof![Just("0s"), Just("0ms"), Just("0ns")].prop_map(|v| (
            "timeout".to_owned(),
            S(v.to_owned()),
            Expect::Invalid
        )),
        (0u64..=300).prop_map(|secs| (
            "retention".to_owned(),
            S(format!("{secs}s")),
            Expect::Invalid
        )),
        // Sizes: zero, an unknown unit, negative, beyond usize, or a product beyond it.
        prop_oneof![
            Just(Integer(0)),
            Just(S("0KiB".to_owned())),
            Just(S("0GiB".to_owned())),
            Just(S("0".to_owned()))
        ]
        .prop_map(|v| ("max_body".to_owned(), v, Expect::Invalid)),
        prop_oneof![
            s("[0-9]{1,4} ?(GB|kb|KB|mib|gib|TiB|k|M|bytes)"),
            (i64::MIN..0).prop_map(Integer),
            s("-[0-9]{1,4}(KiB)?"),
            s("[1-9][0-9]{20,29}(KiB|MiB)?"),
            (u64::MAX / 1024 + 1..=u64::MAX).prop_map(|n| S(format!("{n}KiB"))),
            (u64::MAX / (1 << 20) + 1..=u64::MAX).prop_map(|n| S(format!("{n}MiB"))),
            Just(S(String::new())),
            Just(toml::Value::Float(1.5)),
        ]
        .prop_map(|v| ("max_body".to_owned(), v, Expect::Parse)),
        // Callback URLs that are not http(s) URLs.
        prop_oneof![
            s("(ftp|file|mailto|javascript):[a-z/]{1,10}"),
            s("[a-z]{1,10}"),
            s("/[a-z]{1,10}")
        ]
        .prop_map(|v| ("callback_url".to_owned(), v, Expect::Invalid)),
        // Fields that do not exist, and wrong types.
        "zz_[a-z_]{1,10}".prop_map(|f| (f, Integer(1), Expect::Parse)),
        Just((
            "require_idempotency_key".to_owned(),
            S("yes".to_owned()),
            Expect::Parse
        )),
        Just(("name".to_owned(), Integer(1), Expect::Parse)),
    ]
}

/// A line setting one of a route's optional fields, more often than not to a valid value.
fn optional_field_line() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            prop_oneof![Just("timeout"), Just("retention"), Just("wait")],
            prop_oneof![
                "\"[1-9][0-9]{0,2} ?(ns|ms|s|m|h|d|days|w|months|y|years)\"",
                "\"[0-9]{1,25} ?(s|y)?\"",
            ],
        )
            .prop_map(|(k, v)| format!("{k} = {v}")),
        prop_oneof!["-?[0-9]{1,20}", "\"[0-9]{1,22} ?(B|KiB|MiB|GiB)?\"",]
            .prop_map(|v| format!("max_body = {v}")),
        "\"(https?|ftp)://[a-z]{1,5}(\\.example)?(:[0-9]{1,6})?/\""
            .prop_map(|v| format!("callback_url = {v}")),
        "\"[a-z-]{0,8}\"".prop_map(|v| format!("consumer = {v}")),
        prop_oneof![Just("true"), Just("false")]
            .prop_map(|v| format!("require_idempotency_key = {v}")),
    ]
}

/// One `key = value` line of a route, the key one of a route's fields (mostly), the value
/// anything from valid to absurd.
fn route_line() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("name"),
            Just("method"),
            Just("path"),
            Just("timeout"),
            Just("retention"),
            Just("max_body"),
            Just("wait"),
            Just("consumer"),
            Just("callback_url"),
            Just("require_idempotency_key"),
            Just("public"),
            Just("extra"),
        ],
        prop_oneof![
            "\"[a-z0-9 /{}*._-]{0,12}\"",
            "\"[0-9]{1,25} ?(s|ms|m|h|d|y|years|KiB|MiB|B|GB)?\"",
            "-?[0-9]{1,22}",
            "[0-9]\\.[0-9]e[0-9]{1,3}",
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just("\"/a\"".to_owned()),
            Just("\"POST\"".to_owned()),
            Just("\"https://x.example/h\"".to_owned()),
            "\"[a-z]{1,8}\\\\u[0-9A-F]{4}\"",
        ],
    )
        .prop_map(|(k, v)| format!("{k} = {v}"))
}

proptest! {
    #![proptest_config(config(256))]

    /// Generated valid route sets load, and every field reads back as written (or as its
    /// documented default).
    #[test]
    fn valid_routes_load_and_round_trip(routes in valid_routes()) {
        let dir = tempfile::tempdir().unwrap();
        let text = to_toml(&routes.iter().map(|r| r.toml.clone()).collect::<Vec<_>>());
        let loaded = match load(dir.path(), &text) {
            Ok(loaded) => loaded,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n{text}"))),
        };
        prop_assert_eq!(loaded.len(), routes.len());
        for (r, g) in loaded.iter().zip(&routes) {
            prop_assert_eq!(&r.name, &g.toml.name);
            prop_assert_eq!(&r.method, &g.toml.method);
            prop_assert_eq!(r.http_method().to_string(), g.toml.method.to_ascii_uppercase());
            prop_assert_eq!(&r.path, &g.toml.path);
            prop_assert_eq!(r.require_idempotency_key, g.toml.require_idempotency_key.unwrap_or(false));
            prop_assert_eq!(r.retention, g.retention);
            prop_assert_eq!(r.timeout, g.timeout);
            prop_assert_eq!(r.max_body, ByteSize(g.max_body));
            prop_assert_eq!(&r.consumer, &g.toml.consumer);
            prop_assert_eq!(
                r.consumer_name(),
                g.toml.consumer.clone().unwrap_or_else(|| format!("worker-{}", g.toml.name))
            );
            prop_assert_eq!(&r.callback_url, &g.toml.callback_url);
            prop_assert_eq!(r.wait, g.wait);
        }
    }

    /// One broken field in an otherwise valid file is refused with the right kind of
    /// `ConfigError`, never accepted, never a panic.
    #[test]
    fn broken_routes_are_refused(
        routes in valid_routes(),
        which in any::<prop::sample::Index>(),
        (field, value, expect) in breakage(),
    ) {
        let mut table: Vec<toml::Table> = routes
            .iter()
            .map(|r| toml::Table::try_from(&r.toml).unwrap())
            .collect();
        let i = which.index(table.len());
        table[i].insert(field.clone(), value.clone());
        // A retention that is too short needs a timeout to be compared with: one at least as long.
        if field == "retention" && expect == Expect::Invalid {
            let secs = value.as_str().unwrap().trim_end_matches('s').parse::<u64>().unwrap();
            table[i].insert("timeout".to_owned(), toml::Value::String(format!("{}s", secs.max(1))));
        }
        let mut file = toml::Table::new();
        file.insert("route".to_owned(), toml::Value::Array(table.into_iter().map(toml::Value::Table).collect()));
        let text = toml::to_string(&file).unwrap();
        let dir = tempfile::tempdir().unwrap();
        match (load(dir.path(), &text), expect) {
            (Err(ConfigError::Invalid(_)), Expect::Invalid) | (Err(ConfigError::Parse { .. }), Expect::Parse) => {}
            (other, _) => {
                return Err(TestCaseError::fail(format!(
                    "{field} = {value} should be {expect:?}, got {:?}\n{text}",
                    other.map(|r| r.len())
                )));
            }
        }
    }

    /// Two routes with the same name, or the same method (in any case) and path: `Invalid`.
    #[test]
    fn duplicates_are_refused(routes in valid_routes(), same_name in any::<bool>(), lower in any::<bool>()) {
        let mut rs: Vec<RouteToml> = routes.into_iter().map(|r| r.toml).collect();
        let mut twin = rs[0].clone();
        if same_name {
            twin.path = format!("{}/twin", twin.path.trim_end_matches('/'));
            if twin.path.contains("{*") {
                twin.path = "/twin".to_owned();
            }
        } else {
            twin.name = format!("{}-twin", &twin.name[..twin.name.len().min(50)]);
            twin.method = if lower { twin.method.to_ascii_lowercase() } else { twin.method.to_ascii_uppercase() };
        }
        rs.push(twin);
        let dir = tempfile::tempdir().unwrap();
        let result = load(dir.path(), &to_toml(&rs));
        prop_assert!(matches!(result, Err(ConfigError::Invalid(_))), "{:?}", result.map(|r| r.len()));
    }

    /// `max_body` reads n, "n", "nB", "nKiB", "nMiB" (spaces allowed around the unit) exactly;
    /// a product beyond usize is refused, not wrapped or panicked on.
    #[test]
    fn byte_sizes_are_exact(
        n in prop_oneof![1u64..=4096, any::<u64>()],
        unit in prop_oneof![Just(("", 1u64)), Just(("B", 1)), Just(("KiB", 1024)), Just(("MiB", 1 << 20))],
        sp in (" {0,2}", " {0,2}", " {0,2}"),
        as_integer in any::<bool>(),
    ) {
        let value = if as_integer && i64::try_from(n).is_ok() {
            toml::Value::Integer(n as i64)
        } else {
            toml::Value::String(format!("{}{n}{}{}{}", sp.0, sp.1, unit.0, sp.2))
        };
        let factor = if matches!(value, toml::Value::Integer(_)) { 1 } else { unit.1 };
        let mut route = toml::Table::new();
        route.insert("name".into(), "a".into());
        route.insert("method".into(), "POST".into());
        route.insert("path".into(), "/a".into());
        route.insert("max_body".into(), value.clone());
        let mut file = toml::Table::new();
        file.insert("route".into(), toml::Value::Array(vec![toml::Value::Table(route)]));
        let dir = tempfile::tempdir().unwrap();
        let result = load(dir.path(), &toml::to_string(&file).unwrap());
        match n.checked_mul(factor).and_then(|b| usize::try_from(b).ok()) {
            Some(0) => prop_assert!(matches!(result, Err(ConfigError::Invalid(_))), "{value}: {result:?}"),
            Some(bytes) => prop_assert_eq!(result.unwrap()[0].max_body, ByteSize(bytes)),
            None => prop_assert!(matches!(result, Err(ConfigError::Parse { .. })), "{value}: {result:?}"),
        }
    }

    /// TOML-ish text and plain garbage never panic loading; whatever loads satisfies every
    /// rule validation states.
    #[test]
    fn any_routes_file_is_safe(text in prop_oneof![
        1 => "\\PC{0,200}",
        2 => proptest::collection::vec(
            prop_oneof![
                Just("[[route]]".to_owned()),
                Just("[route]".to_owned()),
                Just("[[routes]]".to_owned()),
                route_line(),
                "[ -~]{0,20}",
            ],
            0..16,
        )
        .prop_map(|lines| lines.join("\n")),
        // Valid routes, each changed by a few lines: most of these load, some do not.
        3 => proptest::collection::vec(
            (
                "[a-z][0-9]",
                prop_oneof![Just("post"), Just("GET"), Just("Put"), Just("DELETE")],
                prop_oneof![4 => "/[a-z]{0,4}", 1 => "/[a-z{}*]{0,4}"],
                proptest::collection::vec(prop_oneof![3 => optional_field_line(), 1 => route_line()], 0..3),
            ),
            1..4,
        )
        .prop_map(|routes| {
            routes
                .into_iter()
                .map(|(name, method, path, lines)| {
                    let mut route = format!("[[route]]\nname = \"{name}\"\nmethod = \"{method}\"\npath = \"{path}\"");
                    for line in lines {
                        route.push('\n');
                        route.push_str(&line);
                    }
                    route
                })
                .collect::<Vec<_>>()
                .join("\n")
        }),
    ]) {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(dir.path(), &text);
        if let Ok(routes) = loaded {
            prop_assert!(!routes.is_empty());
            let mut names = HashSet::new();
            for r in &routes {
                prop_assert!(names.insert(r.name.clone()));
                prop_assert!((1..=64).contains(&r.name.len()));
                prop_assert!(r.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'));
                prop_assert!(METHODS.contains(&r.http_method().as_str()));
                prop_assert!(r.path.starts_with('/') && !is_reserved(&r.path));
                prop_assert!(!r.timeout.is_zero() && r.retention > r.timeout);
                prop_assert!(r.retention >= Duration::from_secs(1));
                prop_assert!(r.max_body.0 > 0);
            }
        }
    }

    /// Header allow-lists: any names give an answer without panicking; what is accepted is a
    /// lowercase header name that neither belongs to one connection nor to the wire contract;
    /// those are refused in any case.
    #[test]
    fn header_allow_lists(
        names in proptest::collection::vec(
            prop_oneof![
                "[ -~]{0,12}",
                "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}",
                proptest::sample::select(vec![
                    "host", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
                    "upgrade", "content-length", "proxy-authorization", "proxy-x", "gw-route",
                    "gw-anything", "nats-msg-id", "nats-ttl",
                ])
                .prop_flat_map(random_case),
            ],
            0..5,
        ),
    ) {
        let result = header_allow_list(&names);
        let refused = |n: &str| {
            let l = n.trim().to_ascii_lowercase();
            ["host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"]
                .contains(&l.as_str())
                || l.starts_with("proxy-") || l.starts_with("gw-") || l.starts_with("nats-")
        };
        if names.iter().any(|n| refused(n)) {
            prop_assert!(matches!(result, Err(ConfigError::Invalid(_))));
        }
        if let Ok(list) = result {
            let expected: Vec<String> = names
                .iter()
                .map(|n| n.trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect();
            let got: Vec<&str> = list.iter().map(|h| h.as_str()).collect();
            prop_assert_eq!(got, expected);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// A validated route's request message, read back by a worker
// ------------------------------------------------------------------------------------------------

/// The instant the request-message property accepts at (fixed, so shrinking is deterministic).
fn now() -> OffsetDateTime {
    OffsetDateTime::parse(
        "2026-01-01T00:00:00Z",
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// A route whose timeout may be anything a routes file can say, mostly realistic.
fn route_with_any_timeout() -> impl Strategy<Value = GenRoute> {
    (
        valid_route(),
        prop_oneof![
            9 => (1u64..=30 * 86_400_000).prop_map(Duration::from_millis),
            1 => (1u64..=1_000_000_000_000).prop_map(Duration::from_secs),
        ],
        (1u64..=1_000_000).prop_map(Duration::from_secs),
    )
        .prop_map(|(mut r, timeout, extra)| {
            r.timeout = timeout;
            r.retention = timeout + extra;
            r.toml.timeout = Some(duration_text(r.timeout));
            r.toml.retention = Some(duration_text(r.retention));
            r
        })
}

fn forwarded_header() -> impl Strategy<Value = (String, String)> {
    (
        "[a-z0-9!#$%&'*+.^_`|~-]{1,12}".prop_filter("not a contract header", |n| {
            !n.starts_with("gw-") && !n.starts_with("nats-") && n != "content-type"
        }),
        "[!-~]([ -~]{0,20}[!-~])?",
    )
}

proptest! {
    #![proptest_config(config(256))]

    /// For every route the routes file accepts, `Submission::message` builds a request message
    /// that a worker reads back field for field with `handlers::contract::Request::from_parts`:
    /// the key decodes to the client's key, the operation id carries the key token, the subject
    /// is the key's, and the deadline is acceptance plus the route's timeout.
    ///
    /// Fixed (was a bug found here): validation puts no upper bound on `timeout`, and
    /// `Submission::message` computes `now + timeout` with `OffsetDateTime + Duration`, which
    /// panics past year 9999. A routes file with `timeout = "8000years"` and
    /// `retention = "8001years"` loads, and then every submit on that route panics (the
    /// catch-panic layer turns it into a 500). Shrunk input (accepting at 2026-01-01T00:00:00Z):
    /// `timeout = "7973years 10months 8h 24m"` (251,635,075,200 s, the first whole second past
    /// 9999-12-31T23:59:59Z) with `retention` one second longer. The check below computes the
    /// deadline with `checked_add` first, so the failure reads as a message, not a panic.
    /// Correct behaviour asserted: a route that loads can build its request messages (so
    /// validation should refuse such timeouts).
    #[test]
    fn validated_routes_build_readable_messages(
        route in route_with_any_timeout(),
        tenant in "[a-z0-9-]{1,20}",
        key in acceptable_key(),
        path in "/[!-~]{0,30}",
        query in proptest::option::of("[!-~]{0,20}"),
        content_type in proptest::option::of("[!-~]([ -~]{0,20}[!-~])?"),
        forwarded in proptest::collection::vec(forwarded_header(), 0..4),
        with_callback in any::<bool>(),
        body in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let loaded = match load(dir.path(), &to_toml(std::slice::from_ref(&route.toml))) {
            Ok(mut routes) => routes.remove(0),
            // Refusing an absurd timeout is fine (that is the fix), and so is a retention past
            // the documented 10 years; refusing a normal one is not.
            Err(_) if route.timeout > Duration::from_secs(100 * 365 * 86_400) => return Ok(()),
            Err(_) if route.retention > Duration::from_secs(10 * 365 * 86_400) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        };
        let method = loaded.http_method();
        let submission = Submission {
            route: &loaded,
            tenant: &tenant,
            idempotency_key: key.clone(),
            method: method.as_str(),
            path: &path,
            query: query.as_deref(),
            content_type: content_type.as_deref(),
            forwarded: forwarded.clone(),
            requested_callback_url: with_callback.then(|| "https://hooks.example/cb".to_owned()),
            start: Default::default(),
            redrive_of: None,
            body_object: None,
            body: Bytes::from(body.clone()),
        };
        let deadline = now().checked_add(time::Duration::try_from(loaded.timeout).unwrap_or(time::Duration::MAX));
        prop_assert!(
            deadline.is_some(),
            "route loaded with timeout = {:?} ({} s), but Submission::message panics: now + timeout is past year 9999",
            route.toml.timeout, loaded.timeout.as_secs()
        );
        let subjects = Subjects::default();
        let token = submission.key_token();
        let fingerprint = submission.fingerprint();
        let message = submission.message(&subjects, None, &token, &fingerprint, now());

        prop_assert_eq!(&message.subject, &subjects.request(&loaded.name, &token));
        prop_assert_eq!(key_token_of(&message.head.operation_id), Some(token.as_str()));
        prop_assert_eq!(Some(message.head.deadline), deadline);
        prop_assert_eq!(message.ttl, loaded.retention);

        let request = Request::from_parts(message.headers.clone(), Bytes::from(body.clone())).unwrap();
        prop_assert_eq!(&request.operation_id, &message.head.operation_id);
        prop_assert_eq!(&request.route, &loaded.name);
        prop_assert_eq!(request.method.as_str(), method.as_str());
        prop_assert_eq!(&request.path, &path);
        prop_assert_eq!(&request.query, &query);
        prop_assert_eq!(&request.content_type, &content_type);
        let slots = subjects.slots(&loaded.name, &message.head.operation_id);
        prop_assert_eq!(&request.reply_subject, &slots.reply_subject);
        prop_assert_eq!(&request.reply_stream, &slots.reply_stream);
        prop_assert_eq!(&request.progress_subject, &slots.progress_subject);
        prop_assert_eq!(request.contract, subjects.contract());
        prop_assert_eq!(request.deadline, message.head.deadline);
        prop_assert_eq!(request.retention_secs, Some(loaded.retention.as_secs().max(1)));
        prop_assert_eq!(request.tenant.as_deref(), Some(tenant.as_str()));
        prop_assert_eq!(request.fingerprint.as_deref(), Some(fingerprint.as_str()));
        let stored_key = request.idempotency_key.clone().unwrap();
        prop_assert_eq!(decode_key(stored_key.as_bytes()), Ok(key));
        prop_assert_eq!(request.callback_url.is_some(), with_callback || loaded.callback_url.is_some());
        prop_assert_eq!(&request.body[..], &body[..]);
        for (n, v) in &forwarded {
            prop_assert!(
                request.headers.get_all(n.as_str()).any(|x| x.as_str() == v),
                "forwarded {} lost", n
            );
        }
        // A forwarded header can never shadow a contract header.
        prop_assert_eq!(
            handlers::contract::header_str(&request.headers, header::OPERATION_ID),
            Some(message.head.operation_id.as_str())
        );
    }
}
