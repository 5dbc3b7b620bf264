//! Who may do what: API keys and JWTs mapped to tenants, tenants isolating keys and operations,
//! per-tenant rate limits, slow and oversized clients cut off, and callbacks that cannot reach
//! private addresses (SSRF). Every refusal is a problem+json answer with nothing published.

use std::time::Duration;

use gateway_tests::{
    Nats, TestGateway, TestWorker, assert_problem, echo, get_operation, http, id_of, json,
    poll_until_terminal, stream_messages, submit, worker_config,
};
use handlers::contract::DEFAULT_REQUESTS_STREAM;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ACME_KEY: &str = "k-acme-3f7c1e";
const GLOBEX_KEY: &str = "k-globex-9b20d4";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "nats-http-gateway";

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn sha256_hex(key: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(key.as_bytes()))
}

fn routes_with_auth() -> String {
    format!(
        r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"

[[route]]
name = "ping"
method = "POST"
path = "/ping"
public = true

[auth]
[[auth.api_key]]
tenant = "acme"
sha256 = "{acme}"

[[auth.api_key]]
tenant = "globex"
sha256 = "{globex}"

[auth.jwt]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"
algorithms = ["EdDSA"]
"#,
        acme = sha256_hex(ACME_KEY),
        globex = sha256_hex(GLOBEX_KEY),
        jwks = fixture("jwks.json"),
    )
}

fn token(tenant: &str, audience: &str, expires_in: i64) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": audience, "sub": "someone", "tenant": tenant,
        "iat": now, "exp": now + expires_in,
    });
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("test-key-1".to_owned());
    let pem = std::fs::read(fixture("jwt-test-private.pem")).unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap()
}

/// Credentials map to tenants; a tenant's operations are invisible to others (404, as if they did
/// not exist); the same key in two tenants makes two operations; anonymous callers use public
/// routes only and see only anonymous operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_map_to_tenants_and_tenants_are_isolated() {
    let TestGateway { nats, gw } = TestGateway::builder(&routes_with_auth()).start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    let js = nats.jetstream().await;
    let http = http();
    let post = |key: Option<&str>, bearer: Option<String>| {
        let mut request = http
            .post(gw.url("/orders"))
            .header("idempotency-key", "\"same-key\"")
            .body("{}");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    // Refused before anything is written.
    let anonymous = post(None, None).await.unwrap();
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_problem(anonymous, 401, "unauthorized").await;
    assert_problem(
        post(Some("k-nobody"), None).await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    assert_problem(
        post(None, Some(token("acme", "someone-else", 60)))
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    assert_problem(
        post(None, Some(token("acme", AUDIENCE, -120)))
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    assert_problem(
        post(None, Some(token("public", AUDIENCE, 60)))
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 0);

    // The same key in two tenants: two operations.
    let acme = post(Some(ACME_KEY), None).await.unwrap();
    let acme_id = id_of(acme).await;
    let globex = post(Some(GLOBEX_KEY), None).await.unwrap();
    let globex_id = id_of(globex).await;
    assert_ne!(acme_id, globex_id);
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 2);
    // A JWT for acme is acme: its retry with the key is a replay of acme's operation.
    let replay = post(None, Some(token("acme", AUDIENCE, 60))).await.unwrap();
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(json(replay).await["id"], acme_id.as_str());

    // Another tenant's operation does not exist, whatever is asked of it.
    let as_tenant = |key: &'static str, method: reqwest::Method, path: String| {
        http.request(method, gw.url(&path))
            .header("x-api-key", key)
            .send()
    };
    for path in [
        format!("/operations/{acme_id}"),
        format!("/operations/{acme_id}/result"),
        format!("/operations/{acme_id}/events"),
    ] {
        let r = as_tenant(GLOBEX_KEY, reqwest::Method::GET, path.clone())
            .await
            .unwrap();
        assert_problem(r, 404, "operation-not-found").await;
        let own = as_tenant(ACME_KEY, reqwest::Method::GET, path)
            .await
            .unwrap();
        assert!(own.status().is_success(), "{}", own.status());
    }
    let cancel = as_tenant(
        GLOBEX_KEY,
        reqwest::Method::DELETE,
        format!("/operations/{acme_id}"),
    )
    .await
    .unwrap();
    assert_problem(cancel, 404, "operation-not-found").await;

    // Public route: anonymous works, and anonymous operations are only anonymous callers'.
    let ping = http.post(gw.url("/ping")).body("hi").send().await.unwrap();
    let ping_id = id_of(ping).await;
    let read = get_operation(&gw.base, &ping_id).await;
    assert_eq!(read.status(), 200);
    let by_acme = as_tenant(
        ACME_KEY,
        reqwest::Method::GET,
        format!("/operations/{ping_id}"),
    )
    .await
    .unwrap();
    assert_problem(by_acme, 404, "operation-not-found").await;
    let anonymous_read_of_acme = get_operation(&gw.base, &acme_id).await;
    assert_problem(anonymous_read_of_acme, 404, "operation-not-found").await;
    // Anonymous callers share one key space: one who reuses another's key with another body is
    // refused without being handed the first operation's id (which would let it read and cancel).
    let keyed_ping = |body: &'static str| {
        http.post(gw.url("/ping"))
            .header("idempotency-key", "\"order-1\"")
            .body(body)
            .send()
    };
    id_of(keyed_ping("first caller").await.unwrap()).await;
    let reused = keyed_ping("second caller").await.unwrap();
    let problem = assert_problem(reused, 422, "idempotency-key-reused").await;
    assert!(problem.get("operation_id").is_none(), "{problem}");
    // An authenticated tenant's own callers are told which operation holds the key.
    let acme_reuse = http
        .post(gw.url("/orders"))
        .header("x-api-key", ACME_KEY)
        .header("idempotency-key", "\"same-key\"")
        .body("another body")
        .send()
        .await
        .unwrap();
    let problem = assert_problem(acme_reuse, 422, "idempotency-key-reused").await;
    assert_eq!(problem["operation_id"], acme_id.as_str());
    // Health and the document need no credentials.
    for path in ["/livez", "/readyz", "/openapi.json"] {
        assert_eq!(http.get(gw.url(path)).send().await.unwrap().status(), 200);
    }
    gw.stop().await;
}

