//! W3C trace context across the async hop.
//!
//! The gateway writes `traceparent` (and `tracestate`) into each request message; a worker
//! continues that trace in the span it handles the message in, and writes its own span's context
//! onto the reply. This module is the glue between `tracing` spans, OpenTelemetry contexts and
//! header maps of either kind (NATS or HTTP) that no crate offers.
//!
//! It uses the W3C propagator directly rather than the process-global one, so propagation works
//! whether or not the application set a global propagator. When no OpenTelemetry layer is
//! installed, spans have no context of their own; the incoming headers then travel on unchanged,
//! so a trace is never cut by a process that does not take part in it.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace headers, lower-case, as the W3C Trace Context spec names them.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Reads header values by name: implemented for NATS and HTTP header maps.
pub trait HeaderSource {
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderSource for async_nats::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).map(|v| v.as_str())
    }
}

impl HeaderSource for http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Extract<'a, H: ?Sized>(&'a H);

impl<H: HeaderSource + ?Sized> Extractor for Extract<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }
    fn keys(&self) -> Vec<&str> {
        TRACE_HEADERS
            .into_iter()
            .filter(|name| self.0.header(name).is_some())
            .collect()
    }
}

/// The remote trace context that `headers` carry (an empty context when they carry none).
pub fn remote_context(headers: &(impl HeaderSource + ?Sized)) -> Context {
    TraceContextPropagator::new().extract(&Extract(headers))
}

/// The remote span that `headers` point at, if they carry a valid `traceparent`: what a read of
/// an operation links to.
pub fn remote_span(headers: &(impl HeaderSource + ?Sized)) -> Option<SpanContext> {
    let context = remote_context(headers);
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// Makes `span` continue the trace that `headers` carry (no-op when they carry none).
pub fn continue_trace(span: &tracing::Span, headers: &(impl HeaderSource + ?Sized)) {
    let remote = remote_context(headers);
    if remote.span().span_context().is_valid() {
        // Fails only when the span is already started by an exporter; it is new here.
        let _ = span.set_parent(remote);
    }
}

/// The trace headers to send onward from inside `span`: its own context when OpenTelemetry
/// tracks it, else the `incoming` headers unchanged.
pub fn outgoing(
    span: &tracing::Span,
    incoming: &(impl HeaderSource + ?Sized),
) -> Vec<(String, String)> {
    let context = span.context();
    if context.span().span_context().is_valid() {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut carrier);
        let mut headers: Vec<_> = carrier.into_iter().collect();
        headers.sort();
        return headers;
    }
    TRACE_HEADERS
        .into_iter()
        .filter_map(|name| Some((name.to_owned(), incoming.header(name)?.to_owned())))
        .collect()
}

/// The trace id of `span`, as hex, when OpenTelemetry tracks it: what logs carry.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn without_an_otel_layer_the_incoming_context_travels_unchanged() {
        let mut incoming = async_nats::HeaderMap::new();
        incoming.insert("traceparent", PARENT);
        let span = tracing::info_span!("test");
        continue_trace(&span, &incoming);
        assert_eq!(
            outgoing(&span, &incoming),
            vec![("traceparent".to_owned(), PARENT.to_owned())]
        );
    }

    #[test]
    fn a_valid_traceparent_is_a_span_to_link_to() {
        let mut headers = http::HeaderMap::new();
        assert!(remote_span(&headers).is_none());
        headers.insert("traceparent", PARENT.parse().unwrap());
        let span = remote_span(&headers).expect("valid");
        assert_eq!(
            span.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        headers.insert("traceparent", "00-zz-yy-01".parse().unwrap());
        assert!(remote_span(&headers).is_none());
    }
}
