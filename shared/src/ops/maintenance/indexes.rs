//! The recommended indexes of the session table: which exist (by name or by equivalent
//! leading columns), and building the missing ones online.
//!
//! Builds never lock the application out: PostgreSQL `CREATE INDEX CONCURRENTLY`, MySQL /
//! MariaDB `ALTER TABLE … ADD INDEX …, ALGORITHM=INPLACE, LOCK=NONE` (both on a fenced
//! session-lock connection, since neither runs in a transaction), SQLite a plain
//! `CREATE INDEX` inside a fenced write transaction. A PostgreSQL index left INVALID by an
//! interrupted concurrent build is detected, reported and rebuilt.

use std::collections::BTreeMap;

use chrono::{NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::guard::{self, FencedConn, MAINTENANCE_STATEMENT_TIMEOUT};
use super::{OpContext, OpError, push_section};
use crate::store::{Db, DbTx, Engine, Schema, schema};

/// An index the maintenance step recommends for the session table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSpec {
    /// Index name (`ix_<table>_<purpose>`, the reference's naming).
    pub name: String,
    /// Table it belongs to.
    pub table: String,
    /// Indexed columns, in order.
    pub columns: Vec<String>,
    /// Which query needs it.
    pub reason: String,
}

/// An index present in the database, from the engine's catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexInfo {
    /// Index name.
    pub name: String,
    /// Indexed columns in order (`<expression>` for an expression column).
    pub columns: Vec<String>,
    /// Whether it enforces uniqueness.
    pub unique: bool,
    /// False for a PostgreSQL index left INVALID by an interrupted concurrent build; such an
    /// index is maintained on writes but never used by queries.
    pub valid: bool,
    /// A partial index (`WHERE …`, PostgreSQL and SQLite): it serves only queries whose
    /// condition implies its own, so it does not stand in for a full index on its columns.
    #[serde(default)]
    pub partial: bool,
}

/// Result of [`create_indexes`], with the original's field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexReport {
    /// When the step ran (UTC).
    pub timestamp: NaiveDateTime,
    /// True when nothing was created.
    pub dry_run: bool,
    /// Created indexes (`<name>`), or in a dry run `<name> (would create)`.
    pub indexes_created: Vec<String>,
    /// Present already: `<name> (already exists)`, or `… (already exists as <other>)` when an
    /// index under another name has the same leading columns.
    pub indexes_skipped: Vec<String>,
    /// Invalid leftovers of interrupted builds that were found (and, unless dry run, rebuilt).
    pub invalid_indexes: Vec<String>,
    /// `Error creating index <name>: …` per failure.
    pub errors: Vec<String>,
    /// Indexes a cancellation (shutdown, lost lease) left unbuilt: a continuation builds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_for_later: Vec<String>,
}

impl IndexReport {
    /// Whether a cancellation stopped the step before every index was built.
    pub fn cut_short(&self) -> bool {
        !self.left_for_later.is_empty()
    }
}

impl IndexReport {
    /// The original's text layout.
    pub fn render_text(&self) -> String {
        let mut out = String::from("Index Creation Results\n");
        out.push_str(&"=".repeat(30));
        out.push('\n');
        push_section(&mut out, "Created/Would Create:", &self.indexes_created);
        push_section(&mut out, "Skipped:", &self.indexes_skipped);
        push_section(
            &mut out,
            "Invalid (interrupted builds):",
            &self.invalid_indexes,
        );
        push_section(&mut out, "Errors:", &self.errors);
        push_section(
            &mut out,
            "Left for a continuation (cancelled):",
            &self.left_for_later,
        );
        out
    }
}

