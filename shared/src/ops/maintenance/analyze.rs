//! Analyze: per session-related table, counts, age, the real on-disk size from the engine's
//! catalog, dead rows / free space, last analyze and vacuum times, the indexes — and
//! recommendations with their reasons.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::guard::read_tx;
use super::indexes::{IndexInfo, missing_from, table_indexes};
use super::{OpError, push_section, session_tables, times};
use crate::store::{Db, DbTx, Engine, Schema, schema};

/// Above this many sessions, suggest a cleanup policy (the original's threshold).
pub const LARGE_TABLE_ROWS: i64 = 10_000;
/// Oldest session older than this many days: suggest archiving (the original's threshold).
pub const OLD_DATA_DAYS: i64 = 30;
/// Dead rows / free space above this share of the table count as bloat.
pub const BLOAT_SHARE: f64 = 0.20;
/// Below this many bytes of reclaimable space, bloat is not worth a recommendation.
pub const BLOAT_MIN_BYTES: i64 = 1 << 20;
/// PostgreSQL: updates plus deletes since the statistics reset, as a multiple of the live
/// rows, above which the session table counts as high-churn.
pub const HIGH_CHURN_RATIO: f64 = 1.0;
/// Suggested `autovacuum_vacuum_scale_factor` for a high-churn session table (default 0.2).
pub const CHURN_VACUUM_SCALE_FACTOR: f64 = 0.02;
/// Suggested `autovacuum_analyze_scale_factor` for a high-churn session table (default 0.1).
pub const CHURN_ANALYZE_SCALE_FACTOR: f64 = 0.01;
/// At this many sessions, suggest partitioning by expiry.
pub const PARTITION_ROWS: i64 = 10_000_000;
/// At this total size of the session table, suggest partitioning by expiry.
pub const PARTITION_BYTES: i64 = 10 << 30;

/// Figures of one table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableStats {
    /// Rows (exact `COUNT(*)`).
    pub row_count: i64,
    /// Distinct user ids (session table only).
    pub unique_users: Option<i64>,
    /// Earliest creation time (session table only).
    pub oldest_record: Option<NaiveDateTime>,
    /// Latest update time (session table only).
    pub newest_record: Option<NaiveDateTime>,
    /// Bytes of the table's own data pages.
    pub table_size_bytes: Option<i64>,
    /// Bytes of all its indexes.
    pub index_size_bytes: Option<i64>,
    /// Total bytes (table, indexes and, on PostgreSQL, TOAST).
    pub size_bytes: Option<i64>,
    /// Where the sizes come from (catalog function or view), with caveats.
    pub size_source: String,
    /// Dead row versions awaiting vacuum (PostgreSQL `n_dead_tup`).
    pub dead_rows: Option<i64>,
    /// Reclaimable bytes: MySQL `data_free`; SQLite free-list pages × page size (whole file).
    pub free_bytes: Option<i64>,
    /// Rows updated plus deleted since the statistics reset (PostgreSQL), a churn measure.
    pub modifications: Option<i64>,
    /// Last manual `ANALYZE` (PostgreSQL; MySQL: last persistent-statistics update).
    pub last_analyze: Option<NaiveDateTime>,
    /// Last autovacuum-driven analyze (PostgreSQL).
    pub last_autoanalyze: Option<NaiveDateTime>,
    /// Last manual `VACUUM` (PostgreSQL).
    pub last_vacuum: Option<NaiveDateTime>,
    /// Last autovacuum (PostgreSQL).
    pub last_autovacuum: Option<NaiveDateTime>,
    /// Per-table storage options (PostgreSQL `reloptions`), e.g. autovacuum settings.
    pub storage_options: Vec<String>,
}

/// Result of [`analyze`], with the original's field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableAnalysis {
    /// When the analysis ran (UTC).
    pub timestamp: NaiveDateTime,
    /// Engine name (`sqlite`, `postgres`, `mysql`).
    pub engine: String,
    /// Figures per session-related table.
    pub tables: BTreeMap<String, TableStats>,
    /// Indexes per table, with columns and uniqueness.
    pub indexes: BTreeMap<String, Vec<IndexInfo>>,
    /// What to do, each with its reason.
    pub recommendations: Vec<String>,
}

