//! Bodies too large for a message, against a real nats-server: above the route's `inline_max`
//! a request body is streamed into the JetStream Object Store and the request names it (wire
//! contract 3); the worker gets the same bytes; a replay stores nothing again; a key reused with
//! another body is refused and stores nothing; a body over `max_body` leaves nothing. A reply
//! above the worker's `reply_inline_max` goes to the same bucket; `GET /result` streams it with
//! its length, byte ranges and an entity tag. The route's retention removes both objects.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use gateway_tests::*;
use handlers::contract::{DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM, header, header_str};
use handlers::jetstream::ResultWrite;
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

[[route]]
name = "export"
method = "POST"
path = "/export"
inline_max = "64KiB"
state = { stream = "WK_EXPORTS", prefix = "exp" }

[[route]]
name = "brief"
method = "POST"
path = "/brief"
max_body = "1MiB"
inline_max = "64KiB"
timeout = "2s"
retention = "3s"
"#;

/// Objects the bodies bucket of `route` holds.
async fn objects_of(nats: &Nats, route: &str) -> usize {
    let js = nats.jetstream().await;
    let Ok(bucket) = js.get_object_store(format!("GW_BODIES_{route}")).await else {
        return 0;
    };
    bucket.list().await.unwrap().count().await
}

/// A handler that answers with the request's body (so a large request makes a large reply).
async fn echo(r: Request) -> Result<Response, handlers::HandlerError> {
    Ok(Response {
        content_type: Some("application/octet-stream".to_owned()),
        body: r.body.clone(),
        ..Response::new(200)
    })
}

/// `n` bytes that differ from one seed to another.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn hex_sha256(body: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(body))
}

/// Objects the bodies bucket of route `upload` holds.
async fn objects(nats: &Nats) -> usize {
    objects_of(nats, "upload").await
}

/// A client patient enough for tens of MiB through a debug build.
fn patient() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn post(base: &str, path: &str, key: &str, body: Vec<u8>) -> reqwest::Response {
    patient()
        .post(format!("{base}{path}"))
        .header("idempotency-key", format!("\"{key}\""))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_body_goes_through_the_object_store_and_comes_back_whole() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "upload", echo).await;
    let base = &gw.base;

    let body = bytes(50 << 20, 1);
    let sha = hex_sha256(&body);
    let r = post(base, "/upload", "big-1", body.clone()).await;
    let id = id_of(r).await;
    poll_until_terminal(base, &id, Duration::from_secs(120)).await;
    // The request's body and the reply's: one object each.
    assert_eq!(objects(&nats).await, 2);
    // Read with the uploads' patience: 50 MiB hashed twice by a debug build takes a while.
    let result = patient()
        .get(format!("{base}/operations/{id}/result"))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    assert_eq!(result.content_length(), Some(50 << 20));
    let mut received = sha2::Sha256::new();
    let mut stream = result.bytes_stream();
    while let Some(chunk) = stream.next().await {
        received.update(chunk.unwrap());
    }
    assert_eq!(
        data_encoding::HEXLOWER.encode(&received.finalize()),
        sha,
        "the worker got the bytes sent, and the client got them back"
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
    assert_eq!(objects(&nats).await, 2);

    // A small body on the same route travels in its message, and so does its reply.
    let r = post(base, "/upload", "small-1", b"tiny".to_vec()).await;
    let small = id_of(r).await;
    poll_until_terminal(base, &small, Duration::from_secs(30)).await;
    let reply = get_result(base, &small).await.bytes().await.unwrap();
    assert_eq!(&reply[..], b"tiny");
    assert_eq!(objects(&nats).await, 2);

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
    assert_eq!(objects(&nats).await, 2);
}

