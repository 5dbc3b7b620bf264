//! The fault suite's driver: profiles, clients under load, the healing phase, draining, the
//! checker's inputs and the per-scenario report. The scenarios themselves (which process dies
//! when) are in `tests/tests/faults.rs`; everything they share is here.
//!
//! A run goes through these phases:
//! 1. **faults**: client lanes submit requests (each with its own key and payload, retrying a
//!    `503` or a network error with the same key, through another gateway) while pollers read
//!    statuses through every gateway, and the scenario's nemesis injects its faults;
//! 2. **heal**: the nemesis stops and restores everything, the lanes finish the request they were
//!    on, and every gateway is ready again;
//! 3. **post-heal**: a fresh batch of requests; at least 95% must get a `202` on their first
//!    attempt, so a run cannot pass by failing everything;
//! 4. **drain**: every operation JetStream holds is polled until it is terminal, then read once
//!    more through every gateway; the workers' consumer must have nothing pending;
//! 5. **check**: [`crate::history::check`] against the streams and the worker's effect log; the
//!    report is written (JSON and Markdown) before the test asserts on it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use handlers::{Request, Response};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::history::{self, Effect, History, Outcome, Verdict};

/// How long and how hard a run is: `FAULT_PROFILE=short` (the default, for CI) or `long`.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: String,
    /// How long the nemesis injects faults (`FAULT_PHASE_SECS` overrides it).
    pub fault_phase: Duration,
    /// Concurrent client lanes, each submitting one request at a time.
    pub lanes: usize,
    /// Pause between a lane's requests.
    pub pace: Duration,
    /// How long a client keeps retrying one request before it gives up (outcome: unknown).
    pub patience: Duration,
    /// Status pollers during the fault phase, and the pause between their reads.
    pub pollers: usize,
    pub poll_pace: Duration,
    /// Requests sent after healing, and how many at once (below any scenario's
    /// `GATEWAY_MAX_IN_FLIGHT` over its gateways, so that none is shed).
    pub heal_batch: usize,
    pub heal_concurrency: usize,
    /// Longest wait for every operation to be terminal.
    pub drain_timeout: Duration,
    /// Lanes submitting to the stateful route, in a run with stateful workers
    /// ([`Run::with_stateful`]).
    pub stateful_lanes: usize,
    /// The share of its operations (percent) a stateful lane cancels, at a random moment.
    pub cancel_percent: u64,
}

impl Profile {
    pub fn from_env() -> Self {
        let name = std::env::var("FAULT_PROFILE").unwrap_or_else(|_| "short".to_owned());
        let mut profile = match name.as_str() {
            "long" => Self {
                name,
                fault_phase: Duration::from_secs(90),
                lanes: 8,
                pace: Duration::from_millis(100),
                patience: Duration::from_secs(20),
                pollers: 2,
                poll_pace: Duration::from_millis(40),
                heal_batch: 200,
                heal_concurrency: 4,
                drain_timeout: Duration::from_secs(120),
                stateful_lanes: 3,
                cancel_percent: 15,
            },
            "short" => Self {
                name,
                fault_phase: Duration::from_secs(14),
                lanes: 6,
                pace: Duration::from_millis(100),
                patience: Duration::from_secs(15),
                pollers: 2,
                poll_pace: Duration::from_millis(50),
                heal_batch: 100,
                heal_concurrency: 4,
                drain_timeout: Duration::from_secs(60),
                stateful_lanes: 2,
                cancel_percent: 15,
            },
            other => panic!("FAULT_PROFILE must be short or long, not {other:?}"),
        };
        if let Some(secs) = std::env::var("FAULT_PHASE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            profile.fault_phase = Duration::from_secs(secs);
        }
        profile
    }
}

/// A small deterministic PRNG (SplitMix64): the nemesis' schedule is reproducible from the seed
/// printed in the report (`FAULT_SEED`), though timing on a shared machine is not.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A duration in `lo..=hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.next_u64() % (span + 1))
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// The seed of a scenario: `FAULT_SEED` (or the clock), mixed with the scenario's name.
pub fn seed_for(scenario: &str) -> u64 {
    let base = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    scenario.bytes().fold(base, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    })
}

/// The gateways clients may talk to, by name (`g0`, `g1`, ...). A restarted gateway process gets
/// a new port: the scenario replaces its URL, as a load balancer's target list would change.
#[derive(Debug, Default)]
pub struct Endpoints {
    entries: RwLock<Vec<(String, String)>>,
}

