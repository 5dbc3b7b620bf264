//! The routes file (TOML): each route's method, path, limits and timings, and the `[auth]` table
//! of who may call. Read and validated once at start.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::Method;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::error::{ConfigError, invalid};

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
    /// Largest accepted body: bytes, or a string such as "256KiB" or "1MiB". Without
    /// `inline_max`, at most the NATS server's `max_payload` (the body travels in the message).
    #[serde(default = "defaults::max_body")]
    pub max_body: ByteSize,
    /// Bodies larger than this go to the JetStream Object Store (`GATEWAY_BODIES_BUCKET`),
    /// streamed in chunks, and the request message names them (a claim check, wire contract
    /// 3); then `max_body` may be far larger than `max_payload` (gigabytes). Absent: every body
    /// travels in its message.
    #[serde(default)]
    pub inline_max: Option<ByteSize>,
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
    /// A stateful route: where its workers commit state and decide each operation (the
    /// `handlers` state store). The gateway then ends an operation (cancel, expiry) only through
    /// that store's processed marker, so an outcome can never contradict a commit.
    #[serde(default)]
    pub state: Option<StateStoreConfig>,
    /// A JSON Schema file (relative to the routes file) every body of this route must meet:
    /// checked before anything is written, and declared in the OpenAPI document.
    #[serde(default)]
    pub request_schema: Option<PathBuf>,
    /// The compiled `request_schema`, loaded with the routes file.
    #[serde(skip)]
    pub body_schema: Option<super::schema::BodySchema>,
    /// How the route's workers retry its operations (written into each request, so every worker
    /// follows it); none: as each worker's own settings say. Read from a [`RetryConfig`] and
    /// checked once, when the routes file is read.
    #[serde(default, deserialize_with = "retry_policy")]
    pub retry: Option<handlers::RetryPolicy>,
    /// The longest delayed start a client may ask for (`Delay`, `Not-Before`); none: the route
    /// takes no delayed starts. The retention must outlast it plus the timeout.
    #[serde(default, with = "humantime_serde")]
    pub max_delay: Option<Duration>,
}

/// A route's retry policy as the routes file says it:
/// `retry = { attempts = 5, backoff = ["1s", "10s", "1m"], jitter = 20, retry_on = ["5xx", "429"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryConfig {
    /// Handler attempts, 1 to 100 (a worker's consumer may allow fewer: the smaller counts).
    pub attempts: u32,
    /// The delay after the first failed attempt, the second, ...; the last one repeats.
    #[serde(with = "humantime_serde_list")]
    pub backoff: Vec<Duration>,
    /// Each delay is scaled by a random factor within this many percent (0-100), so that
    /// operations that failed together do not come back together.
    #[serde(default)]
    pub jitter: u8,
    /// Answers retried instead of stored: status codes (`"503"`) or classes (`"5xx"`). Errors
    /// are always retried, permanent ones never.
    #[serde(default)]
    pub retry_on: Vec<String>,
}

/// A route's `retry` table as the policy requests carry, checked.
fn retry_policy<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<handlers::RetryPolicy>, D::Error> {
    Option::<RetryConfig>::deserialize(d)?
        .map(|config| config.policy())
        .transpose()
        .map_err(|e| serde::de::Error::custom(format!("retry: {e}")))
}

impl RetryConfig {
    /// The policy requests carry, checked.
    fn policy(&self) -> Result<handlers::RetryPolicy, handlers::retry::RetryPolicyError> {
        let policy = handlers::RetryPolicy {
            attempts: self.attempts,
            backoff_ms: self
                .backoff
                .iter()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .collect(),
            jitter_percent: self.jitter,
            retry_on: self.retry_on.clone(),
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// `humantime_serde` for a list of durations (the crate reads one at a time).
mod humantime_serde_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<humantime_serde::Serde<Duration>>::deserialize(d).map(|list| {
            list.into_iter()
                .map(humantime_serde::Serde::into_inner)
                .collect()
        })
    }
}

/// A stateful route's state store: the stream and subject prefix its workers'
/// `handlers::StateStore` uses (`<prefix>.done.<operation-id>` is the processed marker).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateStoreConfig {
    pub stream: String,
    pub prefix: String,
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

/// Sizes in settings (`GATEWAY_TENANT_MAX_BYTES=1GiB`) read as in the routes file.
impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Self::try_from(ByteSizeInput::Text(text.to_owned()))
    }
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
            "GiB" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "unknown size unit {other:?}; use B, KiB, MiB or GiB"
                ));
            }
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
    pub auth: Option<AuthConfig>,
    /// Recurring submits.
    #[serde(rename = "schedule", default)]
    pub schedules: Vec<ScheduleConfig>,
}

