//! Signed completion webhooks against a real nats-server and a real local HTTP receiver: retried
//! after a 500, signatures that verify, a stable webhook-id, delivery after a gateway restart, a
//! dead letter after the last attempt, and the allow-list.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use gateway_tests::*;
use handlers::contract::{DEFAULT_OUTCOMES_STREAM, ResultRecord, Subjects};
use handlers::jetstream::{ResultWrite, publish_result};
use handlers::{Request, Response};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ROUTES: &str = "[[route]]\nname = \"orders\"\nmethod = \"POST\"\npath = \"/orders\"\n";

/// A local webhook receiver: answers with the queued statuses (then 200), records every request.
#[derive(Clone, Default)]
struct Receiver {
    statuses: Arc<Mutex<Vec<u16>>>,
    received: Arc<Mutex<Vec<(HeaderMap, String)>>>,
}

impl Receiver {
    async fn start(statuses: &[u16]) -> (Self, String) {
        let receiver = Self {
            statuses: Arc::new(Mutex::new(statuses.iter().rev().copied().collect())),
            ..Default::default()
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, base)
    }

    fn set(&self, statuses: &[u16]) {
        *self.statuses.lock().unwrap() = statuses.iter().rev().copied().collect();
    }

    fn received(&self) -> Vec<(HeaderMap, String)> {
        self.received.lock().unwrap().clone()
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    r.received.lock().unwrap().push((headers, body));
    let status = r.statuses.lock().unwrap().pop().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

/// A gateway that may call `receiver` back, with this many attempts per webhook.
fn webhook_gateway(receiver: &str, attempts: &str) -> GatewayBuilder {
    TestGateway::builder(ROUTES)
        .flag("--callback-allow")
        .flag(format!("{receiver}/"))
        // The receiver is on loopback.
        .flag("--callback-allow-private")
        .flags(["--webhook-secret", SECRET, "--webhook-attempts", attempts])
        .flags(["--webhook-backoff", "300ms"])
}

async fn submit_with_callback(base: &str, key: &str, callback: &str) -> reqwest::Response {
    submit(base, "/orders", key)
        .header("callback-url", callback)
        .body("{}")
        .send()
        .await
}

/// The worker: 201 with a fixed body (the webhook tests look at the status only).
fn made() -> impl handlers::Handler {
    |_r: Request| async move { Ok(Response::text(201, "made")) }
}

/// Verifies a delivery's Standard Webhooks signature and returns its webhook-id.
fn verified_id(headers: &HeaderMap, body: &str) -> String {
    let id = headers["webhook-id"].to_str().unwrap().to_owned();
    let timestamp: i64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let secret = gateway::operations::webhooks::secret_bytes(SECRET).unwrap();
    let expected = gateway::operations::webhooks::sign(&secret, &id, timestamp, body.as_bytes());
    assert_eq!(
        headers["webhook-signature"].to_str().unwrap(),
        expected,
        "signature verifies"
    );
    id
}

async fn operation(gw: &InProcessGateway, id: &str) -> serde_json::Value {
    json(get_operation(&gw.base, id).await).await
}

/// The receiver fails once, then accepts: two deliveries with the same webhook-id and valid
/// signatures; the status resource shows `delivered` after 2 attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_is_signed_retried_and_its_state_shown() {
    let (receiver, base) = Receiver::start(&[500]).await;
    let TestGateway { nats, gw } = webhook_gateway(&base, "5").start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", made()).await;

    let r = submit_with_callback(&gw.base, "hook-1", &format!("{base}/hook")).await;
    let id = id_of(r).await;
    let delivered = eventually("delivered", Duration::from_secs(20), || async {
        let op = operation(&gw, &id).await;
        (op["callback"]["state"] == "delivered").then_some(op)
    })
    .await;
    assert_eq!(delivered["callback"]["attempts"], 2);
    assert_eq!(delivered["callback"]["last_status"], 200);

    let got = receiver.received();
    assert_eq!(got.len(), 2, "one failed attempt, one delivery");
    for (headers, body) in &got {
        assert_eq!(verified_id(headers, body), id, "stable webhook-id");
        let note: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(note["type"], "operation.completed");
        assert_eq!(note["data"]["id"], id);
        assert_eq!(note["data"]["status"], "succeeded");
        assert_eq!(note["data"]["result"]["status_code"], 201);
    }
}

/// A record written under another route's result subject for this operation (what a worker
/// confined to that route can still do) is no outcome: nobody is notified and the operation stays
/// pending; the record in the slot its request names is what the webhook carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_outside_the_operations_slot_notifies_nobody() {
    let (receiver, base) = Receiver::start(&[]).await;
    let TestGateway { nats, gw } = webhook_gateway(&base, "3").start().await;
    let id = id_of(submit_with_callback(&gw.base, "stray-1", &format!("{base}/hook")).await).await;
    let js = nats.jetstream().await;
    let write = |route: &'static str, status: u16| {
        let (js, id) = (js.clone(), id.clone());
        async move {
            let record = ResultRecord::reply(status, None, bytes::Bytes::from_static(b"x"));
            let subject = Subjects::default().slots(route, &id).reply_subject;
            publish_result(&js, DEFAULT_OUTCOMES_STREAM, &subject, &id, &record, None)
                .await
                .unwrap()
        }
    };
    assert_eq!(write("intruder", 299).await, ResultWrite::Stored);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(receiver.received().is_empty(), "the stray record notified");
    assert_eq!(operation(&gw, &id).await["status"], "pending");

    assert_eq!(write("orders", 202).await, ResultWrite::Stored);
    let delivered = eventually("delivered", Duration::from_secs(10), || async {
        let got = receiver.received();
        (!got.is_empty()).then_some(got)
    })
    .await;
    let note: serde_json::Value = serde_json::from_str(&delivered[0].1).unwrap();
    assert_eq!(note["data"]["result"]["status_code"], 202, "{note}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1);
}

