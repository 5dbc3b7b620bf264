//! A body that carries something along until it ends: the request counted in flight on its
//! connection ([`super::server`]), or a flag that says it was read to its end
//! ([`super::layers::edge`]). Hand-written glue: http-body-util has no body with an
//! end-of-stream hook.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

/// What a [`Carrying`] body tells when it has yielded its last frame; dropping the body drops it.
pub(super) trait AtEnd: Send + Unpin + 'static {
    /// The body has nothing more to give.
    fn ended(&mut self) {}
}

/// `body`, with `along` kept until the body is dropped and told when the body ends.
pub(super) struct Carrying<T> {
    body: Body,
    along: T,
}

/// `body` as a [`Body`] that carries `along` (see [`Carrying`]).
pub(super) fn carrying<T: AtEnd>(body: Body, along: T) -> Body {
    Body::new(Carrying { body, along })
}

impl<T: AtEnd> HttpBody for Carrying<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.along.ended();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
