//! `gateway dev`: the whole system on one machine with one command. Starts a child nats-server with
//! JetStream on 127.0.0.1 (data in a project-local folder), the gateway with the dev routes, and an
//! example worker built on `handlers`; prints a curl walkthrough; Ctrl-C stops all three.
//!
//! [`NatsProcess`] is also the end-to-end tests' way to run a real server, so the two cannot drift.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use handlers::{Request, Response, Worker};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, load_config};
use crate::lifecycle::sleep_or_stop;

/// A nats-server child process with JetStream, bound to 127.0.0.1. Killed when dropped.
pub struct NatsProcess {
    child: Child,
    port: u16,
}

/// Why a nats-server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NatsProcessError {
    #[error(
        "cannot run {bin}: {source} (install it with scripts/install-nats, or set NATS_SERVER_BIN)"
    )]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("nats-server did not start listening within 10s (see {log})")]
    NotListening { log: PathBuf },
    #[error("nats-server exited ({status}) before listening: {last_line} (see {log})")]
    Exited {
        status: std::process::ExitStatus,
        last_line: String,
        log: PathBuf,
    },
    #[error(
        "port {port} on 127.0.0.1 is taken (another `scripts/dev`?); stop it or pick another port"
    )]
    PortTaken { port: u16 },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl NatsProcess {
    /// Starts `bin` with JetStream storing in `store_dir`, on `port` (or an ephemeral port when
    /// `None`), and waits until it accepts connections. Extra arguments go last.
    pub async fn start(
        bin: &Path,
        port: Option<u16>,
        store_dir: &Path,
        extra_args: &[String],
    ) -> Result<Self, NatsProcessError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| NatsProcessError::Io { path, source }
        };
        // A server already on the port may be using this store: touch nothing of it.
        if let Some(port) = port
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            return Err(NatsProcessError::PortTaken { port });
        }
        std::fs::create_dir_all(store_dir).map_err(io(store_dir))?;
        let ports_dir = store_dir.join("ports");
        // A stale ports file from an earlier run would name the wrong port.
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).map_err(io(&ports_dir))?;
        let log = store_dir.join("nats-server.log");
        let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
        let mut command = Command::new(bin);
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(store_dir)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(&log)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C in the terminal reaches the gateway, which drains
            // and then stops the server, instead of reaching the server first.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| NatsProcessError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(port) = read_ports_file(&ports_dir)
                && tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            {
                return Ok(Self { child, port });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let last_line = std::fs::read_to_string(&log)
                    .ok()
                    .and_then(|text| text.lines().last().map(str::to_owned))
                    .unwrap_or_default();
                return Err(NatsProcessError::Exited {
                    status,
                    last_line,
                    log,
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(NatsProcessError::NotListening { log });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would, and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The client port from the server's ports file (`{"nats":["nats://127.0.0.1:PORT"],...}`).
fn read_ports_file(dir: &Path) -> Option<u16> {
    let entry = std::fs::read_dir(dir).ok()?.flatten().next()?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = value["nats"].as_array()?.first()?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

/// Flags of `gateway dev`, on top of the gateway's own.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub settings: Settings,
    /// The nats-server binary to run.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// Port of the child nats-server (on 127.0.0.1).
    #[arg(long, env = "GATEWAY_DEV_NATS_PORT", default_value_t = 4222)]
    pub nats_port: u16,
    /// Where the child nats-server keeps its data.
    #[arg(long, env = "GATEWAY_DEV_DATA", default_value = ".data/nats")]
    pub data_dir: PathBuf,
}

/// Runs nats-server, the gateway and the example worker until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let mut settings = args.settings;
    let config = load_config(&settings.config)?;
    let mut nats =
        NatsProcess::start(&args.nats_server, Some(args.nats_port), &args.data_dir, &[]).await?;
    settings.jetstream.nats.nats_url = nats.url();
    let listener = TcpListener::bind(settings.listen).await?;
    print_walkthrough(&listener.local_addr()?.to_string(), &nats.url());

    let stop = CancellationToken::new();
    let worker = tokio::spawn(run_example_worker(settings.clone(), stop.clone()));
    let gateway_stop = stop.clone();
    let result = crate::run(settings, config, listener, async move {
        tokio::select! {
            () = crate::shutdown_signal() => {}
            () = gateway_stop.cancelled() => {}
        }
    })
    .await;
    stop.cancel();
    let _ = worker.await;
    nats.kill().await;
    tracing::info!("Stopped gateway, example worker and nats-server.");
    Ok(result?)
}

/// The example worker: answers the dev routes (`orders`, `reports`).
async fn run_example_worker(settings: Settings, stop: CancellationToken) {
    let options = match settings
        .jetstream
        .nats
        .connect_options("example-worker")
        .await
    {
        Ok(options) => options,
        Err(error) => {
            tracing::error!(%error, "Example worker cannot connect to NATS.");
            return;
        }
    };
    let client = match options
        .retry_on_initial_connect()
        .connect(settings.jetstream.nats.server_addrs())
        .await
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "Example worker cannot connect to NATS.");
            return;
        }
    };
    // The routes' default consumers, the ones whose backlog the gateway reads for `Retry-After`.
    let config = handlers::WorkerConfig {
        expiry_grace: settings.jetstream.expiry_grace,
        ..settings
            .jetstream
            .nats
            .worker_config(handlers::contract::DEFAULT_CONSUMER_PREFIX)
    };
    let js = async_nats::jetstream::new(client);
    // The gateway provisions the streams; until it has, starting fails and is retried.
    while !stop.is_cancelled() {
        let worker = Worker::new(js.clone(), config.clone())
            .route("orders", confirm_order)
            .route("reports", render_report);
        match worker.run(stop.clone()).await {
            Ok(()) => return,
            Err(error) => {
                tracing::debug!(%error, "Example worker waiting for the streams.");
                if sleep_or_stop(&stop, Duration::from_millis(300)).await {
                    return;
                }
            }
        }
    }
}

