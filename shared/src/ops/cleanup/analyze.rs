//! Refreshing the planner's statistics after a large purge — what the original's "optimize"
//! step meant to do (`ANALYZE user_sessions`; its `PRAGMA incremental_vacuum` was a no-op
//! without `auto_vacuum=INCREMENTAL` and is not repeated).

use crate::fence::{Fence, SessionLock};
use crate::ops::OpError;
use crate::store::{Db, Engine, mysql_row_errors};

/// Refresh statistics once a run removed at least this share of the table (percent).
pub const ANALYZE_AFTER_SHARE_PCT: u64 = 10;

/// SQLite's `analysis_limit`: rows sampled per index, so `ANALYZE` holds the write lock for
/// milliseconds instead of scanning a large table.
pub const SQLITE_ANALYSIS_LIMIT: u32 = 1000;

/// True when `deleted` rows out of `deleted + left` are a significant share of the table.
pub fn worth_refreshing(deleted: u64, left: u64) -> bool {
    deleted > 0
        && deleted.saturating_mul(100) >= (deleted + left).saturating_mul(ANALYZE_AFTER_SHARE_PCT)
}

/// True when the engine refreshes statistics after large changes by itself: PostgreSQL with
/// autovacuum on (its autoanalyze runs once a tenth of a table changed), MySQL/MariaDB with
/// `innodb_stats_auto_recalc` (likewise). An ANALYZE of ours would then only repeat that work
/// on the cleanup's clock. SQLite never does it.
pub async fn engine_refreshes_statistics(db: &Db) -> bool {
    // When the setting cannot be read, refresh ourselves.
    match db.engine() {
        Engine::Postgres => db.postgres_autovacuum().await == Some(true),
        // Cast to a 64-bit integer: a 32-bit answer would not decode, read as "off", and we
        // would repeat the engine's work.
        Engine::MySql => matches!(
            db.scalar_i64("SELECT CAST(@@innodb_stats_auto_recalc AS SIGNED)")
                .await,
            Ok(1)
        ),
        Engine::Sqlite => false,
    }
}

/// Runs the engine's statistics refresh on `table` under the fence, again after a transient
/// error (a dropped connection at the end of a long purge would otherwise leave the planner
/// with the statistics of the table before it); a retry goes into `retried`. Returns
/// statements run.
pub async fn refresh_statistics(
    db: &Db,
    fence: &Fence,
    table: &str,
    retried: &super::retry::RetriedReads,
) -> Result<u64, OpError> {
    super::retry::with_retries("statistics refresh", OpError::is_transient, retried, || {
        refresh_once(db, fence, table)
    })
    .await
}

