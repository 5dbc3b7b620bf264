//! Configuration: process settings from flags and `GATEWAY_*` environment variables (clap), routes
//! from a TOML file. Everything is validated once at start; nothing reads the environment later.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::http::HeaderName;

use callback::CallbackRule;

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
    pub jetstream: JetStreamSettings,
    #[command(flatten)]
    pub limits: ClientLimits,
    #[command(flatten)]
    pub webhooks: WebhookSettings,
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
    /// Web origins whose pages may call the gateway from a browser (CORS), comma-separated
    /// (`https://app.example.com`), or `*` for any. Empty (the default): no CORS headers, so
    /// browsers allow same-origin pages only.
    #[arg(long, env = "GATEWAY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Crash (abort) right after the JetStream ack of an accepted request, before answering.
    /// Test builds only: the end-to-end tests use it to prove a retry after such a crash converges.
    #[cfg(feature = "fault-injection")]
    #[arg(long, env = "GATEWAY_FAULT_ABORT_AFTER_PUBLISH", hide = true)]
    pub fault_abort_after_publish: bool,
}

/// The store's slice: where JetStream is, how the streams are provisioned, how long to wait on it.
#[derive(Debug, Clone, clap::Args)]
pub struct JetStreamSettings {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// How long past an operation's deadline its expiry waits: the largest clock difference
    /// expected between this process, the other replicas and the workers. An operation is never
    /// reported expired before `deadline + grace` by the clock that decides it.
    #[arg(long, env = "GATEWAY_EXPIRY_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub expiry_grace: Duration,
    /// Stream that holds progress reports, webhook delivery states and dead letters.
    #[arg(long, env = "GATEWAY_EVENTS_STREAM", default_value = "GW_EVENTS")]
    pub events_stream: String,
    /// The prefix of the JetStream Object Store buckets for request bodies above a route's
    /// `inline_max`: one bucket per such route, `<prefix>_<route>` (so NATS permissions can give
    /// each route's workers their own bodies and no others'), created at start.
    #[arg(long, env = "GATEWAY_BODIES_BUCKET", default_value = "GW_BODIES")]
    pub bodies_bucket: String,
    /// Replicas of each stream (1 for a single server, 3 for a cluster).
    #[arg(long, env = "GATEWAY_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// Bytes the requests stream may hold (`max_bytes`; -1: only the server's and the account's
    /// storage limits apply). Full, it refuses new requests (discard new): a submit is answered
    /// `507 insufficient-storage`, and nothing accepted is removed to make room. Results and
    /// events follow from accepted requests and get no byte limit of their own.
    #[arg(long, env = "GATEWAY_STREAM_MAX_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    pub stream_max_bytes: i64,
    /// JetStream's duplicate window on the requests stream. Idempotency does not depend on it.
    #[arg(long, env = "GATEWAY_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub duplicate_window: Duration,
    /// The wire contract new operations are accepted under (docs/wire-contract.md): 2 puts the
    /// route in result and progress subjects, so NATS permissions can confine each route's
    /// workers. 1 is the first release's layout: set it while upgrading from that release, until
    /// no replica of it runs (such a replica reads and writes only layout-1 subjects). Operations
    /// of either layout are read and answered whatever this says.
    #[arg(long, env = "GATEWAY_WIRE_CONTRACT", default_value = "2", value_parser = parse_wire_contract)]
    pub wire_contract: handlers::contract::WireContract,
    /// How long to wait for a JetStream ack or read before answering 503.
    #[arg(long, env = "GATEWAY_NATS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub nats_timeout: Duration,
    /// Store requests that arrive together as one JetStream atomic batch each (a refused batch
    /// falls back to one publish per request, so no request's answer depends on another's). For
    /// a nats-server with `sync_interval: always`, where each publish costs an fsync and a batch
    /// costs a few; at the default durability single publishes are faster.
    #[arg(long, env = "GATEWAY_GROUP_COMMIT", default_value_t = false)]
    pub group_commit: bool,
}