/// Authentication says little and cannot be raced: a token not valid yet (`nbf` an hour ahead) is
/// refused (before: accepted); every refusal reads the same, whichever check failed (before: the
/// detail named it); a guarded path answers 401 before 405 to an anonymous caller (before: 405
/// told it the path exists); past the failure budget, an address's requests with credentials get
/// 429, valid ones included, while anonymous calls of public routes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_says_little_and_throttles_guessing() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(&routes_with_auth())
        .flags(["--auth-failures-per-minute", "5"])
        .start()
        .await;
    let http = http();
    let claims = |nbf_in: i64, audience: &str| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": audience, "sub": "someone", "tenant": "acme",
            "iat": now, "nbf": now + nbf_in, "exp": now + 7200,
        });
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("test-key-1".to_owned());
        let pem = std::fs::read(fixture("jwt-test-private.pem")).unwrap();
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap()
    };
    let with_token = |token: String| {
        http.post(gw.url("/orders"))
            .bearer_auth(token)
            .body("{}")
            .send()
    };
    let mut details = std::collections::HashSet::new();
    for refused in [
        claims(3600, AUDIENCE),
        claims(0, "someone-else"),
        token("acme", AUDIENCE, -120),
        format!("{}x", token("acme", AUDIENCE, 60)),
    ] {
        let problem = assert_problem(with_token(refused).await.unwrap(), 401, "unauthorized").await;
        details.insert(problem["detail"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        details.len(),
        1,
        "one answer for every failed check: {details:?}"
    );
    assert_eq!(with_token(claims(0, AUDIENCE)).await.unwrap().status(), 202);

    let delete = |path: &str, key: Option<&str>| {
        let mut request = http.delete(gw.url(path));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        request.send()
    };
    let anonymous_delete = delete("/orders", None).await.unwrap();
    assert!(
        !anonymous_delete.headers().contains_key("allow"),
        "a 401 says nothing of the path's methods"
    );
    assert_problem(anonymous_delete, 401, "unauthorized").await;
    assert_problem(
        delete("/orders", Some(ACME_KEY)).await.unwrap(),
        405,
        "method-not-allowed",
    )
    .await;
    assert_problem(
        delete("/ping", None).await.unwrap(),
        405,
        "method-not-allowed",
    )
    .await;

    // Four bad tokens above; one more failure uses the budget of five.
    let guess = |key: &'static str| {
        http.post(gw.url("/orders"))
            .header("x-api-key", key)
            .body("{}")
            .send()
    };
    assert_problem(guess("guess-1").await.unwrap(), 401, "unauthorized").await;
    let throttled = guess("guess-2").await.unwrap();
    assert!(throttled.headers().contains_key("retry-after"));
    assert_problem(throttled, 429, "rate-limited").await;
    assert_problem(guess(ACME_KEY).await.unwrap(), 429, "rate-limited").await;
    let anonymous = http.post(gw.url("/ping")).body("hi").send().await.unwrap();
    assert_eq!(anonymous.status(), 202);
}

