//! Integrity check: the engine's own consistency check plus the session foreign keys.
//!
//! | check | SQLite | PostgreSQL | MySQL / MariaDB |
//! |---|---|---|---|
//! | storage | `PRAGMA quick_check` (full: `integrity_check`) | amcheck `bt_index_check` on the B-tree indexes (full: `heapallindexed`) | `CHECK TABLE` (full: `EXTENDED`) |
//! | foreign keys | `PRAGMA foreign_key_check` | orphan queries | orphan queries |
//!
//! A check that cannot run says `unavailable` with the reason; it never reports a pass it
//! did not earn. A database that cannot be read at all is `failed`, not an error.

use chrono::{NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::guard::read_tx;
use super::{OpError, push_section, session_tables};
use crate::store::{ConnectOptions, Db, DbTx, Engine, Schema, mysql_row_errors, schema};

/// At most this many problems of one kind are listed one by one; the rest are summed up.
pub const MAX_LISTED_ISSUES: usize = 20;

/// How an issue line of the storage check starts (the original's wording).
const CORRUPTION_PREFIX: &str = "Integrity check failed: ";

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// The check ran and found nothing.
    Passed,
    /// The check ran and found problems, or the database could not be read.
    Failed,
    /// The check could not run (missing extension, missing table); see `issues_found`.
    Unavailable,
}

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckStatus::Passed => "passed",
            CheckStatus::Failed => "failed",
            CheckStatus::Unavailable => "unavailable",
        })
    }
}

/// Result of [`integrity_check`], with the original's field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrityReport {
    /// When the check ran (UTC).
    pub timestamp: NaiveDateTime,
    /// Storage / index consistency.
    pub integrity_check: CheckStatus,
    /// Session foreign keys (sessions → users, sessions → platforms).
    pub foreign_key_check: CheckStatus,
    /// The checks that ran, as statements or descriptions.
    pub checks_run: Vec<String>,
    /// Problems found, and checks that could not run, one line each.
    pub issues_found: Vec<String>,
    /// What to do about them.
    pub recommendations: Vec<String>,
}

impl IntegrityReport {
    fn new() -> IntegrityReport {
        IntegrityReport {
            timestamp: Utc::now().naive_utc(),
            integrity_check: CheckStatus::Unavailable,
            foreign_key_check: CheckStatus::Unavailable,
            checks_run: Vec::new(),
            issues_found: Vec::new(),
            recommendations: Vec::new(),
        }
    }

    /// The original's text layout.
    pub fn render_text(&self) -> String {
        let mut out = String::from("Database Integrity Check\n");
        out.push_str(&"=".repeat(30));
        out.push('\n');
        out.push_str(&format!("Integrity Check: {}\n", self.integrity_check));
        out.push_str(&format!("Foreign Key Check: {}\n", self.foreign_key_check));
        push_section(&mut out, "Issues Found:", &self.issues_found);
        push_section(&mut out, "Recommendations:", &self.recommendations);
        out
    }

    /// Storage check failed; `why` becomes an issue line.
    fn corrupt(&mut self, why: impl std::fmt::Display) {
        self.integrity_check = CheckStatus::Failed;
        self.issues_found.push(format!("{CORRUPTION_PREFIX}{why}"));
    }

    /// What the storage check found wrong, one line each; empty unless it failed. Foreign-key
    /// findings are left out: sessions of a missing user are the cleanup's orphans, not
    /// corruption.
    pub fn storage_failures(&self) -> Vec<String> {
        if self.integrity_check != CheckStatus::Failed {
            return Vec::new();
        }
        let found: Vec<String> = self
            .issues_found
            .iter()
            .filter_map(|i| i.strip_prefix(CORRUPTION_PREFIX))
            .map(str::to_string)
            .collect();
        if found.is_empty() {
            vec!["the storage check failed".into()]
        } else {
            found
        }
    }

    fn recommend(&mut self) {
        let r = &mut self.recommendations;
        if self.integrity_check == CheckStatus::Failed {
            r.push("Database corruption detected - consider backup and restore".into());
        }
        if self.foreign_key_check == CheckStatus::Failed {
            r.push("Foreign key violations found - review data consistency (the cleanup operation removes sessions of missing users)".into());
        }
        if self.integrity_check == CheckStatus::Unavailable {
            r.push("The storage check could not run - see the issues for what it needs".into());
        }
        if self.foreign_key_check == CheckStatus::Unavailable {
            r.push("The foreign-key check could not run - see the issues for what it needs".into());
        }
        if r.is_empty() {
            r.push("Database integrity is good".into());
        }
    }
}

