//! Runs the report's aggregate queries, timing each one, and the SQL fragments whose
//! spelling differs per engine (SQLite / PostgreSQL / MySQL side by side).
//!
//! Every query returns a handful of rows (aggregates, or a `LIMIT`ed list), so the report's
//! memory does not grow with the table.

use std::time::Instant;

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::store::{CANCELLABLE, Db, Engine, ReadConnection};

/// One query the report ran, as measured by the report itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryTiming {
    /// What the query computes (`session_scan`, `per_user`, …).
    pub name: String,
    /// Round-trip time in milliseconds, from sending (a connection in hand) to the last row
    /// decoded.
    pub millis: f64,
    /// Rows returned.
    pub rows: u64,
}

/// A bound parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A UTC timestamp.
    Time(NaiveDateTime),
}

/// How to decode one result column.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Int,
    Float,
    Text,
}

/// One decoded value; `Null` for SQL NULL.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Int(i64),
    Float(f64),
    Text(String),
    Null,
}

impl Cell {
    /// Integer value, 0 for NULL (aggregates over no rows).
    pub(crate) fn int(&self) -> i64 {
        match self {
            Cell::Int(i) => *i,
            Cell::Float(f) => *f as i64,
            _ => 0,
        }
    }
    /// Non-negative count.
    pub(crate) fn count(&self) -> u64 {
        self.int().max(0) as u64
    }
    /// Float value rounded to the millisecond (SQLite's julianday arithmetic is not exact).
    pub(crate) fn millis(&self) -> Option<f64> {
        self.float().map(|f| (f * 1000.0).round() / 1000.0)
    }
    /// Float value, `None` for NULL.
    pub(crate) fn float(&self) -> Option<f64> {
        match self {
            Cell::Int(i) => Some(*i as f64),
            Cell::Float(f) => Some(*f),
            _ => None,
        }
    }
    /// Text value, `None` for NULL.
    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// Runs queries on one database and records their timings. Shared by reference, so several
/// queries can run at once on the pool's connections.
pub(crate) struct Probe<'a> {
    db: &'a Db,
    timings: std::sync::Mutex<Vec<QueryTiming>>,
}