/// Waits and event streams are capped in all and per tenant: one tenant holding its share of
/// long polls or streams gets `429` for more, while another tenant is still served; a submit that
/// asks to wait beyond the cap is still accepted, answered `202` without waiting. (Before, waits
/// were unbounded and one tenant could take every event-stream slot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_and_event_streams_are_capped_per_tenant() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(&routes_with_auth())
        .flags(["--max-waiters", "4", "--max-waiters-per-tenant", "2"])
        .flags([
            "--max-event-streams",
            "4",
            "--max-event-streams-per-tenant",
            "2",
        ])
        .start()
        .await;
    let http = http();
    let submit_as = |key: &'static str, idempotency: &'static str| {
        http.post(gw.url("/orders"))
            .header("x-api-key", key)
            .header("idempotency-key", idempotency)
            .body("{}")
            .send()
    };
    let acme_op = id_of(submit_as(ACME_KEY, "a").await.unwrap()).await;
    let globex_op = id_of(submit_as(GLOBEX_KEY, "g").await.unwrap()).await;
    let wait_on = |key: &'static str, id: &str, secs: u32| {
        http.get(gw.url(&format!("/operations/{id}")))
            .header("x-api-key", key)
            .header("prefer", format!("wait={secs}"))
            .send()
    };
    let stream_of = |key: &'static str, id: &str| {
        http.get(gw.url(&format!("/operations/{id}/events")))
            .header("x-api-key", key)
            .send()
    };

    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(wait_on(ACME_KEY, &acme_op, 20)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = wait_on(ACME_KEY, &acme_op, 1).await.unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    assert_problem(refused, 429, "too-many-waiters").await;
    assert_eq!(
        wait_on(GLOBEX_KEY, &globex_op, 1).await.unwrap().status(),
        200
    );
    let waited_submit = http
        .post(gw.url("/orders"))
        .header("x-api-key", ACME_KEY)
        .header("prefer", "wait=10")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(waited_submit.status(), 202, "accepted, not waited on");

    let mut streams = Vec::new();
    for _ in 0..2 {
        let open = stream_of(ACME_KEY, &acme_op).await.unwrap();
        assert_eq!(open.status(), 200);
        streams.push(open);
    }
    assert_problem(
        stream_of(ACME_KEY, &acme_op).await.unwrap(),
        429,
        "too-many-streams",
    )
    .await;
    assert_eq!(
        stream_of(GLOBEX_KEY, &globex_op).await.unwrap().status(),
        200
    );
    for wait in held {
        wait.abort();
    }
}

/// A tenant with its own callback receivers (`[auth.tenant.<name>] callback_allow`) notifies only
/// those: one tenant naming another's receiver is refused, with no global allow-list at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_operations_notify_only_its_own_receivers() {
    let routes = format!(
        "{}\n[auth.tenant.acme]\ncallback_allow = [\"http://127.0.0.1:9001/\"]\n\
         [auth.tenant.globex]\ncallback_allow = [\"http://127.0.0.1:9002/\"]\n",
        routes_with_auth()
    );
    let TestGateway { nats, gw } = TestGateway::builder(&routes)
        .flags(["--webhook-secret", "s3cret", "--callback-allow-private"])
        .start()
        .await;
    let http = http();
    let post = |key: &'static str, idempotency: &'static str, callback: &'static str| {
        http.post(gw.url("/orders"))
            .header("x-api-key", key)
            .header("idempotency-key", idempotency)
            .header("callback-url", callback)
            .body("{}")
            .send()
    };
    let own = post(ACME_KEY, "a1", "http://127.0.0.1:9001/hook")
        .await
        .unwrap();
    assert_eq!(own.status(), 202);
    let other = post(ACME_KEY, "a2", "http://127.0.0.1:9002/hook")
        .await
        .unwrap();
    assert_problem(other, 400, "callback-url-not-allowed").await;
    let globex = post(GLOBEX_KEY, "g1", "http://127.0.0.1:9002/hook")
        .await
        .unwrap();
    assert_eq!(globex.status(), 202);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        2
    );
}

