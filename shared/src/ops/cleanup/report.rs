//! What a cleanup run and a stats call report, in the original script's field names and text
//! layout (`reference/vedfolnir-behaviour.md` §2.1), plus what batching adds.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::rules::RuleKind;
use crate::ops::Outcome;

/// Rows per rule (deleted by a run, or that a run would delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounts {
    /// v2: `expires_at` in the past; v1: activity NULL or older than the max age.
    pub expired: u64,
    /// v2: marked inactive and idle longer than the max age.
    pub inactive_stale: u64,
    /// `force --max-age H`: idle longer than H hours.
    pub idle: u64,
    /// User missing or deactivated.
    pub orphaned: u64,
}

impl RuleCounts {
    /// Adds `n` to the count of `kind`.
    pub fn add(&mut self, kind: RuleKind, n: u64) {
        match kind {
            RuleKind::Expired => self.expired += n,
            RuleKind::InactiveStale => self.inactive_stale += n,
            RuleKind::Idle => self.idle += n,
            RuleKind::Orphaned => self.orphaned += n,
        }
    }

    /// What the original called "expired": every age-based rule.
    pub fn expired_total(&self) -> u64 {
        self.expired + self.inactive_stale + self.idle
    }

    /// All rules.
    pub fn total(&self) -> u64 {
        self.expired_total() + self.orphaned
    }

    fn merge(&mut self, other: &RuleCounts) {
        self.expired += other.expired;
        self.inactive_stale += other.inactive_stale;
        self.idle += other.idle;
        self.orphaned += other.orphaned;
    }
}

