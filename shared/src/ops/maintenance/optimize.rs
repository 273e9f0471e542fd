//! Optimize: refresh the planner statistics of the session tables and, with `vacuum`,
//! reclaim space — online only (never PostgreSQL `VACUUM FULL`).
//!
//! | step | SQLite | PostgreSQL | MySQL / MariaDB |
//! |---|---|---|---|
//! | statistics | `ANALYZE t` + `PRAGMA optimize`, sampled (`analysis_limit`) | `ANALYZE t` | `ANALYZE TABLE t` |
//! | vacuum | `VACUUM` (+ `PRAGMA incremental_vacuum` if `auto_vacuum` = INCREMENTAL), then the WAL file cut back | `VACUUM (ANALYZE) t` | `OPTIMIZE TABLE t` |

use std::time::Instant;

use chrono::{NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::guard::{self, FencedConn, MAINTENANCE_STATEMENT_TIMEOUT, millis};
use super::{OpContext, OpError, push_section, session_tables};
use crate::ops::cleanup::{self, SQLITE_ANALYSIS_LIMIT};
use crate::store::{DbTx, Engine, mysql_row_errors, schema};

/// SQLite `PRAGMA auto_vacuum` value of INCREMENTAL mode.
const SQLITE_AUTO_VACUUM_INCREMENTAL: i64 = 2;

/// One statement that ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Operation {
    /// The statement as sent.
    pub statement: String,
    /// How long it took, in milliseconds.
    pub duration_ms: f64,
}

/// Result of [`optimize`], with the original's field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OptimizeReport {
    /// When the step started (UTC).
    pub timestamp: NaiveDateTime,
    /// Statements run, in order, with their durations.
    pub operations_performed: Vec<Operation>,
    /// Wall time of the whole step, in seconds.
    pub duration_seconds: f64,
    /// Statements skipped on purpose, and why.
    pub notes: Vec<String>,
    /// `Error during optimization: …` per failed statement.
    pub errors: Vec<String>,
    /// Statements a cancellation (shutdown, lost lease) stopped the step before: a
    /// continuation runs the step again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_for_later: Vec<String>,
}

impl OptimizeReport {
    /// The original's text layout.
    pub fn render_text(&self) -> String {
        let mut out = String::from("Optimization Results\n");
        out.push_str(&"=".repeat(25));
        out.push('\n');
        out.push_str(&format!("Duration: {:.2} seconds\n", self.duration_seconds));
        let ops: Vec<String> = self
            .operations_performed
            .iter()
            .map(|o| format!("{} ({:.1} ms)", o.statement, o.duration_ms))
            .collect();
        push_section(&mut out, "Operations:", &ops);
        push_section(&mut out, "Notes:", &self.notes);
        push_section(&mut out, "Errors:", &self.errors);
        push_section(
            &mut out,
            "Left for a continuation (cancelled):",
            &self.left_for_later,
        );
        out
    }

    /// Whether a cancellation stopped the step before every statement ran.
    pub fn cut_short(&self) -> bool {
        !self.left_for_later.is_empty()
    }

    /// Records the statements a cancellation stopped the step before.
    fn leave_for_later(&mut self, rest: &[&str]) {
        self.notes.push(format!(
            "cancelled (lease lost or shutting down) before: {}",
            rest.join("; ")
        ));
        self.left_for_later
            .extend(rest.iter().map(|s| s.to_string()));
    }

    /// Whether `statement` ran without an error.
    fn ran(&self, statement: &str) -> bool {
        self.operations_performed
            .iter()
            .any(|o| o.statement == statement)
    }

    fn record(&mut self, statement: &str, started: Instant) {
        self.operations_performed.push(Operation {
            statement: statement.to_string(),
            duration_ms: millis(started.elapsed()),
        });
    }
}

