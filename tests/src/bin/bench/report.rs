//! The benchmark's outputs: `results.json` (every number), `results.md` (the tables
//! docs/benchmark.md shows) and `bench.svg` (latency percentiles and throughput, drawn with plotters).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::load::Run;

/// Percentiles reported for every phase.
const QUANTILES: [(f64, &str); 5] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (1.0, "max"),
];

#[derive(Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub rate: f64,
    pub ok: u64,
    pub shed: u64,
    pub errors: u64,
    /// Milliseconds at each of [`QUANTILES`].
    pub latency_ms: Vec<f64>,
}

impl Phase {
    pub fn from_run(name: &str, run: &Run) -> Self {
        Self {
            name: name.to_owned(),
            rate: run.ok_rate(),
            ok: run.ok,
            shed: run.shed,
            errors: run.errors,
            latency_ms: QUANTILES
                .iter()
                .map(|(q, _)| run.percentile_ms(*q))
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    machine: String,
    versions: String,
    seconds_per_phase: u64,
    concurrency: usize,
    quick: bool,
    phases: Vec<Phase>,
    values: BTreeMap<String, f64>,
    /// Per phase: CPU microseconds per successful operation, per process.
    cpu_us_per_op: BTreeMap<String, BTreeMap<String, f64>>,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

impl Report {
    pub fn new(seconds: &u64, concurrency: usize, quick: bool) -> Self {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        Self {
            machine: format!("{cores} cores, {}", cpu_model()),
            versions: format!(
                "nats-server 2.15.1 (file storage, R1), async-nats 0.51, gateway {}",
                env!("CARGO_PKG_VERSION")
            ),
            seconds_per_phase: *seconds,
            concurrency,
            quick,
            phases: Vec::new(),
            values: BTreeMap::new(),
            cpu_us_per_op: BTreeMap::new(),
        }
    }

    /// Records a phase, prints its line, and returns its rate.
    pub fn record(&mut self, name: &str, run: Run) -> f64 {
        eprintln!(
            "{name:<36} {:>9.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  shed {}  errors {}",
            run.ok_rate(),
            run.percentile_ms(0.5),
            run.percentile_ms(0.99),
            run.shed,
            run.errors
        );
        let phase = Phase::from_run(name, &run);
        let rate = phase.rate;
        self.phases.push(phase);
        rate
    }

    /// Records where a phase's CPU went: microseconds per successful operation, per process.
    pub fn cpu_per_op(&mut self, phase: &str, ok: u64, cpu: &[(&str, f64)]) {
        let per_op = cpu
            .iter()
            .map(|(name, secs)| (name.to_string(), secs * 1e6 / ok.max(1) as f64))
            .collect();
        self.cpu_us_per_op.insert(phase.to_owned(), per_op);
    }

    pub fn set(&mut self, name: &str, value: f64) {
        self.values.insert(name.to_owned(), value);
    }

    fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    fn rate_ratio(&self, gateway: &str, raw: &str) -> Option<f64> {
        Some(self.phase(gateway)?.rate / self.phase(raw)?.rate)
    }

    fn added_ms(&self, quantile: usize) -> Option<f64> {
        let raw = self.phase("raw publish 256 B @ half peak")?;
        let gw = self.phase("gateway accept 256 B @ half peak")?;
        Some(gw.latency_ms[quantile] - raw.latency_ms[quantile])
    }

    /// (what, measured, target, met) rows.
    fn targets(&self) -> Vec<(String, String, &'static str, bool)> {
        let mut rows = Vec::new();
        let mut ratio = |what: &str, gateway: &str, raw: &str, min: f64, target: &'static str| {
            if let Some(r) = self.rate_ratio(gateway, raw) {
                rows.push((
                    what.to_owned(),
                    format!("{:.0}%", r * 100.0),
                    target,
                    r >= min,
                ));
            }
        };
        ratio(
            "accept rate / raw publish rate, 256 B",
            "gateway accept 256 B",
            "raw publish 256 B",
            0.75,
            ">= 75%",
        );
        ratio(
            "accept rate / raw publish rate, 4 KiB",
            "gateway accept 4 KiB",
            "raw publish 4 KiB",
            0.75,
            ">= 75%",
        );
        ratio(
            "accept rate / the bare bridge's, 256 B",
            "gateway accept 256 B",
            "bare bridge accept 256 B",
            0.85,
            ">= 85%",
        );
        ratio(
            "status GET rate / raw lookup rate",
            "gateway status GET",
            "raw status lookup",
            0.80,
            ">= 80%",
        );
        for (index, label, max, target) in
            [(0, "p50", 0.3, "<= +0.3 ms"), (2, "p99", 1.0, "<= +1 ms")]
        {
            if let Some(added) = self.added_ms(index) {
                rows.push((
                    format!("added latency at half the raw peak, {label}"),
                    format!("{added:+.3} ms"),
                    target,
                    added <= max,
                ));
            }
        }
        let v = |k: &str| self.values.get(k).copied();
        if let Some(cores) = v("steady_cores") {
            rows.push((
                "gateway CPU at 1,000 req/s".into(),
                format!("{cores:.3} cores"),
                "<= 0.06 core",
                cores <= 0.06,
            ));
        }
        if let Some(mb) = v("steady_peak_rss_mb") {
            rows.push((
                "gateway RSS at 1,000 req/s (peak)".into(),
                format!("{mb:.1} MB"),
                "<= 20 MB",
                mb <= 20.0,
            ));
        }
        let cpu_total = |phase: &str| {
            self.cpu_us_per_op.get(phase).map(|per| {
                per.iter()
                    .filter(|(n, _)| *n != "load generator")
                    .map(|(_, us)| us)
                    .sum::<f64>()
            })
        };
        let own_cpu = |phase: &str, process: &str| {
            self.cpu_us_per_op
                .get(phase)?
                .iter()
                .find(|(n, _)| *n == process)
                .map(|(_, us)| *us)
        };
        if let (Some(gateway), Some(bridge)) = (
            own_cpu("gateway accept 256 B", "gateway"),
            own_cpu("bare bridge accept 256 B", "bridge"),
        ) {
            rows.push((
                "CPU per accepted 256 B request: gateway / bare bridge".into(),
                format!(
                    "{gateway:.1} µs vs {bridge:.1} µs ({:.2}×)",
                    gateway / bridge
                ),
                "<= 1.3×",
                gateway <= 1.3 * bridge,
            ));
        }
        if let (Some(gateway), Some(nats)) = (
            own_cpu("gateway accept 256 B", "gateway"),
            own_cpu("gateway accept 256 B", "nats-server"),
        ) {
            rows.push((
                "CPU per accepted 256 B request: gateway / nats-server".into(),
                format!("{gateway:.1} µs vs {nats:.1} µs ({:.2}×)", gateway / nats),
                "<= 0.6×",
                gateway <= 0.6 * nats,
            ));
        }
        if let (Some(replay), Some(first)) = (
            cpu_total("gateway replay 256 B"),
            cpu_total("gateway accept 256 B"),
        ) {
            rows.push((
                "CPU per replay (same key again) / per first accept, gateway + nats-server".into(),
                format!("{replay:.1} µs vs {first:.1} µs ({:.2}×)", replay / first),
                "<= 1.2×",
                replay <= 1.2 * first,
            ));
        }
        if let (Some(gw), Some(bridge)) = (
            self.phase("gateway accept 256 B @ half its peak"),
            self.phase("bare bridge accept 256 B @ half the gateway's peak"),
        ) {
            let (gw_p99, bridge_p99) = (gw.latency_ms[2], bridge.latency_ms[2]);
            rows.push((
                "p99 at half the gateway's peak: gateway vs bare bridge".into(),
                format!("{gw_p99:.3} ms vs {bridge_p99:.3} ms"),
                "<= bridge + 1 ms",
                gw_p99 <= bridge_p99 + 1.0,
            ));
        }
        for (clients, grouped, single) in [
            (
                "",
                "gateway accept 256 B, fsync always, group commit",
                "gateway accept 256 B, fsync always",
            ),
            (
                ", 192 clients",
                crate::FSYNC_MANY_GROUPED,
                crate::FSYNC_MANY_SINGLE,
            ),
        ] {
            let (Some(grouped), Some(single)) = (self.phase(grouped), self.phase(single)) else {
                continue;
            };
            rows.push((
                format!(
                    "accepts/s with an fsync before every answer{clients}: group commit / one publish each"
                ),
                format!(
                    "{:.0} vs {:.0} ({:.1}×)",
                    grouped.rate,
                    single.rate,
                    grouped.rate / single.rate
                ),
                "> 1×",
                grouped.rate > single.rate,
            ));
        }
        for (durability, gateway, peer) in [
            (
                "JetStream's default durability vs Restate without fsync",
                "gateway accept 256 B",
                "Restate ingress accept 256 B, no fsync",
            ),
            (
                "fsync before every answer (group commit) vs Restate's fsync",
                "gateway accept 256 B, fsync always, group commit",
                "Restate ingress accept 256 B, fsync",
            ),
            (
                "the same, 192 clients",
                crate::FSYNC_MANY_GROUPED,
                crate::FSYNC_MANY_RESTATE,
            ),
        ] {
            if let (Some(gw), Some(restate)) = (self.phase(gateway), self.phase(peer)) {
                rows.push((
                    format!("accepts/s, gateway vs Restate's ingress, {durability}"),
                    format!("{:.0} vs {:.0}", gw.rate, restate.rate),
                    "gateway ahead",
                    gw.rate > restate.rate,
                ));
            }
            if let (Some(gw), Some(restate)) = (cpu_total(gateway), cpu_total(peer)) {
                rows.push((
                    format!(
                        "CPU per accept, gateway + nats-server vs restate-server, {durability}"
                    ),
                    format!("{gw:.1} µs vs {restate:.1} µs"),
                    "gateway less",
                    gw < restate,
                ));
            }
        }
        if let (Some(batch), Some(single)) = (
            cpu_total("gateway batch of 999 × 256 B, per item"),
            cpu_total("gateway single submits × 256 B, per item"),
        ) {
            rows.push((
                "a 999-item batch vs 999 single submits: CPU per item, gateway + nats-server"
                    .into(),
                format!("{batch:.1} µs vs {single:.1} µs"),
                "batch < singles",
                batch < single,
            ));
        }
        if let (Some(batch), Some(single)) =
            (v("batch_wall_us_per_item"), v("singles_wall_us_per_item"))
        {
            rows.push((
                "… wall time per item".into(),
                format!("{batch:.1} µs vs {single:.1} µs"),
                "batch < singles",
                batch < single,
            ));
        }
        if let (Some(raw), Some(gateway)) = (v("upload_raw_mb_s"), v("upload_gateway_mb_s")) {
            rows.push((
                "50 MiB upload through the gateway / raw Object Store put".into(),
                format!(
                    "{:.0}% ({gateway:.0} vs {raw:.0} MB/s)",
                    gateway / raw * 100.0
                ),
                ">= 50%",
                gateway / raw >= 0.5,
            ));
        }
        if let Some(mib) = v("upload_rss_growth_mib") {
            rows.push((
                "gateway RSS growth during a 50 MiB upload".into(),
                format!("{mib:.1} MiB"),
                "< 16 MiB",
                mib < 16.0,
            ));
        }
        if let (Some(raw), Some(gateway)) = (v("result_raw_mb_s"), v("result_gateway_mb_s")) {
            rows.push((
                "100 MiB result through the gateway / raw Object Store get".into(),
                format!(
                    "{:.0}% ({gateway:.0} vs {raw:.0} MB/s)",
                    gateway / raw * 100.0
                ),
                ">= 50%",
                gateway / raw >= 0.5,
            ));
        }
        if let Some(mib) = v("result_rss_growth_mib") {
            rows.push((
                "gateway RSS growth while streaming a 100 MiB result".into(),
                format!("{mib:.1} MiB"),
                "< 16 MiB",
                mib < 16.0,
            ));
        }
        if let (Some(n), Some(kb), Some(answered)) =
            (v("waiters"), v("waiter_rss_kb"), v("waiters_answered"))
        {
            rows.push((
                format!(
                    "RSS per parked waiter ({n:.0} at once: long polls, Prefer: wait, SSE; each its own connection)"
                ),
                format!(
                    "{kb:.1} KB ({answered:.0} answered in {:.1} s)",
                    v("waiters_answer_secs").unwrap_or(0.0)
                ),
                "<= 12 KB",
                kb <= 12.0 && answered == n,
            ));
        }
        if let (Some(shed), Some(missing)) = (v("overload_shed"), v("overload_missing")) {
            rows.push((
                "overload at 2x peak: shed with Retry-After, no 202 without its message".into(),
                format!(
                    "{shed:.0} shed, {missing:.0} missing, peak RSS {:.1} MB",
                    v("overload_peak_rss_mb").unwrap_or(0.0)
                ),
                "shed > 0, missing = 0",
                shed > 0.0 && missing == 0.0,
            ));
        }
        rows
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Machine: {}. {}. {} s per phase, concurrency {}{}.\n",
            self.machine,
            self.versions,
            self.seconds_per_phase,
            self.concurrency,
            if self.quick { " (quick run)" } else { "" }
        );
        md.push_str("| target | measured | goal | met |\n|---|---|---|---|\n");
        for (what, measured, goal, met) in self.targets() {
            let _ = writeln!(
                md,
                "| {what} | {measured} | {goal} | {} |",
                if met { "yes" } else { "**no**" }
            );
        }
        if !self.cpu_us_per_op.is_empty() {
            md.push_str("\nCPU time per accepted request (µs), by process:\n\n| phase |");
            let names: Vec<&String> = self
                .cpu_us_per_op
                .values()
                .flat_map(|m| m.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for n in &names {
                let _ = write!(md, " {n} |");
            }
            md.push_str(" total |\n|---|");
            md.push_str(&"---|".repeat(names.len() + 1));
            md.push('\n');
            for (phase, per) in &self.cpu_us_per_op {
                let _ = write!(md, "| {phase} |");
                for n in &names {
                    // A process the phase does not run (the gateway in the bridge's): a dash.
                    match per.get(*n) {
                        Some(us) => write!(md, " {us:.1} |"),
                        None => write!(md, " – |"),
                    }
                    .expect("writing to a String");
                }
                let _ = writeln!(md, " {:.1} |", per.values().sum::<f64>());
            }
        }
        md.push_str("\n| phase | ok/s | ok | shed | errors |");
        for (_, label) in QUANTILES {
            let _ = write!(md, " {label} ms |");
        }
        md.push_str("\n|---|---|---|---|---|");
        md.push_str(&"---|".repeat(QUANTILES.len()));
        md.push('\n');
        for p in &self.phases {
            let _ = write!(
                md,
                "| {} | {:.0} | {} | {} | {} |",
                p.name, p.rate, p.ok, p.shed, p.errors
            );
            for ms in &p.latency_ms {
                let _ = write!(md, " {ms:.3} |");
            }
            md.push('\n');
        }
        md
    }

    fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(560);

        let series = [
            (
                "raw publish 256 B @ half peak",
                "raw JetStream publish",
                BLUE,
            ),
            (
                "gateway accept 256 B @ half peak",
                "gateway POST -> 202",
                RED,
            ),
        ];
        let top = series
            .iter()
            .filter_map(|(name, _, _)| self.phase(name))
            .flat_map(|p| p.latency_ms[..4].iter().copied())
            .fold(0.1f64, f64::max);
        let mut chart = ChartBuilder::on(&left)
            .caption(
                "Latency at half the raw peak (open model)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..3f64, 0f64..top * 1.1)?;
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&|x| {
                QUANTILES
                    .get(x.round() as usize)
                    .map_or(String::new(), |q| q.1.to_owned())
            })
            .y_desc("ms")
            .draw()?;
        for (name, label, color) in series {
            if let Some(p) = self.phase(name) {
                let points: Vec<(f64, f64)> = p.latency_ms[..4]
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64, *v))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|pt| Circle::new(pt, 3, color.filled())),
                )?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;

