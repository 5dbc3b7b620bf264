//! The `Prefer` request header (RFC 7240), as far as the gateway honours it: `wait=N` and
//! `respond-async`. Hand-written: no maintained crate parses it for the `http` 1.x types.
//!
//! Preferences the gateway does not know, and values it cannot read, are ignored, as the RFC asks
//! (a preference is a hint, never a reason to reject a request).

use std::time::Duration;

use axum::http::HeaderMap;

/// The preferences of one request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Preferences {
    /// `wait=N`: how long the client is prepared to wait for the answer.
    pub wait: Option<Duration>,
    /// `respond-async`: the client accepts a 202 instead of the result.
    pub respond_async: bool,
}

/// Reads every `Prefer` header of a request. Only the first `wait` counts, readable or not
/// (RFC 7240, section 2: a repeated preference's later instances are ignored).
pub fn parse(headers: &HeaderMap) -> Preferences {
    let mut prefs = Preferences::default();
    let mut wait_seen = false;
    for value in headers.get_all("prefer") {
        let Ok(text) = value.to_str() else { continue };
        for preference in split_outside_quotes(text, ',') {
            // Parameters after ';' do not matter for either preference.
            let head = split_outside_quotes(preference, ';').next().unwrap_or("");
            let (name, value) = match head.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (head.trim(), None),
            };
            match (name.to_ascii_lowercase().as_str(), value) {
                ("respond-async", _) => prefs.respond_async = true,
                ("wait", Some(v)) if !wait_seen => {
                    wait_seen = true;
                    prefs.wait = v.parse::<u64>().ok().map(Duration::from_secs);
                }
                _ => {}
            }
        }
    }
    prefs
}

fn split_outside_quotes(text: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn prefs(values: &[&str]) -> Preferences {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("prefer", HeaderValue::from_str(v).unwrap());
        }
        parse(&h)
    }

    #[test]
    fn reads_wait_and_respond_async() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(prefs(&[]), Preferences::default());
        assert_eq!(prefs(&["wait=5"]).wait, secs(5));
        assert_eq!(
            prefs(&["respond-async, wait=10"]),
            Preferences {
                wait: secs(10),
                respond_async: true
            }
        );
        assert_eq!(
            prefs(&["Respond-Async", "WAIT = 3"]),
            Preferences {
                wait: secs(3),
                respond_async: true
            }
        );
        assert_eq!(prefs(&["wait=\"7\"; foo=bar"]).wait, secs(7));
        assert_eq!(
            prefs(&["wait=2, wait=9"]).wait,
            secs(2),
            "the first one wins"
        );
    }

    #[test]
    fn ignores_what_it_cannot_read() {
        assert_eq!(prefs(&["wait=soon"]).wait, None);
        assert_eq!(prefs(&["wait=-1"]).wait, None);
        assert_eq!(
            prefs(&["handling=lenient, return=minimal"]),
            Preferences::default()
        );
        assert_eq!(
            prefs(&["foo=\"a,wait=3\""]).wait,
            None,
            "commas inside quotes do not split"
        );
        assert_eq!(prefs(&[",,, ;"]), Preferences::default());
    }
}