/// Opens `url` and checks it. A SQLite file that cannot even be opened (garbage header, not
/// a database) gives a `failed` report; an unreachable server is an error, not corruption.
pub async fn integrity_check_url(url: &str, full: bool) -> Result<IntegrityReport, OpError> {
    let opts = ConnectOptions {
        attempts: 1,
        ..ConnectOptions::default()
    };
    match Db::connect(url, &opts).await {
        Ok(db) => {
            let report = integrity_check(&db, full).await;
            db.close().await;
            report
        }
        Err(e) if Engine::from_url(url).ok() == Some(Engine::Sqlite) => {
            let mut report = IntegrityReport::new();
            report.corrupt(format!("cannot open the database: {e}"));
            report.recommend();
            Ok(report)
        }
        Err(e) => Err(e.into()),
    }
}

/// Checks storage consistency and the session foreign keys. Read-only, except that on
/// PostgreSQL it installs the `amcheck` extension when it is missing and allowed.
pub async fn integrity_check(db: &Db, full: bool) -> Result<IntegrityReport, OpError> {
    let mut report = IntegrityReport::new();
    match db.engine() {
        Engine::Sqlite => sqlite_checks(db, full, &mut report).await,
        Engine::Postgres | Engine::MySql => {
            let schema = schema::detect(db).await?;
            if db.engine() == Engine::Postgres {
                postgres_storage_check(db, &schema, full, &mut report).await?;
            } else {
                mysql_storage_check(db, &schema, full, &mut report).await?;
            }
            orphan_checks(db, &schema, &mut report).await?;
        }
    }
    report.recommend();
    Ok(report)
}

/// SQLite: any error reading the file is itself the finding ("database disk image is
/// malformed"), so errors become `failed`, never an `Err`.
async fn sqlite_checks(db: &Db, full: bool, report: &mut IntegrityReport) {
    let check = if full {
        format!("PRAGMA integrity_check({MAX_LISTED_ISSUES})")
    } else {
        format!("PRAGMA quick_check({MAX_LISTED_ISSUES})")
    };
    report.checks_run.push(check.clone());
    let mut conn = match db.scoped_connection().await {
        Ok(conn) => conn,
        Err(e) => {
            report.corrupt(format!("cannot read the database: {e}"));
            return;
        }
    };
    let mut tx = match read_tx(&mut conn).await {
        Ok(tx) => tx,
        Err(e) => {
            report.corrupt(format!("cannot read the database: {e}"));
            return;
        }
    };
    let DbTx::Sqlite(t) = &mut tx else { return };
    let c = &mut **t;
    match sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(check))
        .fetch_all(&mut *c)
        .await
    {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => {
            report.integrity_check = CheckStatus::Passed
        }
        Ok(rows) => {
            report.integrity_check = CheckStatus::Failed;
            report
                .issues_found
                .extend(rows.into_iter().map(|r| format!("{CORRUPTION_PREFIX}{r}")));
        }
        Err(e) => report.corrupt(e),
    }
    report.checks_run.push("PRAGMA foreign_key_check".into());
    match sqlx::query("PRAGMA foreign_key_check")
        .fetch_all(&mut *c)
        .await
    {
        Ok(rows) => {
            report.foreign_key_check = if rows.is_empty() {
                CheckStatus::Passed
            } else {
                CheckStatus::Failed
            };
            let total = rows.len();
            for r in rows.iter().take(MAX_LISTED_ISSUES) {
                let table: String = r.try_get(0).unwrap_or_default();
                let rowid: Option<i64> = r.try_get(1).ok().flatten();
                let parent: String = r.try_get(2).unwrap_or_default();
                report.issues_found.push(format!(
                    "Foreign key violation: {table} row {} references a missing row of {parent}",
                    rowid.map(|r| r.to_string()).unwrap_or_else(|| "?".into())
                ));
            }
            if total > MAX_LISTED_ISSUES {
                report.issues_found.push(format!(
                    "Foreign key violation: … and {} more",
                    total - MAX_LISTED_ISSUES
                ));
            }
        }
        Err(e) => {
            report.foreign_key_check = CheckStatus::Failed;
            report
                .issues_found
                .push(format!("Foreign key check failed: {e}"));
        }
    }
    let _ = tx.commit().await;
}