/// What one client may take: connections, time to send, head size, concurrent work and waits.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientLimits {
    /// Client connections open at once; more wait in the kernel's accept queue.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Time a new connection has, from accept, to send its first request's head (slowloris, or
    /// a socket that sends nothing); it is closed after. Also the limit on each later head.
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight after an answer (HTTP/1
    /// keep-alive and HTTP/2 alike); it is closed after. Idle connections are also closed at
    /// once when `GATEWAY_MAX_CONNECTIONS` is reached.
    #[arg(long, env = "GATEWAY_KEEP_ALIVE_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    pub keep_alive_timeout: Duration,
    /// Time a client has to send a request's whole body; 408 after. On a route with
    /// `inline_max` (bodies of any size, streamed to the Object Store), the longest pause in the
    /// body instead.
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,
    /// Headers a request may have; more: 431.
    #[arg(long, env = "GATEWAY_MAX_HEADERS", default_value_t = 64)]
    pub max_headers: usize,
    /// Bytes a request's head (request line and headers) may take; more: 431.
    #[arg(long, env = "GATEWAY_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
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
    /// Event streams one tenant may hold open at once; more get 429. Without `[auth]` every
    /// caller is one tenant.
    #[arg(
        long,
        env = "GATEWAY_MAX_EVENT_STREAMS_PER_TENANT",
        default_value_t = 2_500
    )]
    pub max_event_streams_per_tenant: usize,
    /// Waiters (long polls and `Prefer: wait`, on reads and submits) at once; beyond, a read
    /// that asks to wait gets 429, a submit is answered 202 without waiting.
    #[arg(long, env = "GATEWAY_MAX_WAITERS", default_value_t = 10_000)]
    pub max_waiters: usize,
    /// Waiters one tenant may have at once; beyond, as for `GATEWAY_MAX_WAITERS`.
    #[arg(long, env = "GATEWAY_MAX_WAITERS_PER_TENANT", default_value_t = 2_500)]
    pub max_waiters_per_tenant: usize,
    /// Requests a second per tenant (token bucket); more get 429 with `Retry-After`. 0: no limit.
    #[arg(long, env = "GATEWAY_TENANT_RATE", default_value_t = 0)]
    pub tenant_rate: u32,
    /// Operations a tenant may have pending (accepted, not ended, deadline not passed); a new
    /// one beyond gets `429 quota-exceeded`. 0: no limit. `[auth.tenant.<name>] max_pending`
    /// sets a tenant's own. Without `[auth]` every caller is one tenant, so this caps the whole
    /// gateway.
    #[arg(long, env = "GATEWAY_TENANT_MAX_PENDING", default_value_t = 0)]
    pub tenant_max_pending: u64,
    /// Bytes of request and result bodies a tenant may have stored (until their retention
    /// ends), as `1073741824` or `1GiB`; beyond, `429 quota-exceeded`. 0: no limit.
    /// `[auth.tenant.<name>] max_bytes` sets a tenant's own.
    #[arg(long, env = "GATEWAY_TENANT_MAX_BYTES", default_value = "0")]
    pub tenant_max_bytes: ByteSize,
    /// Failed authentications a minute per client address (wrong API keys or tokens); past it,
    /// every request from the address that presents credentials gets 429 until the budget
    /// refills. 0: no limit.
    #[arg(long, env = "GATEWAY_AUTH_FAILURES_PER_MINUTE", default_value_t = 20)]
    pub auth_failures_per_minute: u32,
    /// Burst a tenant may send above its rate (default: the rate).
    #[arg(long, env = "GATEWAY_TENANT_BURST", default_value_t = 0)]
    pub tenant_burst: u32,
    /// Items a batch submit (`POST /batches`) may carry, 1 to 999 (nats-server 2.15.1 takes at
    /// most 1,000 messages in an atomic batch, the batch's record included); more: 400.
    #[arg(long, env = "GATEWAY_MAX_BATCH_ITEMS", default_value_t = 999, value_parser = clap::value_parser!(u16).range(1..=999))]
    pub max_batch_items: u16,
    /// Bytes a batch submit's JSON body may take, as `8388608` or `8MiB`; more: 413.
    #[arg(long, env = "GATEWAY_MAX_BATCH_BYTES", default_value = "8MiB")]
    pub max_batch_bytes: ByteSize,
}