/// `orders`: confirms a JSON order at once; anything but a JSON object is a 422 result.
async fn confirm_order(request: Request) -> Result<Response, handlers::HandlerError> {
    let Ok(serde_json::Value::Object(order)) = serde_json::from_slice(&request.body) else {
        let problem = serde_json::json!({
            "type": format!("{}invalid-order", handlers::contract::PROBLEM_TYPE_BASE),
            "title": "Invalid order",
            "status": 422,
            "detail": "An order is a JSON object.",
        });
        let mut response = Response::json(422, &problem);
        response.content_type = Some("application/problem+json".to_owned());
        return Ok(response);
    };
    Ok(Response::json(
        201,
        &serde_json::json!({
            "order_id": request.operation_id,
            "status": "confirmed",
            "order": order,
        }),
    ))
}

/// `reports`: takes about two seconds, then answers a small CSV.
async fn render_report(request: Request) -> Result<Response, handlers::HandlerError> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kind = request
        .path
        .rsplit('/')
        .next()
        .unwrap_or("report")
        .to_owned();
    let now = handlers::contract::format_time(time::OffsetDateTime::now_utc());
    Ok(Response {
        content_type: Some("text/csv".to_owned()),
        ..Response::text(200, format!("kind,generated_at\n{kind},{now}\n"))
    })
}

fn print_walkthrough(listen: &str, nats_url: &str) {
    println!(
        r#"
Gateway on http://{listen}   (nats-server {nats_url}, example worker running)

  # 1. Submit an order: 202 Accepted, a Location to poll, and the Idempotency-Key in effect
  curl -si -X POST http://{listen}/orders -H 'Content-Type: application/json' \
       -H 'Idempotency-Key: "order-1"' -d '{{"sku":"tea","qty":2}}'

  # 2. Poll the status resource (from the Location header)
  curl -s http://{listen}/operations/<id>

  # 3. Read the worker's reply, replayed as an HTTP response
  curl -si http://{listen}/operations/<id>/result

  # 4. Retry step 1 as often as you like: same operation, Idempotent-Replayed: true.
  #    Same key, different body: 422.  A slow route that requires a key:
  curl -si -X POST http://{listen}/reports/sales -H 'Idempotency-Key: "r-1"'

Ctrl-C stops the gateway, the worker and nats-server.
"#
    );
}
