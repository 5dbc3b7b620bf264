//! The gateway against a raw JetStream baseline, measured in one run on one machine.
//!
//! Starts its own nats-server (file storage, R1, like the tests), two `gateway serve` processes
//! (`--gateway-bin`, the release build) and an echo worker, then measures, each phase for
//! `--seconds`:
//!
//! | phase | baseline (async-nats) | gateway (HTTP/1.1 keep-alive, hyper) |
//! |---|---|---|
//! | peak accept, 256 B and 4 KiB | create-if-absent publish of the same message | `POST` → 202 |
//! | peak status read | the lookup's two direct gets | `GET /operations/{id}` |
//! | latency at half the baseline's peak (open model) | publish | `POST` |
//!
//! and the floor under the gateway: a bare HTTP bridge (`bridge.rs`, a process of its own) that
//! makes only the gateway's one publish per `POST`, at peak (throughput and CPU per request) and
//! at half the gateway's own peak (latency), driven by the same HTTP load as the gateway;
//! plus end-to-end time (accept on gateway A, worker reply, result visible through gateway B),
//! the gateway's CPU and RSS at a steady 1,000 requests/s, and overload at twice its peak. Writes
//! `results.json`, `results.md` and `bench.svg` to `--out` (default `tests/bench-results`).
//!
//! Usage: bench --gateway-bin target/release/gateway [--quick] [--seconds N] [--concurrency N]
//! [--gateway-threads N] [--out DIR]; `bench --bridge <nats-url>` is the bridge process.
//! (`scripts/bench` builds and runs it.)

mod bridge;
mod clients;
mod load;
mod peer;
mod procstat;
mod report;
mod waiters;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use gateway::config::{ByteSize, RouteConfig};
use gateway_tests::{GatewayProcess, Nats, TestGateway, TestWorker, worker_config};
use handlers::contract::{DEFAULT_REQUESTS_STREAM, DEFAULT_RESULTS_STREAM, Subjects};
use handlers::{Request, Response};

use crate::clients::{EndToEnd, Http, Ids, RawLookup, RawPublish, Reuse, StatusGet, Submit};
use crate::load::{Model, drive};
use crate::report::Report;

const ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
max_body = "64KiB"

[[route]]
name = "e2e"
method = "POST"
path = "/e2e"

[[route]]
name = "wait"
method = "POST"
path = "/wait"

[[route]]
name = "upload"
method = "POST"
path = "/upload"
max_body = "256MiB"
inline_max = "64KiB"
"#;

struct Options {
    gateway_bin: String,
    /// `GATEWAY_WORKER_THREADS` of the measured gateways (their default: one per core).
    gateway_threads: Option<String>,
    seconds: u64,
    concurrency: usize,
    out: PathBuf,
    quick: bool,
    /// Waiters parked at once in the waiters phase (default 10,000; 2,000 with `--quick`).
    waiters: Option<usize>,
    /// Where `scripts/install-restate` put the peer; no peer phases without it.
    restate_dir: Option<PathBuf>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        gateway_bin: "target/release/gateway".into(),
        gateway_threads: None,
        seconds: 8,
        concurrency: 32,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench-results"),
        quick: false,
        waiters: None,
        restate_dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--quick" {
            o.quick = true;
            o.seconds = 2;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--gateway-bin" => o.gateway_bin = value,
            "--gateway-threads" => o.gateway_threads = Some(value),
            "--seconds" => o.seconds = value.parse()?,
            "--concurrency" => o.concurrency = value.parse()?,
            "--out" => o.out = value.into(),
            "--waiters" => o.waiters = Some(value.parse()?),
            "--restate-dir" => o.restate_dir = Some(value.into()),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(o)
}

