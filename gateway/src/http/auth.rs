//! Who is calling: API keys and JWT bearer tokens, each mapped to a tenant; and how fast each
//! tenant may call (a token bucket per tenant).
//!
//! Configured in the `[auth]` table of the routes file. API keys are stored as SHA-256 digests
//! (hex), never in clear; a presented key is hashed and compared with every stored digest in
//! constant time (`subtle`), so neither the comparison nor the lookup order says how close a
//! guess came. JWTs are verified with `jsonwebtoken` (signature, `exp`/`nbf`, issuer, audience)
//! against keys from a JWKS file (chosen by `kid`) or one static key, and the tenant is a claim.
//!
//! With no `[auth]` table every caller is the `default` tenant, as before. With one, routes need
//! credentials unless marked `public = true`; anonymous callers (of public routes, and of
//! `/operations/…`) are the `public` tenant, so they can only ever see anonymous operations.
//! Tenants scope idempotency keys and operations (see `idempotency::key_token`); another tenant's
//! operation answers 404, exactly like one that does not exist.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};

use crate::config::callback::CallbackRule;
use crate::config::routes::{AuthConfig, JwtConfig};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The tenant every request belongs to until authentication maps callers to tenants. It is part of
/// every key's scope already, so adding tenants changes no stored data.
pub const DEFAULT_TENANT: &str = "default";

/// The tenant of anonymous callers when authentication is configured.
pub const PUBLIC_TENANT: &str = "public";

/// The caller's tenant, set by `identify` (a route layer) on every route but health and the
/// document; handlers take it as an extractor.
#[derive(Debug, Clone)]
pub struct Tenant(pub Arc<str>);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Tenant>()
            .cloned()
            .expect("identify runs before every route that takes a tenant"))
    }
}

/// The header that carries an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Why the auth configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("api_key for tenant {0:?}: sha256 must be 64 lowercase hex digits")]
    BadDigest(String),
    #[error("tenant names must be 1-64 characters of [A-Za-z0-9_-], not \"public\": {0:?}")]
    BadTenant(String),
    #[error("[auth.jwt] needs exactly one of jwks_file and key_file")]
    JwtKeySource,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("[auth.tenant.{tenant}] callback_allow {entry:?}: {detail}")]
    BadCallback {
        tenant: String,
        entry: String,
        detail: String,
    },
}

/// Why a request's credentials were refused (all answer 401). The text a client sees says only
/// *that* they are not valid: which check failed (signature, `exp`, `nbf`, audience, issuer,
/// `kid`) would tell a forger what to fix. [`AuthError::reason`] is for the log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("credentials are required (an X-API-Key header or an Authorization: Bearer token)")]
    Missing,
    #[error("the credentials are not valid")]
    BadApiKey,
    #[error("the credentials are not valid")]
    BadToken(String),
}

impl AuthError {
    /// Why the credentials were refused, for the log.
    pub fn reason(&self) -> &str {
        match self {
            AuthError::Missing => "no credentials",
            AuthError::BadApiKey => "unknown API key",
            AuthError::BadToken(reason) => reason,
        }
    }

    /// Whether the caller presented credentials that were wrong (a guess that counts against
    /// [`AuthFailures`]), rather than none.
    pub fn is_failed_attempt(&self) -> bool {
        !matches!(self, AuthError::Missing)
    }
}

/// The credentials checker built from [`AuthConfig`].
pub struct Authenticator {
    keys: Vec<([u8; 32], String)>,
    jwt: Option<JwtVerifier>,
    /// Tenants' own callback receivers.
    callback_allow: HashMap<String, Arc<[CallbackRule]>>,
}

struct JwtVerifier {
    validation: Validation,
    keys: JwtKeys,
    tenant_claim: String,
}

enum JwtKeys {
    Set(Vec<(Option<String>, DecodingKey)>),
    Static(DecodingKey),
}

