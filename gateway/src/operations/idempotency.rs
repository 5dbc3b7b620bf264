//! Idempotency keys and what is derived from them: the key token (which names the request's
//! subject, and so *is* the idempotency record), the operation id, and the request fingerprint.
//!
//! Pure functions only; the JetStream side of idempotency (create-if-absent, read back, compare)
//! lives in `accept`.
//!
//! Following the IETF Idempotency-Key draft
//! (https://datatracker.ietf.org/doc/draft-ietf-httpapi-idempotency-key-header/): the header is an
//! RFC 8941 sf-string (`Idempotency-Key: "8e03..."`). Clients often send the bare value
//! (`Idempotency-Key: 8e03978e-…`), which is a valid sf-token only when it starts with a letter, so
//! any bare printable value is accepted as the key itself. The key is scoped by (tenant, route)
//! and bound to a fingerprint of the request.

use data_encoding::BASE32_NOPAD;
use sfv::{BareItem, FieldType, Item, Parser};
use sha2::{Digest, Sha256};

/// The request header that carries the key.
pub const HEADER: &str = "idempotency-key";
/// Longest key accepted, in characters (Stripe's limit, and the issue's).
pub const MAX_KEY_LEN: usize = 255;
/// Length of a key token: 128 bits in lowercase base32.
pub const KEY_TOKEN_LEN: usize = 26;
/// Length of an operation id: the key token plus 64 random bits in lowercase base32.
pub const OPERATION_ID_LEN: usize = KEY_TOKEN_LEN + 13;

/// What is wrong with a request's Idempotency-Key header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("this route requires an Idempotency-Key header")]
    Missing,
    #[error("send exactly one Idempotency-Key header")]
    Repeated,
    #[error("the Idempotency-Key must not be empty")]
    Empty,
    #[error("the Idempotency-Key is {0} characters long; at most 255 are allowed")]
    TooLong(usize),
    #[error(
        "the Idempotency-Key must be a structured-field string (\"...\") or a bare value of printable ASCII: {0}"
    )]
    Malformed(String),
    /// Keys the gateway makes itself (a schedule's tick, a redrive) cannot be taken by a client,
    /// which could otherwise take a tick or a redrive before it happens.
    #[error("Idempotency-Keys starting with {0:?} are the gateway's own (schedules, redrives)")]
    Reserved(&'static str),
}

/// Prefixes of the keys the gateway makes itself: `schedule:<name>:<tick>` and
/// `redrive:<operation-id>`. A client's key may not start with one.
pub const RESERVED_PREFIXES: [&str; 2] = ["schedule:", "redrive:"];

/// The key of the redrive of operation `operation_id`: one per failed operation, so a repeated
/// redrive (through any replica) is a replay of the first.
pub fn redrive_key(operation_id: &str) -> String {
    format!("redrive:{operation_id}")
}

/// The token that names a tenant in a subject (the failure index's): 128 bits of SHA-256 in
/// lowercase base32, as a key token.
pub fn tenant_token(tenant: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"gw-tenant-v1");
    h.update(tenant.as_bytes());
    base32_lower(&h.finalize()[..16])
}

/// Reads the Idempotency-Key header from all its values in a request (an HTTP header map's
/// `get_all(HEADER)`): `Ok(None)` when absent, an error when repeated or malformed.
pub fn parse_key<V: AsRef<[u8]>>(
    values: impl IntoIterator<Item = V>,
) -> Result<Option<String>, KeyError> {
    let mut values = values.into_iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    let key = decode_key(value.as_ref())?;
    if let Some(prefix) = RESERVED_PREFIXES.into_iter().find(|p| key.starts_with(p)) {
        return Err(KeyError::Reserved(prefix));
    }
    Ok(Some(key))
}

/// Reads one key from its header form, as sent by a client or as stored in a request message by
/// [`format_key`]: an sf-string (its parameters ignored, as RFC 8941 asks of unknown ones), or
/// else the bare value itself, whole, when it is printable ASCII: a UUID starting with a digit
/// (which RFC 8941 would read as a number), or `order-7;attempt=2` (which it would read as the
/// token `order-7`, so that two different keys became one). A broken sf-string (starting with
/// `"`) is refused, not taken with its quote.
pub fn decode_key(value: &[u8]) -> Result<String, KeyError> {
    let parsed = Parser::new(value).parse::<Item>();
    let key = match parsed {
        Ok(Item {
            bare_item: BareItem::String(s),
            ..
        }) => s.as_str().to_owned(),
        _ if value.first() == Some(&b'"') => {
            let why = parsed
                .err()
                .map_or("not a string".to_owned(), |e| e.to_string());
            return Err(KeyError::Malformed(why));
        }
        _ => {
            let printable = value.iter().all(|&b| (0x20..0x7f).contains(&b));
            if !printable {
                return Err(KeyError::Malformed(
                    "only printable ASCII is allowed".to_owned(),
                ));
            }
            String::from_utf8(value.to_vec())
                .expect("printable ASCII is UTF-8")
                .trim()
                .to_owned()
        }
    };
    // Parameters on the item are ignored, as RFC 8941 asks of unknown parameters.
    match key.chars().count() {
        0 => Err(KeyError::Empty),
        n if n > MAX_KEY_LEN => Err(KeyError::TooLong(n)),
        _ => Ok(key),
    }
}

