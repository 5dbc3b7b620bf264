//! A worker process whose handler never returns: it prints `handling <operation-id>` and waits to
//! be killed. Tests kill it with SIGKILL to prove a worker crash before the reply loses nothing.
//!
//! Usage: hanging-worker <nats-url> <route>

use std::io::Write;

use handlers::{Request, Response, Worker};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(route)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: hanging-worker <nats-url> <route>");
    };
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let worker = Worker::new(js, gateway_tests::worker_config()).route(
        route,
        |request: Request| async move {
            {
                let mut out = std::io::stdout().lock();
                writeln!(out, "handling {}", request.operation_id)?;
                out.flush()?;
            }
            std::future::pending::<()>().await;
            Ok::<Response, handlers::HandlerError>(Response::new(500))
        },
    );
    worker.run(CancellationToken::new()).await?;
    Ok(())
}