impl TableAnalysis {
    /// The original's text layout, for the session table first.
    pub fn render_text(&self) -> String {
        let mut out = String::from("Session Table Analysis\n");
        out.push_str(&"=".repeat(40));
        out.push('\n');
        // The session table (the one whose users are counted) first, as the original
        // printed only it; the others after it by name.
        let mut tables: Vec<_> = self.tables.iter().collect();
        tables.sort_by_key(|(name, stats)| (stats.unique_users.is_none(), name.as_str()));
        for (table, stats) in tables {
            out.push_str(&format!("Table: {table}\n"));
            out.push_str(&format!("Row Count: {}\n", stats.row_count));
            if let Some(users) = stats.unique_users {
                out.push_str(&format!("Unique Users: {users}\n"));
            }
            match stats.size_bytes {
                Some(size) => {
                    out.push_str(&format!("Size: {size} bytes ({})\n", stats.size_source))
                }
                None => out.push_str(&format!("Size: unknown ({})\n", stats.size_source)),
            }
            let indexes = self
                .indexes
                .get(table)
                .map(Vec::as_slice)
                .unwrap_or_default();
            out.push_str(&format!("\nIndexes ({}):\n", indexes.len()));
            for ix in indexes {
                let unique = if ix.unique { " UNIQUE" } else { "" };
                let invalid = if ix.valid { "" } else { " INVALID" };
                out.push_str(&format!(
                    "  - {} ({}){unique}{invalid}\n",
                    ix.name,
                    ix.columns.join(", ")
                ));
            }
            out.push('\n');
        }
        push_section(&mut out, "Recommendations:", &self.recommendations);
        out
    }
}

/// Analyzes the session-related tables (sessions, users, platforms — as present). Read-only.
pub async fn analyze(db: &Db) -> Result<TableAnalysis, OpError> {
    let schema = schema::detect(db).await?;
    let mut tables = BTreeMap::new();
    let mut indexes = BTreeMap::new();
    let mut conn = db.scoped_connection().await?;
    let mut tx = read_tx(&mut conn).await?;
    for table in session_tables(&schema) {
        let mut stats = count_rows(&mut tx, &schema, &table).await?;
        let present = table_indexes(db, &table).await?;
        measure_size(&mut tx, &table, &present, &mut stats).await?;
        tables.insert(table.clone(), stats);
        indexes.insert(table, present);
    }
    tx.commit().await?;
    let now = Utc::now().naive_utc();
    let mut recommendations = recommend(db.engine(), &schema, &tables, &indexes, now);
    if let Some(advice) = autovacuum_off_advice(db, &schema, &tables).await {
        recommendations.retain(|r| r != NOTHING_TO_DO);
        recommendations.push(advice);
    }
    Ok(TableAnalysis {
        timestamp: now,
        engine: db.engine().name().to_string(),
        tables,
        indexes,
        recommendations,
    })
}

/// Row count; for the session table also distinct users and the oldest / newest record.
async fn count_rows(
    tx: &mut DbTx<'_>,
    schema: &Schema,
    table: &str,
) -> Result<TableStats, OpError> {
    let s = &schema.sessions;
    if table != s.table {
        let sql = tx.sql(format!("SELECT COUNT(*) FROM {table}"));
        let row_count: i64 =
            crate::on_tx!(tx, c => sqlx::query_scalar(sql).fetch_one(&mut *c).await?);
        return Ok(TableStats {
            row_count,
            ..TableStats::default()
        });
    }
    let (row_count, unique_users, oldest, newest) = match tx {
        DbTx::Sqlite(t) => {
            let c = &mut **t;
            let sql = format!(
                "SELECT COUNT(*), COUNT(DISTINCT {}), {}, {} FROM {table}",
                s.user_id,
                times::sqlite_ends_sql(&s.created_at),
                times::sqlite_ends_sql(&s.updated_at)
            );
            let r = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut *c)
                .await?;
            let (count, users) = (r.try_get(0)?, r.try_get(1)?);
            let created = times::SqliteEnds::read(&r, 2)?;
            let updated = times::SqliteEnds::read(&r, 6)?;
            let oldest = times::sqlite_end(c, table, &s.created_at, &created, false).await?;
            let newest = times::sqlite_end(c, table, &s.updated_at, &updated, true).await?;
            (count, users, oldest, newest)
        }
        _ => {
            let engine = tx.engine();
            let sql = tx.sql(format!(
                "SELECT COUNT(*), COUNT(DISTINCT {}), MIN({}), MAX({}) FROM {table}",
                s.user_id,
                times::server_time(engine, &s.created_at),
                times::server_time(engine, &s.updated_at)
            ));
            crate::on_tx!(tx, c => {
                let r = sqlx::query(sql).fetch_one(&mut *c).await?;
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)
            })
        }
    };
    Ok(TableStats {
        row_count,
        unique_users: Some(unique_users),
        oldest_record: oldest,
        newest_record: newest,
        ..TableStats::default()
    })
}

