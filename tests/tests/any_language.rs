//! A worker that is not the Rust library: `tests/python/worker.py`, written with the plain NATS
//! client nats-py from the wire contract (docs/wire-contract.md) alone, answers gateway requests end to end.

use std::time::Duration;

use gateway_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const ROUTES: &str = "[[route]]\nname = \"py\"\nmethod = \"POST\"\npath = \"/py/{item}\"\n\
                      max_body = \"4MiB\"\ninline_max = \"16KiB\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_worker_on_a_plain_nats_client_answers_requests() {
    let TestGateway { nats, gw } = TestGateway::builder(ROUTES).start().await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/worker.py");
    let mut worker = python_command()
        .arg(script)
        .args([nats.url(), "py".to_owned()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker");
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
    assert_eq!(ready.unwrap().unwrap().as_deref(), Some("ready"));

    let http = http();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = http
            .post(gw.url(&format!("/py/item-{i}?n={i}")))
            .header("idempotency-key", format!("\"py-{i}\""))
            .body(format!("payload {i}"))
            .send()
            .await
            .unwrap();
        ids.push(id_of(r).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let statuses = poll_until_terminal(&gw.base, id, Duration::from_secs(20)).await;
        assert_eq!(statuses.last().unwrap(), "succeeded");
        let result = get_result(&gw.base, id).await;
        assert_eq!(result.status(), 201);
        let body = json(result).await;
        assert_eq!(body["handled_by"], "python");
        assert_eq!(body["operation_id"], *id);
        assert_eq!(body["path"], format!("/py/item-{i}"));
        assert_eq!(body["query"], format!("n={i}"));
        assert_eq!(body["echo"], format!("payload {i}"));
    }
    // Submits `body` to `path` and waits for its result.
    let handled = |path: &'static str, key: &'static str, body: Vec<u8>| {
        let (http, base) = (http.clone(), gw.base.clone());
        async move {
            let r = http
                .post(format!("{base}{path}"))
                .header("idempotency-key", format!("\"{key}\""))
                .body(body)
                .send()
                .await
                .unwrap();
            let id = id_of(r).await;
            let statuses = poll_until_terminal(&base, &id, Duration::from_secs(20)).await;
            assert_eq!(statuses.last().unwrap(), "succeeded");
            get_result(&base, &id).await
        }
    };
    // A body too large for a message: the worker reads it from the Object Store (contract 3).
    let large: Vec<u8> = (0..200 * 1024).map(|i| (i % 253) as u8).collect();
    let body = json(handled("/py/large", "py-large", large.clone()).await).await;
    assert_eq!(body["size"], large.len());
    assert_eq!(
        body["sha256"],
        data_encoding::HEXLOWER.encode(&<sha2::Sha256 as sha2::Digest>::digest(&large))
    );
    // A reply too large for a message: the worker stores it in the bucket the request names.
    let large: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    let result = handled("/py/large?raw", "py-large-reply", large.clone()).await;
    assert_eq!(result.content_length(), Some(large.len() as u64));
    assert!(
        result.bytes().await.unwrap() == large,
        "the reply came back whole"
    );
    // Exactly one stored result per operation.
    let js = nats.jetstream().await;
    let stored = gateway_tests::stream_messages(&js, "GW_OUTCOMES").await;
    assert_eq!(stored, 7);
}