/// A recurring submit: an ordinary operation on `route` at every tick, fired once per tick
/// across all replicas: the operation's idempotency key is the schedule's name and the tick's
/// time, so the replicas' submits of one tick are one operation.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "ScheduleFields")]
pub struct ScheduleConfig {
    /// 1-64 of a-z 0-9 - _, unique; part of each tick's key (`schedule:<name>:<tick>`).
    pub name: String,
    /// The route whose operation each tick is.
    pub route: String,
    /// When the ticks are: `every`, or `cron` with `time_zone`.
    pub cadence: Cadence,
    /// The request path (default: the route's, which must then have no parameters).
    pub path: Option<String>,
    /// The request body, at most the route's `max_body`.
    pub body: String,
    pub content_type: Option<String>,
    /// The tenant the operations belong to (default `default`).
    pub tenant: String,
}

/// When a schedule's ticks are. Every replica computes the same ticks from it, whatever its own
/// time zone: a tick is an instant, and its key is that instant in UTC.
#[derive(Debug, Clone)]
pub enum Cadence {
    /// `every` apart, aligned to the Unix epoch (`every = "24h"` ticks at 00:00 UTC); at least
    /// 1 s and shorter than the route's retention (a tick's key must outlive the next tick, so
    /// that a late replica's submit is a replay).
    Every(Duration),
    /// The instants at which `cron` (5 fields, or 6 with seconds first; POSIX/Vixie cron with
    /// croner's `L`, `W` and `#`) matches the wall clock in `zone` (an IANA name, default `UTC`).
    /// Across a daylight-saving change a wall time that does not exist runs at the first one
    /// after the gap, and one that happens twice runs once (the first).
    Cron {
        cron: Box<croner::Cron>,
        zone: chrono_tz::Tz,
    },
}

/// A `[[schedule]]` table as written, before its cadence is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFields {
    name: String,
    route: String,
    #[serde(default, with = "humantime_serde")]
    every: Option<Duration>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    body: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default = "default_schedule_tenant")]
    tenant: String,
}

impl TryFrom<ScheduleFields> for ScheduleConfig {
    type Error = String;

    fn try_from(f: ScheduleFields) -> Result<Self, String> {
        let who = format!("schedule {:?}", f.name);
        let cadence = match (f.every, f.cron, f.time_zone) {
            (Some(every), None, None) => Cadence::Every(every),
            (Some(_), None, Some(_)) => {
                return Err(format!(
                    "{who}: time_zone goes with cron; `every` ticks are aligned to the Unix epoch"
                ));
            }
            (None, Some(cron), zone) => {
                let zone = zone.as_deref().unwrap_or("UTC");
                Cadence::Cron {
                    cron: Box::new(
                        croner::parser::CronParser::new()
                            .parse(&cron)
                            .map_err(|e| format!("{who}: cron {cron:?}: {e}"))?,
                    ),
                    zone: zone.parse().map_err(|_| {
                        format!("{who}: time_zone {zone:?} is not an IANA time zone")
                    })?,
                }
            }
            _ => return Err(format!("{who} has exactly one of `every` and `cron`")),
        };
        Ok(Self {
            name: f.name,
            route: f.route,
            cadence,
            path: f.path,
            body: f.body,
            content_type: f.content_type,
            tenant: f.tenant,
        })
    }
}

fn default_schedule_tenant() -> String {
    "default".to_owned()
}

impl ScheduleConfig {
    /// The path each tick calls.
    pub fn path<'a>(&'a self, route: &'a RouteConfig) -> &'a str {
        self.path.as_deref().unwrap_or(&route.path)
    }
}

/// Checks that `name` is 1-64 of a-z, 0-9, '-' and '_' (it becomes a subject token or a key's
/// part) and not in `names` yet, and adds it.
fn unique_name<'a>(
    names: &mut HashSet<&'a str>,
    name: &'a str,
    who: &str,
) -> Result<(), ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(invalid(format!(
            "{who}: a name is 1-64 characters of a-z, 0-9, '-' and '_' (it becomes a subject token)"
        )));
    }
    if !names.insert(name) {
        return Err(invalid(format!("{who} is defined twice")));
    }
    Ok(())
}

