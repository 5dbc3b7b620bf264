//! The fault suite: real faults under load, judged by a history checker (`gateway_tests::history`).
//!
//! Each scenario runs clients that submit requests (one key and one payload each, retrying `503`s
//! and network errors with the same key) and read statuses through every gateway, while a nemesis
//! injects its faults; then everything is healed, a fresh batch must mostly succeed at once
//! (at least 95% on the first attempt), every operation drains, and the checker counts lost,
//! unexpected and duplicated requests, duplicated committed effects and status regressions, all of
//! which must be zero (`gateway_tests::chaos`). Faults are real: SIGKILL and SIGSTOP of
//! nats-server, gateway and worker processes, and a TCP proxy that stalls and drops connections.
//!
//! `FAULT_PROFILE=short` (default, about half a minute per scenario) or `long` (`scripts/faults`,
//! minutes, report in `tests/fault-results/`). `FAULT_REPORT_DIR` says where the reports go,
//! `FAULT_SEED` repeats a nemesis schedule.

use std::time::Duration;

use gateway_tests::chaos::{
    EffectLog, FAULT_ROUTES, Run, echo_handler, fault_routes, fault_worker_config,
};
use gateway_tests::exactly_once::{self, StatefulWorkers};
use gateway_tests::proxy::{ProxyMode, TcpProxy};
use gateway_tests::*;
use handlers::contract::{DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM};
use tokio::time::Instant;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");
const WORKER_BIN: &str = env!("CARGO_BIN_EXE_fault-worker");
const STATEFUL_WORKER_BIN: &str = env!("CARGO_BIN_EXE_stateful-worker");

const GATEWAY_LOG: (&str, &str) = ("RUST_LOG", "warn,gateway=info,tower_http=error");

/// A gateway process of the suite on this NATS URL: the suite's routes (the stateful one too)
/// and logging, and `env`.
async fn fault_gateway(nats_url: &str, env: &[(&str, &str)]) -> GatewayProcess {
    TestGateway::builder(&fault_routes())
        .nats_url(nats_url)
        .envs([GATEWAY_LOG])
        .envs(env.iter().copied())
        .spawn(GATEWAY_BIN)
        .await
}

/// The run's stateful workers (two processes, supervised) on `nats_url`, with the outgoing
/// messages' stream made with `replicas`.
async fn stateful_workers(
    js: &async_nats::jetstream::Context,
    nats_url: &str,
    replicas: usize,
    env: &[(&str, &str)],
) -> StatefulWorkers {
    let env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    exactly_once::start_workers(js, STATEFUL_WORKER_BIN, nats_url, replicas, env).await
}

/// An in-process echo worker on `orders` that logs every handler execution.
async fn echo_worker(nats: &Nats) -> (TestWorker, EffectLog) {
    let effects = EffectLog::memory();
    let worker = TestWorker::start(
        nats,
        fault_worker_config(),
        "orders",
        echo_handler(effects.clone()),
    )
    .await;
    (worker, effects)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// nats-server (one node, R1, default sync) is SIGKILLed every 2-3 s under load and restarted
/// on the same port with the same store after up to a second. Two gateway processes and an
/// in-process worker reconnect on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_under_load() {
    let started = Instant::now();
    let mut nats = Nats::start().await;
    let g0 = fault_gateway(&nats.url(), &[]).await;
    let g1 = fault_gateway(&nats.url(), &[]).await;
    let (worker, effects) = echo_worker(&nats).await;
    let stateful = stateful_workers(&nats.jetstream().await, &nats.url(), 1, &[]).await;
    let run = Run::new(
        "nats-kill",
        "nats-server SIGKILLed every 2-3 s under load",
        started,
        &[g0.base.clone(), g1.base.clone()],
    )
    .with_stateful();
    let load = run.start_load();
    while run.in_fault_phase() {
        run.pause(run.rand_between(ms(2000), ms(3000))).await;
        if !run.in_fault_phase() {
            break;
        }
        let down = run.rand_between(ms(200), ms(3000));
        nats.kill().await;
        run.fault("kill -9 nats-server", format!("down for {down:?}"));
        run.hold(down).await;
        nats.restart().await;
        run.note(format!("nats-server restarted after {down:?} down"));
    }
    run.end_faults(&load);
    let healed_at = Instant::now();
    let js = nats.jetstream().await;
    let report = run.finish(load, healed_at, &js, &effects).await;
    worker.stop().await;
    stateful.stop().await;
    drop((g0, g1));
    report.assert_passed();
}

