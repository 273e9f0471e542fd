//! Full maintenance: cleanup → recommended indexes → optimize → health report, as one run
//! with one summary (`session_maintenance.py --full-maintenance`, reference §2.4).
//!
//! The run is a small state machine so it fits the fleet's time budgets: a cleanup that
//! spends its budget, or a stage a cancellation stops (the health report's included),
//! returns [`FullRun::next`], parameters that carry the stage reached and the partial
//! report; the continuation picks up there. Bugs of the original fixed on purpose:
//! the summary carries the analytics recommendations (the original read a key that never
//! existed), indexes that already existed are not reported as created, and orphans are
//! mentioned.
//!
//! `dry_run` changes nothing anywhere: the cleanup only counts, index creation only lists,
//! optimize says what it would run, and no fencing token is needed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::analytics::{self, DbFindings, Health, HealthParams, HealthReport};
use super::cleanup::{self, CleanupParams, CleanupReport};
use super::maintenance::{self, IndexReport, OptimizeReport};
use super::{OpContext, OpError, Outcome};
use crate::store::Engine;

/// Where a full-maintenance run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Purging expired and orphaned sessions (may take several parts).
    #[default]
    Cleanup,
    /// Creating the recommended indexes.
    Indexes,
    /// Refreshing planner statistics.
    Optimize,
    /// Writing the health report and the summary.
    Report,
}

/// Parameters of [`run`]. Travels through Redis; continuations carry `stage` and `partial`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FullParams {
    /// Cleanup parameters (its `dry_run` follows [`FullParams::dry_run`]).
    pub cleanup: CleanupParams,
    /// Health-report parameters.
    pub health: HealthParams,
    /// Change nothing; report what would happen.
    pub dry_run: bool,
    /// Also reclaim space during optimize (default false, as the original).
    pub vacuum: bool,
    /// Stage to resume at (continuations).
    pub stage: Stage,
    /// What earlier parts of the run produced (continuations).
    pub partial: Option<FullReport>,
}

impl FullParams {
    /// Refuses impossible combinations.
    pub fn validate(&self) -> Result<(), OpError> {
        self.cleanup.validate()?;
        self.health.validate()?;
        Ok(())
    }
}

/// The one summary of a run, with the original's keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// `completed`, or `completed_with_errors`.
    pub status: String,
    /// What was changed (or, in a dry run, what would be).
    pub actions_taken: Vec<String>,
    /// What needs attention.
    pub issues_found: Vec<String>,
    /// The health report's recommendations.
    pub recommendations: Vec<String>,
}

/// The report of a full-maintenance run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FullReport {
    /// When the run started (UTC).
    pub timestamp: Option<DateTime<Utc>>,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Cleanup report (merged over the run's parts; counts only in a dry run).
    pub cleanup: Option<CleanupReport>,
    /// Index creation (a list only in a dry run).
    pub indexes: Option<IndexReport>,
    /// Optimization (absent in a dry run, where `planned_optimizations` says what would run).
    pub optimization: Option<OptimizeReport>,
    /// Statements optimize would run, in a dry run.
    pub planned_optimizations: Vec<String>,
    /// The health report.
    pub analytics: Option<HealthReport>,
    /// The summary.
    pub summary: Summary,
    /// Errors of individual stages, each prefixed with its stage: a stage that failed, or
    /// the index builds and optimize statements that failed within one (the run goes on
    /// past them; the summary's status is then `completed_with_errors`).
    pub errors: Vec<String>,
}

impl FullReport {
    /// Rows deleted by the cleanup stage.
    pub fn rows_deleted(&self) -> u64 {
        self.cleanup
            .as_ref()
            .map_or(0, |c| if c.dry_run { 0 } else { c.total_cleaned() })
    }

