//! The gateway on a 3-node NATS cluster with R3 streams: two gateway processes and two workers,
//! each connected through a different node. Accept, status and result work through any gateway,
//! and keep working, with nothing lost, when the node leading the requests stream is killed
//! (SIGKILL) in the middle of a load. Then the node comes back and the cluster heals.

use std::collections::HashSet;
use std::time::Duration;

use gateway_tests::*;
use handlers::contract::{DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM};
use tokio::time::Instant;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");

/// The load: `LANES` clients at once, each starting a request every `PACE`, `OPS` in all
/// (about 10 s); the leader of the requests stream is killed `KILL_AFTER` into it.
const OPS: usize = 256;
const LANES: usize = 8;
const PACE: Duration = Duration::from_millis(250);
const KILL_AFTER: Duration = Duration::from_millis(3500);
/// Requests sent `BURST_GAP` apart around the kill (half before, half after).
const BURST: usize = 32;
const BURST_GAP: Duration = Duration::from_micros(500);
/// How long one client keeps retrying a 503 (or polling) before the test calls it lost.
const CLIENT_PATIENCE: Duration = Duration::from_secs(30);

/// What one client saw for one operation.
#[derive(Debug, Default)]
struct Outcome {
    key: String,
    body: String,
    id: Option<String>,
    /// When (into the load) each 503 answered the submit before the 202.
    submit_503_at: Vec<Duration>,
    /// The 202 that ended the retries was a replay: an earlier attempt that got 503 had written.
    replayed_after_503: bool,
    /// 503s answered to status and result reads.
    read_503: u32,
    /// Statuses read, in order, alternating between the gateways.
    statuses: Vec<String>,
    /// Anything the contract does not allow: lost, 404 after 202, wrong body, other codes.
    failures: Vec<String>,
    accepted_at: Option<Duration>,
}

