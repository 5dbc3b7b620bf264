//! Batch submit against a real nats-server: a batch is accepted whole (one JetStream atomic
//! batch) or not at all; a retried batch is a replay; an item whose key names another request
//! refuses the whole batch, naming the item, with nothing written; an item accepted before with
//! the same request is taken as it is; the batch resource counts its operations by status.

use std::time::Duration;

use gateway_tests::*;
use handlers::contract::DEFAULT_REQUESTS_STREAM;
use serde_json::json;

const ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"

[[route]]
name = "items"
method = "PUT"
path = "/items/{id}"
"#;

async fn messages(nats: &Nats) -> u64 {
    stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await
}

async fn post_batch(base: &str, key: &str, body: serde_json::Value) -> reqwest::Response {
    http()
        .post(format!("{base}/batches"))
        .header("idempotency-key", format!("\"{key}\""))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn orders(keys: &[&str]) -> serde_json::Value {
    json!({
        "route": "orders",
        "items": keys.iter().map(|k| json!({"idempotency_key": k, "body": {"sku": k}})).collect::<Vec<_>>(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_accepted_whole_replayed_whole_and_refused_whole() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let base = &gw.base;

    // Accepted: three operations and a record, in one write.
    let before = messages(&nats).await;
    let r = post_batch(base, "b-1", orders(&["o-1", "o-2", "o-3"])).await;
    assert_eq!(r.status(), 202);
    let location = location(&r);
    let batch = json(r).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/batches/{id}"));
    let ops: Vec<String> = batch["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ops.len(), 3);
    assert_eq!(messages(&nats).await, before + 4);
    let view = json(get_path(base, &location).await).await;
    assert_eq!(view["counts"], json!({"pending": 3}), "{view}");

    // Retried: the same batch, nothing written.
    let r = post_batch(base, "b-1", orders(&["o-1", "o-2", "o-3"])).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(json(r).await["id"], id.as_str());
    // An item's key sent alone with the same request finds the item's operation.
    let r = submit(base, "/orders", "o-2")
        .json_body(r#"{"sku":"o-2"}"#)
        .send()
        .await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(r).await, ops[1]);
    // The batch key with another batch.
    let r = post_batch(base, "b-1", orders(&["o-1", "o-9"])).await;
    assert_problem(r, 422, "idempotency-key-reused").await;
    assert_eq!(messages(&nats).await, before + 4);

    // Refused whole: item 1's key names another request; nothing of the batch is written.
    let other = submit(base, "/orders", "x-2")
        .json_body(r#"{"sku":"something else"}"#)
        .accepted()
        .await;
    let before = messages(&nats).await;
    let r = post_batch(base, "b-2", orders(&["x-1", "x-2", "x-3"])).await;
    let problem = assert_problem(r, 422, "idempotency-key-reused").await;
    assert_eq!(problem["errors"][0]["pointer"], "#/items/1/idempotency_key");
    assert_eq!(problem["operation_id"], other.as_str());
    assert_eq!(
        messages(&nats).await,
        before,
        "nothing of a refused batch is written"
    );
    for key in ["x-1", "x-3"] {
        // The other items' keys are still free.
        let r = submit(base, "/orders", key)
            .json_body(format!(r#"{{"sku":"{key}"}}"#))
            .send()
            .await;
        assert!(r.headers().get("idempotent-replayed").is_none(), "{key}");
        assert_eq!(r.status(), 202);
    }

    // An item accepted before with the same request is taken as it is; the rest are written.
    let alone = submit(base, "/orders", "y-1")
        .json_body(r#"{"sku":"y-1"}"#)
        .accepted()
        .await;
    let before = messages(&nats).await;
    let r = post_batch(base, "b-3", orders(&["y-1", "y-2"])).await;
    assert_eq!(r.status(), 202);
    let batch = json(r).await;
    assert_eq!(batch["operations"][0]["id"], alone.as_str());
    assert_eq!(
        messages(&nats).await,
        before + 2,
        "one new request and the record"
    );

    // A worker runs them: the batch counts them succeeded.
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    eventually("the batch done", Duration::from_secs(30), || async {
        let view = json(get_path(base, &location).await).await;
        (view["counts"] == json!({"succeeded": 3})).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_is_refused_with_the_item_named_and_nothing_written() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let base = &gw.base;
    let before = messages(&nats).await;
    let many: Vec<String> = (0..1000).map(|i| format!("k-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    for (body, pointer) in [
        (orders(&many), "#/items"),
        (json!({"route": "orders", "items": []}), "#/items"),
        (orders(&["a", "b", "a"]), "#/items/2/idempotency_key"),
        (orders(&["a", "redrive:x"]), "#/items/1/idempotency_key"),
        (orders(&["a", ""]), "#/items/1/idempotency_key"),
        (
            json!({"route": "nowhere", "items": [{"idempotency_key": "a"}]}),
            "#/route",
        ),
        (
            json!({"route": "items", "items": [{"idempotency_key": "a"}]}),
            "#/items/0/path",
        ),
        (
            json!({"route": "items", "items": [{"idempotency_key": "a", "path": "/items/1/2"}]}),
            "#/items/0/path",
        ),
        (
            json!({"route": "orders", "items": [{"idempotency_key": "a", "body": 1, "body_base64": "AA=="}]}),
            "#/items/0/body",
        ),
        (
            json!({"route": "orders", "items": [{"idempotency_key": "a", "body_base64": "%%"}]}),
            "#/items/0/body_base64",
        ),
    ] {
        let r = post_batch(base, "bad", body).await;
        let problem = assert_problem(r, 400, "bad-batch").await;
        assert_eq!(problem["errors"][0]["pointer"], pointer, "{problem}");
    }
    // Within the route's 1 MiB, but over the server's max_payload with the gateway's headers:
    // refused before anything is sent (the batch never reaches the server half-sent), so a
    // retry cannot succeed and the answer says which item.
    let near_max = "x".repeat((1 << 20) - 100);
    let r = post_batch(
        base,
        "too-large",
        json!({"route": "orders", "items": [
            {"idempotency_key": "small", "body": {"sku": "tea"}},
            {"idempotency_key": "large", "body_base64": data_encoding::BASE64.encode(near_max.as_bytes())},
        ]}),
    )
    .await;
    let problem = assert_problem(r, 400, "bad-batch").await;
    assert_eq!(
        problem["errors"][0]["pointer"], "#/items/1/body",
        "{problem}"
    );
    let r = http()
        .post(format!("{base}/batches"))
        .header("content-type", "text/plain")
        .body(orders(&["a"]).to_string())
        .send()
        .await
        .unwrap();
    assert_problem(r, 415, "unsupported-media-type").await;
    assert_eq!(messages(&nats).await, before);

    // A route with a path parameter: each item names its path.
    let r = post_batch(
        base,
        "puts",
        json!({"route": "items", "items": [
            {"idempotency_key": "p-1", "path": "/items/1", "body_base64": "aGVsbG8=", "content_type": "text/plain"},
            {"idempotency_key": "p-2", "path": "/items/2", "query": "x=1"},
        ]}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let batch = json(r).await;
    let first = batch["operations"][0]["id"].as_str().unwrap();
    let view = json(get_operation(base, first).await).await;
    assert_eq!(view["route"], "items");
}
