//! The fault suite's network, clock and disk nemeses (the process faults are in `faults.rs`),
//! each with stateful workers beside the echo workers: cancellations and the stateful route's
//! short deadline race their commits, and the exactly-once oracles
//! (`gateway_tests::exactly_once`) judge every stateful operation besides the history checker.
//!
//! - `partitions`: a 3-node cluster (R3), gateways and workers each in a network namespace,
//!   cut apart by the kernel (`gateway_tests::netns`).
//! - `clocks`: gateways and workers on wall clocks minutes off the server's, jumping forward
//!   and back (`gateway_tests::clocks`); no expiry may come before its deadline plus the
//!   documented allowance (`GATEWAY_EXPIRY_GRACE`) by the server's clock.
//! - `disk-full`: nats-server's store on a small tmpfs that fills up under load
//!   (`gateway_tests::disk`); space comes back and JetStream is restarted in place.
//!
//! Same profiles, reports and seeds as `faults.rs` (`FAULT_PROFILE`, `FAULT_REPORT_DIR`,
//! `FAULT_SEED`; `scripts/faults` runs both files).

use std::sync::Arc;
use std::time::Duration;

use gateway_tests::chaos::{EffectLog, Run, fault_routes, spawn_echo_worker};
use gateway_tests::clocks::FakeClock;
use gateway_tests::disk::{DiskNats, SmallDisk};
use gateway_tests::exactly_once::{self, StatefulWorkers, WorkerSpec};
use gateway_tests::history::{self, ClockAllowance, Outcome};
use gateway_tests::netns::{Host, Net};
use gateway_tests::*;
use handlers::contract::DEFAULT_REQUESTS_STREAM;
use tokio::time::Instant;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");
const ECHO_WORKER_BIN: &str = env!("CARGO_BIN_EXE_fault-worker");
const STATEFUL_WORKER_BIN: &str = env!("CARGO_BIN_EXE_stateful-worker");

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A gateway process in `host`'s namespace, listening on its address, on these NATS URLs.
async fn namespaced_gateway(
    net: &Net,
    host: &Host,
    nats_url: &str,
    env: &[(&str, &str)],
) -> GatewayProcess {
    let listen = format!("{}:0", host.ip);
    TestGateway::builder(&fault_routes())
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
            spawn_echo_worker(&net.prefix(h), &[], ECHO_WORKER_BIN, &urls, &log)
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
    // Scaled to the phase, so that the long profile sees each kind of fault twice or more;
    // never shorter than an election and a client's NATS timeout take to play out.
    let phase = run.profile.fault_phase;
    let at_least = |d: Duration, floor: u64| d.max(ms(floor));
    let pause = (at_least(phase / 40, 500), at_least(phase / 20, 1000));
    let hold = (at_least(phase / 20, 1500), at_least(phase / 10, 3000));
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
    run.wait_streams_healthy(&cluster).await;
    let js = cluster.jetstream_from(0).await;
    let report = run.finish(load, healed_at, &js, &effects).await;
    stateful.stop().await;
    drop((echo_workers, g0, g1, cluster));
    report.assert_passed();
}

/// How far the clock nemesis moves a clock from the server's, at most, either way.
const SKEW_S: i64 = 120;

