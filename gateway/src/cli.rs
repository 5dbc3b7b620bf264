//! The `gateway` binary: `gateway serve` runs the gateway; `gateway dev` runs the one-command local
//! setup. Logging is set up here, from `RUST_LOG` (default `info`).

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::{Settings, load_routes};
use crate::dev::DevArgs;

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "HTTP sync-async gateway for NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads of the async runtime (default: one per core).
    #[arg(long, env = "GATEWAY_WORKER_THREADS", global = true)]
    worker_threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway against an existing NATS server.
    Serve(Settings),
    /// Run a local nats-server, the gateway and an example worker together (Ctrl-C stops all).
    Dev(DevArgs),
    /// Be the worker of some routes by calling a local HTTP app (the worker-side sidecar).
    Dispatch(crate::dispatch::DispatchArgs),
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(settings) => serve(settings).await,
            Command::Dev(args) => crate::dev::run(args).await,
            Command::Dispatch(args) => {
                let stop = tokio_util::sync::CancellationToken::new();
                let on_signal = stop.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    on_signal.cancel();
                });
                Ok(crate::dispatch::run(args, stop).await?)
            }
        }
    })
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let routes = load_routes(&settings.config)?;
    let listener = TcpListener::bind(settings.listen).await?;
    crate::run(settings, routes, listener, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("Shutdown signal received; draining.");
}
