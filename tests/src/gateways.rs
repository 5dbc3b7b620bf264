//! Gateways under test: in the test process (fast, for most tests) or as their own OS process
//! (for what needs a process: SIGTERM, SIGKILL, the fault-injection hook, log lines), each with
//! its routes file in a temp dir.
//!
//! Every test starts its gateways the same way, through one builder: [`TestGateway::builder`]
//! with the routes, then the options that differ (extra flags, environment of a process, an
//! existing nats-server or a URL, waiting for readiness), then [`GatewayBuilder::start`] (in the
//! test process) or [`GatewayBuilder::spawn`] (a child process). The settings every test gateway
//! shares (loopback ports, a 2 s NATS timeout, an admin port) are set here once.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use gateway::config::{Settings, load_config};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::http::http;
use crate::nats::Nats;
use crate::wait::eventually;

/// Starts a gateway for a test. Made by [`TestGateway::builder`]; `N` says where its NATS is:
/// [`NewNats`] (the builder starts a nats-server and hands it back in a [`TestGateway`]) or
/// [`NatsUrl`] (after [`GatewayBuilder::nats`] or [`GatewayBuilder::nats_url`]: the builder
/// returns the gateway alone).
#[must_use = "a builder starts nothing until `start` or `spawn`"]
pub struct GatewayBuilder<N = NewNats> {
    routes: String,
    nats: N,
    flags: Vec<String>,
    env: Vec<(String, String)>,
    wait_ready: bool,
    /// A command the process runs under (`ip netns exec <ns>`); empty: none.
    prefix: Vec<String>,
}

/// Where a [`GatewayBuilder`] gets its NATS: a nats-server of its own, started with the gateway.
pub struct NewNats;

/// Where a [`GatewayBuilder`] gets its NATS: this URL (a server, a cluster's URL list, a proxy).
pub struct NatsUrl(String);

/// A gateway and the nats-server its builder started for it.
pub struct TestGateway<G = InProcessGateway> {
    pub nats: Nats,
    pub gw: G,
}

impl TestGateway {
    /// A builder for a gateway on these routes (TOML, written to a temp file the gateway owns).
    pub fn builder(routes: &str) -> GatewayBuilder {
        GatewayBuilder {
            routes: routes.to_owned(),
            nats: NewNats,
            flags: Vec::new(),
            env: Vec::new(),
            wait_ready: true,
            prefix: Vec::new(),
        }
    }
}

impl<N> GatewayBuilder<N> {
    /// One more `gateway serve` argument (`--max-connections`, `2`, `--callback-allow-private`).
    pub fn flag(mut self, arg: impl Into<String>) -> Self {
        self.flags.push(arg.into());
        self
    }

    /// More `gateway serve` arguments, in order.
    pub fn flags<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.flags.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable of the gateway process (`GATEWAY_*`, `RUST_LOG`, the
    /// fault-injection hook). For [`GatewayBuilder::spawn`] only: an in-process gateway shares the
    /// test's environment, so it takes flags instead.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// More environment variables of the gateway process, in order (later ones win).
    pub fn envs<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Whether starting waits until `/readyz` answers 200 (the default), or returns as soon as
    /// the gateway listens.
    pub fn wait_ready(mut self, wait: bool) -> Self {
        self.wait_ready = wait;
        self
    }

    /// Runs the gateway process under this command (`ip netns exec <ns>`, from
    /// [`crate::netns::Net::prefix`]). For [`GatewayBuilder::spawn`] only.
    pub fn command_prefix(mut self, prefix: Vec<String>) -> Self {
        self.prefix = prefix;
        self
    }
}

impl GatewayBuilder<NewNats> {
    /// Connects the gateway to this nats-server instead of starting one.
    pub fn nats(self, nats: &Nats) -> GatewayBuilder<NatsUrl> {
        self.nats_url(nats.url())
    }