    /// Text in the original's layout ("Session Maintenance Results").
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        s.push_str(if self.dry_run {
            "Session Maintenance Results (dry run)\n"
        } else {
            "Session Maintenance Results\n"
        });
        s.push_str(&"=".repeat(40));
        s.push('\n');
        s.push_str(&format!("Status: {}\n", self.summary.status));
        for (title, items) in [
            ("Actions Taken", &self.summary.actions_taken),
            ("Issues Found", &self.summary.issues_found),
            ("Recommendations", &self.summary.recommendations),
        ] {
            if !items.is_empty() {
                s.push_str(&format!("\n{title}:\n"));
                for i in items {
                    s.push_str(&format!("  - {i}\n"));
                }
            }
        }
        if !self.errors.is_empty() {
            s.push_str("\nErrors:\n");
            for e in &self.errors {
                s.push_str(&format!("  - {e}\n"));
            }
        }
        s
    }
}

/// What one part of a run produced.
#[derive(Debug, Clone)]
pub struct FullRun {
    /// The report so far (complete when `next` is `None`).
    pub report: FullReport,
    /// Parameters of the continuation, when the cleanup stage spent its budget, or a stage
    /// was cancelled or fenced out.
    pub next: Option<FullParams>,
    /// Why this part stopped.
    pub outcome: Outcome,
    /// Rows this part deleted (the report's figures are the run's so far).
    pub rows: u64,
}

/// Runs full maintenance from `p.stage` on.
pub async fn run(ctx: &OpContext, p: &FullParams) -> Result<FullRun, OpError> {
    p.validate()?;
    let mut report = p.partial.clone().unwrap_or_else(|| FullReport {
        timestamp: Some(Utc::now()),
        dry_run: p.dry_run,
        ..FullReport::default()
    });
    let mut stage = p.stage;
    let mut part_rows = 0;

    if stage == Stage::Cleanup {
        let mut cp = p.cleanup.clone();
        cp.dry_run = p.dry_run;
        // Later parts judge rows by the first part's reference time.
        if let Some(first) = &report.cleanup {
            cp.as_of = Some(first.as_of);
        }
        let part = cleanup::run(ctx, &cp).await?;
        if !part.dry_run {
            part_rows = part.total_cleaned();
        }
        let outcome = part.outcome;
        let continued = p.cleanup.continuation(&part);
        match &mut report.cleanup {
            Some(total) => total.merge(&part),
            None => report.cleanup = Some(part),
        }
        if outcome != Outcome::Completed {
            let rest = FullParams {
                cleanup: continued,
                ..p.clone()
            };
            return Ok(continue_at(
                &rest,
                Stage::Cleanup,
                report,
                outcome,
                part_rows,
            ));
        }
        stage = Stage::Indexes;
    }

    if stage == Stage::Indexes {
        // An earlier part's builds: they show as "already exists" now, and stay "created".
        let earlier = report.indexes.take();
        let with_earlier = |mut r: IndexReport| {
            if let Some(e) = &earlier {
                r.indexes_skipped.retain(|s| {
                    !e.indexes_created
                        .iter()
                        .any(|c| s.starts_with(&format!("{c} ")))
                });
                let mut created = e.indexes_created.clone();
                created.append(&mut r.indexes_created);
                r.indexes_created = created;
            }
            r
        };
        match maintenance::create_indexes(ctx, p.dry_run)
            .await
            .map(with_earlier)
        {
            // Cancelled part-way: the continuation builds the rest before going on.
            Ok(r) if r.cut_short() => {
                report.indexes = Some(r);
                return Ok(continue_at(p, stage, report, Outcome::Cancelled, part_rows));
            }
            Ok(r) => {
                report
                    .errors
                    .extend(stage_errors("create indexes", &r.errors));
                report.indexes = Some(r);
            }
            Err(e) if e.is_fenced_out() => {
                report.indexes = earlier;
                return Ok(fenced_out(p, stage, report, part_rows, &e));
            }
            Err(e) => {
                report.indexes = earlier;
                report.errors.push(format!("create indexes: {e}"));
            }
        }
        stage = Stage::Optimize;
    }
    if ctx.cancel.is_cancelled() {
        return Ok(continue_at(p, stage, report, Outcome::Cancelled, part_rows));
    }

    if stage == Stage::Optimize {
        if p.dry_run {
            report.planned_optimizations = planned_optimizations(ctx.db.engine(), p.vacuum);
        } else {
            match maintenance::optimize(ctx, p.vacuum).await {
                // Cancelled part-way: the continuation runs the step again before going on.
                Ok(r) if r.cut_short() => {
                    report.optimization = Some(r);
                    return Ok(continue_at(p, stage, report, Outcome::Cancelled, part_rows));
                }
                Ok(r) => {
                    report.errors.extend(stage_errors("optimize", &r.errors));
                    report.optimization = Some(r);
                }
                Err(e) if e.is_fenced_out() => {
                    return Ok(fenced_out(p, stage, report, part_rows, &e));
                }
                Err(e) => report.errors.push(format!("optimize: {e}")),
            }
        }
        stage = Stage::Report;
        // Cancelled while optimize ran its last statement: the health report is left to the
        // continuation, which starts there instead of building indexes and running optimize
        // (VACUUM, OPTIMIZE TABLE) again.
        if ctx.cancel.is_cancelled() {
            return Ok(continue_at(p, stage, report, Outcome::Cancelled, part_rows));
        }
    }

    // Health report, informed by what maintenance found still missing. It reads for a
    // minute on a large table, longer than a worker's shutdown timeout: a cancellation
    // gives it up on the spot (its statements cancelled on the server) and hands the stage
    // to a continuation, so a worker that stops does not leave the whole run to start over.
    let health_report = async {
        let mut health = p.health.clone();
        if let Ok(missing) = maintenance::missing_recommended_indexes(&ctx.db).await {
            let findings = health.findings.get_or_insert_with(DbFindings::default);
            // In a dry run the indexes were not built; report them as missing only for real
            // runs.
            if !p.dry_run {
                findings.missing_indexes = missing;
            }
        }
        analytics::health_report(&ctx.db, &health).await
    };
    // Boxed, as `analytics::run` boxes it: a large future.
    match analytics::until_cancelled(&ctx.cancel, Box::pin(health_report)).await {
        None => return Ok(continue_at(p, stage, report, Outcome::Cancelled, part_rows)),
        Some(Ok(h)) => report.analytics = Some(h),
        Some(Err(e)) => report.errors.push(format!("health report: {e}")),
    }
    report.summary = summarize(&report);
    Ok(FullRun {
        report,
        next: None,
        outcome: Outcome::Completed,
        rows: part_rows,
    })
}

