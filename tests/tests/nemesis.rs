//! The fault suite's network, clock and disk nemeses (the process faults are in `faults.rs`),
//! each with stateful workers beside the echo workers: cancellations and the stateful route's
//! short deadline race their commits, and the exactly-once oracles
//! (`gateway_tests::exactly_once`) judge every stateful operation besides the history checker.
//!
//! - `partitions`: a 3-node cluster (R3), gateways and workers each in a network namespace,
//!   cut apart by the kernel (`gateway_tests::netns`).
//!
//! Same profiles, reports and seeds as `faults.rs` (`FAULT_PROFILE`, `FAULT_REPORT_DIR`,
//! `FAULT_SEED`; `scripts/faults` runs both files).

use std::sync::Arc;
use std::time::Duration;

use gateway_tests::chaos::{EffectLog, FAULT_ROUTES, Run, spawn_echo_worker};
use gateway_tests::exactly_once::{self, StatefulWorkers, WorkerSpec};
use gateway_tests::netns::{Host, Net};
use gateway_tests::*;
use handlers::contract::{DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM};
use tokio::time::Instant;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");
const ECHO_WORKER_BIN: &str = env!("CARGO_BIN_EXE_fault-worker");
const STATEFUL_WORKER_BIN: &str = env!("CARGO_BIN_EXE_stateful-worker");

/// The stateful route's deadline: short enough that operations a fault holds up expire.
const STATEFUL_TIMEOUT: &str = "8s";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The routes of these scenarios: the echo route and the stateful one.
fn routes() -> String {
    format!("{FAULT_ROUTES}{}", exactly_once::route(STATEFUL_TIMEOUT))
}

/// A gateway process in `host`'s namespace, listening on its address, on these NATS URLs.
async fn namespaced_gateway(
    net: &Net,
    host: &Host,
    nats_url: &str,
    env: &[(&str, &str)],
) -> GatewayProcess {
    let listen = format!("{}:0", host.ip);
    TestGateway::builder(&routes())
        .nats_url(nats_url)
        .command_prefix(net.prefix(host))
        .envs([
            ("RUST_LOG", "warn,gateway=info,tower_http=error"),
            ("GATEWAY_LISTEN", listen.as_str()),
            ("GATEWAY_ADMIN_LISTEN", listen.as_str()),
        ])
        .envs(env.iter().copied())
        .spawn(GATEWAY_BIN)
        .await
}