    /// Connects the gateway to this NATS URL (or comma-separated list) instead of starting a
    /// nats-server.
    pub fn nats_url(self, url: impl Into<String>) -> GatewayBuilder<NatsUrl> {
        GatewayBuilder {
            routes: self.routes,
            nats: NatsUrl(url.into()),
            flags: self.flags,
            env: self.env,
            wait_ready: self.wait_ready,
            prefix: self.prefix,
        }
    }

    /// Starts a nats-server, then the gateway in the test process.
    pub async fn start(self) -> TestGateway {
        let nats = Nats::start().await;
        let gw = self.nats(&nats).start().await;
        TestGateway { nats, gw }
    }

    /// Starts a nats-server, then the gateway as a child process running `bin serve`.
    pub async fn spawn(self, bin: &str) -> TestGateway<GatewayProcess> {
        let nats = Nats::start().await;
        let gw = self.nats(&nats).spawn(bin).await;
        TestGateway { nats, gw }
    }
}

impl GatewayBuilder<NatsUrl> {
    /// Starts the gateway in the test process.
    pub async fn start(self) -> InProcessGateway {
        assert!(
            self.env.is_empty() && self.prefix.is_empty(),
            "environment variables and command prefixes are for a gateway process (spawn); in-process, use flags"
        );
        let routes = RoutesFile::new(&self.routes);
        let settings = settings(&self.nats.0, &routes, &self.flags);
        InProcessGateway::start(settings, routes, self.wait_ready).await
    }

    /// Starts the gateway as a child process running `bin serve` (the test build of the
    /// `gateway` binary, `env!("CARGO_BIN_EXE_gateway-under-test")`, or a release build).
    pub async fn spawn(self, bin: &str) -> GatewayProcess {
        let routes = RoutesFile::new(&self.routes);
        GatewayProcess::spawn(
            bin,
            &self.prefix,
            &self.nats.0,
            routes,
            &self.flags,
            &self.env,
            self.wait_ready,
        )
        .await
    }
}

/// A routes file in a temp dir, kept as long as the gateway that reads it.
struct RoutesFile {
    _dir: TempDir,
    path: PathBuf,
}

impl RoutesFile {
    fn new(toml: &str) -> Self {
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
fn settings(nats_url: &str, routes: &RoutesFile, extra: &[String]) -> Settings {
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
    args.extend(extra.iter().cloned());
    SettingsArgs::try_parse_from(args)
        .expect("valid test settings")
        .settings
}

/// A gateway running inside the test process ([`GatewayBuilder::start`]).
pub struct InProcessGateway {
    pub base: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    _routes: RoutesFile,
}

impl InProcessGateway {
    /// Starts a gateway and, when `wait_ready`, waits until `/readyz` says ready.
    async fn start(settings: Settings, routes: RoutesFile, wait_ready: bool) -> Self {
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
            _routes: routes,
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

/// A gateway running as its own OS process ([`GatewayBuilder::spawn`]; the test build of the
/// `gateway` binary has the fault-injection hook compiled in). Killed when dropped.
pub struct GatewayProcess {
    pub base: String,
    child: Child,
    logs: Arc<std::sync::Mutex<Vec<String>>>,
    routes: RoutesFile,
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
    /// Spawns `bin serve` with these extra arguments against `nats_url` with these routes and
    /// extra environment, and waits until it listens (and, when `wait_ready`, until it is ready).
    /// The child binds port 0 and its log line "Gateway listening." says which port it got, so
    /// parallel tests never race for a port.
    async fn spawn(
        bin: &str,
        prefix: &[String],
        nats_url: &str,
        routes: RoutesFile,
        flags: &[String],
        env: &[(String, String)],
        wait_ready: bool,
    ) -> Self {
        let mut cmd = crate::netns::prefixed(prefix, bin);
        cmd.arg("serve")
            .args(flags)
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
        if wait_ready {
            wait_until_ready(&base).await;
        }
        Self {
            base,
            child,
            logs,
            routes,
        }
    }

    /// The routes file the process reads.
    pub fn routes_path(&self) -> &Path {
        &self.routes.path
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