        let groups = [
            ("accept 256 B", "raw publish 256 B", "gateway accept 256 B"),
            ("accept 4 KiB", "raw publish 4 KiB", "gateway accept 4 KiB"),
            ("status read", "raw status lookup", "gateway status GET"),
        ];
        let top = groups
            .iter()
            .flat_map(|(_, r, g)| [self.phase(r), self.phase(g)])
            .flatten()
            .map(|p| p.rate)
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(&right)
            .caption(
                "Peak throughput (closed model), operations/s",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..3f64, 0f64..top * 1.15)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
            .draw()?;
        for (i, (group, raw, gw)) in groups.iter().enumerate() {
            for (offset, name, color, label) in [
                (0.15, raw, BLUE, "raw JetStream"),
                (0.5, gw, RED, "gateway"),
            ] {
                if let Some(p) = self.phase(name) {
                    let x = i as f64 + offset;
                    let bar = chart.draw_series(std::iter::once(Rectangle::new(
                        [(x, 0.0), (x + 0.33, p.rate)],
                        color.mix(0.8).filled(),
                    )))?;
                    if i == 0 {
                        bar.label(label).legend(move |(x, y)| {
                            Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.mix(0.8).filled())
                        });
                    }
                }
            }
            chart.draw_series(std::iter::once(Text::new(
                group.to_string(),
                (i as f64 + 0.2, top * 0.03),
                ("sans-serif", 14).into_font().color(&WHITE),
            )))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        self.plot(&dir.join("bench.svg"))?;
        Ok(())
    }
}