/// A 3-node cluster (R3 streams, the state store's too), two gateways and two worker hosts, each
/// in its own network namespace. The nemesis, in turn: isolates a minority node (link down);
/// cuts the requests stream's leader from its followers (its clients still reach it; the
/// majority elects another); a bridge partition (one node sees both sides, which do not see
/// each other); cuts a gateway from every NATS node while its clients still reach it; flaps a
/// node's link; and makes links lossy and slow. Between faults everything heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions() {
    let started = Instant::now();
    let net = Arc::new(Net::create());
    let cluster = NatsCluster::start_in(net.clone(), 3).await;
    exactly_once::create_audit_stream(&cluster.jetstream_from(0).await, 3).await;
    let (g0_host, g1_host) = (net.host("g0"), net.host("g1"));
    let env = [("GATEWAY_STREAM_REPLICAS", "3")];
    let g0 = namespaced_gateway(&net, &g0_host, &cluster.url_list_from(0), &env).await;
    let g1 = namespaced_gateway(&net, &g1_host, &cluster.url_list_from(1), &env).await;
    // The gateways made the state store with the streams' replicas: the markers that decide
    // outcomes survive what the requests survive.
    let state = cluster.stream_info(exactly_once::STATE_STREAM).await;
    assert_eq!(
        state.map(|i| i.config.num_replicas),
        Some(3),
        "the state store is R3"
    );
    let worker_hosts = [net.host("w0"), net.host("w1")];
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("effects.jsonl");
    let effects = EffectLog::file(&log);
    let echo_workers: Vec<_> = worker_hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let urls = cluster.url_list_from(2 - i);
            spawn_echo_worker(&net.prefix(h), ECHO_WORKER_BIN, &urls, &log)
        })
        .collect();
    let stateful = StatefulWorkers::supervise(WorkerSpec {
        bin: STATEFUL_WORKER_BIN.to_owned(),
        nats_url: cluster.url_list_from(2),
        count: 2,
        env: Vec::new(),
        prefix: {
            let (net, hosts) = (net.clone(), worker_hosts.clone());
            Arc::new(move |i| net.prefix(&hosts[i % hosts.len()]))
        },
    });
    let run = Run::new(
        "partitions",
        "3-node cluster in network namespaces: nodes, gateways and workers cut apart",
        started,
        &[g0.base.clone(), g1.base.clone()],
    )
    .with_stateful();
    run.explain(
        "Delay and reordering are not injected: this machine's kernel has no `sch_netem`. Loss \
         (nftables, random) and a slow link (tc tbf: a low rate, queueing up to a latency bound) \
         are what it offers; TCP turns loss into retransmission delays.",
    );
    let load = run.start_load();
    let gateway_hosts = [&g0_host, &g1_host];
    // Scaled to the phase, so that the short profile sees every kind of fault once or so and
    // the long one holds each long enough for elections and client timeouts to play out.
    let phase = run.profile.fault_phase;
    let (pause, hold) = ((phase / 28, phase / 14), (phase / 14, phase / 7));
    let mut turn = run.rand_below(6);
    while run.in_fault_phase() {
        run.pause(run.rand_between(pause.0, pause.1)).await;
        if !run.in_fault_phase() {
            break;
        }
        turn += 1;
        let hold = run.rand_between(hold.0, hold.1);
        match turn % 6 {
            0 => {
                let node = run.rand_below(3);
                net.isolate(cluster.host(node));
                run.fault("isolate a minority node", format!("n{node}, link down"));
                run.hold(hold).await;
            }
            1 => {
                let leader = cluster
                    .stream_leader(DEFAULT_REQUESTS_STREAM)
                    .await
                    .unwrap_or(run.rand_below(3));
                for other in (0..3).filter(|&n| n != leader) {
                    net.cut(cluster.host(leader), cluster.host(other));
                }
                run.fault(
                    "cut the leader from its followers",
                    format!("n{leader}, which its clients still reach"),
                );
                run.hold(hold).await;
            }
            2 => {
                let bridge = run.rand_below(3);
                let (a, b) = ((bridge + 1) % 3, (bridge + 2) % 3);
                net.cut(cluster.host(a), cluster.host(b));
                run.fault(
                    "bridge partition",
                    format!("n{a} and n{b} cut apart, n{bridge} sees both"),
                );
                run.hold(hold).await;
            }
            3 => {
                let g = run.rand_below(2);
                for node in 0..3 {
                    net.cut(gateway_hosts[g], cluster.host(node));
                }
                run.fault(
                    "cut a gateway from NATS",
                    format!("g{g} reaches no node, its clients still reach it"),
                );
                run.hold(hold).await;
            }
            4 => {
                let node = run.rand_below(3);
                run.fault("flapping link", format!("n{node}"));
                let until = Instant::now() + hold;
                while Instant::now() < until {
                    net.isolate(cluster.host(node));
                    run.hold(run.rand_between(ms(200), ms(700))).await;
                    net.reconnect(cluster.host(node));
                    run.hold(run.rand_between(ms(200), ms(700))).await;
                }
            }
            _ => {
                let (lossy, slow) = (run.rand_below(3), run.rand_below(2));
                let percent = 5 + run.rand_below(16) as u8;
                net.lossy(cluster.host(lossy), percent);
                net.slow(&worker_hosts[slow], 512, 200);
                run.fault(
                    "lossy and slow links",
                    format!("n{lossy} drops {percent}% of packets; w{slow} at 512 kbit/s"),
                );
                run.hold(hold).await;
            }
        }
        net.heal();
        run.note("healed: every cut removed, every link up, no loss");
    }
    run.end_faults(&load);
    net.heal();
    let healed_at = Instant::now();
    for stream in [
        DEFAULT_REQUESTS_STREAM,
        DEFAULT_OUTCOMES_STREAM,
        exactly_once::STATE_STREAM,
        exactly_once::AUDIT_STREAM,
    ] {
        cluster
            .wait_stream_healthy(stream, Duration::from_secs(60))
            .await;
    }
    run.note("every stream healthy: a leader and two current followers");
    let js = cluster.jetstream_from(0).await;
    let report = run.finish(load, healed_at, &js, &effects).await;
    stateful.stop().await;
    drop((echo_workers, g0, g1, cluster));
    report.assert_passed();
}