/// One nats-server (the cluster's clock); two gateways, an echo worker and stateful workers under
/// libfaketime, each group on its own wall clock: g0 starts right, g1 minutes ahead, the workers
/// minutes behind. Every process's expiry grace is the documented allowance, the largest
/// difference two clocks can have (`2 × SKEW_S`). The nemesis jumps one group's clock forward or
/// back (anywhere within `±SKEW_S`), or sets the worst case on purpose: the accepting gateway
/// behind by `SKEW_S`, the reading one ahead by as much, and the stateful workers frozen past the
/// route's deadline, so that reads decide expiries at the earliest moment the allowance permits,
/// racing the workers' commits when they thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks() {
    let started = Instant::now();
    let nats = Nats::start().await;
    let grace = (2 * SKEW_S).to_string();
    let gateway_clocks = [FakeClock::new(0), FakeClock::new(SKEW_S)];
    let (echo_clock, stateful_clock) = (FakeClock::new(-SKEW_S), FakeClock::new(-SKEW_S));
    let mut gateways = Vec::new();
    for clock in &gateway_clocks {
        let gateway = TestGateway::builder(&fault_routes())
            .nats(&nats)
            .envs([
                ("RUST_LOG", "warn,gateway=info,tower_http=error"),
                ("GATEWAY_EXPIRY_GRACE", &format!("{grace}s")),
            ])
            .envs(clock.env())
            .spawn(GATEWAY_BIN)
            .await;
        gateways.push(gateway);
    }
    let graced = |clock: &FakeClock| {
        let mut env = clock.env();
        env.push(("WORKER_EXPIRY_GRACE_SECS".to_owned(), grace.clone()));
        env
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("effects.jsonl");
    let effects = EffectLog::file(&log);
    let echo_worker = spawn_echo_worker(
        &[],
        &graced(&echo_clock),
        ECHO_WORKER_BIN,
        &nats.url(),
        &log,
    );
    let js = nats.jetstream().await;
    let stateful = exactly_once::start_workers(
        &js,
        STATEFUL_WORKER_BIN,
        &nats.url(),
        1,
        graced(&stateful_clock),
    )
    .await;
    let run = Run::new(
        "clocks",
        "gateways and workers on wall clocks minutes off, jumping forward and back",
        started,
        &gateways.iter().map(|g| g.base.clone()).collect::<Vec<_>>(),
    )
    .with_stateful()
    .with_clocks(ClockAllowance {
        grace: Duration::from_secs(2 * SKEW_S as u64),
        // Every offset, old or new (libfaketime may read the previous one for two seconds after a
        // jump), is within ±SKEW_S.
        ahead: Duration::from_secs(SKEW_S as u64),
        // No network fault here: a request is stored within moments of its gateway's reading,
        // so the cluster's clock alone must see every timeout pass before its expiry.
        timeouts: vec![
            ("orders".to_owned(), Duration::from_secs(600)),
            (
                exactly_once::ROUTE.to_owned(),
                Duration::from_secs(exactly_once::DEADLINE_SECS),
            ),
        ],
        publish_within: Duration::from_secs(1),
    });
    run.explain(format!(
        "Every gateway and worker runs with an expiry grace of {grace} s (`GATEWAY_EXPIRY_GRACE`, \
         a worker's `expiry_grace`), the largest difference two clocks had (each within \
         ±{SKEW_S} s of the server's). The checker's rules: no expiry stored, by nats-server's \
         clock, before the deadline its accepting gateway wrote plus the grace less how far a \
         deciding clock ran ahead ({SKEW_S} s); and none before the request's own store time \
         plus its route's timeout, less 1 s for the publish, by that clock alone."
    ));
    let load = run.start_load();
    let groups = [
        ("g0", &gateway_clocks[0]),
        ("g1", &gateway_clocks[1]),
        ("the echo worker", &echo_clock),
        ("the stateful workers", &stateful_clock),
    ];
    let phase = run.profile.fault_phase;
    let route_timeout = Duration::from_secs(exactly_once::DEADLINE_SECS);
    let (mut probes, mut probed) = (0, Vec::new());
    while run.in_fault_phase() {
        run.pause(run.rand_between(phase / 28, phase / 14)).await;
        if !run.in_fault_phase() {
            break;
        }
        if run.chance(30) {
            gateway_clocks[0].set(-SKEW_S);
            gateway_clocks[1].set(SKEW_S);
            stateful.pause();
            run.fault(
                "worst-case skew with the stateful workers frozen past the deadline",
                format!("g0 {:+} s, g1 {:+} s", -SKEW_S, SKEW_S),
            );
            run.hold(FakeClock::LAG + ms(500)).await;
            probes += 1;
            if let Some(expired) = probe_earliest_expiry(&run, probes, route_timeout).await {
                probed.push(expired);
            }
            run.hold(run.rand_between(ms(0), ms(2000))).await;
            stateful.resume();
            run.note("stateful workers thawed");
            continue;
        }
        let (name, clock) = groups[run.rand_below(groups.len())];
        let before = clock.offset();
        let mut after = run.rand_below(2 * SKEW_S as usize + 1) as i64 - SKEW_S;
        if after == before {
            after = -before;
        }
        clock.set(after);
        run.fault(
            if after > before {
                "clock jumps forward"
            } else {
                "clock jumps back"
            },
            format!("{name}: {before:+} s to {after:+} s"),
        );
    }
    run.end_faults(&load);
    stateful.resume();
    let healed_at = Instant::now();
    let report = run.finish(load, healed_at, &js, &effects).await;
    stateful.stop().await;
    drop((echo_worker, gateways));
    report.assert_passed();
    // Each accepted probe was read expired at the earliest moment the allowance permits (and
    // the checker found that expiry not early).
    assert!(
        probed.iter().all(|expired| *expired),
        "probes read past their timeout through the clock ahead: {probed:?} (expired or not)"
    );
}

/// The earliest expiry the allowance permits, on purpose: a stateful request accepted through
/// g0 (its clock behind by `SKEW_S`, so its deadline is early) while the stateful workers are
/// frozen, read through g1 (ahead by `SKEW_S`) just past the route's timeout by the server's
/// clock. With the grace at `2 × SKEW_S` that read finds it expired; the checker verifies the
/// expiry was not early. Recorded in the run's history like any client's calls. Whether the read
/// found it expired; `None` when the probe was not accepted.
async fn probe_earliest_expiry(run: &Run, n: usize, route_timeout: Duration) -> Option<bool> {
    let ((g0, base0), (g1, base1)) = (run.endpoints.get(0), run.endpoints.get(1));
    let key = format!("clocks-probe-{n}");
    let payload =
        serde_json::json!({ "probe": n, "nonce": uuid::Uuid::new_v4().simple().to_string() })
            .to_string();
    let path = format!("/{}", exactly_once::ROUTE);
    let accepted = history::submit(
        &run.history,
        &run.http,
        "probe",
        &g0,
        &base0,
        &path,
        &key,
        &payload,
        1,
    )
    .await;
    let Outcome::Ok { op: Some(op), .. } = accepted else {
        run.note(format!("probe {key} not accepted: {accepted:?}"));
        return None;
    };
    tokio::time::sleep(route_timeout + ms(300)).await;
    let read = history::read_status(&run.history, &run.http, "probe", &g1, &base1, &op).await;
    run.note(format!(
        "probe {key}: read through g1 past its timeout: {read:?}"
    ));
    Some(matches!(read, Outcome::Ok { status: Some(s), .. } if s == "expired"))
}