/// The indexes the session table should have, built from the schema's column roles: the
/// original's four plus what the v2 schema and sessionfleet's cleanup and analytics need.
pub fn recommended_indexes(schema: &Schema) -> Vec<IndexSpec> {
    let s = &schema.sessions;
    let spec = |suffix: &str, columns: Vec<&String>, reason: &str| IndexSpec {
        name: format!("ix_{}_{suffix}", s.table),
        table: s.table.clone(),
        columns: columns.into_iter().cloned().collect(),
        reason: reason.to_string(),
    };
    let mut v = vec![
        spec(
            "session_id",
            vec![&s.session_key],
            "every request looks its session up by key",
        ),
        spec(
            "user_id",
            vec![&s.user_id],
            "per-user session lists and orphan checks",
        ),
        spec(
            "updated_at",
            vec![&s.updated_at],
            "v1 idle-timeout cleanup and activity analytics",
        ),
        // Written once per session and appended at the index's end, so cheap to keep.
        spec(
            "created_at",
            vec![&s.created_at],
            "creation rates and per-day creation trends without reading every row",
        ),
    ];
    if let Some(platform) = &s.platform_id {
        v.push(spec(
            "user_platform",
            vec![&s.user_id, platform],
            "per-user platform context lookups",
        ));
    }
    if let Some(expires) = &s.expires_at {
        v.push(spec(
            "expires_at",
            vec![expires],
            "expiry cleanup (expires_at < now) in batches",
        ));
    }
    if let Some(last) = &s.last_activity {
        v.push(spec(
            "last_activity",
            vec![last],
            "idle detection and activity analytics",
        ));
    }
    if let Some(active) = &s.is_active {
        v.push(spec(
            "is_active",
            vec![active],
            "active-session counts and deactivated-session cleanup",
        ));
    }
    // The health report's per-platform and per-user steps, read from the index alone. Both
    // index columns the application rarely changes; a `(user, last activity)` index would
    // speed the 24-hour diversity step too, but costs an index update on every request that
    // touches a session, so it is left out.
    if let Some(platform) = &s.platform_id {
        v.push(spec(
            "platform",
            vec![platform],
            "sessions per platform (distribution and missing platforms) without reading rows",
        ));
    }
    if let (Some(active), Some(expires)) = (&s.is_active, &s.expires_at) {
        v.push(spec(
            "user_active",
            vec![&s.user_id, active, expires],
            "per-user active-session counts (concurrent-session limit) without reading rows",
        ));
    }
    v
}

/// Names of the recommended indexes that are absent or invalid (for alerts).
pub async fn missing_recommended_indexes(db: &Db) -> Result<Vec<String>, OpError> {
    let schema = schema::detect(db).await?;
    let present = table_indexes(db, &schema.sessions.table).await?;
    Ok(missing_from(&schema, &present)
        .into_iter()
        .map(|spec| spec.name)
        .collect())
}

/// The recommended indexes that `present` lacks: absent, or present but invalid.
pub(super) fn missing_from(schema: &Schema, present: &[IndexInfo]) -> Vec<IndexSpec> {
    recommended_indexes(schema)
        .into_iter()
        .filter(|spec| !matches!(plan(spec, present), Plan::Skip(_)))
        .collect()
}