/// The result of [`run`](super::run). For one logical run split into continuations, fold the
/// parts together with [`CleanupReport::merge`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CleanupReport {
    /// When the run (its first part) started, UTC.
    pub timestamp: DateTime<Utc>,
    /// Sessions removed by the age rules (expired, inactive and stale, forced idle); in a dry
    /// run, how many would be.
    pub expired_sessions_cleaned: u64,
    /// Sessions of missing or deactivated users removed (dry run: would be).
    pub orphaned_sessions_cleaned: u64,
    /// Planner-statistics refreshes run after a large purge.
    pub database_optimizations: u64,
    /// Problems that did not stop the run.
    pub errors: Vec<String>,
    /// Wall time, seconds (summed over parts).
    pub duration_seconds: f64,
    /// Present (true) when the run was forced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_cleanup: Option<bool>,
    /// The forced idle limit in hours, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_max_age_hours: Option<u32>,
    /// Per-rule counts (a row matching several rules counts under the first).
    pub rules: RuleCounts,
    /// Committed delete transactions.
    pub batches: u64,
    /// Rows deleted per second of wall time.
    pub rows_per_second: f64,
    /// The longest delete transaction, milliseconds.
    pub longest_batch_ms: f64,
    /// Finished, or cut short by the budget, a cancellation or a newer lease holder.
    pub outcome: Outcome,
    /// Rows still matching a rule when the budget stopped the run (0 when completed). Absent
    /// from a cancelled or fenced-out part: a cancellation (shutdown, lost lease) stops at once, and counting
    /// what is left reads the whole table — seconds per million rows, which a stopping worker
    /// does not have. The continuation's report counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// True when `remaining` is a lower bound: a budget stop counts at most
    /// `cleanup::REMAINING_COUNT_LIMIT` rows, so that a part on a table of tens of millions
    /// does not spend longer counting than it deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remaining_at_least: bool,
    /// The reference time every cutoff was computed from. A continuation passes it on.
    pub as_of: NaiveDateTime,
    /// True when nothing was deleted and the counts are what a real run would delete.
    pub dry_run: bool,
    /// Sessions kept although their platform id points at a missing platform: reported for
    /// people to look at, never deleted or changed for that reason. Absent from a part cut
    /// short by its budget or a cancellation, which does not wait for the count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_platform_sessions: Option<u64>,
    /// Sessions a rule matches that were kept because rows of another table still reference
    /// them through a foreign key whose `ON DELETE` rule forbids the delete (`RESTRICT`, `NO
    /// ACTION`). Present only for schemas with such a key, from the part that completes the
    /// run (dry run: would be kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_sessions_kept: Option<u64>,
    /// Rules that could not apply to this schema, and similar remarks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl CleanupReport {
    /// An empty report for a run starting now with reference time `as_of`.
    pub fn new(as_of: NaiveDateTime, dry_run: bool) -> CleanupReport {
        CleanupReport {
            timestamp: Utc::now(),
            expired_sessions_cleaned: 0,
            orphaned_sessions_cleaned: 0,
            database_optimizations: 0,
            errors: Vec::new(),
            duration_seconds: 0.0,
            forced_cleanup: None,
            custom_max_age_hours: None,
            rules: RuleCounts::default(),
            batches: 0,
            rows_per_second: 0.0,
            longest_batch_ms: 0.0,
            outcome: Outcome::Completed,
            remaining: Some(0),
            remaining_at_least: false,
            as_of,
            dry_run,
            missing_platform_sessions: None,
            referenced_sessions_kept: None,
            notes: Vec::new(),
        }
    }

    /// Total rows deleted (dry run: that would be).
    pub fn total_cleaned(&self) -> u64 {
        self.expired_sessions_cleaned + self.orphaned_sessions_cleaned
    }

    /// Recomputes the derived fields from the per-rule counts and the duration.
    pub(crate) fn settle(&mut self) {
        self.expired_sessions_cleaned = self.rules.expired_total();
        self.orphaned_sessions_cleaned = self.rules.orphaned;
        self.rows_per_second = if self.dry_run || self.duration_seconds <= 0.0 {
            0.0
        } else {
            self.rules.total() as f64 / self.duration_seconds
        };
    }

    /// Folds a later part of the same run into this one: counts and durations add up, the
    /// outcome and `remaining` are the later part's (the latest view), so are the
    /// missing-platform and referenced-session counts when the later part has them; `timestamp` and `as_of` stay the
    /// first part's.
    pub fn merge(&mut self, later: &CleanupReport) {
        self.rules.merge(&later.rules);
        self.database_optimizations += later.database_optimizations;
        self.errors.extend(later.errors.iter().cloned());
        for note in &later.notes {
            if !self.notes.contains(note) {
                self.notes.push(note.clone());
            }
        }
        self.duration_seconds += later.duration_seconds;
        self.batches += later.batches;
        self.longest_batch_ms = self.longest_batch_ms.max(later.longest_batch_ms);
        self.outcome = later.outcome;
        self.remaining = later.remaining;
        self.remaining_at_least = later.remaining_at_least;
        self.missing_platform_sessions = later
            .missing_platform_sessions
            .or(self.missing_platform_sessions);
        self.referenced_sessions_kept = later
            .referenced_sessions_kept
            .or(self.referenced_sessions_kept);
        self.forced_cleanup = self.forced_cleanup.or(later.forced_cleanup);
        self.custom_max_age_hours = self.custom_max_age_hours.or(later.custom_max_age_hours);
        self.dry_run = self.dry_run && later.dry_run;
        self.settle();
    }

    /// The original's text layout: "Cleanup Results:", a line of 20 `=`, then `key: value`.
    pub fn render_text(&self) -> String {
        let mut out = String::from("Cleanup Results:\n");
        out.push_str(&"=".repeat(20));
        out.push('\n');
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "{k}: {v}");
        };
        line("timestamp", self.timestamp.to_rfc3339());
        line(
            "expired_sessions_cleaned",
            self.expired_sessions_cleaned.to_string(),
        );
        line(
            "orphaned_sessions_cleaned",
            self.orphaned_sessions_cleaned.to_string(),
        );
        line(
            "database_optimizations",
            self.database_optimizations.to_string(),
        );
        line("errors", format!("{:?}", self.errors));
        line("duration_seconds", format!("{:.3}", self.duration_seconds));
        if let Some(f) = self.forced_cleanup {
            line("forced_cleanup", f.to_string());
        }
        if let Some(h) = self.custom_max_age_hours {
            line("custom_max_age_hours", h.to_string());
        }
        line("expired", self.rules.expired.to_string());
        line("inactive_stale", self.rules.inactive_stale.to_string());
        line("idle", self.rules.idle.to_string());
        line("orphaned", self.rules.orphaned.to_string());
        line("batches", self.batches.to_string());
        line("rows_per_second", format!("{:.1}", self.rows_per_second));
        line("longest_batch_ms", format!("{:.1}", self.longest_batch_ms));
        line("outcome", self.outcome.as_str().into());
        line(
            "remaining",
            match self.remaining {
                Some(n) if self.remaining_at_least => format!("at least {n}"),
                Some(n) => n.to_string(),
                None => format!("not counted ({})", self.outcome.as_str()),
            },
        );
        line("as_of", self.as_of.to_string());
        line("dry_run", self.dry_run.to_string());
        if let Some(n) = self.missing_platform_sessions {
            line("missing_platform_sessions", n.to_string());
        }
        if let Some(n) = self.referenced_sessions_kept {
            line("referenced_sessions_kept", n.to_string());
        }
        for note in &self.notes {
            line("note", note.clone());
        }
        out
    }
}