/// A reply kept in the Object Store is a representation like any other: its length, a strong
/// `ETag` (its SHA-256), byte ranges (206, 416), and conditional reads (304, 412), as RFC 9110
/// sections 13 and 14 say; a reply in its message answers the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_reply_is_read_by_ranges_and_validated_by_its_entity_tag() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "upload", echo).await;
    let base = &gw.base;
    let body = bytes(3 << 20, 3);
    let id = id_of(post(base, "/upload", "ranges", body.clone()).await).await;
    poll_until_terminal(base, &id, Duration::from_secs(60)).await;
    let small = id_of(post(base, "/upload", "ranges-small", body[..1000].to_vec()).await).await;
    poll_until_terminal(base, &small, Duration::from_secs(60)).await;
    let url = |id: &str| format!("{base}/operations/{id}/result");
    let get = |id: &str, headers: &[(&str, &str)]| {
        let mut request = http().get(url(id));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };

    for (id, body) in [(id.as_str(), &body[..]), (small.as_str(), &body[..1000])] {
        let size = body.len();
        let whole = get(id, &[]).await.unwrap();
        assert_eq!(whole.status(), 200);
        assert_eq!(whole.headers()["accept-ranges"], "bytes");
        let etag = whole.headers()["etag"].to_str().unwrap().to_owned();
        let sha = data_encoding::BASE64URL.encode(&sha2::Sha256::digest(body));
        assert_eq!(etag, format!("\"{sha}\""), "the entity tag is the SHA-256");
        assert_eq!(&whole.bytes().await.unwrap()[..], body);

        let part = get(id, &[("range", "bytes=100-899")]).await.unwrap();
        assert_eq!(part.status(), 206);
        assert_eq!(
            part.headers()["content-range"],
            format!("bytes 100-899/{size}").as_str()
        );
        assert_eq!(part.content_length(), Some(800));
        assert_eq!(&part.bytes().await.unwrap()[..], &body[100..900]);

        let tail = get(id, &[("range", "bytes=-10")]).await.unwrap();
        assert_eq!(tail.status(), 206);
        assert_eq!(&tail.bytes().await.unwrap()[..], &body[size - 10..]);

        let beyond = format!("bytes={size}-");
        let r = get(id, &[("range", &beyond)]).await.unwrap();
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes */{size}").as_str()
        );
        assert_problem(r, 416, "range-not-satisfiable").await;

        // Several ranges, or a range unit this server does not know: the whole body.
        for ignored in ["bytes=0-1,5-6", "lines=1-2"] {
            let r = get(id, &[("range", ignored)]).await.unwrap();
            assert_eq!(r.status(), 200, "{ignored}");
            assert_eq!(r.bytes().await.unwrap().len(), size);
        }

        // A range of what the client has (If-Range naming its tag); of something else: all.
        let r = get(id, &[("range", "bytes=0-9"), ("if-range", &etag)])
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        let r = get(id, &[("range", "bytes=0-9"), ("if-range", "\"other\"")])
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), size);

        let r = get(id, &[("if-none-match", &etag)]).await.unwrap();
        assert_eq!(r.status(), 304);
        assert_eq!(r.headers()["etag"], etag.as_str());
        assert!(r.bytes().await.unwrap().is_empty());
        let r = get(id, &[("if-none-match", "\"other\"")]).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = get(id, &[("if-match", "\"other\"")]).await.unwrap();
        assert_problem(r, 412, "precondition-failed").await;
        let r = get(id, &[("if-match", &etag)]).await.unwrap();
        assert_eq!(r.status(), 200);

        let head = http().head(url(id)).send().await.unwrap();
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["content-length"], size.to_string().as_str());
    }
}

