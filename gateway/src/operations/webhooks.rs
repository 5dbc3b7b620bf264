//! Signed completion webhooks, delivered at least once by a durable JetStream consumer.
//!
//! Every gateway replica runs the same durable pull consumer on the results stream, so each
//! terminal record is handled by one replica at a time and survives restarts: an unacknowledged
//! record comes back after AckWait. For an operation with a callback URL (the client's
//! `Callback-Url`, checked against the allow-list, or the route's `callback_url`), the gateway POSTs
//! a JSON notification signed the Standard Webhooks way: `webhook-id` (the operation id, the same
//! on every attempt), `webhook-timestamp`, and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`. A 2xx ends it; anything else is retried after the configured back-off;
//! after the last attempt the notification goes to `gw.dlq.webhook.<id>`. Each attempt's outcome is
//! stored on `gw.cb.<id>`, and the status resource shows it. A notification lives no longer than
//! its operation: once the request's retention ends (and its key may name a new operation), it is
//! abandoned, counted and logged, never sent with another operation's request.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use handlers::contract::{ResultRecord, Subjects, header};
use handlers::jetstream::ack;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::sleep_or_stop;

use super::destination::{PublicOnly, check_destination};
use super::lookup::confirmed_request_of;
use super::model::{DeliveryState, Operation, StoredResult};
use super::store::{ConsumeError, Store, StoreError};
use super::view::OperationView;
use crate::config::WebhookSettings;
use crate::config::callback::CallbackUrl;
use crate::metrics::WEBHOOK_DELIVERIES;

/// Name of the durable consumer every replica shares.
const CONSUMER: &str = "gateway-webhooks";
/// How long one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why webhooks cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "webhooks are possible (a callback allow-list or a route callback_url) but GATEWAY_WEBHOOK_SECRET is not set"
    )]
    MissingSecret,
    #[error("GATEWAY_WEBHOOK_SECRET starts with whsec_ but the rest is not base64")]
    BadSecret,
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
}

/// The signing key from `GATEWAY_WEBHOOK_SECRET`: `whsec_<base64>` as Standard Webhooks issues
/// them, or any other text used as is.
pub fn secret_bytes(secret: &str) -> Result<Vec<u8>, WebhookError> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => data_encoding::BASE64
            .decode(b64.as_bytes())
            .map_err(|_| WebhookError::BadSecret),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// `v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>`.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        data_encoding::BASE64.encode(&mac.finalize().into_bytes())
    )
}

/// The delivery loop of one gateway process.
pub struct Webhooks {
    store: Arc<Store>,
    http: reqwest::Client,
    secret: Vec<u8>,
    attempts: i64,
    backoff: Vec<Duration>,
    allow_private: bool,
}

impl Webhooks {
    /// `None` when no webhook can ever be asked for: no allow-list, and no `other_receivers`
    /// (a route's `callback_url`, a tenant's own allow-list).
    pub fn new(
        store: Arc<Store>,
        settings: &WebhookSettings,
        other_receivers: bool,
    ) -> Result<Option<Self>, WebhookError> {
        if settings.callback_allow.is_empty() && !other_receivers {
            return Ok(None);
        }
        let secret = secret_bytes(
            settings
                .webhook_secret
                .as_deref()
                .ok_or(WebhookError::MissingSecret)?,
        )?;
        crate::tls::install_crypto_provider();
        let mut http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if !settings.callback_allow_private {
            http = http.dns_resolver(Arc::new(PublicOnly));
        }
        let http = http
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(Some(Self {
            store,
            http,
            secret,
            attempts: settings.webhook_attempts.max(1),
            backoff: settings.webhook_backoff.clone(),
            allow_private: settings.callback_allow_private,
        }))
    }

    /// Delivers until `stop`, from every stream of result slots; (re)creates the shared
    /// consumers as needed.
    pub async fn run(self, stop: CancellationToken) {
        let this = Arc::new(self);
        let streams = this
            .store
            .result_streams()
            .map(|(stream, _)| stream.to_owned());
        futures::future::join_all(streams.iter().map(|stream| {
            let (this, stop) = (&this, &stop);
            async move {
                while !stop.is_cancelled() {
                    match this.consume(stream, stop).await {
                        Ok(()) => {}
                        Err(error) => {
                            tracing::debug!(%error, stream, "Webhook consumer not ready; retrying.")
                        }
                    }
                    sleep_or_stop(stop, Duration::from_secs(1)).await;
                }
            }
        }))
        .await;
    }