/// The result of [`stats`](super::stats): the original `--stats` fields plus what a cleanup
/// would delete, per rule, at `as_of`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CleanupStats {
    /// When the statistics were taken, UTC.
    pub timestamp: DateTime<Utc>,
    /// Reference time of the age buckets and rules.
    pub as_of: NaiveDateTime,
    /// Detected schema (`v1` or `v2`).
    pub schema: String,
    /// All session rows.
    pub total_sessions: u64,
    /// Last activity within 24 h of `as_of`.
    pub recent_sessions_24h: u64,
    /// Last activity more than 48 h before `as_of`.
    pub old_sessions_48h: u64,
    /// Last activity more than 7 days before `as_of`.
    pub very_old_sessions_week: u64,
    /// What a cleanup with these parameters would delete, per rule.
    pub rules: RuleCounts,
    /// Sum of the age rules.
    pub expired_sessions: u64,
    /// Orphaned-rule count.
    pub orphaned_sessions: u64,
    /// Sessions pointing at a missing platform that a cleanup would keep.
    pub missing_platform_sessions: u64,
    /// Sessions a rule matches that a cleanup would keep because other rows still reference
    /// them (see [`CleanupReport::referenced_sessions_kept`]); absent without such a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_sessions_kept: Option<u64>,
    /// Effective seconds between scheduled cleanups.
    pub cleanup_interval: u64,
    /// Effective starting batch size.
    pub batch_size: u32,
    /// Effective max age, seconds.
    pub max_session_age: u64,
    /// Effective target transaction duration, milliseconds.
    pub target_batch_ms: u64,
    /// Effective rest after each batch, as a multiple of the batch's time.
    pub rest_ratio: f64,
    /// Whether reads run beside the batches (`CleanupParams::parallel_reads`).
    pub parallel_reads: bool,
    /// Rules this schema cannot support, and similar remarks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl CleanupStats {
    /// The original's text layout: "Session Cleanup Statistics:", 40 `=`, `key: value` lines.
    pub fn render_text(&self) -> String {
        let mut out = String::from("Session Cleanup Statistics:\n");
        out.push_str(&"=".repeat(40));
        out.push('\n');
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "{k}: {v}");
        };
        line("timestamp", self.timestamp.to_rfc3339());
        line("total_sessions", self.total_sessions.to_string());
        line("recent_sessions_24h", self.recent_sessions_24h.to_string());
        line("old_sessions_48h", self.old_sessions_48h.to_string());
        line(
            "very_old_sessions_week",
            self.very_old_sessions_week.to_string(),
        );
        line("expired_sessions", self.expired_sessions.to_string());
        line("expired", self.rules.expired.to_string());
        line("inactive_stale", self.rules.inactive_stale.to_string());
        line("idle", self.rules.idle.to_string());
        line("orphaned_sessions", self.orphaned_sessions.to_string());
        line(
            "missing_platform_sessions",
            self.missing_platform_sessions.to_string(),
        );
        if let Some(n) = self.referenced_sessions_kept {
            line("referenced_sessions_kept", n.to_string());
        }
        line("cleanup_interval", self.cleanup_interval.to_string());
        line("batch_size", self.batch_size.to_string());
        line("max_session_age", self.max_session_age.to_string());
        line("target_batch_ms", self.target_batch_ms.to_string());
        line("rest_ratio", self.rest_ratio.to_string());
        line("parallel_reads", self.parallel_reads.to_string());
        line("as_of", self.as_of.to_string());
        line("schema", self.schema.clone());
        for note in &self.notes {
            line("note", note.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_keeps_the_latest_outcome() {
        let as_of = chrono::DateTime::from_timestamp(1_750_000_000, 0)
            .map(|d| d.naive_utc())
            .unwrap_or_default();
        let mut first = CleanupReport::new(as_of, false);
        first.rules.expired = 10;
        first.batches = 2;
        first.duration_seconds = 1.0;
        first.longest_batch_ms = 30.0;
        first.outcome = Outcome::BudgetSpent;
        first.remaining = Some(5);
        first.remaining_at_least = true;
        first.settle();
        assert!(first.render_text().contains("remaining: at least 5"));
        assert_eq!(
            serde_json::to_value(&first).unwrap()["remaining_at_least"],
            true
        );
        let mut second = CleanupReport::new(as_of, false);
        second.rules.expired = 3;
        second.rules.orphaned = 2;
        second.batches = 1;
        second.duration_seconds = 1.0;
        second.longest_batch_ms = 12.0;
        second.settle();
        first.merge(&second);
        assert_eq!(first.expired_sessions_cleaned, 13);
        assert_eq!(first.orphaned_sessions_cleaned, 2);
        assert_eq!(first.batches, 3);
        assert_eq!(first.longest_batch_ms, 30.0);
        assert_eq!(first.outcome, Outcome::Completed);
        assert_eq!(first.remaining, Some(0));
        assert!(!first.remaining_at_least, "the latest part's view");
        assert!(
            serde_json::to_value(&first)
                .unwrap()
                .get("remaining_at_least")
                .is_none()
        );
        assert!((first.rows_per_second - 7.5).abs() < 1e-9);
        let text = first.render_text();
        assert!(text.starts_with("Cleanup Results:\n====================\ntimestamp: "));
        assert!(!text.contains("forced_cleanup"));
    }
}
