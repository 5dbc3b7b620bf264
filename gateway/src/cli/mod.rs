//! The `gateway` binary: `gateway serve` runs the gateway; `gateway dev` runs the one-command local
//! setup; `gateway dispatch` is the worker-side sidecar; `gateway openapi` prints the OpenAPI
//! document of a routes file. Telemetry is set up here (see [`crate::telemetry`]).

pub mod dev;
pub mod dispatch;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::config::{Settings, load_config};
use crate::telemetry::LogFormat;
use dev::DevArgs;

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
    /// Log line format on stderr.
    #[arg(
        long,
        env = "GATEWAY_LOG_FORMAT",
        global = true,
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway against an existing NATS server.
    Serve(Settings),
    /// Run a local nats-server, the gateway and an example worker together (Ctrl-C stops all).
    Dev(DevArgs),
    /// Be the worker of some routes by calling a local HTTP app (the worker-side sidecar).
    Dispatch(dispatch::DispatchArgs),
    /// Print the OpenAPI 3.1 document for a routes file, and exit.
    Openapi {
        /// TOML file with the routes.
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: std::path::PathBuf,
    },
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Openapi { config } = &cli.command {
        let config = load_config(config)?;
        let document = crate::http::openapi::document(&config.routes, config.auth.is_some());
        println!(
            "{}",
            crate::http::openapi::to_json(&document, &config.routes)
        );
        return Ok(());
    }
    let service = match cli.command {
        Command::Dispatch(_) => "nats-http-gateway-dispatch",
        _ => "nats-http-gateway",
    };
    // Dropped last, after the runtime: flushing exported spans blocks.
    crate::tls::install_crypto_provider();
    let _telemetry = crate::telemetry::init(cli.log_format, service)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(settings) => serve(settings).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Dispatch(args) => {
                let stop = tokio_util::sync::CancellationToken::new();
                let on_signal = stop.clone();
                tokio::spawn(async move {
                    crate::shutdown_signal().await;
                    on_signal.cancel();
                });
                Ok(dispatch::run(args, stop).await?)
            }
            Command::Openapi { .. } => unreachable!("answered before the runtime starts"),
        }
    })
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let config = load_config(&settings.config)?;
    let listener = TcpListener::bind(settings.listen).await?;
    crate::run(settings, config, listener, crate::shutdown_signal()).await?;
    Ok(())
}