/// The webhooks' slice: who may be called back, how deliveries are signed and retried.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookSettings {
    /// Receivers a client's `Callback-Url` may name (comma-separated URLs): same scheme, host and
    /// port, and a path equal to or under the entry's (`https://hooks.example.com/in` allows
    /// `/in` and `/in/…`). Empty: the header is refused. Routes' own `callback_url` need no entry.
    #[arg(long, env = "GATEWAY_CALLBACK_ALLOW", value_delimiter = ',', value_parser = CallbackRule::parse)]
    pub callback_allow: Vec<CallbackRule>,
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
    /// Let `Callback-Url` (and routes' `callback_url`) reach loopback, link-local, private and
    /// other non-public addresses. Off: the gateway never calls them (SSRF).
    #[arg(long, env = "GATEWAY_CALLBACK_ALLOW_PRIVATE", default_value_t = false)]
    pub callback_allow_private: bool,
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
    // Its value is not shown in `--help`: it may carry a password.
    #[arg(
        long,
        env = "GATEWAY_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// A NATS credentials file (a user JWT and its NKey seed, as `nsc` writes them) to connect
    /// with; `user:password@` or `token@` in the URL are honoured too.
    #[arg(long, env = "GATEWAY_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// The prefix of this process's reply inboxes (`_INBOX` by default). A worker confined by
    /// NATS permissions gets its own (`_INBOX_orders`), so that it may subscribe to its replies
    /// and no one else's.
    #[arg(long, env = "GATEWAY_NATS_INBOX_PREFIX")]
    pub nats_inbox_prefix: Option<String>,
    /// First token of every subject the gateway uses.
    #[arg(long, env = "GATEWAY_SUBJECT_PREFIX", default_value = handlers::contract::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// Stream that holds accepted requests.
    #[arg(long, env = "GATEWAY_REQUESTS_STREAM", default_value = handlers::contract::DEFAULT_REQUESTS_STREAM)]
    pub requests_stream: String,
    /// Stream that holds the results of operations accepted under wire contract 1 (one
    /// terminal record per operation).
    #[arg(long, env = "GATEWAY_RESULTS_STREAM", default_value = handlers::contract::DEFAULT_RESULTS_STREAM)]
    pub results_stream: String,
    /// Stream that holds the results of operations accepted under wire contract 2 (one terminal
    /// record per operation; no per-message TTLs, no roll-ups).
    #[arg(long, env = "GATEWAY_OUTCOMES_STREAM", default_value = handlers::contract::DEFAULT_OUTCOMES_STREAM)]
    pub outcomes_stream: String,
}

impl NatsArgs {
    /// The servers in `nats_url`: comma-separated URLs. (async-nats reads one string as one URL,
    /// so a list must be split before it connects.)
    pub fn server_addrs(&self) -> Vec<String> {
        self.nats_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Connection options that authenticate as these settings say: the credentials file, else
    /// the first URL's `user:password@` (or a lone `token@`), as other NATS clients read a URL.
    /// Hand-written: async-nats 0.51 parses a URL's user info but never sends it.
    ///
    /// Errors: the credentials file cannot be read.
    pub async fn connect_options(
        &self,
        name: &str,
    ) -> Result<async_nats::ConnectOptions, ConfigError> {
        let options = match &self.nats_creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| invalid(format!("GATEWAY_NATS_CREDS {}: {e}", path.display())))?,
            None => {
                let userinfo = self.server_addrs().iter().find_map(|addr| {
                    let url = url::Url::parse(addr).ok()?;
                    let decode = |text| percent_decode_str(text).decode_utf8_lossy().into_owned();
                    let user = decode(url.username());
                    (!user.is_empty()).then(|| (user, url.password().map(decode)))
                });
                let options = async_nats::ConnectOptions::new();
                match userinfo {
                    Some((user, Some(password))) => options.user_and_password(user, password),
                    Some((token, None)) => options.token(token),
                    None => options,
                }
            }
        };
        Ok(match &self.nats_inbox_prefix {
            Some(prefix) => options.custom_inbox_prefix(prefix),
            None => options,
        }
        .name(name))
    }

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

pub mod callback;
mod error;
pub mod routes;
pub mod schema;

pub use error::ConfigError;
use error::invalid;
use percent_encoding::percent_decode_str;

pub use routes::{
    ByteSize, Cadence, RouteConfig, RoutesFile, ScheduleConfig, load_config, load_routes,
    validate_routes,
};

/// Reads `GATEWAY_WIRE_CONTRACT`: a version this release writes (1 or 2).
fn parse_wire_contract(value: &str) -> Result<handlers::contract::WireContract, String> {
    handlers::contract::WireContract::parse(value.trim())
        .filter(|c| *c != handlers::contract::WireContract::V3)
        .ok_or_else(|| format!("{value:?} is not a wire contract this release writes (1 or 2)"))
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

    #[test]
    fn a_url_list_is_split_into_servers() {
        let servers = |url: &str| {
            NatsArgs {
                nats_url: url.to_owned(),
                nats_creds: None,
                nats_inbox_prefix: None,
                subject_prefix: String::new(),
                requests_stream: String::new(),
                results_stream: String::new(),
                outcomes_stream: String::new(),
            }
            .server_addrs()
        };
        assert_eq!(servers("nats://a:1"), ["nats://a:1"]);
        assert_eq!(
            servers("nats://a:1, nats://b:2,,nats://c:3"),
            ["nats://a:1", "nats://b:2", "nats://c:3"]
        );
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
