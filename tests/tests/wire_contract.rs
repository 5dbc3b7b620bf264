//! The wire contract's layouts against a real nats-server: route-named result subjects let NATS
//! permissions confine each route's worker (deploy/nats/accounts.conf, run as shipped), and
//! operations accepted under contract 1 (an upgrade's first step) are answered and ended where
//! their requests say, by gateways of either setting.

use std::time::Duration;

use bytes::Bytes;
use gateway_tests::*;
use handlers::contract::{
    DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM, DEFAULT_RESULTS_STREAM, ResultRecord,
    Subjects, header, header_str,
};
use handlers::jetstream::{last_matching, last_on_subject, publish_result};
use handlers::{Request, Response, WorkerConfig};

const ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
max_body = "8MiB"
inline_max = "64KiB"

[[route]]
name = "invoices"
method = "POST"
path = "/invoices"
max_body = "8MiB"
inline_max = "64KiB"
"#;

const PASSWORDS: &str = r#"
GATEWAY_PASSWORD: "g@te:w/y secret"
ORDERS_WORKER_PASSWORD: "orders-secret"
INVOICES_WORKER_PASSWORD: "invoices-secret"
"#;

/// The route's worker settings with the consumer name the accounts file allows.
fn confined_config() -> WorkerConfig {
    WorkerConfig {
        consumer_prefix: handlers::contract::DEFAULT_CONSUMER_PREFIX.to_owned(),
        ..worker_config()
    }
}

/// A JetStream context logged in as `user`, with the inbox prefix the accounts file gives it.
async fn login(
    nats: &Nats,
    user: &str,
    password: &str,
    inbox: &str,
) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user.to_owned(), password.to_owned())
        .custom_inbox_prefix(inbox)
        .connect(nats.url())
        .await
        .expect("worker logs in");
    async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client)
}

/// nats-server with deploy/nats/accounts.conf as shipped, a gateway logged in as `gateway`, and
/// the `orders` worker's JetStream context (its user, its inbox prefix).
async fn confined() -> (Nats, InProcessGateway, async_nats::jetstream::Context) {
    let accounts = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/nats/accounts.conf"
    ))
    .unwrap();
    let nats = Nats::start_with_config(&format!("{PASSWORDS}\n{accounts}")).await;
    let gw = TestGateway::builder(ROUTES)
        // Percent-encoded in the URL, as URL user info must be.
        .nats_url(nats.url_as("gateway", "g%40te%3Aw%2Fy%20secret"))
        .start()
        .await;
    let orders_js = login(&nats, "orders-worker", "orders-secret", "_INBOX_orders").await;
    (nats, gw, orders_js)
}

fn answer(text: &'static str) -> impl handlers::Handler {
    move |_: Request| async move { Ok(Response::text(200, text)) }
}

