//! The handler API: what a worker's code implements ([`Handler`]) and returns ([`Response`],
//! [`HandlerError`], [`Permanent`]). Nothing here talks to NATS; [`crate::worker`] drives it.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::contract::{BodyObject, Request, ResultRecord};

/// The error a handler returns: anything; the request is retried later, up to the last delivery,
/// after which the operation ends `failed`. Return a [`Permanent`] to fail at once.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A failure that retrying cannot fix: the operation ends `failed` at once, with this problem
/// (status 400-599) as its result, and the request is terminated.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{title}: {detail}")]
pub struct Permanent {
    pub status: u16,
    pub title: String,
    pub detail: String,
}

impl Permanent {
    pub fn new(status: u16, title: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            title: title.into(),
            detail: detail.into(),
        }
    }
}

/// A handler error that asks for the next attempt no earlier than `delay` from now: what an
/// upstream's `429` or `503` with `Retry-After` says (RFC 9110 section 10.2.3). The delivery is
/// offered again after that delay, or after the back-off if that is longer, and at most after
/// [`RetryAfter::MAX`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("retry no earlier than {delay:?} from now: {reason}")]
pub struct RetryAfter {
    pub delay: std::time::Duration,
    pub reason: String,
}

impl RetryAfter {
    /// The longest wait honoured: a longer one is cut to this (the operation's deadline still
    /// ends it when it comes first).
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(3600);

    pub fn new(delay: std::time::Duration, reason: impl Into<String>) -> Self {
        Self {
            delay,
            reason: reason.into(),
        }
    }
}

/// A handler's answer: replayed to the HTTP client as status, content type, headers and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// A body the handler stored itself, streamed, in the bucket its request names
    /// ([`crate::claim_check::store_reply_from`]); then `body` is empty. A large `body` needs
    /// none of this: the worker stores it.
    pub body_object: Option<BodyObject>,
}

impl Response {
    /// A response with a status and no body.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            content_type: None,
            headers: Vec::new(),
            body: Bytes::new(),
            body_object: None,
        }
    }

    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self {
            content_type: Some("application/json".to_owned()),
            body: Bytes::from(value.to_string()),
            ..Self::new(status)
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Self {
            content_type: Some("text/plain; charset=utf-8".to_owned()),
            body: Bytes::from(text.into()),
            ..Self::new(status)
        }
    }

    /// Adds a response header (replayed when the gateway's allow-list names it).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub(crate) fn into_record(self) -> ResultRecord {
        let mut record = ResultRecord::reply(self.status, self.content_type, self.body);
        record.headers = self.headers;
        record.body_object = self.body_object;
        record
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Something that answers requests of one route. Any `async fn(Request) -> Result<Response, _>`
/// closure is one.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, request: Request) -> BoxFuture<Result<Response, HandlerError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, HandlerError>> + Send + 'static,
{
    fn call(&self, request: Request) -> BoxFuture<Result<Response, HandlerError>> {
        Box::pin(self(request))
    }
}
