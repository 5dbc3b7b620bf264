//! TLS set-up that is process-wide: the rustls crypto provider. The webhook client, the
//! dispatcher's HTTP client and the OTLP exporter use reqwest with rustls built without a
//! provider, so one must be installed before the first of them is built.

/// Installs ring as the process-wide rustls crypto provider (the one async-nats already links).
/// Harmless to call again.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
