//! The stateful half of a fault run: a route whose workers keep state (one counter, in the
//! `WK_COUNT` stream) and emit an outgoing message per commit (to `AUDIT`), worker processes kept
//! running by a supervisor, and the exactly-once oracles that judge every operation of that route
//! once the run has drained. Cancellations (from the lanes, `crate::chaos`) and the route's short
//! deadline race the workers' commits; the processed marker decides each operation.
//!
//! The oracles, per operation of the route that JetStream holds:
//! - it has one processed marker, and its result agrees with it: `succeeded` exactly when the
//!   marker is a commit, and then its reply is the value it committed; `cancelled`, `expired` or
//!   `failed` exactly when the marker is a decision without a commit;
//! - it has an outgoing message exactly when it committed, and at most one.
//!
//! And over all of them: the counter equals the number of commits (no state change lost, none
//! twice), and the committed replies are exactly `1..=` that number (each commit saw the state
//! the one before it left).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::history::{StoredRequest, StoredResult, read_stream};

/// The stateful route's name and path (`POST /count`).
pub const ROUTE: &str = "count";
/// The workers' state store: stream and subject prefix.
pub const STATE_STREAM: &str = "WK_COUNT";
pub const STATE_PREFIX: &str = "wk";
/// Where the workers' outgoing messages go: the stream, and the subject (the operation id as
/// payload).
pub const AUDIT_STREAM: &str = "AUDIT";
pub const AUDIT_SUBJECT: &str = "audit.count";

/// The fault suite's deadline of the stateful route, in seconds: short, so that operations a
/// fault holds up expire, some while a worker commits them.
pub const DEADLINE_SECS: u64 = 8;

/// The stateful route's TOML, with this deadline (`"8s"`).
pub fn route(timeout: &str) -> String {
    format!(
        r#"
[[route]]
name = "{ROUTE}"
method = "POST"
path = "/{ROUTE}"
timeout = "{timeout}"
retention = "10m"
state = {{ stream = "{STATE_STREAM}", prefix = "{STATE_PREFIX}" }}
"#
    )
}