/// Each tenant has its own token bucket: over it, 429 with `Retry-After` and nothing published;
/// another tenant is not slowed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_per_tenant() {
    let TestGateway { nats, gw } = TestGateway::builder(&routes_with_auth())
        .flags(["--tenant-rate", "1", "--tenant-burst", "2"])
        .start()
        .await;
    let js = nats.jetstream().await;
    let http = http();
    let post = |key: &'static str, n: usize| {
        http.post(gw.url("/orders"))
            .header("x-api-key", key)
            .body(format!("{{\"n\":{n}}}"))
            .send()
    };
    assert_eq!(post(ACME_KEY, 1).await.unwrap().status(), 202);
    assert_eq!(post(ACME_KEY, 2).await.unwrap().status(), 202);
    let limited = post(ACME_KEY, 3).await.unwrap();
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_problem(limited, 429, "rate-limited").await;
    assert_eq!(post(GLOBEX_KEY, 4).await.unwrap().status(), 202);
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        post(ACME_KEY, 5).await.unwrap().status(),
        202,
        "the bucket refills"
    );
    gw.stop().await;
}

const ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
"#;

/// Per-tenant quotas, agreed by every replica: past its pending quota a tenant's new key gets
/// `429 quota-exceeded` (its accepted keys still replay), a second replica started later refuses
/// too (it derives the counts from the streams), the room comes back as operations end, and the
/// bytes quota counts request and result bodies. Nothing refused is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_hold_across_replicas() {
    let quotas = ["--tenant-max-pending", "2", "--tenant-max-bytes", "1000"];
    let TestGateway { nats, gw: a } = TestGateway::builder(ROUTES).flags(quotas).start().await;
    let body = |n: usize| format!("{{\"pad\":\"{}\"}}", "x".repeat(n - 10));
    let post =
        |base: &str, key: &'static str, n: usize| submit(base, "/orders", key).body(body(n)).send();
    assert_eq!(post(&a.base, "q-1", 100).await.status(), 202);
    assert_eq!(post(&a.base, "q-2", 100).await.status(), 202);
    let refused = post(&a.base, "q-3", 100).await;
    assert!(refused.headers().contains_key("retry-after"));
    let problem = assert_problem(refused, 429, "quota-exceeded").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("2 operations pending"),
        "{problem}"
    );
    let replayed = post(&a.base, "q-1", 100).await;
    assert_eq!(replayed.status(), 202, "an accepted key is never refused");
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");

    let b = TestGateway::builder(ROUTES)
        .flags(quotas)
        .nats(&nats)
        .start()
        .await;
    assert_problem(post(&b.base, "q-3", 100).await, 429, "quota-exceeded").await;
    drop(b);

    let ids = [
        id_of(post(&a.base, "q-1", 100).await).await,
        id_of(post(&a.base, "q-2", 100).await).await,
    ];
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    for id in &ids {
        poll_until_terminal(&a.base, id, Duration::from_secs(10)).await;
    }
    // A replica started now reads what is stored, and is ready only once it has: two requests
    // and their two replies, 400 bytes. 650 more would pass 1000 (the replies count).
    let c = TestGateway::builder(ROUTES)
        .flags(quotas)
        .nats(&nats)
        .start()
        .await;
    let too_big = post(&c.base, "q-3", 650).await;
    let problem = assert_problem(too_big, 429, "quota-exceeded").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("400 bytes"),
        "{problem}"
    );
    // Nothing is pending any more: room for a new operation.
    assert_eq!(post(&c.base, "q-3", 100).await.status(), 202);
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        3,
        "only the accepted requests were written"
    );
}