/// The failures a stage reported and went on past (an index build, an optimize statement),
/// as errors of the run. Added once the stage is done: a stage cut short is run again, and
/// its failures with it.
fn stage_errors<'a>(stage: &'a str, errors: &'a [String]) -> impl Iterator<Item = String> + 'a {
    errors.iter().map(move |e| format!("{stage}: {e}"))
}

/// The report as the continuation's parameters carry it. The cleanup's outcome there says
/// only that the part stopped early (`cancelled`): workers of the previous release, still
/// running during a rolling upgrade, know no other early outcome and would refuse the
/// continuation's parameters. The part's own result keeps the precise outcome.
fn carried(report: &FullReport) -> FullReport {
    let mut carried = report.clone();
    if let Some(c) = &mut carried.cleanup
        && matches!(c.outcome, Outcome::FencedOut | Outcome::Interrupted)
    {
        c.outcome = Outcome::Cancelled;
    }
    carried
}

/// A part that a newer lease holder fenced out at `stage`: what it did so far stays in the
/// report carried to the continuation, which starts again at `stage` (a step refused by the
/// fence wrote nothing). Not an error of the run: the continuation finishes the stage.
fn fenced_out(p: &FullParams, stage: Stage, report: FullReport, rows: u64, e: &OpError) -> FullRun {
    tracing::warn!(error = %e, ?stage, "fenced out: a newer lease holder took over; this part stops here");
    continue_at(p, stage, report, Outcome::FencedOut, rows)
}

/// A part that stops early: the continuation resumes at `stage` with `report` so far.
fn continue_at(
    p: &FullParams,
    stage: Stage,
    report: FullReport,
    outcome: Outcome,
    rows: u64,
) -> FullRun {
    let next = FullParams {
        stage,
        partial: Some(carried(&report)),
        ..p.clone()
    };
    FullRun {
        report,
        next: Some(next),
        outcome,
        rows,
    }
}