/// Writes a key as an sf-string: the response's Idempotency-Key header, and the stored
/// `Gw-Idempotency-Key` (quoted, so leading or trailing spaces survive NATS, which trims values).
pub fn format_key(key: &str) -> String {
    // Keys come from `parse_key` (printable ASCII) or from the gateway (a UUID), so they are
    // always valid sf-strings.
    let string = sfv::String::from_string(key.to_owned())
        .unwrap_or_else(|_| unreachable!("keys are printable ASCII"));
    Item::new(BareItem::String(string)).serialize()
}

/// A fresh key for a request that came without one, so the client can retry it safely.
pub fn assign_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn base32_lower(bytes: &[u8]) -> String {
    BASE32_NOPAD.encode(bytes).to_ascii_lowercase()
}

/// The token that names the request subject of (tenant, route, key). Same inputs, same token, on
/// every replica and after every restart.
pub fn key_token(tenant: &str, route: &str, key: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        b"gw-key-v1".as_slice(),
        tenant.as_bytes(),
        route.as_bytes(),
        key.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    base32_lower(&h.finalize()[..16])
}

/// A new operation id for a key token: the token (so the operation's request can be found from the
/// id alone) plus random bits (so a key reused after its retention ended names a new operation,
/// never an old result).
pub fn new_operation_id(key_token: &str) -> String {
    let nonce = &uuid::Uuid::new_v4().into_bytes()[..8];
    format!("{key_token}{}", base32_lower(nonce))
}

/// The key token inside an operation id, or `None` when the id is not one the gateway made.
pub fn key_token_of(operation_id: &str) -> Option<&str> {
    let well_formed = operation_id.len() == OPERATION_ID_LEN
        && operation_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    well_formed.then(|| &operation_id[..KEY_TOKEN_LEN])
}

/// The parts of a request a key is bound to.
#[derive(Debug, Clone, Copy)]
pub struct RequestIdentity<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
    /// The body's digest (`SHA-256=…`) when it is in the Object Store rather than in `body`.
    pub body_digest: Option<&'a str>,
    /// The client's `Callback-Url`: a retry that adds or changes one is another request, not a
    /// silent replay that never notifies where it asked.
    pub callback_url: Option<&'a str>,
    /// When the client asked it to start (`Delay`, `Not-Before`, `Start-By` as sent): a retry
    /// with the same headers is the same request, one with other times is another.
    pub start: Option<&'a str>,
}

