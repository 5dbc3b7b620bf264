//! The OpenAPI document against the running gateway: `/openapi.json` is what
//! `gateway openapi --config FILE` prints for the same routes, schemathesis (property-based, from
//! the document) finds no 5xx and no response that breaks the document, through the example
//! routes with workers answering, and a client generated from it works.
//!
//! Two of schemathesis's checks do not apply to this API and are excluded, for reasons of the
//! contract rather than of the document:
//! - `use_after_free`: `DELETE /operations/{id}` cancels; the operation stays readable, with
//!   status `cancelled`, as documented.
//! - `positive_data_acceptance`: a request valid by the schema can be refused by state or policy
//!   that no schema expresses: an Idempotency-Key reused for another body (422), a `Callback-Url`
//!   outside the allow-list (400), the result of a cancelled operation (410).

use std::time::Duration;

use gateway_tests::{
    TestGateway, TestWorker, assert_problem, echo, http, stream_messages, venv_tool, worker_config,
};
use handlers::contract::DEFAULT_REQUESTS_STREAM;

/// A client made by a mainstream generator (openapi-python-client, from scripts/install-tools)
/// from the live `/openapi.json` submits, polls and reads the result through the example routes:
/// every route's body has a schema per media type and replies are bytes, so nothing the client
/// needs is left out. (Before, the generator skipped every submit for "Missing schema" and
/// dropped the result.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_python_client_submits_polls_and_reads_the_result() {
    let TestGateway { nats, gw } = TestGateway::builder(&dev_routes()).spawn(GATEWAY_BIN).await;
    let _worker = TestWorker::start(&nats, worker_config(), "orders", echo()).await;
    let document = http()
        .get(gw.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let spec = scratch.path().join("openapi.json");
    std::fs::write(&spec, document).unwrap();
    let package = scratch.path().join("gateway_client");
    let generator = venv_tool("openapi-python-client");
    let venv_bin = std::path::Path::new(generator.get_program())
        .parent()
        .unwrap()
        .to_owned();
    // The generator formats its output with ruff, from the same .venv.
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let base = gw.base.clone();
    let (generated, driven) = tokio::task::spawn_blocking(move || {
        let mut generator = generator;
        let generated = generator
            .current_dir(scratch.path())
            .args(["generate", "--meta", "none", "--path"])
            .arg(&spec)
            .arg("--output-path")
            .arg(&package)
            .env("PATH", &path)
            .output()
            .expect("run openapi-python-client");
        let driver = concat!(env!("CARGO_MANIFEST_DIR"), "/python/generated_client.py");
        let driven = std::process::Command::new(venv_bin.join("python"))
            .arg(driver)
            .arg(&base)
            .env("PYTHONPATH", scratch.path())
            .output()
            .expect("run the generated client");
        (generated, driven)
    })
    .await
    .unwrap();
    let generator_said = String::from_utf8_lossy(&generated.stdout).into_owned()
        + &String::from_utf8_lossy(&generated.stderr);
    assert!(generated.status.success(), "{generator_said}");
    assert!(
        !generator_said.contains("Missing schema"),
        "every body has a schema: {generator_said}"
    );
    assert!(
        driven.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&driven.stdout),
        String::from_utf8_lossy(&driven.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_slice(driven.stdout.trim_ascii()).expect("one JSON line");
    assert_eq!(seen["submit_status"], 202, "{seen}");
    assert_eq!(seen["status"], "succeeded", "{seen}");
    assert_eq!(seen["result_status"], 200, "{seen}");
    assert_eq!(
        seen["parsed_is_file"], true,
        "the reply is read as bytes: {seen}"
    );
    assert_eq!(
        seen["result_body"],
        serde_json::json!({"sku": "generated", "qty": 2}),
        "the worker echoes the body: {seen}"
    );
}

/// A route that names a JSON Schema (the example `orders`) takes only JSON that meets it: a body
/// that breaks it is `400 invalid-body` listing where (RFC 9457 `errors`, JSON Pointers), a body
/// that is not JSON is `400` too, another media type `415`; none of them is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_schema_is_checked_before_anything_is_written() {
    let TestGateway { nats, gw } = TestGateway::builder(&dev_routes()).start().await;
    let post = |content_type: Option<&'static str>, body: &'static str| {
        let mut request = http().post(gw.url("/orders")).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        async move { request.send().await.unwrap() }
    };
    let json = Some("application/json");
    assert_eq!(post(json, r#"{"sku":"tea","qty":2}"#).await.status(), 202);
    let vendor = Some("application/vnd.order+json; charset=utf-8");
    assert_eq!(post(vendor, r#"{"sku":"tea","qty":3}"#).await.status(), 202);

    let broken = assert_problem(
        post(json, r#"{"sku":"","qty":0}"#).await,
        400,
        "invalid-body",
    )
    .await;
    let pointers: Vec<&str> = broken["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert_eq!(pointers, ["#/sku", "#/qty"], "{broken}");
    let missing = assert_problem(post(json, r#"{"qty":1}"#).await, 400, "invalid-body").await;
    assert_eq!(missing["errors"][0]["pointer"], "#", "{missing}");
    let not_json = assert_problem(post(json, "{sku").await, 400, "invalid-body").await;
    assert!(
        not_json["detail"].as_str().unwrap().contains("not JSON"),
        "{not_json}"
    );
    for content_type in [Some("text/plain"), None] {
        let r = post(content_type, r#"{"sku":"tea","qty":2}"#).await;
        assert_problem(r, 415, "unsupported-media-type").await;
    }
    assert_eq!(
        stream_messages(&nats.jetstream().await, DEFAULT_REQUESTS_STREAM).await,
        2,
        "only the two bodies that meet the schema were written"
    );
}

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");

/// The example routes, their schema file named by absolute path (the harness writes the routes
/// to a file of its own, elsewhere).
fn dev_routes() -> String {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway/config");
    std::fs::read_to_string(format!("{config}/dev.toml"))
        .expect("read the example routes")
        .replace(
            "request_schema = \"schemas/",
            &format!("request_schema = \"{config}/schemas/"),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_gateway_conforms_to_its_openapi_document() {
    conforms(&dev_routes(), &[]).await;
}

/// With `[auth]`: the document declares the API key and bearer schemes, schemathesis calls with
/// an API key, and its `ignored_auth` check sends requests without (or with broken) credentials,
/// which must be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authenticated_gateway_conforms_and_refuses_missing_credentials() {
    const KEY: &str = "k-schemathesis-71c2";
    let routes = format!(
        "{}\n[auth]\n[[auth.api_key]]\ntenant = \"fuzz\"\nsha256 = \"{}\"\n",
        dev_routes(),
        sha256_hex(KEY)
    );
    conforms(&routes, &["-H", &format!("X-API-Key: {KEY}")]).await;
}

fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(key.as_bytes()))
}

/// Runs a gateway with these routes and workers for `orders` and `reports`, checks that
/// `/openapi.json` is what `gateway openapi` prints, and runs schemathesis (`extra`: its
/// arguments, such as credentials).
async fn conforms(routes_toml: &str, extra: &[&str]) {
    // Long polls end within schemathesis' 10 s read timeout even on an operation that will not
    // end meanwhile (a delayed start it asked for with `Delay`).
    let TestGateway { nats, gw } = TestGateway::builder(routes_toml)
        .env("GATEWAY_MAX_WAIT", "3s")
        .spawn(GATEWAY_BIN)
        .await;
    let _workers = [
        TestWorker::start(&nats, worker_config(), "orders", echo()).await,
        TestWorker::start(&nats, worker_config(), "reports", echo()).await,
    ];

    let served = http().get(gw.url("/openapi.json")).send().await.unwrap();
    assert_eq!(served.status(), 200);
    let served = served.text().await.unwrap();
    let printed = std::process::Command::new(GATEWAY_BIN)
        .args(["openapi", "--config"])
        .arg(gw.routes_path())
        .output()
        .expect("run gateway openapi");
    assert!(printed.status.success());
    assert_eq!(
        served.trim_end(),
        String::from_utf8(printed.stdout).unwrap().trim_end(),
        "/openapi.json is what `gateway openapi` prints for the same routes"
    );

    let base = gw.base.clone();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    // Schemathesis keeps a cache in its working directory; not in the repository.
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().to_owned();
    let run = tokio::task::spawn_blocking(move || {
        venv_tool("schemathesis")
            .current_dir(cwd)
            .args(["run", &format!("{base}/openapi.json")])
            .args(["--checks", "all"])
            .args([
                "--exclude-checks",
                "use_after_free,positive_data_acceptance",
            ])
            .args(["--max-examples", "50", "--workers", "1", "--no-color"])
            .args(&extra)
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .expect("run schemathesis")
    });
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("schemathesis finishes")
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Warnings (say, an operation that mostly answered 404 to random ids) are not failures.
    assert!(
        report.contains("Test cases:") && !report.contains("FAILURES"),
        "{report}"
    );
}