/// The real on-disk size and the dead / free space, from each engine's catalog.
async fn measure_size(
    tx: &mut DbTx<'_>,
    table: &str,
    present: &[IndexInfo],
    stats: &mut TableStats,
) -> Result<(), OpError> {
    match tx {
        // SQLite: the dbstat virtual table sums the pages of each b-tree; without it (a build
        // lacking SQLITE_ENABLE_DBSTAT_VTAB) only the whole file's size is known.
        DbTx::Sqlite(t) => {
            let c = &mut **t;
            let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
                .fetch_one(&mut *c)
                .await?;
            let free_pages: i64 = sqlx::query_scalar("PRAGMA freelist_count")
                .fetch_one(&mut *c)
                .await?;
            stats.free_bytes = Some(free_pages * page_size);
            let dbstat =
                "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = ? AND aggregate = TRUE";
            match sqlx::query_scalar::<_, i64>(dbstat)
                .bind(table)
                .fetch_one(&mut *c)
                .await
            {
                Ok(table_bytes) => {
                    let mut index_bytes = 0;
                    for ix in present {
                        let n: i64 = sqlx::query_scalar(dbstat)
                            .bind(&ix.name)
                            .fetch_one(&mut *c)
                            .await?;
                        index_bytes += n;
                    }
                    stats.table_size_bytes = Some(table_bytes);
                    stats.index_size_bytes = Some(index_bytes);
                    stats.size_bytes = Some(table_bytes + index_bytes);
                    stats.size_source = "dbstat (pages of the table and index b-trees); free_bytes is the whole file's free list".into();
                }
                Err(_) => {
                    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
                        .fetch_one(&mut *c)
                        .await?;
                    stats.size_bytes = Some(pages * page_size);
                    stats.size_source = "page_count × page_size: whole database file (dbstat unavailable in this SQLite build)".into();
                }
            }
        }
        // PostgreSQL: relation sizes from the storage manager; dead rows, churn and the
        // vacuum / analyze times from the cumulative statistics.
        DbTx::Postgres(t) => {
            let c = &mut **t;
            let row = sqlx::query(
                "SELECT pg_relation_size(c.oid), pg_indexes_size(c.oid), pg_total_relation_size(c.oid), \
                        s.n_dead_tup, s.n_tup_upd + s.n_tup_del, \
                        s.last_analyze, s.last_autoanalyze, s.last_vacuum, s.last_autovacuum, \
                        COALESCE(c.reloptions, '{}'::text[]) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
                 WHERE c.relname = $1 AND n.nspname = current_schema() AND c.relkind IN ('r', 'p')",
            )
            .bind(table)
            .fetch_optional(&mut *c)
            .await?;
            if let Some(r) = row {
                let time = |i: usize| -> Result<Option<NaiveDateTime>, sqlx::Error> {
                    Ok(r.try_get::<Option<DateTime<Utc>>, _>(i)?
                        .map(|t| t.naive_utc()))
                };
                stats.table_size_bytes = Some(r.try_get(0)?);
                stats.index_size_bytes = Some(r.try_get(1)?);
                stats.size_bytes = Some(r.try_get(2)?);
                stats.dead_rows = r.try_get(3)?;
                stats.modifications = r.try_get(4)?;
                stats.last_analyze = time(5)?;
                stats.last_autoanalyze = time(6)?;
                stats.last_vacuum = time(7)?;
                stats.last_autovacuum = time(8)?;
                stats.storage_options = r.try_get(9)?;
            }
            stats.size_source =
                "pg_relation_size / pg_indexes_size / pg_total_relation_size (total includes TOAST)".into();
        }
        // MySQL / MariaDB: InnoDB's figures in information_schema (page-based; MySQL 8
        // caches them for information_schema_stats_expiry seconds).
        DbTx::MySql(t) => {
            let c = &mut **t;
            let row = sqlx::query(
                "SELECT CAST(data_length AS SIGNED), CAST(index_length AS SIGNED), CAST(data_free AS SIGNED) \
                 FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
            )
            .bind(table)
            .fetch_optional(&mut *c)
            .await?;
            if let Some(r) = row {
                let data: Option<i64> = r.try_get(0)?;
                let index: Option<i64> = r.try_get(1)?;
                stats.table_size_bytes = data;
                stats.index_size_bytes = index;
                stats.size_bytes = Some(data.unwrap_or(0) + index.unwrap_or(0));
                stats.free_bytes = r.try_get(2)?;
            }
            stats.size_source =
                "information_schema.tables data_length + index_length (InnoDB pages)".into();
            // Persistent statistics record when ANALYZE TABLE (or the automatic recalculation)
            // last ran, as a `timestamp`: cast to a plain date-time (UTC on our sessions).
            // Reading mysql.* may be denied, which only loses this one figure; any other
            // error is ours and fails the analysis rather than hide the figure for good.
            let analyzed = sqlx::query_scalar::<_, Option<NaiveDateTime>>(
                "SELECT CAST(MAX(last_update) AS DATETIME) FROM mysql.innodb_table_stats WHERE database_name = DATABASE() AND table_name = ?",
            )
            .bind(table)
            .fetch_one(&mut *c)
            .await;
            stats.last_analyze = match analyzed {
                Ok(at) => at,
                Err(sqlx::Error::Database(e)) => {
                    tracing::debug!(error = %e, "mysql.innodb_table_stats not read");
                    None
                }
                Err(e) => return Err(e.into()),
            };
        }
    }
    Ok(())
}