    /// The consumer every replica shares, on each stream of result slots (all of whose subjects
    /// are results); provisioning creates them before the gateway is ready.
    pub fn consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ATTEMPT_TIMEOUT * 3,
            // A margin over the attempts: a delivery spent on a store outage (nak without an HTTP
            // attempt) must not leave the last attempt without its redelivery or dead letter.
            max_deliver: self.attempts + 5,
            // No more buffered than are handled at once, so none waits out its AckWait.
            max_ack_pending: 32,
            ..Default::default()
        }
    }

    async fn consume(
        self: &Arc<Self>,
        stream: &str,
        stop: &CancellationToken,
    ) -> Result<(), ConsumeError> {
        let messages = self.store.pull(stream, self.consumer_config()).await?;
        messages
            .take_until(stop.cancelled())
            .for_each_concurrent(32, |message| {
                let this = self.clone();
                async move {
                    if let Ok(message) = message {
                        this.handle(message).await;
                    }
                }
            })
            .await;
        Ok(())
    }

    async fn handle(&self, message: jetstream::Message) {
        let attempt = message.info().map(|i| i.delivered).unwrap_or(1);
        let id = Subjects::operation_of(&message.subject).to_owned();
        let removal_marker = message
            .headers
            .as_ref()
            .is_some_and(|h| h.get(header::MARKER_REASON).is_some());
        if removal_marker {
            // nats-server's delete marker where a result expired: nothing to notify.
            return ack(&message, AckKind::Ack).await;
        }
        let outcome = self.attempt(&id, &message, attempt).await;
        let kind = match outcome {
            Ok(Next::Done) => AckKind::Ack,
            Ok(Next::Retry) => AckKind::Nak(Some(self.delay(attempt))),
            Err(error) => {
                // The store could not be reached: try again later, without spending an attempt's
                // back-off on it.
                tracing::warn!(operation_id = %id, %error, "Cannot process a webhook now.");
                AckKind::Nak(Some(Duration::from_secs(1)))
            }
        };
        ack(&message, kind).await;
    }

    /// How long after a result its last delivery attempt may start: every back-off delay, plus
    /// each earlier attempt's time limit.
    pub fn retry_horizon(&self) -> Duration {
        (1..self.attempts)
            .map(|attempt| self.delay(attempt) + ATTEMPT_TIMEOUT)
            .sum()
    }

    fn delay(&self, attempt: i64) -> Duration {
        let index = usize::try_from(attempt - 1).unwrap_or(0);
        self.backoff
            .get(index)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }

    /// One delivery attempt: build the signed notification, POST it, record how it went (and
    /// dead-letter it after the last attempt). Store errors leave the attempt unspent.
    async fn attempt(
        &self,
        id: &str,
        message: &jetstream::Message,
        attempt: i64,
    ) -> Result<Next, StoreError> {
        let Some(mut operation) = confirmed_request_of(&self.store, id).await? else {
            // The operation's retention ended (its key may already name another operation, whose
            // request must not label this result): nobody can read it any more, and neither its
            // callback URL nor its status body exists to deliver. Said loudly, never sent wrong.
            metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => "abandoned").increment(1);
            tracing::warn!(
                operation_id = %id,
                attempt,
                "Webhook abandoned: the operation's retention ended before delivery."
            );
            return Ok(Next::Done);
        };
        if message.subject.as_str() != operation.request.reply_subject {
            // Not the operation's slot (its request names another): a writer that may publish
            // under some route's results wrote it, and it is no outcome of this operation.
            tracing::warn!(
                operation_id = %id,
                subject = %message.subject,
                "A result outside its operation's slot is ignored."
            );
            return Ok(Next::Done);
        }
        let Some(url) = operation.callback_url().map(str::to_owned) else {
            return Ok(Next::Done);
        };
        let headers = message.headers.clone().unwrap_or_default();
        let record = ResultRecord::from_parts(&headers, message.payload.clone())?;
        operation.result = Some(StoredResult {
            record,
            stored_at: message
                .info()
                .map(|i| i.published)
                .unwrap_or(OffsetDateTime::now_utc()),
        });
        let notification = Notification::of(&operation, &self.secret);
        let sent = self.deliver(&url, &notification).await;
        let result = Attempt::judge(sent, attempt >= self.attempts);
        metrics::counter!(WEBHOOK_DELIVERIES, "outcome" => result.metric()).increment(1);
        if let Attempt::LastFailed { .. } = result {
            self.store
                .dead_letter(
                    id,
                    notification.headers(),
                    notification.body.clone(),
                    operation.retention(),
                )
                .await?;
            tracing::warn!(operation_id = %id, attempts = attempt, "Webhook not delivered; dead-lettered.");
        }
        let state = result.state(url, attempt);
        let encoded = serde_json::to_vec(&state).expect("a delivery state serializes");
        self.store
            .put_callback_state(id, Bytes::from(encoded), operation.retention())
            .await?;
        Ok(match result {
            Attempt::Failed { .. } => Next::Retry,
            Attempt::Delivered { .. } | Attempt::LastFailed { .. } => Next::Done,
        })
    }

    /// POSTs a notification: the HTTP status it got, or why none came. The reason is stored in
    /// the status resource, so it says what kind of failure it was and no more (no address, no
    /// port, no resolver or TLS detail: a client must not be able to scan through it); the full
    /// error is logged.
    async fn deliver(&self, url: &str, notification: &Notification) -> Result<u16, String> {
        let parsed = CallbackUrl::parse(url).map_err(|e| format!("destination refused: {e}"))?;
        // IP literals never reach the resolver that filters names: check them here.
        check_destination(parsed.url(), self.allow_private)
            .await
            .map_err(|e| format!("destination refused: {e}"))?;
        let response = self
            .http
            .post(parsed.url().clone())
            .headers(notification.http_headers())
            .body(notification.body.clone())
            .send()
            .await
            .map_err(|error| {
                tracing::info!(operation_id = %notification.id, %error, "Webhook attempt failed.");
                if error.is_timeout() {
                    "timed out".to_owned()
                } else if error.is_connect() {
                    "could not connect".to_owned()
                } else {
                    "the request failed".to_owned()
                }
            })?;
        Ok(response.status().as_u16())
    }
}

