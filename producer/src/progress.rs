//! Where a run stands while the CLI waits for it: a spinner on a terminal, a plain line on
//! each change of state (and every [`PLAIN_EVERY`] while rows go on changing) otherwise,
//! nothing with `--json`. Fed by the run's part results and its running part's live progress.

use std::cell::{Cell, RefCell};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sessionfleet::jobs::JobEnvelope;
use sessionfleet::ops::progress::Snapshot;

use crate::output::Output;

/// How often, at most, plain output repeats a line whose only change is the row count.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// The part running now, as the display needs it.
pub struct Running<'a> {
    /// 0-based part number.
    pub part: u32,
    /// Who runs it.
    pub worker: &'a str,
    /// What it has committed so far.
    pub done: Snapshot,
}

/// The display of one run.
pub struct Spinner {
    bar: Option<ProgressBar>,
    plain: bool,
    out: Output,
    label: String,
    /// The state last printed in plain mode (parts done, running part), and when.
    printed: RefCell<Option<(usize, Option<u32>)>>,
    printed_at: Cell<Option<Instant>>,
    last: RefCell<String>,
}

impl Spinner {
    /// A display for `env`'s run, starting at "waiting for a worker".
    pub fn new(out: &Output, env: &JobEnvelope) -> Spinner {
        let label = format!("{} on {}", env.kind.as_str(), env.target);
        let tty = std::io::stderr().is_terminal();
        // A JSON log stream gets no spinner: its progress goes out as lines, JSON ones (Output::info).
        let bar = (tty && !out.json && !out.log_json).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b.set_message(format!("{label}: waiting for a worker"));
            b
        });
        Spinner {
            bar,
            // Without a spinner (no terminal, or JSON logs): a line per change.
            plain: !out.json && (!tty || out.log_json),
            out: *out,
            label,
            printed: RefCell::new(None),
            printed_at: Cell::new(None),
            last: RefCell::new(String::new()),
        }
    }

    /// Shows `parts_done` finished parts that changed `rows_done` rows, and the part running
    /// now, if any.
    pub fn update(&self, parts_done: usize, rows_done: u64, running: Option<Running<'_>>) {
        let msg = match &running {
            Some(r) => format!(
                "{}: part {} running on {}: {} rows in {} batches{}",
                self.label,
                r.part + 1,
                r.worker,
                rows_done + r.done.rows,
                r.done.batches,
                if parts_done > 0 {
                    format!(" ({parts_done} part(s) done before)")
                } else {
                    String::new()
                }
            ),
            None if parts_done == 0 => return,
            None => format!(
                "{}: {parts_done} part(s) done, {rows_done} rows",
                self.label
            ),
        };
        if *self.last.borrow() == msg {
            return;
        }
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        } else if self.plain {
            let state = (parts_done, running.as_ref().map(|r| r.part));
            let due = self
                .printed_at
                .get()
                .is_none_or(|at| at.elapsed() >= PLAIN_EVERY);
            if *self.printed.borrow() != Some(state) || due {
                self.out.info(&msg);
                self.printed.replace(Some(state));
                self.printed_at.set(Some(Instant::now()));
            }
        }
        self.last.replace(msg);
    }

    /// Prints `msg` as [`Output::info`] does, above the spinner rather than through it.
    pub fn info(&self, out: &Output, msg: impl AsRef<str>) {
        match &self.bar {
            Some(b) => b.suspend(|| out.info(msg)),
            None => out.info(msg),
        }
    }

    /// Clears the spinner.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