/// PostgreSQL: amcheck's `bt_index_check` on every valid B-tree index of the session tables
/// (AccessShareLock only, safe beside the application). amcheck proves corruption when it
/// finds some; a pass means "none found".
async fn postgres_storage_check(
    db: &Db,
    schema: &Schema,
    full: bool,
    report: &mut IntegrityReport,
) -> Result<(), OpError> {
    let installed = db
        .scalar_i64("SELECT COUNT(*) FROM pg_extension WHERE extname = 'amcheck'")
        .await?;
    if installed == 0 {
        // Needs CREATE privilege on the database (trusted extension since PostgreSQL 13) or a
        // superuser; without it the check is unavailable, not passed.
        if let Err(e) = db.execute("CREATE EXTENSION IF NOT EXISTS amcheck").await {
            report.issues_found.push(format!(
                "amcheck extension unavailable ({e}): B-tree checks not run - a superuser can run CREATE EXTENSION amcheck"
            ));
            return Ok(());
        }
    }
    let mut conn = db.scoped_connection().await?;
    let mut tx = read_tx(&mut conn).await?;
    let DbTx::Postgres(t) = &mut tx else {
        return Ok(());
    };
    let c = &mut **t;
    let mut checked = 0;
    let mut unchecked = 0;
    for table in session_tables(schema) {
        // `regclass` as text: the name quoted where it needs quotes ("Ix_Sessions"), which
        // the cast back below reads as written; a bare relname would be folded to lower case.
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT i.indexrelid::regclass::text FROM pg_index i \
             JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam \
             JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE t.relname = $1 AND n.nspname = current_schema() AND am.amname = 'btree' AND i.indisvalid \
             ORDER BY 1",
        )
        .bind(&table)
        .fetch_all(&mut *c)
        .await?;
        for index in indexes {
            // A savepoint per index: one corrupt index must not abort the checks of the others.
            sqlx::query("SAVEPOINT amcheck").execute(&mut *c).await?;
            let result =
                sqlx::query("SELECT bt_index_check(index => $1::regclass, heapallindexed => $2)")
                    .bind(&index)
                    .bind(full)
                    .execute(&mut *c)
                    .await;
            match result {
                Ok(_) => {
                    sqlx::query("RELEASE SAVEPOINT amcheck")
                        .execute(&mut *c)
                        .await?;
                    checked += 1;
                }
                Err(e) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT amcheck")
                        .execute(&mut *c)
                        .await?;
                    if is_corruption(&e) {
                        report.corrupt(format!("index {index}: {e}"));
                    } else {
                        // A lock or statement timeout, a cancellation: nothing is known.
                        unchecked += 1;
                        report
                            .issues_found
                            .push(format!("index {index} could not be checked: {e}"));
                    }
                }
            }
        }
    }
    tx.commit().await?;
    if unchecked > 0 && report.integrity_check != CheckStatus::Failed {
        report.integrity_check = CheckStatus::Unavailable;
        report.checks_run.push(format!(
            "bt_index_check(heapallindexed => {full}) on {checked} B-tree indexes; {unchecked} could not be checked"
        ));
        return Ok(());
    }
    report.checks_run.push(format!(
        "bt_index_check(heapallindexed => {full}) on {checked} B-tree indexes"
    ));
    if report.integrity_check != CheckStatus::Failed {
        report.integrity_check = CheckStatus::Passed;
    }
    Ok(())
}

/// Whether amcheck's error says the index or its table is corrupt (SQLSTATE class XX:
/// `index_corrupted`, `data_corrupted`, internal errors), as opposed to the check not
/// getting to run (a lock or statement timeout, a cancellation, a lost connection).
fn is_corruption(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("XX"))
}