/// Objects live as long as their route's retention: once an operation is gone, so are its
/// request's and its reply's bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routes_retention_removes_its_objects() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "brief", echo).await;
    let base = &gw.base;
    let body = bytes(1 << 20, 4);
    let id = id_of(post(base, "/brief", "short-lived", body.clone()).await).await;
    poll_until_terminal(base, &id, Duration::from_secs(10)).await;
    assert_eq!(
        objects_of(&nats, "brief").await,
        2,
        "the request's body and the reply's"
    );
    assert_eq!(
        &get_result(base, &id).await.bytes().await.unwrap()[..],
        &body[..]
    );
    eventually("the objects removed", Duration::from_secs(20), || async {
        (objects_of(&nats, "brief").await == 0).then_some(())
    })
    .await;
    let r = http()
        .get(format!("{base}/operations/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the operation is gone too");
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

/// Two attempts racing to answer one operation each store their reply body; the record that
/// loses the result slot removes its own object, and the winner's stays and is served. A writer
/// whose own earlier write took the slot keeps its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_loses_the_result_slot_removes_its_object() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let base = &gw.base;
    let id = id_of(post(base, "/upload", "raced", b"small".to_vec()).await).await;
    let js = nats.jetstream().await;
    let requests = gateway_tests::history::read_stream(&js, DEFAULT_REQUESTS_STREAM)
        .await
        .unwrap();
    let stored = requests.last().unwrap().headers.clone().unwrap();
    let head = handlers::RequestHead::from_headers(&stored).unwrap();
    assert_eq!(head.operation_id, id);
    assert_eq!(head.reply_bucket.as_deref(), Some("GW_BODIES_upload"));
    let reply = |body: Vec<u8>| async {
        handlers::claim_check::store_reply(
            &js,
            &head,
            handlers::ResultRecord::reply(200, None, body.into()),
            0,
        )
        .await
        .unwrap()
    };
    let (first, second, same) = (
        reply(bytes(1 << 20, 6)).await,
        reply(bytes(1 << 20, 7)).await,
        reply(bytes(1 << 20, 6)).await,
    );
    assert_eq!(objects(&nats).await, 3);
    let publish = |record: handlers::ResultRecord| {
        let (js, head) = (js.clone(), head.clone());
        async move {
            handlers::jetstream::publish_result(
                &js,
                DEFAULT_OUTCOMES_STREAM,
                &head.reply_subject,
                &head.operation_id,
                &record,
                None,
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(publish(first.clone()).await, ResultWrite::Stored);
    assert!(matches!(
        publish(second).await,
        ResultWrite::Conflict { .. }
    ));
    assert_eq!(publish(same).await, ResultWrite::AlreadyStored);
    assert_eq!(publish(first).await, ResultWrite::AlreadyStored);
    assert_eq!(
        objects(&nats).await,
        1,
        "only the stored record's object is left"
    );
    let served = get_result(base, &id).await.bytes().await.unwrap();
    assert_eq!(&served[..], &bytes(1 << 20, 6)[..]);
}

/// A stateful handler's large reply is stored before its commit and named by the outbox the
/// commit writes: one state change, and the reply served whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_handlers_large_reply_is_committed_with_its_state() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let store = handlers::StateStore::ensure(
        nats.jetstream().await,
        "WK_EXPORTS",
        "exp",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let handler = |ctx: std::sync::Arc<handlers::StatefulContext>| async move {
        let exports: u64 = ctx.load("exports").await?.unwrap_or(0);
        ctx.save("exports", &(exports + 1));
        Ok(Response {
            body: bytes(2 << 20, 8).into(),
            ..Response::new(200)
        })
    };
    let _worker = TestWorker::start_with(&nats, worker_config(), |w| {
        w.stateful_route("export", store, handler)
    })
    .await;
    let id = id_of(post(&gw.base, "/export", "export-1", b"{}".to_vec()).await).await;
    poll_until_terminal(&gw.base, &id, Duration::from_secs(30)).await;
    let served = get_result(&gw.base, &id).await.bytes().await.unwrap();
    assert_eq!(&served[..], &bytes(2 << 20, 8)[..]);
    assert_eq!(objects_of(&nats, "export").await, 1);
    let client = nats.client().await;
    let exports = handlers::jetstream::last_on_subject(&client, "WK_EXPORTS", "exp.state.exports")
        .await
        .unwrap()
        .expect("the state change");
    assert_eq!(&exports.payload[..], b"1");
}

/// A large body may take longer than `GATEWAY_BODY_READ_TIMEOUT` to arrive as long as it keeps
/// coming; a pause longer than that is `408 body-timeout`, with nothing accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_may_be_long_but_not_pause() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--body-read-timeout", "1s"])
        .start()
        .await;
    // `chunks` of 64 KiB, `pause` before each but the first two (so that the gateway knows
    // the body is large, and streams it to the Object Store, before any pause).
    let upload = |key: &'static str, chunks: u8, pause: Duration| {
        let stream = futures::stream::iter(0..chunks).then(move |i| async move {
            if i >= 2 {
                tokio::time::sleep(pause).await;
            }
            Ok::<_, std::io::Error>(bytes(64 << 10, i))
        });
        patient()
            .post(format!("{}/upload", gw.base))
            .header("idempotency-key", format!("\"{key}\""))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
    };
    // 40 chunks, 50 ms apart: 2 s in all, never a pause of 1 s.
    let r = upload("steady", 40, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    assert_eq!(objects(&nats).await, 1);
    // 4 chunks, 1.5 s apart: the first pause ends it.
    let r = upload("stalled", 4, Duration::from_millis(1500))
        .await
        .unwrap();
    assert_problem(r, 408, "body-timeout").await;
    let js = nats.jetstream().await;
    let requests = gateway_tests::history::read_stream(&js, DEFAULT_REQUESTS_STREAM)
        .await
        .unwrap();
    assert_eq!(requests.len(), 1, "only the steady upload was accepted");
    assert_eq!(objects(&nats).await, 1);
}

/// A large upload takes a JetStream permit only to accept its request, once its body is stored:
/// with one permit in all, other requests are served while it streams in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_holds_no_permit_while_its_body_streams_in() {
    let TestGateway { nats: _nats, gw } = TestGateway::builder(ROUTES)
        .flags(["--max-in-flight", "1"])
        .start()
        .await;
    // 20 chunks of 64 KiB, 100 ms apart: two seconds of upload.
    let slow = futures::stream::iter(0..20u8).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::io::Error>(bytes(64 << 10, i))
    });
    let upload = tokio::spawn(
        patient()
            .post(format!("{}/upload", gw.base))
            .header("idempotency-key", "\"slow\"")
            .body(reqwest::Body::wrap_stream(slow))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..5 {
        let r = post(
            &gw.base,
            "/small",
            &format!("meanwhile-{i}"),
            b"small".to_vec(),
        )
        .await;
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
    }
    assert!(!upload.is_finished(), "the upload was still streaming");
    let r = upload.await.unwrap().unwrap();
    assert_eq!(r.status(), 202);
}