/// Refreshes planner statistics of the session-related tables; with `vacuum`, reclaims
/// space. Needs the fence; a stale token stops it before the next statement.
pub async fn optimize(ctx: &OpContext, vacuum: bool) -> Result<OptimizeReport, OpError> {
    let started = Instant::now();
    let db = &ctx.db;
    let fence = ctx.fence()?;
    let schema = schema::detect(db).await?;
    let tables = session_tables(&schema);
    let mut report = OptimizeReport {
        timestamp: Utc::now().naive_utc(),
        operations_performed: Vec::new(),
        duration_seconds: 0.0,
        notes: Vec::new(),
        errors: Vec::new(),
        left_for_later: Vec::new(),
    };
    match db.engine() {
        Engine::Sqlite => {
            let mut statements: Vec<String> =
                tables.iter().map(|t| format!("ANALYZE {t}")).collect();
            statements.push("PRAGMA optimize".into());
            if ctx.cancel.is_cancelled() {
                let mut rest: Vec<&str> = statements.iter().map(String::as_str).collect();
                rest.extend(vacuum.then_some("VACUUM"));
                report.leave_for_later(&rest);
            } else {
                sqlite_statistics(db, fence, &statements, &mut report).await?;
            }
            if vacuum && !report.cut_short() {
                // VACUUM cannot run in a transaction: a pinned connection checks the fence first.
                let auto_vacuum = db.scalar_i64("PRAGMA auto_vacuum").await?;
                let mut conn = FencedConn::open(db, fence, MAINTENANCE_STATEMENT_TIMEOUT).await?;
                let mut statements = Vec::new();
                if auto_vacuum == SQLITE_AUTO_VACUUM_INCREMENTAL {
                    statements.push("PRAGMA incremental_vacuum");
                } else {
                    report.notes.push(format!(
                        "PRAGMA incremental_vacuum skipped: auto_vacuum is {} (not INCREMENTAL), where it does nothing",
                        if auto_vacuum == 0 { "NONE" } else { "FULL" }
                    ));
                }
                statements.push("VACUUM");
                let result = run_fenced(&mut conn, &statements, &ctx.cancel, &mut report).await;
                conn.close().await;
                result?;
                if report.ran("VACUUM") {
                    cut_back_wal(db, fence, &mut report).await?;
                }
            }
        }
        Engine::Postgres | Engine::MySql => {
            let statements: Vec<String> = tables
                .iter()
                .map(|t| match (db.engine(), vacuum) {
                    (Engine::Postgres, false) => format!("ANALYZE {t}"),
                    // Plain VACUUM: marks dead rows reusable without an exclusive lock.
                    (Engine::Postgres, true) => format!("VACUUM (ANALYZE) {t}"),
                    (_, false) => format!("ANALYZE TABLE {t}"),
                    // InnoDB: "recreate + analyze", an online rebuild that returns free space.
                    (_, true) => format!("OPTIMIZE TABLE {t}"),
                })
                .collect();
            let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
            let mut conn = FencedConn::open(db, fence, MAINTENANCE_STATEMENT_TIMEOUT).await?;
            let result = run_fenced(&mut conn, &statements, &ctx.cancel, &mut report).await;
            conn.close().await;
            result?;
        }
    }
    report.duration_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// SQLite: `ANALYZE` and `PRAGMA optimize` are transactional, so they run in one fenced
/// write transaction, holding the write lock: the application's writers wait for it at most
/// their busy timeout, then fail. `analysis_limit` makes each index's figures come from
/// a sample of [`SQLITE_ANALYSIS_LIMIT`] rows (as the cleanup's refresh does): a full
/// `ANALYZE` held the lock ~1 s per million sessions. The pragma belongs to the connection,
/// so this runs on a [`ScopedConnection`](crate::store::ScopedConnection), closed afterwards.
async fn sqlite_statistics(
    db: &crate::store::Db,
    fence: &crate::fence::Fence,
    statements: &[String],
    report: &mut OptimizeReport,
) -> Result<(), OpError> {
    let mut conn = db.scoped_connection().await?;
    let mut tx = conn.begin_write().await?;
    let limited = run_in_tx(
        &mut tx,
        &format!("PRAGMA analysis_limit = {SQLITE_ANALYSIS_LIMIT}"),
    )
    .await;
    if let Err(e) = limited {
        let _ = tx.rollback().await;
        return Err(e.into());
    }
    if let Err(e) = fence.advance(&mut tx).await {
        let _ = tx.rollback().await;
        return Err(e.into());
    }
    for stmt in statements {
        let t0 = Instant::now();
        match run_in_tx(&mut tx, stmt).await {
            Ok(()) => report.record(stmt, t0),
            Err(e) => report
                .errors
                .push(format!("Error during optimization: {stmt}: {e}")),
        }
    }
    tx.commit().await?;
    Ok(())
}

/// SQLite in WAL mode: `VACUUM` writes the whole compacted database into the WAL, and SQLite
/// keeps the WAL file at its longest, so the file system got back nothing (the database file
/// shrank by what the WAL grew). Cut it back as the cleanup does after a purge: fenced writes
/// that each cut a slice, never waiting for the application's readers. The vacuum itself is
/// done either way: what is left, or a failure, is a note (every cleanup ends with the same
/// cut-back), not a failure of the step that would have it retried. A newer lease holder
/// stops the step.
async fn cut_back_wal(
    db: &crate::store::Db,
    fence: &crate::fence::Fence,
    report: &mut OptimizeReport,
) -> Result<(), OpError> {
    let note = match cleanup::cut_back(db, fence).await {
        Ok(None) => return Ok(()),
        Ok(Some(cut)) if cut.after <= cleanup::SQLITE_WAL_FILE_TARGET => format!(
            "WAL file cut back from {} to {} bytes after VACUUM",
            cut.before, cut.after
        ),
        Ok(Some(cut)) => format!(
            "WAL file left at {} bytes after VACUUM (from {}): readers kept it in use; the next cleanup cuts it back",
            cut.after, cut.before
        ),
        Err(e) if e.is_fenced_out() => return Err(e),
        Err(e) => {
            format!("WAL file not cut back after VACUUM ({e}): the next cleanup cuts it back")
        }
    };
    report.notes.push(note);
    Ok(())
}

async fn run_in_tx(tx: &mut DbTx<'_>, stmt: &str) -> Result<(), sqlx::Error> {
    let sql = tx.sql(stmt.to_string());
    crate::on_tx!(tx, c => { sqlx::query(sql).execute(&mut *c).await?; });
    Ok(())
}

/// Runs statements on the fenced connection. MySQL's table-maintenance statements report
/// failures as result rows (`Msg_type` = `error`), so their rows are read, not discarded.
/// A cancellation (a lost lease, a shutdown) stops it before the next statement: each may
/// take long (a `VACUUM` or `OPTIMIZE TABLE` of a large table), and the lease is gone.
async fn run_fenced(
    conn: &mut FencedConn,
    statements: &[&str],
    cancel: &crate::CancellationToken,
    report: &mut OptimizeReport,
) -> Result<(), OpError> {
    for (i, stmt) in statements.iter().enumerate() {
        if cancel.is_cancelled() {
            report.leave_for_later(&statements[i..]);
            break;
        }
        let t0 = Instant::now();
        let outcome = if conn.engine() == Engine::MySql {
            conn.rows(stmt)
                .await
                .map(|(rows, _)| mysql_row_errors(&rows))
        } else {
            conn.run(stmt).await.map(|_| Vec::new())
        };
        match outcome {
            Ok(errors) if errors.is_empty() => report.record(stmt, t0),
            Ok(errors) => {
                for e in errors {
                    report
                        .errors
                        .push(format!("Error during optimization: {stmt}: {e}"));
                }
            }
            Err(e) if guard::is_fatal(&e) => return Err(e.into()),
            Err(e) => report
                .errors
                .push(format!("Error during optimization: {stmt}: {e}")),
        }
    }
    Ok(())
}
