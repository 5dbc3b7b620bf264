//! A route's retry policy, carried in each request (`Gw-Retry-Policy`), and the retry state a
//! worker leaves in the operation's progress record after a failed attempt.
//!
//! The gateway writes the policy of the route that accepted a request into the request itself,
//! so every worker of the route follows the same policy without configuration of its own
//! (`handlers::Worker` and `gateway dispatch` alike), and a policy changed in the routes file
//! applies to requests accepted from then on. A request without the header is retried as the
//! worker's own settings say.
//!
//! The header's value is JSON (one line; NATS header values may hold any character but CR and LF):
//! `{"attempts":5,"backoff_ms":[1000,10000,60000],"jitter_percent":20,"retry_on":["5xx","429"]}`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Most attempts a policy may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest back-off delay a policy may ask for (JetStream holds a nak'ed message that long).
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
/// Longest error kept in a retry state, in characters; longer ones are cut with `…`.
pub const MAX_ERROR: usize = 500;

/// How a route's operations are retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Handler attempts, 1..=[`MAX_ATTEMPTS`]. A worker's consumer allows what it was created with
    /// (`max_deliver`); the smaller of the two counts.
    pub attempts: u32,
    /// Delay after attempt n is `backoff_ms[n-1]`, the last one repeated; not empty.
    pub backoff_ms: Vec<u64>,
    /// Each delay is scaled by a random factor in `[1 - j/100, 1 + j/100]`, 0..=100, so that
    /// operations that failed together do not come back together.
    #[serde(default)]
    pub jitter_percent: u8,
    /// Answers that are not stored but retried: HTTP status codes (`"503"`) or classes (`"5xx"`),
    /// 4xx and 5xx only.
    /// An error (a handler error, an unreachable upstream) is always retried; a permanent one
    /// (`handlers::Permanent`) never.
    #[serde(default)]
    pub retry_on: Vec<String>,
}

/// Why a policy is not valid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RetryPolicyError {
    #[error("attempts must be 1 to {MAX_ATTEMPTS}, not {0}")]
    Attempts(u32),
    #[error("backoff needs at least one delay")]
    NoBackoff,
    #[error("a backoff delay may be at most {} s", MAX_BACKOFF.as_secs())]
    BackoffTooLong,
    #[error("jitter_percent must be 0 to 100, not {0}")]
    Jitter(u8),
    #[error(
        "retry_on entries are failure status codes (\"503\") or classes (\"4xx\", \"5xx\"), not {0:?}"
    )]
    RetryOn(String),
    #[error("not a retry policy: {0}")]
    Json(String),
}

impl RetryPolicy {
    /// Checks the bounds above.
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if !(1..=MAX_ATTEMPTS).contains(&self.attempts) {
            return Err(RetryPolicyError::Attempts(self.attempts));
        }
        if self.backoff_ms.is_empty() {
            return Err(RetryPolicyError::NoBackoff);
        }
        if self
            .backoff_ms
            .iter()
            .any(|ms| Duration::from_millis(*ms) > MAX_BACKOFF)
        {
            return Err(RetryPolicyError::BackoffTooLong);
        }
        if self.jitter_percent > 100 {
            return Err(RetryPolicyError::Jitter(self.jitter_percent));
        }
        if let Some(bad) = self.retry_on.iter().find(|p| !valid_pattern(p)) {
            return Err(RetryPolicyError::RetryOn(bad.clone()));
        }
        Ok(())
    }

    /// The header value.
    pub fn to_header(&self) -> String {
        serde_json::to_string(self).expect("a policy serializes")
    }

    /// Reads and checks a header value.
    pub fn from_header(value: &str) -> Result<Self, RetryPolicyError> {
        let policy: Self =
            serde_json::from_str(value).map_err(|e| RetryPolicyError::Json(e.to_string()))?;
        policy.validate()?;
        Ok(policy)
    }

    /// The delay after attempt `attempt` (1-based) failed, before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        let ms = self
            .backoff_ms
            .get(index)
            .or(self.backoff_ms.last())
            .copied()
            .unwrap_or(0);
        Duration::from_millis(ms)
    }

    /// The delay after attempt `attempt` failed, with jitter from `unit` (a number in `[0, 1)`).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let spread = f64::from(self.jitter_percent) / 100.0;
        let factor = 1.0 - spread + 2.0 * spread * unit.clamp(0.0, 1.0);
        self.backoff(attempt).mul_f64(factor.max(0.0))
    }

    /// Whether an answer with `status` is retried instead of stored.
    pub fn retries_status(&self, status: u16) -> bool {
        self.retry_on.iter().any(|p| matches_status(p, status))
    }
}

/// An answer the route's policy retries instead of storing (`retry_on`): the attempt failed.
#[derive(Debug, thiserror::Error)]
#[error("the handler answered {0}, which the route's retry policy retries")]
pub struct RetriedAnswer(pub u16);

/// Fails an answer the route's policy retries: no reply is stored and no state committed for it.
pub(crate) fn retried_status(
    policy: Option<&RetryPolicy>,
    status: u16,
) -> Result<(), RetriedAnswer> {
    match policy {
        Some(policy) if policy.retries_status(status) => Err(RetriedAnswer(status)),
        _ => Ok(()),
    }
}