async fn status_of(base: &str, id: &str) -> String {
    json(get_operation(base, id).await).await["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// deploy/nats/accounts.conf as shipped: the `orders` worker completes `orders` operations and is
/// refused everything of `invoices` (its consumer, its result subjects, contract 1's results
/// stream); a record it writes under its own route for an `invoices` operation is not that
/// operation's outcome; on its own route's subjects the stream refuses the headers that would
/// reach further (a roll-up purging every route's results, a TTL removing a result early); the
/// `invoices` worker then ends its operation, and the `orders` result is still there.
#[tokio::test]
async fn a_worker_is_confined_to_its_route_by_nats_permissions() {
    let (nats, gw, orders_js) = confined().await;
    let _orders = TestWorker::start_on(orders_js.clone(), confined_config(), |w| {
        w.route("orders", answer("order done"))
    });
    let order = submit(&gw.base, "/orders", "o-1").accepted().await;
    let seen = poll_until_terminal(&gw.base, &order, Duration::from_secs(10)).await;
    assert_eq!(seen.last().unwrap(), "succeeded");

    let invoice = submit(&gw.base, "/invoices", "i-1").accepted().await;
    let subjects = Subjects::default();
    let invoice_slot = subjects.slots("invoices", &invoice).reply_subject;
    let forged = ResultRecord::reply(
        200,
        Some("text/plain".into()),
        Bytes::from_static(b"forged"),
    );

    // The orders worker's reply for the invoice operation, written to `subject` of `stream`.
    let forge = |stream: &'static str, subject: String| {
        let (js, invoice, forged) = (orders_js.clone(), invoice.clone(), forged.clone());
        async move { publish_result(&js, stream, &subject, &invoice, &forged, None).await }
    };
    // Another route's result subject: nats-server refuses the publish, nothing is stored.
    let refused = forge(DEFAULT_OUTCOMES_STREAM, invoice_slot.clone()).await;
    assert!(
        refused.is_err(),
        "orders worker wrote invoices' result: {refused:?}"
    );
    // Another route's consumer: its requests cannot be taken.
    let pulled = async {
        let consumer: async_nats::jetstream::consumer::PullConsumer = orders_js
            .get_consumer_from_stream("worker-invoices", DEFAULT_REQUESTS_STREAM)
            .await?;
        consumer.fetch().max_messages(1).messages().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    assert!(pulled.is_err(), "orders worker reached invoices' consumer");
    // Its own consumer's name with another route's filter: refused (the filter is in the subject).
    let widened = orders_js
        .create_consumer_on_stream(
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("worker-orders".to_owned()),
                filter_subject: subjects.route_requests("invoices"),
                ..Default::default()
            },
            DEFAULT_REQUESTS_STREAM,
        )
        .await;
    assert!(
        widened.is_err(),
        "orders worker widened its consumer to invoices"
    );
    // Another route's results cannot be read either.
    let peeked = last_on_subject(&orders_js.client(), DEFAULT_OUTCOMES_STREAM, &invoice_slot).await;
    assert!(
        peeked.is_err(),
        "orders worker read invoices' result slot: {peeked:?}"
    );
    // Its own route's subject for the other route's operation: stored, and no outcome of it.
    let stray_slot = subjects.slots("orders", &invoice).reply_subject;
    forge(DEFAULT_OUTCOMES_STREAM, stray_slot)
        .await
        .expect("a worker may write under its own route");
    assert_eq!(status_of(&gw.base, &invoice).await, "pending");
    // Headers that reach beyond the message, on its own route's subjects: refused by the stream.
    let own_slot = |n: u32| {
        subjects
            .slots("orders", &format!("{invoice}-{n}"))
            .reply_subject
    };
    for (n, (name, value)) in [
        ("Nats-Rollup", "all"),
        ("Nats-Rollup", "sub"),
        ("Nats-TTL", "1"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(name, value);
        headers.insert(header::STATUS, "200");
        let written = orders_js
            .publish_with_headers(own_slot(n as u32), headers, "x".into())
            .await
            .unwrap()
            .await;
        assert!(written.is_err(), "{name}: {value} was stored: {written:?}");
    }
    // Contract 1's results stream, which keeps roll-ups on: no write at all.
    let legacy = subjects
        .clone()
        .with_contract(handlers::contract::WireContract::V1)
        .slots("orders", &invoice)
        .reply_subject;
    let refused = forge(DEFAULT_RESULTS_STREAM, legacy.clone()).await;
    assert!(
        refused.is_err(),
        "orders worker wrote GW_RESULTS: {refused:?}"
    );
    assert_eq!(status_of(&gw.base, &order).await, "succeeded");
    let log = nats.log();
    let widened_subject = "worker-orders.gw.req.invoices";
    let peeked_subject = format!("DIRECT.GET.GW_OUTCOMES.{invoice_slot}");
    for refused in [
        invoice_slot.as_str(),
        "GW_REQUESTS.worker-invoices",
        widened_subject,
        peeked_subject.as_str(),
        legacy.as_str(),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("Publish Violation") && l.contains(refused)),
            "nats-server logged no refusal of {refused}:\n{log}"
        );
    }

    let invoices_js = login(
        &nats,
        "invoices-worker",
        "invoices-secret",
        "_INBOX_invoices",
    )
    .await;
    let _invoices = TestWorker::start_on(invoices_js, confined_config(), |w| {
        w.route("invoices", answer("invoice done"))
    });
    let seen = poll_until_terminal(&gw.base, &invoice, Duration::from_secs(10)).await;
    assert_eq!(seen.last().unwrap(), "succeeded");
    let result = get_result(&gw.base, &invoice).await;
    assert_eq!(result.text().await.unwrap(), "invoice done");
    let result = get_result(&gw.base, &order).await;
    assert_eq!(result.text().await.unwrap(), "order done");
}