impl RequestIdentity<'_> {
    /// Hex SHA-256 over method, path, query, content type, body and the client's callback URL,
    /// each length-prefixed so that no two different requests share an encoding.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.method.as_bytes(),
            self.path.as_bytes(),
            self.query.unwrap_or("").as_bytes(),
            self.content_type.unwrap_or("").as_bytes(),
            self.body,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        // Appended only when present, so that requests without one keep the fingerprint they had
        // before callback URLs were bound (a replay across an upgrade stays a replay).
        if let Some(url) = self.callback_url {
            h.update(b"callback-url");
            h.update((url.len() as u64).to_be_bytes());
            h.update(url.as_bytes());
        }
        // A body in the Object Store is bound by its digest (which covers every byte); `body` is
        // empty then.
        if let Some(digest) = self.body_digest {
            h.update(b"body-digest");
            h.update((digest.len() as u64).to_be_bytes());
            h.update(digest.as_bytes());
        }
        if let Some(start) = self.start {
            h.update(b"start");
            h.update((start.len() as u64).to_be_bytes());
            h.update(start.as_bytes());
        }
        data_encoding::HEXLOWER.encode(&h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of a request's Idempotency-Key headers.
    fn headers<'a>(values: &[&'a str]) -> Vec<&'a str> {
        values.to_vec()
    }

    #[test]
    fn accepts_sf_strings_and_tokens() {
        assert_eq!(
            parse_key(headers(&["\"abc 123\""])),
            Ok(Some("abc 123".into()))
        );
        assert_eq!(parse_key(headers(&["\"a\\\"b\""])), Ok(Some("a\"b".into())));
        assert_eq!(
            parse_key(headers(&["order-42"])),
            Ok(Some("order-42".into()))
        );
        assert_eq!(parse_key(headers(&["\"k\";v=1"])), Ok(Some("k".into())));
        assert_eq!(parse_key(headers(&[])), Ok(None));
    }

    /// Bare values are keys as sent, whatever RFC 8941 would make of them: five in eight random
    /// UUIDs start with a digit (an sf-integer, then garbage).
    #[test]
    fn accepts_bare_printable_values() {
        for bare in [
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
            "12",
            "?1",
            "a b",
            "(a)",
            ":YQ==:",
            "order-1;v=x y",
            "order-7;attempt=2",
        ] {
            assert_eq!(parse_key(headers(&[bare])), Ok(Some(bare.into())), "{bare}");
        }
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(parse_key(headers(&["\"\""])), Err(KeyError::Empty));
        assert_eq!(
            parse_key(headers(&["\"a\"", "\"b\""])),
            Err(KeyError::Repeated)
        );
        let long = format!("\"{}\"", "x".repeat(256));
        assert_eq!(parse_key(headers(&[&long])), Err(KeyError::TooLong(256)));
        let max = format!("\"{}\"", "x".repeat(255));
        assert!(parse_key(headers(&[&max])).is_ok());
        for bad in ["\"unterminated", "\"a\" x", "caf\u{e9}", "tab\tinside"] {
            assert!(
                matches!(parse_key(headers(&[bad])), Err(KeyError::Malformed(_))),
                "{bad} should be malformed"
            );
        }
    }

    #[test]
    fn formatted_keys_parse_back() {
        for key in [
            "abc",
            " padded ",
            "a\"b\\c",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
        ] {
            let formatted = format_key(key);
            assert_eq!(parse_key(headers(&[&formatted])), Ok(Some(key.to_owned())));
        }
    }

    #[test]
    fn key_token_is_scoped_and_stable() {
        let t = key_token("default", "orders", "k1");
        assert_eq!(t.len(), KEY_TOKEN_LEN);
        assert_eq!(t, key_token("default", "orders", "k1"));
        assert_ne!(t, key_token("other", "orders", "k1"));
        assert_ne!(t, key_token("default", "reports", "k1"));
        assert_ne!(t, key_token("default", "orders", "k2"));
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert_ne!(key_token("ab", "c", "k"), key_token("a", "bc", "k"));
    }

    #[test]
    fn operation_ids_carry_their_key_token() {
        let t = key_token("default", "orders", "k1");
        let a = new_operation_id(&t);
        let b = new_operation_id(&t);
        assert_ne!(a, b);
        assert_eq!(key_token_of(&a), Some(t.as_str()));
        assert_eq!(key_token_of("short"), None);
        assert_eq!(key_token_of(&a.to_uppercase()), None);
        assert_eq!(key_token_of(&format!("{}.", &a[1..])), None);
    }

    #[test]
    fn fingerprint_covers_every_part() {
        let base = RequestIdentity {
            method: "POST",
            path: "/orders",
            query: None,
            content_type: Some("application/json"),
            body: b"{}",
            body_digest: None,
            callback_url: None,
            start: None,
        };
        let f = base.fingerprint();
        assert_eq!(f, base.fingerprint());
        let variants = [
            RequestIdentity {
                method: "PUT",
                ..base
            },
            RequestIdentity {
                path: "/orders/1",
                ..base
            },
            RequestIdentity {
                query: Some("a=1"),
                ..base
            },
            RequestIdentity {
                content_type: None,
                ..base
            },
            RequestIdentity {
                body: b"{ }",
                ..base
            },
            RequestIdentity {
                callback_url: Some("https://hooks.example.com/a"),
                ..base
            },
            RequestIdentity {
                start: Some("delay=5"),
                ..base
            },
            RequestIdentity {
                body: b"",
                body_digest: Some("SHA-256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU="),
                ..base
            },
        ];
        for v in variants {
            assert_ne!(v.fingerprint(), f, "{v:?}");
        }
        // Fingerprints stored before the callback URL was bound stay what they were.
        assert_eq!(
            f,
            "9827e5d10b2a7102ae2091bb22737a918bba01591384fe093fded9da90754d22",
        );
    }
}