impl Endpoints {
    pub fn new(bases: &[String]) -> Self {
        Self {
            entries: RwLock::new(
                bases
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (format!("g{i}"), b.clone()))
                    .collect(),
            ),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (name, base URL) of the gateway `i` (modulo their number).
    pub fn get(&self, i: usize) -> (String, String) {
        let entries = self.entries.read().unwrap();
        entries[i % entries.len()].clone()
    }

    pub fn set(&self, i: usize, base: &str) {
        self.entries.write().unwrap()[i].1 = base.to_owned();
    }

    pub fn names(&self) -> Vec<String> {
        self.entries
            .read()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn bases(&self) -> Vec<String> {
        self.entries
            .read()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }
}

/// Where the worker records each handler execution: in memory (an in-process worker) or in a
/// file, one JSON line per execution (a worker process; each line is one `write`, so a SIGKILL
/// leaves whole lines).
#[derive(Clone)]
pub enum EffectLog {
    Memory(Arc<Mutex<Vec<Effect>>>),
    File(Arc<Mutex<std::fs::File>>, PathBuf),
}

impl EffectLog {
    pub fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    /// Appends to `path` (created if missing).
    pub fn file(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the effect log");
        Self::File(Arc::new(Mutex::new(file)), path.to_owned())
    }

    pub fn record(&self, effect: &Effect) {
        match self {
            Self::Memory(list) => list.lock().unwrap().push(effect.clone()),
            Self::File(file, _) => {
                use std::io::Write;
                let mut line = serde_json::to_vec(effect).expect("effect as JSON");
                line.push(b'\n');
                file.lock()
                    .unwrap()
                    .write_all(&line)
                    .expect("append to the effect log");
            }
        }
    }

    /// Every execution recorded so far.
    pub fn snapshot(&self) -> Vec<Effect> {
        match self {
            Self::Memory(list) => list.lock().unwrap().clone(),
            Self::File(_, path) => read_effects(path),
        }
    }
}

/// The executions in an effect log file (a torn last line is skipped).
pub fn read_effects(path: &Path) -> Vec<Effect> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The suite's handler: records the execution (operation, a fresh nonce, the payload), works a
/// few milliseconds, and replies with the echo of the payload and the nonce.
pub fn echo_handler(log: EffectLog) -> impl handlers::Handler {
    move |r: Request| {
        let log = log.clone();
        async move {
            let exec = uuid::Uuid::new_v4().simple().to_string();
            let effect = Effect {
                op: r.operation_id.clone(),
                exec,
                payload: String::from_utf8_lossy(&r.body).into_owned(),
            };
            let work = 1 + u64::from(effect.exec.as_bytes()[0] % 8);
            tokio::time::sleep(Duration::from_millis(work)).await;
            log.record(&effect);
            Ok(Response::json(200, &history::effect_reply(&effect)))
        }
    }
}

/// The routes of the suite: one route, no expiry within a run.
pub const FAULT_ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
timeout = "10m"
"#;

/// The routes of a run with stateful workers ([`Run::with_stateful`]): the echo route and the
/// stateful one, whose deadline ([`crate::exactly_once::DEADLINE_SECS`]) faults make operations
/// miss.
pub fn fault_routes() -> String {
    let deadline = format!("{}s", crate::exactly_once::DEADLINE_SECS);
    format!("{FAULT_ROUTES}{}", crate::exactly_once::route(&deadline))
}

/// Worker settings of the suite: short AckWait and back-off so redeliveries happen within a run,
/// and a generous `max_deliver`: every crash, lost ack or AckWait expiry spends a delivery, and
/// an operation that ran out of deliveries would stay pending until its deadline.
pub fn fault_worker_config() -> handlers::WorkerConfig {
    handlers::WorkerConfig {
        max_deliver: 1000,
        ..crate::worker_config()
    }
}

/// Starts a `fault-worker` process (`bin`: `env!("CARGO_BIN_EXE_fault-worker")`) under `prefix`
/// (`ip netns exec <ns>`, or none) with `env` besides: the suite's echo handler on `orders`, on
/// these NATS URLs (comma-separated), recording every execution in `log`. Killed when dropped.
pub fn spawn_echo_worker(
    prefix: &[String],
    env: &[(String, String)],
    bin: &str,
    nats_url: &str,
    log: &Path,
) -> tokio::process::Child {
    crate::netns::prefixed(prefix, bin)
        .arg(nats_url)
        .arg("orders")
        .arg(log)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start an echo worker process")
}

/// The workers' durable consumer under [`fault_worker_config`].
pub const WORKER_CONSUMER: &str = "test-orders";

/// Reads at once while draining and at the end: within every scenario's in-flight limit (3 per
/// gateway in the proxy scenario), so the end state is read, not shed.
const READ_CONCURRENCY: usize = 4;

/// One logical request's end, as its client saw it.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub first: Outcome,
    pub acknowledged: Option<String>,
}

/// What a client does with one logical request: submit it to `path`, and retry a `503`, a `507`
/// or a network error with the same key and payload (through the next gateway) until a `202`, a
/// definite refusal of another kind, or `patience` runs out.
#[allow(clippy::too_many_arguments)]
pub async fn submit_until_done(
    history: &History,
    http: &reqwest::Client,
    endpoints: &Endpoints,
    process: &str,
    first_gateway: usize,
    path: &str,
    key: &str,
    payload: &str,
    patience: Duration,
) -> Submitted {
    let give_up = Instant::now() + patience;
    let mut first = None;
    let mut attempt = 0u32;
    loop {
        let (via, base) = endpoints.get(first_gateway + attempt as usize);
        attempt += 1;
        let outcome = history::submit(
            history, http, process, &via, &base, path, key, payload, attempt,
        )
        .await;
        let acknowledged = match &outcome {
            Outcome::Ok { op, .. } => op.clone(),
            _ => None,
        };
        // 503 and 507 say "retry after Retry-After"; anything else refused is refused for good.
        let definite_refusal =
            matches!(outcome, Outcome::Fail { http, .. } if !matches!(http, 503 | 507));
        let first = first.get_or_insert(outcome).clone();
        if acknowledged.is_some() || definite_refusal || Instant::now() >= give_up {
            return Submitted {
                first,
                acknowledged,
            };
        }
        let backoff = Duration::from_millis((100 * u64::from(attempt)).min(800));
        tokio::time::sleep(backoff.min(give_up.saturating_duration_since(Instant::now()))).await;
    }
}

/// An HTTP client for the suite: each attempt bounded (the gateway answers within its NATS
/// timeout, 2 s, unless it is dead or frozen).
pub fn fault_http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

/// The clients of a run: submitting lanes and status pollers.
pub struct Load {
    new_work: CancellationToken,
    polling: CancellationToken,
    lanes: JoinSet<()>,
    pollers: JoinSet<()>,
}

impl Load {
    /// Stops starting new requests; lanes finish the one they are on (see [`Load::join`]).
    pub fn stop_new_requests(&self) {
        self.new_work.cancel();
    }