async fn read_all(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    // Generous: on a loaded 2-core CI machine a connection's turn can come late.
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway ends the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Slowloris heads are cut off, slow bodies get 408, too many or too large headers get 431;
/// nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_clients_are_cut_off() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--header-read-timeout", "1s", "--body-read-timeout", "1s"])
        .flags(["--max-headers", "20", "--max-header-bytes", "8192"])
        .flags(["--max-connections", "2"])
        .start()
        .await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let js = nats.jetstream().await;

    // A head that never ends: the connection is closed.
    let mut slow_head = TcpStream::connect(&addr).await.unwrap();
    slow_head
        .write_all(b"POST /orders HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = read_all(&mut slow_head).await;
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(9));

    // A body that never ends: 408 problem.
    let mut slow_body = TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(b"POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let answer = read_all(&mut slow_body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("body-timeout"), "{answer}");

    // Too many headers, and too large a head: 431 problem; far beyond the caps, hyper's own 431.
    let http = http();
    let mut many = http.post(gw.url("/orders")).body("{}");
    for i in 0..30 {
        many = many.header(format!("x-h{i}"), "v");
    }
    assert_problem(many.send().await.unwrap(), 431, "headers-too-large").await;
    let large = |size: usize| {
        http.post(gw.url("/orders"))
            .header("x-large", "v".repeat(size))
            .body("{}")
            .send()
    };
    assert_problem(large(10_000).await.unwrap(), 431, "headers-too-large").await;
    assert_eq!(large(40_000).await.unwrap().status(), 431);

    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 0);
    gw.stop().await;
}

/// Idle connections cannot hold the `GATEWAY_MAX_CONNECTIONS` cap: with two silent sockets
/// holding both slots (and a head deadline of 30 s), a third client is served within seconds,
/// because a client waiting for a slot closes the idle ones; busy connections are not touched.
/// (Before, it waited for the deadline or for a socket to close.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_make_room_at_the_cap() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--max-connections", "2", "--header-read-timeout", "30s"])
        .start()
        .await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut first = TcpStream::connect(&addr).await.unwrap();
    let _second = TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /livez HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut answer))
        .await
        .expect("served long before the 30 s head deadline")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("200 OK"), "{answer}");
    assert_eq!(
        read_all(&mut first).await,
        "",
        "the idle connection was closed"
    );
}

/// Asks `GET /livez` on a new connection to `addr`, then waits (at most `within`) until the
/// gateway closes the connection: how long after the answer that was.
async fn idle_after_one_answer(addr: &str, within: Duration) -> Duration {
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /livez HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let answered = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(within, kept.read_to_end(&mut rest))
        .await
        .expect("the idle keep-alive connection is closed")
        .unwrap();
    answered.elapsed()
}

/// A keep-alive timeout shorter than the head's: an idle connection closes that long after its
/// answer, not when the head deadline from accept would have closed it (20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_keep_alive_closes_before_the_head_deadline() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--header-read-timeout", "20s", "--keep-alive-timeout", "1s"])
        .start()
        .await;
    let addr = gw.base.trim_start_matches("http://");
    let idle = idle_after_one_answer(addr, Duration::from_secs(15)).await;
    assert!(idle >= Duration::from_secs(1), "{idle:?}");
}

/// Connections that hold a slot without a request in flight are closed: a socket that sends
/// nothing, or only part of a head, or only the HTTP/2 preface, by the head deadline counted from
/// accept; a keep-alive connection after its last answer, by the keep-alive timeout. A long poll
/// outlasting both is not idleness. (Before, the silent sockets stayed open for good and, at the
/// cap, nobody else was served.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_from_accept() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--header-read-timeout", "3s", "--keep-alive-timeout", "2s"])
        .start()
        .await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let connect = || TcpStream::connect(addr.clone());

    let started = std::time::Instant::now();
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..8 {
        silent.push(connect().await.unwrap());
    }
    let mut partial = connect().await.unwrap();
    partial
        .write_all(b"GET /livez HTTP/1.1\r\nhost:")
        .await
        .unwrap();
    let mut preface = connect().await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    for (what, stream) in silent.iter_mut().map(|s| ("a silent socket", s)).chain([
        ("a partial head", &mut partial),
        ("a bare HTTP/2 preface", &mut preface),
    ]) {
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "{what} is closed");
    }
    let closed_after = started.elapsed();
    assert!(closed_after >= Duration::from_secs(3), "{closed_after:?}");
    eprintln!("10 idle sockets closed {closed_after:?} after accept (head deadline 3 s)");

    // Keep-alive: one answer, then silence.
    let idle = idle_after_one_answer(&addr, Duration::from_secs(20)).await;
    assert!(idle >= Duration::from_secs(2), "{idle:?}");
    eprintln!("an idle keep-alive connection closed {idle:?} after its answer (timeout 2 s)");

    // A long poll of 5 s, longer than both limits, ends with its answer.
    let id = submit(&gw.base, "/orders", "held")
        .body("{}")
        .accepted()
        .await;
    let polled = std::time::Instant::now();
    let read = http()
        .get(gw.url(&format!("/operations/{id}")))
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(json(read).await["status"], "pending");
    assert!(polled.elapsed() >= Duration::from_secs(5));
}