/// A signed completion notification: the same bytes and headers on every attempt of one
/// delivery state's life, and in the dead letter.
struct Notification {
    id: String,
    timestamp: i64,
    signature: String,
    body: Bytes,
}

impl Notification {
    fn of(operation: &Operation, secret: &[u8]) -> Self {
        let now = OffsetDateTime::now_utc();
        let body = serde_json::to_vec(&serde_json::json!({
            "type": "operation.completed",
            "timestamp": handlers::contract::format_time(now),
            "data": OperationView::of(operation),
        }))
        .expect("a notification serializes");
        let timestamp = now.unix_timestamp();
        Self {
            id: operation.id().to_owned(),
            timestamp,
            signature: sign(secret, operation.id(), timestamp, &body),
            body: Bytes::from(body),
        }
    }

    /// The Standard Webhooks headers (and the content type), as (name, value) pairs.
    fn header_pairs(&self) -> [(&'static str, String); 4] {
        [
            ("webhook-id", self.id.clone()),
            ("webhook-timestamp", self.timestamp.to_string()),
            ("webhook-signature", self.signature.clone()),
            ("content-type", "application/json".to_owned()),
        ]
    }

    /// The headers as NATS carries them, for the dead letter (NATS names are case-sensitive:
    /// the content type is spelled as the contract spells it).
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in self.header_pairs() {
            let name = match name {
                "content-type" => handlers::contract::header::CONTENT_TYPE,
                other => other,
            };
            headers.insert(name, value.as_str());
        }
        headers
    }

    /// The headers as HTTP carries them, for the POST.
    fn http_headers(&self) -> reqwest::header::HeaderMap {
        self.header_pairs()
            .into_iter()
            .filter_map(|(name, value)| {
                let value = reqwest::header::HeaderValue::from_str(&value).ok()?;
                Some((reqwest::header::HeaderName::from_static(name), value))
            })
            .collect()
    }
}

/// How one attempt went.
enum Attempt {
    /// A 2xx: done.
    Delivered { status: u16 },
    /// Not delivered; more attempts to come.
    Failed {
        status: Option<u16>,
        error: Option<String>,
    },
    /// Not delivered, and that was the last attempt: dead-lettered.
    LastFailed {
        status: Option<u16>,
        error: Option<String>,
    },
}

impl Attempt {
    fn judge(sent: Result<u16, String>, last: bool) -> Self {
        let (status, error) = match sent {
            Ok(status) if (200..300).contains(&status) => return Attempt::Delivered { status },
            Ok(status) => (Some(status), None),
            Err(error) => (None, Some(error)),
        };
        if last {
            Attempt::LastFailed { status, error }
        } else {
            Attempt::Failed { status, error }
        }
    }

    fn metric(&self) -> &'static str {
        match self {
            Attempt::Delivered { .. } => "delivered",
            Attempt::Failed { .. } => "failed",
            Attempt::LastFailed { .. } => "dead_lettered",
        }
    }

    /// The delivery state this attempt leaves, as the status resource shows it.
    fn state(&self, url: String, attempts: i64) -> DeliveryState {
        let (state, last_status, last_error) = match self {
            Attempt::Delivered { status } => ("delivered", Some(*status), None),
            Attempt::Failed { status, error } => ("pending", *status, error.clone()),
            Attempt::LastFailed { status, error } => ("failed", *status, error.clone()),
        };
        DeliveryState {
            url,
            state: state.to_owned(),
            attempts,
            last_status,
            last_error,
        }
    }
}

enum Next {
    Done,
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let secret = secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn plain_secrets_are_used_as_is_and_bad_base64_is_refused() {
        assert_eq!(secret_bytes("abc").unwrap(), b"abc");
        assert!(secret_bytes("whsec_***").is_err());
    }
}