    /// Waits for every lane to finish its last request, then stops the pollers.
    pub async fn join(mut self) {
        self.new_work.cancel();
        while self.lanes.join_next().await.is_some() {}
        self.polling.cancel();
        while self.pollers.join_next().await.is_some() {}
    }
}

/// The post-heal batch: how many got a `202` on the first attempt, and at all.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PostHeal {
    pub sent: usize,
    pub first_attempt_ok: usize,
    pub eventually_ok: usize,
    /// `first_attempt_ok / sent`.
    pub success_rate: f64,
}

/// A nemesis note in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Note {
    pub t_s: f64,
    pub what: String,
}

/// Durations of the phases, in seconds.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Durations {
    pub setup_s: f64,
    pub faults_s: f64,
    pub heal_s: f64,
    pub post_heal_s: f64,
    pub drain_s: f64,
    pub check_s: f64,
    pub total_s: f64,
}

/// State of the workers' consumer after draining.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ConsumerState {
    pub drained: bool,
    pub num_pending: u64,
    pub num_ack_pending: usize,
    pub num_redelivered: usize,
}

/// Everything one scenario's run found, as written to `<dir>/<scenario>.json` and `.md`.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub title: String,
    pub profile: Profile,
    pub seed: u64,
    pub faults_injected: usize,
    /// Faults injected, by kind.
    pub fault_kinds: std::collections::BTreeMap<String, usize>,
    pub durations: Durations,
    pub counts: crate::history::Counts,
    /// The exactly-once oracles over the stateful route, in a run that has one.
    pub exactly_once: Option<crate::exactly_once::ExactlyOnce>,
    pub post_heal: PostHeal,
    pub consumer: ConsumerState,
    /// Anomalies that are not zero (must be empty), and other failed requirements.
    pub violations: Vec<String>,
    /// Evidence per anomaly (up to ten each).
    pub examples: std::collections::BTreeMap<String, Vec<String>>,
    /// Why the non-zero informational counts are not anomalies, and what the run does not cover.
    pub explanations: Vec<String>,
    pub nemesis: Vec<Note>,
    pub history_file: String,
    pub passed: bool,
}

impl ScenarioReport {
    /// Panics with the report's violations, if any.
    pub fn assert_passed(&self) {
        assert!(
            self.passed,
            "{}: {:?}\nexamples: {:#?}",
            self.scenario, self.violations, self.examples
        );
    }

