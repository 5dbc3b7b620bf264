//! The load driver: runs one operation from many tasks, in a closed model (each task issues its
//! next operation when the last one ends: peak throughput) or an open model (operations start on a
//! fixed schedule whatever happens: latency at a given rate).
//!
//! Open-model latency is measured from each operation's *intended* start, so an operation that
//! waits behind a slow one is charged for the wait (the coordinated-omission correction wrk2 and
//! HdrHistogram describe). Each task owns its connection or client; the operations are boxed
//! futures so that HTTP and raw JetStream clients share one driver.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What one operation ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused by load shedding (429 or 503 with Retry-After).
    Shed,
    Error,
}

pub type OpFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// A client that performs numbered operations; one per driver task.
pub trait Client: Send + 'static {
    fn call(&mut self, seq: u64) -> OpFuture<'_>;
}

/// How operations are started.
#[derive(Debug, Clone, Copy)]
pub enum Model {
    /// As fast as each task can go.
    Closed,
    /// `rate` operations per second in total, spread evenly over the tasks.
    Open { rate: f64 },
}

/// What a run measured. Latencies are in microseconds.
#[derive(Debug)]
pub struct Run {
    pub ok: u64,
    pub shed: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

impl Run {
    pub fn ok_rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

/// Runs `clients` (one task each) under `model` for `duration`.
pub async fn drive<C: Client>(clients: Vec<C>, model: Model, duration: Duration) -> Run {
    let tasks = clients.len() as u64;
    let start = Instant::now();
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, mut client)| {
            tokio::spawn(async move {
                let mut latency = histogram();
                let (mut ok, mut shed, mut errors) = (0u64, 0u64, 0u64);
                let mut k = 0u64;
                loop {
                    let seq = k * tasks + index as u64;
                    let intended = match model {
                        Model::Closed => Instant::now(),
                        Model::Open { rate } => start + Duration::from_secs_f64(seq as f64 / rate),
                    };
                    if intended.duration_since(start) >= duration {
                        break;
                    }
                    if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                    let outcome = client.call(seq).await;
                    let took = intended.elapsed().as_micros() as u64;
                    match outcome {
                        Outcome::Ok => {
                            ok += 1;
                            latency.saturating_record(took.max(1));
                        }
                        Outcome::Shed => shed += 1,
                        Outcome::Error => errors += 1,
                    }
                    k += 1;
                }
                (ok, shed, errors, latency)
            })
        })
        .collect();
    let mut run = Run {
        ok: 0,
        shed: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: histogram(),
    };
    for handle in handles {
        let (ok, shed, errors, latency) = handle.await.expect("load task");
        run.ok += ok;
        run.shed += shed;
        run.errors += errors;
        run.latency.add(latency).expect("same histogram bounds");
    }
    run.elapsed = start.elapsed();
    run
}