/// Two gateway processes; one at a time is SIGKILLed at a random moment under load and started
/// again (on a new port, which the clients learn, as from a load balancer). Some restarts carry
/// the fault-injection hook that aborts the process between the JetStream ack of its first new
/// request and the answer: the client sees a broken connection for a request that was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_at_random_points() {
    let started = Instant::now();
    let nats = Nats::start().await;
    let mut gateways = Gateways {
        nats_url: nats.url(),
        processes: vec![
            fault_gateway(&nats.url(), &[]).await,
            fault_gateway(&nats.url(), &[]).await,
        ],
        hooked: vec![false, false],
    };
    let (worker, effects) = echo_worker(&nats).await;
    let stateful = stateful_workers(&nats.jetstream().await, &nats.url(), 1, &[]).await;
    let bases: Vec<String> = gateways.processes.iter().map(|g| g.base.clone()).collect();
    let run = Run::new(
        "gateway-kill",
        "gateway processes SIGKILLed at random points under load",
        started,
        &bases,
    )
    .with_stateful();
    let load = run.start_load();
    while run.in_fault_phase() {
        run.pause(run.rand_between(ms(1000), ms(2500))).await;
        // A hooked gateway that aborted after a publish: a crash at the worst moment.
        for i in 0..gateways.processes.len() {
            if gateways.hooked[i] && gateways.processes[i].exited() {
                Gateways::hook_fired(&run, i);
                let hook = run.in_fault_phase() && run.chance(30);
                gateways.respawn(&run, i, hook).await;
                run.note(Gateways::restarted(i, hook));
            }
        }
        if !run.in_fault_phase() {
            break;
        }
        let victim = run.rand_below(gateways.processes.len());
        gateways.processes[victim].kill().await;
        run.fault("kill -9 gateway", format!("g{victim}"));
        run.hold(run.rand_between(ms(200), ms(1500))).await;
        // At most one gateway carries the hook at a time.
        let hook = !gateways.hooked[1 - victim] && run.chance(30);
        gateways.respawn(&run, victim, hook).await;
        run.note(Gateways::restarted(victim, hook));
    }
    run.end_faults(&load);
    let healed_at = Instant::now();
    for i in 0..gateways.processes.len() {
        if gateways.hooked[i] {
            if !gateways.processes[i].exited() {
                gateways.processes[i].kill().await;
                run.note(format!("g{i} (hooked) stopped for healing"));
            } else {
                Gateways::hook_fired(&run, i);
            }
            gateways.respawn(&run, i, false).await;
            run.note(format!("g{i} restarted without the hook"));
        }
    }
    let js = nats.jetstream().await;
    let report = run.finish(load, healed_at, &js, &effects).await;
    worker.stop().await;
    stateful.stop().await;
    drop(gateways);
    report.assert_passed();
}

/// The gateway processes of [`gateway_killed_at_random_points`], and which of them carry the
/// fault-injection hook that aborts the process between the JetStream ack and the answer.
struct Gateways {
    nats_url: String,
    processes: Vec<GatewayProcess>,
    hooked: Vec<bool>,
}

impl Gateways {
    /// Starts gateway `i` again, with the hook or without, and tells the clients its new address.
    async fn respawn(&mut self, run: &Run, i: usize, hook: bool) {
        let env: &[(&str, &str)] = if hook {
            &[("GATEWAY_FAULT_ABORT_AFTER_PUBLISH", "true")]
        } else {
            &[]
        };
        let g = fault_gateway(&self.nats_url, env).await;
        run.endpoints.set(i, &g.base);
        self.processes[i] = g;
        self.hooked[i] = hook;
    }

    /// Records that gateway `i` was found aborted by its hook.
    fn hook_fired(run: &Run, i: usize) {
        run.fault(
            "gateway crash between the JetStream ack and the 202",
            format!("g{i}, the abort-after-publish hook"),
        );
    }

    /// The nemesis note of a restart during the fault phase.
    fn restarted(i: usize, hook: bool) -> String {
        format!("g{i} restarted{}", if hook { " with the hook" } else { "" })
    }
}