/// A tenant name a credential may map to: not the anonymous tenant, and usable anywhere.
fn valid_tenant(tenant: &str) -> bool {
    tenant != PUBLIC_TENANT
        && (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Authenticator {
    /// Checks the configuration and loads the key files.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let mut keys = Vec::new();
        for key in &config.api_keys {
            if !valid_tenant(&key.tenant) {
                return Err(AuthConfigError::BadTenant(key.tenant.clone()));
            }
            let digest = data_encoding::HEXLOWER
                .decode(key.sha256.as_bytes())
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| AuthConfigError::BadDigest(key.tenant.clone()))?;
            keys.push((digest, key.tenant.clone()));
        }
        let jwt = config.jwt.as_ref().map(JwtVerifier::new).transpose()?;
        let mut callback_allow = HashMap::new();
        for (tenant, settings) in &config.tenants {
            if !valid_tenant(tenant) {
                return Err(AuthConfigError::BadTenant(tenant.clone()));
            }
            let rules = settings
                .callback_allow
                .iter()
                .map(|entry| {
                    CallbackRule::parse(entry).map_err(|e| AuthConfigError::BadCallback {
                        tenant: tenant.clone(),
                        entry: entry.clone(),
                        detail: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if !rules.is_empty() {
                callback_allow.insert(tenant.clone(), rules.into());
            }
        }
        Ok(Self {
            keys,
            jwt,
            callback_allow,
        })
    }

    /// The receivers `tenant`'s callbacks may name, when it has its own list
    /// (`[auth.tenant.<name>] callback_allow`); else `GATEWAY_CALLBACK_ALLOW` applies.
    pub fn callback_allow(&self, tenant: &str) -> Option<Arc<[CallbackRule]>> {
        self.callback_allow.get(tenant).cloned()
    }

    /// Whether some tenant has its own callback receivers (so webhooks are possible).
    pub fn any_callback_allow(&self) -> bool {
        !self.callback_allow.is_empty()
    }

    /// The caller's tenant: `Ok(None)` when the request carries no credentials.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<Option<String>, AuthError> {
        if let Some(key) = headers.get(API_KEY_HEADER) {
            return self.api_key_tenant(key.as_bytes()).map(Some);
        }
        let Some(authorization) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let token = authorization
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| AuthError::BadToken("expected `Bearer <token>`".to_owned()))?;
        match &self.jwt {
            Some(jwt) => jwt.tenant(token).map(Some),
            None => Err(AuthError::BadToken(
                "bearer tokens are not configured".to_owned(),
            )),
        }
    }

    fn api_key_tenant(&self, key: &[u8]) -> Result<String, AuthError> {
        let presented: [u8; 32] = Sha256::digest(key).into();
        // Every stored digest is compared, whatever matches, in constant time each.
        let mut found: Option<&String> = None;
        for (digest, tenant) in &self.keys {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(tenant);
            }
        }
        found.cloned().ok_or(AuthError::BadApiKey)
    }
}

impl JwtVerifier {
    fn new(config: &JwtConfig) -> Result<Self, AuthConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| AuthConfigError::Read {
                path: path.clone(),
                source,
            })
        };
        let bad = |path: &PathBuf, detail: String| AuthConfigError::BadKey {
            path: path.clone(),
            detail,
        };
        let keys = match (&config.jwks_file, &config.key_file) {
            (Some(path), None) => {
                let set: JwkSet =
                    serde_json::from_slice(&read(path)?).map_err(|e| bad(path, e.to_string()))?;
                let keys = set
                    .keys
                    .iter()
                    .map(|jwk| {
                        let key =
                            DecodingKey::from_jwk(jwk).map_err(|e| bad(path, e.to_string()))?;
                        Ok((jwk.common.key_id.clone(), key))
                    })
                    .collect::<Result<_, AuthConfigError>>()?;
                JwtKeys::Set(keys)
            }
            (None, Some(path)) => {
                let pem = read(path)?;
                let key = DecodingKey::from_rsa_pem(&pem)
                    .or_else(|_| DecodingKey::from_ec_pem(&pem))
                    .or_else(|_| DecodingKey::from_ed_pem(&pem))
                    .map_err(|e| bad(path, e.to_string()))?;
                JwtKeys::Static(key)
            }
            _ => return Err(AuthConfigError::JwtKeySource),
        };
        let mut validation = Validation::new(config.algorithms[0]);
        validation.algorithms = config.algorithms.clone();
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        // A token not valid yet is not valid (RFC 7519 section 4.1.5); the default leeway of
        // 60 s allows for clock skew, as for `exp`.
        validation.validate_nbf = true;
        Ok(Self {
            validation,
            keys,
            tenant_claim: config.tenant_claim.clone(),
        })
    }

    fn tenant(&self, token: &str) -> Result<String, AuthError> {
        let bad = |e: jsonwebtoken::errors::Error| AuthError::BadToken(e.to_string());
        let key = match &self.keys {
            JwtKeys::Static(key) => key,
            JwtKeys::Set(keys) => {
                let kid = jsonwebtoken::decode_header(token).map_err(bad)?.kid;
                keys.iter()
                    .find(|(id, _)| kid.is_none() || *id == kid)
                    .map(|(_, key)| key)
                    .ok_or_else(|| AuthError::BadToken("no key with this kid".to_owned()))?
            }
        };
        let claims =
            jsonwebtoken::decode::<serde_json::Value>(token, key, &self.validation).map_err(bad)?;
        let tenant = claims.claims[&self.tenant_claim]
            .as_str()
            .filter(|t| valid_tenant(t))
            .ok_or_else(|| {
                AuthError::BadToken(format!(
                    "claim {:?} names no valid tenant",
                    self.tenant_claim
                ))
            })?;
        Ok(tenant.to_owned())
    }
}

