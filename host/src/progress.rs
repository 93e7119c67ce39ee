//! Live status lines on a terminal: one progress bar per running task,
//! drawn on stderr from the task's events (`indicatif`).
//!
//! Used by `submit --follow`, `logs -f` and `pipeline run` when stderr is a
//! terminal; otherwise those commands print the plain lines they always
//! printed (scripts and tests read those), and `--output json` never draws.
//! A bar appears when its task starts, follows `task.progress` (fraction and
//! message) and a pending cancel, and is removed when the task ends — the
//! command prints the end as a line. Lines printed while bars are drawn go
//! through [`Board::println`] or [`Board::suspend`], so they scroll above
//! the bars instead of tearing them. indicatif redraws at most 20 times a
//! second however often a guest reports progress.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::model::{Event, EventKind};

/// Bars drawn at once; more running tasks get none (their lines still print).
pub const MAX_BARS: usize = 16;
/// A bar's length: fractions are shown to a tenth of a percent.
const SCALE: u64 = 1000;

/// The status lines of the tasks being followed.
pub struct Board {
    mp: MultiProgress,
    /// By task id: the bar and its label.
    bars: HashMap<String, (ProgressBar, String)>,
    /// Labels are padded to the longest (up to [`MAX_LABEL`]) so bars align.
    width: usize,
    style: ProgressStyle,
}

/// Longest label shown in full.
const MAX_LABEL: usize = 24;

impl Board {
    /// A board on stderr when stderr is a terminal; `None` otherwise (print
    /// plain lines then).
    pub fn on_stderr() -> Option<Board> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        Some(Board::new(ProgressDrawTarget::stderr()))
    }

    fn new(target: ProgressDrawTarget) -> Board {
        let style = ProgressStyle::with_template(
            "{prefix:.bold} {spinner} [{bar:24}] {percent:>3}% {elapsed:>4} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        Board {
            mp: MultiProgress::with_draw_target(target),
            bars: HashMap::new(),
            width: 0,
            style,
        }
    }

    /// A handle that prints lines above the bars (for another thread).
    pub fn lines(&self) -> Lines {
        Lines(self.mp.clone())
    }

    /// Prints a line on stderr above the bars.
    pub fn println(&self, line: &str) {
        Lines(self.mp.clone()).println(line);
    }

    /// Runs `f` (which may write to the terminal) with the bars hidden.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.mp.suspend(f)
    }

    /// Updates the status line of the event's task; `label` names it (its
    /// key in a run, or its id).
    pub fn event(&mut self, ev: &Event, label: &str) {
        let Some(task) = ev.task_id.as_deref() else {
            return;
        };
        let d = &ev.data;
        match ev.kind {
            EventKind::TaskStarted => {
                if let Some(bar) = self.bar(task, label) {
                    bar.set_message("running");
                }
            }
            EventKind::TaskProgress => {
                if let Some(bar) = self.bar(task, label) {
                    let f = d.get("fraction").and_then(Value::as_f64).unwrap_or(0.0);
                    let f = if f.is_finite() {
                        f.clamp(0.0, 1.0)
                    } else {
                        0.0
                    };
                    bar.set_position((f * SCALE as f64).round() as u64);
                    let msg = d.get("message").and_then(Value::as_str).unwrap_or("");
                    bar.set_message(one_line(msg));
                }
            }
            EventKind::TaskCancelRequested => {
                if let Some(bar) = self.bar(task, label) {
                    let reason = d.get("reason").and_then(Value::as_str).unwrap_or("");
                    bar.set_message(format!("stopping: {}", one_line(reason)));
                }
            }
            EventKind::TaskSucceeded
            | EventKind::TaskFailed
            | EventKind::TaskTimedOut
            | EventKind::TaskCanceled => {
                if let Some((bar, _)) = self.bars.remove(task) {
                    bar.finish_and_clear();
                    self.mp.remove(&bar);
                }
            }
            _ => {}
        }
    }

    /// Removes every bar (before the command prints its final report).
    pub fn clear(&mut self) {
        for (_, (bar, _)) in self.bars.drain() {
            bar.finish_and_clear();
            self.mp.remove(&bar);
        }
        let _ = self.mp.clear();
    }

    fn bar(&mut self, task: &str, label: &str) -> Option<&ProgressBar> {
        if !self.bars.contains_key(task) {
            if self.bars.len() >= MAX_BARS {
                return None;
            }
            let label: String = one_line(label).chars().take(MAX_LABEL).collect();
            let bar = self.mp.add(ProgressBar::new(SCALE));
            bar.set_style(self.style.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            let w = label.chars().count();
            self.bars.insert(task.to_owned(), (bar, label));
            if w > self.width {
                self.width = w;
                for (b, l) in self.bars.values() {
                    b.set_prefix(format!("{l:<w$}"));
                }
            } else if let Some((b, l)) = self.bars.get(task) {
                b.set_prefix(format!("{l:<0$}", self.width));
            }
        }
        self.bars.get(task).map(|(b, _)| b)
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Prints lines above a board's bars; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Lines(MultiProgress);

impl Lines {
    pub fn println(&self, line: &str) {
        if self.0.println(line).is_err() {
            eprintln!("{line}");
        }
    }
}

/// Guest text on one status line: control characters (a newline would
/// break the drawing) become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, data: Value) -> Event {
        Event {
            seq: 1,
            task_id: Some("t_1".into()),
            run_id: None,
            kind,
            at: 0,
            data,
        }
    }

    #[test]
    fn bars_follow_a_task_from_start_to_end() {
        let mut b = Board::new(ProgressDrawTarget::hidden());
        b.event(&ev(EventKind::TaskStarted, Value::Null), "build");
        b.event(
            &ev(
                EventKind::TaskProgress,
                serde_json::json!({"fraction": 0.425, "message": "step\n3"}),
            ),
            "build",
        );
        let bar = &b.bars["t_1"].0;
        assert_eq!(bar.position(), 425);
        assert_eq!(bar.message(), "step 3");
        assert_eq!(bar.prefix(), "build");
        b.event(
            &ev(
                EventKind::TaskCancelRequested,
                serde_json::json!({"reason": "enough"}),
            ),
            "build",
        );
        assert_eq!(b.bars["t_1"].0.message(), "stopping: enough");
        b.event(&ev(EventKind::TaskCanceled, Value::Null), "build");
        assert!(b.bars.is_empty());
    }

    #[test]
    fn at_most_max_bars_are_drawn() {
        let mut b = Board::new(ProgressDrawTarget::hidden());
        for i in 0..MAX_BARS + 3 {
            let mut e = ev(EventKind::TaskStarted, Value::Null);
            e.task_id = Some(format!("t_{i}"));
            b.event(&e, &i.to_string());
        }
        assert_eq!(b.bars.len(), MAX_BARS);
        let mut e = ev(
            EventKind::TaskProgress,
            serde_json::json!({"fraction": f64::NAN}),
        );
        e.task_id = Some("t_0".into());
        b.event(&e, "0");
        assert_eq!(b.bars["t_0"].0.position(), 0);
        // Labels are padded to the longest, so the bars line up.
        assert_eq!(b.bars["t_0"].0.prefix(), format!("{:<2}", "0"));
        assert_eq!(b.bars["t_12"].0.prefix(), "12");
    }
}
