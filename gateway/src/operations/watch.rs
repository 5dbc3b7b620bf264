//! Waiting for results without a NATS subscription per waiter.
//!
//! Each gateway process runs JetStream ordered consumers on the results and progress subjects (new
//! messages, headers only) and keeps a map from operation id to an in-process [`Notify`]. A waiter (a
//! `Prefer: wait` submit, a long poll, an SSE stream) registers, reads the operation, and sleeps
//! until notified or until its time is up. A notification is only a hint to read again: what a
//! waiter returns always comes from JetStream. Notifications can only be missed while the consumer
//! is re-created (it starts from new messages), so every waiter is woken to read again then; a
//! slow periodic re-check covers the rest. A late notification costs latency, never a wrong answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use handlers::contract::{ResultRecord, Subjects};

use super::model::Status;
use super::store::ConsumeError;
use crate::lifecycle::{Lifecycle, sleep_or_stop};
use crate::metrics::{RESULTS, WAITERS};

/// What a watch follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// Terminal records: also counted by status.
    Results,
    /// Progress reports.
    Progress,
}

/// Counts a terminal record that landed, by the status clients see (headers are all it takes).
fn count_result(headers: Option<&async_nats::HeaderMap>) {
    let Some(headers) = headers else { return };
    if let Ok(record) = ResultRecord::from_parts(headers, bytes::Bytes::new()) {
        metrics::counter!(RESULTS, "status" => Status::of(&record).name()).increment(1);
    }
}

/// How often a waiter reads again even without a notification. Long, because notifications are
/// only missed while the watch consumer is being re-created, and then every waiter is woken.
pub const RECHECK: Duration = Duration::from_secs(30);

/// The process-wide registry of waiters.
#[derive(Clone)]
pub struct Watch {
    waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Draining ends every wait; the results watch reports whether it runs.
    lifecycle: Lifecycle,
}

/// One waiter's interest in one operation; leaving the registry when dropped.
pub struct Registration {
    watch: Watch,
    operation_id: String,
    notify: Arc<Notify>,
}

impl Registration {
    /// A future that completes at the next notification for this operation. Create it *before*
    /// reading the operation, so that a result landing in between is not missed.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut waiters = self.watch.waiters.lock().expect("watch map");
        // The map holds one reference and this registration another: the last waiter leaves.
        if Arc::strong_count(&self.notify) <= 2 {
            waiters.remove(&self.operation_id);
        }
        metrics::gauge!(WAITERS).decrement(1);
    }
}

impl Watch {
    pub fn new(lifecycle: Lifecycle) -> Self {
        Self {
            waiters: Arc::default(),
            lifecycle,
        }
    }

    /// Registers interest in an operation.
    pub fn register(&self, operation_id: &str) -> Registration {
        metrics::gauge!(WAITERS).increment(1);
        let notify = self
            .waiters
            .lock()
            .expect("watch map")
            .entry(operation_id.to_owned())
            .or_default()
            .clone();
        Registration {
            watch: self.clone(),
            operation_id: operation_id.to_owned(),
            notify,
        }
    }

    /// The lifecycle this registry answers to: a draining process ends every wait.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    fn wake_all(&self) {
        for notify in self.waiters.lock().expect("watch map").values() {
            notify.notify_waiters();
        }
    }

    fn wake(&self, operation_id: &str) {
        if let Some(notify) = self.waiters.lock().expect("watch map").get(operation_id) {
            notify.notify_waiters();
        }
    }

    /// Follows `subjects` (`<prefix>.>`, whose last token is an operation id) of `stream` until
    /// `stop`, waking the waiters of every operation that gets a message there: results, and
    /// progress reports. Starts from new messages each time, and starts again (waking every
    /// waiter, which reads again) whenever the consumer fails or the client reconnects: a server
    /// restart loses the ordered consumer, which would otherwise only notice after missed
    /// heartbeats while results land unseen.
    pub async fn follow(
        self,
        js: async_nats::jetstream::Context,
        mut connections: tokio::sync::watch::Receiver<u64>,
        stream: String,
        subjects: String,
        followed: Followed,
        stop: CancellationToken,
    ) {
        let prefix = subjects.trim_end_matches('>').to_owned();
        while !stop.is_cancelled() {
            connections.mark_unchanged();
            let messages = async {
                js.get_stream(&stream)
                    .await?
                    .create_consumer(OrderedConfig {
                        filter_subject: subjects.clone(),
                        deliver_policy: DeliverPolicy::New,
                        headers_only: true,
                        ..Default::default()
                    })
                    .await?
                    .messages()
                    .await
                    .map_err(|e| ConsumeError::Messages(e.into()))
            }
            .await;
            match messages {
                Ok(messages) => {
                    // Results that landed while no consumer existed were not seen: read again.
                    self.wake_all();
                    if followed == Followed::Results {
                        self.lifecycle.set_watching_results(true);
                    }
                    let messages = messages.take_until(stop.cancelled());
                    tokio::pin!(messages);
                    loop {
                        let message = tokio::select! {
                            message = messages.next() => message,
                            _ = connections.changed() => {
                                tracing::debug!(%stream, "Reconnected to NATS; watching again.");
                                if followed == Followed::Results {
                                    self.lifecycle.set_watching_results(false);
                                }
                                break;
                            }
                        };
                        let Some(message) = message else { break };
                        match message {
                            Ok(m) => {
                                if m.subject.starts_with(prefix.as_str()) {
                                    self.wake(Subjects::operation_of(&m.subject));
                                }
                                if followed == Followed::Results {
                                    count_result(m.headers.as_ref());
                                }
                            }
                            Err(error) => {
                                tracing::debug!(%error, "Results watch interrupted; resuming.");
                                if followed == Followed::Results {
                                    self.lifecycle.set_watching_results(false);
                                }
                                break;
                            }
                        }
                    }
                }
                Err(error) => tracing::debug!(%error, "Cannot watch results yet; retrying."),
            }
            sleep_or_stop(&stop, Duration::from_millis(500)).await;
        }
    }
}