/// Failed authentications per client address: past `per_minute` (with as large a burst), every
/// request from that address that presents credentials is refused with `429` until the bucket
/// refills, valid credentials included, so that guessing keys or tokens gains nothing by speed
/// (OWASP API2:2023, Broken Authentication). Requests without credentials are not counted.
///
/// An address is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64, so its
/// addresses are one budget). Behind a proxy or a NAT, every client shares the proxy's address
/// and so its budget: raise the limit, or set 0, there.
#[derive(Clone)]
pub struct AuthFailures {
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    blocked: Arc<Mutex<HashMap<IpAddr, Instant>>>,
    recorded: Arc<std::sync::atomic::AtomicU64>,
}

/// Every this many failures, addresses whose budget is full again and blocks that ended are
/// forgotten, so that memory follows the addresses failing now, not all that ever failed.
const FORGET_EVERY: u64 = 1024;

/// The budget an address draws on: itself (IPv4, or the IPv4 inside an IPv4-mapped IPv6 address)
/// or its IPv6 /64.
fn budget_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

impl AuthFailures {
    /// `per_minute` failures per address; 0 turns the throttle off.
    pub fn new(per_minute: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute)
            .map(|rate| Arc::new(RateLimiter::keyed(Quota::per_minute(rate))));
        Self {
            limiter,
            blocked: Arc::default(),
            recorded: Arc::default(),
        }
    }

    /// `Err(wait)` while `ip` is blocked.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.limiter.is_none() {
            return Ok(());
        }
        let blocked = self.blocked.lock().expect("never poisoned");
        match blocked.get(&budget_of(ip)) {
            Some(until) if *until > Instant::now() => Err(*until - Instant::now()),
            _ => Ok(()),
        }
    }

    /// Counts a failed attempt from `ip`; `Err(wait)` when it used up the address's budget.
    pub fn record(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let ip = budget_of(ip);
        let now = Instant::now();
        let recorded = self
            .recorded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if recorded % FORGET_EVERY == FORGET_EVERY - 1 {
            limiter.retain_recent();
            let mut blocked = self.blocked.lock().expect("never poisoned");
            blocked.retain(|_, until| *until > now);
        }
        let Err(not_until) = limiter.check_key(&ip) else {
            return Ok(());
        };
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        self.blocked
            .lock()
            .expect("never poisoned")
            .insert(ip, now + wait);
        Err(wait)
    }
}

/// Per-tenant token buckets.
#[derive(Clone)]
pub struct RateLimits {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl RateLimits {
    /// `per_second` requests a second per tenant, bursts of `burst`; 0 turns limiting off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        Self { limiter }
    }