fn valid_pattern(pattern: &str) -> bool {
    // Failures only: retrying a success (2xx) would never store it.
    matches!(
        pattern.as_bytes(),
        [b'4'..=b'5', b'x', b'x'] | [b'4'..=b'5', b'0'..=b'9', b'0'..=b'9']
    )
}

fn matches_status(pattern: &str, status: u16) -> bool {
    match pattern.as_bytes() {
        [c, b'x', b'x'] => u16::from(c - b'0') == status / 100,
        _ => pattern.parse() == Ok(status),
    }
}

/// Where the retries of a pending operation stand, as its worker last said: kept in the
/// operation's progress record (`Progress::retry`), shown in its status resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryState {
    /// Attempts made or running so far (1 is the first).
    pub attempts: u32,
    /// The last failed attempt's error, at most [`MAX_ERROR`] characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is due; absent while an attempt runs.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl RetryState {
    /// After attempt `attempts` failed with `error`, the next due at `next`.
    pub fn failed(attempts: u32, error: &str, next: OffsetDateTime) -> Self {
        Self {
            attempts,
            last_error: Some(error.to_owned()),
            next_attempt_at: Some(next),
        }
        .bounded()
    }

    /// Attempt `attempts` running.
    pub fn running(attempts: u32) -> Self {
        Self {
            attempts,
            last_error: None,
            next_attempt_at: None,
        }
    }

    /// The same state with its error cut to [`MAX_ERROR`]: a worker in another language may
    /// have written anything.
    pub fn bounded(mut self) -> Self {
        self.last_error = self.last_error.as_deref().map(bounded);
        self
    }
}

fn bounded(error: &str) -> String {
    if error.chars().count() <= MAX_ERROR {
        return error.to_owned();
    }
    let mut cut: String = error.chars().take(MAX_ERROR - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            backoff_ms: vec![1000, 5000],
            jitter_percent: 20,
            retry_on: vec!["5xx".into(), "429".into()],
        }
    }

    #[test]
    fn backoff_follows_the_list_and_repeats_its_last() {
        let p = policy();
        assert_eq!(p.backoff(1), Duration::from_secs(1));
        assert_eq!(p.backoff(2), Duration::from_secs(5));
        assert_eq!(p.backoff(9), Duration::from_secs(5));
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(800));
        assert_eq!(p.delay(1, 0.5), Duration::from_millis(1000));
        assert!(p.delay(1, 0.999_999) <= Duration::from_millis(1200));
        let steady = RetryPolicy {
            jitter_percent: 0,
            ..p
        };
        assert_eq!(steady.delay(2, 0.7), Duration::from_secs(5));
    }

    #[test]
    fn statuses_match_codes_and_classes() {
        let p = policy();
        assert!(p.retries_status(503) && p.retries_status(500) && p.retries_status(429));
        assert!(!p.retries_status(404) && !p.retries_status(200) && !p.retries_status(428));
        for success in ["2xx", "200", "3xx", "1xx"] {
            let p = RetryPolicy {
                retry_on: vec![success.into()],
                ..policy()
            };
            assert_eq!(p.validate(), Err(RetryPolicyError::RetryOn(success.into())));
        }
    }

    #[test]
    fn headers_round_trip_and_bad_policies_are_named() {
        let p = policy();
        assert_eq!(RetryPolicy::from_header(&p.to_header()), Ok(p.clone()));
        for (bad, error) in [
            (
                RetryPolicy {
                    attempts: 0,
                    ..p.clone()
                },
                RetryPolicyError::Attempts(0),
            ),
            (
                RetryPolicy {
                    backoff_ms: vec![],
                    ..p.clone()
                },
                RetryPolicyError::NoBackoff,
            ),
            (
                RetryPolicy {
                    backoff_ms: vec![MAX_BACKOFF.as_millis() as u64 + 1],
                    ..p.clone()
                },
                RetryPolicyError::BackoffTooLong,
            ),
            (
                RetryPolicy {
                    jitter_percent: 101,
                    ..p.clone()
                },
                RetryPolicyError::Jitter(101),
            ),
            (
                RetryPolicy {
                    retry_on: vec!["5XX".into()],
                    ..p.clone()
                },
                RetryPolicyError::RetryOn("5XX".into()),
            ),
            (
                RetryPolicy {
                    retry_on: vec!["0xx".into()],
                    ..p.clone()
                },
                RetryPolicyError::RetryOn("0xx".into()),
            ),
        ] {
            assert_eq!(bad.validate(), Err(error.clone()));
            assert_eq!(RetryPolicy::from_header(&bad.to_header()), Err(error));
        }
        assert!(matches!(
            RetryPolicy::from_header(r#"{"attempts":2,"backoff_ms":[1],"extra":1}"#),
            Err(RetryPolicyError::Json(_))
        ));
    }

    #[test]
    fn a_retry_state_keeps_its_error_bounded() {
        let long = "e".repeat(2 * MAX_ERROR);
        let state = RetryState::failed(2, &long, OffsetDateTime::UNIX_EPOCH);
        let kept = state.last_error.unwrap();
        assert_eq!(kept.chars().count(), MAX_ERROR);
        assert!(kept.ends_with('…'));
    }
}