/// The recommendations, each with the figure that triggered it.
fn recommend(
    engine: Engine,
    schema: &Schema,
    tables: &BTreeMap<String, TableStats>,
    indexes: &BTreeMap<String, Vec<IndexInfo>>,
    now: NaiveDateTime,
) -> Vec<String> {
    let mut out = Vec::new();
    let s = &schema.sessions;
    let present = indexes.get(&s.table).map(Vec::as_slice).unwrap_or_default();
    for ix in present.iter().filter(|ix| !ix.valid) {
        out.push(format!(
            "Index {} is INVALID (left by an interrupted concurrent build): it slows writes and serves no query - run create-indexes to rebuild it",
            ix.name
        ));
    }
    // Invalid ones were reported just above; the rest are absent.
    let invalid = |name: &str| {
        present
            .iter()
            .any(|ix| !ix.valid && ix.name.eq_ignore_ascii_case(name))
    };
    for spec in missing_from(schema, present)
        .into_iter()
        .filter(|s| !invalid(&s.name))
    {
        out.push(format!(
            "Missing recommended index: {} ({}) - needed for {}",
            spec.name,
            spec.columns.join(", "),
            spec.reason
        ));
    }
    let Some(stats) = tables.get(&s.table) else {
        return out;
    };
    if stats.row_count > LARGE_TABLE_ROWS {
        out.push(format!(
            "Consider implementing session cleanup policies - large table detected ({} rows)",
            stats.row_count
        ));
    }
    if let Some(oldest) = stats.oldest_record {
        let days = (now - oldest).num_days();
        if days > OLD_DATA_DAYS {
            out.push(format!(
                "Old data detected ({days} days) - consider archiving"
            ));
        }
    }
    out.extend(bloat_advice(engine, &s.table, stats));
    if engine == Engine::Postgres {
        out.extend(autovacuum_advice(&s.table, stats));
    }
    let size = stats.size_bytes.unwrap_or(0);
    if stats.row_count >= PARTITION_ROWS || size >= PARTITION_BYTES {
        let column = s.expires_at.as_ref().unwrap_or(&s.updated_at);
        out.push(format!(
            "Very large session table ({} rows, {} MB) - consider range partitioning by {column} (one partition per day or week) so expired sessions go with a DROP PARTITION instead of row deletes",
            stats.row_count,
            size / (1 << 20)
        ));
    }
    if out.is_empty() {
        out.push(NOTHING_TO_DO.into());
    }
    out
}