    /// `Ok` if the tenant may make a request now, else how long until it may.
    pub fn check(&self, tenant: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&tenant.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::routes::ApiKeyConfig;

    fn hex_sha256(key: &str) -> String {
        data_encoding::HEXLOWER.encode(&Sha256::digest(key.as_bytes()))
    }

    #[test]
    fn api_keys_map_to_their_tenant_and_unknown_keys_are_refused() {
        let auth = Authenticator::new(&AuthConfig {
            api_keys: vec![
                ApiKeyConfig {
                    tenant: "acme".into(),
                    sha256: hex_sha256("k-acme"),
                },
                ApiKeyConfig {
                    tenant: "globex".into(),
                    sha256: hex_sha256("k-globex"),
                },
            ],
            jwt: None,
            tenants: HashMap::new(),
        })
        .unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(auth.tenant(&headers), Ok(None));
        headers.insert(API_KEY_HEADER, "k-globex".parse().unwrap());
        assert_eq!(auth.tenant(&headers), Ok(Some("globex".to_owned())));
        headers.insert(API_KEY_HEADER, "k-acmE".parse().unwrap());
        assert_eq!(auth.tenant(&headers), Err(AuthError::BadApiKey));
    }

    #[test]
    fn digests_and_tenants_are_checked_at_start() {
        let config = |tenant: &str, sha256: &str| AuthConfig {
            api_keys: vec![ApiKeyConfig {
                tenant: tenant.into(),
                sha256: sha256.into(),
            }],
            jwt: None,
            tenants: HashMap::new(),
        };
        assert!(Authenticator::new(&config("acme", "abc")).is_err());
        assert!(Authenticator::new(&config("a.b", &hex_sha256("k"))).is_err());
        assert!(Authenticator::new(&config("acme", &hex_sha256("k"))).is_ok());
        // A tenant's own callback receivers are checked like GATEWAY_CALLBACK_ALLOW.
        let mut with_receivers = config("acme", &hex_sha256("k"));
        let receivers = |entry: &str| crate::config::routes::TenantConfig {
            callback_allow: vec![entry.to_owned()],
            ..Default::default()
        };
        with_receivers
            .tenants
            .insert("acme".into(), receivers("http://u@hooks.example/"));
        assert!(matches!(
            Authenticator::new(&with_receivers),
            Err(AuthConfigError::BadCallback { .. })
        ));
        with_receivers
            .tenants
            .insert("acme".into(), receivers("https://hooks.example/acme"));
        let auth = Authenticator::new(&with_receivers).unwrap();
        assert!(auth.callback_allow("acme").is_some());
        assert!(auth.callback_allow("globex").is_none());
    }

    #[test]
    fn each_tenant_has_its_own_bucket() {
        let limits = RateLimits::new(1, 2);
        assert!(limits.check("a").is_ok());
        assert!(limits.check("a").is_ok());
        let wait = limits.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limits.check("b").is_ok(), "another tenant is not limited");
        assert!(
            RateLimits::new(0, 0).check("a").is_ok(),
            "0 turns limits off"
        );
    }

    /// The addresses of one IPv6 /64 share one budget; other addresses have their own.
    #[test]
    fn failures_count_per_address_and_per_ipv6_64() {
        let failures = AuthFailures::new(2);
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(failures.record(ip("2001:db8:1:2::1")).is_ok());
        assert!(failures.record(ip("2001:db8:1:2::ffff")).is_ok());
        assert!(
            failures.record(ip("2001:db8:1:2:abcd::9")).is_err(),
            "same /64"
        );
        assert!(failures.check(ip("2001:db8:1:2::77")).is_err());
        assert!(failures.check(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        assert!(failures.record(ip("192.0.2.7")).is_ok());
        assert!(failures.check(ip("::ffff:192.0.2.7")).is_ok());
        assert!(failures.record(ip("::ffff:192.0.2.7")).is_ok());
        assert!(
            failures.record(ip("192.0.2.7")).is_err(),
            "mapped and plain IPv4 are one"
        );
    }
}
