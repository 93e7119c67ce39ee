//! Prometheus metrics for `GET /metrics`, in the text exposition format
//! (version 0.0.4), written by hand.
//!
//! Everything recorded on a hot path (a cancel's latency, a task's duration,
//! the submission and cancel counters) is a relaxed atomic add: no lock, no
//! allocation. Traps are rare and labelled by kind, so they live in a small
//! map behind a mutex. Gauges that the rest of the server already knows (tasks
//! per state, running, waiting for CPU) are passed to [`Metrics::render`] at
//! scrape time instead of being mirrored here.
//!
//! The families rendered:
//!
//! | name | type |
//! |---|---|
//! | `wasmtask_tasks{state}` | gauge |
//! | `wasmtask_tasks_running` | gauge |
//! | `wasmtask_tasks_waiting_for_cpu` | gauge |
//! | `wasmtask_cancel_latency_seconds` | histogram |
//! | `wasmtask_task_duration_seconds` | histogram |
//! | `wasmtask_traps_total{kind}` | counter |
//! | `wasmtask_tasks_submitted_total` | counter |
//! | `wasmtask_cancels_total` | counter |
//! | `wasmtask_epoch_ticker_realtime` | gauge |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket upper bounds (seconds) for request → guest stopped: 10 µs to 10 s.
pub const CANCEL_LATENCY_BUCKETS: &[f64] = &[
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0,
    10.0,
];