async fn refresh_once(db: &Db, fence: &Fence, table: &str) -> Result<u64, OpError> {
    match db.engine() {
        // Both run inside a transaction, so the fence check and the statement are one unit.
        // The fence is advanced after the ANALYZE, not before: its row lock is then held for
        // an instant, not for the whole ANALYZE while the run's last batches wait on it. A
        // fenced-out holder's transaction rolls back, which on SQLite undoes the statistics
        // too; PostgreSQL keeps the row estimates (`pg_class.reltuples`) and the last-analyze
        // time an ANALYZE writes in place even then. Those are planner statistics, which any
        // later ANALYZE replaces; no row of the application's is touched.
        Engine::Sqlite | Engine::Postgres => {
            // SQLite's `analysis_limit` stays on its connection: this one is closed after.
            let mut conn = db.scoped_connection().await?;
            let mut tx = conn.begin_write().await?;
            let limit = (db.engine() == Engine::Sqlite)
                .then(|| format!("PRAGMA analysis_limit = {SQLITE_ANALYSIS_LIMIT}"));
            let analyze = format!("ANALYZE {table}");
            let result: Result<(), sqlx::Error> = async {
                crate::on_tx!(&mut tx, c => {
                    if let Some(l) = limit {
                        sqlx::query(sqlx::AssertSqlSafe(l)).execute(&mut *c).await?;
                    }
                    sqlx::query(sqlx::AssertSqlSafe(analyze)).execute(&mut *c).await?;
                });
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.rollback().await;
                return Err(e.into());
            }
            if let Err(e) = fence.advance(&mut tx).await {
                let _ = tx.rollback().await;
                return Err(e.into());
            }
            tx.commit().await?;
        }
        // ANALYZE TABLE commits implicitly: run it on a pinned connection holding the
        // session lock, with the fence checked just before. It reports a failure as a result
        // row, not an error: a refresh counted as done would never be tried again.
        Engine::MySql => {
            let mut lock = SessionLock::acquire(db, fence).await?;
            let result = lock
                .fetch_text_checked(&format!("ANALYZE TABLE {table}"))
                .await;
            let _ = lock.release().await;
            let failures = mysql_row_errors(&result?);
            if !failures.is_empty() {
                return Err(OpError::Reported(format!(
                    "ANALYZE TABLE {table}: {}",
                    failures.join("; ")
                )));
            }
        }
    }
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;

    /// SQLite's `analysis_limit` is a setting of the connection, not of the transaction: the
    /// refresh runs on a connection that is closed afterwards, so the next connection the pool
    /// hands out analyses every row again (maintenance's optimize runs `ANALYZE` too). Fails
    /// if the refresh's connection goes back to the pool.
    #[tokio::test]
    async fn the_sqlite_sample_limit_stays_off_the_pool() {
        let tdb = TestDb::new(Engine::Sqlite).await;
        // One connection: the read below gets the refresh's, if it went back to the pool.
        let opts = crate::store::ConnectOptions {
            max_connections: 1,
            ..Default::default()
        };
        let db = &Db::connect(&tdb.url, &opts).await.expect("connect");
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .await
            .expect("table");
        let fence = crate::fence::issue_token(db, "target:test", "test")
            .await
            .expect("token");
        assert_eq!(
            refresh_statistics(db, &fence, "t", &Default::default())
                .await
                .expect("refresh"),
            1
        );
        let limit = db
            .scalar_i64("PRAGMA analysis_limit")
            .await
            .expect("read the limit");
        assert_eq!(limit, 0, "a pooled connection analyses every row");
        tdb.drop_db().await;
    }

    /// A holder whose token a newer one has replaced gets a fenced-out error from the
    /// refresh, on every engine; on SQLite its transaction rolls back, so the statistics it
    /// gathered are not kept (`sqlite_stat1` stays as it was). Fails if the fence is not
    /// checked, or if SQLite's `ANALYZE` commits without it.
    #[tokio::test]
    async fn a_stale_token_s_refresh_is_fenced_out_and_sqlite_keeps_nothing_of_it() {
        for engine in crate::testing::ENGINES {
            let tdb = TestDb::new(engine).await;
            let db = &tdb.db;
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")
                .await
                .expect("table");
            db.execute("CREATE INDEX t_v ON t (v)")
                .await
                .expect("index");
            db.execute("INSERT INTO t (id, v) VALUES (1, 1), (2, 2), (3, 3)")
                .await
                .expect("rows");
            let stale = crate::fence::issue_token(db, "target:test", "old holder")
                .await
                .expect("token");
            crate::fence::issue_token(db, "target:test", "new holder")
                .await
                .expect("newer token");
            let err = refresh_statistics(db, &stale, "t", &Default::default())
                .await
                .expect_err("a stale token refreshes nothing");
            assert!(err.is_fenced_out(), "{engine}: {err}");
            if engine == Engine::Sqlite {
                let stat1 = db
                    .scalar_i64("SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
                    .await
                    .expect("catalog");
                assert_eq!(stat1, 0, "the fenced-out ANALYZE was rolled back");
            }
            tdb.drop_db().await;
        }
    }

    /// MySQL's `ANALYZE TABLE` reports a failure as a result row, not as an error: a refresh
    /// of a table it cannot analyse is an error, not a statement counted as run. Fails if the
    /// rows are not read.
    #[tokio::test]
    async fn a_mysql_analyze_that_reports_a_failure_is_an_error() {
        let tdb = TestDb::new(Engine::MySql).await;
        let fence = crate::fence::issue_token(&tdb.db, "target:test", "test")
            .await
            .expect("token");
        let err = refresh_statistics(&tdb.db, &fence, "no_such_table", &Default::default())
            .await
            .expect_err("a failed ANALYZE is not a refresh");
        assert!(
            matches!(&err, OpError::Reported(m) if m.contains("no_such_table")),
            "{err}"
        );
        tdb.drop_db().await;
    }
}