/// Clients that send their bodies slowly hold only their own connections: with 4 requests in
/// flight allowed and 40 submits each stuck after 1 of 100 body bytes, other clients' submits and
/// status reads are served, not shed. (Before, each stuck submit held an in-flight slot and
/// everyone got `503 overloaded` until the body deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_cannot_take_the_capacity_others_need() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--max-in-flight", "4", "--body-read-timeout", "20s"])
        .start()
        .await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut stuck = Vec::new();
    for _ in 0..40 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n{")
            .await
            .unwrap();
        stuck.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = std::time::Instant::now();
        let id = submit(&gw.base, "/orders", &format!("fast-{i}"))
            .body("{}")
            .accepted()
            .await;
        assert_eq!(get_operation(&gw.base, &id).await.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("with 40 stuck bodies: 20 submits and reads served, slowest pair {slowest:?}");
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        20,
        "only the complete requests were accepted"
    );
    drop(stuck);
}

/// HTTP semantics a careless or hostile client trips on, each answered by the RFC and with
/// nothing published: HEAD on a route of another method is `405` with `Allow` (HEAD is safe: before,
/// it created an operation); `Transfer-Encoding` with `Content-Length` is read by the former and
/// the connection closed after the answer (RFC 9112 6.3, request smuggling): a request
/// piggybacked behind it is not served; an answer given before the body was read
/// says `Connection: close` (before, the connection just closed); a `Content-Type` that is not
/// one media type is `400` (before, a non-ASCII one was silently dropped from the fingerprint and
/// the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_framing_and_method_semantics_are_strict() {
    let routes =
        format!("{ROUTES}\n[[route]]\nname = \"report\"\nmethod = \"GET\"\npath = \"/report\"\n");
    let TestGateway { nats, gw } = TestGateway::builder(&routes)
        .flags(["--body-read-timeout", "2s"])
        .start()
        .await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let exchange = |raw: Vec<u8>| {
        let addr = addr.clone();
        async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            stream.write_all(&raw).await.unwrap();
            read_all(&mut stream).await
        }
    };

    let head = http().head(gw.url("/report")).send().await.unwrap();
    assert_eq!(head.status(), 405);
    assert_eq!(head.headers()["allow"], "GET");

    let smuggled = exchange(
        b"POST /orders HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\nGET /livez HTTP/1.1\r\nhost: gw\r\n\r\n".to_vec(),
    )
    .await;
    assert!(smuggled.starts_with("HTTP/1.1 202"), "{smuggled}");
    assert!(
        smuggled.to_ascii_lowercase().contains("connection: close"),
        "{smuggled}"
    );
    assert_eq!(
        smuggled.matches("HTTP/1.1").count(),
        1,
        "the piggybacked request is not served"
    );

    let early =
        exchange(b"POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-length: 2000000\r\n\r\n{".to_vec())
            .await;
    assert!(early.starts_with("HTTP/1.1 413"), "{early}");
    assert!(
        early.to_ascii_lowercase().contains("connection: close"),
        "{early}"
    );

    for content_type in [
        &b"text/\xe9t\xe9"[..],
        b"not a media type",
        b"text/plain; charset",
    ] {
        let mut raw =
            b"POST /orders HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-type: ".to_vec();
        raw.extend_from_slice(content_type);
        raw.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\n{}");
        let answer = exchange(raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("bad-content-type"), "{answer}");
    }

    // A body read to its end keeps the connection: two requests on one.
    let kept = exchange(
        b"POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\nidempotency-key: \"k\"\r\n\r\n{}GET /livez HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(kept.matches("HTTP/1.1 ").count(), 2, "{kept}");
    assert!(kept.starts_with("HTTP/1.1 202"), "{kept}");

    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        2,
        "only the two complete, well-formed requests were accepted"
    );
}

