//! Database maintenance of the session tables: analyze, recommended indexes, optimize,
//! integrity check and statistics (spec §3, `session_db_maintenance.py`).
//!
//! One submodule per step; inside each, the SQLite, PostgreSQL and MySQL/MariaDB SQL of the
//! same statement sit side by side. Deliberate fixes over the original (reference §2.3): the
//! index listing really lists indexes (with columns and uniqueness), sizes come from the
//! engine's catalog instead of "1 KiB per row", SQLite text datetimes are parsed, the
//! incremental vacuum runs only where `auto_vacuum` makes it do something, and the PostgreSQL
//! and MySQL variants exist at all.
//!
//! Safety: every statement runs under the engine's timeouts ([`LOCK_TIMEOUT`],
//! [`READ_STATEMENT_TIMEOUT`], [`MAINTENANCE_STATEMENT_TIMEOUT`], [`SQLITE_BUSY_TIMEOUT`]) so
//! maintenance never queues the application behind it for long. Mutating steps need the
//! fence: transactional statements run inside [`Fence::begin`](crate::fence::Fence::begin),
//! the others (`CREATE INDEX CONCURRENTLY`, `VACUUM`, `OPTIMIZE TABLE`) on a
//! [`SessionLock`](crate::fence::SessionLock) connection that checks the fence just before.

use serde::{Deserialize, Serialize};

use super::{OpContext, OpError};

mod analyze;
mod guard;
mod indexes;
mod integrity;
mod optimize;
mod stats;
mod times;

pub use analyze::{TableAnalysis, TableStats, analyze};
pub use guard::{
    LOCK_TIMEOUT, MAINTENANCE_STATEMENT_TIMEOUT, READ_STATEMENT_TIMEOUT, SQLITE_BUSY_TIMEOUT,
};
pub use indexes::{
    IndexInfo, IndexReport, IndexSpec, create_indexes, missing_recommended_indexes,
    recommended_indexes, table_indexes,
};
pub use integrity::{CheckStatus, IntegrityReport, integrity_check, integrity_check_url};
pub use optimize::{Operation, OptimizeReport, optimize};
pub use stats::{DbStatistics, PoolFigures, statistics};

/// Which maintenance step to run (one per CLI flag of the original).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceAction {
    /// `--analyze`: sizes, counts, indexes and recommendations. Read-only.
    Analyze,
    /// `--create-indexes`: create the recommended indexes that are missing (online builds).
    CreateIndexes,
    /// `--optimize [--vacuum]`: refresh planner statistics; with `vacuum`, reclaim space.
    Optimize {
        /// Also reclaim space (SQLite `VACUUM`, PostgreSQL plain `VACUUM (ANALYZE)`, MySQL
        /// `OPTIMIZE TABLE`). Default `false`.
        vacuum: bool,
    },
    /// `--integrity-check [--full]`: engine consistency checks plus orphaned foreign keys.
    IntegrityCheck {
        /// The thorough variant (SQLite `integrity_check` instead of `quick_check`, amcheck
        /// `heapallindexed`, MySQL `CHECK TABLE … EXTENDED`). Default `false`.
        full: bool,
    },
    /// `--stats`: database size, counts, pool figures and the table analysis. Read-only.
    Stats,
}

/// Parameters of a maintenance run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaintenanceParams {
    /// The step to run.
    pub action: MaintenanceAction,
    /// List what `CreateIndexes` would create, create nothing (needs no fence). Harmless for
    /// the read-only steps; refused for `Optimize`, which has no dry run. Default `false`.
    #[serde(default)]
    pub dry_run: bool,
}

impl MaintenanceParams {
    /// Refuses combinations that cannot mean what the caller expects.
    pub fn validate(&self) -> Result<(), OpError> {
        if self.dry_run && matches!(self.action, MaintenanceAction::Optimize { .. }) {
            return Err(OpError::Invalid(
                "--dry-run applies to --create-indexes only; --optimize would still change the database".into(),
            ));
        }
        Ok(())
    }
}

