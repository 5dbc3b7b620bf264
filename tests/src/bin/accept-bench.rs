//! Accept rate of the gateway next to the raw JetStream publish rate of the same messages, measured
//! in one run on one machine (ratios, not absolute numbers, are what carry over).
//!
//! Starts its own nats-server (file storage, R1, temp dir), then for `--seconds` each:
//! 1. raw: async-nats publishes what the gateway would write for a new key (same subject layout,
//!    same headers, create-if-absent condition, TTL), `--concurrency` publishes awaiting acks;
//! 2. gateway: a `gateway serve` process (`--gateway-bin`), driven over HTTP/1.1 keep-alive with
//!    the same concurrency, a new Idempotency-Key per request, counting 202s.
//!
//! Usage: accept-bench --gateway-bin target/release/gateway [--seconds 10] [--concurrency 32]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use gateway::idempotency::{RequestIdentity, key_token, new_operation_id};
use gateway_tests::{GatewayProcess, Nats, RoutesFile};
use handlers::contract::{Subjects, format_time, header};
use handlers::jetstream::{CreateOutcome, create_if_absent};

const ROUTES: &str = "[[route]]\nname = \"orders\"\nmethod = \"POST\"\npath = \"/orders\"\n";
const BODY: &[u8] = br#"{"sku":"tea","qty":2,"note":"benchmark payload of a typical small JSON order request body..."}"#;

struct Args {
    gateway_bin: String,
    seconds: u64,
    concurrency: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        gateway_bin: "target/release/gateway".into(),
        seconds: 10,
        concurrency: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--gateway-bin" => a.gateway_bin = value,
            "--seconds" => a.seconds = value.parse()?,
            "--concurrency" => a.concurrency = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Runs `op` from `concurrency` tasks for `duration`; returns successful operations per second.
async fn drive<F, Fut>(concurrency: usize, duration: Duration, op: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let ok = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, ok, seq) = (op.clone(), ok.clone(), seq.clone());
            tokio::spawn(async move {
                while start.elapsed() < duration {
                    if op(seq.fetch_add(1, Ordering::Relaxed)).await {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("load task");
    }
    ok.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let duration = Duration::from_secs(args.seconds);
    let nats = Nats::start().await;
    let routes = RoutesFile::new(ROUTES);
    // The gateway provisions the streams both phases write to.
    let gw = GatewayProcess::spawn(&args.gateway_bin, &nats.url(), &routes, &[]).await;
    let js = nats.jetstream().await;
    println!(
        "nats-server 2.15.1 (file storage, R1), {} s per phase, concurrency {}, body {} B",
        args.seconds,
        args.concurrency,
        BODY.len()
    );

    let subjects = Subjects::default();
    let raw = drive(args.concurrency, duration, move |i| {
        let (js, subjects) = (js.clone(), subjects.clone());
        async move {
            let key = format!("raw-{i}");
            let token = key_token("default", "orders", &key);
            let id = new_operation_id(&token);
            let fingerprint = RequestIdentity {
                method: "POST",
                path: "/orders",
                query: None,
                content_type: Some("application/json"),
                body: BODY,
            }
            .fingerprint();
            let mut h = async_nats::HeaderMap::new();
            for (name, value) in [
                (header::OPERATION_ID, id.as_str()),
                (header::ROUTE, "orders"),
                (header::METHOD, "POST"),
                (header::PATH, "/orders"),
                (header::CONTENT_TYPE, "application/json"),
                (header::REPLY_SUBJECT, &subjects.result(&id)),
                (
                    header::DEADLINE,
                    &format_time(time::OffsetDateTime::now_utc()),
                ),
                (header::RETENTION, "86400"),
                (header::TENANT, "default"),
                (header::IDEMPOTENCY_KEY, &key),
                (header::FINGERPRINT, &fingerprint),
            ] {
                h.insert(name, value);
            }
            let subject = subjects.request("orders", &token);
            matches!(
                create_if_absent(
                    &js,
                    subject,
                    h,
                    Bytes::from_static(BODY),
                    Some(Duration::from_secs(86400))
                )
                .await,
                Ok(CreateOutcome::Created)
            )
        }
    })
    .await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let url = gw.url("/orders");
    let accepted = drive(args.concurrency, duration, move |i| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .header("idempotency-key", format!("\"gw-{i}\""))
                .body(BODY)
                .send()
                .await;
            matches!(r, Ok(r) if r.status() == 202)
        }
    })
    .await;

    println!("raw JetStream create-if-absent publishes: {raw:>8.0} /s");
    println!("gateway 202 Accepted:                     {accepted:>8.0} /s");
    println!(
        "ratio gateway / raw:                      {:>8.2}",
        accepted / raw
    );
    Ok(())
}
