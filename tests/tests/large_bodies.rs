//! Request bodies too large for a message, against a real nats-server: above the route's
//! `inline_max` a body is streamed into the JetStream Object Store and the request names it
//! (wire contract 3); the worker gets the same bytes; a replay stores nothing again; a key reused
//! with another body is refused and stores nothing; a body over `max_body` leaves nothing.

use std::time::Duration;

use futures::StreamExt;
use gateway_tests::*;
use handlers::contract::{DEFAULT_REQUESTS_STREAM, header, header_str};
use handlers::{Request, Response};
use sha2::Digest;

const ROUTES: &str = r#"
[[route]]
name = "upload"
method = "POST"
path = "/upload"
max_body = "128MiB"
inline_max = "64KiB"

[[route]]
name = "small"
method = "POST"
path = "/small"
max_body = "1MiB"
inline_max = "64KiB"
"#;

/// `n` bytes that differ from one seed to another.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn hex_sha256(body: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(body))
}

/// Objects the bodies bucket holds.
async fn objects(nats: &Nats) -> usize {
    let js = nats.jetstream().await;
    let Ok(bucket) = js.get_object_store("GW_BODIES_upload").await else {
        return 0;
    };
    bucket.list().await.unwrap().count().await
}

async fn post(base: &str, path: &str, key: &str, body: Vec<u8>) -> reqwest::Response {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .post(format!("{base}{path}"))
        .header("idempotency-key", format!("\"{key}\""))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_body_goes_through_the_object_store_and_reaches_the_worker_whole() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let handler = |r: Request| async move {
        Ok(Response::json(
            200,
            &serde_json::json!({"size": r.body.len(), "sha256": hex_sha256(&r.body)}),
        ))
    };
    let _worker = TestWorker::start(&nats, worker_config(), "upload", handler).await;
    let base = &gw.base;

    let body = bytes(50 << 20, 1);
    let sha = hex_sha256(&body);
    let r = post(base, "/upload", "big-1", body.clone()).await;
    let id = id_of(r).await;
    assert_eq!(objects(&nats).await, 1);
    poll_until_terminal(base, &id, Duration::from_secs(120)).await;
    let reply = json(get_result(base, &id).await).await;
    assert_eq!(reply["size"], 50 << 20);
    assert_eq!(
        reply["sha256"],
        sha.as_str(),
        "the worker got the bytes sent"
    );

    // The request names its body: contract 3, the digest the Object Store computed.
    let js = nats.jetstream().await;
    let requests = gateway_tests::history::read_stream(&js, DEFAULT_REQUESTS_STREAM)
        .await
        .unwrap();
    let stored = requests.last().unwrap().headers.clone().unwrap();
    assert_eq!(header_str(&stored, header::CONTRACT), Some("3"));
    let digest = format!(
        "SHA-256={}",
        data_encoding::BASE64URL.encode(&sha2::Sha256::digest(&body))
    );
    assert_eq!(
        header_str(&stored, header::BODY_DIGEST),
        Some(digest.as_str())
    );

    // A replay stores nothing again; the key with another body is refused and stores nothing.
    let r = post(base, "/upload", "big-1", body).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(r).await, id);
    let r = post(base, "/upload", "big-1", bytes(1 << 20, 2)).await;
    assert_problem(r, 422, "idempotency-key-reused").await;
    assert_eq!(objects(&nats).await, 1);

    // A small body on the same route travels in its message, as before.
    let r = post(base, "/upload", "small-1", b"tiny".to_vec()).await;
    let small = id_of(r).await;
    poll_until_terminal(base, &small, Duration::from_secs(30)).await;
    assert_eq!(json(get_result(base, &small).await).await["size"], 4);
    assert_eq!(objects(&nats).await, 1);

    // Over max_body, sent without a length (so found out while it streams into the bucket):
    // 413, and nothing is left in the bucket.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..32).map(|i| Ok(bytes(64 << 10, i))).collect();
    let r = http()
        .post(format!("{base}/small"))
        .header("idempotency-key", "\"too-big\"")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_problem(r, 413, "payload-too-large").await;
    assert_eq!(objects(&nats).await, 1);
}

/// nats-server killed while a large body streams in: the client gets a 503 and nothing of the
/// request is visible; after the restart, the same request with the same key is accepted once,
/// and sending it again is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_upload_leaves_no_request_and_the_retry_converges() {
    let TestGateway { mut nats, gw } = TestGateway::builder(ROUTES).start().await;
    let base = gw.base.clone();
    let body = bytes(16 << 20, 5);
    // About five seconds of upload: 256 chunks of 64 KiB, 20 ms apart.
    let slow = {
        let chunks: Vec<Vec<u8>> = body.chunks(64 << 10).map(<[u8]>::to_vec).collect();
        futures::stream::iter(chunks).then(|chunk| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, std::io::Error>(chunk)
        })
    };
    let upload = tokio::spawn({
        let base = base.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{base}/upload"))
                .header("idempotency-key", "\"killed\"")
                .body(reqwest::Body::wrap_stream(slow))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.kill().await;
    let answer = upload.await.unwrap().expect("the gateway answers");
    assert_eq!(answer.status(), 503, "{:?}", answer.text().await);
    nats.restart().await;
    let js = nats.jetstream().await;
    let stored = |js: async_nats::jetstream::Context| async move {
        gateway_tests::history::read_stream(&js, DEFAULT_REQUESTS_STREAM)
            .await
            .map(|m| m.len())
            .ok()
    };
    let before = eventually("the requests stream", Duration::from_secs(30), || {
        stored(js.clone())
    })
    .await;
    assert_eq!(before, 0, "no request of the interrupted upload is visible");

    // The same request again, until the gateway has its connection back: one operation.
    let id = eventually("the retry accepted", Duration::from_secs(60), || {
        let (base, body) = (base.clone(), body.clone());
        async move {
            let r = post(&base, "/upload", "killed", body).await;
            (r.status() == 202).then_some(())?;
            Some(json(r).await["id"].as_str().unwrap().to_owned())
        }
    })
    .await;
    let r = post(&base, "/upload", "killed", body).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(id_of(r).await, id);
    assert_eq!(stored(js.clone()).await, Some(1), "one request for the key");
    assert!(objects(&nats).await >= 1);
}

/// While a gateway still writes wire contract 1 (an upgrade from the first release), a body
/// above `inline_max` cannot be named by its request: it is refused (413), nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_is_refused_while_writing_contract_1() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--wire-contract", "1"])
        .start()
        .await;
    let r = post(&gw.base, "/upload", "old-layout", bytes(1 << 20, 9)).await;
    assert_problem(r, 413, "payload-too-large").await;
    assert_eq!(objects(&nats).await, 0);
    let r = post(&gw.base, "/upload", "old-layout-small", b"fits".to_vec()).await;
    assert_eq!(r.status(), 202);
}
