//! Configuration: process settings from flags and `GATEWAY_*` environment variables (clap), routes
//! from a TOML file. Everything is validated once at start; nothing reads the environment later.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::{HeaderName, Method};
use serde::Deserialize;

/// Process settings. Every flag has a `GATEWAY_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// TOML file with the routes.
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: PathBuf,
    /// Address the HTTP server listens on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub admin: AdminArgs,
    /// After SIGTERM: readiness turns false and new requests get 503 at once; requests in
    /// flight finish and waiters get their answer, within this much time, then the process exits.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Stream that holds progress reports, webhook delivery states and dead letters.
    #[arg(long, env = "GATEWAY_EVENTS_STREAM", default_value = "GW_EVENTS")]
    pub events_stream: String,
    /// URL prefixes a client's `Callback-Url` may start with (comma-separated); empty: the header
    /// is refused. Routes' own `callback_url` need no entry.
    #[arg(long, env = "GATEWAY_CALLBACK_ALLOW", value_delimiter = ',')]
    pub callback_allow: Vec<String>,
    /// Key that signs webhooks (Standard Webhooks: `whsec_` + base64, or any text). Required when
    /// webhooks are possible.
    #[arg(long, env = "GATEWAY_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Delivery attempts per webhook before it goes to the dead-letter subject.
    #[arg(long, env = "GATEWAY_WEBHOOK_ATTEMPTS", default_value_t = 8)]
    pub webhook_attempts: i64,
    /// Delays between webhook attempts (comma-separated; the last repeats).
    #[arg(
        long,
        env = "GATEWAY_WEBHOOK_BACKOFF",
        value_delimiter = ',',
        default_value = "1s,5s,30s,2m,10m,30m",
        value_parser = humantime::parse_duration
    )]
    pub webhook_backoff: Vec<Duration>,
    /// Replicas of each stream (1 for a single server, 3 for a cluster).
    #[arg(long, env = "GATEWAY_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// JetStream's duplicate window on the requests stream. Idempotency does not depend on it.
    #[arg(long, env = "GATEWAY_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub duplicate_window: Duration,
    /// How long to wait for a JetStream ack or read before answering 503.
    #[arg(long, env = "GATEWAY_NATS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub nats_timeout: Duration,
    /// Requests a second per tenant (token bucket); more get 429 with `Retry-After`. 0: no limit.
    #[arg(long, env = "GATEWAY_TENANT_RATE", default_value_t = 0)]
    pub tenant_rate: u32,
    /// Burst a tenant may send above its rate (default: the rate).
    #[arg(long, env = "GATEWAY_TENANT_BURST", default_value_t = 0)]
    pub tenant_burst: u32,
    /// Client connections open at once; more wait in the kernel's accept queue.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slowloris); the connection is closed after.
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's whole body; 408 after.
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,
    /// Headers a request may have; more: 431.
    #[arg(long, env = "GATEWAY_MAX_HEADERS", default_value_t = 64)]
    pub max_headers: usize,
    /// Bytes a request's head (request line and headers) may take; more: 431.
    #[arg(long, env = "GATEWAY_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// Let `Callback-Url` (and routes' `callback_url`) reach loopback, link-local, private and
    /// other non-public addresses. Off: the gateway never calls them (SSRF).
    #[arg(long, env = "GATEWAY_CALLBACK_ALLOW_PRIVATE", default_value_t = false)]
    pub callback_allow_private: bool,
    /// Requests handled at once; more are shed at once with 503 and `Retry-After` instead of
    /// queueing (health endpoints are never shed).
    #[arg(long, env = "GATEWAY_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,
    /// Longest wait a client may ask for with `Prefer: wait=N` or `?wait=N`.
    #[arg(long, env = "GATEWAY_MAX_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Event streams (`GET /operations/{id}/events`) open at once; more get 429.
    #[arg(long, env = "GATEWAY_MAX_EVENT_STREAMS", default_value_t = 10_000)]
    pub max_event_streams: usize,
    /// Seconds in `Retry-After` on 503 and 429 answers, and on pending operations while there is
    /// no estimate from the route's backlog.
    #[arg(long, env = "GATEWAY_RETRY_AFTER", default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Upper bound of the computed `Retry-After` of pending operations.
    #[arg(long, env = "GATEWAY_RETRY_AFTER_MAX", default_value_t = 60)]
    pub retry_after_max_secs: u64,
    /// Request headers forwarded to workers (comma-separated, case-insensitive).
    #[arg(
        long,
        env = "GATEWAY_FORWARD_HEADERS",
        value_delimiter = ',',
        default_value = "accept,accept-language,user-agent,x-request-id"
    )]
    pub forward_headers: Vec<String>,
    /// Headers of a worker's reply that `GET /operations/{id}/result` replays.
    #[arg(
        long,
        env = "GATEWAY_RESULT_HEADERS",
        value_delimiter = ',',
        default_value = "cache-control,content-language,etag,last-modified,location"
    )]
    pub result_headers: Vec<String>,
    /// Crash (abort) right after the JetStream ack of an accepted request, before answering.
    /// Test builds only: the end-to-end tests use it to prove a retry after such a crash converges.
    #[cfg(feature = "fault-injection")]
    #[arg(long, env = "GATEWAY_FAULT_ABORT_AFTER_PUBLISH", hide = true)]
    pub fault_abort_after_publish: bool,
}

