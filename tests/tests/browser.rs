//! A real headless browser (Debian's chromium, installed by scripts/install-browser) on a page of
//! another origin: with `GATEWAY_CORS_ORIGINS` naming that origin it submits (a preflighted
//! `fetch`), reads `Location` and `Idempotency-Key`, follows the operation's event stream to its
//! terminal event and stops reconnecting, then reads the result by a byte range and revalidates it
//! by its `ETag`; a gateway without the setting is refused by the browser.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use gateway_tests::*;
use tokio::sync::Notify;

/// The page's script: every step's outcome goes back to the page's own server as one report.
const PAGE: &str = r#"<!doctype html><html><body><script>
const gw = "GW_BASE", plain = "PLAIN_BASE";
const report = (data) => fetch("/report", {method: "POST", body: JSON.stringify(data)});
(async () => {
  const data = {};
  try {
    const r = await fetch(gw + "/orders", {
      method: "POST",
      headers: {"content-type": "application/json", "idempotency-key": "\"browser-1\""},
      body: "{\"n\":1}",
    });
    data.status = r.status;
    data.location = r.headers.get("location");
    data.key = r.headers.get("idempotency-key");
    data.events = [];
    data.opens = 0;
    const es = new EventSource(gw + data.location + "/events");
    es.onopen = () => data.opens++;
    for (const name of ["accepted", "progress", "succeeded", "failed", "expired", "cancelled"]) {
      es.addEventListener(name, () => data.events.push(name));
    }
    await new Promise((resolve) => {
      es.onerror = () => { if (es.readyState === EventSource.CLOSED) resolve(); };
    });
    // Long enough for a reconnection, were there one.
    await new Promise((resolve) => setTimeout(resolve, 2000));
    data.closed = es.readyState === EventSource.CLOSED;
    // The result by parts and revalidated: ETag and Content-Range are exposed, Range and the
    // conditional headers allowed.
    const result = gw + data.location + "/result";
    const whole = await fetch(result, {cache: "no-store"});
    data.etag = whole.headers.get("etag");
    const part = await fetch(result, {cache: "no-store", headers: {"range": "bytes=0-1", "if-range": data.etag}});
    data.part = [part.status, part.headers.get("content-range"), (await part.text()).length];
    const again = await fetch(result, {cache: "no-store", headers: {"if-none-match": data.etag}});
    data.revalidated = again.status;
  } catch (e) {
    data.error = String(e);
  }
  try {
    await fetch(plain + "/orders", {method: "POST", headers: {"content-type": "application/json"}, body: "{}"});
    data.plain = "allowed";
  } catch (e) {
    data.plain = "refused";
  }
  await report(data);
})();
</script></body></html>"#;

#[derive(Clone, Default)]
struct Reports {
    last: Arc<Mutex<Option<serde_json::Value>>>,
    arrived: Arc<Notify>,
}

async fn receive(State(reports): State<Reports>, body: String) {
    *reports.last.lock().unwrap() = serde_json::from_str(&body).ok();
    reports.arrived.notify_one();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_submits_and_follows_its_operation() {
    let chromium = std::env::var("CHROMIUM_BIN")
        .expect("CHROMIUM_BIN: run scripts/install-browser (scripts/test does)");
    let page_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", page_listener.local_addr().unwrap());

    let nats = Nats::start().await;
    let gw = TestGateway::builder(TEST_ROUTES)
        .nats(&nats)
        .flags(["--cors-origins", &origin])
        .start()
        .await;
    let plain = TestGateway::builder(TEST_ROUTES).nats(&nats).start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;

    let page = PAGE
        .replace("GW_BASE", &gw.base)
        .replace("PLAIN_BASE", &plain.base);
    let reports = Reports::default();
    let app = axum::Router::new()
        .route("/", get(move || async move { Html(page.clone()) }))
        .route("/report", post(receive))
        .with_state(reports.clone());
    tokio::spawn(async move { axum::serve(page_listener, app).await.unwrap() });

    let profile = tempfile::tempdir().unwrap();
    let mut browser = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{origin}/"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts");
    let arrived = tokio::time::timeout(Duration::from_secs(60), reports.arrived.notified()).await;
    let _ = browser.kill().await;
    arrived.expect("the page reported within a minute");
    let report = reports.last.lock().unwrap().clone().expect("a JSON report");

    assert_eq!(report["error"], serde_json::Value::Null, "{report}");
    assert_eq!(report["status"], 202, "{report}");
    let location = report["location"].as_str().expect("Location is exposed");
    assert!(location.starts_with("/operations/"), "{report}");
    assert_eq!(report["key"], "\"browser-1\"", "Idempotency-Key is exposed");
    let events: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    assert_eq!(events.last(), Some(&"succeeded"), "{report}");
    assert_eq!(
        report["closed"], true,
        "EventSource stopped reconnecting: {report}"
    );
    assert_eq!(
        report["plain"], "refused",
        "no CORS unless configured: {report}"
    );
    let etag = report["etag"].as_str().expect("ETag is exposed");
    assert!(etag.starts_with('"'), "{report}");
    assert_eq!(report["part"][0], 206, "{report}");
    assert!(
        report["part"][1]
            .as_str()
            .is_some_and(|r| r.starts_with("bytes 0-1/")),
        "Content-Range is exposed: {report}"
    );
    assert_eq!(report["part"][2], 2, "{report}");
    assert_eq!(report["revalidated"], 304, "{report}");
    let opens = report["opens"].as_u64().unwrap();
    assert!(opens >= 1, "{report}");
    eprintln!("browser report: {report}");
}