/// The indexes of `table` with their columns in order, uniqueness and validity.
pub async fn table_indexes(db: &Db, table: &str) -> Result<Vec<IndexInfo>, OpError> {
    // One row per (index, column), ordered by index then column position: name, unique,
    // column, valid, partial.
    let sql = match db.engine() {
        Engine::Sqlite => {
            "SELECT il.name, il.\"unique\", COALESCE(ii.name, '<expression>'), 1, il.partial \
             FROM pragma_index_list(?) AS il JOIN pragma_index_info(il.name) AS ii \
             ORDER BY il.name, ii.seqno"
        }
        Engine::Postgres => {
            "SELECT ic.relname::text, (CASE WHEN i.indisunique THEN 1 ELSE 0 END)::int8, \
                    COALESCE(a.attname::text, '<expression>'), (CASE WHEN i.indisvalid THEN 1 ELSE 0 END)::int8, \
                    (CASE WHEN i.indpred IS NULL THEN 0 ELSE 1 END)::int8 \
             FROM pg_index i \
             JOIN pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_class t ON t.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = t.relnamespace \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum AND k.attnum > 0 \
             WHERE t.relname = ? AND n.nspname = current_schema() AND k.ord <= i.indnkeyatts \
             ORDER BY ic.relname, k.ord"
        }
        Engine::MySql => {
            "SELECT index_name, CASE WHEN non_unique = 0 THEN 1 ELSE 0 END, \
                    COALESCE(column_name, '<expression>'), 1, 0 \
             FROM information_schema.statistics \
             WHERE table_schema = DATABASE() AND table_name = ? \
             ORDER BY index_name, seq_in_index"
        }
    };
    let rows: Vec<(String, i64, String, i64, i64)> = crate::on_pool!(db, p => {
        sqlx::query(db.sql(sql)).bind(table).fetch_all(p).await?
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?, r.try_get::<String, _>(2)?, r.try_get::<i64, _>(3)?, r.try_get::<i64, _>(4)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()?
    });
    let mut by_name: BTreeMap<String, IndexInfo> = BTreeMap::new();
    for (name, unique, column, valid, partial) in rows {
        by_name
            .entry(name.clone())
            .or_insert_with(|| IndexInfo {
                name,
                columns: Vec::new(),
                unique: unique != 0,
                valid: valid != 0,
                partial: partial != 0,
            })
            .columns
            .push(column);
    }
    Ok(by_name.into_values().collect())
}

/// What to do about one recommended index.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Present and valid; the text is the `indexes_skipped` entry.
    Skip(String),
    /// Absent: build it.
    Create,
    /// Present under its name but INVALID (PostgreSQL): drop and build again.
    Rebuild,
}

/// Present by name, or by a full index under another name whose leading columns are the
/// spec's (a `(user_id, platform)` index serves `user_id` lookups as well as a `(user_id)`
/// one; a partial index serves only some).
fn plan(spec: &IndexSpec, present: &[IndexInfo]) -> Plan {
    if let Some(ix) = present
        .iter()
        .find(|ix| ix.name.eq_ignore_ascii_case(&spec.name))
    {
        return if ix.valid {
            Plan::Skip(format!("{} (already exists)", spec.name))
        } else {
            Plan::Rebuild
        };
    }
    let covers = |ix: &&IndexInfo| {
        ix.valid
            && !ix.partial
            && ix.columns.len() >= spec.columns.len()
            && spec
                .columns
                .iter()
                .zip(&ix.columns)
                .all(|(want, have)| want.eq_ignore_ascii_case(have))
    };
    match present.iter().find(covers) {
        Some(ix) => Plan::Skip(format!("{} (already exists as {})", spec.name, ix.name)),
        None => Plan::Create,
    }
}