/// The result of one maintenance step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MaintenanceReport {
    /// From [`analyze`].
    Analysis(TableAnalysis),
    /// From [`create_indexes`].
    Indexes(IndexReport),
    /// From [`optimize`].
    Optimization(OptimizeReport),
    /// From [`integrity_check`].
    Integrity(IntegrityReport),
    /// From [`statistics`].
    Statistics(DbStatistics),
}

impl MaintenanceReport {
    /// Whether a cancellation (shutdown, lost lease) stopped an index build or optimize
    /// before its end: the job is continued, not called done.
    pub fn cut_short(&self) -> bool {
        match self {
            MaintenanceReport::Indexes(r) => r.cut_short(),
            MaintenanceReport::Optimization(r) => r.cut_short(),
            _ => false,
        }
    }

    /// The report in the original script's text layout.
    pub fn render_text(&self) -> String {
        match self {
            MaintenanceReport::Analysis(r) => r.render_text(),
            MaintenanceReport::Indexes(r) => r.render_text(),
            MaintenanceReport::Optimization(r) => r.render_text(),
            MaintenanceReport::Integrity(r) => r.render_text(),
            MaintenanceReport::Statistics(r) => r.render_text(),
        }
    }
}

/// Runs the step `p` names against `ctx.db`.
///
/// An index build or optimize statement that failed fails the step ([`OpError::Reported`],
/// naming each failure and what was done): the job is then retried and its exit code is 1,
/// as for any operation that ran and failed. Both steps are idempotent — indexes built stay
/// and count as present, statistics are refreshed again — so a retry repeats nothing harmful.
/// A step a cancellation cut short is not failed: its continuation runs the rest.
pub async fn run(ctx: &OpContext, p: &MaintenanceParams) -> Result<MaintenanceReport, OpError> {
    p.validate()?;
    Ok(match p.action {
        MaintenanceAction::Analyze => MaintenanceReport::Analysis(analyze(&ctx.db).await?),
        MaintenanceAction::CreateIndexes => {
            let r = create_indexes(ctx, p.dry_run).await?;
            if !r.errors.is_empty() && !r.cut_short() {
                return Err(step_failed(
                    "create indexes",
                    "index",
                    &r.errors,
                    &r.indexes_created,
                ));
            }
            MaintenanceReport::Indexes(r)
        }
        MaintenanceAction::Optimize { vacuum } => {
            let r = optimize(ctx, vacuum).await?;
            if !r.errors.is_empty() && !r.cut_short() {
                let ran: Vec<String> = r
                    .operations_performed
                    .iter()
                    .map(|o| o.statement.clone())
                    .collect();
                return Err(step_failed("optimize", "statement", &r.errors, &ran));
            }
            MaintenanceReport::Optimization(r)
        }
        MaintenanceAction::IntegrityCheck { full } => {
            MaintenanceReport::Integrity(integrity_check(&ctx.db, full).await?)
        }
        MaintenanceAction::Stats => MaintenanceReport::Statistics(statistics(&ctx.db).await?),
    })
}

/// The error of a step some of whose statements failed: each failure, and what was done.
fn step_failed(step: &str, what: &str, errors: &[String], done: &[String]) -> OpError {
    let failed = errors.len();
    let plural = if failed == 1 { "" } else { "s" };
    let done = if done.is_empty() {
        "nothing done".to_string()
    } else {
        format!("done: {}", done.join(", "))
    };
    OpError::Reported(format!(
        "{step}: {failed} {what}{plural} failed ({done}): {}",
        errors.join("; ")
    ))
}

/// The session-related tables a schema has: sessions, then users and platforms where present.
fn session_tables(schema: &crate::store::Schema) -> Vec<String> {
    let mut tables = vec![schema.sessions.table.clone()];
    tables.extend(schema.users.as_ref().map(|u| u.table.clone()));
    tables.extend(schema.platforms.as_ref().map(|p| p.table.clone()));
    tables
}

/// Appends one `  - item` line per entry under `title`, or nothing when `items` is empty.
fn push_section(out: &mut String, title: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    out.push_str(title);
    out.push('\n');
    for item in items {
        out.push_str("  - ");
        out.push_str(item);
        out.push('\n');
    }
}