/// The recommendation when nothing else is recommended.
const NOTHING_TO_DO: &str = "Database maintenance is up to date";

/// PostgreSQL with autovacuum off, server-wide or for the session table: nothing reclaims the
/// dead rows every cleanup leaves, nor refreshes statistics, but an explicit vacuum.
async fn autovacuum_off_advice(
    db: &Db,
    schema: &Schema,
    tables: &BTreeMap<String, TableStats>,
) -> Option<String> {
    if db.engine() != Engine::Postgres {
        return None;
    }
    // Unreadable counts as on: no advice is better than a wrong one.
    let off_on_server = db.postgres_autovacuum().await == Some(false);
    let table = &schema.sessions.table;
    let off_for_table = tables.get(table).is_some_and(|t| {
        t.storage_options
            .iter()
            .any(|o| o.eq_ignore_ascii_case("autovacuum_enabled=false"))
    });
    let scope = if off_on_server {
        "on this server"
    } else if off_for_table {
        "for this table"
    } else {
        return None;
    };
    Some(format!(
        "Autovacuum is off {scope} - the dead rows each cleanup leaves in {table} are never reclaimed and its statistics never refreshed: turn autovacuum on, or run optimize with vacuum after cleanups"
    ))
}

/// Reclaimable space per engine: dead rows (PostgreSQL), free pages (SQLite), data_free (MySQL).
fn bloat_advice(engine: Engine, table: &str, stats: &TableStats) -> Option<String> {
    let size = stats.size_bytes.unwrap_or(0).max(1);
    match engine {
        Engine::Postgres => {
            let dead = stats.dead_rows.unwrap_or(0);
            let live = stats.row_count.max(1);
            let share = dead as f64 / (dead + live) as f64;
            (share > BLOAT_SHARE && dead > 1000).then(|| {
                format!(
                    "Table {table} has {dead} dead rows ({:.0}% of row versions) - run optimize with vacuum (plain VACUUM, never VACUUM FULL online)",
                    share * 100.0
                )
            })
        }
        Engine::Sqlite | Engine::MySql => {
            let free = stats.free_bytes.unwrap_or(0);
            let share = free as f64 / (free + size) as f64;
            (share > BLOAT_SHARE && free >= BLOAT_MIN_BYTES).then(|| {
                let how = if engine == Engine::Sqlite { "VACUUM" } else { "OPTIMIZE TABLE" };
                format!(
                    "{:.1} MB ({:.0}%) of free space in {} - run optimize with vacuum ({how}) to return it",
                    free as f64 / (1 << 20) as f64,
                    share * 100.0,
                    if engine == Engine::Sqlite { "the database file" } else { table }
                )
            })
        }
    }
}

/// PostgreSQL: a session table rewrites itself constantly (touches, expiry deletes); with the
/// default scale factor (20%) autovacuum comes too late.
fn autovacuum_advice(table: &str, stats: &TableStats) -> Option<String> {
    let live = stats.row_count;
    let churn = stats.modifications.unwrap_or(0);
    let tuned = stats
        .storage_options
        .iter()
        .any(|o| o.starts_with("autovacuum_vacuum_scale_factor"));
    (live >= LARGE_TABLE_ROWS && churn as f64 >= live as f64 * HIGH_CHURN_RATIO && !tuned).then(|| {
        format!(
            "High-churn table {table} ({churn} updates+deletes for {live} rows) - consider ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = {CHURN_VACUUM_SCALE_FACTOR}, autovacuum_analyze_scale_factor = {CHURN_ANALYZE_SCALE_FACTOR}) so autovacuum runs before a fifth of the table is dead"
        )
    })
}