/// MySQL / MariaDB: `CHECK TABLE` reports its findings as rows; an `error` row or a final
/// status other than `OK` is a failure.
async fn mysql_storage_check(
    db: &Db,
    schema: &Schema,
    full: bool,
    report: &mut IntegrityReport,
) -> Result<(), OpError> {
    let mut conn = db.scoped_connection().await?;
    let mut tx = read_tx(&mut conn).await?;
    let DbTx::MySql(t) = &mut tx else {
        return Ok(());
    };
    let c = &mut **t;
    let mut failed = false;
    for table in session_tables(schema) {
        let stmt = format!("CHECK TABLE {table}{}", if full { " EXTENDED" } else { "" });
        report.checks_run.push(stmt.clone());
        // Text protocol: CHECK TABLE is not accepted as a prepared statement everywhere.
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .fetch_all(&mut *c)
            .await?;
        let text: Vec<Vec<Option<String>>> = rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.try_get::<Option<String>, _>(i).ok().flatten())
                    .collect()
            })
            .collect();
        for e in mysql_row_errors(&text) {
            failed = true;
            report
                .issues_found
                .push(format!("{CORRUPTION_PREFIX}{table}: {e}"));
        }
        let status = text
            .iter()
            .rev()
            .find(|r| r.get(2).and_then(|t| t.as_deref()) == Some("status"))
            .and_then(|r| r.get(3).cloned().flatten());
        if let Some(status) = status.filter(|s| !s.eq_ignore_ascii_case("ok")) {
            failed = true;
            report
                .issues_found
                .push(format!("{CORRUPTION_PREFIX}{table}: {status}"));
        }
    }
    tx.commit().await?;
    report.integrity_check = if failed {
        CheckStatus::Failed
    } else {
        CheckStatus::Passed
    };
    Ok(())
}

/// Sessions whose user or platform row is missing. PostgreSQL and MySQL enforce declared
/// foreign keys, but the application may not have declared them (the v1 schema on some
/// installs), or they may have been dropped or disabled during an import.
async fn orphan_checks(
    db: &Db,
    schema: &Schema,
    report: &mut IntegrityReport,
) -> Result<(), OpError> {
    let s = &schema.sessions;
    let mut checks = Vec::new();
    if let Some(u) = &schema.users {
        checks.push((
            format!(
                // A NULL user id (guest sessions, where the column allows it) references
                // nothing, as SQL's own foreign keys see it.
                "SELECT COUNT(*) FROM {st} s LEFT JOIN {ut} u ON s.{uid} = u.{id} \
                 WHERE s.{uid} IS NOT NULL AND u.{id} IS NULL",
                st = s.table,
                ut = u.table,
                uid = s.user_id,
                id = u.id
            ),
            format!("{}.{} → {}.{}", s.table, s.user_id, u.table, u.id),
            "users",
        ));
    } else {
        report
            .issues_found
            .push("Foreign key check: users table not found; sessions → users not checked".into());
    }
    match (&schema.platforms, &s.platform_id) {
        (Some(p), Some(pid)) => checks.push((
            format!(
                "SELECT COUNT(*) FROM {st} s LEFT JOIN {pt} p ON s.{pid} = p.{id} \
                 WHERE s.{pid} IS NOT NULL AND p.{id} IS NULL",
                st = s.table,
                pt = p.table,
                id = p.id
            ),
            format!("{}.{pid} → {}.{}", s.table, p.table, p.id),
            "platforms",
        )),
        _ => report.issues_found.push(
            "Foreign key check: no platform table or column; sessions → platforms not checked"
                .into(),
        ),
    }
    if checks.is_empty() {
        return Ok(());
    }
    let mut conn = db.scoped_connection().await?;
    let mut tx = read_tx(&mut conn).await?;
    let mut orphans_total = 0;
    for (sql, edge, parent) in &checks {
        let sql = tx.sql(sql.clone());
        let orphans: i64 =
            crate::on_tx!(&mut tx, c => sqlx::query_scalar(sql).fetch_one(&mut *c).await?);
        report.checks_run.push(format!("orphan query {edge}"));
        if orphans > 0 {
            orphans_total += orphans;
            report.issues_found.push(format!(
                "Foreign key violation: {orphans} sessions in {} reference missing {parent} ({edge})",
                s.table
            ));
        }
    }
    tx.commit().await?;
    report.foreign_key_check = if orphans_total > 0 {
        CheckStatus::Failed
    } else {
        CheckStatus::Passed
    };
    Ok(())
}