/// The admin server, shared by `serve` and `dispatch`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Address of the admin server: Prometheus `/metrics` and `/livez`, apart from client
    /// traffic (port 0 picks a free one).
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
}

/// Where the gateway's JetStream is: shared by `serve`, `dev` and `dispatch`.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "GATEWAY_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// First token of every subject the gateway uses.
    #[arg(long, env = "GATEWAY_SUBJECT_PREFIX", default_value = handlers::contract::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// Stream that holds accepted requests.
    #[arg(long, env = "GATEWAY_REQUESTS_STREAM", default_value = handlers::contract::DEFAULT_REQUESTS_STREAM)]
    pub requests_stream: String,
    /// Stream that holds results (one terminal record per operation).
    #[arg(long, env = "GATEWAY_RESULTS_STREAM", default_value = handlers::contract::DEFAULT_RESULTS_STREAM)]
    pub results_stream: String,
}

impl NatsArgs {
    /// Worker settings that match these streams and subjects; the rest are the defaults.
    pub fn worker_config(&self, consumer_prefix: &str) -> handlers::WorkerConfig {
        handlers::WorkerConfig {
            subjects: handlers::Subjects::new(self.subject_prefix.clone()),
            requests_stream: self.requests_stream.clone(),
            results_stream: self.results_stream.clone(),
            consumer_prefix: consumer_prefix.to_owned(),
            ..handlers::WorkerConfig::default()
        }
    }
}

/// One route: an HTTP method and path whose requests become JetStream messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Route name; the subject token of its requests (`gw.req.<name>.…`).
    pub name: String,
    /// HTTP method (GET, POST, PUT, PATCH or DELETE).
    pub method: String,
    /// axum path pattern, e.g. `/reports/{kind}`.
    pub path: String,
    #[serde(default)]
    pub require_idempotency_key: bool,
    /// Callable without credentials when `[auth]` is configured (anonymous callers are the
    /// `public` tenant). Routes are authenticated by default.
    #[serde(default)]
    pub public: bool,
    /// How long request, status and result are kept.
    #[serde(default = "defaults::retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Deadline for a result; past it the operation is `expired`.
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest accepted body: bytes, or a string such as "256KiB" or "1MiB".
    #[serde(default = "defaults::max_body")]
    pub max_body: ByteSize,
    /// The durable consumer of this route's workers, whose backlog sets `Retry-After`
    /// (default `worker-<name>`, the `handlers` library's default).
    #[serde(default)]
    pub consumer: Option<String>,
    /// Where to POST the signed completion webhook of every operation on this route.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Wait this long for the result before answering 202, as if every request sent
    /// `Prefer: wait` (a "sync route"); capped by `GATEWAY_MAX_WAIT`. None by default.
    #[serde(default, with = "humantime_serde")]
    pub wait: Option<Duration>,
}

mod defaults {
    use super::*;
    pub fn retention() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(5 * 60)
    }
    pub fn max_body() -> ByteSize {
        ByteSize(1024 * 1024)
    }
}

/// A size in bytes, written as a number or as a string with a KiB/MiB suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ByteSizeInput")]
pub struct ByteSize(pub usize);

#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeInput {
    Number(usize),
    Text(String),
}