/// Checks the schedules against the routes they name.
pub fn validate_schedules(
    schedules: &[ScheduleConfig],
    routes: &[RouteConfig],
) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for s in schedules {
        let who = format!("schedule {:?}", s.name);
        unique_name(&mut names, &s.name, &who)?;
        let Some(route) = routes.iter().find(|r| r.name == s.route) else {
            return Err(invalid(format!("{who}: no route {:?}", s.route)));
        };
        if let Cadence::Every(every) = s.cadence
            && (every < Duration::from_secs(1) || every >= route.retention)
        {
            return Err(invalid(format!(
                "{who}: every ({}) must be at least 1s and shorter than route {:?}'s retention ({})",
                humantime::format_duration(every),
                route.name,
                humantime::format_duration(route.retention)
            )));
        }
        match &s.path {
            None if route.path.contains('{') => {
                return Err(invalid(format!(
                    "{who}: route {:?}'s path has parameters: give the schedule a path",
                    route.name
                )));
            }
            Some(path) if !path.starts_with('/') => {
                return Err(invalid(format!("{who}: path {path:?} must start with '/'")));
            }
            _ => {}
        }
        if s.body.len() > route.max_body.0 {
            return Err(invalid(format!(
                "{who}: body is larger than route {:?}'s max_body",
                route.name
            )));
        }
        if s.tenant.is_empty() {
            return Err(invalid(format!("{who}: tenant is empty")));
        }
    }
    Ok(())
}

/// The longest retention (and so timeout) a route may have.
const MAX_RETENTION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Paths the gateway serves itself; no route may take them.
const RESERVED_PREFIXES: &[&str] = &[
    "/operations",
    "/batches",
    "/livez",
    "/readyz",
    "/openapi.json",
];

/// Reads and validates the routes file: routes, and authentication if it has an `[auth]` table.
pub fn load_config(path: &Path) -> Result<RoutesFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut file: RoutesFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    validate_routes(&file.routes)?;
    validate_schedules(&file.schedules, &file.routes)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for route in &mut file.routes {
        if let Some(schema) = &route.request_schema {
            if matches!(route.method.to_ascii_uppercase().as_str(), "GET" | "DELETE") {
                return Err(invalid(format!(
                    "route {:?}: request_schema on a {} route, which takes no body",
                    route.name, route.method
                )));
            }
            route.body_schema = Some(super::schema::BodySchema::load(&dir.join(schema))?);
        }
    }
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
        unique_name(&mut names, &r.name, &who)?;
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
        if let Some(inline) = r.inline_max {
            if inline.0 > r.max_body.0 {
                return Err(invalid(format!(
                    "{who}: inline_max ({} bytes) must be at most max_body ({} bytes)",
                    inline.0, r.max_body.0
                )));
            }
            // A body in the Object Store is streamed through, never held whole: no schema can
            // be checked on it.
            if r.request_schema.is_some() {
                return Err(invalid(format!(
                    "{who}: a route with inline_max cannot have a request_schema (large bodies are streamed to the Object Store unchecked)"
                )));
            }
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
            super::callback::CallbackUrl::parse(url)
                .map_err(|e| invalid(format!("{who}: callback_url {url:?}: {e}")))?;
        }
        if r.max_body.0 == 0 {
            return Err(invalid(format!("{who}: max_body must be positive")));
        }
        if let Some(delay) = r.max_delay
            && r.retention <= delay + r.timeout
        {
            return Err(invalid(format!(
                "{who}: retention ({}) must be longer than max_delay plus timeout ({}): a delayed \
                 operation's deadline is its start plus the timeout",
                humantime::format_duration(r.retention),
                humantime::format_duration(delay + r.timeout)
            )));
        }
        if let Some(state) = &r.state {
            let token = |t: &str| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if !token(&state.stream) || !state.prefix.split('.').all(token) {
                return Err(invalid(format!(
                    "{who}: state needs a stream name and a subject prefix of letters, digits, '-' and '_' (dots between prefix tokens)"
                )));
            }
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
        self.consumer.clone().unwrap_or_else(|| {
            let prefix = handlers::contract::DEFAULT_CONSUMER_PREFIX;
            format!("{prefix}-{}", self.name)
        })
    }

    /// The method as an `http` type; valid after `validate_routes`.
    pub fn http_method(&self) -> Method {
        Method::from_bytes(self.method.to_ascii_uppercase().as_bytes()).expect("validated method")
    }
}

/// The `[auth]` table of the routes file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// API keys, as SHA-256 digests, each with its tenant.
    #[serde(default, rename = "api_key")]
    pub api_keys: Vec<ApiKeyConfig>,
    /// JWT bearer tokens.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// What each named tenant may do beyond the defaults (`[auth.tenant.<name>]`).
    #[serde(default, rename = "tenant")]
    pub tenants: std::collections::HashMap<String, TenantConfig>,
}

/// One tenant's own settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The receivers this tenant's `Callback-Url` may name, instead of `GATEWAY_CALLBACK_ALLOW`
    /// (same rules): a tenant's operations notify only its own receivers.
    #[serde(default)]
    pub callback_allow: Vec<String>,
    /// Operations this tenant may have pending, instead of `GATEWAY_TENANT_MAX_PENDING` (0: no
    /// limit).
    #[serde(default)]
    pub max_pending: Option<u64>,
    /// Bytes of request and result bodies this tenant may store, instead of
    /// `GATEWAY_TENANT_MAX_BYTES` (0: no limit).
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
}

