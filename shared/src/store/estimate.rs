//! A table's row count as the engine itself estimates it, for decisions that only need its
//! order of magnitude. An exact `COUNT(*)` reads the whole table (or its smallest index):
//! on a server engine that is seconds of I/O for tens of millions of rows, paid on every
//! scheduled run, where the planner's figure costs one catalog read.

use super::connect::{Db, Pool};
use super::read_conn::{CANCELLABLE, ReadConnection};

impl Db {
    /// The engine's own estimate of the rows in `table`, or `None` when it keeps none worth
    /// using (the caller then counts):
    /// - PostgreSQL: the planner's figure — `reltuples` per page at the last ANALYZE or
    ///   VACUUM, times the pages the table has now; `None` if it was never analyzed.
    /// - MySQL/MariaDB: `information_schema.TABLES.TABLE_ROWS`. InnoDB keeps it up to date as
    ///   rows come and go (approximately); MySQL 8 caches it for
    ///   `information_schema_stats_expiry` (a day by default). `None` when it is 0.
    /// - SQLite: always `None`; it keeps no live figure, and its count is cheap.
    ///
    /// On PostgreSQL the read waits behind an exclusive lock on the table, so it runs on a
    /// [`Db::cancellable_connection`], marked [`super::CANCELLABLE`]: a run that stops
    /// waiting for it ends it on the server.
    pub async fn estimated_rows(&self, table: &str) -> Result<Option<u64>, sqlx::Error> {
        if matches!(self.pool(), Pool::Sqlite(_)) {
            return Ok(None);
        }
        let mut conn = self.cancellable_connection().await?;
        conn.run(async |conn| {
            Ok(match conn {
                ReadConnection::Sqlite(_) => None,
                ReadConnection::Postgres(c) => {
                    // A constant statement behind the marker: nothing from outside.
                    let row: Option<(f64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "{CANCELLABLE} SELECT c.reltuples::float8, c.relpages::int8, \
                         (pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8 \
                         FROM pg_class c WHERE c.oid = to_regclass($1)"
                    )))
                    .bind(table)
                    .fetch_optional(&mut **c)
                    .await?;
                    row.and_then(|(tuples, pages_then, pages_now)| {
                        planner_rows(tuples, pages_then, pages_now)
                    })
                }
                ReadConnection::MySql(c) => {
                    let rows: Option<Option<i64>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "{CANCELLABLE} SELECT CAST(TABLE_ROWS AS SIGNED) FROM information_schema.TABLES \
                         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
                    )))
                    .bind(table)
                    .fetch_optional(&mut **c)
                    .await?;
                    rows.flatten()
                        .and_then(|n| u64::try_from(n).ok())
                        .filter(|n| *n > 0)
                }
            })
        })
        .await
    }
}

/// PostgreSQL's estimate from `pg_class`: the rows per page seen when the table was last
/// analyzed (`tuples` over `pages_then`), times its pages now — so growth since then counts.
/// `None` when it was never analyzed (`reltuples` is -1 from PostgreSQL 14 on; `relpages` 0).
fn planner_rows(tuples: f64, pages_then: i64, pages_now: i64) -> Option<u64> {
    if tuples < 0.0 || pages_then <= 0 {
        return None;
    }
    let rows = (tuples / pages_then as f64 * pages_now.max(0) as f64).round();
    (rows >= 1.0).then_some(rows as u64)
}

#[cfg(test)]
mod tests {
    use super::planner_rows;

    #[test]
    fn a_never_analyzed_table_has_no_estimate() {
        assert_eq!(planner_rows(-1.0, 0, 120), None);
        assert_eq!(planner_rows(0.0, 0, 120), None);
    }

    #[test]
    fn the_estimate_scales_with_the_pages_the_table_has_now() {
        assert_eq!(planner_rows(1_000.0, 10, 10), Some(1_000));
        assert_eq!(planner_rows(1_000.0, 10, 25), Some(2_500));
        assert_eq!(planner_rows(1_000.0, 10, 0), None);
    }
}