/// A 3-node cluster with R3 streams, two gateways (each listing a different node first) and two
/// workers (through the other nodes). The nemesis SIGKILLs a node (the requests stream's leader
/// or another), restarts it, then freezes a node (SIGSTOP) and thaws it; sometimes it freezes
/// one while another is still dead, which takes the quorum away for a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_and_paused() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3).await;
    let env = [("GATEWAY_STREAM_REPLICAS", "3")];
    // One after the other: two gateways creating the same R3 streams at once time out for ~10 s.
    let g0 = fault_gateway(&cluster.url_list_from(0), &env).await;
    let g1 = fault_gateway(&cluster.url_list_from(1), &env).await;
    let effects = EffectLog::memory();
    let mut workers = Vec::new();
    for first in [2, 1] {
        let js = cluster.jetstream_from(first).await;
        let effects = effects.clone();
        workers.push(TestWorker::start_on(js, fault_worker_config(), |w| {
            w.route("orders", echo_handler(effects))
        }));
    }
    let js = cluster.jetstream_from(0).await;
    let stateful = stateful_workers(&js, &cluster.url_list_from(2), 3, &[]).await;
    let run = Run::new(
        "cluster",
        "3-node cluster (R3): a node SIGKILLed, a node frozen with SIGSTOP",
        started,
        &[g0.base.clone(), g1.base.clone()],
    )
    .with_stateful();
    let load = run.start_load();
    let (mut next_victim, mut next_frozen) = (run.rand_below(3), run.rand_below(3));
    while run.in_fault_phase() {
        run.pause(run.rand_between(ms(1500), ms(2500))).await;
        if !run.in_fault_phase() {
            break;
        }
        let leader = cluster.stream_leader(DEFAULT_REQUESTS_STREAM).await;
        // The requests stream's leader, or the nodes in turn (each one hosts some client's
        // connection: the gateways' first nodes are n0 and n1, the workers' n2 and n1).
        let victim = match leader {
            Some(l) if run.chance(60) => l,
            _ => {
                next_victim += 1;
                next_victim % 3
            }
        };
        cluster.kill(victim).await;
        let mut dead = Some(victim);
        run.fault(
            "kill -9 node",
            format!(
                "n{victim}{}",
                if Some(victim) == leader {
                    ", leader of the requests stream"
                } else {
                    ""
                }
            ),
        );
        let overlap = run.chance(25);
        if !overlap {
            run.hold(run.rand_between(ms(1500), ms(3000))).await;
            cluster.restart(victim).await;
            dead = None;
            run.note(format!("node n{victim} restarted"));
            run.pause(run.rand_between(ms(1000), ms(2000))).await;
        }
        // Often the results stream's leader: thawed, it may believe it still leads for a moment,
        // the chance for a stale read to show `pending` after `succeeded`.
        let results_leader = cluster.stream_leader(DEFAULT_OUTCOMES_STREAM).await;
        let frozen = match results_leader {
            Some(l) if Some(l) != dead && run.chance(50) => l,
            _ => loop {
                next_frozen += 1;
                if Some(next_frozen % 3) != dead {
                    break next_frozen % 3;
                }
            },
        };
        cluster.pause(frozen);
        if overlap {
            run.fault(
                "SIGSTOP node while another is dead (no quorum)",
                format!("n{frozen}, n{victim} dead"),
            );
        } else {
            let leads = if Some(frozen) == results_leader {
                ", leader of the results stream"
            } else {
                ""
            };
            run.fault("SIGSTOP node", format!("n{frozen}{leads}"));
        }
        run.hold(run.rand_between(ms(1500), ms(3000))).await;
        cluster.resume(frozen);
        run.note(format!("SIGCONT node n{frozen}"));
        if let Some(d) = dead.take() {
            cluster.restart(d).await;
            run.note(format!("node n{d} restarted"));
        }
    }
    run.end_faults(&load);
    let healed_at = Instant::now();
    run.wait_streams_healthy(&cluster).await;
    let report = run.finish(load, healed_at, &js, &effects).await;
    for w in workers {
        w.stop().await;
    }
    stateful.stop().await;
    drop((g0, g1));
    report.assert_passed();
}

