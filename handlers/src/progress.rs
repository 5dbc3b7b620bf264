//! Progress reports: a worker's "how far along" for an operation that is still pending.
//!
//! A report is a JSON [`Progress`] on `<prefix>.prog.<operation-id>` in the events stream, which
//! keeps the last message per subject: the status resource shows the latest report and event
//! streams send each new one. Progress is advisory: it never decides an operation's outcome, so
//! a lost report costs information, never correctness.

use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;

use crate::retry::RetryState;

/// A worker's progress report on `gw.prog.<operation-id>` (JSON payload; the last one counts).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// 0-100, when the worker knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    #[serde(default)]
    pub message: String,
    /// Where retries stand: the worker's attempt number, and after a failed attempt its error and
    /// when the next is due ([`RetryState`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryState>,
}

/// Longest progress message kept, in characters; longer ones are cut (with `…`) when written and
/// when read, whoever wrote them.
pub const MAX_PROGRESS_MESSAGE: usize = 1_000;

impl Progress {
    /// A report, bounded: `percent` at most 100, `message` at most [`MAX_PROGRESS_MESSAGE`]
    /// characters.
    pub fn new(percent: Option<u8>, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.chars().count() > MAX_PROGRESS_MESSAGE {
            message = message.chars().take(MAX_PROGRESS_MESSAGE - 1).collect();
            message.push('…');
        }
        Self {
            percent: percent.map(|p| p.min(100)),
            message,
            retry: None,
        }
    }

    /// The same report, saying where retries stand.
    pub fn with_retry(self, retry: Option<RetryState>) -> Self {
        Self { retry, ..self }
    }

    /// Reads a stored report (a JSON payload), bounded as [`Progress::new`] bounds it: a worker
    /// in another language may have written anything. `None` when it is not a report.
    pub fn from_payload(payload: &[u8]) -> Option<Self> {
        // Read loosely, then bounded: a percentage of 500 is 100, not an unreadable report.
        #[derive(serde::Deserialize)]
        struct Loose {
            #[serde(default)]
            percent: Option<f64>,
            #[serde(default)]
            message: String,
            #[serde(default)]
            retry: Option<RetryState>,
        }
        let read: Loose = serde_json::from_slice(payload).ok()?;
        let percent = read.percent.map(|p| p.clamp(0.0, 100.0) as u8);
        Some(Self::new(percent, read.message).with_retry(read.retry.map(RetryState::bounded)))
    }
}

/// A progress report JetStream did not acknowledge (not connected, no stream, or a timeout).
#[derive(Debug, thiserror::Error)]
#[error("progress report not stored: {0}")]
pub struct ProgressError(#[source] PublishError);

/// Publishes an operation's progress reports (`gw.prog.<id>`, the last one counts).
#[derive(Clone, Debug, Default)]
pub struct ProgressReporter {
    target: Option<(async_nats::jetstream::Context, String, Option<Duration>)>,
    /// The attempt the reports come from, carried in each (a report replaces the last).
    retry: Option<RetryState>,
}

impl ProgressReporter {
    /// A reporter that publishes to `subject`, each report kept for `ttl`.
    pub fn new(js: async_nats::jetstream::Context, subject: String, ttl: Option<Duration>) -> Self {
        Self {
            target: Some((js, subject, ttl)),
            retry: None,
        }
    }

    /// The same reporter, each report saying it comes from attempt `attempt`.
    pub fn in_attempt(self, attempt: u32) -> Self {
        Self {
            retry: Some(RetryState::running(attempt)),
            ..self
        }
    }

    /// A reporter that reports nowhere.
    pub fn detached() -> Self {
        Self::default()
    }

    /// Reports progress; waits for JetStream's ack. Reporting is best effort for the handler: an
    /// error here does not fail the operation unless the handler chooses so.
    pub async fn report(
        &self,
        percent: Option<u8>,
        message: impl Into<String>,
    ) -> Result<(), ProgressError> {
        self.publish(Progress::new(percent, message).with_retry(self.retry.clone()))
            .await
    }

    /// Publishes a report as it is; waits for JetStream's ack.
    pub async fn publish(&self, progress: Progress) -> Result<(), ProgressError> {
        let Some((js, subject, ttl)) = &self.target else {
            return Ok(());
        };
        let payload = serde_json::to_vec(&progress).expect("progress serializes");
        let mut publish = PublishMessage::build().payload(Bytes::from(payload));
        if let Some(ttl) = ttl {
            publish = publish.ttl(*ttl);
        }
        js.send_publish(subject.clone(), publish)
            .await
            .map_err(ProgressError)?
            .await
            .map_err(ProgressError)?;
        Ok(())
    }
}