/// A Callback-Url outside the allow-list (or not http) is a 400 problem and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_outside_the_allow_list_are_refused() {
    let (_receiver, base) = Receiver::start(&[]).await;
    let TestGateway { nats, gw } = webhook_gateway(&base, "5").start().await;
    for bad in [
        "http://169.254.169.254/latest",
        "ftp://127.0.0.1/x",
        "not a url",
        "http://127.0.0.1:1/hook",
    ] {
        let r = submit_with_callback(&gw.base, "hook-bad", bad).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert!(
            json(r).await["type"]
                .as_str()
                .unwrap()
                .ends_with("callback-url-not-allowed")
        );
    }
    let js = nats.jetstream().await;
    assert_eq!(stream_messages(&js, "GW_REQUESTS").await, 0);
}

/// The receiver is down while the first gateway runs; that gateway stops; a new gateway process
/// delivers the webhook (the durable consumer kept it), with the same webhook-id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_is_delivered_after_a_gateway_restart() {
    let (receiver, base) = Receiver::start(&[503, 503, 503, 503, 503, 503, 503, 503]).await;
    let TestGateway { nats, gw: first } = webhook_gateway(&base, "20").start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", made()).await;
    let r = submit_with_callback(&first.base, "hook-restart", &format!("{base}/hook")).await;
    let id = id_of(r).await;
    eventually("a failed attempt", Duration::from_secs(20), || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;
    first.stop().await;
    receiver.set(&[]);
    let second = webhook_gateway(&base, "20").nats(&nats).start().await;
    let op = eventually(
        "delivered by the new gateway",
        Duration::from_secs(60),
        || async {
            let op = operation(&second, &id).await;
            (op["callback"]["state"] == "delivered").then_some(op)
        },
    )
    .await;
    assert!(op["callback"]["attempts"].as_i64().unwrap() >= 2);
    let got = receiver.received();
    let (headers, body) = got.last().unwrap();
    assert_eq!(verified_id(headers, body), id);
}