/// Bucket upper bounds (seconds) for a task's run time: 1 ms to 1 h.
pub const TASK_DURATION_BUCKETS: &[f64] = &[
    1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Distinct trap kinds kept as their own label value; further kinds are
/// counted under [`OTHER_TRAP_KIND`] so a misbehaving source cannot grow the
/// exposition without bound.
pub const MAX_TRAP_KINDS: usize = 64;

/// The label value for traps beyond [`MAX_TRAP_KINDS`] distinct kinds.
pub const OTHER_TRAP_KIND: &str = "other";

/// A histogram with fixed bucket upper bounds, recorded lock-free.
///
/// Bounds are inclusive (`le`, "less than or equal"), compared in whole
/// nanoseconds so that an observation exactly on a bound (e.g. 1 ms against
/// `0.001`) always lands in that bound's bucket. The `+Inf` bucket is implicit.
#[derive(Debug)]
pub struct Histogram {
    /// Accepted bounds: the value as given (for the `le` label) and in
    /// nanoseconds (for comparisons); strictly increasing.
    bounds: Box<[(f64, u64)]>,
    /// Observations per bucket, *not* cumulative; one more than `bounds`
    /// (the last counts observations above every bound).
    buckets: Box<[AtomicU64]>,
    /// Sum of every observation, in nanoseconds (wraps after ~584 years).
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// A histogram with these bucket upper bounds, in seconds.
    ///
    /// Bounds should be finite, non-negative and strictly increasing; any
    /// bound that is not (including an explicit `+Inf`, which is always
    /// implied) is ignored rather than refused.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        let mut kept: Vec<(f64, u64)> = Vec::with_capacity(bounds.len());
        for &bound in bounds {
            if !bound.is_finite() || bound < 0.0 {
                continue;
            }
            // Saturating float → integer cast; bounds beyond ~584 years clamp.
            let nanos = (bound * 1e9).round() as u64;
            if kept.last().is_some_and(|&(_, last)| nanos <= last) {
                continue;
            }
            kept.push((bound, nanos));
        }
        let buckets = (0..=kept.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            bounds: kept.into_boxed_slice(),
            buckets,
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation: two relaxed atomic adds.
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // First bound >= nanos; `bounds.len()` (the +Inf bucket) when none is.
        let index = self.bounds.partition_point(|&(_, bound)| bound < nanos);
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The bucket upper bounds in use, in seconds (without `+Inf`).
    pub fn bounds(&self) -> Vec<f64> {
        self.bounds.iter().map(|&(bound, _)| bound).collect()
    }

    /// Cumulative counts, one per bound and a last one for `+Inf` (which is
    /// the total count).
    pub fn cumulative_counts(&self) -> Vec<u64> {
        let mut total = 0u64;
        self.buckets
            .iter()
            .map(|bucket| {
                total = total.wrapping_add(bucket.load(Ordering::Relaxed));
                total
            })
            .collect()
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |n, bucket| {
            n.wrapping_add(bucket.load(Ordering::Relaxed))
        })
    }

    /// The sum of every observation.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed))
    }

    /// Appends the family `name` (HELP, TYPE, `_bucket` lines with `le`
    /// including `+Inf`, `_sum` in seconds, `_count`) to `out`.
    ///
    /// The `+Inf` bucket and `_count` come from the same snapshot, so they
    /// are always equal even while observations race with the scrape.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        header(out, name, help, "histogram");
        let cumulative = self.cumulative_counts();
        let mut total = 0;
        for (i, count) in cumulative.iter().enumerate() {
            let le = match self.bounds.get(i) {
                Some(&(bound, _)) => format_float(bound),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
            total = *count;
        }
        // Read the sum after the buckets: a racing observation may show in
        // the sum and not yet in the counts, never the other way round.
        let sum_secs = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {}", format_float(sum_secs));
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// The server's metrics. One instance is shared (behind an `Arc`) by every
/// request handler and task driver.
#[derive(Debug)]
pub struct Metrics {
    /// Cancel requested → guest stopped.
    pub cancel_latency: Histogram,
    /// Task started → task finished.
    pub task_duration: Histogram,
    traps: Mutex<BTreeMap<String, u64>>,
    tasks_submitted: AtomicU64,
    cancels: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            cancel_latency: Histogram::new(CANCEL_LATENCY_BUCKETS),
            task_duration: Histogram::new(TASK_DURATION_BUCKETS),
            traps: Mutex::new(BTreeMap::new()),
            tasks_submitted: AtomicU64::new(0),
            cancels: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Same as [`Metrics::default`].
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Records how long a cancel took, from request to guest stopped.
    pub fn observe_cancel_latency(&self, d: Duration) {
        self.cancel_latency.observe(d);
    }

    /// Records how long a task ran.
    pub fn observe_task_duration(&self, d: Duration) {
        self.task_duration.observe(d);
    }

    /// Counts one trap of this kind (`stack_overflow`, `unreachable`, …).
    pub fn count_trap(&self, kind: &str) {
        let mut traps = self.traps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = traps.get_mut(kind) {
            *n = n.wrapping_add(1);
            return;
        }
        let key = if traps.len() < MAX_TRAP_KINDS {
            kind
        } else {
            OTHER_TRAP_KIND
        };
        let n = traps.entry(key.to_owned()).or_insert(0);
        *n = n.wrapping_add(1);
    }

    /// Counts one accepted task submission.
    pub fn count_submitted(&self) {
        self.tasks_submitted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one cancel request (task cancels; a run abort counts once per
    /// task it cancels if the caller says so).
    pub fn count_cancel(&self) {
        self.cancels.fetch_add(1, Ordering::Relaxed);
    }

    /// Tasks submitted so far.
    pub fn tasks_submitted(&self) -> u64 {
        self.tasks_submitted.load(Ordering::Relaxed)
    }

    /// Cancels requested so far.
    pub fn cancels(&self) -> u64 {
        self.cancels.load(Ordering::Relaxed)
    }

    /// Traps counted so far, by kind.
    pub fn traps(&self) -> BTreeMap<String, u64> {
        self.traps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The whole exposition. `tasks_by_state` are `(state, count)` pairs
    /// (e.g. from the database, every state included so that absent states
    /// read 0); `running` and `waiting_for_cpu` come from the runtime.
    pub fn render(
        &self,
        tasks_by_state: &[(&str, u64)],
        running: usize,
        waiting_for_cpu: usize,
    ) -> String {
        let mut out = String::with_capacity(4096);

        header(
            &mut out,
            "wasmtask_tasks",
            "Tasks in the database, by state.",
            "gauge",
        );
        for (state, count) in tasks_by_state {
            let _ = writeln!(
                out,
                "wasmtask_tasks{{state=\"{}\"}} {count}",
                escape_label_value(state)
            );
        }

        header(
            &mut out,
            "wasmtask_tasks_running",
            "Tasks whose guest is running in this process.",
            "gauge",
        );
        let _ = writeln!(out, "wasmtask_tasks_running {running}");

        header(
            &mut out,
            "wasmtask_tasks_waiting_for_cpu",
            "Running tasks ready to execute and waiting for a guest thread.",
            "gauge",
        );
        let _ = writeln!(out, "wasmtask_tasks_waiting_for_cpu {waiting_for_cpu}");

        self.cancel_latency.render(
            "wasmtask_cancel_latency_seconds",
            "Time from a cancel request to the guest being stopped.",
            &mut out,
        );
        self.task_duration.render(
            "wasmtask_task_duration_seconds",
            "Time from a task's start to its end.",
            &mut out,
        );

        header(
            &mut out,
            "wasmtask_traps_total",
            "Guest traps, by kind.",
            "counter",
        );
        for (kind, count) in self.traps() {
            let _ = writeln!(
                out,
                "wasmtask_traps_total{{kind=\"{}\"}} {count}",
                escape_label_value(&kind)
            );
        }

        header(
            &mut out,
            "wasmtask_tasks_submitted_total",
            "Tasks accepted for execution.",
            "counter",
        );
        let _ = writeln!(
            out,
            "wasmtask_tasks_submitted_total {}",
            self.tasks_submitted()
        );

        header(
            &mut out,
            "wasmtask_cancels_total",
            "Cancel requests received.",
            "counter",
        );
        let _ = writeln!(out, "wasmtask_cancels_total {}", self.cancels());

        out
    }
}

/// Appends the runtime's settings in force that the operator may need to
/// fix: whether the epoch ticker got real-time priority (without it a
/// guest's time slice can end late under load; see docs/config.md).
pub fn render_runtime(ticker_realtime: bool, out: &mut String) {
    header(
        out,
        "wasmtask_epoch_ticker_realtime",
        "1 when the epoch ticker runs at real-time priority, 0 when the process may not use it.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "wasmtask_epoch_ticker_realtime {}",
        u8::from(ticker_realtime)
    );
}

/// Appends the SQLite writer's figures: commits, jobs, the queue, and the
/// checkpointer's pauses of the writer (each delays the job in hand).
pub fn render_writer(stats: &crate::db::WriteStats, out: &mut String) {
    let counters = [
        (
            "wasmtask_db_commits_total",
            "Transactions the SQLite writer committed.",
            stats.batches,
        ),
        (
            "wasmtask_db_write_jobs_total",
            "Writes (jobs) in committed transactions.",
            stats.jobs,
        ),
        (
            "wasmtask_db_writer_pauses_total",
            "Times the checkpointer held the writer between two transactions to start the WAL over.",
            stats.pauses,
        ),
    ];
    for (name, help, value) in counters {
        header(out, name, help, "counter");
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        out,
        "wasmtask_db_writer_paused_seconds_total",
        "Time the writer was held for WAL restarts.",
        "counter",
    );
    let _ = writeln!(
        out,
        "wasmtask_db_writer_paused_seconds_total {}",
        format_float(stats.paused_us as f64 / 1e6)
    );
    header(
        out,
        "wasmtask_db_write_queue",
        "Writes waiting for the SQLite writer.",
        "gauge",
    );
    let _ = writeln!(out, "wasmtask_db_write_queue {}", stats.queued);
}

/// Escapes a label value for the text format: `\` → `\\`, `"` → `\"`,
/// newline → `\n`.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes HELP text: `\` → `\\`, newline → `\n` (quotes stay as they are).
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A sample value or `le` bound: Rust's shortest round-trip form, which the
/// format accepts (`0.00001`, `2.5`, `10`), with the special values spelled
/// as Prometheus spells them.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    static BOUNDS: &[f64] = &[0.001, 0.01, 0.1];

    #[test]
    fn buckets_are_cumulative_and_inclusive_at_bounds() {
        let h = Histogram::new(BOUNDS);
        h.observe(Duration::ZERO); // le 0.001
        h.observe(Duration::from_millis(1)); // exactly on 0.001
        h.observe(Duration::from_nanos(1_000_001)); // just above → le 0.01
        h.observe(Duration::from_millis(10)); // exactly on 0.01
        h.observe(Duration::from_millis(100)); // exactly on 0.1
        h.observe(Duration::from_nanos(100_000_001)); // above all → +Inf
        h.observe(Duration::from_secs(3600)); // +Inf
        assert_eq!(h.cumulative_counts(), vec![2, 4, 5, 7]);
        assert_eq!(h.count(), 7);
    }

    #[test]
    fn boundaries_of_the_cancel_buckets_land_in_their_own_bucket() {
        let h = Histogram::new(CANCEL_LATENCY_BUCKETS);
        for &bound in CANCEL_LATENCY_BUCKETS {
            h.observe(Duration::from_secs_f64(bound));
        }
        let expected: Vec<u64> = (1..=CANCEL_LATENCY_BUCKETS.len() as u64)
            .chain([CANCEL_LATENCY_BUCKETS.len() as u64])
            .collect();
        assert_eq!(h.cumulative_counts(), expected);
    }

    #[test]
    fn sum_and_count() {
        let h = Histogram::new(BOUNDS);
        assert_eq!(h.count(), 0);
        assert_eq!(h.sum(), Duration::ZERO);
        h.observe(Duration::from_micros(250));
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(1));
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum(), Duration::from_micros(1_002_250));
        let mut out = String::new();
        h.render("x_seconds", "help", &mut out);
        assert!(out.contains("\nx_seconds_sum 1.00225\n"), "{out}");
        assert!(out.contains("\nx_seconds_count 3\n"), "{out}");
        assert!(
            out.contains("\nx_seconds_bucket{le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("\nx_seconds_bucket{le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("\nx_seconds_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("\nx_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
    }

    #[test]
    fn bad_bounds_are_ignored() {
        static BAD: &[f64] = &[0.5, f64::NAN, 0.1, 0.5, 1.0, f64::INFINITY, -1.0];
        let h = Histogram::new(BAD);
        assert_eq!(h.bounds(), vec![0.5, 1.0]);
        h.observe(Duration::from_secs(2));
        assert_eq!(h.cumulative_counts(), vec![0, 0, 1]);
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = std::sync::Arc::new(Histogram::new(CANCEL_LATENCY_BUCKETS));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(Duration::from_micros(t * 1000 + i % 100));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.count(), 40_000);
        assert_eq!(h.cumulative_counts().last().copied(), Some(40_000));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("plain_kind"), "plain_kind");
        assert_eq!(escape_label_value(r"a\b"), r"a\\b");
        assert_eq!(escape_label_value("say \"hi\""), "say \\\"hi\\\"");
        assert_eq!(escape_label_value("two\nlines"), "two\\nlines");
        let m = Metrics::default();
        m.count_trap("we\"ird\\kind\n");
        let text = m.render(&[], 0, 0);
        assert!(
            text.contains("wasmtask_traps_total{kind=\"we\\\"ird\\\\kind\\n\"} 1\n"),
            "{text}"
        );
        parse_exposition(&text);
    }

    #[test]
    fn traps_are_counted_by_kind_and_capped() {
        let m = Metrics::default();
        m.count_trap("stack_overflow");
        m.count_trap("stack_overflow");
        m.count_trap("unreachable");
        assert_eq!(m.traps().get("stack_overflow"), Some(&2));
        assert_eq!(m.traps().get("unreachable"), Some(&1));
        for i in 0..2 * MAX_TRAP_KINDS {
            m.count_trap(&format!("kind{i}"));
        }
        let traps = m.traps();
        assert_eq!(traps.len(), MAX_TRAP_KINDS + 1);
        assert_eq!(traps.values().sum::<u64>(), 3 + 2 * MAX_TRAP_KINDS as u64);
        assert!(traps.get(OTHER_TRAP_KIND).is_some_and(|&n| n > 0));
        // A kind already known keeps counting under its own name.
        m.count_trap("unreachable");
        assert_eq!(m.traps().get("unreachable"), Some(&2));
    }

    #[test]
    fn rendered_text_is_valid_exposition() {
        let m = Metrics::default();
        m.count_submitted();
        m.count_submitted();
        m.count_cancel();
        m.observe_cancel_latency(Duration::from_micros(37));
        m.observe_cancel_latency(Duration::from_secs(20));
        m.observe_task_duration(Duration::from_millis(1500));
        m.count_trap("stack_overflow");
        m.count_trap("memory_out_of_bounds");
        let states = [("queued", 1), ("running", 2), ("succeeded", 40)];
        let text = m.render(&states, 2, 1);
        let families = parse_exposition(&text);

        let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "wasmtask_tasks",
                "wasmtask_tasks_running",
                "wasmtask_tasks_waiting_for_cpu",
                "wasmtask_cancel_latency_seconds",
                "wasmtask_task_duration_seconds",
                "wasmtask_traps_total",
                "wasmtask_tasks_submitted_total",
                "wasmtask_cancels_total",
            ]
        );
        for line in [
            "wasmtask_tasks{state=\"succeeded\"} 40",
            "wasmtask_tasks_running 2",
            "wasmtask_tasks_waiting_for_cpu 1",
            "wasmtask_cancel_latency_seconds_bucket{le=\"0.00005\"} 1",
            "wasmtask_cancel_latency_seconds_bucket{le=\"10\"} 1",
            "wasmtask_cancel_latency_seconds_bucket{le=\"+Inf\"} 2",
            "wasmtask_cancel_latency_seconds_count 2",
            "wasmtask_task_duration_seconds_sum 1.5",
            "wasmtask_traps_total{kind=\"stack_overflow\"} 1",
            "wasmtask_tasks_submitted_total 2",
            "wasmtask_cancels_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn empty_metrics_render_valid_exposition() {
        let text = Metrics::default().render(&[], 0, 0);
        let families = parse_exposition(&text);
        assert_eq!(families.len(), 8);
    }

    #[test]
    fn the_writer_figures_render_as_valid_families_with_their_values() {
        let stats = crate::db::WriteStats {
            batches: 12,
            jobs: 40,
            failed_batches: 0,
            redone_batches: 0,
            pauses: 3,
            paused_us: 1_500,
            paused_max_us: 900,
            queued: 2,
        };
        let mut text = Metrics::default().render(&[], 0, 0);
        render_writer(&stats, &mut text);
        render_runtime(true, &mut text);
        let families = parse_exposition(&text);
        assert_eq!(families.len(), 8 + 5 + 1);
        for (line, kind) in [
            ("wasmtask_db_commits_total 12", "counter"),
            ("wasmtask_db_write_jobs_total 40", "counter"),
            ("wasmtask_db_writer_pauses_total 3", "counter"),
            ("wasmtask_db_writer_paused_seconds_total 0.0015", "counter"),
            ("wasmtask_db_write_queue 2", "gauge"),
            ("wasmtask_epoch_ticker_realtime 1", "gauge"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
            let name = line.split(' ').next().unwrap();
            assert!(
                families.iter().any(|f| f.name == name && f.kind == kind),
                "{name} is not a {kind}"
            );
        }
    }

    // --- a strict little parser for the text format -------------------------

    struct Family {
        name: String,
        kind: String,
    }

    fn is_metric_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn is_label_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    fn parse_value(s: &str) -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => s
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value {s:?}")),
        }
    }

    /// Parses `{a="x",b="y"}` at the start of `s`; returns the labels
    /// (unescaped) and the rest of `s`.
    fn parse_labels(s: &str) -> (Vec<(String, String)>, &str) {
        let mut labels = Vec::new();
        let mut rest = s
            .strip_prefix('{')
            .unwrap_or_else(|| panic!("no {{ in {s:?}"));
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                return (labels, r);
            }
            let eq = rest.find('=').unwrap_or_else(|| panic!("no = in {s:?}"));
            let name = &rest[..eq];
            assert!(is_label_name(name), "bad label name {name:?}");
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("unquoted label value in {s:?}"));
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => panic!("bad escape {other:?} in {s:?}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, '\n')) => panic!("raw newline in label value"),
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {s:?}"),
                }
            };
            labels.push((name.to_owned(), value));
            rest = &rest[end + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            }
        }
    }

    /// Checks `text` line by line and returns its families in order. Every
    /// family has exactly one HELP and one TYPE line before its samples, its
    /// samples are contiguous, and histograms are cumulative with
    /// `+Inf == _count`.
    fn parse_exposition(text: &str) -> Vec<Family> {
        assert!(text.ends_with('\n'), "no final newline");
        let mut families: Vec<Family> = Vec::new();
        let mut helped = HashSet::new();
        let mut typed = HashSet::new();
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _help) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(is_metric_name(name), "bad name in {line:?}");
                assert!(helped.insert(name.to_owned()), "second HELP for {name}");
                assert!(!typed.contains(name), "HELP after TYPE for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
                assert!(is_metric_name(name), "bad name in {line:?}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad type in {line:?}"
                );
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                assert!(typed.insert(name.to_owned()), "second TYPE for {name}");
                families.push(Family {
                    name: name.to_owned(),
                    kind: kind.to_owned(),
                });
                buckets.clear();
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            assert!(!line.is_empty(), "empty line");

            // name{labels} value | name value
            let name_end = line
                .find(['{', ' '])
                .unwrap_or_else(|| panic!("no value in {line:?}"));
            let name = &line[..name_end];
            assert!(is_metric_name(name), "bad sample name in {line:?}");
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end..])
            } else {
                (Vec::new(), &line[name_end..])
            };
            let value = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no space before value in {line:?}"));
            assert!(!value.contains(' '), "timestamp or junk in {line:?}");
            let value = parse_value(value);

            // The sample belongs to the family declared last.
            let family = families
                .last()
                .unwrap_or_else(|| panic!("sample before any TYPE: {line:?}"));
            let mut label_names = HashSet::new();
            for (label, _) in &labels {
                assert!(
                    label_names.insert(label.clone()),
                    "duplicate label in {line:?}"
                );
            }
            if family.kind == "histogram" {
                let base = &family.name;
                if name == format!("{base}_bucket") {
                    let le = labels
                        .iter()
                        .find(|(l, _)| l == "le")
                        .unwrap_or_else(|| panic!("bucket without le: {line:?}"));
                    let le = parse_value(&le.1);
                    if let Some(&(prev_le, prev_count)) = buckets.last() {
                        assert!(le > prev_le, "le not increasing: {line:?}");
                        assert!(value >= prev_count, "not cumulative: {line:?}");
                    }
                    buckets.push((le, value));
                } else if name == format!("{base}_count") {
                    let inf = buckets.last().copied();
                    assert_eq!(inf.map(|b| b.0), Some(f64::INFINITY), "no +Inf bucket");
                    assert_eq!(inf.map(|b| b.1), Some(value), "+Inf != _count");
                } else {
                    assert_eq!(name, format!("{base}_sum"), "stray sample {line:?}");
                    assert!(value >= 0.0);
                }
            } else {
                assert_eq!(name, family.name, "sample outside its family: {line:?}");
                assert!(!labels.iter().any(|(l, _)| l == "le"));
            }
        }
        families
    }
}