/// Both gateways reach nats-server through a TCP proxy that, at random, stalls (sockets open, no
/// bytes forwarded: what the gateway wrote arrives late, after it answered 503), drops every
/// connection (RST), or refuses connections for a while. The gateways allow 3 requests in flight
/// each, so a stall also sheds requests (`503 overloaded`: a definite failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stalls_and_drops_gateway_connections() {
    let started = Instant::now();
    let nats = Nats::start().await;
    let proxy = TcpProxy::to_nats(&nats.url()).await;
    // Few permits: while NATS is stalled, requests pile up and the rest are shed at once with
    // `503 overloaded`, which promises that nothing was written.
    let env = [("GATEWAY_MAX_IN_FLIGHT", "3")];
    let g0 = fault_gateway(&proxy.nats_url(), &env).await;
    let g1 = fault_gateway(&proxy.nats_url(), &env).await;
    let (worker, effects) = echo_worker(&nats).await;
    let stateful = stateful_workers(&nats.jetstream().await, &nats.url(), 1, &[]).await;
    let run = Run::new(
        "proxy",
        "TCP proxy between the gateways and NATS stalls, drops and refuses connections",
        started,
        &[g0.base.clone(), g1.base.clone()],
    )
    .with_stateful();
    let load = run.start_load();
    let mut turn = run.rand_below(3);
    while run.in_fault_phase() {
        run.pause(run.rand_between(ms(1500), ms(3000))).await;
        if !run.in_fault_phase() {
            break;
        }
        // Every kind in turn (from a random start), so each one happens in a short run too.
        turn += 1;
        match turn % 3 {
            0 => {
                let d = run.rand_between(ms(1000), ms(4000));
                proxy.set_mode(ProxyMode::Stall);
                run.fault("stall", format!("{d:?}, sockets kept open"));
                run.hold(d).await;
                proxy.set_mode(ProxyMode::Pass);
                run.note("stall healed: bytes flow again");
            }
            1 => {
                proxy.drop_all();
                run.fault("drop", "every gateway connection reset");
            }
            _ => {
                let d = run.rand_between(ms(1000), ms(3000));
                proxy.set_mode(ProxyMode::Refuse);
                run.fault("refuse", format!("{d:?}, new connections reset"));
                run.hold(d).await;
                proxy.set_mode(ProxyMode::Pass);
                run.note("refuse healed: connections accepted again");
            }
        }
    }
    run.end_faults(&load);
    proxy.set_mode(ProxyMode::Pass);
    let healed_at = Instant::now();
    let js = nats.jetstream().await;
    let report = run.finish(load, healed_at, &js, &effects).await;
    let stats = proxy.stats();
    eprintln!("proxy: {stats:?}");
    worker.stop().await;
    stateful.stop().await;
    drop((g0, g1));
    report.assert_passed();
}

/// A worker process running the suite's handler, recording each execution in a shared file.
struct WorkerProcess {
    child: tokio::process::Child,
}

impl WorkerProcess {
    fn spawn(nats_url: &str, log: &std::path::Path) -> Self {
        let child = gateway_tests::chaos::spawn_echo_worker(&[], &[], WORKER_BIN, nats_url, log);
        Self { child }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("worker process runs")
    }