/// Every attempt fails: after the last one the notification is dead-lettered on
/// `gw.dlq.webhook.<id>`, and the status resource shows `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeliverable_webhook_is_dead_lettered() {
    let (receiver, base) = Receiver::start(&[500, 500, 500]).await;
    let TestGateway { nats, gw } = webhook_gateway(&base, "2").start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", made()).await;
    let r = submit_with_callback(&gw.base, "hook-dlq", &format!("{base}/hook")).await;
    let id = id_of(r).await;
    let op = eventually("failed", Duration::from_secs(20), || async {
        let op = operation(&gw, &id).await;
        (op["callback"]["state"] == "failed").then_some(op)
    })
    .await;
    assert_eq!(op["callback"]["attempts"], 2);
    assert_eq!(receiver.received().len(), 2);
    let dead = handlers::jetstream::last_on_subject(
        &nats.client().await,
        "GW_EVENTS",
        &Subjects::default().webhook_dead_letter(&id),
    )
    .await
    .unwrap()
    .expect("dead letter stored");
    let body = String::from_utf8(dead.payload.to_vec()).unwrap();
    assert!(body.contains(&id));
    assert_eq!(
        handlers::contract::header_str(&dead.headers, "webhook-id"),
        Some(id.as_str())
    );
}

/// A notification never outlives its operation. X's reply comes late, so its result (kept for
/// the retention from when it was written) outlives its request; X's receiver keeps failing. X's
/// retention ends and its key is reused by Y, with another receiver. X's next attempt finds Y's
/// request under the key: it must neither post X's result labelled as Y nor reach Y's receiver (it
/// is abandoned, counted and logged), and Y's own notification is Y's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_retry_after_its_key_was_reused_is_not_sent_as_the_new_operation() {
    let (failing, failing_base) = Receiver::start(&[500; 10]).await;
    let (fresh, fresh_base) = Receiver::start(&[]).await;
    let routes = "[[route]]\nname = \"orders\"\nmethod = \"POST\"\npath = \"/orders\"\n\
                  retention = \"4s\"\ntimeout = \"3900ms\"\n";
    let TestGateway { nats, gw } = TestGateway::builder(routes)
        .flags(["--callback-allow", &format!("{failing_base}/")])
        .flags(["--callback-allow", &format!("{fresh_base}/")])
        .flag("--callback-allow-private")
        .flags(["--webhook-secret", SECRET, "--webhook-attempts", "5"])
        // X's first retry comes after its request's retention, before its result's.
        .flags(["--webhook-backoff", "2500ms"])
        .start()
        .await;
    let late = |_r: Request| async move {
        tokio::time::sleep(Duration::from_millis(3500)).await;
        Ok(Response::text(201, "made"))
    };
    let _worker = TestWorker::start(&nats, worker_config(), "orders", late).await;

    let x = id_of(submit_with_callback(&gw.base, "reused", &format!("{failing_base}/hook")).await)
        .await;
    eventually("X's first attempt", Duration::from_secs(10), || async {
        (!failing.received().is_empty()).then_some(())
    })
    .await;
    let y = eventually(
        "the key is reused after X's retention",
        Duration::from_secs(15),
        || async {
            let r = submit_with_callback(&gw.base, "reused", &format!("{fresh_base}/hook")).await;
            (r.status() == 202 && r.headers().get("idempotent-replayed").is_none()).then_some(r)
        },
    )
    .await;
    let y = id_of(y).await;
    assert_ne!(x, y);
    let y_done = eventually("Y succeeds", Duration::from_secs(15), || async {
        let op = operation(&gw, &y).await;
        (op["status"] == "succeeded").then_some(op)
    })
    .await;
    eventually("Y's own notification", Duration::from_secs(15), || async {
        (!fresh.received().is_empty()).then_some(())
    })
    .await;
    // Any retry of X was due within its result's retention, long gone by now.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let to_fresh = fresh.received();
    assert_eq!(to_fresh.len(), 1, "one notification to Y's receiver: Y's");
    let (headers, body) = &to_fresh[0];
    assert_eq!(verified_id(headers, body), y);
    let note: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(note["data"]["id"], y.as_str());
    assert_eq!(
        note["data"]["updated_at"], y_done["updated_at"],
        "Y's result, not X's labelled as Y"
    );
    for (headers, body) in &failing.received() {
        assert_eq!(verified_id(headers, body), x);
        let note: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            note["data"]["id"],
            x.as_str(),
            "never labelled as another operation"
        );
    }
}