impl TryFrom<ByteSizeInput> for ByteSize {
    type Error = String;
    fn try_from(input: ByteSizeInput) -> Result<Self, String> {
        let text = match input {
            ByteSizeInput::Number(n) => return Ok(ByteSize(n)),
            ByteSizeInput::Text(t) => t,
        };
        let t = text.trim();
        let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let n: usize = digits.parse().map_err(|_| {
            format!("{text:?} is not a size such as 1048576, \"256KiB\" or \"1MiB\"")
        })?;
        let factor = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1024,
            "MiB" => 1024 * 1024,
            other => return Err(format!("unknown size unit {other:?}; use B, KiB or MiB")),
        };
        n.checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

/// The routes file: its routes, and who may call them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    #[serde(rename = "route", default)]
    pub routes: Vec<RouteConfig>,
    /// API keys and JWTs; absent: no authentication, every caller is the `default` tenant.
    #[serde(default)]
    pub auth: Option<crate::auth::AuthConfig>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid routes file: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// The longest retention (and so timeout) a route may have.
const MAX_RETENTION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Paths the gateway serves itself; no route may take them.
const RESERVED_PREFIXES: &[&str] = &["/operations", "/livez", "/readyz", "/openapi.json"];

/// Reads and validates the routes file: routes, and authentication if it has an `[auth]` table.
pub fn load_config(path: &Path) -> Result<RoutesFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: RoutesFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    validate_routes(&file.routes)?;
    if file.auth.is_none() && file.routes.iter().any(|r| r.public) {
        return Err(invalid(
            "`public = true` needs an [auth] table: without one every route is open",
        ));
    }
    Ok(file)
}

/// Reads and validates the routes file's routes.
pub fn load_routes(path: &Path) -> Result<Vec<RouteConfig>, ConfigError> {
    load_config(path).map(|file| file.routes)
}

/// Checks what serde cannot: names usable as subject tokens, known methods, well-formed and
/// unique paths, positive durations.
pub fn validate_routes(routes: &[RouteConfig]) -> Result<(), ConfigError> {
    if routes.is_empty() {
        return Err(invalid("the routes file defines no [[route]]"));
    }
    let mut names = HashSet::new();
    let mut endpoints = HashSet::new();
    for r in routes {
        let who = format!("route {:?}", r.name);
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 64
            && r.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(invalid(format!(
                "{who}: a name is 1-64 characters of a-z, 0-9, '-' and '_' (it becomes a subject token)"
            )));
        }
        if !names.insert(r.name.as_str()) {
            return Err(invalid(format!("{who} is defined twice")));
        }
        let method = r.method.to_ascii_uppercase();
        if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method.as_str()) {
            return Err(invalid(format!(
                "{who}: method {:?} is not one of GET, POST, PUT, PATCH, DELETE",
                r.method
            )));
        }
        validate_path(&r.path).map_err(|why| invalid(format!("{who}: path {:?} {why}", r.path)))?;
        if !endpoints.insert((method, r.path.clone())) {
            return Err(invalid(format!(
                "{who}: another route already serves {} {}",
                r.method, r.path
            )));
        }
        if r.timeout.is_zero() {
            return Err(invalid(format!("{who}: timeout must be positive")));
        }
        // Deadlines are instants: they must stay far inside what a timestamp can hold.
        if r.retention > MAX_RETENTION {
            return Err(invalid(format!(
                "{who}: retention ({}) must be at most 10 years",
                humantime::format_duration(r.retention)
            )));
        }
        // The request message is the operation's record: it must outlive the deadline, or an
        // accepted operation could vanish before it ends (and a 202 would lead to a 404).
        if r.retention <= r.timeout || r.retention < Duration::from_secs(1) {
            return Err(invalid(format!(
                "{who}: retention ({}) must be longer than timeout ({}) and at least 1s",
                humantime::format_duration(r.retention),
                humantime::format_duration(r.timeout)
            )));
        }
        if let Some(url) = &r.callback_url {
            let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
            if !ok {
                return Err(invalid(format!(
                    "{who}: callback_url {url:?} is not an http(s) URL"
                )));
            }
        }
        if r.max_body.0 == 0 {
            return Err(invalid(format!("{who}: max_body must be positive")));
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must start with '/'");
    }
    if RESERVED_PREFIXES
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
    {
        return Err("is reserved for the gateway's own endpoints");
    }
    for segment in path.split('/').skip(1) {
        let opens = segment.matches('{').count();
        let closes = segment.matches('}').count();
        let is_param =
            segment.starts_with('{') && segment.ends_with('}') && opens == 1 && closes == 1;
        if (opens + closes > 0 && !is_param) || segment == "{}" || segment == "{*}" {
            return Err("has a malformed parameter; write a whole segment as {name} or {*rest}");
        }
    }
    Ok(())
}