/// A JSON body of exactly `size` bytes (at least 10).
fn payload(size: usize) -> Bytes {
    let filler = "x".repeat(size - r#"{"pad":""}"#.len());
    Bytes::from(format!(r#"{{"pad":"{filler}"}}"#))
}

fn bench_route() -> RouteConfig {
    RouteConfig {
        name: "orders".into(),
        method: "POST".into(),
        path: "/orders".into(),
        require_idempotency_key: false,
        public: false,
        retention: Duration::from_secs(24 * 3600),
        timeout: Duration::from_secs(300),
        max_body: ByteSize(64 * 1024),
        inline_max: None,
        wait: None,
        callback_url: None,
        consumer: None,
        state: None,
        request_schema: None,
        body_schema: None,
        retry: None,
        max_delay: None,
    }
}

/// A pause after a phase that overloads the gateway, so that its queue does not reach into the
/// next phase's latencies.
const SETTLE: Duration = Duration::from_secs(3);

/// How many of the most recent keys the replay phase retries.
const RECENT_RETRIES: u64 = 20_000;

fn taken(ids: &Ids) -> Arc<Vec<String>> {
    Arc::new(std::mem::take(&mut *ids.lock().unwrap()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    if let (Some(flag), Some(url)) = (args.next(), args.next())
        && flag == "--bridge"
    {
        return bridge::serve(&url).await;
    }
    let o = options()?;
    let d = Duration::from_secs(o.seconds);
    let c = o.concurrency;
    let nats = Nats::start().await;
    let env: Vec<(&str, &str)> = o
        .gateway_threads
        .as_deref()
        .map(|t| ("GATEWAY_WORKER_THREADS", t))
        .into_iter()
        .collect();
    let gateway = || {
        TestGateway::builder(ROUTES)
            .nats(&nats)
            .envs(env.iter().copied())
            // The waiters phase parks far more than one tenant may by default.
            .flags([
                "--max-waiters",
                "1000000",
                "--max-waiters-per-tenant",
                "1000000",
            ])
    };
    let gw_a = gateway().spawn(&o.gateway_bin).await;
    let gw_b = gateway().spawn(&o.gateway_bin).await;
    let (a, b) = (gw_a.addr(), gw_b.addr());
    let pid = gw_a.pid().context("gateway pid")?;
    let _worker = TestWorker::start(&nats, worker_config(), "e2e", |r: Request| async move {
        Ok(Response {
            body: r.body,
            ..Response::new(200)
        })
    })
    .await;
    let js = nats.jetstream().await;
    let client = nats.client().await;
    let subjects = Subjects::default();
    let mut report = Report::new(&o.seconds, c, o.quick);
    eprintln!(
        "nats-server 2.15.1, file storage, R1; {} s per phase, concurrency {c}",
        o.seconds
    );

    let raw = |n: usize, size: usize, prefix: &str, ids: Option<Ids>| {
        (0..n)
            .map(|_| RawPublish {
                js: js.clone(),
                subjects: subjects.clone(),
                route: bench_route(),
                body: payload(size),
                key_prefix: prefix.to_owned(),
                ids: ids.clone(),
            })
            .collect::<Vec<_>>()
    };
    let to_gateway =
        |n: usize, size: usize, prefix: &str, reuse: Option<Reuse>, ids: Option<Ids>| {
            (0..n)
                .map(|_| Submit {
                    reuse,
                    ids: ids.clone(),
                    ..Submit::new(a, "/orders", prefix, payload(size))
                })
                .collect::<Vec<_>>()
        };
    let submit = |n: usize, size: usize, prefix: &str, ids: Option<Ids>| {
        to_gateway(n, size, prefix, None, ids)
    };

    // Peak throughput, closed model.
    let raw_ids: Ids = Arc::default();
    let pids = [
        ("nats-server", nats.pid().context("nats pid")?),
        ("gateway", pid),
        ("load generator", std::process::id()),
    ];
    let (run, cpu) = procstat::cpu_during(
        &pids,
        drive(
            raw(c, 256, "raw256", Some(raw_ids.clone())),
            Model::Closed,
            d,
        ),
    )
    .await;
    report.cpu_per_op("raw publish 256 B", run.ok, &cpu);
    let raw_256 = report.record("raw publish 256 B", run);
    report.record(
        "raw publish 4 KiB",
        drive(raw(c, 4096, "raw4k", None), Model::Closed, d).await,
    );
    let raw_ids = taken(&raw_ids);
    let lookups = (0..c)
        .map(|_| RawLookup {
            client: client.clone(),
            subjects: subjects.clone(),
            ids: raw_ids.clone(),
        })
        .collect();
    report.record("raw status lookup", drive(lookups, Model::Closed, d).await);

    let gw_ids: Ids = Arc::default();
    let (run, cpu) = procstat::cpu_during(
        &pids,
        drive(
            submit(c, 256, "gw256", Some(gw_ids.clone())),
            Model::Closed,
            d,
        ),
    )
    .await;
    report.cpu_per_op("gateway accept 256 B", run.ok, &cpu);
    // Every key below this sequence number was accepted (each task's last request may not have).
    let accepted_keys = run.ok.saturating_sub(c as u64).max(1);
    let gw_256 = report.record("gateway accept 256 B", run);
    // A client's retries: the same requests with the same keys again, each answered from the
    // operation its key names. Retries come soon after the first attempt: the most recent keys
    // (the gateway reads those before writing); then the oldest, which it no longer recalls.
    let recent = RECENT_RETRIES.min(accepted_keys);
    for (name, from) in [
        ("gateway replay 256 B", accepted_keys - recent),
        ("gateway replay 256 B, old keys", 0),
    ] {
        let reuse = Reuse {
            from,
            count: recent,
        };
        let (run, cpu) = procstat::cpu_during(
            &pids,
            drive(
                to_gateway(c, 256, "gw256", Some(reuse), None),
                Model::Closed,
                d,
            ),
        )
        .await;
        report.cpu_per_op(name, run.ok, &cpu);
        report.record(name, run);
    }
    report.record(
        "gateway accept 4 KiB",
        drive(submit(c, 4096, "gw4k", None), Model::Closed, d).await,
    );
    // The floor: the bare bridge under the same load, its CPU counted as the gateway's is.
    // As many runtime threads as the gateway's (tokio reads TOKIO_WORKER_THREADS).
    let mut bridge_process = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--bridge", &nats.url()])
        .envs(
            o.gateway_threads
                .iter()
                .map(|t| ("TOKIO_WORKER_THREADS", t)),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let bridge_addr: std::net::SocketAddr = {
        use tokio::io::AsyncBufReadExt as _;
        let stdout = bridge_process.stdout.take().context("bridge stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        lines
            .next_line()
            .await?
            .context("the bridge's address")?
            .parse()?
    };
    let bridge_pids = [
        ("nats-server", nats.pid().context("nats pid")?),
        ("bridge", bridge_process.id().context("bridge pid")?),
        ("load generator", std::process::id()),
    ];
    let to_bridge = |n: usize, prefix: &str| {
        (0..n)
            .map(|_| Submit::new(bridge_addr, "/orders", prefix, payload(256)))
            .collect::<Vec<_>>()
    };
    let (run, cpu) =
        procstat::cpu_during(&bridge_pids, drive(to_bridge(c, "br256"), Model::Closed, d)).await;
    report.cpu_per_op("bare bridge accept 256 B", run.ok, &cpu);
    report.record("bare bridge accept 256 B", run);

    let gw_ids = taken(&gw_ids);
    let reads = (0..c)
        .map(|_| StatusGet {
            http: Http::new(a),
            ids: gw_ids.clone(),
        })
        .collect();
    report.record("gateway status GET", drive(reads, Model::Closed, d).await);

    // Latency at half the baseline's peak, open model. Four times the tasks (each its own
    // connection), so that the generator itself never queues requests behind a slow one.
    let half = raw_256 / 2.0;
    report.set("half_peak_rate", half);
    report.record(
        "raw publish 256 B @ half peak",
        drive(
            raw(4 * c, 256, "rawopen", None),
            Model::Open { rate: half },
            d,
        )
        .await,
    );
    report.record(
        "gateway accept 256 B @ half peak",
        drive(
            submit(4 * c, 256, "gwopen", None),
            Model::Open { rate: half },
            d,
        )
        .await,
    );

    // Latency at half the gateway's own peak (a rate both can serve, so the phase measures
    // them, not a queue): the gateway and the bare bridge.
    let gw_half = gw_256 / 2.0;
    report.set("gateway_half_peak_rate", gw_half);
    // The phase before queued more than the gateway serves: let that queue drain first.
    tokio::time::sleep(SETTLE).await;
    report.record(
        "gateway accept 256 B @ half its peak",
        drive(
            submit(4 * c, 256, "gwhalf", None),
            Model::Open { rate: gw_half },
            d,
        )
        .await,
    );
    report.record(
        "bare bridge accept 256 B @ half the gateway's peak",
        drive(to_bridge(4 * c, "brhalf"), Model::Open { rate: gw_half }, d).await,
    );
    drop(bridge_process);

    // End to end: accept on A, echo worker, result visible through B (polled every 1 ms).
    let e2e = (0..16)
        .map(|_| EndToEnd {
            submit: Http::new(a),
            read: Http::new(b),
            body: payload(256),
            key_prefix: "e2e".into(),
        })
        .collect();
    report.record(
        "end to end via two gateways @ 100/s",
        drive(e2e, Model::Open { rate: 100.0 }, d).await,
    );

    // CPU and memory at a steady 1,000 requests/s.
    let steady = drive(
        submit(16, 256, "steady", None),
        Model::Open { rate: 1000.0 },
        d,
    );
    let (run, first, last, peak) = procstat::watch_during(pid, steady).await;
    report.record("gateway accept @ 1,000/s", run);
    let cores = (last.cpu - first.cpu).as_secs_f64() / (last.at - first.at).as_secs_f64();
    report.set("steady_cores", cores);
    report.set("steady_rss_mb", last.rss_bytes as f64 / 1e6);
    report.set("steady_peak_rss_mb", peak as f64 / 1e6);
    eprintln!(
        "gateway at 1,000/s: {cores:.3} cores, RSS {:.1} MB (peak {:.1} MB)",
        last.rss_bytes as f64 / 1e6,
        peak as f64 / 1e6
    );

    // Overload: twice the gateway's peak, from many connections.
    let overload_ids: Ids = Arc::default();
    let before = gateway_tests::stream_messages(&js, DEFAULT_REQUESTS_STREAM).await;
    let overload = drive(
        submit(512, 256, "overload", Some(overload_ids.clone())),
        Model::Open { rate: 2.0 * gw_256 },
        d,
    );
    let (over, _, _, peak) = procstat::watch_during(pid, overload).await;
    let accepted = over.ok;
    let shed = over.shed;
    report.record("gateway accept @ 2x its peak", over);
    let after = gateway_tests::stream_messages(&js, DEFAULT_REQUESTS_STREAM).await;
    // Every 202 must have its message: the stream grew by at least the number of 202s, and each
    // collected id (the first 50,000) is found by a status lookup.
    let ids = taken(&overload_ids);
    let missing = futures::stream::iter(ids.iter())
        .map(|id| {
            let (client, subjects) = (&client, &subjects);
            async move {
                let token =
                    gateway::operations::idempotency::key_token_of(id).expect("gateway-made id");
                let pattern = subjects.request_any_route(token);
                let found =
                    handlers::jetstream::last_matching(client, DEFAULT_REQUESTS_STREAM, &pattern)
                        .await;
                u64::from(!matches!(found, Ok(Some(_))))
            }
        })
        .buffer_unordered(32)
        .fold(0u64, |sum, m| async move { sum + m })
        .await;
    report.set("overload_accepted", accepted as f64);
    report.set("overload_shed", shed as f64);
    report.set("overload_stream_growth", (after - before) as f64);
    report.set("overload_checked_ids", ids.len() as f64);
    report.set("overload_missing", missing as f64);
    report.set("overload_peak_rss_mb", peak as f64 / 1e6);
    eprintln!(
        "overload: {accepted} accepted, {shed} shed with Retry-After, stream +{}, {missing} of {} checked 202s missing, peak RSS {:.1} MB",
        after - before,
        ids.len(),
        peak as f64 / 1e6
    );

    durable(&o, &env, c, &mut report).await?;
    if let Some(dir) = &o.restate_dir {
        restate(dir, c, d, &mut report).await?;
    }
    batch_vs_singles(a, &pids, c, &mut report).await?;
    let uploaded = large_upload(a, pid, &js, &mut report).await?;
    large_result(a, pid, &js, &uploaded, &mut report).await?;

    let waiters = o.waiters.unwrap_or(if o.quick { 2_000 } else { 10_000 });
    measure_waiters(&nats, &gw_b, waiters, &mut report).await?;

    report.write(&o.out)?;
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

/// Clients of the fsync-bound phases' second load: an fsync per answer rewards many requests in
/// flight (each batch or group commit then holds more), and 192 stays under the gateway's 256
/// in-flight permits.
const MANY_CLIENTS: usize = 192;
const FSYNC_MANY_SINGLE: &str = "gateway accept 256 B, fsync always, 192 clients";
const FSYNC_MANY_GROUPED: &str = "gateway accept 256 B, fsync always, group commit, 192 clients";
const FSYNC_MANY_RESTATE: &str = "Restate ingress accept 256 B, fsync, 192 clients";

/// Accepts with an fsync before every answer (nats-server's `sync_interval: always`, its own
/// server): the raw publish, the gateway publishing each request alone, and the gateway with
/// `GATEWAY_GROUP_COMMIT` (requests that arrive together in one atomic batch), at peak, with the
/// usual clients and with [`MANY_CLIENTS`].
async fn durable(
    o: &Options,
    env: &[(&str, &str)],
    c: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let d = Duration::from_secs(o.seconds);
    let nats = Nats::start_with_config("jetstream { sync_interval: always }").await;
    let gateway = |grouped: bool| {
        TestGateway::builder(ROUTES)
            .nats(&nats)
            .envs(env.iter().copied())
            .env("GATEWAY_GROUP_COMMIT", grouped.to_string())
            .spawn(&o.gateway_bin)
    };
    let (single, grouped) = (gateway(false).await, gateway(true).await);
    let js = nats.jetstream().await;
    let nats_pid = nats.pid().context("nats pid")?;
    let raw = (0..c)
        .map(|_| RawPublish {
            js: js.clone(),
            subjects: Subjects::default(),
            route: bench_route(),
            body: payload(256),
            key_prefix: "rawsync".into(),
            ids: None,
        })
        .collect::<Vec<_>>();
    let pids = [
        ("nats-server", nats_pid),
        ("load generator", std::process::id()),
    ];
    let (run, cpu) = procstat::cpu_during(&pids, drive(raw, Model::Closed, d)).await;
    report.cpu_per_op("raw publish 256 B, fsync always", run.ok, &cpu);
    report.record("raw publish 256 B, fsync always", run);
    for (name, gw, c) in [
        ("gateway accept 256 B, fsync always", &single, c),
        (
            "gateway accept 256 B, fsync always, group commit",
            &grouped,
            c,
        ),
        (FSYNC_MANY_SINGLE, &single, MANY_CLIENTS),
        (FSYNC_MANY_GROUPED, &grouped, MANY_CLIENTS),
    ] {
        let clients = (0..c)
            .map(|_| Submit::new(gw.addr(), "/orders", &name.replace(' ', ""), payload(256)))
            .collect::<Vec<_>>();
        let pids = [
            ("nats-server", nats_pid),
            ("gateway", gw.pid().context("gateway pid")?),
            ("load generator", std::process::id()),
        ];
        let (run, cpu) = procstat::cpu_during(&pids, drive(clients, Model::Closed, d)).await;
        report.cpu_per_op(name, run.ok, &cpu);
        report.record(name, run);
    }
    Ok(())
}

/// The peer (see `peer.rs`): Restate's ingress accepting the same 256 B requests with unique
/// idempotency keys from the same load, with its log's fsync off and on.
async fn restate(
    dir: &std::path::Path,
    c: usize,
    d: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    for (fsync, name, c) in [
        (false, "Restate ingress accept 256 B, no fsync", c),
        (true, "Restate ingress accept 256 B, fsync", c),
        (true, FSYNC_MANY_RESTATE, MANY_CLIENTS),
    ] {
        let restate = peer::Restate::start(dir, fsync).await?;
        let clients = (0..c)
            .map(|_| Submit::new(restate.ingress, peer::SEND_PATH, "restate", payload(256)))
            .collect::<Vec<_>>();
        let pids = [
            ("restate-server", restate.pid().context("restate pid")?),
            ("load generator", std::process::id()),
        ];
        let (run, cpu) = procstat::cpu_during(&pids, drive(clients, Model::Closed, d)).await;
        report.cpu_per_op(name, run.ok, &cpu);
        report.record(name, run);
    }
    Ok(())
}

/// A 50 MiB body through the gateway (a route with `inline_max`, so it streams into the Object
/// Store) against a raw Object Store put of the same bytes from memory, one after the other:
/// throughput of each, and how much the gateway's RSS grew meanwhile (sampled every 100 ms).
async fn large_upload(
    gateway: std::net::SocketAddr,
    pid: u32,
    js: &async_nats::jetstream::Context,
    report: &mut Report,
) -> anyhow::Result<String> {
    const SIZE: usize = 50 << 20;
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let raw_store = js
        .create_object_store(async_nats::jetstream::object_store::Config {
            bucket: "BENCH_RAW".into(),
            ..Default::default()
        })
        .await?;
    let started = std::time::Instant::now();
    raw_store.put("raw", &mut &body[..]).await?;
    let raw = started.elapsed().as_secs_f64();
    let http = reqwest::Client::new();
    let send = http
        .post(format!("http://{gateway}/upload"))
        .header("idempotency-key", "\"bench-upload\"")
        .header("content-type", "application/octet-stream")
        .body(body)
        .send();
    let started = std::time::Instant::now();
    let (answer, first, _, peak) = procstat::watch_during(pid, send).await;
    let through = started.elapsed().as_secs_f64();
    let answer = answer?;
    anyhow::ensure!(answer.status() == 202, "the upload was not accepted");
    let accepted: serde_json::Value = answer.json().await?;
    let id = accepted["id"]
        .as_str()
        .context("an operation id")?
        .to_owned();
    let mb = SIZE as f64 / 1e6;
    report.set("upload_raw_mb_s", mb / raw);
    report.set("upload_gateway_mb_s", mb / through);
    report.set(
        "upload_rss_growth_mib",
        peak.saturating_sub(first.rss_bytes) as f64 / (1 << 20) as f64,
    );
    eprintln!(
        "50 MiB: raw Object Store put {:.0} MB/s, through the gateway {:.0} MB/s; gateway RSS +{:.1} MiB",
        mb / raw,
        mb / through,
        peak.saturating_sub(first.rss_bytes) as f64 / (1 << 20) as f64
    );
    Ok(id)
}

/// A 100 MiB reply kept in the Object Store, stored for operation `id` as a worker stores it
/// (`handlers::claim_check::store_reply`, then the record), read through the gateway's
/// `GET /result` against a raw Object Store get of the same object, one after the other, both
/// read to the end and dropped: throughput of each, and how much the gateway's RSS grew meanwhile.
async fn large_result(
    gateway: std::net::SocketAddr,
    pid: u32,
    js: &async_nats::jetstream::Context,
    id: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    const SIZE: usize = 100 << 20;
    let token = gateway::operations::idempotency::key_token_of(id).context("gateway-made id")?;
    let pattern = Subjects::default().request_any_route(token);
    let request =
        handlers::jetstream::last_matching(&js.client(), DEFAULT_REQUESTS_STREAM, &pattern)
            .await?
            .context("the uploaded request")?;
    let head = handlers::RequestHead::from_headers(&request.headers)?;
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 241) as u8).collect();
    let record = handlers::claim_check::store_reply(
        js,
        &head,
        handlers::ResultRecord::reply(200, None, body.into()),
        0,
    )
    .await?;
    let object = record.body_object.clone().context("stored as an object")?;
    handlers::jetstream::publish_result(
        js,
        head.reply_stream_or(DEFAULT_RESULTS_STREAM),
        &head.reply_subject,
        id,
        &record,
        None,
    )
    .await?;
    let started = std::time::Instant::now();
    let mut raw = js
        .get_object_store(&object.bucket)
        .await?
        .get(&object.name)
        .await?;
    let raw_read = tokio::io::copy(&mut raw, &mut tokio::io::sink()).await?;
    let raw_secs = started.elapsed().as_secs_f64();
    let read = async {
        let mut response = reqwest::get(format!("http://{gateway}/operations/{id}/result")).await?;
        anyhow::ensure!(response.status() == 200, "the result was not served");
        let mut read = 0u64;
        while let Some(chunk) = response.chunk().await? {
            read += chunk.len() as u64;
        }
        Ok(read)
    };
    let started = std::time::Instant::now();
    let (read, first, _, peak) = procstat::watch_during(pid, read).await;
    let through = started.elapsed().as_secs_f64();
    let read = read?;
    anyhow::ensure!(
        read == SIZE as u64 && raw_read == SIZE as u64,
        "read {read} and {raw_read} bytes of {SIZE}"
    );
    let mb = SIZE as f64 / 1e6;
    let growth = peak.saturating_sub(first.rss_bytes) as f64 / (1 << 20) as f64;
    report.set("result_raw_mb_s", mb / raw_secs);
    report.set("result_gateway_mb_s", mb / through);
    report.set("result_rss_growth_mib", growth);
    eprintln!(
        "100 MiB result: raw Object Store get {:.0} MB/s, through the gateway {:.0} MB/s; gateway RSS +{growth:.1} MiB",
        mb / raw_secs,
        mb / through,
    );
    Ok(())
}

/// Items of a measured batch: the most one may have.
const BATCH_ITEMS: usize = gateway::operations::MAX_BATCH_ITEMS;
/// Batches (and as many rounds of single submits) measured.
const BATCH_ROUNDS: usize = 5;

/// A batch of 999 × 256 B against 999 single submits of the same requests (`concurrency` at a
/// time), each side `BATCH_ROUNDS` times: wall time and CPU per item (gateway and nats-server),
/// both through one reqwest client.
async fn batch_vs_singles(
    gateway: std::net::SocketAddr,
    pids: &[(&'static str, u32)],
    concurrency: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let base = format!("http://{gateway}");
    let body = String::from_utf8(payload(256).to_vec())?;
    let item_body = serde_json::json!({ "data": body });
    let started = std::time::Instant::now();
    let (batches, cpu) = procstat::cpu_during(pids, async {
        let mut ok = 0;
        for round in 0..BATCH_ROUNDS {
            let items: Vec<_> = (0..BATCH_ITEMS)
                .map(|i| serde_json::json!({"idempotency_key": format!("bb{round}-{i}"), "body": item_body}))
                .collect();
            let r = http
                .post(format!("{base}/batches"))
                .json(&serde_json::json!({"route": "orders", "items": items}))
                .send()
                .await;
            ok += usize::from(r.is_ok_and(|r| r.status() == 202)) * BATCH_ITEMS;
        }
        ok
    })
    .await;
    let batch_secs = started.elapsed().as_secs_f64();
    report.cpu_per_op(
        "gateway batch of 999 × 256 B, per item",
        batches as u64,
        &cpu,
    );
    let started = std::time::Instant::now();
    let text = serde_json::to_string(&item_body)?;
    let (singles, cpu) = procstat::cpu_during(pids, async {
        futures::stream::iter(0..BATCH_ROUNDS * BATCH_ITEMS)
            .map(|i| {
                let (http, base, text) = (&http, &base, &text);
                async move {
                    let r = http
                        .post(format!("{base}/orders"))
                        .header("idempotency-key", format!("\"bs-{i}\""))
                        .header("content-type", "application/json")
                        .body(text.clone())
                        .send()
                        .await;
                    usize::from(r.is_ok_and(|r| r.status() == 202))
                }
            })
            .buffer_unordered(concurrency)
            .fold(0, |sum, ok| async move { sum + ok })
            .await
    })
    .await;
    let singles_secs = started.elapsed().as_secs_f64();
    report.cpu_per_op(
        "gateway single submits × 256 B, per item",
        singles as u64,
        &cpu,
    );
    let per_item = |secs: f64, n: usize| secs * 1e6 / n.max(1) as f64;
    report.set("batch_items_ok", batches as f64);
    report.set("batch_wall_us_per_item", per_item(batch_secs, batches));
    report.set("singles_items_ok", singles as f64);
    report.set("singles_wall_us_per_item", per_item(singles_secs, singles));
    eprintln!(
        "batches of {BATCH_ITEMS}: {batches} items in {batch_secs:.2} s; single submits ({concurrency} at a time): {singles} in {singles_secs:.2} s"
    );
    Ok(())
}

/// Memory per waiter, and delivery to all of them (see `waiters.rs`), on gateway B (which served
/// only reads so far), on a route of their own.
async fn measure_waiters(
    nats: &Nats,
    gateway: &GatewayProcess,
    n: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let pid = gateway.pid().context("gateway pid")?;
    let mut worker = None;
    let measured = waiters::measure(gateway.addr(), pid, "/wait", n, || async {
        worker = Some(
            TestWorker::start(nats, worker_config(), "wait", |_r: Request| async move {
                Ok(Response::text(200, "done"))
            })
            .await,
        );
    })
    .await;
    let per_waiter =
        (measured.rss_waiting.saturating_sub(measured.rss_before)) as f64 / measured.waiters as f64;
    report.set("waiters", measured.waiters as f64);
    report.set("waiters_rss_before_mb", measured.rss_before as f64 / 1e6);
    report.set("waiters_rss_waiting_mb", measured.rss_waiting as f64 / 1e6);
    report.set("waiter_rss_kb", per_waiter / 1e3);
    report.set("waiters_answered", measured.answered as f64);
    report.set("waiters_answer_secs", measured.answer_time.as_secs_f64());
    eprintln!(
        "{} waiters: RSS {:.1} MB before, {:.1} MB waiting ({:.1} KB each); {} answered in {:.1} s",
        measured.waiters,
        measured.rss_before as f64 / 1e6,
        measured.rss_waiting as f64 / 1e6,
        per_waiter / 1e3,
        measured.answered,
        measured.answer_time.as_secs_f64()
    );
    Ok(())
}
