//! The client side of the HTTP contract, as the tests speak it: one client configuration, a
//! submission with its idempotency key, the operation id of a `202`, problem answers, JSON
//! bodies, and polling an operation until it is terminal. Each of these was written again in
//! several test files; here they are written once, so that a test reads as the exchange it checks.

use std::time::Duration;

/// An HTTP client without connection reuse surprises between tests.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// A JSON body of a response.
pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("JSON body")
}

/// `GET {base}{path}`: any resource of the gateway.
pub async fn get_path(base: &str, path: &str) -> reqwest::Response {
    get(&format!("{base}{path}")).await
}

/// `GET {base}/operations/{id}`: the status resource.
pub async fn get_operation(base: &str, id: &str) -> reqwest::Response {
    get(&format!("{base}/operations/{id}")).await
}

/// `GET {base}/operations/{id}/result`: the result, or the answer that there is none (yet).
pub async fn get_result(base: &str, id: &str) -> reqwest::Response {
    get(&format!("{base}/operations/{id}/result")).await
}

async fn get(url: &str) -> reqwest::Response {
    http().get(url).send().await.expect("GET")
}

/// Polls an operation until its status is terminal; returns every status observed, in order.
pub async fn poll_until_terminal(base: &str, id: &str, timeout: Duration) -> Vec<String> {
    let http = http();
    let url = format!("{base}/operations/{id}");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let r = http.get(&url).send().await.expect("GET operation");
        assert_eq!(r.status(), 200, "operation {id} must exist once accepted");
        let status = json(r).await["status"].as_str().unwrap().to_owned();
        let terminal = !is_open(&status);
        seen.push(status);
        if terminal {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} still pending after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a status is not yet terminal: `scheduled` (a delayed start not due) or `pending`.
pub fn is_open(status: &str) -> bool {
    matches!(status, "scheduled" | "pending")
}

/// Asserts a status sequence never goes back: `scheduled` only before `pending`, and never
/// leaves a terminal state.
pub fn assert_monotonic(statuses: &[String]) {
    if let Some(pending) = statuses.iter().position(|s| s != "scheduled") {
        assert!(
            !statuses[pending..].iter().any(|s| s == "scheduled"),
            "status went back to scheduled: {statuses:?}"
        );
    }
    if let Some(first_terminal) = statuses.iter().position(|s| !is_open(s)) {
        let terminal = &statuses[first_terminal];
        assert!(
            statuses[first_terminal..].iter().all(|s| s == terminal),
            "status regressed: {statuses:?}"
        );
    }
}

/// An `Idempotency-Key` header value: the key as a quoted string (`"k-1"`).
pub fn quoted(key: &str) -> String {
    format!("\"{key}\"")
}

/// `POST {base}{path}` with `Idempotency-Key: "<key>"`: a submission, ready for a body and more
/// headers, then [`Submit::send`] or [`Submit::accepted`].
pub fn submit(base: &str, path: &str, key: &str) -> Submit {
    Submit(
        http()
            .post(format!("{base}{path}"))
            .header("idempotency-key", quoted(key)),
    )
}

/// A submission being built: see [`submit`].
#[must_use = "a submission is sent by `send` or `accepted`"]
pub struct Submit(reqwest::RequestBuilder);

impl Submit {
    /// The request body.
    pub fn body(self, body: impl Into<reqwest::Body>) -> Self {
        Self(self.0.body(body))
    }

    /// A JSON request body, with its content type.
    pub fn json_body(self, body: impl Into<reqwest::Body>) -> Self {
        Self(self.0.header("content-type", "application/json").body(body))
    }

    /// One more header (`prefer`, `callback-url`, ...).
    pub fn header(self, name: &str, value: &str) -> Self {
        Self(self.0.header(name, value))
    }

    /// Sends it; the gateway's answer, whatever its status.
    pub async fn send(self) -> reqwest::Response {
        self.0.send().await.expect("submit")
    }

    /// Sends it, asserts that it was accepted (`202`) and returns the operation id.
    pub async fn accepted(self) -> String {
        id_of(self.send().await).await
    }
}

/// The operation id of an accepted submission; asserts the `202`.
pub async fn id_of(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 202, "accepted");
    json(response).await["id"].as_str().unwrap().to_owned()
}

/// The `Location` header of an answer (`/operations/<id>`).
pub fn location(response: &reqwest::Response) -> String {
    response.headers()["location"].to_str().unwrap().to_owned()
}

/// Asserts a problem answer: this status, `application/problem+json`, and a problem type that
/// ends with `slug`. Returns the problem, for what else the test checks in it.
pub async fn assert_problem(
    response: reqwest::Response,
    status: u16,
    slug: &str,
) -> serde_json::Value {
    let url = response.url().clone();
    assert_eq!(response.status(), status, "{url}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{url}"
    );
    let problem = json(response).await;
    assert!(
        problem["type"].as_str().unwrap().ends_with(slug),
        "{url}: {slug}: {problem}"
    );
    problem
}
