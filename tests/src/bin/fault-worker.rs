//! A worker process for the fault suite (`tests/tests/faults.rs`): the suite's echo handler on one
//! route, recording every handler execution as a JSON line in an effect log file, so that the
//! checker can tell executions from committed results after the process was SIGKILLed, frozen
//! and restarted.
//!
//! Usage: `fault-worker <nats-urls, comma-separated> <route> <effect-log-file>`

use std::path::PathBuf;
use std::time::Duration;

use gateway_tests::chaos::{EffectLog, echo_handler, fault_worker_config};
use handlers::Worker;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(urls), Some(route), Some(log)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: fault-worker <nats-urls> <route> <effect-log-file>");
    };
    let js = gateway_tests::worker_jetstream(&urls).await?;
    let log = EffectLog::file(&PathBuf::from(log));
    // The gateway provisions the streams; until they exist, starting fails and is retried.
    loop {
        let worker =
            Worker::new(js.clone(), fault_worker_config()).route(&route, echo_handler(log.clone()));
        match worker.run(CancellationToken::new()).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                eprintln!("fault-worker: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}