/// Creates the stream of the workers' outgoing messages, with `replicas`.
pub async fn create_audit_stream(js: &async_nats::jetstream::Context, replicas: usize) {
    create_stream(
        js,
        async_nats::jetstream::stream::Config {
            name: AUDIT_STREAM.into(),
            subjects: vec!["audit.>".into()],
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await;
}

async fn create_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) {
    let what = format!("stream {} is created", config.name);
    crate::eventually(&what, Duration::from_secs(30), || async {
        js.get_or_create_stream(config.clone())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// The stateful side of a run on one NATS (`nats_url`, comma-separated URLs): the outgoing
/// messages' stream with `replicas`, and two `bin` worker processes with `env`, supervised. The
/// gateways (on [`crate::chaos::fault_routes`]) make the state store.
pub async fn start_workers(
    js: &async_nats::jetstream::Context,
    bin: &str,
    nats_url: &str,
    replicas: usize,
    env: Vec<(String, String)>,
) -> StatefulWorkers {
    create_audit_stream(js, replicas).await;
    StatefulWorkers::supervise(WorkerSpec {
        bin: bin.to_owned(),
        nats_url: nats_url.to_owned(),
        count: 2,
        env,
        prefix: Arc::new(|_| Vec::new()),
    })
}

/// Stateful worker processes, kept running: one that exits (a crash point fired, or it could not
/// reach NATS) is started again. Stopped (killed) by [`StatefulWorkers::stop`] or on drop.
pub struct StatefulWorkers {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    restarts: Arc<AtomicU32>,
    /// The running processes' ids.
    pids: Arc<std::sync::Mutex<Vec<u32>>>,
}

/// How to start the stateful worker processes.
pub struct WorkerSpec {
    /// The `stateful-worker` binary (`env!("CARGO_BIN_EXE_stateful-worker")`).
    pub bin: String,
    /// NATS URLs, comma-separated.
    pub nats_url: String,
    /// Processes to keep running.
    pub count: usize,
    /// Environment of every process (crash points, stalls, `LD_PRELOAD`...).
    pub env: Vec<(String, String)>,
    /// A command prefix per process index (`ip netns exec <ns>`), or none.
    pub prefix: Arc<dyn Fn(usize) -> Vec<String> + Send + Sync>,
}

impl StatefulWorkers {
    /// Starts `spec.count` processes and supervises them.
    pub fn supervise(spec: WorkerSpec) -> Self {
        let stop = CancellationToken::new();
        let restarts = Arc::new(AtomicU32::new(0));
        let pids: Arc<std::sync::Mutex<Vec<u32>>> = Arc::default();
        let (token, counter, running) = (stop.clone(), restarts.clone(), pids.clone());
        let task = tokio::spawn(async move {
            let spawn = |i: usize| {
                crate::netns::prefixed(&(spec.prefix)(i), &spec.bin)
                    .args([spec.nats_url.as_str(), ROUTE])
                    .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start a stateful worker process")
            };
            let mut workers: Vec<_> = (0..spec.count).map(spawn).collect();
            while !token.is_cancelled() {
                for (i, w) in workers.iter_mut().enumerate() {
                    if let Ok(Some(_)) = w.try_wait() {
                        counter.fetch_add(1, Ordering::Relaxed);
                        *w = spawn(i);
                    }
                }
                *running.lock().unwrap() = workers.iter().filter_map(|w| w.id()).collect();
                tokio::select! {
                    () = token.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            for mut w in workers {
                let _ = w.kill().await;
            }
        });
        Self {
            stop,
            task: Some(task),
            restarts,
            pids,
        }
    }

    /// Freezes every process (SIGSTOP): deliveries they hold wait, their AckWait runs out.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws every process (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        for pid in self.pids.lock().unwrap().iter() {
            // A process that exited a moment ago is restarted by the supervisor.
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// Processes started again after they exited.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Kills every process and stops supervising.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for StatefulWorkers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the exactly-once oracles found over the stateful route's operations.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ExactlyOnce {
    /// Operations of the route in JetStream.
    pub operations: usize,
    /// The same, by how they ended (`succeeded`, `cancelled`, `expired`...).
    pub ended: BTreeMap<String, usize>,
    /// Cancellations the lanes sent, by answer (`202`, `409`, `503`, `timeout`...).
    pub cancels: BTreeMap<String, usize>,
    /// The counter's value: the state changes.
    pub counter: u64,
    pub outgoing_messages: usize,
    /// Must be zero: an operation whose result, marker and outgoing message disagree (or a
    /// cancel answered 202 and it did not end `cancelled`), that has no marker or no result, or
    /// that failed (nothing makes these workers fail).
    pub inconsistent_operations: usize,
    /// Must be zero: commits the state does not hold (counter below the commits).
    pub lost_state_changes: usize,
    /// Must be zero: state changes beyond one per commit (counter above the commits, or two
    /// commits that saw the same state).
    pub duplicate_state_changes: usize,
    /// Must be zero: outgoing messages of no commit, or of one commit twice.
    pub ghosts: usize,
    /// Evidence (up to ten).
    pub examples: Vec<String>,
}

impl ExactlyOnce {
    /// The anomalies that are not zero, by name.
    pub fn violations(&self) -> Vec<(&'static str, usize)> {
        [
            ("inconsistent_operations", self.inconsistent_operations),
            ("lost_state_changes", self.lost_state_changes),
            ("duplicate_state_changes", self.duplicate_state_changes),
            ("ghosts", self.ghosts),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < 10 {
            self.examples.push(text);
        }
    }

    fn inconsistent(&mut self, text: String) {
        self.inconsistent_operations += 1;
        self.example(text);
    }
}

/// Judges the stateful route's operations (every request of [`ROUTE`] in `requests`) against
/// their results, the state store, the outgoing messages and the cancels the clients sent
/// (`cancels`: operation and answer), read through `js` from each stream's leader.
pub async fn check(
    js: &async_nats::jetstream::Context,
    requests: &[StoredRequest],
    results: &[StoredResult],
    cancels: &[(String, String)],
) -> ExactlyOnce {
    let mut v = ExactlyOnce::default();
    for (_, answer) in cancels {
        *v.cancels.entry(answer.clone()).or_default() += 1;
    }
    let result_of: HashMap<&str, &StoredResult> =
        results.iter().map(|r| (r.op.as_str(), r)).collect();
    let audit = crate::eventually("the AUDIT stream read", Duration::from_secs(60), || async {
        read_stream(js, AUDIT_STREAM).await.ok()
    })
    .await;
    let mut outgoing: HashMap<String, usize> = HashMap::new();
    for m in &audit {
        *outgoing
            .entry(String::from_utf8_lossy(&m.payload).into_owned())
            .or_default() += 1;
    }
    v.outgoing_messages = audit.len();
    let mut committed = HashSet::new();
    let mut replies = Vec::new();
    // Each operation once (a request published twice, a duplicate delivery's cause, is one).
    let mut seen = HashSet::new();
    let ops: Vec<&str> = requests
        .iter()
        .filter(|r| r.route() == ROUTE && seen.insert(r.op.as_str()))
        .map(|r| r.op.as_str())
        .collect();
    for op in &ops {
        let op = *op;
        v.operations += 1;
        let result = result_of.get(op);
        let ended = match result {
            Some(r) if r.outcome.is_none() && (200..300).contains(&r.status) => "succeeded",
            Some(r) => r.outcome.as_deref().unwrap_or("failed"),
            None => "no result",
        };
        *v.ended.entry(ended.to_owned()).or_default() += 1;
        let marker = read_from_leader(js, &format!("{STATE_PREFIX}.done.{op}")).await;
        let Some(marker) = marker else {
            v.inconsistent(format!("operation {op} ({ended}) has no processed marker"));
            continue;
        };
        let Ok(marker) = serde_json::from_slice::<serde_json::Value>(&marker.payload) else {
            v.inconsistent(format!(
                "operation {op} ({ended}): a marker that is not JSON"
            ));
            continue;
        };
        // A commit's marker is its outbox; a decision's names it (`cancelled`, `expired`,
        // `failed`).
        let decided = marker.get("decided").and_then(|d| d.as_str());
        let sent = outgoing.get(op).copied().unwrap_or(0);
        match decided {
            None => {
                committed.insert(op.to_owned());
                if sent == 0 {
                    v.inconsistent(format!("operation {op} committed, no outgoing message"));
                }
                v.ghosts += sent.saturating_sub(1);
                let Some(result) = result.filter(|_| ended == "succeeded") else {
                    v.inconsistent(format!("operation {op} committed, yet ended {ended}"));
                    continue;
                };
                // The reply is the one the commit stored with the state change.
                let stored = data_encoding::BASE64.encode(result.body.as_bytes());
                if marker["body"].as_str() != Some(stored.as_str()) {
                    v.inconsistent(format!(
                        "operation {op}: reply {:?} is not the committed one",
                        result.body
                    ));
                }
                let reply: serde_json::Value =
                    serde_json::from_str(&result.body).unwrap_or_default();
                match reply["counter"].as_u64() {
                    Some(n) => replies.push((n, op.to_owned())),
                    None => v.inconsistent(format!("operation {op}: reply {reply}")),
                }
            }
            Some(decision) => {
                v.ghosts += sent;
                if sent > 0 {
                    v.example(format!(
                        "operation {op} {decision}, {sent} outgoing messages"
                    ));
                }
                if decision != ended {
                    v.inconsistent(format!("operation {op}: marker {decision}, ended {ended}"));
                } else if decision == "failed" {
                    // No handler of these workers fails, and deliveries are not exhausted.
                    v.inconsistent(format!("operation {op} failed: {marker}"));
                }
            }
        }
    }
    // A cancel answered 202 promised the operation `cancelled`.
    for (op, answer) in cancels {
        if answer == "202" && ops.contains(&op.as_str()) {
            let ended = result_of
                .get(op.as_str())
                .and_then(|r| r.outcome.as_deref());
            if ended != Some("cancelled") {
                v.inconsistent(format!(
                    "operation {op}: cancel answered 202, ended {ended:?}"
                ));
            }
        }
    }
    for (op, n) in &outgoing {
        if !ops.contains(&op.as_str()) {
            v.ghosts += n;
            v.example(format!(
                "{n} outgoing messages of {op}, which is no operation"
            ));
        }
    }
    let counter = read_from_leader(js, &format!("{STATE_PREFIX}.state.counter"))
        .await
        .and_then(|m| serde_json::from_slice::<u64>(&m.payload).ok())
        .unwrap_or(0);
    v.counter = counter;
    let commits = committed.len() as u64;
    if counter < commits {
        v.lost_state_changes = (commits - counter) as usize;
        v.example(format!("counter {counter} after {commits} commits"));
    } else if counter > commits {
        v.duplicate_state_changes = (counter - commits) as usize;
        v.example(format!("counter {counter} after {commits} commits"));
    }
    // Each commit saw the state the one before it left: the replies are 1..=commits.
    replies.sort_unstable();
    let values: Vec<u64> = replies.iter().map(|(n, _)| *n).collect();
    let distinct: HashSet<u64> = values.iter().copied().collect();
    if distinct.len() < values.len() {
        v.duplicate_state_changes += values.len() - distinct.len();
        v.example(format!(
            "two commits saw the same state: {:?}",
            replies.iter().take(20).collect::<Vec<_>>()
        ));
    } else if counter == commits && values != (1..=commits).collect::<Vec<_>>() {
        v.inconsistent(format!(
            "committed replies are not 1..={commits}: {:?}",
            replies.iter().take(20).collect::<Vec<_>>()
        ));
    }
    v
}

/// The last message on `subject` of the state store, from the stream's leader (a follower may
/// lag behind a write made just before), retried while the cluster settles.
async fn read_from_leader(
    js: &async_nats::jetstream::Context,
    subject: &str,
) -> Option<async_nats::jetstream::message::StreamMessage> {
    crate::eventually(
        &format!("{subject} read from the leader"),
        Duration::from_secs(30),
        || async {
            handlers::jetstream::last_on_subject_from_leader(js, STATE_STREAM, subject)
                .await
                .ok()
        },
    )
    .await
}