impl RouteConfig {
    /// The workers' consumer of this route.
    pub fn consumer_name(&self) -> String {
        self.consumer
            .clone()
            .unwrap_or_else(|| format!("worker-{}", self.name))
    }

    /// The method as an `http` type; valid after `validate_routes`.
    pub fn http_method(&self) -> Method {
        Method::from_bytes(self.method.to_ascii_uppercase().as_bytes()).expect("validated method")
    }
}

/// Parses a header allow-list, refusing names the contract reserves.
pub fn header_allow_list(names: &[String]) -> Result<Vec<HeaderName>, ConfigError> {
    names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .map(|n| {
            let lower = n.to_ascii_lowercase();
            const HOP_BY_HOP: &[&str] = &[
                "host",
                "connection",
                "keep-alive",
                "transfer-encoding",
                "te",
                "trailer",
                "upgrade",
                "content-length",
            ];
            if HOP_BY_HOP.contains(&lower.as_str()) || lower.starts_with("proxy-") {
                return Err(invalid(format!(
                    "header {n:?} cannot be forwarded or replayed: it belongs to one connection"
                )));
            }
            if lower.starts_with("gw-") || lower.starts_with("nats-") {
                return Err(invalid(format!(
                    "header {n:?} cannot be forwarded: Gw-* and Nats-* names belong to the wire contract"
                )));
            }
            HeaderName::from_bytes(lower.as_bytes())
                .map_err(|_| invalid(format!("{n:?} is not a valid header name")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<RouteConfig>, ConfigError> {
        let file: RoutesFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "test.toml".into(),
            source: Box::new(source),
        })?;
        validate_routes(&file.routes)?;
        Ok(file.routes)
    }

    #[test]
    fn defaults_apply() {
        let routes =
            parse("[[route]]\nname = \"orders\"\nmethod = \"post\"\npath = \"/orders\"\n").unwrap();
        let r = &routes[0];
        assert!(!r.require_idempotency_key);
        assert_eq!(r.retention, Duration::from_secs(86400));
        assert_eq!(r.timeout, Duration::from_secs(300));
        assert_eq!(r.max_body, ByteSize(1 << 20));
        assert_eq!(r.http_method(), Method::POST);
    }

    #[test]
    fn sizes_and_durations_parse() {
        let routes = parse(
            "[[route]]\nname = \"a\"\nmethod = \"PUT\"\npath = \"/a/{id}\"\nretention = \"1h\"\ntimeout = \"30s\"\nmax_body = \"256KiB\"\n",
        )
        .unwrap();
        assert_eq!(routes[0].max_body, ByteSize(256 * 1024));
        assert_eq!(routes[0].timeout, Duration::from_secs(30));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            ("", "no [[route]]"),
            (
                "[[route]]\nname = \"Bad.Name\"\nmethod = \"POST\"\npath = \"/a\"\n",
                "subject token",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"TRACE\"\npath = \"/a\"\n",
                "not one of",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"a\"\n",
                "start with '/'",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/operations/x\"\n",
                "reserved",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/a/{x\"\n",
                "malformed",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/a\"\nmax_body = \"1GB\"\n",
                "unknown size unit",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/a\"\ntimeout = \"soon\"\n",
                "timeout",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/a\"\ncolour = 1\n",
                "colour",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/a\"\nretention = \"1m\"\ntimeout = \"5m\"\n",
                "longer than timeout",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/a\"\n[[route]]\nname = \"b\"\nmethod = \"POST\"\npath = \"/a\"\n",
                "already serves",
            ),
            (
                "[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/a\"\n[[route]]\nname = \"a\"\nmethod = \"POST\"\npath = \"/b\"\n",
                "defined twice",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn contract_headers_cannot_be_forwarded() {
        assert!(header_allow_list(&["accept".into(), " X-Trace ".into()]).is_ok());
        assert!(header_allow_list(&["Gw-Route".into()]).is_err());
        assert!(header_allow_list(&["nats-msg-id".into()]).is_err());
        for hop in [
            "Host",
            "connection",
            "Transfer-Encoding",
            "content-length",
            "upgrade",
            "proxy-authorization",
        ] {
            assert!(header_allow_list(&[hop.into()]).is_err(), "{hop}");
        }
        assert!(header_allow_list(&["bad header".into()]).is_err());
    }
}
