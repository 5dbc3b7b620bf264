//! The client side of the HTTP contract, as the tests speak it: one client configuration, JSON
//! bodies, and polling an operation until it is terminal.

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
        let terminal = status != "pending";
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

/// Asserts a status sequence never leaves a terminal state (monotonic status, oracle 3c.6).
pub fn assert_monotonic(statuses: &[String]) {
    if let Some(first_terminal) = statuses.iter().position(|s| s != "pending") {
        let terminal = &statuses[first_terminal];
        assert!(
            statuses[first_terminal..].iter().all(|s| s == terminal),
            "status regressed: {statuses:?}"
        );
    }
}