/// One client's whole exchange for one operation: submit (retrying 503 with the same key, on the
/// other gateway), read the status through both gateways until it is terminal and twice more,
/// then read the result through both.
async fn run_operation(
    http: reqwest::Client,
    gateways: [String; 2],
    first: usize,
    key: String,
    body: String,
    load_start: Instant,
) -> Outcome {
    let mut out = Outcome {
        key,
        body,
        ..Default::default()
    };
    let deadline = Instant::now() + CLIENT_PATIENCE;
    let mut attempt = 0;
    let id = loop {
        let base = &gateways[(first + attempt) % 2];
        attempt += 1;
        let sent = http
            .post(format!("{base}/orders"))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("\"{}\"", out.key))
            .body(out.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 202 => {
                out.replayed_after_503 = !out.submit_503_at.is_empty()
                    && r.headers().get("idempotent-replayed").is_some();
                let location = r.headers()["location"].to_str().unwrap().to_owned();
                break location.trim_start_matches("/operations/").to_owned();
            }
            Ok(r) if r.status() == 503 => out.submit_503_at.push(load_start.elapsed()),
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                out.failures
                    .push(format!("submit answered {status}: {text}"));
                return out;
            }
            Err(e) => out.failures.push(format!("submit failed: {e}")),
        }
        if Instant::now() > deadline {
            out.failures
                .push(format!("never accepted after {attempt} attempts"));
            return out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    out.accepted_at = Some(load_start.elapsed());
    out.id = Some(id.clone());

    // Status, alternating gateways, starting with the one that did not accept.
    let mut reads = 0;
    let mut after_terminal = 0;
    while after_terminal < 2 {
        let via = (first + 1 + reads) % 2;
        let base = &gateways[via];
        reads += 1;
        match http.get(format!("{base}/operations/{id}")).send().await {
            Ok(r) if r.status() == 200 => {
                let status = json(r).await["status"].as_str().unwrap().to_owned();
                if status != "pending" {
                    after_terminal += 1;
                }
                out.statuses.push(status);
            }
            Ok(r) if r.status() == 503 => out.read_503 += 1,
            Ok(r) => out.failures.push(format!(
                "status read {reads} through gateway {via} answered {} after the 202",
                r.status()
            )),
            Err(e) => out.failures.push(format!("status read failed: {e}")),
        }
        if Instant::now() > deadline {
            out.failures.push(format!(
                "not terminal after {CLIENT_PATIENCE:?}: {:?}",
                out.statuses
            ));
            return out;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The result, through both gateways.
    for base in &gateways {
        loop {
            match http
                .get(format!("{base}/operations/{id}/result"))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => {
                    let echoed = json(r).await["echo"].as_str().unwrap_or("").to_owned();
                    if echoed != out.body {
                        out.failures.push(format!(
                            "result {echoed:?} is not the echo of {:?}",
                            out.body
                        ));
                    }
                    break;
                }
                Ok(r) if r.status() == 503 => out.read_503 += 1,
                Ok(r) => {
                    out.failures
                        .push(format!("result read answered {}", r.status()));
                    break;
                }
                Err(e) => out.failures.push(format!("result read failed: {e}")),
            }
            if Instant::now() > deadline {
                out.failures.push("result never readable".to_owned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    out
}

/// Reads an operation through a gateway until it answers 200 (503s are retried): its status.
async fn status_via(http: &reqwest::Client, base: &str, id: &str) -> String {
    eventually(
        &format!("status of {id} via {base}"),
        Duration::from_secs(20),
        || {
            let http = http.clone();
            let url = format!("{base}/operations/{id}");
            async move {
                let r = http.get(&url).send().await.ok()?;
                match r.status().as_u16() {
                    200 => Some(json(r).await["status"].as_str().unwrap().to_owned()),
                    503 => None,
                    other => panic!("{url} answered {other}"),
                }
            }
        },
    )
    .await
}

/// Every operation reads `succeeded` through this gateway.
async fn all_succeeded(base: &str, ids: &[&str]) {
    use futures::StreamExt;
    let http = &http();
    futures::stream::iter(ids)
        .for_each_concurrent(16, |id| async move {
            assert_eq!(
                status_via(http, base, id).await,
                "succeeded",
                "{id} via {base}"
            );
        })
        .await;
}

/// A gateway process on `routes` with R3 streams, connecting to `nats_url`.
fn cluster_gateway(routes: &str, nats_url: String) -> GatewayBuilder<NatsUrl> {
    TestGateway::builder(routes).nats_url(nats_url).envs([
        ("GATEWAY_STREAM_REPLICAS", "3"),
        ("RUST_LOG", "warn,gateway=info,tower_http=error"),
    ])
}

/// Two gateway processes on `routes`, each knowing every node and listing a different one
/// first, and their base URLs. One after the other: two processes creating the same R3 streams
/// at once both time out on nats-server 2.15.1 and retry for about 10 s.
async fn two_gateways(
    cluster: &NatsCluster,
    routes: &str,
) -> (GatewayProcess, GatewayProcess, [String; 2]) {
    let gateway = |nats_url| cluster_gateway(routes, nats_url);
    let a = gateway(cluster.url_list_from(0)).spawn(GATEWAY_BIN).await;
    let b = gateway(cluster.url_list_from(1)).spawn(GATEWAY_BIN).await;
    let bases = [a.base.clone(), b.base.clone()];
    (a, b, bases)
}

async fn messages_in(cluster: &NatsCluster, stream: &str) -> u64 {
    eventually(
        &format!("stream info of {stream}"),
        Duration::from_secs(20),
        || async { cluster.stream_info(stream).await.map(|i| i.state.messages) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_serves_through_any_node_and_survives_a_node_kill_mid_load() {
    let test_start = Instant::now();
    let mut cluster = NatsCluster::start(3).await;
    eprintln!(
        "cluster: {:?} up after {:?}",
        cluster.urls(),
        test_start.elapsed()
    );
    let (_a, _b, gateways) = two_gateways(&cluster, TEST_ROUTES).await;
    eprintln!("gateways ready after {:?}", test_start.elapsed());

    // Workers through the third node (and the second): R3 durable consumer from the stream.
    // Echoes the body, and counts how often each operation was handled.
    let echo = echo().json();
    let mut workers = Vec::new();
    for first in [2, 1] {
        let js = cluster.jetstream_from(first).await;
        workers.push(TestWorker::start_on(js, worker_config(), |w| {
            w.route("orders", echo.clone())
        }));
    }
    for stream in [DEFAULT_REQUESTS_STREAM, DEFAULT_OUTCOMES_STREAM] {
        let info = cluster.stream_info(stream).await.expect("stream exists");
        assert_eq!(info.config.num_replicas, 3, "{stream} is R3");
    }

    // Phase 1: accept through one gateway, status and result through the other, both ways.
    let http = http();
    let mut keys = HashSet::new();
    for (accept, read) in [(0, 1), (1, 0)] {
        let key = format!("phase1-{accept}");
        let body = format!(r#"{{"phase":1,"via":{accept}}}"#);
        let r = http
            .post(format!("{}/orders", gateways[accept]))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("\"{key}\""))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "accepted through gateway {accept}");
        keys.insert(key);
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let id = location.trim_start_matches("/operations/").to_owned();
        // The status resource exists at once on the other gateway.
        let first_read = http
            .get(format!("{}{location}", gateways[read]))
            .send()
            .await
            .unwrap();
        assert_eq!(first_read.status(), 200, "readable at once via {read}");
        let statuses = poll_until_terminal(&gateways[read], &id, Duration::from_secs(20)).await;
        assert_monotonic(&statuses);
        assert_eq!(statuses.last().unwrap(), "succeeded");
        let result = http
            .get(format!("{}{location}/result", gateways[read]))
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200);
        assert_eq!(json(result).await["echo"], body);
        assert_eq!(status_via(&http, &gateways[accept], &id).await, "succeeded");
    }
    // The workers' durable consumer takes the stream's replicas: a leader and two followers.
    let consumer = cluster
        .jetstream_from(0)
        .await
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            "test-orders",
            DEFAULT_REQUESTS_STREAM,
        )
        .await
        .expect("the workers' consumer exists")
        .info()
        .await
        .expect("consumer info")
        .clone();
    assert_eq!(
        consumer.cluster.map(|c| c.replicas.len()),
        Some(2),
        "the consumer is R3"
    );
    eprintln!("phase 1 done after {:?}", test_start.elapsed());

    // Phase 2: load over both gateways; the requests stream's leader is killed in the middle.
    let victim = cluster
        .stream_leader(DEFAULT_REQUESTS_STREAM)
        .await
        .expect("the requests stream has a leader");
    let results_leader = cluster.stream_leader(DEFAULT_OUTCOMES_STREAM).await;
    let load_start = Instant::now();
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..LANES {
        let gateways = gateways.clone();
        let client = gateway_tests::http();
        lanes.spawn(async move {
            let mut outcomes = Vec::new();
            for (n, i) in (lane..OPS).step_by(LANES).enumerate() {
                tokio::time::sleep_until(load_start + PACE * n as u32).await;
                let key = format!("load-{i}-{}", uuid::Uuid::new_v4().simple());
                let body = format!(r#"{{"op":{i},"lane":{lane},"key":"{key}"}}"#);
                let (client, gateways) = (client.clone(), gateways.clone());
                outcomes.push(run_operation(client, gateways, i % 2, key, body, load_start).await);
            }
            outcomes
        });
    }
    // A burst around the kill, one request every `BURST_GAP`, so that some publishes are in
    // flight on the dying leader: the gateway cannot know their outcome (503), and the retry
    // with the same key must find whatever was written.
    let (go, ready) = tokio::sync::watch::channel(false);
    for j in 0..BURST {
        let (client, gateways, mut ready) =
            (gateway_tests::http(), gateways.clone(), ready.clone());
        lanes.spawn(async move {
            let key = format!("burst-{j}-{}", uuid::Uuid::new_v4().simple());
            let body = format!(r#"{{"burst":{j},"key":"{key}"}}"#);
            ready.wait_for(|&go| go).await.expect("go");
            tokio::time::sleep(BURST_GAP * j as u32).await;
            vec![run_operation(client, gateways, j % 2, key, body, load_start).await]
        });
    }
    tokio::time::sleep_until(load_start + KILL_AFTER).await;
    go.send(true).expect("burst waits");
    tokio::time::sleep(BURST_GAP * (BURST / 2) as u32).await;
    let killed_at = load_start.elapsed();
    cluster.kill(victim).await;
    eprintln!(
        "killed node {victim} ({}), leader of {DEFAULT_REQUESTS_STREAM} (results leader: {results_leader:?}), {killed_at:?} into the load",
        cluster.server_name(victim)
    );
    let new_leader = eventually(
        "a new leader of the requests stream",
        Duration::from_secs(20),
        || async {
            cluster
                .stream_leader(DEFAULT_REQUESTS_STREAM)
                .await
                .filter(|&l| l != victim)
        },
    )
    .await;
    let leader_seen_at = load_start.elapsed();
    let mut outcomes = Vec::new();
    while let Some(lane) = lanes.join_next().await {
        outcomes.extend(lane.expect("lane runs"));
    }
    let load_time = load_start.elapsed();

    let mut all_503: Vec<Duration> = outcomes
        .iter()
        .flat_map(|o| o.submit_503_at.iter().copied())
        .collect();
    all_503.sort();
    let submit_503 = all_503.len();
    let retried = outcomes
        .iter()
        .filter(|o| !o.submit_503_at.is_empty())
        .count();
    let replayed = outcomes.iter().filter(|o| o.replayed_after_503).count();
    let read_503: u32 = outcomes.iter().map(|o| o.read_503).sum();
    let reads: usize = outcomes.iter().map(|o| o.statuses.len()).sum();
    let accepted_after_kill = outcomes
        .iter()
        .filter(|o| o.accepted_at.is_some_and(|t| t > killed_at))
        .count();
    eprintln!(
        "load: {} operations in {load_time:?}, {accepted_after_kill} accepted after the kill; \
         new leader node {new_leader} seen at {leader_seen_at:?}; {submit_503} submit 503s \
         over {retried} operations, from {:?} to {:?} ({replayed} retries found the earlier \
         attempt's write); {reads} status reads, {read_503} read 503s",
        outcomes.len(),
        all_503.first(),
        all_503.last(),
    );
    let failures: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.failures.is_empty())
        .map(|o| (&o.key, o.id.as_deref(), &o.failures, &o.statuses))
        .collect();
    assert!(
        failures.is_empty(),
        "{} operations broke the contract: {failures:#?}",
        failures.len()
    );
    assert_eq!(outcomes.len(), OPS + BURST);
    for o in &outcomes {
        assert_monotonic(&o.statuses);
        assert_eq!(
            o.statuses.last().map(String::as_str),
            Some("succeeded"),
            "{}: {:?}",
            o.key,
            o.statuses
        );
        assert!(keys.insert(o.key.clone()), "keys are unique");
    }

    // Nothing lost, nothing doubled: one request and one result per key, every operation
    // succeeded through both gateways, and the handler's conflicts are none.
    let ids: Vec<&str> = outcomes.iter().filter_map(|o| o.id.as_deref()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        OPS + BURST,
        "one id per key"
    );
    for base in &gateways {
        all_succeeded(base, &ids).await;
    }
    assert_eq!(
        messages_in(&cluster, DEFAULT_REQUESTS_STREAM).await,
        keys.len() as u64,
        "one request message per key"
    );
    assert_eq!(
        messages_in(&cluster, DEFAULT_OUTCOMES_STREAM).await,
        keys.len() as u64,
        "one result per operation"
    );
    let (conflicts, failed): (u64, u64) = workers.iter().fold((0, 0), |(c, f), w| {
        let stats = w.stats();
        (c + stats.conflicts, f + stats.failed)
    });
    assert_eq!(
        (conflicts, failed),
        (0, 0),
        "no conflicting or failed results"
    );
    let handled = echo.handled();
    let handled_twice = handled.values().filter(|&&n| n > 1).count();
    for id in &ids {
        assert!(handled.contains_key(*id), "{id} was handled");
    }
    eprintln!("{handled_twice} operations were handled more than once (redeliveries)");

    eprintln!("checks after the load done at {:?}", test_start.elapsed());

    // The killed node comes back and catches up; a gateway that knows only that node serves
    // every operation, and a new one, through it.
    cluster.restart(victim).await;
    for stream in [DEFAULT_REQUESTS_STREAM, DEFAULT_OUTCOMES_STREAM] {
        cluster
            .wait_stream_healthy(stream, Duration::from_secs(30))
            .await;
    }
    let healed_at = test_start.elapsed();
    eprintln!(
        "node {victim} restarted, streams healthy at {healed_at:?}; leader of \
         {DEFAULT_REQUESTS_STREAM} now {:?}",
        cluster.stream_leader(DEFAULT_REQUESTS_STREAM).await
    );
    let c = cluster_gateway(TEST_ROUTES, cluster.url(victim))
        .spawn(GATEWAY_BIN)
        .await;
    all_succeeded(&c.base, &ids).await;
    let r = http
        .post(c.url("/orders"))
        .header("idempotency-key", "\"after-heal\"")
        .body("healed")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let id = location.trim_start_matches("/operations/");
    let statuses = poll_until_terminal(&c.base, id, Duration::from_secs(20)).await;
    assert_eq!(statuses.last().unwrap(), "succeeded");
    assert_eq!(status_via(&http, &gateways[0], id).await, "succeeded");
    eprintln!(
        "healed at {healed_at:?}; test done after {:?}",
        test_start.elapsed()
    );
    for w in workers {
        w.stop().await;
    }
}

const LATER_ROUTES: &str = r#"
[[route]]
name = "later"
method = "POST"
path = "/later"
timeout = "60s"
retention = "1h"
max_delay = "1m"

[[schedule]]
name = "tick"
route = "later"
path = "/later"
every = "5s"
body = '{"tick": true}'
"#;

/// Delayed submits and schedule ticks pending while the requests stream's leader is killed (and
/// restarted): every delayed operation is accepted once, runs no sooner than it is due, and ends
/// `succeeded`; every tick of the schedule, run by two gateways, is one operation, none lost
/// (a tick that meets the election is submitted again until it lands), none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_starts_and_schedule_ticks_survive_a_leader_kill() {
    const DELAYED: usize = 20;
    let mut cluster = NatsCluster::start(3).await;
    let (_a, _b, gateways) = two_gateways(&cluster, LATER_ROUTES).await;
    let started = time::OffsetDateTime::now_utc().unix_timestamp();
    // Each call: the operation and when it came.
    let calls = std::sync::Arc::new(std::sync::Mutex::new(
        Vec::<(String, time::OffsetDateTime)>::new(),
    ));
    let noted = calls.clone();
    let js = cluster.jetstream_from(2).await;
    let _worker = TestWorker::start_on(js, worker_config(), move |w| {
        w.route("later", move |r: handlers::Request| {
            noted
                .lock()
                .unwrap()
                .push((r.operation_id.clone(), time::OffsetDateTime::now_utc()));
            async { Ok(handlers::Response::text(200, "done")) }
        })
    });

    // The worker's consumer exists before anything dies (a worker that cannot create it at
    // start stops).
    let consumer = format!("{}-later", worker_config().consumer_prefix);
    eventually("the worker's consumer", Duration::from_secs(20), || async {
        cluster
            .jetstream_from(0)
            .await
            .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                &consumer,
                DEFAULT_REQUESTS_STREAM,
            )
            .await
            .ok()
    })
    .await;

    // Delayed submits through both gateways (a 503 is retried with the same key), then the
    // leader dies while they wait.
    let http = http();
    let mut ids = Vec::new();
    for i in 0..DELAYED {
        let base = &gateways[i % 2];
        let id = eventually(
            &format!("delayed submit {i}"),
            Duration::from_secs(30),
            || async {
                let r = http
                    .post(format!("{base}/later"))
                    .header("idempotency-key", format!("\"delayed-{i}\""))
                    .header("delay", "6")
                    .body("{}")
                    .send()
                    .await
                    .ok()?;
                (r.status() == 202).then_some(())?;
                Some(json(r).await["id"].as_str().unwrap().to_owned())
            },
        )
        .await;
        ids.push(id);
    }
    let victim = cluster
        .stream_leader(DEFAULT_REQUESTS_STREAM)
        .await
        .expect("a leader");
    cluster.kill(victim).await;
    eprintln!(
        "killed the requests stream's leader n{victim} with {DELAYED} delayed operations waiting"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.restart(victim).await;
    cluster
        .wait_stream_healthy(DEFAULT_REQUESTS_STREAM, Duration::from_secs(30))
        .await;

    // Each ends `succeeded`, read through the gateway that did not accept it.
    for (i, id) in ids.iter().enumerate() {
        let base = &gateways[(i + 1) % 2];
        eventually(
            &format!("{id} succeeds"),
            Duration::from_secs(60),
            || async { (status_via(&http, base, id).await == "succeeded").then_some(()) },
        )
        .await;
    }
    // Ticks go on for a while after the election.
    let until = started + 25;
    let left = until - time::OffsetDateTime::now_utc().unix_timestamp();
    if left > 0 {
        tokio::time::sleep(Duration::from_secs(left as u64)).await;
    }
    let ended = time::OffsetDateTime::now_utc().unix_timestamp();
    let calls = calls.lock().unwrap().clone();
    for id in &ids {
        let ran: Vec<_> = calls.iter().filter(|(op, _)| op == id).collect();
        assert!(!ran.is_empty(), "{id} never ran");
        let status: serde_json::Value = json(
            http.get(format!("{}/operations/{id}", gateways[0]))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let due = time::OffsetDateTime::parse(
            status["not_before"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert!(
            ran.iter().all(|(_, at)| *at >= due),
            "{id} ran before {due}: {ran:?}"
        );
    }
    // The schedule's ticks over the whole run: one operation each, none missing.
    let js = cluster.jetstream_from(0).await;
    let mut ticks = std::collections::BTreeMap::<i64, usize>::new();
    for message in gateway_tests::history::read_stream(&js, DEFAULT_REQUESTS_STREAM)
        .await
        .unwrap()
    {
        let key = handlers::contract::header_str(
            message.headers.as_ref().unwrap(),
            handlers::contract::header::IDEMPOTENCY_KEY,
        )
        .unwrap()
        .trim_matches('"')
        .to_owned();
        if let Some(at) = key.strip_prefix("schedule:tick:") {
            let at =
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                    .unwrap()
                    .unix_timestamp();
            *ticks.entry(at).or_default() += 1;
        }
    }
    eprintln!("ticks from {started} to {ended}: {ticks:?}");
    assert!(
        ticks.values().all(|n| *n == 1),
        "a tick fired twice: {ticks:?}"
    );
    let first = started - started.rem_euclid(5);
    let last = ended - ended.rem_euclid(5) - 5;
    let missing: Vec<i64> = (first..=last)
        .step_by(5)
        .filter(|at| !ticks.contains_key(at))
        .collect();
    assert!(missing.is_empty(), "ticks lost: {missing:?} of {ticks:?}");
}

const BATCH_ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
retention = "1h"
"#;

/// How many of batch `batch`'s `items` requests the requests stream holds, read through
/// `client` (connected to every node) once a node answers.
async fn batch_items_stored(client: &async_nats::Client, batch: usize, items: usize) -> usize {
    let subjects: Vec<String> = (0..items)
        .map(|j| {
            let token = gateway::operations::idempotency::key_token(
                "default",
                "orders",
                &format!("b{batch}-{j}"),
            );
            format!("gw.req.orders.{token}")
        })
        .collect();
    eventually(
        &format!("batch {batch}'s items read"),
        Duration::from_secs(30),
        || async {
            let mut stored = 0;
            for subject in &subjects {
                let found =
                    handlers::jetstream::last_on_subject(client, DEFAULT_REQUESTS_STREAM, subject)
                        .await
                        .ok()?;
                stored += usize::from(found.is_some());
            }
            Some(stored)
        },
    )
    .await
}

/// Sends batch `i` until it is accepted (the same key each time, alternating gateways), and
/// after every attempt that is not accepted checks that it left all of the batch or none.
/// Returns the attempts refused.
async fn send_batch_until_accepted(
    http: &reqwest::Client,
    gateways: &[String; 2],
    client: &async_nats::Client,
    i: usize,
    items: usize,
) -> usize {
    let body = serde_json::json!({
        "route": "orders",
        "items": (0..items)
            .map(|j| serde_json::json!({"idempotency_key": format!("b{i}-{j}"), "body": {"n": j}}))
            .collect::<Vec<_>>(),
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    for attempt in 0.. {
        let base = &gateways[(i + attempt) % 2];
        let answer = http
            .post(format!("{base}/batches"))
            .header("idempotency-key", format!("\"batch-{i}\""))
            .json(&body)
            .send()
            .await;
        if answer.as_ref().is_ok_and(|r| r.status() == 202) {
            return attempt;
        }
        let stored = batch_items_stored(client, i, items).await;
        assert!(
            stored == 0 || stored == items,
            "batch {i}: a refused attempt left {stored} of {items} items"
        );
        assert!(Instant::now() < deadline, "batch {i} never accepted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!()
}

/// Batch submits in four lanes through two gateways while the requests stream's leader is
/// killed (and restarted): every attempt that is not accepted left all of its batch or none of
/// it (never a partial batch), every batch is accepted in the end by retrying it with its key,
/// and the stream then holds each batch's items and record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_all_or_nothing_through_a_leader_kill() {
    const BATCHES: usize = 40;
    const ITEMS: usize = 20;
    const LANES: usize = 4;
    let mut cluster = NatsCluster::start(3).await;
    let (_a, _b, gateways) = two_gateways(&cluster, BATCH_ROUTES).await;
    let before = messages_in(&cluster, DEFAULT_REQUESTS_STREAM).await;
    let client = cluster.client_any().await;
    let lanes: Vec<_> = (0..LANES)
        .map(|lane| {
            let (gateways, client, http) = (gateways.clone(), client.clone(), http());
            tokio::spawn(async move {
                let mut refused = 0;
                for i in (lane..BATCHES).step_by(LANES) {
                    refused += send_batch_until_accepted(&http, &gateways, &client, i, ITEMS).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                refused
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let leader = cluster
        .stream_leader(DEFAULT_REQUESTS_STREAM)
        .await
        .expect("a leader");
    cluster.kill(leader).await;
    eprintln!("killed the requests stream's leader n{leader} with batches in flight");
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.restart(leader).await;
    let mut refused = 0;
    for lane in lanes {
        refused += lane.await.expect("a lane");
    }
    cluster
        .wait_stream_healthy(DEFAULT_REQUESTS_STREAM, Duration::from_secs(30))
        .await;
    for i in 0..BATCHES {
        assert_eq!(
            batch_items_stored(&client, i, ITEMS).await,
            ITEMS,
            "batch {i}"
        );
    }
    let after = messages_in(&cluster, DEFAULT_REQUESTS_STREAM).await;
    eprintln!(
        "{BATCHES} batches of {ITEMS}: {refused} attempts refused, none left a partial batch; {} messages stored",
        after - before
    );
    assert_eq!(
        after - before,
        (BATCHES * (ITEMS + 1)) as u64,
        "each batch's items and record exactly once"
    );
}