    async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Two worker processes: SIGKILLed at random and restarted, frozen (SIGSTOP) past AckWait so
/// that the other one gets the same request while the frozen one still holds it, and all of them
/// down for a while under load (requests pile up, pending), then back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_frozen_and_down_for_a_while() {
    let started = Instant::now();
    let nats = Nats::start().await;
    let g0 = fault_gateway(&nats.url(), &[]).await;
    let g1 = fault_gateway(&nats.url(), &[]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("effects.jsonl");
    let effects = EffectLog::file(&log_path);
    let mut workers = vec![
        WorkerProcess::spawn(&nats.url(), &log_path),
        WorkerProcess::spawn(&nats.url(), &log_path),
    ];
    // The stateful workers abort at every step of a commit now and then (and are restarted),
    // and now and then block past AckWait.
    let crashes = [
        ("HANDLERS_CRASH_PERCENT", "1"),
        (
            "HANDLERS_CRASH_POINTS",
            "before-commit,after-commit,after-publish",
        ),
        ("STALL_PERCENT", "1"),
    ];
    let stateful = stateful_workers(&nats.jetstream().await, &nats.url(), 1, &crashes).await;
    let run = Run::new(
        "workers",
        "worker processes SIGKILLed, frozen past AckWait, and all down for a while",
        started,
        &[g0.base.clone(), g1.base.clone()],
    )
    .with_stateful();
    let load = run.start_load();
    // The outage first, then the other kinds in turn (from a random one), so that a short run
    // has every kind too.
    let order = if run.chance(50) { [2, 0, 1] } else { [2, 1, 0] };
    let mut turn = 0;
    while run.in_fault_phase() {
        run.pause(run.rand_between(ms(1000), ms(2000))).await;
        if !run.in_fault_phase() {
            break;
        }
        let action = order[turn % 3];
        turn += 1;
        match action {
            0 => {
                let w = run.rand_below(workers.len());
                workers[w].kill().await;
                run.fault("kill -9 worker", format!("w{w}"));
                run.hold(run.rand_between(ms(300), ms(1500))).await;
                workers[w] = WorkerProcess::spawn(&nats.url(), &log_path);
                run.note(format!("worker w{w} restarted"));
            }
            1 => {
                let w = run.rand_below(workers.len());
                let d = run.rand_between(ms(2500), ms(4000));
                signal_process(workers[w].pid(), "-STOP");
                stateful.pause();
                run.fault(
                    "SIGSTOP worker past AckWait",
                    format!("w{w} and the stateful workers for {d:?}"),
                );
                run.hold(d).await;
                signal_process(workers[w].pid(), "-CONT");
                stateful.resume();
                run.note(format!("SIGCONT worker w{w} and the stateful workers"));
            }
            _ => {
                let d = run.rand_between(ms(2500), ms(4000));
                for w in &mut workers {
                    w.kill().await;
                }
                run.fault("all workers down", format!("kill -9 both, down for {d:?}"));
                run.hold(d).await;
                for w in &mut workers {
                    *w = WorkerProcess::spawn(&nats.url(), &log_path);
                }
                run.note("workers back");
            }
        }
    }
    run.end_faults(&load);
    let healed_at = Instant::now();
    let js = nats.jetstream().await;
    let report = run.finish(load, healed_at, &js, &effects).await;
    for w in &mut workers {
        w.kill().await;
    }
    stateful.stop().await;
    drop((g0, g1));
    report.assert_passed();
}

/// The checker's own control, on real streams: a clean run checks clean; then a request message
/// deleted from the stream (what a lost write would leave) counts as lost, and a request no
/// client sent counts as unexpected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_sees_a_lost_and_an_unexpected_request() {
    use gateway_tests::chaos::{Endpoints, fault_http, read_streams_eventually, submit_until_done};
    use gateway_tests::history::{
        Effect, History, Observed, StoredRequest, StoredResult, check, read_status,
    };
    let TestGateway { nats, gw } = TestGateway::builder(FAULT_ROUTES).start().await;
    let (worker, effects) = echo_worker(&nats).await;
    let (history, http) = (History::new(), fault_http());
    let endpoints = Endpoints::new(std::slice::from_ref(&gw.base));
    let mut ops = Vec::new();
    for i in 0..10 {
        let key = format!("control-{i}");
        let payload = format!(r#"{{"control":{i}}}"#);
        let done = submit_until_done(
            &history,
            &http,
            &endpoints,
            "client",
            0,
            "/orders",
            &key,
            &payload,
            Duration::from_secs(10),
        )
        .await;
        ops.push(done.acknowledged.expect("accepted"));
    }
    for op in &ops {
        eventually("terminal", Duration::from_secs(20), || async {
            let outcome = read_status(&history, &http, "final", "g0", &gw.base, op).await;
            matches!(outcome, gateway_tests::history::Outcome::Ok { status: Some(s), .. } if s == "succeeded")
                .then_some(())
        })
        .await;
    }
    let js = nats.jetstream().await;
    let judge = |requests: &[StoredRequest], results: &[StoredResult], effects: &[Effect]| {
        let gateways = ["g0".to_owned()];
        check(
            &history.calls(),
            &Observed {
                requests,
                results,
                effects: Some(effects),
                gateways: &gateways,
                final_process: "final",
                stateful_route: None,
                clocks: Default::default(),
            },
        )
    };
    let (requests, results) = read_streams_eventually(&js).await;
    let clean = judge(&requests, &results, &effects.snapshot());
    assert!(clean.counts.violations().is_empty(), "{clean:#?}");
    assert_eq!(
        (
            clean.counts.ok,
            clean.counts.request_messages,
            clean.counts.result_messages
        ),
        (10, 10, 10)
    );

    worker.stop().await;
    let stream = js.get_stream(DEFAULT_REQUESTS_STREAM).await.unwrap();
    assert!(stream.delete_message(requests[3].seq).await.unwrap());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Gw-Operation-Id", "nobody-sent-this");
    headers.insert("Gw-Idempotency-Key", "\"stranger\"");
    js.publish_with_headers("gw.req.orders.stranger", headers, "?".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (requests, results) = read_streams_eventually(&js).await;
    let broken = judge(&requests, &results, &effects.snapshot());
    assert_eq!(broken.counts.lost, 1, "{broken:#?}");
    // The stranger, and the deleted request's result that now answers nothing.
    assert_eq!(broken.counts.unexpected, 2, "{broken:#?}");
}