    pub fn markdown(&self) -> String {
        let c = &self.counts;
        let d = &self.durations;
        let mut md = format!(
            "### {} (`{}`)\n\n{}\n\nProfile `{}`, seed `{}`, {} faults injected; {:.1} s in all \
             (setup {:.1}, faults {:.1}, heal {:.1}, post-heal {:.1}, drain {:.1}, check {:.1}). \
             **{}**.\n\n",
            self.title,
            self.scenario,
            self.nemesis_summary(),
            self.profile.name,
            self.seed,
            self.faults_injected,
            d.total_s,
            d.setup_s,
            d.faults_s,
            d.heal_s,
            d.post_heal_s,
            d.drain_s,
            d.check_s,
            if self.passed { "passed" } else { "FAILED" },
        );
        md.push_str("| requests | attempts | ok | unknown | fail | lost | unexpected | duplicates | regressions | post-heal 202 on 1st attempt |\n");
        md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} ({:.1}%) |\n\n",
            c.requests,
            c.attempts,
            c.ok,
            c.unknown,
            c.fail,
            c.lost,
            c.unexpected,
            c.duplicates,
            c.regressions,
            self.post_heal.first_attempt_ok,
            self.post_heal.sent,
            100.0 * self.post_heal.success_rate,
        ));
        md.push_str(&format!(
            "Also zero: inconsistent results {}, 404 after a 202 {}, not succeeded {}, answers \
             outside the contract {}, expired early {} (of {} expired); duplicates = {} request \
             + {} committed-result. \
             Retried until acknowledged: {} ({} found, by a replay, the write of an attempt \
             whose outcome was unknown). Indeterminate requests that took effect: {} of {}. \
             Stream: {} requests, {} results. \
             Status reads: {} ({} unavailable); result reads: {} ({} unavailable). Handler executions: {} ({} operations more than \
             once, at most {}). Workers' consumer drained: {} (pending {}, ack pending \
             {}).\n\n",
            c.inconsistent_results,
            c.not_found_after_ack,
            c.not_succeeded,
            c.unexpected_answers,
            c.expired_early,
            c.expired,
            c.duplicate_requests,
            c.duplicate_effects,
            c.acknowledged_after_retry,
            c.replayed_after_unknown,
            c.unknown_took_effect,
            c.unknown,
            c.request_messages,
            c.result_messages,
            c.status_reads,
            c.status_reads_unavailable,
            c.result_reads,
            c.result_reads_unavailable,
            c.handler_executions,
            c.ops_executed_more_than_once,
            c.max_executions_per_op,
            self.consumer.drained,
            self.consumer.num_pending,
            self.consumer.num_ack_pending,
        ));
        if let Some(e) = &self.exactly_once {
            let list = |m: &std::collections::BTreeMap<String, usize>| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            md.push_str(&format!(
                "Stateful route (exactly-once oracles): {} operations ({}); cancels sent: {}; \
                 counter {}, outgoing messages {}; inconsistent operations {}, lost state \
                 changes {}, duplicate state changes {}, ghosts {}.\n\n",
                e.operations,
                list(&e.ended),
                if e.cancels.is_empty() {
                    "none".to_owned()
                } else {
                    list(&e.cancels)
                },
                e.counter,
                e.outgoing_messages,
                e.inconsistent_operations,
                e.lost_state_changes,
                e.duplicate_state_changes,
                e.ghosts,
            ));
            for example in &e.examples {
                md.push_str(&format!("- exactly-once evidence: `{example}`\n"));
            }
        }
        md.push_str("Submit answers: ");
        md.push_str(
            &c.answers
                .iter()
                .map(|(k, v)| format!("`{k}` {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        md.push_str(".\n\n");
        if !self.violations.is_empty() {
            md.push_str("**Violations:**\n\n");
            for v in &self.violations {
                md.push_str(&format!("- {v}\n"));
            }
            md.push('\n');
        }
        for (category, list) in &self.examples {
            md.push_str(&format!("Evidence, `{category}`:\n\n"));
            for e in list {
                md.push_str(&format!("- `{e}`\n"));
            }
            md.push('\n');
        }
        if !self.explanations.is_empty() {
            for e in &self.explanations {
                md.push_str(&format!("- {e}\n"));
            }
            md.push('\n');
        }
        md
    }

    fn nemesis_summary(&self) -> String {
        let kinds = self
            .fault_kinds
            .iter()
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect::<Vec<_>>()
            .join("; ");
        format!("Faults: {kinds}.")
    }
}

/// One scenario's run: its history, clients, nemesis randomness, phases and report.
pub struct Run {
    pub scenario: String,
    pub title: String,
    pub profile: Profile,
    pub seed: u64,
    pub history: Arc<History>,
    pub endpoints: Arc<Endpoints>,
    pub http: reqwest::Client,
    rng: Mutex<Rng>,
    started: Instant,
    setup: Duration,
    faults_started: Mutex<Option<Instant>>,
    phases: Mutex<Durations>,
    faults: Mutex<Vec<String>>,
    explanations: Mutex<Vec<String>>,
    not_ready: Mutex<Vec<String>>,
    /// Whether the run has the stateful route and its workers ([`Run::with_stateful`]).
    stateful: bool,
    /// The stateful lanes' cancellations: operation and answer.
    cancels: Arc<Mutex<Vec<(String, String)>>>,
    /// The clocks' allowance expiries are judged by ([`Run::with_clocks`]).
    clocks: history::ClockAllowance,
}

impl Run {
    /// A run whose infrastructure took since `started` to set up, with these gateways.
    pub fn new(scenario: &str, title: &str, started: Instant, gateways: &[String]) -> Self {
        let profile = Profile::from_env();
        let seed = seed_for(scenario);
        eprintln!(
            "[{scenario}] profile {}, seed {seed} (FAULT_SEED to repeat the schedule)",
            profile.name
        );
        Self {
            scenario: scenario.to_owned(),
            title: title.to_owned(),
            profile,
            seed,
            history: Arc::new(History::new()),
            endpoints: Arc::new(Endpoints::new(gateways)),
            http: fault_http(),
            rng: Mutex::new(Rng::new(seed)),
            setup: started.elapsed(),
            started,
            faults_started: Mutex::new(None),
            phases: Mutex::default(),
            faults: Default::default(),
            explanations: Mutex::default(),
            not_ready: Mutex::default(),
            stateful: false,
            cancels: Arc::default(),
            clocks: history::ClockAllowance::default(),
        }
    }

    /// A run whose processes' clocks are off ([`history::ClockAllowance`]): no expiry may be
    /// stored before `deadline + grace - ahead` by nats-server's clock. Without it: exactly
    /// none before the deadline.
    pub fn with_clocks(mut self, clocks: history::ClockAllowance) -> Self {
        self.clocks = clocks;
        self
    }

    /// A run with the stateful route ([`crate::exactly_once::route`]) and its workers, which the
    /// scenario starts: lanes submit to it too and cancel some of their operations, and the
    /// exactly-once oracles judge it at the end.
    pub fn with_stateful(mut self) -> Self {
        self.stateful = true;
        self
    }

    /// A nemesis note that counts as an injected fault of this kind (`kill -9 nats-server`,
    /// `stall`, ...), with details (may be empty).
    pub fn fault(&self, kind: &str, detail: impl Into<String>) {
        let detail = detail.into();
        self.faults.lock().unwrap().push(kind.to_owned());
        self.history.note(if detail.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}: {detail}")
        });
    }

    /// A nemesis note that is not a fault (healing, phase changes).
    pub fn note(&self, what: impl Into<String>) {
        self.history.note(what);
    }

    /// Adds an explanation to the report.
    pub fn explain(&self, text: impl Into<String>) {
        self.explanations.lock().unwrap().push(text.into());
    }

    pub fn rand_between(&self, lo: Duration, hi: Duration) -> Duration {
        self.rng.lock().unwrap().between(lo, hi)
    }

    pub fn rand_below(&self, n: usize) -> usize {
        self.rng.lock().unwrap().below(n)
    }

    pub fn chance(&self, percent: u64) -> bool {
        self.rng.lock().unwrap().chance(percent)
    }

    /// Starts the lanes and pollers; the fault phase begins.
    pub fn start_load(&self) -> Load {
        *self.faults_started.lock().unwrap() = Some(Instant::now());
        self.note(format!(
            "phase: faults for {:?}, {} lanes, {} pollers",
            self.profile.fault_phase, self.profile.lanes, self.profile.pollers
        ));
        let new_work = CancellationToken::new();
        let polling = CancellationToken::new();
        let acked: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut lanes = JoinSet::new();
        for lane in 0..self.profile.lanes {
            let (history, endpoints, http) = (
                self.history.clone(),
                self.endpoints.clone(),
                self.http.clone(),
            );
            let (stop, acked, scenario) = (new_work.clone(), acked.clone(), self.scenario.clone());
            let (pace, patience) = (self.profile.pace, self.profile.patience);
            lanes.spawn(async move {
                let process = format!("lane-{lane}");
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    // One request in ten is a one-shot: its client never retries, so a 503 or a
                    // broken connection leaves it indeterminate (`unknown`) for good, and the
                    // checker must find it either absent or processed like any other.
                    let one_shot = n % 10 == 9;
                    let key = format!("{scenario}-l{lane}-{n}");
                    let payload = serde_json::json!({
                        "scenario": scenario,
                        "lane": lane,
                        "n": n,
                        "one_shot": one_shot,
                        "nonce": uuid::Uuid::new_v4().simple().to_string(),
                    })
                    .to_string();
                    n += 1;
                    let patience = if one_shot { Duration::ZERO } else { patience };
                    let done = submit_until_done(
                        &history, &http, &endpoints, &process, lane, "/orders", &key, &payload,
                        patience,
                    )
                    .await;
                    if let Some(op) = done.acknowledged {
                        acked.lock().unwrap().push(op);
                    }
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(pace) => {}
                    }
                }
            });
        }
        let stateful_lanes = if self.stateful {
            self.profile.stateful_lanes
        } else {
            0
        };
        for lane in 0..stateful_lanes {
            let (history, endpoints, http) = (
                self.history.clone(),
                self.endpoints.clone(),
                self.http.clone(),
            );
            let (stop, acked, scenario) = (new_work.clone(), acked.clone(), self.scenario.clone());
            let (pace, patience) = (self.profile.pace * 2, self.profile.patience);
            let (cancels, cancel_percent) = (self.cancels.clone(), self.profile.cancel_percent);
            let mut rng = Rng::new(self.seed ^ (0x5747 + lane as u64));
            lanes.spawn(async move {
                let process = format!("stateful-{lane}");
                let path = format!("/{}", crate::exactly_once::ROUTE);
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    let key = format!("{scenario}-s{lane}-{n}");
                    let payload = serde_json::json!({
                        "scenario": scenario,
                        "stateful_lane": lane,
                        "n": n,
                        "nonce": uuid::Uuid::new_v4().simple().to_string(),
                    })
                    .to_string();
                    n += 1;
                    let done = submit_until_done(
                        &history, &http, &endpoints, &process, lane, &path, &key, &payload,
                        patience,
                    )
                    .await;
                    if let Some(op) = done.acknowledged {
                        acked.lock().unwrap().push(op.clone());
                        if rng.chance(cancel_percent) {
                            // At a random moment: before the worker starts, while it commits,
                            // or after it ended (then 409).
                            tokio::time::sleep(Duration::from_millis(rng.below(1500) as u64)).await;
                            let (_, base) = endpoints.get(lane + 1 + rng.below(4));
                            let answer =
                                match http.delete(format!("{base}/operations/{op}")).send().await {
                                    Ok(r) => r.status().as_u16().to_string(),
                                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                                    Err(_) => "network error".to_owned(),
                                };
                            cancels.lock().unwrap().push((op, answer));
                        }
                    }
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(pace) => {}
                    }
                }
            });
        }
        let mut pollers = JoinSet::new();
        for p in 0..self.profile.pollers {
            let (history, endpoints, http) = (
                self.history.clone(),
                self.endpoints.clone(),
                self.http.clone(),
            );
            let (stop, acked, pace) = (polling.clone(), acked.clone(), self.profile.poll_pace);
            let mut rng = Rng::new(self.seed ^ (p as u64 + 1));
            pollers.spawn(async move {
                let process = format!("poller-{p}");
                let mut turn = p;
                while !stop.is_cancelled() {
                    let op = {
                        let acked = acked.lock().unwrap();
                        if acked.is_empty() {
                            None
                        } else if rng.chance(60) {
                            // Mostly recent operations: those are the ones changing state.
                            let recent = acked.len().min(50);
                            Some(acked[acked.len() - 1 - rng.below(recent)].clone())
                        } else {
                            Some(acked[rng.below(acked.len())].clone())
                        }
                    };
                    if let Some(op) = op {
                        turn += 1;
                        let (via, base) = endpoints.get(turn);
                        if rng.chance(25) {
                            history::read_result(&history, &http, &process, &via, &base, &op).await;
                        } else {
                            history::read_status(&history, &http, &process, &via, &base, &op).await;
                        }
                    }
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(pace) => {}
                    }
                }
            });
        }
        Load {
            new_work,
            polling,
            lanes,
            pollers,
        }
    }

    /// Whether the fault phase is still on.
    pub fn in_fault_phase(&self) -> bool {
        self.faults_started
            .lock()
            .unwrap()
            .is_some_and(|t| t.elapsed() < self.profile.fault_phase)
    }

    /// Sleeps `d`, or until the fault phase ends.
    pub async fn pause(&self, d: Duration) {
        let left = self
            .faults_started
            .lock()
            .unwrap()
            .map_or(Duration::ZERO, |t| {
                self.profile.fault_phase.saturating_sub(t.elapsed())
            });
        tokio::time::sleep(d.min(left)).await;
    }

    /// Sleeps exactly `d` (a fault's duration: it is healed after it, even past the phase).
    pub async fn hold(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// After healing a cluster: waits until every stream the run writes (the gateway's, the
    /// state store, the outgoing messages) has a leader and current followers.
    pub async fn wait_streams_healthy(&self, cluster: &crate::NatsCluster) {
        use handlers::contract::{DEFAULT_OUTCOMES_STREAM, DEFAULT_REQUESTS_STREAM};
        for stream in [
            DEFAULT_REQUESTS_STREAM,
            DEFAULT_OUTCOMES_STREAM,
            crate::exactly_once::STATE_STREAM,
            crate::exactly_once::AUDIT_STREAM,
        ] {
            cluster
                .wait_stream_healthy(stream, Duration::from_secs(60))
                .await;
        }
        self.note("every stream healthy: a leader and two current followers");
    }

    /// Ends the fault phase: no new requests; the scenario now heals everything.
    pub fn end_faults(&self, load: &Load) {
        load.stop_new_requests();
        let t = self
            .faults_started
            .lock()
            .unwrap()
            .map_or(Duration::ZERO, |t| t.elapsed());
        self.phases.lock().unwrap().faults_s = t.as_secs_f64();
        self.note("phase: faults end, healing");
    }

    /// After the scenario healed everything: lanes finish, every gateway is ready, the
    /// post-heal batch runs, every operation drains, the checker judges and the report is
    /// written. `js` reads the streams; `effects` gives the worker's executions.
    pub async fn finish(
        &self,
        load: Load,
        healed_at: Instant,
        js: &async_nats::jetstream::Context,
        effects: &EffectLog,
    ) -> ScenarioReport {
        load.join().await;
        for (i, name) in self.endpoints.names().iter().enumerate() {
            let (_, base) = self.endpoints.get(i);
            if !ready_within(&base, Duration::from_secs(60)).await {
                self.not_ready.lock().unwrap().push(name.clone());
                self.note(format!("gateway {name} not ready 60 s after healing"));
            }
        }
        self.phases.lock().unwrap().heal_s = healed_at.elapsed().as_secs_f64();
        self.note("phase: healed, every gateway ready; post-heal batch");

        let post_heal_start = Instant::now();
        let post_heal = self.post_heal().await;
        self.phases.lock().unwrap().post_heal_s = post_heal_start.elapsed().as_secs_f64();
        self.note(format!(
            "phase: post-heal {}/{} on the first attempt; draining",
            post_heal.first_attempt_ok, post_heal.sent
        ));

        let drain_start = Instant::now();
        // Everything JetStream holds must end: acknowledged operations and any indeterminate
        // write that landed.
        let (requests, _) = read_streams_eventually(js).await;
        let ops: Vec<String> = requests.iter().map(|r| r.op.clone()).collect();
        let still_pending = self.drain(&ops).await;
        self.final_reads(&ops).await;
        let consumer = consumer_state(js, Duration::from_secs(30)).await;
        self.phases.lock().unwrap().drain_s = drain_start.elapsed().as_secs_f64();
        self.note(format!(
            "phase: drained ({} still pending); checking",
            still_pending.len()
        ));

        let check_start = Instant::now();
        let (requests, results) = read_streams_eventually(js).await;
        let effects = effects.snapshot();
        let names = self.endpoints.names();
        let calls = self.history.calls();
        let verdict = history::check(
            &calls,
            &history::Observed {
                requests: &requests,
                results: &results,
                effects: Some(&effects),
                gateways: &names,
                final_process: "final",
                stateful_route: self.stateful.then_some(crate::exactly_once::ROUTE),
                clocks: self.clocks.clone(),
            },
        );
        let exactly_once = if self.stateful {
            let cancels = self.cancels.lock().unwrap().clone();
            Some(crate::exactly_once::check(js, &requests, &results, &cancels).await)
        } else {
            None
        };
        self.phases.lock().unwrap().check_s = check_start.elapsed().as_secs_f64();
        let report = self.report(verdict, exactly_once, post_heal, consumer);
        self.write_report(&report);
        report
    }

    async fn post_heal(&self) -> PostHeal {
        let n = self.profile.heal_batch;
        let outcomes: Vec<Submitted> = futures::stream::iter(0..n)
            .map(|i| async move {
                let key = format!("{}-heal-{i}", self.scenario);
                let payload = serde_json::json!({
                    "scenario": self.scenario,
                    "heal": i,
                    "nonce": uuid::Uuid::new_v4().simple().to_string(),
                })
                .to_string();
                submit_until_done(
                    &self.history,
                    &self.http,
                    &self.endpoints,
                    "heal",
                    i,
                    "/orders",
                    &key,
                    &payload,
                    self.profile.patience,
                )
                .await
            })
            .buffer_unordered(self.profile.heal_concurrency)
            .collect()
            .await;
        let first_attempt_ok = outcomes.iter().filter(|o| o.first.is_ok()).count();
        PostHeal {
            sent: n,
            first_attempt_ok,
            eventually_ok: outcomes.iter().filter(|o| o.acknowledged.is_some()).count(),
            success_rate: first_attempt_ok as f64 / n.max(1) as f64,
        }
    }

    /// Polls every operation (round robin over the gateways) until each reads terminal, or the
    /// drain timeout passes; returns those still not terminal.
    async fn drain(&self, ops: &[String]) -> Vec<String> {
        let deadline = Instant::now() + self.profile.drain_timeout;
        let mut pending: Vec<String> = ops.to_vec();
        let mut round = 0usize;
        while !pending.is_empty() && Instant::now() < deadline {
            round += 1;
            let still: Vec<Option<String>> = futures::stream::iter(pending.iter().enumerate())
                .map(|(i, op)| async move {
                    let (via, base) = self.endpoints.get(i + round);
                    let outcome =
                        history::read_status(&self.history, &self.http, "drain", &via, &base, op)
                            .await;
                    let terminal = matches!(
                        &outcome,
                        Outcome::Ok { status: Some(s), .. } if s != "pending"
                    );
                    (!terminal).then(|| op.clone())
                })
                .buffer_unordered(READ_CONCURRENCY)
                .collect()
                .await;
            pending = still.into_iter().flatten().collect();
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        pending
    }

    /// Reads every operation once through every gateway (a 503 or a network error is retried
    /// for a while): the checker's view of the end state; then every result once.
    async fn final_reads(&self, ops: &[String]) {
        let n = self.endpoints.len();
        let pairs: Vec<(usize, &String)> = (0..n)
            .flat_map(|g| ops.iter().map(move |op| (g, op)))
            .collect();
        futures::stream::iter(pairs)
            .for_each_concurrent(READ_CONCURRENCY, |(g, op)| async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let (via, base) = self.endpoints.get(g);
                    let outcome =
                        history::read_status(&self.history, &self.http, "final", &via, &base, op)
                            .await;
                    if !matches!(outcome, Outcome::Unknown { .. }) || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
            .await;
        // And each result once, through the gateways in turn: what a client is served.
        futures::stream::iter(ops.iter().enumerate())
            .for_each_concurrent(READ_CONCURRENCY, |(i, op)| async move {
                let (via, base) = self.endpoints.get(i);
                history::read_result(&self.history, &self.http, "final", &via, &base, op).await;
            })
            .await;
    }

    fn report(
        &self,
        verdict: Verdict,
        exactly_once: Option<crate::exactly_once::ExactlyOnce>,
        post_heal: PostHeal,
        consumer: ConsumerState,
    ) -> ScenarioReport {
        let mut durations = self.phases.lock().unwrap().clone();
        durations.setup_s = self.setup.as_secs_f64();
        durations.total_s = self.started.elapsed().as_secs_f64();
        let c = &verdict.counts;
        let mut violations: Vec<String> = c
            .violations()
            .into_iter()
            .map(|(name, n)| format!("{name} = {n}"))
            .collect();
        if let Some(e) = &exactly_once {
            violations.extend(
                e.violations()
                    .into_iter()
                    .map(|(name, n)| format!("{name} = {n}")),
            );
            if e.ended.get("succeeded").copied().unwrap_or(0) == 0 {
                violations.push("no stateful operation committed".to_owned());
            }
        }
        if post_heal.success_rate < 0.95 {
            violations.push(format!(
                "post-heal: only {}/{} requests got a 202 on their first attempt (95% required)",
                post_heal.first_attempt_ok, post_heal.sent
            ));
        }
        if !consumer.drained {
            violations.push(format!(
                "the workers' consumer did not drain: {} pending, {} ack pending",
                consumer.num_pending, consumer.num_ack_pending
            ));
        }
        for name in self.not_ready.lock().unwrap().iter() {
            violations.push(format!(
                "gateway {name} was not ready within 60 s of healing"
            ));
        }
        let faults = self.faults.lock().unwrap().clone();
        if faults.is_empty() {
            violations.push("no fault was injected".to_owned());
        }
        let mut explanations = self.explanations.lock().unwrap().clone();
        explanations.extend(standard_explanations(c));
        let history_file = self.history_path();
        ScenarioReport {
            scenario: self.scenario.clone(),
            title: self.title.clone(),
            profile: self.profile.clone(),
            seed: self.seed,
            faults_injected: faults.len(),
            fault_kinds: faults.iter().fold(Default::default(), |mut m, k| {
                *m.entry(k.clone()).or_default() += 1;
                m
            }),
            durations,
            counts: verdict.counts.clone(),
            exactly_once,
            post_heal,
            consumer,
            passed: violations.is_empty(),
            violations,
            examples: verdict.examples,
            explanations,
            nemesis: self
                .history
                .notes()
                .into_iter()
                .map(|(t, what)| Note {
                    t_s: (t.as_secs_f64() * 1000.0).round() / 1000.0,
                    what,
                })
                .collect(),
            history_file: history_file.display().to_string(),
        }
    }

    fn history_path(&self) -> PathBuf {
        report_dir(&self.profile)
            .join("histories")
            .join(format!("{}.jsonl", self.scenario))
    }

    fn write_report(&self, report: &ScenarioReport) {
        let dir = report_dir(&self.profile);
        std::fs::create_dir_all(dir.join("histories")).expect("create the report directory");
        self.history
            .write_jsonl(&self.history_path())
            .expect("write the history");
        std::fs::write(
            dir.join(format!("{}.json", self.scenario)),
            serde_json::to_string_pretty(report).expect("report as JSON"),
        )
        .expect("write the JSON report");
        std::fs::write(dir.join(format!("{}.md", self.scenario)), report.markdown())
            .expect("write the Markdown report");
        eprintln!(
            "[{}] report: {}\n{}",
            self.scenario,
            dir.join(format!("{}.md", self.scenario)).display(),
            report.markdown()
        );
    }
}

/// Polls `/readyz` until it answers 200; false after `timeout`.
pub async fn ready_within(base: &str, timeout: Duration) -> bool {
    let http = fault_http();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `FAULT_REPORT_DIR`, else a directory under the system's temp dir per profile.
pub fn report_dir(profile: &Profile) -> PathBuf {
    std::env::var_os("FAULT_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("gateway-faults-{}", profile.name)))
}

/// The explanations every report carries for its informational counts and its limits.
fn standard_explanations(c: &crate::history::Counts) -> Vec<String> {
    let mut out = Vec::new();
    if c.unknown > 0 {
        out.push(format!(
            "`unknown` {} (not an anomaly): requests whose client never got a 202, only a \
             timeout, a broken connection or a `503 outcome-unknown`; one-shot requests \
             (one in ten, never retried) and requests whose client ran out of patience. \
             Their outcome is indeterminate by the contract: {} of them did take effect (the \
             request is in JetStream), and the checker verifies they were then processed like \
             any other; the others left nothing.",
            c.unknown, c.unknown_took_effect
        ));
    }
    if c.fail > 0 {
        out.push(format!(
            "`fail` {} (not an anomaly): requests refused definitely (`503 overloaded` or \
             `shutting-down`, `507 insufficient-storage`) on every attempt they made (one-shot requests, mostly); none of \
             them is in JetStream, which the checker verifies (it would count as `unexpected`).",
            c.fail
        ));
    }
    if c.ops_executed_more_than_once > 0 {
        out.push(format!(
            "Handler re-executions (information, not duplicates): {} operations ran their \
             handler more than once (at most {} times). Delivery to workers is at least once: \
             a worker killed or frozen after running the handler but before its ack, an ack \
             lost with a killed server or a dropped connection, or an AckWait that expired \
             while a worker was frozen, all redeliver. The results stream still holds exactly \
             one result per operation (first writer wins), and the checker verifies that the \
             stored one is the echo of the request from one recorded execution.",
            c.ops_executed_more_than_once, c.max_executions_per_op
        ));
    }
    out
}

/// Reads both streams, retrying while the cluster settles.
pub async fn read_streams_eventually(
    js: &async_nats::jetstream::Context,
) -> (Vec<history::StoredRequest>, Vec<history::StoredResult>) {
    crate::eventually("both streams read", Duration::from_secs(60), || async {
        match history::read_gateway_streams(js).await {
            Ok(streams) => Some(streams),
            Err(e) => {
                eprintln!("reading the streams: {e}; retrying");
                None
            }
        }
    })
    .await
}

/// Waits (at most `timeout`) until the workers' consumer has nothing pending or unacknowledged.
pub async fn consumer_state(
    js: &async_nats::jetstream::Context,
    timeout: Duration,
) -> ConsumerState {
    use handlers::contract::DEFAULT_REQUESTS_STREAM;
    let deadline = Instant::now() + timeout;
    let mut last = ConsumerState::default();
    loop {
        let info = async {
            let mut consumer = js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    WORKER_CONSUMER,
                    DEFAULT_REQUESTS_STREAM,
                )
                .await
                .ok()?;
            consumer.info().await.ok().cloned()
        }
        .await;
        if let Some(info) = info {
            last = ConsumerState {
                drained: info.num_pending == 0 && info.num_ack_pending == 0,
                num_pending: info.num_pending,
                num_ack_pending: info.num_ack_pending,
                num_redelivered: info.num_redelivered,
            };
            if last.drained {
                return last;
            }
        }
        if Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