/// An upgrade from the first release: a gateway still writing contract 1 (`--wire-contract 1`)
/// and one on contract 2 share the streams. Each request says where its result goes; a cancel
/// through the contract-2 gateway ends a contract-1 operation in its own slot, and both gateways
/// read every operation the same.
#[tokio::test]
async fn operations_of_both_layouts_are_answered_where_their_requests_say() {
    let nats = Nats::start().await;
    let old = TestGateway::builder(ROUTES)
        .flags(["--wire-contract", "1"])
        .nats(&nats)
        .start()
        .await;
    let new = TestGateway::builder(ROUTES).nats(&nats).start().await;
    let client = nats.client().await;
    let subjects = Subjects::default();

    let first = submit(&old.base, "/orders", "v1-a").accepted().await;
    let cancelled = submit(&old.base, "/orders", "v1-b").accepted().await;
    let second = submit(&new.base, "/orders", "v2-a").accepted().await;

    // What each wrote: contract 1 as the first release wrote it, contract 2 with its version.
    for (id, reply, stream, contract) in [
        (&first, format!("gw.res.{first}"), None, None),
        (
            &second,
            format!("gw.out.orders.{second}"),
            Some(DEFAULT_OUTCOMES_STREAM),
            Some("2"),
        ),
    ] {
        let status = json(get_operation(&new.base, id).await).await;
        assert_eq!(status["status"], "pending");
        let stored = stored_request(&client, id).await;
        assert_eq!(
            header_str(&stored.headers, header::REPLY_SUBJECT),
            Some(reply.as_str())
        );
        assert_eq!(header_str(&stored.headers, header::REPLY_STREAM), stream);
        assert_eq!(header_str(&stored.headers, header::CONTRACT), contract);
    }

    let response = http()
        .delete(new.url(&format!("/operations/{cancelled}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let legacy = last_on_subject(
        &client,
        DEFAULT_RESULTS_STREAM,
        &format!("gw.res.{cancelled}"),
    )
    .await
    .unwrap()
    .expect("the cancel is in the contract-1 slot");
    assert_eq!(
        header_str(&legacy.headers, header::OUTCOME),
        Some("cancelled")
    );
    let routed = subjects.slots("orders", &cancelled).reply_subject;
    assert!(
        last_on_subject(&client, DEFAULT_OUTCOMES_STREAM, &routed)
            .await
            .unwrap()
            .is_none()
    );

    let _worker = TestWorker::start(&nats, worker_config(), "orders", answer("done")).await;
    for gateway in [&old.base, &new.base] {
        for id in [&first, &second] {
            let seen = poll_until_terminal(gateway, id, Duration::from_secs(10)).await;
            assert_eq!(seen.last().unwrap(), "succeeded");
            let result = get_result(gateway, id).await;
            assert_eq!(result.text().await.unwrap(), "done");
        }
        assert_eq!(status_of(gateway, &cancelled).await, "cancelled");
    }
    assert!(
        last_on_subject(&client, DEFAULT_RESULTS_STREAM, &format!("gw.res.{first}"))
            .await
            .unwrap()
            .is_some()
    );
}

/// A request of a newer contract than this library reads is not handled here, and not thrown
/// away either: it is offered back (nak with a delay) for a worker that reads it.
#[tokio::test]
async fn a_request_of_a_newer_contract_is_left_for_a_newer_worker() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = calls.clone();
    let _worker = TestWorker::start(&nats, worker_config(), "orders", move |_: Request| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok(Response::text(200, "done")) }
    })
    .await;
    let id = submit(&gw.base, "/orders", "current").accepted().await;
    poll_until_terminal(&gw.base, &id, Duration::from_secs(10)).await;
    rewritten_request(&nats, "orders", &id, "newer", &[(header::CONTRACT, "4")]).await;

    let js = nats.jetstream().await;
    let consumer_info = || {
        let js = js.clone();
        async move {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_consumer_from_stream("test-orders", DEFAULT_REQUESTS_STREAM)
                .await
                .unwrap();
            consumer.info().await.unwrap().clone()
        }
    };
    eventually(
        "the newer request was offered",
        Duration::from_secs(10),
        || async {
            let info = consumer_info().await;
            (info.delivered.stream_sequence == 2 && info.num_ack_pending == 1).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = consumer_info().await;
    assert_eq!(info.num_ack_pending, 1, "terminated or acked: {info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 1);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// The request message of an operation, found by the key token its id starts with.
async fn stored_request(
    client: &async_nats::Client,
    id: &str,
) -> async_nats::jetstream::message::StreamMessage {
    let token = gateway::operations::idempotency::key_token_of(id).unwrap();
    last_matching(
        client,
        DEFAULT_REQUESTS_STREAM,
        &Subjects::default().request_any_route(token),
    )
    .await
    .unwrap()
    .expect("the request is stored")
}

/// A worker confined by the shipped `accounts.conf` reads its own route's large request bodies
/// and writes its large replies (both kept in its route's Object Store bucket), and can do
/// neither in another route's.
#[tokio::test]
async fn a_confined_worker_reads_and_writes_its_routes_large_bodies_and_no_others() {
    let (nats, gw, orders_js) = confined().await;
    // The reply: the body twice (600 KiB), above the worker's reply_inline_max.
    let _orders = TestWorker::start_on(orders_js.clone(), confined_config(), |w| {
        w.route("orders", |r: Request| async move {
            Ok(Response {
                body: [r.body.clone(), r.body].concat().into(),
                ..Response::new(200)
            })
        })
    });
    let big = vec![7u8; 300 << 10];
    let order = submit(&gw.base, "/orders", "big-order")
        .body(big.clone())
        .accepted()
        .await;
    let seen = poll_until_terminal(&gw.base, &order, Duration::from_secs(20)).await;
    let violations: Vec<String> = nats
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert_eq!(seen.last().unwrap(), "succeeded", "{violations:#?}");
    let reply = get_result(&gw.base, &order).await.bytes().await.unwrap();
    assert_eq!(
        reply,
        [big.clone(), big.clone()].concat(),
        "the whole body reached the worker, and its whole reply the client"
    );
    let gateway_client = async_nats::ConnectOptions::new()
        .user_and_password("gateway".into(), "g@te:w/y secret".into())
        .connect(nats.url())
        .await
        .unwrap();
    let record = stored_outcome(&gateway_client, "orders", &order).await;
    let kept = record
        .body_object
        .expect("the reply is in the Object Store");
    assert_eq!(
        (kept.bucket.as_str(), kept.size),
        ("GW_BODIES_orders", 600 << 10)
    );

    // An invoice's body: the orders worker cannot read it, even knowing where it is.
    let invoice = submit(&gw.base, "/invoices", "big-invoice")
        .body(big)
        .accepted()
        .await;
    let token = &invoice[..gateway::operations::idempotency::KEY_TOKEN_LEN];
    let stored = last_on_subject(
        &gateway_client,
        DEFAULT_REQUESTS_STREAM,
        &Subjects::default().request("invoices", token),
    )
    .await
    .unwrap()
    .expect("the invoice's request");
    let head = handlers::contract::RequestHead::from_headers(&stored.headers).unwrap();
    let object = head
        .body_object
        .clone()
        .expect("the body is in the Object Store");
    assert_eq!(object.bucket, "GW_BODIES_invoices");
    let stolen = tokio::time::timeout(
        Duration::from_secs(10),
        handlers::claim_check::fetch_body(&orders_js, &object),
    )
    .await;
    assert!(
        !matches!(stolen, Ok(Ok(_))),
        "the orders worker read an invoice's body"
    );
    let planted = tokio::time::timeout(
        Duration::from_secs(10),
        handlers::claim_check::store_reply(
            &orders_js,
            &head,
            ResultRecord::reply(200, None, vec![1u8; 4096].into()),
            0,
        ),
    )
    .await;
    assert!(
        !matches!(planted, Ok(Ok(_))),
        "the orders worker wrote into the invoices bucket"
    );
    assert!(
        nats.log().lines().any(|l| l.contains("orders-worker")
            && l.contains("Violation")
            && l.contains("OBJ_GW_BODIES_invoices")),
        "nats-server refused it by permission"
    );
}
