//! Gateways under test: in the test process (fast, for most tests) or as their own OS process
//! (for what needs a process: SIGTERM, SIGKILL, the fault-injection hook, log lines), each with
//! its routes file in a temp dir.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use gateway::config::{Settings, load_config};
use std::path::PathBuf;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::http::http;
use crate::wait::eventually;

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
