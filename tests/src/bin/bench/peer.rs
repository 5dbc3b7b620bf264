//! The peer: Restate's ingress doing the gateway's job (accept a request with an idempotency
//! key, durably, and answer `202`), run on loopback in the same benchmark. `scripts/install-restate`
//! installs the pinned server and a one-handler service (`tests/peer/restate`); [`Restate::start`]
//! runs both with a fresh data directory and registers the service. The load sends
//! `POST /Bench/ingest/send?delay=1h`: accepted and scheduled, not run, as the gateway's requests
//! wait with no worker.
//!
//! Durability: Restate's log server writes each batch of appends with a RocksDB WAL fsync before
//! the ingress answers (`log-server.rocksdb-disable-wal-fsync = false`, its default), grouping
//! concurrent appends; `fsync: false` turns that off, to compare with JetStream's default.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

/// The path the load posts to.
pub const SEND_PATH: &str = "/Bench/ingest/send?delay=1h";

/// A running restate-server and the service registered with it; both end when dropped.
pub struct Restate {
    server: Child,
    _service: Child,
    _data: tempfile::TempDir,
    pub ingress: std::net::SocketAddr,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Restate {
    /// Starts the server from `dir` (as `scripts/install-restate` left it), with its WAL fsync on
    /// or off, then the service, registers it, and returns once a send is accepted.
    pub async fn start(dir: &Path, fsync: bool) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let [ingress, admin, node, service] =
            [free_port()?, free_port()?, free_port()?, free_port()?];
        let config = data.path().join("restate.toml");
        std::fs::write(
            &config,
            format!(
                r#"cluster-name = "bench"
node-name = "bench"
auto-provision = true
listen-mode = "tcp"
bind-ip = "127.0.0.1"
bind-port = {node}
advertised-address = "http://127.0.0.1:{node}/"
disable-telemetry = true
log-filter = "warn"
[ingress]
bind-address = "127.0.0.1:{ingress}"
advertised-address = "http://127.0.0.1:{ingress}/"
[admin]
bind-address = "127.0.0.1:{admin}"
advertised-address = "http://127.0.0.1:{admin}/"
[log-server]
rocksdb-disable-wal-fsync = {}
"#,
                !fsync
            ),
        )?;
        let bin = dir.join("node_modules/@restatedev/restate-server-linux-x64/bin/restate-server");
        let server = Command::new(&bin)
            .arg("--config-file")
            .arg(&config)
            .arg("--base-dir")
            .arg(data.path().join("base"))
            .arg("--no-logo")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut service_process = Command::new("node")
            .arg(dir.join("service.mjs"))
            .env("PORT", service.to_string())
            .current_dir(dir)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the Restate service with node")?;
        let stdout = service_process.stdout.take().context("service stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while lines.next_line().await?.context("the service ended")? != "READY" {}
        let http = reqwest::Client::new();
        let admin = format!("http://127.0.0.1:{admin}");
        let ready = async {
            loop {
                let registered = http
                    .post(format!("{admin}/deployments"))
                    .json(&serde_json::json!({"uri": format!("http://127.0.0.1:{service}"), "force": true}))
                    .send()
                    .await;
                if registered.is_ok_and(|r| r.status() == 201) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            loop {
                let sent = http
                    .post(format!("http://127.0.0.1:{ingress}{SEND_PATH}"))
                    .header("content-type", "application/json")
                    .header("idempotency-key", "probe")
                    .body("{}")
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status() == 202) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .context("Restate did not accept a send within 60 s")?;
        Ok(Self {
            server,
            _service: service_process,
            _data: data,
            ingress: ([127, 0, 0, 1], ingress).into(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.id()
    }
}