/// Creates the missing recommended indexes online; with `dry_run`, only lists them.
///
/// Idempotent: a second run finds everything present and creates nothing. Fenced: a stale
/// token stops the step before the next statement ([`OpError::Fence`]).
pub async fn create_indexes(ctx: &OpContext, dry_run: bool) -> Result<IndexReport, OpError> {
    let db = &ctx.db;
    let schema = schema::detect(db).await?;
    let present = table_indexes(db, &schema.sessions.table).await?;
    let mut report = IndexReport {
        timestamp: Utc::now().naive_utc(),
        dry_run,
        indexes_created: Vec::new(),
        indexes_skipped: Vec::new(),
        invalid_indexes: Vec::new(),
        left_for_later: Vec::new(),
        errors: Vec::new(),
    };
    let mut work = Vec::new();
    for spec in recommended_indexes(&schema) {
        match plan(&spec, &present) {
            Plan::Skip(line) => report.indexes_skipped.push(line),
            Plan::Create => work.push((spec, false)),
            Plan::Rebuild => {
                report.invalid_indexes.push(format!(
                    "{} (INVALID: left by an interrupted concurrent build; {})",
                    spec.name,
                    if dry_run {
                        "would rebuild"
                    } else {
                        "rebuilding"
                    }
                ));
                work.push((spec, true));
            }
        }
    }
    if dry_run {
        report.indexes_created = work
            .iter()
            .map(|(s, _)| format!("{} (would create)", s.name))
            .collect();
        return Ok(report);
    }
    if work.is_empty() {
        return Ok(report);
    }
    let fence = ctx.fence()?;
    match db.engine() {
        Engine::Sqlite => {
            for (i, (spec, _)) in work.iter().enumerate() {
                if ctx.cancel.is_cancelled() {
                    leave_for_later(&mut report, &work[i..]);
                    break;
                }
                let mut tx = fence.begin(db).await?;
                match create_in_tx(&mut tx, spec).await {
                    Ok(()) => {
                        tx.commit().await?;
                        report.indexes_created.push(spec.name.clone());
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        report
                            .errors
                            .push(format!("Error creating index {}: {e}", spec.name));
                    }
                }
            }
        }
        Engine::Postgres | Engine::MySql => {
            let mut conn = FencedConn::open(db, fence, MAINTENANCE_STATEMENT_TIMEOUT).await?;
            let result = build_online(ctx, &mut conn, &work, &mut report).await;
            conn.close().await;
            result?;
        }
    }
    Ok(report)
}

/// PostgreSQL `lock_timeout` of concurrent index builds and drops: none (0); the
/// maintenance statement timeout bounds them.
const CONCURRENT_BUILD_LOCK_TIMEOUT_MS: u64 = 0;

/// Records the builds a cancellation stopped before.
fn leave_for_later(report: &mut IndexReport, rest: &[(IndexSpec, bool)]) {
    report
        .left_for_later
        .extend(rest.iter().map(|(spec, _)| spec.name.clone()));
}

/// SQLite: a plain build inside the fenced transaction (SQLite has no online build; the write
/// lock is held for the build, bounded for the application by its busy timeout).
async fn create_in_tx(tx: &mut DbTx<'_>, spec: &IndexSpec) -> Result<(), sqlx::Error> {
    let busy = tx.sql(format!(
        "PRAGMA busy_timeout = {}",
        guard::SQLITE_BUSY_TIMEOUT.as_millis()
    ));
    let create = tx.sql(format!(
        "CREATE INDEX IF NOT EXISTS {} ON {} ({})",
        spec.name,
        spec.table,
        spec.columns.join(", ")
    ));
    crate::on_tx!(tx, c => {
        sqlx::query(busy).execute(&mut *c).await?;
        sqlx::query(create).execute(&mut *c).await?;
    });
    Ok(())
}

/// PostgreSQL and MySQL: online builds on the fenced session-lock connection.
async fn build_online(
    ctx: &OpContext,
    conn: &mut FencedConn,
    work: &[(IndexSpec, bool)],
    report: &mut IndexReport,
) -> Result<(), OpError> {
    let engine = ctx.db.engine();
    if engine == Engine::Postgres {
        // A concurrent build or drop waits for every transaction older than it, which
        // `lock_timeout` would cut after a few seconds (one long report or pg_dump, and the
        // index is never built). Its waits block no application query (its table lock
        // conflicts with no reads or writes), so only the statement timeout bounds them.
        conn.run(&format!(
            "SET lock_timeout = {CONCURRENT_BUILD_LOCK_TIMEOUT_MS}"
        ))
        .await?;
    }
    for (i, (spec, rebuild)) in work.iter().enumerate() {
        if ctx.cancel.is_cancelled() {
            leave_for_later(report, &work[i..]);
            break;
        }
        let columns = spec.columns.join(", ");
        let (drop_invalid, create) = match engine {
            Engine::Postgres => (
                format!("DROP INDEX CONCURRENTLY IF EXISTS {}", spec.name),
                format!(
                    "CREATE INDEX CONCURRENTLY {} ON {} ({columns})",
                    spec.name, spec.table
                ),
            ),
            // MySQL has no invalid indexes: a failed build leaves nothing behind.
            _ => (
                String::new(),
                format!(
                    "ALTER TABLE {} ADD INDEX {} ({columns}), ALGORITHM=INPLACE, LOCK=NONE",
                    spec.table, spec.name
                ),
            ),
        };
        if *rebuild
            && !drop_invalid.is_empty()
            && let Err(e) = conn.run(&drop_invalid).await
        {
            if guard::is_fatal(&e) {
                return Err(e.into());
            }
            report
                .errors
                .push(format!("Error dropping invalid index {}: {e}", spec.name));
            continue;
        }
        match conn.run(&create).await {
            Ok(_) => report.indexes_created.push(spec.name.clone()),
            Err(e) if guard::is_fatal(&e) => return Err(e.into()),
            Err(e) => {
                report
                    .errors
                    .push(format!("Error creating index {}: {e}", spec.name));
                if engine == Engine::Postgres {
                    drop_failed_build(ctx, conn, spec, report).await?;
                }
            }
        }
    }
    Ok(())
}