/// POSTs `{}` to `url` with this `Callback-Url`, expects `400 callback-url-not-allowed`, and
/// returns the problem's detail.
async fn refused_callback(url: &str, callback: &str) -> String {
    let r = http()
        .post(url)
        .header("callback-url", callback)
        .body("{}")
        .send()
        .await
        .unwrap();
    let problem = assert_problem(r, 400, "callback-url-not-allowed").await;
    problem["detail"].as_str().unwrap().to_owned()
}

/// A `Callback-Url` that leads to a loopback, private, link-local or unspecified address is refused
/// (400) even when its prefix is allowed, unless private destinations are allowed explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_cannot_reach_private_addresses() {
    let nats = Nats::start().await;
    let private = [
        "http://127.0.0.1:8080/hook",
        "http://localhost:8080/hook",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.5/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://100.64.0.1/hook",
        "http://[fd00::1]/hook",
        "http://[64:ff9b::a00:1]/hook",
        "http://192.0.0.170/hook",
    ];
    // Every one of them on the allow-list: the address check alone refuses them.
    let allow = private.join(",");
    let gw = TestGateway::builder(ROUTES)
        .nats(&nats)
        .flags(["--callback-allow", &allow, "--webhook-secret", "s3cret"])
        .start()
        .await;
    let js = nats.jetstream().await;
    let http = http();
    for url in private {
        let detail = refused_callback(&gw.url("/orders"), url).await;
        assert!(
            detail.contains("not public") && !detail.contains("127.0.0.1"),
            "the refusal names the rule, not where a name leads: {detail}"
        );
    }
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 0);
    gw.stop().await;

    // Allowed explicitly (a webhook receiver on the same host, say): accepted.
    let gw = TestGateway::builder(ROUTES)
        .nats(&nats)
        .flags([
            "--callback-allow",
            "http://127.0.0.1:9/",
            "--webhook-secret",
            "s3cret",
        ])
        .flag("--callback-allow-private")
        .start()
        .await;
    let r = http
        .post(gw.url("/orders"))
        .header("callback-url", "http://127.0.0.1:9/hook")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(stream_messages(&js, DEFAULT_REQUESTS_STREAM).await, 1);
    gw.stop().await;
}

/// The allow-list compares parsed URLs, not strings: with `http://hooks.example.com/in` allowed,
/// userinfo that hides another host, another port, a longer host, a sibling path and a dot
/// segment are all refused, each saying which rule failed; nothing is published. (Before, the
/// raw prefix match accepted the first three and sent the signed webhook to 1.1.1.1:6379.) A
/// route with its own `callback_url` refuses a client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_are_compared_parsed_not_as_strings() {
    let routes = format!(
        "{ROUTES}\n[[route]]\nname = \"audited\"\nmethod = \"POST\"\npath = \"/audited\"\n\
         callback_url = \"https://audit.example.com/in\"\n"
    );
    let TestGateway { nats, gw } = TestGateway::builder(&routes)
        .flags(["--callback-allow", "http://hooks.example.com/in"])
        .flags(["--webhook-secret", "s3cret"])
        .start()
        .await;
    for (url, rule) in [
        ("http://hooks.example.com@1.1.1.1:6379/in", "userinfo"),
        ("http://user:pw@hooks.example.com/in", "userinfo"),
        ("http://hooks.example.com:6379/in", "no allowed receiver"),
        (
            "http://hooks.example.com.evil.net/in",
            "no allowed receiver",
        ),
        ("http://hooks.example.comevil/in", "no allowed receiver"),
        ("http://hooks.example.com/inside", "no allowed receiver"),
        (
            "http://hooks.example.com/in/../admin",
            "no allowed receiver",
        ),
        ("https://hooks.example.com/in", "no allowed receiver"),
        ("gopher://hooks.example.com/in", "only http and https"),
    ] {
        let detail = refused_callback(&gw.url("/orders"), url).await;
        assert!(detail.contains(rule), "{url}: {detail}");
    }
    let detail = refused_callback(&gw.url("/audited"), "http://hooks.example.com/in").await;
    assert!(detail.contains("its own receiver"), "{detail}");
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        0
    );
}
