//! Logs and traces: one `tracing` subscriber for the whole process.
//!
//! - Logs go to stderr, as text or as JSON lines (`GATEWAY_LOG_FORMAT`), filtered by `RUST_LOG`.
//!   JSON lines carry the fields of the current span: `request_id`, `operation_id`, `trace_id`.
//! - Spans go to OpenTelemetry when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is
//!   set: exported over OTLP/HTTP (the exporter reads the standard `OTEL_*` variables itself), and
//!   the `traceparent` the process writes into request messages (workers: into replies) names its
//!   own span. Without an endpoint no span is tracked (that costs about as much CPU as the rest of
//!   an accept, measured with scripts/bench), and trace headers
//!   travel on unchanged, so a worker still continues the client's trace.
//!
//! OpenTelemetry sees the gateway's and the worker library's spans at INFO whatever `RUST_LOG`
//! says, so quieting the logs never cuts a trace.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colour on a terminal).
    Text,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the tracer provider; flushes exported spans when dropped. Drop it outside the async
/// runtime: the OTLP exporter's HTTP client blocks.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(Err(error)) = self.provider.as_ref().map(SdkTracerProvider::shutdown) {
            eprintln!("Cannot flush traces: {error}");
        }
    }
}

/// Installs the process's subscriber. `service` names the process in exported traces. Exporting
/// needs a rustls crypto provider ([`crate::tls`]; `cli::main` installs it first).
pub fn init(format: LogFormat, service: &'static str) -> Result<Telemetry, TelemetryError> {
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    let provider = if exporting {
        // The exporter's HTTP client is reqwest with rustls, like the webhooks'.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?;
        Some(
            SdkTracerProvider::builder()
                .with_resource(Resource::builder().with_service_name(service).build())
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_filter(
                Targets::new()
                    .with_target("gateway", tracing::Level::INFO)
                    .with_target("handlers", tracing::Level::INFO),
            )
    });
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,tower_http=warn".into());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter())
            .boxed(),
    };
    Registry::default().with(spans).with(logs).try_init()?;
    Ok(Telemetry { provider })
}