/// A failed `CREATE INDEX CONCURRENTLY` (lock timeout, cancelled, duplicate data) leaves an
/// INVALID index that slows every write; drop it now rather than leave it to the next run.
/// Only an index the catalog shows as invalid is dropped, never a valid one.
async fn drop_failed_build(
    ctx: &OpContext,
    conn: &mut FencedConn,
    spec: &IndexSpec,
    report: &mut IndexReport,
) -> Result<(), OpError> {
    let present = table_indexes(&ctx.db, &spec.table).await?;
    if present.iter().any(|ix| ix.name == spec.name && !ix.valid) {
        match conn
            .run(&format!("DROP INDEX CONCURRENTLY IF EXISTS {}", spec.name))
            .await
        {
            Ok(_) => {}
            Err(e) if guard::is_fatal(&e) => return Err(e.into()),
            Err(e) => report.errors.push(format!(
                "Error dropping the invalid leftover of {}: {e}",
                spec.name
            )),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ix(name: &str, cols: &[&str], valid: bool) -> IndexInfo {
        IndexInfo {
            name: name.into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            unique: false,
            valid,
            partial: false,
        }
    }

    fn spec(name: &str, cols: &[&str]) -> IndexSpec {
        IndexSpec {
            name: name.into(),
            table: "user_sessions".into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            reason: String::new(),
        }
    }

    #[test]
    fn an_index_with_the_same_leading_columns_counts_as_present() {
        let present = [ix("user_id", &["user_id", "active_platform_id"], true)];
        assert_eq!(
            plan(&spec("ix_user_sessions_user_id", &["user_id"]), &present),
            Plan::Skip("ix_user_sessions_user_id (already exists as user_id)".into())
        );
        assert_eq!(
            plan(&spec("ix_x", &["active_platform_id"]), &present),
            Plan::Create
        );
    }

    #[test]
    fn a_partial_index_does_not_stand_in_for_a_full_one() {
        let present = [IndexInfo {
            partial: true,
            ..ix("active_expiry", &["expires_at"], true)
        }];
        assert_eq!(
            plan(
                &spec("ix_user_sessions_expires_at", &["expires_at"]),
                &present
            ),
            Plan::Create
        );
    }

    #[test]
    fn an_invalid_index_is_rebuilt_and_covers_nothing() {
        let present = [ix(
            "ix_user_sessions_user_platform",
            &["user_id", "active_platform_id"],
            false,
        )];
        assert_eq!(
            plan(
                &spec(
                    "ix_user_sessions_user_platform",
                    &["user_id", "active_platform_id"]
                ),
                &present
            ),
            Plan::Rebuild
        );
        assert_eq!(
            plan(&spec("ix_user_sessions_user_id", &["user_id"]), &present),
            Plan::Create
        );
    }
}