/// The consumers of the bodies bucket of route `route`, by name.
async fn readers_of(nats: &Nats, route: &str) -> Vec<String> {
    let js = nats.jetstream().await;
    let Ok(stream) = js.get_stream(format!("OBJ_GW_BODIES_{route}")).await else {
        return Vec::new();
    };
    stream.consumer_names().try_collect().await.unwrap()
}

/// Many reads of one large result at once each get exactly their bytes (all of them together
/// never have more chunks on the way than nats-server lets wait for one client); a read whose
/// consumer is removed mid-body carries on after its last chunk; a HEAD, or a read that ends,
/// leaves no consumer behind; a record naming a body elsewhere is 502 whatever the conditions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_interrupted_reads_get_exactly_their_bytes() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let _worker = TestWorker::start(&nats, worker_config(), "upload", echo).await;
    let base = gw.base.clone();
    let body = bytes(16 << 20, 11);
    let id = id_of(post(&base, "/upload", "many-readers", body.clone()).await).await;
    poll_until_terminal(&base, &id, Duration::from_secs(60)).await;
    let url = format!("{base}/operations/{id}/result");

    // 80 reads at once, each of up to 1 MiB somewhere in the 16 MiB (spread by a multiplicative
    // hash, so the same every run).
    let ranges: Vec<(usize, usize)> = (1..=80usize)
        .map(|i| {
            let first = i.wrapping_mul(2_654_435_761) % body.len();
            let length = 1 + i.wrapping_mul(40_503) % (1 << 20);
            (first, (first + length).min(body.len()) - 1)
        })
        .collect();
    let client = patient();
    let reads = futures::future::join_all(ranges.iter().map(|(first, last)| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client
                .get(url)
                .header("range", format!("bytes={first}-{last}"))
                .send()
                .await
                .unwrap();
            (r.status(), r.bytes().await.map(|b| b.to_vec()))
        }
    }))
    .await;
    for ((first, last), (status, read)) in ranges.iter().zip(reads) {
        assert_eq!(status, 206);
        let read = read.expect("the whole range arrived");
        assert!(
            read == body[*first..=*last],
            "bytes {first}-{last} are the body's"
        );
    }

    // A read whose consumer goes away mid-body: it resumes after its last chunk.
    let mut slow = patient().get(&url).send().await.unwrap();
    let mut got = slow.chunk().await.unwrap().unwrap().to_vec();
    let js = nats.jetstream().await;
    let stream = js.get_stream("OBJ_GW_BODIES_upload").await.unwrap();
    for name in readers_of(&nats, "upload").await {
        stream.delete_consumer(&name).await.unwrap();
    }
    while let Some(chunk) = slow.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert!(got == body, "the interrupted read is whole and in order");

    // HEADs read nothing; ended reads remove their consumers.
    for _ in 0..50 {
        let r = client.head(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-length"],
            body.len().to_string().as_str()
        );
    }
    eventually("no consumer left", Duration::from_secs(10), || async {
        readers_of(&nats, "upload").await.is_empty().then_some(())
    })
    .await;

    // A record naming another operation's body: 502, even to a condition that matches anything.
    let borrowed = stored_outcome(&nats.client().await, "upload", &id).await;
    assert!(borrowed.body_object.is_some());
    let forged = id_of(post(&base, "/small", "forged", b"y".to_vec()).await).await;
    handlers::jetstream::publish_result(
        &js,
        DEFAULT_OUTCOMES_STREAM,
        &handlers::Subjects::default()
            .slots("small", &forged)
            .reply_subject,
        &forged,
        &borrowed,
        None,
    )
    .await
    .unwrap();
    for condition in [
        None,
        Some(("if-none-match", "*")),
        Some(("if-match", "\"x\"")),
    ] {
        let mut read = client.get(format!("{base}/operations/{forged}/result"));
        if let Some((name, value)) = condition {
            read = read.header(name, value);
        }
        assert_problem(read.send().await.unwrap(), 502, "bad-stored-message").await;
    }
}
