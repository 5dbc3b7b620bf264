//! CPU time and resident memory of a process, from `/proc` (Linux only; the benchmark's machine).

use std::time::{Duration, Instant};

/// A reading of one process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// User plus system CPU time so far.
    pub cpu: Duration,
    pub rss_bytes: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on Linux unless told).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(Sample {
        at: Instant::now(),
        cpu: Duration::from_secs_f64((utime + stime) as f64 / clock_ticks() as f64),
        rss_bytes: rss_kb * 1024,
    })
}

/// Runs `work` while sampling a process every 100 ms; returns `work`'s output, the first and last
/// samples, and the peak RSS seen.
pub async fn watch_during<T>(
    pid: u32,
    work: impl std::future::Future<Output = T>,
) -> (T, Sample, Sample, u64) {
    let first = sample(pid).expect("process is running");
    let mut last = first;
    let mut peak = first.rss_bytes;
    tokio::pin!(work);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if let Some(s) = sample(pid) {
                    peak = peak.max(s.rss_bytes);
                    last = s;
                }
            }
        }
    };
    if let Some(s) = sample(pid) {
        peak = peak.max(s.rss_bytes);
        last = s;
    }
    (out, first, last, peak)
}

/// CPU seconds each process spent while `work` ran, with `work`'s output.
pub async fn cpu_during<T>(
    pids: &[(&'static str, u32)],
    work: impl std::future::Future<Output = T>,
) -> (T, Vec<(&'static str, f64)>) {
    let before: Vec<_> = pids.iter().map(|(_, pid)| sample(*pid)).collect();
    let out = work.await;
    let spent = pids
        .iter()
        .zip(before)
        .map(|((name, pid), before)| {
            let cpu = match (before, sample(*pid)) {
                (Some(b), Some(a)) => (a.cpu - b.cpu).as_secs_f64(),
                _ => f64::NAN,
            };
            (*name, cpu)
        })
        .collect();
    (out, spent)
}