/// One nats-server whose store (every stream: requests, results, the state store, the outgoing
/// messages) is on a 64 MiB tmpfs, with the default JetStream limits; two gateways, an echo
/// worker and stateful workers. The nemesis fills the disk to its last few KiB with a ballast
/// file (another tenant of the disk, a log that grew): writes fail for want of space; or it
/// restarts JetStream on the almost full disk, whose storage limit (75% of the free space) is
/// then below what it holds: writes are refused. Then the space comes back and JetStream is
/// restarted in place (a configuration reload), which is what a stream needs after a failed
/// write (nats-server 2.15.1 keeps it failed until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full() {
    let started = Instant::now();
    let disk = SmallDisk::mount(64);
    let nats = DiskNats::start(&disk).await;
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let gateway = TestGateway::builder(&fault_routes())
            .nats_url(nats.url())
            .envs([("RUST_LOG", "warn,gateway=info,tower_http=error")])
            .spawn(GATEWAY_BIN)
            .await;
        gateways.push(gateway);
    }
    let js = nats.jetstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("effects.jsonl");
    let effects = EffectLog::file(&log);
    let echo_worker = spawn_echo_worker(&[], &[], ECHO_WORKER_BIN, &nats.url(), &log);
    let stateful =
        exactly_once::start_workers(&js, STATEFUL_WORKER_BIN, &nats.url(), 1, Vec::new()).await;
    let run = Run::new(
        "disk-full",
        "nats-server's store on a small tmpfs that fills up under load",
        started,
        &gateways.iter().map(|g| g.base.clone()).collect::<Vec<_>>(),
    )
    .with_stateful();
    run.explain(
        "On a full disk nats-server 2.15.1 does not answer a publish whose write failed \
         (ENOSPC): the gateway answers `503 outcome-unknown` after its NATS timeout, and the \
         client's retry with the same key converges once the disk has room and JetStream was \
         restarted. A stream that failed a write stays failed until JetStream restarts (a \
         configuration reload, or a server restart), even with space back: nats-server's \
         recovery step, which this scenario takes as an operator would. JetStream's own storage \
         limit (by default 75% of the space free when it starts) is a definite refusal instead: \
         `507 insufficient-storage`.",
    );
    let load = run.start_load();
    let phase = run.profile.fault_phase;
    // The two kinds in turn (from a random one), so that a short run has both.
    let mut turn = run.rand_below(2);
    while run.in_fault_phase() {
        run.pause(run.rand_between(phase / 28, phase / 14)).await;
        if !run.in_fault_phase() {
            break;
        }
        turn += 1;
        if turn.is_multiple_of(2) {
            let leave = 4096 * (1 + run.rand_below(8) as u64);
            disk.fill(leave);
            run.fault(
                "disk full",
                format!("a ballast leaves {} KiB free", leave / 1024),
            );
        } else {
            // JetStream restarted on a full disk takes 75% of what is free as its limit: less
            // than it holds, so every write is refused at once.
            disk.fill(0);
            nats.restart_jetstream().await;
            run.fault(
                "JetStream's storage limit below its usage",
                "restarted on a full disk",
            );
        }
        run.hold(run.rand_between(phase / 14, phase / 7)).await;
        disk.free();
        nats.restart_jetstream().await;
        run.note("space back (ballast removed); JetStream restarted by a configuration reload");
    }
    run.end_faults(&load);
    disk.free();
    nats.restart_jetstream().await;
    let healed_at = Instant::now();
    let report = run.finish(load, healed_at, &js, &effects).await;
    stateful.stop().await;
    drop((echo_worker, gateways, nats));
    report.assert_passed();
    // What the gateway answers: a write the full disk failed has no answer from nats-server
    // (503, outcome unknown); JetStream's own limit is a definite refusal (507).
    let answers = &report.counts.answers;
    for (kind, answer) in [
        ("disk full", "503 outcome-unknown"),
        (
            "JetStream's storage limit below its usage",
            "507 insufficient-storage",
        ),
    ] {
        if report.fault_kinds.contains_key(kind) {
            assert!(
                answers.contains_key(answer),
                "{kind}: no {answer} in {answers:?}"
            );
        }
    }
}