/// One API key: `sha256` is the lowercase hex SHA-256 of the key (`printf %s KEY | sha256sum`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub tenant: String,
    pub sha256: String,
}

/// How JWTs are verified and mapped to a tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of).
    pub audience: String,
    /// A JWKS file (keys chosen by `kid`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// One PEM public key (RSA or EC), for tokens without a JWKS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Accepted algorithms (default RS256).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// The claim that names the tenant.
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256]
}

fn default_tenant_claim() -> String {
    "tenant".to_owned()
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

    /// A schedule must name a route, tick less often than once a second and more often than the
    /// route's retention (so a tick's key outlives the next tick), and give a path where the
    /// route's has parameters; each refusal names the schedule.
    #[test]
    fn schedules_are_checked_against_their_routes() {
        let check = |schedule: &str| {
            let text = format!(
                "[[route]]\nname = \"r\"\nmethod = \"POST\"\npath = \"/r/{{id}}\"\nretention = \"1h\"\n\
                 [[schedule]]\nname = \"s\"\nroute = \"r\"\n{schedule}"
            );
            let file: RoutesFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
            validate_schedules(&file.schedules, &file.routes)
        };
        assert!(check("every = \"10s\"\npath = \"/r/1\"\n").is_ok());
        assert!(
            check("cron = \"30 2 * * MON-FRI\"\ntime_zone = \"Europe/Berlin\"\npath = \"/r/1\"\n")
                .is_ok()
        );
        for (bad, says) in [
            ("every = \"10s\"\n", "give the schedule a path"),
            ("every = \"1h\"\npath = \"/r/1\"\n", "shorter than route"),
            ("every = \"500ms\"\npath = \"/r/1\"\n", "at least 1s"),
            ("every = \"10s\"\npath = \"r/1\"\n", "must start with '/'"),
            ("cron = \"* * *\"\npath = \"/r/1\"\n", "cron \"* * *\""),
            (
                "cron = \"0 2 * * *\"\ntime_zone = \"Mars/Olympus\"\npath = \"/r/1\"\n",
                "not an IANA time zone",
            ),
            (
                "every = \"10s\"\ncron = \"0 2 * * *\"\npath = \"/r/1\"\n",
                "exactly one of",
            ),
            ("path = \"/r/1\"\n", "exactly one of"),
            (
                "every = \"10s\"\ntime_zone = \"UTC\"\npath = \"/r/1\"\n",
                "time_zone goes with cron",
            ),
        ] {
            let error = check(bad).unwrap_err().to_string();
            assert!(
                error.contains("schedule \"s\"") && error.contains(says),
                "{error}"
            );
        }
        let text = "[[route]]\nname = \"r\"\nmethod = \"POST\"\npath = \"/r\"\n\
                    [[schedule]]\nname = \"s\"\nroute = \"other\"\nevery = \"10s\"\n";
        let file: RoutesFile = toml::from_str(text).unwrap();
        let error = validate_schedules(&file.schedules, &file.routes)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no route \"other\""), "{error}");
    }

    /// A schema file is found next to the routes file, compiled at start, and anything wrong
    /// with it stops the start naming the file.
    #[test]
    fn request_schemas_are_loaded_beside_the_routes_file() {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes.toml");
        let write = |schema: &str, method: &str| {
            std::fs::create_dir_all(dir.path().join("schemas")).unwrap();
            std::fs::write(dir.path().join("schemas/body.json"), schema).unwrap();
            std::fs::write(
                &routes,
                format!(
                    "[[route]]\nname = \"orders\"\nmethod = \"{method}\"\npath = \"/orders\"\nrequest_schema = \"schemas/body.json\"\n"
                ),
            )
            .unwrap();
        };
        write(r#"{"type": "object"}"#, "POST");
        let loaded = load_routes(&routes).unwrap();
        let schema = loaded[0].body_schema.as_ref().expect("compiled");
        assert!(schema.check(b"{}").is_ok() && schema.check(b"[]").is_err());
        for (schema, method, says) in [
            ("{not json", "POST", "not JSON"),
            (r#"{"type": 7}"#, "POST", "not a usable JSON Schema"),
            (r#"{"type": "object"}"#, "GET", "takes no body"),
        ] {
            write(schema, method);
            let error = load_routes(&routes).unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
        write("{}", "POST");
        std::fs::remove_file(dir.path().join("schemas/body.json")).unwrap();
        let error = load_routes(&routes).unwrap_err().to_string();
        assert!(error.contains("body.json"), "{error}");
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
}