impl<'a> Probe<'a> {
    pub(crate) fn new(db: &'a Db) -> Probe<'a> {
        Probe {
            db,
            timings: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The timings recorded, in the order of `order` (names not listed come last).
    pub(crate) fn into_timings(self, order: &[&str]) -> Vec<QueryTiming> {
        let mut t = self.timings.into_inner().unwrap_or_else(|p| p.into_inner());
        t.sort_by_key(|q| {
            order
                .iter()
                .position(|n| *n == q.name)
                .unwrap_or(order.len())
        });
        t
    }

    /// Runs `sql` (with `?` placeholders) and decodes every row by `kinds`.
    pub(crate) async fn rows(
        &self,
        name: &str,
        sql: String,
        args: &[Arg],
        kinds: &[Kind],
    ) -> Result<Vec<Vec<Cell>>, sqlx::Error> {
        self.rows_planned(name, sql, args, kinds, None).await
    }

    /// [`Self::rows`], on PostgreSQL with `pg_settings` (`SET LOCAL …` statements) applied
    /// to this query alone, inside a transaction that is rolled back, so a pooled connection
    /// never keeps them.
    pub(crate) async fn rows_planned(
        &self,
        name: &str,
        sql: String,
        args: &[Arg],
        kinds: &[Kind],
        pg_settings: Option<&'static str>,
    ) -> Result<Vec<Vec<Cell>>, sqlx::Error> {
        let db = self.db;
        let pg_settings = pg_settings.filter(|_| db.engine() == Engine::Postgres);
        // The report has more queries than the pool has connections, and a worker may run
        // several reports on one pool: without a turn, the extra queries waited in the
        // pool's acquire and timed out behind long ones (at 10M sessions on MariaDB).
        let _turn = db.query_turn().await;
        // A report given up (a shutdown, the CLI's deadline) drops this future mid-query: its
        // connection is then closed, not pooled still busy with the query, and the query,
        // marked, is cancelled on the server rather than left to scan for a minute.
        let mut conn = db.cancellable_connection().await?;
        let sql = db.sql(format!("{CANCELLABLE} {sql}"));
        // The clock starts once a connection is ours: the report's queries run concurrently,
        // and waiting for the pool is not a query's round trip.
        let started = Instant::now();
        let rows = conn
            .run(async |conn| {
                macro_rules! fetch {
                    ($c:expr) => {{
                        let c = $c;
                        let mut q = sqlx::query(sql);
                        for a in args {
                            q = match *a {
                                Arg::Time(t) => q.bind(t),
                            };
                        }
                        let raw = match pg_settings {
                            Some(settings) => {
                                let mut tx = sqlx::Connection::begin(&mut **c).await?;
                                sqlx::raw_sql(settings).execute(&mut *tx).await?;
                                let raw = q.fetch_all(&mut *tx).await?;
                                tx.rollback().await?;
                                raw
                            }
                            None => q.fetch_all(&mut **c).await?,
                        };
                        let mut out = Vec::with_capacity(raw.len());
                        for r in &raw {
                            let mut cells = Vec::with_capacity(kinds.len());
                            for (i, k) in kinds.iter().enumerate() {
                                let cell = match k {
                                    // Plain INTEGER columns (user ids) are 32-bit on PostgreSQL
                                    // and MySQL.
                                    Kind::Int => match r.try_get::<Option<i64>, _>(i) {
                                        Ok(v) => v.map_or(Cell::Null, Cell::Int),
                                        Err(_) => r
                                            .try_get::<Option<i32>, _>(i)?
                                            .map_or(Cell::Null, |v| Cell::Int(v.into())),
                                    },
                                    // SQLite's dynamic typing may hand back an INTEGER where
                                    // REAL is meant.
                                    Kind::Float => match r.try_get::<Option<f64>, _>(i) {
                                        Ok(v) => v.map_or(Cell::Null, Cell::Float),
                                        Err(_) => r
                                            .try_get::<Option<i64>, _>(i)?
                                            .map_or(Cell::Null, |v| Cell::Float(v as f64)),
                                    },
                                    Kind::Text => r
                                        .try_get::<Option<String>, _>(i)?
                                        .map_or(Cell::Null, Cell::Text),
                                };
                                cells.push(cell);
                            }
                            out.push(cells);
                        }
                        out
                    }};
                }
                Ok(match conn {
                    ReadConnection::Sqlite(c) => fetch!(c),
                    ReadConnection::Postgres(c) => fetch!(c),
                    ReadConnection::MySql(c) => fetch!(c),
                })
            })
            .await?;
        let timing = QueryTiming {
            name: name.to_string(),
            millis: started.elapsed().as_secs_f64() * 1000.0,
            rows: rows.len() as u64,
        };
        self.timings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(timing);
        Ok(rows)
    }

    /// Runs a query expected to return exactly one row (an aggregate).
    pub(crate) async fn one(
        &self,
        name: &str,
        sql: String,
        args: &[Arg],
        kinds: &[Kind],
    ) -> Result<Vec<Cell>, sqlx::Error> {
        let mut rows = self.rows(name, sql, args, kinds).await?;
        Ok(if rows.is_empty() {
            vec![Cell::Null; kinds.len()]
        } else {
            rows.swap_remove(0)
        })
    }
}

/// `COUNT` of rows matching `pred`, as a 64-bit integer on every engine (0 over no rows).
///
/// `FILTER` skips the aggregate's step for rows that do not match (SQLite: a 1M-row scan
/// with nine counts 0.63 → 0.51 s); MySQL has no `FILTER`, and its `SUM` is `DECIMAL`,
/// hence the cast.
pub(crate) fn count_if(engine: Engine, pred: &str) -> String {
    match engine {
        Engine::Sqlite | Engine::Postgres => format!("COUNT(*) FILTER (WHERE {pred})"),
        Engine::MySql => {
            let int = int_type(engine);
            format!("COALESCE(CAST(SUM(CASE WHEN {pred} THEN 1 ELSE 0 END) AS {int}), 0)")
        }
    }
}

/// The integer type name usable in `CAST(… AS …)`.
pub(crate) fn int_type(engine: Engine) -> &'static str {
    match engine {
        Engine::Sqlite => "INTEGER",
        Engine::Postgres => "BIGINT",
        Engine::MySql => "SIGNED",
    }
}

/// The floating type name usable in `CAST(… AS …)`.
pub(crate) fn float_type(engine: Engine) -> &'static str {
    match engine {
        Engine::Sqlite => "REAL",
        Engine::Postgres => "DOUBLE PRECISION",
        Engine::MySql => "DOUBLE",
    }
}

/// Seconds from `from` to `to` (two timestamp columns), as a floating expression.
pub(crate) fn seconds_between(engine: Engine, from: &str, to: &str) -> String {
    match engine {
        Engine::Sqlite => format!("((julianday({to}) - julianday({from})) * 86400.0)"),
        Engine::Postgres => {
            format!("CAST(EXTRACT(EPOCH FROM ({to} - {from})) AS DOUBLE PRECISION)")
        }
        Engine::MySql => format!("TIMESTAMPDIFF(MICROSECOND, {from}, {to}) / 1000000.0"),
    }
}

/// The UTC calendar day of a timestamp expression, as `YYYY-MM-DD` text.
pub(crate) fn day_of(engine: Engine, ts: &str) -> String {
    match engine {
        // Stored as text `YYYY-MM-DD HH:MM:SS…`; the first ten characters are the day.
        Engine::Sqlite => format!("substr({ts}, 1, 10)"),
        Engine::Postgres => format!("to_char({ts}, 'YYYY-MM-DD')"),
        Engine::MySql => format!("CAST(DATE_FORMAT({ts}, '%Y-%m-%d') AS CHAR)"),
    }
}

/// A timestamp column plus a whole number of seconds.
pub(crate) fn plus_seconds(engine: Engine, ts: &str, secs: u64) -> String {
    match engine {
        Engine::Sqlite => format!("datetime({ts}, '+{secs} seconds')"),
        Engine::Postgres => format!("({ts} + INTERVAL '{secs} seconds')"),
        Engine::MySql => format!("DATE_ADD({ts}, INTERVAL {secs} SECOND)"),
    }
}