/// What optimize would run, for a dry run (see `maintenance::optimize`).
fn planned_optimizations(engine: Engine, vacuum: bool) -> Vec<String> {
    let mut v: Vec<String> = match engine {
        Engine::Sqlite => vec!["ANALYZE <session tables>".into(), "PRAGMA optimize".into()],
        Engine::Postgres => vec!["ANALYZE <session tables>".into()],
        Engine::MySql => vec!["ANALYZE TABLE <session tables>".into()],
    };
    if vacuum {
        v.push(match engine {
            Engine::Sqlite => "VACUUM".into(),
            Engine::Postgres => "VACUUM (ANALYZE) <session tables>".into(),
            Engine::MySql => "OPTIMIZE TABLE <session tables>".into(),
        });
    }
    v
}

/// The summary rules of the original, with its bugs fixed.
pub fn summarize(r: &FullReport) -> Summary {
    let mut s = Summary::default();
    let would = if r.dry_run { "Would clean" } else { "Cleaned" };
    if let Some(c) = &r.cleanup {
        let expired = c.expired_sessions_cleaned;
        let orphaned = c.orphaned_sessions_cleaned;
        if expired > 0 {
            s.actions_taken
                .push(format!("{would} {expired} expired sessions"));
        }
        if orphaned > 0 {
            s.actions_taken
                .push(format!("{would} {orphaned} orphaned sessions"));
        }
        if let Some(n) = c.missing_platform_sessions.filter(|n| *n > 0) {
            s.issues_found.push(format!(
                "{n} sessions point at a missing platform connection (reported, not deleted)"
            ));
        }
    }
    if let Some(i) = r.indexes.as_ref().filter(|i| !i.indexes_created.is_empty()) {
        let verb = if r.dry_run { "Would create" } else { "Created" };
        s.actions_taken.push(format!(
            "{verb} {} database indexes",
            i.indexes_created.len()
        ));
    }
    if let Some(o) = r
        .optimization
        .as_ref()
        .filter(|o| !o.operations_performed.is_empty())
    {
        s.actions_taken.push(format!(
            "Optimized tables ({} statements)",
            o.operations_performed.len()
        ));
    }
    if !r.planned_optimizations.is_empty() {
        s.actions_taken.push(format!(
            "Would optimize tables ({} statements)",
            r.planned_optimizations.len()
        ));
    }
    if let Some(h) = &r.analytics {
        if h.health_status.overall_health != Health::Good {
            s.issues_found.push(format!(
                "Health status: {}",
                h.health_status.overall_health.name()
            ));
            s.issues_found
                .extend(h.health_status.issues.iter().cloned());
        }
        s.recommendations = h.recommendations.clone();
    }
    // The stages' own failures are in `r.errors` once `run` is done with them; a report
    // put together elsewhere may carry them only in the stage reports.
    let failed = !r.errors.is_empty()
        || r.indexes.as_ref().is_some_and(|i| !i.errors.is_empty())
        || r.optimization
            .as_ref()
            .is_some_and(|o| !o.errors.is_empty());
    if s.actions_taken.is_empty() && s.issues_found.is_empty() && !failed {
        s.actions_taken
            .push("No maintenance actions required".into());
    }
    s.status = if failed {
        "completed_with_errors".into()
    } else {
        "completed".into()
    };
    s
}

#[cfg(test)]
mod carried_tests {
    use super::*;

    /// The continuation's parameters name no outcome an older worker cannot read.
    #[test]
    fn continuations_carry_only_outcomes_older_workers_know() {
        for outcome in [Outcome::FencedOut, Outcome::Interrupted] {
            let mut cleanup = CleanupReport::new(Utc::now().naive_utc(), false);
            cleanup.outcome = outcome;
            let report = FullReport {
                cleanup: Some(cleanup),
                ..FullReport::default()
            };
            let json = serde_json::to_string(&carried(&report)).unwrap();
            assert!(json.contains(r#""outcome":"cancelled""#), "{json}");
            assert_eq!(
                report.cleanup.unwrap().outcome,
                outcome,
                "the part keeps its own"
            );
        }
    }
}
